"""Auto regions in the SNF Sampler, the Guider and the Stage Sweep, with tiny models on CPU: a stand-in VAE and
face analysis (fixed boxes) show that found regions act exactly as the same masks given to `regions`, that too
few faces are exactly no regions (with the warning), and that nothing else changes."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from dev.devkit import tiny_comfy
from test_regions_comfyui import HEIGHT, WIDTH, sample, sample_with_guider, subject_conds, sweep, with_replacements
from test_snf_sampler_comfyui import SEED, EvaluationLog

FACES = [(62.0, 10.0, 78.0, 28.0), (14.0, 16.0, 30.0, 34.0)]  # right, left, in the 96x64 picture
SD15_SCALE = 0.18215


class StandInVAE:
    """Decodes a latent to a picture of its size x 8 and keeps what it was given; with `unload`, it first unloads
    every model, as loading a real VAE into a full GPU does, or those `unload(patcher)` picks."""

    def __init__(self, unload=False):
        self.latents = []
        self.unload = unload

    def decode(self, latent):
        self.latents.append(latent.clone())
        if self.unload is True:
            import comfy.model_management

            comfy.model_management.unload_all_models()
        elif self.unload:
            import comfy.model_management

            loaded = comfy.model_management.current_loaded_models
            for index in reversed(range(len(loaded))):
                if self.unload(loaded[index].model):
                    loaded.pop(index).model_unload()
        picture = torch.sigmoid(latent[:, :3]).repeat_interleave(8, dim=-2).repeat_interleave(8, dim=-1)
        return picture.movedim(1, -1)


class StandInDetector:
    """insightface's detection model with fixed answers, one list of boxes per call (the last one repeats)."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.pictures = []

    def detect(self, img, max_num=0, metric="default"):
        self.pictures.append(img)
        boxes = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        return np.asarray([[*box, 0.9] for box in boxes], dtype=np.float32).reshape(-1, 5), None


class StandInAnalysis:
    """insightface's FaceAnalysis as far as finding faces needs it: its detection model."""

    def __init__(self, *answers):
        self.det_model = StandInDetector(*answers)

    @property
    def pictures(self):
        return self.det_model.pictures


def setup(comfyui, *answers, expansion=1.0, unload=False):
    vae, analysis = StandInVAE(unload), StandInAnalysis(*(answers or (FACES,)))
    (auto,) = comfyui.run("FaceDiffuserAutoRegions", vae=vae, face_analysis=analysis, expansion=expansion)
    return auto, vae, analysis


def expected_masks(comfyui, faces=FACES, expansion=1.0):
    core = comfyui.pack("facediffuser_core.auto_regions")
    return core.decide(faces, 2, WIDTH * 8, HEIGHT * 8, expansion).masks


