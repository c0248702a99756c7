"""What per-subject regions cost (the SDM's cross-attention masked per subject): the three-stage run for two
subjects with and without two half-picture regions, UNet time per SDM row, and UNet rows per step and stage
(equal by design)."""

from __future__ import annotations

import statistics

import torch

from .bench import Bench, RunFigures
from .models import CONTEXT_TOKENS, OFFICIAL_DEMO_ALPHA, OFFICIAL_DEMO_BETA, SDM, TDM, Preset, StageSchedule, empty_latent, parameter_count
from .report import stage_rows


SUBJECT_ROWS = (5, 9)  # the two subjects' <|image|> rows in the benchmark's prompt


def region_setting(comfyui, conds: dict, side: int) -> tuple[dict, torch.Tensor]:
    """The three prompts as the Subject Prompt makes them for two subjects (the augmented prompt is the text
    prompt with the augmented prompt's rows at the markers, and carries the rows and the text's states there),
    and two half-picture regions from the Region Layout node."""
    regions = comfyui.pack("facediffuser_core.regions")
    text = conds["text"][0][0]
    augmented = text.clone()
    rows = list(SUBJECT_ROWS)
    augmented[0, rows] = conds["augmented"][0][0][0, rows]
    subjects = regions.SubjectTokens(SUBJECT_ROWS, CONTEXT_TOKENS, text[0, rows].clone())
    with_subjects = {**conds, "augmented": [[augmented, {**conds["augmented"][0][1], regions.SUBJECTS_KEY: subjects}]]}
    masks = comfyui.run("FaceDiffuserRegionLayout", layout="halves", subjects=2, width=side * 8, height=side * 8, boxes="")[0]
    return with_subjects, masks


REGION_PAIRS = 8


def regions_timing(bench: Bench, steps: int, side: int, repeats: int, log, pairs: int = REGION_PAIRS) -> dict:
    """The three-stage run at the official split with and without regions, same prompts and seed,
    interleaved (the order alternating, so that a drift of the machine's speed falls on both sides). First,
    `pairs` pairs of one-step runs of the SDM alone (alpha = beta = 0: one UNet call of both branches per run),
    with and without regions in turn: seconds apart, so that a change of a shared machine's speed over minutes,
    which the whole runs suffer, falls on both sides of each pair alike."""
    official = StageSchedule.from_fractions(OFFICIAL_DEMO_ALPHA, OFFICIAL_DEMO_BETA, steps)
    one_step = StageSchedule.from_fractions(0.0, 0.0, 1)
    latent = empty_latent(side)
    conds, masks = region_setting(bench.comfyui, bench.conds, side)
    settings = {
        "plain": lambda run_steps, alpha, beta: bench.snf(latent, run_steps, alpha, beta, conds=conds),
        "regions": lambda run_steps, alpha, beta: bench.snf(latent, run_steps, alpha, beta, conds=conds, regions=masks),
    }
    runs: dict[str, list[RunFigures]] = {name: [] for name in settings}
    calls: dict[str, list[RunFigures]] = {name: [] for name in settings}
    with bench.instruments():
        log("warm-up runs (load both models)")
        for run in settings.values():
            run(2, 0.5, 1.0)
        log(f"{pairs} pairs of one-call runs of the SDM")
        for pair in range(pairs):
            for name in (settings if pair % 2 == 0 else reversed(settings)):
                calls[name].append(bench.measure(name, lambda: settings[name](1, 0.0, 0.0), 1, one_step))
        single = one_call_summary(calls)
        log(f"one SDM call with/without regions: {single['regions_s_per_row']:.3f}/{single['plain_s_per_row']:.3f} s per row, "
            f"ratio {single['ratio']:.3f}")
        for repetition in range(repeats):
            log(f"repetition {repetition + 1}/{repeats}")
            for name in (settings if repetition % 2 == 0 else reversed(settings)):
                runs[name].append(bench.measure(
                    name, lambda: settings[name](steps, OFFICIAL_DEMO_ALPHA, OFFICIAL_DEMO_BETA), steps, official))
            so_far = regions_summary(runs)  # a long run that is cut short has still shown its figures
            log(f"UNet time per row with/without regions: SDM {so_far[SDM]['ratio']:.3f}, TDM {so_far[TDM]['ratio']:.3f}, "
                f"SDM over TDM {so_far['sdm_over_tdm']['ratio']:.3f} (per-row seconds: SDM {so_far[SDM]['regions_s_per_row']:.3f}/"
                f"{so_far[SDM]['plain_s_per_row']:.3f}, TDM {so_far[TDM]['regions_s_per_row']:.3f}/{so_far[TDM]['plain_s_per_row']:.3f})")
    return {"parameters_per_unet": parameter_count(bench.patchers[SDM]), "runs": runs, "one_call_runs": calls,
            "summary": {**regions_summary(runs), "one_call": one_call_summary(calls)}}


