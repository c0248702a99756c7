"""Promises the review of the SNF Sampler found broken: each model's cleanup runs once per sampling, as KSampler
runs its model's; the sampled latent comes back in ComfyUI's intermediate dtype, as KSampler's does."""

from __future__ import annotations

import torch

from dev.devkit import tiny_comfy

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


def test_the_stage_tooltips_give_the_official_split_for_each_sampler(comfyui):
    """The official 15/30 split (loop entries 0..15 scene, 16..30 fusion, at 50 steps) in stage steps: ddim's loop
    entry i is step i, pndm_official's entry i > 0 is step i - 1 (its first step runs twice)."""
    from facediffuser_core.schedule import StageSchedule

    inputs = comfyui.node("FaceDiffuserSNFSampler").INPUT_TYPES()["required"]
    for name, ddim, pndm in (("alpha", 0.32, 0.3), ("beta", 0.62, 0.6)):
        tooltip = inputs[name][1]["tooltip"]
        assert f"{name} {ddim} with ddim" in tooltip and f"{name} {pndm} with pndm_official" in tooltip
    ddim, pndm = StageSchedule.from_fractions(0.32, 0.62, 50), StageSchedule.from_fractions(0.3, 0.6, 50)
    assert (ddim.scene_end, ddim.fusion_end) == (16, 31)  # entries 16..30 are steps 16..30
    assert (pndm.scene_end, pndm.fusion_end) == (15, 30)  # entries 16..30 are steps 15..29


def _custom(comfyui, guider, sigmas, latent, sampler_name, first=True):
    noise = comfyui.run("RandomNoise", noise_seed=SETTINGS["seed"])[0] if first else comfyui.run("DisableNoise")[0]
    return comfyui.run("SamplerCustomAdvanced", noise=noise, guider=guider, sigmas=sigmas, latent_image=latent,
                       sampler=comfyui.run("KSamplerSelect", sampler_name=sampler_name)[0])[0]


def _halves(comfyui, guider, sigmas, step, sampler_name):
    high, low = comfyui.run("SplitSigmas", sigmas=sigmas, step=step)
    first = _custom(comfyui, guider, high, tiny_comfy.empty_latent(), sampler_name)
    return _custom(comfyui, guider, low, first, sampler_name, first=False)["samples"]


def test_split_sigmas_with_a_multistep_sampler_restarts_its_history_as_with_core(comfyui, models, conds):
    """What the README promises for SplitSigmas halves with dpmpp_2m (a multistep sampler): each half runs the
    stages of its own steps, the halves do not equal one run (the second sampler starts without the first's
    history), and that difference is the sampler's, as with core's CFGGuider: with alpha = beta = 0 (the SDM
    alone) the halves equal core's halves."""
    tdm, sdm = models
    sigmas = comfyui.run("BasicScheduler", model=sdm, scheduler="normal", steps=6, denoise=1.0)[0]
    one, one_saliency = comfyui.run("FaceDiffuserGuider", tdm=tdm, sdm=sdm, cfg=5.0, alpha=0.34, beta=0.67, **conds)
    whole = _custom(comfyui, one, sigmas, tiny_comfy.empty_latent(), "dpmpp_2m")["samples"]
    guider, saliency = comfyui.run("FaceDiffuserGuider", tdm=tdm, sdm=sdm, cfg=5.0, alpha=0.34, beta=0.67, schedule=sigmas, **conds)
    halves = _halves(comfyui, guider, sigmas, 3, "dpmpp_2m")
    assert one_saliency.steps == [2, 3] and saliency.steps == [3]  # the second half's fusion step, on the whole schedule
    assert not torch.allclose(halves, whole, rtol=1e-3, atol=1e-3)
    sdm_only, _ = comfyui.run("FaceDiffuserGuider", tdm=tdm, sdm=sdm, cfg=5.0, alpha=0.0, beta=0.0, schedule=sigmas, **conds)
    (core,) = comfyui.run("CFGGuider", model=sdm, positive=conds["augmented"], negative=conds["text"], cfg=5.0)
    torch.testing.assert_close(_halves(comfyui, sdm_only, sigmas, 3, "dpmpp_2m"), _halves(comfyui, core, sigmas, 3, "dpmpp_2m"),
                               rtol=1e-5, atol=1e-5)
