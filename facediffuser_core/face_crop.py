"""Reference faces: where to crop a photo, and the official preprocessing before the CLIP vision tower.

The official demo feeds ready-made face crops; the pack can also take ordinary photos, cut around a
detected face (choose a face, widen its box by a margin, make it square, keep it inside the image).

The official preprocessing of one reference image (uint8 RGB) is: pad to a square with black, centred
((long - short) // 2 on each side of the short edge); resize to object_resolution x object_resolution,
bilinear with antialias; scale to [0, 1]; resize to 224 x 224, bilinear with antialias; normalise with
CLIP's mean and std. The official code ran it with torchvision's tensor transforms on uint8 images read
from files, whose resize works in float and rounds back to uint8. ComfyUI images are float in [0, 1]
(LOAD IMAGE divides the file's uint8 values by 255), so they are first rounded to the 256 uint8 levels:
a photo loaded in ComfyUI then goes through exactly the official arithmetic.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_INPUT_SIZE = 224
OFFICIAL_OBJECT_RESOLUTION = 512

FaceChoice = Literal["largest", "index"]


def box_area(box: Sequence[float]) -> float:
    x1, y1, x2, y2 = box
    return max(0.0, x2 - x1) * max(0.0, y2 - y1)


def faces_left_to_right(boxes: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the boxes ordered by the horizontal centre of each box (ties: top to bottom)."""
    return sorted(range(len(boxes)), key=lambda i: ((boxes[i][0] + boxes[i][2]) / 2, (boxes[i][1] + boxes[i][3]) / 2))


def choose_face(boxes: Sequence[Sequence[float]], choice: FaceChoice, index: int = 0) -> int:
    """The index into `boxes` of the face to use: the largest box, or the index-th face counted from the
    left (0 is the leftmost). Raises ValueError when there is no face or the index is out of range."""
    if not boxes:
        raise ValueError("no face to choose from")
    if choice == "largest":
        return max(range(len(boxes)), key=lambda i: box_area(boxes[i]))
    if choice == "index":
        order = faces_left_to_right(boxes)
        if not 0 <= index < len(order):
            raise ValueError(f"face index {index} asked for, but only {len(order)} faces were found (indices 0 to {len(order) - 1}, left to right)")
        return order[index]
    raise ValueError(f"unknown face choice {choice!r}: use 'largest' or 'index'")


def square_crop_box(box: Sequence[float], image_width: int, image_height: int, margin: float) -> tuple[int, int, int, int]:
    """A square (left, top, right, bottom) pixel box around a face box, inside the image.

    The face box grows by `margin` times its size on every side (0.5 doubles it), becomes a square on its
    longer side around the same centre, and is shifted (then, if still too large, shrunk) to fit the image.
    """
    if margin < 0:
        raise ValueError(f"the crop margin must be 0 or more, got {margin}")
    x1, y1, x2, y2 = (float(v) for v in box)
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"empty face box {tuple(box)}")
    centre_x, centre_y = (x1 + x2) / 2, (y1 + y2) / 2
    side = max(x2 - x1, y2 - y1) * (1 + 2 * margin)
    side_px = max(1, min(int(round(side)), image_width, image_height))
    left = min(max(int(round(centre_x - side_px / 2)), 0), image_width - side_px)
    top = min(max(int(round(centre_y - side_px / 2)), 0), image_height - side_px)
    return left, top, left + side_px, top + side_px


def to_uint8_levels(images: torch.Tensor) -> torch.Tensor:
    """ComfyUI float images in [0, 1] -> float32 values on the 0..255 integer grid (what a uint8 file holds)."""
    return (images.float() * 255).round().clamp(0, 255)


def to_uint8_array(images: torch.Tensor) -> np.ndarray:
    """ComfyUI float images in [0, 1] -> a uint8 numpy array of the same shape, for image libraries (RGB)."""
    return to_uint8_levels(images).to(torch.uint8).cpu().numpy()


def pad_to_square(image: torch.Tensor) -> torch.Tensor:
    """(C, H, W) -> black padding of (long - short) // 2 on both sides of the short edge, as the official code.

    For an odd difference the result stays one pixel short of square; the following resize to a square
    absorbs it, as it did in the official code.
    """
    _, height, width = image.shape
    pad = abs(height - width) // 2
    if height > width:
        return F.pad(image, (pad, pad, 0, 0))
    return F.pad(image, (0, 0, pad, pad))


def _resize_rounded(image: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear antialiased resize of 0..255 values, rounded back to the uint8 grid, as torchvision's tensor
    Resize does for a uint8 image (it interpolates in float, then rounds)."""
    resized = F.interpolate(image.unsqueeze(0), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return resized.squeeze(0).round().clamp(0, 255)


def object_image(image: torch.Tensor, object_resolution: int = OFFICIAL_OBJECT_RESOLUTION) -> torch.Tensor:
    """One ComfyUI image (H, W, 3) in [0, 1] -> the padded square at object_resolution, (3, R, R) in [0, 1]."""
    if image.dim() != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected one RGB image (height, width, 3), got shape {tuple(image.shape)}")
    levels = to_uint8_levels(image).permute(2, 0, 1)
    return _resize_rounded(pad_to_square(levels), object_resolution) / 255


def clip_pixels(object_images: torch.Tensor) -> torch.Tensor:
    """(N, 3, R, R) in [0, 1] -> (N, 3, 224, 224) normalised CLIP input."""
    resized = F.interpolate(object_images, size=(CLIP_INPUT_SIZE, CLIP_INPUT_SIZE), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(CLIP_MEAN, dtype=resized.dtype, device=resized.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=resized.dtype, device=resized.device).view(1, 3, 1, 1)
    return (resized - mean) / std


def preprocess_reference_faces(images: Sequence[torch.Tensor], object_resolution: int = OFFICIAL_OBJECT_RESOLUTION) -> tuple[torch.Tensor, torch.Tensor]:
    """Face images of any sizes, each (H, W, 3) in [0, 1] -> (CLIP input (N, 3, 224, 224), the object
    images (N, R, R, 3) in [0, 1] for display)."""
    if not images:
        raise ValueError("no reference face images given")
    if object_resolution < 1:
        raise ValueError(f"object_resolution must be positive, got {object_resolution}")
    objects = torch.stack([object_image(image, object_resolution) for image in images])
    return clip_pixels(objects), objects.permute(0, 2, 3, 1).contiguous()


def crop(image: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    """(H, W, C) image cut to a (left, top, right, bottom) pixel box."""
    left, top, right, bottom = box
    return image[top:bottom, left:right]


