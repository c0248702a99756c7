"""scripts/facediffuser_check.py on a bare Python, on a complete install, and on the usual broken ones."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import onnxruntime
import pytest
import torch
from safetensors.torch import save_file

from fake_installs import SDM_KEYS, TDM_KEYS, complete_install, fake_comfyui, tensors
import pack_scripts
from facediffuser_client.check import insightface_onnxruntime
from facediffuser_client.check.environment import check_comfyui
from facediffuser_client.check.findings import INFO, MISSING, OK, PROBLEM
from facediffuser_client.check.model_files import check_insightface_pack, checkpoint_keys, packs
from facediffuser_client.check.report import model_folders, run_checks

cli = pack_scripts.load("facediffuser_check")
SCRIPT = pack_scripts.SCRIPTS_DIR / "facediffuser_check.py"


def by_subject(findings):
    return {finding.subject: finding for finding in findings}


def run_script(*args, python_flags=("-E", "-s", "-S"), env=None):
    """The check in a fresh interpreter; -S leaves out site-packages, so torch, insightface, onnxruntime and
    numpy are all absent, as on a machine where nothing is installed yet. Not -I: like the user's `python
    scripts/...`, it keeps the script's folder on sys.path, where the client package is."""
    return subprocess.run([sys.executable, *python_flags, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=60, env=env)


def test_bare_python_reports_everything_missing_without_crashing(tmp_path):
    result = run_script("--comfyui", str(tmp_path / "nowhere"))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr
    out = result.stdout
    assert f"[missing] ComfyUI: {tmp_path / 'nowhere'} has no comfyui_version.py" in out
    assert "[missing] torch: cannot import torch" in out
    assert "[missing] insightface: not installed" in out
    assert "[missing] onnxruntime: not installed" in out
    assert "What to do next:" in out and "-m pip install insightface onnxruntime" in out


def test_bare_python_still_checks_the_model_files(tmp_path):
    comfyui, models = complete_install(tmp_path)
    result = run_script("--comfyui", str(comfyui))
    assert "Traceback" not in result.stderr, result.stderr
    assert f"[  ok   ] ComfyUI: 0.17.0 at {comfyui}" in result.stdout
    assert f"[  ok   ] SDM model: {models / 'facediffuser' / 'facediffuser_sdm.safetensors'}" in result.stdout
    assert "kind not checked: needs torch" in result.stdout
    assert "[  ok   ] insightface models: antelopev2" in result.stdout


def test_complete_install_passes(tmp_path, capsys):
    comfyui, models = complete_install(tmp_path)
    assert cli.main(["--comfyui", str(comfyui)]) == 0
    out = capsys.readouterr().out
    assert "All set." in out
    assert f"[  ok   ] SDM model: {models / 'facediffuser' / 'facediffuser_sdm.safetensors'}" in out
    assert "SDM (Face-diffuser SDM or FastComposer)" in out
    assert f"[  ok   ] TDM model: {models / 'facediffuser' / 'facediffuser_tdm.bin'}" in out
    assert f"{torch.__version__}, device" in out
    assert "providers that work:" in out and "CPUExecutionProvider" in out


def test_missing_models_name_the_exact_path_and_the_source(tmp_path):
    comfyui = fake_comfyui(tmp_path / "ComfyUI")
    (comfyui / "models" / "facediffuser").mkdir(parents=True)
    (comfyui / "models" / "facediffuser" / "pytorch_model.bin").write_bytes(b"")
    findings = by_subject(run_checks(comfyui, None))
    folder = comfyui / "models" / "facediffuser"
    sdm = findings["SDM model"]
    assert sdm.status == MISSING
    assert f"save it as {folder / 'facediffuser_sdm.bin'}" in sdm.fix
    assert "huggingface.co/CodeGoat24/Face-diffuser/tree/main/SDM" in sdm.fix and "fastcomposer" in sdm.fix
    assert "The folder holds pytorch_model.bin: rename the SDM file" in sdm.fix
    assert "huggingface.co/CodeGoat24/Face-diffuser/tree/main/TDM" in findings["TDM model"].fix
    insight = findings["insightface models"]
    assert insight.status == MISSING
    assert "releases/download/v0.7/buffalo_l.zip" in insight.fix and "antelopev2.zip" not in insight.fix
    assert str(comfyui / "models" / "insightface" / "models" / "buffalo_l" / "det_10g.onnx") in insight.fix
    assert "python scripts/facediffuser_setup.py" in insight.fix and "python scripts/facediffuser_setup.py" in sdm.fix


def test_a_file_of_the_wrong_kind_is_a_problem(tmp_path):
    comfyui, models = complete_install(tmp_path)
    save_file(tensors(TDM_KEYS[:-1]), models / "facediffuser" / "facediffuser_sdm.safetensors")
    sdm = by_subject(run_checks(comfyui, None))["SDM model"]
    assert sdm.status == PROBLEM
    assert "is a TDM (no image_encoder/postfuse_module weights)" in sdm.detail and "not the SDM" in sdm.detail


# A torch zip without its end (the zip's index) is a truncated download, not an old-style pickle.
@pytest.mark.parametrize("name, role, kept, why", [("facediffuser_sdm.safetensors", "SDM", 20, "cannot be read"),
                                                   ("facediffuser_tdm.bin", "TDM", 100, "the file is truncated")])
def test_a_truncated_file_is_a_problem(tmp_path, name, role, kept, why):
    comfyui, models = complete_install(tmp_path)
    path = models / "facediffuser" / name
    path.write_bytes(path.read_bytes()[:kept])
    finding = by_subject(run_checks(comfyui, None))[f"{role} model"]
    assert finding.status == PROBLEM and why in finding.detail and "download it again" in finding.fix


def test_keys_are_read_from_a_torch_zip_without_loading_it(tmp_path):
    state = tensors(SDM_KEYS)
    torch.save(state, tmp_path / "model.bin")
    assert sorted(checkpoint_keys(tmp_path / "model.bin")) == sorted(state)
    save_file(state, tmp_path / "model.safetensors")
    assert sorted(checkpoint_keys(tmp_path / "model.safetensors")) == sorted(state)


def test_an_old_style_pickle_is_accepted_unchecked(tmp_path):
    comfyui, models = complete_install(tmp_path)
    path = models / "facediffuser" / "facediffuser_tdm.bin"
    torch.save(tensors(TDM_KEYS), path, _use_new_zipfile_serialization=False)
    tdm = by_subject(run_checks(comfyui, None))["TDM model"]
    assert tdm.status == OK and "kind not checked: an old-style torch pickle" in tdm.detail


def test_insightface_pack_layout_mistakes(tmp_path):
    models = tmp_path / "models"
    root = models / "insightface" / "models"
    nested = root / "antelopev2" / "antelopev2"
    nested.mkdir(parents=True)
    for name in packs.KNOWN_PACK_FILES["antelopev2"]:
        (nested / name).write_bytes(b"onnx")
    finding = check_insightface_pack([models / "insightface"])
    assert finding.status == PROBLEM and "nested one level too deep" in finding.detail
    assert f"move the files of {nested} up into {root / 'antelopev2'}" in finding.fix

    for name in packs.KNOWN_PACK_FILES["antelopev2"][:2]:
        (nested / name).rename(root / "antelopev2" / name)
    (root / "buffalo_l.zip").write_bytes(b"zip")
    finding = check_insightface_pack([models / "insightface"])
    assert finding.status == MISSING
    assert f"{root / 'antelopev2'} lacks its face detector scrfd_10g_bnkps.onnx" in finding.detail
    assert f"unzip {root / 'buffalo_l.zip'}" in finding.fix

    buffalo = root / "buffalo_l"
    buffalo.mkdir()
    (buffalo / "det_10g.onnx").write_bytes(b"onnx")  # the detector is all the reference-face node needs
    assert check_insightface_pack([models / "insightface"]).status == OK


def test_old_comfyui_is_a_problem(tmp_path):
    root = fake_comfyui(tmp_path / "ComfyUI", "0.3.40")
    finding = check_comfyui(model_folders.find_comfyui(root), root)
    assert finding.status == PROBLEM and "version 0.3.40" in finding.detail and "update ComfyUI" in finding.fix


def test_the_probe_model_runs_on_the_cpu_provider():
    providers = insightface_onnxruntime.working_providers(onnxruntime)
    assert providers["CPUExecutionProvider"] == ""
    assert set(providers) == set(onnxruntime.get_available_providers())


def test_onnxruntime_and_onnxruntime_gpu_installed_together_are_detected(tmp_path):
    for name, version in (("onnxruntime", "1.20.1"), ("onnxruntime_gpu", "1.19.2")):
        info = tmp_path / f"{name}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: {version}\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = run_script("--comfyui", str(tmp_path), python_flags=("-S",), env=env)
    assert "Traceback" not in result.stderr, result.stderr
    assert "[problem] onnxruntime: several builds installed at once: onnxruntime 1.20.1, onnxruntime-gpu 1.19.2" in result.stdout
    assert "pip uninstall -y onnxruntime onnxruntime-gpu" in result.stdout
    # This machine's torch has no CUDA: the fix keeps the CPU build, never reinstalls the GPU one.
    assert "-m pip install onnxruntime\n" in result.stdout and "install onnxruntime-gpu" not in result.stdout


@pytest.mark.parametrize("cuda_gpu, keep", [(False, "onnxruntime"), (True, "onnxruntime-gpu")])
def test_the_onnxruntime_build_to_keep_is_the_one_for_this_machine(monkeypatch, cuda_gpu, keep):
    versions = {"onnxruntime": "1.20.1", "onnxruntime-gpu": "1.19.2"}
    monkeypatch.setattr(insightface_onnxruntime, "installed_version", versions.get)
    conflict = insightface_onnxruntime.onnxruntime_conflict(cuda_gpu)
    assert conflict.fix.endswith(f"-m pip install {keep}")
    assert ("onnxruntime-gpu" in insightface_onnxruntime.insightface_install_command(cuda_gpu)) == cuda_gpu


def test_the_gpu_build_on_a_machine_without_cuda_is_named_with_the_swap(monkeypatch):
    monkeypatch.setattr(insightface_onnxruntime, "installed_version", {"onnxruntime-gpu": "1.19.2"}.get)
    (finding,) = insightface_onnxruntime.check_onnxruntime(cuda_gpu=False)
    assert finding.status == INFO and "the GPU build, on a machine where torch sees no CUDA GPU" in finding.detail
    assert "pip uninstall -y onnxruntime-gpu" in finding.fix and finding.fix.endswith("-m pip install onnxruntime")


def test_insightface_and_onnxruntime_are_not_requirements_of_the_pack():
    """A failed insightface build must not take the pack's install down with it (README 'Install': a second step),
    and requirements.txt never asks for an onnxruntime build beside the one a machine has."""
    import tomllib

    root = pack_scripts.SCRIPTS_DIR.parent
    required = [line.split(";")[0].strip() for line in (root / "requirements.txt").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert not [r for r in required if r.startswith(("insightface", "onnxruntime"))], required
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert project["dependencies"] == required
    assert project["optional-dependencies"]["insightface"] == ["insightface>=0.7.3", "onnxruntime"]


def test_all_set_only_when_every_shipped_workflow_can_run(tmp_path, capsys):
    comfyui, models = complete_install(tmp_path)
    pack = models / "insightface" / "models" / "antelopev2"
    (pack / "glintr100.onnx").unlink()  # detection works, recognition does not
    assert cli.main(["--comfyui", str(comfyui)]) == 1
    out = capsys.readouterr().out
    assert "All set" not in out
    assert f"[missing] insightface recognition model: antelopev2 in {pack} has no glintr100.onnx" in out
    assert "  facediffuser_stage_sweep: needs insightface recognition model" in out
    # Auto regions find faces with the detector alone: that template is ready, and listed with the others.
    assert ("ready: facediffuser_custom_sampling, facediffuser_official_pndm, facediffuser_single_subject, facediffuser_two_subjects, "
            "facediffuser_two_subjects_auto_regions, facediffuser_two_subjects_regions\n") in out


def test_all_set_on_a_cpu_only_torch_suggests_a_small_first_picture_and_leaves_cpu_to_the_runner(tmp_path, capsys):
    """The runner adds --cpu by itself (test_headless_runner.py::test_on_a_cpu_only_torch_the_runner_starts_comfyui_with_cpu_and_says_so):
    the suggestion does not ask the user for it, and it asks for a picture a CPU makes in minutes."""
    import shlex

    comfyui, _ = complete_install(tmp_path)
    assert not torch.cuda.is_available()
    assert cli.main(["--comfyui", str(comfyui)]) == 0
    out = capsys.readouterr().out
    command = re.search(r"make a first picture: (python scripts/facediffuser_run\.py .*?) \(it starts", out).group(1)
    assert "--cpu" not in command and "with --cpu for this CPU-only torch" in out
    args = pack_scripts.load("facediffuser_run").parse_args(shlex.split(command)[2:])
    assert (args.steps, args.width, args.height) == (20, 256, 256)


def test_extra_model_paths_are_read_as_comfyui_reads_them(comfyui, tmp_path, monkeypatch):
    import copy

    import folder_paths
    import utils.extra_config

    from facediffuser_core.model_folders import read_extra_model_paths

    monkeypatch.setenv("FD_MODELS", str(tmp_path / "env models"))
    config = tmp_path / "conf" / "extra_model_paths.yaml"
    config.parent.mkdir()
    config.write_text(
        "relative:\n"
        "    base_path: ../shared\n"
        "    is_default: true\n"
        "    facediffuser: |\n"
        "        fd\n"
        "        fd2/sub\n"
        "    insightface: faces/\n"
        "from_env:\n"
        "    base_path: $FD_MODELS\n"
        "    facediffuser: fd\n"
        "no_base:\n"
        "    facediffuser: here\n"
        "empty:\n")
    saved = copy.deepcopy(folder_paths.folder_names_and_paths)
    try:
        for name in ("facediffuser", "insightface"):
            folder_paths.folder_names_and_paths.pop(name, None)
        utils.extra_config.load_extra_path_config(str(config))
        comfyui_reads = {name: folder_paths.get_folder_paths(name) for name in ("facediffuser", "insightface")}
    finally:
        folder_paths.folder_names_and_paths.clear()
        folder_paths.folder_names_and_paths.update(saved)
    ours = read_extra_model_paths(config)
    for name in ("facediffuser", "insightface"):
        assert sorted(str(entry.path) for entry in ours if entry.folder_name == name) == sorted(comfyui_reads[name])
    # ComfyUI lists is_default folders first (each inserted at the front), the others after them.
    assert {str(e.path) for e in ours if e.is_default and e.folder_name == "facediffuser"} == set(comfyui_reads["facediffuser"][:2])
