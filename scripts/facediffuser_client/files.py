"""Pictures on disk: downloaded from a server, copied, never over another file."""

from __future__ import annotations

import filecmp
import os
import shutil
from pathlib import Path

from .http_api import output_images


def run_key(seed: int | None) -> str:
    """A run's name: its folder under outputs/<job>/ and its key in the manifest."""
    return "seed-workflow" if seed is None else f"seed-{seed}"


def best_file_name(rank: int, seed: int | None, batch_index: int, suffix: str) -> str:
    """A best-of-N pick's file name, the runner's and the batch's alike: rank, run, picture in the batch."""
    return f"best{rank:02d}_{run_key(seed)}_{batch_index}{suffix}"


def unused_path(output_dir: Path, name: str) -> Path:
    """output_dir/name, or name-1, name-2, ... so that an earlier run's file is never overwritten."""
    target = output_dir / name
    counter = 1
    while target.exists():
        target = output_dir / f"{Path(name).stem}-{counter}{Path(name).suffix}"
        counter += 1
    return target


def save_images(download, entry: dict, output_dir: Path) -> list[Path]:
    """Download every picture of output_images(entry), in its order, one path each (save_pictures)."""
    return [path for path, _ in save_pictures(download, output_images(entry), output_dir)]


def save_pictures(download, pictures: list[tuple[str, dict]], output_dir: Path) -> list[tuple[Path, bool]]:
    """Download each (node id, image reference), in order: its path, and whether it was written now; never
    overwriting. A file of the same name and content is that picture (the output folder of a ComfyUI on this
    machine, or an earlier download), not written twice."""
    output_dir.mkdir(parents=True, exist_ok=True)
    saved = []
    for _, image in pictures:
        content = download(image)
        same = output_dir / Path(image["filename"]).name
        if same.is_file() and same.read_bytes() == content:
            saved.append((same, False))
            continue
        target = unused_path(output_dir, same.name)
        target.write_bytes(content)
        saved.append((target, True))
    return saved


def keep_copy(source: Path, wanted: Path) -> Path:
    """Copy `source` to `wanted`, or beside it under a free name: never over another file. A file there with the
    same content is this copy, made by an invocation that stopped before writing the manifest."""
    if wanted.exists() and filecmp.cmp(source, wanted, shallow=False):
        return wanted
    target = unused_path(wanted.parent, wanted.name)
    partial = target.with_name(f".{target.name}.partial")
    shutil.copyfile(source, partial)
    os.replace(partial, target)
    return target
