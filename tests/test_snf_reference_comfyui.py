"""A three-stage SNF run in ComfyUI against the official loop written on diffusers with the same weights."""

import pytest
import torch

SEED = 7


@pytest.fixture(scope="module")
def official_models(comfyui):
    from dev.devkit import official_checkpoints

    return official_checkpoints.loaded_unets(comfyui)


@pytest.mark.parametrize("batch, height, width", [(1, 8, 8), (2, 8, 12)])
def test_three_stage_run_matches_the_official_loop(comfyui, official_models, batch, height, width):
    import comfy.sample
    from dev.devkit import official_checkpoints
    import official_reference

    (tdm_unet, sdm_unet), (tdm, sdm) = official_models
    generator = torch.Generator().manual_seed(0)
    augmented, text, null = (torch.randn(1, 77, official_checkpoints.HIDDEN, generator=generator) for _ in range(3))
    latent = {"samples": torch.zeros(batch, 4, height, width)}
    steps, cfg = 10, 5.0

    out, saliency = comfyui.run(
        "FaceDiffuserSNFSampler", tdm=tdm, sdm=sdm, augmented=[[augmented, {}]], text=[[text, {}]], null=[[null, {}]],
        latent_image=latent, seed=SEED, steps=steps, cfg=cfg, sampler_name="ddim", scheduler="ddim_uniform",
        alpha=0.3, beta=0.6, denoise=1.0,
    )

    noise = comfy.sample.prepare_noise(latent["samples"], SEED)
    expected, reference_choices = official_reference.sample(
        tdm_unet, sdm_unet, *(h.expand(batch, -1, -1) for h in (augmented, text, null)), noise,
        steps=steps, cfg=cfg, scene_end=3, fusion_end=6,
    )
    assert saliency.steps == [3, 4, 5]
    for decision, chosen in zip(saliency.decisions, reference_choices):
        assert torch.equal(decision.sdm_chosen, chosen)
    # Both models did paint: a run that is all-TDM or all-SDM would not test the fusion.
    assert 0 < torch.stack(reference_choices).float().mean() < 1
    # Stated tolerance: float32 UNets in two implementations over 10 steps, relative to the latent scale.
    scale = expected.abs().max()
    torch.testing.assert_close(out["samples"] / scale, expected / scale, rtol=0, atol=2e-5)
