"""Both models, the instruments, and the two samplers (KSampler and the SNF Sampler node) run the way their
nodes run them; one measured run's figures."""

from __future__ import annotations

import bisect
import dataclasses
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .instruments import Evaluation, HostReadCounter, LoadSpy, UNetCall, UNetMeter, synchronize
from .models import CFG, SAMPLER, SCHEDULER, SDM, SEED, TDM, StageSchedule, StepLocator, build_model, conditionings


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

