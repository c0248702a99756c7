"""ComfyUI's own Python: the check and the runner find it beside the ComfyUI they use (its venv/ or .venv/, the
portable build's python_embeded/) or take --comfyui-python, say so plainly when they run under another, and never
advise installing into a Python that is plainly not ComfyUI's; the check imports what ComfyUI imports at start, in a
process of that Python, before saying "All set" (a torchvision that does not match torch stops ComfyUI at start).

The Pythons here are empty virtual environments made with `venv --without-pip` from this interpreter: a Python
without ComfyUI's requirements, as the system's python3 usually is."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import pack_scripts
from facediffuser_client import comfyui_python, http_api, own_comfyui
from fake_installs import complete_install, fake_comfyui
from runner_runs import fake_comfyui as fake_comfyui_to_start

CHECK = pack_scripts.SCRIPTS_DIR / "facediffuser_check.py"
runner = pack_scripts.load("facediffuser_run")
check_cli = pack_scripts.load("facediffuser_check")


def empty_environment(folder: Path) -> Path:
    """A venv with nothing installed; its python."""
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(folder)], check=True, capture_output=True, timeout=300)
    return comfyui_python.interpreter_in(folder)


def run_check(python: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([str(python), str(CHECK), *args], capture_output=True, text=True, timeout=900, env=env)
    assert "Traceback" not in result.stdout + result.stderr, result.stdout + result.stderr
    return result


def with_requirements(comfyui: Path, *names: str) -> Path:
    (comfyui / "requirements.txt").write_text("\n".join(names) + "\n\n#non essential dependencies:\nkornia\n")
    return comfyui


def test_a_python_without_comfyuis_requirements_is_plainly_not_comfyuis_and_never_installed_into(tmp_path):
    system_python = empty_environment(tmp_path / "system")
    comfyui = with_requirements(fake_comfyui(tmp_path / "ComfyUI"), "torch", "Pillow", "numpy")
    out = run_check(system_python, "--comfyui", str(comfyui)).stdout
    assert "[  ok   ] Python" not in out
    assert (f"[problem] Python: {'.'.join(map(str, sys.version_info[:3]))} at {system_python}: 3 of the 3 packages ComfyUI "
            "needs to start are not installed in it (torch, Pillow, numpy), so it is not the Python that runs ComfyUI") in out
    assert "--comfyui-python <its python, or its venv or conda environment's folder>" in out
    assert f"{system_python} -m pip" not in out
    assert "<ComfyUI's python> -m pip install insightface onnxruntime" in out
    assert "<ComfyUI's python> -m pip install -r" in out


def test_the_check_goes_on_under_the_venv_beside_comfyui_and_says_so(tmp_path):
    comfyui = fake_comfyui(tmp_path / "ComfyUI")
    venv_python = empty_environment(comfyui / "venv")
    result = run_check(Path(sys.executable), "--comfyui", str(comfyui))
    first, *rest = result.stdout.splitlines()
    assert first == (f"This is {sys.executable}, not ComfyUI's Python: going on with {venv_python} (the venv in {comfyui}).")
    report = "\n".join(rest)
    assert f"[  ok   ] Python: {'.'.join(map(str, sys.version_info[:3]))} at {venv_python} (ComfyUI's: the venv in {comfyui})" in report
    assert "[missing] torch: cannot import torch" in report  # that venv's packages, not this one's
    assert f"{venv_python} -m pip install insightface onnxruntime" in report
    assert result.returncode == 1


def test_the_set_up_goes_on_under_the_venv_beside_comfyui_too(tmp_path):
    """The set-up hands over as the check does: what it then lacks (huggingface_hub) is said of ComfyUI's Python."""
    comfyui = fake_comfyui(tmp_path / "ComfyUI")
    venv_python = empty_environment(comfyui / "venv")
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf_home")}
    result = subprocess.run([sys.executable, str(pack_scripts.SCRIPTS_DIR / "facediffuser_setup.py"), "--comfyui", str(comfyui)],
                            capture_output=True, text=True, timeout=900, env=env)
    assert "Traceback" not in result.stdout + result.stderr, result.stdout + result.stderr
    assert result.stdout.splitlines()[0] == (f"This is {sys.executable}, not ComfyUI's Python: going on with {venv_python} "
                                             f"(the venv in {comfyui}).")
    assert f"huggingface_hub is not installed in this Python ({venv_python})" in result.stderr
    assert f"[  ok   ] Python: {'.'.join(map(str, sys.version_info[:3]))} at {venv_python} (ComfyUI's: the venv in {comfyui})" \
        in result.stdout
    assert result.returncode == 1


