"""The README's command lines for the pack's scripts, read from README.md as printed (code blocks and inline
code), so that a spelling the README shows and the scripts refuse cannot come back: every runner and set-up
command line parses, the check's and the set-up's dry run run to their report without a traceback.
tests/test_first_picture.py runs the quick start's install and two commands in full."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest

import comfy_harness
import pack_scripts
from test_first_run_check import fake_comfyui

README = comfy_harness.REPO_ROOT / "README.md"
runner = pack_scripts.load("facediffuser_run")
setup = pack_scripts.load("facediffuser_setup")


def readme_commands(script: str) -> list[str]:
    """Every `python scripts/<script>.py ...` of README.md: indented code lines (with their continuation lines)
    and inline code spans."""
    text = README.read_text(encoding="utf-8")
    commands = []
    lines = iter(text.splitlines())
    for line in lines:
        command = line.strip()
        if line.startswith("    ") and command.startswith(f"python scripts/{script}.py"):
            while command.endswith("\\"):
                command = command[:-1] + next(lines).strip()
            commands.append(command)
    commands += [span for span in re.findall(r"`([^`\n]+)`", text) if span.startswith(f"python scripts/{script}.py")]
    return commands


def arguments(command: str) -> list[str]:
    """The words after `python scripts/x.py`, as a POSIX shell splits them, without a trailing comment."""
    return shlex.split(command, comments=True)[2:]


def test_the_readme_shows_each_script():
    assert len(readme_commands("facediffuser_run")) >= 4
    assert len(readme_commands("facediffuser_setup")) >= 4
    assert len(readme_commands("facediffuser_check")) >= 2


@pytest.mark.parametrize("command", readme_commands("facediffuser_run"))
def test_every_runner_command_of_the_readme_parses(command):
    runner.parse_args(arguments(command))


@pytest.mark.parametrize("span", sorted(set(re.findall(r'`(--comfyui-args "[^"]*")`', README.read_text(encoding="utf-8")))))
def test_every_comfyui_args_spelling_of_the_readme_parses(span):
    (value,) = re.findall(r'"([^"]*)"', span)
    assert runner.parse_args(["--face", "me.jpg", *shlex.split(span)]).comfyui_args == value


@pytest.mark.parametrize("command", readme_commands("facediffuser_setup"))
def test_every_setup_command_of_the_readme_parses(command):
    setup.parse_args(arguments(command))


@pytest.mark.parametrize("command", [c for c in readme_commands("facediffuser_check") + readme_commands("facediffuser_setup")
                                     if "--dry-run" in c or "facediffuser_check" in c])
def test_the_readmes_check_and_dry_run_commands_report_without_a_traceback(command, tmp_path):
    comfyui = fake_comfyui(tmp_path / "ComfyUI")
    env = {"PATH": f"{sys.executable.rsplit('/', 1)[0]}:/usr/bin:/bin", "HOME": str(tmp_path), "COMFYUI_PATH": str(comfyui),
           "HF_ENDPOINT": "http://127.0.0.1:9"}
    result = subprocess.run(["bash", "-c", command], cwd=comfy_harness.REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert "Traceback" not in result.stdout + result.stderr, result.stdout + result.stderr
    assert result.returncode in (0, 1) and ("first-run check" in result.stdout or "Dry run" in result.stdout), result.stdout + result.stderr
