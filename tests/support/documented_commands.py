"""The commands README.md and the pages of docs/ show, read from them as printed (indented code blocks and inline
code that is a whole command line), and the selections of them that the tests run as printed
(docs/test_readme_commands.py accounts for every one)."""

from __future__ import annotations

import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

from dev.devkit import comfy_harness
from newcomer import quick_start_blocks


README = comfy_harness.REPO_ROOT / "README.md"


# What a user reads as printed: the README and the topic pages it links to (web/docs/, the canvas's node help, shows no commands).
DOCUMENTS = [README, *sorted((comfy_harness.REPO_ROOT / "docs").glob("*.md"))]


# The first word of a command line, after environment assignments: a program or a script of the pack.
COMMAND = re.compile(r"^(?:[A-Z_]+=\S+ +)*(?:python3?|pip|git|cd|ray|comfy|bash|apt-get|scripts/\S+|\S*python\S*\.exe|\S+\.sh)(?: |$)")


# Code blocks that show something other than commands, by how they start.
NOT_COMMANDS = {
    "no ComfyUI answers at": "the runner's output",
    "{": "JSON: jobs file lines, the Identity Score's result object",
    "[14:02:31]": "the batch client's progress line",
    "ComfyUI log:": "the runner's output",
}


@dataclass(frozen=True)
class Command:
    document: Path
    line: int      # the document's line number
    text: str      # as printed, continuation lines joined, without a trailing `# comment`
    inline: bool

    @property
    def where(self) -> str:
        return f"{self.document.relative_to(comfy_harness.REPO_ROOT)}:{self.line}"


def without_comment(command: str) -> str:
    return re.sub(r"\s+#\s.*$", "", command).strip()


def code_blocks(text: str) -> list[list[tuple[int, str]]]:
    """Indented code blocks (4 spaces or more after a blank line, list items' blocks included): (line, stripped text)."""
    blocks, current, previous_blank = [], None, True
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("    ") and line.strip() and (previous_blank or current is not None):
            if current is None:
                current = []
                blocks.append(current)
            current.append((number, line.strip()))
        elif line.strip():
            current = None
        previous_blank = not line.strip()
    return blocks


def document_commands(document: Path) -> list[Command]:
    text = document.read_text(encoding="utf-8")
    name = document.relative_to(comfy_harness.REPO_ROOT)
    assert "```" not in text, f"{name}: a fenced block: teach document_commands() to read it"
    commands = []
    for block in code_blocks(text):
        first = block[0][1]
        if not COMMAND.match(first):
            assert any(first.startswith(start) for start in NOT_COMMANDS), f"{name}:{block[0][0]}: a command? {first}"
            continue
        lines = iter(block)
        for number, line in lines:
            while line.endswith("\\"):
                line = line[:-1].rstrip() + " " + next(lines)[1]
            assert COMMAND.match(line), f"{name}:{number}: not a command, in a block of commands: {line}"
            commands.append(Command(document, number, without_comment(line), inline=False))
    for match in re.finditer(r"`([^`]+)`", text):
        span = " ".join(match.group(1).split())  # an inline span may wrap onto the next line
        if COMMAND.match(span) and " " in span:  # `scripts/run_tests.sh` alone names a file
            commands.append(Command(document, text[:match.start()].count("\n") + 1, span, inline=True))
    return commands


def readme_commands() -> list[Command]:
    """The commands of README.md and of every page of docs/, in that order."""
    return [command for document in DOCUMENTS for command in document_commands(document)]


def commands_of(program: str, *having: str) -> list[str]:
    """The distinct commands of the README and docs/ that start with `program` (after environment assignments) and hold each of `having`."""
    found = []
    for command in readme_commands():
        words = command.text.split()
        while words and re.match(r"^[A-Z_]+=", words[0]):
            words.pop(0)
        if " ".join(words).startswith(program) and all(h in command.text for h in having) and command.text not in found:
            found.append(command.text)
    return found


def arguments(command: str) -> list[str]:
    """The words after `python scripts/x.py` (or `python -m module`), as a POSIX shell splits them."""
    words = shlex.split(command, comments=True)
    while "=" in words[0]:
        words.pop(0)
    return words[3:] if words[1] == "-m" else words[2:]


def run_typed(command: str, cwd: Path, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert "Traceback" not in result.stdout + result.stderr, f"{command}\n{result.stdout}\n{result.stderr}"
    return result


def quick_start() -> list[str]:
    install, commands = quick_start_blocks()
    return [without_comment(line) for line in install + commands]


def block_after(marker: str, document: Path = README) -> list[str]:
    """The commands of the first code block after the line of `document` holding `marker`."""
    text = document.read_text(encoding="utf-8")
    start = next(n for n, line in enumerate(text.splitlines(), 1) if marker in line)
    block = next(block for block in code_blocks(text) if block[0][0] > start)
    return [without_comment(line) for _, line in block]


def cluster_commands() -> list[str]:
    """docs/batches.md's recipe for several machines: make a token, start the head, join a node, run the batch."""
    return block_after("**Several machines.**", comfy_harness.REPO_ROOT / "docs" / "batches.md")


def install_commands() -> list[str]:
    """The install section's by-hand block, its CPU face-detection line, and the optional packages' pip lines."""
    return (block_after("**By hand.**") + block_after("Without a GPU, or on macOS")
            + commands_of("python -m pip install dlib-bin") + commands_of("pip install ray=="))


def check_commands() -> list[str]:
    return commands_of("python scripts/facediffuser_check.py") + commands_of("python scripts/facediffuser_setup.py --dry-run")


def convert_commands() -> list[str]:
    return commands_of("python scripts/facediffuser_setup.py --convert") + commands_of("python -m facediffuser_core.convert")


def batch_server_commands() -> list[str]:
    return commands_of("python scripts/facediffuser_batch.py", "--server")


def runner_small_picture_commands() -> list[str]:
    """The README's first picture for a CPU: the quick start's command at a smaller size, in fewer steps."""
    return commands_of("python scripts/facediffuser_run.py --face", "--steps 20 --width 256 --height 256")


def runner_workflow_commands() -> list[str]:
    """The runner's commands that name a workflow file (the quick start's names none), but for best of N."""
    return [c for c in commands_of("python scripts/facediffuser_run.py") if not arguments(c)[0].startswith("-") and "--candidates" not in c]


def runner_regions_commands() -> list[str]:
    """The runner's two-people commands: --regions with the shipped workflows."""
    return [c for c in commands_of("python scripts/facediffuser_run.py", "--regions") if c not in runner_workflow_commands()]


def schema_lock_commands() -> list[str]:
    return commands_of("cd tests && COMFYUI_PATH=~/ComfyUI python support/schema_lock.py")


def plain_python_commands() -> list[str]:
    return commands_of("python -c")


def gpu_kit_rehearsal_commands() -> list[str]:
    return commands_of("dev/gpu_kit/run.sh", "--device cpu")


def gpu_kit_preparation_commands() -> list[str]:
    return commands_of("python -m dev.gpu_kit.prepare")
