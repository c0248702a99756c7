"""The batch client's scheduler: the runs of the jobs file, their states in the manifest, retries with back-off,
the pictures and scores of finished runs, best-of-N and progress. Where runs execute is an executor's business:
ComfyUI servers the user runs (servers.ServerExecutor) or workers on a Ray cluster (ray_workers.RayExecutor);
either only submits and follows runs, and this scheduler alone writes the manifest and the output folders."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import threading
import time
from pathlib import Path

from .best_of_n import rank_pictures, scored_pictures
from .files import best_file_name, keep_copy, save_images
from .http_api import RunError, describe_failure, output_images, transient_failure
from .jobs import Job
from .manifest import DONE, FAILED, PENDING, RUNNING, Manifest, now_iso

BACKOFF_S = (2.0, 60.0)  # first back-off, longest back-off; doubling per attempt


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


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def backoff(attempt: int) -> float:
    return min(BACKOFF_S[0] * 2 ** max(attempt - 1, 0), BACKOFF_S[1])


class Batch:
    def __init__(self, args: argparse.Namespace, jobs: list[Job], manifest: Manifest, run_dir: Path, say=print):
        self.args = args
        self.jobs = {job.id: job for job in jobs}
        self.manifest = manifest
        self.outputs = run_dir / "outputs"
        self.say = say
        self.not_before: dict[tuple[str, str], float] = {}  # back-off of runs to retry
        self.avoid: dict[tuple[str, str], str] = {}  # where a retried run failed
        self.images_saved = 0
        self.runs_ended_here = 0
        self.last_progress = 0.0
        self.notes_said: set[str] = set()
        if args.ray is None:
            from .servers import ServerExecutor

            self.executor = ServerExecutor(self, args.server)
        else:
            from .ray_workers import RayExecutor  # imports Ray: only with --ray

            self.executor = RayExecutor(self, args)
        self.started_at = time.monotonic()  # rates count from here: starting Ray's workers and their ComfyUIs is left out

    def dispatch(self) -> bool:
        return self.executor.dispatch()

    def poll(self) -> bool:
        return self.executor.poll()

    def close(self) -> None:
        self.executor.close()

    # -- states (the manifest's transitions) --

    def runs(self, state: str | None = None):
        for job_id, job in self.jobs.items():
            for key in job.run_keys():
                run = self.manifest.run(job_id, key)
                if state is None or run["state"] == state:
                    yield job_id, key, run

    def counts(self) -> dict[str, int]:
        counts = {PENDING: 0, RUNNING: 0, DONE: 0, FAILED: 0}
        for _, _, run in self.runs():
            counts[run["state"]] += 1
        return counts

    def ready_runs(self):
        now = time.monotonic()
        for job_id, key, run in self.runs(PENDING):
            if self.not_before.get((job_id, key), 0) <= now:
                yield job_id, key

    def started(self, job_id: str, key: str, where: str, prompt_id: str | None) -> None:
        self.manifest.move(job_id, key, RUNNING, server=where, prompt_id=prompt_id, submitted=time.time())

    def fail(self, job_id: str, key: str, message: str, **fields) -> None:
        self.manifest.move(job_id, key, FAILED, error=message, finished=now_iso(), **fields)
        self.runs_ended_here += 1
        self.say(f"failed  {job_id} {key}: " + message.replace("\n", "\n        "))

    def retry(self, job_id: str, key: str, where: str, message: str, **fields) -> None:
        """A failure another attempt, or another server, may not have; the run fails after --max-attempts."""
        run = self.manifest.run(job_id, key)
        attempts, errors = run["attempts"] + 1, [*run["errors"], f"{where}: {message}"]
        if attempts >= self.args.max_attempts:
            self.fail(job_id, key, f"{attempts} attempts failed; the last: {message}", attempts=attempts, errors=errors, **fields)
            return
        delay = backoff(attempts)
        self.manifest.move(job_id, key, PENDING, attempts=attempts, errors=errors, **fields)
        self.not_before[(job_id, key)] = time.monotonic() + delay
        self.avoid[(job_id, key)] = where
        self.say(f"retry   {job_id} {key} in {delay:.0f} s, on another server if one is free: {message}")

    def requeue(self, job_id: str, key: str, why: str) -> None:
        """A run in flight when an earlier invocation stopped, which cannot be followed where it went: run again."""
        self.manifest.move(job_id, key, PENDING)
        self.say(f"requeue {job_id} {key}: {why}")

    def note_once(self, text: str) -> None:
        if text not in self.notes_said:
            self.notes_said.add(text)
            self.say(f"note    {text}")

    # -- finished runs --

    def finish(self, job_id: str, key: str, where: str, entry: dict, download, prompt_id: str | None = None) -> str:
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
        saved_by: dict[str, list[str]] = {}
        for (node_id, _), path in zip(output_images(entry), saved):
            saved_by.setdefault(node_id, []).append(str((final / path.name).relative_to(self.outputs.parent)))
        files = sorted(str(path.relative_to(self.outputs.parent)) for path in final.iterdir())
        scores = [{**picture, "node": node, "file": saved_by[job.scorers[node]][index] if images else None}
                  for node, (pictures, images) in sorted(scored.items()) for index, picture in enumerate(pictures)]
        prompt_id = prompt_id or self.manifest.run(job_id, key)["prompt_id"]
        self.manifest.move(job_id, key, DONE, files=files, finished=now_iso(), done_on=where, prompt_id=prompt_id,
                           **({"scores": scores} if scores else {}))
        self.images_saved += len(files)
        self.runs_ended_here += 1
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
        entry = self.manifest.data["jobs"][job_id]
        if not job.keep_best:
            return
        if "best" in entry:
            if entry["best"]["keep_best"] != job.keep_best:
                self.note_once(f"job {job_id}: its best {entry['best']['keep_best']} picture(s) were chosen by an earlier invocation "
                               f"and are kept; give the job a new id to choose its best {job.keep_best} afresh")
            return
        runs = [(key, self.manifest.run(job_id, key)) for key in job.run_keys()]
        if any(run["state"] != DONE for _, run in runs):
            return  # summary() names the failed runs best-of-N waits for
        candidates = [{"pictures": [picture for picture in run.get("scores", []) if picture["node"] == job.best_node]} for _, run in runs]
        unranked = [key for (key, _), candidate in zip(runs, candidates)
                    if not candidate["pictures"] or any(picture["file"] is None for picture in candidate["pictures"])]
        if unranked:
            self.note_once(f"job {job_id}: no best-of-N: run(s) {', '.join(unranked)} were done without scores from node {job.best_node} "
                           f"(before the workflow had it?); give the job a new id to run it afresh")
            return
        folder = self.outputs / job_id / "best"
        folder.mkdir(parents=True, exist_ok=True)
        kept = []
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
            kept.append({"rank": rank, "run": key, "seed": run["seed"], "batch_index": batch_index, "score": picture["score"],
                         "file": picture["file"], "kept_as": picture["kept_as"]})
        entry["best"] = {"keep_best": job.keep_best, "node": job.best_node, "decided": now_iso(), "pictures": kept}
        self.manifest.save()
        self.say(f"best    {job_id}: " + ", ".join(f"{Path(k['kept_as']).name} ({k['score']:.3f})" for k in kept))

    # -- progress --

    def progress(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_progress < self.args.progress_every:
            return
        self.last_progress = now
        counts = self.counts()
        minutes = max(now - self.started_at, 1e-9) / 60
        rate = self.runs_ended_here / minutes
        left = counts[PENDING] + counts[RUNNING]
        eta = f", about {duration(left / rate * 60)} left" if rate > 0 and left else ""
        self.say(f"[{time.strftime('%H:%M:%S')}] {counts[DONE]} done, {counts[FAILED]} failed, {counts[PENDING]} pending of "
                 f"{sum(counts.values())} runs; in flight: {self.executor.in_flight()}; {self.images_saved / minutes:.1f} images/min{eta}")

    def run_all(self) -> None:
        self.executor.adopt_running()
        self.manifest.save()
        for job_id in self.jobs:  # jobs whose runs an earlier invocation finished (or --keep-best given only now)
            self.decide_best(job_id)
        while True:
            counts = self.counts()
            if not counts[PENDING] and not counts[RUNNING]:
                break
            if self.executor.unreachable_for() > self.args.give_up_after:
                raise GiveUp(f"no server has answered for {self.args.give_up_after:g} s")
            busy = self.poll()
            busy |= self.dispatch()
            self.progress()
            if not busy:
                time.sleep(self.args.poll)
        self.progress(force=True)


class GiveUp(Exception):
    pass


def summary(batch: Batch) -> str:
    rows, waiting = [("job", "runs done", "failed", "images", "best score", "first error")], []
    for job_id, job in batch.jobs.items():
        entry = batch.manifest.data["jobs"][job_id]
        mine = [entry["runs"][key] for key in job.run_keys()]
        errors = [run["error"].splitlines()[0] for run in mine if run["state"] == FAILED]
        scores = [picture["score"] for run in mine if run["state"] == DONE for picture in run.get("scores", [])]
        best = f"{max(scores):.3f}" + (f" ({len(entry['best']['pictures'])} kept)" if "best" in entry else "") if scores else ""
        rows.append((job_id, f"{sum(r['state'] == DONE for r in mine)}/{len(mine)}", str(sum(r["state"] == FAILED for r in mine)),
                     str(sum(len(r.get("files", [])) for r in mine if r["state"] == DONE)), best, errors[0] if errors else ""))
        if job.keep_best and "best" not in entry and errors and all(run["state"] in (DONE, FAILED) for run in mine):
            waiting.append(job_id)
    if not any(row[4] for row in rows[1:]):  # no job scores its pictures: no best score column
        rows = [row[:4] + row[5:] for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row[:-1], widths)) + ("  " + row[-1] if row[-1] else "") for row in rows]
    elapsed = time.monotonic() - batch.started_at
    lines.append("")
    if waiting:
        lines.append(f"best-of-N waits for every run of job(s) {', '.join(waiting)}: run again with --retry-failed to finish them")
    lines.extend(batch.executor.summary_lines())
    lines.append(f"{batch.runs_ended_here} run(s) ended in {elapsed:.1f} s ({batch.runs_ended_here / max(elapsed, 1e-9):.2f} runs/s, "
                 f"{batch.images_saved / max(elapsed, 1e-9) * 60:.1f} images/min)")
    return "\n".join(lines)
