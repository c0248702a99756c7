"""One workflow on one server, the headless runner's work: overrides, photos, the run, its pictures."""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import uuid
from pathlib import Path

from .best_of_n import (SCORES_FILE, describe_candidate, identity_score_node, rank_pictures, scored_pictures,
                        scored_pictures_saver)
from .http_api import ComfyClient, RunError, cached_nodes, describe_failure, output_images
from .files import best_file_name, save_pictures, unused_path
from . import server_log
from .pack import core
from .progress import ProgressDisplay
from .regions import follow_the_latent, set_regions, shipped_regions_workflow
from .server_log import JobLog
from .api_workflow import (OVERRIDE_TARGETS, REFERENCE_ENCODER, current_value, is_link, load_api_workflow,
                           reference_image_loaders, set_override, shipped_workflow, use_installed_checkpoints)

SUBJECT_PROMPT = OVERRIDE_TARGETS["prompt"][0][0]

# How the nodes name one photo of the reference batch in their errors (Encode Reference Faces, Identity Score).
PHOTO_IN_ERROR = re.compile(r"\b(?:image (\d+) of the batch|reference photo (\d+))")


class JobCancelled(KeyboardInterrupt):
    """Ctrl-C while a job ran or waited: the job was taken off the server before the interruption went on."""


def workflow_file(args: argparse.Namespace) -> Path:
    """The workflow file given, else the shipped one for the face count (and --regions)."""
    if args.workflow is not None:
        return args.workflow
    return shipped_regions_workflow(args.regions, len(args.face)) if args.regions else shipped_workflow(len(args.face))


def configured_workflow(args: argparse.Namespace) -> dict:
    """The workflow with the command line's overrides and --regions set, checked against the faces: everything but the
    photos and the server's files, all known before any ComfyUI starts, so that a mistake in it is said at once rather
    than after the models loaded."""
    workflow = load_api_workflow(workflow_file(args))
    for option in OVERRIDE_TARGETS:
        value = getattr(args, option)
        if value is not None:
            set_override(workflow, option, value)
    if args.width is not None or args.height is not None:
        follow_the_latent(workflow)
    if args.regions:
        set_regions(workflow, args.regions, args.boxes, len(args.face), args.prompt)
    if args.face:
        loaders = reference_image_loaders(workflow)
        if len(loaders) != len(args.face):
            raise RunError(
                f"--face given {len(args.face)} time(s) but the workflow loads {len(loaders)} reference photo(s) "
                f"(LoadImage nodes {', '.join(loaders) or 'none'} feeding {REFERENCE_ENCODER}); give one --face per photo"
            )
    check_prompt_markers(workflow, args)
    return workflow


def check_prompt_markers(workflow: dict, args: argparse.Namespace) -> None:
    """Each subject prompt's <|image|> markers against the faces, by the Subject Prompt node's own rules
    (facediffuser_core.markers). A workflow run as saved (no --face, no --prompt) is left to that node."""
    if not args.face and args.prompt is None:
        return
    if args.face:
        faces = len(args.face)
    elif any(node["class_type"] == REFERENCE_ENCODER for node in workflow.values()):
        faces = len(reference_image_loaders(workflow))
    else:
        return
    markers = core("markers")
    for node_id, node in workflow.items():
        text = node["inputs"].get("text")
        if node["class_type"] != SUBJECT_PROMPT or is_link(text) or not isinstance(text, str):
            continue
        try:
            markers.check_face_count(markers.parse_subject_markers(text), faces)
        except ValueError as error:
            where = "--prompt" if args.prompt is not None else f"the workflow's prompt (node {node_id}) {text!r}"
            raise RunError(f"{where}: {error}") from None


def prepare_workflow(args: argparse.Namespace, client: ComfyClient) -> dict:
    workflow = configured_workflow(args)
    if args.face:
        for node_id, photo in zip(reference_image_loaders(workflow), args.face):
            workflow[node_id]["inputs"]["image"] = client.upload_image(photo)
    use_installed_checkpoints(workflow, client)
    return workflow


