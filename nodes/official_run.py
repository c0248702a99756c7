"""The official run's sampling pieces for ComfyUI: the PNDM (PLMS) sampler, its timestep grid and the
official initial noise, as choices of the SNF Sampler and as SAMPLER / SIGMAS / NOISE nodes for
SamplerCustomAdvanced. The sampler itself is facediffuser_core.pndm."""

from __future__ import annotations

import math

import comfy.model_management
import comfy.sample
import comfy.samplers
import torch
from comfy_api.latest import io

from ..facediffuser_core import pndm
from ..facediffuser_core.schedule import denoise_schedule

PNDM = "pndm_official"
NOISE_CHOICES = ("comfyui", "official")
NOISE_TOOLTIP = (
    "comfyui: ComfyUI's noise, drawn on the CPU from the seed (the same on every machine). official: the official "
    "Face-diffuser script's initial latent, the first float16 draw from the seeded generator of the device ComfyUI "
    "samples on (CUDA on an NVIDIA GPU); on a CPU that is ComfyUI's noise rounded to float16 (for latents of a multiple "
    "of 16 values). With pndm_official as sampler and scheduler and the official settings, the same seed then gives the "
    "official picture on the same kind of device, to float16 precision: the official script ran its UNets and steps "
    "in float16 too."
)


class PNDMSampler(comfy.samplers.KSAMPLER):
    """diffusers' PNDMScheduler (PLMS, as the official run used it) as a ComfyUI sampler object."""

    def __init__(self):
        super().__init__(self._sample_official)

    @staticmethod
    def _sample_official(model, x, sigmas, extra_args=None, callback=None, disable=None):
        # model is ComfyUI's inpainting wrapper around the guider, whose inner model holds the sigma table.
        sigma_min = float(model.inner_model.inner_model.model_sampling.sigma_min)
        return pndm.sample_pndm(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable, final_sigma=sigma_min)

    def max_denoise(self, model_wrap, sigmas):
        """PNDM starts from pure noise (its initial noise sigma is 1), which is ComfyUI's "max denoise" noise
        scaling, when it runs a whole PNDM grid (which starts below ComfyUI's sigma_max, at t = 981 for 50
        steps); a tail of a longer grid (denoise < 1) noises the latent as any ComfyUI sampler does."""
        if len(sigmas) - 1 > pndm.TRAIN_TIMESTEPS:  # longer than any PNDM grid (one step per training timestep)
            return super().max_denoise(model_wrap, sigmas)
        whole = pndm.pndm_sigmas(model_wrap.inner_model.model_sampling.sigmas, len(sigmas) - 1)
        return math.isclose(float(sigmas[0]), float(whole[0]), rel_tol=1e-5) or super().max_denoise(model_wrap, sigmas)


def sampler_object(name: str):
    return PNDMSampler() if name == PNDM else comfy.samplers.sampler_object(name)


def pndm_schedule(model, steps: int, sampler_name: str | None = None) -> torch.Tensor:
    """The official timestep grid as sigmas, with KSampler's adjustment for samplers that drop the
    penultimate sigma (dpm_2, uni_pc, ...)."""
    discard = sampler_name in comfy.samplers.KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS
    sigmas = pndm.pndm_sigmas(model.get_model_object("model_sampling").sigmas, steps + discard)
    return torch.cat([sigmas[:-2], sigmas[-1:]]) if discard else sigmas


def pndm_denoise_schedule(node: str, model, steps: int, denoise: float, sampler_name: str | None = None):
    """schedule.denoise_schedule on the official grid, whose at most one step per training timestep is said
    naming the node and the inputs that asked for more."""
    try:
        return denoise_schedule(lambda n: pndm_schedule(model, n, sampler_name), steps, denoise)
    except ValueError as error:
        asked = f"steps {steps}" + ("" if denoise > 0.9999 else f" at denoise {denoise:g}")
        raise ValueError(f"{node}: the {PNDM} scheduler has one step per training timestep, at most {pndm.TRAIN_TIMESTEPS} in "
                         f"all, and {asked} asks for more ({error}). Lower steps" + ("" if denoise > 0.9999 else ", raise denoise")
                         + " or choose another scheduler") from error


