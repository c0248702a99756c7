"""An executor over workers that each own a ComfyUI (executor.Executor), whatever starts them: Ray actors
(ray_workers.RayBackend) or a simulated fleet (the dev kit's). The pool owns the workers' health; the scheduler
owns the runs' retries, and a run is sent once per attempt whatever happens underneath.

A worker is started, and takes runs only once it says it is ready. A worker that is lost (its process died, its
node went away), that reports its ComfyUI broken (gone, or a run over --job-timeout: a hung GPU still answers
HTTP, and would time out every later run), or that gives no sign of life for --job-timeout plus a grace, is
stopped and replaced at once, its runs in flight retried elsewhere. A replacement that fails to start is tried
again after a back-off; a worker whose starts fail START_FAILURES times in a row is given up, and when every
worker is given up the batch stops with the last error."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from .executor import Clock, ExecutorSettings, Ledger, RunOrder, backoff
from .http_api import RunError, output_images
from .manifest import DONE, PENDING, RUNNING

START_FAILURES = 3  # starts of one worker failing in a row before it is given up
WORKER_GRACE_S = 60.0  # past --job-timeout, how long a busy worker may be silent before it counts as hung
LISTED_WORKERS = 8  # progress and summary name each worker up to this many; a fleet is counted


class WorkerLost(Exception):
    """The worker is gone (its process died, its node went away, it could not start): its runs are lost."""


class ResultLost(Exception):
    """One run's result is gone (the node holding it died after the run ended); the worker may be fine."""


class WorkerBackend(Protocol):
    """What starts workers and carries runs to them and results back. Tickets are the backend's handles on a
    start or a run in progress; collect() hands each one back once, with its outcome."""

    name: str  # the prefix of the workers' names: "ray"

    def plan(self, say) -> int:
        """How many workers to start (an error naming the fix when there is room for none)."""

    def start(self, name: str) -> tuple[object, object]:
        """Begin starting a worker: (its handle, the ticket of its start). The start's outcome is {"node": where}."""

    def send(self, handle: object, order: RunOrder, timeout_s: float) -> object:
        """Begin one run on the worker: its ticket. The outcome is {"entry", "pictures", "prompt_id"} (pictures:
        the bytes of output_images(entry), in order), {"rejected": why} (ComfyUI refused the workflow), or
        {"error": why, "broken": bool} (a failure another attempt may not have; broken: its ComfyUI must go)."""

    def wait(self, seconds: float) -> None:
        """Block until an outcome may be ready, at most `seconds`."""

    def collect(self) -> list[tuple[object, object]]:
        """(ticket, outcome or WorkerLost/ResultLost) of every start and run that ended since the last call."""

    def stop(self, handle: object, gracefully: bool) -> None:
        """End a worker and everything it started (its ComfyUI, its scratch folder); never raises. `gracefully`:
        the worker is up and is first asked to clear up itself (else it is killed outright)."""

    def close(self) -> None: ...


@dataclass(eq=False)
class Worker:
    name: str
    handle: object = None
    state: str = "starting"  # starting, ready, waiting (to be started again), given up
    in_flight: dict = field(default_factory=dict)  # ticket -> (job id, run key)
    node: str = "?"
    heard_at: float = 0.0  # the last result, or the start of its current busy spell
    busy_since: float | None = None
    failed_starts: int = 0  # in a row
    restart_at: float = 0.0
    last_error: str = ""
    runs_done: int = 0
    retried: int = 0
    replaced: int = 0


def image_key(image: dict) -> tuple:
    return image.get("type", "output"), image.get("subfolder", ""), image["filename"]


