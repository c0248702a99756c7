"""The kit's measurements, one worker process after another, each measurement on its budget:

    PYTHONPATH=scripts python -m dev.gpu_kit --out DIR [--device cuda|cpu] [--tiny] [--as-gpu-image] [--comfyui PATH]

A measurement that fails is recorded with its error; one that runs past its budget, or a worker that dies, is
stopped and recorded, and a fresh worker goes on with the rest while the deadline leaves time. DIR receives
gpu-kit.json, gpu-kit.md and gpu-kit.log (the workers' output)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import queue
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from dev import child_process
from dev.gpu_kit import plan, report
from dev.gpu_kit.prepare import KIT_FOLDER
from dev.gpu_kit.worker import MARK

AS_GPU_IMAGE = Path(__file__).resolve().parent / "as_gpu_image"


class Clock:
    def __init__(self, deadline_s: float | None):
        self.started = time.monotonic()
        self.deadline_s = deadline_s

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def left(self) -> float:
        return float("inf") if self.deadline_s is None else self.deadline_s - self.elapsed()


def _lines(stream, into: queue.Queue) -> None:
    for line in stream:
        into.put(line.rstrip("\n"))
    into.put(None)


def _stop(process: subprocess.Popen) -> None:
    """The worker and what it started (a memory probe, the CPU run): its whole process group."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def _tail(log: Path, characters: int = 3000) -> str:
    text = log.read_text(encoding="utf-8", errors="replace")
    return text[-characters:]


class Conductor:
    """Runs workers (`worker_module`, the kit's own unless a test gives another) within `budgets` (plan.BUDGETS_S)."""

    def __init__(self, args, results: Path, log: Path, budgets: dict = plan.BUDGETS_S, worker_module: str = "dev.gpu_kit.worker"):
        self.args, self.results, self.log = args, results, log
        self.budgets, self.worker_module = budgets, worker_module
        self.clock = Clock(args.deadline)
        self.records: list[dict] = []
        self.environment = child_process.environment(COMFYUI_PATH=str(args.comfyui), PYTHONUNBUFFERED="1")
        if args.as_gpu_image:
            self.environment["PYTHONPATH"] = os.pathsep.join([str(AS_GPU_IMAGE), self.environment["PYTHONPATH"]])

    def budget(self, phase: str) -> float:
        return self.budgets[phase][1 if self.args.tiny else 0]

    def record(self, worker: plan.Worker, name: str, status: str, error: str = "", labels: dict | None = None, seconds: float = 0.0):
        self.records.append({"name": name, "worker": worker.label, "status": status, "error": error, "labels": labels or {},
                             "seconds": seconds, "rows": [], "tables": []})

    def run(self, worker: plan.Worker) -> None:
        pending = list(worker.measurements)
        while pending:
            if self.clock.left() < self.budget("start") / 3 + plan.LEAST_S:
                for name in pending:
                    self.record(worker, name, "not run", "the kit's deadline left too little time to start a worker")
                return
            pending = self.one_worker(worker, pending)

    def one_worker(self, worker: plan.Worker, pending: list[str]) -> list[str]:
        """Runs `pending` in one worker; returns those it did not reach (after a stopped or dead one)."""
        command = child_process.module_command(self.worker_module, "--device", self.args.device, "--results", str(self.results),
                                               "--measurements", ",".join(pending), *(["--tiny"] if self.args.tiny else []),
                                               *(f"--comfyui-argument={argument}" for argument in worker.comfyui_arguments))
        with open(self.log, "a", encoding="utf-8") as log:
            log.write(f"\n=== worker {worker.label}: {' '.join(pending)} ===\n")
            log.flush()
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, cwd=child_process.REPO_ROOT,
                                       env=self.environment, start_new_session=True)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=_lines, args=(process.stdout, lines), daemon=True).start()
        current, labels = "start", {}
        phase_ends = time.monotonic() + min(self.budget("start"), self.clock.left())
        began = time.monotonic()
        while True:
            try:
                line = lines.get(timeout=min(max(phase_ends - time.monotonic(), 0.0), 60.0))
            except queue.Empty:
                if time.monotonic() < phase_ends:
                    continue
                _stop(process)
                budget = self.budget(current) if current != "start" else self.budget("start")
                why = "the kit's deadline" if self.clock.left() <= 0 else f"its budget of {budget:.0f} s"
                return self._failed(worker, pending, current, labels, f"stopped: it ran past {why}", began)
            if line is None:
                process.wait()
                if not pending:
                    return []
                return self._failed(worker, pending, current, labels, f"the worker process ended (exit {process.returncode})", began)
            if not line.startswith(MARK):
                continue
            word, _, rest = line[len(MARK):].partition(" ")
            if word == "started":
                labels, current = json.loads(rest), None
                phase_ends = time.monotonic() + self.clock.left()
            elif word == "begin":
                current, began = rest, time.monotonic()
                if self.clock.left() < plan.LEAST_S:
                    _stop(process)
                    for name in pending:
                        self.record(worker, name, "not run", "the kit's deadline", labels)
                    return []
                phase_ends = time.monotonic() + min(self.budget(current), self.clock.left())
            elif word == "end":
                self._collect(worker, rest)
                pending.remove(rest)
                current = None
                phase_ends = time.monotonic() + self.clock.left()

    def _failed(self, worker, pending, current, labels, why: str, began: float) -> list[str]:
        tail = _tail(self.log)
        if current in (None, "start"):
            for name in pending:
                self.record(worker, name, "not run", f"{why} before {name} began; the log's end:\n{tail}", labels)
            return []
        self.record(worker, current, "failed", f"{why}; the log's end:\n{tail}", labels, time.monotonic() - began)
        return pending[pending.index(current) + 1:]

    def _collect(self, worker: plan.Worker, name: str) -> None:
        measured = json.loads((self.results / f"{name}.json").read_text(encoding="utf-8"))
        self.records.append({"worker": worker.label, "error": "", "rows": [], "tables": [], **measured})


