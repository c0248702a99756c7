"""What the headless runner's tests share: a folder that passes for ComfyUI, whose main.py serves /system_stats
(with or without the pack's nodes) or fails to start as asked, a custom-sampling workflow, and a workflow written
to a file."""

from __future__ import annotations

import json


CUSTOM_SAMPLING_WORKFLOW = {
    "1": {"class_type": "FaceDiffuserGuider", "inputs": {"cfg": 5.0, "alpha": 0.3, "beta": 0.6}},
    "2": {"class_type": "RandomNoise", "inputs": {"noise_seed": 0}},
    "3": {"class_type": "BasicScheduler", "inputs": {"steps": 50, "scheduler": "ddim_uniform", "denoise": 1.0}},
}
FAKE_COMFYUI_MAIN = """
import argparse, http.server, json, pathlib, sys
pathlib.Path("argv.json").write_text(json.dumps(sys.argv[1:]))
pathlib.Path("prefix").write_text(sys.prefix)  # which Python started it
mode = pathlib.Path("mode").read_text()
if mode == "crash":
    print("boom: the fake ComfyUI cannot start")
    sys.exit(3)
if mode == "no PIL":  # what ComfyUI prints when started with a Python that lacks its requirements
    print("ModuleNotFoundError: No module named 'PIL'")
    sys.exit(1)
if mode == "no cuda":  # what ComfyUI prints when started without --cpu on a CPU-only torch
    print("\\n".join(f"log line {number} " + "x" * 60 for number in range(100)))
    print("AssertionError: Torch not compiled with CUDA enabled")
    sys.exit(1)
if mode == "slow":
    import time
    time.sleep(120)
parser = argparse.ArgumentParser()
parser.add_argument("--port", type=int)
args, _ = parser.parse_known_args()
answers = {"/system_stats": {"system": {}}, "/object_info/FaceDiffuserSNFSampler": {"FaceDiffuserSNFSampler": {}} if mode == "pack" else {}}

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps(answers.get(self.path, {})).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

http.server.HTTPServer(("127.0.0.1", args.port), Handler).serve_forever()
"""


def fake_comfyui(tmp_path, mode: str):
    """A folder that passes for ComfyUI: its main.py answers /system_stats, with or without the pack's nodes,
    or crashes at start."""
    root = tmp_path / "FakeComfyUI"
    root.mkdir()
    (root / "comfyui_version.py").write_text('__version__ = "0.17.0"\n')
    (root / "main.py").write_text(FAKE_COMFYUI_MAIN)
    (root / "mode").write_text(mode)
    return root


def write(tmp_path, workflow: dict):
    path = tmp_path / "workflow.json"
    path.write_text(json.dumps(workflow))
    return str(path)
