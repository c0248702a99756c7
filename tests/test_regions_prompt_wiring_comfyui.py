"""Regions with the conditioning nodes a graph may put between the Subject Prompt and 'augmented': each subject
row reaches exactly the queries of its region, wherever ConditioningConcat, ConditioningCombine, a ControlNet, a
timestep range or an area put the prompt; what cannot work stops with an error naming the node and the fix.

The reach is probed in every cross-attention call of the SDM (tiny models, CPU): a key row reaches a query when
changing that row's key and value changes the query's output."""

from __future__ import annotations

import functools

import pytest
import torch

from dev.devkit import tiny_comfy
from test_graphs_comfyui import apply_advanced
from test_regions_comfyui import HEIGHT, ROWS, WIDTH, halves, sample, subject_conds

EVERYWHERE = torch.ones(2, HEIGHT * 8, WIDTH * 8)


def reach(comfyui, monkeypatch, tdm, sdm, conds, rows, latent_width=WIDTH, **region_inputs):
    """Per SDM cross-attention call: (activations_shape, per chunk (uuid, cond or uncond), {row: (batch, queries)
    bool}), `rows(keys)` the key rows to probe at a call with that many keys."""
    import comfy.ldm.modules.attention as attention

    real = attention.optimized_attention_masked
    calls = []

    @functools.wraps(real)  # the backend it probes, which takes the mask
    def probe(q, k, v, heads, mask=None, **kwargs):
        out = real(q, k, v, heads, mask, **kwargs)
        changed = {}
        for row in rows(k.shape[1]):
            k2, v2 = k.clone(), v.clone()
            k2[:, row] += 1.0
            v2[:, row] += 1.0
            changed[row] = (real(q, k2, v2, heads, mask, **kwargs) != out).any(dim=-1)
        options = kwargs["transformer_options"]
        calls.append((options["activations_shape"], list(zip(options["uuids"], options["cond_or_uncond"])), changed))
        return out

    monkeypatch.setattr(attention, "optimized_attention_masked", probe)
    sample(comfyui, tdm, sdm, conds, alpha=0.0, beta=0.0, steps=1, **region_inputs)
    monkeypatch.undo()
    assert calls
    return calls


def per_chunk(calls):
    """(activations_shape, uuid, cond or uncond, {row: (queries,) bool}) per chunk of every call."""
    for shape, chunks, changed in calls:
        entries = next(iter(changed.values())).shape[0] // len(chunks)
        for index, (uuid, kind) in enumerate(chunks):
            yield shape, uuid, kind, {row: reached[index * entries:(index + 1) * entries].any(dim=0) for row, reached in changed.items()}


