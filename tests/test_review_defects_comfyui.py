"""Promises the review of the SNF Sampler found broken: each model's cleanup runs once per sampling, as KSampler
runs its model's; the sampled latent comes back in ComfyUI's intermediate dtype, as KSampler's does."""

from __future__ import annotations

import torch

import tiny_comfy

SETTINGS = dict(seed=3, steps=3, cfg=5.0, sampler_name="euler", scheduler="normal", alpha=0.34, beta=0.67)


def snf(comfyui, tdm, sdm, conds, **settings):
    return comfyui.run("FaceDiffuserSNFSampler", tdm=tdm, sdm=sdm, latent_image=tiny_comfy.empty_latent(), **conds,
                       **{**SETTINGS, **settings})


def test_each_models_cleanup_runs_once_per_sampling(comfyui, models, conds):
    import comfy.patcher_extension

    cleaned = []
    tdm, sdm = (model.clone() for model in models)
    for name, patcher in (("tdm", tdm), ("sdm", sdm)):
        patcher.add_callback(comfy.patcher_extension.CallbacksMP.ON_CLEANUP, lambda _, name=name: cleaned.append(name))
    snf(comfyui, tdm, sdm, conds)
    assert sorted(cleaned) == ["sdm", "tdm"]
    ksampler_cleaned = []
    sdm.add_callback(comfy.patcher_extension.CallbacksMP.ON_CLEANUP, lambda _: ksampler_cleaned.append("sdm"))
    comfyui.run("KSampler", model=sdm, positive=conds["augmented"], negative=conds["text"], latent_image=tiny_comfy.empty_latent(),
                denoise=1.0, **{key: SETTINGS[key] for key in ("seed", "steps", "cfg", "sampler_name", "scheduler")})
    assert ksampler_cleaned == ["sdm"]  # what core does for the model it samples


def test_the_latent_comes_back_in_comfyuis_intermediate_dtype(comfyui, models, conds, monkeypatch):
    import comfy.model_management

    monkeypatch.setattr(comfy.model_management, "intermediate_dtype", lambda: torch.float16)
    out, _ = snf(comfyui, *models, conds)
    (ksampler_out,) = comfyui.run("KSampler", model=models[1], positive=conds["augmented"], negative=conds["text"],
                                  latent_image=tiny_comfy.empty_latent(), denoise=1.0,
                                  **{key: SETTINGS[key] for key in ("seed", "steps", "cfg", "sampler_name", "scheduler")})
    assert out["samples"].dtype == ksampler_out["samples"].dtype == torch.float16
