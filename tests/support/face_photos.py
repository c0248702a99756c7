"""Real photos of people for the tests (insightface's bundled pictures, scikit-image's astronaut) as RGB uint8
arrays, cut-outs of their faces, and ComfyUI IMAGE batches of them."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from facediffuser_core.face_crop import square_crop_box


def insightface_image(name: str) -> np.ndarray:
    import insightface

    path = os.path.join(os.path.dirname(insightface.__file__), "data", "images", name)
    return np.asarray(Image.open(path).convert("RGB"))


def comfy_image(*rgb_uint8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.stack(rgb_uint8)).float() / 255


def face_photo(photo: np.ndarray, box, margin: float = 0.6, size: int | None = None) -> np.ndarray:
    """The square around a face box, widened by `margin` of its size on each side: a portrait of that person,
    scaled to `size` x `size` when given (an IMAGE batch needs photos of one size)."""
    left, top, right, bottom = square_crop_box(box, photo.shape[1], photo.shape[0], margin)
    portrait = np.ascontiguousarray(photo[top:bottom, left:right])
    return portrait if size is None else np.asarray(Image.fromarray(portrait).resize((size, size), Image.BILINEAR))


def side_by_side(*photos: np.ndarray, size: int = 240) -> np.ndarray:
    """The photos scaled to `size` x `size` and put next to each other."""
    return np.concatenate([np.asarray(Image.fromarray(p).resize((size, size), Image.BILINEAR)) for p in photos], axis=1)
