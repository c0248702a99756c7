#!/usr/bin/env python3
"""What the Face-diffuser SNF sampler costs on top of the UNet evaluations it has to run.

Face-diffuser evaluates a UNet more often than plain sampling: at the official 50 steps with the 15/30
split, 130 evaluations against KSampler's 100. That is the floor; everything the pack adds on top of it
(saliency maps, the per-pixel choice, model loading, Python work, host-device syncs) is overhead. This
benchmark measures that overhead against ComfyUI's own KSampler, in the same process, on two random-weight
models of SD1.5's architecture (the SDM and the TDM), and prints a Markdown table:

1. the SNF sampler at alpha = beta = 0 (the SDM alone: KSampler's evaluations exactly) against KSampler;
2. the three-stage run at the official split (alpha 0.32, beta 0.62) against the floor, KSampler's time
   times the evaluation ratio;
3. model loads and weight moves per run, and whether any happen between stages;
4. peak memory against the models' weights, each configuration in a fresh process;
5. with --device cuda: seconds per image, peak VRAM, host syncs per run, and the SNF maths per fusion
   step as a fraction of one UNet evaluation.

    COMFYUI_PATH=~/ComfyUI python scripts/benchmark.py                # SD1.5-size UNets on CPU, 16x16 latent
    COMFYUI_PATH=~/ComfyUI python scripts/benchmark.py --quick        # small UNets of SD1.5's structure
    COMFYUI_PATH=~/ComfyUI python scripts/benchmark.py --device cuda  # SD1.5 size, 512x512, 50 steps, fp16

How it measures. Every call of each model's `diffusion_model.forward` is wrapped: it is counted (calls,
rows, and the noise level, from which the step and stage of every row are derived after the run) and timed
(perf_counter on CPU; CUDA events on a GPU, read after the run, so the measuring adds no host sync). A run
therefore splits into time inside the UNet and time outside it, which holds everything the samplers and the
pack add. Wall times on a shared machine drift by 5-20% between identical runs, so the runs are interleaved
(KSampler, SNF at 0/0, SNF three-stage, repeated) and each ratio is the median of the per-repetition
ratios; next to it stands the same ratio with the UNet time of both sides set equal, which is what the
overhead alone does to the wall time and is far less noisy. Loads are counted by spying on
comfy.model_management.load_models_gpu and on the model patcher's load, partial unload and offload. Peak
memory is the kernel's high-water mark of the resident set (VmHWM, reset before sampling) and, on CUDA,
torch.cuda.max_memory_allocated, each in a fresh process holding only the models its sampler needs.

ComfyUI runs in this process, started by the test harness in tests/comfy_harness.py (COMFYUI_PATH names
the ComfyUI checkout).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
for path in (REPO_ROOT, REPO_ROOT / "tests"):  # facediffuser_core (plain PyTorch) and the test harness
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import comfy_harness  # noqa: E402  (ComfyUI in-process, the same way the test suite starts it)
import tiny_comfy  # noqa: E402  (random weights at a scale that keeps activations finite)

from facediffuser_core import snf  # noqa: E402
from facediffuser_core.schedule import OFFICIAL_DEMO_ALPHA, OFFICIAL_DEMO_BETA, StageSchedule, StepLocator  # noqa: E402

SDM, TDM = "SDM", "TDM"
SEED = 0
CFG = 5.0
SAMPLER, SCHEDULER = "ddim", "ddim_uniform"
CONTEXT_TOKENS, CONTEXT_DIM = 77, 768
MEMORY_MARKER = "BENCHMARK-MEMORY "

# SD1.5's UNet (859.5M parameters), as comfy/model_detection.py describes it.
SD15_UNET = {
    "in_channels": 4, "out_channels": 4, "model_channels": 320, "channel_mult": [1, 2, 4, 4],
    "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "transformer_depth_middle": 1,
    "context_dim": CONTEXT_DIM, "num_heads": 8, "num_head_channels": -1, "use_spatial_transformer": True,
    "use_linear_in_transformer": False, "legacy": False, "adm_in_channels": None, "use_temporal_resblock": False,
    "use_temporal_attention": False, "use_checkpoint": False, "image_size": 32,
}
# The same blocks, attention layers and text context with a tenth of the channels (10.4M parameters).
SMALL_UNET = {**SD15_UNET, "model_channels": 32}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Preset:
    name: str
    unet_config: dict
    latent_side: int
    steps: int
    dtype: str
    repeats: int


PRESETS = {
    # 10 steps at the official fractions keep the official 1.30 evaluation ratio (26 rows against 20).
    "sd15-cpu": Preset("SD1.5-size UNets", SD15_UNET, latent_side=16, steps=10, dtype="bf16", repeats=2),
    "quick": Preset("small UNets of SD1.5's structure", SMALL_UNET, latent_side=16, steps=10, dtype="fp32", repeats=5),
    "sd15-cuda": Preset("SD1.5-size UNets", SD15_UNET, latent_side=64, steps=50, dtype="fp16", repeats=3),
}


# --------------------------------------------------------------------------------------------------
# ComfyUI and the models


def start_comfyui(device: str):
    """ComfyUI in this process; the test harness forces CPU, so for CUDA the device is settled first."""
    if device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("benchmark: --device cuda needs a CUDA build of torch and a visible GPU; "
                             f"this torch ({torch.__version__}) sees none. Run without --device for the CPU figures.")
        root = comfy_harness.comfyui_path()
        if root is None:
            raise SystemExit(f"benchmark: {comfy_harness.SKIP_REASON}")
        sys.path.insert(0, str(root))
        sys.argv = [sys.argv[0]]
        try:
            import torchvision  # noqa: F401  (a real build: the harness's CPU stand-ins then stay out of the way)
        except ImportError:
            pass
        import comfy.model_management  # noqa: F401  (picks the GPU now; the harness's later cpu flag no longer matters)
    elif comfy_harness.comfyui_path() is None:
        raise SystemExit(f"benchmark: {comfy_harness.SKIP_REASON}")
    comfyui = comfy_harness.start()
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False  # same for both samplers; tqdm would only add noise to the timings
    logging.getLogger().setLevel(logging.WARNING)
    return comfyui


def build_model(unet_config: dict, seed: int, dtype: torch.dtype, device: str):
    """A ComfyUI model patcher around an SD1.5-family UNet with random weights, loaded on `device` by
    ComfyUI's model management like any checkpoint (built on the CPU, moved at the first load)."""
    import comfy.model_patcher
    import comfy.supported_models

    model_config = comfy.supported_models.SD15(dict(unet_config))
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({})
    tiny_comfy.randomise(model.diffusion_model, seed)
    model.eval()
    return comfy.model_patcher.CoreModelPatcher(model, load_device=torch.device(device), offload_device=torch.device("cpu"))


