"""The batch client on Ray (--ray) with real ComfyUIs on the tiny models, two CPU workers each starting its own: a
cluster of two nodes started with `ray start` as docs/batches.md prints it, on loopback, through a worker's
ComfyUI killed, a worker killed, a restart that fails and a node killed (every run done exactly once, bad jobs
failing alone, nothing left behind), the same jobs file through --server giving the same pictures; on a local
cluster, the driver stopped with SIGINT and run again (nothing redone), and the --ray/--server benchmark."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dev import child_process
from dev.devkit import comfy_harness
import comfy_server
import pack_scripts
from test_batch import SCRIPT, all_runs, face_workflow, finish, manifest_of, photo, start_batch, wait_for, write_jobs

pytest.importorskip("ray", reason="the --ray tests need Ray (requirements-test.txt)")

STARTUP_SHIMS = Path(__file__).resolve().parent / "comfy_startup"  # the workers' ComfyUIs get the tests' CPU shims
# Ray gives a worker with one CPU one thread; the --server ComfyUI compared with it gets the same, since sums of
# floats taken in another order differ in their last bits.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The ComfyUI base folder both workers start from: the pack and the tiny models (each worker writes its own
    inputs and outputs elsewhere). The module's tests need a ComfyUI (this module imports without one: the docs'
    test finds its tests here)."""
    import tiny_install

    if comfy_harness.comfyui_path() is None:
        pytest.skip(comfy_harness.SKIP_REASON)

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


class LoopbackOnly:
    """A network namespace with nothing but loopback, held open by a sleeping process, for commands run in it
    through nsenter. `ray start --address` joins a second node only in Ray's multi-node mode, where Ray swaps
    127.0.0.1 for the machine's network address and its head and raylets listen on every interface; in this
    namespace the only interface is loopback, so the recipe's commands run as printed and stay on 127.0.0.1 (its
    ports are also apart from those of other Ray clusters on this machine)."""

    def __init__(self):
        self.holder = subprocess.Popen(["unshare", "--net", "sh", "-c", "ip link set lo up && echo up && exec sleep 3600"],
                                       stdout=subprocess.PIPE, text=True)
        if self.holder.stdout.readline().strip() != "up":
            self.holder.kill()
            raise OSError("no network namespace")

    def command(self, text: str) -> list[str]:
        return ["nsenter", f"--net=/proc/{self.holder.pid}/ns/net", "bash", "-c", text]

    def close(self) -> None:
        self.holder.kill()
        self.holder.wait()


def loopback_only() -> LoopbackOnly:
    try:
        return LoopbackOnly()
    except OSError:
        pytest.skip("the two-node cluster needs a network namespace of its own: `unshare --net` and `nsenter` (util-linux) "
                    "and the right to make one (root)")


