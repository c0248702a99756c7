"""One model of the collaboration as a CFGGuider of its own: its patcher, its positive and negative conditioning
and its model options, so that what core does for a model (hooks, wrappers, patches, ControlNets, dynamic-VRAM
delegates) reaches each of the two. The SNFGuider (nodes.snf_guider) drives the sampling phases for both sides.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import comfy.hooks
import comfy.model_patcher
import comfy.sampler_helpers
import comfy.samplers
import torch

from ..facediffuser_core import snf
from . import region_patch

POST_CFG = "sampler_post_cfg_function"


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
