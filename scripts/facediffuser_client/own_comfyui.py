"""A ComfyUI of the client's own: started headless on a free loopback port when none answers, stopped after."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import comfyui_python
from .http_api import DEFAULT_SERVER, ComfyClient, RunError, comfyui_answers
from .pack import PACK_ROOT, core


OWN_SERVER_START_TIMEOUT_S = 600.0

OWN_SERVER_STOP_TIMEOUT_S = 30.0
GPU_PROBE_TIMEOUT_S = 120.0
# What the ComfyUI that is started prints when it was asked for a GPU that its torch lacks.
NO_GPU_SIGNS = ("Torch not compiled with CUDA enabled", "Found no NVIDIA driver", "No CUDA GPUs are available")
# What it prints when its Python lacks ComfyUI's requirements (a Python that is not ComfyUI's), or holds a broken one.
MISSING_MODULE = re.compile(r"No module named '[^']+'")
TORCHVISION_MISMATCH = "operator torchvision::nms does not exist"
# Read in the Python that runs ComfyUI, in a child so that the client itself never imports torch.
GPU_PROBE = ("import torch; mps = getattr(torch.backends, 'mps', None); xpu = getattr(torch, 'xpu', None); "
             "print(int(torch.cuda.is_available() or bool(mps and mps.is_available()) or bool(xpu and xpu.is_available())))")


def torch_sees_a_gpu(python: Path | None = None) -> bool | None:
    """Whether the torch of `python` (default: this one) has a GPU to run on (CUDA or ROCm, MPS, XPU); None when that
    cannot be told."""
    try:
        probe = subprocess.run([str(python or sys.executable), "-c", GPU_PROBE], capture_output=True, text=True, timeout=GPU_PROBE_TIMEOUT_S,
                               stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    answer = probe.stdout.strip().splitlines()[-1:] if probe.returncode == 0 else []
    return answer == ["1"] if answer in (["0"], ["1"]) else None


def comfyui_arguments(extra_args: list[str], report=print, python: Path | None = None) -> list[str]:
    """The user's arguments for main.py, with --cpu ahead of them when the torch of ComfyUI's Python has no GPU:
    ComfyUI dies at start without it there ("Torch not compiled with CUDA enabled")."""
    if "--cpu" in extra_args or torch_sees_a_gpu(python) is not False:
        return extra_args
    report(f"torch in {python or sys.executable} has no GPU (a CPU-only build): starting ComfyUI with --cpu")
    return ["--cpu", *extra_args]


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class OwnComfyUI:
    """The ComfyUI in `root`, started with `python` (default: this Python), headless on 127.0.0.1 and a free port, in
    a process group of its own so that stopping it ends everything it started: the runner's own server, each Ray
    worker's, and the tests' (which start it through `entry`, a script that sets their CPU shims up and then runs
    main.py). Its output goes to `log` (default: a temporary file). With die_with_parent (Linux) it is killed when
    the process that started it dies, even by SIGKILL: a lost Ray worker leaves no ComfyUI behind."""

    def __init__(self, root: Path, extra_args: list[str], report=print, die_with_parent: bool = False, python: Path | None = None,
                 log: Path | None = None, entry: Path | None = None):
        self.root = root
        self.extra_args = extra_args
        self.report = report
        self.python = python or Path(sys.executable)
        self.url = f"http://127.0.0.1:{free_loopback_port()}"
        if log is None:
            handle, name = tempfile.mkstemp(prefix="facediffuser-comfyui-", suffix=".log")
            os.close(handle)
            log = Path(name)
        self.log = log
        command = [str(entry or root / "main.py"), "--listen", "127.0.0.1", "--port", self.url.rsplit(":", 1)[1],
                   "--disable-auto-launch", *extra_args]
        if die_with_parent and sys.platform == "linux":
            # The launcher asks the kernel for the signal, then becomes ComfyUI: no Python runs between fork and exec
            # (in a multithreaded Ray worker that may deadlock).
            command = [str(Path(__file__).with_name("end_with_parent.py")), str(os.getpid()), *command]
        group = {"start_new_session": True} if os.name == "posix" else {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
        with open(log, "wb") as log_file:
            self.process = subprocess.Popen([str(self.python), *command], cwd=root, stdin=subprocess.DEVNULL, stdout=log_file,
                                            stderr=subprocess.STDOUT, **group)
        report(f"started ComfyUI from {root} (pid {self.process.pid}) at {self.url}; its log: {self.log}")

    def log_tail(self, chars: int = 3000) -> str:
        """The log's last `chars` characters, from the start of a line."""
        text = self.log.read_text(errors="replace")
        if len(text) <= chars:
            return text
        tail = text[-chars:]
        return tail[tail.index("\n") + 1:] if "\n" in tail else tail

    def wait_until_ready(self, timeout_s: float = OWN_SERVER_START_TIMEOUT_S) -> None:
        started = time.monotonic()
        while not comfyui_answers(self.url):
            if self.process.poll() is not None:
                tail = self.log_tail()
                raise RunError(f"the ComfyUI started from {self.root} exited with status {self.process.returncode} before "
                               f"answering; the end of its log ({self.log}):\n{tail}{self.start_failure_hint(tail)}")
            if time.monotonic() - started > timeout_s:
                raise RunError(f"the ComfyUI started from {self.root} did not answer within {timeout_s:g} s; see its log {self.log}")
            time.sleep(0.5)
        if not ComfyClient(self.url).get_json("/object_info/FaceDiffuserSNFSampler"):
            raise RunError(f"the ComfyUI started from {self.root} has not loaded the Face-diffuser nodes (is the pack in its "
                           f"custom_nodes folder?); look for 'Cannot import' in its log {self.log}")
        self.report(f"ComfyUI is ready ({time.monotonic() - started:.0f} s)")

    def start_failure_hint(self, tail: str) -> str:
        """The fix for the start failures a user meets, read from the end of the log."""
        if any(sign in tail for sign in NO_GPU_SIGNS):
            return f'\nThis torch has no usable GPU: run again with --comfyui-args "{shlex.join(["--cpu", *self.extra_args])}"'
        if TORCHVISION_MISMATCH in tail:
            return (f"\nThe torchvision of {self.python} does not match its torch: the check says which one to install "
                    f"(`{self.python} {PACK_ROOT / 'scripts' / 'facediffuser_check.py'}`)")
        if missing := MISSING_MODULE.search(tail):
            return (f"\nComfyUI was started with {self.python}, which lacks ComfyUI's requirements ({missing.group(0)}): is it "
                    f"the Python that runs ComfyUI? Name that one with {comfyui_python.OPTION} (its python, or its venv or "
                    f"conda environment's folder); or, if it is this one, install them: `{self.python} -m pip install -r "
                    f"{self.root / 'requirements.txt'}`")
        return ""

    def stop(self) -> bool:
        """End the process group; False when the process had already exited by itself (its log then tells why)."""
        if self.process.poll() is not None:
            self.report(f"the ComfyUI started for this job (pid {self.process.pid}) had exited by itself (status "
                        f"{self.process.returncode}); its log: {self.log}")
            return False
        if os.name == "posix":
            os.killpg(self.process.pid, signal.SIGTERM)
        else:
            self.process.terminate()
        try:
            self.process.wait(OWN_SERVER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL) if os.name == "posix" else self.process.kill()
            self.process.wait(OWN_SERVER_STOP_TIMEOUT_S)
        self.report(f"stopped the ComfyUI started for this job (pid {self.process.pid})")
        return True


