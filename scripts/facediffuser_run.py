#!/usr/bin/env python3
"""Run a Face-diffuser workflow on a ComfyUI server from the command line and save the images it makes.

    python scripts/facediffuser_run.py --face me.jpg --prompt "a photo of a man <|image|> hiking in the alps"
    python scripts/facediffuser_run.py workflows/api/facediffuser_single_subject.json \\
        --face me.jpg --prompt "a photo of a man <|image|> hiking in the alps" --seed 7 --output out/

Without a workflow it runs the shipped single-subject workflow for one --face, the two-subject one for two;
with --regions, the two-person regions workflow (halves or boxes) or the auto-regions one (auto):

    python scripts/facediffuser_run.py --face man.jpg --face woman.jpg \\
        --prompt "a photo of a man <|image|> and a woman <|image|> walking on a beach" --regions halves

Without --server it uses the ComfyUI answering at the default address, or, when none does, starts the
ComfyUI this pack is installed in (headless, on a free loopback port, with ComfyUI's own Python: the venv or
python_embeded beside it, or --comfyui-python; else this one), runs the job and stops it again. The workflow
must be in ComfyUI's API format (the copies in workflows/api/, or "Export (API)" in ComfyUI). What the command
line can get wrong (photos, sizes, overrides, the prompt's <|image|> markers against the photos) is said before
any ComfyUI starts.
Overrides find their nodes by node type, never by node id, so they work on any workflow built from the
same nodes; an override whose node type is absent is an error. What the pack's nodes log while the job runs
(the faces found, the regions decided, warnings) is shown among the progress lines. Reference photos are uploaded to the
server, so the server may run on another machine. Only the standard library is used: any Python 3.10+
that reaches the server can run this, without ComfyUI or torch.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from facediffuser_client import comfyui_python
from facediffuser_client.api_workflow import PACK_ROOT, PICTURE_SIZE_STEP
from facediffuser_client.http_api import DEFAULT_SERVER, ComfyClient, RunError
from facediffuser_client.own_comfyui import attach_command_line_values, comfyui_root, server_for
from facediffuser_client.headless import JobCancelled, configured_workflow, run
from facediffuser_client.regions import add_arguments as add_region_arguments, check_arguments as check_region_arguments

OUTPUT_FOLDER = "facediffuser_output"


def default_output(comfyui: Path | None) -> Path:
    """./facediffuser_output, except inside the pack's own checkout (where the README's commands run): there
    ComfyUI's output folder, where the ComfyUI on this machine saves the pictures anyway."""
    here = Path.cwd().resolve()
    if here != PACK_ROOT and PACK_ROOT not in here.parents:
        return Path(OUTPUT_FOLDER)
    root = comfyui_root(comfyui)
    return root / "output" if root is not None else Path.home() / OUTPUT_FOLDER


