#!/usr/bin/env python3
"""Throughput of the batch client through Ray (--ray) against ComfyUI servers (--server) on this machine: the same
jobs file, the same number of ComfyUIs from the same folder (here started for --server, by the Ray workers for
--ray), runs per second of each, their ratio, and whether both made the same pictures.

    PYTHONPATH=scripts python -m dev.benchmark_batch jobs.jsonl --workers 2 --comfyui-args "--lowvram"

Each side counts from its first dispatch to its last run's end, so that starting the ComfyUIs and Ray, and shutting
them down, is left out. With --repeat N each side runs N times, interleaved, every ComfyUI started afresh each
time, and the figures are the medians. The ratio, and the seconds Ray adds to each run on a worker, are the engine's overhead, which should stay
small next to a real run's seconds. On a machine without GPUs pass --ray-cpus-per-worker (and --cpu in
--comfyui-args). Needs Ray, and Pillow to compare the pictures' pixels (their PNG metadata names the uploaded
photos, which differ).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from dev import child_process
from facediffuser_client.http_api import RunError
from facediffuser_client.own_comfyui import OwnComfyUI, attach_command_line_values, private_folders

BATCH = child_process.CLIENT_FOLDER / "facediffuser_batch.py"
ENDED = re.compile(r"^(\d+) run\(s\) ended in ([\d.]+) s", re.M)


def run_batch(jobs: Path, run_dir: Path, options: list[str]) -> float:
    """Runs per second of one batch over `jobs` into `run_dir`."""
    ran = subprocess.run([sys.executable, str(BATCH), str(jobs), "--run-dir", str(run_dir), "--poll", "0.05", *options],
                         capture_output=True, text=True)
    ended = ENDED.search(ran.stdout)
    if ran.returncode not in (0, 1) or ended is None:
        raise RunError(f"the batch with {shlex.join(options)} failed (status {ran.returncode}):\n{ran.stdout[-3000:]}{ran.stderr[-3000:]}")
    return int(ended.group(1)) / max(float(ended.group(2)), 1e-9)


def pictures_by_run(run_dir: Path) -> dict[str, list[bytes]]:
    """Each done run's pictures, by job and run, as their pixels."""
    from PIL import Image

    manifest = json.loads((run_dir / "manifest.json").read_text())
    return {f"{job_id}/{key}": [Image.open(run_dir / file).tobytes() for file in sorted(run["files"])]
            for job_id, job in manifest["jobs"].items() for key, run in job["runs"].items() if run["state"] == "done"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Runs per second of a jobs file through --ray against --server, on this machine.")
    parser.add_argument("jobs", type=Path, help="the jobs file (see workflows/jobs_example.jsonl)")
    parser.add_argument("--workers", type=int, default=1, help="ComfyUIs on each side (default 1)")
    parser.add_argument("--comfyui", type=Path, default=os.environ.get("COMFYUI_PATH"),
                        help="the ComfyUI folder, with this pack in its custom_nodes (default $COMFYUI_PATH)")
    parser.add_argument("--comfyui-args", default="", metavar="ARGS", help="more arguments for each ComfyUI's main.py")
    parser.add_argument("--ray-cpus-per-worker", type=float, metavar="N", help="CPUs per Ray worker, on a machine without GPUs")
    parser.add_argument("--max-in-flight", default="2", metavar="N", help="runs queued per ComfyUI on both sides (default 2, the batch's)")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="batches on each side, interleaved; the figures are their medians (default 1)")
    args = parser.parse_args(attach_command_line_values(sys.argv[1:] if argv is None else argv))
    if args.comfyui is None or not (args.comfyui / "main.py").is_file():
        parser.error("--comfyui (or COMFYUI_PATH) must name a ComfyUI folder")
    extra = shlex.split(args.comfyui_args)
    if args.ray_cpus_per_worker:
        # Ray gives each worker as many threads as CPUs; the servers get the same, for the same sums in the same order.
        os.environ.setdefault("OMP_NUM_THREADS", f"{max(int(args.ray_cpus_per_worker), 1)}")
    common = ["--max-in-flight", args.max_in_flight]
    ray = ["--ray", "--ray-workers", str(args.workers), "--comfyui", str(args.comfyui), "--comfyui-args", args.comfyui_args,
           *(["--ray-cpus-per-worker", f"{args.ray_cpus_per_worker:g}"] if args.ray_cpus_per_worker else [])]
    rates: dict[str, list[float]] = {"server": [], "ray": []}
    same = True
    with tempfile.TemporaryDirectory(prefix="facediffuser-benchmark-batch-") as scratch:
        scratch = Path(scratch)
        for repeat in range(args.repeat):
            # Interleaved, each side first in turn, and every ComfyUI started afresh (models loaded by the first run on
            # both sides, no prompt answered from an earlier repeat's cache): the machine's drift falls on both.
            for side in ("server", "ray") if repeat % 2 == 0 else ("ray", "server"):
                run_dir = scratch / f"{side}{repeat}"
                if side == "ray":
                    rates["ray"].append(run_batch(args.jobs, run_dir, [*common, *ray]))
                    continue
                servers = [OwnComfyUI(args.comfyui, [*extra, *private_folders(scratch / f"server{repeat}-{i}")], report=lambda text: None,
                                      log=scratch / f"server{repeat}-{i}.log") for i in range(args.workers)]
                try:
                    for server in servers:
                        server.wait_until_ready()
                    rates["server"].append(run_batch(args.jobs, run_dir, [*common, *(a for s in servers for a in ("--server", s.url))]))
                finally:
                    for server in servers:
                        server.stop()
            same &= pictures_by_run(scratch / f"server{repeat}") == pictures_by_run(scratch / f"ray{repeat}")
    via_servers, via_ray = statistics.median(rates["server"]), statistics.median(rates["ray"])
    print(f"--server: {via_servers:.3f} runs/s with {args.workers} server(s)")
    print(f"--ray:    {via_ray:.3f} runs/s with {args.workers} worker(s)")
    print(f"ratio --ray / --server: {via_ray / via_servers:.3f}")
    # Per worker, each run takes workers / rate seconds; the difference is what Ray adds to every run.
    print(f"Ray's time per run on a worker: {args.workers / via_ray - args.workers / via_servers:+.3f} s")
    print(f"same pictures: {'yes' if same else 'NO'}")
    if args.repeat > 1:
        print(f"medians of {args.repeat} interleaved repeats; runs/s --server {', '.join(f'{r:.3f}' for r in rates['server'])}; "
              f"--ray {', '.join(f'{r:.3f}' for r in rates['ray'])}; ratio per repeat "
              f"{', '.join(f'{r / v:.3f}' for r, v in zip(rates['ray'], rates['server']))}")
    return 0 if same else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RunError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
