"""Every command README.md and the pages of docs/ show, read from them as printed (indented code blocks and inline
code that is a whole command line), is accounted for here: run by a test exactly as printed, or listed in EXEMPT with
the reason it cannot run on this machine (the page says so beside it), or in PARSED_ONLY (the script's own parser
accepts it as printed; the reason says why it does not run here and which test runs its kind). A command added to
any of them without one of these fails test_every_command_the_readme_shows_is_accounted_for.

What the runs substitute, and nothing else: HOME (so `~/ComfyUI` is a scratch copy), COMFYUI_PATH, HF_ENDPOINT and
FACEDIFFUSER_INSIGHTFACE_SOURCE (a loopback hub stand-in instead of the internet), pip's index (a closed loopback
port: every requirement is already installed, nothing is downloaded), git's address of the pack (this working
tree), for the batch client and the runner the servers' addresses (real ComfyUIs on free loopback ports), the
batch's jobs file's content (test_batch.py), for the runner the default address too and the size of the shipped
workflows (test_headless_runner.py), and for the GPU kit's preparation pip's index (the wheels .ci/run prepared, as
pip's find-links, test_gpu_kit_comfyui.py)."""

from __future__ import annotations

import importlib
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from dev.benchmarks import cli as benchmarks_cli
from dev.devkit import comfy_harness
import pack_scripts
from test_first_run_check import fake_comfyui

README = comfy_harness.REPO_ROOT / "README.md"
# What a user reads as printed: the README and the topic pages it links to (web/docs/, the canvas's node help, shows no commands).
DOCUMENTS = [README, *sorted((comfy_harness.REPO_ROOT / "docs").glob("*.md"))]
runner = pack_scripts.load("facediffuser_run")
setup = pack_scripts.load("facediffuser_setup")
batch = pack_scripts.load("facediffuser_batch")

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


# --- what runs, where ------------------------------------------------------------------------------------------

def quick_start() -> list[str]:
    from test_first_picture import quick_start_blocks

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
    return commands_of("cd tests && COMFYUI_PATH=~/ComfyUI python schema_lock.py")


def plain_python_commands() -> list[str]:
    return commands_of("python -c")


def gpu_kit_rehearsal_commands() -> list[str]:
    return commands_of("dev/gpu_kit/run.sh", "--device cpu")


def gpu_kit_preparation_commands() -> list[str]:
    return commands_of("python -m dev.gpu_kit.prepare")


RUN = {  # test that runs them as printed: the commands it runs
    "test_first_picture.py::test_the_readmes_quick_start_as_printed_reaches_a_picture_on_a_cpu_only_machine": quick_start,
    "test_readme_commands.py::test_the_install_commands_run_as_printed": install_commands,
    "test_readme_commands.py::test_the_readmes_check_and_dry_run_commands_report_without_a_traceback": check_commands,
    "test_readme_commands.py::test_the_convert_commands_run_as_printed": convert_commands,
    "test_readme_commands.py::test_the_python_one_liners_run_as_printed": plain_python_commands,
    "test_batch.py::test_the_readmes_server_batch_commands_run_as_printed": batch_server_commands,
    # with 127.0.0.1 for <head address>, --num-cpus 1 on each node and the CPU options for the batch
    "test_batch_ray_comfyui.py::test_a_two_node_cluster_started_as_the_docs_print_survives_every_fault_and_server_gives_the_same_pictures":
        cluster_commands,
    "test_headless_runner.py::test_the_readmes_runner_commands_with_a_workflow_run_as_printed": runner_workflow_commands,
    "test_headless_runner.py::test_the_readmes_small_first_picture_for_a_cpu_runs_as_printed": runner_small_picture_commands,
    "test_runner_regions.py::test_the_readmes_regions_commands_run_as_printed": runner_regions_commands,
    # the lock written to a scratch file beside the real one, which it must equal
    "test_schema_lock_comfyui.py::test_the_regeneration_command_writes_the_lock": schema_lock_commands,
    # in a copy of the working tree whose kit holds COMFYUI_PATH's tree
    "test_gpu_kit_comfyui.py::test_the_kit_rehearses_every_measurement_on_this_cpu_as_printed": gpu_kit_rehearsal_commands,
    # pip finding the wheels .ci/run prepared (skipped where none were prepared)
    "test_gpu_kit_comfyui.py::test_the_preparation_runs_as_printed_with_the_wheels_ci_prepared": gpu_kit_preparation_commands,
}

