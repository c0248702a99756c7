"""Face-diffuser's three-stage, two-model sampling as a ComfyUI guider (a CFGGuider subclass).

The guider is ComfyUI's seam between a sampler and the model: the sampler asks it for a denoised
prediction at (x, sigma) and it decides which model(s) to run. Face-diffuser's stages and SNF fusion
live in facediffuser_core; this module wires them to ComfyUI's model management:

- The SDM is the guider's own model patcher (a clone), with the TDM attached as an additional model,
  so `prepare_sampling` loads both in ONE `load_models_gpu` call and neither evicts the other between
  stages.
- The TDM keeps its own model_options (its attention patches, cfg functions, wrappers), its own
  processed conditionings and its own pre_run/cleanup, so patches applied to either model act on it.
"""

from __future__ import annotations

import comfy.latent_formats
import comfy.model_management
import comfy.model_patcher
import comfy.sampler_helpers
import comfy.samplers
import torch

from ..facediffuser_core import snf
from ..facediffuser_core.schedule import Stage, StageSchedule, StepLocator

TDM_ATTACHMENT_KEY = "facediffuser_tdm"


def _check_width(input_name: str, conditioning, model_name: str, patcher) -> None:
    """A conditioning from another model family (an SDXL CLIP, say) fails deep in the UNet otherwise."""
    expected = patcher.model.model_config.unet_config.get("context_dim")
    for tensor, _ in conditioning:
        if expected is not None and tensor.shape[-1] != expected:
            raise ValueError(
                f"the '{input_name}' conditioning is {tensor.shape[-1]} wide but the {model_name.upper()} takes {expected}: "
                "encode all three prompts with the CLIP of the Face-diffuser SDM Loader"
            )