def left_half(shape, left_columns=None):
    height, width = shape[-2:]
    return (torch.arange(width) < (left_columns or width // 2)).repeat(height)


def assert_scoped(reached, shape, subject_rows=ROWS, plain_rows=None):
    """Subject 1 reaches the left half only, subject 2 the right half only; their plain rows the rest."""
    left = left_half(shape)
    for subject, row in enumerate(subject_rows):
        inside = left if subject == 0 else ~left
        assert torch.equal(reached[row], inside)
        if plain_rows is not None:
            assert torch.equal(reached[plain_rows[subject]], ~inside)


def test_concatenated_style_prompt_is_seen_everywhere_and_the_subjects_where_they_are(comfyui, models, monkeypatch):
    """ConditioningConcat(augmented, style): 154 rows, the subjects at 5 and 9, the style prompt after them; rows
    82 and 86 are the style prompt's, never the subjects' (taken for a repeat of the prompt before)."""
    tdm, sdm = models
    conds = subject_conds(comfyui)
    style = [[torch.randn(1, 77, conds["text"][0][0].shape[-1], generator=torch.Generator().manual_seed(30)), {}]]
    (concatenated,) = comfyui.run("ConditioningConcat", conditioning_to=conds["augmented"], conditioning_from=style)
    wired = dict(conds, augmented=concatenated)
    calls = reach(comfyui, monkeypatch, tdm, sdm, wired, lambda keys: [*ROWS, 77 + ROWS[0], 77 + ROWS[1], keys - 2, keys - 1],
                  regions=halves(comfyui))
    augmented_chunks = 0
    for shape, _, kind, reached in per_chunk(calls):
        everywhere = torch.ones(shape[-2] * shape[-1], dtype=torch.bool)
        assert torch.equal(reached[77 + ROWS[0]], everywhere) and torch.equal(reached[77 + ROWS[1]], everywhere)
        if kind == 0:
            augmented_chunks += 1
            keys = max(reached)
            assert_scoped(reached, shape, plain_rows=(keys - 1, keys))
    assert augmented_chunks
    covered, _ = sample(comfyui, tdm, sdm, wired, regions=EVERYWHERE)
    torch.testing.assert_close(covered["samples"], sample(comfyui, tdm, sdm, wired)[0]["samples"], rtol=0, atol=1e-5)


def test_a_prompt_combined_beside_the_augmented_one_sees_its_own_prompt_alone(comfyui, models, monkeypatch):
    tdm, sdm = models
    conds = subject_conds(comfyui)
    other = [[torch.randn(1, 77, conds["text"][0][0].shape[-1], generator=torch.Generator().manual_seed(31)), {}]]
    (combined,) = comfyui.run("ConditioningCombine", conditioning_1=conds["augmented"], conditioning_2=other)
    calls = reach(comfyui, monkeypatch, tdm, sdm, dict(conds, augmented=combined), lambda keys: [*ROWS, keys - 2, keys - 1],
                  regions=halves(comfyui))
    kinds = {"scoped": 0, "alone": 0}
    for shape, _, kind, reached in per_chunk(calls):
        keys = max(reached)
        everywhere = torch.ones(shape[-2] * shape[-1], dtype=torch.bool)
        if kind == 0 and not torch.equal(reached[ROWS[0]], everywhere):
            kinds["scoped"] += 1
            assert_scoped(reached, shape, plain_rows=(keys - 1, keys))
        else:  # the combined prompt and the text branch: their rows everywhere, the appended rows nowhere
            kinds["alone"] += kind == 0
            assert torch.equal(reached[ROWS[0]], everywhere) and not reached[keys - 1].any() and not reached[keys].any()
    assert kinds["scoped"] and kinds["alone"] == kinds["scoped"]


def test_a_controlnet_on_augmented_keeps_the_regions(comfyui, models, monkeypatch):
    tdm, sdm = models
    conds = subject_conds(comfyui)
    hint = torch.rand(1, HEIGHT * 8, WIDTH * 8, 3, generator=torch.Generator().manual_seed(4))
    augmented, text = apply_advanced(comfyui, conds["augmented"], conds["text"], (tiny_comfy.controlnet(3), hint))
    wired = dict(conds, augmented=augmented, text=text)
    calls = reach(comfyui, monkeypatch, tdm, sdm, wired, lambda keys: [*ROWS, keys - 2, keys - 1], regions=halves(comfyui))
    assert any(kind == 0 for _, _, kind, _ in per_chunk(calls))
    for shape, _, kind, reached in per_chunk(calls):
        if kind == 0:
            keys = max(reached)
            assert_scoped(reached, shape, plain_rows=(keys - 1, keys))
    covered, _ = sample(comfyui, tdm, sdm, wired, regions=EVERYWHERE)
    torch.testing.assert_close(covered["samples"], sample(comfyui, tdm, sdm, wired)[0]["samples"], rtol=0, atol=1e-5)


def test_augmented_split_by_timestep_ranges_equals_it_whole(comfyui, models):
    tdm, sdm = models
    conds = subject_conds(comfyui)
    (early,) = comfyui.run("ConditioningSetTimestepRange", conditioning=conds["augmented"], start=0.0, end=0.5)
    (late,) = comfyui.run("ConditioningSetTimestepRange", conditioning=conds["augmented"], start=0.5, end=1.0)
    (split,) = comfyui.run("ConditioningCombine", conditioning_1=early, conditioning_2=late)
    masks = halves(comfyui)
    whole, _ = sample(comfyui, tdm, sdm, conds, regions=masks)
    ranged, _ = sample(comfyui, tdm, sdm, dict(conds, augmented=split), regions=masks)
    torch.testing.assert_close(ranged["samples"], whole["samples"], rtol=1e-5, atol=1e-5)


def test_an_area_conditioning_sees_the_part_of_the_regions_its_area_shows(comfyui, models, monkeypatch):
    """ConditioningSetArea on augmented, the right two thirds of the picture: the SDM's augmented branch runs on
    that crop, where subject 2's half covers the crop's right three quarters and subject 1's the first quarter."""
    tdm, sdm = models
    conds = subject_conds(comfyui)
    (area,) = comfyui.run("ConditioningSetArea", conditioning=conds["augmented"], width=64, height=HEIGHT * 8, x=32, y=0, strength=1.0)
    wired = dict(conds, augmented=area)
    calls = reach(comfyui, monkeypatch, tdm, sdm, wired, lambda keys: [*ROWS, keys - 2, keys - 1], regions=halves(comfyui))
    cropped = 0
    for shape, _, kind, reached in per_chunk(calls):
        if kind != 0:
            continue
        cropped += 1
        assert shape[-1] == shape[-2]  # the crop: latent columns 4 to 11, all 8 rows (and half that in the middle block)
        left = left_half(shape, left_columns=shape[-1] // 4)  # its columns 4 and 5 lie in the left half
        keys = max(reached)
        assert torch.equal(reached[ROWS[0]], left) and torch.equal(reached[ROWS[1]], ~left)
        assert torch.equal(reached[keys - 1], ~left) and torch.equal(reached[keys], left)
    assert cropped
    covered, _ = sample(comfyui, tdm, sdm, wired, regions=EVERYWHERE)
    torch.testing.assert_close(covered["samples"], sample(comfyui, tdm, sdm, wired)[0]["samples"], rtol=0, atol=1e-5)


def test_wiring_regions_cannot_follow_names_the_node_and_the_fix(comfyui, models):
    tdm, sdm = models
    conds = subject_conds(comfyui)
    style = [[torch.randn(1, 77, conds["text"][0][0].shape[-1], generator=torch.Generator().manual_seed(30)), {}]]
    (behind,) = comfyui.run("ConditioningConcat", conditioning_to=style, conditioning_from=conds["augmented"])
    with pytest.raises(ValueError, match="Face-diffuser SNF Sampler: 'regions' is connected but the 'augmented' conditioning carries "
                                         "no subject markers.*ConditioningConcat keeps those of its 'conditioning_to'"):
        sample(comfyui, tdm, sdm, dict(conds, augmented=behind), regions=halves(comfyui))
    cut = [[conds["augmented"][0][0][:, :40], conds["augmented"][0][1]]]
    with pytest.raises(ValueError, match="Face-diffuser SNF Sampler: the 'augmented' conditioning has 40 token rows, fewer than the 77"):
        sample(comfyui, tdm, sdm, dict(conds, augmented=cut), regions=halves(comfyui))
