"""Sampling nodes: the KSampler-like SNF Sampler and the same collaboration as a GUIDER."""

from __future__ import annotations

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
from comfy_api.latest import io

from ..facediffuser_core import snf
from ..facediffuser_core.schedule import denoise_schedule
from . import legacy_inputs, official_run
from . import regions as region_inputs
from .snf_guider import SNFGuider
from .types import Saliency

def model_and_conditioning_inputs() -> list:
    return [
        io.Model.Input("tdm", tooltip="The text-driven model (Face-diffuser TDM Loader): builds the scene from the text."),
        io.Model.Input("sdm", tooltip="The subject-augmented model (Face-diffuser SDM Loader): paints the people."),
        io.Conditioning.Input(
            "augmented", tooltip="The prompt with the faces fused in (Face-diffuser Subject Prompt, 'augmented'): the SDM's positive."
        ),
        io.Conditioning.Input(
            "text",
            tooltip="The same prompt without faces (Face-diffuser Subject Prompt, 'text'): the TDM's positive and the SDM's negative.",
        ),
        io.Conditioning.Input("null", tooltip="The empty prompt (CLIP Text Encode of \"\" with the SDM's CLIP): the TDM's negative."),
    ]


def _cfg_input():
    return io.Float.Input("cfg", default=5.0, min=0.0, max=100.0, step=0.1, round=0.01,
                          tooltip="Guidance scale for both models (the official setting is 5.0).")


def schedule_inputs() -> list:
    """steps, cfg, sampler and scheduler, as in KSampler (also the Stage Sweep's)."""
    return [
        io.Int.Input("steps", default=50, min=1, max=10000, tooltip="Sampling steps (the official setting is 50)."),
        _cfg_input(),
        io.Combo.Input("sampler_name", options=[*comfy.samplers.SAMPLER_NAMES, official_run.PNDM], default="ddim",
                       tooltip="ComfyUI sampler. 'ddim' with the 'ddim_uniform' scheduler is the paper's DDIM sampling; "
                               "'pndm_official' is the PNDM (PLMS) sampler the official code ran."),
        io.Combo.Input("scheduler", options=[*comfy.samplers.SCHEDULER_NAMES, official_run.PNDM], default="ddim_uniform",
                       tooltip="'pndm_official' is the official run's timestep grid (981, 961, ..., 1 at 50 steps)."),
    ]


def noise_and_denoise_inputs(denoise_tooltip: str) -> list:
    """The last two inputs of the SNF Sampler and the Stage Sweep. Optional: workflows saved before `noise` existed
    lack it and must keep running as they did. Both optional and in this order, because the frontend fills a saved
    UI workflow's widgets by position, required ones first: the widget order stays the one shipped since `noise`
    was added (legacy_inputs.legacy_noise_and_denoise reads the older order)."""
    return [
        io.Combo.Input("noise", options=list(official_run.NOISE_CHOICES), default="comfyui", optional=True,
                       tooltip=official_run.NOISE_TOOLTIP),
        io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01, optional=True, tooltip=denoise_tooltip),
    ]


def _stage_inputs() -> list:
    return [
        io.Float.Input(
            "alpha", default=0.3, min=0.0, max=1.0, step=0.01,
            tooltip="End of scene construction as a fraction of the steps: the first round(alpha*steps) steps use only the TDM. "
                    "Higher keeps more of the text-driven layout. The official demo's 15/30 split at 50 steps is alpha 0.32 with "
                    "ddim (and other one-evaluation samplers), alpha 0.3 with pndm_official (whose first step counts twice).",
        ),
        io.Float.Input(
            "beta", default=0.6, min=0.0, max=1.0, step=0.01,
            tooltip="End of the fusion stage as a fraction of the steps (beta >= alpha): after round(beta*steps) steps only the SDM "
                    "paints. Lower hands over to the SDM earlier, for more identity. The official 15/30 split is beta 0.62 with "
                    "ddim, beta 0.6 with pndm_official.",
        ),
    ]


def _build_guider(node: str, tdm, sdm, augmented, text, null, cfg, alpha, beta, schedule=None, masks=None,
                  outside_regions: str = "snf", auto_regions=None) -> SNFGuider:
    regions = region_inputs.sampling_regions(node, augmented, masks, outside_regions, auto_regions)
    try:
        guider = SNFGuider(sdm, tdm, cfg, alpha, beta, schedule=schedule, node=node, regions=regions)
        guider.set_conds(augmented, text, null)
    except ValueError as error:
        raise ValueError(f"{node}: {error}") from error
    return guider


class FaceDiffuserSNFSampler(io.ComfyNode):
    DISPLAY = "Face-diffuser SNF Sampler"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FaceDiffuserSNFSampler",
            display_name=cls.DISPLAY,
            category="facediffuser/sampling",
            description=(
                "Samples with both Face-diffuser models in three stages: scene construction (TDM, text vs empty prompt), "
                "subject-scene fusion (both models, each latent pixel taken from the model whose guidance is more salient), "
                "and subject enhancement (SDM, augmented vs text prompt). Costs 2 UNet evaluations per step outside the "
                "fusion stage and 4 inside it."
            ),
            inputs=[
                *model_and_conditioning_inputs(),
                io.Latent.Input("latent_image"),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="The random seed of the initial noise."),
                *schedule_inputs(),
                *_stage_inputs(),
                *noise_and_denoise_inputs("Below 1, only the last steps of a longer schedule run (img2img); alpha and beta stay "
                                          "on the longer schedule's steps. 0 returns the latent unchanged, as KSampler does."),
                *region_inputs.inputs(),
            ],
            outputs=[
                io.Latent.Output(),
                Saliency.Output("saliency", tooltip="Both models' saliency maps and the per-pixel choice at every fusion step, "
                                                    "for the Face-diffuser Saliency Preview."),
            ],
        )

    @classmethod
    def validate_inputs(cls, noise="comfyui") -> bool | str:
        return legacy_inputs.check_noise(noise)

    @classmethod
    def execute(cls, tdm, sdm, augmented, text, null, latent_image, seed, steps, cfg, sampler_name, scheduler, alpha, beta,
                noise="comfyui", denoise=1.0, regions=None, outside_regions="snf", auto_regions=None) -> io.NodeOutput:
        noise, denoise = legacy_inputs.legacy_noise_and_denoise(cls.DISPLAY, noise, denoise)
        return io.NodeOutput(*snf_sample(cls.DISPLAY, tdm, sdm, augmented, text, null, latent_image, seed, steps, cfg,
                                         sampler_name, scheduler, alpha, beta, denoise, noise_kind=noise,
                                         masks=regions, outside_regions=outside_regions, auto_regions=auto_regions))


