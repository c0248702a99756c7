"""The dev tools' own child processes (a memory probe, a GPU-kit worker, a fleet measurement): `python -m
dev.<module>` from the repository's root with the client (scripts/) on the module path, as their documented
commands run, whatever path the parent was given (pytest gives its own through pytest.ini)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CLIENT_FOLDER = REPO_ROOT / "scripts"


def environment(**variables: str) -> dict[str, str]:
    inherited = [entry for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry]
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(CLIENT_FOLDER), *inherited]), **variables}


def module_command(module: str, *arguments: str) -> list[str]:
    return [sys.executable, "-m", module, *arguments]
