"""The runner's --regions and --boxes: which shipped workflow they pick, and the layout they set on a workflow.

`--regions halves|thirds|boxes` sets the layout of the workflow's Face-diffuser Region Layout node (its names, as the
node's `layout` widget shows them); `--regions auto` asks for a workflow whose sampler takes its regions from a
Face-diffuser Auto Regions node. Without a workflow file the shipped two-person workflow of that kind runs. Every
mismatch (no node to take the layout, a layout for another number of people, malformed boxes) is an error before
anything is sent, with the Region Layout node's own rules (facediffuser_core.region_layouts).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .api_workflow import current_value, is_link
from .http_api import RunError
from .pack import PACK_ROOT, core

layouts = core("region_layouts")
MARKER = core("markers").MARKER

AUTO = "auto"
CHOICES = (*layouts.LAYOUTS, AUTO)
LAYOUT_NODE = "FaceDiffuserRegionLayout"
AUTO_NODE = "FaceDiffuserAutoRegions"
NODE_NAMES = {LAYOUT_NODE: "Face-diffuser Region Layout", AUTO_NODE: "Face-diffuser Auto Regions"}
SHIPPED = {LAYOUT_NODE: "facediffuser_two_subjects_regions.json", AUTO_NODE: "facediffuser_two_subjects_auto_regions.json"}
SHIPPED_PEOPLE = 2
LATENT_NODE = "EmptyLatentImage"
UNKNOWN_SIZE = 16384  # the Region Layout's largest width and height


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--regions", choices=CHOICES,
                        help="keep each person in a region of the picture, in marker order: 'halves' (two people, left and "
                             "right), 'thirds' (three), 'boxes' (--boxes), or 'auto' (found where the scene puts their "
                             "faces). Sets the workflow's Face-diffuser Region Layout, its size the Empty Latent Image's (auto: "
                             "needs a Face-diffuser Auto Regions node); without a workflow file the shipped two-person "
                             "regions or auto-regions workflow runs")
    parser.add_argument("--boxes", metavar='"X0 Y0 X1 Y1; ..."',
                        help=f"with --regions boxes: one box per person in marker order, fractions of the picture's width "
                             f"and height, separated by ';', e.g. \"{layouts.BOXES_EXAMPLE}\"")


def check_arguments(args: argparse.Namespace) -> None:
    if args.boxes is not None and args.regions != layouts.LAYOUT_BOXES:
        raise RunError(f"--boxes gives the boxes of --regions {layouts.LAYOUT_BOXES}: add --regions {layouts.LAYOUT_BOXES}, "
                       f"or leave --boxes out")
    if args.regions == layouts.LAYOUT_BOXES and args.boxes is None:
        raise RunError(f"--regions {layouts.LAYOUT_BOXES}: give one box per person with --boxes, fractions of the picture "
                       f"in marker order, e.g. --boxes \"{layouts.BOXES_EXAMPLE}\"")


def _node_kind(regions: str) -> str:
    return AUTO_NODE if regions == AUTO else LAYOUT_NODE


def shipped_regions_workflow(regions: str, faces: int) -> Path:
    """The shipped workflow that --regions runs when no workflow file is given."""
    name = SHIPPED[_node_kind(regions)]
    if faces != SHIPPED_PEOPLE:
        advice = "regions keep several people apart: for one person leave --regions out" if faces == 1 else "give --face twice"
        if faces > SHIPPED_PEOPLE:
            advice += (f", or pass a workflow of your own that loads {faces} reference photos and has a "
                       f"{NODE_NAMES[_node_kind(regions)]} node")
        raise RunError(f"--regions {regions} without a workflow file runs the shipped two-person workflow {Path(name).stem}, "
                       f"but --face is given {faces} time(s): {advice}")
    return PACK_ROOT / "workflows" / "api" / name


def _nodes(workflow: dict, class_type: str) -> list[str]:
    return [node_id for node_id, node in workflow.items() if node["class_type"] == class_type]


def _connected(workflow: dict, node_id: str) -> bool:
    return any(is_link(value) and value[0] == node_id for node in workflow.values() for value in node["inputs"].values())


def _describe(workflow: dict, node_ids: list[str]) -> str:
    kind = workflow[node_ids[0]]["class_type"]
    return f"{NODE_NAMES[kind]} (node{'s' if len(node_ids) > 1 else ''} {', '.join(node_ids)})"


def _regions_nodes(workflow: dict, regions: str) -> list[str]:
    """The connected nodes of the kind `regions` needs; an error where there are none, where one is connected to nothing
    (ComfyUI would not run it) or where the other kind also gives the sampler regions."""
    kind = _node_kind(regions)
    other = AUTO_NODE if kind == LAYOUT_NODE else LAYOUT_NODE
    wanted, others = _nodes(workflow, kind), [node_id for node_id in _nodes(workflow, other) if _connected(workflow, node_id)]
    shipped = f"workflows/api/{SHIPPED[kind]}"
    if not wanted:
        takes = "'auto_regions'" if kind == AUTO_NODE else "'regions'"
        found = f"; its regions come from {_describe(workflow, others)}" if others else ""
        raise RunError(f"--regions {regions}: the workflow has no {NODE_NAMES[kind]} node ({kind}) to take it{found}. Use "
                       f"{shipped}, or connect a {NODE_NAMES[kind]} to the sampler's {takes} in ComfyUI and export the "
                       f"workflow again (Workflow > Export (API))")
    unconnected = [node_id for node_id in wanted if not _connected(workflow, node_id)]
    if unconnected:
        raise RunError(f"--regions {regions}: {_describe(workflow, unconnected)} is connected to nothing, so ComfyUI would not "
                       f"run it: connect its output to the sampler's {'auto_regions' if kind == AUTO_NODE else 'regions'}")
    if others:
        raise RunError(f"--regions {regions}: the workflow also takes regions from {_describe(workflow, others)}; a sampler "
                       f"takes one or the other: remove that node, or use {shipped}")
    return wanted


def _set(workflow: dict, node_id: str, name: str, value, option: str) -> None:
    inputs = workflow[node_id]["inputs"]
    if is_link(inputs.get(name)):
        source = inputs[name][0]
        raise RunError(f"{option}: input '{name}' of node {node_id} ({LAYOUT_NODE}) is wired to node {source} "
                       f"({workflow.get(source, {}).get('class_type', '?')}); unwire it to let the runner set it")
    inputs[name] = value


def _follow_the_latent(workflow: dict, layout_node: str) -> tuple[int, int] | None:
    """The Region Layout's width and height made the picture's (the workflow's one Empty Latent Image's), as its
    masks must have the picture's aspect ratio; returns them, or None where a size is wired and known only at run time."""
    inputs = workflow[layout_node]["inputs"]
    latents = [workflow[node_id]["inputs"] for node_id in _nodes(workflow, LATENT_NODE)]
    if len(latents) == 1:
        for side in ("width", "height"):
            if isinstance(latents[0].get(side), int) and not is_link(inputs.get(side)):
                inputs[side] = latents[0][side]
    size = inputs.get("width"), inputs.get("height")
    return size if all(isinstance(side, int) for side in size) else None


