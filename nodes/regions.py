"""Per-subject regions in ComfyUI: the optional inputs the sampling nodes share, the guider's regions
(`SamplingRegions`, which the SDM's attention patch in nodes.region_patch reads), how the regions find the
subject rows in the conditioning a graph wires to 'augmented', and the Face-diffuser Region Layout node. The
masks and the attention maths are facediffuser_core.regions.

Prompt wiring: the Subject Prompt records the subject rows in its 'augmented' options. Nodes that keep the
options keep the rows (ControlNet, ConditioningSetTimestepRange, ConditioningSetArea); ConditioningConcat keeps
those of its 'conditioning_to' and appends the other prompt after the subject rows, which stay where they
were; ConditioningCombine puts entries side by side, and an entry without the rows sees its own prompt alone.
Each entry carries a uuid into the attention call's transformer options, so that every chunk of a batch is
read as what it is; an area entry's regions are the part of the masks its crop shows.
"""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..facediffuser_core import region_layouts
from ..facediffuser_core import regions as core
from . import region_patch
from .auto_regions import AutoRegionsRun
from .types import AutoRegions

LAYOUT_NAME = "Face-diffuser Region Layout"


def inputs() -> list:
    """The optional inputs of the SNF Sampler, the Guider and the Stage Sweep; unconnected, nothing changes."""
    return [
        io.Mask.Input(
            "regions", optional=True,
            tooltip="One mask per <|image|> marker, in marker order (Face-diffuser Region Layout, the mask editor or a "
                    "segmentation node), at the picture's aspect ratio: each person's face is painted only inside their "
                    "region, and the plain prompt word is used elsewhere. Unconnected: the paper's behaviour.",
        ),
        io.Combo.Input(
            "outside_regions", options=list(core.OUTSIDE_CHOICES), default=core.OUTSIDE_SNF, optional=True,
            tooltip="What fusion does outside every region: 'snf' the paper's per-pixel choice, 'tdm' the TDM alone "
                    "(the scene model keeps the background). Needs 'regions' or 'auto_regions'.",
        ),
        AutoRegions.Input(
            "auto_regions", optional=True,
            tooltip="Regions found in the picture instead of given (Face-diffuser Auto Regions): at the end of scene "
                    "construction the TDM's predicted picture is decoded, the people's faces found, and each widened to a "
                    "person region, given to the markers left to right. Too few faces: no regions, with a warning. "
                    "Not together with 'regions'.",
        ),
    ]


def subject_tokens(node: str, augmented: list, input_name: str = "regions") -> core.SubjectTokens:
    """The marked rows the Subject Prompt recorded in the augmented conditioning. Entries without them (a prompt
    ConditioningCombine put beside it) see their own prompt alone."""
    found = [options[core.SUBJECTS_KEY] for _, options in augmented if core.SUBJECTS_KEY in options]
    if not found:
        raise ValueError(
            f"{node}: '{input_name}' is connected but the 'augmented' conditioning carries no subject markers: connect the "
            "'augmented' output of the Face-diffuser Subject Prompt (directly, or through nodes that keep its options: "
            "ConditioningConcat keeps those of its 'conditioning_to', so connect the Subject Prompt there)"
        )
    if any(tokens.rows != found[0].rows for tokens in found):
        raise ValueError(f"{node}: the 'augmented' conditioning combines prompts with different subject markers; regions "
                         "need one Face-diffuser Subject Prompt")
    for tensor, options in augmented:
        tokens = options.get(core.SUBJECTS_KEY)
        if tokens is not None and tensor.shape[1] < tokens.prompt_rows:
            raise ValueError(
                f"{node}: the 'augmented' conditioning has {tensor.shape[1]} token rows, fewer than the {tokens.prompt_rows} the "
                "Face-diffuser Subject Prompt made: a node between them cut the prompt, so its subject rows cannot be found; "
                "connect the Subject Prompt's 'augmented' output (ConditioningConcat may append a prompt after it)"
            )
    return found[0]