def one_call_summary(calls: dict[str, list[RunFigures]]) -> dict:
    """The SDM's UNet seconds per row in the one-call runs with and without regions; their ratio over each two
    consecutive pairs (one in each order, so that whatever the second run of a pair gains or loses cancels),
    the median of those; and whether every such run made one call of the same rows."""
    plain, scoped = calls["plain"], calls["regions"]
    per_row = lambda run: run.unet_s / run.rows[SDM]
    quads = [(per_row(scoped[i]) + per_row(scoped[i + 1])) / (per_row(plain[i]) + per_row(plain[i + 1])) for i in range(0, len(plain) - 1, 2)]
    return {"pairs": len(plain), "plain_s_per_row": statistics.median(map(per_row, plain)),
            "regions_s_per_row": statistics.median(map(per_row, scoped)), "ratio": statistics.median(quads),
            "rows_per_call": plain[0].rows[SDM], "counts_equal": all(r.calls == {SDM: 1} and r.rows == plain[0].rows for r in plain + scoped)}


def regions_summary(runs: dict[str, list[RunFigures]]) -> dict:
    """Per model, UNet seconds per row with and without regions and their ratio, as the median of the
    per-repetition ratios and from each call's quickest repetition (the calls of a run come in the same
    order every time); the TDM has no regions, so its ratio is what identical work measures here. Then the
    SDM's time per row relative to the TDM's in the same run, with regions against without: the two UNets
    have the same architecture and alternate within a run, so a change of the machine's speed between runs
    cancels. And whether every run evaluated the same UNet rows at every step and stage."""
    plain, scoped = runs["plain"], runs["regions"]
    median = statistics.median

    def per_row(run: RunFigures, model: str) -> float:
        return sum(run.call_s[model]) / run.rows[model]

    def quickest_per_row(rs: list[RunFigures], model: str) -> float:
        return sum(map(min, zip(*(r.call_s[model] for r in rs)))) / rs[0].rows[model]

    summary = {}
    for model in (SDM, TDM):
        summary[model] = {
            "plain_s_per_row": median(per_row(r, model) for r in plain),
            "regions_s_per_row": median(per_row(r, model) for r in scoped),
            "ratio": median(per_row(s, model) / per_row(p, model) for p, s in zip(plain, scoped)),
            "quickest_plain_s_per_row": quickest_per_row(plain, model),
            "quickest_regions_s_per_row": quickest_per_row(scoped, model),
        }
        summary[model]["quickest_ratio"] = summary[model]["quickest_regions_s_per_row"] / summary[model]["quickest_plain_s_per_row"]
    relative = lambda run: per_row(run, SDM) / per_row(run, TDM)
    summary["sdm_over_tdm"] = {"plain": median(map(relative, plain)), "regions": median(map(relative, scoped)),
                               "ratio": median(relative(s) / relative(p) for p, s in zip(plain, scoped))}
    first = plain[0]
    summary["counts_equal"] = all(
        (r.stage_rows_per_step, r.rows, r.calls) == (first.stage_rows_per_step, first.rows, first.calls) for r in plain + scoped)
    return summary


def regions_report(preset: Preset, timing: dict) -> str:
    s = timing["summary"]
    plain, scoped = timing["runs"]["plain"][0], timing["runs"]["regions"][0]
    seconds = lambda value: f"{value:.3f} s" if value >= 0.1 else f"{value * 1000:.1f} ms"
    calls = lambda run: ", ".join(f"{model} {run.calls[model]} calls, {run.rows[model]} rows" for model in (SDM, TDM))
    side = preset.latent_side
    single = s["one_call"]
    lines = [
        f"| measure (official split {OFFICIAL_DEMO_ALPHA}/{OFFICIAL_DEMO_BETA}, two subjects, regions: left and right halves of "
        f"{side * 8}x{side * 8}) | with regions | without | ratio | goal |",
        "|---|---|---|---|---|",
        f"| SDM alone, one UNet call per run ({single['rows_per_call']} rows), runs with and without regions in turn, "
        f"{single['pairs']} pairs: UNet time per row, median over each two pairs (one in each order) | {seconds(single['regions_s_per_row'])} "
        f"| {seconds(single['plain_s_per_row'])} | {single['ratio']:.3f} | <= 1.03 |",
    ]
    for model, what, goal in ((SDM, "SDM (regions mask its cross-attention)", "<= 1.03"),
                              (TDM, "TDM (unchanged: identical work, so this ratio is the measurement's noise)", "1")):
        figures = s[model]
        lines += [
            f"| {what}: UNet time per row, median of the per-repetition ratios | {seconds(figures['regions_s_per_row'])} "
            f"| {seconds(figures['plain_s_per_row'])} | {figures['ratio']:.3f} | {goal} |",
            f"| {model}: same, each UNet call's quickest repetition | {seconds(figures['quickest_regions_s_per_row'])} "
            f"| {seconds(figures['quickest_plain_s_per_row'])} | {figures['quickest_ratio']:.3f} | {goal} |",
        ]
    relative = s["sdm_over_tdm"]
    lines += [
        f"| SDM's UNet time per row over the TDM's in the same run (a change of the machine's speed between runs cancels), "
        f"median of the per-repetition ratios | {relative['regions']:.3f} | {relative['plain']:.3f} | {relative['ratio']:.3f} | <= 1.03 |",
        f"| UNet rows per step by stage | {stage_rows(scoped)} | {stage_rows(plain)} | "
        f"{'equal' if s['counts_equal'] and single['counts_equal'] else 'DIFFERENT'} in every run | equal |",
        f"| UNet calls and rows per run | {calls(scoped)} | {calls(plain)} | | equal |",
    ]
    return "\n".join(lines)