def weight_bytes(patcher) -> int:
    return sum(p.numel() * p.element_size() for p in patcher.model.diffusion_model.parameters())


def parameter_count(patcher) -> int:
    return sum(p.numel() for p in patcher.model.diffusion_model.parameters())


def conditionings() -> dict:
    """The SNF sampler's three prompts at SD1.5's context shape (77 tokens of 768)."""
    generator = torch.Generator().manual_seed(SEED)
    return {name: [[torch.randn(1, CONTEXT_TOKENS, CONTEXT_DIM, generator=generator), {}]]
            for name in ("augmented", "text", "null")}


def empty_latent(side: int) -> dict:
    return {"samples": torch.zeros(1, 4, side, side)}


# --------------------------------------------------------------------------------------------------
# Instruments


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@dataclass
class UNetCall:
    model: str
    rows: int
    sigma: torch.Tensor  # the evaluation's noise levels, read only after the run
    start: float | torch.cuda.Event
    end: float | torch.cuda.Event | None = None


class UNetMeter:
    """Counts and times every UNet call of the watched models.

    On CUDA each call is bracketed by two events and nothing is read until the run has finished, so the
    meter itself adds no host sync to the sampling it measures.
    """

    def __init__(self, models: dict[str, object], device: str):
        self.models = models  # name -> ComfyUI BaseModel
        self.device = device
        self.calls: list[UNetCall] = []
        self.predict_noise_at: float | None = None
        self.preludes: list[float] = []  # host seconds from a guider's predict_noise to its first UNet call

    @contextmanager
    def watching(self):
        for name, model in self.models.items():
            model.diffusion_model.forward = self._timed(name, model.diffusion_model.forward)
        try:
            yield self
        finally:
            for model in self.models.values():
                del model.diffusion_model.forward  # the instance attribute; the class's forward shows again

    def _clock(self):
        if self.device == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def mark_predict_noise(self) -> None:
        self.predict_noise_at = time.perf_counter()

    def _timed(self, name: str, forward):
        def timed(x, *args, **kwargs):
            if self.predict_noise_at is not None:
                self.preludes.append(time.perf_counter() - self.predict_noise_at)
                self.predict_noise_at = None
            sigma = kwargs["transformer_options"]["sigmas"]
            call = UNetCall(name, x.shape[0], sigma, self._clock())
            self.calls.append(call)
            out = forward(x, *args, **kwargs)
            call.end = self._clock()
            return out

        return timed

    def take(self) -> list[UNetCall]:
        calls, self.calls = self.calls, []
        return calls

    def take_preludes(self) -> list[float]:
        preludes, self.preludes = self.preludes, []
        return preludes

    def seconds(self, calls: list[UNetCall]) -> float:
        if self.device == "cuda":
            return sum(c.start.elapsed_time(c.end) for c in calls) / 1000.0
        return sum(c.end - c.start for c in calls)


