"""The batch's manifest: the state of every run of a run directory, resumable.

The live state is manifest.sqlite (SQLite in WAL mode, one row per run, a transaction per change or per look at
the executor, Manifest.changes), so that a change costs the same at ten runs and at a hundred thousand, and a
killed client loses at most what it did in its last moment (runs that then run again, or are picked up).
manifest.json, the readable copy with the fields documented in the README, is written whole from it whenever
the batch stops (export_json); a manifest.json without manifest.sqlite (0.3.0 kept only that) is imported."""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
from datetime import datetime, timezone
from pathlib import Path

from .jobs import Job, JobsFileError


MANIFEST = "manifest.json"
DATABASE = "manifest.sqlite"

# 2: `attempts` counts the times a run was sent to a server or worker (format 1, 0.3.0's, counted its failures).
MANIFEST_FORMAT = 2
FORMATS_READ = (1, 2)

PENDING, RUNNING, DONE, FAILED = "pending", "running", "done", "failed"
STATES = (PENDING, RUNNING, DONE, FAILED)
# The only moves a run makes. pending -> pending: an attempt that failed before it reached a server, counted.
# failed -> failed: a job whose line turned bad records its new reason. done is final: a run is never written twice.
TRANSITIONS = {PENDING: {RUNNING, PENDING, FAILED}, RUNNING: {DONE, PENDING, FAILED}, FAILED: {PENDING, FAILED}, DONE: set()}

SCHEMA = """
CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE jobs (job_id TEXT PRIMARY KEY, line INTEGER NOT NULL, spec TEXT NOT NULL, best TEXT);  -- spec: the line's JSON
CREATE TABLE runs (job_id TEXT NOT NULL, key TEXT NOT NULL, state TEXT NOT NULL, record TEXT NOT NULL,
                   UNIQUE (job_id, key));
"""
# The order of rows is the order of the jobs file (rowid), as manifest.json lists them.

RETRIES_SPENT = re.compile(r"^(\d+) attempts failed")


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def connect(path: Path, read_only: bool = False) -> sqlite3.Connection:
    if read_only:
        return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None, check_same_thread=False)
    database = sqlite3.connect(path, isolation_level=None)  # autocommit: each statement, or BEGIN ... COMMIT, is a transaction
    database.execute("PRAGMA journal_mode=WAL")
    # A committed change survives the client being killed; a power cut may take back the last moments' changes
    # (their runs run again), where a sync per change would cost milliseconds.
    database.execute("PRAGMA synchronous=NORMAL")
    return database