@pytest.mark.parametrize("outside", ["snf", "tdm"])
def test_found_regions_act_exactly_as_the_same_masks_given(comfyui, models, monkeypatch, outside):
    snf_guider = comfyui.pack("nodes.snf_guider")
    tdm, sdm = models
    conds = subject_conds(comfyui)
    auto, vae, analysis = setup(comfyui, expansion=0.5)
    masks = expected_masks(comfyui, expansion=0.5)
    assert masks[0, 20, 20] == 1 and masks[1, 20, 70] == 1  # the left face is subject 1
    real_predict = snf_guider.ModelSide.predict
    scene = []

    def spy(side, x, timestep, options, seed, capture=False):
        out = real_predict(side, x, timestep, options, seed, capture)
        if side.name == "tdm" and not capture:
            scene.append(out)
        return out

    monkeypatch.setattr(snf_guider.ModelSide, "predict", spy)
    found, found_saliency = sample(comfyui, tdm, sdm, conds, steps=10, auto_regions=auto, outside_regions=outside)
    (decoded,) = vae.latents
    torch.testing.assert_close(decoded, scene[-1] / SD15_SCALE, rtol=0, atol=0)  # the scene's last prediction
    assert scene and analysis.pictures[0].shape == (HEIGHT * 8, WIDTH * 8, 3)
    given, given_saliency = sample(comfyui, tdm, sdm, conds, steps=10, regions=masks, outside_regions=outside)
    assert torch.equal(found["samples"], given["samples"])
    assert len(found_saliency) == len(given_saliency) > 0
    assert all(torch.equal(a.sdm_chosen, b.sdm_chosen) for a, b in zip(found_saliency.decisions, given_saliency.decisions))
    assert torch.equal(found_saliency.regions, masks) and given_saliency.regions is None
    # The Saliency Preview outlines the regions found, in the subjects' colours, and changes nothing else.
    colours = comfyui.pack("facediffuser_core.saliency_view").REGION_COLOURS
    outlined, outlined_mask = comfyui.run("FaceDiffuserSaliencyPreview", saliency=found_saliency)
    plain, plain_mask = comfyui.run("FaceDiffuserSaliencyPreview", saliency=given_saliency)
    changed = (outlined != plain).any(dim=-1)
    assert torch.equal(outlined_mask, plain_mask) and changed.any()
    assert torch.equal(outlined[changed].unique(dim=0), colours[:2].unique(dim=0))
    without, _ = sample(comfyui, tdm, sdm, conds, steps=10)
    assert (found["samples"] - without["samples"]).abs().max() > 1e-3


def test_models_the_vae_pushed_off_the_device_are_loaded_again(comfyui, models, monkeypatch):
    import comfy.model_management

    snf_guider = comfyui.pack("nodes.snf_guider")
    tdm, sdm = models
    conds = subject_conds(comfyui)
    real_predict = snf_guider.ModelSide.predict
    unloaded = []

    def spy(side, x, timestep, options, seed, capture=False):
        unloaded.append(side.model_patcher not in comfy.model_management.loaded_models())
        return real_predict(side, x, timestep, options, seed, capture)

    monkeypatch.setattr(snf_guider.ModelSide, "predict", spy)
    auto, vae, _ = setup(comfyui, unload=True)
    found, _ = sample(comfyui, tdm, sdm, conds, steps=10, auto_regions=auto)
    assert vae.latents and unloaded and not any(unloaded)
    monkeypatch.undo()
    given, _ = sample(comfyui, tdm, sdm, conds, steps=10, regions=expected_masks(comfyui))
    assert torch.equal(found["samples"], given["samples"])


def test_only_the_models_the_vae_pushed_off_are_loaded_again(comfyui, models, monkeypatch):
    """The VAE's load pushes the TDM off the device; loading it again must leave the SDM, still loaded, as it is
    (a model passed to load_models_gpu again is patched again)."""
    import comfy.model_management

    tdm, sdm = models
    conds = subject_conds(comfyui)
    vae = StandInVAE(unload=lambda patcher: patcher.model is tdm.model)
    (auto,) = comfyui.run("FaceDiffuserAutoRegions", vae=vae, face_analysis=StandInAnalysis(FACES), expansion=1.0)
    loads = []
    model_load = comfy.model_management.LoadedModel.model_load

    def counted(loaded, *args, **kwargs):
        if vae.latents:  # after the decode
            loads.append("tdm" if loaded.model.model is tdm.model else "sdm" if loaded.model.model is sdm.model else "other")
        return model_load(loaded, *args, **kwargs)

    monkeypatch.setattr(comfy.model_management.LoadedModel, "model_load", counted)
    found, _ = sample(comfyui, tdm, sdm, conds, steps=10, auto_regions=auto)
    assert vae.latents and loads == ["tdm"]
    monkeypatch.undo()
    given, _ = sample(comfyui, tdm, sdm, conds, steps=10, regions=expected_masks(comfyui))
    assert torch.equal(found["samples"], given["samples"])