def check_inputs(args: argparse.Namespace) -> None:
    """What can be wrong with the command line is said before any ComfyUI starts."""
    for photo in args.face:
        if not photo.is_file():
            raise RunError(f"--face: {photo} is not a file" + ("" if photo.exists() else f" (no such file, seen from {os.getcwd()})"))
        if not os.access(photo, os.R_OK):
            raise RunError(f"--face: {photo} cannot be read (permissions)")
    for option in ("width", "height"):
        size = getattr(args, option)
        if size is not None and (size <= 0 or size % PICTURE_SIZE_STEP):
            fits = max(PICTURE_SIZE_STEP, size // PICTURE_SIZE_STEP * PICTURE_SIZE_STEP)
            raise RunError(f"--{option} {size}: give a positive multiple of {PICTURE_SIZE_STEP} (the latent is an eighth of the "
                           f"picture on each side, and ComfyUI would make {fits} of it without a word), e.g. --{option} {fits}")
    check_region_arguments(args)
    configured_workflow(args)


def interrupted_message(args: argparse.Namespace, server: str | None, job_cancelled: bool) -> str:
    """The one line Ctrl-C leaves: what of this run was ended, and that a server the user runs goes on running."""
    ended = ["its job taken off the server"] if job_cancelled else []
    if server is not None and server in (args.server, DEFAULT_SERVER):
        ended.append(f"the ComfyUI at {server} is yours and keeps running")
    elif server is not None:
        ended.append("the ComfyUI started for it stopped")
    what_ended = f" ({'; '.join(ended)})" if ended else ""
    return (f"interrupted: nothing of this run is left running{what_ended}; pictures saved before stay in {args.output}; "
            f"run the same command again to make the picture")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Run a Face-diffuser API-format workflow on a ComfyUI server (or one it starts) and save the images.")
    parser.add_argument("workflow", type=Path, nargs="?",
                        help="API-format workflow JSON (default: the shipped single-subject workflow for one --face, "
                             "the two-subject one for two)")
    parser.add_argument("--server", help=f"ComfyUI's address (default: {DEFAULT_SERVER} when a ComfyUI answers there, "
                                         f"else one the runner starts and stops)")
    parser.add_argument("--face", action="append", type=Path, default=[], metavar="PHOTO",
                        help="a reference photo, uploaded to the server; repeat once per <|image|> marker, in order")
    parser.add_argument("--prompt", help="the subject prompt, with <|image|> after each person's noun")
    parser.add_argument("--seed", type=int, help="the seed of the starting noise; another seed, another picture (default: the "
                                                 "workflow's, 42 in the shipped ones)")
    parser.add_argument("--steps", type=int, help="sampling steps, shared by the three stages (default: the workflow's, 50 "
                                                  "in the shipped ones; on a CPU start with 20)")
    parser.add_argument("--width", type=int, help="the picture's width in pixels, a multiple of 8 (default: the workflow's, "
                                                  "512 in the shipped ones; on a CPU start with 256)")
    parser.add_argument("--height", type=int, help="the picture's height in pixels, a multiple of 8 (default: the workflow's, "
                                                   "512 in the shipped ones)")
    parser.add_argument("--cfg", type=float, help="guidance scale (official 5.0)")
    parser.add_argument("--alpha", type=float, help="fraction of the steps where scene construction ends")
    parser.add_argument("--beta", type=float, help="fraction of the steps where subject-scene fusion ends")
    parser.add_argument("--batch-size", type=int, dest="batch_size",
                        help="pictures per run, each from its own noise (default: the workflow's, 1 in the shipped ones)")
    add_region_arguments(parser)
    parser.add_argument("--output", type=Path,
                        help=f"folder for the images (default ./{OUTPUT_FOLDER}; run from inside the pack: ComfyUI's output folder)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the result (default 3600)")
    parser.add_argument("--candidates", type=int, metavar="N",
                        help="best of N: run N seeds (--seed, --seed+1, ...; default from the workflow's seed) through a "
                             "workflow with a Face-diffuser Identity Score node and rank the pictures by its score")
    parser.add_argument("--keep-best", type=int, dest="keep_best", metavar="K",
                        help="with --candidates: save the best K pictures (default 1) and identity_scores.json beside them")
    own = parser.add_argument_group("the ComfyUI the runner starts when none answers (no --server)")
    own.add_argument("--comfyui", type=Path, help="its folder (default: the ComfyUI this pack is installed in, or $COMFYUI_PATH)")
    own.add_argument("--comfyui-args", metavar="ARGS",
                     help='more arguments for its main.py, e.g. "--lowvram" or "--base-directory /data/comfy" (--cpu is added by itself when torch has no GPU)')
    own.add_argument(comfyui_python.OPTION, type=Path, dest="comfyui_python", metavar="PYTHON", help=comfyui_python.OPTION_HELP)
    own.add_argument("--keep-server", action="store_true", help="leave it running after the job, for the next ones")
    args = parser.parse_args(attach_command_line_values(sys.argv[1:] if argv is None else argv))
    if args.output is None:
        args.output = default_output(args.comfyui)
    if args.candidates is not None and args.keep_best is None:
        args.keep_best = 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    server = None
    try:
        check_inputs(args)
        with server_for(args) as server:
            return run(args, ComfyClient(server))
    except RunError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as interruption:
        print(f"\n{interrupted_message(args, server, isinstance(interruption, JobCancelled))}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
