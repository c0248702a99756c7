"""What the ComfyUI-tier tests of regions share: two subjects' conditionings on the tiny models, the halves layout,
and the same run through the SNF Sampler, the Guider and the Stage Sweep, with and without another node's attn2
replacement on the SDM."""

from __future__ import annotations

import torch

from dev.devkit import tiny_comfy
from sampling_runs import SEED

ROWS = (5, 9)  # the two subjects' token rows in the tiny prompts
HEIGHT, WIDTH = 8, 12  # latent; the masks are drawn at the picture's 64x96 pixels


def subject_conds(comfyui, rows=ROWS, tokens=77, text_tokens=77, seed=20):
    """Conditionings as the Subject Prompt makes them: the augmented prompt is the text prompt (its first
    `tokens` rows) with strong fused rows at `rows`, and carries the rows and their plain text states."""
    regions = comfyui.pack("facediffuser_core.regions")
    generator = torch.Generator().manual_seed(seed)
    text = torch.randn(1, max(tokens, text_tokens), tiny_comfy.CONTEXT_DIM, generator=generator)[:, :text_tokens]
    augmented = text[:, :tokens].clone()
    augmented[0, list(rows)] = 4 * torch.randn(len(rows), tiny_comfy.CONTEXT_DIM, generator=generator)
    subjects = regions.SubjectTokens(tuple(rows), tokens, text[0, list(rows)].clone())
    null = torch.randn(1, tokens, tiny_comfy.CONTEXT_DIM, generator=generator)
    return {"augmented": [[augmented, {regions.SUBJECTS_KEY: subjects}]], "text": [[text, {}]], "null": [[null, {}]]}


def halves(comfyui, width=WIDTH * 8, height=HEIGHT * 8):
    return comfyui.run("FaceDiffuserRegionLayout", layout="halves", subjects=2, width=width, height=height, boxes="")[0]


def sample(comfyui, tdm, sdm, conds, alpha=0.3, beta=0.6, steps=6, **region_inputs):
    return comfyui.run(
        "FaceDiffuserSNFSampler", tdm=tdm, sdm=sdm, latent_image=tiny_comfy.empty_latent(1, HEIGHT, WIDTH), seed=SEED,
        steps=steps, cfg=5.0, sampler_name="ddim", scheduler="ddim_uniform", alpha=alpha, beta=beta, denoise=1.0,
        **conds, **region_inputs,
    )


def sample_with_guider(comfyui, sdm, guider, steps=10):
    """SamplerCustomAdvanced with ddim over `steps` ddim_uniform steps, as `sample` runs them."""
    return comfyui.run(
        "SamplerCustomAdvanced", noise=comfyui.run("RandomNoise", noise_seed=SEED)[0], guider=guider,
        sampler=comfyui.run("KSamplerSelect", sampler_name="ddim")[0],
        sigmas=comfyui.run("BasicScheduler", model=sdm, scheduler="ddim_uniform", steps=steps, denoise=1.0)[0],
        latent_image=tiny_comfy.empty_latent(1, HEIGHT, WIDTH),
    )[0]


def sweep(comfyui, tdm, sdm, conds, steps=10, **region_inputs):
    """The Stage Sweep of the one cell alpha 0.3, beta 0.6: `sample`'s run."""
    return comfyui.run(
        "FaceDiffuserStageSweep", tdm=tdm, sdm=sdm, latent_image=tiny_comfy.empty_latent(1, HEIGHT, WIDTH), seed=SEED, steps=steps,
        cfg=5.0, sampler_name="ddim", scheduler="ddim_uniform", alphas="0.3", betas="0.6", denoise=1.0, **conds, **region_inputs,
    )


def with_replacements(comfyui, sdm, replacement):
    """The SDM with another node's attn2 replacement (IPAdapter-style) on every transformer block, keyed by the
    block on the first and by block and transformer index on the others (ComfyUI prefers the latter)."""
    blocks = comfyui.pack("nodes.region_patch").attention_blocks(sdm.model.diffusion_model)
    replaced = sdm.clone()
    replaced.set_model_attn2_replace(replacement, *blocks[0])
    for kind, number in blocks[1:]:
        replaced.set_model_attn2_replace(replacement, kind, number, 0)
    return replaced
