"""Automatic regions: the people the TDM laid out, found by their faces at the end of scene construction.

At the first step after scene construction, the TDM's last denoised prediction is decoded and a face
detector reads the picture. Each found face becomes a person region (`person_box`), the regions are given to
the subjects left to right in marker order (`decide`), and from then on they act as a `regions` MASK would
(facediffuser_core.regions). Plain PyTorch, no ComfyUI; the detection itself is the caller's.

The expansion rule, for a face box of width w and height h and an expansion e (default 1):
- sideways, e * w on each side of the face; upwards, e * h above it (the hair, a hat); downwards, to the
  bottom of the picture (the body below the face); clipped to the picture.
- where two people's boxes overlap, the overlap is split at the midpoint between their faces' horizontal
  centres, so that no pixel belongs to two subjects (both tokens there would blend the two faces).

More faces than markers: the largest faces are taken (the TDM's background people are the small ones).
Fewer faces than markers: no regions at all, the paper's behaviour, and the caller says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .face_crop import box_area, faces_left_to_right

DEFAULT_EXPANSION = 1.0

Box = tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels


def person_box(face: Sequence[float], width: int, height: int, expansion: float = DEFAULT_EXPANSION) -> Box:
    """The person region around one face box (the module's expansion rule), in pixels of a width x height picture."""
    if expansion < 0:
        raise ValueError(f"the expansion must be 0 or more, got {expansion}")
    x1, y1, x2, y2 = (float(v) for v in face)
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"empty face box {tuple(face)}")
    side, top = expansion * (x2 - x1), expansion * (y2 - y1)
    return max(0.0, x1 - side), max(0.0, y1 - top), min(float(width), x2 + side), float(height)


def separate(persons: list[Box], faces: list[Sequence[float]]) -> list[Box]:
    """Person boxes (left to right, with their faces) whose overlaps are split between the two faces."""
    persons = [list(box) for box in persons]
    for left in range(len(persons)):
        for right in range(left + 1, len(persons)):
            a, b = persons[left], persons[right]
            if a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]:
                middle = ((faces[left][0] + faces[left][2]) / 2 + (faces[right][0] + faces[right][2]) / 2) / 2
                a[2], b[0] = min(a[2], middle), max(b[0], middle)
    return [tuple(box) for box in persons]


def box_masks(boxes: Sequence[Box], width: int, height: int) -> torch.Tensor:
    """(K, height, width) masks, 1 on the pixels whose centres lie inside each box."""
    columns = torch.arange(width, dtype=torch.float32) + 0.5
    rows = torch.arange(height, dtype=torch.float32) + 0.5
    masks = torch.zeros(len(boxes), height, width)
    for mask, (x1, y1, x2, y2) in zip(masks, boxes):
        inside_x = (columns >= x1) & (columns < x2)
        inside_y = (rows >= y1) & (rows < y2)
        mask[inside_y[:, None] & inside_x[None, :]] = 1.0
    return masks


@dataclass(frozen=True)
class AutoRegions:
    """What was found and what is used: the face boxes found, the person boxes given to the subjects in marker
    order (None: too few faces, no regions), and their masks at the picture's size."""

    subjects: int
    faces: tuple[Box, ...]
    persons: tuple[Box, ...] | None
    masks: torch.Tensor | None

    @property
    def fallback(self) -> bool:
        return self.persons is None

    def describe(self) -> str:
        if self.fallback:
            return (f"found {len(self.faces)} face(s) for {self.subjects} <|image|> marker(s), too few to give every subject a "
                    "region: sampling goes on without regions (the paper's behaviour)")
        boxes = ", ".join(f"({', '.join(str(round(v)) for v in box)})" for box in self.persons)
        return f"found {len(self.faces)} face(s); subject regions left to right, in marker order: {boxes}"


def decide(faces: Sequence[Sequence[float]], subjects: int, width: int, height: int,
           expansion: float = DEFAULT_EXPANSION) -> AutoRegions:
    """The regions for `subjects` markers from the face boxes found in a width x height picture."""
    found = tuple(tuple(float(v) for v in face[:4]) for face in faces)
    if len(found) < subjects:
        return AutoRegions(subjects, found, None, None)
    largest = sorted(range(len(found)), key=lambda i: -box_area(found[i]))[:subjects]
    chosen = [found[largest[i]] for i in faces_left_to_right([found[i] for i in largest])]
    persons = separate([person_box(face, width, height, expansion) for face in chosen], chosen)
    return AutoRegions(subjects, found, tuple(persons), box_masks(persons, width, height))
