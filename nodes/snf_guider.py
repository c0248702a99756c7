"""Face-diffuser's three-stage, two-model sampling as a ComfyUI guider: the two models' sampling lifecycle.

The guider is ComfyUI's seam between a sampler and the model: the sampler asks it for a denoised
prediction at (x, sigma) and it decides which model(s) to run. The stages and SNF live in
facediffuser_core; the stage clock (nodes.stage_clock) places each evaluation in its stage, the fusion step
(nodes.fusion_step) runs both models and SNF, the regions (nodes.regions) scope the SDM's attention.

Each model is a `ModelSide` (nodes.model_side): a CFGGuider of its own, holding that model's patcher, its two
conditionings and its model options. `SNFGuider` runs the phases of ComfyUI's CFGGuider.sample once for both
sides, each phase by one piece of code applied to every side, so that what core does for one model (hooks,
wrappers, patches, ControlNets, dynamic-VRAM delegates) reaches both:
- `sample`: per side, the conditionings' hook groups, a clone of the model options, the hook mode and
  `prepare_model_patcher`; the sides' OUTER_SAMPLE wrappers around the rest (the TDM's outermost).
- `outer_sample`: ONE `prepare_sampling` call (one `load_models_gpu`) for both models and everything their
  conditionings and hooks bring, the SDM patcher carrying the TDM as an additional model; per side option
  casts, `pre_run` and `cleanup`. CFGGuider.outer_sample does this for one model and cannot be reused as it is:
  the TDM's PREPARE_SAMPLING wrappers enclose the one load, and the TDM must be cleaned up once.
- `inner_sample`: per side `process_conds` and sampling options; the sides' SAMPLER_SAMPLE wrappers around
  one run of the sampler.
- `predict_noise`: the evaluation's noise level gives its stage; each side that runs goes through its own
  PREDICT_NOISE wrappers into core's `sampling_function` with its own conditionings and options.
What each extension point does with two models is listed in README.md ("Other nodes in your graph").
"""

from __future__ import annotations

import contextlib
import functools

import comfy.latent_formats
import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.sampler_helpers
import comfy.samplers
import torch

from ..facediffuser_core import snf
from ..facediffuser_core.schedule import Stage
from .fusion_step import fusion_step
from .guider_conditionings import check_width, share_controls
from .model_side import ModelSide
from .sampler_options import sampler_additions, with_additions
from .stage_clock import StageClock

WrappersMP = comfy.patcher_extension.WrappersMP

TDM_ATTACHMENT_KEY = "facediffuser_tdm"
# The key ComfyUI's MultiGPU nodes attach their per-device clones under (0.33 and newer).
MULTIGPU_KEY = "multigpu"


