"""The ComfyUI side of the pack: V3 nodes that call into `facediffuser_core`, one module per feature."""

from __future__ import annotations

import logging
import os

import folder_paths
from comfy_api.latest import ComfyExtension, io

# Feature modules read MODEL_FOLDER, so they are imported after it.
MODEL_FOLDER = "facediffuser"
MODEL_EXTENSIONS = {".bin", ".safetensors"}

from . import insightface_loader, loaders, official_run, reference_faces, saliency_preview, sampling, subject_prompt  # noqa: E402
from . import auto_regions, identity_score, regions, stage_sweep  # noqa: E402

NODE_MODULES = [loaders, insightface_loader, reference_faces, subject_prompt, sampling, official_run, saliency_preview]  # each feature module exports NODES
NODE_MODULES += [identity_score, stage_sweep, regions, auto_regions]


def register_model_folder() -> None:
    """models/facediffuser, also reachable through extra_model_paths.yaml under the key `facediffuser`."""
    folder_paths.add_model_folder_path(MODEL_FOLDER, os.path.join(folder_paths.models_dir, MODEL_FOLDER), is_default=True)
    folder_paths.folder_names_and_paths[MODEL_FOLDER][1].update(MODEL_EXTENSIONS)


class FaceDiffuserExtension(ComfyExtension):
    async def on_load(self) -> None:
        register_model_folder()
        logging.debug("Face-diffuser model folders: %s", folder_paths.get_folder_paths(MODEL_FOLDER))

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [node for module in NODE_MODULES for node in module.NODES]


async def comfy_entrypoint() -> FaceDiffuserExtension:
    return FaceDiffuserExtension()
