"""The three-stage result on this device against the CPU's for the same inputs (the same random SD1.5-size
weights, prompts and ComfyUI noise, all drawn on the CPU): the relative difference of the sampled latents, with
the device's UNets in fp32 and in fp16, against a float32 run on the CPU in a process of its own.

    python -m dev.gpu_kit.measurements.gpu_vs_cpu --reference OUT.pt [--tiny]

is that CPU run (the measurement starts it)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

from dev import child_process
from dev.benchmarks.bench import Bench
from dev.benchmarks.models import OFFICIAL_DEMO_ALPHA, OFFICIAL_DEMO_BETA, SD15_UNET, TINY_UNET, empty_latent

from . import Context, Result, Row, relative_difference

MODULE = "dev.gpu_kit.measurements.gpu_vs_cpu"
# 256x256 px at 10 steps keeps the CPU run of two SD1.5-size UNets under a minute on the GPU machine's cores;
# 10 steps are the fewest at which the official fractions leave every stage a step.
FULL = {"unet": SD15_UNET, "latent": 32, "steps": 10}
TINY = {"unet": TINY_UNET, "latent": 8, "steps": 10}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def three_stage(comfyui, size: dict, dtype: torch.dtype, device: str) -> torch.Tensor:
    bench = Bench(comfyui, size["unet"], dtype, device)
    latent = bench.snf(empty_latent(size["latent"]), size["steps"], OFFICIAL_DEMO_ALPHA, OFFICIAL_DEMO_BETA)[0]["samples"]
    return latent.float().cpu()


def cpu_reference(tiny: bool, path: Path, timeout: float) -> torch.Tensor:
    command = child_process.module_command(MODULE, "--reference", str(path), *(["--tiny"] if tiny else []))
    done = subprocess.run(command, capture_output=True, text=True, cwd=child_process.REPO_ROOT, env=child_process.environment(),
                          timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"the CPU run failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return torch.load(path, weights_only=True)  # a tensor the child saved: nothing to unpickle but tensors


def measure(context: Context) -> Result:
    size = TINY if context.tiny else FULL
    context.log("the CPU run, in a process of its own")
    reference = cpu_reference(context.tiny, context.scratch / "cpu.pt", timeout=600)
    figures = {"latent": size["latent"], "steps": size["steps"], "unet_channels": size["unet"]["model_channels"],
               "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}}
    rows = []
    for name, dtype in DTYPES.items():
        context.log(f"the same run on {context.device} in {name}")
        result = three_stage(context.comfyui, size, dtype, context.device)
        difference = relative_difference(result, reference)
        figures[name] = {"relative_difference": difference, "max_abs_difference": float((result - reference).abs().max()),
                         "reference_max_abs": float(reference.abs().max())}
        rows.append(Row(f"three-stage result on {context.device}, UNets in {name}, against the CPU's in fp32 "
                        f"({size['latent'] * 8}x{size['latent'] * 8}, {size['steps']} steps)",
                        f"relative difference {difference:.2e}", "", f"largest {figures[name]['max_abs_difference']:.2e}", ""))
    return Result(figures, rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description="The CPU run that the measurement compares with.")
    parser.add_argument("--reference", type=Path, required=True, help="where to save the sampled latent (torch.save)")
    parser.add_argument("--tiny", action="store_true", help="the rehearsal's sizes")
    args = parser.parse_args(argv)
    from dev.devkit import comfy_harness

    comfyui = comfy_harness.start(cpu=True)
    torch.save(three_stage(comfyui, TINY if args.tiny else FULL, torch.float32, "cpu"), args.reference)
    return 0


if __name__ == "__main__":
    sys.exit(main())
