"""SNF against an independent reference written here from SPEC.md, on random shapes and dtypes."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from facediffuser_core import snf
from snf_reference import reference_saliency


shapes = st.tuples(
    st.integers(1, 3),  # batch
    st.integers(1, 5),  # channels
    st.integers(2, 19),  # height
    st.integers(2, 19),  # width
)


@settings(max_examples=60, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31 - 1), scale=st.sampled_from([0.05, 1.0, 20.0]))
def test_saliency_matches_reference(shape, seed, scale):
    guidance = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    expected = reference_saliency(guidance.numpy())
    actual = snf.saliency_map(guidance)
    assert actual.shape == (shape[0], shape[2], shape[3])
    assert actual.dtype == torch.float32
    np.testing.assert_allclose(actual.numpy(), expected, rtol=2e-5, atol=1e-9)
    np.testing.assert_allclose(actual.sum(dim=(1, 2)).numpy(), 1.0, rtol=1e-5)


@pytest.mark.parametrize("shape", [(1, 4, 64, 64), (2, 4, 96, 128), (1, 4, 3, 200)])
def test_saliency_matches_reference_at_picture_sizes(shape):
    """512x512 and 768x1024 pictures' latents and a thin strip: the smoothing matrices at the sizes users sample."""
    guidance = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3
    np.testing.assert_allclose(snf.saliency_map(guidance).numpy(), reference_saliency(guidance.numpy()), rtol=2e-5, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31 - 1), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_fusion_takes_all_channels_of_the_more_salient_model(shape, seed, dtype):
    generator = torch.Generator().manual_seed(seed)
    tdm_guidance, sdm_guidance, tdm_eps, sdm_eps = (torch.randn(shape, generator=generator).to(dtype) for _ in range(4))

    decision = snf.decide(tdm_guidance, sdm_guidance)
    fused = snf.fuse(tdm_eps, sdm_eps, decision)

    tdm_ref = reference_saliency(tdm_guidance.double().numpy())
    sdm_ref = reference_saliency(sdm_guidance.double().numpy())
    assert fused.dtype == dtype and fused.shape == shape
    # Where the reference maps differ clearly, the choice must agree; near-ties may go either way in
    # low precision because the maps are computed from rounded inputs.
    clear = np.abs(sdm_ref - tdm_ref) > 1e-6 * np.maximum(sdm_ref, tdm_ref)
    np.testing.assert_array_equal(decision.sdm_chosen.numpy()[clear], (sdm_ref > tdm_ref)[clear])
    chosen = decision.sdm_chosen.unsqueeze(1).expand(shape)
    assert torch.equal(fused[chosen], sdm_eps[chosen])
    assert torch.equal(fused[~chosen], tdm_eps[~chosen])


def test_ties_go_to_the_tdm():
    guidance = torch.randn(2, 4, 6, 5)
    decision = snf.decide(guidance, guidance.clone())
    assert not decision.sdm_chosen.any()
    tdm_eps, sdm_eps = torch.zeros(2, 4, 6, 5), torch.ones(2, 4, 6, 5)
    assert torch.equal(snf.fuse(tdm_eps, sdm_eps, decision), tdm_eps)


def test_a_model_salient_in_one_region_wins_that_region():
    """The behaviour the paper relies on: the SDM's guidance is strong on the face, the TDM's elsewhere."""
    tdm_guidance = torch.full((1, 4, 16, 16), 0.5)
    sdm_guidance = torch.full((1, 4, 16, 16), 0.1)
    sdm_guidance[:, :, 4:10, 5:11] = 3.0
    decision = snf.decide(tdm_guidance, sdm_guidance)
    assert decision.sdm_chosen[0, 5:9, 6:10].all()
    assert not decision.sdm_chosen[0, 13:, :].any()
    assert not decision.sdm_chosen[0, :, 14:].any()


def test_saliency_is_softmax_of_scale_so_epsilon_and_denoised_spaces_differ():
    """Why the guider converts to epsilon: scaling g (as dividing by sigma does) changes the maps."""
    guidance = torch.randn(1, 4, 8, 8)
    assert not torch.allclose(snf.saliency_map(guidance), snf.saliency_map(guidance * 10))


@pytest.mark.parametrize("shape", [(4, 8, 8), (1, 4, 1, 8), (1, 4, 8, 1)])
def test_bad_shapes_are_rejected_with_the_reason(shape):
    with pytest.raises(ValueError, match="SNF"):
        snf.saliency_map(torch.randn(shape))


def test_mismatched_model_outputs_are_rejected():
    with pytest.raises(ValueError, match="TDM .*SDM"):
        snf.decide(torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 9))


def test_record_summary_averages_decisions():
    record = snf.SaliencyRecord()
    for step, value in ((3, True), (4, False), (5, True)):
        saliency = torch.full((1, 2, 2), 0.25)
        record.add(step, snf.FusionDecision(saliency, saliency * (2 if value else 0.5), torch.full((1, 2, 2), value)))
    summary = record.summary()
    assert torch.allclose(summary.sdm_fraction, torch.full((1, 2, 2), 2 / 3))
    assert torch.allclose(summary.sdm_saliency, torch.full((1, 2, 2), (0.5 + 0.125 + 0.5) / 3))
    assert record.steps == [3, 4, 5]
    record.clear()
    with pytest.raises(ValueError, match="no fusion step"):
        record.summary()


def test_smoothing_made_in_inference_mode_serves_a_run_that_autograd_tracks():
    """ComfyUI samples in inference mode; the smoothing matrices it makes there are kept for later runs, one of
    which may take gradients (a sampler's guidance, a test outside inference mode)."""
    snf._smoothing_operators.clear()
    with torch.inference_mode():
        snf.saliency_map(torch.randn(1, 4, 7, 9))
    guidance = torch.randn(1, 4, 7, 9, requires_grad=True)
    snf.saliency_map(guidance).max().backward()
    assert guidance.grad is not None and guidance.grad.abs().sum() > 0
