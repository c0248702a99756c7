"""What a user's install contains (README "What an install contains"): the archive the ComfyUI registry builds is
the git-tracked files minus .comfyignore's patterns; it must hold everything the nodes and the command lines run,
and nothing it holds may import what it leaves out (the tests, dev/)."""

from __future__ import annotations

import ast
import fnmatch
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
LEFT_OUT = {"tests/", "dev/", ".ci/", "requirements-test.txt"}


def ignore_patterns() -> list[str]:
    lines = (REPO_ROOT / ".comfyignore").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def left_out(path: str, patterns: list[str]) -> bool:
    return any(path.startswith(pattern) if pattern.endswith("/") else fnmatch.fnmatch(path, pattern) for pattern in patterns)


@pytest.fixture(scope="module")
def archive() -> list[str]:
    listed = subprocess.run(["git", "-C", str(REPO_ROOT), "ls-files"], capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("needs a git checkout: the registry's archive is the tracked files minus .comfyignore")
    patterns = ignore_patterns()
    return [path for path in listed.stdout.splitlines() if not left_out(path, patterns)]


def test_the_registry_archive_leaves_out_exactly_the_developers_folders():
    assert set(ignore_patterns()) == LEFT_OUT


def test_the_archive_holds_what_comfyui_and_the_commands_load(archive):
    for needed in ("__init__.py", "nodes/__init__.py", "facediffuser_core/__init__.py", "requirements.txt", "pyproject.toml",
                   "scripts/facediffuser_setup.py", "scripts/facediffuser_check.py", "scripts/facediffuser_run.py",
                   "scripts/facediffuser_batch.py", "scripts/facediffuser_client/__init__.py", "locales/en/main.json"):
        assert needed in archive
    assert any(path.startswith("web/docs/FaceDiffuser") for path in archive)
    assert any(path.startswith("workflows/") and path.endswith(".json") for path in archive)
    assert not any(path.startswith(("tests/", "dev/")) for path in archive)


def imported_top_names(source: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"), filename=str(source))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_nothing_in_the_archive_imports_what_it_leaves_out(archive):
    test_modules = {path.stem for path in (REPO_ROOT / "tests").rglob("*.py")} | {"dev", "tests"}
    reaching_out = {path: sorted(imported_top_names(REPO_ROOT / path) & test_modules)
                    for path in archive if path.endswith(".py")}
    assert {path: names for path, names in reaching_out.items() if names} == {}
