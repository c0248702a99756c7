"""The benchmark's command line: `python -m dev.benchmarks --help`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

from . import memory, overhead, regions, report
from .bench import Bench
from .models import DTYPES, PRESETS, SMALL_UNET, start_comfyui


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(prog="python -m dev.benchmarks", description=sys.modules[__package__].__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small UNets of SD1.5's structure (about a minute on 2 CPU cores)")
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny UNets: seconds, to rehearse the measurements (no figures)")
    parser.add_argument("--null-unet", action="store_true",
                        help="UNets that cost next to nothing (SD1.5's interface and latent): the host work per evaluation alone")
    parser.add_argument("--regions", action="store_true",
                        help="only the cost of per-subject regions: the three-stage run with and without two half-picture regions")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--steps", type=int, help="sampling steps (default: 10 on CPU, 50 on CUDA)")
    parser.add_argument("--latent", type=int, help="latent side, an image side / 8 (default: 16 on CPU, 64 on CUDA)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="UNet weights (default: bf16 on CPU, fp32 with --quick, fp16 on CUDA)")
    parser.add_argument("--repeats", type=int, help="interleaved repetitions of the three runs")
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    parser.add_argument("--comfyui", type=Path, help="ComfyUI checkout (default: $COMFYUI_PATH)")
    parser.add_argument("--memory-probe", choices=("ksampler", "snf"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = [flag for flag, given in (("--quick", args.quick), ("--tiny", args.tiny), ("--null-unet", args.null_unet)) if given]
    if len(sizes) > 1:
        parser.error(f"{' and '.join(sizes)} are UNet sizes: give one")
    if args.regions and args.null_unet:
        parser.error("--regions measures masked cross-attention, which the null UNet does not have: leave out --null-unet")
    base = PRESETS["null" if args.null_unet else "tiny" if args.tiny else "sd15-cuda" if args.device == "cuda" else "quick" if args.quick
                   else "sd15-cpu"]
    if args.quick and args.device == "cuda":
        base = dataclasses.replace(base, name=PRESETS["quick"].name, unet_config=SMALL_UNET)
    args.steps = args.steps or base.steps
    args.latent = args.latent or base.latent_side
    args.dtype = args.dtype or base.dtype
    args.repeats = args.repeats or base.repeats
    if args.steps < 10:
        parser.error("--steps must be at least 10, so that the official split has a fusion stage")
    if args.latent < 8:
        parser.error("--latent must be at least 8 (SD1.5's UNet halves the latent three times)")
    preset = dataclasses.replace(base, latent_side=args.latent, steps=args.steps, dtype=args.dtype, repeats=args.repeats)
    return args, preset


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = " ".join(["python -m dev.benchmarks", *argv])  # the harness resets sys.argv when ComfyUI starts
    args, preset = parse_arguments(argv)
    if args.comfyui:
        os.environ["COMFYUI_PATH"] = str(args.comfyui)
    if args.memory_probe:
        comfyui = start_comfyui(args.device)
        print(memory.MEMORY_MARKER + json.dumps(memory.memory_probe(comfyui, preset, args.device, args.memory_probe)), flush=True)
        return 0

    log = lambda message: print(f"benchmark: {message}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    probes = {}
    if not (args.null_unet or args.regions):  # a null UNet's memory is nothing to measure; regions add no model
        log("memory probes (a fresh process each)")
        probes = memory.run_memory_probes(args)
    comfyui = start_comfyui(args.device)
    log(f"ComfyUI's dynamic VRAM: {comfyui.dynamic_vram}")  # on a GPU, main.py's default, as the harness starts it
    if args.regions:
        log(f"building two {preset.name} ({preset.dtype}) and timing with and without regions")
        bench = Bench(comfyui, preset.unet_config, DTYPES[preset.dtype], args.device)
        timing = regions.regions_timing(bench, preset.steps, preset.latent_side, preset.repeats, log)
        print(f"{report.header(args, preset, timing)}\n\n{regions.regions_report(preset, timing)}\n\n"
              f"Command: `{command}` ({time.perf_counter() - started:.0f} s in all).")
        if args.json:
            write_json(args, preset, timing, probes)
        return 0
    if args.null_unet:
        # With next to no arithmetic a second thread only adds waits for it (on a shared machine, long ones).
        torch.set_num_threads(1)
    log(f"building two {preset.name} ({preset.dtype}) and timing")
    timing = overhead.timing_benchmark(comfyui, preset, args.device, log)
    tables = [report.header(args, preset, timing)]
    if not args.null_unet:
        tables.append(report.report(args, preset, timing, probes))
    table = "\n\n".join([*tables, report.per_evaluation_report(preset, timing)])
    print(f"{table}\n\nCommand: `{command}` ({time.perf_counter() - started:.0f} s in all).")
    if args.json:
        write_json(args, preset, timing, probes)
    return 0


def write_json(args, preset, timing: dict, probes: dict) -> None:
    args.json.write_text(json.dumps({"preset": dataclasses.asdict(preset), "device": args.device, "machine": report.machine_description(args.device),
                                     "timing": timing, "memory": probes}, indent=1, default=report.as_json))
