"""What the batch client's tests share: a jobs file, the photos and the tiny workflow its jobs name, the batch
script started as a process and waited for, and its manifest read while it runs."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

import pack_scripts
from facediffuser_client.manifest import read_manifest


SCRIPT = pack_scripts.SCRIPTS_DIR / "facediffuser_batch.py"
TINY_WORKFLOW = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "tiny"}},
}


def write_jobs(path: Path, jobs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(job) + "\n" for job in jobs))
    return path


def photo(path: Path, face: bool = True) -> Path:
    """The tests' astronaut portrait, or a blank grey picture in which no detector finds a face."""
    import tiny_install

    if face:
        (made,) = tiny_install.write_face_photos(path.parent, names=(path.name,))
        return made
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((256, 256, 3), 128, np.uint8)).save(path)
    return path


def face_workflow(folder: Path) -> Path:
    """The shipped single-subject workflow at the tiny models' size: seconds per run on a CPU."""
    import tiny_install

    path = folder / "tiny_single_subject.json"
    path.write_text(json.dumps(tiny_install.small_api_workflow("facediffuser_single_subject")))
    return path


def start_batch(jobs_file: Path, urls, *options: str) -> subprocess.Popen:
    command = [sys.executable, str(SCRIPT), str(jobs_file), *(a for url in urls for a in ("--server", url)),
               "--poll", "0.05", "--progress-every", "1", *options]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, timeout: float = 600) -> tuple[int, str, str]:
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()  # a failed test leaves no batch running
        process.communicate()
        raise
    return process.returncode, out, err


def manifest_of(jobs_file: Path) -> dict:
    """The live manifest of the batch of `jobs_file` (also while it runs)."""
    return read_manifest(jobs_file.with_name(f"{jobs_file.stem}_run"))


def all_runs(manifest: dict) -> dict:
    return {(job_id, key): run for job_id, job in manifest["jobs"].items() for key, run in job["runs"].items()}


def wait_for(condition, timeout: float = 300, what: str = "the condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            if condition():
                return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
