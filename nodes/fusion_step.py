"""One evaluation in the fusion stage: both models predict, SNF (facediffuser_core.snf) chooses per latent pixel
the model whose guidance response is more salient, and the sampler's own post-cfg functions (cfg++ samplers
capture the unconditional prediction there) see the fused result once, with each pixel's predictions from the
model SNF chose there."""

from __future__ import annotations

from ..facediffuser_core import snf
from .model_side import POST_CFG, Predictions
from .sampler_options import with_additions


def fusion_step(sides, x, timestep, model_options: dict, additions: dict, seed, cfg: float, step: int,
                saliency: snf.SaliencyRecord, fusion_area=None):
    """The fused prediction at (x, timestep), both `sides` (TDM, SDM) given the sampler's `additions` to their own
    options; the decision goes into `saliency` as step `step`. `fusion_area` (facediffuser_core.regions.FusionArea),
    when given, keeps the TDM outside every region."""
    additions = dict(additions)
    post_cfg = additions.pop(POST_CFG, [])
    guided = {side.name: side.predict(x, timestep, with_additions(side.sampling_options, additions), seed, capture=True)
              for side in sides}
    # A side whose every evaluation so far a cache skipped has no raw predictions: its guided one stands in for
    # both branches, a zero guidance response (a flat saliency map).
    raw = {side.name: side.last_predictions or Predictions(timestep, guided[side.name], guided[side.name]) for side in sides}
    decision = snf.decide(raw["tdm"].guidance(cfg), raw["sdm"].guidance(cfg))
    if fusion_area is not None:
        decision.sdm_chosen = fusion_area.restrict(decision.sdm_chosen)
    saliency.add(step, decision)
    fused = snf.fuse(guided["tdm"], guided["sdm"], decision)
    if post_cfg:
        fused_cond = snf.fuse(raw["tdm"].cond, raw["sdm"].cond, decision)
        fused_uncond = snf.fuse(raw["tdm"].uncond, raw["sdm"].uncond, decision)
        sdm = next(side for side in sides if side.name == "sdm")
        for function in post_cfg:
            fused = function({
                "denoised": fused, "cond": sdm.conds.get("positive"), "uncond": sdm.conds.get("negative"), "cond_scale": cfg,
                "model": sdm.inner_model, "uncond_denoised": fused_uncond, "cond_denoised": fused_cond, "sigma": timestep,
                "model_options": model_options, "input": x,
            })
    return fused