@dataclass
class LoadEvent:
    kind: str  # "load_models_gpu", "load", "partial_unload", "offload"
    models: list[str]
    during_sampling: bool  # after the run's first UNet call


class LoadSpy:
    """Counts ComfyUI's model loads and weight moves per model while active.

    load_models_gpu is the request; the patcher's `load` is what actually patches weights and moves them to
    the load device (it is skipped when the model is already fully loaded), `partially_unload` and an
    unpatch to the offload device are the moves back.
    """

    def __init__(self, names: dict[int, str], meter: UNetMeter):
        self.names = names  # id(BaseModel) -> model name; clones share the BaseModel
        self.meter = meter
        self.events: list[LoadEvent] = []

    def _record(self, kind: str, patchers) -> None:
        models = [self.names.get(id(p.model), "other") for p in patchers]
        self.events.append(LoadEvent(kind, models, during_sampling=bool(self.meter.calls)))

    @contextmanager
    def watching(self, patcher_class):
        import comfy.model_management

        spy = self
        real_load_models_gpu = comfy.model_management.load_models_gpu
        real_load, real_partially_unload, real_unpatch = patcher_class.load, patcher_class.partially_unload, patcher_class.unpatch_model

        def load_models_gpu(models, *args, **kwargs):
            spy._record("load_models_gpu", models)
            return real_load_models_gpu(models, *args, **kwargs)

        def load(self, *args, **kwargs):
            spy._record("load", [self])
            return real_load(self, *args, **kwargs)

        def partially_unload(self, *args, **kwargs):
            spy._record("partial_unload", [self])
            return real_partially_unload(self, *args, **kwargs)

        def unpatch_model(self, device_to=None, unpatch_weights=True):
            if device_to is not None and unpatch_weights:
                spy._record("offload", [self])
            return real_unpatch(self, device_to, unpatch_weights)

        comfy.model_management.load_models_gpu = load_models_gpu
        patcher_class.load, patcher_class.partially_unload, patcher_class.unpatch_model = load, partially_unload, unpatch_model
        try:
            yield self
        finally:
            comfy.model_management.load_models_gpu = real_load_models_gpu
            patcher_class.load, patcher_class.partially_unload, patcher_class.unpatch_model = real_load, real_partially_unload, real_unpatch

    def take(self) -> list[LoadEvent]:
        events, self.events = self.events, []
        return events


# --------------------------------------------------------------------------------------------------
# Runs


