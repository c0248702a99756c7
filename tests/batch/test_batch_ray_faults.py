"""The batch client on Ray (--ray) under the faults a fleet has, on a local cluster on loopback with two workers
whose "ComfyUI" is a stand-in (comfy_stand_in.py) that starts at once and misbehaves on cue: a run that kills its
ComfyUI, a restart that fails, a run that hangs the ComfyUI it runs on. Each run is sent as often as the manifest
counts (never more than --max-attempts), a dead worker is never sent a run, a hung one is replaced, nothing is
left on disk or running; and what 0.3.0 got wrong around it (RAY_ADDRESS, a re-run with nothing to do, the
timeout's message, where the clock stops)."""

from __future__ import annotations

import collections
import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

import pack_scripts
from facediffuser_client.manifest import read_manifest
from batch_runs import SCRIPT, finish, wait_for, write_jobs

pytest.importorskip("ray", reason="the --ray tests need Ray (requirements-test.txt)")

STAND_IN = Path(__file__).resolve().parents[1] / "support" / "comfy_stand_in.py"
SEEDED_WORKFLOW = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "tiny"}},
    "3": {"class_type": "RandomNoise", "inputs": {"noise_seed": 0}},
}


@pytest.fixture
def stand_in(tmp_path):
    """A folder passing for ComfyUI: main.py is the stand-in."""
    root = tmp_path / "comfyui"
    root.mkdir()
    (root / "main.py").symlink_to(STAND_IN)
    return root


