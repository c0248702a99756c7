"""Best of N: several seeds of one workflow, their pictures ranked by the Identity Score node."""

from __future__ import annotations

from .http_api import RunError
from .api_workflow import is_link


IDENTITY_NODE = "FaceDiffuserIdentityScore"

IDENTITY_RESULT = "facediffuser_identity"  # the node's UI result in /history (format: nodes/identity_score.py)

SAVE_NODE = "SaveImage"

SCORES_FILE = "identity_scores.json"

BEST_OF_N_OPTIONS = "--candidates/--keep-best"


def identity_score_node(workflow: dict, option: str = BEST_OF_N_OPTIONS) -> str:
    """The one Identity Score node that best-of-N ranks by; `option` names what asked for best-of-N."""
    nodes = [node_id for node_id, node in workflow.items() if node["class_type"] == IDENTITY_NODE]
    if len(nodes) != 1:
        raise RunError(
            f"{option}: best-of-N ranks the pictures by the workflow's {IDENTITY_NODE} node, but it has "
            f"{len(nodes) or 'no'} such node{'s' if len(nodes) > 1 else ''}{' (' + ', '.join(nodes) + ')' if nodes else ''}. "
            "Add one Face-diffuser Identity Score in ComfyUI (references: the reference photos; images: the decoded "
            "pictures that Save Image saves) and export the workflow again (Workflow > Export (API))"
        )
    return nodes[0]


def scored_pictures_saver(workflow: dict, identity_node: str, option: str = BEST_OF_N_OPTIONS) -> str:
    """The Save Image node that saves the very pictures the Identity Score node scores (same source)."""
    scored = workflow[identity_node]["inputs"].get("images")
    savers = sorted((node_id for node_id, node in workflow.items()
                     if node["class_type"] == SAVE_NODE and is_link(scored) and node["inputs"].get("images") == scored), key=str)
    if not savers:
        raise RunError(
            f"{option}: no {SAVE_NODE} node saves the pictures that node {identity_node} ({IDENTITY_NODE}) "
            f"scores; connect the same images (its 'images' input comes from {scored}) to a Save Image"
        )
    return savers[0]


def scored_pictures(entry: dict, identity_node: str, saver: str | None) -> tuple[list[dict], list[dict]]:
    """From a finished job's history: the Identity Score node's result per picture (format: nodes/identity_score.py)
    and, in the same order, the references of the pictures `saver` saved (none without a saver)."""
    outputs = entry.get("outputs", {})
    pictures = outputs.get(identity_node, {}).get(IDENTITY_RESULT)
    if pictures is None:
        raise RunError(f"node {identity_node} ({IDENTITY_NODE}) reported no scores; is the pack up to date on the server?")
    if saver is None:
        return pictures, []
    images = outputs.get(saver, {}).get("images", [])
    if len(images) != len(pictures):
        raise RunError(f"node {saver} saved {len(images)} picture(s) but {len(pictures)} were scored")
    return pictures, images


def rank_pictures(candidates: list[dict]) -> list[tuple[int, int]]:
    """(candidate index, batch index) of every scored picture, best first: highest score, then earlier
    seed, then earlier picture of the batch."""
    pictures = [(picture["score"], index, picture["batch_index"])
                for index, candidate in enumerate(candidates) for picture in candidate["pictures"]]
    return [(index, batch) for _, index, batch in sorted(pictures, key=lambda p: (-p[0], p[1], p[2]))]


def describe_candidate(seed: int, pictures: list[dict]) -> str:
    parts = []
    for picture in pictures:
        subjects = ", ".join(
            f"subject {s['subject'] + 1} " + ("missing" if s["missing"] else f"{s['similarity']:.3f}" + (" mixed" if s["mixed"] else ""))
            for s in picture["subjects"])
        parts.append(f"picture {picture['batch_index']}: score {picture['score']:.3f} ({subjects})")
    return f"seed {seed}: " + "; ".join(parts)


def identity_scorers(workflow: dict) -> dict[str, str | None]:
    """Each Identity Score node of the workflow -> the Save Image node saving the pictures it scores (None: none
    does, and its scores name no file)."""
    scorers = {}
    for node_id, node in workflow.items():
        if node["class_type"] == IDENTITY_NODE:
            try:
                scorers[node_id] = scored_pictures_saver(workflow, node_id)
            except RunError:
                scorers[node_id] = None
    return scorers


def best_of_n_node(workflow: dict, from_command_line: bool) -> str:
    """The Identity Score node the job's best-of-N ranks by; an error naming the fix when the workflow has none
    (or several, or none whose pictures are saved)."""
    asked_by, opt_out = (('--keep-best (for the jobs without "keep_best")', 'or give this job "keep_best": 0') if from_command_line
                         else ('"keep_best"', 'or take "keep_best" out of this job'))
    try:
        node = identity_score_node(workflow, asked_by)
        scored_pictures_saver(workflow, node, asked_by)
    except RunError as error:
        raise RunError(f"{error}; {opt_out}") from None
    return node
