import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from facediffuser_core import saliency_view, snf
from facediffuser_core.schedule import OFFICIAL_DEMO_ALPHA, OFFICIAL_DEMO_BETA, Stage, StageSchedule, StepLocator


def test_official_demo_split_is_15_30_inclusive_at_50_steps():
    schedule = StageSchedule.from_fractions(OFFICIAL_DEMO_ALPHA, OFFICIAL_DEMO_BETA, 50)
    stages = [schedule.stage_at(i) for i in range(50)]
    # The official loop: i <= 15 scene, 15 < i <= 30 fusion, i > 30 subject.
    assert stages == [Stage.SCENE] * 16 + [Stage.FUSION] * 15 + [Stage.SUBJECT] * 19
    assert schedule.evaluations() == 130


def test_official_test_script_split_is_10_30():
    schedule = StageSchedule.from_fractions(0.22, 0.62, 50)
    assert (schedule.scene_end, schedule.fusion_end) == (11, 31)


@pytest.mark.parametrize(
    "alpha, beta, steps, expected",
    [
        (0.0, 0.0, 10, (0, 0)),  # SDM only
        (1.0, 1.0, 10, (10, 10)),  # TDM only
        (0.0, 1.0, 10, (0, 10)),  # fusion throughout
        (0.25, 0.75, 2, (1, 2)),  # 0.5 and 1.5 round half up, never to even
        (0.3, 0.6, 1, (0, 1)),
        (0.05, 0.05, 10, (1, 1)),  # empty fusion stage
    ],
)
def test_boundaries_round_half_up(alpha, beta, steps, expected):
    schedule = StageSchedule.from_fractions(alpha, beta, steps)
    assert (schedule.scene_end, schedule.fusion_end) == expected


@given(alpha=st.floats(0, 1), beta=st.floats(0, 1), steps=st.integers(1, 1000))
def test_stages_are_contiguous_and_ordered(alpha, beta, steps):
    alpha, beta = min(alpha, beta), max(alpha, beta)
    schedule = StageSchedule.from_fractions(alpha, beta, steps)
    stages = [schedule.stage_at(i) for i in range(steps)]
    assert stages == sorted(stages, key=[Stage.SCENE, Stage.FUSION, Stage.SUBJECT].index)
    assert stages.count(Stage.SCENE) == math.floor(alpha * steps + 0.5)
    assert stages.count(Stage.SCENE) + stages.count(Stage.FUSION) == math.floor(beta * steps + 0.5)


@pytest.mark.parametrize(
    "alpha, beta, steps, message",
    [
        (0.7, 0.3, 50, "alpha .* must not exceed beta"),
        (-0.1, 0.5, 50, "alpha must be a fraction"),
        (0.1, 1.5, 50, "beta must be a fraction"),
        (float("nan"), 0.5, 50, "alpha must be a fraction"),
        (0.3, 0.6, 0, "at least one step"),
    ],
)
def test_bad_fractions_are_rejected(alpha, beta, steps, message):
    with pytest.raises(ValueError, match=message):
        StageSchedule.from_fractions(alpha, beta, steps)


def test_step_locator_places_schedule_points_and_intermediate_levels():
    sigmas = [14.6, 8.0, 4.0, 2.0, 1.0, 0.0]
    locator = StepLocator(sigmas)
    assert [locator.step_for(s) for s in sigmas[:-1]] == [0, 1, 2, 3, 4]
    assert locator.step_for(3.0) == 2  # a midpoint evaluation inside step 2 (dpm_2, dpmpp_2s, ...)
    assert locator.step_for(0.3) == 4
    assert locator.step_for(20.0) == 0  # above the schedule (sigma_hat with churn)
    assert locator.step_for(4.0 * (1 - 1e-6)) == 2  # recomputed in lower precision


def test_step_locator_places_a_part_of_the_schedule_on_its_whole_steps():
    whole = [9.0, 7.0, 5.0, 2.0, 1.0, 0.0]
    locator = StepLocator(whole)
    tail = whole[2:]  # what denoise < 1 or the low half of SplitSigmas runs
    assert [locator.step_for(s) for s in tail[:-1]] == [2, 3, 4]
    assert all(locator.on_schedule(s) for s in tail)
    assert locator.on_schedule(5.0 * (1 + 1e-6))
    assert not locator.on_schedule(6.0) and not locator.on_schedule(0.5)


def test_saliency_view_shapes_and_mask():
    tdm = torch.rand(2, 4, 6)
    sdm = torch.rand(2, 4, 6)
    fraction = (sdm > tdm).float()
    images, mask = saliency_view.render(snf.SaliencySummary(tdm, sdm, fraction), (32, 48))
    assert images.shape == (6, 32, 48, 3) and mask.shape == (2, 32, 48)
    assert torch.equal(mask[:, ::8, ::8], fraction)
    assert images.min() >= 0 and images.max() <= 1
    # The third panel of each sample is the share painted by the SDM, in grey.
    assert torch.equal(images[2, ..., 0], mask[0])
    assert torch.equal(images[5, ..., 1], mask[1])


def test_saliency_view_overlay_and_batch_mismatch():
    summary = snf.SaliencySummary(torch.rand(1, 2, 2), torch.rand(1, 2, 2), torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]))
    image = torch.zeros(1, 16, 16, 3)
    images, _ = saliency_view.render(summary, (16, 16), image=image)
    assert images.shape == (4, 16, 16, 3)
    overlay = images[3]
    assert torch.allclose(overlay[0, 0], saliency_view.SDM_TINT * saliency_view.OVERLAY_OPACITY)
    assert torch.allclose(overlay[0, 15], saliency_view.TDM_TINT * saliency_view.OVERLAY_OPACITY)
    with pytest.raises(ValueError, match="image batch has 2 images"):
        saliency_view.render(summary, (16, 16), image=torch.zeros(2, 16, 16, 3))


def test_saliency_heatmaps_show_structure_of_near_uniform_softmax_maps():
    """Real saliency maps are softmaxes over H*W pixels, all close to 1/(H*W): the pictures must still span
    the whole colour ramp, with the lowest of both maps dark and the highest bright."""
    tdm = snf.saliency_map(torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)))
    sdm = snf.saliency_map(torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1)))
    images, _ = saliency_view.render(snf.SaliencySummary(tdm, sdm, (sdm > tdm).float()), (16, 16))
    brightness = images[:2].sum(dim=-1)
    assert brightness.min() < 0.1 and brightness.max() > 2.5


def test_denoise_schedule_follows_ksampler():
    import torch

    from facediffuser_core.schedule import denoise_schedule

    made = []

    def calculate(n):
        made.append(n)
        return torch.arange(n, -1, -1, dtype=torch.float32)

    sigmas, whole = denoise_schedule(calculate, 10, 1.0)
    assert made == [10] and sigmas is whole and len(whole) == 11
    assert len(denoise_schedule(calculate, 10, 0.99995)[0]) == 11 and made[-1] == 10  # KSampler's "> 0.9999"
    sigmas, whole = denoise_schedule(calculate, 10, 0.3)
    assert made[-1] == 33 and whole.tolist() == list(range(33, -1, -1)) and sigmas.tolist() == list(range(10, -1, -1))
    sigmas, whole = denoise_schedule(calculate, 10, 0.0)
    assert len(sigmas) == 0 and whole is None and made[-1] == 33
