"""API-format workflows: reading them, and setting the runner's overrides on nodes found by node type."""

from __future__ import annotations

import json
from pathlib import Path

from .http_api import ComfyClient, RunError
from .pack import PACK_ROOT


REFERENCE_ENCODER = "FaceDiffuserEncodeReferenceFaces"

IMAGE_LOADER = "LoadImage"

# Where each override lands, as (node type, input name) pairs. Several pairs per override let one runner
# drive both the SNF-sampler workflows and the custom-sampling one (guider + RandomNoise + BasicScheduler).
OVERRIDE_TARGETS: dict[str, list[tuple[str, str]]] = {
    "prompt": [("FaceDiffuserSubjectPrompt", "text")],
    "seed": [("FaceDiffuserSNFSampler", "seed"), ("RandomNoise", "noise_seed"), ("FaceDiffuserStageSweep", "seed")],
    "steps": [("FaceDiffuserSNFSampler", "steps"), ("BasicScheduler", "steps"), ("FaceDiffuserStageSweep", "steps")],
    "cfg": [("FaceDiffuserSNFSampler", "cfg"), ("FaceDiffuserGuider", "cfg"), ("FaceDiffuserStageSweep", "cfg")],
    "alpha": [("FaceDiffuserSNFSampler", "alpha"), ("FaceDiffuserGuider", "alpha")],
    "beta": [("FaceDiffuserSNFSampler", "beta"), ("FaceDiffuserGuider", "beta")],
    "batch_size": [("EmptyLatentImage", "batch_size")],
    "width": [("EmptyLatentImage", "width")],
    "height": [("EmptyLatentImage", "height")],
}

# The latent is an eighth of the picture on each side: ComfyUI floors any other size to a multiple of 8.
PICTURE_SIZE_STEP = 8


def is_link(value) -> bool:
    """In the API format an input wired to another node is [source node id, output index]."""
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def load_api_workflow(path: Path) -> dict:
    try:
        workflow = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunError(f"workflow file not found: {path}") from None
    except json.JSONDecodeError as error:
        raise RunError(f"{path} is not valid JSON: {error}") from None
    if isinstance(workflow, dict) and "nodes" in workflow and "links" in workflow:
        raise RunError(
            f"{path} is a UI-format workflow (the kind ComfyUI's browser loads). The runner needs the API format: "
            f"use the copy in workflows/api/, or in ComfyUI use Workflow > Export (API)."
        )
    if not isinstance(workflow, dict) or not workflow or not all(
        isinstance(node, dict) and "class_type" in node and isinstance(node.get("inputs"), dict)
        for node in workflow.values()
    ):
        raise RunError(f"{path} is not an API-format workflow: expected {{node id: {{class_type, inputs}}}}")
    return workflow


def override_targets(workflow: dict, option: str) -> list[str]:
    """The ids of the nodes `option` sets a value on; an error naming the fix when the workflow cannot take it."""
    targets = OVERRIDE_TARGETS[option]
    found = []
    for node_id, node in workflow.items():
        for class_type, input_name in targets:
            if node["class_type"] != class_type:
                continue
            if input_name not in node["inputs"]:
                raise RunError(
                    f"--{option.replace('_', '-')}: node {node_id} ({class_type}) has no input '{input_name}': the workflow "
                    f"was made with another version of that node; re-export it from ComfyUI (Workflow > Export (API))"
                )
            if is_link(node["inputs"][input_name]):
                source = node["inputs"][input_name][0]
                raise RunError(
                    f"--{option.replace('_', '-')}: input '{input_name}' of node {node_id} ({class_type}) is wired "
                    f"to node {source} ({workflow.get(source, {}).get('class_type', '?')}); set the value there "
                    f"in the workflow or unwire it"
                )
            found.append(node_id)
    if not found:
        wanted = " or ".join(f"{class_type}.{input_name}" for class_type, input_name in targets)
        raise RunError(f"--{option.replace('_', '-')}: the workflow has no {wanted} node to set it on")
    return found


def override_input(workflow: dict, node_id: str, option: str) -> str:
    """The input of node `node_id` that `option` sets."""
    return next(name for class_type, name in OVERRIDE_TARGETS[option] if workflow[node_id]["class_type"] == class_type)


def set_override(workflow: dict, option: str, value) -> list[str]:
    """Set `value` on every node that `option` targets; return the ids of the nodes changed."""
    changed = override_targets(workflow, option)
    for node_id in changed:
        workflow[node_id]["inputs"][override_input(workflow, node_id, option)] = value
    return changed


