"""The benchmark's Markdown tables."""

from __future__ import annotations

import dataclasses
import os
import platform

import torch

from .bench import RunFigures
from .models import CFG, OFFICIAL_DEMO_ALPHA, OFFICIAL_DEMO_BETA, SAMPLER, SCHEDULER, Preset, StageSchedule
from .overhead import DISPATCH_SIDE


def machine_description(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def per_evaluation_report(preset: Preset, timing: dict) -> str:
    """The host time the SNF sampler spends outside the UNet per UNet evaluation against KSampler's, by
    stage, and the host reads of tensor values per run."""
    e = timing["summary"]["per_evaluation"]
    reads = timing["host_reads"]
    us = lambda seconds: f"{seconds * 1e6:.0f} us"
    goals = {"scene": "<= 1.03", "fusion": "<= 1.10", "subject": "<= 1.03"}
    official = StageSchedule.from_fractions(OFFICIAL_DEMO_ALPHA, OFFICIAL_DEMO_BETA, preset.steps)
    steps = {"scene": f"steps 0-{official.scene_end - 1}", "fusion": f"steps {official.scene_end}-{official.fusion_end - 1}",
             "subject": f"steps {official.fusion_end}-{preset.steps - 2}"}
    lines = [
        "| measure (host time outside the UNet per UNet evaluation: each step's quickest repetition, median over the steps) | SNF sampler | KSampler (same steps) | ratio | goal |",
        "|---|---|---|---|---|",
        f"| alpha = beta = 0, all steps | {us(e['snf_plain_s'])} | {us(e['ksampler_s']['all'])} | {e['plain_ratio']:.3f} | <= 1.03 |",
    ]
    for stage, ratio in e["official_ratio"].items():
        lines.append(f"| official split ({OFFICIAL_DEMO_ALPHA}/{OFFICIAL_DEMO_BETA}), {stage} ({steps[stage]}) | "
                     f"{us(e['snf_official_s'][stage])} | {us(e['ksampler_s'][stage])} | {ratio:.3f} | {goals[stage]} |")
    if "fusion" in e["official_ratio"]:
        in_run = e["snf_maths_per_fusion_step_s"]
        arithmetic = max(timing["snf_maths_s"] - timing["snf_maths_dispatch_s"], 0.0)
        rest = e["snf_official_s"]["fusion"] - in_run / 4  # 4 rows per fusion step
        lines += [
            f"| fusion: the SNF maths per step (guidance responses, saliency choice, fusion), timed in the run (quickest repetition, median step); alone at "
            f"{preset.latent_side}x{preset.latent_side} and at {DISPATCH_SIDE}x{DISPATCH_SIDE} (the difference is arithmetic, "
            f"which a GPU does while the host goes on) | {us(in_run)} in the run; {us(timing['snf_maths_s'])} and "
            f"{us(timing['snf_maths_dispatch_s'])} alone | | {arithmetic / in_run:.0%} arithmetic | |",
            f"| fusion, less the SNF maths timed in the run | {us(rest)} | {us(e['ksampler_s']['fusion'])} "
            f"| {rest / e['ksampler_s']['fusion']:.3f} | |",
            f"| fusion, the SNF maths counted at its host share only (the {DISPATCH_SIDE}x{DISPATCH_SIDE} figure): an estimate of "
            f"a GPU's host time, not a measurement | {us(rest + timing['snf_maths_dispatch_s'] / 4)} | {us(e['ksampler_s']['fusion'])} "
            f"| {(rest + timing['snf_maths_dispatch_s'] / 4) / e['ksampler_s']['fusion']:.3f} | <= 1.10 |",
        ]
    fixed = e["fixed_s"]
    lines += [
        f"| per run, outside the evaluations (set-up, the last evaluation, tear-down; quickest repetition) | {fixed['snf_plain'] * 1000:.1f} ms at 0/0, "
        f"{fixed['snf_official'] * 1000:.1f} ms three-stage | {fixed['ksampler'] * 1000:.1f} ms | | |",
        f"| host reads of tensor values per run while sampling (`float`, `.item()`, `.tolist()`, ...) | "
        f"{reads['snf_plain']['sampling']} at 0/0, {reads['snf_official']['sampling']} three-stage | {reads['ksampler']['sampling']} | | |",
        f"| same, before sampling (set-up) | {reads['snf_plain']['set-up']} at 0/0, {reads['snf_official']['set-up']} three-stage "
        f"| {reads['ksampler']['set-up']} | | |",
    ]
    return "\n".join(lines)


def report(args, preset: Preset, timing: dict, memory: dict) -> str:
    s = timing["summary"]
    runs = timing["runs"]
    gib = 1024 ** 3
    ms = lambda seconds: f"{seconds * 1000:.1f} ms"
    first = timing["first_snf_run"]
    ks_unet_per_row = s["unet_s_per_row"]["ksampler"]
    full = runs["snf_official"]
    fusion_steps = len(full[0].stage_rows_per_step.get("fusion", []))
    side = preset.latent_side
    lines = [
        "| # | measure | SNF sampler | KSampler / floor | ratio | target |",
        "|---|---|---|---|---|---|",
        f"| 1 | alpha = beta = 0 against KSampler, wall time | {s['snf_plain_wall_s']:.2f} s | {s['ksampler_wall_s']:.2f} s "
        f"| {s['plain_wall_ratio']:.3f} | <= 1.02 |",
        f"| 1 | same, with equal UNet time (outside-UNet difference only) | {s['snf_plain_outside_s']:.3f} s outside | "
        f"{s['ksampler_outside_s']:.3f} s outside | {s['plain_equal_unet_ratio']:.4f} | <= 1.02 |",
        f"| 2 | official split ({OFFICIAL_DEMO_ALPHA}/{OFFICIAL_DEMO_BETA}) against the floor (KSampler x {s['evaluation_ratio']:.2f} evaluations), wall time "
        f"| {s['snf_official_wall_s']:.2f} s | {s['evaluation_ratio'] * s['ksampler_wall_s']:.2f} s | {s['official_wall_over_floor']:.3f} | <= 1.03 |",
        f"| 2 | same, with equal UNet time per evaluation | {s['snf_official_outside_s']:.3f} s outside | "
        f"{s['evaluation_ratio'] * s['ksampler_outside_s']:.3f} s outside | {s['official_equal_unet_over_floor']:.4f} | <= 1.03 |",
        f"| 1-2 | time outside the UNet per evaluation (row) | {ms(s['outside_s_per_row']['snf_plain'])} at 0/0, "
        f"{ms(s['outside_s_per_row']['snf_official'])} three-stage | {ms(s['outside_s_per_row']['ksampler'])} | "
        f"UNet: {ms(ks_unet_per_row)} per row | |",
        f"| 2 | UNet rows per step by stage (official split) | {stage_rows(full[0])} | 2 per step | "
        f"{full[0].total_rows} / {runs['ksampler'][0].total_rows} rows | 2/4/2 |",
        f"| 3 | loads, first run (cold) | {_loads(first)} | | | one request, each model once |",
        f"| 3 | loads, each later run | {_loads_summary(full)} | | | no reload |",
        f"| 4 | models resident (RSS with the models - before), fresh process each | {_resident(memory['snf'], gib)} | "
        f"{_resident(memory['ksampler'], gib)} | {_resident_ratio(memory['snf']):.2f} x weights | 1 x weights (no copy) |",
        f"| 4 | sampling working memory (peak RSS - RSS with the models) | {_working(memory['snf']) / gib:.3f} GiB | "
        f"{_working(memory['ksampler']) / gib:.3f} GiB | {_working(memory['snf']) / _working(memory['ksampler']):.2f} | |",
        f"| 4 | peak RSS of the process | {memory['snf']['rss_peak'] / gib:.2f} GiB | {memory['ksampler']['rss_peak'] / gib:.2f} GiB | | |",
        f"| 5 | host time from predict_noise to the UNet call (the SNF guider's stage look-up comes first) "
        f"| {ms(s['prelude_s']['snf_official'])} | {ms(s['prelude_s']['ksampler'])} | | |",
        f"| 5 | SNF maths per fusion step (isolated, {side}x{side}) | {timing['snf_maths_s'] * 1e6:.0f} us | UNet: {ms(ks_unet_per_row)} per row "
        f"| {timing['snf_maths_s'] / ks_unet_per_row:.2%} of a UNet evaluation | < 1% |",
    ]
    if args.device == "cuda":
        syncs = timing["host_syncs"]
        lines += [
            f"| 5 | seconds per image ({side * 8}x{side * 8}, {preset.steps} steps, {preset.dtype}) | {s['snf_official_wall_s']:.2f} s "
            f"| {s['ksampler_wall_s']:.2f} s | {s['snf_official_wall_s'] / s['ksampler_wall_s']:.3f} | |",
            f"| 5 | peak VRAM | {memory['snf']['vram_peak'] / gib:.2f} GiB | {memory['ksampler']['vram_peak'] / gib:.2f} GiB | | |",
            f"| 5 | host syncs per run (torch sync debug mode) | {syncs['snf_official']} | {syncs['ksampler']} | "
            f"{(syncs['snf_official'] - syncs['ksampler']) / sum(full[0].calls.values()):.2f} extra per UNet call | 0 extra |",
            f"| 5 | whole-run SNF overhead per fusion step | {_overhead_per_fusion_step(s, fusion_steps) * 1000:.2f} ms | "
            f"| {_overhead_per_fusion_step(s, fusion_steps) / ks_unet_per_row:.2%} of a UNet evaluation | < 1% |",
        ]
    else:
        lines.append("| 5 | GPU: 512x512, 50 steps, fp16: seconds per image, peak VRAM, host syncs, SNF work per step "
                     "| not measured yet: no GPU was available (`--device cuda` measures them) | | | |")
    return "\n".join(lines)


def header(args, preset: Preset, timing: dict) -> str:
    side = preset.latent_side
    return (f"Machine: {machine_description(args.device)}.\n"
            f"Models: two {preset.name}, random weights, {timing['parameters_per_unet'] / 1e6:.1f}M parameters each, {preset.dtype}; "
            f"latent {side}x{side} ({side * 8}x{side * 8} px), batch 1, {SAMPLER}/{SCHEDULER}, {preset.steps} steps, cfg {CFG}; "
            f"{preset.repeats} interleaved repetitions, medians.")


def stage_rows(run: RunFigures) -> str:
    return ", ".join(f"{stage} {'/'.join(map(str, sorted(set(rows))))} x {len(rows)} steps" for stage, rows in run.stage_rows_per_step.items())


def _loads(run: RunFigures) -> str:
    requests = "; ".join("+".join(sorted(models)) for models in run.load_requests) or "none"
    return (f"{len(run.load_requests)} load request ({requests}), weight loads {_per_model(run.weight_loads)}, "
            f"unloads {_per_model(run.weight_unloads)}, {run.moves_during_sampling} during sampling")


def _per_model(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {count}" for name, count in sorted(counts.items())) or "0"


def _loads_summary(runs: list[RunFigures]) -> str:
    """What the later runs did, each figure the same in every run or its range."""
    def figure(values):
        return f"{min(values)}" if min(values) == max(values) else f"{min(values)}-{max(values)}"

    requests = figure([len(r.load_requests) for r in runs])
    loads = figure([sum(r.weight_loads.values()) for r in runs])
    unloads = figure([sum(r.weight_unloads.values()) for r in runs])
    during = sum(r.moves_during_sampling for r in runs)
    return f"{requests} load request per run, weight loads {loads}, unloads {unloads}, {during} during sampling"


def _resident(probe: dict, gib: int) -> str:
    return f"{(probe['rss_with_models'] - probe['rss_before_models']) / gib:.3f} GiB for {probe['weight_bytes'] / gib:.3f} GiB of weights"


def _resident_ratio(probe: dict) -> float:
    return (probe["rss_with_models"] - probe["rss_before_models"]) / probe["weight_bytes"]


def _working(probe: dict) -> int:
    return probe["rss_peak"] - probe["rss_with_models"]


def _overhead_per_fusion_step(s: dict, fusion_steps: int) -> float:
    """Wall time above the floor, spread over the fusion steps (where the SNF work happens)."""
    excess = s["snf_official_wall_s"] - s["evaluation_ratio"] * s["ksampler_wall_s"]
    return excess / max(fusion_steps, 1)


def as_json(value):
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else str(value)

