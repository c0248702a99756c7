"""Pictures of identity results: each face boxed and labelled with its subject and similarity.

Colours follow the recognition model's same-person threshold: green at or above it, red below it, orange
for a face that resembles another subject's reference more (mixed), grey for faces no subject got.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .identity import ImageResult, SubjectResult

SAME = (40, 200, 80)
BELOW = (230, 50, 40)
MIXED = (255, 150, 0)
UNASSIGNED = (160, 160, 160)
INK = (255, 255, 255)
PANEL = (0, 0, 0)


def subject_colour(subject: SubjectResult) -> tuple[int, int, int]:
    if subject.mixed:
        return MIXED
    return SAME if subject.same_person else BELOW


def picture_colour(result: ImageResult, threshold: float) -> tuple[int, int, int]:
    if any(subject.mixed for subject in result.subjects):
        return MIXED
    return SAME if result.score >= threshold else BELOW


def font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=max(8, size))


def draw_label(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, colour, size: int, inside: tuple[int, int]) -> None:
    """Text on a filled box of `colour` with its top-left at `xy`, moved to stay inside the picture (width, height)."""
    face = font(size)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=face)
    pad = max(1, size // 6)
    width, height = right - left + 2 * pad, bottom - top + 2 * pad
    x = min(max(0, xy[0]), max(0, inside[0] - width))
    y = min(max(0, xy[1]), max(0, inside[1] - height))
    draw.rectangle((x, y, x + width, y + height), fill=colour)
    draw.text((x + pad - left, y + pad - top), text, fill=INK if colour != SAME else PANEL, font=face)


def annotate(picture: np.ndarray, result: ImageResult, threshold: float) -> np.ndarray:
    """The RGB uint8 picture with its faces boxed and labelled ('S1 0.87'), and its score in the corner."""
    image = Image.fromarray(picture)
    draw = ImageDraw.Draw(image)
    height, width = picture.shape[:2]
    size = max(10, min(width, height) // 24)
    line = max(1, min(width, height) // 160)
    owners = {subject.face: subject for subject in result.subjects if subject.face is not None}
    for face, box in enumerate(result.boxes):
        x1, y1, x2, y2 = (float(v) for v in box)
        x1, y1, x2, y2 = max(0.0, x1), max(0.0, y1), min(width - 1.0, x2), min(height - 1.0, y2)
        subject = owners.get(face)
        colour = UNASSIGNED if subject is None else subject_colour(subject)
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=line)
        if subject is not None:
            text = f"S{subject.subject + 1} {subject.similarity:.2f}"
            if subject.mixed:
                text += f" like S{subject.closest_subject + 1}"
            draw_label(draw, (x1, y2 + line), text, colour, size, (width, height))
    draw_label(draw, (0, 0), result.summary(), picture_colour(result, threshold), size, (width, height))
    return np.asarray(image)
