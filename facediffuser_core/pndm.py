"""The official Face-diffuser run's sampler, in the sigma space ComfyUI samples in.

The paper says DDIM, but the official inference code ran Stable Diffusion 1.5's default scheduler, diffusers'
PNDMScheduler as PLMS (`skip_prk_steps=True`, `steps_offset=1`, `set_alpha_to_one=False`, "leading" spacing,
scaled-linear betas 0.00085..0.012 over 1000 training steps). Written again here from its definition:

- Timesteps: t_k = k * (1000 // T) + 1 for k = 0 .. T-1, run from the largest (981, 961, ..., 1 at T = 50).
- Each step moves the sample from t to the next level t' with an epsilon e by PNDM's transfer, which is
  DDIM's deterministic update. In ComfyUI's variable x = x_vp * sqrt(1 + sigma^2), sigma^2 = (1 - a)/a for
  alpha_bar a, that update is x' = x + (sigma' - sigma) * e.
- e is the linear multistep combination of the epsilons so far (Adams-Bashforth): e_0; then
  (3 e_n - e_{n-1}) / 2, (23 e_n - 16 e_{n-1} + 5 e_{n-2}) / 12, and
  (55 e_n - 59 e_{n-1} + 37 e_{n-2} - 9 e_{n-3}) / 24 from the fourth on.
- The first step is warmed up with a second evaluation at the next level: e_0 moves x to the next level,
  the model is evaluated there (e_1), and the step is redone from the start with (e_0 + e_1) / 2. e_1 does
  not join the history. So T steps cost T + 1 evaluations (51 at 50 steps; 961 is evaluated twice).
- The last step (t = 1) goes to alpha_bar = alphas_cumprod[0], not to 1 (`set_alpha_to_one=False`): the
  result keeps the noise of the lowest training level, sigma_min, and it is the VP sample x_vp, which
  ComfyUI's latent at sigma 0 equals. That is what the sampler returns.
- PNDM's initial noise sigma is 1: the first sample is x_vp = noise, i.e. x = noise * sqrt(1 + sigma_0^2).
  The sampler gets its x scaled so from the caller (ComfyUI's "max denoise" noise scaling).

Plain PyTorch: `sample_pndm` has the call signature of ComfyUI's k-diffusion samplers, and
`pndm_sigmas` builds the official timestep grid from a model's sigma table.
"""

from __future__ import annotations

from typing import Callable

import torch

TRAIN_TIMESTEPS = 1000
STEPS_OFFSET = 1
# Adams-Bashforth weights by the number of epsilons available, newest first, as PLMS uses them.
MULTISTEP_WEIGHTS = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def pndm_timesteps(steps: int, train_timesteps: int = TRAIN_TIMESTEPS) -> list[int]:
    """The official run's timesteps, largest first: 981, 961, ..., 1 for 50 steps ("leading" spacing)."""
    if not 1 <= steps <= train_timesteps:
        raise ValueError(f"PNDM needs between 1 and {train_timesteps} steps, got {steps}")
    ratio = train_timesteps // steps
    return [k * ratio + STEPS_OFFSET for k in reversed(range(steps))]


def pndm_sigmas(sigma_table: torch.Tensor, steps: int) -> torch.Tensor:
    """The sigma schedule of the official timesteps from a model's per-timestep sigma table
    (ComfyUI's model_sampling.sigmas), ending in 0 as ComfyUI schedules do."""
    levels = sigma_table[torch.tensor(pndm_timesteps(steps, len(sigma_table)))]
    return torch.cat([levels.float(), levels.new_zeros(1).float()])


def multistep_epsilon(history: list[torch.Tensor]) -> torch.Tensor:
    """PLMS's combination of the last (up to four) epsilons, newest last in `history`."""
    recent = history[-4:][::-1]
    weights = MULTISTEP_WEIGHTS[len(recent)]
    combined = weights[0] * recent[0]
    for weight, epsilon in zip(weights[1:], recent[1:]):
        combined = combined + weight * epsilon
    return combined


@torch.no_grad()
def sample_pndm(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                callback: Callable | None = None, disable: bool | None = None, final_sigma: float | None = None) -> torch.Tensor:
    """PLMS over `sigmas` (descending, ending in 0) with `model(x, sigma, **extra_args) -> denoised`.

    `final_sigma`: where the step to sigma 0 lands instead (the official run's alphas_cumprod[0] level,
    ComfyUI's sigma_min); the sample there is returned as the VP sample, which is ComfyUI's latent at
    sigma 0. None lands on 0 itself. `disable` is accepted for the samplers' common signature (there is no
    console progress bar here; progress goes through `callback`).
    """
    extra_args = {} if extra_args is None else extra_args
    ones = x.new_ones([x.shape[0]])
    history: list[torch.Tensor] = []

    def epsilon(sample, sigma):
        denoised = model(sample, sigma * ones, **extra_args)
        return (sample - denoised) / sigma, denoised

    steps = len(sigmas) - 1
    for i in range(steps):
        sigma, next_sigma = sigmas[i], sigmas[i + 1]
        target = next_sigma if next_sigma > 0 or final_sigma is None else next_sigma.new_tensor(final_sigma)
        current, denoised = epsilon(x, sigma)
        history.append(current)
        step_epsilon = multistep_epsilon(history)
        if i == 0 and steps > 1:
            # Warm-up: a trial step to the next level, evaluated there, and the step redone with the mean.
            warmup, _ = epsilon(x + (target - sigma) * current, target)
            step_epsilon = (current + warmup) / 2
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        x = x + (target - sigma) * step_epsilon
        if next_sigma == 0 and final_sigma is not None:
            x = x / (1 + final_sigma ** 2) ** 0.5
    return x
