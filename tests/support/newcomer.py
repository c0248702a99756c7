"""A newcomer's machine for the README's commands as printed: the quick start's blocks read from the README, an
environment whose pip index is a closed loopback port and whose git clones this working tree for the pack's address,
and official-layout .bin checkpoints for the hub stand-in to serve."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

from dev.devkit import comfy_harness
import comfy_server


README = comfy_harness.REPO_ROOT / "README.md"
PACK_ADDRESS = "https://github.com/facediffuser/comfyui-facediffuser"


def quick_start_blocks() -> tuple[list[str], list[str]]:
    """The command lines of the quick start's step 1 (install) and step 2 (the two commands), as printed."""
    text = README.read_text(encoding="utf-8")
    install = text.split("1. **Install the pack**", 1)[1].split("2. **Two commands**", 1)[0]
    commands = text.split("2. **Two commands**", 1)[1].split("\n\n", 2)[1]
    lines = lambda block: [line.strip() for line in block.splitlines() if line.startswith("       ") and line.strip()]
    return lines(install), lines(commands)


def official_bin(refs) -> bytes:
    import torch

    from dev.devkit import official_checkpoints

    buffer = io.BytesIO()
    torch.save(official_checkpoints.official_state_dict(refs), buffer)
    return buffer.getvalue()


def pack_origin(scratch: Path) -> Path:
    """A git repository holding this working tree as it is (committed or not): what the pack's address serves."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=comfy_harness.REPO_ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    origin = scratch / "origin"
    for name in filter(None, files):
        source = comfy_harness.REPO_ROOT / name
        if source.is_file():
            (origin / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, origin / name)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost", "-c", "init.defaultBranch=main"]
    for command in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "the pack"]):
        subprocess.run([*git, *command], cwd=origin, check=True, capture_output=True)
    return origin


def newcomer_environment(scratch: Path) -> dict:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("COMFYUI_", "HF_", "PIP_", "GIT_"))}
    closed = f"http://127.0.0.1:{comfy_server.free_port()}/simple"
    return {
        **env,
        "HOME": str(scratch / "home"),
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),  # `python`: ComfyUI's Python
        "PIP_INDEX_URL": closed, "PIP_NO_INPUT": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_RETRIES": "0",
        "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_COUNT": "1",
        "GIT_CONFIG_KEY_0": f"url.{pack_origin(scratch)}.insteadOf", "GIT_CONFIG_VALUE_0": PACK_ADDRESS,
    }
