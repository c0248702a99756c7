"""The batch client's jobs file: one job per line, each seed of a job one run."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .best_of_n import best_of_n_node, identity_scorers
from .files import run_key
from .http_api import RunError
from .api_workflow import (OVERRIDE_TARGETS, load_api_workflow, override_input, override_targets, reference_image_loaders,
                           shipped_workflow, with_inputs)


# Runner overrides a job may set, besides the prompt and the seed, which jobs set in their own way.
OVERRIDES = tuple(option for option in OVERRIDE_TARGETS if option not in ("prompt", "seed"))

JOB_KEYS = {"id", "workflow", "faces", "prompt", "seeds", "count", "seed", "keep_best", *OVERRIDES}

JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class JobsFileError(Exception):
    """The jobs file cannot be read as a whole (a line that is not JSON, two jobs with one id)."""


def remembered(cache: dict, key, compute, *arguments):
    """compute(*arguments) once per key; a RunError it raises is remembered and raised again for the key."""
    found = cache.get(key, cache)  # the cache itself: nothing remembered yet
    if found is cache:
        try:
            found = compute(*arguments)
        except RunError as error:
            found = error
        cache[key] = found
    if isinstance(found, RunError):
        raise found
    return found


class WorkflowFile:
    """A workflow file, read once for all the jobs naming it, with what they ask of it worked out once: a jobs file
    of a hundred thousand lines names a few workflows."""

    def __init__(self, path: Path):
        self.path = path
        self.workflow = load_api_workflow(path)
        self.answers: dict[tuple, object] = {}

    def ask(self, question, *arguments):
        return remembered(self.answers, (question, *arguments), question, self.workflow, *arguments)

    def values(self, option: str, value) -> dict[str, dict]:
        """{node id: {input: value}}: where `option` puts `value` in this workflow."""
        return {node_id: {name: value} for node_id, name in self.ask(option_inputs, option)}


def option_inputs(workflow: dict, option: str) -> list[tuple[str, str]]:
    """(node id, input name) of every input `option` sets in `workflow`."""
    return [(node_id, override_input(workflow, node_id, option)) for node_id in override_targets(workflow, option)]


@dataclass(eq=False, slots=True)
class Job:
    # Defaults are shared and never changed (prepare_job assigns): a hundred thousand jobs make no empty lists.
    id: str
    line: int
    spec: dict
    text: str  # the line as written: the manifest compares it with the one it knows before it parses either
    source: WorkflowFile | None = None
    faces: Sequence[Path] = ()
    face_hashes: Sequence[str] = ()
    loaders: Sequence[str] = ()  # LoadImage node ids taking the faces, in order
    seeds: Sequence[int | None] = ()  # None: the workflow's own seed
    scorers: Mapping[str, str | None] | None = None  # Identity Score node id -> Save Image node of its pictures (a job that runs)
    keep_best: int = 0  # best-of-N: pictures kept across the job's seeds; 0 keeps no selection
    best_node: str | None = None  # the Identity Score node best-of-N ranks by
    problem: str | None = None  # why the job fails without running

    @property
    def workflow(self) -> dict | None:
        """The job's workflow with its prompt and overrides set; None when the job cannot run. Built when asked for,
        sharing the nodes it leaves alone with its file's: no job holds a workflow of its own."""
        if self.source is None or self.problem is not None:
            return None
        return with_inputs(self.source.workflow, self.values())

    def values(self) -> dict[str, dict]:
        """The job's prompt and overrides, as with_inputs takes them."""
        values: dict[str, dict] = {}
        for option in ("prompt", *OVERRIDES):
            if option in self.spec:
                for node_id, inputs in self.source.values(option, self.spec[option]).items():
                    values.setdefault(node_id, {}).update(inputs)
        return values

    def run_keys(self) -> list[str]:
        return [run_key(seed) for seed in self.seeds]


class JobsFolder:
    """What the jobs of one jobs file share: its folder, and each workflow file, photo path and photo hash read once."""

    def __init__(self, base: Path):
        self.base = base
        self.workflows: dict[str | int, WorkflowFile | RunError] = {}
        self.paths: dict[str, Path] = {}
        self.hashes: dict[Path, str | RunError] = {}

    def workflow_file(self, name: str | None, faces: int) -> WorkflowFile:
        """The job's "workflow" (a path from the jobs file's folder), or the shipped workflow for `faces` people."""
        return remembered(self.workflows, name if name is not None else faces, self.open_workflow, name, faces)

    def open_workflow(self, name: str | None, faces: int) -> WorkflowFile:
        return WorkflowFile(self.base / name if name is not None else shipped_workflow(faces))

    def photo(self, name: str) -> Path:
        if name not in self.paths:
            self.paths[name] = (self.base / name).expanduser()
        return self.paths[name]

    def photo_hash(self, path: Path) -> str:
        return remembered(self.hashes, path, photo_hash, path)


