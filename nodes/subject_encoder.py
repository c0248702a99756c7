"""The SDM's image side as one object: the CLIP vision tower with its projection, and the postfuse MLP.

`SubjectEncoder` is what the SDM loader outputs (FACEDIFFUSER_SUBJECT_ENCODER). The reference-face node
uses it to embed faces, the subject-prompt node to write them into the prompt's marked tokens. It has no
node of its own.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

import comfy.model_management

from ..facediffuser_core.postfuse import PostfuseModule, fuse_marked_rows


@dataclass(frozen=True)
class FaceEmbeds:
    """FACEDIFFUSER_FACE_EMBEDS: one projected CLIP image embedding per reference face, (N, D), in the
    order of the prompt's <|image|> markers."""

    embeddings: torch.Tensor

    @property
    def count(self) -> int:
        return int(self.embeddings.shape[0])


class SubjectEncoder:
    def __init__(self, clip_vision, postfuse: PostfuseModule):
        """clip_vision: a comfy.clip_vision.ClipVisionModel with a visual projection; postfuse: its fusion MLP."""
        projection = getattr(clip_vision.model, "visual_projection", None)
        out_features = getattr(projection, "out_features", None)
        if out_features is not None and out_features != postfuse.dim:
            raise ValueError(
                f"the vision tower projects to {out_features} values but the postfuse module is {postfuse.dim} wide: "
                "both must come from the same SDM checkpoint"
            )
        self.clip_vision = clip_vision
        self.postfuse = postfuse.eval().requires_grad_(False)

    @property
    def dim(self) -> int:
        return self.postfuse.dim

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Preprocessed faces (N, 3, 224, 224) -> (N, D) projected pooled embeddings, float32.

        The vision model is called directly with the official preprocessing already applied: ClipVisionModel
        .encode_image would centre-crop and resize bicubically, which is not what the SDM was trained with.
        """
        comfy.model_management.load_model_gpu(self.clip_vision.patcher)
        device = self.clip_vision.load_device
        with torch.no_grad():
            _, _, projected, _ = self.clip_vision.model(pixel_values=pixel_values.to(device=device, dtype=torch.float32))
        return projected.float().to(comfy.model_management.intermediate_device())

    def fuse(self, hidden_states: torch.Tensor, rows: Sequence[int], face_embeds: FaceEmbeds) -> torch.Tensor:
        """The augmented conditioning: hidden_states (B, T, D) with postfuse(row, face) at each marked row."""
        if hidden_states.shape[-1] != self.dim:
            raise ValueError(
                f"the text conditioning is {hidden_states.shape[-1]} wide but the subject encoder's postfuse is {self.dim} "
                "wide: connect the CLIP loaded from the same SDM checkpoint as the subject encoder"
            )
        if face_embeds.embeddings.shape[-1] != self.dim:
            raise ValueError(
                f"the face embeddings are {face_embeds.embeddings.shape[-1]} wide but the postfuse is {self.dim} wide: "
                "encode the reference faces with this same subject encoder"
            )
        device = comfy.model_management.text_encoder_device()
        try:
            augmented = fuse_marked_rows(self.postfuse, hidden_states.to(device), rows, face_embeds.embeddings)
        finally:
            self.postfuse.to(comfy.model_management.text_encoder_offload_device())
        logging.debug("Face-diffuser: fused %d reference faces into rows %s", face_embeds.count, list(rows))
        return augmented.to(hidden_states.device)
