"""Draws Face-diffuser's three sampling stages as the pack's pictures, from the stage rule itself
(facediffuser_core.schedule.StageSchedule) and the shipped workflows' own settings:

- docs/stages.png: the three stages at the nodes' defaults (50 steps, alpha 0.3, beta 0.6), for the README;
- workflows/<template>.jpg: each template's thumbnail in ComfyUI's template browser (the frontend asks a custom
  node pack's template for `<name>.jpg` beside its `.json`): its name, people, sampler and its own stages.

    cd tests && python support/stage_pictures.py

tests/docs/test_stage_pictures.py reads the stages back from the shipped pictures' bars, so a template whose steps,
alpha or beta change without its thumbnail being redrawn fails there.
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

import standalone  # noqa: F401  (facediffuser_core, as pytest.ini gives the tests)
from facediffuser_core.schedule import StageSchedule

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = REPO / "workflows"
DIAGRAM = REPO / "docs" / "stages.png"

BACKGROUND = (24, 26, 31)
TEXT = (230, 232, 236)
MUTED = (150, 156, 168)
# The Saliency Preview's colours: blue where the TDM painted, orange where the SDM did.
TDM = (59, 130, 246)
SDM = (245, 158, 11)
CHECKER = 6  # fusion is drawn as a checkerboard of both colours: SNF picks a model per latent pixel

SAMPLERS = ("FaceDiffuserSNFSampler", "FaceDiffuserStageSweep", "FaceDiffuserGuider")


def font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size)


@dataclass(frozen=True)
class Template:
    name: str
    people: int
    sampling: str       # "SNF Sampler, ddim / ddim_uniform" and the like
    steps: int
    splits: list[tuple[float, float]]  # (alpha, beta) per bar: one, or a stage sweep's grid row by row
    grid_columns: int   # bars per row (the sweep's betas), 1 otherwise
    extras: list[str]   # other settings a user should recognise (regions, official noise)


def template(name: str) -> Template:
    """A shipped workflow's settings, read from its API format (the same graph as the UI file)."""
    graph = json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())
    by_type = {node["class_type"]: node["inputs"] for node in graph.values()}
    people = sum(node["class_type"] == "LoadImage" for node in graph.values())
    (kind,) = [kind for kind in SAMPLERS if kind in by_type]
    inputs = by_type[kind]
    extras = []
    if kind == "FaceDiffuserGuider":
        sampler, scheduler, steps = by_type["KSamplerSelect"]["sampler_name"], by_type["BasicScheduler"]["scheduler"], by_type["BasicScheduler"]["steps"]
        sampling = f"Guider + SamplerCustomAdvanced, {sampler} / {scheduler}"
        extras.append("Saliency Preview")
    else:
        sampler, scheduler, steps = inputs["sampler_name"], inputs["scheduler"], inputs["steps"]
        sampling = f"{'Stage Sweep' if kind == 'FaceDiffuserStageSweep' else 'SNF Sampler'}, {sampler} / {scheduler}"
    if kind == "FaceDiffuserStageSweep":
        alphas = [float(a) for a in inputs["alphas"].split(",")]
        betas = [float(b) for b in inputs["betas"].split(",")]
        splits, columns = [(a, b) for a in alphas for b in betas], len(betas)
        extras.append("Identity Score per cell")
    else:
        splits, columns = [(inputs["alpha"], inputs["beta"])], 1
    if "FaceDiffuserRegionLayout" in by_type:
        extras.append(f"regions: {by_type['FaceDiffuserRegionLayout']['layout']}")
    if "FaceDiffuserAutoRegions" in by_type:
        extras.append("regions: found around the scene's faces")
    if inputs.get("noise") == "official":
        extras.append("official noise")
    return Template(name, people, sampling, steps, splits, columns, extras)


def template_names() -> list[str]:
    return sorted(path.stem for path in WORKFLOWS.glob("*.json"))