def job_id(spec: dict) -> str:
    """The job's "id", else one derived from the line's content, so that it survives reordering the file."""
    if "id" in spec:
        return str(spec["id"])
    return "job-" + hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]


def photo_hash(path: Path) -> str:
    """The photo's sha256: the same photo under two names is uploaded once."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as error:
        raise RunError(f"cannot read the photo {path}: {error.strerror}") from None


def job_seeds(spec: dict) -> list[int | None]:
    if "seeds" in spec and ("count" in spec or "seed" in spec):
        raise RunError('give either "seeds" or "count" (with an optional first "seed"), not both')
    if "seeds" in spec:
        seeds = spec["seeds"]
        if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            raise RunError('"seeds" must be a non-empty list of integers')
        if len(set(seeds)) != len(seeds):
            raise RunError('"seeds" lists a seed twice')
        return list(seeds)
    count, first = spec.get("count", 1), spec.get("seed")
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise RunError('"count" must be an integer of 1 or more')
    if first is not None and (not isinstance(first, int) or isinstance(first, bool)):
        raise RunError('"seed" must be an integer')
    if first is None:
        return [None] if count == 1 else list(range(count))
    return list(range(first, first + count))


def prepare_job(job: Job, folder: JobsFolder, keep_best: int = 0) -> None:
    """Read the job's workflow and photos and set its prompt and overrides; a problem is kept on the job.
    `keep_best` is the best-of-N of the jobs that set no "keep_best"."""
    spec = job.spec
    try:
        unknown = sorted(set(spec) - JOB_KEYS)
        if unknown:
            raise RunError(f"unknown key(s) {', '.join(unknown)}; a job takes {', '.join(sorted(JOB_KEYS))}")
        if not JOB_ID.fullmatch(job.id):
            raise RunError(f'"id" {job.id!r} must be letters, digits, ".", "_" or "-" (it names the job\'s output folder)')
        faces = spec.get("faces", [])
        if not isinstance(faces, list) or not all(isinstance(face, str) for face in faces):
            raise RunError('"faces" must be a list of photo paths, in the order of the prompt\'s <|image|> markers')
        job.faces = [folder.photo(face) for face in faces]
        job.seeds = job_seeds(spec)
        keep_best = spec.get("keep_best", keep_best)
        if not isinstance(keep_best, int) or isinstance(keep_best, bool) or keep_best < 0:
            raise RunError('"keep_best" must be an integer: the pictures to keep across the job\'s seeds (0: no best-of-N)')
        source = folder.workflow_file(spec.get("workflow"), len(job.faces))
        for option in ("prompt", *OVERRIDES):
            if option in spec:
                source.ask(option_inputs, option)  # the workflow must take each
        if job.seeds != [None]:
            source.ask(override_targets, "seed")  # the workflow must take a seed
        if job.faces:
            job.loaders = source.ask(reference_image_loaders)
            if len(job.loaders) != len(job.faces):
                raise RunError(f'"faces" lists {len(job.faces)} photo(s) but the workflow loads {len(job.loaders)} reference '
                                      f"photo(s) (LoadImage nodes {', '.join(job.loaders) or 'none'})")
        job.face_hashes = [folder.photo_hash(face) for face in job.faces]
        job.scorers = source.ask(identity_scorers)
        if keep_best:
            job.best_node = source.ask(best_of_n_node, "keep_best" not in spec)
        job.keep_best = keep_best
        job.source = source
    except RunError as error:
        job.problem = str(error)
        job.seeds = job.seeds or [None]  # one run to carry the failure into the manifest and the summary


def load_jobs(path: Path, keep_best: int = 0) -> list[Job]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise JobsFileError(f"cannot read the jobs file {path}: {error.strerror}") from None
    jobs, seen, folder = [], {}, JobsFolder(path.parent)
    for number, text in enumerate(lines, 1):
        if not text.strip() or text.lstrip().startswith("#"):
            continue
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as error:
            raise JobsFileError(f"{path}, line {number}: not a JSON object ({error})") from None
        if not isinstance(spec, dict):
            raise JobsFileError(f"{path}, line {number}: a job is a JSON object ({{...}}), got {type(spec).__name__}")
        job = Job(job_id(spec), number, spec, text.strip())
        if job.id in seen:
            raise JobsFileError(f"{path}, lines {seen[job.id]} and {number}: both are job {job.id!r}; give each job its own \"id\"")
        seen[job.id] = number
        prepare_job(job, folder, keep_best)
        jobs.append(job)
    if not jobs:
        raise JobsFileError(f"{path} has no jobs (one JSON object per line)")
    return jobs
