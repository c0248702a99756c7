"""The official picture from the official seed: the SNF Sampler's pndm_official mode in ComfyUI against the
official run written on diffusers' PNDMScheduler (tests/official_reference.py) with the same tiny weights.

The tiny UNets' cross-attention is made strong, so that the two models' guidance responses differ by far more
than float rounding and every SNF choice is a real one, not a tie decided by the implementation's noise."""

from __future__ import annotations

import pytest
import torch

SEED = 11
CROSS_ATTENTION_GAIN = 4.0


def strengthen_cross_attention(unet: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if ".attn2." in name and (".to_v." in name or ".to_out." in name) and name.endswith("weight"):
                parameter.mul_(CROSS_ATTENTION_GAIN)
    return unet


@pytest.fixture(scope="module")
def official_models(comfyui):
    from dev.devkit import official_checkpoints

    return official_checkpoints.loaded_unets(comfyui, strengthen_cross_attention)


@pytest.fixture(scope="module")
def prompts():
    from dev.devkit import official_checkpoints

    generator = torch.Generator().manual_seed(0)
    return [torch.randn(1, 77, official_checkpoints.HIDDEN, generator=generator) for _ in range(3)]


def snf_official(comfyui, tdm, sdm, prompts, latent, steps, alpha, beta):
    augmented, text, null = prompts
    return comfyui.run(
        "FaceDiffuserSNFSampler", tdm=tdm, sdm=sdm, augmented=[[augmented, {}]], text=[[text, {}]], null=[[null, {}]],
        latent_image=latent, seed=SEED, steps=steps, cfg=5.0, sampler_name="pndm_official", scheduler="pndm_official",
        noise="official", alpha=alpha, beta=beta, denoise=1.0,
    )


# steps, the official start_merge_step/final_step, the fractions that equal them, batch, latent height, width
RUNS = [
    (50, 15, 30, 0.3, 0.6, 2, 8, 12),  # the official demo's split at 50 steps: alpha 0.3, beta 0.6 with PNDM
    (25, 15, 30, 0.6, 1.0, 1, 8, 8),  # the same loop indices at 25 steps: fusion runs to the end
]


@pytest.mark.parametrize("steps, start_merge, final, alpha, beta, batch, height, width", RUNS)
def test_pndm_official_matches_the_official_run(comfyui, official_models, prompts, steps, start_merge, final, alpha, beta, batch, height, width):
    import official_reference

    (tdm_unet, sdm_unet), (tdm, sdm) = official_models
    latent = {"samples": torch.zeros(batch, 4, height, width)}
    out, saliency = snf_official(comfyui, tdm, sdm, prompts, latent, steps, alpha, beta)

    noise = official_reference.official_initial_noise((batch, 4, height, width), SEED)
    expected, choices = official_reference.sample_official(
        tdm_unet, sdm_unet, *(h.expand(batch, -1, -1) for h in prompts), noise,
        steps=steps, cfg=5.0, start_merge_step=start_merge, final_step=final,
    )
    # Loop entry i > 0 is PNDM step i - 1 (the first step is evaluated twice), so entries 16..30 are steps 15..29.
    fusion_entries = [i for i in range(steps + 1) if start_merge < i <= final]
    assert saliency.steps == [i - 1 for i in fusion_entries]
    assert len(saliency.decisions) == len(choices)
    for decision, chosen in zip(saliency.decisions, choices):
        assert torch.equal(decision.sdm_chosen, chosen)
    share = torch.stack(choices).float().mean()
    assert 0.05 < share < 0.95  # both models paint
    torch.testing.assert_close(out["samples"], expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_official_run_costs_132_evaluations_at_50_steps(comfyui, official_models, prompts):
    """16 scene entries x 2 + 15 fusion entries x 4 + 20 subject entries x 2 (SPEC.md)."""
    _, (tdm, sdm) = official_models
    rows = {"tdm": 0, "sdm": 0}
    patched = {}
    for name, patcher in (("tdm", tdm), ("sdm", sdm)):
        def count(apply_model, args, name=name):
            rows[name] += args["input"].shape[0]
            return apply_model(args["input"], args["timestep"], **args["c"])

        patched[name] = patcher.clone()
        patched[name].set_model_unet_function_wrapper(count)
    snf_official(comfyui, patched["tdm"], patched["sdm"], prompts, {"samples": torch.zeros(1, 4, 8, 8)}, 50, 0.3, 0.6)
    assert rows == {"tdm": 16 * 2 + 15 * 2, "sdm": 15 * 2 + 20 * 2}
    assert sum(rows.values()) == 132


def test_official_noise_is_the_official_scripts_first_draw(comfyui):
    import official_reference

    official_run = comfyui.pack("nodes.official_run")
    latent = torch.zeros(3, 4, 8, 12)
    expected = official_reference.official_initial_noise(latent.shape, SEED)
    assert torch.equal(official_run.official_noise(latent, SEED), expected)
    (noise,) = comfyui.run("FaceDiffuserOfficialNoise", noise_seed=SEED)
    assert torch.equal(noise.generate_noise({"samples": latent}), expected)
    assert expected.dtype == torch.float32 and torch.equal(expected, expected.half().float())  # float16 values
    # On a CPU it is ComfyUI's own draw rounded to float16 (for a latent whose size is a multiple of 16, as here);
    # on a GPU the official one comes from the CUDA generator.
    import comfy.sample

    for shape in (latent.shape, (1, 4, 64, 64)):  # and 512x512 pictures' latents
        latent = torch.zeros(shape)
        rounded = comfy.sample.prepare_noise(latent, SEED).half().float()
        assert torch.equal(rounded, official_run.official_noise(latent, SEED)) and not torch.equal(rounded, comfy.sample.prepare_noise(latent, SEED))


def test_the_pndm_nodes_with_sampler_custom_advanced_equal_the_snf_sampler(comfyui, official_models, prompts):
    _, (tdm, sdm) = official_models
    augmented, text, null = ([[h, {}]] for h in prompts)
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    guider, saliency = comfyui.run("FaceDiffuserGuider", tdm=tdm, sdm=sdm, augmented=augmented, text=text, null=null,
                                   cfg=5.0, alpha=0.3, beta=0.6)
    out, _ = comfyui.run(
        "SamplerCustomAdvanced", noise=comfyui.run("FaceDiffuserOfficialNoise", noise_seed=SEED)[0], guider=guider,
        sampler=comfyui.run("FaceDiffuserPNDMSampler")[0],
        sigmas=comfyui.run("FaceDiffuserPNDMSchedule", model=sdm, steps=20, denoise=1.0)[0], latent_image=latent,
    )
    expected, expected_saliency = snf_official(comfyui, tdm, sdm, prompts, latent, 20, 0.3, 0.6)
    torch.testing.assert_close(out["samples"], expected["samples"], rtol=1e-6, atol=1e-6)
    assert saliency.steps == expected_saliency.steps == list(range(6, 12))


def test_pndm_schedule_with_denoise_keeps_the_tail_of_a_longer_grid(comfyui, official_models):
    _, (_, sdm) = official_models
    (whole,) = comfyui.run("FaceDiffuserPNDMSchedule", model=sdm, steps=20, denoise=1.0)
    (tail,) = comfyui.run("FaceDiffuserPNDMSchedule", model=sdm, steps=10, denoise=0.5)
    assert torch.equal(tail, whole[-11:])
    (nothing,) = comfyui.run("FaceDiffuserPNDMSchedule", model=sdm, steps=10, denoise=0.0)
    assert nothing.numel() == 0
