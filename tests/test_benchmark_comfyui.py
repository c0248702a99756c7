"""The benchmark's counting (dev/benchmarks) on tiny models: UNet rows per step and stage, loads per
run, and the ratios it derives. Timings are never asserted: they belong to the benchmark, not the tests."""

from __future__ import annotations

import dataclasses
import re

import pytest

from dev.benchmarks import bench as bench_module
from dev.benchmarks import models, overhead, regions

STEPS = 10  # at the official 0.32/0.62: scene steps 0-2, fusion 3-5, subject 6-9


@pytest.fixture(scope="module")
def bench(comfyui):
    import torch

    # Fresh models, so that the first run below is the cold one that loads them.
    return bench_module.Bench(comfyui, models.TINY_UNET, torch.float32, "cpu")


def test_rows_per_step_and_loads_per_run(bench):
    import comfy.model_management

    from facediffuser_core.schedule import StageSchedule

    official = StageSchedule.from_fractions(models.OFFICIAL_DEMO_ALPHA, models.OFFICIAL_DEMO_BETA, STEPS)
    plain = StageSchedule.from_fractions(0.0, 0.0, STEPS)
    latent = models.empty_latent(8)
    sdm, tdm = (bench.patchers[name].model for name in (models.SDM, models.TDM))
    real_load_models_gpu = comfy.model_management.load_models_gpu

    with bench.instruments():
        cold = bench.measure("cold", lambda: bench.snf(latent, STEPS, models.OFFICIAL_DEMO_ALPHA, models.OFFICIAL_DEMO_BETA), STEPS, official)
        warm = bench.measure("warm", lambda: bench.snf(latent, STEPS, models.OFFICIAL_DEMO_ALPHA, models.OFFICIAL_DEMO_BETA), STEPS, official)
        ksampler = bench.measure("ksampler", lambda: bench.ksampler(latent, STEPS), STEPS, plain)
        sdm_only = bench.measure("snf 0/0", lambda: bench.snf(latent, STEPS, 0.0, 0.0), STEPS, plain)

    for run in (cold, warm):
        assert run.stage_rows_per_step == {"scene": [2] * 3, "fusion": [4] * 3, "subject": [2] * 4}
        assert run.rows == {"TDM": 12, "SDM": 14} and run.total_rows == official.evaluations() == 26
        assert run.calls == {"TDM": 6, "SDM": 7}  # cond and uncond batched in one call
        assert len(run.predict_noise_preludes_s) == 10 and all(t >= 0 for t in run.predict_noise_preludes_s)
        assert 0 < run.unet_s < run.wall_s
        # Each evaluation's outside-UNet time lands on its step; the last one's belongs to the run's fixed part.
        assert run.step_rows == [2] * 3 + [4] * 3 + [2] * 3 + [0]
        assert all(t > 0 for t in run.step_outside_s[:-1]) and run.step_outside_s[-1] == 0 and run.fixed_s > 0
        assert sum(run.step_outside_s) + run.fixed_s == pytest.approx(run.outside_s, rel=0.05)
        assert all((t > 0) == (3 <= step < 6) for step, t in enumerate(run.step_snf_maths_s)) and sum(run.step_snf_maths_s) < run.outside_s
    for run in (ksampler, sdm_only):
        assert run.stage_rows_per_step == {"subject": [2] * STEPS}
        assert run.rows == {"SDM": 2 * STEPS}
        assert run.step_rows == [2] * (STEPS - 1) + [0]
        assert not any(run.step_snf_maths_s)
    # Both models in one request of the first run, each loaded once, nothing moved while sampling.
    assert [sorted(models) for models in cold.load_requests] == [["SDM", "TDM"]]
    assert cold.weight_loads == {"SDM": 1, "TDM": 1} and cold.weight_unloads == {}
    assert cold.moves_during_sampling == 0
    # Later runs request them again, find them loaded and move nothing.
    assert len(warm.load_requests) == 1 and warm.weight_loads == {} and warm.weight_unloads == {}
    # The instruments are gone afterwards.
    assert comfy.model_management.load_models_gpu is real_load_models_gpu
    assert "forward" not in vars(sdm.diffusion_model) and "forward" not in vars(tdm.diffusion_model)


