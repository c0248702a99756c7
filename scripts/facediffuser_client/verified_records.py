"""The set-up's record of the model files whose content it compared with the hub's hash: written by the set-up
beside the models, read by it and by the first-run check, so that each file is read in full once."""

from __future__ import annotations

import json
import os
from pathlib import Path

# The files whose content the set-up compared with the hub's hash, by name, with the size and mtime they had then,
# and whether they were damaged.
VERIFIED_RECORD = ".facediffuser-setup-verified.json"
VERIFIED, DAMAGED, CHANGED = "verified", "damaged", "changed"


def verified_records(folder: Path) -> dict:
    try:
        return json.loads((folder / VERIFIED_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def file_stamp(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def verification(path: Path) -> str:
    """What the set-up found of the file's content: VERIFIED, DAMAGED, CHANGED since (either), or "" (never compared)."""
    record = verified_records(path.parent).get(path.name)
    if record is None:
        return ""
    if record.get("stamp") != file_stamp(path):
        return CHANGED
    return DAMAGED if record.get("damaged") else VERIFIED


def changed_since_verified(path: Path) -> bool:
    return verification(path) == CHANGED


def remember_verified(path: Path, digest: str, damaged: bool = False) -> None:
    """What the comparison with the hub's hash found, for the next runs and the check (verification above)."""
    records = verified_records(path.parent)
    records[path.name] = {"stamp": file_stamp(path), "hash": digest, **({"damaged": True} if damaged else {})}
    record = path.parent / VERIFIED_RECORD
    record.with_name(record.name + ".tmp").write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    os.replace(record.with_name(record.name + ".tmp"), record)


def was_verified(path: Path) -> bool:
    """Whether the file is unchanged (size and mtime) since its content matched the hub's hash."""
    return verification(path) == VERIFIED
