"""Region layouts: the Region Layout node's named arrangements (halves, thirds) and boxes written as text,
turned into one mask per subject. Plain PyTorch, no ComfyUI; what the masks then do is
facediffuser_core.regions.
"""

from __future__ import annotations

import re

import torch

LAYOUT_HALVES = "halves"
LAYOUT_THIRDS = "thirds"
LAYOUT_BOXES = "boxes"
LAYOUTS = (LAYOUT_HALVES, LAYOUT_THIRDS, LAYOUT_BOXES)
BOXES_EXAMPLE = "0 0 0.5 1; 0.5 0 1 1"


def layout_masks(layout: str, subjects: int, width: int, height: int, boxes: str = "") -> torch.Tensor:
    """Masks (subjects, height, width) for a layout: left/right halves, thirds, or normalised boxes
    "x0 y0 x1 y1; ..." (fractions of the width and height, left to right in marker order)."""
    if width < 8 or height < 8:
        raise ValueError(f"the picture is {width}x{height}; regions need at least 8x8 pixels")
    if layout in (LAYOUT_HALVES, LAYOUT_THIRDS):
        columns = 2 if layout == LAYOUT_HALVES else 3
        if subjects != columns:
            raise ValueError(f"'{layout}' makes {columns} regions but {subjects} subject(s) were asked for: "
                             f"use '{LAYOUT_HALVES}' for two people, '{LAYOUT_THIRDS}' for three, '{LAYOUT_BOXES}' otherwise")
        edges = [round(width * index / columns) for index in range(columns + 1)]
        boxes_px = [(edges[i], 0, edges[i + 1], height) for i in range(columns)]
    elif layout == LAYOUT_BOXES:
        boxes_px = [_box_pixels(text, index, width, height) for index, text in enumerate(_box_texts(boxes))]
        if len(boxes_px) != subjects:
            raise ValueError(f"'boxes' lists {len(boxes_px)} box(es) but {subjects} subject(s) were asked for: "
                             f"one box per marker, separated by ';', e.g. '{BOXES_EXAMPLE}'")
    else:
        raise ValueError(f"unknown layout '{layout}': one of {', '.join(LAYOUTS)}")
    masks = torch.zeros(len(boxes_px), height, width)
    for mask, (x0, y0, x1, y1) in zip(masks, boxes_px):
        mask[y0:y1, x0:x1] = 1.0
    return masks


def _box_texts(boxes: str) -> list[str]:
    return [part for part in (piece.strip() for piece in boxes.split(";")) if part]


def _box_pixels(text: str, index: int, width: int, height: int) -> tuple[int, int, int, int]:
    try:
        values = [float(value) for value in re.split(r"[\s,]+", text) if value]
    except ValueError:
        values = []
    if len(values) != 4:
        raise ValueError(f"box {index + 1} ('{text}') is not four numbers x0 y0 x1 y1, e.g. '{BOXES_EXAMPLE}'")
    x0, y0, x1, y1 = values
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise ValueError(f"box {index + 1} ('{text}') must have 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 (fractions of the picture)")
    box = (round(x0 * width), round(y0 * height), round(x1 * width), round(y1 * height))
    if box[2] <= box[0] or box[3] <= box[1]:
        raise ValueError(f"box {index + 1} ('{text}') is less than a pixel at {width}x{height}")
    return box

