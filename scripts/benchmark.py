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
   step as a fraction of one UNet evaluation;
6. the host time outside the UNet per UNet evaluation, by stage, against KSampler's at the same steps, and
   the host reads of tensor values per run (each a host sync on a GPU). With --null-unet the UNets cost
   next to nothing (SD1.5's interface and latent, 512x512, 50 steps), so that this is all a run measures.
7. with --regions, instead of 1-6: the cost of per-subject regions (the SDM's cross-attention masked per
   subject), the same three-stage run for two subjects with and without two half-picture regions: UNet
   time per SDM row with regions against without, and UNet rows per step and stage (equal by design).

    COMFYUI_PATH=~/ComfyUI python scripts/benchmark.py                # SD1.5-size UNets on CPU, 16x16 latent
    COMFYUI_PATH=~/ComfyUI python scripts/benchmark.py --quick        # small UNets of SD1.5's structure
    COMFYUI_PATH=~/ComfyUI python scripts/benchmark.py --device cuda  # SD1.5 size, 512x512, 50 steps, fp16
    COMFYUI_PATH=~/ComfyUI python scripts/benchmark.py --null-unet    # the host work per evaluation alone
    COMFYUI_PATH=~/ComfyUI python scripts/benchmark.py --regions --latent 64  # regions' cost at 512x512

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

ComfyUI runs in this process, started as the test suite starts it, by facediffuser_devkit.comfy_harness
(COMFYUI_PATH names the ComfyUI checkout).
"""

from __future__ import annotations

import argparse
import bisect
import collections
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
from facediffuser_client.pack import core
from facediffuser_devkit import comfy_harness, tiny_comfy

snf = core("snf")
_schedule = core("schedule")
OFFICIAL_DEMO_ALPHA, OFFICIAL_DEMO_BETA = _schedule.OFFICIAL_DEMO_ALPHA, _schedule.OFFICIAL_DEMO_BETA
StageSchedule, StepLocator = _schedule.StageSchedule, _schedule.StepLocator

SDM, TDM = "SDM", "TDM"
SEED = 0
CFG = 5.0
SAMPLER, SCHEDULER = "ddim", "ddim_uniform"
CONTEXT_TOKENS, CONTEXT_DIM = 77, 768
MEMORY_MARKER = "BENCHMARK-MEMORY "
DISPATCH_SIDE = 8

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
# SD1.5's model around a NullUNet: ComfyUI builds no UNet from this configuration.
NULL_UNET = {**SD15_UNET, "disable_unet_model_creation": True}

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
    # 512x512 and the official 50 steps: a run is then the samplers' and the pack's host work alone.
    "null": Preset("null UNets (SD1.5's interface and latent, next to no work)", NULL_UNET, latent_side=64, steps=50, dtype="fp32", repeats=25),
}


# --------------------------------------------------------------------------------------------------
# ComfyUI and the models


def start_comfyui(device: str):
    """ComfyUI in this process, as the tests start it; on CUDA without the harness's CPU flag."""
    if comfy_harness.comfyui_path() is None:
        raise SystemExit(f"benchmark: {comfy_harness.SKIP_REASON}")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("benchmark: --device cuda needs a CUDA build of torch and a visible GPU; "
                             f"this torch ({torch.__version__}) sees none. Run without --device for the CPU figures.")
        try:
            import torchvision  # noqa: F401  (a real build: the harness's CPU stand-ins then stay out of the way)
        except ImportError:
            pass
    comfyui = comfy_harness.start(cpu=device != "cuda")
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False  # same for both samplers; tqdm would only add noise to the timings
    logging.getLogger().setLevel(logging.WARNING)
    return comfyui


class NullUNet(torch.nn.Module):
    """SD1.5's UNet as ComfyUI calls it (latent, timesteps, text context, options) for a few elementwise
    operations: a scale per latent channel and the context's mean, so that the conditional and unconditional
    predictions differ (SNF then has guidance to compare) and a run's time is what surrounds the UNet."""

    def __init__(self, seed: int, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype
        generator = torch.Generator().manual_seed(seed)
        self.scale = torch.nn.Parameter(0.5 + 0.1 * torch.randn(1, 4, 1, 1, generator=generator).to(dtype), requires_grad=False)

    def forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):
        return x * self.scale + context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1).to(x.dtype)


