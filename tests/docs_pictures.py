"""Makes the README's pictures of the identity features (docs/*.png):

- docs/identity_score_annotated.png: Face-diffuser Identity Score (dlib) on scikit-image's public-domain
  photos: the astronaut found in her photo (and a face-like patch on her suit left to no subject), and a
  picture without a face;
- docs/stage_sweep_grid_tiny_models.png: the shipped facediffuser_stage_sweep workflow run by the headless
  runner on a ComfyUI server with the tests' tiny random models (tests/tiny_install.py): the grid's layout and
  labels are real, its pictures are noise, in which no face is found.

    cd tests && COMFYUI_PATH=~/ComfyUI ../.venv/bin/python docs_pictures.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

import comfy_harness

for path in (comfy_harness.REPO_ROOT, comfy_harness.REPO_ROOT / "scripts"):  # facediffuser_core and the client, as pytest.ini gives the tests
    sys.path.insert(0, str(path))
import comfy_server  # noqa: E402
import pack_scripts  # noqa: E402
import workflow_builder  # noqa: E402
from face_photos import comfy_image  # noqa: E402

DOCS = comfy_harness.REPO_ROOT / "docs"


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


if __name__ == "__main__":
    if comfy_harness.comfyui_path() is None:
        sys.exit(comfy_harness.SKIP_REASON)
    DOCS.mkdir(exist_ok=True)
    annotated_picture(comfy_harness.start()).save(DOCS / "identity_score_annotated.png", optimize=True)
    with tempfile.TemporaryDirectory() as scratch:
        sweep_grid_picture(Path(scratch)).save(DOCS / "stage_sweep_grid_tiny_models.png", optimize=True)
    print(f"wrote {DOCS / 'identity_score_annotated.png'} and {DOCS / 'stage_sweep_grid_tiny_models.png'}")
