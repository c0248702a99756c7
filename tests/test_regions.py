"""facediffuser_core.regions: masks, layouts, the token-scoped attention mask and the fusion restriction."""

import pytest
import torch

from facediffuser_core import regions


def tokens(rows=(2, 5), prompt_rows=8, width=4):
    return regions.SubjectTokens(tuple(rows), prompt_rows, torch.arange(len(rows) * width, dtype=torch.float32).reshape(len(rows), width))


def test_layouts():
    masks = regions.layout_masks("halves", 2, 10, 8)
    assert masks.shape == (2, 8, 10) and masks[0, :, :5].min() == 1 and masks[0, :, 5:].max() == 0
    thirds = regions.layout_masks("thirds", 3, 9, 8)
    assert torch.equal(thirds.sum(0), torch.ones(8, 9)) and thirds[2, :, 6:].min() == 1
    boxes = regions.layout_masks("boxes", 2, 10, 10, "0 0 0.5 0.5; 0.5,0.5,1,1")
    assert boxes[0].sum() == 25 and boxes[1, 5:, 5:].min() == 1
    for args, message in (
        (("thirds", 2, 9, 9), "'thirds' makes 3 regions but 2 subject"),
        (("boxes", 2, 9, 9, "0 0 1 1"), "'boxes' lists 1 box"),
        (("boxes", 1, 9, 9, "0 0 one 1"), r"box 1 \('0 0 one 1'\) is not four numbers"),
        (("boxes", 1, 9, 9, "0.5 0 0.4 1"), "0 <= x0 < x1 <= 1"),
        (("grid", 1, 9, 9), "unknown layout 'grid'"),
        (("halves", 2, 9, 4), "the picture is 9x4; regions need at least 8x8"),
    ):
        with pytest.raises(ValueError, match=message):
            regions.layout_masks(*args)


def test_mask_checks():
    assert regions.check_masks(torch.ones(4, 4), 1).shape == (1, 4, 4)
    with pytest.raises(ValueError, match="it holds 2 mask.*1 <|image|> marker"):
        regions.check_masks(torch.ones(2, 4, 4), 1)
    with pytest.raises(ValueError, match="mask 2 is empty"):
        regions.check_masks(torch.stack([torch.ones(4, 4), torch.full((4, 4), 0.4)]), 2)
    regions.check_aspect(torch.ones(1, 520, 512), 64, 64)  # within one latent pixel
    with pytest.raises(ValueError, match="the masks are 512x512 but the latent is 768x512 pixels, another aspect ratio"):
        regions.check_aspect(torch.ones(1, 512, 512), 64, 96)


def test_cells_take_half_covered_cells_and_keep_thin_regions():
    mask = torch.zeros(1, 8, 8)
    mask[0, :, :3] = 1  # 3 of 8 columns
    assert regions.cells(mask, 4, 4)[0, 0].tolist() == [True, True, False, False]  # column 1 covered by half
    thin = torch.zeros(1, 8, 8)
    thin[0, :, 0] = 1  # an eighth of each coarse cell: kept wherever it touches
    assert regions.cells(thin, 2, 2)[0].tolist() == [[True, False], [True, False]]


def started(masks, width=4, height=2):
    """A RegionAttention over a width x height latent, with tokens() as the subjects."""
    attention = regions.RegionAttention(masks, tokens(), "Node")
    attention.start(height, width)
    return attention


def whole(rows=8, width=4, height=2):
    """A chunk with the subjects over the whole latent."""
    return regions.PromptChunk(rows, 0, 0, height, width)


def test_bias_scopes_each_subject_token_and_its_plain_row():
    attention = started(regions.layout_masks("halves", 2, 16, 8))
    bias = attention.bias((whole(), None), (1, 32, 2, 4), 2, 8 + 2, torch.float32, "cpu")
    assert bias.shape == (2, 8, 10)
    left = torch.tensor([True, True, False, False] * 2)
    augmented, text = bias[0] == 0, bias[1] == 0
    assert torch.equal(augmented[:, 2], left) and torch.equal(augmented[:, 8], ~left)
    assert torch.equal(augmented[:, 5], ~left) and torch.equal(augmented[:, 9], left)
    assert augmented[:, [0, 1, 3, 4, 6, 7]].all() and text[:, :8].all() and not text[:, 8:].any()
    # A prompt repeated to a longer batch-mate's length: every copy of the token is scoped.
    repeated = attention.bias((whole(),), (1, 32, 2, 4), 1, 16 + 2, torch.float32, "cpu")[0] == 0
    assert torch.equal(repeated[:, 10], left) and torch.equal(repeated[:, 13], ~left)
    with pytest.raises(ValueError, match="Node: the SDM's cross-attention has 11 keys"):
        attention.bias((whole(),), (1, 32, 2, 4), 1, 11, torch.float32, "cpu")
    with pytest.raises(ValueError, match="Node: the 'regions' input: the masks are 16x8 but the latent is 64x64"):
        attention.start(8, 8)


def test_masked_softmax_gives_exactly_zero_weight_outside():
    attention = started(regions.layout_masks("halves", 2, 16, 8))
    bias = attention.bias((whole(),), (1, 32, 2, 4), 1, 10, torch.float32, "cpu")
    weights = (torch.randn(1, 8, 10, generator=torch.Generator().manual_seed(0)) * 3 + bias).softmax(-1)
    left = torch.tensor([True, True, False, False] * 2)
    assert (weights[0, ~left, 2] == 0).all() and (weights[0, left, 2] > 0).all()


def test_extend_context_appends_the_plain_rows():
    attention = regions.RegionAttention(torch.ones(2, 8, 8), tokens(), "Node")
    context = torch.zeros(3, 8, 4, dtype=torch.float16)
    extended = attention.extend_context(context)
    assert extended.shape == (3, 10, 4) and extended.dtype == torch.float16
    assert torch.equal(extended[2, 8:], attention.tokens.plain.half())


def test_restrict_fusion():
    chosen = torch.ones(2, 4, 8, dtype=torch.bool)
    masks = torch.zeros(1, 32, 64)
    masks[0, :, :16] = 1
    restricted = regions.FusionArea(masks).restrict(chosen)
    assert restricted[:, :, :2].all() and not restricted[:, :, 2:].any()
