"""The batch's executor on a Ray cluster (--ray): one worker actor per GPU (or per --ray-cpus-per-worker CPUs),
each starting a ComfyUI of its own on its node with the runner's self-start code and running one run after
another on it, its models loaded once. Pictures and history come back to the driver, whose scheduler alone
writes the manifest and the output folders. A worker whose ComfyUI stops answering exits; Ray restarts the
actor (a fresh ComfyUI) and retries its runs, which replaces the servers' hand-made retries for lost workers."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import socket
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .api_workflow import fill_run
from .http_api import ComfyClient, RunError, ServerUnreachable, WorkflowRejected, output_images
from .manifest import DONE, PENDING, RUNNING
from .scheduler import interrupts_held

RAY_VERSION = "2.60.0"  # the version the tests run; requirements-test.txt pins the same
WORKER_NAME = "facediffuser-worker"
HEAD_ANSWER_S = 5.0  # a head that does not take a TCP connection in this long is reported at once, not retried by Ray for minutes
WORKER_POLL_S = 0.05  # a worker asks its own ComfyUI, on its node, whether its run is done: cheap, and short runs stay short
# The workers' own output stays on their nodes (their errors come back with their runs); the nodes import this
# package from the copy Ray ships them, so that only ComfyUI with the pack has to be installed there.
QUIET_WITH_THIS_PACKAGE = {"log_to_driver": False, "logging_level": logging.WARNING,
                           "runtime_env": {"py_modules": [str(Path(__file__).parent)]}}


def import_ray():
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray's multi-node mode is for Linux only
    try:
        import ray
    except ImportError:
        raise RunError(f"--ray needs Ray on this machine and on every node of the cluster: pip install ray=={RAY_VERSION}") from None
    return ray


def check_head_answers(address: str) -> None:
    """Ray keeps retrying a head address where nothing answers for minutes before it gives up; a `host:port` (or
    `ray://host:port`) that takes no TCP connection is an error at once. `auto` and other forms are Ray's to read."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=HEAD_ANSWER_S).close()
    except OSError as error:
        raise RunError(f"--ray {address}: no Ray head answers there ({error.strerror or error}): start one with "
                       f"`ray start --head --port={port}` on {host.strip('[]')}, or give the address `ray start` printed") from None


class ComfyWorker:
    """A Ray actor owning one ComfyUI on its node, in a scratch folder of its own for inputs and outputs (two
    workers on one node never see each other's files)."""

    def __init__(self, comfyui: str | None, comfyui_args: list[str]):
        from .own_comfyui import OwnComfyUI, private_folders

        root = Path(comfyui or os.environ.get("COMFYUI_PATH", ""))
        if not (root / "main.py").is_file():
            raise RunError(f"--ray: no ComfyUI at {str(root) or '(unset)'} on node {os.uname().nodename}: pass --comfyui <folder> "
                           f"or set COMFYUI_PATH on every node, with this pack in its custom_nodes")
        self.scratch = Path(tempfile.mkdtemp(prefix="facediffuser-ray-worker-"))
        self.comfyui = OwnComfyUI(root, [*comfyui_args, *private_folders(self.scratch)], report=lambda text: None, die_with_parent=True)
        self.comfyui.wait_until_ready()
        self.client = ComfyClient(self.comfyui.url)
        self.client_id = uuid.uuid4().hex
        self.uploads: dict[str, str] = {}

    def comfyui_pid(self) -> int:
        return self.comfyui.process.pid

    def run(self, workflow: dict, loaders: list[str], faces: list[tuple[str, str, bytes]], seed: int | None,
            timeout_s: float) -> dict:
        """One run, start to end: {"entry": its history, "pictures": the bytes of output_images(entry), in order};
        {"rejected": why} when ComfyUI refuses the workflow; {"error": why} for a failure another try may not have."""
        prompt_id = None
        try:
            names = [self.upload(digest, name, content) for digest, name, content in faces]
            prompt_id = self.client.submit(fill_run(workflow, loaders, names, seed, self.client, report=lambda text: None),
                                           self.client_id)
            entry = self.client.wait(prompt_id, timeout_s, poll_s=WORKER_POLL_S, report=lambda state: None)
            pictures = [self.client.download(image) for _, image in output_images(entry)] \
                if entry.get("status", {}).get("status_str") == "success" else []
        except WorkflowRejected as error:
            return {"rejected": str(error)}
        except ServerUnreachable:
            # Its ComfyUI died: this actor exits, Ray starts it again with a fresh ComfyUI and retries this run there.
            self.comfyui.stop()
            os._exit(1)
        except RunError as error:  # --job-timeout, or ComfyUI refusing something else: its prompt must not run on
            if prompt_id is not None:
                with contextlib.suppress(RunError):
                    self.client.cancel(prompt_id)
            return {"error": str(error)}
        return {"entry": entry, "pictures": pictures, "prompt_id": prompt_id}

    def upload(self, digest: str, name: str, content: bytes) -> str:
        if digest not in self.uploads:
            path = self.scratch / "faces" / f"{digest[:16]}{Path(name).suffix}"
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(content)
            self.uploads[digest] = self.client.upload_image(path)
        return self.uploads[digest]


def image_key(image: dict) -> tuple:
    return image.get("type", "output"), image.get("subfolder", ""), image["filename"]


@dataclass
class Worker:
    name: str
    actor: object
    in_flight: dict = field(default_factory=dict)  # Ray object ref -> (job id, run key)
    runs_done: int = 0
    lost: int = 0


