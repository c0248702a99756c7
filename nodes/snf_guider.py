"""Face-diffuser's three-stage, two-model sampling as a ComfyUI guider.

The guider is ComfyUI's seam between a sampler and the model: the sampler asks it for a denoised
prediction at (x, sigma) and it decides which model(s) to run. The stages and SNF live in
facediffuser_core; this module wires them to ComfyUI.

Each model is a `ModelSide`: a CFGGuider of its own, holding that model's patcher, its two conditionings and
its model options. `SNFGuider` runs the phases of ComfyUI's CFGGuider.sample once for both sides, each phase
by one piece of code applied to every side, so that what core does for one model (hooks, wrappers, patches,
ControlNets, dynamic-VRAM delegates) reaches both:
- `sample`: per side, the conditionings' hook groups, a clone of the model options, the hook mode and
  `prepare_model_patcher`; the sides' OUTER_SAMPLE wrappers around the rest (the TDM's outermost).
- `outer_sample`: ONE `prepare_sampling` call (one `load_models_gpu`) for both models and everything their
  conditionings and hooks bring, the SDM patcher carrying the TDM as an additional model; per side option
  casts, `pre_run` and `cleanup`.
- `inner_sample`: per side `process_conds` and sampling options; the sides' SAMPLER_SAMPLE wrappers around
  one run of the sampler.
- `predict_noise`: the evaluation's noise level gives its stage; each side that runs goes through its own
  PREDICT_NOISE wrappers into core's `sampling_function` with its own conditionings and options.
What each extension point does with two models is listed in README.md ("Other nodes in your graph").
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import comfy.hooks
import comfy.k_diffusion.sampling
import comfy.latent_formats
import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.sampler_helpers
import comfy.samplers
import torch

from ..facediffuser_core import snf
from ..facediffuser_core.schedule import Stage, StageSchedule, StepLocator
from . import region_patch

WrappersMP = comfy.patcher_extension.WrappersMP

TDM_ATTACHMENT_KEY = "facediffuser_tdm"
# The key ComfyUI's MultiGPU nodes attach their per-device clones under (0.33 and newer).
MULTIGPU_KEY = "multigpu"
POST_CFG = "sampler_post_cfg_function"
# k-diffusion samplers that evaluate the model once per step, at sigmas[i] in step i (with the default options
# named): for them the guider counts its evaluations instead of reading each one's sigma on the host (a
# device sync per evaluation on a GPU), and checks the count against the sigmas once, after the run.
ONE_EVALUATION_PER_STEP = {
    name: {"s_churn": 0.0} if name == "euler" else {}
    for name in ("euler", "euler_ancestral", "euler_ancestral_RF", "lms", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu",
                 "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm", "ipndm_v", "deis", "euler_cfg_pp",
                 "euler_ancestral_cfg_pp", "dpmpp_2m_cfg_pp", "res_multistep", "res_multistep_cfg_pp")
}


def _check_width(input_name: str, conditioning, model_name: str, patcher) -> None:
    """A conditioning from another model family (an SDXL CLIP, say) fails deep in the UNet otherwise."""
    expected = patcher.model.model_config.unet_config.get("context_dim")
    for tensor, _ in conditioning:
        if expected is not None and tensor.shape[-1] != expected:
            raise ValueError(
                f"the '{input_name}' conditioning is {tensor.shape[-1]} wide but the {model_name.upper()} takes {expected}: "
                "encode all three prompts with the CLIP of the Face-diffuser SDM Loader"
            )


def share_controls(augmented: list, text: list, null: list) -> tuple[list, list, list]:
    """The three conditionings with a ControlNet on any of them present on all of them.

    Apply ControlNet puts its control on the conditionings it is wired to (usually `text`, or `augmented`
    and `text`), and ComfyUI gives a KSampler's negative the positive's control only in some cases. For
    Face-diffuser the three are one prompt: each model's guidance must compare branches that both carry the
    control, as KSampler's do, or the control itself becomes guidance (and the TDM's two branches could not
    share one UNet batch). A conditioning without a control takes the controls of `text`, else `augmented`,
    else `null`, entry by entry; conditionings that carry their own are left as they are.
    """
    conditionings = {"augmented": augmented, "text": text, "null": null}

    def controls(conditioning):
        return [entry[1]["control"] for entry in conditioning if entry[1].get("control") is not None and "area" not in entry[1]]

    source = next((controls(conditionings[name]) for name in ("text", "augmented", "null") if controls(conditionings[name])), None)
    if source is None:
        return augmented, text, null
    shared = {}
    for name, conditioning in conditionings.items():
        if controls(conditioning):
            shared[name] = conditioning
            continue
        filled, index = [], 0
        for tensor, options in conditioning:
            if "area" not in options:
                options = {**options, "control": source[index % len(source)]}
                index += 1
            filled.append([tensor, options])
        shared[name] = filled
    return shared["augmented"], shared["text"], shared["null"]


def sampler_additions(given: dict, received: dict) -> dict:
    """What a sampler added to the model options it was given: entries appended to lists (cfg++ samplers add
    a post-cfg function that captures the unconditional prediction) and values it set or replaced (they
    also set `disable_cfg1_optimization`). Samplers copy the options before changing them, so what they
    left untouched is the very same object."""
    additions = {}
    for key, value in received.items():
        original = given.get(key)
        if key in given and value is original:
            continue
        if isinstance(value, dict) and isinstance(original, dict):
            nested = sampler_additions(original, value)
            if nested:
                additions[key] = nested
        elif isinstance(value, list) and isinstance(original, list) and value[:len(original)] == original:
            if len(value) > len(original):
                additions[key] = value[len(original):]
        elif isinstance(value, torch.Tensor) or isinstance(original, torch.Tensor) or value != original:
            additions[key] = value
    return additions


def with_additions(options: dict, additions: dict) -> dict:
    """`options` with a sampler's additions: lists extended, dictionaries merged, other values replaced;
    `options` itself when there are none."""
    if not additions:
        return options
    merged = dict(options)
    for key, value in additions.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = with_additions(merged[key], value)
        elif isinstance(value, list) and isinstance(merged.get(key), list):
            merged[key] = merged[key] + value
        else:
            merged[key] = value
    return merged


@dataclass
class Predictions:
    """One side's raw predictions at one evaluation, as its post-cfg functions saw them (denoised space)."""

    sigma: torch.Tensor
    cond: torch.Tensor
    uncond: torch.Tensor

    def guidance(self, cfg: float) -> torch.Tensor:
        return snf.guidance_response(self.cond, self.uncond, self.sigma, cfg)


