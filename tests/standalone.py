"""For the files of this folder that also run as commands (schema_lock.py, workflow_builder.py, docs_pictures.py,
stage_pictures.py, compat/freeze.py, and comfy_server.py as the test servers' entry point): what
tests/pytest.ini's pythonpath gives the tests, the repository's root (facediffuser_core, dev.devkit) and
scripts/ (facediffuser_client). Such a command imports this module before those packages; under
pytest it changes nothing."""

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

for path in (REPO_ROOT, REPO_ROOT / "scripts"):
    if not any(Path(entry or ".").resolve() == path for entry in sys.path):
        sys.path.append(str(path))
