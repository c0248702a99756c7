"""The batch client's scheduler: runs dispatched to ComfyUI servers by shortest queue, retried, followed to the end."""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .best_of_n import rank_pictures, scored_pictures
from .http_api import (ComfyClient, RunError, ServerUnreachable, WorkflowRejected, describe_failure, output_images,
                    transient_failure)
from .files import keep_copy, save_images
from .jobs import Job
from .manifest import DONE, FAILED, PENDING, RUNNING, Manifest, now_iso
from .api_workflow import set_override, use_installed_checkpoints


BACKOFF_S = (2.0, 60.0)  # first back-off, longest back-off; doubling per attempt


@dataclass
class Server:
    url: str
    client: ComfyClient
    in_flight: set = field(default_factory=set)  # (job id, run key)
    queue_length: int = 0
    queue_read: float = float("-inf")
    down_since: float | None = None
    retry_at: float = 0.0
    failures: int = 0  # in a row
    uploads: dict = field(default_factory=dict)  # photo sha256 -> its name in the server's input folder
    runs_done: int = 0
    retries: int = 0
    settled: bool = False  # the runs abandoned on it were cancelled there or taken back since it last answered

    @property
    def up(self) -> bool:
        return self.down_since is None


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
        self.client_id = uuid.uuid4().hex
        self.servers = {url.rstrip("/"): Server(url.rstrip("/"), ComfyClient(url)) for url in args.server}
        self.not_before: dict[tuple[str, str], float] = {}  # back-off of runs to retry
        self.avoid: dict[tuple[str, str], str] = {}  # the server a retried run failed on
        self.running_since: dict[tuple[str, str], float] = {}  # first seen running on its server, in this invocation
        self.started = time.monotonic()
        self.images_saved = 0
        self.runs_ended_here = 0
        self.last_progress = 0.0
        self.notes_said: set[str] = set()

    # -- states --

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

    def fail(self, job_id: str, key: str, message: str) -> None:
        run = self.manifest.run(job_id, key)
        run.update(state=FAILED, error=message, finished=now_iso())
        self.release(job_id, key, run)
        self.runs_ended_here += 1
        self.manifest.save()
        self.say(f"failed  {job_id} {key}: " + message.replace("\n", "\n        "))

    def retry(self, job_id: str, key: str, server: Server, message: str) -> None:
        """A failure another attempt, or another server, may not have; the run fails after --max-attempts."""
        run = self.manifest.run(job_id, key)
        run["attempts"] += 1
        run["errors"].append(f"{server.url}: {message}")
        server.retries += 1
        if run["attempts"] >= self.args.max_attempts:
            self.fail(job_id, key, f"{run['attempts']} attempts failed; the last: {message}")
            return
        delay = backoff(run["attempts"])
        self.release(job_id, key, run)
        run["state"] = PENDING
        self.not_before[(job_id, key)] = time.monotonic() + delay
        self.avoid[(job_id, key)] = server.url
        self.manifest.save()
        self.say(f"retry   {job_id} {key} in {delay:.0f} s, on another server if one is free: {message}")

    def release(self, job_id: str, key: str, run: dict) -> None:
        server = self.servers.get(run.get("server") or "")
        if server is not None:
            server.in_flight.discard((job_id, key))
        self.running_since.pop((job_id, key), None)
        run.update(server=None, prompt_id=None)

    # -- servers --

    def server_down(self, server: Server, why: str) -> None:
        now = time.monotonic()
        if server.up:
            server.down_since = now
            self.say(f"server  {server.url} stopped answering ({why})")
        server.failures += 1
        server.retry_at = now + backoff(server.failures)
        server.settled = False
        for job_id, key in sorted(server.in_flight):
            # A server that only missed a timeout still runs it: remembered, to be cancelled or taken back there.
            run = self.manifest.run(job_id, key)
            run.setdefault("abandoned", []).append([server.url, run["prompt_id"]])
            self.retry(job_id, key, server, f"the server stopped answering ({why})")

    def server_up(self, server: Server) -> None:
        if not server.up:
            self.say(f"server  {server.url} answers again")
        server.down_since, server.failures = None, 0

    def read_queue(self, server: Server) -> dict | None:
        try:
            queue = server.client.get_json("/queue")
        except ServerUnreachable as error:
            self.server_down(server, error.reason)
            return None
        self.server_up(server)
        server.queue_length = len(queue.get("queue_running", [])) + len(queue.get("queue_pending", []))
        server.queue_read = time.monotonic()
        if not server.settled:
            self.settle_abandoned(server, {item[1] for item in queue.get("queue_running", []) + queue.get("queue_pending", [])})
        return queue

    def settle_abandoned(self, server: Server, queued: set) -> None:
        """The prompts left on `server` when it stopped answering (in this invocation or an earlier one): taken back
        where their run still waits for a server, cancelled where the run went elsewhere (no duplicate work)."""
        changed = False
        for job_id, key, run in list(self.runs()):
            for left in [left for left in run.get("abandoned", []) if left[0] == server.url]:
                prompt_id = left[1]
                try:
                    finished = prompt_id not in queued and prompt_id in server.client.get_json(f"/history/{prompt_id}")
                except ServerUnreachable as error:
                    self.server_down(server, error.reason)
                    return
                run["abandoned"].remove(left)
                changed = True
                if run["state"] == PENDING and (prompt_id in queued or finished):
                    run.update(state=RUNNING, server=server.url, prompt_id=prompt_id)
                    server.in_flight.add((job_id, key))
                    self.not_before.pop((job_id, key), None)
                    self.say(f"attach  {job_id} {key}: prompt {prompt_id} on {server.url}, which answers again")
                elif prompt_id in queued:
                    with contextlib.suppress(RunError):
                        server.client.cancel(prompt_id)
                    self.say(f"cancel  {job_id} {key}: prompt {prompt_id} on {server.url}, run elsewhere meanwhile")
            if not run.get("abandoned", True):
                del run["abandoned"]
        server.settled = True
        if changed:
            self.manifest.save()

    # -- dispatching --

    def ready_runs(self):
        now = time.monotonic()
        for job_id, key, run in self.runs(PENDING):
            if self.not_before.get((job_id, key), 0) <= now:
                yield job_id, key

    def choose_server(self, job_id: str, key: str) -> Server | None:
        now = time.monotonic()
        for server in self.servers.values():
            if len(server.in_flight) < self.args.max_in_flight and (server.up or now >= server.retry_at) \
                    and now - server.queue_read > self.args.poll:
                self.read_queue(server)
        free = [s for s in self.servers.values() if s.up and len(s.in_flight) < self.args.max_in_flight]
        if not free:
            return None
        others = [s for s in free if s.url != self.avoid.get((job_id, key))]
        return min(others or free, key=lambda s: (s.queue_length, len(s.in_flight), s.url))

    def upload(self, server: Server, job: Job) -> list[str]:
        names = []
        for face, digest in zip(job.faces, job.face_hashes):
            if digest not in server.uploads:
                server.uploads[digest] = server.client.upload_image(face)
                self.say(f"upload  {face} to {server.url} as {server.uploads[digest]}")
            names.append(server.uploads[digest])
        return names

    def note_once(self, text: str) -> None:
        if text not in self.notes_said:
            self.notes_said.add(text)
            self.say(f"note    {text}")

    def submit(self, job_id: str, key: str, server: Server) -> None:
        job = self.jobs[job_id]
        run = self.manifest.run(job_id, key)
        workflow = copy.deepcopy(job.workflow)
        try:
            for node_id, name in zip(job.loaders, self.upload(server, job)):
                workflow[node_id]["inputs"]["image"] = name
            if run["seed"] is not None:
                set_override(workflow, "seed", run["seed"])
            use_installed_checkpoints(workflow, server.client, report=lambda text: self.note_once(f"{server.url}: {text}"))
            prompt_id = server.client.submit(workflow, self.client_id)
        except ServerUnreachable as error:
            self.server_down(server, error.reason)
            return  # nothing ran: the run stays pending, for the next free server
        except WorkflowRejected as error:
            self.fail(job_id, key, str(error))
            return
        except RunError as error:
            self.retry(job_id, key, server, str(error))
            return
        server.in_flight.add((job_id, key))
        server.queue_length += 1
        run.update(state=RUNNING, server=server.url, prompt_id=prompt_id, submitted=time.time())
        self.manifest.save()

    def dispatch(self) -> bool:
        submitted = False
        for job_id, key in list(self.ready_runs()):
            server = self.choose_server(job_id, key)
            if server is None:
                break
            if self.manifest.run(job_id, key)["state"] != PENDING:
                continue  # taken back by a server that answered again while choose_server read its queue
            self.submit(job_id, key, server)
            submitted = True
        return submitted

    # -- following the runs on their servers --

    def adopt_running(self) -> None:
        """Runs a previous invocation left running: re-attached where their server is still in the list."""
        for job_id, key, run in list(self.runs(RUNNING)):
            server = self.servers.get(run.get("server") or "")
            if server is None:
                self.say(f"requeue {job_id} {key}: its server {run.get('server')} is not among --server")
                self.release(job_id, key, run)
                run["state"] = PENDING
            else:
                server.in_flight.add((job_id, key))
                self.say(f"attach  {job_id} {key}: prompt {run['prompt_id']} on {server.url}")
        self.manifest.save()

    def poll(self) -> bool:
        """Check every run in flight; True when one ended."""
        ended = False
        for server in self.servers.values():
            if not server.in_flight or not server.up and time.monotonic() < server.retry_at:
                continue
            queue = self.read_queue(server)  # read before /history: a prompt leaves the queue only once its history exists
            if queue is None:
                continue
            running = {item[1] for item in queue.get("queue_running", [])}
            waiting = running | {item[1] for item in queue.get("queue_pending", [])}
            for job_id, key in sorted(server.in_flight):
                if (job_id, key) in server.in_flight:  # not requeued by a failure of the server earlier in this loop
                    ended |= self.check_run(server, job_id, key, waiting, running)
        return ended

    def check_run(self, server: Server, job_id: str, key: str, waiting: set, running: set) -> bool:
        run = self.manifest.run(job_id, key)
        prompt_id = run["prompt_id"]
        if prompt_id in running:
            self.running_since.setdefault((job_id, key), time.monotonic())
        try:
            entry = server.client.get_json(f"/history/{prompt_id}").get(prompt_id)
        except ServerUnreachable as error:
            self.server_down(server, error.reason)
            return True
        if entry is not None and entry.get("status", {}).get("completed") is not None:
            return self.finish(server, job_id, key, entry)
        if prompt_id not in waiting and entry is None:
            self.retry(job_id, key, server, f"prompt {prompt_id} is gone from the server (it restarted?)")
            return True
        # From its start: time queued behind other users' prompts, or while this client was stopped, is no sign of a hang.
        if time.monotonic() - self.running_since.get((job_id, key), float("inf")) > self.args.job_timeout:
            with contextlib.suppress(RunError):  # gone or refusing: either way the run is tried again
                server.client.cancel(prompt_id)
            self.retry(job_id, key, server, f"no result within --job-timeout {self.args.job_timeout:g} s")
            return True
        return False

    def finish(self, server: Server, job_id: str, key: str, entry: dict) -> bool:
        if entry.get("status", {}).get("status_str") != "success":
            message = describe_failure(entry)
            if transient_failure(entry):
                self.retry(job_id, key, server, message)
            else:
                self.fail(job_id, key, message)
            return True
        job = self.jobs[job_id]
        try:
            scored = {node: scored_pictures(entry, node, saver) for node, saver in job.scorers.items()}
        except RunError as error:
            self.fail(job_id, key, str(error))
            return True
        final = self.outputs / job_id / key
        staging = final.with_name(f".{key}.partial")
        shutil.rmtree(staging, ignore_errors=True)
        try:
            saved = save_images(server.client, entry, staging)
        except ServerUnreachable as error:
            shutil.rmtree(staging, ignore_errors=True)
            self.server_down(server, error.reason)
            return True
        if not saved:
            shutil.rmtree(staging, ignore_errors=True)
            self.fail(job_id, key, "the workflow finished but produced no images (does it end in a Save Image node?)")
            return True
        # A folder already there holds this run's pictures from an invocation that stopped before writing the
        # manifest: replaced whole, so that the scores below name the files of this very download.
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        saved_by: dict[str, list[str]] = {}
        for (node_id, _), path in zip(output_images(entry), saved):
            saved_by.setdefault(node_id, []).append(str((final / path.name).relative_to(self.outputs.parent)))
        files = sorted(str(path.relative_to(self.outputs.parent)) for path in final.iterdir())
        run = self.manifest.run(job_id, key)
        prompt_id = run["prompt_id"]
        self.release(job_id, key, run)
        run.update(state=DONE, files=files, finished=now_iso(), done_on=server.url, prompt_id=prompt_id)
        if scored:
            run["scores"] = [{**picture, "node": node, "file": saved_by[job.scorers[node]][index] if images else None}
                             for node, (pictures, images) in sorted(scored.items()) for index, picture in enumerate(pictures)]
        server.runs_done += 1
        self.images_saved += len(files)
        self.runs_ended_here += 1
        self.manifest.save()
        best = max((picture["score"] for picture in run.get("scores", [])), default=None)
        self.say(f"done    {job_id} {key} on {server.url}: {len(files)} image(s)" + ("" if best is None else f", best score {best:.3f}"))
        self.decide_best(job_id)
        return True

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
                target = keep_copy(source, folder / f"best{rank:02d}_{key}_{batch_index}{source.suffix}")
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
        minutes = max(now - self.started, 1e-9) / 60
        rate = self.runs_ended_here / minutes
        left = counts[PENDING] + counts[RUNNING]
        eta = f", about {duration(left / rate * 60)} left" if rate > 0 and left else ""
        flight = ", ".join(f"{s.url} {len(s.in_flight)}{'' if s.up else ' (down)'}" for s in self.servers.values())
        self.say(f"[{time.strftime('%H:%M:%S')}] {counts[DONE]} done, {counts[FAILED]} failed, {counts[PENDING]} pending of "
                 f"{sum(counts.values())} runs; in flight: {flight}; {self.images_saved / minutes:.1f} images/min{eta}")

    def all_servers_down_for(self) -> float:
        downs = [s.down_since for s in self.servers.values()]
        return 0.0 if any(d is None for d in downs) else time.monotonic() - max(downs)

    def run_all(self) -> None:
        self.adopt_running()
        for job_id in self.jobs:  # jobs whose runs an earlier invocation finished (or --keep-best given only now)
            self.decide_best(job_id)
        while True:
            counts = self.counts()
            if not counts[PENDING] and not counts[RUNNING]:
                break
            if self.all_servers_down_for() > self.args.give_up_after:
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
    elapsed = time.monotonic() - batch.started
    lines.append("")
    if waiting:
        lines.append(f"best-of-N waits for every run of job(s) {', '.join(waiting)}: run again with --retry-failed to finish them")
    for server in batch.servers.values():
        lines.append(f"{server.url}: {server.runs_done} run(s) done here, {server.retries} retried elsewhere, "
                     f"{len(server.uploads)} photo(s) uploaded")
    lines.append(f"{batch.runs_ended_here} run(s) ended in {elapsed:.1f} s ({batch.runs_ended_here / max(elapsed, 1e-9):.2f} runs/s, "
                 f"{batch.images_saved / max(elapsed, 1e-9) * 60:.1f} images/min)")
    return "\n".join(lines)
