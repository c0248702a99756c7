"""Which Python runs ComfyUI. The client's scripts run under whatever Python the user typed (`python3` is often
the system's); ComfyUI runs under its own: a venv beside it (venv/, .venv/), the Windows portable build's
python_embeded/, a conda environment. The check, the set-up and the runner look beside the ComfyUI they use, or
take the one named with --comfyui-python, and say so when it is not the one they run under.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

OPTION = "--comfyui-python"
OPTION_HELP = ("the Python that runs ComfyUI: its python executable, or the folder of its venv or conda environment "
               "(default: venv/ or .venv/ in the ComfyUI folder, or the portable build's python_embeded/ beside it; "
               "else the Python running this)")
# Set by a script for the copy of itself it runs under ComfyUI's Python, to how that Python was found: the copy
# reports it so, and never hands over again.
HANDED_OVER = "FACEDIFFUSER_COMFYUI_PYTHON_FOUND"
PROBE_TIMEOUT_S = 60.0
MIN_PYTHON = (3, 10)

# Where an environment keeps its interpreter: venv and conda on Linux and macOS, venv on Windows, conda on Windows
# and the embeddable Python of ComfyUI's portable build.
INTERPRETERS = ("bin/python", "bin/python3", "Scripts/python.exe", "python.exe")


class PythonNotUsable(Exception):
    """The Python named or found cannot run the pack's scripts; the message says which and why."""


@dataclass(frozen=True)
class ComfyUIPython:
    executable: Path
    prefix: Path  # its sys.prefix: what tells two environments apart (a venv's python is a link to the base one)
    version: tuple[int, ...]
    found: str  # how it was chosen, for the user: "the venv in <ComfyUI>", "named with --comfyui-python", ...

    @property
    def is_this_one(self) -> bool:
        return self.prefix == Path(sys.prefix).resolve()

    @property
    def version_text(self) -> str:
        return ".".join(map(str, self.version))


def interpreter_in(folder: Path) -> Path | None:
    return next((folder / relative for relative in INTERPRETERS if (folder / relative).is_file()), None)


def beside_comfyui(root: Path) -> list[tuple[Path, str]]:
    """The environments a ComfyUI install keeps beside it, in the order ComfyUI's own instructions create them."""
    return [(root / "venv", f"the venv in {root}"), (root / ".venv", f"the .venv in {root}"),
            (root.parent / "python_embeded", f"the portable build's python_embeded beside {root}")]


def describe(executable: Path, found: str) -> ComfyUIPython:
    """Run `executable` once to learn its prefix and version; PythonNotUsable when it does not run."""
    try:
        answer = subprocess.run([str(executable), "-c", "import sys; print(sys.prefix); print(*sys.version_info[:3])"],
                                capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise PythonNotUsable(f"{executable} ({found}) does not run: {error}; name the Python that runs ComfyUI with {OPTION}") from None
    lines = answer.stdout.splitlines()
    if answer.returncode != 0 or len(lines) < 2:
        raise PythonNotUsable(f"{executable} ({found}) does not run: {answer.stderr.strip()[-300:] or 'no answer'}; name "
                              f"the Python that runs ComfyUI with {OPTION}")
    return ComfyUIPython(executable, Path(lines[0]).resolve(), tuple(int(part) for part in lines[1].split()), found)


def this_python(found: str) -> ComfyUIPython:
    return ComfyUIPython(Path(sys.executable), Path(sys.prefix).resolve(), tuple(sys.version_info[:3]), found)


def choose(root: Path | None, named: Path | None) -> ComfyUIPython:
    """The Python named with --comfyui-python (an executable or an environment's folder), else the first environment
    beside ComfyUI, else this one ("" in `found`: nothing says it is ComfyUI's). PythonNotUsable for a named one that
    is not there or does not run."""
    if named is not None:
        named = named.expanduser()
        executable = interpreter_in(named) if named.is_dir() else named if named.is_file() else None
        if executable is None:
            what = f"a folder without {' or '.join(INTERPRETERS)}" if named.is_dir() else "no such file"
            raise PythonNotUsable(f"{OPTION} {named}: {what}; name the python executable, or a venv or conda environment's folder")
        return this_or(describe(executable, os.environ.get(HANDED_OVER) or f"named with {OPTION}"))
    for folder, found in beside_comfyui(root) if root is not None else []:
        if (executable := interpreter_in(folder)) is not None:
            return this_or(describe(executable, found))
    return this_python("")


def this_or(python: ComfyUIPython) -> ComfyUIPython:
    """`python`, as this process (its sys.executable) when it is this environment."""
    return this_python(python.found) if python.is_this_one else python


def hand_over(python: ComfyUIPython, script: Path, argv: list[str], report=print) -> int:
    """Run `script` with `argv` again under ComfyUI's Python, whose packages are the ones to check and use; its exit
    status. The copy runs with `python` named, so it stays where it is."""
    if python.version < MIN_PYTHON:
        raise PythonNotUsable(f"ComfyUI's Python {python.executable} ({python.found}) is Python {python.version_text}; "
                              f"Face-diffuser needs {'.'.join(map(str, MIN_PYTHON))} or newer")
    if os.environ.get(HANDED_OVER):
        raise PythonNotUsable(f"{python.executable} ({python.found}) handed over to itself: its sys.prefix is not {python.prefix}")
    report(f"This is {sys.executable}, not ComfyUI's Python: going on with {python.executable} ({python.found}).")
    sys.stdout.flush()
    env = {**os.environ, HANDED_OVER: python.found}
    child = subprocess.Popen([str(python.executable), str(script), *argv, OPTION, str(python.executable)], env=env)
    while True:
        try:
            return child.wait()
        except KeyboardInterrupt:
            continue  # the child got the same Ctrl-C: it ends cleanly, says what it kept, and its status says how


def run_under_comfyuis_python(script: Path, argv: list[str], root: Path | None, named: Path | None,
                              main: Callable[[ComfyUIPython], int]) -> int:
    """A script that checks or uses ComfyUI's packages: `main(python)` when this is ComfyUI's Python (or nothing says
    which is), else the script again under ComfyUI's; the exit status."""
    try:
        python = choose(root, named)
        return main(python) if python.is_this_one else hand_over(python, script, argv)
    except PythonNotUsable as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