def draw_bar(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], schedule: StageSchedule) -> None:
    """The steps left to right: TDM blue, fusion a checkerboard of both, SDM orange; a step's width is the same in each."""
    x0, y0, x1, y1 = box
    def column(step: int) -> int:
        return x0 + round((x1 - x0) * step / schedule.total_steps)
    draw.rectangle((x0, y0, column(schedule.scene_end) - 1, y1 - 1), fill=TDM)
    draw.rectangle((column(schedule.fusion_end), y0, x1 - 1, y1 - 1), fill=SDM)
    left, right = column(schedule.scene_end), column(schedule.fusion_end)
    for y in range(y0, y1, CHECKER):
        for x in range(left, right, CHECKER):
            colour = TDM if ((x - left) // CHECKER + (y - y0) // CHECKER) % 2 == 0 else SDM
            draw.rectangle((x, y, min(x + CHECKER, right) - 1, min(y + CHECKER, y1) - 1), fill=colour)


# --- the README's diagram -----------------------------------------------------------------------------------

DIAGRAM_SIZE = (1200, 400)
DIAGRAM_BAR = (40, 110, 1160, 170)
DEFAULTS = (0.3, 0.6, 50)  # the SNF Sampler's defaults: alpha, beta, steps


def diagram() -> Image.Image:
    alpha, beta, steps = DEFAULTS
    schedule = StageSchedule.from_fractions(alpha, beta, steps)
    image = Image.new("RGB", DIAGRAM_SIZE, BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.text((40, 24), "Face-diffuser samples in three stages", font=font(30), fill=TEXT)
    draw.text((40, 66), f"{steps} steps, alpha {alpha}, beta {beta} (the nodes' defaults); each latent pixel of the fusion "
              "stage comes from the model whose guidance is more salient there", font=font(17), fill=MUTED)
    draw_bar(draw, DIAGRAM_BAR, schedule)
    x0, _, x1, y1 = DIAGRAM_BAR
    for step in range(0, steps + 1, 5):
        x = x0 + round((x1 - x0) * step / steps)
        draw.line((x, y1, x, y1 + 6), fill=MUTED)
        draw.text((x, y1 + 8), str(step), font=font(14), fill=MUTED, anchor="ma")
    stages = [
        (0, schedule.scene_end, TDM, "scene construction", ["TDM alone: the text prompt", "against the empty prompt", "2 UNet evaluations a step"]),
        (schedule.scene_end, schedule.fusion_end, None, "subject-scene fusion", ["both models; SNF takes each", "pixel from the more salient one", "4 UNet evaluations a step"]),
        (schedule.fusion_end, steps, SDM, "subject enhancement", ["SDM alone: the prompt with the", "faces against it without them", "2 UNet evaluations a step"]),
    ]
    for first, end, colour, title, lines in stages:
        x = x0 + round((x1 - x0) * first / steps)
        draw.text((x + 4, 215), f"{title}", font=font(20), fill=colour or TEXT)
        draw.text((x + 4, 242), f"steps {first}-{end - 1}", font=font(16), fill=MUTED)
        for row, line in enumerate(lines):
            draw.text((x + 4, 268 + 22 * row), line, font=font(16), fill=TEXT)
    evaluations = 2 * schedule.scene_end + 4 * (schedule.fusion_end - schedule.scene_end) + 2 * (steps - schedule.fusion_end)
    draw.text((40, 356), f"{evaluations} UNet evaluations in all, against KSampler's {2 * steps} at the same steps. "
              "Drawn by tests/support/stage_pictures.py from the pack's stage rule.", font=font(16), fill=MUTED)
    return image


# --- the templates' thumbnails ------------------------------------------------------------------------------

THUMBNAIL_SIZE = (512, 512)
THUMBNAIL_BARS = (24, 300, 488, 470)  # the area the bars share


def thumbnail_bars(info: Template) -> list[tuple[tuple[int, int, int, int], StageSchedule]]:
    """Where each bar of a thumbnail lies, and the stages it shows: one bar, or the sweep's grid row by row."""
    x0, y0, x1, y1 = THUMBNAIL_BARS
    rows = len(info.splits) // info.grid_columns
    gap = 12
    width = (x1 - x0 - gap * (info.grid_columns - 1)) // info.grid_columns
    height = min(60, (y1 - y0 - gap * (rows - 1)) // rows)
    bars = []
    for index, (alpha, beta) in enumerate(info.splits):
        row, col = divmod(index, info.grid_columns)
        left, top = x0 + col * (width + gap), y0 + row * (height + gap)
        bars.append(((left, top, left + width, top + height), StageSchedule.from_fractions(alpha, beta, info.steps)))
    return bars


def thumbnail(info: Template) -> Image.Image:
    image = Image.new("RGB", THUMBNAIL_SIZE, BACKGROUND)
    draw = ImageDraw.Draw(image)
    title = info.name.removeprefix("facediffuser_").replace("_", " ")
    draw.text((24, 22), "Face-diffuser", font=font(22), fill=SDM)
    y = 56
    for line in textwrap.wrap(title, 20):
        draw.text((24, y), line, font=font(40), fill=TEXT)
        y += 48
    details = [f"{info.people} {'person' if info.people == 1 else 'people'}, {info.steps} steps", info.sampling, *info.extras]
    for line in details:
        draw.text((24, y + 6), line, font=font(18), fill=MUTED)
        y += 26
    bars = thumbnail_bars(info)
    for box, schedule in bars:
        draw_bar(draw, box, schedule)
    if len(bars) == 1:
        (x0, _, x1, y1), schedule = bars[0]
        for first, label, colour in ((0, "scene", TDM), (schedule.scene_end, "fusion", TEXT), (schedule.fusion_end, "subject", SDM)):
            draw.text((x0 + round((x1 - x0) * first / schedule.total_steps) + 2, y1 + 6), label, font=font(18), fill=colour)
    else:
        alphas = sorted({a for a, _ in info.splits})
        betas = sorted({b for _, b in info.splits})
        draw.text((THUMBNAIL_BARS[0], THUMBNAIL_BARS[1] - 26), f"alpha {', '.join(map(str, alphas))} (rows) x beta "
                  f"{', '.join(map(str, betas))}", font=font(16), fill=MUTED)
    return image


def main() -> None:
    DIAGRAM.parent.mkdir(exist_ok=True)
    diagram().save(DIAGRAM, optimize=True)
    print(f"wrote {DIAGRAM.relative_to(REPO)}")
    for name in template_names():
        target = WORKFLOWS / f"{name}.jpg"
        thumbnail(template(name)).save(target, quality=90)
        print(f"wrote {target.relative_to(REPO)}")


if __name__ == "__main__":
    main()
