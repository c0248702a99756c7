"""The stage sweep's values and cells, the grid picture, and the identity annotations (plain tier)."""

from __future__ import annotations

import numpy as np
import pytest

from facediffuser_core.identity import IdentityReport, ImageResult, SubjectResult, threshold_for
from facediffuser_core.identity_view import BELOW, MIXED, SAME, UNASSIGNED, annotate
from facediffuser_core.stage_sweep import BEST_FRAME, EMPTY_CELL, GAP, StageGrid, grid_picture, parse_fractions


def test_fractions_are_parsed_and_bad_ones_named():
    assert parse_fractions(" 0.2, 0.3 0.45;1", "alphas") == [0.2, 0.3, 0.45, 1.0]
    for text, message in (("", "alphas is empty"), ("0.2, x", "'x' is not a number"), ("1.5", "1.5 is outside 0..1"),
                          ("0.2 0.2", "0.2 is listed twice")):
        with pytest.raises(ValueError, match=message):
            parse_fractions(text, "alphas")


def test_cells_row_by_row_without_splits_whose_fusion_ends_before_it_starts():
    grid = StageGrid.parse("0.3, 0.7", "0.5, 0.8")
    assert [(c.row, c.column, c.alpha, c.beta) for c in grid.cells] == [(0, 0, 0.3, 0.5), (0, 1, 0.3, 0.8), (1, 1, 0.7, 0.8)]
    assert grid.skipped == 1


def cell_pixel(grid, picture, row, column, height, width, dx=0.5, dy=0.5):
    """The grid picture's pixel at a relative position inside a cell, from the layout's own rules."""
    margin_left = picture.shape[1] - len(grid.betas) * (width + GAP)
    margin_top = picture.shape[0] - len(grid.alphas) * (height + GAP)
    return picture[margin_top + row * (height + GAP) + int(dy * height), margin_left + column * (width + GAP) + int(dx * width)]


def test_grid_picture_places_each_cell_and_frames_the_best():
    grid = StageGrid.parse("0.3, 0.7", "0.5, 0.8")
    height, width = 48, 64
    colours = [(200, 0, 0), (0, 200, 0), (0, 0, 200)]
    pictures = np.stack([np.full((height, width, 3), colour, np.uint8) for colour in colours])
    subject = SubjectResult(0, 0, 0.2, False, False, 0, False)
    identity = IdentityReport("w600k_r50", "a stand-in", threshold_for("w600k_r50"),
                              [ImageResult(0, [(0, 0, 8, 8)], [subject], 0.2), ImageResult(1, [(0, 0, 8, 8)], [subject], 0.9),
                               ImageResult(2, [], [subject], -1.0)])
    picture = grid_picture(grid, pictures, identity)
    assert picture.dtype == np.uint8 and picture.shape[0] > 2 * height and picture.shape[1] > 2 * width
    for cell, colour in zip(grid.cells, colours):
        assert tuple(cell_pixel(grid, picture, cell.row, cell.column, height, width, dy=0.3)) == colour
    assert tuple(cell_pixel(grid, picture, 1, 0, height, width, dy=0.8)) == EMPTY_CELL
    # the best cell (0.9, row 0, column 1) has the frame in the gap around it, the others not
    margin_left = picture.shape[1] - 2 * (width + GAP)
    margin_top = picture.shape[0] - 2 * (height + GAP)
    frame_row = margin_top - 1
    assert tuple(picture[frame_row, margin_left + (width + GAP) + width // 2]) == BEST_FRAME
    assert tuple(picture[frame_row, margin_left + width // 2]) != BEST_FRAME
    # scores below the threshold get a red label, at the cell's bottom left
    labels = picture[margin_top + height - 20:margin_top + height, margin_left:margin_left + 30].reshape(-1, 3)
    assert (labels == BELOW).all(axis=1).any()
    # with no face in any cell, no cell is framed as the best
    nobody = IdentityReport("w600k_r50", "a stand-in", threshold_for("w600k_r50"), [ImageResult(i, [], [subject], -1.0) for i in range(3)])
    assert not (grid_picture(grid, pictures, nobody) == BEST_FRAME).all(axis=2).any()


def test_grid_picture_refuses_counts_that_do_not_fit():
    grid = StageGrid.parse("0.3", "0.5, 0.8")
    with pytest.raises(ValueError, match="2 sampled cells but 3 pictures"):
        grid_picture(grid, np.zeros((3, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="2 sampled cells but 1 pictures were scored"):
        grid_picture(grid, np.zeros((2, 8, 8, 3), np.uint8), IdentityReport("dlib", "", threshold_for("dlib"), [ImageResult(0, [], [], -1.0)]))


def test_annotation_colours_faces_by_verdict():
    picture = np.zeros((200, 400, 3), np.uint8)
    boxes = [(10, 40, 90, 120), (110, 40, 190, 120), (210, 40, 290, 120), (310, 40, 390, 120)]
    subjects = [
        SubjectResult(0, 0, 0.95, False, False, 0, True),
        SubjectResult(1, 1, 0.40, False, False, 1, False),
        SubjectResult(2, 2, 0.80, False, True, 0, False),
        SubjectResult(3, None, None, True, False, None, False),
    ]
    result = ImageResult(0, boxes, subjects, -1.0)
    out = annotate(picture, result, threshold=0.9)
    assert out.shape == picture.shape
    for box, colour in zip(boxes, (SAME, BELOW, MIXED, UNASSIGNED)):
        assert tuple(out[(box[1] + box[3]) // 2, box[0]]) == colour  # the box's left edge
    assert np.array_equal(out[80, 150], picture[80, 150])  # inside a box stays untouched