def naming_the_photos(message: str, photos: list[Path]) -> str:
    """A node's error with the file behind each photo of the reference batch it names: the node sees only the batch,
    the runner knows which --face went where."""
    indices = sorted({int(batch or reference) for batch, reference in PHOTO_IN_ERROR.findall(message)})
    named = [f"photo {index} is --face {photos[index]}" for index in indices if index < len(photos)]
    return f"{message}\n({'; '.join(named)})" if named else message


def run(args: argparse.Namespace, client: ComfyClient) -> int:
    if args.keep_best is not None:
        for path in run_best_of_n(args, client):
            print(f"saved {path}")
        return 0
    workflow = prepare_workflow(args, client)
    client_id = uuid.uuid4().hex
    listener = JobLog(client.server, client_id)  # before the job: its progress and log go to this client id
    display = ProgressDisplay(workflow, sys.stdout)
    submitted = []

    def on_submitted(prompt_id: str) -> None:
        submitted.append(prompt_id)
        print(f"submitted to {client.server} as job {prompt_id}")
        say_if_unavailable(listener)

    def tick() -> None:  # called while waiting, so once the job was submitted
        display.step(listener.progress(submitted[0]))
        server_log.show(listener.take(submitted[0]), display.state)

    try:
        try:
            prompt_id, entry = client.run_job(workflow, client_id, args.timeout, on_submitted=on_submitted, report=display.state,
                                              tick=tick)
        except KeyboardInterrupt:
            if not submitted:
                raise
            raise JobCancelled() from None  # run_job took the job off the server
        listener.wait_for_end(prompt_id)
        server_log.show(listener.take(prompt_id), display.state)
    finally:
        display.close()
        listener.close()
    if entry.get("status", {}).get("status_str") != "success":
        raise RunError(naming_the_photos(describe_failure(entry), args.face))
    pictures = output_images(entry)
    if not pictures:
        print("the workflow finished but produced no images (does it end in a SaveImage node?)", file=sys.stderr)
        return 1
    save_run_pictures(client, pictures, cached_nodes(entry), args.output)
    return 0


def save_run_pictures(client: ComfyClient, pictures: list[tuple[str, dict]], reused: set[str], output: Path) -> None:
    """The job's pictures into `output`, each reported as what happened to it. A node whose result ComfyUI reused
    from an earlier run reports that run's pictures again: its previews (the face crops, ...) are not saved again,
    and its pictures already in `output` are said to be there, not saved."""
    reused_previews = [(node_id, image) for node_id, image in pictures if node_id in reused and image.get("type") == "temp"]
    wanted = [picture for picture in pictures if picture not in reused_previews]
    for (node_id, _), (path, written) in zip(wanted, save_pictures(client.download, wanted, output)):
        if written or node_id not in reused:
            print(f"saved {path}")
        else:
            print(f"already saved: {path} (ComfyUI reused node {node_id}'s result from an earlier run)")
    if reused_previews:
        nodes = ", ".join(sorted({node_id for node_id, _ in reused_previews}, key=str))
        print(f"not saved again: {len(reused_previews)} preview picture(s) of node(s) {nodes}, which ComfyUI reused from an "
              f"earlier run")


def say_if_unavailable(listener: JobLog) -> None:
    if listener.unavailable:
        print(f"  ComfyUI's log cannot be shown here ({listener.unavailable}): what the nodes log about this job is in the "
              f"server's own log only")


def cancel(client: ComfyClient, prompt_ids: list[str]) -> None:
    """Take jobs off the server's queue, or stop the one it runs (Ctrl-C, or best-of-N without one of its seeds:
    the seeds still queued could no longer be ranked and would only take the GPU)."""
    for prompt_id in prompt_ids:
        with contextlib.suppress(RunError, OSError):  # a server that went away has dropped them anyway
            client.cancel(prompt_id)


