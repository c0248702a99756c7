"""What the SNF sampler costs on top of the UNet evaluations it has to run, against KSampler in the same
process: KSampler, the SNF sampler at alpha = beta = 0 and at the official split, interleaved; wall and UNet
time, loads, host reads of tensor values (and on CUDA host syncs) per run, and the host time outside the UNet
per UNet evaluation by stage."""

from __future__ import annotations

import statistics
import time

import torch
from facediffuser_client.pack import core

from .bench import Bench, RunFigures
from .instruments import count_host_syncs
from .models import (CFG, DTYPES, OFFICIAL_DEMO_ALPHA, OFFICIAL_DEMO_BETA, SDM, SEED, Preset, StageSchedule, empty_latent,
                     parameter_count, weight_bytes)

snf = core("snf")
DISPATCH_SIDE = 8


def snf_maths_seconds(side: int, device: str, iterations: int = 50) -> float:
    """Seconds of SNF maths per fusion evaluation for one 4-channel latent of side x side, in float32 as
    ComfyUI keeps latents: both guidance responses from the cond/uncond predictions, the saliency choice
    and the fusion. Timed as a block of iterations (CUDA events around the block), so it is the device's
    work, without Python's share, which the whole-run figures hold; on the CPU, the median iteration."""
    generator = torch.Generator().manual_seed(SEED)
    outs = [torch.randn(1, 4, side, side, generator=generator).to(device) for _ in range(4)]
    sigma = torch.full((1,), 3.0, device=device)

    def once():
        guidance = [snf.guidance_response(cond, uncond, sigma, CFG) for cond, uncond in (outs[:2], outs[2:])]
        decision = snf.decide(*guidance)
        return snf.fuse(outs[0], outs[2], decision)

    once()
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(iterations):
            once()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000.0 / iterations
    times = []
    for _ in range(iterations):  # the median, so that the machine's other jobs do not count
        start_time = time.perf_counter()
        once()
        times.append(time.perf_counter() - start_time)
    return statistics.median(times)


def timing_benchmark(comfyui, preset: Preset, device: str, log) -> dict:
    bench = Bench(comfyui, preset.unet_config, DTYPES[preset.dtype], device)
    steps, latent = preset.steps, empty_latent(preset.latent_side)
    plain = StageSchedule.from_fractions(0.0, 0.0, steps)
    official = StageSchedule.from_fractions(OFFICIAL_DEMO_ALPHA, OFFICIAL_DEMO_BETA, steps)
    figures: dict = {"parameters_per_unet": parameter_count(bench.patchers[SDM]),
                     "weight_bytes": {name: weight_bytes(p) for name, p in bench.patchers.items()}}
    with bench.instruments():
        # The first run loads both models (one request); it and a KSampler run also warm the kernels up.
        warm_schedule = StageSchedule.from_fractions(0.5, 1.0, 2)
        log("first SNF run (loads both models)")
        figures["first_snf_run"] = bench.measure("first SNF run, 2 steps", lambda: bench.snf(latent, 2, 0.5, 1.0), 2, warm_schedule)
        bench.ksampler(latent, 1)
        runs = {"ksampler": [], "snf_plain": [], "snf_official": []}
        for repetition in range(preset.repeats):
            log(f"repetition {repetition + 1}/{preset.repeats}")
            runs["ksampler"].append(bench.measure("KSampler", lambda: bench.ksampler(latent, steps), steps, plain))
            runs["snf_plain"].append(bench.measure("SNF alpha=beta=0", lambda: bench.snf(latent, steps, 0.0, 0.0), steps, plain))
            runs["snf_official"].append(bench.measure(
                "SNF official split", lambda: bench.snf(latent, steps, OFFICIAL_DEMO_ALPHA, OFFICIAL_DEMO_BETA), steps, official))
        log("host reads")
        figures["host_reads"] = {
            "ksampler": bench.count_host_reads(lambda: bench.ksampler(latent, steps)),
            "snf_plain": bench.count_host_reads(lambda: bench.snf(latent, steps, 0.0, 0.0)),
            "snf_official": bench.count_host_reads(lambda: bench.snf(latent, steps, OFFICIAL_DEMO_ALPHA, OFFICIAL_DEMO_BETA)),
        }
        if device == "cuda":
            log("host syncs")
            figures["host_syncs"] = {
                "ksampler": count_host_syncs(lambda: bench.ksampler(latent, steps)),
                "snf_official": count_host_syncs(lambda: bench.snf(latent, steps, OFFICIAL_DEMO_ALPHA, OFFICIAL_DEMO_BETA)),
            }
    figures["runs"] = runs
    figures["snf_maths_s"] = snf_maths_seconds(preset.latent_side, device)
    # At 8x8 the arithmetic is next to nothing: what is left is the host's dispatch of the same operations.
    figures["snf_maths_dispatch_s"] = snf_maths_seconds(DISPATCH_SIDE, device)
    figures["summary"] = summarise(runs, official)
    return figures


