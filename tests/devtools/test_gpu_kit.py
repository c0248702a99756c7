"""The GPU kit's preparation and conductor without ComfyUI (dev/gpu_kit): which wheels install on the GPU image, a
wheel slimmed of compiled code it never runs, the ComfyUI tree's copy, the prepared kit's size against what travels
(when .ci/run prepared it), and measurements that fail, hang or kill their worker recorded while the rest go on."""

from __future__ import annotations

import argparse
import json
import os
import zipfile
from pathlib import Path

import pytest

from dev import child_process
from dev.gpu_kit import image, plan, prepare, report
from dev.gpu_kit.conductor import Conductor

SUPPORT = Path(__file__).resolve().parents[1] / "support"  # the stand-in worker
PREPARED = prepare.KIT_FOLDER
NOT_PREPARED = f"no prepared kit in {PREPARED.name}/: .ci/run prepares it (python -m dev.gpu_kit.prepare --comfyui <ComfyUI>)"


def test_the_wheels_that_install_on_the_gpu_image():
    assert image.runs_on_the_image("comfy_kitchen-0.2.31-cp312-abi3-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl")
    assert image.runs_on_the_image("comfy_aimdo-0.4.13-cp39-abi3-manylinux2010_x86_64.manylinux2014_x86_64.whl")
    assert image.runs_on_the_image("torchsde-0.2.6-py3-none-any.whl")
    assert not image.runs_on_the_image("av-19.0.2-cp311-cp311-manylinux_2_28_x86_64.whl")
    assert not image.runs_on_the_image("av-19.0.2-cp312-abi3-manylinux_2_28_aarch64.whl")
    assert not image.runs_on_the_image("av-19.0.2-cp312-abi3-macosx_11_0_arm64.whl")
    assert not image.runs_on_the_image("x-1.0-cp313-abi3-manylinux_2_28_x86_64.whl")
    assert image.applies_on_the_image('python_version < "3.13"') and not image.applies_on_the_image('python_version < "3.8"')
    assert not image.applies_on_the_image('extra == "test"')


def make_wheel(folder: Path, name: str, version: str, tags: str, requires=(), files=("pkg/__init__.py",)) -> Path:
    wheel = folder / f"{name}-{version}-{tags}.whl"
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(wheel, "w") as archive:
        for file in files:
            archive.writestr(file, b"x" * 100)
        archive.writestr(f"{info}/METADATA", "\n".join([f"Name: {name}", f"Version: {version}", *(f"Requires-Dist: {r}" for r in requires)]))
        archive.writestr(f"{info}/RECORD", "".join(f"{file},sha256=abc,100\n" for file in files) + f"{info}/RECORD,,\n")
    return wheel


def test_a_wheel_is_slimmed_of_what_it_leaves_out_and_its_record_follows(tmp_path):
    wheel = make_wheel(tmp_path, "kit", "1.0", "py3-none-any", files=("kit/__init__.py", "kit/_C.so", "kit/hip/_C.so"))
    assert prepare.leave_out(wheel, ("kit/_C.so", "kit/hip/_C.so", "kit/absent.so")) == ["kit/_C.so", "kit/hip/_C.so"]
    with zipfile.ZipFile(wheel) as archive:
        assert sorted(archive.namelist()) == ["kit-1.0.dist-info/METADATA", "kit-1.0.dist-info/RECORD", "kit/__init__.py"]
        assert "_C.so" not in archive.read("kit-1.0.dist-info/RECORD").decode()
    assert prepare.leave_out(wheel, ("kit/_C.so",)) == []


def test_wheels_that_would_not_serve_the_image_are_named(tmp_path):
    for carried in image.CARRIED:
        make_wheel(tmp_path, carried.name.replace("-", "_"), "1.0", "py3-none-any")
    assert prepare.check_wheels(tmp_path) == []
    make_wheel(tmp_path, "torchsde", "2.0", "py3-none-any", requires=["numpy>=1", "missing-package>=2", 'absent; extra == "test"'])
    make_wheel(tmp_path, "extra", "1.0", "cp311-cp311-manylinux_2_28_x86_64")
    problems = prepare.check_wheels(tmp_path)
    assert "torchsde-2.0-py3-none-any.whl needs missing-package>=2, which neither the GPU image nor the kit has" in problems
    assert "extra-1.0-cp311-cp311-manylinux_2_28_x86_64.whl does not install on CPython 3.12, x86-64 manylinux" in problems
    assert "two wheels of torchsde" in problems and len(problems) == 3


def test_the_comfyui_copy_leaves_out_what_the_kit_never_loads(tmp_path):
    checkout = tmp_path / "ComfyUI"
    for file in ("comfy/samplers.py", "comfy/sd1_tokenizer/vocab.json", "comfy/text_encoders/t5_tokenizer/spiece.model",
                 "comfy/text_encoders/sd3_clip.py", "comfy_api_nodes/nodes.py", "tests/test.py", "tests-unit/t.py", "nodes.py",
                 "comfy/__pycache__/samplers.cpython-312.pyc", "models/checkpoints/put_checkpoints_here", "requirements.txt"):
        (checkout / file).parent.mkdir(parents=True, exist_ok=True)
        (checkout / file).write_text("x")
    copied = prepare.copy_comfyui(checkout, tmp_path / "copy")
    kept = sorted(str(path.relative_to(tmp_path / "copy")) for path in (tmp_path / "copy").rglob("*") if path.is_file())
    assert kept == ["comfy/samplers.py", "comfy/sd1_tokenizer/vocab.json", "comfy/text_encoders/sd3_clip.py",
                    "models/checkpoints/put_checkpoints_here", "nodes.py", "requirements.txt"]
    assert copied == len(kept)


