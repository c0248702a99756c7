"""A simulated fleet of GPU workers behind the worker pool's backend interface (worker_pool.WorkerBackend), so that
the batch's real scheduler, manifest and worker pool can be driven through a hundred thousand runs, with the
faults a fleet has, in seconds: simulated time (SimulatedClock) moves to the next event instead of sleeping.

Each worker runs one run at a time, as a ComfyUI does (the pool queues up to --max-in-flight on it). Faults, drawn
from one seeded random generator: run times from a log-normal distribution; a share of runs failing (mostly an
error another attempt may not have, out of memory; some for good, an error in a node); a share of workers dying
in the middle of a run (their runs lost, the worker gone); a few runs hanging (the worker reports its run over
--job-timeout and its ComfyUI broken, as a Ray worker does); a few workers falling silent (the pool must notice);
a few results lost after the run ended; some starts of a replacement failing. It records how often each run was
really sent, to compare with the attempts the manifest counts."""

from __future__ import annotations

import heapq
import itertools
import json
import math
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from facediffuser_client.executor import ExecutorSettings, RunOrder
from facediffuser_client.jobs import load_jobs
from facediffuser_client.manifest import Manifest
from facediffuser_client.scheduler import Scheduler
from facediffuser_client.worker_pool import ResultLost, WorkerLost, WorkerPool


class SimulatedClock:
    """The scheduler's and the pool's clock (executor.Clock); the fleet moves it."""

    def __init__(self):
        self.time = 0.0

    def now(self) -> float:
        return self.time


@dataclass
class Faults:
    run_seconds: float = 6.0  # median run time
    run_spread: float = 0.4  # sigma of the log-normal run times
    start_seconds: float = 40.0  # a worker's ComfyUI start, models loaded
    failing_runs: float = 0.05  # share of runs that end in an error
    failing_for_good: float = 0.2  # ... of which an error every attempt would have (an error in a node)
    dying_workers: float = 0.02  # share of the workers that die once, in the middle of a run
    hung_runs: int = 5  # runs whose ComfyUI hangs (the worker reports --job-timeout and its ComfyUI broken)
    silent_workers: int = 2  # workers that stop answering altogether, once each
    lost_results: float = 0.001  # share of results lost after their run ended (the node holding them died)
    failing_starts: float = 0.3  # share of the replacements' starts that fail


@dataclass(eq=False)
class SimulatedWorker:
    index: int
    free_at: float = 0.0  # when its ComfyUI has finished the runs it was given
    stopped: bool = False  # stopped by the pool, dead, or silent: ends no more runs
    died_at: float | None = None
    tickets: list = field(default_factory=list)  # its runs not yet ended


FAILURE = {"status": {"status_str": "error", "completed": False, "messages": [["execution_error", {
    "node_id": "3", "node_type": "FaceDiffuserSNFSampler", "exception_type": "torch.OutOfMemoryError",
    "exception_message": "CUDA out of memory (simulated)"}]]}}
FAILURE_FOR_GOOD = {"status": {"status_str": "error", "completed": False, "messages": [["execution_error", {
    "node_id": "5", "node_type": "FaceDiffuserEncodeReferenceFaces", "exception_type": "ValueError",
    "exception_message": "no face found in reference photo 1 (simulated)"}]]}}
PICTURE = b"\x89PNG simulated picture"