@pytest.fixture
def ray_env(tmp_path):
    """The environment of a batch under test: its own temporary folder (the workers' scratch folders go there), Ray's
    folder short enough for its sockets, and a mark by which every process it leaves behind is found and killed."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    ray_temp = Path(tempfile.mkdtemp(prefix="fdray"))
    mark = uuid.uuid4().hex
    env = {**os.environ, "TMPDIR": str(temp), "RAY_TMPDIR": str(ray_temp), "FACEDIFFUSER_TEST_MARK": mark}
    env.pop("RAY_ADDRESS", None)
    yield env
    left = marked_processes(mark)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(ray_temp, ignore_errors=True)
    assert not left, f"processes left running by the batch: {left}"


def marked_processes(mark: str) -> list[int]:
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if f"FACEDIFFUSER_TEST_MARK={mark}".encode() in (proc / "environ").read_bytes():
                found.append(int(proc.name))
    return [pid for pid in found if pid != os.getpid()]


def ray_batch(jobs_file: Path, comfyui: Path, env: dict, *options: str) -> subprocess.Popen:
    command = [sys.executable, str(SCRIPT), str(jobs_file), "--ray", "--ray-cpus-per-worker", "1", "--ray-workers", "2",
               "--comfyui", str(comfyui), "--poll", "0.05", "--progress-every", "1", *options]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def seeded_jobs(folder: Path, seeds) -> Path:
    (folder / "seeded.json").write_text(json.dumps(SEEDED_WORKFLOW))
    return write_jobs(folder / "jobs.jsonl", [{"id": f"s{seed}", "workflow": "seeded.json", "seed": seed} for seed in seeds])


def sent(comfyui: Path) -> collections.Counter:
    """How often the stand-ins were sent each seed."""
    log = comfyui / "sent.log"
    return collections.Counter(int(line.split()[0]) for line in log.read_text().splitlines()) if log.exists() else collections.Counter()


def runs(jobs_file: Path) -> dict[int, dict]:
    manifest = read_manifest(jobs_file.with_name(f"{jobs_file.stem}_run"))
    return {int(job_id[1:]): entry["runs"][f"seed-{job_id[1:]}"] for job_id, entry in manifest["jobs"].items()}


@pytest.mark.slow  # 12.1 s here
def test_a_run_that_kills_its_comfyui_is_sent_max_attempts_times_and_each_send_is_counted(tmp_path, stand_in, ray_env):
    (stand_in / "faults.json").write_text(json.dumps({"die": [3]}))
    jobs_file = seeded_jobs(tmp_path, range(8))
    code, out, err = finish(ray_batch(jobs_file, stand_in, ray_env, "--max-attempts", "3"), timeout=300)
    assert code == 1, out + err
    recorded, really = runs(jobs_file), sent(stand_in)
    assert recorded[3]["state"] == "failed" and recorded[3]["attempts"] == 3 == really[3], (recorded[3], really)
    assert recorded[3]["error"].startswith("3 attempts failed; the last: ")
    for seed in range(8):
        # A send cut off by seed 3's kill ("Remote end closed connection") is counted though the stand-in may not
        # have logged it: whether a dying server took it cannot be known, so it counts against --max-attempts.
        # Ray re-running a task by itself would make the stand-in's count the larger one.
        assert really[seed] <= recorded[seed]["attempts"] <= 3, (seed, recorded[seed], really)
        if not recorded[seed]["errors"]:
            assert recorded[seed]["attempts"] == really[seed] == 1, (seed, recorded[seed], really)
        if seed != 3:
            assert recorded[seed]["state"] == "done" and out.count(f"done    s{seed} seed-{seed} ") == 1
    retried = [run for run in recorded.values() if run["errors"]]
    assert retried and all(len(run["errors"]) == run["attempts"] - (run["state"] == "done") for run in retried)  # each retry recorded


@pytest.mark.slow  # 26.8 s here
def test_a_worker_whose_restart_fails_is_given_up_and_sent_nothing(tmp_path, stand_in, ray_env):
    jobs_file = seeded_jobs(tmp_path, range(60))
    process = ray_batch(jobs_file, stand_in, ray_env)
    try:
        wait_for(lambda: sum(run["state"] == "done" for run in runs(jobs_file).values()) >= 2, timeout=300, what="two runs done")
        (stand_in / "refuse_start").write_text("")  # from now on no ComfyUI starts ...
        (stand_in / "faults.json").write_text(json.dumps({"die_once": [20], "seconds": 0.4}))  # ... one dies: its worker cannot come back
        code, out, err = finish(process, timeout=300)
    finally:
        process.kill()
    assert code == 0, out + err
    assert all(run["state"] == "done" for run in runs(jobs_file).values())
    assert re.search(r"^ray     ray:worker-\d given up after 3 failed starts in a row: the ComfyUI started from \S+ exited with "
                     r"status 1 before answering: stand-in: refuse_start is there: exiting as a ComfyUI that cannot start$", out, re.M), out
    assert runs(jobs_file)[20]["attempts"] == 2 == sent(stand_in)[20]


@pytest.mark.slow  # 17.6 s here
def test_a_batch_whose_every_worker_is_given_up_stops_resumable_with_the_last_error(tmp_path, stand_in, ray_env):
    jobs_file = seeded_jobs(tmp_path, range(30))
    process = ray_batch(jobs_file, stand_in, ray_env)
    try:
        wait_for(lambda: sum(run["state"] == "done" for run in runs(jobs_file).values()) >= 2, timeout=300, what="two runs done")
        (stand_in / "refuse_start").write_text("")
        (stand_in / "faults.json").write_text(json.dumps({"die": list(range(30)), "seconds": 0.2}))  # every ComfyUI dies
        code, out, err = finish(process, timeout=300)
    finally:
        process.kill()
    assert code == 3, out + err
    assert err.strip().splitlines()[-1].startswith(
        "stopped: every ray worker failed to start 3 times in a row; the last error: the ComfyUI started from "), err
    assert err.strip().endswith("Run the same command again to resume.")
    recorded = runs(jobs_file)
    assert {run["state"] for run in recorded.values()} <= {"done", "pending", "failed"} and any(r["state"] == "pending" for r in recorded.values())


@pytest.mark.slow  # 11.1 s here
def test_a_run_that_hangs_its_comfyui_restarts_the_worker_and_the_next_runs_go_through(tmp_path, stand_in, ray_env):
    (stand_in / "faults.json").write_text(json.dumps({"hang_once": [2]}))
    jobs_file = seeded_jobs(tmp_path, range(12))
    code, out, err = finish(ray_batch(jobs_file, stand_in, ray_env, "--job-timeout", "3"), timeout=300)
    assert code == 0, out + err
    recorded = runs(jobs_file)
    assert all(run["state"] == "done" for run in recorded.values())
    assert recorded[2]["errors"] and recorded[2]["errors"][0].endswith(": no result within --job-timeout 3 s")
    assert re.search(r"replaced: its ComfyUI must go \(no result within --job-timeout 3 s\)", out)
    # Only the hung run and, at most, the one queued behind it on the same ComfyUI were tried twice.
    assert sum(run["attempts"] > 1 for run in recorded.values()) <= 2, recorded


@pytest.mark.slow  # 8.2 s here
def test_workers_leave_no_folder_log_picture_or_process_behind(tmp_path, stand_in, ray_env):
    (stand_in / "faults.json").write_text(json.dumps({"die_once": [5]}))
    jobs_file = seeded_jobs(tmp_path, range(16))
    process = ray_batch(jobs_file, stand_in, ray_env)
    temp = Path(ray_env["TMPDIR"])
    try:
        wait_for(lambda: sum(run["state"] == "done" for run in runs(jobs_file).values()) >= 10, timeout=300, what="ten runs done")
        # Pictures on their way to the driver stay on the worker's disk only while its ComfyUI may name them again.
        kept = [path for path in temp.glob("facediffuser-ray-worker-*/output/*.png")]
        assert len(kept) <= 2 * 2, kept
        code, out, err = finish(process, timeout=300)
    finally:
        process.kill()
    assert code == 0, out + err
    assert sorted(path.name for path in temp.iterdir()) == []  # no scratch folder, log or picture of a worker


@pytest.mark.slow  # 6.2 s here
def test_a_rerun_with_nothing_left_starts_nothing(tmp_path, stand_in, ray_env):
    jobs_file = seeded_jobs(tmp_path, range(2))
    code, out, err = finish(ray_batch(jobs_file, stand_in, ray_env), timeout=300)
    assert code == 0 and "ray     starting 2 worker(s) on 1 node(s) (127.0.0.1)" in out, out + err
    code, out, err = finish(ray_batch(jobs_file, stand_in, ray_env), timeout=120)
    assert code == 0, out + err
    assert "2 run(s): 2 done, 0 failed, 0 running, 0 pending; nothing to run;" in out and "ray     " not in out
    assert sent(stand_in) == {0: 1, 1: 1}


@pytest.mark.slow  # 7.0 s here
@pytest.mark.parametrize("known", ["RAY_ADDRESS", "a record of a cluster"])
def test_plain_ray_starts_a_cluster_of_its_own_whatever_cluster_is_known(known, tmp_path, stand_in, ray_env):
    """RAY_ADDRESS, or the record `ray start --head` leaves of its cluster (here a stale one): ray.init connected to
    it, and refused the batch's num_cpus with a traceback."""
    jobs_file = seeded_jobs(tmp_path, range(2))
    if known == "RAY_ADDRESS":
        ray_env = {**ray_env, "RAY_ADDRESS": "127.0.0.1:1"}
    else:
        record = Path(ray_env["RAY_TMPDIR"]) / "ray" / "ray_current_cluster"  # where `ray start --head` leaves it
        record.parent.mkdir()
        record.write_text("127.0.0.1:1")
    code, out, err = finish(ray_batch(jobs_file, stand_in, ray_env), timeout=300)
    assert code == 0, out + err
    assert "Traceback" not in err and all(run["state"] == "done" for run in runs(jobs_file).values())


