"""A hundred thousand jobs on a simulated fleet of 256 GPU workers (dev.devkit.simulated_fleet), through the
batch client's own scheduler, manifest and worker pool, in simulated time: run times from a distribution, 5 % of
runs failing, 2 % of the workers dying in the middle of a run, a few runs hanging their ComfyUI, a few workers
falling silent, a few results lost, replacements that fail to start. Every job ends exactly once, each run was
sent as often as the manifest says and never more than --max-attempts, the fleet is kept busy; the driver's own
time per run is printed (its figures in the README come from dev/benchmark_fleet.py, on disk).

The run directory (a hundred thousand folders of pictures, half a gigabyte) goes to memory (/dev/shm) where there
is room: on a disk that other work shares, writing and removing them took minutes, and that is not what is tested."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from facediffuser_client.manifest import DONE, FAILED
from dev.devkit.simulated_fleet import simulate, write_jobs_file

JOBS = 100_000
WORKERS = 256
MAX_ATTEMPTS = 3


def scratch_folder(tmp_path: Path) -> Path:
    memory = Path("/dev/shm")
    if memory.is_dir() and os.access(memory, os.W_OK) and shutil.disk_usage(memory).free > 2 * 1024 ** 3:
        return Path(tempfile.mkdtemp(prefix="facediffuser-fleet-", dir=memory))
    return tmp_path / "fleet"


@pytest.mark.slow  # 43.7 s here
def test_a_hundred_thousand_jobs_on_a_failing_fleet_each_end_once_within_their_attempts(tmp_path):
    folder = scratch_folder(tmp_path)
    try:
        said: list[str] = []
        simulation = simulate(write_jobs_file(folder, JOBS), folder / "run", WORKERS, max_attempts=MAX_ATTEMPTS, say=said.append)
        manifest, fleet, pool = simulation.scheduler.manifest, simulation.fleet, simulation.pool
        counts = manifest.counts()
        assert counts[DONE] + counts[FAILED] == JOBS, counts
        for job_id, key in manifest.keys_in(DONE) + manifest.keys_in(FAILED):
            run = manifest.read_run(job_id, key)
            assert run["attempts"] == fleet.sent[(job_id, key)] <= MAX_ATTEMPTS, (job_id, run, fleet.sent[(job_id, key)])
            assert run["state"] == DONE or "attempts failed" in run["error"] or "(simulated)" in run["error"], run
        # Each run done once: one folder each, and a run done twice would have been refused by the manifest.
        with os.scandir(folder / "run" / "outputs") as entries:
            assert sum(1 for entry in entries) == counts[DONE]
        assert sum(line.startswith("done    ") for line in said) == counts[DONE]
        # The faults happened, and the workers they hit were replaced or given up.
        replaced = sum(worker.replaced for worker in pool.workers)
        assert replaced >= round(WORKERS * fleet.faults.dying_workers) + fleet.faults.hung_runs + fleet.faults.silent_workers
        assert any("could not start" in line for line in said) and any("gave no sign" in line for line in said)
        assert any("its result was lost" in line for line in said)
        assert pool.utilisation() > 0.95, pool.summary_lines()
        print(f"\n{JOBS} jobs on {WORKERS} simulated workers: {simulation.simulated_seconds / 3600:.1f} h simulated, "
              f"{counts[DONE]} done, {counts[FAILED]} failed, {replaced} worker replacement(s), utilisation "
              f"{pool.utilisation():.1%}; driver CPU {simulation.start_seconds:.1f} s to read the jobs and make the manifest, "
              f"{simulation.batch_seconds / JOBS * 1000:.2f} ms per run")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow  # 2.7 s here
def test_the_fleet_benchmark_reports_the_drivers_cost_the_resume_and_the_memory():
    import re
    import subprocess

    from dev import child_process

    done = subprocess.run(child_process.module_command("dev.benchmark_fleet", "--jobs", "2000", "--workers", "16"),
                          cwd=child_process.REPO_ROOT, env=child_process.environment(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    batch, resume, again = done.stdout.strip().splitlines()
    assert re.fullmatch(r"batch of 2000 jobs on 16 simulated workers \([\d.]+ h simulated\): driver [\d.]+ ms CPU per run; reading "
                        r"the jobs and making the manifest [\d.]+ s CPU; workers busy [\d.]+%; peak memory \d+ MB; \d+ s in all", batch)
    assert re.fullmatch(r"resume after a stop at 1000 runs ended: [\d.]+ s from reading the jobs file to the first run sent again "
                        r"\(\d+ runs left\); peak memory \d+ MB", resume)
    assert re.fullmatch(r"the finished batch run again \(nothing to do\): [\d.]+ s, start to exit, manifest.json written", again)
