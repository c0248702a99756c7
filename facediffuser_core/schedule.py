"""The three sampling stages of Face-diffuser and how a model evaluation is placed in one of them.

Stages over the global step index i = 0 .. T-1:
  scene construction  i <  scene_end     TDM only, text vs null prompt
  subject-scene fusion scene_end <= i < fusion_end   both models, fused per pixel by SNF
  subject enhancement  i >= fusion_end   SDM only, augmented vs text prompt

The paper writes the boundaries as fractions alpha <= beta of T: the first round(alpha*T) steps are
scene construction, the steps up to round(beta*T) fusion, the rest subject enhancement. Rounding is
half-up, so the boundary never depends on Python's round-half-to-even.

The official demo script's "start_merge_step=15, final_step=30" (inclusive, T=50) means 16 scene steps
(i = 0..15) and 15 fusion steps (i = 16..30): alpha = 0.32, beta = 0.62. Its test script's 10/30 is
alpha = 0.22, beta = 0.62.
"""

from __future__ import annotations

import bisect
import enum
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch


class Stage(enum.Enum):
    SCENE = "scene construction"
    FUSION = "subject-scene fusion"
    SUBJECT = "subject enhancement"


OFFICIAL_DEMO_ALPHA = 0.32
OFFICIAL_DEMO_BETA = 0.62


def _round_half_up(value: float) -> int:
    return int(math.floor(value + 0.5))


@dataclass(frozen=True)
class StageSchedule:
    total_steps: int
    scene_end: int  # first fusion step
    fusion_end: int  # first subject-enhancement step

    @classmethod
    def from_fractions(cls, alpha: float, beta: float, total_steps: int) -> "StageSchedule":
        for name, value in (("alpha", alpha), ("beta", beta)):
            if not (0.0 <= value <= 1.0) or math.isnan(value):
                raise ValueError(f"{name} must be a fraction of the steps between 0 and 1, got {value}")
        if alpha > beta:
            raise ValueError(
                f"alpha ({alpha}) must not exceed beta ({beta}): alpha ends scene construction, beta ends "
                "the fusion stage, which follows it"
            )
        if total_steps < 1:
            raise ValueError(f"the sampling needs at least one step, got {total_steps}")
        return cls(total_steps, _round_half_up(alpha * total_steps), _round_half_up(beta * total_steps))

    def stage_at(self, step: int) -> Stage:
        if step < self.scene_end:
            return Stage.SCENE
        if step < self.fusion_end:
            return Stage.FUSION
        return Stage.SUBJECT

    def evaluations(self) -> int:
        """UNet evaluations (cond and uncond counted apart) for a one-evaluation-per-step sampler."""
        fusion_steps = self.fusion_end - self.scene_end
        return 2 * (self.total_steps - fusion_steps) + 4 * fusion_steps


class StepLocator:
    """Maps the noise level of a model evaluation to the step of a sigma schedule it belongs to.

    An evaluation at sigma belongs to the step i with sigmas[i] >= sigma > sigmas[i+1]: exactly step i
    for samplers that evaluate once per step at sigmas[i], and the step whose interval holds the
    intermediate noise level for multi-evaluation samplers (dpm_2, dpmpp_2s, dpmpp_sde, ...). Correctors
    that evaluate at the end point sigmas[i+1] (heun, heunpp2) are placed in step i+1, whose noise level
    they share. Stage boundaries are therefore exact noise levels: every evaluation noisier than
    sigmas[scene_end] is scene construction, whatever the sampler.

    The schedule is the whole one: when a run covers only part of it (a SplitSigmas half, the tail that
    denoise < 1 keeps), its evaluations are placed on the whole schedule's steps.
    """

    # Relative tolerance for noise levels recomputed by a sampler from the schedule in a lower precision.
    RELATIVE_TOLERANCE = 1e-4

    def __init__(self, sigmas: Sequence[float]):
        if len(sigmas) < 2:
            raise ValueError(f"a sigma schedule needs at least two entries, got {len(sigmas)}")
        # bisect wants ascending keys; the schedule descends.
        self._ascending = [-float(s) for s in sigmas[:-1]]
        self._levels = sorted(float(s) for s in sigmas)

    def step_for(self, sigma: float) -> int:
        # Count the schedule entries at or above sigma (within tolerance); the last of them is the step.
        local = bisect.bisect_right(self._ascending, -sigma * (1.0 - self.RELATIVE_TOLERANCE))
        return max(local - 1, 0)

    def on_schedule(self, sigma: float) -> bool:
        """Whether sigma is one of the schedule's noise levels (within tolerance)."""
        index = bisect.bisect_left(self._levels, sigma)
        neighbours = self._levels[max(index - 1, 0):index + 1]
        return any(abs(sigma - s) <= self.RELATIVE_TOLERANCE * abs(s) or sigma == s for s in neighbours)


def denoise_schedule(calculate: Callable[[int], torch.Tensor], steps: int, denoise: float):
    """KSampler's denoise rules (comfy.samplers.KSampler.set_steps), the one copy every node of the pack uses:
    (the sigmas a run samples, the whole schedule they are the tail of). `calculate(n)` makes an n-step schedule.
    Below 1 (from 0.9999, as KSampler; BasicScheduler's `< 1` gives the same for every step count up to 10000),
    denoise keeps the last steps+1 sigmas of an int(steps/denoise)-step schedule; 0 or less samples nothing
    (an empty schedule, no whole). At 1 the whole schedule is sampled, also where a scheduler makes it longer
    than asked (ddim_uniform: 31 steps for 30)."""
    if denoise > 0.9999:
        whole = calculate(steps)
        return whole, whole
    if denoise <= 0.0:
        return torch.FloatTensor([]), None
    whole = calculate(int(steps / denoise))
    return whole[-(steps + 1):], whole
