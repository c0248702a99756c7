"""Peak memory of one short sampling per sampler, each in a fresh process holding only the models it needs:
the kernel's high-water mark of the resident set (VmHWM, reset before sampling) and, on CUDA,
torch.cuda.max_memory_allocated."""

from __future__ import annotations

import json
import subprocess

import torch

from dev import child_process

from .bench import Bench
from .instruments import synchronize
from .models import DTYPES, SDM, TDM, Preset, empty_latent, weight_bytes

MEMORY_MARKER = "BENCHMARK-MEMORY "


def memory_probe(comfyui, preset: Preset, device: str, sampler: str) -> dict:
    """Peak memory of one short sampling in this (fresh) process, holding only the models it needs."""
    baseline = _proc_status_kib("VmRSS")
    bench = Bench(comfyui, preset.unet_config, DTYPES[preset.dtype], device, models=(SDM,) if sampler == "ksampler" else (SDM, TDM))
    latent = empty_latent(preset.latent_side)
    built = _proc_status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # restarts VmHWM here, so the peak is the sampling's, not the building's
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if sampler == "ksampler":
        bench.ksampler(latent, 2)
    else:
        bench.snf(latent, 2, 0.5, 1.0)  # a scene step and a fusion step: both models at once
    synchronize(device)
    result = {"sampler": sampler, "weight_bytes": sum(weight_bytes(p) for p in bench.patchers.values()),
              "rss_before_models": baseline * 1024, "rss_with_models": built * 1024, "rss_peak": _proc_status_kib("VmHWM") * 1024}
    if device == "cuda":
        result["vram_peak"] = torch.cuda.max_memory_allocated()
        # Dynamic VRAM's weights are comfy-aimdo's allocations, which torch's counter does not see: the device's own.
        free, total = torch.cuda.mem_get_info()
        result["vram_in_use_after"] = total - free
    return result


def _proc_status_kib(field_name: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field_name}; peak memory is measured on Linux only")


def run_memory_probes(args) -> dict:
    probes = {}
    for sampler in ("ksampler", "snf"):
        command = child_process.module_command("dev.benchmarks", "--memory-probe", sampler, *forwarded_arguments(args))
        completed = subprocess.run(command, capture_output=True, text=True, check=False, cwd=child_process.REPO_ROOT,
                                   env=child_process.environment())
        lines = [line for line in completed.stdout.splitlines() if line.startswith(MEMORY_MARKER)]
        if completed.returncode != 0 or not lines:
            raise RuntimeError(f"the {sampler} memory probe failed (exit {completed.returncode}):\n{completed.stderr[-3000:]}")
        probes[sampler] = json.loads(lines[-1][len(MEMORY_MARKER):])
    return probes


def forwarded_arguments(args) -> list[str]:
    forwarded = ["--device", args.device, "--steps", str(args.steps), "--latent", str(args.latent), "--dtype", args.dtype]
    return forwarded + [flag for flag, given in (("--quick", args.quick), ("--tiny", args.tiny), ("--null-unet", args.null_unet)) if given]