def test_null_unet(comfyui):
    """The null UNet has SD1.5's interface (the SNF sampler runs it at SD1.5's context width) and next to no
    weights, and its conditional and unconditional predictions differ, so that SNF has guidance to compare."""
    import torch

    bench = bench_module.Bench(comfyui, models.NULL_UNET, torch.float32, "cpu")
    assert all(isinstance(p.model.diffusion_model, models.NullUNet) for p in bench.patchers.values())
    assert models.parameter_count(bench.patchers[models.SDM]) == 4
    official = models.StageSchedule.from_fractions(models.OFFICIAL_DEMO_ALPHA, models.OFFICIAL_DEMO_BETA, STEPS)
    with bench.instruments():
        run = bench.measure("null", lambda: bench.snf(models.empty_latent(8), STEPS, models.OFFICIAL_DEMO_ALPHA, models.OFFICIAL_DEMO_BETA), STEPS, official)
    assert run.stage_rows_per_step == {"scene": [2] * 3, "fusion": [4] * 3, "subject": [2] * 4}
    x = torch.ones(2, 4, 8, 8)
    context = torch.stack([torch.zeros(77, 768), torch.ones(77, 768)])
    out = bench.patchers[models.SDM].model.diffusion_model(x, torch.zeros(2), context=context)
    assert out.shape == x.shape and not torch.equal(out[0], out[1])


