"""The batch client on Ray (--ray): a local Ray cluster on loopback with two CPU workers, each starting a real
ComfyUI of its own with the tiny models. One worker's ComfyUI killed and then one worker actor killed mid-batch:
every run done exactly once, bad jobs failing alone; the same jobs file through --server: the same pictures; the
driver stopped with SIGINT and run again: nothing redone."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facediffuser_devkit import comfy_harness
import comfy_server
from test_batch import SCRIPT, all_runs, face_workflow, finish, manifest_of, photo, start_batch, wait_for, write_jobs

pytest.importorskip("ray", reason="the --ray tests need Ray (requirements-test.txt)")
if comfy_harness.comfyui_path() is None:
    pytest.skip(comfy_harness.SKIP_REASON, allow_module_level=True)

STARTUP_SHIMS = Path(__file__).resolve().parent / "comfy_startup"  # the workers' ComfyUIs get the tests' CPU shims
# Ray gives a worker with one CPU one thread; the --server ComfyUI compared with it gets the same, since sums of
# floats taken in another order differ in their last bits.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The ComfyUI base folder both workers start from: the pack and the tiny models (each worker writes its own
    inputs and outputs elsewhere)."""
    import tiny_install

    base = comfy_server.install_pack(tmp_path_factory.mktemp("ray_comfyui"))
    tiny_install.install_models(base / "models")
    return base