def test_prepare_with_no_comfyui_checkout_says_so_and_leaves_nothing(tmp_path, capsys):
    target = tmp_path / "kit"
    assert prepare.main(["--comfyui", str(tmp_path / "nowhere"), "--into", str(target)]) == 1
    error = capsys.readouterr().err
    assert error.startswith("prepare: --comfyui ") and "not a ComfyUI checkout" in error
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not (PREPARED / "manifest.json").is_file(), reason=NOT_PREPARED)
def test_the_prepared_kit_travels_under_the_limit_and_installs_on_the_gpu_image():
    manifest = json.loads((PREPARED / "manifest.json").read_text())
    wheels = PREPARED / "wheels"
    assert prepare.check_wheels(wheels) == []
    for wheel in manifest["wheels"]:
        assert prepare.sha256(wheels / wheel["file"]) == wheel["sha256"]
        with zipfile.ZipFile(wheels / wheel["file"]) as archive:
            assert not set(wheel["left_out"]) & set(archive.namelist())
    kitchen = next(w for w in manifest["wheels"] if image.canonical(w["name"]) == "comfy-kitchen")
    assert kitchen["left_out"] == list(next(c for c in image.CARRIED if c.name == "comfy-kitchen").leave_out)
    assert (PREPARED / "comfyui" / "comfy" / "samplers.py").is_file() and not (PREPARED / "comfyui" / "tests").exists()
    # What travels now: the working tree as it is, the kit as it is.
    carried = prepare.travelling_bytes(child_process.REPO_ROOT) + prepare.folder_bytes(PREPARED)
    assert carried < image.CARRY_LIMIT_BYTES, f"{carried / 2 ** 20:.1f} MiB travel"


# --- the conductor --------------------------------------------------------------------------------------------


def conduct(tmp_path, monkeypatch, names, budgets, deadline=None):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(SUPPORT), os.environ.get("PYTHONPATH")])))
    args = argparse.Namespace(device="cpu", tiny=True, comfyui=tmp_path, as_gpu_image=False, deadline=deadline)
    (tmp_path / "results").mkdir()
    conductor = Conductor(args, tmp_path / "results", tmp_path / "gpu-kit.log", budgets, "gpu_kit_stand_in_worker")
    conductor.run(plan.Worker("stand-in", (), tuple(names)))
    return conductor


@pytest.mark.slow  # 9.3 s here
def test_a_measurement_that_fails_hangs_or_kills_its_worker_is_recorded_and_the_others_run(tmp_path, monkeypatch):
    names = ["ok-a", "fail-b", "hang-c", "ok-d", "die-e", "ok-f"]
    # Time enough for each but the hanging one (the stand-in's first result imports torch: seconds on a loaded machine).
    budgets = {"start": (300, 300), **{name: (5, 5) if name.startswith("hang-") else (300, 300) for name in names}}
    conductor = conduct(tmp_path, monkeypatch, names, budgets)
    records = {record["name"]: record for record in conductor.records}
    assert [record["name"] for record in conductor.records] == names
    assert {name: record["status"] for name, record in records.items()} == {
        "ok-a": "ok", "fail-b": "failed", "hang-c": "failed", "ok-d": "ok", "die-e": "failed", "ok-f": "ok"}
    assert "planted failure" in records["fail-b"]["error"]
    assert records["hang-c"]["error"].startswith("stopped: it ran past its budget of 5 s")
    assert "exit 3" in records["die-e"]["error"] and "die-e: planted death" in records["die-e"]["error"]
    run = {"kit": {"command": "python -m dev.gpu_kit --out x", "started": "now", "seconds": 1.0, "deadline_s": None, "tiny": True,
                   "commit": "abc"}, "measurements": conductor.records}
    table = report.markdown(run)
    assert "| ok-a measure | 1 s | 1 s | 1.000 | 1 |" in table and "| ok-f measure |" in table
    assert "| **hang-c** (stand-in): failed: stopped: it ran past its budget of 5 s" in table


def test_what_the_deadline_leaves_no_time_for_is_not_run(tmp_path, monkeypatch):
    conductor = conduct(tmp_path, monkeypatch, ["ok-a", "ok-b"], {"start": (300, 300), "ok-a": (5, 5), "ok-b": (5, 5)}, deadline=10)
    assert [(r["name"], r["status"]) for r in conductor.records] == [("ok-a", "not run"), ("ok-b", "not run")]
    assert "deadline" in conductor.records[0]["error"]


def test_the_performance_page_keeps_a_gpu_table_with_a_row_for_each_measurement_none_measured():
    page = (child_process.REPO_ROOT / "docs" / "performance.md").read_text(encoding="utf-8")
    table = [line for line in page.split("\n## On a GPU\n", 1)[1].splitlines() if line.startswith("| **")]
    assert {line.split("**")[1] for line in table} == set(plan.MEASUREMENTS)
    assert all(line.split(" | ")[1] == "not measured yet" for line in table)
