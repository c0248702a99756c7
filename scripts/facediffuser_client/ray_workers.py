"""The batch's workers on a Ray cluster (--ray): one actor per GPU (or per --ray-cpus-per-worker CPUs), each starting
a ComfyUI of its own on its node and running the runs it is given there, its models loaded once. The worker pool
(worker_pool.WorkerPool) decides what to do when a worker is lost; here Ray only carries runs and results, and
never retries or restarts anything itself (max_task_retries=0, max_restarts=0): a run is sent once per attempt
the manifest counts. The only module of the client that imports Ray."""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import socket
import sys
import tempfile
import threading
import time
import urllib.error
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from .api_workflow import fill_run
from .executor import RunOrder
from .http_api import ComfyClient, RunError, RunTimedOut, ServerUnreachable, WorkflowRejected, output_images
from .worker_pool import ResultLost, WorkerLost

RAY_VERSION = "2.60.0"  # the version the tests run; requirements-test.txt pins the same
WORKER_NAME = "facediffuser-worker"
SCRATCH_PREFIX = "facediffuser-ray-worker-"
HEAD_ANSWER_S = 5.0  # a head that does not answer in this long is reported at once, not retried by Ray for minutes
WORKER_POLL_S = 0.05  # a worker asks its own ComfyUI, on its node, whether its run is done: cheap, and short runs stay short
STOP_WAIT_S = 30.0  # a worker asked to stop its ComfyUI and clear its folder gets this long before it is killed
# The workers' own output stays on their nodes (their errors come back with their runs); the nodes import this
# package from the copy Ray ships them, so that only ComfyUI with the pack has to be installed there.
QUIET_WITH_THIS_PACKAGE = {"log_to_driver": False, "logging_level": logging.WARNING,
                           "runtime_env": {"py_modules": [str(Path(__file__).parent)]}}
# An HTTP/2 client preface and an empty SETTINGS frame: a Ray head (its GCS speaks gRPC) answers with a SETTINGS
# frame of its own, something else on the port does not.
HTTP2_HELLO = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
HTTP2_SETTINGS = 4


def import_ray(local: bool):
    if local:  # the batch's own cluster listens on 127.0.0.1 only (Ray reads this when it is imported)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
    except ImportError:
        raise RunError(f"--ray needs Ray on this machine and on every node of the cluster: pip install ray=={RAY_VERSION}") from None
    return ray


def check_head_answers(address: str, what: str) -> None:
    """Ray keeps retrying a head address for minutes where nothing answers, or something that is no Ray head does;
    a `host:port` (or `ray://host:port`) that does not answer as a Ray head does is an error at once. `what` says
    where the address came from."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return
    host = host.strip("[]")
    try:
        with socket.create_connection((host, int(port)), timeout=HEAD_ANSWER_S) as connection:
            try:
                connection.sendall(HTTP2_HELLO)
                answer = connection.recv(9)
            except OSError:
                answer = b""
    except OSError as error:
        raise RunError(f"{what}: no Ray head answers there ({error.strerror or error}): start one with "
                       f"`ray start --head --port={port}` on {host}, or give the address `ray start` printed") from None
    if len(answer) < 9 or answer[3] != HTTP2_SETTINGS:
        raise RunError(f"{what}: something takes connections there but it is not a Ray head (no gRPC answer): give the "
                       f"address `ray start --head` printed (its --port, 6379 by default)")


@contextlib.contextmanager
def stderr_silenced():
    """File descriptor 2 to /dev/null for the block: what Ray's C++ core writes there too."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as nothing:
            os.dup2(nothing.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def known_address() -> str | None:
    """The cluster address `--ray auto` would use, as Ray finds it: RAY_ADDRESS, else the one `ray start` recorded on
    this machine, else a Ray head running here; None when there is none."""
    try:
        from ray._private.services import canonicalize_bootstrap_address
    except ImportError:  # Ray's private helper moved: ray.init finds it, or says it did not
        return "auto"
    try:
        return canonicalize_bootstrap_address("auto")
    except (ConnectionError, ValueError):
        return None


def connect(ray, address: str) -> None:
    """ray.init for --ray [ADDRESS]: no address starts a cluster of the batch's own on this machine, whatever
    RAY_ADDRESS or a cluster `ray start` made here says; `auto` joins that one; host:port the head there. Every
    failure to connect is one line naming the fix."""
    if address == "local":
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, _node_ip_address="127.0.0.1",
                 **QUIET_WITH_THIS_PACKAGE)
        return
    if address == "auto":
        found = known_address()
        if found is None:
            raise RunError("--ray auto: no Ray cluster is known on this machine (none that `ray start --head` made here, no "
                           "RAY_ADDRESS): start one with `ray start --head`, give its address, or give plain --ray for a "
                           "cluster of the batch's own")
        check_head_answers(found, f"--ray auto found the cluster at {found} (RAY_ADDRESS, the record `ray start` left, or a "
                                  f"head running here) but it does not answer as one; it has stopped?")
    else:
        check_head_answers(address, f"--ray {address}")
        found = address
    token_needed = RunError(f"--ray {address}: the Ray head uses token authentication and this machine has not its token: copy "
                            f"the head's ~/.ray/auth_token here (or set RAY_AUTH_TOKEN) and run with RAY_AUTH_MODE=token")
    if address != "auto" and not found.startswith("ray://"):
        try:  # ray.init would retry a refused token for twenty seconds; the head's own client refuses it at once
            from ray._raylet import GcsClient
            with stderr_silenced():  # its core logs the refusal as a warning line of its own
                GcsClient(address=found, cluster_id=None)
        except ray.exceptions.AuthenticationError:
            raise token_needed from None
        except Exception:  # anything else is for ray.init to report
            pass
    try:
        ray.init(address=address, **QUIET_WITH_THIS_PACKAGE)
    except ray.exceptions.AuthenticationError:
        raise token_needed from None
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise RunError(f"--ray {address}: cannot join the Ray cluster there ({str(error).splitlines()[0]}): check the address "
                       f"`ray start --head` printed, and that this machine has the same Ray ({RAY_VERSION}) and Python") from None