def build_model(unet_config: dict, seed: int, dtype: torch.dtype, device: str):
    """A ComfyUI model patcher around an SD1.5-family UNet with random weights (or a NullUNet), loaded on
    `device` by ComfyUI's model management like any checkpoint (built on the CPU, moved at the first load)."""
    import comfy.model_patcher
    import comfy.supported_models

    model_config = comfy.supported_models.SD15(dict(unet_config))
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({})
    if unet_config.get("disable_unet_model_creation"):
        model.diffusion_model = NullUNet(seed, dtype)
    else:
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
    host_start: float  # perf_counter around the call: on CUDA the host's share (launches), on CPU the call itself
    end: float | torch.cuda.Event | None = None
    host_end: float | None = None


@dataclass
class Evaluation:
    """One call of the guider by the sampler: when it began and at which noise level (read after the run)."""

    start: float
    sigma: torch.Tensor


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
        self.evaluations: list[Evaluation] = []
        self.snf_s: collections.defaultdict[int, float] = collections.defaultdict(float)  # evaluation -> seconds of SNF maths

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

    def mark_predict_noise(self, sigma: torch.Tensor) -> None:
        self.predict_noise_at = time.perf_counter()
        self.evaluations.append(Evaluation(self.predict_noise_at, sigma))

    def _timed(self, name: str, forward):
        def timed(x, *args, **kwargs):
            if self.predict_noise_at is not None:
                self.preludes.append(time.perf_counter() - self.predict_noise_at)
                self.predict_noise_at = None
            sigma = kwargs["transformer_options"]["sigmas"]
            call = UNetCall(name, x.shape[0], sigma, self._clock(), time.perf_counter())
            self.calls.append(call)
            out = forward(x, *args, **kwargs)
            call.host_end = time.perf_counter()
            call.end = self._clock()
            return out

        return timed

    def take(self) -> list[UNetCall]:
        calls, self.calls = self.calls, []
        return calls

    def take_preludes(self) -> list[float]:
        preludes, self.preludes = self.preludes, []
        return preludes

    def take_evaluations(self) -> list[Evaluation]:
        evaluations, self.evaluations = self.evaluations, []
        return evaluations

    def call_seconds(self, call: UNetCall) -> float:
        return call.start.elapsed_time(call.end) / 1000.0 if self.device == "cuda" else call.end - call.start

    def seconds(self, calls: list[UNetCall]) -> float:
        return sum(self.call_seconds(c) for c in calls)


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


# Python's ways of reading a tensor's values on the host; on a GPU each read of a device tensor waits for the
# device's queue to drain (a host sync).
HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__")


