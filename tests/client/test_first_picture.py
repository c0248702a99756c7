"""A newcomer's walk, as the README's quick start prints it, on this machine without a GPU: a fresh copy of
ComfyUI, the install commands, then the two commands, each typed exactly as README.md shows it (read from
README.md, so the README and this test cannot drift apart).

What stands in for the outside world, and nothing else: `git clone` of the pack's address clones this
working tree (git's url.<base>.insteadOf), pip finds every requirement installed and is pointed at a closed
loopback index (so it cannot download), HF_ENDPOINT and FACEDIFFUSER_INSIGHTFACE_SOURCE point the set-up at
the hub stand-in (tiny official-layout SDM and TDM, a zipped tiny insightface pack with a detector and a
recognition model), and tests/support/comfy_startup/ on PYTHONPATH gives the ComfyUI that the runner starts (and the
check's probe of what that ComfyUI imports) the CPU shims every test server gets. The runner itself finds that torch has no GPU and passes --cpu.

At the end: a 512 x 512 picture in ComfyUI's output folder and nothing in the pack's checkout, every shipped
template accepted by that ComfyUI's own validation with the files the set-up left (.bin, no conversion), no
traceback printed, and no process left running."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from dev.devkit import comfy_harness
import comfy_server
import hub_stand_in
from newcomer import newcomer_environment, official_bin, quick_start_blocks
from facediffuser_client import http_api
from facediffuser_client.setup.downloads import HUB_REPOSITORY
from facediffuser_client.setup.insightface_steps import SOURCE_VARIABLE

STARTUP_SHIMS = comfy_server.STARTUP_SHIMS


def zipped_pack(scratch: Path) -> bytes:
    """The tests' tiny detector and recognition model as buffalo_l's two files, one folder deep as in its zip."""
    from insightface_test_pack import write_detector_pack, write_recognition_model

    pack = write_detector_pack(scratch / "pack")
    recognition = write_recognition_model(pack)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.write(pack / "det.onnx", "buffalo_l/det_10g.onnx")
        archive.write(recognition, "buffalo_l/w600k_r50.onnx")
    return buffer.getvalue()


def processes_mentioning(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            command = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in command:
            found.append(f"{cmdline.parent.name}: {command}")
    return found


def typed(line: str, cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
    """A command line as a user types it into a shell."""
    result = subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert "Traceback" not in result.stdout + result.stderr, f"{line}\n{result.stdout}\n{result.stderr}"
    return result


def validate_templates(comfyui: Path, env: dict) -> None:
    """Every shipped API workflow passes the validation of /prompt on that ComfyUI; each job is then cancelled."""
    import tiny_install
    import workflow_builder

    tiny_install.write_face_photos(comfyui / "input")
    port = comfy_server.free_port()
    url = f"http://127.0.0.1:{port}"
    log = comfyui.parent / "validation.log"
    with open(log, "wb") as log_file:
        server = subprocess.Popen([sys.executable, "main.py", "--listen", "127.0.0.1", "--port", str(port), "--cpu"],
                                  cwd=comfyui, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not http_api.comfyui_answers(url):
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        client = http_api.ComfyClient(url)
        for path in sorted(workflow_builder.API_DIR.glob("*.json")):
            answer = json.loads(client.post_json("/prompt", {"prompt": json.loads(path.read_text())}))  # raises on 400
            assert not answer.get("node_errors"), (path.name, answer)
            client.post_json("/queue", {"clear": True})
            client.post_json("/interrupt", {})
    finally:
        server.terminate()
        server.wait(60)


@pytest.mark.slow  # 55.8 s here
def test_the_readmes_quick_start_as_printed_reaches_a_picture_on_a_cpu_only_machine(tmp_path):
    import torch

    from dev.devkit import official_checkpoints

    shared = comfy_harness.comfyui_path()
    if shared is None:
        pytest.skip(comfy_harness.SKIP_REASON)
    if http_api.comfyui_answers(http_api.DEFAULT_SERVER):
        pytest.skip(f"a ComfyUI already answers at {http_api.DEFAULT_SERVER}: the runner would use it instead of starting one")
    assert not torch.cuda.is_available()
    install, (setup_command, run_command) = quick_start_blocks()
    assert setup_command == "python scripts/facediffuser_setup.py"
    assert run_command.startswith("python scripts/facediffuser_run.py --face me.jpg --prompt ")

    comfyui = tmp_path / "ComfyUI"
    shutil.copytree(shared, comfyui, symlinks=True, ignore=shutil.ignore_patterns("__pycache__", ".git"))
    env = newcomer_environment(tmp_path)

    # Step 1: the install, every line as printed (pip finds everything installed: nothing is downloaded).
    installed = typed("set -e\n" + "\n".join(install), tmp_path, env, timeout=300)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    pack = comfyui / "custom_nodes" / "comfyui-facediffuser"
    assert (pack / "scripts" / "facediffuser_run.py").is_file()

    # Step 2, first command: the set-up, against the hub stand-in.
    with hub_stand_in.running() as hub:
        # The shipped workflows run at 512 px, 50 steps: tiny models with no attention at full size keep that quick.
        sdm, tdm = (build(attention_at_full_size=False) for build in (official_checkpoints.build_sdm, official_checkpoints.build_tdm))
        hub.add_hub_file(HUB_REPOSITORY, "SDM/pytorch_model.bin", official_bin(sdm))
        hub.add_hub_file(HUB_REPOSITORY, "TDM/pytorch_model.bin", official_bin(tdm))
        zip_url = hub.add_file("/buffalo_l.zip", zipped_pack(tmp_path))
        # The shims also reach the check's probe of what ComfyUI imports at start, as they reach the ComfyUI started below.
        setup_env = {**env, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                     SOURCE_VARIABLE: zip_url, "PYTHONPATH": str(STARTUP_SHIMS)}
        configured = typed(setup_command, pack, setup_env, timeout=300)
    assert configured.returncode == 0, configured.stdout + configured.stderr
    assert "All set. Every shipped workflow can run" in configured.stdout
    models = comfyui / "models"
    assert sorted(p.name for p in (models / "facediffuser").glob("facediffuser_*")) == ["facediffuser_sdm.bin", "facediffuser_tdm.bin"]
    assert sorted(p.name for p in (models / "insightface" / "models" / "buffalo_l").iterdir()) == ["det_10g.onnx", "w600k_r50.onnx"]

    # Step 2, second command: the runner, with the photo the README names.
    import tiny_install

    tiny_install.write_face_photos(pack, names=("me.jpg",))
    run_env = {**env, "PYTHONPATH": str(STARTUP_SHIMS)}
    ran = typed(run_command, pack, run_env, timeout=1200)
    out = ran.stdout
    assert ran.returncode == 0, out + ran.stderr
    assert f"no ComfyUI answers at {http_api.DEFAULT_SERVER}: starting one for this job" in out
    assert "has no GPU (a CPU-only build): starting ComfyUI with --cpu" in out
    assert re.search(r"^  node \d+ \(FaceDiffuserSNFSampler\): step 50/50, [\d:]+ elapsed$", out, re.M), out  # piped: plain lines
    (picture,) = (comfyui / "output").glob("facediffuser_0*.png")
    assert f"saved {picture}" in out
    assert Image.open(picture).size == (512, 512)
    assert not (pack / "facediffuser_output").exists()
    assert subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=pack, capture_output=True, text=True,
                          env=env).stdout.splitlines() == ["?? me.jpg"]  # the pack's checkout holds only the user's photo

    started = re.search(r"started ComfyUI from .* \(pid (\d+)\) at (http://127\.0\.0\.1:\d+)", out)
    pid, url = int(started.group(1)), started.group(2)
    assert f"stopped the ComfyUI started for this job (pid {pid})" in out
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not http_api.comfyui_answers(url)

    # The canvas: the templates name the .safetensors conversions; only the .bin files are in place.
    validate_templates(comfyui, run_env)
    assert processes_mentioning(str(comfyui)) == []
