"""Per-subject regions in ComfyUI: the optional inputs the sampling nodes share, the SDM's attention patch,
and the Face-diffuser Region Layout node. The masks and the attention mask are facediffuser_core.regions.

The patch goes on a clone of the SDM through ComfyUI's attention seams: an attn2 patch appends the plain
rows to the cross-attention context, and an attn2 replace patch on every transformer block calls ComfyUI's
optimized attention (whichever backend it selected, and any attention override) with the mask. Other
attention patches of the SDM (attn1, attn2 and output patches) keep working; an attn2 replace patch
already on a block (IPAdapter-style nodes) takes no mask, so it runs once per group of queries that lie in
the same regions, on the keys they see (RegionAttention.groups).
"""

from __future__ import annotations

import comfy.ldm.modules.attention
import torch
from comfy_api.latest import io

from ..facediffuser_core import region_layout
from ..facediffuser_core import regions as core
from .types import AutoRegions

LAYOUT_NAME = "Face-diffuser Region Layout"
BLOCK_KINDS = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}


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
    """The marked rows the Subject Prompt recorded in the augmented conditioning."""
    found = [options.get(core.SUBJECTS_KEY) for _, options in augmented]
    if not found or any(tokens is None for tokens in found):
        raise ValueError(
            f"{node}: '{input_name}' is connected but the 'augmented' conditioning carries no subject markers: connect the "
            "'augmented' output of the Face-diffuser Subject Prompt (directly, or through nodes that keep its options)"
        )
    if any(tokens.rows != found[0].rows for tokens in found):
        raise ValueError(f"{node}: the 'augmented' conditioning combines prompts with different subject markers; regions "
                         "need one Face-diffuser Subject Prompt")
    return found[0]


def _attention_blocks(diffusion_model) -> list[tuple[str, int]]:
    """ComfyUI's block keys ("input", 1), ("middle", 0), ("output", 3)... of the UNet's spatial transformers."""
    blocks = []
    for name, module in diffusion_model.named_modules():
        parts = name.split(".")
        if hasattr(module, "transformer_blocks") and parts[0] in BLOCK_KINDS:
            blocks.append((BLOCK_KINDS[parts[0]], 0 if parts[0] == "middle_block" else int(parts[1])))
    return blocks


def scoped_sdm(node: str, sdm, augmented: list, masks: torch.Tensor):
    """A clone of the SDM whose augmented branch attends to each subject's token only in its region."""
    tokens = subject_tokens(node, augmented)
    try:
        attention = core.RegionAttention(masks, tokens, node)
    except ValueError as error:
        raise ValueError(f"{node}: the 'regions' input: {error}") from error
    return patched_sdm(sdm, lambda: attention)


def patched_sdm(sdm, current):
    """A clone of the SDM with the region attention `current()` returns at each call; where it returns None
    (auto regions not decided yet, or fallen back), the patches compute exactly what ComfyUI would without them."""
    blocks = set(_attention_blocks(sdm.model.diffusion_model))
    replaced = sdm.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    patched = sdm.clone()

    def extend(n, context, value, extra_options):
        attention = current()
        if attention is None:
            return n, context, value
        return n, attention.extend_context(context), attention.extend_context(value)

    def shapes(q, k, extra_options):
        return (extra_options["original_shape"], extra_options["activations_shape"], extra_options["cond_or_uncond"], q.shape[0], k.shape[1])

    def attend(q, k, v, extra_options):
        # The backend is looked up at call time: ComfyUI picks it at start-up and nodes may swap it.
        attention = current()
        if attention is None:  # what CrossAttention calls without a mask
            return comfy.ldm.modules.attention.optimized_attention(
                q, k, v, extra_options["n_heads"], attn_precision=extra_options.get("attn_precision"), transformer_options=extra_options)
        bias = attention.bias(*shapes(q, k, extra_options), q.dtype, q.device)
        return comfy.ldm.modules.attention.optimized_attention_masked(
            q, k, v, extra_options["n_heads"], bias, attn_precision=extra_options.get("attn_precision"), transformer_options=extra_options)

    def attend_through(existing):
        """Another node's replacement (IPAdapter-style) takes no mask: it runs once per group of queries that lie in
        the same regions, on the keys those queries see, and each query keeps its group's result."""
        def attend_groups(q, k, v, extra_options):
            attention = current()
            if attention is None:
                return existing(q, k, v, extra_options)
            out = None
            for columns, queries in attention.groups(*shapes(q, k, extra_options), q.device):
                result = existing(q, _take(k, columns), _take(v, columns), extra_options)
                out = result if out is None else torch.where(queries, result, out)
            return out
        return attend_groups

    patched.set_model_attn2_patch(extend)
    for kind, number in sorted(blocks):
        patched.set_model_attn2_replace(attend, kind, number)
    # ComfyUI prefers a replacement keyed with the transformer index over one keyed by the block alone.
    for key, existing in replaced.items():
        if key[:2] in blocks:
            patched.set_model_attn2_replace(attend_through(existing), *key)
    return patched


