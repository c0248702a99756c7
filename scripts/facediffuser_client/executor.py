"""Where the batch's scheduler and its executors meet. The scheduler hands an executor runs (RunOrder) through the
Executor interface; an executor reports what became of them through the Ledger interface, which the scheduler
implements. The command line builds the executor it was asked for and gives it to the scheduler: neither module
imports the other, and a new executor (a simulated fleet, another cluster) needs nothing of the scheduler's."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

BACKOFF_S = (2.0, 60.0)  # first back-off, longest back-off; doubling per attempt


def backoff(attempt: int) -> float:
    return min(BACKOFF_S[0] * 2 ** max(attempt - 1, 0), BACKOFF_S[1])


@contextlib.contextmanager
def interrupts_held():
    """Ctrl-C waits for the end of the block: between a server accepting a run and the manifest recording it, an
    interrupt would leave a prompt that the next invocation knows nothing of, and queues again."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda number, frame: caught.append(number))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


class Clock:
    """The time the scheduler and an executor go by: the machine's, or a simulation's (which an executor advances
    in wait)."""

    def now(self) -> float:
        return time.monotonic()


@dataclass(frozen=True)
class Face:
    path: Path
    digest: str  # sha256 of the photo: the same photo under two names is uploaded once


@dataclass
class RunOrder:
    """One run, as an executor needs it: the job's workflow (prompt and overrides set; faces and seed not yet),
    the LoadImage nodes taking its faces, the faces, the run's seed (None: the workflow's own), and where its
    last attempt failed (another server or worker is preferred)."""
    job_id: str
    key: str
    workflow: dict
    loaders: list[str]
    faces: list[Face]
    seed: int | None
    avoid: str | None = None


@dataclass
class ExecutorSettings:
    max_in_flight: int = 2  # runs on one server or worker at a time
    job_timeout: float = 3600.0  # seconds a run may take once it started
    poll: float = 0.5  # seconds between looks at the servers
    give_up_after: float = 600.0  # stop when no server or worker has been usable this long


class Ledger(Protocol):
    """What an executor tells the scheduler about the runs it was given (the scheduler writes the manifest), and
    the little it may read of it."""

    def say(self, text: str) -> None: ...

    def note_once(self, text: str) -> None: ...

    def record(self, job_id: str, key: str) -> dict:
        """The manifest's record of a run (read only)."""

    def runs_in(self, state: str) -> list[tuple[str, str]]: ...

    def runs_with(self, name: str) -> list[tuple[str, str]]:
        """The runs whose record has the field `name`."""

    def started(self, job_id: str, key: str, where: str, prompt_id: str | None) -> None:
        """The run was sent to `where` (one attempt), as `prompt_id` there when known."""

    def finished(self, job_id: str, key: str, where: str, entry: dict, download: Callable[[dict], bytes],
                 prompt_id: str | None = None) -> str:
        """The run ended on `where` with history `entry`; `download` gives the bytes of one of its image
        references. Returns its new state (pending: to be retried)."""

    def retry(self, job_id: str, key: str, where: str, message: str, **fields) -> None:
        """A failure another attempt, or another server, may not have."""

    def fail(self, job_id: str, key: str, message: str) -> None:
        """A failure every attempt would have (ComfyUI refused the workflow)."""

    def requeue(self, job_id: str, key: str, why: str) -> None:
        """A run an earlier invocation left running that cannot be followed where it went: run again."""

    def reattach(self, job_id: str, key: str, where: str, prompt_id: str) -> None:
        """A run waiting for another attempt is still on `where` as `prompt_id`: followed there, not sent again."""

    def annotate(self, job_id: str, key: str, **fields) -> None:
        """Fields of the run's record that change no state (None removes one)."""


class Executor(Protocol):
    """Where runs execute: ComfyUI servers a user runs, or workers that start their own."""

    resume_note: str  # what a resumed batch does with the runs that were in flight
    unusable: str  # what the scheduler gives up on: "no server has answered"

    def describe(self) -> str: ...

    def adopt_running(self) -> None:
        """Take over the runs the manifest says are running (an earlier invocation stopped while they ran)."""

    def free_slots(self) -> int:
        """How many more runs it could take now."""

    def submit(self, order: RunOrder) -> bool:
        """Send one run somewhere (Ledger.started), or record why it could not be (retry, fail). False when it
        has no room for this run now: it stays pending."""

    def poll(self) -> bool:
        """Look after the runs in flight; True when one ended."""

    def wait(self, seconds: float) -> None:
        """Idle until a run may have ended, at most `seconds`."""

    def unusable_for(self) -> float:
        """How long no server or worker has been usable (0 while one is)."""

    def stuck(self) -> str | None:
        """Why the batch cannot go on at all, when it cannot (every worker failed to start); else None."""

    def in_flight(self) -> str: ...

    def summary_lines(self) -> list[str]: ...

    def close(self) -> None: ...

