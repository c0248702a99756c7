"""Face-diffuser Encode Reference Faces: photos of the subjects -> one CLIP image embedding per face."""

from __future__ import annotations

import logging

import numpy as np
import torch

import comfy.model_management
import comfy.utils
from comfy_api.latest import io

from ..facediffuser_core.face_crop import (
    OFFICIAL_OBJECT_RESOLUTION,
    choose_face,
    crop,
    preprocess_reference_faces,
    square_crop_box,
    to_uint8_array,
)
from .subject_encoder import FaceEmbeds
from .types import FaceEmbeds as FaceEmbedsType
from .types import SubjectEncoder as SubjectEncoderType

NODE_NAME = "Face-diffuser Encode Reference Faces"
DEFAULT_MARGIN = 0.3


def detect_face_boxes(face_analysis, image: torch.Tensor) -> list[tuple[float, float, float, float]]:
    """Face boxes (x1, y1, x2, y2) in pixels of one ComfyUI image (H, W, 3), from the detector of insightface's
    FaceAnalysis alone: the boxes its `get` would give, without running the pack's other models (landmarks,
    age and gender, recognition) on every face. It wants a BGR uint8 array."""
    bgr = to_uint8_array(image)[:, :, ::-1]
    boxes, _ = face_analysis.det_model.detect(np.ascontiguousarray(bgr), max_num=0, metric="default")
    return [tuple(float(v) for v in box[:4]) for box in boxes]


def crop_reference_face(face_analysis, image: torch.Tensor, batch_index: int, face: str, face_index: int, margin: float) -> torch.Tensor:
    boxes = detect_face_boxes(face_analysis, image)
    if not boxes:
        raise ValueError(
            f"{NODE_NAME}: no face found in image {batch_index} of the batch (counting from 0). Use a photo where the face "
            "is clearer or larger, raise the loader's det_size for small faces, or disconnect face_analysis to use the "
            "whole image as the face crop (as the official demo does)."
        )
    try:
        chosen = choose_face(boxes, face, face_index)
    except ValueError as error:
        raise ValueError(f"{NODE_NAME}: image {batch_index} of the batch: {error}") from error
    height, width = image.shape[:2]
    box = square_crop_box(boxes[chosen], width, height, margin)
    logging.info("%s: image %d: %d face(s) found, using the face at %s, crop %s",
                 NODE_NAME, batch_index, len(boxes), tuple(round(v) for v in boxes[chosen]), box)
    return crop(image, box)


class FaceDiffuserEncodeReferenceFaces(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FaceDiffuserEncodeReferenceFaces",
            display_name=NODE_NAME,
            category="facediffuser/conditioning",
            description=(
                "Turns one photo per subject into the face embeddings the SDM's prompt needs. Batch the photos in the order of "
                "the prompt's <|image|> markers. With a face analysis connected, the face in each photo is found and cut out "
                "(square, with a margin); without it, each whole image is used, as in the official demo whose references are "
                "face crops. Then the official preprocessing (pad to square with black, resize) and the SDM's CLIP vision tower."
            ),
            inputs=[
                io.Image.Input("images", tooltip="One photo per subject, batched in the order of the <|image|> markers."),
                SubjectEncoderType.Input("subject_encoder", tooltip="From the Face-diffuser SDM Loader."),
                io.FaceAnalysis.Input("face_analysis", optional=True,
                                      tooltip="Face-diffuser InsightFace Loader. Leave unconnected when the images are already face crops."),
                io.Combo.Input("face", options=["largest", "index"], default="largest",
                               tooltip="Which detected face of a photo to use: the largest, or the one at face_index counted from "
                                       "the left (0 = leftmost)."),
                io.Int.Input("face_index", default=0, min=0, max=63,
                             tooltip="With face = index: the face's position from the left in each photo, 0 = leftmost."),
                io.Float.Input("margin", default=DEFAULT_MARGIN, min=0.0, max=2.0, step=0.05,
                               tooltip="Space added around the detected face box on each side, as a fraction of the box size "
                                       "(0.3 keeps the head and a little hair); the crop is then made square."),
                io.Int.Input("object_resolution", default=OFFICIAL_OBJECT_RESOLUTION, min=64, max=2048, step=8, advanced=True,
                             tooltip="The square size the padded face is resized to before the 224x224 CLIP input; the "
                                     "official demo uses 512."),
            ],
            outputs=[
                FaceEmbedsType.Output(display_name="face_embeds"),
                io.Image.Output(display_name="faces", tooltip="The faces as they enter the vision tower (padded, resized), to check the crops."),
            ],
        )

    @classmethod
    def execute(cls, images: torch.Tensor, subject_encoder, face: str, face_index: int, margin: float,
                object_resolution: int, face_analysis=None) -> io.NodeOutput:
        if images.dim() != 4 or images.shape[-1] != 3:
            raise ValueError(f"{NODE_NAME}: images must be an RGB IMAGE batch (batch, height, width, 3), got shape {tuple(images.shape)}")
        faces = []
        progress = comfy.utils.ProgressBar(images.shape[0])
        for batch_index, image in enumerate(images):
            comfy.model_management.throw_exception_if_processing_interrupted()
            if face_analysis is None:
                faces.append(image)
            else:
                faces.append(crop_reference_face(face_analysis, image, batch_index, face, face_index, margin))
            progress.update(1)
        pixel_values, object_images = preprocess_reference_faces(faces, object_resolution)
        embeddings = subject_encoder.embed(pixel_values)
        return io.NodeOutput(FaceEmbeds(embeddings), object_images)


NODES = [FaceDiffuserEncodeReferenceFaces]
