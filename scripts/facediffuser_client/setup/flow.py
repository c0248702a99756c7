"""The set-up from start to end: each part's steps planned (SDM, TDM, insightface pack), said and carried out, what
an interruption kept, and the first-run check's verdict."""

from __future__ import annotations

import sys
from pathlib import Path

from ..check.findings import to_do
from ..check.report import render, run_checks
from ..pack import core
from .insightface_steps import insightface_steps
from .model_steps import MODELS, model_steps
from .steps import SetupError, Step

model_folders = core("model_folders")


def plan(folders: model_folders.ModelFolders, convert: bool, insightface_pack: str | None,
         insightface_source: str | None, verify: bool = False) -> tuple[list[list[Step]], list[str]]:
    """The steps of each part (SDM, TDM, insightface pack), and the problems that keep a part from being set up."""
    parts, problems = [], []
    planners = [lambda model=model: model_steps(model, folders, convert, verify) for model in MODELS]
    planners.append(lambda: insightface_steps(folders, insightface_pack, insightface_source))
    for planner in planners:
        try:
            parts.append(planner())
        except SetupError as error:
            problems.append(str(error))
    return parts, problems


def partial_downloads(folders: model_folders.ModelFolders) -> list[Path]:
    """The partial downloads an interrupted set-up leaves to resume from: beside the models, and the pack's zip."""
    places = (folders.target("facediffuser"), folders.target("insightface") / "models")
    return sorted(path for place in places if place.is_dir() for path in place.glob(".*.partial") if path.is_file())


def interrupted_message(folders: model_folders.ModelFolders) -> str:
    kept = partial_downloads(folders)
    if kept:
        arrived = ", ".join(f"{path} ({path.stat().st_size / 1e6:.1f} MB)" for path in kept)
        return f"interrupted: what arrived is kept: {arrived}; run the set-up again to resume"
    return ("interrupted: no partial download is left to resume (none had arrived yet); what is in place stays; run the "
            "set-up again to go on")


def set_up(comfyui: Path | None, models_dir: Path | None, extra_model_paths: tuple[Path, ...] = (), *, convert: bool = False,
           insightface_pack: str | None = None, insightface_source: str | None = None, dry_run: bool = False,
           verify: bool = False, python_found: str = "") -> int:
    """Everything not yet in place, the first-run check's report after it; the exit status (0: all in place; 130:
    Ctrl-C). `comfyui`: the folder the user named, if any; `python_found`: how this Python was found to be ComfyUI's."""
    root = model_folders.find_comfyui(comfyui)
    if root is None and models_dir is None:
        where = f"{comfyui} has no comfyui_version.py" if comfyui else "this pack is not inside ComfyUI/custom_nodes and COMFYUI_PATH is not set"
        print(f"error: ComfyUI not found ({where}): pass --comfyui <ComfyUI folder> or --models-dir <models folder>", file=sys.stderr)
        return 1
    try:
        folders = model_folders.ModelFolders.of(root, models_dir, extra_model_paths)
    except model_folders.ExtraModelPathsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"Face-diffuser set-up: models into {folders.target('facediffuser')}, insightface into {folders.target('insightface')}")
    try:
        problems = carry_out(folders, convert, insightface_pack, insightface_source, dry_run, verify)
        if dry_run:
            return 1 if problems else 0
        print()
        findings = run_checks(comfyui, models_dir, extra_model_paths, python_found, script="facediffuser_setup")
    except KeyboardInterrupt:
        print(f"\n{interrupted_message(folders)}", file=sys.stderr)
        return 130
    print(render(findings))
    return 1 if problems or to_do(findings) else 0


def carry_out(folders: model_folders.ModelFolders, convert: bool, insightface_pack: str | None, insightface_source: str | None,
              dry_run: bool, verify: bool) -> list[str]:
    """Each part's steps, said and (but in a dry run) done; the problems met, said at the end."""
    parts, problems = plan(folders, convert, insightface_pack, insightface_source, verify)
    to_run = [step for part in parts for step in part if step.run]
    for licence in dict.fromkeys(step.licence for step in to_run if step.licence):
        print(f"Licence: {licence}")
    if dry_run and to_run:
        print("Dry run, nothing is changed:")
    for part in parts:
        for step in part:
            print(f"{'would ' if dry_run and step.run else ''}{step.summary}")
            if step.run is None or dry_run:
                continue
            try:
                step.run()
            except SetupError as error:
                problems.append(str(error))
                break  # the part's later steps need this one
    if dry_run and not to_run:
        print("Dry run: nothing to do, all of the above is in place.")
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return problems
