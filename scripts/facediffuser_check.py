#!/usr/bin/env python3
"""First-run check: is everything Face-diffuser needs in place, and if not, what to do about it.

    python scripts/facediffuser_check.py                   # from ComfyUI/custom_nodes/<this pack>
    python scripts/facediffuser_check.py --comfyui ~/ComfyUI --models-dir /data/models

It checks the Python that runs ComfyUI: run with another one (the system's `python3`), it finds ComfyUI's own
beside ComfyUI (its venv/ or .venv/, the portable build's python_embeded/) or takes --comfyui-python, says so,
and checks again under that one. It reports that Python, ComfyUI and its version, whether ComfyUI's requirements
import (in a process of that Python: a torchvision that does not match torch stops ComfyUI at start), torch and
the device it will use, insightface and onnxruntime (with the execution providers that actually work, and the
onnxruntime/onnxruntime-gpu conflict), and every model file: present, of the right kind, or missing with
the exact path to put it at and where to get it. It only reads: nothing is installed or downloaded.
It needs nothing but the standard library, so it also runs, and says what is missing, on a bare Python.
Exit status 0 when everything is in place, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from facediffuser_client import comfyui_python
from facediffuser_client.check.findings import to_do
from facediffuser_client.check.report import model_folders, render, run_checks


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description="Check that everything Face-diffuser needs is installed and in place.")
    parser.add_argument("--comfyui", type=Path, help="ComfyUI's folder (default: the ComfyUI this pack is installed in, or $COMFYUI_PATH)")
    parser.add_argument("--models-dir", type=Path, help="the models folder to check (default: <ComfyUI>/models)")
    parser.add_argument("--extra-model-paths-config", type=Path, action="append", default=[], metavar="YAML",
                        help="an extra_model_paths.yaml ComfyUI is started with (<ComfyUI>/extra_model_paths.yaml is always read)")
    parser.add_argument(comfyui_python.OPTION, type=Path, dest="comfyui_python", metavar="PYTHON", help=comfyui_python.OPTION_HELP)
    args = parser.parse_args(argv)

    def check(python: comfyui_python.ComfyUIPython) -> int:
        findings = run_checks(args.comfyui, args.models_dir, tuple(args.extra_model_paths_config), python_found=python.found)
        print(render(findings))
        return 1 if to_do(findings) else 0

    root = model_folders.find_comfyui(args.comfyui)
    return comfyui_python.run_under_comfyuis_python(Path(__file__), argv, root, args.comfyui_python, check)


if __name__ == "__main__":
    sys.exit(main())
