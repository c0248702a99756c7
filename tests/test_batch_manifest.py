"""The batch's manifest (scripts/facediffuser_client/manifest.py): a state change writes a few kilobytes whatever
the size of the batch (0.3.0 rewrote the whole manifest.json, megabytes, at every change), a client killed
between two changes loses neither, and a manifest.json that 0.3.0 wrote is imported, its attempts counted as
the times each run was sent."""

from __future__ import annotations

import json
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

import pack_scripts
from facediffuser_client.jobs import load_jobs
from facediffuser_client.manifest import DONE, FAILED, PENDING, RUNNING, Manifest, read_manifest
from test_batch import TINY_WORKFLOW, finish, write_jobs

FROZEN_0_3_0 = Path(__file__).resolve().parent / "compat" / "batch_0.3.0"
SEEDED_WORKFLOW = {**TINY_WORKFLOW, "3": {"class_type": "RandomNoise", "inputs": {"noise_seed": 0}}}


def many_jobs(folder: Path, count: int) -> Path:
    (folder / "tiny.json").write_text(json.dumps(SEEDED_WORKFLOW))
    return write_jobs(folder / "jobs.jsonl", [{"id": f"job{index:05d}", "workflow": "tiny.json", "seed": index} for index in range(count)])


def bytes_written() -> int:
    """What this process has handed to write() so far (Linux's /proc/self/io)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise AssertionError("no wchar in /proc/self/io")


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="counts the bytes written through Linux's /proc/self/io")
def test_a_state_change_writes_kilobytes_in_a_batch_of_twenty_thousand_runs(tmp_path):
    jobs_file = many_jobs(tmp_path, 20_000)
    jobs = load_jobs(jobs_file)
    (tmp_path / "run").mkdir()
    manifest = Manifest(tmp_path / "run", jobs_file)
    manifest.add_jobs(jobs, retry_failed=False)
    before = bytes_written()
    changes = 40
    for job in jobs[:changes]:
        manifest.move(job.id, job.run_keys()[0], RUNNING, server="http://127.0.0.1:8188", prompt_id=f"prompt-{job.id}")
    per_change = (bytes_written() - before) / changes
    assert per_change < 64 * 1024, f"{per_change / 1e6:.2f} MB written per state change"


def test_a_client_killed_between_changes_loses_none_it_made(tmp_path):
    jobs_file = many_jobs(tmp_path, 300)
    mover = f"""
import sys
sys.path[:0] = {[str(pack_scripts.SCRIPTS_DIR)]!r}
from pathlib import Path
from facediffuser_client.jobs import load_jobs
from facediffuser_client.manifest import Manifest, RUNNING, DONE
jobs = load_jobs(Path({str(jobs_file)!r}))
manifest = Manifest(Path({str(tmp_path / 'run')!r}), Path({str(jobs_file)!r}))
manifest.add_jobs(jobs, retry_failed=False)
for job in jobs:
    key = job.run_keys()[0]
    manifest.move(job.id, key, RUNNING, server="w", prompt_id=None)
    manifest.move(job.id, key, DONE, files=[], finished="now", done_on="w")
    print(job.id, flush=True)
"""
    (tmp_path / "run").mkdir()
    process = subprocess.Popen([sys.executable, "-c", mover], stdout=subprocess.PIPE, text=True)
    done = [process.stdout.readline().strip() for _ in range(50)]
    process.send_signal(signal.SIGKILL)
    finish(process, timeout=60)
    with sqlite3.connect(tmp_path / "run" / "manifest.sqlite") as database:
        assert database.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    runs = read_manifest(tmp_path / "run")["jobs"]
    for job_id in done:
        assert runs[job_id]["runs"][f"seed-{int(job_id[3:])}"]["state"] == DONE
    reopened = Manifest(tmp_path / "run", jobs_file)
    assert reopened.counts()[DONE] >= len(done) and sum(reopened.counts().values()) == 300


def test_a_manifest_written_by_0_3_0_is_imported_with_its_attempts_counted_as_sends(tmp_path):
    folder = shutil.copytree(FROZEN_0_3_0, tmp_path / "batch")
    run_dir = folder / "jobs_run"
    frozen = json.loads((run_dir / "manifest.json").read_text())
    said = []
    manifest = Manifest(run_dir, folder / "jobs.jsonl", say=said.append)
    assert said == [f"note    {run_dir / 'manifest.json'} (format 1) imported into {run_dir / 'manifest.sqlite'}, the manifest from now on"]
    sent = {("done-first-time", "seed-1"): 1, ("done-first-time", "seed-2"): 1, ("done-after-a-retry", "seed-7"): 2,
            ("failed-in-a-node", "seed-8"): 1, ("failed-after-3", "seed-9"): 3, ("pending-abandoned", "seed-10"): 1,
            ("running", "seed-11"): 1, ("bad-line", "seed-workflow"): 0}
    for (job_id, key), attempts in sent.items():
        record = manifest.run(job_id, key)
        assert record == {**frozen["jobs"][job_id]["runs"][key], "attempts": attempts}
    assert manifest.counts() == {PENDING: 1, RUNNING: 1, DONE: 3, FAILED: 3}
    assert manifest.keys_with("abandoned") == [("pending-abandoned", "seed-10")]
    assert (run_dir / "manifest.json").read_text() == (FROZEN_0_3_0 / "jobs_run" / "manifest.json").read_text()  # kept as it was
    manifest.export_json()
    exported = json.loads((run_dir / "manifest.json").read_text())
    assert exported["format"] == 2 and exported["jobs_file"] == frozen["jobs_file"] and exported["created"] == frozen["created"]
    assert exported["jobs"] == read_manifest(run_dir)["jobs"]
    assert [job_id for job_id in exported["jobs"]] == list(frozen["jobs"])  # the jobs file's order


def test_a_resumed_0_3_0_batch_goes_on_from_where_it_stopped(tmp_path):
    """Through the command line, against a server that does not answer: the 0.3.0 manifest is imported, the run it
    left running on a server not given now is queued again, the run done stays done."""
    from comfy_server import free_port

    folder = shutil.copytree(FROZEN_0_3_0, tmp_path / "batch")
    closed = f"http://127.0.0.1:{free_port()}"
    command = [sys.executable, str(pack_scripts.SCRIPTS_DIR / "facediffuser_batch.py"), str(folder / "jobs.jsonl"),
               "--server", closed, "--give-up-after", "0", "--poll", "0.05"]
    code, out, err = finish(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), timeout=120)
    assert code == 3, out + err
    assert "(format 1) imported into" in out and "requeue running seed-11: its server http://127.0.0.1:8188 is not among --server" in out
    runs = read_manifest(folder / "jobs_run")["jobs"]
    assert runs["running"]["runs"]["seed-11"]["state"] == PENDING and runs["done-after-a-retry"]["runs"]["seed-7"]["state"] == DONE
    assert json.loads((folder / "jobs_run" / "manifest.json").read_text())["jobs"] == runs
