"""Plain tier: the PNDM (PLMS) sampler in sigma space against diffusers' PNDMScheduler, with an analytic
epsilon model so that nothing but the two samplers' arithmetic is compared."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dev.devkit import comfy_harness

comfy_harness.register_cpu_torchvision_ops()  # diffusers imports torchvision

from diffusers import PNDMScheduler  # noqa: E402

from facediffuser_core import pndm  # noqa: E402

TRAIN = 1000


def official_scheduler(steps: int) -> PNDMScheduler:
    scheduler = PNDMScheduler(num_train_timesteps=TRAIN, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
    scheduler.set_timesteps(steps)
    return scheduler


def sigma_table() -> torch.Tensor:
    """Per-timestep sigmas of SD1.5's schedule, as ComfyUI's ModelSamplingDiscrete tabulates them."""
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, TRAIN, dtype=np.float64) ** 2
    alphas_cumprod = torch.tensor(np.cumprod(1.0 - betas), dtype=torch.float32)
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def toy_epsilon(x_vp: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A smooth, timestep-dependent epsilon prediction, different at every pixel."""
    return torch.tanh(1.3 * x_vp + 0.01 * t) * (0.6 + 0.4 * torch.cos(t / 150.0)) + 0.2 * x_vp.roll(1, dims=-1)


class SigmaSpaceModel:
    """The toy model as a ComfyUI-style denoiser: x in sigma space, denoised = x - sigma * eps, with the
    timestep read back from sigma as ComfyUI does (the nearest tabulated log-sigma)."""

    def __init__(self, table: torch.Tensor):
        self.log_table = table.log()
        self.levels = []

    def __call__(self, x, sigma):
        t = (sigma[0].log() - self.log_table).abs().argmin().float()
        self.levels.append(int(t))
        x_vp = x / (1 + sigma[0] ** 2) ** 0.5
        return x - sigma[0] * toy_epsilon(x_vp, t)


@pytest.mark.parametrize("steps", [1, 2, 3, 7, 25, 30, 50])
def test_timesteps_are_diffusers_leading_grid(steps):
    scheduler = official_scheduler(steps)
    expected = [int(t) for t in scheduler._timesteps[::-1]]
    assert pndm.pndm_timesteps(steps) == expected
    # PLMS evaluates the second level twice when there are at least two steps.
    assert len(scheduler.timesteps) == steps + (1 if steps > 1 else 0)


@pytest.mark.parametrize("steps", [1, 2, 3, 5, 25, 50])
def test_sample_pndm_matches_diffusers_step_for_step(steps):
    scheduler = official_scheduler(steps)
    noise = torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(steps))

    latents = noise * scheduler.init_noise_sigma
    official_levels = []
    for t in scheduler.timesteps:
        official_levels.append(int(t))
        latents = scheduler.step(toy_epsilon(latents, t.float()), t, latents).prev_sample

    table = sigma_table()
    sigmas = pndm.pndm_sigmas(table, steps)
    model = SigmaSpaceModel(table)
    x = noise * (1 + sigmas[0] ** 2) ** 0.5  # PNDM's initial noise sigma 1, in sigma space
    result = pndm.sample_pndm(model, x, sigmas, final_sigma=float(table[0]))

    assert model.levels == official_levels
    torch.testing.assert_close(result, latents, rtol=1e-5, atol=1e-5 * latents.abs().max().item())


def test_multistep_weights_sum_to_one():
    for weights in pndm.MULTISTEP_WEIGHTS.values():
        assert sum(weights) == pytest.approx(1.0)


def test_callback_sees_every_step_once():
    table = sigma_table()
    sigmas = pndm.pndm_sigmas(table, 10)
    seen = []
    pndm.sample_pndm(SigmaSpaceModel(table), torch.zeros(1, 4, 4, 4), sigmas, callback=lambda info: seen.append(info["i"]),
                     final_sigma=float(table[0]))
    assert seen == list(range(10))


def test_bad_step_counts_are_refused():
    with pytest.raises(ValueError, match="between 1 and 1000 steps"):
        pndm.pndm_timesteps(0)
