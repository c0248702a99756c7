"""The SNF sampler and guider inside ComfyUI, with tiny random SD1.5-family models on CPU."""

from __future__ import annotations

import pytest
import torch

from dev.devkit import tiny_comfy

SEED = 3


def snf_sample(comfyui, tdm, sdm, conds, latent, steps=10, alpha=0.3, beta=0.6, sampler="ddim", scheduler="ddim_uniform", denoise=1.0, cfg=5.0):
    return comfyui.run(
        "FaceDiffuserSNFSampler", tdm=tdm, sdm=sdm, latent_image=latent, seed=SEED, steps=steps, cfg=cfg,
        sampler_name=sampler, scheduler=scheduler, alpha=alpha, beta=beta, denoise=denoise, **conds,
    )


def ksample(comfyui, model, positive, negative, latent, steps=10, sampler="ddim", scheduler="ddim_uniform", cfg=5.0):
    return comfyui.nodes.common_ksampler(model, SEED, steps, cfg, sampler, scheduler, positive, negative, latent)[0]["samples"]


class EvaluationLog:
    """Counts a model's UNet evaluations through a unet wrapper patch on a clone (which also proves that
    each model's own patches act inside the guider)."""

    def __init__(self, patcher):
        self.patcher = patcher.clone()
        self.calls = []  # (sigma, rows in the batch)
        self.patcher.set_model_unet_function_wrapper(self._wrapper)

    def _wrapper(self, apply_model, args):
        self.calls.append((float(args["timestep"][0]), args["input"].shape[0]))
        return apply_model(args["input"], args["timestep"], **args["c"])

    def rows(self):
        return sum(rows for _, rows in self.calls)


@pytest.mark.parametrize("batch, height, width", [(1, 8, 8), (2, 8, 12)])
def test_alpha_beta_one_is_ksampler_with_the_tdm(comfyui, models, conds, batch, height, width):
    tdm, sdm = models
    latent = tiny_comfy.empty_latent(batch, height, width)
    out, saliency = snf_sample(comfyui, tdm, sdm, conds, latent, alpha=1.0, beta=1.0)
    expected = ksample(comfyui, tdm, conds["text"], conds["null"], latent)
    torch.testing.assert_close(out["samples"], expected, rtol=1e-5, atol=1e-5)
    assert len(saliency) == 0


@pytest.mark.parametrize("batch, height, width", [(1, 8, 8), (2, 12, 8)])
def test_alpha_beta_zero_is_ksampler_with_the_sdm(comfyui, models, conds, batch, height, width):
    tdm, sdm = models
    latent = tiny_comfy.empty_latent(batch, height, width)
    out, _ = snf_sample(comfyui, tdm, sdm, conds, latent, alpha=0.0, beta=0.0)
    expected = ksample(comfyui, sdm, conds["augmented"], conds["text"], latent)
    torch.testing.assert_close(out["samples"], expected, rtol=1e-5, atol=1e-5)


def test_three_stages_evaluate_each_model_exactly_in_its_stages(comfyui, models, conds, monkeypatch):
    import comfy.model_management

    tdm_log, sdm_log = EvaluationLog(models[0]), EvaluationLog(models[1])
    loads = []
    real_load = comfy.model_management.load_models_gpu

    def spy(models_to_load, *args, **kwargs):
        loads.append(list(models_to_load))
        return real_load(models_to_load, *args, **kwargs)

    monkeypatch.setattr(comfy.model_management, "load_models_gpu", spy)
    batch = 2
    out, saliency = snf_sample(comfyui, tdm_log.patcher, sdm_log.patcher, conds, tiny_comfy.empty_latent(batch, 8, 10),
                               steps=10, alpha=0.3, beta=0.6)
    # 10 steps at 0.3/0.6: steps 0-2 scene, 3-5 fusion, 6-9 subject; cond and uncond batched in one call.
    assert len(tdm_log.calls) == 6 and tdm_log.rows() == 6 * 2 * batch
    assert len(sdm_log.calls) == 7 and sdm_log.rows() == 7 * 2 * batch
    tdm_sigmas = [s for s, _ in tdm_log.calls]
    sdm_sigmas = [s for s, _ in sdm_log.calls]
    assert min(tdm_sigmas) > max(sdm_sigmas[3:]) and max(tdm_sigmas) > max(sdm_sigmas)
    assert sdm_sigmas[:3] == tdm_sigmas[3:]  # the fusion steps ran both models at the same noise levels
    assert saliency.steps == [3, 4, 5]
    summary = saliency.summary()
    assert summary.sdm_fraction.shape == (batch, 8, 10)
    assert torch.isfinite(out["samples"]).all()
    # Both models in the one load call of this sampling, never loaded apart.
    assert len(loads) == 1
    loaded = [m.model for m in loads[0]]
    assert any(m is sdm_log.patcher.model for m in loaded) and any(m is tdm_log.patcher.model for m in loaded)