EXEMPT = {  # command -> (why it cannot run here, what the README says beside it)
    "dev/gpu_kit/run.sh --out gpu-kit-results": ("an NVIDIA GPU (its CPU form runs in test_gpu_kit_comfyui.py)", "not tested here"),
    "COMFYUI_PATH=~/ComfyUI PYTHONPATH=scripts python -m dev.gpu_kit --out gpu-kit-results":
        ("an NVIDIA GPU (its CPU form runs in test_gpu_kit_comfyui.py)", "not tested here"),
    "comfy node install facediffuser": ("comfy-cli installs from the Comfy Registry: the internet", "not tested here"),
    '..\\..\\..\\python_embeded\\python.exe -m pip install -r requirements.txt': ("Windows", "not tested here"),
    "python -m pip install insightface && python -m pip uninstall -y onnxruntime && python -m pip install onnxruntime-gpu":
        ("an NVIDIA GPU, and it replaces the runtime of the Python running the tests", "not tested here"),
    'python -m pip install "facediffuser[insightface]"':
        ("the pack from a package index: the internet (test_the_insightface_extra_is_the_cpu_line checks the extra)", "not tested here"),
    "python -m pip uninstall -y onnxruntime onnxruntime-gpu": ("it uninstalls the runtime of the Python running the tests", "not tested here"),
    "python -m pip install onnxruntime": ("only after the uninstall above", "not tested here"),
    "python main.py": ("ComfyUI's own start on its fixed port without --cpu: an NVIDIA GPU (tests start it with --cpu on free ports)",
                       "not tested here"),
    "python main.py --port 8188 --cuda-device 0": ("NVIDIA GPUs", "not tested here"),
    "python scripts/facediffuser_batch.py portraits.jsonl --ray": ("GPU workers", "GPU workers"),
    "scripts/run_tests.sh": ("it is the suite itself, and builds its virtual environment from the internet", "CI (`.ci/run`) runs"),
    "scripts/run_tests.sh test_snf_core.py -k ties": ("the suite's own runner (see above)", "CI (`.ci/run`) runs"),
    "COMFYUI_PATH=~/ComfyUI scripts/run_tests.sh": ("the suite's own runner (see above)", "CI (`.ci/run`) runs"),
    "COMFYUI_PATH=~/comfyui-0.17.0:~/comfyui-0.33.0 scripts/run_tests.sh": ("the suite's own runner (see above)", "CI (`.ci/run`) runs"),
    "apt-get install -y chromium": ("a system package, installed as root: no test installs one", "CI (`.ci/run`) installs it"),
}

MEASURES = ("minutes of measurement (the README's figures); test_benchmark_comfyui.py runs its modes' code at a reduced size")

PARSED_ONLY = {  # command -> why it is only parsed (by its script's parser, as printed)
    "python scripts/facediffuser_setup.py --verify":
        "it reads the models in place against the hub: test_setup.py::test_verify_compares_a_file_verified_before_again runs "
        "--verify against the hub stand-in",
    "python scripts/facediffuser_run.py my_workflow_with_identity.json --face me.jpg --seed 1 --candidates 8 --keep-best 2 --output best/":
        "8 runs, a minute and more here: test_headless_runner.py::test_best_of_n_keeps_the_best_pictures_and_writes_every_seeds_scores "
        "runs best of N with 3 candidates and --keep-best 2",
    "COMFYUI_PATH=~/ComfyUI PYTHONPATH=scripts python -m dev.benchmarks": MEASURES,
    "COMFYUI_PATH=~/ComfyUI PYTHONPATH=scripts python -m dev.benchmarks --quick": MEASURES,
    "COMFYUI_PATH=~/ComfyUI PYTHONPATH=scripts python -m dev.benchmarks --device cuda": "an NVIDIA GPU",
    "COMFYUI_PATH=~/ComfyUI PYTHONPATH=scripts python -m dev.benchmarks --null-unet": MEASURES,
    "COMFYUI_PATH=~/ComfyUI PYTHONPATH=scripts python -m dev.benchmarks --regions --latent 64": MEASURES,
    'PYTHONPATH=scripts python -m dev.benchmark_batch jobs.jsonl --workers 2 --ray-cpus-per-worker 1 --comfyui-args "--cpu" --repeat 5':
        "benchmark runs: a Ray cluster and servers, minutes; test_batch_ray_comfyui.py runs it with one worker on 3 runs",
    "PYTHONPATH=scripts python -m dev.benchmark_fleet --jobs 100000 --workers 256":
        "minutes; test_batch_fleet_simulation.py runs it on 2,000 jobs",
    "python scripts/identity_benchmark.py --face man.png --face woman.png --seeds 8 --output scores.json":
        "72 pictures at 512 px: test_identity_benchmark.py::test_a_run_on_tiny_models_prints_the_table runs it on tiny models",
}