def test_summary_ratios():
    from facediffuser_core.schedule import StageSchedule

    def run(wall, unet, rows):
        return bench_module.RunFigures(label="", wall_s=wall, unet_s=unet, rows={"SDM": rows}, predict_noise_preludes_s=[0.001],
                                    calls={"SDM": rows // 2}, stage_rows_per_step={}, load_requests=[], weight_loads={},
                                    weight_unloads={}, moves_during_sampling=0, step_outside_s=[0.01] * 9 + [0], step_rows=[2] * 9 + [0],
                                    step_snf_maths_s=[0.0] * 10)

    # KSampler: 10 s of which 9.5 in the UNet over 20 rows. SNF at 0/0: 10.4 s, 9.8 in the UNet (noise), so
    # 0.6 s outside. Three-stage: 26 rows, 12.6 s, 12.3 in the UNet.
    runs = {"ksampler": [run(10.0, 9.5, 20)], "snf_plain": [run(10.4, 9.8, 20)], "snf_official": [run(12.6, 12.3, 26)]}
    summary = overhead.summarise(runs, StageSchedule.from_fractions(0.32, 0.62, 10))
    assert summary["evaluation_ratio"] == pytest.approx(1.3) == summary["expected_evaluation_ratio"]
    assert summary["plain_wall_ratio"] == pytest.approx(1.04)
    assert summary["plain_equal_unet_ratio"] == pytest.approx((9.5 + 0.6) / 10.0)
    assert summary["official_wall_over_floor"] == pytest.approx(12.6 / 13.0)
    assert summary["official_equal_unet_over_floor"] == pytest.approx((1.3 * 9.5 + 0.3) / 13.0)
    assert summary["outside_s_per_row"]["snf_official"] == pytest.approx(0.3 / 26)


def test_per_evaluation_ratios_by_stage():
    """Per stage, each step's quickest repetition per row, the median over the stage's steps, against
    KSampler's at the same steps: a step the machine delayed in one repetition, or a few in every one, do
    not move it."""
    from facediffuser_core.schedule import StageSchedule

    def run(step_outside_ms, step_rows, fixed=0.01, snf_maths=()):
        return bench_module.RunFigures(label="", wall_s=1.0, unet_s=0.5, rows={}, predict_noise_preludes_s=[], calls={}, stage_rows_per_step={},
                                    load_requests=[], weight_loads={}, weight_unloads={}, moves_during_sampling=0,
                                    step_outside_s=[t / 1000 for t in step_outside_ms], step_rows=step_rows, fixed_s=fixed, step_snf_maths_s=[t / 1000 for t in snf_maths])

    official = StageSchedule.from_fractions(0.32, 0.62, 10)  # scene 0-2, fusion 3-5, subject 6-9
    rows = [2] * 9 + [0]
    ks = [run([2, 2, 50, 2, 2, 2, 2, 2, 2, 0], rows), run([2, 30, 2, 2, 2, 2, 2, 2, 2, 0], rows, fixed=0.02)]
    plain = [run([2.2] * 9 + [0], rows, fixed=0.02), run([2.2, 9, 9] + [2.2] * 6 + [0], rows, fixed=0.03)]
    full_rows = [2, 2, 2, 4, 4, 4, 2, 2, 2, 0]
    snf_maths = [0, 0, 0, 1, 20, 1.5, 0, 0, 0, 0]
    full = [run([2.2, 2.2, 2.2, 4.4, 40, 4.4, 2, 2, 2, 0], full_rows, snf_maths=snf_maths),
            run([2.2, 2.2, 2.2, 40, 4.4, 40, 2, 2, 2, 0], full_rows, snf_maths=[0, 0, 0, 20, 1.2, 1.5, 0, 0, 0, 0])]
    summary = overhead.per_evaluation_summary({"ksampler": ks, "snf_plain": plain, "snf_official": full}, official)
    assert summary["ksampler_s"]["scene"] == pytest.approx(0.001)  # the delayed steps do not count
    assert summary["plain_ratio"] == pytest.approx(1.1)
    assert summary["official_ratio"] == pytest.approx({"scene": 1.1, "fusion": 1.1, "subject": 1.0})
    assert summary["fixed_s"] == {"ksampler": 0.01, "snf_plain": 0.02, "snf_official": 0.01}
    assert summary["snf_maths_per_fusion_step_s"] == pytest.approx(0.0012)  # quickest of each fusion step (1, 1.2, 1.5), median


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "heun"])
def test_host_reads_per_run(bench, sampler):
    """Host reads of tensor values (a device sync each on a GPU when the tensor is there), counted per run
    and place, against KSampler's (whose own samplers read some: dpmpp_2m and heun test each next sigma
    for zero). The SNF sampler counts the evaluations of a one-evaluation-per-step sampler and checks them
    against the sigmas in one read after the run; for other samplers (heun evaluates twice per step) it
    reads each evaluation's sigma. Before sampling it reads two sigma lists that KSampler does not, host
    copies of the run's and the whole schedule (tensors on the host: no sync)."""
    latent = models.empty_latent(8)
    with bench.instruments():
        ksampler = bench.count_host_reads(lambda: bench.ksampler(latent, STEPS, sampler))
        snf = bench.count_host_reads(lambda: bench.snf(latent, STEPS, models.OFFICIAL_DEMO_ALPHA, models.OFFICIAL_DEMO_BETA, sampler))
    extra = {place: count - ksampler["places"].get(place, 0) for place, count in snf["places"].items() if place.startswith("sampling ")}
    assert all(count >= 0 for count in extra.values()), (snf, ksampler)
    extra = {place: count for place, count in extra.items() if count}
    if sampler == "heun":
        assert snf["evaluations"] == ksampler["evaluations"] == 2 * STEPS - 1
        assert extra == {"sampling stage_clock.py:stage_of": snf["evaluations"]}
    else:
        assert snf["evaluations"] == ksampler["evaluations"] == STEPS
        assert extra == {"sampling stage_clock.py:check": 1}
    assert snf["sampling"] == ksampler["sampling"] + sum(extra.values())
    assert snf["set-up"] == ksampler["set-up"] + 2 and snf["places"]["set-up stage_clock.py:place"] == 2