def _take(keys: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """(batch, T + K, dim) keys or values -> (batch, T, dim), the given rows of each batch entry."""
    return keys.gather(1, columns.unsqueeze(-1).expand(-1, -1, keys.shape[-1]))


def fusion_masks(node: str, masks, outside: str, auto: bool = False):
    """The masks SNF keeps the SDM inside of, or None for the paper's choice everywhere (or auto regions' choice)."""
    if outside not in core.OUTSIDE_CHOICES:
        raise ValueError(f"{node}: outside_regions is '{outside}'; it is one of {', '.join(core.OUTSIDE_CHOICES)}")
    if masks is not None and auto:
        raise ValueError(f"{node}: both 'regions' and 'auto_regions' are connected, two answers to where each person is: "
                         "disconnect 'auto_regions' to use the regions given, or 'regions' to have them found in the picture")
    if outside == core.OUTSIDE_TDM and masks is None and not auto:
        raise ValueError(f"{node}: outside_regions is '{core.OUTSIDE_TDM}' but 'regions' is not connected: connect the regions "
                         f"(Face-diffuser Region Layout, or Face-diffuser Auto Regions to 'auto_regions') or set outside_regions "
                         f"to '{core.OUTSIDE_SNF}'")
    return masks if outside == core.OUTSIDE_TDM else None


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
                f"for any placement given as fractions of the picture, e.g. '{region_layout.BOXES_EXAMPLE}'."
            ),
            inputs=[
                io.Combo.Input("layout", options=list(region_layout.LAYOUTS), default=region_layout.LAYOUT_HALVES,
                               tooltip="'halves': left and right; 'thirds': left, middle, right; 'boxes': the boxes below."),
                io.Int.Input("subjects", default=2, min=1, max=16, tooltip="How many <|image|> markers the prompt has."),
                io.Int.Input("width", default=512, min=8, max=16384, step=8, tooltip="The picture's width in pixels (the latent's times 8)."),
                io.Int.Input("height", default=512, min=8, max=16384, step=8, tooltip="The picture's height in pixels (the latent's times 8)."),
                io.String.Input("boxes", default=region_layout.BOXES_EXAMPLE, multiline=False,
                                tooltip="For 'boxes': 'x0 y0 x1 y1' per subject, fractions of the width and height, separated "
                                        "by ';', in marker order."),
            ],
            outputs=[io.Mask.Output(display_name="regions")],
        )

    @classmethod
    def execute(cls, layout: str, subjects: int, width: int, height: int, boxes: str) -> io.NodeOutput:
        try:
            masks = region_layout.layout_masks(layout, subjects, width, height, boxes)
        except ValueError as error:
            raise ValueError(f"{LAYOUT_NAME}: {error}") from error
        return io.NodeOutput(masks)


NODES = [FaceDiffuserRegionLayout]