class WorkerPool:
    """The executor over a WorkerBackend's workers."""

    resume_note = "runs that were in flight on the workers are run again"

    def __init__(self, ledger: Ledger, settings: ExecutorSettings, backend: WorkerBackend, clock: Clock | None = None):
        self.ledger = ledger
        self.settings = settings
        self.backend = backend
        self.clock = clock or Clock()
        self.unusable = f"no {backend.name} worker has been ready"
        self.owner: dict[object, Worker] = {}  # ticket of a start or a run -> its worker
        self.starting: dict[object, Worker] = {}  # start tickets
        # Ready workers by runs in flight (0 .. max_in_flight - 1): the least busy is found without a search.
        self.by_load: list[dict[Worker, None]] = [{} for _ in range(settings.max_in_flight)]
        self.room = 0  # runs the ready workers could take now
        self.unusable_since: float | None = None
        self.next_look = 0.0
        self.busy_seconds = 0.0
        self.first_sent_at: float | None = None
        self.last_result_at: float | None = None
        count = backend.plan(ledger.say)
        self.workers = [Worker(f"{backend.name}:worker-{index}") for index in range(count)]
        self.start_all()

    # -- starting workers --

    def start(self, worker: Worker) -> None:
        worker.state, worker.in_flight = "starting", {}
        worker.handle, ticket = self.backend.start(worker.name.split(":", 1)[1])
        self.owner[ticket] = worker
        self.starting[ticket] = worker

    def start_all(self) -> None:
        """Start every worker and wait until each is ready or failed: the batch begins with the workers that
        started (the others are tried again), or ends at once when none could (the error names the fix)."""
        for worker in self.workers:
            self.start(worker)
        while self.starting:
            self.backend.wait(self.settings.poll)
            self.take_outcomes()
        if not self.ready_workers():
            for worker in self.workers:
                self.backend.stop(worker.handle, gracefully=False)
            self.backend.close()
            raise RunError(f"--{self.backend.name}: no worker could start: {self.workers[0].last_error}")

    def started(self, worker: Worker, outcome) -> None:
        if isinstance(outcome, WorkerLost):
            self.backend.stop(worker.handle, gracefully=False)
            worker.failed_starts += 1
            worker.last_error = str(outcome)
            if worker.failed_starts >= START_FAILURES:
                worker.state = "given up"
                self.ledger.say(f"{self.backend.name:<7} {worker.name} given up after {worker.failed_starts} failed starts in a row: {outcome}")
            else:
                worker.state = "waiting"
                delay = backoff(worker.failed_starts)
                worker.restart_at = self.clock.now() + delay
                self.ledger.say(f"{self.backend.name:<7} {worker.name} could not start (again in {delay:.0f} s): {outcome}")
            return
        worker.state, worker.failed_starts, worker.node = "ready", 0, outcome.get("node", "?")
        worker.heard_at = self.clock.now()
        self.by_load[0][worker] = None
        self.room += self.settings.max_in_flight
        self.unusable_since = None
        if worker.replaced:
            self.ledger.say(f"{self.backend.name:<7} {worker.name} ready again on {worker.node}")

    def replace(self, worker: Worker, why: str, alive: bool = True) -> None:
        """Stop `worker` (lost, broken or hung; `alive`: its process may still be there), retry its runs elsewhere
        and start it afresh."""
        self.retire(worker)
        for ticket, (job_id, key) in worker.in_flight.items():
            self.owner.pop(ticket, None)
            worker.retried += 1
            self.ledger.retry(job_id, key, worker.name, why)
        worker.in_flight = {}
        self.backend.stop(worker.handle, gracefully=alive)
        worker.replaced += 1
        self.ledger.say(f"{self.backend.name:<7} {worker.name} replaced: {why}")
        self.start(worker)

    def retire(self, worker: Worker) -> None:
        """Take a ready worker out of dispatch."""
        if worker.state == "ready":
            load = len(worker.in_flight)
            if load < self.settings.max_in_flight:
                del self.by_load[load][worker]
            self.room -= self.settings.max_in_flight - load
            self.idle(worker)
        worker.state = "stopping"
        if not self.ready_workers() and self.unusable_since is None:
            self.unusable_since = self.clock.now()

    def ready_workers(self) -> list[Worker]:
        return [worker for worker in self.workers if worker.state == "ready"]

    # -- the executor --

    def describe(self) -> str:
        nodes = sorted({worker.node for worker in self.ready_workers()})
        return f"{self.backend.name} workers: {len(self.ready_workers())} of {len(self.workers)} ready on {', '.join(nodes)}"

    def adopt_running(self) -> None:
        for job_id, key in self.ledger.runs_in(RUNNING):
            self.ledger.requeue(job_id, key, "it was in flight when the client stopped (or on a server not among this "
                                             "invocation's): run again")

    def free_slots(self) -> int:
        return self.room

    def submit(self, order: RunOrder) -> bool:
        worker = self.least_busy(order.avoid)
        if worker is None:
            return False
        load = len(worker.in_flight)
        ticket = self.backend.send(worker.handle, order, self.settings.job_timeout)
        del self.by_load[load][worker]
        if load + 1 < self.settings.max_in_flight:
            self.by_load[load + 1][worker] = None
        self.room -= 1
        worker.in_flight[ticket] = (order.job_id, order.key)
        self.owner[ticket] = worker
        now = self.clock.now()
        if worker.busy_since is None:
            worker.busy_since = worker.heard_at = now
        if self.first_sent_at is None:
            self.first_sent_at = now
        self.ledger.started(order.job_id, order.key, worker.name, None)
        return True

    def least_busy(self, avoid: str | None) -> Worker | None:
        for bucket in self.by_load:
            for worker in bucket:
                if worker.name != avoid:
                    return worker
            if bucket:
                return next(iter(bucket))  # only the worker it failed on has room: better there than waiting
        return None

    def poll(self) -> bool:
        ended = self.take_outcomes()
        now = self.clock.now()
        if now >= self.next_look:  # hung workers and due restarts, looked for once per --poll: a fleet has hundreds
            self.next_look = now + self.settings.poll
            for worker in self.workers:
                if worker.state == "ready" and worker.in_flight and now - worker.heard_at > self.settings.job_timeout + WORKER_GRACE_S:
                    self.replace(worker, f"the worker gave no sign for {now - worker.heard_at:.0f} s (hung?)")
                    ended = True
                elif worker.state == "waiting" and now >= worker.restart_at:
                    self.start(worker)
        return ended

    def take_outcomes(self) -> bool:
        ended = False
        for ticket, outcome in self.backend.collect():
            worker = self.owner.pop(ticket, None)
            if worker is None:
                continue  # from a worker stopped since
            if self.starting.pop(ticket, None) is not None:
                self.started(worker, outcome)
                continue
            ended = True
            self.run_ended(worker, ticket, outcome)
        return ended

    def run_ended(self, worker: Worker, ticket, outcome) -> None:
        job_id, key = worker.in_flight[ticket]
        now = self.clock.now()
        self.last_result_at = worker.heard_at = now
        if isinstance(outcome, WorkerLost):
            self.replace(worker, f"the worker was lost ({outcome})", alive=False)
            return
        self.free(worker, ticket)
        if isinstance(outcome, ResultLost):
            worker.retried += 1
            self.ledger.retry(job_id, key, worker.name, f"its result was lost ({outcome})")
        elif "rejected" in outcome:
            self.ledger.fail(job_id, key, outcome["rejected"])
        elif "error" in outcome:
            worker.retried += 1
            self.ledger.retry(job_id, key, worker.name, outcome["error"])
            if outcome.get("broken"):
                self.replace(worker, f"its ComfyUI must go ({outcome['error']})")
        else:
            pictures = dict(zip((image_key(image) for _, image in output_images(outcome["entry"])), outcome["pictures"]))
            state = self.ledger.finished(job_id, key, worker.name, outcome["entry"], lambda image: pictures[image_key(image)],
                                         prompt_id=outcome.get("prompt_id"))
            worker.runs_done += state == DONE
            worker.retried += state == PENDING

    def free(self, worker: Worker, ticket) -> None:
        """A run of a ready worker ended: it has room for one more."""
        load = len(worker.in_flight)
        del worker.in_flight[ticket]
        if worker.state != "ready":
            return
        if load < self.settings.max_in_flight:
            del self.by_load[load][worker]
        self.by_load[load - 1][worker] = None
        self.room += 1
        if not worker.in_flight:
            self.idle(worker)

    def idle(self, worker: Worker) -> None:
        if worker.busy_since is not None:
            self.busy_seconds += self.clock.now() - worker.busy_since
            worker.busy_since = None

    def wait(self, seconds: float) -> None:
        self.backend.wait(seconds)

    def unusable_for(self) -> float:
        return 0.0 if self.unusable_since is None else self.clock.now() - self.unusable_since

    def stuck(self) -> str | None:
        if all(worker.state == "given up" for worker in self.workers):
            return (f"every {self.backend.name} worker failed to start {START_FAILURES} times in a row; the last error: "
                    f"{self.workers[-1].last_error}")
        return None

    def close(self) -> None:
        # Those starting first: a ready worker clearing up also clears the folders its node's dead workers left.
        for worker in sorted(self.workers, key=lambda worker: worker.state == "ready"):
            if worker.state != "given up":
                self.backend.stop(worker.handle, gracefully=worker.state == "ready")
        self.backend.close()

    # -- reports --

    def utilisation(self) -> float:
        """The share of the workers' time, from the first run sent to the last result, spent with a run in flight."""
        if self.first_sent_at is None or self.last_result_at is None or self.last_result_at <= self.first_sent_at:
            return 0.0
        busy = self.busy_seconds + sum(self.last_result_at - w.busy_since for w in self.workers
                                       if w.busy_since is not None and w.busy_since < self.last_result_at)
        return busy / (len(self.workers) * (self.last_result_at - self.first_sent_at))

    def in_flight(self) -> str:
        if len(self.workers) <= LISTED_WORKERS:
            return ", ".join(f"{w.name.split(':', 1)[1]} {len(w.in_flight)}" + ("" if w.state == "ready" else f" ({w.state})")
                             for w in self.workers)
        ready = self.ready_workers()
        return (f"{sum(len(w.in_flight) for w in ready)} run(s) on {sum(bool(w.in_flight) for w in ready)} busy of "
                f"{len(ready)} ready worker(s) ({len(self.workers) - len(ready)} starting or given up)")

    def summary_lines(self) -> list[str]:
        if len(self.workers) <= LISTED_WORKERS:
            lines = [f"{w.name}: {w.runs_done} run(s) done here, {w.retried} retried, replaced {w.replaced} time(s)"
                     + (" (given up)" if w.state == "given up" else "") for w in self.workers]
        else:
            lines = [f"{len(self.workers)} {self.backend.name} workers: {sum(w.runs_done for w in self.workers)} run(s) done, "
                     f"{sum(w.retried for w in self.workers)} retried, {sum(w.replaced for w in self.workers)} replacement(s), "
                     f"{sum(w.state == 'given up' for w in self.workers)} given up"]
        return [*lines, f"workers busy {self.utilisation():.1%} of the time from the first run sent to the last result"]