def test_faces_are_found_by_the_detector_alone(comfyui, models, tmp_path):
    """insightface's FaceAnalysis.get runs every model of the pack on every face (landmarks, age and gender,
    recognition); finding the regions needs the boxes, which its detection model gives alone."""
    pytest.importorskip("insightface")
    from insightface.app import FaceAnalysis

    from insightface_test_pack import write_detector_pack

    analysis = FaceAnalysis(name=str(write_detector_pack(tmp_path / "detector")), providers=["CPUExecutionProvider"])
    analysis.prepare(ctx_id=-1, det_size=(640, 640))
    ran = []

    class Counted:
        def __init__(self, taskname):
            self.taskname = taskname

        def get(self, img, face):
            ran.append(self.taskname)

    analysis.det_model = analysis.models["detection"] = StandInDetector(FACES)
    for task in ("landmark_2d_106", "genderage", "recognition"):
        analysis.models[task] = Counted(task)
    assert len(analysis.get(np.zeros((64, 96, 3), np.uint8))) == 2 and len(ran) == 6  # what the whole analysis runs
    ran.clear()
    tdm, sdm = models
    (auto,) = comfyui.run("FaceDiffuserAutoRegions", vae=StandInVAE(), face_analysis=analysis, expansion=1.0)
    found, saliency = sample(comfyui, tdm, sdm, subject_conds(comfyui), steps=10, auto_regions=auto)
    assert len(analysis.det_model.pictures) == 2 and not ran  # the check above, and the run's one detection
    assert torch.equal(saliency.regions, expected_masks(comfyui))


def test_too_few_faces_are_exactly_no_regions_and_say_so(comfyui, models, caplog):
    tdm, sdm = models
    conds = subject_conds(comfyui)
    without, without_saliency = sample(comfyui, tdm, sdm, conds, steps=10)
    for alpha, faces, message in (
        (0.3, [FACES[0]], "Face-diffuser SNF Sampler: auto_regions found 1 face(s) for 2 <|image|> marker(s), too few to give "
                          "every subject a region: sampling goes on without regions"),
        (0.0, FACES, "Face-diffuser SNF Sampler: auto_regions: this run has no scene construction step before fusion"),
    ):
        auto, vae, _ = setup(comfyui, faces)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            fallback, saliency = sample(comfyui, tdm, sdm, conds, steps=10, alpha=alpha, auto_regions=auto, outside_regions="tdm")
        assert message in caplog.text
        reference = without if alpha else sample(comfyui, tdm, sdm, conds, steps=10, alpha=alpha)[0]
        assert torch.equal(fallback["samples"], reference["samples"]) and saliency.regions is None
        assert len(vae.latents) == (1 if alpha else 0)
    without_decisions = [d.sdm_chosen for d in without_saliency.decisions]
    auto, _, _ = setup(comfyui, [FACES[0]])
    _, saliency = sample(comfyui, tdm, sdm, conds, steps=10, auto_regions=auto, outside_regions="tdm")
    assert len(saliency) == len(without_decisions) > 0
    assert all(torch.equal(a.sdm_chosen, b) for a, b in zip(saliency.decisions, without_decisions))


def test_with_a_replacement_on_the_sdm_found_regions_equal_given_ones_and_too_few_equal_none(comfyui, models):
    import comfy.ldm.modules.attention as attention

    tdm, sdm = models
    conds = subject_conds(comfyui)
    replaced = with_replacements(comfyui, sdm, lambda q, k, v, extra: attention.optimized_attention(q, k, v, extra["n_heads"]) + 0.5 * q.tanh())
    found, _ = sample(comfyui, tdm, replaced, conds, auto_regions=setup(comfyui)[0])
    given, _ = sample(comfyui, tdm, replaced, conds, regions=expected_masks(comfyui))
    assert torch.equal(found["samples"], given["samples"])
    fallback, _ = sample(comfyui, tdm, replaced, conds, auto_regions=setup(comfyui, [FACES[0]])[0])
    assert torch.equal(fallback["samples"], sample(comfyui, tdm, replaced, conds)[0]["samples"])