class ModelSide(comfy.samplers.CFGGuider):
    """One model of the collaboration with its positive and negative conditioning, as CFGGuider keeps them.

    Its `set_conds` is CFGGuider's, which swaps a dynamic-VRAM patcher for its non-dynamic delegate when a
    conditioning carries hooks; its prediction is CFGGuider's `outer_predict_noise` (its PREDICT_NOISE
    wrappers, then core's sampling_function). The SNFGuider drives the sampling phases for both sides.
    """

    def __init__(self, name: str, patcher, cfg: float, regions=None):
        super().__init__(patcher.clone())
        self.source = patcher
        self.name = name
        self.regions = regions  # nodes.regions.SamplingRegions: the SDM side's attention patch reads them
        self._patch_regions(self.model_patcher)
        self.set_cfg(cfg)
        self.sampling_options: dict = {}
        self.last_predictions: Predictions | None = None
        self._capturing: tuple[dict, dict] | None = None  # (options, the same with the capture), built once per run

    def inner_set_conds(self, conds):
        # CFGGuider's swap, asking the node's patcher for the delegate: core caches the delegate's model there
        # (where KSampler asks), and this side's clone, which dies with the run, would rebuild it from the file.
        if self.model_patcher.is_dynamic() and any(comfy.sampler_helpers.cond_has_hooks(cond) for cond in conds.values()):
            self.model_patcher = self.source.get_non_dynamic_delegate()
            self._patch_regions(self.model_patcher)
        super().inner_set_conds(conds)

    def _patch_regions(self, patcher) -> None:
        # On this side's own patcher, never on the node's: the node's keeps the delegate core caches on it.
        if self.regions is not None:
            region_patch.patch(patcher, self.regions)

    @contextlib.contextmanager
    def prepared(self):
        """What CFGGuider.sample does for its model before the OUTER_SAMPLE wrappers, undone on leaving."""
        self.conds = {k: [c.copy() for c in v] for k, v in self.original_conds.items()}
        comfy.samplers.preprocess_conds_hooks(self.conds)
        original_options = self.model_options
        original_hook_mode = self.model_patcher.hook_mode
        self.model_options = comfy.model_patcher.create_model_options_clone(self.model_options)
        try:
            # With one hook group (or none) the hooked weights never change after the first step: no caching.
            if comfy.samplers.get_total_hook_groups_in_conds(self.conds) <= 1:
                self.model_patcher.hook_mode = comfy.hooks.EnumHookMode.MinVram
            comfy.sampler_helpers.prepare_model_patcher(self.model_patcher, self.conds, self.model_options)
            comfy.samplers.filter_registered_hooks_on_conds(self.conds, self.model_options)
            yield
        finally:
            comfy.samplers.cast_to_load_options(self.model_options, device=self.model_patcher.offload_device)
            self.model_options = original_options
            self.model_patcher.hook_mode = original_hook_mode
            self.model_patcher.restore_hook_patches()
            self.last_predictions = None
            self._capturing = None
            del self.conds

    def predict(self, x, timestep, options: dict, seed, capture: bool = False):
        """This model's guided prediction; with `capture`, its raw cond/uncond predictions are kept in
        `last_predictions` (where a cache wrapper skips the model, the previous evaluation's stay)."""
        if capture:
            if self._capturing is None or self._capturing[0] is not options:
                # SNF compares guidance responses, so the unconditional branch must run even at cfg 1.
                self._capturing = (options, {**options, POST_CFG: options.get(POST_CFG, []) + [self._keep], "disable_cfg1_optimization": True})
            options = self._capturing[1]
        return self.outer_predict_noise(x, timestep, options, seed)

    def _keep(self, args):
        self.last_predictions = Predictions(args["sigma"], args["cond_denoised"], args["uncond_denoised"])
        return args["denoised"]


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
        StageSchedule.from_fractions(alpha, beta, 1)  # reject bad fractions when the graph is built
        if schedule is not None and schedule.shape[-1] < 2:
            raise ValueError(f"the 'schedule' input holds {schedule.shape[-1]} sigma(s); a schedule has at least one step (two sigmas)")
        self.tdm_side = ModelSide("tdm", tdm, cfg)
        self.sdm_side = ModelSide("sdm", sdm, cfg, regions)
        super().__init__(self.sdm_side.model_patcher)
        self.cfg = cfg
        self.alpha = alpha
        self.beta = beta
        self.schedule = None if schedule is None else schedule.detach().cpu()
        self.node = node  # named by the errors sampling raises, where ComfyUI shows the sampler node's name
        self.saliency = snf.SaliencyRecord()
        self.regions = regions  # nodes.regions.SamplingRegions: the SDM's region attention and where fusion may take it
        self.auto_regions = None  # nodes.auto_regions.AutoRegionsRun: regions decided after scene construction
        self.counted: list[tuple[int, Stage]] | None = None  # each evaluation's step and stage, where counted
        self.evaluated: list[torch.Tensor] = []  # the counted evaluations' sigmas, checked after the run

    @property
    def sides(self) -> tuple[ModelSide, ModelSide]:
        """Both models, the TDM first: its wrappers enclose the SDM's wherever wrappers nest."""
        return self.tdm_side, self.sdm_side

    def set_conds(self, augmented, text, null):
        for name, conditioning, sides in (("augmented", augmented, ("sdm",)), ("text", text, ("tdm", "sdm")), ("null", null, ("tdm",))):
            for side in sides:
                _check_width(name, conditioning, side, getattr(self, f"{side}_side").model_patcher)
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
        self._place_evaluations(sigmas)
        self.saliency.clear()  # in place: a Guider node handed this record out before sampling
        if self.auto_regions is not None:  # each run finds its own people
            self.auto_regions.reset()
        with contextlib.ExitStack() as stack:
            for side in self.sides:
                stack.enter_context(side.prepared())
            return self._through_wrappers(WrappersMP.OUTER_SAMPLE, self.sides, self.outer_sample, noise, latent_image, sampler,
                                          sigmas, denoise_mask, callback, disable_pbar, seed, latent_shapes=[latent_image.shape])

    def _place_evaluations(self, sigmas: torch.Tensor) -> None:
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
                sigmas = self.run_sigmas = sigmas.to(device)
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
            self.counted = self.run_steps if sigmas is self.run_sigmas and self._one_evaluation_per_step(sampler) else None
            self.evaluated = []
            samples = sampler.sample(self, sigmas, {"model_options": self.sampler_options, "seed": seed}, callback,
                                     noise, latent_image, denoise_mask, disable_pbar)
            self._check_counted(sampler)
            return samples
        side = self.sides[index]
        return comfy.patcher_extension.WrapperExecutor.new_class_executor(
            functools.partial(self._sampler_run, index + 1, sampler, seed),
            sampler,
            comfy.patcher_extension.get_all_wrappers(WrappersMP.SAMPLER_SAMPLE, side.sampling_options, is_model_options=True),
        ).execute(side, sigmas, {"model_options": side.sampling_options, "seed": seed}, callback, noise, latent_image, denoise_mask, disable_pbar)

    @staticmethod
    def _one_evaluation_per_step(sampler) -> bool:
        function = getattr(sampler, "sampler_function", None)
        options = getattr(sampler, "extra_options", {})
        return any(function is getattr(comfy.k_diffusion.sampling, f"sample_{name}", None) and all(options.get(k, v) == v for k, v in defaults.items())
                   for name, defaults in ONE_EVALUATION_PER_STEP.items())

    def _check_counted(self, sampler) -> None:
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

    def _stage_of(self, sigma: torch.Tensor) -> tuple[int, Stage]:
        if self.counted is not None and len(self.evaluated) < len(self.counted):
            return self.counted[len(self.evaluated)]
        # A host read: which models run is a Python decision.
        step = self.locator.step_for(float(sigma[0]))
        return step, self.stages.stage_at(step)

    def _denoise_mask(self, sigma, denoise_mask, extra_options):
        """A model's denoise-mask function (Differential Diffusion) shapes the mask of the evaluations in its
        stages; in the fusion stage both models denoise one x, with the SDM's. A function on one model only
        acts in every stage."""
        _, stage = self._stage_of(sigma)
        order = (self.tdm_side, self.sdm_side) if stage is Stage.SCENE else (self.sdm_side, self.tdm_side)
        for side in order:
            function = side.sampling_options.get("denoise_mask_function")
            if function is not None:
                return function(sigma, denoise_mask, extra_options)
        return denoise_mask

    def _decide_auto_regions(self) -> None:
        """At the first evaluation after scene construction: the regions from the TDM's last prediction."""
        auto = self.auto_regions
        prediction, auto.scene_prediction = auto.scene_prediction, None
        latent = None if prediction is None else self.inner_model.process_latent_out(prediction.float())
        auto.decide(latent)
        needed = [self.model_patcher, *self.loaded_models]
        pushed_off = [model for model in needed if model not in comfy.model_management.loaded_models()]
        if pushed_off:
            # Loading the VAE pushed these off the device: load them again, and only them (a model still loaded
            # would be patched again). Should making room for them push another off, all are asked for at once,
            # as when sampling began.
            comfy.model_management.load_models_gpu(pushed_off)
            if any(model not in comfy.model_management.loaded_models() for model in needed):
                comfy.model_management.load_models_gpu(needed)
        self.saliency.regions = None if self.regions.attention is None else auto.found.masks

    def outer_predict_noise(self, x, timestep, model_options={}, seed=None):
        # Each side's PREDICT_NOISE wrappers wrap that side's own prediction (ModelSide.predict).
        return self.predict_noise(x, timestep, model_options, seed)

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        comfy.model_management.throw_exception_if_processing_interrupted()
        step, stage = self._stage_of(timestep)
        if self.counted is not None:
            self.evaluated.append(timestep)
        # Samplers that change nothing pass the very options they were given: nothing to add then.
        additions = {} if model_options is self.sampler_options else sampler_additions(self.sampler_options, model_options)
        if stage is Stage.SCENE:
            scene = self.tdm_side.predict(x, timestep, with_additions(self.tdm_side.sampling_options, additions), seed)
            if self.auto_regions is not None:
                self.auto_regions.scene_prediction = scene
            return scene
        if self.auto_regions is not None and not self.auto_regions.decided:
            self._decide_auto_regions()
        if stage is Stage.SUBJECT:
            return self.sdm_side.predict(x, timestep, with_additions(self.sdm_side.sampling_options, additions), seed)
        # The sampler's own post-cfg functions (cfg++ capturing the unconditional prediction) see the fused
        # result once, with each pixel's predictions from the model SNF chose there.
        post_cfg = additions.pop(POST_CFG, [])
        guided = {side.name: side.predict(x, timestep, with_additions(side.sampling_options, additions), seed, capture=True)
                  for side in self.sides}
        # A side whose every evaluation so far a cache skipped has no raw predictions: its guided one stands
        # in for both branches, a zero guidance response (a flat saliency map).
        raw = {side.name: side.last_predictions or Predictions(timestep, guided[side.name], guided[side.name]) for side in self.sides}
        decision = snf.decide(raw["tdm"].guidance(self.cfg), raw["sdm"].guidance(self.cfg))
        if self.regions is not None and self.regions.fusion is not None:
            decision.sdm_chosen = self.regions.fusion.restrict(decision.sdm_chosen)
        self.saliency.add(step, decision)
        fused = snf.fuse(guided["tdm"], guided["sdm"], decision)
        if post_cfg:
            fused_cond = snf.fuse(raw["tdm"].cond, raw["sdm"].cond, decision)
            fused_uncond = snf.fuse(raw["tdm"].uncond, raw["sdm"].uncond, decision)
            sdm = self.sdm_side
            for function in post_cfg:
                fused = function({
                    "denoised": fused, "cond": sdm.conds.get("positive"), "uncond": sdm.conds.get("negative"), "cond_scale": self.cfg,
                    "model": sdm.inner_model, "uncond_denoised": fused_uncond, "cond_denoised": fused_cond, "sigma": timestep,
                    "model_options": model_options, "input": x,
                })
        return fused
