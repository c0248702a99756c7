"""The stage pictures the pack ships (tests/support/stage_pictures.py draws them): every template has its thumbnail where
the template browser asks for it, and each picture's bars show the stages its settings make, read back from the
shipped files' pixels."""

from __future__ import annotations

import pytest
from PIL import Image

import stage_pictures
from facediffuser_core.schedule import StageSchedule


def closest(pixel) -> str:
    """`tdm` or `sdm`: which of the two stage colours a (JPEG-blurred) pixel is."""
    distance = {name: sum((a - b) ** 2 for a, b in zip(pixel, colour)) for name, colour in (("tdm", stage_pictures.TDM), ("sdm", stage_pictures.SDM))}
    return min(distance, key=distance.get)


def stages_read_back(image: Image.Image, box: tuple[int, int, int, int]) -> tuple[int, int]:
    """The bar's first fusion column and first subject column, from its pixels: a column all blue is scene
    construction, one with both colours (the checkerboard) fusion, one all orange subject enhancement."""
    x0, y0, x1, y1 = box
    kinds = []
    for x in range(x0 + 1, x1 - 1):
        colours = {closest(image.getpixel((x, y))) for y in range(y0 + 1, y1 - 1)}
        kinds.append("fusion" if len(colours) == 2 else "scene" if colours == {"tdm"} else "subject")
    fusion = [x0 + 1 + i for i, kind in enumerate(kinds) if kind == "fusion"]
    assert kinds == sorted(kinds, key=["scene", "fusion", "subject"].index), "the stages are not in order"
    return fusion[0], fusion[-1] + 1


def expected(box: tuple[int, int, int, int], schedule: StageSchedule) -> tuple[int, int]:
    x0, _, x1, _ = box
    return tuple(x0 + round((x1 - x0) * step / schedule.total_steps) for step in (schedule.scene_end, schedule.fusion_end))


def test_every_template_has_a_thumbnail_and_nothing_else_is_one():
    thumbnails = sorted(path.stem for path in stage_pictures.WORKFLOWS.glob("*.jpg"))
    assert thumbnails == stage_pictures.template_names()


@pytest.mark.parametrize("name", stage_pictures.template_names())
def test_each_thumbnail_shows_its_templates_stages(name):
    info = stage_pictures.template(name)
    image = Image.open(stage_pictures.WORKFLOWS / f"{name}.jpg")
    assert image.format == "JPEG" and image.size == stage_pictures.THUMBNAIL_SIZE
    image = image.convert("RGB")
    bars = stage_pictures.thumbnail_bars(info)
    assert len(bars) == len(info.splits)
    for box, schedule in bars:
        fusion_start, subject_start = stages_read_back(image, box)
        want = expected(box, schedule)
        # JPEG blurs a colour edge over a pixel or two; a step is at least 5 pixels wide in every thumbnail
        assert abs(fusion_start - want[0]) <= 2 and abs(subject_start - want[1]) <= 2, (
            f"{name}.jpg: its bar shows other stages than the template's settings ({schedule}): "
            "run `cd tests && python support/stage_pictures.py`")


def test_the_readmes_diagram_shows_the_nodes_default_stages():
    alpha, beta, steps = stage_pictures.DEFAULTS
    image = Image.open(stage_pictures.DIAGRAM).convert("RGB")
    schedule = StageSchedule.from_fractions(alpha, beta, steps)
    assert stages_read_back(image, stage_pictures.DIAGRAM_BAR) == expected(stage_pictures.DIAGRAM_BAR, schedule)


def test_the_diagrams_defaults_are_the_snf_samplers(comfyui):
    inputs = comfyui.nodes.NODE_CLASS_MAPPINGS["FaceDiffuserSNFSampler"].INPUT_TYPES()["required"]
    assert stage_pictures.DEFAULTS == tuple(inputs[name][1]["default"] for name in ("alpha", "beta", "steps"))
