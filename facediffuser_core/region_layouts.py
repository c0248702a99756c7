"""The Region Layout node's layouts as boxes: left and right halves, thirds, or boxes given as fractions.

Standard library only, so that the runner checks a layout given on its command line (`--regions`, `--boxes`)
by the node's own rules before any ComfyUI starts; facediffuser_core.regions draws the masks from these boxes.
"""

from __future__ import annotations

import re

LAYOUT_HALVES = "halves"
LAYOUT_THIRDS = "thirds"
LAYOUT_BOXES = "boxes"
LAYOUTS = (LAYOUT_HALVES, LAYOUT_THIRDS, LAYOUT_BOXES)
BOXES_EXAMPLE = "0 0 0.5 1; 0.5 0 1 1"


def layout_boxes(layout: str, subjects: int, width: int, height: int, boxes: str = "") -> list[tuple[int, int, int, int]]:
    """One (x0, y0, x1, y1) pixel box per subject, left to right in marker order, for a width x height picture:
    left/right halves, thirds, or normalised boxes "x0 y0 x1 y1; ..." (fractions of the width and height)."""
    if width < 8 or height < 8:
        raise ValueError(f"the picture is {width}x{height}; regions need at least 8x8 pixels")
    if layout in (LAYOUT_HALVES, LAYOUT_THIRDS):
        columns = 2 if layout == LAYOUT_HALVES else 3
        if subjects != columns:
            raise ValueError(f"'{layout}' makes {columns} regions but {subjects} subject(s) were asked for: "
                             f"use '{LAYOUT_HALVES}' for two people, '{LAYOUT_THIRDS}' for three, '{LAYOUT_BOXES}' otherwise")
        edges = [round(width * index / columns) for index in range(columns + 1)]
        return [(edges[i], 0, edges[i + 1], height) for i in range(columns)]
    if layout == LAYOUT_BOXES:
        found = [_box_pixels(text, index, width, height) for index, text in enumerate(_box_texts(boxes))]
        if len(found) != subjects:
            raise ValueError(f"'boxes' lists {len(found)} box(es) but {subjects} subject(s) were asked for: "
                             f"one box per marker, separated by ';', e.g. '{BOXES_EXAMPLE}'")
        return found
    raise ValueError(f"unknown layout '{layout}': one of {', '.join(LAYOUTS)}")


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