# The official script runs under fp16 mixed precision and draws its initial latent in float16 (SPEC.md, Precision).
OFFICIAL_NOISE_DTYPE = torch.float16


def official_noise(latent: torch.Tensor, seed: int, batch_index=None) -> torch.Tensor:
    """diffusers' randn_tensor without a generator after accelerate's set_seed(seed): the first float16 draw
    of the sampling device's seeded generator, for the whole batch at once (returned on the CPU)."""
    device = comfy.model_management.get_torch_device()
    batch = latent.shape[0] if batch_index is None else max(batch_index) + 1
    generator = torch.Generator(device=device).manual_seed(seed)
    noise = torch.randn((batch, *latent.shape[1:]), generator=generator, device=device, dtype=OFFICIAL_NOISE_DTYPE).cpu()
    if batch_index is not None:
        noise = noise[list(batch_index)]
    return noise.to(latent.dtype)


def initial_noise(kind: str, latent: torch.Tensor, seed: int, batch_index=None) -> torch.Tensor:
    if kind == "official":
        return official_noise(latent, seed, batch_index)
    return comfy.sample.prepare_noise(latent, seed, batch_index)


class OfficialNoise:
    """A NOISE for SamplerCustomAdvanced (the interface of ComfyUI's RandomNoise)."""

    def __init__(self, seed: int):
        self.seed = seed

    def generate_noise(self, input_latent: dict) -> torch.Tensor:
        return official_noise(input_latent["samples"], self.seed, input_latent.get("batch_index"))


class FaceDiffuserPNDMSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FaceDiffuserPNDMSampler",
            display_name="Face-diffuser PNDM Sampler (official)",
            category="facediffuser/sampling",
            description=(
                "The sampler the official Face-diffuser code ran: diffusers' PNDMScheduler as PLMS, step for step (its "
                "first step evaluated twice, 51 evaluations for 50 steps; its last step landing on the lowest training "
                "noise level). Use it with Face-diffuser PNDM Schedule and Face-diffuser Official Noise."
            ),
            inputs=[],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        return io.NodeOutput(PNDMSampler())


class FaceDiffuserPNDMSchedule(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FaceDiffuserPNDMSchedule",
            display_name="Face-diffuser PNDM Schedule (official)",
            category="facediffuser/sampling",
            description=(
                "The official run's timesteps as sigmas: t = k * (1000 // steps) + 1, largest first (981, 961, ..., 1 "
                "for 50 steps), then 0. denoise below 1 keeps the last steps of a longer grid, as BasicScheduler does."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The SDM or TDM (both SD1.5): its noise levels."),
                io.Int.Input("steps", default=50, min=1, max=1000, tooltip="The official run uses 50."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01),
            ],
            outputs=[io.Sigmas.Output()],
        )

    @classmethod
    def execute(cls, model, steps: int, denoise: float) -> io.NodeOutput:
        sigmas, _ = pndm_denoise_schedule("Face-diffuser PNDM Schedule (official)", model, steps, denoise)
        return io.NodeOutput(sigmas)


class FaceDiffuserOfficialNoise(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FaceDiffuserOfficialNoise",
            display_name="Face-diffuser Official Noise",
            category="facediffuser/sampling",
            description=NOISE_TOOLTIP,
            inputs=[io.Int.Input("noise_seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True)],
            outputs=[io.Noise.Output()],
        )

    @classmethod
    def execute(cls, noise_seed: int) -> io.NodeOutput:
        return io.NodeOutput(OfficialNoise(noise_seed))


NODES = [FaceDiffuserPNDMSampler, FaceDiffuserPNDMSchedule, FaceDiffuserOfficialNoise]
