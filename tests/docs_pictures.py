"""Makes the README's pictures of the identity features (docs/*.png):

- docs/identity_score_annotated.png: Face-diffuser Identity Score (dlib) on scikit-image's public-domain
  photos: the astronaut found in her photo (and a face-like patch on her suit left to no subject), and a
  picture without a face;
- docs/stage_sweep_grid_tiny_models.png: the shipped facediffuser_stage_sweep workflow run by the headless
  runner on a ComfyUI server with the tests' tiny random models (tests/tiny_install.py): the grid's layout and
  labels are real, its pictures are noise, in which no face is found.
- docs/regions_tiny_models.png: per-subject regions (Region Layout's halves) and where the SDM painted during
  fusion without and with them, from the SNF Sampler's saliency record on the tests' tiny models
  (tests/test_regions_comfyui.py's prompts), the middle outside both regions.

    cd tests && COMFYUI_PATH=~/ComfyUI ../.venv/bin/python docs_pictures.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import standalone  # noqa: F401  (facediffuser_core, the client and the dev kit, as pytest.ini gives the tests)
import comfy_server
import pack_scripts
import workflow_builder
from face_photos import comfy_image
from dev.devkit import comfy_harness

DOCS = comfy_harness.REPO_ROOT / "docs"
SUBJECT_COLOURS = (torch.tensor([1.0, 0.55, 0.1]), torch.tensor([0.2, 0.5, 1.0]))


def annotated_picture(comfyui) -> Image.Image:
    """Public-domain photos only (the group photo the tests use is not ours to publish): the astronaut as the
    subject, scored in her own photo and in one without a face."""
    import skimage.data

    astronaut = skimage.data.astronaut()
    reference = np.ascontiguousarray(astronaut[:, ::-1])  # her mirror image as the reference photo
    node = comfyui.node("FaceDiffuserIdentityScore").PREPARE_CLASS_CLONE({})
    coffee = np.asarray(Image.fromarray(skimage.data.coffee()).resize(astronaut.shape[1::-1], Image.BILINEAR))
    output = node.execute(references=comfy_image(reference), images=comfy_image(astronaut, coffee), recognition="dlib", keep_best=0)
    _, table, annotated, _, _ = output.result
    print(table)
    pictures = (annotated.numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(np.concatenate([pictures[0], np.zeros((pictures.shape[1], 8, 3), np.uint8), pictures[1]], axis=1))


def sweep_grid_picture(scratch: Path) -> Image.Image:
    import tiny_install

    from facediffuser_client import api_workflow

    runner = pack_scripts.load("facediffuser_run")
    with comfy_server.running_server(scratch / "comfyui") as server:
        tiny_install.install_models(server.models_dir)
        workflow = json.loads((workflow_builder.API_DIR / "facediffuser_stage_sweep.json").read_text())
        for node in workflow.values():
            if node["class_type"] == "EmptyLatentImage":
                node["inputs"].update(width=128, height=128)
        api_workflow.set_override(workflow, "steps", 10)
        (photo,) = tiny_install.write_face_photos(scratch / "photos", names=("sweep_subject.png",))
        path = scratch / "sweep.json"
        path.write_text(json.dumps(workflow))
        output = scratch / "out"
        code = runner.main([str(path), "--server", server.url, "--face", str(photo), "--output", str(output), "--timeout", "600"])
        if code:
            sys.exit(server.log_tail())
    (grid,) = output.glob("facediffuser_sweep_*.png")
    return Image.open(grid)


def regions_picture(comfyui) -> Image.Image:
    """Masks and the SDM's share of the fusion steps per latent pixel, each panel labelled."""
    from PIL import ImageDraw

    from dev.devkit import tiny_comfy
    from test_regions_comfyui import HEIGHT, WIDTH, sample, subject_conds

    tdm, sdm = tiny_comfy.model_pair()
    conds = subject_conds(comfyui)
    (masks,) = comfyui.run("FaceDiffuserRegionLayout", layout="boxes", subjects=2, width=WIDTH * 8, height=HEIGHT * 8,
                           boxes="0 0 0.42 1; 0.58 0 1 1")
    panels = [("regions: subject 1, subject 2", masks[0, :, :, None] * SUBJECT_COLOURS[0] + masks[1, :, :, None] * SUBJECT_COLOURS[1])]
    for label, inputs in (("SDM share, no regions", {}), ("SDM share, regions", {"regions": masks}),
                          ("regions, outside: tdm", {"regions": masks, "outside_regions": "tdm"})):
        _, saliency = sample(comfyui, tdm, sdm, conds, **inputs)
        share = saliency.summary().sdm_fraction[0]
        panels.append((label, share[:, :, None].expand(-1, -1, 3)))
    scale, label_height, gap = 16, 18, 8
    height, width = masks.shape[1] // 8 * scale, masks.shape[2] // 8 * scale
    canvas = Image.new("RGB", (len(panels) * (width + gap) - gap, height + label_height), "white")
    draw = ImageDraw.Draw(canvas)
    for index, (label, panel) in enumerate(panels):
        grid = panel.permute(2, 0, 1)[None].float()
        block = torch.nn.functional.interpolate(grid, size=(height, width), mode="nearest")[0].permute(1, 2, 0)
        x = index * (width + gap)
        canvas.paste(Image.fromarray((block.clamp(0, 1) * 255).round().byte().numpy()), (x, label_height))
        draw.text((x + 2, 2), label, fill="black")
    return canvas


if __name__ == "__main__":
    if comfy_harness.comfyui_path() is None:
        sys.exit(comfy_harness.SKIP_REASON)
    DOCS.mkdir(exist_ok=True)
    comfyui = comfy_harness.start()
    annotated_picture(comfyui).save(DOCS / "identity_score_annotated.png", optimize=True)
    regions_picture(comfyui).save(DOCS / "regions_tiny_models.png", optimize=True)
    with tempfile.TemporaryDirectory() as scratch:
        sweep_grid_picture(Path(scratch)).save(DOCS / "stage_sweep_grid_tiny_models.png", optimize=True)
    print(f"wrote {DOCS / 'identity_score_annotated.png'}, {DOCS / 'regions_tiny_models.png'} and {DOCS / 'stage_sweep_grid_tiny_models.png'}")