class SamplingRegions:
    """A guider's regions, the one object the SDM's attention patch (nodes.region_patch) and SNF's fusion read:
    the region attention and fusion area of the current run (None: none, as without regions), and what the
    patch needs to read a batch: which conditioning entries carry the subjects and which part of the latent
    each sees. Given regions are set once (`use`); with auto regions, `finder` (nodes.auto_regions.AutoRegionsRun)
    clears them at each run's start and sets the ones it finds mid-run."""

    UNDECIDED = object()

    def __init__(self, node: str, tokens: core.SubjectTokens, outside: str, auto_setup=None):
        self.node, self.tokens, self.outside = node, tokens, outside
        self.attention: core.RegionAttention | None = None
        self.fusion: core.FusionArea | None = None
        self._latent: tuple[int, int] | None = None
        self._chunks: dict = {}  # conditioning entry's uuid -> its PromptChunk, in this run
        self._masking = self.UNDECIDED
        self._placement: tuple | None = None  # the latest (device, dtype) ComfyUI moved the patches to
        self.finder = None if auto_setup is None else AutoRegionsRun(auto_setup, self)

    def use(self, masks) -> None:
        """Regions for the SDM's attention and for fusion (with outside_regions 'tdm'); None: none."""
        if masks is None:
            self.attention = self.fusion = None
            return
        try:
            attention = core.RegionAttention(masks, self.tokens, self.node)
        except ValueError as error:
            raise ValueError(f"{self.node}: the 'regions' input: {error}") from error
        if self._latent is not None:
            attention.start(*self._latent)
        if self._placement and self._placement[1] is not None:
            attention.plain_rows(*self._placement)
        self.attention = attention
        self.fusion = core.FusionArea(attention.masks) if self.outside == core.OUTSIDE_TDM else None

    def start_run(self, latent_shape, positive: list) -> None:
        """At a run's start, after ComfyUI processed the SDM's positive conditioning entries (`positive`): the
        latent they crop and which of them carry the subjects. The backend is chosen anew at the run's first call."""
        height, width = (int(side) for side in latent_shape[-2:])
        self._latent = (height, width)
        self._chunks = {}
        for entry in positive:
            if core.SUBJECTS_KEY not in entry:
                continue
            rows = entry["cross_attn"].shape[1]
            if "area" in entry:  # ComfyUI crops the latent as calc_cond_batch does: (height, width, top, left)
                size_h, size_w, top, left = entry["area"][:4]
                self._chunks[entry["uuid"]] = core.PromptChunk(rows, top, left, min(height - top, size_h), min(width - left, size_w))
            else:
                self._chunks[entry["uuid"]] = core.PromptChunk(rows, 0, 0, height, width)
        self._masking = self.UNDECIDED
        if self.finder is not None:
            self.finder.reset()
        if self.attention is not None:
            self.attention.start(height, width)

    def chunks(self, transformer_options: dict) -> tuple:
        """Per chunk of an attention call's batch, the PromptChunk of a conditioning entry with the subjects, or None."""
        uuids = transformer_options.get("uuids")
        if uuids is None:
            raise RuntimeError(f"{self.node}: this ComfyUI gives the cross-attention no 'uuids' in its transformer options, "
                               "so regions cannot tell the conditioning entries of a batch apart: disconnect 'regions' and "
                               "'auto_regions', or report this ComfyUI version as an issue of the Face-diffuser node pack")
        return tuple(self._chunks.get(uuid) for uuid in uuids)

    def masking_attention(self, transformer_options: dict):
        """The backend function that takes the mask in this run, or None for the per-group path; chosen once."""
        if self._masking is self.UNDECIDED:
            self._masking = region_patch.masking_attention(transformer_options)
        return self._masking

    def to(self, device_or_dtype) -> None:
        """ComfyUI moves the patches with the model when it loads it: to the device, then to the model's dtype;
        the plain rows are made there, once per device and dtype."""
        if isinstance(device_or_dtype, torch.dtype):
            self._placement = (self._placement[0], device_or_dtype) if self._placement else None
        else:
            self._placement = (torch.device(device_or_dtype), None)
        if self.attention is not None and self._placement and self._placement[1] is not None:
            self.attention.plain_rows(*self._placement)


def sampling_regions(node: str, augmented: list, masks, outside: str, auto_setup) -> SamplingRegions | None:
    """The guider's regions from the sampling node's region inputs, None when neither is connected."""
    _check_inputs(node, masks, outside, auto_setup is not None)
    if masks is None and auto_setup is None:
        return None
    tokens = subject_tokens(node, augmented, "regions" if masks is not None else "auto_regions")
    regions = SamplingRegions(node, tokens, outside, auto_setup)
    regions.use(masks)
    return regions


def _check_inputs(node: str, masks, outside: str, auto: bool) -> None:
    """'regions', 'outside_regions' and 'auto_regions' together."""
    if outside not in core.OUTSIDE_CHOICES:
        raise ValueError(f"{node}: outside_regions is '{outside}'; it is one of {', '.join(core.OUTSIDE_CHOICES)}")
    if masks is not None and auto:
        raise ValueError(f"{node}: both 'regions' and 'auto_regions' are connected, two answers to where each person is: "
                         "disconnect 'auto_regions' to use the regions given, or 'regions' to have them found in the picture")
    if outside == core.OUTSIDE_TDM and masks is None and not auto:
        raise ValueError(f"{node}: outside_regions is '{core.OUTSIDE_TDM}' but 'regions' is not connected: connect the regions "
                         f"(Face-diffuser Region Layout, or Face-diffuser Auto Regions to 'auto_regions') or set outside_regions "
                         f"to '{core.OUTSIDE_SNF}'")


class FaceDiffuserRegionLayout(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FaceDiffuserRegionLayout",
            display_name=LAYOUT_NAME,
            category="facediffuser/conditioning",
            description=(
                "Makes the 'regions' masks of the SNF Sampler, the Guider or the Stage Sweep from a layout: one region per "
                "<|image|> marker, in marker order, left to right. 'halves' for two people, 'thirds' for three, 'boxes' "
                f"for any placement given as fractions of the picture, e.g. '{region_layouts.BOXES_EXAMPLE}'."
            ),
            inputs=[
                io.Combo.Input("layout", options=list(region_layouts.LAYOUTS), default=region_layouts.LAYOUT_HALVES,
                               tooltip="'halves': left and right; 'thirds': left, middle, right; 'boxes': the boxes below."),
                io.Int.Input("subjects", default=2, min=1, max=16, tooltip="How many <|image|> markers the prompt has."),
                io.Int.Input("width", default=512, min=8, max=16384, step=8, tooltip="The picture's width in pixels (the latent's times 8)."),
                io.Int.Input("height", default=512, min=8, max=16384, step=8, tooltip="The picture's height in pixels (the latent's times 8)."),
                io.String.Input("boxes", default=region_layouts.BOXES_EXAMPLE, multiline=False,
                                tooltip="For 'boxes': 'x0 y0 x1 y1' per subject, fractions of the width and height, separated "
                                        "by ';', in marker order."),
            ],
            outputs=[io.Mask.Output(display_name="regions")],
        )

    @classmethod
    def execute(cls, layout: str, subjects: int, width: int, height: int, boxes: str) -> io.NodeOutput:
        try:
            masks = core.layout_masks(layout, subjects, width, height, boxes)
        except ValueError as error:
            raise ValueError(f"{LAYOUT_NAME}: {error}") from error
        return io.NodeOutput(masks)


NODES = [FaceDiffuserRegionLayout]