PARSERS = {  # script -> its own argument parser, for the commands that are only parsed
    "scripts/facediffuser_run.py": runner.parse_args,
    "scripts/facediffuser_setup.py": setup.parse_args,
    "scripts/facediffuser_batch.py": batch.parse_args,
    "-m dev.benchmarks": benchmarks_cli.parse_arguments,
    "scripts/identity_benchmark.py": pack_scripts.load("identity_benchmark").parse_args,
}


def test_every_command_the_readme_shows_is_accounted_for():
    for test in RUN:  # a renamed test must take its entry along
        module, name = test.split(".py::")
        assert callable(getattr(importlib.import_module(module), name, None)), f"no test {test}"
    shown = {command.text: command for command in readme_commands()}
    run = {command: test for test, select in RUN.items() for command in select()}
    assert set(run) <= set(shown), "RUN selects what neither the README nor docs/ shows"
    for table in (EXEMPT, PARSED_ONLY):
        assert set(table) <= set(shown), f"no longer in the README or docs/: {sorted(set(table) - set(shown))}"
        assert not set(table) & set(run), f"both run and listed: {sorted(set(table) & set(run))}"
    assert not set(EXEMPT) & set(PARSED_ONLY)
    unaccounted = [f"{c.where}: {c.text}" for c in readme_commands() if c.text not in run | EXEMPT | PARSED_ONLY]
    assert unaccounted == [], "run each in a test as printed (RUN), or list it in EXEMPT with the reason:\n" + "\n".join(unaccounted)


@pytest.mark.parametrize("command", sorted(EXEMPT))
def test_the_readme_says_beside_each_exempt_command_that_it_is_unproven_here(command):
    _, words = EXEMPT[command]
    for found in (c for c in readme_commands() if c.text == command):
        lines = found.document.read_text(encoding="utf-8").splitlines()
        nearby = " ".join(lines[max(found.line - 20, 0):found.line + 20])
        assert words.lower() in " ".join(nearby.split()).lower(), f"{found.where}: say '{words}' beside {command}"


@pytest.mark.parametrize("command", sorted({c.text for c in readme_commands() if any(f" {script}" in c.text for script in PARSERS)}))
def test_every_script_command_of_the_readme_parses(command):
    """Run or not, each command of the run, set-up, batch and benchmark scripts as printed is accepted by the script's own parser."""
    (script,) = [script for script in PARSERS if f" {script}" in command]
    PARSERS[script](arguments(command))


