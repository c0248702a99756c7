"""A real ComfyUI server for the tests of the headless runner and the batch client, in its own process, on 127.0.0.1 and a free port.

Run as a script, this file is the server's entry point: it registers the harness's CPU torchvision shim
(dev.devkit.comfy_harness), then runs ComfyUI's main.py with the command line it was given. Imported, it
starts such a server with `--base-directory` pointing at a temporary folder whose custom_nodes/ holds a
link to this pack, so the server loads the pack as an installed one and writes nowhere else.
"""

from __future__ import annotations

import contextlib
import runpy
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import standalone  # noqa: F401  (run as the servers' entry point, this file needs the dev kit's path)
from dev.devkit import comfy_harness
from facediffuser_client.own_comfyui import OwnComfyUI, free_loopback_port as free_port  # noqa: F401  (the tests' free ports)

START_TIMEOUT_S = 180.0


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
    """Start ComfyUI on CPU with this pack installed under `base`, the way the client starts its own (OwnComfyUI),
    through this file; always stops it on leaving."""
    install_pack(base)
    own = OwnComfyUI(comfy_harness.comfyui_path(), server_options(base), report=lambda text: None, log=base / "server.log",
                     entry=Path(__file__).resolve())
    try:
        own.wait_until_ready(START_TIMEOUT_S)
        yield Server(own.url, base, own.process, own.log)
    finally:
        own.stop()


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