def ray_batch(jobs_file: Path, base: Path, *options: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(STARTUP_SHIMS), os.environ.get("PYTHONPATH")])),
           **ONE_THREAD}
    command = [sys.executable, str(SCRIPT), str(jobs_file), "--ray", "--ray-cpus-per-worker", "1", "--ray-workers", "2",
               "--comfyui", str(comfy_harness.comfyui_path()), "--comfyui-args", shlex.join(comfy_server.server_options(base)),
               "--poll", "0.05", "--progress-every", "1", *options]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def worker_comfyuis(base: Path) -> dict[int, int]:
    """The workers' ComfyUI processes started from `base` (this test's alone): pid -> pid of its worker actor."""
    found = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if "main.py" in command and str(base) in command and "facediffuser-ray-worker-" in command:
                found[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return found


def done_count(jobs_file: Path) -> int:
    return sum(run["state"] == "done" for run in all_runs(manifest_of(jobs_file)).values())


def manifest_in(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


def pictures(run_dir: Path, run: dict) -> list[np.ndarray]:
    return [np.asarray(Image.open(run_dir / file)) for file in sorted(run["files"])]


def test_lost_comfyui_and_lost_worker_cost_no_run_and_server_gives_the_same_pictures(base, tmp_path, monkeypatch):
    workflow = face_workflow(tmp_path)
    photo(tmp_path / "me.png")
    photo(tmp_path / "blank.png", face=False)
    jobs_file = write_jobs(tmp_path / "jobs.jsonl", [
        {"id": "me", "workflow": workflow.name, "faces": ["me.png"], "prompt": "a woman <|image|> in a garden", "count": 10},
        {"id": "blank", "workflow": workflow.name, "faces": ["blank.png"], "prompt": "a woman <|image|>"},
        {"id": "zero-steps", "workflow": workflow.name, "faces": ["me.png"], "prompt": "a woman <|image|>", "steps": 0}])
    process = ray_batch(jobs_file, base)
    try:
        wait_for(lambda: done_count(jobs_file) >= 2 and len(worker_comfyuis(base)) == 2, timeout=600, what="two runs done")
        doomed_comfyui = min(worker_comfyuis(base))
        os.kill(doomed_comfyui, signal.SIGKILL)
        wait_for(lambda: done_count(jobs_file) >= 5 and len(worker_comfyuis(base)) == 2 and doomed_comfyui not in worker_comfyuis(base),
                 timeout=600, what="five runs done, the lost ComfyUI replaced")
        os.kill(max(worker_comfyuis(base).values()), signal.SIGKILL)  # a worker actor, whose ComfyUI goes with it
        code, out, err = finish(process, timeout=900)
    finally:
        process.kill()
    assert code == 1, out + err  # the two bad jobs
    assert "on 1 node(s) (127.0.0.1)" in out  # the cluster is this machine, on loopback
    runs = all_runs(manifest_of(jobs_file))
    ray_run_dir = jobs_file.with_name("jobs_run")
    for seed in range(10):
        run = runs[("me", f"seed-{seed}")]
        assert run["state"] == "done" and len(run["files"]) == 2, run  # the picture and the face crop, once
        assert sorted(p.name for p in (ray_run_dir / "outputs" / "me" / f"seed-{seed}").iterdir()) == sorted(Path(f).name for f in run["files"])
        assert out.count(f"done    me seed-{seed} ") == 1
    assert "no face" in runs[("blank", "seed-workflow")]["error"].lower() and runs[("blank", "seed-workflow")]["attempts"] == 1
    assert runs[("zero-steps", "seed-workflow")]["error"].startswith("ComfyUI rejected the workflow")
    wait_for(lambda: not worker_comfyuis(base), timeout=60, what="the workers' ComfyUIs gone with the batch")

    # The same jobs file through a ComfyUI server: the same pictures for the same seeds.
    for name, value in ONE_THREAD.items():
        monkeypatch.setenv(name, value)
    with comfy_server.running_server(tmp_path / "server") as server:
        import tiny_install

        tiny_install.install_models(server.models_dir)
        code, out, err = finish(start_batch(jobs_file, [server.url], "--run-dir", str(tmp_path / "via_server")))
    assert code == 1, out + err
    via_server = all_runs(manifest_in(tmp_path / "via_server"))
    for seed in range(10):
        key = ("me", f"seed-{seed}")
        for from_ray, from_server in zip(pictures(ray_run_dir, runs[key]), pictures(tmp_path / "via_server", via_server[key]), strict=True):
            assert np.array_equal(from_ray, from_server), key


def test_a_driver_stopped_with_sigint_resumes_and_redoes_nothing(base, tmp_path):
    workflow = face_workflow(tmp_path)
    photo(tmp_path / "me.png")
    jobs_file = write_jobs(tmp_path / "jobs.jsonl", [
        {"id": "me", "workflow": workflow.name, "faces": ["me.png"], "prompt": "a woman <|image|> reading", "count": 6}])
    process = ray_batch(jobs_file, base)
    try:
        wait_for(lambda: done_count(jobs_file) >= 2 and any(r["state"] == "running" for r in all_runs(manifest_of(jobs_file)).values()),
                 timeout=600, what="two runs done, one running")
        process.send_signal(signal.SIGINT)
        code, out, err = finish(process, timeout=120)
    finally:
        process.kill()
    assert code == 130 and "run the same command again to resume" in err, out + err
    stopped = all_runs(manifest_of(jobs_file))
    done_before = {key: run for key, run in stopped.items() if run["state"] == "done"}
    wait_for(lambda: not worker_comfyuis(base), timeout=60, what="the workers' ComfyUIs gone with the driver")

    code, out, err = finish(ray_batch(jobs_file, base), timeout=900)
    assert code == 0, out + err
    runs = all_runs(manifest_of(jobs_file))
    assert {run["state"] for run in runs.values()} == {"done"}
    for key, run in done_before.items():  # nothing done is redone
        assert runs[key] == run and f"done    {key[0]} {key[1]} " not in out
    for key, run in stopped.items():
        if run["state"] == "running":  # in flight on Ray when the driver stopped: run again
            assert f"requeue {key[0]} {key[1]}: it was in flight" in out
    assert sum(out.count(f"done    me seed-{seed} ") for seed in range(6)) == 6 - len(done_before)


def test_the_benchmark_gives_runs_per_second_of_ray_against_servers_and_the_same_pictures(base, tmp_path):
    workflow = face_workflow(tmp_path)
    photo(tmp_path / "me.png")
    jobs_file = write_jobs(tmp_path / "jobs.jsonl", [
        {"id": "me", "workflow": workflow.name, "faces": ["me.png"], "prompt": "a woman <|image|> by the sea", "count": 3}])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(STARTUP_SHIMS), os.environ.get("PYTHONPATH")]))}
    ran = subprocess.run([sys.executable, str(SCRIPT.with_name("benchmark_batch.py")), str(jobs_file), "--workers", "1",
                          "--ray-cpus-per-worker", "1", "--comfyui", str(comfy_harness.comfyui_path()),
                          "--comfyui-args", shlex.join(comfy_server.server_options(base))],
                         capture_output=True, text=True, timeout=900, env=env)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    lines = ran.stdout.splitlines()
    rates = [float(re.match(rf"--{side}: +([\d.]+) runs/s with 1 ", line).group(1)) for side, line in zip(("server", "ray"), lines)]
    assert all(rate > 0 for rate in rates)
    assert re.fullmatch(r"ratio --ray / --server: [\d.]+", lines[2])
    assert re.fullmatch(r"Ray's time per run on a worker: [+-][\d.]+ s", lines[3])
    assert lines[4] == "same pictures: yes"