class HostReadCounter:
    """Counts the host reads of tensor values per place in the code, and whether sampling had begun (a
    guider was called). On the CPU nothing is on a device, so every read is counted: a read of the sigma
    schedule the code keeps on the host shows here too, under its own place."""

    def __init__(self, meter: UNetMeter):
        self.meter = meter
        self.reads: dict[tuple[str, str], int] = {}  # (phase, place) -> reads

    @contextmanager
    def counting(self):
        originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

        def counted(original):
            def read(tensor, *args, **kwargs):
                code = sys._getframe(1).f_code
                key = ("sampling" if self.meter.evaluations else "set-up", f"{Path(code.co_filename).name}:{code.co_name}")
                self.reads[key] = self.reads.get(key, 0) + 1
                return original(tensor, *args, **kwargs)

            return read

        self.reads = {}
        for name, original in originals.items():
            setattr(torch.Tensor, name, counted(original))
        try:
            yield self
        finally:
            for name, original in originals.items():
                setattr(torch.Tensor, name, original)

    def total(self, phase: str) -> int:
        return sum(count for (read_phase, _), count in self.reads.items() if read_phase == phase)


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
    # Host time outside the UNet, by the step each evaluation belongs to: from one call of the guider to the
    # next (the guider's work and the sampler's step after it), less the UNet calls in between. The last
    # evaluation has no next one; its time and the run's set-up and tear-down are `fixed_s`.
    step_outside_s: list[float] = dataclasses.field(default_factory=list)
    step_rows: list[int] = dataclasses.field(default_factory=list)
    fixed_s: float = 0.0
    step_snf_maths_s: list[float] = dataclasses.field(default_factory=list)  # host time in the guider's SNF maths by step
    call_s: dict[str, list[float]] = dataclasses.field(default_factory=dict)  # model -> seconds of each UNet call, in order

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
        self.host_reads = HostReadCounter(self.meter)

    @contextmanager
    def instruments(self):
        patcher_class = type(next(iter(self.patchers.values())))
        with self.meter.watching(), self.spy.watching(patcher_class), self._watching_predict_noise(), self._watching_snf_maths():
            yield

    @contextmanager
    def _watching_snf_maths(self):
        """Times the guider's SNF maths in the run: both guidance responses, the saliency choice, the fusion."""
        core, guider = self.comfyui.pack("facediffuser_core.snf"), self.comfyui.pack("nodes.model_side")
        targets = [(core, "decide"), (core, "fuse"), (guider.Predictions, "guidance")]
        originals = [getattr(owner, name) for owner, name in targets]
        meter = self.meter

        def timed(function):
            def run(*args, **kwargs):
                start = time.perf_counter()
                try:
                    return function(*args, **kwargs)
                finally:
                    meter.snf_s[len(meter.evaluations) - 1] += time.perf_counter() - start

            return run

        for (owner, name), original in zip(targets, originals):
            setattr(owner, name, timed(original))
        try:
            yield
        finally:
            for (owner, name), original in zip(targets, originals):
                setattr(owner, name, original)

    @contextmanager
    def _watching_predict_noise(self):
        """Marks the start of each evaluation: the sampler's call of the guider (CFGGuider.__call__, which the
        SNFGuider inherits; from there to the UNet call is host time the GPU may idle). The SNFGuider's sides are CFGGuiders too, but the
        guider calls their predictions directly, so each evaluation is marked once."""
        import comfy.samplers

        call = comfy.samplers.CFGGuider.__call__
        meter = self.meter

        def marked(guider, x, sigma, *args, **kwargs):
            meter.mark_predict_noise(sigma)
            return call(guider, x, sigma, *args, **kwargs)

        comfy.samplers.CFGGuider.__call__ = marked
        try:
            yield
        finally:
            comfy.samplers.CFGGuider.__call__ = call

    def ksampler(self, latent: dict, steps: int, sampler: str = SAMPLER):
        sdm = self.patchers[SDM]
        return self.comfyui.nodes.common_ksampler(sdm, SEED, steps, CFG, sampler, SCHEDULER,
                                                  self.conds["augmented"], self.conds["text"], latent)

    def snf(self, latent: dict, steps: int, alpha: float, beta: float, sampler: str = SAMPLER, conds: dict | None = None, **inputs):
        """The SNF Sampler node; `conds` replace the benchmark's prompts, `inputs` are further node inputs (regions)."""
        return self.comfyui.run("FaceDiffuserSNFSampler", tdm=self.patchers[TDM], sdm=self.patchers[SDM], latent_image=latent,
                                seed=SEED, steps=steps, cfg=CFG, sampler_name=sampler, scheduler=SCHEDULER,
                                alpha=alpha, beta=beta, denoise=1.0, **(conds or self.conds), **inputs)

    def measure(self, label: str, run, steps: int, schedule: StageSchedule) -> RunFigures:
        """Run once under the instruments (which must be active) and account for every UNet row and load."""
        self.meter.take()
        self.meter.take_preludes()
        self.meter.take_evaluations()
        self.meter.snf_s.clear()
        self.spy.take()
        synchronize(self.device)
        start = time.perf_counter()
        run()
        synchronize(self.device)
        end = time.perf_counter()
        wall = end - start
        calls, events, evaluations = self.meter.take(), self.spy.take(), self.meter.take_evaluations()
        step_outside, step_rows, fixed = self._outside_per_step(calls, evaluations, start, end, steps)
        step_snf = [0.0] * steps
        if evaluations:
            locator = self._locator(steps)
            for index, seconds in self.meter.snf_s.items():
                step_snf[locator.step_for(float(evaluations[index].sigma[0]))] += seconds
        return RunFigures(
            label=label, wall_s=wall, unet_s=self.meter.seconds(calls),
            rows=_count(calls, lambda c: c.rows), predict_noise_preludes_s=self.meter.take_preludes(), calls=_count(calls, lambda c: 1),
            stage_rows_per_step=self._stage_rows_per_step(calls, steps, schedule),
            load_requests=[e.models for e in events if e.kind == "load_models_gpu"],
            weight_loads=_count([e for e in events if e.kind == "load"], lambda e: 1, key=lambda e: e.models[0]),
            weight_unloads=_count([e for e in events if e.kind in ("partial_unload", "offload")], lambda e: 1, key=lambda e: e.models[0]),
            moves_during_sampling=sum(e.kind != "load_models_gpu" and e.during_sampling for e in events),
            step_outside_s=step_outside, step_rows=step_rows, fixed_s=fixed, step_snf_maths_s=step_snf,
            call_s={name: [self.meter.call_seconds(c) for c in calls if c.model == name] for name in self.patchers},
        )

    def count_host_reads(self, run) -> dict:
        """Host reads of tensor values in one run (the instruments must be active), before sampling and
        during it, with the places that made them."""
        self.meter.take_evaluations()
        with self.host_reads.counting():
            run()
        self.meter.take()
        evaluations = len(self.meter.take_evaluations())
        reads = self.host_reads
        return {"set-up": reads.total("set-up"), "sampling": reads.total("sampling"), "evaluations": evaluations,
                "places": {f"{phase} {place}": count for (phase, place), count in sorted(reads.reads.items())}}

    def _locator(self, steps: int) -> StepLocator:
        import comfy.samplers

        return StepLocator(comfy.samplers.KSampler(self.patchers[SDM], steps=steps, device="cpu", sampler=SAMPLER, scheduler=SCHEDULER).sigmas.tolist())

    def _outside_per_step(self, calls: list[UNetCall], evaluations: list[Evaluation], start: float, end: float, steps: int):
        """Host seconds outside the UNet and UNet rows per step, from each evaluation to the next; and the
        rest of the run (before the first evaluation, from the last one on) less its UNet time."""
        outside, rows = [0.0] * steps, [0] * steps
        if not evaluations:
            return outside, rows, end - start - sum(c.host_end - c.host_start for c in calls)
        locator = self._locator(steps)
        evaluated = torch.stack([e.sigma[0].float() for e in evaluations]).tolist()  # one read for the whole run
        bounds = [e.start for e in evaluations]
        inside = [0.0] * len(bounds)
        rows_in = [0] * len(bounds)
        for call in calls:
            index = bisect.bisect_right(bounds, call.host_start) - 1
            if index >= 0:
                inside[index] += call.host_end - call.host_start
                rows_in[index] += call.rows
        for index in range(len(bounds) - 1):
            step = locator.step_for(evaluated[index])
            outside[step] += bounds[index + 1] - bounds[index] - inside[index]
            rows[step] += rows_in[index]
        fixed = (bounds[0] - start) + (end - bounds[-1] - inside[-1])
        return outside, rows, fixed

    def _stage_rows_per_step(self, calls: list[UNetCall], steps: int, schedule: StageSchedule) -> dict[str, list[int]]:
        if not calls:
            return {}
        locator = self._locator(steps)
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