def private_folders(scratch: Path) -> list[str]:
    """ComfyUI's options that give it input, output and temp folders of its own under `scratch`: ComfyUIs started
    from one folder would otherwise number their pictures from the same files and overwrite each other's."""
    return [option for name in ("input", "output", "temp") for option in (f"--{name}-directory", str(scratch / name))]


# Options whose value is itself a command line: argparse takes `--comfyui-args "--cpu"` for two options.
COMMAND_LINE_OPTIONS = ("--comfyui-args",)


def attach_command_line_values(argv: list[str]) -> list[str]:
    """`--comfyui-args "--cpu"` as `--comfyui-args=--cpu`, the one spelling argparse reads when the value starts with -.
    Every command line with --comfyui-args parses through this."""
    attached, rest = [], iter(argv)
    for arg in rest:
        value = next(rest, None) if arg in COMMAND_LINE_OPTIONS else None
        attached.append(arg if value is None else f"{arg}={value}")
    return attached


def comfyui_root(option: Path | None) -> Path | None:
    """The ComfyUI this pack is installed in, COMFYUI_PATH, or `option`: facediffuser_core's rule, which the nodes,
    the check and the set-up share."""
    return core("model_folders").find_comfyui(option)


def python_said(python: comfyui_python.ComfyUIPython) -> str:
    """The Python a ComfyUI is started with, and why that one: plainly so when it is not the one running the client."""
    if not python.found:
        return f"this Python, {python.executable} (none found beside ComfyUI; {comfyui_python.OPTION} names another)"
    if python.is_this_one:
        return f"this Python, {python.executable} ({python.found})"
    return f"ComfyUI's Python, {python.executable} ({python.found}), not this one ({sys.executable})"


@contextlib.contextmanager
def server_for(args: argparse.Namespace):
    """The address to send the job to: --server; else the default address when a ComfyUI answers there; else a
    ComfyUI of the runner's own, stopped afterwards (also on errors and Ctrl-C) unless --keep-server."""
    if args.server or comfyui_answers(DEFAULT_SERVER):
        yield args.server or DEFAULT_SERVER
        return
    root = comfyui_root(args.comfyui)
    if root is None or not (root / "main.py").is_file():
        where = f"{args.comfyui} is not a ComfyUI folder" if args.comfyui else (
            f"this pack ({PACK_ROOT}) is not inside ComfyUI/custom_nodes and COMFYUI_PATH is not set")
        raise RunError(f"no ComfyUI server answers at {DEFAULT_SERVER}, and none can be started: {where}. Pass --comfyui "
                       f"<ComfyUI folder> to start that one, or start ComfyUI yourself and pass --server")
    try:
        python = comfyui_python.choose(root, getattr(args, "comfyui_python", None))
    except comfyui_python.PythonNotUsable as error:
        raise RunError(str(error)) from None
    print(f"no ComfyUI answers at {DEFAULT_SERVER}: starting one for this job with {python_said(python)}")
    own = OwnComfyUI(root, comfyui_arguments(shlex.split(args.comfyui_args or ""), python=python.executable), python=python.executable)
    ready = False
    try:
        own.wait_until_ready()
        ready = True
        yield own.url
    finally:
        if ready and args.keep_server and own.process.poll() is None:
            print(f"ComfyUI keeps running at {own.url} (pid {own.process.pid}; log {own.log}); stop it with `kill {own.process.pid}`")
        elif own.stop() and ready:  # a failed start or a crash keeps its log, which the messages name
            own.log.unlink(missing_ok=True)