class Manifest:
    """Every run of every job of a run directory (manifest.sqlite), and the same in memory. Runs change state only
    through move(), each change one transaction.

    A batch of a hundred thousand runs is held in a few hundred megabytes at most: a run's record is parsed from
    its row when first asked for, and kept as that text again once the run is done or failed."""

    def __init__(self, run_dir: Path, jobs_file: Path, say=print):
        self.path = run_dir / MANIFEST
        self.database_path = run_dir / DATABASE
        for stale in run_dir.glob(f".{MANIFEST}.*.tmp"):  # a snapshot cut short; the database holds the state
            stale.unlink()
        for stale in run_dir.glob(f".{DATABASE}.*.tmp*"):  # an import cut short; the manifest.json it read is still there
            stale.unlink()
        if not self.database_path.exists():
            data, written_as = read_json(self.path) if self.path.exists() else ({
                "format": MANIFEST_FORMAT, "jobs_file": str(jobs_file.resolve()), "created": now_iso(), "jobs": {}}, None)
            if written_as is not None:
                say(f"note    {self.path} (format {written_as}) imported into {self.database_path}, the manifest from now on")
            create_database(self.database_path, data)
        self.states: dict[str, dict[tuple[str, str], None]] = {state: {} for state in STATES}  # in the jobs file's order
        self.records: dict[tuple[str, str], dict | str] = {}  # a run's record, or its row's text until asked for
        try:
            self.database = connect(self.database_path)
            self.meta, self.jobs = read_database(self.database, self.states, self.records)
        except sqlite3.Error as error:
            raise JobsFileError(f"{self.database_path} cannot be read ({error}); move it away (and manifest.json with it) "
                                f"to start the run afresh") from None

    # -- reading --

    def run(self, job_id: str, key: str) -> dict:
        record = self.records[(job_id, key)]
        if isinstance(record, str):
            record = self.records[(job_id, key)] = json.loads(record)
        return record

    def read_run(self, job_id: str, key: str) -> dict:
        """A run's record for a report, not kept parsed (run() keeps it, for a run that will change)."""
        record = self.records[(job_id, key)]
        return json.loads(record) if isinstance(record, str) else record

    def state(self, job_id: str, key: str) -> str:
        return next(state for state, runs in self.states.items() if (job_id, key) in runs)

    def counts(self) -> dict[str, int]:
        return {state: len(runs) for state, runs in self.states.items()}

    def keys_in(self, state: str) -> list[tuple[str, str]]:
        return list(self.states[state])

    def keys_with(self, name: str) -> list[tuple[str, str]]:
        """The runs whose record has the field `name`, found in the rows' text without parsing every record."""
        return [run for run, record in self.records.items()
                if (name in record if isinstance(record, dict) else f'"{name}":' in record)]

    def best(self, job_id: str) -> dict | None:
        """A best-of-N job's decision, once taken."""
        return self.jobs[job_id].get("best")

    def run_keys(self, job_id: str) -> list[str]:
        return self.jobs[job_id]["keys"]

    # -- writing --

    @contextlib.contextmanager
    def changes(self):
        """The changes made in the block go to the database as one transaction (one inside another is part of it),
        committed however the block ends: what the client did, it did, Ctrl-C included. A client killed outright
        loses the changes of the block it was in: its runs are then run again, or picked up where they are."""
        if self.database.in_transaction:
            yield
            return
        self.database.execute("BEGIN")
        try:
            yield
        finally:
            self.database.execute("COMMIT")

    def add_jobs(self, jobs: list[Job], retry_failed: bool, say=print) -> None:
        with self.changes():
            for job in jobs:
                self.add_job(job, retry_failed, say)

    def add_job(self, job: Job, retry_failed: bool, say) -> None:
        entry = self.jobs.get(job.id)
        if entry is None:
            entry = self.jobs[job.id] = {"line": job.line, "spec_text": job.text, "keys": []}
            self.database.execute("INSERT INTO jobs (job_id, line, spec) VALUES (?, ?, ?)", (job.id, job.line, job.text))
        elif entry["spec_text"] != job.text or entry["line"] != job.line:
            if json.loads(entry["spec_text"]) != job.spec:
                say(f"note    job {job.id} (line {job.line}) changed since the earlier invocation; its finished runs are kept "
                    f"(give it a new id to run it afresh)")
            entry.update(line=job.line, spec_text=job.text)
            self.database.execute("UPDATE jobs SET line = ?, spec = ? WHERE job_id = ?", (job.line, job.text, job.id))
        for key, seed in zip(job.run_keys(), job.seeds):
            if (job.id, key) not in self.records:
                text = json.dumps({"seed": seed, "state": PENDING, "attempts": 0, "errors": []})
                self.records[(job.id, key)] = text
                self.states[PENDING][(job.id, key)] = None
                entry["keys"].append(key)
                self.database.execute("INSERT INTO runs (job_id, key, state, record) VALUES (?, ?, ?, ?)", (job.id, key, PENDING, text))
            elif retry_failed and (job.id, key) in self.states[FAILED]:
                self.move(job.id, key, PENDING, attempts=0)
        if job.problem:
            say(f"failed  {job.id} (line {job.line}): {job.problem}")
            for key in entry["keys"]:
                if (job.id, key) not in self.states[DONE]:
                    self.move(job.id, key, FAILED, error=job.problem)

    def move(self, job_id: str, key: str, state: str, **fields) -> dict:
        """The one place a run changes state (TRANSITIONS), a transaction of its own unless in changes(). A run is
        on a server (`server`, `prompt_id`) only while running; done keeps the prompt id it was done as."""
        run = self.run(job_id, key)
        before = run["state"]
        if state not in TRANSITIONS[before]:
            raise ValueError(f"run {job_id} {key} cannot go from {before} to {state}")
        if state != RUNNING:
            fields = {"server": None, "prompt_id": None, **fields}
        run.update(state=state, **fields)
        del self.states[before][(job_id, key)]
        self.states[state][(job_id, key)] = None
        self.write_run(job_id, key)
        return run

    def annotate(self, job_id: str, key: str, **fields) -> dict:
        """Fields of a run that are no change of its state (prompts left on a server, a kept picture)."""
        run = self.run(job_id, key)
        run.update(fields)
        for name, value in fields.items():
            if value is None:
                del run[name]
        self.write_run(job_id, key)
        return run

    def write_run(self, job_id: str, key: str) -> None:
        run = self.run(job_id, key)
        text = json.dumps(run)
        self.database.execute("UPDATE runs SET state = ?, record = ? WHERE job_id = ? AND key = ?", (run["state"], text, job_id, key))
        if run["state"] in (DONE, FAILED):
            self.records[(job_id, key)] = text  # rarely read again: the text is a third of the dict

    def decide_best(self, job_id: str, best: dict, kept: dict[str, dict]) -> None:
        """A best-of-N job's decision and the records of its runs whose pictures it keeps (`kept`: run key ->
        record with `kept_as` set on those pictures' scores), in one transaction."""
        with self.changes():
            self.database.execute("UPDATE jobs SET best = ? WHERE job_id = ?", (json.dumps(best), job_id))
            for key, record in kept.items():
                self.records[(job_id, key)] = record
                self.write_run(job_id, key)
        self.jobs[job_id]["best"] = best

    def export_json(self) -> None:
        """manifest.json, the readable copy, written whole to a temporary file that replaces it. Each run's record
        goes in as the text of its row, unparsed: a hundred thousand runs take a second, not fifteen."""
        def record_text(job_id: str, key: str) -> str:
            record = self.records[(job_id, key)]
            return record if isinstance(record, str) else json.dumps(record)

        with atomic_file(self.path) as file:
            file.write(json.dumps({**self.meta, "updated": now_iso()})[:-1] + ', "jobs": {')
            for number, (job_id, entry) in enumerate(self.jobs.items()):
                runs = ", ".join(f"{json.dumps(key)}: {record_text(job_id, key)}" for key in entry["keys"])
                best = f', "best": {json.dumps(entry["best"])}' if "best" in entry else ""
                file.write(f'{", " if number else ""}\n{json.dumps(job_id)}: {{"line": {entry["line"]}, '
                           f'"spec": {entry["spec_text"]}, "runs": {{{runs}}}{best}}}')
            file.write("\n}}\n")

    def close(self) -> None:
        self.database.close()