def test_auto_regions_cost_no_extra_unet_evaluation(comfyui, models):
    counts = []
    for region_inputs in ({}, {"auto_regions": setup(comfyui)[0], "outside_regions": "tdm"}):
        tdm_log, sdm_log = EvaluationLog(models[0]), EvaluationLog(models[1])
        sample(comfyui, tdm_log.patcher, sdm_log.patcher, subject_conds(comfyui), **region_inputs)
        counts.append((tdm_log.calls, sdm_log.calls))
    assert counts[0] == counts[1] and all(counts[0])


def test_guider_and_stage_sweep_find_regions_in_every_run(comfyui, models):
    tdm, sdm = models
    conds = subject_conds(comfyui)
    masks = expected_masks(comfyui)
    expected, _ = sample(comfyui, tdm, sdm, conds, steps=10, regions=masks)
    plain, _ = sample(comfyui, tdm, sdm, conds, steps=10)
    auto, _, analysis = setup(comfyui, FACES, [FACES[0]])  # two people found in the first run, one in the second
    guider, saliency = comfyui.run("FaceDiffuserGuider", tdm=tdm, sdm=sdm, cfg=5.0, alpha=0.3, beta=0.6, auto_regions=auto, **conds)
    for reference in (expected, plain):
        torch.testing.assert_close(sample_with_guider(comfyui, sdm, guider)["samples"], reference["samples"], rtol=1e-5, atol=1e-5)
    assert saliency.regions is None and len(analysis.pictures) == 2
    swept, _ = sweep(comfyui, tdm, sdm, conds, auto_regions=setup(comfyui)[0])
    torch.testing.assert_close(swept["samples"], expected["samples"], rtol=1e-5, atol=1e-5)


def test_a_batch_falls_back_and_says_so(comfyui, models, caplog):
    tdm, sdm = models
    conds = subject_conds(comfyui)
    auto, vae, _ = setup(comfyui)
    latent = tiny_comfy.empty_latent(2, HEIGHT, WIDTH)
    run = dict(tdm=tdm, sdm=sdm, latent_image=latent, seed=SEED, steps=6, cfg=5.0, sampler_name="ddim", scheduler="ddim_uniform",
               alpha=0.3, beta=0.6, denoise=1.0, **conds)
    with caplog.at_level(logging.WARNING):
        batch, _ = comfyui.run("FaceDiffuserSNFSampler", auto_regions=auto, **run)
    assert "Face-diffuser SNF Sampler: auto_regions works on one picture at a time, this batch has 2" in caplog.text
    assert torch.equal(batch["samples"], comfyui.run("FaceDiffuserSNFSampler", **run)[0]["samples"]) and not vae.latents


def test_bad_auto_regions_name_the_node_the_input_and_the_fix(comfyui, models):
    tdm, sdm = models
    conds = subject_conds(comfyui)
    auto, _, _ = setup(comfyui)
    with pytest.raises(ValueError, match="Face-diffuser SNF Sampler: both 'regions' and 'auto_regions' are connected.*disconnect"):
        sample(comfyui, tdm, sdm, conds, regions=expected_masks(comfyui), auto_regions=auto)
    bare = dict(conds, augmented=[[conds["augmented"][0][0], {}]])
    with pytest.raises(ValueError, match="Face-diffuser Guider: 'auto_regions' is connected but the 'augmented' conditioning carries no"):
        comfyui.run("FaceDiffuserGuider", tdm=tdm, sdm=sdm, cfg=5.0, alpha=0.3, beta=0.6, auto_regions=auto, **bare)
    with pytest.raises(ValueError, match="Face-diffuser Auto Regions: face_analysis must be an insightface FaceAnalysis"):
        comfyui.run("FaceDiffuserAutoRegions", vae=StandInVAE(), face_analysis=object(), expansion=1.0)
