"""Installs and downloads that pass for real ones, for the first-run check, the set-up and the docs' commands: a
folder that passes for a ComfyUI checkout, model files with an SDM's and a TDM's tensor names, and the hub's files
(the two checkpoints and the face-analysis pack's zip) served by the hub stand-in."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from facediffuser_client.check.model_files import packs
from facediffuser_client.setup.downloads import HUB_REPOSITORY


SDM_KEYS = ["unet.conv_in.weight", "text_encoder.embeddings.token_embedding.weight",
            "image_encoder.vision_model.embeddings.class_embedding", "image_encoder.visual_projection.weight",
            "vae.encoder.conv_in.weight", "postfuse_module.mlp1.fc1.weight"]
TDM_KEYS = ["unet.conv_in.weight", "text_encoder.embeddings.token_embedding.weight", "vae.encoder.conv_in.weight",
            "text_encoder.embeddings.position_ids"]


def tensors(keys):
    return {key: torch.full((2,), float(index)) for index, key in enumerate(keys)}


def fake_comfyui(root: Path, version: str = "0.17.0") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "comfyui_version.py").write_text(f'__version__ = "{version}"\n')
    return root


def complete_install(tmp_path: Path) -> tuple[Path, Path]:
    comfyui = fake_comfyui(tmp_path / "ComfyUI")
    models = comfyui / "models"
    (models / "facediffuser").mkdir(parents=True)
    save_file(tensors(SDM_KEYS), models / "facediffuser" / "facediffuser_sdm.safetensors")
    torch.save(tensors(TDM_KEYS), models / "facediffuser" / "facediffuser_tdm.bin")
    pack = models / "insightface" / "models" / "antelopev2"
    pack.mkdir(parents=True)
    for name in packs.KNOWN_PACK_FILES["antelopev2"]:
        (pack / name).write_bytes(b"onnx")
    return comfyui, models


REPOSITORY = HUB_REPOSITORY
BUFFALO_FILES = ("1k3d68.onnx", "2d106det.onnx", "genderage.onnx", "w600k_r50.onnx", "det_10g.onnx")


def checkpoint_bytes(keys, extra_floats: int = 0) -> bytes:
    """A torch .bin with the tensor names of an SDM or a TDM; `extra_floats` makes it as large as needed."""
    state = tensors(keys)
    if extra_floats:
        state["unet.padding.weight"] = torch.arange(extra_floats, dtype=torch.float32)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def pack_zip(folder: str, files=BUFFALO_FILES) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name in files:
            archive.writestr(f"{folder}{name}", f"onnx {name}".encode())
        archive.writestr("__MACOSX/._det_10g.onnx", b"resource fork")
    return buffer.getvalue()


SDM_BYTES = checkpoint_bytes(SDM_KEYS)
TDM_BYTES = checkpoint_bytes(TDM_KEYS)


def serve_everything(hub, sdm=SDM_BYTES, tdm=TDM_BYTES, zip_folder="buffalo_l/", **sdm_faults) -> str:
    hub.add_hub_file(REPOSITORY, "SDM/pytorch_model.bin", sdm, **sdm_faults)
    hub.add_hub_file(REPOSITORY, "TDM/pytorch_model.bin", tdm)
    return hub.add_file("/releases/download/v0.7/buffalo_l.zip", pack_zip(zip_folder))