def commit() -> str:
    done = subprocess.run(["git", "-C", str(child_process.REPO_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else "an unknown commit (no git here)"


def default_comfyui() -> Path | None:
    if (KIT_FOLDER / "comfyui" / "comfy" / "samplers.py").is_file():
        return KIT_FOLDER / "comfyui"
    return Path(os.environ["COMFYUI_PATH"]) if os.environ.get("COMFYUI_PATH") else None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m dev.gpu_kit", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("--out", type=Path, required=True, help="the folder for gpu-kit.json, gpu-kit.md and gpu-kit.log")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="where the measurements run (default: cuda)")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: the kit's rehearsal on a CPU, minutes instead of hours")
    parser.add_argument("--as-gpu-image", action="store_true",
                        help="refuse to import any package the GPU image lacks and the kit does not carry (a rehearsal elsewhere)")
    parser.add_argument("--comfyui", type=Path, help="the ComfyUI checkout (default: the prepared kit's, else $COMFYUI_PATH)")
    parser.add_argument("--deadline", type=float, help=f"seconds for the whole run (default: {plan.DEADLINE_S}, none with --tiny)")
    parser.add_argument("--only", help=f"these measurements alone, comma-separated: {', '.join(plan.MEASUREMENTS)}")
    args = parser.parse_args(argv)
    args.comfyui = (args.comfyui or default_comfyui())
    if args.comfyui is None or not (args.comfyui.expanduser() / "comfy" / "samplers.py").is_file():
        parser.error(f"--comfyui {args.comfyui or '(none)'}: no ComfyUI checkout there. Prepare the kit "
                     "(python -m dev.gpu_kit.prepare --comfyui ~/ComfyUI), or give --comfyui or COMFYUI_PATH")
    args.comfyui = args.comfyui.expanduser().resolve()
    args.only = set(args.only.split(",")) if args.only else None
    if args.only and not args.only <= set(plan.MEASUREMENTS):
        parser.error(f"--only: no measurement {', '.join(sorted(args.only - set(plan.MEASUREMENTS)))}; "
                     f"choose from {', '.join(plan.MEASUREMENTS)}")
    if args.deadline is None and not args.tiny:
        args.deadline = plan.DEADLINE_S
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print(f"gpu-kit: --device cuda: this torch ({torch.__version__}) sees no GPU. On a machine without one the kit "
                  "rehearses with --device cpu --tiny.", file=sys.stderr)
            return 2
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / report.LOG_NAME
    log.write_text("", encoding="utf-8")
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    with tempfile.TemporaryDirectory(prefix="gpu-kit-results-") as results:
        conductor = Conductor(args, Path(results), log)
        try:
            for worker in plan.workers(args.only):
                conductor.run(worker)
        except KeyboardInterrupt:
            print("gpu-kit: interrupted; what was measured so far is written. Run the same command again for the rest.", file=sys.stderr)
    manifest = KIT_FOLDER / "manifest.json"
    run = {"kit": {"command": "python -m dev.gpu_kit " + shlex.join(argv), "started": started, "seconds": conductor.clock.elapsed(),
                   "deadline_s": args.deadline, "device": args.device, "tiny": args.tiny, "as_gpu_image": args.as_gpu_image,
                   "commit": commit(), "prepared": json.loads(manifest.read_text()) if manifest.is_file() else None},
           "measurements": conductor.records}
    table = report.write(args.out, run)
    print(table.read_text(encoding="utf-8"))
    return 0 if all(record["status"] == "ok" for record in conductor.records) else 1
