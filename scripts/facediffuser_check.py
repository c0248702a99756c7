#!/usr/bin/env python3
"""First-run check: is everything Face-diffuser needs in place, and if not, what to do about it.

    python scripts/facediffuser_check.py                   # from ComfyUI/custom_nodes/<this pack>
    python scripts/facediffuser_check.py --comfyui ~/ComfyUI --models-dir /data/models

Run it with the Python that runs ComfyUI. It reports ComfyUI and its version, torch and the device it will
use, insightface and onnxruntime (with the execution providers that actually work, and the
onnxruntime/onnxruntime-gpu conflict), and every model file: present, of the right kind, or missing with
the exact path to put it at and where to get it. It only reads: nothing is installed or downloaded.
It needs nothing but the standard library, so it also runs, and says what is missing, on a bare Python.
Exit status 0 when everything is in place, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from facediffuser_client.check import render, run_checks, to_do


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check that everything Face-diffuser needs is installed and in place.")
    parser.add_argument("--comfyui", type=Path, help="ComfyUI's folder (default: the ComfyUI this pack is installed in, or $COMFYUI_PATH)")
    parser.add_argument("--models-dir", type=Path, help="the models folder to check (default: <ComfyUI>/models)")
    parser.add_argument("--extra-model-paths-config", type=Path, action="append", default=[], metavar="YAML",
                        help="an extra_model_paths.yaml ComfyUI is started with (<ComfyUI>/extra_model_paths.yaml is always read)")
    args = parser.parse_args(argv)
    findings = run_checks(args.comfyui, args.models_dir, tuple(args.extra_model_paths_config))
    print(render(findings))
    return 1 if to_do(findings) else 0


if __name__ == "__main__":
    sys.exit(main())