def outside_per_row_by_stage(runs: list[RunFigures], schedule: StageSchedule) -> dict[str, float]:
    """Host seconds outside the UNet per UNet row in each stage of `schedule` and over all steps ("all").

    Each step's time is its quickest over the repetitions: on a shared machine the process loses the CPU for
    tens of milliseconds every few steps, which would otherwise land on most of the longer (fusion) steps.
    Then the median over the stage's steps."""
    per_row: dict[str, list[float]] = {}
    for step, rows in enumerate(runs[0].step_rows):
        if rows:
            quickest = min(run.step_outside_s[step] for run in runs)
            for key in (schedule.stage_at(step).name.lower(), "all"):
                per_row.setdefault(key, []).append(quickest / rows)
    return {key: statistics.median(values) for key, values in per_row.items()}


def per_evaluation_summary(runs: dict[str, list[RunFigures]], official: StageSchedule) -> dict:
    """Outside-UNet time per UNet row by stage (KSampler's steps grouped by the official split) and the SNF
    sampler's ratios to KSampler's at the same steps, from interleaved repetitions."""
    ks = outside_per_row_by_stage(runs["ksampler"], official)
    plain = outside_per_row_by_stage(runs["snf_plain"], official)
    full = outside_per_row_by_stage(runs["snf_official"], official)
    stages = [stage for stage in ("scene", "fusion", "subject") if stage in full]
    return {
        "ksampler_s": ks,
        "snf_plain_s": plain["all"],
        "snf_official_s": {stage: full[stage] for stage in stages},
        "plain_ratio": plain["all"] / ks["all"],
        "official_ratio": {stage: full[stage] / ks[stage] for stage in stages},
        "fixed_s": {name: min(r.fixed_s for r in rs) for name, rs in runs.items()},
        "snf_maths_per_fusion_step_s": statistics.median(
            min(r.step_snf_maths_s[step] for r in runs["snf_official"]) for step in range(official.scene_end, official.fusion_end)),
    }


def summarise(runs: dict[str, list[RunFigures]], official: StageSchedule) -> dict:
    """Medians of the per-repetition ratios; `equal_unet` ratios give both sides the KSampler's UNet time
    (scaled by the evaluation ratio), so that only the time outside the UNet differs."""
    ks, plain, full = runs["ksampler"], runs["snf_plain"], runs["snf_official"]
    evaluation_ratio = full[0].total_rows / ks[0].total_rows
    median = statistics.median
    return {
        "per_evaluation": per_evaluation_summary(runs, official),
        "evaluation_ratio": evaluation_ratio,
        "expected_evaluation_ratio": official.evaluations() / (2 * official.total_steps),
        "ksampler_wall_s": median(r.wall_s for r in ks),
        "snf_plain_wall_s": median(r.wall_s for r in plain),
        "snf_official_wall_s": median(r.wall_s for r in full),
        "ksampler_outside_s": median(r.outside_s for r in ks),
        "snf_plain_outside_s": median(r.outside_s for r in plain),
        "snf_official_outside_s": median(r.outside_s for r in full),
        "unet_s_per_row": {name: median(r.unet_s / r.total_rows for r in rs) for name, rs in runs.items()},
        "outside_s_per_row": {name: median(r.outside_s / r.total_rows for r in rs) for name, rs in runs.items()},
        "prelude_s": {name: median(t for r in rs for t in r.predict_noise_preludes_s) for name, rs in runs.items()},
        "plain_wall_ratio": median(p.wall_s / k.wall_s for p, k in zip(plain, ks)),
        "plain_equal_unet_ratio": median((k.unet_s + p.outside_s) / k.wall_s for p, k in zip(plain, ks)),
        "official_wall_over_floor": median(f.wall_s / (evaluation_ratio * k.wall_s) for f, k in zip(full, ks)),
        "official_equal_unet_over_floor": median(
            (evaluation_ratio * k.unet_s + f.outside_s) / (evaluation_ratio * k.wall_s) for f, k in zip(full, ks)),
    }

