"""Regions under every attention backend ComfyUI offers, each chosen as ComfyUI chooses it (attention_backends.py,
in a process of its own, with stand-ins of the libraries that need a GPU): the run with regions equals the
PyTorch-attention run with regions, and nothing falls back or logs per call."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dev.devkit import comfy_harness

HERE = Path(__file__).resolve().parent
LIBRARIES = {"xformers": "xformers", "flash": "flash", "sage_v1": "sage_v1", "sage_v2": "sage_v2"}
TOLERANCE = 1e-5  # relative to the picture's largest value: float rounding of the same attention


@pytest.fixture(scope="module")
def backends(tmp_path_factory):
    if comfy_harness.comfyui_path() is None:
        pytest.skip(comfy_harness.SKIP_REASON)
    out = tmp_path_factory.mktemp("backends") / "backends.json"
    done = subprocess.run([sys.executable, str(HERE / "attention_backends.py"), str(out)], cwd=HERE, env=dict(os.environ),
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("backend", ["split", "sub_quad", "basic", "xformers", "flash", "sage_v1", "sage_v2", "sage3",
                                     "unknown", "override"])
def test_regions_under_each_backend_equal_the_pytorch_attention_run(backends, backend):
    result = backends[backend]
    assert result["plain_difference"] < TOLERANCE  # the stand-ins compute PyTorch's attention
    assert result["regions_difference"] < TOLERANCE, result
    assert result["regions_change_the_picture"] > 1e-3
    assert not result["fallbacks"], result["fallbacks"][:3]  # nothing gave up on a call (flash did on every masked one)
    assert len(result["region_notes"]) <= 1  # said once, never per call
    if backend in LIBRARIES:
        assert result["calls"].get(LIBRARIES[backend], 0) > 0  # the library ran
    if backend == "override":
        assert result["calls"]["override"] > 0


def test_backends_that_honour_a_mask_take_it_and_the_others_attend_per_group(backends):
    paths = {backend: result["path"] for backend, result in backends.items()}
    for backend in ("pytorch", "split", "sub_quad", "basic", "xformers", "sage3"):
        assert paths[backend] == "masked", backend
    for backend in ("flash", "unknown", "override"):
        assert paths[backend] == "per group", backend
    # Sage takes a mask where ComfyUI checks the library for one (0.33 on); before, it would have lost it.
    sage = "masked" if backends["sage_v1"]["comfyui_checks_sage_masks"] else "per group"
    assert paths["sage_v1"] == paths["sage_v2"] == sage


def test_comfyuis_attention_backend_node_keeps_working_with_regions(comfyui, models):
    """ModelAttentionBackend (ComfyUI 0.33 on) puts an attention override into the SDM's options: regions attend
    per group through it, and the picture is the one without the node."""
    from test_regions_comfyui import halves, sample, subject_conds

    if "ModelAttentionBackend" not in comfyui.nodes.NODE_CLASS_MAPPINGS:
        pytest.skip("this ComfyUI has no ModelAttentionBackend node (0.33 and later have)")
    tdm, sdm = models
    (overridden,) = comfyui.run("ModelAttentionBackend", model=sdm, attention="pytorch attention")
    assert "optimized_attention_override" in overridden.model_options["transformer_options"]
    conds, masks = subject_conds(comfyui), halves(comfyui)
    through, _ = sample(comfyui, tdm, overridden, conds, regions=masks)
    direct, _ = sample(comfyui, tdm, sdm, conds, regions=masks)
    scale = direct["samples"].abs().max()
    torch.testing.assert_close(through["samples"] / scale, direct["samples"] / scale, rtol=0, atol=TOLERANCE)
    assert (through["samples"] - sample(comfyui, tdm, overridden, conds)[0]["samples"]).abs().max() > 1e-3
