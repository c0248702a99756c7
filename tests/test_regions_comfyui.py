"""Per-subject regions in the SNF Sampler, the Guider and the Stage Sweep, with tiny models on CPU."""

from __future__ import annotations

import functools

import pytest
import torch

from dev.devkit import tiny_comfy
from test_snf_sampler_comfyui import SEED, EvaluationLog

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


def test_layout_node_makes_one_mask_per_subject(comfyui):
    masks = halves(comfyui)
    assert masks.shape == (2, 64, 96)
    assert masks[0, :, :48].min() == 1 and masks[0, :, 48:].max() == 0 and torch.equal(masks[1], 1 - masks[0])
    thirds = comfyui.run("FaceDiffuserRegionLayout", layout="thirds", subjects=3, width=96, height=64, boxes="")[0]
    assert thirds.sum(dim=0).eq(1).all() and thirds[1, :, 32:64].min() == 1
    boxes = comfyui.run("FaceDiffuserRegionLayout", layout="boxes", subjects=2, width=100, height=50, boxes="0 0 0.3 1; 0.6, 0.2, 1, 1")[0]
    assert boxes[0].sum() == 30 * 50 and boxes[1, 10:, 60:].min() == 1 and boxes[1].sum() == 40 * 40
    with pytest.raises(ValueError, match="Face-diffuser Region Layout: 'halves' makes 2 regions but 3 subject"):
        comfyui.run("FaceDiffuserRegionLayout", layout="halves", subjects=3, width=96, height=64, boxes="")
    with pytest.raises(ValueError, match=r"Face-diffuser Region Layout: box 2 \('0.5 0 2 1'\) must have"):
        comfyui.run("FaceDiffuserRegionLayout", layout="boxes", subjects=2, width=96, height=64, boxes="0 0 .5 1; 0.5 0 2 1")


