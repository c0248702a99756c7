"""One ComfyUI in one process, running the kit's measurements in turn; the conductor starts it:

    python -m dev.gpu_kit.worker --device cuda --results DIR --measurements speed,host-work [--tiny] [--comfyui-argument=ARG]

Each measurement's result, or its error, goes to DIR/<name>.json (written whole: a measurement that the
conductor stops leaves none). Lines starting with MARK on stdout tell the conductor what runs."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

MARK = "GPU-KIT "


def labels(comfyui, device: str) -> dict:
    """What every figure of this worker was measured with."""
    import comfy.model_patcher
    import torch

    from dev.gpu_kit.measurements.regions import attention_backend
    from dev.gpu_kit.prepare import comfyui_version

    if device == "cuda":
        name, cuda = torch.cuda.get_device_name(), torch.version.cuda
    else:
        from dev.benchmarks.report import machine_description

        name, cuda = machine_description("cpu").split(",")[0], None
    return {"device": name, "device_kind": device, "torch": torch.__version__, "cuda": cuda, "python": platform.python_version(),
            "comfyui": comfyui_version(comfyui.root), "dynamic_vram": comfyui.dynamic_vram,
            "patcher": comfy.model_patcher.CoreModelPatcher.__name__, "attention": attention_backend(),
            "stand_ins": comfyui.stand_ins}


def release_models() -> None:
    """What one measurement loaded is not left on the device for the next one."""
    import comfy.model_management

    comfy.model_management.unload_all_models()
    gc.collect()
    comfy.model_management.soft_empty_cache()


def write_whole(path: Path, content: dict) -> None:
    from dev.benchmarks.report import as_json

    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(content, indent=1, default=as_json), encoding="utf-8")
    os.replace(partial, path)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m dev.gpu_kit.worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), required=True)
    parser.add_argument("--tiny", action="store_true", help="the CPU rehearsal's sizes")
    parser.add_argument("--results", type=Path, required=True, help="a folder for one JSON file per measurement")
    parser.add_argument("--measurements", required=True, help="names, comma-separated, run in this order")
    parser.add_argument("--comfyui-argument", action="append", default=[], help="an argument for ComfyUI's main.py (repeatable)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from dev.gpu_kit.measurements import Context
    from dev.gpu_kit.plan import MEASUREMENTS
    from dev.devkit import comfy_harness

    names = args.measurements.split(",")
    comfyui = comfy_harness.start(cpu=args.device == "cpu", arguments=args.comfyui_argument)
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False
    logging.getLogger().setLevel(logging.WARNING)
    worker_labels = labels(comfyui, args.device)
    print(MARK + "started " + json.dumps(worker_labels), flush=True)
    log = lambda message: print(f"gpu-kit: {message}", file=sys.stderr, flush=True)
    for name in names:
        print(MARK + "begin " + name, flush=True)
        log(f"{name}: {MEASUREMENTS[name].__doc__.splitlines()[0]}")
        started = time.perf_counter()
        record = {"name": name, "labels": worker_labels}
        try:
            with tempfile.TemporaryDirectory(prefix=f"gpu-kit-{name}-") as scratch:
                result = MEASUREMENTS[name].measure(Context(comfyui, args.device, args.tiny, Path(scratch), log))
            record.update(status="ok", **result.as_json())
        except Exception:  # recorded with its traceback; the next measurement goes on
            record.update(status="failed", error=traceback.format_exc(limit=12))
            log(f"{name} failed:\n{record['error']}")
        record["seconds"] = time.perf_counter() - started
        write_whole(args.results / f"{name}.json", record)
        release_models()
        print(MARK + "end " + name, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
