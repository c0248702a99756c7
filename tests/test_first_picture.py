"""From a ComfyUI with the pack and no models to the first picture in the README's two commands, end to end:
scripts/facediffuser_setup.py against the hub stand-in (tiny official-layout SDM and TDM, a zipped tiny
insightface pack), then scripts/facediffuser_run.py with only --face and --prompt, which finds no server,
starts the ComfyUI from COMFYUI_PATH itself, makes the picture and stops it, leaving no process behind.

The shared ComfyUI tree is read-only, so the pack is "installed" in a base directory whose custom_nodes/ links
to it (tests/comfy_server.py), and the runner starts ComfyUI with `--comfyui-args "... --base-directory"`.
tests/comfy_startup/ on PYTHONPATH gives that ComfyUI the CPU shims the other test servers get."""

from __future__ import annotations

import io
import os
import re
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from PIL import Image

import comfy_harness
import comfy_server
import hub_stand_in
import pack_scripts
from facediffuser_client import http_api, own_comfyui

setup = pack_scripts.load("facediffuser_setup")
STARTUP_SHIMS = Path(__file__).resolve().parent / "comfy_startup"


def official_bin(refs) -> bytes:
    import torch

    import official_checkpoints

    buffer = io.BytesIO()
    torch.save(official_checkpoints.official_state_dict(refs), buffer)
    return buffer.getvalue()


def zipped_detector_pack(scratch: Path) -> bytes:
    """The tests' tiny detector as buffalo_l's detector file, one folder deep in the zip as some zips have it."""
    from insightface_test_pack import write_detector_pack

    detector = write_detector_pack(scratch / "pack") / "det.onnx"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.write(detector, "buffalo_l/det_10g.onnx")
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


def test_setup_then_runner_make_the_first_picture(tmp_path):
    comfyui = comfy_harness.comfyui_path()
    if comfyui is None:
        pytest.skip(comfy_harness.SKIP_REASON)
    if http_api.comfyui_answers(own_comfyui.DEFAULT_SERVER):
        pytest.skip(f"a ComfyUI already answers at {own_comfyui.DEFAULT_SERVER}: the runner would use it instead of starting one")
    import official_checkpoints
    import tiny_install

    base = comfy_server.install_pack(tmp_path / "ComfyUI base")
    models = base / "models"

    # Command 1: the set-up, against the hub stand-in.
    with hub_stand_in.running() as hub:
        hub.add_hub_file(setup.HUB_REPOSITORY, "SDM/pytorch_model.bin", official_bin(official_checkpoints.build_sdm()))
        hub.add_hub_file(setup.HUB_REPOSITORY, "TDM/pytorch_model.bin", official_bin(official_checkpoints.build_tdm()))
        zip_url = hub.add_file("/buffalo_l.zip", zipped_detector_pack(tmp_path))
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
        configured = subprocess.run(
            [sys.executable, str(pack_scripts.SCRIPTS_DIR / "facediffuser_setup.py"), "--comfyui", str(comfyui),
             "--models-dir", str(models), "--insightface-source", zip_url],
            capture_output=True, text=True, timeout=300, env=env)
    assert configured.returncode == 0, configured.stdout + configured.stderr
    assert "All set." in configured.stdout
    assert (models / "insightface" / "models" / "buffalo_l" / "det_10g.onnx").is_file()

    # Command 2: the runner, with no workflow and no server.
    (photo,) = tiny_install.write_face_photos(tmp_path / "photos", names=("me.png",))
    output = tmp_path / "pictures"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(STARTUP_SHIMS), os.environ.get("PYTHONPATH")]))}
    ran = subprocess.run(
        [sys.executable, str(pack_scripts.SCRIPTS_DIR / "facediffuser_run.py"), "--face", str(photo),
         "--prompt", "a photo of a woman <|image|> in a garden", "--steps", "3", "--output", str(output),
         "--comfyui", str(comfyui), "--comfyui-args", shlex.join(comfy_server.server_options(base))],
        capture_output=True, text=True, timeout=900, env=env)
    out = ran.stdout
    assert ran.returncode == 0, out + ran.stderr
    assert f"no ComfyUI answers at {own_comfyui.DEFAULT_SERVER}: starting one for this job" in out
    # The set-up left the .bin files; the shipped workflow names the .safetensors conversions.
    assert "the server has no facediffuser_sdm.safetensors; using facediffuser_sdm.bin" in out
    (picture,) = output.glob("facediffuser_0*.png")
    assert Image.open(picture).size == (512, 512)
    assert (base / "input" / "me.png").is_file()

    # Stopped afterwards, nothing left running.
    started = re.search(r"started ComfyUI from .* \(pid (\d+)\) at (http://127\.0\.0\.1:\d+)", out)
    pid, url = int(started.group(1)), started.group(2)
    assert f"stopped the ComfyUI started for this job (pid {pid})" in out
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not http_api.comfyui_answers(url)
    assert processes_mentioning(str(base)) == []
