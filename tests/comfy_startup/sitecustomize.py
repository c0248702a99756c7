"""On PYTHONPATH for a command under test that starts a ComfyUI by itself (the headless runner's own server, a Ray
worker's), or probes what ComfyUI imports at start (the first-run check's comfyui_requirements_probe.py): that
process then gets the CPU shims tests/comfy_server.py's servers get (dev/devkit/comfy_harness.py,
loaded by its path: that process has neither tests/ nor scripts/ on sys.path).
Python imports `sitecustomize` at start-up in every interpreter; it does nothing unless the script is one of those.
While the file FACEDIFFUSER_TEST_REFUSE_START names exists, such a ComfyUI exits at once (a restart that fails)."""

import importlib.util
import os
import sys
from pathlib import Path

if sys.argv and Path(sys.argv[0]).name in ("main.py", "comfyui_requirements_probe.py"):
    refuse = os.environ.get("FACEDIFFUSER_TEST_REFUSE_START")
    if refuse and Path(refuse).exists() and Path(sys.argv[0]).name == "main.py":
        sys.exit(f"refusing to start: {refuse} is there (a ComfyUI that cannot start, for the tests)")
    spec = importlib.util.spec_from_file_location("comfy_harness", Path(__file__).resolve().parents[2] / "dev" / "devkit" / "comfy_harness.py")
    comfy_harness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(comfy_harness)
    comfy_harness.register_cpu_torchvision_ops()
    comfy_harness.stand_in_for_missing_torchaudio()