ALONE = ["unshare", "--pid", "--fork", "--mount-proc"]  # a process that sees no other process of this machine


def can_be_alone() -> bool:
    try:
        return subprocess.run([*ALONE, "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.slow  # 5.5 s here
@pytest.mark.parametrize("case", ["auto without a cluster", "a port that is no Ray head"])
def test_a_ray_address_that_leads_nowhere_is_one_line_naming_the_fix(case, tmp_path, stand_in, ray_env):
    """`--ray auto` takes any Ray head running on the machine (Ray's rule): run where no other process is seen (a
    PID namespace), since other batches may run Ray here."""
    import socket

    if case == "auto without a cluster" and not can_be_alone():
        pytest.skip("needs `unshare --pid` (util-linux, and the right to make namespaces) to hide this machine's other Ray heads")
    jobs_file = seeded_jobs(tmp_path, range(1))
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()  # takes TCP connections, says nothing
        address = "auto" if case == "auto without a cluster" else f"127.0.0.1:{listener.getsockname()[1]}"
        command = [sys.executable, str(SCRIPT), str(jobs_file), "--ray", address, "--ray-cpus-per-worker", "1", "--comfyui", str(stand_in)]
        command = [*ALONE, *command] if address == "auto" else command
        code, out, err = finish(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ray_env), timeout=120)
    assert code == 1, out + err
    (line,) = err.strip().splitlines()
    if case == "auto without a cluster":
        assert line.startswith("error: --ray auto: no Ray cluster is known on this machine") and "ray start --head" in line
    else:
        assert line == (f"error: --ray {address}: something takes connections there but it is not a Ray head (no gRPC answer): "
                        f"give the address `ray start --head` printed (its --port, 6379 by default)")


# --- in this process: what happens between the driver and Ray -------------------------------------------------


def run_in_process(monkeypatch, jobs_file: Path, stand_in: Path, ray_env: dict) -> tuple[int, str]:
    """facediffuser_batch.main in this process (for what only a patched Ray shows), and its output."""
    for name in ("TMPDIR", "RAY_TMPDIR", "FACEDIFFUSER_TEST_MARK"):
        monkeypatch.setenv(name, ray_env[name])
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", None)  # TMPDIR read again
    batch = pack_scripts.load("facediffuser_batch")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = batch.main([str(jobs_file), "--ray", "--ray-cpus-per-worker", "1", "--ray-workers", "2", "--comfyui",
                           str(stand_in), "--poll", "0.05"])
    return code, out.getvalue()


def carries(value, needle: bytes) -> bool:
    if isinstance(value, (bytes, bytearray)):
        return needle in value
    if isinstance(value, dict):
        return any(carries(item, needle) for item in value.values())
    if isinstance(value, (list, tuple)):
        return any(carries(item, needle) for item in value)
    return False


@pytest.mark.slow  # 8.3 s here
def test_a_lost_result_runs_again_photos_go_once_and_the_clock_stops_at_the_last_result(monkeypatch, tmp_path, stand_in, ray_env):
    """One batch in this process, Ray patched three ways (one Ray session per process: Ray does not ship this package
    to a second cluster started by the same process): the first result to come back is lost, as when its node dies
    after the run; every task's arguments are kept, to look for the photo's bytes; shutting Ray down takes 1000 s."""
    import ray
    from ray import actor

    photo = (tmp_path / "face.png")
    photo.write_bytes(b"\x89PNG a face photo " + os.urandom(32))
    (tmp_path / "with_face.json").write_text(json.dumps({
        **SEEDED_WORKFLOW, "4": {"class_type": "LoadImage", "inputs": {"image": "x.png"}},
        "5": {"class_type": "FaceDiffuserEncodeReferenceFaces", "inputs": {"images": ["4", 0]}}}))
    jobs_file = write_jobs(tmp_path / "jobs.jsonl", [{"id": f"s{seed}", "workflow": "with_face.json", "faces": ["face.png"],
                                                      "seed": seed} for seed in range(6)])
    real_get, real_remote, real_shutdown, real_monotonic = ray.get, actor.ActorMethod.remote, ray.shutdown, time.monotonic
    lost, sent_arguments, late = [], [], []

    def get(refs, *args, **kwargs):
        value = real_get(refs, *args, **kwargs)
        if not lost and isinstance(value, dict) and "entry" in value:
            lost.append(refs)
            raise ray.exceptions.ObjectLostError(refs.hex(), "", "")
        return value

    def remote(self, *args, **kwargs):
        sent_arguments.append(args)
        return real_remote(self, *args, **kwargs)

    def shutdown(*args, **kwargs):
        assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.1"}  # the batch's cluster, on loopback
        real_shutdown(*args, **kwargs)
        late.append(1000.0)

    monkeypatch.setattr(ray, "get", get)
    monkeypatch.setattr(actor.ActorMethod, "remote", remote)
    monkeypatch.setattr(ray, "shutdown", shutdown)
    monkeypatch.setattr(time, "monotonic", lambda: real_monotonic() + sum(late))
    code, out = run_in_process(monkeypatch, jobs_file, stand_in, ray_env)
    assert code == 0 and late, out
    assert lost and re.search(r"^retry   s\d seed-\d .*its result was lost \(ObjectLostError", out, re.M), out
    assert all(run["state"] == "done" for run in runs(jobs_file).values())
    assert not any(carries(args, photo.read_bytes()) for args in sent_arguments), "the photo's bytes went with a task"
    assert float(re.search(r"^6 run\(s\) ended in ([\d.]+) s", out, re.M).group(1)) < 1000, out


def test_a_workers_comfyui_dies_with_it_and_no_python_runs_between_fork_and_exec(monkeypatch, tmp_path, stand_in):
    from facediffuser_client.own_comfyui import OwnComfyUI

    options, real_popen = [], subprocess.Popen

    def popen(*args, **kwargs):
        options.append(kwargs)
        return real_popen(*args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", popen)
    own = OwnComfyUI(stand_in, [], report=lambda text: None, die_with_parent=True, log=tmp_path / "comfyui.log")
    own.wait_until_ready(30)
    own.stop()
    monkeypatch.undo()
    assert options and all("preexec_fn" not in kwargs for kwargs in options)
    parent = subprocess.Popen([sys.executable, "-c", f"""
import sys, time
sys.path[:0] = {[str(pack_scripts.SCRIPTS_DIR)]!r}
from pathlib import Path
from facediffuser_client.own_comfyui import OwnComfyUI
own = OwnComfyUI(Path({str(stand_in)!r}), [], report=lambda text: None, die_with_parent=True, log=Path({str(tmp_path / 'child.log')!r}))
own.wait_until_ready(30)
print(own.process.pid, flush=True)
time.sleep(600)
"""], stdout=subprocess.PIPE, text=True)
    try:
        comfyui = int(parent.stdout.readline())
        assert alive(comfyui)
        parent.kill()  # SIGKILL: no chance to stop its ComfyUI
        wait_for(lambda: not alive(comfyui), timeout=30, what="the ComfyUI to die with its parent")
    finally:
        parent.kill()
        parent.wait()


def alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