def sampling_schedule(node: str, model, steps: int, sampler_name: str, scheduler: str, denoise: float):
    """The sigmas a run samples and the whole schedule they are the tail of (schedule.denoise_schedule; samplers
    that drop the penultimate sigma as in KSampler). The stages are fractions of the whole schedule, which some
    schedulers make longer than asked (ddim_uniform gives 31 steps for 30). Errors name `node`."""
    if scheduler == official_run.PNDM:
        return official_run.pndm_denoise_schedule(node, model, steps, denoise, sampler_name)
    return denoise_schedule(lambda n: comfy.samplers.KSampler(model, steps=n, device=model.load_device, sampler=sampler_name,
                                                              scheduler=scheduler).sigmas, steps, denoise)


def snf_sample(node: str, tdm, sdm, augmented, text, null, latent_image: dict, seed: int, steps: int, cfg: float,
               sampler_name: str, scheduler: str, alpha: float, beta: float, denoise: float, noise_kind: str = "comfyui",
               masks=None, outside_regions: str = "snf", auto_regions=None):
    """KSampler's procedure with the SNF guider: the sampled LATENT and the run's saliency record (on the CPU).
    Errors name `node`, the node that asked for the sampling."""
    latent = latent_image["samples"]
    latent = comfy.sample.fix_empty_latent_channels(sdm, latent, latent_image.get("downscale_ratio_spacial", None))
    noise = official_run.initial_noise(noise_kind, latent, seed, latent_image.get("batch_index"))
    sigmas, schedule = sampling_schedule(node, sdm, steps, sampler_name, scheduler, denoise)
    out = latent_image.copy()
    out.pop("downscale_ratio_spacial", None)
    if len(sigmas) == 0:  # denoise 0: KSampler returns the latent unchanged
        out["samples"] = latent
        return out, snf.SaliencyRecord()
    guider = _build_guider(node, tdm, sdm, augmented, text, null, cfg, alpha, beta, schedule=schedule, masks=masks,
                           outside_regions=outside_regions, auto_regions=auto_regions)

    callback = latent_preview.prepare_callback(guider.model_patcher, sigmas.shape[-1] - 1)
    samples = guider.sample(
        noise, latent, official_run.sampler_object(sampler_name), sigmas,
        denoise_mask=latent_image.get("noise_mask"), callback=callback,
        disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed,
    )
    out["samples"] = samples.to(device=comfy.model_management.intermediate_device(), dtype=comfy.model_management.intermediate_dtype())
    return out, guider.saliency.to("cpu")


class FaceDiffuserGuider(io.ComfyNode):
    DISPLAY = "Face-diffuser Guider"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FaceDiffuserGuider",
            display_name=cls.DISPLAY,
            category="facediffuser/sampling",
            description=(
                "The Face-diffuser three-stage collaboration as a GUIDER for SamplerCustomAdvanced, so that any sampler "
                "and sigma schedule can be used. alpha and beta are fractions of the sigmas the sampler is given, or of the "
                "'schedule' input when the sampler gets only part of a schedule (SplitSigmas halves run by two samplers). "
                "The saliency output is filled when the sampling runs: connect the decoded image to the Saliency Preview "
                "too, so that the preview runs after the sampler."
            ),
            inputs=[
                *model_and_conditioning_inputs(), _cfg_input(), *_stage_inputs(),
                io.Sigmas.Input(
                    "schedule", optional=True,
                    tooltip="The whole sigma schedule when the sampler gets only part of it (e.g. BasicScheduler's output, "
                            "before SplitSigmas): alpha and beta are then fractions of its steps and every part is placed on "
                            "them: each step runs its stage of the whole, and two SamplerCustomAdvanced runs of the halves "
                            "equal one run of the whole with samplers that keep no history between steps (euler, ddim, ...; "
                            "multistep ones such as dpmpp_2m restart at the split). Leave unconnected when the sampler gets "
                            "the whole schedule.",
                ),
                *region_inputs.inputs(),
            ],
            outputs=[
                io.Guider.Output(),
                Saliency.Output("saliency", tooltip="Filled by the sampler that uses this guider, at its latest run."),
            ],
        )

    @classmethod
    def execute(cls, tdm, sdm, augmented, text, null, cfg, alpha, beta, schedule=None, regions=None,
                outside_regions="snf", auto_regions=None) -> io.NodeOutput:
        guider = _build_guider(cls.DISPLAY, tdm, sdm, augmented, text, null, cfg, alpha, beta, schedule=schedule, masks=regions,
                               outside_regions=outside_regions, auto_regions=auto_regions)
        return io.NodeOutput(guider, guider.saliency)


NODES = [FaceDiffuserSNFSampler, FaceDiffuserGuider]
