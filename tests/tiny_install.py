"""A complete Face-diffuser install in miniature, for the tests that run the shipped workflows: tiny SDM and
TDM checkpoints under the canonical names, a tiny insightface pack (a detector and a stand-in recognition
model), and two face photos under the names the workflows load. Import after ComfyUI started (the checkpoint builders import diffusers)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

import insightface_test_pack
from dev.devkit import official_checkpoints
import workflow_builder


def install_models(models: Path) -> Path:
    (models / "facediffuser").mkdir(parents=True, exist_ok=True)
    for build, name in ((official_checkpoints.build_sdm, workflow_builder.SDM_FILE), (official_checkpoints.build_tdm, workflow_builder.TDM_FILE)):
        official_checkpoints.write_checkpoint(official_checkpoints.official_state_dict(build()), models / "facediffuser" / name)
    pack = insightface_test_pack.write_detector_pack(models / "insightface" / "models" / "antelopev2")
    insightface_test_pack.write_recognition_model(pack)
    return models


def write_face_photos(folder: Path, names=workflow_builder.SUBJECT_PHOTOS) -> list[Path]:
    """scikit-image's public-domain astronaut portrait, and its mirror image as a second person."""
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    astronaut = data.astronaut()
    photos = [astronaut, np.ascontiguousarray(astronaut[:, ::-1])]
    paths = []
    for name, photo in zip(names, photos):
        Image.fromarray(photo).save(folder / name)
        paths.append(folder / name)
    return paths


def small_api_workflow(name: str, steps: int = 3) -> dict:
    """A shipped API workflow at a size a CPU runs in seconds: 64 px, three steps, one per stage."""
    import json

    return shrink(json.loads((workflow_builder.API_DIR / f"{name}.json").read_text()), steps)


def shrink(workflow: dict, steps: int = 3) -> dict:
    """An API workflow made small_api_workflow's size, in place."""
    from facediffuser_client import api_workflow

    for node in workflow.values():
        if node["class_type"] == "EmptyLatentImage":
            node["inputs"].update(width=64, height=64)
    api_workflow.set_override(workflow, "steps", steps)
    sweeps = [node for node in workflow.values() if node["class_type"] == "FaceDiffuserStageSweep"]
    for node in sweeps:  # two cells: one with a fusion step, one without
        node["inputs"].update(alphas="0.34", betas="0.34, 0.67")
    if not sweeps:
        api_workflow.set_override(workflow, "alpha", 0.34)
        api_workflow.set_override(workflow, "beta", 0.67)
    return workflow