class SimulatedFleet:
    """A WorkerBackend of `workers` simulated GPU workers (see the module's docstring)."""

    name = "simulated"

    def __init__(self, workers: int, clock: SimulatedClock, faults: Faults | None = None, seed: int = 0):
        self.count = workers
        self.clock = clock
        self.faults = faults or Faults()
        self.random = random.Random(seed)
        self.events: list[tuple[float, int, int, object]] = []  # (time, order, ticket, outcome)
        self.ticket_numbers = itertools.count()
        self.ready: list[tuple[int, object]] = []
        self.workers: list[SimulatedWorker] = []
        self.owner: dict[int, SimulatedWorker] = {}
        self.sent: Counter = Counter()  # (job id, run key) -> runs really sent to a worker
        self.started_workers = 0
        self.to_die = set(self.random.sample(range(workers), round(workers * self.faults.dying_workers)))
        self.to_fall_silent = set(self.random.sample(sorted(set(range(workers)) - self.to_die), self.faults.silent_workers))
        self.hangs_left = self.faults.hung_runs
        self.pictures = itertools.count()

    def at(self, when: float, ticket: int, outcome) -> None:
        heapq.heappush(self.events, (when, next(self.ticket_numbers), ticket, outcome))

    def plan(self, say) -> int:
        say(f"simulated fleet of {self.count} GPU workers")
        return self.count

    def start(self, name: str) -> tuple[object, object]:
        first_start = self.started_workers < self.count
        worker = SimulatedWorker(index=int(name.rsplit("-", 1)[1]))
        self.started_workers += 1
        self.workers.append(worker)
        ticket = next(self.ticket_numbers)
        took = self.faults.start_seconds * self.random.uniform(0.5, 1.5)
        fails = not first_start and self.random.random() < self.faults.failing_starts
        worker.free_at = self.clock.now() + took
        self.at(worker.free_at, ticket, WorkerLost("its ComfyUI exited at start (simulated)") if fails else {"node": f"node-{worker.index // 8}"})
        return worker, ticket

    def send(self, handle: SimulatedWorker, order: RunOrder, timeout_s: float) -> object:
        ticket = next(self.ticket_numbers)
        self.sent[(order.job_id, order.key)] += 1
        handle.tickets.append(ticket)
        now = self.clock.now()
        if handle.died_at is not None:  # sent before the pool learnt of its death: lost with it
            self.at(max(now, handle.died_at), ticket, WorkerLost("the worker died (simulated: its process was killed)"))
            return ticket
        if handle.stopped:
            return ticket
        began = max(now, handle.free_at)
        took = self.faults.run_seconds * math.exp(self.random.gauss(0, self.faults.run_spread))
        if handle.index in self.to_die and self.random.random() < 0.1:
            self.to_die.discard(handle.index)
            self.die(handle, began + took / 2, "the worker died (simulated: its process was killed)")
            return ticket
        if handle.index in self.to_fall_silent and self.random.random() < 0.1:
            self.to_fall_silent.discard(handle.index)
            handle.stopped = True  # answers nothing, ever
            return ticket
        if self.hangs_left and self.random.random() < 0.001:
            self.hangs_left -= 1
            handle.free_at = began + timeout_s
            self.at(handle.free_at, ticket, {"error": f"no result within --job-timeout {timeout_s:g} s", "broken": True})
            return ticket
        handle.free_at = began + took
        draw = self.random.random()
        if draw < self.faults.failing_runs:
            entry = FAILURE_FOR_GOOD if draw < self.faults.failing_runs * self.faults.failing_for_good else FAILURE
            outcome = {"entry": entry, "pictures": [], "prompt_id": f"sim-{ticket}"}
        elif draw < self.faults.failing_runs + self.faults.lost_results:
            outcome = ResultLost("ObjectLostError: the node holding the result died (simulated)")
        else:
            name = f"facediffuser_{next(self.pictures):06d}_.png"
            outcome = {"entry": {"status": {"status_str": "success", "completed": True, "messages": []},
                                 "outputs": {"9": {"images": [{"filename": name, "subfolder": "", "type": "output"}]}}},
                       "pictures": [PICTURE], "prompt_id": f"sim-{ticket}"}
        self.at(handle.free_at, ticket, outcome)
        return ticket

    def die(self, worker: SimulatedWorker, when: float, why: str) -> None:
        for ticket in worker.tickets:
            self.at(when, ticket, WorkerLost(why))
        worker.tickets = []
        worker.stopped, worker.died_at = True, when

    def wait(self, seconds: float) -> None:
        """Simulated time moves on to the next event, at most `seconds`."""
        now = self.clock.now()
        upcoming = self.events[0][0] if self.events else math.inf
        self.clock.time = max(now, min(upcoming, now + seconds))

    def collect(self) -> list[tuple[object, object]]:
        now = self.clock.now()
        ended = []
        while self.events and self.events[0][0] <= now:
            _, _, ticket, outcome = heapq.heappop(self.events)
            ended.append((ticket, outcome))
        return ended

    def stop(self, handle: SimulatedWorker, gracefully: bool) -> None:
        if handle is not None:
            handle.stopped = True

    def close(self) -> None:
        self.events.clear()


@dataclass
class Simulation:
    """What a simulated batch did: its scheduler (and through it the manifest), the pool, the fleet, and the
    driver's own time, in CPU seconds of this process: reading the jobs file and opening the manifest (start), and
    the batch itself, from the first run sent to the last result (batch)."""
    scheduler: object
    pool: object
    fleet: SimulatedFleet
    start_seconds: float
    batch_seconds: float
    simulated_seconds: float
    stopped: bool = False  # by stop_after


def write_jobs_file(folder: Path, jobs: int) -> Path:
    """A jobs file of `jobs` one-run jobs of the shipped single-subject workflow, each its own prompt and seed."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "face.png").write_bytes(b"\x89PNG a face photo")
    path = folder / "jobs.jsonl"
    with open(path, "w", encoding="utf-8") as file:
        for index in range(jobs):
            file.write(json.dumps({"id": f"job{index:06d}", "faces": ["face.png"], "seed": index,
                                   "prompt": f"a photo of a woman <|image|> in scene {index}"}) + "\n")
    return path


def simulate(jobs_file: Path, run_dir: Path, workers: int = 256, faults: Faults | None = None, seed: int = 0,
             max_attempts: int = 3, job_timeout: float = 600.0, stop_after: int | None = None, say=lambda text: None) -> Simulation:
    """The batch of `jobs_file` into `run_dir` on a simulated fleet, through the client's own scheduler, manifest
    and worker pool, wired as facediffuser_batch.py wires them. With `stop_after`, the client stops (as at Ctrl-C)
    once that many runs have ended, leaving a manifest to resume."""
    began = time.process_time()
    jobs = load_jobs(jobs_file)
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(run_dir, jobs_file, say=say)
    manifest.add_jobs(jobs, retry_failed=False, say=say)
    clock = SimulatedClock()
    ended = itertools.count(1)

    def listen(text: str) -> None:
        say(text)
        if stop_after is not None and text.startswith(("done ", "failed ")) and next(ended) >= stop_after:
            raise KeyboardInterrupt

    scheduler = Scheduler(jobs, manifest, run_dir, max_attempts=max_attempts, poll=0.5, progress_every=3600.0, say=listen, clock=clock)
    fleet = SimulatedFleet(workers, clock, faults, seed)
    pool = WorkerPool(scheduler, ExecutorSettings(max_in_flight=2, job_timeout=job_timeout, poll=0.5), fleet, clock)
    started = time.process_time()
    stopped = False
    try:
        scheduler.run(pool)
    except KeyboardInterrupt:
        stopped = True
    finished = time.process_time()
    pool.close()
    return Simulation(scheduler, pool, fleet, started - began, finished - started, clock.now(), stopped)
