"""On PYTHONPATH for a command under test that starts a ComfyUI by itself (the headless runner's own server), or
probes what ComfyUI imports at start (the first-run check's comfyui_requirements_probe.py): that process then gets the
CPU shims tests/comfy_server.py's servers get (scripts/facediffuser_devkit/comfy_harness.py, loaded by its path: that
process has neither tests/ nor scripts/ on sys.path).
Python imports `sitecustomize` at start-up in every interpreter; it does nothing unless the script is one of those."""

import importlib.util
import sys
from pathlib import Path

if sys.argv and Path(sys.argv[0]).name in ("main.py", "comfyui_requirements_probe.py"):
    spec = importlib.util.spec_from_file_location("comfy_harness", Path(__file__).resolve().parents[2] / "scripts" / "facediffuser_devkit" / "comfy_harness.py")
    comfy_harness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(comfy_harness)
    comfy_harness.register_cpu_torchvision_ops()
    comfy_harness.stand_in_for_missing_torchaudio()