def test_regions_evaluate_the_same_rows_and_report_the_ratio(bench):
    """--regions: the three-stage run for two subjects with two half-picture regions evaluates the UNets as
    often, at every step and stage, as the same run without them (the masks go into the SDM's attention,
    not into more evaluations), and the report gives the UNet time per SDM row as a ratio. The regions reach
    the SDM: the same run's latent differs with them."""
    import torch

    timing = regions.regions_timing(bench, STEPS, 8, 2, lambda message: None)
    runs = timing["runs"]
    assert len(runs["plain"]) == len(runs["regions"]) == 2
    for run in runs["plain"] + runs["regions"]:
        assert run.stage_rows_per_step == {"scene": [2] * 3, "fusion": [4] * 3, "subject": [2] * 4}
        assert run.rows == {"TDM": 12, "SDM": 14} and run.calls == {"TDM": 6, "SDM": 7}
        assert {model: len(seconds) for model, seconds in run.call_s.items()} == run.calls
    assert len(timing["one_call_runs"]["plain"]) == len(timing["one_call_runs"]["regions"]) == regions.REGION_PAIRS
    for run in timing["one_call_runs"]["plain"] + timing["one_call_runs"]["regions"]:
        assert run.calls == {"SDM": 1} and run.rows == {"SDM": 2}  # both branches of one step in one call
    summary = timing["summary"]
    assert summary["counts_equal"] is True and summary["one_call"]["counts_equal"] is True
    preset = dataclasses.replace(models.PRESETS["quick"], latent_side=8, steps=STEPS, repeats=2)
    table = regions.regions_report(preset, timing)
    assert re.search(r"\| SDM \(regions mask its cross-attention\): UNet time per row[^\n]* \| \d+\.\d{3} \| <= 1\.03 \|", table), table
    assert re.search(r"\| SDM alone, one UNet call per run \(2 rows\)[^\n]* 8 pairs[^\n]* \| \d+\.\d{3} \| <= 1\.03 \|", table), table
    assert re.search(r"\| SDM's UNet time per row over the TDM's in the same run[^\n]* \| \d+\.\d{3} \| <= 1\.03 \|", table), table
    assert "| equal in every run | equal |" in table

    conds, masks = regions.region_setting(bench.comfyui, bench.conds, 8)
    latent = models.empty_latent(8)
    alpha, beta = models.OFFICIAL_DEMO_ALPHA, models.OFFICIAL_DEMO_BETA
    plain = bench.snf(latent, STEPS, alpha, beta, conds=conds)[0]["samples"]
    assert not torch.equal(plain, bench.snf(latent, STEPS, alpha, beta, conds=conds, regions=masks)[0]["samples"])


def test_regions_summary():
    """Per model, the median of the per-repetition ratios of UNet time per row and the ratio of each call's
    quickest repetition; counts that differ in any run are reported."""

    def run(sdm_calls, tdm_calls=(1.0, 1.0), sdm_rows=4, stage_rows=None):
        return bench_module.RunFigures(label="", wall_s=10.0, unet_s=5.0, rows={"SDM": sdm_rows, "TDM": 4}, predict_noise_preludes_s=[],
                                    calls={"SDM": len(sdm_calls), "TDM": 2}, stage_rows_per_step=stage_rows or {"subject": [2, 2]},
                                    load_requests=[], weight_loads={}, weight_unloads={}, moves_during_sampling=0,
                                    call_s={"SDM": list(sdm_calls), "TDM": list(tdm_calls)})

    runs = {"plain": [run([1.0, 1.0]), run([1.0, 3.0])], "regions": [run([1.2, 1.0]), run([1.0, 3.4])]}
    summary = regions.regions_summary(runs)
    assert summary["SDM"]["ratio"] == pytest.approx((1.1 + 1.1) / 2)
    assert summary["SDM"]["quickest_plain_s_per_row"] == pytest.approx(2.0 / 4)
    assert summary["SDM"]["quickest_ratio"] == pytest.approx(2.0 / 2.0)
    assert summary["TDM"]["ratio"] == 1.0 and summary["counts_equal"] is True
    assert summary["sdm_over_tdm"] == pytest.approx({"plain": (1.0 + 2.0) / 2, "regions": (1.1 + 2.2) / 2, "ratio": 1.1})
    runs["regions"][1] = run([1.0, 3.4], stage_rows={"subject": [2, 4]})
    assert regions.regions_summary(runs)["counts_equal"] is False


def test_one_call_ratio_cancels_the_order_within_a_pair():
    """The pairs alternate their order; a second run of a pair that is always 20% slower moves no ratio."""

    def run(seconds):
        return bench_module.RunFigures(label="", wall_s=1.0, unet_s=seconds, rows={"SDM": 2}, predict_noise_preludes_s=[], calls={"SDM": 1},
                                    stage_rows_per_step={}, load_requests=[], weight_loads={}, weight_unloads={}, moves_during_sampling=0)

    # Regions cost 5%; pair 0 runs plain first, pair 1 regions first, and so on; the load doubles after two pairs.
    plain = [run(1.0), run(1.2), run(2.0), run(2.4)]
    scoped = [run(1.05 * 1.2), run(1.05), run(1.05 * 2.4), run(1.05 * 2.0)]
    summary = regions.one_call_summary({"plain": plain, "regions": scoped})
    assert summary["ratio"] == pytest.approx(1.05) and summary["pairs"] == 4 and summary["counts_equal"] is True
    assert summary["rows_per_call"] == 2