def test_the_portable_builds_python_embeded_beside_comfyui_is_found(tmp_path):
    """ComfyUI_windows_portable/ holds ComfyUI/ and python_embeded/python.exe; here python.exe is this machine's Python
    under that name (the layout, not Windows, is what is tested)."""
    portable = tmp_path / "ComfyUI_windows_portable"
    comfyui = fake_comfyui(portable / "ComfyUI")
    (portable / "python_embeded").mkdir()
    (portable / "python_embeded" / "python.exe").symlink_to(Path(getattr(sys, "_base_executable", sys.executable)).resolve())
    chosen = comfyui_python.choose(comfyui, None)
    assert chosen.executable == portable / "python_embeded" / "python.exe" and not chosen.is_this_one
    assert chosen.found == f"the portable build's python_embeded beside {comfyui}"
    empty_environment(comfyui / "venv")  # a venv in the ComfyUI folder comes before the portable build's Python
    assert comfyui_python.choose(comfyui, None).executable == comfyui / "venv" / "bin" / "python"


def test_a_named_environment_folder_is_comfyuis_python(tmp_path, capsys):
    comfyui, _ = complete_install(tmp_path)
    named = comfyui_python.choose(comfyui, Path(sys.prefix))  # a venv's or conda environment's folder
    assert named.is_this_one and named.found == "named with --comfyui-python"
    assert check_cli.main(["--comfyui", str(comfyui), "--comfyui-python", sys.prefix]) == 0
    assert "(ComfyUI's: named with --comfyui-python)" in capsys.readouterr().out


def test_a_named_python_that_is_not_there_is_an_error_naming_the_option(tmp_path, capsys):
    assert check_cli.main(["--comfyui", str(tmp_path), "--comfyui-python", str(tmp_path / "nowhere" / "python")]) == 1
    err = capsys.readouterr().err
    assert f"--comfyui-python {tmp_path / 'nowhere' / 'python'}: no such file; name the python executable" in err