def read_json(path: Path) -> tuple[dict, int]:
    """A manifest.json in this version's format, and the format it was written in."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise JobsFileError(f"{path} cannot be read ({error}); move it away to start the run afresh") from None
    written_as = data.get("format")
    if written_as not in FORMATS_READ:
        raise JobsFileError(f"{path} was written by another version of this script (format {written_as})")
    if written_as == 1:
        for entry in data["jobs"].values():
            for run in entry["runs"].values():
                run["attempts"] = attempts_sent(run)
        data["format"] = MANIFEST_FORMAT
    return data, written_as


def attempts_sent(run: dict) -> int:
    """Format 1 counted a run's failed attempts; format 2 the times it was sent. A run that is done, or running,
    was sent once more than it failed; so was one that failed for good after it ran ("finished"), unless its
    error says it spent all its attempts."""
    failed = run.get("attempts", 0)
    if run["state"] in (DONE, RUNNING):
        return failed + 1
    if run["state"] == FAILED and "finished" in run and not RETRIES_SPENT.match(run.get("error", "")):
        return failed + 1
    return failed


def create_database(path: Path, data: dict) -> None:
    """manifest.sqlite holding `data` (manifest.json's layout), made under a temporary name and renamed into place:
    a client killed while importing leaves no half database."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.unlink(missing_ok=True)
    database = sqlite3.connect(temporary, isolation_level=None)
    try:
        database.execute("PRAGMA page_size=1024")  # a change rewrites one page of the log: a run's row fits in 1 KiB
        database.executescript(SCHEMA)
        database.execute("BEGIN")
        database.executemany("INSERT INTO meta VALUES (?, ?)", [
            ("format", str(MANIFEST_FORMAT)), ("jobs_file", data["jobs_file"]), ("created", data["created"])])
        for job_id, entry in data["jobs"].items():
            database.execute("INSERT INTO jobs VALUES (?, ?, ?, ?)", (job_id, entry["line"], json.dumps(entry["spec"]),
                                                                     json.dumps(entry["best"]) if "best" in entry else None))
            database.executemany("INSERT INTO runs (job_id, key, state, record) VALUES (?, ?, ?, ?)",
                                 [(job_id, key, run["state"], json.dumps(run)) for key, run in entry["runs"].items()])
        database.execute("COMMIT")
    finally:
        database.close()
    os.replace(temporary, path)


def read_database(database: sqlite3.Connection, states: dict, records: dict) -> tuple[dict, dict]:
    """The manifest's meta data and jobs ({job id: {"line", "spec_text", "keys", "best"}}); each run's state goes into
    `states` and its row's text into `records`."""
    meta = dict(database.execute("SELECT name, value FROM meta"))
    if int(meta.get("format", 0)) != MANIFEST_FORMAT:
        raise sqlite3.DatabaseError(f"written by another version of this script (format {meta.get('format')})")
    jobs: dict[str, dict] = {}
    for job_id, line, spec, best in database.execute("SELECT job_id, line, spec, best FROM jobs ORDER BY rowid"):
        jobs[job_id] = {"line": line, "spec_text": spec, "keys": [], **({"best": json.loads(best)} if best is not None else {})}
    for job_id, key, state, record in database.execute("SELECT job_id, key, state, record FROM runs ORDER BY rowid"):
        jobs[job_id]["keys"].append(key)
        states[state][(job_id, key)] = None
        records[(job_id, key)] = record
    return {"format": MANIFEST_FORMAT, "jobs_file": meta["jobs_file"], "created": meta["created"]}, jobs


@contextlib.contextmanager
def atomic_file(path: Path):
    """A text file written to a temporary name, synced and renamed over `path`: valid whenever the batch stops."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "w", encoding="utf-8") as file:
        yield file
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def read_manifest(run_dir: Path) -> dict:
    """A run directory's manifest in manifest.json's layout, from manifest.sqlite (also while a batch writes it)
    or, without one, from manifest.json."""
    database_path = run_dir / DATABASE
    if not database_path.exists():
        if not (run_dir / MANIFEST).exists():
            raise FileNotFoundError(f"no manifest in {run_dir}")
        return read_json(run_dir / MANIFEST)[0]
    database = connect(database_path, read_only=True)
    try:
        states, records = {state: {} for state in STATES}, {}
        meta, jobs = read_database(database, states, records)
    finally:
        database.close()
    return {**meta, "jobs": {job_id: {"line": entry["line"], "spec": json.loads(entry["spec_text"]),
                                      "runs": {key: json.loads(records[(job_id, key)]) for key in entry["keys"]},
                                      **({"best": entry["best"]} if "best" in entry else {})}
                             for job_id, entry in jobs.items()}}