# --------------------------------------------------------------------------------------------------
# Regions: what the SDM's token-scoped cross-attention costs


SUBJECT_ROWS = (5, 9)  # the two subjects' <|image|> rows in the benchmark's prompt


def region_setting(bench: Bench, side: int) -> tuple[dict, torch.Tensor]:
    """The three prompts as the Subject Prompt makes them for two subjects (the augmented prompt is the text
    prompt with fused rows at the markers, and carries the rows and the text's states there), and two
    half-picture regions from the Region Layout node."""
    regions = bench.comfyui.pack("facediffuser_core.regions")
    text = bench.conds["text"][0][0]
    augmented = text.clone()
    rows = list(SUBJECT_ROWS)
    augmented[0, rows] = bench.conds["augmented"][0][0][0, rows]
    subjects = regions.SubjectTokens(SUBJECT_ROWS, CONTEXT_TOKENS, text[0, rows].clone())
    conds = {**bench.conds, "augmented": [[augmented, {regions.SUBJECTS_KEY: subjects}]]}
    masks = bench.comfyui.run("FaceDiffuserRegionLayout", layout="halves", subjects=2, width=side * 8, height=side * 8, boxes="")[0]
    return conds, masks


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
    conds, masks = region_setting(bench, side)
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
        f"| UNet rows per step by stage | {_stage_rows(scoped)} | {_stage_rows(plain)} | "
        f"{'equal' if s['counts_equal'] and single['counts_equal'] else 'DIFFERENT'} in every run | equal |",
        f"| UNet calls and rows per run | {calls(scoped)} | {calls(plain)} | | equal |",
    ]
    return "\n".join(lines)


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
    return forwarded + (["--quick"] if args.quick else []) + (["--null-unet"] if args.null_unet else [])


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
        f"| 2 | UNet rows per step by stage (official split) | {_stage_rows(full[0])} | 2 per step | "
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
    if args.quick and args.null_unet:
        parser.error("--quick and --null-unet are two UNet sizes: give one")
    if args.regions and args.null_unet:
        parser.error("--regions measures masked cross-attention, which the null UNet does not have: leave out --null-unet")
    base = PRESETS["null" if args.null_unet else "sd15-cuda" if args.device == "cuda" else "quick" if args.quick else "sd15-cpu"]
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
    memory = {}
    if not (args.null_unet or args.regions):  # a null UNet's memory is nothing to measure; regions add no model
        log("memory probes (a fresh process each)")
        memory = run_memory_probes(args)
    comfyui = start_comfyui(args.device)
    if args.regions:
        log(f"building two {preset.name} ({preset.dtype}) and timing with and without regions")
        bench = Bench(comfyui, preset.unet_config, DTYPES[preset.dtype], args.device)
        timing = regions_timing(bench, preset.steps, preset.latent_side, preset.repeats, log)
        print(f"{header(args, preset, timing)}\n\n{regions_report(preset, timing)}\n\n"
              f"Command: `{command}` ({time.perf_counter() - started:.0f} s in all).")
        if args.json:
            write_json(args, preset, timing, memory)
        return 0
    if args.null_unet:
        # With next to no arithmetic a second thread only adds waits for it (on a shared machine, long ones).
        torch.set_num_threads(1)
    log(f"building two {preset.name} ({preset.dtype}) and timing")
    timing = timing_benchmark(comfyui, preset, args.device, log)
    tables = [header(args, preset, timing)]
    if not args.null_unet:
        tables.append(report(args, preset, timing, memory))
    table = "\n\n".join([*tables, per_evaluation_report(preset, timing)])
    print(f"{table}\n\nCommand: `{command}` ({time.perf_counter() - started:.0f} s in all).")
    if args.json:
        write_json(args, preset, timing, memory)
    return 0


def write_json(args, preset: Preset, timing: dict, memory: dict) -> None:
    args.json.write_text(json.dumps({"preset": dataclasses.asdict(preset), "device": args.device, "machine": machine_description(args.device),
                                     "timing": timing, "memory": memory}, indent=1, default=_as_json))


if __name__ == "__main__":
    sys.exit(main())