def test_the_benchmark_batch_and_fleet_commands_parse():
    for command in commands_of("PYTHONPATH=scripts python -m dev.benchmark_batch") + commands_of("PYTHONPATH=scripts python -m dev.benchmark_fleet"):
        # No parse function of its own: argparse reads every word before --help, then prints the help.
        done = run_typed(command + " --help", comfy_harness.REPO_ROOT, {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"})
        assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("span", sorted({span for document in DOCUMENTS
                                         for span in re.findall(r'`(--comfyui-args "[^"]*")`', document.read_text(encoding="utf-8"))}))
def test_every_comfyui_args_spelling_of_the_readme_parses(span):
    (value,) = re.findall(r'"([^"]*)"', span)
    assert runner.parse_args(["--face", "me.jpg", *shlex.split(span)]).comfyui_args == value


def test_the_insightface_extra_is_the_cpu_line():
    import tomllib

    extra = tomllib.loads((comfy_harness.REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["insightface"]
    assert [re.split(r"[<>=]", requirement)[0] for requirement in extra] == arguments("python -m pip install insightface onnxruntime")[1:]


# --- the runs ---------------------------------------------------------------------------------------------------

def plain_env(tmp_path: Path, **more: str) -> dict:
    return {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(tmp_path), "HF_ENDPOINT": "http://127.0.0.1:9", **more}


@pytest.mark.parametrize("command", check_commands())
def test_the_readmes_check_and_dry_run_commands_report_without_a_traceback(command, tmp_path):
    comfyui = fake_comfyui(tmp_path / "ComfyUI")  # also `~/ComfyUI`, HOME being tmp_path
    if "--comfyui-python ~/ComfyUI/venv" in command:  # ComfyUI's venv, with nothing installed in it
        subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip", str(comfyui / "venv")],
                       check=True, capture_output=True, timeout=300)
    result = run_typed(command, comfy_harness.REPO_ROOT, plain_env(tmp_path, COMFYUI_PATH=str(comfyui)), timeout=300)
    assert result.returncode in (0, 1) and ("first-run check" in result.stdout or "Dry run" in result.stdout), result.stdout + result.stderr
    if "--comfyui-python" in command:
        assert f"[  ok   ] Python: {'.'.join(map(str, sys.version_info[:3]))} at {comfyui / 'venv' / 'bin' / 'python'}" in result.stdout


def test_the_python_one_liners_run_as_printed(tmp_path):
    for command in plain_python_commands():
        done = run_typed(command, tmp_path, plain_env(tmp_path), timeout=120)
        assert done.returncode == 0 and done.stdout.strip(), done.stdout + done.stderr


def test_the_install_commands_run_as_printed(tmp_path):
    """The by-hand install in a scratch ComfyUI folder, then the optional packages' lines: pip finds everything
    installed (its index is a closed loopback port), git clones this working tree."""
    from test_first_picture import newcomer_environment

    env = newcomer_environment(tmp_path)
    (tmp_path / "ComfyUI" / "custom_nodes").mkdir(parents=True)
    done = run_typed("set -e\n" + "\n".join(install_commands()), tmp_path, env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "ComfyUI" / "custom_nodes" / "comfyui-facediffuser" / "scripts" / "facediffuser_run.py").is_file()
    assert "Requirement already satisfied: ray==" in done.stdout


def test_the_convert_commands_run_as_printed(tmp_path):
    """In a pack folder inside a scratch ComfyUI: the set-up's --convert against the hub stand-in (tiny official-layout
    checkpoints), then, with its conversions moved away, the converter's two commands on the .bin files it left."""
    from safetensors import safe_open

    import hub_stand_in
    from dev.devkit import official_checkpoints
    from test_first_picture import official_bin
    from test_setup import serve_everything

    comfyui = fake_comfyui(tmp_path / "ComfyUI")
    pack = comfyui / "custom_nodes" / "comfyui-facediffuser"
    pack.mkdir(parents=True)
    for name in ("scripts", "facediffuser_core"):
        (pack / name).symlink_to(comfy_harness.REPO_ROOT / name)
    folder = comfyui / "models" / "facediffuser"
    set_up, converts = convert_commands()[:1], convert_commands()[1:]
    assert len(set_up) == 1 and len(converts) == 2
    with hub_stand_in.running() as hub:
        zip_url = serve_everything(hub, sdm=official_bin(official_checkpoints.build_sdm()),
                                 tdm=official_bin(official_checkpoints.build_tdm()))
        env = plain_env(tmp_path, COMFYUI_PATH=str(comfyui), HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf_home"),
                        HF_HUB_DISABLE_PROGRESS_BARS="1", **{setup.SOURCE_VARIABLE: zip_url})
        done = run_typed(set_up[0], pack, env)
    assert done.returncode == 0, done.stdout + done.stderr
    for name in ("facediffuser_sdm.safetensors", "facediffuser_tdm.safetensors"):
        (folder / name).rename(tmp_path / name)
    for command in converts:
        converted = run_typed(command, pack, env, timeout=120)
        assert converted.returncode == 0, converted.stdout + converted.stderr
    for name in ("facediffuser_sdm.safetensors", "facediffuser_tdm.safetensors"):
        with safe_open(str(folder / name), framework="pt") as ours, safe_open(str(tmp_path / name), framework="pt") as setups:
            assert sorted(ours.keys()) == sorted(setups.keys()) and {ours.get_slice(k).get_dtype() for k in ours.keys()} <= {"F16", "I64"}
