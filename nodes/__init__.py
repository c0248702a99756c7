"""The ComfyUI side of the pack: V3 nodes that call into `facediffuser_core`, one module per feature."""

from __future__ import annotations

import logging

import folder_paths
from comfy_api.latest import ComfyExtension, io

from . import insightface_loader, loaders, official_run, reference_faces, saliency_preview, sampling, subject_prompt
from . import auto_regions, identity_score, regions, stage_sweep

NODE_MODULES = [loaders, insightface_loader, reference_faces, subject_prompt, sampling, official_run, saliency_preview]  # each feature module exports NODES
NODE_MODULES += [identity_score, stage_sweep, regions, auto_regions]


class FaceDiffuserExtension(ComfyExtension):
    async def on_load(self) -> None:
        loaders.register_model_folder()
        logging.debug("Face-diffuser model folders: %s", folder_paths.get_folder_paths(loaders.MODEL_FOLDER))

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [node for module in NODE_MODULES for node in module.NODES]


async def comfy_entrypoint() -> FaceDiffuserExtension:
    return FaceDiffuserExtension()