def follow_the_latent(workflow: dict) -> None:
    """Every Region Layout's size made the picture's: after --width or --height changed the picture, its masks must
    have the new size."""
    for node_id in _nodes(workflow, LAYOUT_NODE):
        _follow_the_latent(workflow, node_id)


def people(workflow: dict, faces: int, prompt: str | None) -> tuple[int, str]:
    """How many people the regions are for, and what says so: the --face count, else the prompt's markers."""
    if faces:
        return faces, f"--face given {faces} time(s)"
    count = (prompt if prompt is not None else current_value(workflow, "prompt")).count(MARKER)
    return count, f"the prompt has {count} {MARKER} marker(s)"


def set_regions(workflow: dict, regions: str, boxes: str | None, faces: int, prompt: str | None) -> list[str]:
    """Put --regions (and --boxes) on the workflow; return the ids of the nodes that take them."""
    nodes = _regions_nodes(workflow, regions)
    if regions == AUTO:
        return nodes  # the people are found in the picture: nothing to set
    count, why = people(workflow, faces, prompt)
    option = f"--regions {regions}" + (f' --boxes "{boxes}"' if boxes is not None else "")
    for node_id in nodes:
        # A wired size is checked by the node when it runs; here a large one leaves every box at least a pixel.
        width, height = _follow_the_latent(workflow, node_id) or (UNKNOWN_SIZE, UNKNOWN_SIZE)
        try:
            layouts.layout_boxes(regions, count, width, height, boxes or "")
        except ValueError as error:
            raise RunError(f"{option} for {count} people ({why}): {error}") from None
        _set(workflow, node_id, "layout", regions, option)
        _set(workflow, node_id, "subjects", count, option)
        if boxes is not None:
            _set(workflow, node_id, "boxes", boxes, option)
    return nodes