def marked(mark: str) -> list[int]:
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if f"FACEDIFFUSER_TEST_MARK={mark}".encode() in (proc / "environ").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def children(pid: int) -> list[int]:
    """Every process descended from `pid`."""
    parents = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            parents[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        for child, its_parent in parents.items():
            if its_parent == parent:
                found.append(child)
                frontier.append(child)
    return found


def second_raylet(mark: str) -> int:
    """The raylet of the node that joined (the head's has --head)."""
    for pid in marked(mark):
        try:
            command = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if command and command[0].endswith(b"/raylet") and b"--head" not in command:
            return pid
    raise AssertionError("no second raylet")


def test_a_two_node_cluster_started_as_the_docs_print_survives_every_fault_and_server_gives_the_same_pictures(base, tmp_path, monkeypatch):
    """The recipe of docs/batches.md (Several machines) on one machine, two nodes of one CPU each, so one worker on
    each: a worker's ComfyUI killed and the other worker killed, both restarts failing once, then the second node
    killed (its worker cannot come back: the first node has no room). Every run done
    exactly once, within its attempts, bad jobs failing alone; nothing left running or on disk; a head that wants
    a token refuses a batch without one in one line; the same jobs through --server give the same pictures."""
    from test_readme_commands import cluster_commands

    workflow = face_workflow(tmp_path)
    photo(tmp_path / "me.png")
    photo(tmp_path / "blank.png", face=False)
    jobs_file = write_jobs(tmp_path / "jobs.jsonl", [
        {"id": "me", "workflow": workflow.name, "faces": ["me.png"], "prompt": "a woman <|image|> in a garden", "count": 16},
        {"id": "blank", "workflow": workflow.name, "faces": ["blank.png"], "prompt": "a woman <|image|>"},
        {"id": "zero-steps", "workflow": workflow.name, "faces": ["me.png"], "prompt": "a woman <|image|>", "steps": 0}])
    (tmp_path / "home").mkdir()
    (tmp_path / "tmp").mkdir()
    ray_temp = Path(tempfile.mkdtemp(prefix="fdray"))  # short: Ray's socket paths must fit in 107 characters
    refuse, mark = tmp_path / "refuse_start", uuid.uuid4().hex
    env = {**os.environ, **ONE_THREAD, "HOME": str(tmp_path / "home"), "TMPDIR": str(tmp_path / "tmp"), "RAY_TMPDIR": str(ray_temp),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", "FACEDIFFUSER_TEST_MARK": mark,
           "FACEDIFFUSER_TEST_REFUSE_START": str(refuse),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(STARTUP_SHIMS), os.environ.get("PYTHONPATH")]))}
    env.pop("RAY_ADDRESS", None)
    # The loopback-only ban another test of this session may have set makes `ray start --address` refuse a second
    # node; in this namespace loopback is all there is, so a user's plain environment is what the recipe gets.
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    generate, head, join, run = cluster_commands()
    cpu_options = ["--ray-cpus-per-worker", "1", "--comfyui", str(comfy_harness.comfyui_path()), "--comfyui-args",
                   shlex.join(comfy_server.server_options(base)), "--poll", "0.05", "--progress-every", "1"]
    namespace = loopback_only()
    log = tmp_path / "batch.log"
    try:
        for command in (generate, f"{head} --num-cpus 1", f"{join.replace('<head address>', '127.0.0.1')} --num-cpus 1"):
            started = subprocess.run(namespace.command(command), env=env, capture_output=True, text=True, timeout=300)
            assert started.returncode == 0, f"{command}\n{started.stdout}\n{started.stderr}"
        typed = run.replace("portraits.jsonl", shlex.quote(str(jobs_file))) + " " + shlex.join(cpu_options)
        with open(log, "w") as output:
            process = subprocess.Popen(namespace.command(typed), stdout=output, stderr=subprocess.STDOUT, text=True,
                                       env=env, cwd=pack_scripts.SCRIPTS_DIR.parent)
        try:
            wait_for(lambda: done_count(jobs_file) >= 2 and len(worker_comfyuis(base)) == 2, timeout=600, what="two runs done")
            refuse.write_text("")  # from now on no ComfyUI starts: the replacements below fail
            comfyui, other = sorted(worker_comfyuis(base))
            os.kill(comfyui, signal.SIGKILL)  # a worker's ComfyUI
            os.kill(worker_comfyuis(base)[other], signal.SIGKILL)  # the other worker, whose ComfyUI goes with it
            wait_for(lambda: log.read_text().count("could not start") >= 2, timeout=600, what="the replacements failing to start")
            refuse.unlink()
            wait_for(lambda: log.read_text().count("ready again") >= 2 and len(worker_comfyuis(base)) == 2, timeout=600,
                     what="both workers started again")
            for pid in [second_raylet(mark), *children(second_raylet(mark))]:  # the second node, all of it
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            code = process.wait(timeout=900)
        finally:
            process.kill()
        out = log.read_text()
        assert code == 1, out  # the two bad jobs
        assert "ray     starting 2 worker(s) on 2 node(s) (127.0.0.1, 127.0.0.1)" in out
        runs = all_runs(manifest_of(jobs_file))
        ray_run_dir = jobs_file.with_name("jobs_run")
        for seed in range(16):
            run = runs[("me", f"seed-{seed}")]
            assert run["state"] == "done" and len(run["files"]) == 2 and run["attempts"] <= 3, run  # the picture and the face crop, once
            assert sorted(p.name for p in (ray_run_dir / "outputs" / "me" / f"seed-{seed}").iterdir()) == sorted(Path(f).name for f in run["files"])
            assert out.count(f"done    me seed-{seed} ") == 1
        assert "no face" in runs[("blank", "seed-workflow")]["error"].lower() and runs[("blank", "seed-workflow")]["attempts"] == 1
        assert runs[("zero-steps", "seed-workflow")]["error"].startswith("ComfyUI rejected the workflow")
        assert re.search(r"^ray     ray:worker-\d replaced: the worker was lost", out, re.M), out  # the node
        assert not worker_comfyuis(base)  # nothing of the batch left running ...
        # ... or on disk: the workers' scratch folders, ComfyUI logs and pictures (Ray's own tools leave a file there too)
        assert [path.name for path in (tmp_path / "tmp").iterdir() if path.name.startswith("facediffuser")] == []

        # A batch that has no token for a head that wants one: one line naming the fix.
        refused = subprocess.run(namespace.command(f"python {shlex.quote(str(SCRIPT))} {shlex.quote(str(jobs_file))} --run-dir "
                                                   f"{shlex.quote(str(tmp_path / 'refused'))} --ray 127.0.0.1:6379 --ray-cpus-per-worker 1"),
                                 env={**env, "HOME": str(tmp_path)}, capture_output=True, text=True, timeout=120)
        assert refused.returncode == 1 and refused.stderr.strip().splitlines() == [
            "error: --ray 127.0.0.1:6379: the Ray head uses token authentication and this machine has not its token: copy the "
            "head's ~/.ray/auth_token here (or set RAY_AUTH_TOKEN) and run with RAY_AUTH_MODE=token"], refused.stderr
    finally:
        for pid in {child for pid in marked(mark) for child in [pid, *children(pid)]}:  # the cluster, its agents too
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        namespace.close()
        shutil.rmtree(ray_temp, ignore_errors=True)

    # The same jobs file through a ComfyUI server: the same pictures for the same seeds.
    for name, value in ONE_THREAD.items():
        monkeypatch.setenv(name, value)
    with comfy_server.running_server(tmp_path / "server") as server:
        import tiny_install

        tiny_install.install_models(server.models_dir)
        code, out, err = finish(start_batch(jobs_file, [server.url], "--run-dir", str(tmp_path / "via_server")))
    assert code == 1, out + err
    via_server = all_runs(manifest_in(tmp_path / "via_server"))
    for seed in range(16):
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
    env = child_process.environment(PYTHONPATH=os.pathsep.join(filter(None, [
        str(STARTUP_SHIMS), str(child_process.REPO_ROOT), str(child_process.CLIENT_FOLDER), os.environ.get("PYTHONPATH")])))
    ran = subprocess.run([*child_process.module_command("dev.benchmark_batch"), str(jobs_file), "--workers", "1",
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