class SNFGuider(comfy.samplers.CFGGuider):
    """Scene construction with the TDM, SNF fusion of both models, subject enhancement with the SDM.

    Conditionings: the TDM guides text against null, the SDM augmented against text (its unconditional
    branch is the text prompt, so its guidance isolates the subject).
    """

    def __init__(self, sdm, tdm, cfg: float, alpha: float, beta: float, step_offset: int = 0, total_steps: int | None = None):
        if tdm.model is sdm.model:
            raise ValueError(
                "the 'tdm' and 'sdm' inputs are the same model (or clones of it). Connect the TDM from the Face-diffuser "
                "TDM Loader and the SDM from the Face-diffuser SDM Loader; one UNet cannot hold both models' weights at once."
            )
        for name, patcher in (("tdm", tdm), ("sdm", sdm)):
            latent_format = type(patcher.model.latent_format)
            if not issubclass(latent_format, comfy.latent_formats.SD15):
                raise ValueError(
                    f"the '{name}' input is a {type(patcher.model).__name__} model with {latent_format.__name__} latents; "
                    "Face-diffuser's TDM and SDM are Stable Diffusion 1.5 models: connect the MODEL outputs of the "
                    "Face-diffuser TDM and SDM Loaders"
                )
        StageSchedule.from_fractions(alpha, beta, 1)  # reject bad fractions when the graph is built
        sdm = sdm.clone()
        sdm.set_additional_models(TDM_ATTACHMENT_KEY, [tdm])
        super().__init__(sdm)
        self.tdm = tdm
        self.cfg = cfg
        self.alpha = alpha
        self.beta = beta
        self.step_offset = step_offset
        self.total_steps = total_steps
        self.saliency = snf.SaliencyRecord()
        self.tdm_original_conds: dict[str, list] = {}

    def set_conds(self, augmented, text, null):
        for name, conditioning, models in (("augmented", augmented, ("sdm",)), ("text", text, ("tdm", "sdm")), ("null", null, ("tdm",))):
            for model_name in models:
                _check_width(name, conditioning, model_name, self.tdm if model_name == "tdm" else self.model_patcher)
        self.inner_set_conds({"positive": augmented, "negative": text})
        self.tdm_original_conds = {
            "positive": comfy.sampler_helpers.convert_cond(text),
            "negative": comfy.sampler_helpers.convert_cond(null),
        }

    def inner_sample(self, noise, latent_image, device, sampler, sigmas, denoise_mask, callback, disable_pbar, seed, latent_shapes=None):
        local_steps = len(sigmas) - 1
        total_steps = self.total_steps if self.total_steps is not None else self.step_offset + local_steps
        self.schedule = StageSchedule.from_fractions(self.alpha, self.beta, total_steps)
        # One host copy of the schedule per run; every evaluation is then placed without touching it.
        self.locator = StepLocator(sigmas.tolist(), self.step_offset)
        self.saliency.clear()  # in place: a Guider node handed this record out before sampling

        self.tdm_model_options = comfy.model_patcher.create_model_options_clone(self.tdm.model_options)
        self.tdm_model_options.setdefault("transformer_options", {})["sample_sigmas"] = sigmas
        tdm_conds = {k: [c.copy() for c in v] for k, v in self.tdm_original_conds.items()}
        comfy.sampler_helpers.prepare_model_patcher(self.tdm, tdm_conds, self.tdm_model_options)
        # Only inpainting-style models read the latent in their conds; match what CFGGuider gives the SDM.
        conds_latent = latent_image
        if latent_image is not None and torch.count_nonzero(latent_image) > 0:
            conds_latent = self.tdm.model.process_latent_in(latent_image)
        self.tdm_conds = comfy.samplers.process_conds(
            self.tdm.model, noise, tdm_conds, device, conds_latent, denoise_mask, seed, latent_shapes=latent_shapes
        )
        comfy.samplers.cast_to_load_options(self.tdm_model_options, device=device, dtype=self.tdm.model_dtype())
        self.tdm.pre_run()  # calc_cond_batch reaches the patcher through model.current_patcher, set here
        try:
            return super().inner_sample(
                noise, latent_image, device, sampler, sigmas, denoise_mask, callback, disable_pbar, seed, latent_shapes=latent_shapes
            )
        finally:
            self.tdm.cleanup()
            comfy.samplers.cast_to_load_options(self.tdm_model_options, device=self.tdm.offload_device)
            self.tdm.restore_hook_patches()
            del self.tdm_conds

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        comfy.model_management.throw_exception_if_processing_interrupted()
        # The one host read of an evaluation: which models to run is a Python decision.
        step = self.locator.step_for(float(timestep[0]))
        stage = self.schedule.stage_at(step)
        if stage is Stage.SCENE:
            return comfy.samplers.sampling_function(
                self.tdm.model, x, timestep, self.tdm_conds["negative"], self.tdm_conds["positive"], self.cfg,
                model_options=self._tdm_options(model_options), seed=seed,
            )
        if stage is Stage.SUBJECT:
            return comfy.samplers.sampling_function(
                self.inner_model, x, timestep, self.conds["negative"], self.conds["positive"], self.cfg,
                model_options=model_options, seed=seed,
            )
        tdm_prediction, tdm_guidance = self._guided(self.tdm.model, self.tdm_conds, x, timestep, self._tdm_options(model_options))
        sdm_prediction, sdm_guidance = self._guided(self.inner_model, self.conds, x, timestep, model_options)
        decision = snf.decide(tdm_guidance, sdm_guidance)
        self.saliency.add(step, decision)
        return snf.fuse(tdm_prediction, sdm_prediction, decision)

    def _guided(self, model, conds, x, timestep, model_options):
        """One model's guided denoised prediction and its guidance response in epsilon space.

        This is comfy.samplers.sampling_function, opened up because SNF needs the raw cond and uncond
        predictions as well as the guided one.
        """
        cond, uncond = conds["positive"], conds["negative"]
        out = comfy.samplers.calc_cond_batch(model, [cond, uncond], x, timestep, model_options)
        for fn in model_options.get("sampler_pre_cfg_function", []):
            out = fn({"conds": [cond, uncond], "conds_out": out, "cond_scale": self.cfg, "timestep": timestep,
                      "input": x, "sigma": timestep, "model": model, "model_options": model_options})
        guided = comfy.samplers.cfg_function(model, out[0], out[1], self.cfg, x, timestep, model_options=model_options, cond=cond, uncond=uncond)
        # For epsilon models denoised = x - sigma * eps. SNF's softmax is not scale-invariant, so the
        # saliency must see epsilon, not denoised.
        sigma = timestep.reshape(-1, *([1] * (x.dim() - 1)))
        guidance = snf.guidance_response(cond_eps=(x - out[0]) / sigma, uncond_eps=(x - out[1]) / sigma, cfg=self.cfg)
        return guided, guidance

    def _tdm_options(self, sampler_options: dict) -> dict:
        """The TDM's options plus the post-cfg hooks the sampler itself added for this run.

        cfg++ samplers (euler_cfg_pp, res_multistep_cfg_pp, ...) add a post-cfg function to the options
        they pass down and read back the unconditional prediction it captures; without it they fail in
        the TDM-only stage. In the fusion stage the SDM runs last, so they see the SDM's.
        """
        own = self.model_options.get("sampler_post_cfg_function", [])
        added = [fn for fn in sampler_options.get("sampler_post_cfg_function", []) if fn not in own]
        if not added:
            return self.tdm_model_options
        options = self.tdm_model_options.copy()
        options["sampler_post_cfg_function"] = options.get("sampler_post_cfg_function", []) + added
        return options
