"""manifest.json of a batch's run directory: the state of every run, resumable."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

from .jobs import Job, JobsFileError


MANIFEST = "manifest.json"

MANIFEST_FORMAT = 1

PENDING, RUNNING, DONE, FAILED = "pending", "running", "done", "failed"
# The only moves a run makes. pending -> pending: an attempt that failed before it reached a server, counted.
# failed -> failed: a job whose line turned bad records its new reason. done is final: a run is never written twice.
TRANSITIONS = {PENDING: {RUNNING, PENDING, FAILED}, RUNNING: {DONE, PENDING, FAILED}, FAILED: {PENDING, FAILED}, DONE: set()}


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
                    self.move(job.id, key, PENDING, save=False, attempts=0)
            if job.problem:
                say(f"failed  {job.id} (line {job.line}): {job.problem}")
                for key, run in entry["runs"].items():
                    if run["state"] != DONE:
                        self.move(job.id, key, FAILED, save=False, error=job.problem)
        self.save()

    def run(self, job_id: str, key: str) -> dict:
        return self.data["jobs"][job_id]["runs"][key]

    def move(self, job_id: str, key: str, state: str, save: bool = True, **fields) -> dict:
        """The one place a run changes state (TRANSITIONS). A run is on a server (`server`, `prompt_id`) only while
        running; done keeps the prompt id it was done as."""
        run = self.run(job_id, key)
        if state not in TRANSITIONS[run["state"]]:
            raise ValueError(f"run {job_id} {key} cannot go from {run['state']} to {state}")
        if state != RUNNING:
            fields = {"server": None, "prompt_id": None, **fields}
        run.update(state=state, **fields)
        if save:
            self.save()
        return run

    def save(self) -> None:
        self.data["updated"] = now_iso()
        temporary = self.path.with_name(f".{MANIFEST}.{os.getpid()}.tmp")
        with open(temporary, "w", encoding="utf-8") as file:
            json.dump(self.data, file, indent=1)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, self.path)