def run_best_of_n(args: argparse.Namespace, client: ComfyClient) -> list[Path]:
    """Queue one job per seed, rank every picture by the Identity Score node, download the best
    --keep-best and write every seed's per-subject scores to identity_scores.json beside them."""
    candidates_count = 1 if args.candidates is None else args.candidates
    if candidates_count < 1 or args.keep_best < 1:
        raise RunError("--candidates and --keep-best must be 1 or more")
    workflow = prepare_workflow(args, client)
    identity_node = identity_score_node(workflow)
    saver = scored_pictures_saver(workflow, identity_node)
    first_seed = args.seed if args.seed is not None else current_value(workflow, "seed")
    client_id = uuid.uuid4().hex
    with contextlib.closing(JobLog(client.server, client_id)) as listener:  # before the jobs: their log goes to this client id
        jobs = []
        for seed in range(first_seed, first_seed + candidates_count):
            set_override(workflow, "seed", seed)
            jobs.append((seed, client.submit(workflow, client_id=client_id)))
        print(f"submitted {len(jobs)} job(s) to {client.server}, seeds {first_seed} to {first_seed + len(jobs) - 1}")
        say_if_unavailable(listener)
        candidates = scored_candidates(args, client, jobs, identity_node, saver, listener)

    args.output.mkdir(parents=True, exist_ok=True)
    kept, saved = [], []
    for rank, (index, batch_index) in enumerate(rank_pictures(candidates)[:args.keep_best], start=1):
        candidate = candidates[index]
        picture = candidate["pictures"][batch_index]
        target = unused_path(args.output, best_file_name(rank, candidate["seed"], batch_index, ".png"))
        target.write_bytes(client.download(candidate["images"][batch_index]))
        picture["kept_as"] = target.name
        kept.append({"rank": rank, "seed": candidate["seed"], "batch_index": batch_index, "score": picture["score"], "file": target.name})
        saved.append(target)
    report = {
        "workflow": str(args.workflow), "server": client.server, "identity_node": identity_node, "keep_best": args.keep_best,
        "candidates": [{"seed": c["seed"], "prompt_id": c["prompt_id"], "pictures": c["pictures"]} for c in candidates],
        "kept": kept,
    }
    scores_file = unused_path(args.output, SCORES_FILE)
    scores_file.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return [*saved, scores_file]


def scored_candidates(args, client: ComfyClient, jobs: list[tuple[int, str]], identity_node: str, saver: str,
                      listener: JobLog) -> list[dict]:
    """Each seed's pictures and Identity Score results, waited for in seed order, with what the nodes logged for it."""
    candidates = []
    for waited, (seed, prompt_id) in enumerate(jobs, start=1):
        def say(state, seed=seed):
            print(f"  seed {seed}: {state}")

        try:
            entry = client.wait(prompt_id, args.timeout, report=say,
                                tick=lambda prompt_id=prompt_id, say=say: server_log.show(listener.take(prompt_id), say))
            listener.wait_for_end(prompt_id)
            server_log.show(listener.take(prompt_id), say)
            if entry.get("status", {}).get("status_str") != "success":
                raise RunError(f"seed {seed}: {naming_the_photos(describe_failure(entry), args.face)}")
            try:
                pictures, images = scored_pictures(entry, identity_node, saver)
            except RunError as error:
                raise RunError(f"seed {seed}: {error}") from None
        except KeyboardInterrupt:
            cancel(client, [unfinished for _, unfinished in jobs[waited - 1:]])
            raise JobCancelled() from None
        except RunError:
            later = [later for _, later in jobs[waited:]]
            cancel(client, later)
            if later:
                print(f"cancelled the {len(later)} later seed(s) on {client.server}", file=sys.stderr)
            raise
        pictures = [{**picture, "kept_as": None} for picture in pictures]
        candidates.append({"seed": seed, "prompt_id": prompt_id, "pictures": pictures, "images": images})
        print(f"  {describe_candidate(seed, pictures)}")
    return candidates
