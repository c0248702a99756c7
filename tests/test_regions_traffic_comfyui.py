"""Regions copy nothing to the device and read nothing back per evaluation: counted during sampling
(dev.devkit.tensor_traffic; on this CPU every call that targets a device or dtype, and every host read),
evaluation by evaluation, against the same run without regions."""

from __future__ import annotations

import pytest
import torch

from dev.devkit.tensor_traffic import TensorTraffic
from test_regions_comfyui import halves, sample, subject_conds, with_replacements

STEPS, ALPHA, BETA = 6, 0.34, 0.67  # ddim_uniform makes it 7: two scene steps, then the SDM in every evaluation


def counted_run(comfyui, tdm, sdm, conds, **region_inputs) -> tuple[TensorTraffic, int]:
    """The run's traffic, and its first evaluation of the SDM."""
    snf_guider = comfyui.pack("nodes.snf_guider")
    traffic = TensorTraffic()
    predict_noise, predict = snf_guider.SNFGuider.predict_noise, snf_guider.ModelSide.predict
    sdm_evaluations = []

    def counted(guider, *args, **kwargs):
        traffic.next_evaluation()
        return predict_noise(guider, *args, **kwargs)

    def seen(side, *args, **kwargs):
        if side.name == "sdm":
            sdm_evaluations.append(traffic.evaluation)
        return predict(side, *args, **kwargs)

    snf_guider.SNFGuider.predict_noise, snf_guider.ModelSide.predict = counted, seen
    try:
        with traffic:
            sample(comfyui, tdm, sdm, conds, alpha=ALPHA, beta=BETA, steps=STEPS, **region_inputs)
    finally:
        snf_guider.SNFGuider.predict_noise, snf_guider.ModelSide.predict = predict_noise, predict
    assert sdm_evaluations[0] == 2 and traffic.evaluation >= 4
    return traffic, sdm_evaluations[0]


def with_plain_attention_replacement(comfyui, sdm):
    import comfy.ldm.modules.attention as attention

    return with_replacements(comfyui, sdm, lambda q, k, v, extra: attention.optimized_attention(q, k, v, extra["n_heads"]))


@pytest.mark.parametrize("path", ["masked", "per group"])
def test_after_the_first_sdm_evaluation_regions_add_no_copy_and_no_host_read(comfyui, models, path):
    tdm, sdm = models
    if path == "per group":  # through another node's replacement on the SDM, which takes no mask
        sdm = with_plain_attention_replacement(comfyui, sdm)
    conds = subject_conds(comfyui)
    plain, _ = counted_run(comfyui, tdm, sdm, conds)
    scoped, first = counted_run(comfyui, tdm, sdm, conds, regions=halves(comfyui), outside_regions="tdm")
    later = slice(first + 1, None)
    # The per-group path calls the attention once per group, and ComfyUI's attention converts its scores' dtype
    # in each call: conversions on the device, its own; the regions' code converts nothing either way.
    for kind in ("transfer", "read") if path == "per group" else ("transfer", "read", "conversion"):
        assert scoped.per_evaluation(kind)[later] == plain.per_evaluation(kind)[later], (kind, [
            scoped.places(evaluation, kind) for evaluation in range(first + 1, scoped.evaluation + 1)])
    for kind in ("transfer", "read", "conversion"):
        assert not any(scoped.per_evaluation(kind, places="region")[later]), kind
    # The first SDM evaluation makes what the regions need at each attention shape, once.
    assert scoped.count(first, "transfer", places="region") > 0


def test_the_plain_rows_go_to_the_device_when_comfyui_loads_the_sdm(comfyui, models, monkeypatch):
    """ComfyUI calls the patches' to() with the device and then the model's dtype when it loads a model
    (ModelPatcher.model_patches_to): the plain rows are made there, before sampling, not in the attention calls."""
    regions_module = comfyui.pack("facediffuser_core.regions")
    tdm, sdm = models
    made = []
    plain_rows = regions_module.RegionAttention.plain_rows

    def spy(attention, device, dtype):
        if (torch.device(device), dtype) not in attention._plain:
            made.append((torch.device(device), dtype, traffic_phase[0]))
        return plain_rows(attention, device, dtype)

    traffic_phase = ["loading"]
    snf_guider = comfyui.pack("nodes.snf_guider")
    predict_noise = snf_guider.SNFGuider.predict_noise

    def sampling(guider, *args, **kwargs):
        traffic_phase[0] = "sampling"
        return predict_noise(guider, *args, **kwargs)

    monkeypatch.setattr(regions_module.RegionAttention, "plain_rows", spy)
    monkeypatch.setattr(snf_guider.SNFGuider, "predict_noise", sampling)
    sample(comfyui, tdm, sdm, subject_conds(comfyui), regions=halves(comfyui))
    assert made == [(torch.device("cpu"), torch.float32, "loading")]
