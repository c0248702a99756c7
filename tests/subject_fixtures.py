"""A tiny SDM loaded through the pack's own SDM loader, and an insightface models folder, for the ComfyUI
tier of the reference-face and subject-prompt tests (import after ComfyUI started)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import pytest

from dev.devkit import official_checkpoints


@dataclass
class TinySDM:
    refs: official_checkpoints.OfficialReferences
    model: object
    clip: object
    subject_encoder: object


@contextlib.contextmanager
def loaded_tiny_sdm(comfyui, folder: Path):
    """Writes a tiny official-layout SDM to `folder` and loads it with FaceDiffuserSDMLoader."""
    import folder_paths

    refs = official_checkpoints.build_sdm(seed=3)
    official_checkpoints.write_checkpoint(official_checkpoints.official_state_dict(refs), folder / "tiny_sdm.safetensors")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(folder_paths.folder_names_and_paths, "facediffuser", ([str(folder)], {".bin", ".safetensors"}))
        model, clip, _, encoder = comfyui.run("FaceDiffuserSDMLoader", ckpt_name="tiny_sdm.safetensors", weight_dtype="fp32")
    yield TinySDM(refs=refs, model=model, clip=clip, subject_encoder=encoder)


@contextlib.contextmanager
def models_dir(path: Path):
    """ComfyUI's models folder moved to `path` for the duration (the InsightFace loader looks there)."""
    import folder_paths

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(folder_paths, "models_dir", str(path))
        yield path
