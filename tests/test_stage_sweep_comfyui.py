"""Face-diffuser Stage Sweep and Stage Sweep Grid in ComfyUI with tiny random models on CPU: every cell is
the SNF Sampler's picture for its split, the models are loaded once for the whole grid, and the grid picture."""

from __future__ import annotations

import pytest
import torch

from dev.devkit import tiny_comfy

SETTINGS = dict(seed=11, steps=6, cfg=5.0, sampler_name="ddim", scheduler="ddim_uniform", denoise=1.0)


def sweep(comfyui, tdm, sdm, conds, alphas, betas, latent=None, **overrides):
    return comfyui.run("FaceDiffuserStageSweep", tdm=tdm, sdm=sdm, latent_image=latent or tiny_comfy.empty_latent(1, 8, 8),
                       alphas=alphas, betas=betas, **{**SETTINGS, **overrides}, **conds)


def test_each_cell_is_the_snf_samplers_picture_and_the_models_load_once(comfyui, conds):
    from dev.benchmarks import instruments

    tdm, sdm = tiny_comfy.sd15_patcher(5), tiny_comfy.sd15_patcher(6)  # fresh: never loaded before
    names = {id(tdm.model): "tdm", id(sdm.model): "sdm"}
    spy = instruments.LoadSpy(names, instruments.UNetMeter({}, "cpu"))  # only load events are read
    import comfy.model_patcher

    with spy.watching(comfy.model_patcher.ModelPatcher):
        latent, grid = sweep(comfyui, tdm, sdm, conds, "0.3, 0.7", "0.5, 0.8")
    events = spy.take()
    cells = grid.cells
    assert [(c.alpha, c.beta) for c in cells] == [(0.3, 0.5), (0.3, 0.8), (0.7, 0.8)]
    # one load request per cell, each for both models; the weights are loaded once for the whole grid
    requests = [e for e in events if e.kind == "load_models_gpu"]
    assert len(requests) == len(cells) and all(sorted(e.models) == ["sdm", "tdm"] for e in requests)
    assert sorted(e.models[0] for e in events if e.kind == "load") == ["sdm", "tdm"]
    assert not [e for e in events if e.kind in ("partial_unload", "offload")]

    assert latent["samples"].shape == (3, 4, 8, 8)
    for index, cell in enumerate(cells):
        single, _ = comfyui.run("FaceDiffuserSNFSampler", tdm=tdm, sdm=sdm, latent_image=tiny_comfy.empty_latent(1, 8, 8),
                                alpha=cell.alpha, beta=cell.beta, **SETTINGS, **conds)
        torch.testing.assert_close(latent["samples"][index:index + 1], single["samples"], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(latent["samples"][0], latent["samples"][2], atol=1e-3)


def test_grid_node_lays_out_the_decoded_cells_with_their_scores(comfyui, conds):
    from facediffuser_core.identity import IdentityReport, ImageResult, threshold_for

    _, grid = sweep(comfyui, *tiny_comfy.model_pair(), conds, "0.2, 0.6", "0.4, 0.8", steps=2)
    images = torch.rand(len(grid.cells), 32, 48, 3, generator=torch.Generator().manual_seed(0))
    (plain,) = comfyui.run("FaceDiffuserStageSweepGrid", images=images, sweep=grid)
    report = IdentityReport("w600k_r50", "a stand-in", threshold_for("w600k_r50"),
                            [ImageResult(i, [(0, 0, 4, 4)], [], score) for i, score in enumerate([0.1, 0.5, 0.3])])
    (scored,) = comfyui.run("FaceDiffuserStageSweepGrid", images=images, sweep=grid, identity=report)
    assert plain.shape == scored.shape and plain.shape[0] == 1 and plain.shape[1] > 2 * 32 and plain.shape[2] > 2 * 48
    assert not torch.equal(plain, scored)  # the score labels and the best cell's frame
    with pytest.raises(ValueError, match="Stage Sweep Grid: images has 2 pictures but the sweep sampled 3 cells"):
        comfyui.run("FaceDiffuserStageSweepGrid", images=images[:2], sweep=grid)
    report.images.pop()
    with pytest.raises(ValueError, match="identity scored 2 pictures but the sweep sampled 3 cells"):
        comfyui.run("FaceDiffuserStageSweepGrid", images=images, sweep=grid, identity=report)


def test_bad_sweeps_name_the_node_and_the_fix(comfyui, conds):
    models = tiny_comfy.model_pair()
    with pytest.raises(ValueError, match="Face-diffuser Stage Sweep: alphas: 'a' is not a number"):
        sweep(comfyui, *models, conds, "0.2, a", "0.5")
    with pytest.raises(ValueError, match="every beta .* is below every alpha"):
        sweep(comfyui, *models, conds, "0.6, 0.7", "0.2, 0.5")
    with pytest.raises(ValueError, match="latent_image has a batch of 2.*batch size 1"):
        sweep(comfyui, *models, conds, "0.3", "0.6", latent=tiny_comfy.empty_latent(2, 8, 8))
