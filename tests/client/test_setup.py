"""scripts/facediffuser_setup.py against a stand-in for the hub's file endpoints and insightface's release, on
127.0.0.1 (tests/support/hub_stand_in.py): fresh, resumed, corrupted and already-complete set-ups, zips of any layout,
extra_model_paths.yaml, offline, --dry-run and --convert. The set-up runs as users run it, in a fresh
interpreter, with HF_ENDPOINT pointing at the stand-in and HF_HOME at a scratch folder."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import comfy_server
import hub_stand_in
import pack_scripts
from facediffuser_client.setup.download_progress import DownloadProgress
from facediffuser_client.setup.downloads import partial_path
from fake_installs import BUFFALO_FILES, REPOSITORY, SDM_BYTES, SDM_KEYS, TDM_BYTES, checkpoint_bytes, fake_comfyui, pack_zip, serve_everything

SCRIPT = pack_scripts.SCRIPTS_DIR / "facediffuser_setup.py"


@pytest.fixture
def hub():
    with hub_stand_in.running() as running:
        yield running


def run_setup(hub_url: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_ENDPOINT": hub_url, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300, env=env)


def install_args(comfyui: Path, zip_url: str) -> list[str]:
    return ["--comfyui", str(comfyui), "--insightface-source", zip_url]


def leftovers(root: Path) -> list[Path]:
    return [path for path in root.rglob("*") if path.name.endswith(".partial")]


@pytest.mark.slow  # 3.3 s here
def test_fresh_setup_downloads_verifies_and_places_everything(hub, tmp_path):
    comfyui = fake_comfyui(tmp_path / "ComfyUI")
    zip_url = serve_everything(hub, zip_folder="buffalo_l/buffalo_l/")  # nested one level too deep, as some zips are
    result = run_setup(hub.url, tmp_path, *install_args(comfyui, zip_url))
    assert result.returncode == 0, result.stdout + result.stderr
    models = comfyui / "models"
    assert (models / "facediffuser" / "facediffuser_sdm.bin").read_bytes() == SDM_BYTES
    assert (models / "facediffuser" / "facediffuser_tdm.bin").read_bytes() == TDM_BYTES
    pack = models / "insightface" / "models" / "buffalo_l"
    assert sorted(p.name for p in pack.iterdir()) == sorted(BUFFALO_FILES)  # flat, without the zip's folders or __MACOSX
    assert (pack / "det_10g.onnx").read_bytes() == b"onnx det_10g.onnx"
    assert leftovers(tmp_path) == []
    out = result.stdout
    # The licences are named before anything is downloaded.
    assert out.index("Licence: The Face-diffuser weights") < out.index("download SDM")
    assert out.index("Licence: insightface's pretrained models are for non-commercial research use only") < out.index("install insightface")
    assert "verifying facediffuser_sdm.bin (sha256)" in out
    assert "[  ok   ] SDM model:" in out and "[  ok   ] insightface models: buffalo_l" in out and "All set." in out


@pytest.mark.slow  # 4.3 s here
def test_a_dropped_connection_resumes_and_a_rerun_resumes_an_interrupted_download(hub, tmp_path):
    # huggingface_hub writes what arrived in chunks of 10 MiB, so the file is larger than that to resume mid-file.
    sdm = checkpoint_bytes(SDM_KEYS, extra_floats=4 * 2**20)
    zip_url = serve_everything(hub, sdm=sdm, drop_after=12 * 2**20)
    comfyui = fake_comfyui(tmp_path / "ComfyUI")
    # What an interrupted earlier run left: the first 3 MB of the TDM under its hidden name.
    tdm_target = comfyui / "models" / "facediffuser" / "facediffuser_tdm.bin"
    tdm_target.parent.mkdir(parents=True)
    partial_path(tdm_target, hashlib.sha256(TDM_BYTES).hexdigest()[:16]).write_bytes(TDM_BYTES[:1000])
    result = run_setup(hub.url, tmp_path, *install_args(comfyui, zip_url))
    assert result.returncode == 0, result.stdout + result.stderr
    assert (comfyui / "models" / "facediffuser" / "facediffuser_sdm.bin").read_bytes() == sdm
    assert tdm_target.read_bytes() == TDM_BYTES
    sdm_gets = [r.range for r in hub.gets() if r.path.endswith("SDM/pytorch_model.bin")]
    assert sdm_gets[0] is None and len(sdm_gets) == 2 and sdm_gets[1].startswith("bytes=") and sdm_gets[1] != "bytes=0-"
    assert [r.range for r in hub.gets() if r.path.endswith("TDM/pytorch_model.bin")] == ["bytes=1000-"]
    assert "resuming facediffuser_tdm.bin at 0.0 MB" in result.stdout
    assert leftovers(tmp_path) == []


@pytest.mark.slow  # 3.3 s here
@pytest.mark.parametrize("fault, message", [
    ({"announced_sha256": hashlib.sha256(b"other content").hexdigest()}, "the downloaded file does not match the hub's sha256"),
    ({"announced_size": len(SDM_BYTES) - 10}, "the server sent more than the"),
])
def test_a_hash_or_size_mismatch_installs_nothing_and_says_so(hub, tmp_path, fault, message):
    comfyui = fake_comfyui(tmp_path / "ComfyUI")
    result = run_setup(hub.url, tmp_path, *install_args(comfyui, serve_everything(hub, **fault)))
    assert result.returncode == 1
    assert message in result.stderr and "facediffuser_sdm.bin" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (comfyui / "models" / "facediffuser" / "facediffuser_sdm.bin").exists()
    assert leftovers(tmp_path) == []
    # The other parts are set up all the same, and the check's verdict names what is missing.
    assert (comfyui / "models" / "facediffuser" / "facediffuser_tdm.bin").is_file()
    assert "[missing] SDM model" in result.stdout


@pytest.mark.slow  # 6.3 s here
def test_a_complete_setup_downloads_nothing(hub, tmp_path):
    comfyui = fake_comfyui(tmp_path / "ComfyUI")
    args = install_args(comfyui, serve_everything(hub))
    assert run_setup(hub.url, tmp_path, *args).returncode == 0
    hub.requests.clear()
    result = run_setup(hub.url, tmp_path, *args)
    assert result.returncode == 0, result.stderr
    assert [r for r in hub.requests if not r.path.startswith("/api/")] == []
    assert "SDM in place:" in result.stdout and "TDM in place:" in result.stdout and "insightface in place: buffalo_l" in result.stdout


@pytest.mark.slow  # 4.8 s here
def test_a_dry_run_with_nothing_to_do_says_so_after_what_is_in_place(hub, tmp_path):
    comfyui = fake_comfyui(tmp_path / "ComfyUI")
    args = install_args(comfyui, serve_everything(hub))
    assert run_setup(hub.url, tmp_path, *args).returncode == 0
    lines = run_setup(hub.url, tmp_path, "--dry-run", *args).stdout.splitlines()
    in_place = [n for n, line in enumerate(lines) if " in place: " in line]
    (verdict,) = [n for n, line in enumerate(lines) if "nothing to do" in line]
    assert len(in_place) == 3 and verdict > max(in_place), lines
    assert lines[verdict] == "Dry run: nothing to do, all of the above is in place."


def test_dry_run_says_what_it_would_do_and_touches_nothing(hub, tmp_path):
    comfyui = fake_comfyui(tmp_path / "ComfyUI")
    result = run_setup(hub.url, tmp_path, "--dry-run", *install_args(comfyui, serve_everything(hub)))
    assert result.returncode == 0, result.stderr
    target = comfyui / "models" / "facediffuser"
    assert f"would download SDM {hub.url}/{REPOSITORY}/resolve/main/SDM/pytorch_model.bin to {target / 'facediffuser_sdm.bin'}" in result.stdout
    assert "would install insightface buffalo_l" in result.stdout
    assert not (comfyui / "models").exists()
    assert hub.gets() == [] or all(r.path.startswith("/api/") for r in hub.gets())


@pytest.mark.slow  # 8.1 s here
def test_offline_names_the_manual_steps(tmp_path):
    comfyui = fake_comfyui(tmp_path / "ComfyUI")
    closed = f"http://127.0.0.1:{comfy_server.free_port()}"
    result = run_setup(closed, tmp_path, *install_args(comfyui, f"{closed}/buffalo_l.zip"))
    assert result.returncode == 1
    err = result.stderr
    assert "Traceback" not in err
    assert "cannot get the Hugging Face hub for SDM/pytorch_model.bin" in err and "Offline, or a firewall or proxy in the way?" in err
    sdm = comfyui / "models" / "facediffuser" / "facediffuser_sdm.bin"
    assert f"download {closed}/{REPOSITORY}/resolve/main/SDM/pytorch_model.bin in a browser and save it as {sdm}" in err
    pack = comfyui / "models" / "insightface" / "models" / "buffalo_l"
    assert f"To do it by hand: download {closed}/buffalo_l.zip and unzip its .onnx files directly into {pack}" in err
    assert "or give the zip you have to the set-up: --insightface-source <path of the zip>" in err
    assert not sdm.exists() and not pack.exists()
    # huggingface_hub's retries are not echoed, and nothing is left to resume from.
    assert "Trying to resume" not in result.stdout + err and "Error while downloading" not in result.stdout + err
    assert "buffalo_l.zip: the download did not start" in err
    assert leftovers(tmp_path) == []
    # The check's verdict after it does not send the user back to the same download without the way around it.
    verdict = result.stdout.split("What to do next:", 1)[1]
    insightface = next(line for line in verdict.splitlines() if "insightface models:" in line)
    assert "--insightface-source <the zip>" in insightface


def test_ctrl_c_keeps_what_arrived_says_how_to_resume_and_exits_130(hub, tmp_path):
    import signal
    import time

    comfyui = fake_comfyui(tmp_path / "ComfyUI")
    sdm = checkpoint_bytes(SDM_KEYS, extra_floats=4 * 2**20)
    serve_everything(hub, sdm=sdm, stall_after=11 * 2**20)  # huggingface_hub writes in chunks of 10 MiB
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    setup_run = subprocess.Popen([sys.executable, str(SCRIPT), *install_args(comfyui, hub.url + "/none.zip")],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not [p for p in leftovers(tmp_path) if p.stat().st_size] and time.monotonic() < deadline:
        time.sleep(0.2)
    setup_run.send_signal(signal.SIGINT)
    out, err = setup_run.communicate(timeout=60)
    assert setup_run.returncode == 130, out + err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    (kept,) = leftovers(tmp_path)
    assert kept.stat().st_size > 0
    assert err.strip().splitlines() == [f"interrupted: what arrived is kept: {kept} ({kept.stat().st_size / 1e6:.1f} MB); "
                                        f"run the set-up again to resume"]


def test_ctrl_c_before_anything_arrived_does_not_say_something_was_kept(hub, tmp_path):
    """huggingface_hub writes what arrives in chunks of 10 MiB: a Ctrl-C before the first one leaves nothing to resume."""
    import signal
    import time

    comfyui = fake_comfyui(tmp_path / "ComfyUI")
    serve_everything(hub, sdm=checkpoint_bytes(SDM_KEYS, extra_floats=4 * 2**20), stall_after=2**20)
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    setup_run = subprocess.Popen([sys.executable, str(SCRIPT), *install_args(comfyui, hub.url + "/none.zip")],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not (leftovers(tmp_path) and [r for r in hub.gets() if r.path.endswith("SDM/pytorch_model.bin")]) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1)  # the first MiB is on its way, well short of a chunk
    setup_run.send_signal(signal.SIGINT)
    out, err = setup_run.communicate(timeout=60)
    assert setup_run.returncode == 130, out + err
    assert leftovers(tmp_path) == []
    assert err.strip().splitlines() == ["interrupted: no partial download is left to resume (none had arrived yet); what is in "
                                        "place stays; run the set-up again to go on"]


@pytest.mark.slow  # 18.5 s here
def test_a_file_in_place_is_verified_against_the_hub_once_and_a_damaged_one_is_reported(hub, tmp_path):
    comfyui = fake_comfyui(tmp_path / "ComfyUI")
    zip_url = serve_everything(hub, sdm=checkpoint_bytes(SDM_KEYS, extra_floats=2**16))  # mostly tensor data
    folder = comfyui / "models" / "facediffuser"
    folder.mkdir(parents=True)
    (folder / "facediffuser_tdm.bin").write_bytes(TDM_BYTES)  # downloaded by hand
    first = run_setup(hub.url, tmp_path, *install_args(comfyui, zip_url))
    assert first.returncode == 0, first.stdout + first.stderr
    assert "facediffuser_tdm.bin matches the hub's sha256" in first.stdout
    hub.requests.clear()
    again = run_setup(hub.url, tmp_path, *install_args(comfyui, zip_url))
    assert again.returncode == 0 and "verifying" not in again.stdout
    assert [r for r in hub.requests if not r.path.startswith("/api/")] == []

    # 4 KB overwritten mid-file: same size, readable keys, wrong weights.
    sdm = folder / "facediffuser_sdm.bin"
    content = bytearray(sdm.read_bytes())
    middle = len(content) // 2
    content[middle:middle + 4096] = bytes(4096)
    sdm.write_bytes(bytes(content))
    checked = subprocess.run([sys.executable, str(pack_scripts.SCRIPTS_DIR / "facediffuser_check.py"), "--comfyui", str(comfyui)],
                             capture_output=True, text=True, timeout=120)
    assert checked.returncode == 1
    assert f"[problem] SDM model: {sdm} changed since the set-up verified its content" in checked.stdout
    damaged = run_setup(hub.url, tmp_path, *install_args(comfyui, zip_url))
    assert damaged.returncode == 1
    assert f"{sdm} is damaged: it has the size of the hub's SDM/pytorch_model.bin but not its content" in damaged.stderr
    assert "Delete it and run the set-up again" in damaged.stderr
    assert sdm.read_bytes() == bytes(content)
    # Neither the set-up's verdict nor the check sends the user back to the set-up to check the file again.
    checked_again = subprocess.run([sys.executable, str(pack_scripts.SCRIPTS_DIR / "facediffuser_check.py"), "--comfyui", str(comfyui)],
                                   capture_output=True, text=True, timeout=120)
    for verdict in (damaged.stdout, checked_again.stdout):
        assert f"[problem] SDM model: {sdm} is damaged: the set-up found its content differs from the hub's" in verdict
        assert f"SDM model: delete {sdm}, then run `python scripts/facediffuser_setup.py`: it downloads the hub's file anew" in verdict
        assert "it checks the file against the hub's sha256" not in verdict
    sdm.unlink()
    again = run_setup(hub.url, tmp_path, *install_args(comfyui, zip_url))
    assert again.returncode == 0 and "All set." in again.stdout, again.stdout + again.stderr


@pytest.mark.slow  # 9.4 s here
def test_verify_compares_a_file_verified_before_again(hub, tmp_path):
    """A file altered in place with its size and date kept passes for verified; --verify reads it again."""
    comfyui = fake_comfyui(tmp_path / "ComfyUI")
    args = install_args(comfyui, serve_everything(hub, sdm=checkpoint_bytes(SDM_KEYS, extra_floats=2**16)))
    assert run_setup(hub.url, tmp_path, *args).returncode == 0
    sdm = comfyui / "models" / "facediffuser" / "facediffuser_sdm.bin"
    stat = sdm.stat()
    content = bytearray(sdm.read_bytes())
    content[len(content) // 2] ^= 0xFF
    sdm.write_bytes(bytes(content))
    os.utime(sdm, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    unchecked = run_setup(hub.url, tmp_path, *args)
    assert unchecked.returncode == 0 and "verifying" not in unchecked.stdout
    verified = run_setup(hub.url, tmp_path, "--verify", *args)
    assert verified.returncode == 1
    assert f"verify {sdm} against the hub's sha256 (--verify)" in verified.stdout
    assert "facediffuser_tdm.bin matches the hub's sha256" in verified.stdout
    assert f"{sdm} is damaged" in verified.stderr


@pytest.mark.slow  # 3.3 s here
def test_a_pack_without_its_recognition_model_is_completed_from_its_zip(hub, tmp_path):
    """The check's fix for it is the set-up; the set-up then completes the pack instead of calling it in place."""
    comfyui = fake_comfyui(tmp_path / "ComfyUI")
    pack = comfyui / "models" / "insightface" / "models" / "buffalo_l"
    pack.mkdir(parents=True)
    (pack / "det_10g.onnx").write_bytes(b"onnx det_10g.onnx")  # the detector only, as from a partial copy
    result = run_setup(hub.url, tmp_path, *install_args(comfyui, serve_everything(hub)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "complete (its w600k_r50.onnx is missing) insightface buffalo_l" in result.stdout
    assert sorted(p.name for p in pack.iterdir()) == sorted(BUFFALO_FILES)
    assert "[  ok   ] insightface recognition model:" in result.stdout


@pytest.mark.slow  # 3.3 s here
def test_extra_model_paths_default_folders_receive_the_files_and_other_folders_count(hub, tmp_path):
    comfyui = fake_comfyui(tmp_path / "ComfyUI")
    shared = tmp_path / "shared models"
    (shared / "older").mkdir(parents=True)
    (shared / "older" / "facediffuser_tdm.bin").write_bytes(TDM_BYTES)  # found there, so not downloaded
    (comfyui / "extra_model_paths.yaml").write_text(
        "studio:\n"
        f"    base_path: {shared}\n"
        "    is_default: true\n"
        "    facediffuser: |\n"
        "        facediffuser\n"
        "    insightface: insightface\n"
        "archive:\n"
        f"    base_path: {shared}\n"
        "    facediffuser: older\n")
    result = run_setup(hub.url, tmp_path, *install_args(comfyui, serve_everything(hub)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert (shared / "facediffuser" / "facediffuser_sdm.bin").read_bytes() == SDM_BYTES
    assert (shared / "insightface" / "models" / "buffalo_l" / "det_10g.onnx").is_file()
    assert not (comfyui / "models").exists()
    assert not [r for r in hub.gets() if r.path.endswith("TDM/pytorch_model.bin")]
    assert f"[  ok   ] TDM model: {shared / 'older' / 'facediffuser_tdm.bin'}" in result.stdout and "All set." in result.stdout


@pytest.mark.slow  # 3.2 s here
def test_a_broken_file_in_place_is_reported_not_overwritten(hub, tmp_path):
    comfyui = fake_comfyui(tmp_path / "ComfyUI")
    broken = comfyui / "models" / "facediffuser" / "facediffuser_sdm.bin"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(SDM_BYTES[:100])  # a browser download that stopped early
    result = run_setup(hub.url, tmp_path, *install_args(comfyui, serve_everything(hub)))
    assert result.returncode == 1
    assert f"{broken} cannot be read" in result.stderr and "does not overwrite files it did not make" in result.stderr
    assert broken.read_bytes() == SDM_BYTES[:100]
    assert (comfyui / "models" / "facediffuser" / "facediffuser_tdm.bin").is_file()


@pytest.mark.slow  # 6.3 s here
def test_antelopev2_comes_only_from_a_source_the_user_gives(hub, tmp_path):
    comfyui = fake_comfyui(tmp_path / "ComfyUI")
    serve_everything(hub)
    result = run_setup(hub.url, tmp_path, "--comfyui", str(comfyui), "--insightface-pack", "antelopev2")
    assert result.returncode == 1
    assert "antelopev2 has no official download" in result.stderr and "--insightface-source" in result.stderr

    antelope = ("1k3d68.onnx", "2d106det.onnx", "genderage.onnx", "glintr100.onnx", "scrfd_10g_bnkps.onnx")
    local_zip = tmp_path / "antelopev2.zip"
    local_zip.write_bytes(pack_zip("antelopev2/antelopev2/", antelope))
    result = run_setup(hub.url, tmp_path, "--comfyui", str(comfyui), "--insightface-pack", "antelopev2",
                       "--insightface-source", str(local_zip))
    assert result.returncode == 0, result.stdout + result.stderr
    pack = comfyui / "models" / "insightface" / "models" / "antelopev2"
    assert sorted(p.name for p in pack.iterdir()) == sorted(antelope)
    assert local_zip.is_file()  # the user's own zip is left alone


@pytest.mark.slow  # 3.3 s here
def test_a_zip_that_is_not_the_pack_installs_nothing(hub, tmp_path):
    comfyui = fake_comfyui(tmp_path / "ComfyUI")
    serve_everything(hub)
    zip_url = hub.add_file("/other.zip", pack_zip("", ("w600k_r50.onnx",)))
    result = run_setup(hub.url, tmp_path, *install_args(comfyui, zip_url))
    assert result.returncode == 1
    assert "has no det_10g.onnx, the buffalo_l pack's face detector (it holds w600k_r50.onnx)" in result.stderr
    assert not (comfyui / "models" / "insightface" / "models" / "buffalo_l").exists()
    assert leftovers(tmp_path) == []


@pytest.mark.slow  # 6.8 s here
def test_convert_writes_fp16_safetensors_with_the_packs_converter(hub, tmp_path):
    from dev.devkit import official_checkpoints
    from safetensors import safe_open

    def official_bytes(refs) -> bytes:
        buffer = io.BytesIO()
        torch.save(official_checkpoints.official_state_dict(refs), buffer)
        return buffer.getvalue()

    comfyui = fake_comfyui(tmp_path / "ComfyUI")
    zip_url = serve_everything(hub, sdm=official_bytes(official_checkpoints.build_sdm()), tdm=official_bytes(official_checkpoints.build_tdm()))
    result = run_setup(hub.url, tmp_path, "--convert", *install_args(comfyui, zip_url))
    assert result.returncode == 0, result.stdout + result.stderr
    folder = comfyui / "models" / "facediffuser"
    for name in ("facediffuser_sdm.safetensors", "facediffuser_tdm.safetensors"):
        with safe_open(str(folder / name), framework="pt") as converted:
            floating = [converted.get_slice(key).get_dtype() for key in converted.keys()]
        assert set(floating) <= {"F16", "I64"}, name
    assert f"[  ok   ] SDM model: {folder / 'facediffuser_sdm.safetensors'}" in result.stdout
    hub.requests.clear()
    again = run_setup(hub.url, tmp_path, "--convert", *install_args(comfyui, zip_url))
    assert again.returncode == 0 and "convert SDM" not in again.stdout and "SDM in place" in again.stdout
    assert [r for r in hub.requests if not r.path.startswith("/api/")] == []


def on_a_terminal(command: list[str], env: dict, columns: int, timeout: float = 300) -> str:
    """What `command` writes to a terminal (a pseudo-terminal of `columns` columns, 0: one that reports no width)."""
    import fcntl
    import pty
    import select
    import struct
    import termios
    import time

    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    process = subprocess.Popen(command, stdin=terminal, stdout=terminal, stderr=terminal, env=env)
    os.close(terminal)
    written, deadline = b"", time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([controller], [], [], 0.5)[0]:
                try:
                    chunk = os.read(controller, 65536)
                except OSError:  # the terminal closed: the command ended
                    break
                if not chunk:
                    break
                written += chunk
            elif process.poll() is not None:
                break
        assert process.wait(timeout=60) in (0, 1), written.decode(errors="replace")
    finally:
        os.close(controller)
    return written.decode(errors="replace")


@pytest.mark.slow  # 3.4 s here
@pytest.mark.parametrize("columns", [100, 0])
def test_download_progress_is_drawn_on_a_terminal(hub, tmp_path, columns):
    """One line per download, redrawn in place: what arrived of how much, the speed, the time. huggingface_hub's own
    bar (tqdm) sizes itself to the terminal's width, and on a terminal that reports none (a serial console, a
    pseudo-terminal no one sized, some IDE and CI consoles) it drew nothing at all."""
    from terminal_screen import screen

    comfyui = fake_comfyui(tmp_path / "ComfyUI")
    sdm = checkpoint_bytes(SDM_KEYS, extra_floats=6 * 2**20)  # 24 MB: three of huggingface_hub's chunks
    args = install_args(comfyui, serve_everything(hub, sdm=sdm))
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf_home"), "TERM": "xterm"}
    env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
    text = on_a_terminal([sys.executable, str(SCRIPT), *args], env, columns)
    assert "%|" not in text  # no second bar from huggingface_hub
    assert text.count("\r  facediffuser_sdm.bin: ") >= 3, text  # redrawn as the chunks arrive
    total = f"{len(sdm) / 1e6:.1f}"
    assert any(line.startswith(f"  facediffuser_sdm.bin: {total} of {total} MB (100%), ") and " elapsed" in line
               for line in screen(text.replace("\r\n", "\n")))


@pytest.mark.slow  # 3.2 s here
def test_download_progress_is_lines_when_piped(hub, tmp_path):
    comfyui = fake_comfyui(tmp_path / "ComfyUI")
    result = run_setup(hub.url, tmp_path, *install_args(comfyui, serve_everything(hub)))
    total = f"{len(SDM_BYTES) / 1e6:.1f}"
    assert f"\n  facediffuser_sdm.bin: {total} of {total} MB (100%), " in result.stdout and "\r" not in result.stdout


def test_download_progress_lines_piped_each_tenth_and_the_last_state():
    now = [0.0]
    stream = io.StringIO()
    progress = DownloadProgress("model.bin", 100 * 10**6, 20 * 10**6, stream, clock=lambda: now[0])
    for have in range(25, 101, 5):  # 5 MB a second, from the 20 MB kept by an earlier run
        now[0] += 1.0
        progress.show(have * 10**6)
    progress.end()
    lines = stream.getvalue().splitlines()
    assert lines[0] == "  model.bin: 25.0 of 100.0 MB (25%), 5.0 MB/s, 0:01 elapsed, about 0:15 left"
    assert lines[-1] == "  model.bin: 100.0 of 100.0 MB (100%), 5.0 MB/s, 0:16 elapsed"
    assert len(lines) == 9  # 20 % was there already: a line per tenth from 20 % to 100 %

    stream = io.StringIO()
    unsized = DownloadProgress("pack.zip", None, 0, stream, clock=lambda: now[0])
    for have in (30, 60, 90, 120, 150):
        unsized.show(have * 10**6)
    unsized.end()
    assert [line.split(",")[0] for line in stream.getvalue().splitlines()] == [
        "  pack.zip: 30.0 MB", "  pack.zip: 120.0 MB", "  pack.zip: 150.0 MB"]
