"""The GPU kit rehearsed end to end on this CPU (ComfyUI tier), so that it is ready whenever a GPU is lent: its
documented CPU command as printed, in a copy of the working tree whose kit holds the tree of COMFYUI_PATH, every
process importing only what the GPU image has and the kit carries; and the documented preparation as printed,
with pip finding the wheels .ci/run prepared instead of reaching the network."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dev import child_process
from dev.gpu_kit import image, plan, prepare, report
from dev.devkit import comfy_harness
from test_readme_commands import commands_of

pytestmark = pytest.mark.skipif(comfy_harness.comfyui_path() is None, reason=comfy_harness.SKIP_REASON)


def working_tree_copy(target: Path) -> Path:
    """What the device machine receives of the working tree: tracked files and untracked ones git does not ignore."""
    listed = subprocess.run(["git", "-C", str(child_process.REPO_ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, check=True)
    for name in filter(None, listed.stdout.decode().split("\0")):
        source = child_process.REPO_ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def environment(home: Path, **more: str) -> dict:
    return {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(home), **more}


def rehearsal_command() -> str:
    (command,) = commands_of("dev/gpu_kit/run.sh", "--device cpu")
    return command


def preparation_command() -> str:
    (command,) = commands_of("python -m dev.gpu_kit.prepare")
    return command


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    """The CPU form of the kit's command as printed, once for the module."""
    repo = working_tree_copy(tmp_path_factory.mktemp("pack"))
    prepare.copy_comfyui(comfy_harness.comfyui_path(), repo / ".gpu-kit" / "comfyui")
    done = subprocess.run(["bash", "-c", rehearsal_command()], cwd=repo, env=environment(repo.parent), capture_output=True, text=True,
                          timeout=3600)
    out = repo / rehearsal_command().split("--out ")[1].split()[0]
    print(f"GPU kit rehearsal on this CPU: {json.loads((out / report.JSON_NAME).read_text())['kit']['seconds']:.0f} s")
    return done, out


def test_the_kit_rehearses_every_measurement_on_this_cpu_as_printed(rehearsal):
    done, out = rehearsal
    run = json.loads((out / report.JSON_NAME).read_text())
    statuses = {m["name"]: (m["status"], m["error"]) for m in run["measurements"]}
    assert done.returncode == 0 and all(status == "ok" for status, _ in statuses.values()), (statuses, done.stderr[-3000:])
    assert [m["name"] for m in run["measurements"]] == list(plan.MEASUREMENTS)
    version = prepare.comfyui_version(comfy_harness.comfyui_path())
    for measurement in run["measurements"]:
        labels = measurement["labels"]
        assert labels["device_kind"] == "cpu" and labels["comfyui"] == version and labels["torch"]
        assert labels["stand_ins"] == ["av"]  # installed here, but not on the GPU image: the rehearsal stands it in as there
    table = (out / report.MARKDOWN_NAME).read_text()
    assert table.startswith("# GPU kit: ") and "not a measurement" in table
    for name in plan.MEASUREMENTS:
        assert f"| **{name}**: " in table
    assert "Traceback" not in done.stdout


def test_the_rehearsal_s_figures_are_what_a_cpu_must_give(rehearsal):
    """On a CPU the answers are known: the pack's official noise is the official draw, the CPU run equals itself,
    regions add no UNet row, and no model is dynamic, so no file is read again."""
    figures = {m["name"]: m["figures"] for m in json.loads((rehearsal[1] / report.JSON_NAME).read_text())["measurements"]}
    noise = figures["official-noise"]["cases"]
    assert noise and all(case["pack_equal"] for case in noise)
    assert figures["gpu-vs-cpu"]["fp32"]["relative_difference"] < 1e-5 < figures["gpu-vs-cpu"]["fp16"]["relative_difference"]
    assert figures["regions"]["summary"]["counts_equal"] is True
    dynamic = figures["dynamic-vram"]
    assert dynamic["patchers"] == {"TDM": "ModelPatcher", "SDM": "ModelPatcher"}
    for sampler in ("snf", "ksampler"):
        runs = dynamic["runs"][sampler]
        assert [run["file_reads"] for run in runs] == [0, 0, 0] and all(run["load_requests"] == 1 for run in runs)
    assert figures["speed"]["summary"]["evaluation_ratio"] == pytest.approx(1.3)


def test_the_preparation_runs_as_printed_with_the_wheels_ci_prepared(tmp_path):
    wheels = prepare.KIT_FOLDER / "wheels"
    if not (prepare.KIT_FOLDER / "manifest.json").is_file():
        pytest.skip(f"no prepared kit in {prepare.KIT_FOLDER.name}/: .ci/run prepares it from pip's index")
    repo = working_tree_copy(tmp_path / "pack")
    (tmp_path / "ComfyUI").symlink_to(comfy_harness.comfyui_path())
    done = subprocess.run(["bash", "-c", preparation_command()], cwd=repo, capture_output=True, text=True, timeout=600,
                          env=environment(tmp_path, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(wheels)))
    assert done.returncode == 0, done.stdout + done.stderr
    manifest = json.loads((repo / ".gpu-kit" / "manifest.json").read_text())
    assert sorted(image.canonical(w["name"]) for w in manifest["wheels"]) == sorted(image.canonical(c.name) for c in image.CARRIED)
    assert prepare.check_wheels(repo / ".gpu-kit" / "wheels") == []
    assert manifest["comfyui"]["version"] == prepare.comfyui_version(comfy_harness.comfyui_path())
    assert manifest["carried_bytes"] < image.CARRY_LIMIT_BYTES and f"{manifest['limit_bytes'] // 2 ** 20} MiB" in done.stdout
    assert not list(repo.glob(".gpu-kit.*"))  # nothing half-built beside it