def broken_torchvision(site: Path) -> Path:
    """A torchvision whose C++ operators do not match torch, as a pip accident leaves it: installed, and failing at
    import with the error ComfyUI then stops on."""
    (site / "torchvision").mkdir(parents=True)
    (site / "torchvision" / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    (site / "torchvision-0.28.0.dist-info").mkdir()
    (site / "torchvision-0.28.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: torchvision\nVersion: 0.28.0\n")
    (site / "torchvision-0.28.0.dist-info" / "top_level.txt").write_text("torchvision\n")
    return site


@pytest.mark.slow  # 4.6 s here
def test_a_torchvision_that_does_not_match_torch_is_found_before_all_set(tmp_path):
    import torch

    comfyui, _ = complete_install(tmp_path)
    with_requirements(comfyui, "torch", "torchvision", "numpy")
    env = {**os.environ, "PYTHONPATH": str(broken_torchvision(tmp_path / "site"))}
    result = run_check(Path(sys.executable), "--comfyui", str(comfyui), env=env)
    assert result.returncode == 1 and "All set" not in result.stdout
    assert (f"[problem] ComfyUI's requirements: some of the packages ComfyUI needs to start do not import in {sys.executable}: torchvision (RuntimeError: operator "
            "torchvision::nms does not exist)") in result.stdout
    minor, patch, build = torch.__version__.split("+")[0].split(".")[1:] + [torch.__version__.partition("+")[2]]
    index = f" --index-url https://download.pytorch.org/whl/{build}" if build else ""
    assert f"-m pip install --force-reinstall --no-deps torchvision==0.{int(minor) + 15}.{patch}{index}`" in result.stdout
    assert "ready:" not in result.stdout  # no shipped workflow runs in a ComfyUI that cannot start


def test_comfyuis_requirements_that_import_are_said_to(tmp_path, capsys):
    comfyui, _ = complete_install(tmp_path)
    with_requirements(comfyui, "numpy", "safetensors", "pyyaml")
    assert check_cli.main(["--comfyui", str(comfyui)]) == 0
    assert f"[  ok   ] ComfyUI's requirements: the 3 packages ComfyUI needs to start import ({comfyui / 'requirements.txt'})" \
        in capsys.readouterr().out


# --- the runner ---------------------------------------------------------------------------------------------------


def test_the_runner_starts_comfyui_with_the_venv_beside_it(tmp_path, capsys, nothing_at_the_default_address):
    root = fake_comfyui_to_start(tmp_path, "pack")
    venv_python = empty_environment(root / "venv")
    with own_comfyui.server_for(runner.parse_args(["--comfyui", str(root)])) as url:
        assert http_api.comfyui_answers(url)
    assert Path((root / "prefix").read_text()) == root / "venv"
    out = capsys.readouterr().out
    assert (f"starting one for this job with ComfyUI's Python, {venv_python} (the venv in {root}), not this one "
            f"({sys.executable})") in out


def test_the_runner_starts_comfyui_with_a_named_python(tmp_path, capsys, nothing_at_the_default_address):
    root = fake_comfyui_to_start(tmp_path, "pack")
    conda_like = tmp_path / "envs" / "comfy"
    empty_environment(conda_like)
    with own_comfyui.server_for(runner.parse_args(["--comfyui", str(root), "--comfyui-python", str(conda_like)])):
        pass
    assert Path((root / "prefix").read_text()) == conda_like
    assert "(named with --comfyui-python), not this one" in capsys.readouterr().out


@pytest.mark.slow  # 2.0 s here
def test_a_comfyui_started_with_a_python_without_its_requirements_gets_the_fix(tmp_path, capsys, nothing_at_the_default_address):
    root = fake_comfyui_to_start(tmp_path, "no PIL")
    with pytest.raises(http_api.RunError) as raised:
        with own_comfyui.server_for(runner.parse_args(["--comfyui", str(root)])):
            pytest.fail("the job must not run")
    message = str(raised.value)
    assert message.endswith(f"ComfyUI was started with {sys.executable}, which lacks ComfyUI's requirements (No module named "
                            f"'PIL'): is it the Python that runs ComfyUI? Name that one with --comfyui-python (its python, or "
                            f"its venv or conda environment's folder); or, if it is this one, install them: `{sys.executable} "
                            f"-m pip install -r {root / 'requirements.txt'}`")
    assert "(none found beside ComfyUI; --comfyui-python names another)" in capsys.readouterr().out


def test_a_named_python_that_is_not_there_stops_the_runner_before_anything_starts(tmp_path, capsys, nothing_at_the_default_address):
    root = fake_comfyui_to_start(tmp_path, "pack")
    (tmp_path / "me.png").write_bytes(b"png")
    assert runner.main(["--face", str(tmp_path / "me.png"), "--prompt", "a man <|image|>", "--comfyui", str(root),
                        "--comfyui-python", str(tmp_path / "envs" / "gone")]) == 1
    assert f"--comfyui-python {tmp_path / 'envs' / 'gone'}: no such file" in capsys.readouterr().err
    assert not (root / "argv.json").exists()