class SNFGuider(comfy.samplers.CFGGuider):
    """Scene construction with the TDM, SNF fusion of both models, subject enhancement with the SDM.

    Conditionings: the TDM guides text against null, the SDM augmented against text (its unconditional
    branch is the text prompt, so its guidance isolates the subject). `schedule`, when given, is the whole
    sigma schedule a run's sigmas are part of (a SplitSigmas half, a denoise tail): alpha and beta are
    fractions of its steps and evaluations are placed on it.
    """

    def __init__(self, sdm, tdm, cfg: float, alpha: float, beta: float, schedule: torch.Tensor | None = None,
                 node: str = "Face-diffuser Guider", regions=None):
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
            if patcher.get_additional_models_with_key(MULTIGPU_KEY):
                raise ValueError(
                    f"the '{name}' model carries MultiGPU clones; Face-diffuser runs its two models on one device: "
                    "remove the MultiGPU node from the model's path"
                )
        self.clock = StageClock(alpha, beta, schedule, node)
        self.tdm_side = ModelSide("tdm", tdm, cfg)
        self.sdm_side = ModelSide("sdm", sdm, cfg, regions)
        super().__init__(self.sdm_side.model_patcher)
        self.cfg = cfg
        self.node = node  # named by the errors sampling raises, where ComfyUI shows the sampler node's name
        self.saliency = snf.SaliencyRecord()
        # nodes.regions.SamplingRegions: the SDM's region attention, where fusion may take the SDM, and with auto
        # regions their finder, which decides them at the first evaluation after scene construction.
        self.regions = regions
        self._scene_prediction: torch.Tensor | None = None  # the TDM's latest, kept for auto regions' decision

    @property
    def sides(self) -> tuple[ModelSide, ModelSide]:
        """Both models, the TDM first: its wrappers enclose the SDM's wherever wrappers nest."""
        return self.tdm_side, self.sdm_side

    def set_conds(self, augmented, text, null):
        for name, conditioning, sides in (("augmented", augmented, ("sdm",)), ("text", text, ("tdm", "sdm")), ("null", null, ("tdm",))):
            for side in sides:
                check_width(name, conditioning, side, getattr(self, f"{side}_side").model_patcher)
        augmented, text, null = share_controls(augmented, text, null)
        self.tdm_side.set_conds(text, null)
        self.sdm_side.set_conds(augmented, text)
        # A side whose conditionings carry hooks may now hold its non-dynamic delegate.
        self.model_patcher = self.sdm_side.model_patcher
        self.model_options = self.sdm_side.model_options
        self.original_conds = self.sdm_side.original_conds

    def sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False, seed=None):
        if sigmas.shape[-1] == 0:
            return latent_image
        channels = self.model_patcher.model.latent_format.latent_channels
        if latent_image.is_nested or latent_image.dim() != 4 or latent_image.shape[1] != channels:
            shape = "a nested latent" if latent_image.is_nested else f"a latent of shape {tuple(latent_image.shape)}"
            raise ValueError(
                f"{self.node}: the latent is {shape}, but SD1.5 models take (batch, {channels}, height/8, width/8): make it with Empty Latent "
                "Image or VAE Encode with the Face-diffuser SDM's or TDM's VAE, not from another model family's workflow"
            )
        if denoise_mask is not None:
            denoise_mask = comfy.sampler_helpers.prepare_mask(denoise_mask, latent_image.shape, self.model_patcher.load_device).float()
        self.clock.place(sigmas)
        self.saliency.clear()  # in place: a Guider node handed this record out before sampling
        self._scene_prediction = None
        with contextlib.ExitStack() as stack:
            for side in self.sides:
                stack.enter_context(side.prepared())
            return self._through_wrappers(WrappersMP.OUTER_SAMPLE, self.sides, self.outer_sample, noise, latent_image, sampler,
                                          sigmas, denoise_mask, callback, disable_pbar, seed, latent_shapes=[latent_image.shape])

    def _through_wrappers(self, wrapper_type: str, sides, function, *args, **kwargs):
        """`function(*args)` inside each side's wrappers of this type, the first side's outermost; a side's
        wrappers see that side as their executor's class_obj, as CFGGuider's see the guider."""
        if not sides:
            return function(*args, **kwargs)
        side = sides[0]
        return comfy.patcher_extension.WrapperExecutor.new_class_executor(
            functools.partial(self._through_wrappers, wrapper_type, sides[1:], function),
            side,
            comfy.patcher_extension.get_all_wrappers(wrapper_type, side.model_options, is_model_options=True),
        ).execute(*args, **kwargs)

    def outer_sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False, seed=None, latent_shapes=None):
        tdm, sdm = self.tdm_side, self.sdm_side
        # One load request for everything: the SDM patcher carries the TDM and the models the TDM's hooks
        # register, the conditionings of both sides bring their ControlNets.
        self.model_patcher = sdm.model_patcher
        sdm.model_patcher.set_additional_models(
            TDM_ATTACHMENT_KEY, [tdm.model_patcher, *comfy.sampler_helpers.get_additional_models_from_model_options(tdm.model_options)])
        all_conds = {f"{side.name}_{kind}": conds for side in self.sides for kind, conds in side.conds.items()}
        _, _, loaded_models = self._through_wrappers(
            WrappersMP.PREPARE_SAMPLING, [tdm], comfy.sampler_helpers.prepare_sampling,
            sdm.model_patcher, noise.shape, all_conds, model_options=sdm.model_options)
        self.loaded_models = loaded_models  # as CFGGuider keeps them
        for side in self.sides:
            side.inner_model = side.model_patcher.model
        self.inner_model = sdm.inner_model
        device = sdm.model_patcher.load_device
        # cuda_device_context exists from ComfyUI 0.33 on, where CFGGuider enters it for the same reason.
        device_context = getattr(comfy.model_management, "cuda_device_context", lambda _: contextlib.nullcontext())
        with device_context(device):
            try:
                noise = noise.to(device=device, dtype=torch.float32)
                latent_image = latent_image.to(device=device, dtype=torch.float32)
                sigmas = self.clock.run_sigmas = sigmas.to(device)
                for side in self.sides:
                    comfy.samplers.cast_to_load_options(side.model_options, device=device, dtype=side.model_patcher.model_dtype())
                    side.model_patcher.pre_run()  # calc_cond_batch reaches each patcher through model.current_patcher
                output = self.inner_sample(noise, latent_image, device, sampler, sigmas, denoise_mask, callback, disable_pbar, seed, latent_shapes=latent_shapes)
            finally:
                for side in self.sides:
                    side.model_patcher.cleanup()
        # The TDM rode along as one of the loaded models and was cleaned up with its side above.
        comfy.sampler_helpers.cleanup_models(all_conds, [model for model in loaded_models if model is not tdm.model_patcher])
        for side in self.sides:
            del side.inner_model
        del self.inner_model, self.loaded_models
        return output

    def inner_sample(self, noise, latent_image, device, sampler, sigmas, denoise_mask, callback, disable_pbar, seed, latent_shapes=None):
        if latent_image is not None and torch.count_nonzero(latent_image) > 0:  # an empty latent is not shifted
            latent_image = self.inner_model.process_latent_in(latent_image)
        for side in self.sides:
            side.inner_model.latent_shapes = latent_shapes  # read by ComfyUI 0.33's models
            side.conds = comfy.samplers.process_conds(side.inner_model, noise, side.conds, device, latent_image, denoise_mask, seed, latent_shapes=latent_shapes)
            # Read after the OUTER_SAMPLE wrappers, which may have replaced the side's options (EasyCache does).
            side.sampling_options = comfy.model_patcher.create_model_options_clone(side.model_options)
            side.sampling_options.setdefault("transformer_options", {})["sample_sigmas"] = sigmas
        if self.regions is not None:
            self.regions.start_run(noise.shape, self.sdm_side.conds.get("positive", []))
        samples = self._sampler_run(0, sampler, seed, self, sigmas, None, callback, noise, latent_image, denoise_mask, disable_pbar)
        return self.inner_model.process_latent_out(samples.to(torch.float32))

    def _sampler_run(self, index, sampler, seed, _guider, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar):
        """The sampler's run inside each side's SAMPLER_SAMPLE wrappers. A side's wrappers get that side as
        the guider and its sampling options in extra_args, and may change them or the noise (context
        windows' FreeNoise does); the sampler then gets this guider and the SDM's options."""
        if index > 0:
            self.sides[index - 1].sampling_options = extra_args["model_options"]
        if index == len(self.sides):
            # Samplers pass these options back with each evaluation; what they add is given to each side.
            self.sampler_options = dict(self.sdm_side.sampling_options)
            if any("denoise_mask_function" in side.sampling_options for side in self.sides):
                self.sampler_options["denoise_mask_function"] = self._denoise_mask
            self.clock.start(sampler, sigmas)
            samples = sampler.sample(self, sigmas, {"model_options": self.sampler_options, "seed": seed}, callback,
                                     noise, latent_image, denoise_mask, disable_pbar)
            self.clock.check(sampler)
            return samples
        side = self.sides[index]
        return comfy.patcher_extension.WrapperExecutor.new_class_executor(
            functools.partial(self._sampler_run, index + 1, sampler, seed),
            sampler,
            comfy.patcher_extension.get_all_wrappers(WrappersMP.SAMPLER_SAMPLE, side.sampling_options, is_model_options=True),
        ).execute(side, sigmas, {"model_options": side.sampling_options, "seed": seed}, callback, noise, latent_image, denoise_mask, disable_pbar)

    def _denoise_mask(self, sigma, denoise_mask, extra_options):
        """A model's denoise-mask function (Differential Diffusion) shapes the mask of the evaluations in its
        stages; in the fusion stage both models denoise one x, with the SDM's. A function on one model only
        acts in every stage."""
        _, stage = self.clock.stage_of(sigma)
        order = (self.tdm_side, self.sdm_side) if stage is Stage.SCENE else (self.sdm_side, self.tdm_side)
        for side in order:
            function = side.sampling_options.get("denoise_mask_function")
            if function is not None:
                return function(sigma, denoise_mask, extra_options)
        return denoise_mask

    def outer_predict_noise(self, x, timestep, model_options={}, seed=None):
        # Each side's PREDICT_NOISE wrappers wrap that side's own prediction (ModelSide.predict).
        return self.predict_noise(x, timestep, model_options, seed)

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        comfy.model_management.throw_exception_if_processing_interrupted()
        step, stage = self.clock.evaluation(timestep)
        # Samplers that change nothing pass the very options they were given: nothing to add then.
        additions = {} if model_options is self.sampler_options else sampler_additions(self.sampler_options, model_options)
        finder = None if self.regions is None else self.regions.finder
        if stage is Stage.SCENE:
            scene = self.tdm_side.predict(x, timestep, with_additions(self.tdm_side.sampling_options, additions), seed)
            if finder is not None:
                self._scene_prediction = scene
            return scene
        if finder is not None and not finder.decided:
            prediction, self._scene_prediction = self._scene_prediction, None
            self.saliency.regions = finder.decide_from_scene(prediction, self.inner_model, [self.model_patcher, *self.loaded_models])
        if stage is Stage.SUBJECT:
            return self.sdm_side.predict(x, timestep, with_additions(self.sdm_side.sampling_options, additions), seed)
        return fusion_step(self.sides, x, timestep, model_options, additions, seed, self.cfg, step, self.saliency,
                           None if self.regions is None else self.regions.fusion)
