#!/usr/bin/env python3
"""The batch client's own cost at the scale of a fleet, on a simulated fleet of GPU workers
(dev.devkit.simulated_fleet: the client's real scheduler, manifest and worker pool, simulated time):

    PYTHONPATH=scripts python -m dev.benchmark_fleet --jobs 100000 --workers 256

Each measurement runs in a process of its own, so that its memory is its own:
- the batch: the driver's CPU time per run (from the first run sent to the last result: the scheduler, the
  manifest's transactions and the pictures written), the time to read the jobs file and make the manifest, the
  workers' utilisation and the simulated hours, and the process's peak memory;
- resuming a batch stopped halfway (a manifest with every run in it): the seconds from reading the jobs file to
  the first run sent again, and the peak memory;
- running the finished batch again through the command line (nothing to do: nothing started), start to exit,
  manifest.json written.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dev import child_process
from dev.devkit.simulated_fleet import SimulatedClock, SimulatedFleet, simulate, write_jobs_file

BATCH = child_process.CLIENT_FOLDER / "facediffuser_batch.py"


def peak_megabytes() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports kilobytes


def measure_batch(folder: Path, workers: int, stop_after: int | None) -> dict:
    began = time.perf_counter()
    simulation = simulate(folder / "jobs.jsonl", folder / ("half" if stop_after else "run"), workers, stop_after=stop_after)
    wall = time.perf_counter() - began
    ended = simulation.scheduler.runs_ended_here
    return {"runs ended": ended, "driver ms per run": simulation.batch_seconds / max(ended, 1) * 1000,
            "reading the jobs and making the manifest s": simulation.start_seconds, "wall s": wall,
            "simulated h": simulation.simulated_seconds / 3600, "utilisation": simulation.pool.utilisation(),
            "peak MB": peak_megabytes()}


def measure_resume(folder: Path, workers: int) -> dict:
    """From the jobs file to the first run sent again, on the manifest a stopped batch left."""
    from facediffuser_client.executor import ExecutorSettings
    from facediffuser_client.jobs import load_jobs
    from facediffuser_client.manifest import Manifest
    from facediffuser_client.scheduler import Scheduler
    from facediffuser_client.worker_pool import WorkerPool

    began = time.perf_counter()
    jobs_file = folder / "jobs.jsonl"
    jobs = load_jobs(jobs_file)
    manifest = Manifest(folder / "half", jobs_file, say=lambda text: None)
    manifest.add_jobs(jobs, retry_failed=False, say=lambda text: None)
    clock = SimulatedClock()
    scheduler = Scheduler(jobs, manifest, folder / "half", say=lambda text: None, clock=clock)
    pool = WorkerPool(scheduler, ExecutorSettings(), SimulatedFleet(workers, clock), clock)
    scheduler.start(pool)
    assert scheduler.dispatch() and scheduler.first_sent_at is not None
    return {"resume s": time.perf_counter() - began, "runs left": sum(manifest.counts()[state] for state in ("pending", "running")),
            "peak MB": peak_megabytes()}


def child(*arguments: str) -> dict:
    done = subprocess.run(child_process.module_command("dev.benchmark_fleet", *arguments), capture_output=True, text=True,
                          cwd=child_process.REPO_ROOT, env=child_process.environment())
    if done.returncode != 0:
        sys.exit(f"the measurement {' '.join(arguments)} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The batch client's cost per run and to resume, on a simulated fleet.")
    parser.add_argument("--jobs", type=int, default=100_000, help="jobs in the jobs file, one run each (default 100000)")
    parser.add_argument("--workers", type=int, default=256, help="simulated GPU workers (default 256)")
    parser.add_argument("--measure", choices=("batch", "half", "resume"), help=argparse.SUPPRESS)  # one measurement, in a child
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        measured = (measure_resume(args.folder, args.workers) if args.measure == "resume"
                    else measure_batch(args.folder, args.workers, args.jobs // 2 if args.measure == "half" else None))
        print(json.dumps(measured))
        return 0
    with tempfile.TemporaryDirectory(prefix="facediffuser-benchmark-fleet-") as scratch:
        folder = Path(scratch)
        write_jobs_file(folder, args.jobs)
        common = ["--jobs", str(args.jobs), "--workers", str(args.workers), "--folder", str(folder)]
        batch = child("--measure", "batch", *common)
        print(f"batch of {args.jobs} jobs on {args.workers} simulated workers ({batch['simulated h']:.1f} h simulated): "
              f"driver {batch['driver ms per run']:.3f} ms CPU per run; reading the jobs and making the manifest "
              f"{batch['reading the jobs and making the manifest s']:.1f} s CPU; workers busy {batch['utilisation']:.1%}; "
              f"peak memory {batch['peak MB']:.0f} MB; {batch['wall s']:.0f} s in all")
        half = child("--measure", "half", *common)
        resume = child("--measure", "resume", *common)
        print(f"resume after a stop at {half['runs ended']} runs ended: {resume['resume s']:.2f} s from reading the jobs file to the "
              f"first run sent again ({resume['runs left']} runs left); peak memory {resume['peak MB']:.0f} MB")
        began = time.perf_counter()
        again = subprocess.run([sys.executable, str(BATCH), str(folder / "jobs.jsonl"), "--run-dir", str(folder / "run"),
                                "--server", "http://127.0.0.1:9"], capture_output=True, text=True)
        if "nothing to run" not in again.stdout:
            sys.exit(f"the finished batch run again did not find it finished:\n{again.stdout[-2000:]}{again.stderr[-2000:]}")
        print(f"the finished batch run again (nothing to do): {time.perf_counter() - began:.2f} s, start to exit, manifest.json written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
