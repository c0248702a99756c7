"""The batch client's scheduler: the runs of the jobs file, their states in the manifest, retries with back-off,
the pictures and scores of finished runs, best-of-N and progress. Where runs execute is an executor's business
(executor.Executor, given by the command line); the executor reports back through executor.Ledger, which the
scheduler implements, and this scheduler alone writes the manifest and the output folders.

Its bookkeeping costs the same per run at ten runs and at a hundred thousand: the runs waiting to be sent are a
queue, those backing off a heap, the counts by state kept by the manifest."""

from __future__ import annotations

import heapq
import os
import shutil
import time
from collections import deque
from pathlib import Path

from .best_of_n import rank_pictures, scored_pictures
from .executor import Clock, Executor, Face, RunOrder, backoff
from .files import best_file_name, keep_copy, save_images
from .http_api import RunError, describe_failure, output_images, transient_failure
from .jobs import Job
from .manifest import DONE, FAILED, PENDING, RUNNING, Manifest, now_iso

SUMMARY_ROWS = 100  # jobs listed one per line at the end; a batch of thousands lists those not done


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


class GiveUp(Exception):
    pass


class Scheduler:
    """Sends the manifest's pending runs to an executor as it has room, and records what becomes of them."""

    def __init__(self, jobs: list[Job], manifest: Manifest, run_dir: Path, max_attempts: int = 3, poll: float = 0.5,
                 give_up_after: float = 600.0, progress_every: float = 10.0, say=print, clock: Clock | None = None):
        self.jobs = {job.id: job for job in jobs}
        self.manifest = manifest
        self.outputs = run_dir / "outputs"
        self.max_attempts = max_attempts
        self.poll_s = poll
        self.give_up_after = give_up_after
        self.progress_every = progress_every
        self.say = say
        self.clock = clock or Clock()
        self.executor: Executor | None = None
        self.ready: deque[tuple[str, str]] = deque()  # pending runs to send, first first
        self.backing_off: dict[tuple[str, str], float] = {}  # retried runs -> when they may go again
        self.wake_ups: list[tuple[float, str, str]] = []  # the same, as a heap
        self.avoid: dict[tuple[str, str], str] = {}  # where a retried run failed
        self.images_saved = 0
        self.runs_ended_here = 0
        self.first_sent_at: float | None = None  # rates count from the first run sent: starting workers is left out
        self.last_ended_at: float | None = None  # ... to the last that ended: shutting them down is left out too
        self.last_progress = 0.0
        self.notes_said: set[str] = set()

    # -- the loop --

    def start(self, executor: Executor) -> None:
        """Take `executor` on: the pending runs queued, those an earlier invocation left running handed to it."""
        self.executor = executor
        self.ready.extend(self.manifest.keys_in(PENDING))
        with self.manifest.changes():
            executor.adopt_running()
            self.decide_all_best()

    def run(self, executor: Executor) -> None:
        self.start(executor)
        while self.unfinished():
            why = executor.stuck()
            if why:
                raise GiveUp(why)
            if executor.unusable_for() > self.give_up_after:
                raise GiveUp(f"{executor.unusable} for {self.give_up_after:g} s")
            with self.manifest.changes():  # what one look at the executor changed, one transaction
                busy = executor.poll()
                busy |= self.dispatch()
            self.progress()
            if not busy:
                executor.wait(self.poll_s)
        self.progress(force=True)

    def decide_all_best(self) -> None:
        """Best-of-N of the jobs whose runs an earlier invocation finished (or --keep-best given only now)."""
        for job in self.jobs.values():
            if job.keep_best:
                self.decide_best(job.id)

    def unfinished(self) -> int:
        counts = self.manifest.counts()
        return counts[PENDING] + counts[RUNNING]

    def dispatch(self) -> bool:
        now = self.clock.now()
        while self.wake_ups and self.wake_ups[0][0] <= now:
            _, job_id, key = heapq.heappop(self.wake_ups)
            if self.backing_off.get((job_id, key), now + 1) <= now:
                del self.backing_off[(job_id, key)]
                self.ready.appendleft((job_id, key))  # retries before runs not tried yet
        sent = False
        while self.ready and self.executor.free_slots() > 0:
            job_id, key = self.ready.popleft()
            if self.manifest.state(job_id, key) != PENDING or (job_id, key) in self.backing_off:
                continue  # taken back where it was (reattach), or ended (a job that turned bad) since it was queued
            if not self.executor.submit(self.order(job_id, key)):
                self.ready.appendleft((job_id, key))
                break
            sent = True
            if self.manifest.state(job_id, key) == PENDING and (job_id, key) not in self.backing_off:
                self.ready.appendleft((job_id, key))  # not sent: the server it went to stopped answering
                break
        return sent

    def order(self, job_id: str, key: str) -> RunOrder:
        job = self.jobs[job_id]
        return RunOrder(job_id, key, job.workflow, job.loaders, [Face(path, digest) for path, digest in zip(job.faces, job.face_hashes)],
                        self.manifest.run(job_id, key)["seed"], self.avoid.get((job_id, key)))

    # -- the ledger: what the executor reports (executor.Ledger) --

    def record(self, job_id: str, key: str) -> dict:
        return self.manifest.run(job_id, key)

    def runs_in(self, state: str) -> list[tuple[str, str]]:
        return self.manifest.keys_in(state)

    def runs_with(self, name: str) -> list[tuple[str, str]]:
        return self.manifest.keys_with(name)

    def started(self, job_id: str, key: str, where: str, prompt_id: str | None) -> None:
        attempts = self.manifest.run(job_id, key)["attempts"] + 1
        self.manifest.move(job_id, key, RUNNING, server=where, prompt_id=prompt_id, submitted=time.time(), attempts=attempts)
        if self.first_sent_at is None:
            self.first_sent_at = self.clock.now()

    def ended(self) -> None:
        self.runs_ended_here += 1
        self.last_ended_at = self.clock.now()

    def fail(self, job_id: str, key: str, message: str, **fields) -> None:
        self.manifest.move(job_id, key, FAILED, error=message, finished=now_iso(), **fields)
        self.ended()
        self.say(f"failed  {job_id} {key}: " + message.replace("\n", "\n        "))

    def retry(self, job_id: str, key: str, where: str, message: str, **fields) -> None:
        """A failure another attempt, or another server, may not have; the run fails once it was sent
        --max-attempts times."""
        run = self.manifest.run(job_id, key)
        attempts, errors = run["attempts"], [*run["errors"], f"{where}: {message}"]
        if attempts >= self.max_attempts:
            self.fail(job_id, key, f"{attempts} attempts failed; the last: {message}", errors=errors, **fields)
            return
        delay = backoff(attempts)
        self.manifest.move(job_id, key, PENDING, errors=errors, **fields)
        self.back_off(job_id, key, delay)
        self.avoid[(job_id, key)] = where
        self.last_ended_at = self.clock.now()
        self.say(f"retry   {job_id} {key} in {delay:.0f} s, elsewhere if another is free: {message}")

    def back_off(self, job_id: str, key: str, delay: float) -> None:
        at = self.clock.now() + delay
        self.backing_off[(job_id, key)] = at
        heapq.heappush(self.wake_ups, (at, job_id, key))

    def requeue(self, job_id: str, key: str, why: str) -> None:
        run = self.manifest.run(job_id, key)
        if run["attempts"] >= self.max_attempts:
            self.manifest.move(job_id, key, FAILED, finished=now_iso(), error=(
                f"{run['attempts']} attempts, the last cut short when the client stopped; --retry-failed runs it again"))
            self.say(f"failed  {job_id} {key}: its last attempt was cut short when the client stopped ({why})")
            return
        self.manifest.move(job_id, key, PENDING)
        self.ready.appendleft((job_id, key))
        self.say(f"requeue {job_id} {key}: {why}")

    def reattach(self, job_id: str, key: str, where: str, prompt_id: str) -> None:
        self.manifest.move(job_id, key, RUNNING, server=where, prompt_id=prompt_id)
        self.backing_off.pop((job_id, key), None)
        self.say(f"attach  {job_id} {key}: prompt {prompt_id} on {where}, which answers again")

    def annotate(self, job_id: str, key: str, **fields) -> None:
        self.manifest.annotate(job_id, key, **fields)

    def note_once(self, text: str) -> None:
        if text not in self.notes_said:
            self.notes_said.add(text)
            self.say(f"note    {text}")

    # -- finished runs --

    def finished(self, job_id: str, key: str, where: str, entry: dict, download, prompt_id: str | None = None) -> str:
        """A run that `where` reports ended (as `prompt_id` there, when the manifest does not know it), from its
        history `entry`; `download` gives the bytes of one of its image references. Returns the run's new state
        (pending: retried)."""
        if entry.get("status", {}).get("status_str") != "success":
            message = describe_failure(entry)
            if transient_failure(entry):
                self.retry(job_id, key, where, message)
                return PENDING
            self.fail(job_id, key, message)
            return FAILED
        job = self.jobs[job_id]
        try:
            scored = {node: scored_pictures(entry, node, saver) for node, saver in job.scorers.items()}
        except RunError as error:
            self.fail(job_id, key, str(error))
            return FAILED
        final = self.outputs / job_id / key
        staging = final.with_name(f".{key}.partial")
        shutil.rmtree(staging, ignore_errors=True)
        try:
            saved = save_images(download, entry, staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if not saved:
            shutil.rmtree(staging, ignore_errors=True)
            self.fail(job_id, key, "the workflow finished but produced no images (does it end in a Save Image node?)")
            return FAILED
        # A folder already there holds this run's pictures from an invocation that stopped before writing the
        # manifest: replaced whole, so that the scores below name the files of this very download.
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        folder = f"{self.outputs.name}/{job_id}/{key}/"  # the files as the manifest names them, from the run directory
        saved_by: dict[str, list[str]] = {}
        for (node_id, _), path in zip(output_images(entry), saved):
            saved_by.setdefault(node_id, []).append(folder + path.name)
        files = sorted({folder + path.name for path in saved})
        scores = [{**picture, "node": node, "file": saved_by[job.scorers[node]][index] if images else None}
                  for node, (pictures, images) in sorted(scored.items()) for index, picture in enumerate(pictures)]
        prompt_id = prompt_id or self.manifest.run(job_id, key)["prompt_id"]
        self.manifest.move(job_id, key, DONE, files=files, finished=now_iso(), done_on=where, prompt_id=prompt_id,
                           **({"scores": scores} if scores else {}))
        self.images_saved += len(files)
        self.ended()
        best = max((picture["score"] for picture in scores), default=None)
        self.say(f"done    {job_id} {key} on {where}: {len(files)} image(s)" + ("" if best is None else f", best score {best:.3f}"))
        self.decide_best(job_id)
        return DONE

    # -- best of N --

    def decide_best(self, job_id: str) -> None:
        """Once every run of a best-of-N job is done: its best keep_best pictures across its seeds, ranked as the
        runner ranks them (highest score, then the seed listed first, then batch order), copied to
        outputs/<job>/best/ and marked in the manifest. Decided once, from the manifest alone: later invocations
        keep the decision."""
        job = self.jobs[job_id]
        if not job.keep_best:
            return
        decided = self.manifest.best(job_id)
        if decided is not None:
            if decided["keep_best"] != job.keep_best:
                self.note_once(f"job {job_id}: its best {decided['keep_best']} picture(s) were chosen by an earlier invocation "
                               f"and are kept; give the job a new id to choose its best {job.keep_best} afresh")
            return
        if any(self.manifest.state(job_id, key) != DONE for key in job.run_keys()):
            return  # summary() names the failed runs best-of-N waits for
        runs = [(key, self.manifest.run(job_id, key)) for key in job.run_keys()]
        candidates = [{"pictures": [picture for picture in run.get("scores", []) if picture["node"] == job.best_node]} for _, run in runs]
        unranked = [key for (key, _), candidate in zip(runs, candidates)
                    if not candidate["pictures"] or any(picture["file"] is None for picture in candidate["pictures"])]
        if unranked:
            self.note_once(f"job {job_id}: no best-of-N: run(s) {', '.join(unranked)} were done without scores from node {job.best_node} "
                           f"(before the workflow had it?); give the job a new id to run it afresh")
            return
        folder = self.outputs / job_id / "best"
        folder.mkdir(parents=True, exist_ok=True)
        kept, marked = [], {}
        for rank, (index, batch_index) in enumerate(rank_pictures(candidates)[:job.keep_best], start=1):
            key, run = runs[index]
            picture = next(p for p in candidates[index]["pictures"] if p["batch_index"] == batch_index)
            source = self.outputs.parent / picture["file"]
            try:
                target = keep_copy(source, folder / best_file_name(rank, run["seed"], batch_index, source.suffix))
            except OSError as error:
                self.note_once(f"job {job_id}: no best-of-N: cannot copy {source} ({error.strerror}); run again once it is back")
                return
            picture["kept_as"] = str(target.relative_to(self.outputs.parent))
            marked[key] = run
            kept.append({"rank": rank, "run": key, "seed": run["seed"], "batch_index": batch_index, "score": picture["score"],
                         "file": picture["file"], "kept_as": picture["kept_as"]})
        self.manifest.decide_best(job_id, {"keep_best": job.keep_best, "node": job.best_node, "decided": now_iso(), "pictures": kept},
                                  marked)
        self.say(f"best    {job_id}: " + ", ".join(f"{Path(k['kept_as']).name} ({k['score']:.3f})" for k in kept))

    # -- progress --

    def elapsed(self) -> float:
        """Seconds from the first run sent to the last that ended."""
        if self.first_sent_at is None:
            return 0.0
        return max((self.last_ended_at or self.clock.now()) - self.first_sent_at, 0.0)

    def progress(self, force: bool = False) -> None:
        now = self.clock.now()
        if not force and now - self.last_progress < self.progress_every:
            return
        self.last_progress = now
        counts = self.manifest.counts()
        minutes = max(now - (self.first_sent_at or now), 1e-9) / 60
        rate = self.runs_ended_here / minutes
        left = counts[PENDING] + counts[RUNNING]
        eta = f", about {duration(left / rate * 60)} left" if rate > 0 and left else ""
        self.say(f"[{time.strftime('%H:%M:%S')}] {counts[DONE]} done, {counts[FAILED]} failed, {counts[PENDING]} pending of "
                 f"{sum(counts.values())} runs; in flight: {self.executor.in_flight() if self.executor else 'none'}; "
                 f"{self.images_saved / minutes:.1f} images/min{eta}")


def summary(scheduler: Scheduler, executor: Executor | None) -> str:
    rows, waiting, quiet = [("job", "runs done", "failed", "images", "best score", "first error")], [], 0
    manifest = scheduler.manifest
    for job_id, job in scheduler.jobs.items():
        states = [manifest.state(job_id, key) for key in job.run_keys()]
        if len(scheduler.jobs) > SUMMARY_ROWS and all(state == DONE for state in states):
            quiet += 1  # a long batch lists the jobs that are not done; the others are counted
            continue
        mine = [manifest.read_run(job_id, key) for key in job.run_keys()]
        decided = manifest.best(job_id)
        errors = [run["error"].splitlines()[0] for run in mine if run["state"] == FAILED]
        scores = [picture["score"] for run in mine if run["state"] == DONE for picture in run.get("scores", [])]
        best = f"{max(scores):.3f}" + (f" ({len(decided['pictures'])} kept)" if decided else "") if scores else ""
        rows.append((job_id, f"{states.count(DONE)}/{len(mine)}", str(states.count(FAILED)),
                     str(sum(len(r.get("files", [])) for r in mine if r["state"] == DONE)), best, errors[0] if errors else ""))
        if job.keep_best and not decided and errors and all(state in (DONE, FAILED) for state in states):
            waiting.append(job_id)
    if not any(row[4] for row in rows[1:]):  # no job scores its pictures: no best score column
        rows = [row[:4] + row[5:] for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row[:-1], widths)) + ("  " + row[-1] if row[-1] else "") for row in rows]
    if quiet:
        lines.append(f"and {quiet} more job(s), every run done")
    lines.append("")
    if waiting:
        lines.append(f"best-of-N waits for every run of job(s) {', '.join(waiting)}: run again with --retry-failed to finish them")
    if executor is not None:
        lines.extend(executor.summary_lines())
    elapsed = scheduler.elapsed()
    lines.append(f"{scheduler.runs_ended_here} run(s) ended in {elapsed:.1f} s ({scheduler.runs_ended_here / max(elapsed, 1e-9):.2f} runs/s, "
                 f"{scheduler.images_saved / max(elapsed, 1e-9) * 60:.1f} images/min)")
    return "\n".join(lines)
