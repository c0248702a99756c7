#!/usr/bin/env python3
"""Run a jobs file of Face-diffuser workflows across several ComfyUI servers; stop it and run it again to resume.

    python scripts/facediffuser_batch.py jobs.jsonl --server http://gpu1:8188 --server http://gpu2:8188

One job per line of the jobs file (JSON Lines, example: workflows/jobs_example.jsonl): the workflow, the face
photos in marker order, the prompt, the seeds (or a count of them) and any of the runner's overrides. Each
seed of a job is one ComfyUI prompt, a "run". Runs go to the server with the shortest queue (ComfyUI's
/queue), at most --max-in-flight per server; each photo is uploaded once per server. The run directory
holds manifest.json, every run's state rewritten atomically after each change (pending; running on which
server as which prompt id; done with its files; failed with the error), and the pictures under
outputs/<job>/<run>/. Running the same command again skips what is done, re-attaches to runs still on a
server (by prompt id, through /history), and queues again what a vanished server lost. ComfyUI's validation
errors fail that job, node by node; a server that stops answering, a lost or interrupted run is retried on
another server after a back-off, at most --max-attempts times.

With a Face-diffuser Identity Score node in a job's workflow, every picture's per-subject scores go into
the manifest beside its files. Best-of-N ("keep_best" in a job, or --keep-best for all): once every run of
the job is done, its best pictures across its seeds are copied to outputs/<job>/best/ and marked in the
manifest; that decision is made once and kept by later invocations.

Like the runner, whose ComfyUI client it uses, it needs only Python's standard library.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import filecmp
import hashlib
import json
import os
import re
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the runner, a sibling script

import facediffuser_run as runner  # noqa: E402

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
# Runner overrides a job may set, besides the prompt and the seed, which jobs set in their own way.
OVERRIDES = tuple(option for option in runner.OVERRIDE_TARGETS if option not in ("prompt", "seed"))
JOB_KEYS = {"id", "workflow", "faces", "prompt", "seeds", "count", "seed", "keep_best", *OVERRIDES}
JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
PENDING, RUNNING, DONE, FAILED = "pending", "running", "done", "failed"
BACKOFF_S = (2.0, 60.0)  # first back-off, longest back-off; doubling per attempt
TRANSIENT_EXCEPTIONS = ("OutOfMemory",)  # execution errors another server (another GPU) may not have


class JobsFileError(Exception):
    """The jobs file cannot be read as a whole (a line that is not JSON, two jobs with one id)."""


# --- the jobs file -----------------------------------------------------------------------------------------


@dataclass
class Job:
    id: str
    line: int
    spec: dict
    workflow: dict | None = None  # with the job's prompt and overrides set; None when the job cannot run
    faces: list[Path] = field(default_factory=list)
    face_hashes: list[str] = field(default_factory=list)
    loaders: list[str] = field(default_factory=list)  # LoadImage node ids taking the faces, in order
    seeds: list[int | None] = field(default_factory=list)  # None: the workflow's own seed
    scorers: dict[str, str | None] = field(default_factory=dict)  # Identity Score node id -> Save Image node of its pictures
    keep_best: int = 0  # best-of-N: pictures kept across the job's seeds; 0 keeps no selection
    best_node: str | None = None  # the Identity Score node best-of-N ranks by
    problem: str | None = None  # why the job fails without running

    def run_keys(self) -> list[str]:
        return [run_key(seed) for seed in self.seeds]


def run_key(seed: int | None) -> str:
    return "seed-workflow" if seed is None else f"seed-{seed}"


def job_id(spec: dict) -> str:
    """The job's "id", else one derived from the line's content, so that it survives reordering the file."""
    if "id" in spec:
        return str(spec["id"])
    return "job-" + hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def job_seeds(spec: dict) -> list[int | None]:
    if "seeds" in spec and ("count" in spec or "seed" in spec):
        raise runner.RunError('give either "seeds" or "count" (with an optional first "seed"), not both')
    if "seeds" in spec:
        seeds = spec["seeds"]
        if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            raise runner.RunError('"seeds" must be a non-empty list of integers')
        if len(set(seeds)) != len(seeds):
            raise runner.RunError('"seeds" lists a seed twice')
        return list(seeds)
    count, first = spec.get("count", 1), spec.get("seed")
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise runner.RunError('"count" must be an integer of 1 or more')
    if first is not None and (not isinstance(first, int) or isinstance(first, bool)):
        raise runner.RunError('"seed" must be an integer')
    if first is None:
        return [None] if count == 1 else list(range(count))
    return list(range(first, first + count))


def identity_scorers(workflow: dict) -> dict[str, str | None]:
    """Each Identity Score node of the workflow -> the Save Image node saving the pictures it scores (None: none
    does, and its scores name no file)."""
    scorers = {}
    for node_id, node in workflow.items():
        if node["class_type"] == runner.IDENTITY_NODE:
            try:
                scorers[node_id] = runner.scored_pictures_saver(workflow, node_id)
            except runner.RunError:
                scorers[node_id] = None
    return scorers


def best_of_n_node(workflow: dict, from_command_line: bool) -> str:
    """The Identity Score node the job's best-of-N ranks by; an error naming the fix when the workflow has none
    (or several, or none whose pictures are saved)."""
    asked_by, opt_out = (('--keep-best (for the jobs without "keep_best")', 'or give this job "keep_best": 0') if from_command_line
                         else ('"keep_best"', 'or take "keep_best" out of this job'))
    try:
        node = runner.identity_score_node(workflow, asked_by)
        runner.scored_pictures_saver(workflow, node, asked_by)
    except runner.RunError as error:
        raise runner.RunError(f"{error}; {opt_out}") from None
    return node


def prepare_job(job: Job, base: Path, keep_best: int = 0) -> None:
    """Read the job's workflow and photos and set its prompt and overrides; a problem is kept on the job.
    `keep_best` is the best-of-N of the jobs that set no "keep_best"."""
    spec = job.spec
    try:
        unknown = sorted(set(spec) - JOB_KEYS)
        if unknown:
            raise runner.RunError(f"unknown key(s) {', '.join(unknown)}; a job takes {', '.join(sorted(JOB_KEYS))}")
        if not JOB_ID.fullmatch(job.id):
            raise runner.RunError(f'"id" {job.id!r} must be letters, digits, ".", "_" or "-" (it names the job\'s output folder)')
        faces = spec.get("faces", [])
        if not isinstance(faces, list) or not all(isinstance(face, str) for face in faces):
            raise runner.RunError('"faces" must be a list of photo paths, in the order of the prompt\'s <|image|> markers')
        job.faces = [(base / face).expanduser() for face in faces]
        job.seeds = job_seeds(spec)
        keep_best = spec.get("keep_best", keep_best)
        if not isinstance(keep_best, int) or isinstance(keep_best, bool) or keep_best < 0:
            raise runner.RunError('"keep_best" must be an integer: the pictures to keep across the job\'s seeds (0: no best-of-N)')
        workflow_path = base / spec["workflow"] if "workflow" in spec else runner.shipped_workflow(len(job.faces))
        workflow = runner.load_api_workflow(Path(workflow_path))
        if "prompt" in spec:
            runner.set_override(workflow, "prompt", spec["prompt"])
        for option in OVERRIDES:
            if option in spec:
                runner.set_override(workflow, option, spec[option])
        if job.seeds != [None]:
            runner.set_override(copy.deepcopy(workflow), "seed", 0)  # the workflow must take a seed
        if job.faces:
            job.loaders = runner.reference_image_loaders(workflow)
            if len(job.loaders) != len(job.faces):
                raise runner.RunError(f'"faces" lists {len(job.faces)} photo(s) but the workflow loads {len(job.loaders)} reference '
                                      f"photo(s) (LoadImage nodes {', '.join(job.loaders) or 'none'})")
        for face in job.faces:
            try:
                job.face_hashes.append(file_hash(face))
            except OSError as error:
                raise runner.RunError(f"cannot read the photo {face}: {error.strerror}") from None
        job.scorers = identity_scorers(workflow)
        if keep_best:
            job.best_node = best_of_n_node(workflow, from_command_line="keep_best" not in spec)
        job.keep_best = keep_best
        job.workflow = workflow
    except runner.RunError as error:
        job.problem = str(error)
        job.seeds = job.seeds or [None]  # one run to carry the failure into the manifest and the summary


def load_jobs(path: Path, keep_best: int = 0) -> list[Job]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise JobsFileError(f"cannot read the jobs file {path}: {error.strerror}") from None
    jobs, seen = [], {}
    for number, text in enumerate(lines, 1):
        if not text.strip() or text.lstrip().startswith("#"):
            continue
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as error:
            raise JobsFileError(f"{path}, line {number}: not a JSON object ({error})") from None
        if not isinstance(spec, dict):
            raise JobsFileError(f"{path}, line {number}: a job is a JSON object ({{...}}), got {type(spec).__name__}")
        job = Job(job_id(spec), number, spec)
        if job.id in seen:
            raise JobsFileError(f"{path}, lines {seen[job.id]} and {number}: both are job {job.id!r}; give each job its own \"id\"")
        seen[job.id] = number
        prepare_job(job, path.parent, keep_best)
        jobs.append(job)
    if not jobs:
        raise JobsFileError(f"{path} has no jobs (one JSON object per line)")
    return jobs


# --- the manifest ------------------------------------------------------------------------------------------


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Manifest:
    """manifest.json of a run directory: every run of every job, written whole to a temporary file and renamed
    over the old one, so that it is valid whenever the batch stops, Ctrl-C and power cuts included."""

    def __init__(self, run_dir: Path, jobs_file: Path):
        self.path = run_dir / MANIFEST
        if self.path.exists():
            try:
                self.data = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as error:
                raise JobsFileError(f"{self.path} cannot be read ({error}); move it away to start the run afresh") from None
            if self.data.get("format") != MANIFEST_FORMAT:
                raise JobsFileError(f"{self.path} was written by another version of this script (format {self.data.get('format')})")
        else:
            self.data = {"format": MANIFEST_FORMAT, "jobs_file": str(jobs_file.resolve()), "created": now_iso(), "jobs": {}}
        for stale in run_dir.glob(f".{MANIFEST}.*.tmp"):  # a write cut short; the manifest itself is whole
            stale.unlink()

    def add_jobs(self, jobs: list[Job], retry_failed: bool, say=print) -> None:
        for job in jobs:
            entry = self.data["jobs"].setdefault(job.id, {"line": job.line, "spec": job.spec, "runs": {}})
            if entry["spec"] != job.spec:
                say(f"note    job {job.id} (line {job.line}) changed since the earlier invocation; its finished runs are kept "
                    f"(give it a new id to run it afresh)")
            entry.update(line=job.line, spec=job.spec)
            for key, seed in zip(job.run_keys(), job.seeds):
                run = entry["runs"].setdefault(key, {"seed": seed, "state": PENDING, "attempts": 0, "errors": []})
                if retry_failed and run["state"] == FAILED:
                    run.update(state=PENDING, attempts=0)
            if job.problem:
                say(f"failed  {job.id} (line {job.line}): {job.problem}")
                for run in entry["runs"].values():
                    if run["state"] != DONE:
                        run.update(state=FAILED, error=job.problem, server=None, prompt_id=None)
        self.save()

    def run(self, job_id: str, key: str) -> dict:
        return self.data["jobs"][job_id]["runs"][key]

    def save(self) -> None:
        self.data["updated"] = now_iso()
        temporary = self.path.with_name(f".{MANIFEST}.{os.getpid()}.tmp")
        with open(temporary, "w", encoding="utf-8") as file:
            json.dump(self.data, file, indent=1)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, self.path)


# --- servers -----------------------------------------------------------------------------------------------


@dataclass
class Server:
    url: str
    client: runner.ComfyClient
    in_flight: set = field(default_factory=set)  # (job id, run key)
    queue_length: int = 0
    queue_read: float = float("-inf")
    down_since: float | None = None
    retry_at: float = 0.0
    failures: int = 0  # in a row
    uploads: dict = field(default_factory=dict)  # photo sha256 -> its name in the server's input folder
    runs_done: int = 0
    retries: int = 0

    @property
    def up(self) -> bool:
        return self.down_since is None


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def backoff(attempt: int) -> float:
    return min(BACKOFF_S[0] * 2 ** max(attempt - 1, 0), BACKOFF_S[1])


# --- the batch ---------------------------------------------------------------------------------------------


class Batch:
    def __init__(self, args: argparse.Namespace, jobs: list[Job], manifest: Manifest, run_dir: Path, say=print):
        self.args = args
        self.jobs = {job.id: job for job in jobs}
        self.manifest = manifest
        self.outputs = run_dir / "outputs"
        self.say = say
        self.client_id = uuid.uuid4().hex
        self.servers = {url.rstrip("/"): Server(url.rstrip("/"), runner.ComfyClient(url)) for url in args.server}
        self.not_before: dict[tuple[str, str], float] = {}  # back-off of runs to retry
        self.avoid: dict[tuple[str, str], str] = {}  # the server a retried run failed on
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
        run.update(server=None, prompt_id=None)

    # -- servers --

    def server_down(self, server: Server, why: str) -> None:
        now = time.monotonic()
        if server.up:
            server.down_since = now
            self.say(f"server  {server.url} stopped answering ({why})")
        server.failures += 1
        server.retry_at = now + backoff(server.failures)
        for job_id, key in sorted(server.in_flight):
            self.retry(job_id, key, server, f"the server stopped answering ({why})")

    def server_up(self, server: Server) -> None:
        if not server.up:
            self.say(f"server  {server.url} answers again")
        server.down_since, server.failures = None, 0

    def read_queue(self, server: Server) -> dict | None:
        try:
            queue = server.client.get_json("/queue")
        except runner.ServerUnreachable as error:
            self.server_down(server, error.reason)
            return None
        self.server_up(server)
        server.queue_length = len(queue.get("queue_running", [])) + len(queue.get("queue_pending", []))
        server.queue_read = time.monotonic()
        return queue

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
                runner.set_override(workflow, "seed", run["seed"])
            runner.use_installed_checkpoints(workflow, server.client, report=lambda text: self.note_once(f"{server.url}: {text}"))
            prompt_id = server.client.submit(workflow, self.client_id)
        except runner.ServerUnreachable as error:
            self.server_down(server, error.reason)
            return  # nothing ran: the run stays pending, for the next free server
        except runner.WorkflowRejected as error:
            self.fail(job_id, key, str(error))
            return
        except runner.RunError as error:
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
            waiting = {item[1] for item in queue.get("queue_running", []) + queue.get("queue_pending", [])}
            for job_id, key in sorted(server.in_flight):
                ended |= self.check_run(server, job_id, key, waiting)
        return ended

    def check_run(self, server: Server, job_id: str, key: str, waiting: set) -> bool:
        run = self.manifest.run(job_id, key)
        prompt_id = run["prompt_id"]
        try:
            entry = server.client.get_json(f"/history/{prompt_id}").get(prompt_id)
        except runner.ServerUnreachable as error:
            self.server_down(server, error.reason)
            return True
        if entry is not None and entry.get("status", {}).get("completed") is not None:
            return self.finish(server, job_id, key, entry)
        if prompt_id not in waiting and entry is None:
            self.retry(job_id, key, server, f"prompt {prompt_id} is gone from the server (it restarted?)")
            return True
        if time.time() - run["submitted"] > self.args.job_timeout:
            with contextlib.suppress(runner.RunError):  # gone or refusing: either way the run is tried again
                server.client.cancel(prompt_id)
            self.retry(job_id, key, server, f"no result within --job-timeout {self.args.job_timeout:g} s")
            return True
        return False

    def finish(self, server: Server, job_id: str, key: str, entry: dict) -> bool:
        if entry.get("status", {}).get("status_str") != "success":
            message = runner.describe_failure(entry)
            if transient_failure(entry):
                self.retry(job_id, key, server, message)
            else:
                self.fail(job_id, key, message)
            return True
        job = self.jobs[job_id]
        try:
            scored = {node: runner.scored_pictures(entry, node, saver) for node, saver in job.scorers.items()}
        except runner.RunError as error:
            self.fail(job_id, key, str(error))
            return True
        final = self.outputs / job_id / key
        staging = final.with_name(f".{key}.partial")
        shutil.rmtree(staging, ignore_errors=True)
        try:
            saved = runner.save_images(server.client, entry, staging)
        except runner.ServerUnreachable as error:
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
        for (node_id, _), path in zip(runner.output_images(entry), saved):
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
        for rank, (index, batch_index) in enumerate(runner.rank_pictures(candidates)[:job.keep_best], start=1):
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


def keep_copy(source: Path, wanted: Path) -> Path:
    """Copy `source` to `wanted`, or beside it under a free name: never over another file. A file there with the
    same content is this copy, made by an invocation that stopped before writing the manifest."""
    if wanted.exists() and filecmp.cmp(source, wanted, shallow=False):
        return wanted
    target = runner.unused_path(wanted.parent, wanted.name)
    partial = target.with_name(f".{target.name}.partial")
    shutil.copyfile(source, partial)
    os.replace(partial, target)
    return target


def transient_failure(entry: dict) -> bool:
    """Interrupted runs (a restarting server, a timed-out run cancelled) and out-of-memory errors may succeed
    elsewhere; any other error in a node (a photo without a face, a wrong input) fails everywhere."""
    for event, data in entry.get("status", {}).get("messages", []):
        if event == "execution_interrupted":
            return True
        if event == "execution_error":
            return any(kind in str(data.get("exception_type", "")) for kind in TRANSIENT_EXCEPTIONS)
    return False


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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Run a jobs file of Face-diffuser workflows across several ComfyUI servers, resumably.")
    parser.add_argument("jobs", type=Path, help="the jobs file: one JSON object per line (see workflows/jobs_example.jsonl)")
    parser.add_argument("--server", action="append", metavar="URL",
                        help=f"a ComfyUI server; repeat for several (default {runner.DEFAULT_SERVER})")
    parser.add_argument("--run-dir", type=Path, help="where the manifest and the pictures go (default: <jobs file>_run beside it)")
    parser.add_argument("--max-in-flight", type=int, default=2, metavar="N", help="runs queued on one server at a time (default 2)")
    parser.add_argument("--max-attempts", type=int, default=3, metavar="N",
                        help="a run that failed this often for reasons that may pass (a vanished server, a lost run) fails (default 3)")
    parser.add_argument("--job-timeout", type=float, default=3600.0, metavar="S",
                        help="seconds a run may take on a server before it is cancelled and tried again (default 3600)")
    parser.add_argument("--give-up-after", type=float, default=600.0, metavar="S",
                        help="stop when no server has answered for this long; run again to resume (default 600)")
    parser.add_argument("--retry-failed", action="store_true", help="run the failed runs of an earlier invocation again")
    parser.add_argument("--keep-best", type=int, default=0, metavar="K",
                        help='best-of-N for the jobs that set no "keep_best": once all of a job\'s seeds are done, copy its best K '
                             "pictures (by its Face-diffuser Identity Score node) to outputs/<job>/best/ (default 0: none)")
    parser.add_argument("--poll", type=float, default=0.5, metavar="S", help="seconds between looks at the servers (default 0.5)")
    parser.add_argument("--progress-every", type=float, default=10.0, metavar="S", help="seconds between progress lines (default 10)")
    args = parser.parse_args(argv)
    args.server = args.server or [runner.DEFAULT_SERVER]
    if args.max_in_flight < 1 or args.max_attempts < 1:
        parser.error("--max-in-flight and --max-attempts must be 1 or more")
    if args.keep_best < 0:
        parser.error("--keep-best must be 0 (no best-of-N) or more")
    return args


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
    batch = Batch(args, jobs, manifest, run_dir)
    counts = batch.counts()
    print(f"{len(jobs)} job(s), {sum(counts.values())} run(s): {counts[DONE]} done, {counts[FAILED]} failed, "
          f"{counts[RUNNING]} running, {counts[PENDING]} pending; servers: {', '.join(batch.servers)}; run directory: {run_dir}")
    try:
        batch.run_all()
    except KeyboardInterrupt:
        print(f"\nstopped. {manifest.path} is up to date: run the same command again to resume (runs still on a server "
              f"are picked up there).", file=sys.stderr)
        print(summary(batch))
        return 130
    except GiveUp as error:
        print(f"stopped: {error}. Run the same command again to resume.", file=sys.stderr)
        print(summary(batch))
        return 3
    print(summary(batch))
    return 1 if batch.counts()[FAILED] else 0


if __name__ == "__main__":
    sys.exit(main())
