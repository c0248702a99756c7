"""A real ComfyUI server for the tests of the headless runner, in its own process, on 127.0.0.1 and a free port.

Run as a script, this file is the server's entry point: it registers the harness's CPU torchvision shim
(facediffuser_devkit.comfy_harness), then runs ComfyUI's main.py with the command line it was given. Imported, it
starts such a server with `--base-directory` pointing at a temporary folder whose custom_nodes/ holds a
link to this pack, so the server loads the pack as an installed one and writes nowhere else.
"""

from __future__ import annotations

import contextlib
import json
import runpy
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import standalone  # noqa: F401  (run as the servers' entry point, this file needs the dev kit's path)
from facediffuser_devkit import comfy_harness

START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 20.0


@dataclass
class Server:
    url: str
    base: Path
    process: subprocess.Popen
    log: Path

    @property
    def models_dir(self) -> Path:
        return self.base / "models"

    @property
    def input_dir(self) -> Path:
        return self.base / "input"

    @property
    def output_dir(self) -> Path:
        return self.base / "output"

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/system_stats", timeout=2) as response:
            return "system" in json.loads(response.read())
    except OSError:
        return False


def install_pack(base: Path) -> Path:
    """A ComfyUI base directory (`--base-directory`) whose custom_nodes/ links to this pack; returns `base`."""
    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    (base / "custom_nodes" / "comfyui-facediffuser").symlink_to(comfy_harness.REPO_ROOT, target_is_directory=True)
    return base


def server_options(base: Path) -> list[str]:
    """ComfyUI's command-line options for a test server: CPU, offline, everything it writes under `base`."""
    return ["--cpu", "--disable-api-nodes", "--base-directory", str(base), "--database-url", "sqlite:///:memory:"]


@contextlib.contextmanager
def running_server(base: Path):
    """Start ComfyUI on CPU with this pack installed under `base`; always stops it on leaving."""
    install_pack(base)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = base / "server.log"
    command = [sys.executable, str(Path(__file__).resolve()), "--listen", "127.0.0.1", "--port", str(port), *server_options(base)]
    with open(log, "wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, cwd=Path(__file__).parent)
    server = Server(url, base, process, log)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _answers(url):
            if process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with status {process.returncode}:\n{server.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"ComfyUI did not answer within {START_TIMEOUT_S:g} s:\n{server.log_tail()}")
            time.sleep(0.5)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT_S)


def _serve() -> None:
    root = comfy_harness.comfyui_path()
    if root is None:
        sys.exit(comfy_harness.SKIP_REASON)
    comfy_harness.register_cpu_torchvision_ops()  # the same shims as the in-process tier
    comfy_harness.stand_in_for_missing_torchaudio()
    sys.path.insert(0, str(root))
    sys.argv = [str(root / "main.py"), *sys.argv[1:]]
    runpy.run_path(str(root / "main.py"), run_name="__main__")


if __name__ == "__main__":
    _serve()