class RayExecutor:
    resume_note = "runs that were in flight on Ray are run again"

    def __init__(self, scheduler, args: argparse.Namespace):
        self.scheduler = scheduler
        self.ray = ray = import_ray()
        if args.ray == "local":
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, _node_ip_address="127.0.0.1", **QUIET_WITH_THIS_PACKAGE)
        else:
            check_head_answers(args.ray)
            ray.init(address=args.ray, **QUIET_WITH_THIS_PACKAGE)
        try:
            self.workers = self.start_workers(args)
        except BaseException:
            ray.shutdown()
            raise
        self.faces: dict[str, tuple[str, str, bytes]] = {}

    def start_workers(self, args: argparse.Namespace) -> list[Worker]:
        ray = self.ray
        resources = ray.cluster_resources()
        if args.ray_cpus_per_worker:
            count, per_worker = int(resources.get("CPU", 0) // args.ray_cpus_per_worker), {"num_cpus": args.ray_cpus_per_worker}
        else:
            count, per_worker = int(resources.get("GPU", 0)), {"num_gpus": 1, "num_cpus": 1}
        count = min(count, args.ray_workers or count)
        if count < 1:
            raise RunError(f"--ray: the cluster ({', '.join(f'{k} {v:g}' for k, v in sorted(resources.items()) if k in ('CPU', 'GPU'))}) "
                           f"has room for no worker: it needs a GPU per worker, or --ray-cpus-per-worker N on CPU-only clusters")
        self.nodes = sorted({node["NodeManagerAddress"] for node in ray.nodes() if node["Alive"]})
        actor_class = ray.remote(max_restarts=-1, max_task_retries=args.max_attempts, **per_worker)(ComfyWorker)
        self.scheduler.say(f"ray     starting {count} worker(s) on {len(self.nodes)} node(s) ({', '.join(self.nodes)}), "
                           f"each with a ComfyUI of its own")
        workers = [Worker(f"ray:{WORKER_NAME}-{index}", actor_class.options(name=f"{WORKER_NAME}-{index}-{uuid.uuid4().hex[:8]}")
                          .remote(args.comfyui, shlex.split(args.comfyui_args))) for index in range(count)]
        # Each constructor starts a ComfyUI: the first error (no ComfyUI there, a crash at start) stops the batch.
        try:
            ray.get([worker.actor.comfyui_pid.remote() for worker in workers])
        except ray.exceptions.RayActorError as error:
            raise RunError(f"--ray: a worker could not start its ComfyUI: {error}") from None
        return workers

    def describe(self) -> str:
        return f"Ray workers: {len(self.workers)} on node(s) {', '.join(self.nodes)}"

    def close(self) -> None:
        self.ray.shutdown()  # the workers, and with them their ComfyUIs, end with the driver

    def adopt_running(self) -> None:
        for job_id, key, _ in list(self.scheduler.runs(RUNNING)):
            self.scheduler.requeue(job_id, key, "it was in flight when the client stopped (or on a server not among this "
                                                "invocation's): run again")

    def face(self, path: Path, digest: str) -> tuple[str, str, bytes]:
        if digest not in self.faces:
            self.faces[digest] = (digest, path.name, path.read_bytes())
        return self.faces[digest]

    def dispatch(self) -> bool:
        submitted = False
        for job_id, key in list(self.scheduler.ready_runs()):
            free = [w for w in self.workers if len(w.in_flight) < self.scheduler.args.max_in_flight]
            if not free:
                break
            worker = min(free, key=lambda w: len(w.in_flight))
            job = self.scheduler.jobs[job_id]
            run = self.scheduler.manifest.run(job_id, key)
            faces = [self.face(path, digest) for path, digest in zip(job.faces, job.face_hashes)]
            with interrupts_held():
                reference = worker.actor.run.remote(job.workflow, job.loaders, faces, run["seed"], self.scheduler.args.job_timeout)
                worker.in_flight[reference] = (job_id, key)
                self.scheduler.started(job_id, key, worker.name, None)
            submitted = True
        return submitted

    def poll(self) -> bool:
        references = [reference for worker in self.workers for reference in worker.in_flight]
        if not references:
            return False
        ready, _ = self.ray.wait(references, num_returns=len(references), timeout=0)
        for reference in ready:
            worker = next(w for w in self.workers if reference in w.in_flight)
            job_id, key = worker.in_flight.pop(reference)
            try:
                result = self.ray.get(reference)
            except (self.ray.exceptions.RayActorError, self.ray.exceptions.RayTaskError) as error:
                worker.lost += 1
                self.scheduler.retry(job_id, key, worker.name, f"Ray lost the run ({type(error).__name__}: {str(error).splitlines()[0]})")
                continue
            if "rejected" in result:
                self.scheduler.fail(job_id, key, result["rejected"])
            elif "error" in result:
                self.scheduler.retry(job_id, key, worker.name, result["error"])
            else:
                pictures = dict(zip((image_key(image) for _, image in output_images(result["entry"])), result["pictures"]))
                state = self.scheduler.finish(job_id, key, worker.name, result["entry"], lambda image: pictures[image_key(image)],
                                              prompt_id=result["prompt_id"])
                worker.runs_done += state == DONE
                worker.lost += state == PENDING
        return bool(ready)

    def unreachable_for(self) -> float:
        return 0.0  # Ray restarts lost workers; a cluster without room for them waits for nodes to come

    def in_flight(self) -> str:
        return ", ".join(f"{w.name.removeprefix('ray:')} {len(w.in_flight)}" for w in self.workers)

    def summary_lines(self) -> list[str]:
        return [f"{w.name}: {w.runs_done} run(s) done here, {w.lost} retried" for w in self.workers]
