"""Face-diffuser Auto Regions: the people's regions found in the picture at the end of scene construction.

The node only gathers what finding them needs (the VAE, the insightface pack's detector, the expansion); the SNF
Sampler, the Guider and the Stage Sweep take it as `auto_regions`, and their guider's regions decide them in each
run (`AutoRegionsRun`) at its first evaluation after scene construction: the TDM's last denoised prediction is
decoded, the faces found, and the regions (facediffuser_core.auto_regions) go to the guider's regions
(nodes.regions.SamplingRegions), which the SDM's attention patch reads: until then, and where too few faces were
found, it computes what ComfyUI would without it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import comfy.model_management
import torch
from comfy_api.latest import io

from ..facediffuser_core import auto_regions as core
from .reference_faces import detect_face_boxes
from .types import AutoRegions

NODE_NAME = "Face-diffuser Auto Regions"


@dataclass(frozen=True)
class AutoRegionsSetup:
    """The Auto Regions node's output: how a guider finds the regions."""

    vae: object
    face_analysis: object
    expansion: float

    def faces(self, latent: torch.Tensor) -> tuple[list, int, int]:
        """The face boxes in the picture one latent (1, 4, h, w) decodes to, and the picture's width and height."""
        picture = self.vae.decode(latent)
        if picture.dim() == 5:  # VAEs of video models give (batch, frames, ...)
            picture = picture.reshape(-1, *picture.shape[-3:])
        return detect_face_boxes(self.face_analysis, picture[0]), int(picture.shape[2]), int(picture.shape[1])


class AutoRegionsRun:
    """A guider's regions finder (nodes.regions.SamplingRegions.finder): decides the regions anew in every sampling
    run, at its first evaluation after scene construction; until then, and after a fallback, there are none."""

    def __init__(self, setup: AutoRegionsSetup, regions):
        self.setup, self.regions = setup, regions
        self.reset()

    @property
    def node(self) -> str:
        return self.regions.node

    def reset(self) -> None:
        """A run begins: each run finds its own people."""
        self.regions.use(None)
        self.found: core.AutoRegions | None = None
        self.decided = False

    def decide_from_scene(self, prediction: torch.Tensor | None, model, needed_models: list) -> torch.Tensor | None:
        """The regions from the TDM's last denoised prediction (model space; None: the run had no scene construction
        step) through `model`'s latent format, with the models sampling needs (`needed_models`) on the device again
        after the VAE's decode. Returns the masks the regions now use, or None."""
        self.decide(None if prediction is None else model.process_latent_out(prediction.float()))
        reload_pushed_off(needed_models)
        return None if self.regions.attention is None else self.found.masks

    def decide(self, latent: torch.Tensor | None) -> None:
        """Regions from the scene's predicted picture (a latent for the VAE), or the fallback when there is none."""
        self.decided = True
        subjects = len(self.regions.tokens.rows)
        if latent is None:
            logging.warning("%s: auto_regions: this run has no scene construction step before fusion (alpha is 0, or the "
                            "sampler got a later part of the schedule), so there is no scene to find %d people in: "
                            "sampling goes on without regions (the paper's behaviour)", self.node, subjects)
            return
        if latent.shape[0] != 1:
            logging.warning("%s: auto_regions works on one picture at a time, this batch has %d: sampling goes on without "
                            "regions (the paper's behaviour); give the pictures regions yourself with 'regions', or use batch "
                            "size 1", self.node, latent.shape[0])
            return
        faces, width, height = self.setup.faces(latent)
        self.found = core.decide(faces, subjects, width, height, self.setup.expansion)
        if self.found.fallback:
            logging.warning("%s: auto_regions %s", self.node, self.found.describe())
            return
        logging.info("%s: auto_regions %s", self.node, self.found.describe())
        self.regions.use(self.found.masks)


def reload_pushed_off(needed_models: list) -> None:
    """Loads again the models that loading the VAE pushed off the device, and only them: a model still loaded
    would be patched again. Should making room for them push another off, all are asked for at once, as when
    sampling began."""
    pushed_off = [model for model in needed_models if model not in comfy.model_management.loaded_models()]
    if pushed_off:
        comfy.model_management.load_models_gpu(pushed_off)
        if any(model not in comfy.model_management.loaded_models() for model in needed_models):
            comfy.model_management.load_models_gpu(needed_models)


class FaceDiffuserAutoRegions(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FaceDiffuserAutoRegions",
            display_name=NODE_NAME,
            category="facediffuser/conditioning",
            description=(
                "Finds the people's regions instead of taking them from a layout: connect it to 'auto_regions' of the SNF "
                "Sampler, the Guider or the Stage Sweep. At the end of scene construction the TDM's predicted picture is "
                "decoded with this VAE, the faces are found with the insightface pack's detector, each face is widened to a person "
                "region (by 'expansion' face sizes sideways and upwards, down to the picture's bottom; overlaps split between "
                "the faces), and the regions go to the <|image|> markers left to right. With fewer faces than markers, or no "
                "scene construction step, the sampling goes on without regions and the log says so. The Saliency Preview "
                "outlines the regions used."
            ),
            inputs=[
                io.Vae.Input("vae", tooltip="The VAE of the SDM or TDM loader, to decode the scene's predicted picture."),
                io.FaceAnalysis.Input("face_analysis", tooltip="From the Face-diffuser InsightFace Loader: finds the faces."),
                io.Float.Input("expansion", default=core.DEFAULT_EXPANSION, min=0.0, max=10.0, step=0.05,
                               tooltip="How far a person's region reaches beyond their face, in face sizes: sideways and "
                                       "upwards (down to the picture's bottom always). 0 keeps the face box's width."),
            ],
            outputs=[AutoRegions.Output("auto_regions", tooltip="For 'auto_regions' of the SNF Sampler, Guider or Stage Sweep.")],
        )

    @classmethod
    def execute(cls, vae, face_analysis, expansion: float) -> io.NodeOutput:
        if not hasattr(getattr(face_analysis, "det_model", None), "detect"):
            raise ValueError(f"{NODE_NAME}: face_analysis must be an insightface FaceAnalysis, such as the Face-diffuser "
                             f"InsightFace Loader gives; got {type(face_analysis).__name__}")
        if expansion < 0:
            raise ValueError(f"{NODE_NAME}: expansion is {expansion}; it is 0 or more (face sizes)")
        return io.NodeOutput(AutoRegionsSetup(vae, face_analysis, float(expansion)))


NODES = [FaceDiffuserAutoRegions]