def with_inputs(workflow: dict, changes: dict[str, dict]) -> dict:
    """A copy of `workflow` with `changes` ({node id: {input: value}}) set, sharing every node it leaves alone: a
    batch of a hundred thousand runs builds one per run, where a deep copy would cost a millisecond each."""
    copied = dict(workflow)
    for node_id, inputs in changes.items():
        node = workflow[node_id]
        copied[node_id] = {**node, "inputs": {**node["inputs"], **inputs}}
    return copied


def current_value(workflow: dict, option: str):
    """The value the workflow gives `option` (its first target node's input)."""
    for node in workflow.values():
        for class_type, input_name in OVERRIDE_TARGETS[option]:
            if node["class_type"] == class_type and not is_link(node["inputs"].get(input_name)):
                return node["inputs"].get(input_name)
    raise RunError(f"--{option}: the workflow has no unwired {' or '.join(c + '.' + i for c, i in OVERRIDE_TARGETS[option])}")


def reference_image_loaders(workflow: dict) -> list[str]:
    """The LoadImage nodes upstream of the reference-face encoder(s), in input order: the order of the faces."""
    encoders = [node_id for node_id, node in workflow.items() if node["class_type"] == REFERENCE_ENCODER]
    if not encoders:
        raise RunError(f"--face: the workflow has no {REFERENCE_ENCODER} node to take reference photos")
    loaders: list[str] = []
    visited: set[str] = set()

    def visit(node_id: str) -> None:
        if node_id in visited or node_id not in workflow:
            return
        visited.add(node_id)
        node = workflow[node_id]
        if node["class_type"] == IMAGE_LOADER:
            loaders.append(node_id)
            return
        for value in node["inputs"].values():
            if is_link(value):
                visit(value[0])

    for encoder in encoders:
        visit(encoder)
    return loaders


SHIPPED_WORKFLOWS = {1: "facediffuser_single_subject.json", 2: "facediffuser_two_subjects.json"}  # by face count

CHECKPOINT_LOADERS = ("FaceDiffuserSDMLoader", "FaceDiffuserTDMLoader")

CHECKPOINT_FORMATS = (".safetensors", ".bin")


def shipped_workflow(faces: int) -> Path:
    if faces not in SHIPPED_WORKFLOWS:
        raise RunError(f"--face given {faces} time(s): without a workflow file the runner uses the shipped workflow for "
                       f"one or two people, so give --face once or twice, or pass a workflow of your own")
    return PACK_ROOT / "workflows" / "api" / SHIPPED_WORKFLOWS[faces]


def combo_options(spec: list) -> list:
    """A combo input's choices in /object_info: [choices, {...}] or ["COMBO", {"options": choices}]."""
    if spec and isinstance(spec[0], list):
        return spec[0]
    return spec[1].get("options", []) if len(spec) > 1 and isinstance(spec[1], dict) else []


def installed_checkpoints(workflow: dict, client: ComfyClient, report=print) -> dict[str, dict]:
    """A Face-diffuser loader naming a file the server lacks takes the same model in the other format, when the
    server has that: the shipped workflows name the converted .safetensors, the set-up leaves the .bin unless it
    converts, and either is the same model. Returns the changes ({node id: {"ckpt_name": file}}) for with_inputs."""
    changes = {}
    for node_id, node in workflow.items():
        name = node["inputs"].get("ckpt_name")
        if node["class_type"] not in CHECKPOINT_LOADERS or not isinstance(name, str):
            continue
        offered = combo_options(client.input_spec(node["class_type"], "ckpt_name"))
        if name in offered:
            continue
        same_model = [Path(name).stem + suffix for suffix in CHECKPOINT_FORMATS if Path(name).stem + suffix in offered]
        if same_model:
            changes[node_id] = {"ckpt_name": same_model[0]}
            report(f"node {node_id} ({node['class_type']}): the server has no {name}; using {same_model[0]}")
    return changes


def use_installed_checkpoints(workflow: dict, client: ComfyClient, report=print) -> None:
    """installed_checkpoints, set on `workflow` itself."""
    for node_id, inputs in installed_checkpoints(workflow, client, report).items():
        workflow[node_id]["inputs"].update(inputs)


def fill_run(workflow: dict, loaders: list[str], face_names: list[str], seed: int | None, client, report=print) -> dict:
    """A copy of a job's workflow for one run on `client`'s server (`workflow` itself is left as it is): the faces
    under their names there, the run's seed (None keeps the workflow's), the checkpoint files that server has."""
    changes: dict[str, dict] = {node_id: {"image": name} for node_id, name in zip(loaders, face_names)}
    if seed is not None:
        for node_id in override_targets(workflow, "seed"):
            changes.setdefault(node_id, {})[override_input(workflow, node_id, "seed")] = seed
    for node_id, inputs in installed_checkpoints(workflow, client, report).items():
        changes.setdefault(node_id, {}).update(inputs)
    return with_inputs(workflow, changes)
