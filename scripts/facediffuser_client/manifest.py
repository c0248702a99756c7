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