@dataclass
class RunFigures:
    label: str
    wall_s: float
    unet_s: float
    rows: dict[str, int]  # model -> UNet rows (cond and uncond counted apart)
    predict_noise_preludes_s: list[float]
    calls: dict[str, int]  # model -> batched UNet calls
    stage_rows_per_step: dict[str, list[int]]  # stage -> rows evaluated at each of its steps
    load_requests: list[list[str]]  # the models of each load_models_gpu call
    weight_loads: dict[str, int]
    weight_unloads: dict[str, int]
    moves_during_sampling: int

    @property
    def outside_s(self) -> float:
        return self.wall_s - self.unet_s

    @property
    def total_rows(self) -> int:
        return sum(self.rows.values())


class Bench:
    """Both models, the instruments, and the two samplers run the way their nodes run them."""

    def __init__(self, comfyui, unet_config: dict, dtype: torch.dtype, device: str, models=(SDM, TDM)):
        self.comfyui = comfyui
        self.device = device
        self.patchers = {name: build_model(unet_config, seed, dtype, device) for name, seed in ((SDM, 1), (TDM, 2)) if name in models}
        self.conds = conditionings()
        self.meter = UNetMeter({name: p.model for name, p in self.patchers.items()}, device)
        self.spy = LoadSpy({id(p.model): name for name, p in self.patchers.items()}, self.meter)

    @contextmanager
    def instruments(self):
        patcher_class = type(next(iter(self.patchers.values())))
        with self.meter.watching(), self.spy.watching(patcher_class), self._watching_predict_noise():
            yield

    @contextmanager
    def _watching_predict_noise(self):
        """Marks the start of each evaluation: the sampler's call of the guider (CFGGuider.__call__, which the
        SNFGuider inherits; it begins with the host read of the sigma: a sync on a GPU, after which the host
        time to the UNet call is time the GPU may idle). The SNFGuider's sides are CFGGuiders too, but the
        guider calls their predictions directly, so each evaluation is marked once."""
        import comfy.samplers

        call = comfy.samplers.CFGGuider.__call__
        meter = self.meter

        def marked(guider, *args, **kwargs):
            meter.mark_predict_noise()
            return call(guider, *args, **kwargs)

        comfy.samplers.CFGGuider.__call__ = marked
        try:
            yield
        finally:
            comfy.samplers.CFGGuider.__call__ = call

    def ksampler(self, latent: dict, steps: int):
        sdm = self.patchers[SDM]
        return self.comfyui.nodes.common_ksampler(sdm, SEED, steps, CFG, SAMPLER, SCHEDULER,
                                                  self.conds["augmented"], self.conds["text"], latent)

    def snf(self, latent: dict, steps: int, alpha: float, beta: float):
        return self.comfyui.run("FaceDiffuserSNFSampler", tdm=self.patchers[TDM], sdm=self.patchers[SDM], latent_image=latent,
                                seed=SEED, steps=steps, cfg=CFG, sampler_name=SAMPLER, scheduler=SCHEDULER,
                                alpha=alpha, beta=beta, denoise=1.0, **self.conds)

    def measure(self, label: str, run, steps: int, schedule: StageSchedule) -> RunFigures:
        """Run once under the instruments (which must be active) and account for every UNet row and load."""
        self.meter.take()
        self.meter.take_preludes()
        self.spy.take()
        synchronize(self.device)
        start = time.perf_counter()
        run()
        synchronize(self.device)
        wall = time.perf_counter() - start
        calls, events = self.meter.take(), self.spy.take()
        return RunFigures(
            label=label, wall_s=wall, unet_s=self.meter.seconds(calls),
            rows=_count(calls, lambda c: c.rows), predict_noise_preludes_s=self.meter.take_preludes(), calls=_count(calls, lambda c: 1),
            stage_rows_per_step=self._stage_rows_per_step(calls, steps, schedule),
            load_requests=[e.models for e in events if e.kind == "load_models_gpu"],
            weight_loads=_count([e for e in events if e.kind == "load"], lambda e: 1, key=lambda e: e.models[0]),
            weight_unloads=_count([e for e in events if e.kind in ("partial_unload", "offload")], lambda e: 1, key=lambda e: e.models[0]),
            moves_during_sampling=sum(e.kind != "load_models_gpu" and e.during_sampling for e in events),
        )

    def _stage_rows_per_step(self, calls: list[UNetCall], steps: int, schedule: StageSchedule) -> dict[str, list[int]]:
        if not calls:
            return {}
        import comfy.samplers

        sigmas = comfy.samplers.KSampler(self.patchers[SDM], steps=steps, device="cpu", sampler=SAMPLER, scheduler=SCHEDULER).sigmas
        locator = StepLocator(sigmas.tolist())
        evaluated = torch.stack([c.sigma[0].float() for c in calls]).tolist()  # one read for the whole run
        rows_per_step = [0] * steps
        for call, sigma in zip(calls, evaluated):
            rows_per_step[locator.step_for(sigma)] += call.rows
        by_stage: dict[str, list[int]] = {}
        for step, rows in enumerate(rows_per_step):
            by_stage.setdefault(schedule.stage_at(step).name.lower(), []).append(rows)
        return by_stage


