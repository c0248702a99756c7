"""Host time per UNet evaluation, by stage, against KSampler's at the same steps, and host reads per run: the
benchmark's --null-unet mode (UNets that cost next to nothing, SD1.5's interface and latent, 512x512, 50 steps),
where a run is ComfyUI's and the pack's host work alone; on a GPU, the work that decides whether the GPU waits."""

from __future__ import annotations

import torch

from dev.benchmarks import cli, overhead, report

from . import Context, Result, Row

TINY = ("--latent", "8", "--steps", "10", "--repeats", "2")
GOALS = {"scene": "<= 1.03", "fusion": "<= 1.10", "subject": "<= 1.03"}


def measure(context: Context) -> Result:
    args, preset = cli.parse_arguments(context.benchmark_arguments("--null-unet", tiny=TINY))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the benchmark's mode: with next to no arithmetic a second thread only adds waits
    try:
        timing = overhead.timing_benchmark(context.comfyui, preset, context.device, context.log)
    finally:
        torch.set_num_threads(threads)
    e = timing["summary"]["per_evaluation"]
    us = lambda seconds: f"{seconds * 1e6:.0f} us"
    rows = [Row("host time per UNet evaluation, alpha = beta = 0, all steps", us(e["snf_plain_s"]), us(e["ksampler_s"]["all"]),
                f"{e['plain_ratio']:.3f}", "<= 1.03")]
    rows += [Row(f"host time per UNet evaluation, official split, {stage}", us(e["snf_official_s"][stage]), us(e["ksampler_s"][stage]),
                 f"{ratio:.3f}", GOALS[stage]) for stage, ratio in e["official_ratio"].items()]
    tables = [report.header(args, preset, timing), report.per_evaluation_report(preset, timing)]
    return Result({"preset": preset, "summary": timing["summary"], "host_reads": timing["host_reads"],
                   "host_syncs": timing.get("host_syncs")}, rows, tables)