def start_failure(error: RunError) -> str:
    """OwnComfyUI's error for a ComfyUI that did not start, in one line: what happened and its log's last line."""
    first, *rest = str(error).splitlines()
    last = next((line.strip() for line in reversed(rest) if line.strip()), "")
    first = first.split("; the end of its log", 1)[0]
    return f"{first}: {last}" if last else first


def alive_scratch_owner(folder: Path) -> bool:
    """Whether the worker process that made a scratch folder (its pid is in the name) is alive."""
    try:
        pid = int(folder.name.removeprefix(SCRATCH_PREFIX).split("-", 1)[0])
        os.kill(pid, 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def sweep_scratch(temp: Path) -> None:
    """Scratch folders of workers on this node whose process is gone (killed with no chance to clear up)."""
    for folder in temp.glob(f"{SCRATCH_PREFIX}*"):
        if folder.is_dir() and not alive_scratch_owner(folder):
            shutil.rmtree(folder, ignore_errors=True)


class ComfyWorker:
    """A Ray actor owning one ComfyUI on its node, in a scratch folder of its own for inputs, outputs and the log
    (two workers on one node never see each other's files), removed when it stops. It runs up to --max-in-flight
    runs at once (each a thread; ComfyUI queues them), so that its ComfyUI never waits for the next prompt."""

    def __init__(self, comfyui: str | None, comfyui_args: list[str], keep_pictures: int):
        from .own_comfyui import OwnComfyUI, private_folders

        root = Path(comfyui or os.environ.get("COMFYUI_PATH", ""))
        if not (root / "main.py").is_file():
            raise RunError(f"no ComfyUI at {str(root) or '(unset)'} on node {os.uname().nodename}: pass --comfyui <folder> "
                           f"or set COMFYUI_PATH on every node, with this pack in its custom_nodes")
        sweep_scratch(Path(tempfile.gettempdir()))
        self.scratch = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-"))
        try:
            self.comfyui = OwnComfyUI(root, [*comfyui_args, *private_folders(self.scratch)], report=lambda text: None,
                                      die_with_parent=True, log=self.scratch / "comfyui.log")
            self.comfyui.wait_until_ready()
        except BaseException as error:
            with contextlib.suppress(Exception):
                self.comfyui.stop()
            shutil.rmtree(self.scratch, ignore_errors=True)  # its log too: what it said goes into the error
            if isinstance(error, RunError):
                raise RunError(start_failure(error)) from None
            raise
        self.client = ComfyClient(self.comfyui.url)
        self.client_id = uuid.uuid4().hex
        self.uploads: dict[str, str] = {}
        self.lock = threading.Lock()
        # ComfyUI answers a prompt identical to the one before it from its cache, naming that one's files: the
        # pictures of the last few runs are kept on disk for that, older ones removed.
        self.collected: deque[list[Path]] = deque()
        self.keep_pictures = keep_pictures

    def ready(self) -> dict:
        import ray

        return {"node": ray.util.get_node_ip_address(), "comfyui_pid": self.comfyui.process.pid}

    def run(self, workflow: dict, loaders: list[str], faces: list[tuple], seed: int | None, timeout_s: float) -> dict:
        """One run, start to end: {"entry": its history, "pictures": the bytes of output_images(entry), in order};
        {"rejected": why} when ComfyUI refuses the workflow; {"error": why, "broken": bool} for a failure another
        try may not have (broken: this worker's ComfyUI must go)."""
        submitted = []
        try:
            names = [self.upload(digest, name, photo) for digest, name, photo in faces]
            prompt_id, entry = self.client.run_job(
                fill_run(workflow, loaders, names, seed, self.client, report=lambda text: None), self.client_id, timeout_s,
                on_submitted=submitted.append, poll_s=WORKER_POLL_S, report=lambda state: None, timeout_option="--job-timeout",
                from_start=True)
            succeeded = entry.get("status", {}).get("status_str") == "success"
            pictures = [self.client.download(image) for _, image in output_images(entry)] if succeeded else []
        except WorkflowRejected as error:
            return {"rejected": str(error)}
        except ServerUnreachable as error:
            return {"error": f"its ComfyUI stopped answering ({error.reason})", "broken": True}
        except RunTimedOut:
            self.cancel(submitted)
            return {"error": f"no result within --job-timeout {timeout_s:g} s", "broken": True}
        except urllib.error.HTTPError as error:  # a picture its ComfyUI's cache names, removed since
            return {"error": f"its ComfyUI could not give a picture back (HTTP {error.code})", "broken": True}
        except RunError as error:
            self.cancel(submitted)
            return {"error": str(error), "broken": False}
        self.collect(entry)
        return {"entry": entry, "pictures": pictures, "prompt_id": prompt_id}

    def cancel(self, prompt_ids: list[str]) -> None:
        for prompt_id in prompt_ids:  # its prompt must not go on taking the GPU
            with contextlib.suppress(RunError, OSError):
                self.client.cancel(prompt_id)

    def upload(self, digest: str, name: str, photo) -> str:
        """The photo's name in this ComfyUI's input folder; its bytes (shipped once per batch, a Ray object) are
        fetched the first time this worker needs them."""
        import ray

        with self.lock:
            if digest not in self.uploads:
                path = self.scratch / "faces" / f"{digest[:16]}{Path(name).suffix}"
                path.parent.mkdir(exist_ok=True)
                path.write_bytes(ray.get(photo[0]))
                self.uploads[digest] = self.client.upload_image(path)
            return self.uploads[digest]

    def collect(self, entry: dict) -> None:
        """The run's pictures are on their way to the driver: remove those of older runs from this worker's disk."""
        paths = [self.scratch / image.get("type", "output") / image.get("subfolder", "") / image["filename"]
                 for _, image in output_images(entry)]
        with self.lock:
            self.collected.append(paths)
            while len(self.collected) > self.keep_pictures:
                for path in self.collected.popleft():
                    path.unlink(missing_ok=True)

    def close(self) -> None:
        self.comfyui.stop()
        shutil.rmtree(self.scratch, ignore_errors=True)
        sweep_scratch(self.scratch.parent)


@dataclass
class RayOptions:
    address: str  # "local": a cluster of the batch's own
    cpus_per_worker: float | None
    workers: int | None
    comfyui: str | None
    comfyui_args: str
    max_in_flight: int


class RayBackend:
    """The worker pool's backend on Ray (worker_pool.WorkerBackend): tickets are Ray object refs."""

    name = "ray"

    def __init__(self, options: RayOptions):
        self.options = options
        self.ray = ray = import_ray(local=options.address == "local")
        connect(ray, options.address)
        self.outstanding: set = set()
        self.photos: dict[str, object] = {}  # photo digest -> its bytes as a Ray object, put once
        per_worker = {"num_cpus": options.cpus_per_worker} if options.cpus_per_worker else {"num_gpus": 1, "num_cpus": 1}
        # One more thread than runs: a worker asked to stop can do so while its runs wait on its ComfyUI.
        self.actor_class = ray.remote(max_restarts=0, max_task_retries=0, max_concurrency=options.max_in_flight + 1,
                                      **per_worker)(ComfyWorker)

    def plan(self, say) -> int:
        resources = self.ray.cluster_resources()
        if self.options.cpus_per_worker:
            count = int(resources.get("CPU", 0) // self.options.cpus_per_worker)
        else:
            count = int(resources.get("GPU", 0))
        count = min(count, self.options.workers or count)
        if count < 1:
            raise RunError(f"--ray: the cluster ({', '.join(f'{k} {v:g}' for k, v in sorted(resources.items()) if k in ('CPU', 'GPU'))}) "
                           f"has room for no worker: it needs a GPU per worker, or --ray-cpus-per-worker N on CPU-only clusters")
        nodes = [node["NodeManagerAddress"] for node in self.ray.nodes() if node["Alive"]]
        say(f"ray     starting {count} worker(s) on {len(nodes)} node(s) ({', '.join(sorted(nodes))}), each with a ComfyUI of its own")
        return count

    def start(self, name: str) -> tuple[object, object]:
        actor = self.actor_class.options(name=f"{WORKER_NAME}-{name.rsplit('-', 1)[-1]}-{uuid.uuid4().hex[:8]}").remote(
            self.options.comfyui, shlex.split(self.options.comfyui_args), self.options.max_in_flight)
        ticket = actor.ready.remote()
        self.outstanding.add(ticket)
        return actor, ticket

    def photo(self, path: Path, digest: str) -> list:
        if digest not in self.photos:
            self.photos[digest] = self.ray.put(path.read_bytes())
        return [self.photos[digest]]  # inside a list, Ray hands the worker the reference, not the bytes

    def send(self, handle, order: RunOrder, timeout_s: float):
        faces = [(face.digest, face.path.name, self.photo(face.path, face.digest)) for face in order.faces]
        ticket = handle.run.remote(order.workflow, order.loaders, faces, order.seed, timeout_s)
        self.outstanding.add(ticket)
        return ticket

    def wait(self, seconds: float) -> None:
        if self.outstanding:
            self.ray.wait(list(self.outstanding), num_returns=1, timeout=seconds)
        else:
            time.sleep(seconds)

    def collect(self) -> list[tuple[object, object]]:
        if not self.outstanding:
            return []
        ready, _ = self.ray.wait(list(self.outstanding), num_returns=len(self.outstanding), timeout=0)
        outcomes = []
        for ticket in ready:
            self.outstanding.discard(ticket)
            outcomes.append((ticket, self.outcome(ticket)))
        return outcomes

    def outcome(self, ticket):
        exceptions = self.ray.exceptions
        try:
            return self.ray.get(ticket)
        except exceptions.ObjectLostError as error:
            return ResultLost(f"{type(error).__name__}: {first_line(error)}")
        except (exceptions.RayActorError, exceptions.RayTaskError, exceptions.WorkerCrashedError,
                exceptions.NodeDiedError, exceptions.LocalRayletDiedError) as error:
            return WorkerLost(reason(error))

    def stop(self, handle, gracefully: bool) -> None:
        if gracefully:
            with contextlib.suppress(Exception):  # a worker gone meanwhile has nothing left to stop
                self.ray.get(handle.close.remote(), timeout=STOP_WAIT_S)
        with contextlib.suppress(Exception):
            self.ray.kill(handle, no_restart=True)

    def close(self) -> None:
        self.ray.shutdown()  # the workers, and with them their ComfyUIs, end with the driver


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def reason(error: BaseException) -> str:
    """A lost worker's cause in one line: the RunError its start raised (no ComfyUI there, one that exited), else
    Ray's own first line."""
    for line in reversed(str(error).splitlines()):
        if "RunError: " in line:
            return line.split("RunError: ", 1)[1].strip()
    return f"{type(error).__name__}: {first_line(error)}"
