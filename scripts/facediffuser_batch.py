#!/usr/bin/env python3
"""Run a jobs file of Face-diffuser workflows across several ComfyUI servers; stop it and run it again to resume.

    python scripts/facediffuser_batch.py jobs.jsonl --server http://gpu1:8188 --server http://gpu2:8188

One job per line of the jobs file (JSON Lines, example: workflows/jobs_example.jsonl): the workflow, the face
photos in marker order, the prompt, the seeds (or a count of them) and any of the runner's overrides. Each
seed of a job is one ComfyUI prompt, a "run". Runs go to the server with the shortest queue (ComfyUI's
/queue), at most --max-in-flight per server; each photo is uploaded once per server. The run directory
holds the manifest, every run's state (pending; running on which server as which prompt id; done with its
files; failed with the error): manifest.sqlite, one transaction per change, and manifest.json, its readable
copy written whenever the batch stops; and the pictures under outputs/<job>/<run>/. Running the same command
again skips what is done, re-attaches to runs still on a server (by prompt id, through /history), and
queues again what a vanished server lost. ComfyUI's validation errors fail that job, node by node; a server
that stops answering, a lost or interrupted run is retried on another server after a back-off; a run is sent
at most --max-attempts times.

With a Face-diffuser Identity Score node in a job's workflow, every picture's per-subject scores go into
the manifest beside its files. Best-of-N ("keep_best" in a job, or --keep-best for all): once every run of
the job is done, its best pictures across its seeds are copied to outputs/<job>/best/ and marked in the
manifest; that decision is made once and kept by later invocations.

With --ray instead of --server it runs on a Ray cluster: one worker per GPU, each starting and owning a ComfyUI on
its node (scripts/facediffuser_client/ray_workers.py), a lost or broken worker replaced
(scripts/facediffuser_client/worker_pool.py); the manifest, outputs and resume are the same.

Like the runner it needs only Python's standard library (and Ray for --ray); both are command lines over
scripts/facediffuser_client/.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from facediffuser_client.executor import Executor, ExecutorSettings
from facediffuser_client.http_api import DEFAULT_SERVER, RunError
from facediffuser_client.jobs import JobsFileError, load_jobs
from facediffuser_client.manifest import DONE, FAILED, PENDING, RUNNING, Manifest
from facediffuser_client.own_comfyui import attach_command_line_values
from facediffuser_client.scheduler import GiveUp, Scheduler, summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Run a jobs file of Face-diffuser workflows across several ComfyUI servers, resumably.")
    parser.add_argument("jobs", type=Path, help="the jobs file: one JSON object per line (see workflows/jobs_example.jsonl)")
    parser.add_argument("--server", action="append", metavar="URL",
                        help=f"a ComfyUI server; repeat for several (default {DEFAULT_SERVER})")
    parser.add_argument("--run-dir", type=Path, help="where the manifest and the pictures go (default: <jobs file>_run beside it)")
    parser.add_argument("--max-in-flight", type=int, default=2, metavar="N", help="runs queued on one server at a time (default 2)")
    parser.add_argument("--max-attempts", type=int, default=3, metavar="N",
                        help="a run that failed this often for reasons that may pass (a vanished server, a lost run) fails (default 3)")
    parser.add_argument("--job-timeout", type=float, default=3600.0, metavar="S",
                        help="seconds a run may take once it has started on a server (not counting its time in the queue) before it "
                             "is cancelled and tried again (default 3600)")
    parser.add_argument("--give-up-after", type=float, default=600.0, metavar="S",
                        help="stop when no server has answered for this long; run again to resume (default 600)")
    parser.add_argument("--retry-failed", action="store_true", help="run the failed runs of an earlier invocation again")
    parser.add_argument("--keep-best", type=int, default=0, metavar="K",
                        help='best-of-N for the jobs that set no "keep_best": once all of a job\'s seeds are done, copy its best K '
                             "pictures (by its Face-diffuser Identity Score node) to outputs/<job>/best/ (default 0: none)")
    parser.add_argument("--poll", type=float, default=0.5, metavar="S", help="seconds between looks at the servers (default 0.5)")
    parser.add_argument("--progress-every", type=float, default=10.0, metavar="S", help="seconds between progress lines (default 10)")
    ray = parser.add_argument_group("a Ray cluster instead of --server (needs Ray: pip install ray==2.60.0)")
    ray.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                     help="run on Ray workers, one per GPU, each owning a ComfyUI it starts on its node; ADDRESS joins a "
                          "running cluster (auto: the one `ray start` made on this machine, or host:port), none starts one "
                          "on this machine for the batch")
    ray.add_argument("--ray-cpus-per-worker", type=float, metavar="N",
                     help="for clusters without GPUs: a worker per N CPUs, its ComfyUI on the CPU (pass --comfyui-args --cpu)")
    ray.add_argument("--ray-workers", type=int, metavar="N",
                     help="at most N workers (default: one per GPU of the cluster, or per --ray-cpus-per-worker CPUs)")
    ray.add_argument("--comfyui", metavar="PATH",
                     help="the ComfyUI folder on every node, with this pack in its custom_nodes (default: $COMFYUI_PATH there)")
    ray.add_argument("--comfyui-args", metavar="ARGS", default="",
                     help='more arguments for the workers\' ComfyUI main.py, e.g. "--lowvram"')
    args = parser.parse_args(attach_command_line_values(sys.argv[1:] if argv is None else argv))
    if args.ray is not None and args.server:
        parser.error("give either --server (ComfyUI servers you run) or --ray (workers that start their own), not both")
    if args.ray is None and (args.ray_cpus_per_worker or args.ray_workers or args.comfyui or args.comfyui_args):
        parser.error("--ray-cpus-per-worker, --ray-workers, --comfyui and --comfyui-args go with --ray")
    args.server = args.server or ([] if args.ray is not None else [DEFAULT_SERVER])
    if args.max_in_flight < 1 or args.max_attempts < 1:
        parser.error("--max-in-flight and --max-attempts must be 1 or more")
    if args.keep_best < 0:
        parser.error("--keep-best must be 0 (no best-of-N) or more")
    return args


def make_executor(args: argparse.Namespace, scheduler: Scheduler) -> Executor:
    """The executor the command line asks for, reporting to `scheduler`."""
    settings = ExecutorSettings(max_in_flight=args.max_in_flight, job_timeout=args.job_timeout, poll=args.poll,
                                give_up_after=args.give_up_after)
    if args.ray is None:
        from facediffuser_client.servers import ServerExecutor

        return ServerExecutor(scheduler, settings, args.server)
    from facediffuser_client.ray_workers import RayBackend, RayOptions  # imports Ray: only with --ray
    from facediffuser_client.worker_pool import WorkerPool

    backend = RayBackend(RayOptions(args.ray, args.ray_cpus_per_worker, args.ray_workers, args.comfyui, args.comfyui_args,
                                    args.max_in_flight))
    try:
        return WorkerPool(scheduler, settings, backend)
    except BaseException:
        backend.close()
        raise


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run_dir = args.run_dir or args.jobs.with_name(f"{args.jobs.stem}_run")
    try:
        jobs = load_jobs(args.jobs, args.keep_best)
        run_dir.mkdir(parents=True, exist_ok=True)
        manifest = Manifest(run_dir, args.jobs)
        manifest.add_jobs(jobs, args.retry_failed)
    except JobsFileError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    scheduler = Scheduler(jobs, manifest, run_dir, max_attempts=args.max_attempts, poll=args.poll,
                          give_up_after=args.give_up_after, progress_every=args.progress_every)
    counts = manifest.counts()
    executor = None
    try:
        if counts[PENDING] or counts[RUNNING]:  # a batch with nothing left to run starts no server and no cluster
            executor = make_executor(args, scheduler)
    except RunError as error:
        print(f"error: {error}", file=sys.stderr)
        manifest.export_json()
        return 1
    except KeyboardInterrupt:
        print("\nstopped while starting the workers; nothing ran", file=sys.stderr)
        manifest.export_json()
        return 130
    print(f"{len(jobs)} job(s), {sum(counts.values())} run(s): {counts[DONE]} done, {counts[FAILED]} failed, "
          f"{counts[RUNNING]} running, {counts[PENDING]} pending; {executor.describe() if executor else 'nothing to run'}; "
          f"run directory: {run_dir}")
    try:
        if executor is None:
            scheduler.decide_all_best()
        else:
            scheduler.run(executor)
    except KeyboardInterrupt:
        print(f"\nstopped. {manifest.database_path} is up to date: run the same command again to resume "
              f"({executor.resume_note}).", file=sys.stderr)
        print(summary(scheduler, executor))
        return 130
    except GiveUp as error:
        print(f"stopped: {error}. Run the same command again to resume.", file=sys.stderr)
        print(summary(scheduler, executor))
        return 3
    finally:
        if executor is not None:
            executor.close()
        manifest.export_json()
    print(summary(scheduler, executor))
    return 1 if manifest.counts()[FAILED] else 0


if __name__ == "__main__":
    sys.exit(main())
