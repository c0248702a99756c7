"""The guider's stage clock: which step of the whole schedule, and so which stage, each model evaluation of a run
belongs to (facediffuser_core.schedule places a noise level on the schedule).

A run's sigmas may be part of a longer schedule (a SplitSigmas half, a denoise tail): alpha and beta are
fractions of the whole schedule's steps, and evaluations are placed on it. k-diffusion samplers that evaluate
the model once per step, at sigmas[i] in step i (with the default options named), are counted instead of read:
the clock takes each evaluation's step from its count rather than reading its sigma on the host (a device sync
per evaluation on a GPU), and checks the count against the sigmas once, after the run.
"""

from __future__ import annotations

import comfy.k_diffusion.sampling
import torch

from ..facediffuser_core.schedule import Stage, StageSchedule, StepLocator

ONE_EVALUATION_PER_STEP = {
    name: {"s_churn": 0.0} if name == "euler" else {}
    for name in ("euler", "euler_ancestral", "euler_ancestral_RF", "lms", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu",
                 "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm", "ipndm_v", "deis", "euler_cfg_pp",
                 "euler_ancestral_cfg_pp", "dpmpp_2m_cfg_pp", "res_multistep", "res_multistep_cfg_pp")
}


class StageClock:
    """alpha and beta (fractions of the steps) and, when given, the whole schedule a run's sigmas are part of.
    Errors name `node`."""

    def __init__(self, alpha: float, beta: float, schedule: torch.Tensor | None, node: str):
        StageSchedule.from_fractions(alpha, beta, 1)  # reject bad fractions when the graph is built
        if schedule is not None and schedule.shape[-1] < 2:
            raise ValueError(f"the 'schedule' input holds {schedule.shape[-1]} sigma(s); a schedule has at least one step (two sigmas)")
        self.alpha, self.beta, self.node = alpha, beta, node
        self.schedule = None if schedule is None else schedule.detach().cpu()
        self.locator: StepLocator | None = None
        self.stages: StageSchedule | None = None
        self.run_steps: list[tuple[int, Stage]] = []  # each step of the run: its step of the whole schedule and its stage
        self.run_sigmas: torch.Tensor | None = None  # the run's sigmas on the device, as the sampler gets them
        self.counted: list[tuple[int, Stage]] | None = None  # each evaluation's step and stage, where counted
        self.evaluated: list[torch.Tensor] = []  # the counted evaluations' sigmas, checked after the run

    def place(self, sigmas: torch.Tensor) -> None:
        """A run's sigmas on the whole schedule."""
        run = sigmas.tolist()  # one host copy of the schedule per run; evaluations are then placed without it
        full = run if self.schedule is None else self.schedule.tolist()
        self.run_steps = []
        if len(full) < 2:  # a one-sigma run evaluates nothing (a SplitSigmas half at the last step)
            self.locator = self.stages = None
            return
        self.locator = StepLocator(full)
        missing = [sigma for sigma in run if not self.locator.on_schedule(sigma)]
        if missing:
            raise ValueError(
                f"{self.node}: the sampler's sigmas include {missing[0]:.6g}, which is not on the 'schedule' input's sigmas: connect the "
                "schedule these sigmas were split or cut from (e.g. BasicScheduler's output before SplitSigmas)"
            )
        self.stages = StageSchedule.from_fractions(self.alpha, self.beta, len(full) - 1)
        self.run_steps = [(step, self.stages.stage_at(step)) for step in map(self.locator.step_for, run[:-1])]

    def start(self, sampler, sigmas: torch.Tensor) -> None:
        """The sampler's run begins: its evaluations are counted when it evaluates once per step on the run's sigmas."""
        self.counted = self.run_steps if sigmas is self.run_sigmas and self._one_evaluation_per_step(sampler) else None
        self.evaluated = []

    @staticmethod
    def _one_evaluation_per_step(sampler) -> bool:
        function = getattr(sampler, "sampler_function", None)
        options = getattr(sampler, "extra_options", {})
        return any(function is getattr(comfy.k_diffusion.sampling, f"sample_{name}", None) and all(options.get(k, v) == v for k, v in defaults.items())
                   for name, defaults in ONE_EVALUATION_PER_STEP.items())

    def stage_of(self, sigma: torch.Tensor) -> tuple[int, Stage]:
        """The next evaluation's step and stage."""
        if self.counted is not None and len(self.evaluated) < len(self.counted):
            return self.counted[len(self.evaluated)]
        # A host read: which models run is a Python decision.
        step = self.locator.step_for(float(sigma[0]))
        return step, self.stages.stage_at(step)

    def evaluation(self, sigma: torch.Tensor) -> tuple[int, Stage]:
        """An evaluation begins: its step and stage."""
        placed = self.stage_of(sigma)
        if self.counted is not None:
            self.evaluated.append(sigma)
        return placed

    def check(self, sampler) -> None:
        """One host read per run: every counted evaluation was at its step's noise level."""
        if self.counted is None or not self.evaluated:
            return
        evaluated = torch.stack([sigma[0] for sigma in self.evaluated]).tolist()
        for index, (sigma, (step, _)) in enumerate(zip(evaluated, self.counted)):
            if self.locator.step_for(sigma) != step:
                name = getattr(sampler.sampler_function, "__name__", type(sampler).__name__)
                raise RuntimeError(
                    f"{self.node}: the sampler ({name}) evaluated the model at sigma {sigma:.6g} as its evaluation {index}, not at "
                    f"step {step}'s noise level as Face-diffuser counted, so its stages were misplaced: "
                    "choose another sampler (and report this one as an issue of the Face-diffuser node pack)"
                )
