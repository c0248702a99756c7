"""Regions in ComfyUI against masked cross-attention written again as diffusers attention processors, on the
tiny official-layout UNets with the same weights (dev.devkit.official_checkpoints, tests/official_reference.py)."""

import pytest
import torch

SEED = 7
ROWS = (4, 11)
HEIGHT, WIDTH = 8, 12  # latent; attention runs at 8x12 and 4x6, where the halves fall on whole cells


def strong_cross_attention(unet):
    """Sharper cross-attention than random init gives, so that the subject tokens matter and SNF's choices
    are not float-noise ties."""
    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith("attn2"):
                module.to_k.weight.mul_(4.0)
    return unet


@pytest.fixture(scope="module")
def official_models(comfyui):
    from dev.devkit import official_checkpoints

    return official_checkpoints.loaded_unets(comfyui, prepare=strong_cross_attention)


def region_cells(masks: torch.Tensor, queries: int) -> torch.Tensor:
    """(K, 8H, 8W) pixel masks -> (K, queries) bool: the attention grid whose size is `queries`, each cell
    in a region when at least half its pixels are."""
    for level in range(4):
        height, width = -(-HEIGHT // 2 ** level), -(-WIDTH // 2 ** level)
        if height * width == queries:
            blocks = masks.reshape(masks.shape[0], height, masks.shape[1] // height, width, masks.shape[2] // width)
            return (blocks.mean(dim=(2, 4)) >= 0.5).reshape(masks.shape[0], queries)
    raise AssertionError(f"no attention grid of {queries} queries")


class MaskedCrossAttention:
    """A diffusers attention processor for attn2: in the augmented branch, subject k's fused row is visible
    inside region k only, and its plain text row (appended to the keys) outside it only."""

    def __init__(self, state: dict):
        self.state = state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        context = encoder_hidden_states
        batch, queries, _ = hidden_states.shape
        allowed = None
        if self.state["augmented"]:
            plain = self.state["plain"]
            context = torch.cat([context, plain.unsqueeze(0).expand(batch, -1, -1)], dim=1)
            inside = region_cells(self.state["masks"], queries)
            prompt = encoder_hidden_states.shape[1]
            allowed = torch.ones(queries, context.shape[1], dtype=torch.bool)
            for subject, row in enumerate(self.state["rows"]):
                allowed[:, row] = inside[subject]
                allowed[:, prompt + subject] = ~inside[subject]
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        heads = attn.heads

        def split(t):
            return t.reshape(batch, t.shape[1], heads, -1).transpose(1, 2)

        scores = split(q) @ split(k).transpose(-1, -2) * attn.scale
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        out = (scores.softmax(dim=-1) @ split(v)).transpose(1, 2).reshape(batch, queries, -1)
        return attn.to_out[1](attn.to_out[0](out))


class RegionUNet:
    """The SDM's reference UNet, told for each call whether it runs the augmented branch."""

    def __init__(self, unet, augmented: torch.Tensor, state: dict):
        self.unet, self.augmented, self.state = unet, augmented, state
        processor = MaskedCrossAttention(state)
        for name, module in unet.named_modules():
            if name.endswith("attn2"):
                module.set_processor(processor)

    def __call__(self, latents, t, encoder_hidden_states):
        self.state["augmented"] = torch.equal(encoder_hidden_states, self.augmented)
        return self.unet(latents, t, encoder_hidden_states=encoder_hidden_states)


def test_regions_match_masked_attention_written_on_diffusers(comfyui, official_models):
    import comfy.sample
    from dev.devkit import official_checkpoints
    import official_reference

    regions = comfyui.pack("facediffuser_core.regions")
    (tdm_unet, sdm_unet), (tdm, sdm) = official_models
    generator = torch.Generator().manual_seed(0)
    text, null = (torch.randn(1, 77, official_checkpoints.HIDDEN, generator=generator) for _ in range(2))
    augmented = text.clone()
    augmented[0, list(ROWS)] = 3 * torch.randn(len(ROWS), official_checkpoints.HIDDEN, generator=generator)
    plain = text[0, list(ROWS)].clone()
    masks = torch.zeros(2, HEIGHT * 8, WIDTH * 8)
    masks[0, :, : WIDTH * 4], masks[1, :, WIDTH * 4:] = 1, 1
    steps, cfg = 10, 5.0

    out, saliency = comfyui.run(
        "FaceDiffuserSNFSampler", tdm=tdm, sdm=sdm, augmented=[[augmented, {regions.SUBJECTS_KEY: regions.SubjectTokens(ROWS, 77, plain)}]],
        text=[[text, {}]], null=[[null, {}]], latent_image={"samples": torch.zeros(1, 4, HEIGHT, WIDTH)}, seed=SEED, steps=steps, cfg=cfg,
        sampler_name="ddim", scheduler="ddim_uniform", alpha=0.3, beta=0.6, denoise=1.0, regions=masks,
    )

    noise = comfy.sample.prepare_noise(torch.zeros(1, 4, HEIGHT, WIDTH), SEED)
    state = {"masks": masks, "rows": ROWS, "plain": plain, "augmented": False}
    original_processors = sdm_unet.attn_processors
    try:
        expected, reference_choices = official_reference.sample(
            tdm_unet, RegionUNet(sdm_unet, augmented, state), augmented, text, null, noise, steps=steps, cfg=cfg, scene_end=3, fusion_end=6,
        )
    finally:
        sdm_unet.set_attn_processor(original_processors)
    for decision, chosen in zip(saliency.decisions, reference_choices):
        assert torch.equal(decision.sdm_chosen, chosen)
    assert 0 < torch.stack(reference_choices).float().mean() < 1
    scale = expected.abs().max()
    torch.testing.assert_close(out["samples"] / scale, expected / scale, rtol=0, atol=1e-4)
    # The regions did change the picture: the same run without them is elsewhere.
    unscoped, _ = official_reference.sample(tdm_unet, sdm_unet, augmented, text, null, noise, steps=steps, cfg=cfg, scene_end=3, fusion_end=6)
    assert ((unscoped - expected).abs().max() / scale) > 1e-2