def test_no_token_of_a_subject_reaches_queries_outside_its_region(comfyui, models, monkeypatch):
    """Probe every cross-attention call of the SDM, on the attention backend ComfyUI selected: changing
    subject k's key and value rows leaves the output bit for bit the same at every query outside region k
    (it got exactly zero attention), and changes it inside; the plain rows reach only the outside, and never
    the text branch."""
    import comfy.ldm.modules.attention as attention

    tdm, sdm = models
    conds = subject_conds(comfyui)
    real = attention.optimized_attention_masked
    probes = []

    @functools.wraps(real)  # the backend it probes, which takes the mask
    def probe(q, k, v, heads, mask=None, **kwargs):
        out = real(q, k, v, heads, mask, **kwargs)
        prompt_keys = k.shape[1] - len(ROWS)
        changed = {}
        for name, key_rows in (("fused", ROWS), ("plain", [prompt_keys + s for s in range(len(ROWS))])):
            for subject, row in enumerate(key_rows):
                k2, v2 = k.clone(), v.clone()
                k2[:, row] += 1.0
                v2[:, row] += 1.0
                changed[name, subject] = (real(q, k2, v2, heads, mask, **kwargs) != out).any(dim=-1)  # (batch, queries)
        probes.append((kwargs["transformer_options"]["activations_shape"], kwargs["transformer_options"]["cond_or_uncond"], changed))
        return out

    monkeypatch.setattr(attention, "optimized_attention_masked", probe)
    sample(comfyui, tdm, sdm, conds, alpha=0.0, beta=0.0, steps=2, regions=halves(comfyui))
    assert len(probes) >= 2 * 3  # two steps, three transformer blocks in the tiny UNet
    for shape, cond_or_uncond, changed in probes:
        height, width = shape[-2:]
        left = (torch.arange(width) < width // 2).repeat(height)  # subject 1's half, row-major queries
        inside = {0: left, 1: ~left}
        per_chunk = changed["fused", 0].shape[0] // len(cond_or_uncond)
        for chunk, kind in enumerate(cond_or_uncond):
            entries = slice(chunk * per_chunk, (chunk + 1) * per_chunk)
            for subject in (0, 1):
                fused, plain = changed["fused", subject][entries], changed["plain", subject][entries]
                if kind == 1:  # the text branch never sees the appended rows
                    assert not plain.any()
                    continue
                assert not fused[:, ~inside[subject]].any() and fused[:, inside[subject]].all()
                assert not plain[:, inside[subject]].any() and plain[:, ~inside[subject]].all()


def test_regions_covering_everything_equal_no_regions(comfyui, models):
    tdm, sdm = models
    conds = subject_conds(comfyui)
    everywhere = torch.ones(2, HEIGHT * 8, WIDTH * 8)
    with_regions, saliency = sample(comfyui, tdm, sdm, conds, regions=everywhere)
    without, plain_saliency = sample(comfyui, tdm, sdm, conds)
    torch.testing.assert_close(with_regions["samples"], without["samples"], rtol=0, atol=1e-5)
    assert [torch.equal(a.sdm_chosen, b.sdm_chosen) for a, b in zip(saliency.decisions, plain_saliency.decisions)] == [True] * 2


def test_without_regions_the_subject_rows_change_nothing(comfyui, models):
    """The Subject Prompt now records the subject rows in the augmented conditioning: unused, the run is
    today's, bit for bit."""
    tdm, sdm = models
    conds = subject_conds(comfyui)
    bare = dict(conds, augmented=[[conds["augmented"][0][0], {}]])
    assert torch.equal(sample(comfyui, tdm, sdm, conds)[0]["samples"], sample(comfyui, tdm, sdm, bare)[0]["samples"])
    assert not sdm.model_options.get("transformer_options", {}).get("patches_replace")


def test_regions_change_the_picture_and_leave_the_models_unpatched(comfyui, models):
    tdm, sdm = models
    conds = subject_conds(comfyui)
    before = dict(sdm.model_options.get("transformer_options", {}))
    with_regions, _ = sample(comfyui, tdm, sdm, conds, regions=halves(comfyui))
    without, _ = sample(comfyui, tdm, sdm, conds)
    assert (with_regions["samples"] - without["samples"]).abs().max() > 1e-3
    assert sdm.model_options.get("transformer_options", {}) == before


def test_outside_the_regions_fusion_keeps_the_tdm(comfyui, models, monkeypatch):
    snf_guider = comfyui.pack("nodes.snf_guider")
    tdm, sdm = models
    conds = subject_conds(comfyui)
    real_fuse = snf_guider.snf.fuse
    fusions = []

    def spy(tdm_prediction, sdm_prediction, decision):
        fused = real_fuse(tdm_prediction, sdm_prediction, decision)
        fusions.append((tdm_prediction, fused, decision.sdm_chosen))
        return fused

    monkeypatch.setattr(snf_guider.snf, "fuse", spy)
    box = torch.zeros(2, HEIGHT * 8, WIDTH * 8)
    box[0, :, :40], box[1, :, 56:] = 1, 1  # latent columns 5 and 6 are outside both regions
    sample(comfyui, tdm, sdm, conds, regions=box)
    paper = [chosen for _, _, chosen in fusions]
    fusions.clear()
    sample(comfyui, tdm, sdm, conds, regions=box, outside_regions="tdm")
    assert len(fusions) == len(paper) == 2
    middle = slice(5, 7)
    # The SDM's guidance is near zero outside the regions (the plain text there), but the convolutions carry
    # some of it over the border, where SNF alone takes the SDM at places.
    assert any(chosen[..., middle].any() for chosen in paper)
    for tdm_prediction, fused, chosen in fusions:
        assert torch.equal(fused[..., middle], tdm_prediction[..., middle]) and not chosen[..., middle].any()
        assert chosen[..., :5].any() and chosen[..., 7:].any()


def test_regions_cost_no_extra_unet_evaluation(comfyui, models):
    counts = []
    for region_inputs in ({}, {"regions": halves(comfyui), "outside_regions": "tdm"}):
        tdm_log, sdm_log = EvaluationLog(models[0]), EvaluationLog(models[1])
        sample(comfyui, tdm_log.patcher, sdm_log.patcher, subject_conds(comfyui), **region_inputs)
        counts.append((tdm_log.rows(), len(tdm_log.calls), sdm_log.rows(), len(sdm_log.calls)))
    tdm_rows, tdm_calls, sdm_rows, sdm_calls = counts[0]
    assert counts[0] == counts[1] and tdm_rows == 2 * tdm_calls and sdm_rows == 2 * sdm_calls and tdm_calls and sdm_calls


def test_guider_and_stage_sweep_take_regions(comfyui, models):
    tdm, sdm = models
    conds = subject_conds(comfyui)
    masks = halves(comfyui)
    expected, _ = sample(comfyui, tdm, sdm, conds, steps=10, regions=masks)
    guider, _ = comfyui.run("FaceDiffuserGuider", tdm=tdm, sdm=sdm, cfg=5.0, alpha=0.3, beta=0.6, regions=masks, **conds)
    torch.testing.assert_close(sample_with_guider(comfyui, sdm, guider)["samples"], expected["samples"], rtol=1e-5, atol=1e-5)
    swept, _ = sweep(comfyui, tdm, sdm, conds, regions=masks)
    torch.testing.assert_close(swept["samples"], expected["samples"], rtol=1e-5, atol=1e-5)


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


@pytest.mark.parametrize("rows, tokens, text_tokens", [((5, 100), 154, 154), ((5, 9), 77, 154)])
def test_long_prompts(comfyui, models, rows, tokens, text_tokens):
    """A two-chunk prompt with a subject in the second chunk; a one-chunk augmented prompt beside a two-chunk
    text prompt, which ComfyUI batches by repeating the shorter one: covering regions still equal none."""
    tdm, sdm = models
    conds = subject_conds(comfyui, rows=rows, tokens=tokens, text_tokens=text_tokens)
    everywhere = torch.ones(2, HEIGHT * 8, WIDTH * 8)
    with_regions, _ = sample(comfyui, tdm, sdm, conds, regions=everywhere)
    without, _ = sample(comfyui, tdm, sdm, conds)
    torch.testing.assert_close(with_regions["samples"], without["samples"], rtol=0, atol=1e-5)
    split, _ = sample(comfyui, tdm, sdm, conds, regions=halves(comfyui))
    assert (split["samples"] - without["samples"]).abs().max() > 1e-3


def test_bad_regions_name_the_node_the_input_and_the_fix(comfyui, models):
    tdm, sdm = models
    conds = subject_conds(comfyui)
    masks = halves(comfyui)
    with pytest.raises(ValueError, match="Face-diffuser SNF Sampler: the 'regions' input: it holds 3 mask.*2 <|image|> marker"):
        sample(comfyui, tdm, sdm, conds, regions=torch.ones(3, 64, 96))
    empty = masks.clone()
    empty[1] = 0
    with pytest.raises(ValueError, match="Face-diffuser SNF Sampler: the 'regions' input: mask 2 is empty"):
        sample(comfyui, tdm, sdm, conds, regions=empty)
    with pytest.raises(ValueError, match="Face-diffuser SNF Sampler: the 'regions' input: the masks are 64x64 but the latent is 96x64"):
        sample(comfyui, tdm, sdm, conds, regions=torch.ones(2, 64, 64))
    bare = dict(conds, augmented=[[conds["augmented"][0][0], {}]])
    with pytest.raises(ValueError, match="Face-diffuser Guider: 'regions' is connected but the 'augmented' conditioning carries no subject"):
        comfyui.run("FaceDiffuserGuider", tdm=tdm, sdm=sdm, cfg=5.0, alpha=0.3, beta=0.6, regions=masks, **bare)
    with pytest.raises(ValueError, match="Face-diffuser SNF Sampler: outside_regions is 'tdm' but 'regions' is not connected"):
        sample(comfyui, tdm, sdm, conds, outside_regions="tdm")


def with_replacements(comfyui, sdm, replacement):
    """The SDM with another node's attn2 replacement (IPAdapter-style) on every transformer block, keyed by the
    block on the first and by block and transformer index on the others (ComfyUI prefers the latter)."""
    blocks = comfyui.pack("nodes.region_patch").attention_blocks(sdm.model.diffusion_model)
    replaced = sdm.clone()
    replaced.set_model_attn2_replace(replacement, *blocks[0])
    for kind, number in blocks[1:]:
        replaced.set_model_attn2_replace(replacement, kind, number, 0)
    return replaced


def test_a_replacement_already_on_the_sdm_runs_per_region_group(comfyui, models):
    """A replacement that takes no mask (plain attention plus a term of each query's own, as IPAdapter adds its
    image attention) runs once per group of queries lying in the same regions, on the keys they see, with the
    prompt's length: exactly the masked attention plus its term."""
    import comfy.ldm.modules.attention as attention

    tdm, sdm = models
    conds = subject_conds(comfyui)
    masks = halves(comfyui)
    key_counts = []

    def ip_adapter_like(q, k, v, extra):
        key_counts.append(k.shape[1])
        return attention.optimized_attention(q, k, v, extra["n_heads"]) + 0.5 * q.tanh()

    regions = comfyui.pack("facediffuser_core.regions")
    tokens = conds["augmented"][0][1][regions.SUBJECTS_KEY]
    sampling_regions = comfyui.pack("nodes.regions").SamplingRegions("test", tokens, "snf")
    sampling_regions.use(masks)
    augmented_entry = {"uuid": "augmented", "cross_attn": conds["augmented"][0][0], regions.SUBJECTS_KEY: tokens}
    sampling_regions.start_run((2, 4, HEIGHT, WIDTH), [augmented_entry])
    patched = with_replacements(comfyui, sdm, ip_adapter_like).clone()
    comfyui.pack("nodes.region_patch").patch(patched, sampling_regions)
    replacements = patched.model_options["transformer_options"]["patches_replace"]["attn2"]
    scoped = sampling_regions.attention
    generator = torch.Generator().manual_seed(3)
    heads, width = 2, 16
    q = torch.randn(2, HEIGHT * WIDTH, width, generator=generator)
    k, v = (torch.randn(2, 77 + len(ROWS), width, generator=generator) for _ in range(2))
    extra = {"n_heads": heads, "original_shape": [2, 4, HEIGHT, WIDTH], "activations_shape": [2, width, HEIGHT, WIDTH], "cond_or_uncond": [0, 1],
             "uuids": ["augmented", "text"]}
    bias = scoped.bias(sampling_regions.chunks(extra), extra["activations_shape"], 2, k.shape[1], q.dtype, q.device)
    expected = attention.optimized_attention_masked(q, k, v, heads, bias) + 0.5 * q.tanh()
    keyed = [key for key in replacements if len(key) == 3] + [key for key in replacements if len(key) == 2][:1]
    for key in keyed:
        key_counts.clear()
        torch.testing.assert_close(replacements[key](q, k, v, extra), expected, rtol=0, atol=1e-5)
        assert key_counts == [77, 77]  # one call per group (left half, right half), with the prompt's keys
    assert len(keyed) == len(comfyui.pack("nodes.region_patch").attention_blocks(sdm.model.diffusion_model))


def test_sampling_through_a_replacement_on_the_sdm_equals_the_masked_attention(comfyui, models):
    import comfy.ldm.modules.attention as attention

    tdm, sdm = models
    conds = subject_conds(comfyui)
    masks = halves(comfyui)
    plain_attention = with_replacements(comfyui, sdm, lambda q, k, v, extra: attention.optimized_attention(q, k, v, extra["n_heads"]))
    through, _ = sample(comfyui, tdm, plain_attention, conds, regions=masks)
    masked, _ = sample(comfyui, tdm, sdm, conds, regions=masks)
    torch.testing.assert_close(through["samples"], masked["samples"], rtol=1e-5, atol=1e-5)  # float rounding over 6 steps
    without, _ = sample(comfyui, tdm, plain_attention, conds)
    assert (through["samples"] - without["samples"]).abs().max() > 1e-3