def test_denoise_keeps_boundaries_on_the_global_steps(comfyui, models, conds):
    tdm_log, sdm_log = EvaluationLog(models[0]), EvaluationLog(models[1])
    latent = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))}
    _, saliency = snf_sample(comfyui, tdm_log.patcher, sdm_log.patcher, conds, latent, steps=4, denoise=0.5,
                             alpha=0.3, beta=0.6, sampler="euler", scheduler="normal")
    # An 8-step schedule of which the last 4 run: global steps 4..7. Scene ends at round(2.4) = 2,
    # fusion at round(4.8) = 5, so only global step 4 is fusion and the rest subject enhancement.
    assert saliency.steps == [4]
    assert len(tdm_log.calls) == 1 and len(sdm_log.calls) == 4


def test_lora_style_patch_on_the_tdm_acts(comfyui, models, conds):
    tdm, sdm = models
    patched = tdm.clone()
    key = "diffusion_model.out.2.weight"
    weight = tdm.model.state_dict()[key]
    patched.add_patches({key: (torch.randn(weight.shape, generator=torch.Generator().manual_seed(5)) * 0.3,)}, 1.0)
    latent = tiny_comfy.empty_latent()

    tdm_only, _ = snf_sample(comfyui, patched, sdm, conds, latent, alpha=1.0, beta=1.0)
    torch.testing.assert_close(tdm_only["samples"], ksample(comfyui, patched, conds["text"], conds["null"], latent), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(tdm_only["samples"], ksample(comfyui, tdm, conds["text"], conds["null"], latent), atol=1e-3)

    plain, _ = snf_sample(comfyui, tdm, sdm, conds, latent)
    with_patch, _ = snf_sample(comfyui, patched, sdm, conds, latent)
    assert not torch.allclose(plain["samples"], with_patch["samples"], atol=1e-3)
    # The patch is removed again: the unpatched TDM still gives the plain result.
    again, _ = snf_sample(comfyui, tdm, sdm, conds, latent)
    torch.testing.assert_close(again["samples"], plain["samples"], rtol=1e-6, atol=1e-6)


def test_every_comfyui_sampler_runs_each_model_only_at_its_stages_noise_levels(comfyui, models, conds):
    import comfy.samplers

    steps, alpha, beta = 6, 0.34, 0.67  # scene 0-1, fusion 2-3, subject 4-5
    for sampler in [*comfy.samplers.SAMPLER_NAMES, "pndm_official"]:
        tdm_log, sdm_log = EvaluationLog(models[0]), EvaluationLog(models[1])
        out, saliency = snf_sample(comfyui, tdm_log.patcher, sdm_log.patcher, conds, tiny_comfy.empty_latent(),
                                   steps=steps, alpha=alpha, beta=beta, sampler=sampler, scheduler="normal")
        sigmas = comfy.samplers.KSampler(models[1], steps=steps, device="cpu", sampler=sampler, scheduler="normal").sigmas.tolist()
        scene_end_sigma, fusion_end_sigma = sigmas[2], sigmas[4]
        # An evaluation at a boundary noise level (within the locator's tolerance) belongs to the later stage.
        tolerance = 1 + 1e-4
        assert torch.isfinite(out["samples"]).all(), sampler
        assert tdm_log.calls and sdm_log.calls and len(saliency) > 0, sampler
        assert all(s > fusion_end_sigma * tolerance for s, _ in tdm_log.calls), (sampler, tdm_log.calls, sigmas)
        assert all(s <= scene_end_sigma * tolerance for s, _ in sdm_log.calls), (sampler, sdm_log.calls, sigmas)
        assert set(saliency.steps) <= {2, 3}, (sampler, saliency.steps)


def test_guider_with_sampler_custom_advanced_matches_the_snf_sampler(comfyui, models, conds):
    tdm, sdm = models
    latent = tiny_comfy.empty_latent(1, 8, 8)
    guider, live_saliency = comfyui.run("FaceDiffuserGuider", tdm=tdm, sdm=sdm, cfg=5.0, alpha=0.3, beta=0.6, **conds)
    assert len(live_saliency) == 0
    out, _ = comfyui.run(
        "SamplerCustomAdvanced",
        noise=comfyui.run("RandomNoise", noise_seed=SEED)[0],
        guider=guider,
        sampler=comfyui.run("KSamplerSelect", sampler_name="ddim")[0],
        sigmas=comfyui.run("BasicScheduler", model=sdm, scheduler="ddim_uniform", steps=10, denoise=1.0)[0],
        latent_image=latent,
    )
    expected, saliency = snf_sample(comfyui, tdm, sdm, conds, latent)
    torch.testing.assert_close(out["samples"], expected["samples"], rtol=1e-5, atol=1e-5)
    assert live_saliency.steps == saliency.steps == [3, 4, 5]


def test_progress_bar_advances_every_step_and_cancel_stops_cleanly(comfyui, models, conds, monkeypatch):
    import comfy.model_management
    import comfy.utils

    monkeypatch.setattr(comfy.utils, "PROGRESS_THROTTLE_MIN_INTERVAL", 0.0)  # every update reaches the hook
    tdm, sdm = models
    updates = []

    def hook(value, total, preview, node_id=None):
        updates.append(value)
        if cancel_after and len(updates) == cancel_after:
            comfy.model_management.interrupt_current_processing(True)

    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        cancel_after = 0
        reference, _ = snf_sample(comfyui, tdm, sdm, conds, tiny_comfy.empty_latent())
        assert updates == list(range(1, 11))

        updates.clear()
        cancel_after = 4
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            snf_sample(comfyui, tdm, sdm, conds, tiny_comfy.empty_latent())
        assert len(updates) == 4
        assert tdm.model.current_patcher is None and sdm.model.current_patcher is None

        cancel_after = 0
        after, _ = snf_sample(comfyui, tdm, sdm, conds, tiny_comfy.empty_latent())
        torch.testing.assert_close(after["samples"], reference["samples"], rtol=0, atol=0)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        comfy.model_management.interrupt_current_processing(False)


def test_saliency_preview_node(comfyui, models, conds):
    tdm, sdm = models
    _, saliency = snf_sample(comfyui, tdm, sdm, conds, tiny_comfy.empty_latent(2, 8, 12))
    images, mask = comfyui.run("FaceDiffuserSaliencyPreview", saliency=saliency)
    assert images.shape == (6, 64, 96, 3) and mask.shape == (2, 64, 96)
    torch.testing.assert_close(mask[:, ::8, ::8], saliency.summary().sdm_fraction)
    decoded = torch.rand(2, 64, 96, 3)
    images, _ = comfyui.run("FaceDiffuserSaliencyPreview", saliency=saliency, image=decoded)
    assert images.shape == (8, 64, 96, 3)
    with pytest.raises(ValueError, match="input 'image'.*2 samples"):
        comfyui.run("FaceDiffuserSaliencyPreview", saliency=saliency, image=decoded[:1])


def test_empty_fusion_stage_preview_explains(comfyui, models, conds):
    tdm, sdm = models
    _, saliency = snf_sample(comfyui, tdm, sdm, conds, tiny_comfy.empty_latent(), alpha=0.5, beta=0.5)
    with pytest.raises(ValueError, match="saliency record is empty.*widen beta - alpha"):
        comfyui.run("FaceDiffuserSaliencyPreview", saliency=saliency)


def test_bad_inputs_name_the_node_the_input_and_the_fix(comfyui, models, conds):
    import comfy.latent_formats

    tdm, sdm = models
    latent = tiny_comfy.empty_latent()
    for same in (sdm, sdm.clone()):
        with pytest.raises(ValueError, match="Face-diffuser SNF Sampler: the 'tdm' and 'sdm' inputs are the same model"):
            snf_sample(comfyui, same, sdm, conds, latent)
    with pytest.raises(ValueError, match=r"Face-diffuser SNF Sampler: alpha \(0.7\) must not exceed beta \(0.2\)"):
        snf_sample(comfyui, tdm, sdm, conds, latent, alpha=0.7, beta=0.2)

    sdxl_like = tiny_comfy.sd15_patcher(3)
    sdxl_like.model.latent_format = comfy.latent_formats.SDXL()
    with pytest.raises(ValueError, match="Face-diffuser Guider: the 'tdm' input is a BaseModel model with SDXL latents.*TDM and SDM Loaders"):
        comfyui.run("FaceDiffuserGuider", tdm=sdxl_like, sdm=sdm, cfg=5.0, alpha=0.3, beta=0.6, **conds)

    wide = dict(conds, null=[[torch.zeros(1, 77, 48), {}]])
    with pytest.raises(ValueError, match="Face-diffuser SNF Sampler: the 'null' conditioning is 48 wide but the TDM takes 32.*CLIP of the Face-diffuser SDM Loader"):
        snf_sample(comfyui, tdm, sdm, wide, latent)


def test_a_miscounted_sampler_is_an_error_not_a_misplaced_stage(comfyui, models, conds, monkeypatch):
    """The guider counts the evaluations of one-evaluation-per-step samplers instead of reading their
    sigmas; the one read after the run catches a sampler listed wrongly (heun evaluates twice per step)."""
    monkeypatch.setitem(comfyui.pack("nodes.stage_clock").ONE_EVALUATION_PER_STEP, "heun", {})
    with pytest.raises(RuntimeError, match=r"the sampler \(sample_heun\) evaluated the model at sigma .* choose another sampler"):
        snf_sample(comfyui, *models, conds, tiny_comfy.empty_latent(), sampler="heun", scheduler="normal")
