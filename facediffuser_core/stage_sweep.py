"""The alpha/beta trade-off as one picture: a grid of stage splits sampled from one seed.

Rows are alpha values (end of scene construction), columns beta values (end of fusion), both fractions of
the steps. A split with beta below alpha does not exist (fusion would end before it starts): its cell is
not sampled and the grid shows it as such. Cells are sampled and batched row by row, left to right.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .identity import MISSING_SIMILARITY, IdentityReport
from .identity_view import INK, PANEL, draw_label, font, picture_colour

GAP = 4
EMPTY_CELL = (40, 40, 40)
BEST_FRAME = (255, 215, 0)


def parse_fractions(text: str, name: str) -> list[float]:
    """'0.2, 0.3 0.4' -> [0.2, 0.3, 0.4]: numbers from 0 to 1, separated by commas or spaces, each once."""
    items = [item for item in re.split(r"[,\s;]+", text.strip()) if item]
    if not items:
        raise ValueError(f"{name} is empty: give one or more fractions of the steps, e.g. '0.2, 0.3, 0.4'")
    values = []
    for item in items:
        try:
            value = float(item)
        except ValueError:
            raise ValueError(f"{name}: '{item}' is not a number; write fractions of the steps separated by commas, e.g. '0.2, 0.3'") from None
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name}: {value:g} is outside 0..1; alpha and beta are fractions of the steps")
        if value in values:
            raise ValueError(f"{name}: {value:g} is listed twice")
        values.append(value)
    return values


@dataclass(frozen=True)
class Cell:
    row: int
    column: int
    alpha: float
    beta: float


@dataclass(frozen=True)
class StageGrid:
    alphas: tuple[float, ...]
    betas: tuple[float, ...]

    @classmethod
    def parse(cls, alphas: str, betas: str) -> "StageGrid":
        return cls(tuple(parse_fractions(alphas, "alphas")), tuple(parse_fractions(betas, "betas")))

    @property
    def cells(self) -> list[Cell]:
        """The cells that are sampled (beta >= alpha), row by row."""
        return [Cell(row, column, alpha, beta) for row, alpha in enumerate(self.alphas)
                for column, beta in enumerate(self.betas) if beta >= alpha]

    @property
    def skipped(self) -> int:
        return len(self.alphas) * len(self.betas) - len(self.cells)


def grid_picture(grid: StageGrid, pictures: np.ndarray, identity: IdentityReport | None = None) -> np.ndarray:
    """The sampled pictures (N, H, W, 3) uint8 in cell order laid out alpha (rows) by beta (columns), with the
    values in the margins and, given the pictures' identity results, each cell's score in its corner
    (coloured by the model's same-person threshold) and the best cell framed, unless no cell has every
    subject's face."""
    cells = grid.cells
    if len(pictures) != len(cells):
        raise ValueError(f"the grid has {len(cells)} sampled cells but {len(pictures)} pictures were given")
    if identity is not None and len(identity.images) != len(cells):
        raise ValueError(f"the grid has {len(cells)} sampled cells but {len(identity.images)} pictures were scored")
    height, width = pictures.shape[1:3]
    size = max(10, min(width, height) // 12)
    margin_left, margin_top = 4 * size, 3 * size
    canvas = Image.new("RGB", (margin_left + len(grid.betas) * (width + GAP), margin_top + len(grid.alphas) * (height + GAP)), PANEL)
    draw = ImageDraw.Draw(canvas)
    bounds = canvas.size
    label_font = font(size)

    def origin(row: int, column: int) -> tuple[int, int]:
        return margin_left + column * (width + GAP), margin_top + row * (height + GAP)

    def centred(text: str, centre_x: float, centre_y: float) -> None:
        left, top, right, bottom = draw.textbbox((0, 0), text, font=label_font)
        draw.text((centre_x - (left + right) / 2, centre_y - (top + bottom) / 2), text, fill=INK, font=label_font)

    draw.text((GAP, GAP), "alpha \\ beta", fill=INK, font=label_font)
    for column, beta in enumerate(grid.betas):
        centred(f"{beta:g}", origin(0, column)[0] + width / 2, margin_top * 2 / 3)
    for row, alpha in enumerate(grid.alphas):
        centred(f"{alpha:g}", margin_left / 2, origin(row, 0)[1] + height / 2)
        for column, beta in enumerate(grid.betas):
            if beta < alpha:
                x, y = origin(row, column)
                draw.rectangle((x, y, x + width - 1, y + height - 1), fill=EMPTY_CELL)
                draw.text((x + GAP, y + GAP), "beta < alpha", fill=(200, 200, 200), font=font(size * 2 // 3))
    best = None if identity is None else identity.order()[0]
    if best is not None and identity.images[best].score <= MISSING_SIMILARITY:
        best = None  # no cell has every subject's face: none is best
    for index, cell in enumerate(cells):
        x, y = origin(cell.row, cell.column)
        canvas.paste(Image.fromarray(pictures[index]), (x, y))
        if identity is not None:
            result = identity.images[index]
            colour = picture_colour(result, identity.threshold.similarity)
            draw_label(draw, (x, y + height - 2 * size), result.summary(), colour, size * 3 // 4, bounds)
        if index == best:
            draw.rectangle((x - GAP // 2, y - GAP // 2, x + width + GAP // 2 - 1, y + height + GAP // 2 - 1), outline=BEST_FRAME, width=GAP // 2)
    return np.array(canvas)