def _count(items, value, key=lambda item: item.model) -> dict[str, int]:
    totals: dict[str, int] = {}
    for item in items:
        totals[key(item)] = totals.get(key(item), 0) + value(item)
    return totals


def snf_maths_seconds(side: int, device: str, iterations: int = 50) -> float:
    """Seconds of SNF maths per fusion evaluation for one 4-channel latent of side x side, in float32 as
    ComfyUI keeps latents: both guidance responses from the cond/uncond predictions, the saliency choice
    and the fusion. Timed as a block of iterations (CUDA events around the block), so it is the device's
    work, without Python's share, which the whole-run figures hold."""
    generator = torch.Generator().manual_seed(SEED)
    x, *outs = (torch.randn(1, 4, side, side, generator=generator).to(device) for _ in range(5))
    sigma = torch.full((1, 1, 1, 1), 3.0, device=device)

    def once():
        guidance = [snf.guidance_response((x - cond) / sigma, (x - uncond) / sigma, CFG) for cond, uncond in (outs[:2], outs[2:])]
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
    start_time = time.perf_counter()
    for _ in range(iterations):
        once()
    return (time.perf_counter() - start_time) / iterations


def count_host_syncs(run) -> int:
    """Synchronising CUDA operations during `run`, as torch's sync debug mode reports them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


# --------------------------------------------------------------------------------------------------
# The benchmark


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
        if device == "cuda":
            log("host syncs")
            figures["host_syncs"] = {
                "ksampler": count_host_syncs(lambda: bench.ksampler(latent, steps)),
                "snf_official": count_host_syncs(lambda: bench.snf(latent, steps, OFFICIAL_DEMO_ALPHA, OFFICIAL_DEMO_BETA)),
            }
    figures["runs"] = runs
    figures["snf_maths_s"] = snf_maths_seconds(preset.latent_side, device)
    figures["summary"] = summarise(runs, official)
    return figures


def summarise(runs: dict[str, list[RunFigures]], official: StageSchedule) -> dict:
    """Medians of the per-repetition ratios; `equal_unet` ratios give both sides the KSampler's UNet time
    (scaled by the evaluation ratio), so that only the time outside the UNet differs."""
    ks, plain, full = runs["ksampler"], runs["snf_plain"], runs["snf_official"]
    evaluation_ratio = full[0].total_rows / ks[0].total_rows
    median = statistics.median
    return {
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
        command = [sys.executable, str(Path(__file__).resolve()), "--memory-probe", sampler, *forwarded_arguments(args)]
        completed = subprocess.run(command, capture_output=True, text=True, check=False)
        lines = [line for line in completed.stdout.splitlines() if line.startswith(MEMORY_MARKER)]
        if completed.returncode != 0 or not lines:
            raise RuntimeError(f"the {sampler} memory probe failed (exit {completed.returncode}):\n{completed.stderr[-3000:]}")
        probes[sampler] = json.loads(lines[-1][len(MEMORY_MARKER):])
    return probes


def forwarded_arguments(args) -> list[str]:
    forwarded = ["--device", args.device, "--steps", str(args.steps), "--latent", str(args.latent), "--dtype", args.dtype]
    return forwarded + (["--quick"] if args.quick else [])


# --------------------------------------------------------------------------------------------------
# Report


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
        f"Machine: {machine_description(args.device)}.",
        f"Models: two {preset.name}, random weights, {timing['parameters_per_unet'] / 1e6:.1f}M parameters each, {preset.dtype}; "
        f"latent {side}x{side} ({side * 8}x{side * 8} px), batch 1, {SAMPLER}/{SCHEDULER}, {preset.steps} steps, cfg {CFG}; "
        f"{preset.repeats} interleaved repetitions, medians.",
        "",
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
        f"| 2 | UNet rows per step by stage (official split) | {_stage_rows(full[0])} | 2 per step | "
        f"{full[0].total_rows} / {runs['ksampler'][0].total_rows} rows | 2/4/2 |",
        f"| 3 | loads, first run (cold) | {_loads(first)} | | | one request, each model once |",
        f"| 3 | loads, each later run | {_loads_summary(full)} | | | no reload |",
        f"| 4 | models resident (RSS with the models - before), fresh process each | {_resident(memory['snf'], gib)} | "
        f"{_resident(memory['ksampler'], gib)} | {_resident_ratio(memory['snf']):.2f} x weights | 1 x weights (no copy) |",
        f"| 4 | sampling working memory (peak RSS - RSS with the models) | {_working(memory['snf']) / gib:.3f} GiB | "
        f"{_working(memory['ksampler']) / gib:.3f} GiB | {_working(memory['snf']) / _working(memory['ksampler']):.2f} | |",
        f"| 4 | peak RSS of the process | {memory['snf']['rss_peak'] / gib:.2f} GiB | {memory['ksampler']['rss_peak'] / gib:.2f} GiB | | |",
        f"| 5 | host time from predict_noise to the UNet call (the SNF guider's sigma read comes first) "
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


def _stage_rows(run: RunFigures) -> str:
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


def _as_json(value):
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else str(value)


# --------------------------------------------------------------------------------------------------


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small UNets of SD1.5's structure (about a minute on 2 CPU cores)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--steps", type=int, help="sampling steps (default: 10 on CPU, 50 on CUDA)")
    parser.add_argument("--latent", type=int, help="latent side, an image side / 8 (default: 16 on CPU, 64 on CUDA)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="UNet weights (default: bf16 on CPU, fp32 with --quick, fp16 on CUDA)")
    parser.add_argument("--repeats", type=int, help="interleaved repetitions of the three runs")
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    parser.add_argument("--comfyui", type=Path, help="ComfyUI checkout (default: $COMFYUI_PATH)")
    parser.add_argument("--memory-probe", choices=("ksampler", "snf"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    base = PRESETS["sd15-cuda" if args.device == "cuda" else "quick" if args.quick else "sd15-cpu"]
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
    command = " ".join(["python scripts/benchmark.py", *argv])  # the harness resets sys.argv when ComfyUI starts
    args, preset = parse_arguments(argv)
    if args.comfyui:
        os.environ["COMFYUI_PATH"] = str(args.comfyui)
    if args.memory_probe:
        comfyui = start_comfyui(args.device)
        print(MEMORY_MARKER + json.dumps(memory_probe(comfyui, preset, args.device, args.memory_probe)), flush=True)
        return 0

    log = lambda message: print(f"benchmark: {message}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    log("memory probes (a fresh process each)")
    memory = run_memory_probes(args)
    comfyui = start_comfyui(args.device)
    log(f"building two {preset.name} ({preset.dtype}) and timing")
    timing = timing_benchmark(comfyui, preset, args.device, log)
    table = report(args, preset, timing, memory)
    print(f"{table}\n\nCommand: `{command}` ({time.perf_counter() - started:.0f} s in all).")
    if args.json:
        args.json.write_text(json.dumps({"preset": dataclasses.asdict(preset), "device": args.device, "machine": machine_description(args.device),
                                         "timing": timing, "memory": memory}, indent=1, default=_as_json))
    return 0


if __name__ == "__main__":
    sys.exit(main())
