"""The official Face-diffuser checkpoints: what kind a state dict is, its parts, and the sizes of its networks.

The official files (and FastComposer's, which share the SDM layout) are one torch state dict whose keys
carry a prefix per network:
    unet.             diffusers UNet2DConditionModel
    text_encoder.     HF CLIP text transformer, without the `text_model.` level
    image_encoder.    HF CLIPVisionModelWithProjection (`vision_model.*`, `visual_projection.*`)  SDM only
    vae.              diffusers AutoencoderKL
    postfuse_module.  the fusion MLP (facediffuser_core.postfuse)                             SDM only
A converted TDM is a plain SD1.5 single-file checkpoint (see facediffuser_core.sd15_keys).

Sizes are read from tensor shapes, never assumed, so that fine-tunes and the tests' tiny models load
the same way as the real files. Two things shapes cannot tell, and the rules used for them:
  - attention heads of the UNet: 8 at every level, as in SD1.5 (SD1.5's head width differs per level);
  - attention heads of the CLIP towers: hidden // 64 (at least 1), CLIP's head width of 64
    (CLIP-L text: 768 -> 12, ViT-L/14 vision: 1024 -> 16); activation quick_gelu, as in CLIP-L.
Tiny test models must follow the same rules.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass, field

import torch

UNET_PREFIX = "unet."
TEXT_ENCODER_PREFIX = "text_encoder."
IMAGE_ENCODER_PREFIX = "image_encoder."
VAE_PREFIX = "vae."
POSTFUSE_PREFIX = "postfuse_module."
OFFICIAL_PREFIXES = (UNET_PREFIX, TEXT_ENCODER_PREFIX, IMAGE_ENCODER_PREFIX, VAE_PREFIX, POSTFUSE_PREFIX)

# Transformers' CLIP names the text transformer's modules under this level; the official files omit it.
TEXT_MODEL_LEVEL = "text_model."

# SD1.5-family rules for what shapes cannot tell (see the module docstring).
UNET_ATTENTION_HEADS = 8
CLIP_HEAD_WIDTH = 64
CLIP_ACTIVATION = "quick_gelu"
CLIP_LAYER_NORM_EPS = 1e-5
# The bundled SD1.5 tokenizer's vocabulary; a text encoder with another vocabulary cannot use it.
SD15_VOCAB_SIZE = 49408


class CheckpointKind(enum.Enum):
    SDM = "SDM (Face-diffuser SDM or FastComposer)"
    TDM = "TDM"
    SD15 = "SD1.5 single-file checkpoint"
    OTHER = "something else"


@dataclass(frozen=True)
class Classification:
    kind: CheckpointKind
    description: str  # what was found, in words fit for an error message


def _is_buffer(key: str) -> bool:
    return key.endswith("position_ids")


def _count_with_prefix(keys, prefix: str) -> int:
    return sum(1 for key in keys if key.startswith(prefix))


def classify(state_dict: dict[str, torch.Tensor]) -> Classification:
    """Which kind of checkpoint the keys describe: an SDM, a TDM, an SD1.5 single file, or something else."""
    keys = [key for key in state_dict if not _is_buffer(key)]
    counts = {prefix: _count_with_prefix(keys, prefix) for prefix in OFFICIAL_PREFIXES}
    found = ", ".join(f"{prefix[:-1]} ({count} tensors)" for prefix, count in counts.items() if count)
    has = {prefix: count > 0 for prefix, count in counts.items()}

    if has[UNET_PREFIX] and has[TEXT_ENCODER_PREFIX] and has[IMAGE_ENCODER_PREFIX] and has[POSTFUSE_PREFIX]:
        return Classification(CheckpointKind.SDM, f"an {CheckpointKind.SDM.value}: {found}")
    if has[UNET_PREFIX] and has[TEXT_ENCODER_PREFIX] and has[VAE_PREFIX] and not (has[IMAGE_ENCODER_PREFIX] or has[POSTFUSE_PREFIX]):
        return Classification(CheckpointKind.TDM, f"a TDM (no image_encoder/postfuse_module weights): {found}")
    if any(has.values()):
        return Classification(
            CheckpointKind.OTHER,
            f"an incomplete official-layout file with only {found} (an SDM needs unet, text_encoder, image_encoder "
            "and postfuse_module; a TDM unet, text_encoder and vae); the file may be truncated",
        )
    return _classify_single_file(keys)


def _classify_single_file(keys: list[str]) -> Classification:
    if not keys:
        return Classification(CheckpointKind.OTHER, "an empty state dict (no tensors): the file is truncated or not a checkpoint")
    key_set = set(keys)
    unet = _count_with_prefix(keys, "model.diffusion_model.")
    clip_l = _count_with_prefix(keys, "cond_stage_model.transformer.")
    vae = _count_with_prefix(keys, "first_stage_model.")
    if _count_with_prefix(keys, "conditioner.embedders."):
        return Classification(CheckpointKind.OTHER, "an SDXL-family checkpoint (conditioner.embedders.* keys), not SD1.5")
    if _count_with_prefix(keys, "cond_stage_model.model."):
        return Classification(CheckpointKind.OTHER, "an SD2.x checkpoint (OpenCLIP text encoder cond_stage_model.model.*), not SD1.5")
    if any(".lora_" in key or "lora_A" in key or key.startswith("lora_") for key in keys):
        return Classification(CheckpointKind.OTHER, f"a LoRA ({len(keys)} tensors), not a full model")
    if unet and clip_l and vae:
        return Classification(
            CheckpointKind.SD15,
            f"an {CheckpointKind.SD15.value} (model.diffusion_model {unet}, cond_stage_model {clip_l}, "
            f"first_stage_model {vae} tensors), e.g. a converted TDM",
        )
    if unet:
        missing = [name for name, count in (("cond_stage_model (text encoder)", clip_l), ("first_stage_model (VAE)", vae)) if not count]
        return Classification(CheckpointKind.OTHER, f"an SD-style checkpoint without {' and '.join(missing)}")
    if "conv_in.weight" in key_set and any(key.startswith("down_blocks.") for key in keys):
        return Classification(CheckpointKind.OTHER, "a bare diffusers UNet (no text encoder, no VAE)")
    if "input_blocks.0.0.weight" in key_set:
        return Classification(CheckpointKind.OTHER, "a bare UNet in SD single-file names (no text encoder, no VAE)")
    prefixes = sorted({key.split(".", 1)[0] for key in keys})
    shown = ", ".join(prefixes[:8]) + (", ..." if len(prefixes) > 8 else "")
    return Classification(CheckpointKind.OTHER, f"an unrecognised state dict ({len(keys)} tensors, top-level names: {shown})")


@dataclass
class ModelParts:
    """The networks of one checkpoint, each a state dict in the official naming with its prefix removed
    (the text encoder in transformers' CLIPTextModel naming, `text_model.*`). Empty dicts for absent parts."""

    unet: dict[str, torch.Tensor] = field(default_factory=dict)
    text_encoder: dict[str, torch.Tensor] = field(default_factory=dict)
    vae: dict[str, torch.Tensor] = field(default_factory=dict)
    image_encoder: dict[str, torch.Tensor] = field(default_factory=dict)
    postfuse: dict[str, torch.Tensor] = field(default_factory=dict)


def text_encoder_key(official_key: str) -> str:
    """`embeddings.x` (official, no text_model level) -> `text_model.embeddings.x`; keys that already
    carry the level (a text encoder saved as a whole CLIPTextModel) are kept."""
    return official_key if official_key.startswith(TEXT_MODEL_LEVEL) else TEXT_MODEL_LEVEL + official_key


def split_official(state_dict: dict[str, torch.Tensor]) -> ModelParts:
    """Move the tensors of an official-layout state dict into its parts, emptying `state_dict` as it goes
    (so that no tensor is held twice). `*.position_ids` buffers are dropped; an unknown prefix is an error."""
    parts = ModelParts()
    for key in list(state_dict):
        tensor = state_dict.pop(key)
        if _is_buffer(key):
            continue
        if key.startswith(UNET_PREFIX):
            parts.unet[key[len(UNET_PREFIX):]] = tensor
        elif key.startswith(TEXT_ENCODER_PREFIX):
            parts.text_encoder[text_encoder_key(key[len(TEXT_ENCODER_PREFIX):])] = tensor
        elif key.startswith(IMAGE_ENCODER_PREFIX):
            parts.image_encoder[key[len(IMAGE_ENCODER_PREFIX):]] = tensor
        elif key.startswith(VAE_PREFIX):
            parts.vae[key[len(VAE_PREFIX):]] = tensor
        elif key.startswith(POSTFUSE_PREFIX):
            parts.postfuse[key[len(POSTFUSE_PREFIX):]] = tensor
        else:
            raise ValueError(f"unexpected key {key!r} in an official Face-diffuser checkpoint (known prefixes: {', '.join(OFFICIAL_PREFIXES)})")
    return parts


def count_blocks(keys, pattern: str) -> int:
    """How many consecutive indices i from 0 have a key starting with pattern.format(i)."""
    count = 0
    while any(key.startswith(pattern.format(count)) for key in keys):
        count += 1
    return count


# ---------------------------------------------------------------------------------------------- UNet


@dataclass(frozen=True)
class UNetLayout:
    """The block structure of an SD1.5-family UNet, the same whichever key naming it was read from.

    num_res_blocks: resnets per down level, outermost level first.
    down_depths:    transformer blocks after each down resnet (0 where the level has no attention).
    up_depths:      per up level (innermost first, as diffusers numbers them), per resnet (num_res_blocks + 1).
    middle_depth:   transformer blocks of the middle attention.
    """

    num_res_blocks: tuple[int, ...]
    down_depths: tuple[tuple[int, ...], ...]
    up_depths: tuple[tuple[int, ...], ...]
    middle_depth: int

    @property
    def levels(self) -> int:
        return len(self.num_res_blocks)


def unet_layout_from_diffusers(unet: dict[str, torch.Tensor]) -> UNetLayout:
    keys = list(unet)
    if "conv_in.weight" not in unet:
        raise ValueError("not a diffusers UNet: no conv_in.weight")
    if "class_embedding.linear_1.weight" in unet or "add_embedding.linear_1.weight" in unet:
        raise ValueError("the UNet has a class/added embedding (SDXL or unCLIP style), not an SD1.5-family UNet")
    levels = count_blocks(keys, "down_blocks.{}.")
    num_res_blocks, down_depths, up_depths = [], [], []
    for level in range(levels):
        resnets = count_blocks(keys, f"down_blocks.{level}.resnets.{{}}.")
        num_res_blocks.append(resnets)
        down_depths.append(tuple(count_blocks(keys, f"down_blocks.{level}.attentions.{i}.transformer_blocks.{{}}.") for i in range(resnets)))
    if count_blocks(keys, "up_blocks.{}.") != levels:
        raise ValueError(f"the UNet has {levels} down levels but {count_blocks(keys, 'up_blocks.{}.')} up levels")
    for level in range(levels):
        resnets = count_blocks(keys, f"up_blocks.{level}.resnets.{{}}.")
        expected = num_res_blocks[levels - 1 - level] + 1
        if resnets != expected:
            raise ValueError(f"up level {level} of the UNet has {resnets} resnets, {expected} expected")
        up_depths.append(tuple(count_blocks(keys, f"up_blocks.{level}.attentions.{i}.transformer_blocks.{{}}.") for i in range(resnets)))
    middle = count_blocks(keys, "mid_block.attentions.0.transformer_blocks.{}.")
    if middle == 0:
        raise ValueError("the UNet's middle block has no cross-attention: not an SD1.5-family UNet")
    return UNetLayout(tuple(num_res_blocks), tuple(down_depths), tuple(up_depths), middle)


def _first_transformer_prefix(unet: dict[str, torch.Tensor]) -> str:
    for key in unet:
        if key.endswith("transformer_blocks.0.attn2.to_k.weight"):
            return key[: -len("transformer_blocks.0.attn2.to_k.weight")]
    raise ValueError("the UNet has no cross-attention layer")


def unet_config(unet: dict[str, torch.Tensor]) -> dict:
    """ComfyUI's `unet_config` for a diffusers-layout SD1.5-family UNet, read from its shapes.

    For SD1.5 sizes this is the dict ComfyUI's own detection gives (comfy/model_detection.py, SD15)
    without its `dtype` entry; ComfyUI's SD15 model config adds num_head_channels -1 to it.
    `transformer_depth_output` lists the up resnets from the last one backwards, as ComfyUI consumes it.
    """
    layout = unet_layout_from_diffusers(unet)
    model_channels = unet["conv_in.weight"].shape[0]
    attention = _first_transformer_prefix(unet)
    channel_mult = []
    for level, resnets in enumerate(layout.num_res_blocks):
        out_channels = unet[f"down_blocks.{level}.resnets.{resnets - 1}.conv2.weight"].shape[0]
        if out_channels % model_channels:
            raise ValueError(f"down level {level} has {out_channels} channels, not a multiple of {model_channels}")
        channel_mult.append(out_channels // model_channels)
    up_resnet_depths = [depth for level in layout.up_depths for depth in level]
    return {
        "use_checkpoint": False,
        "image_size": 32,
        "out_channels": unet["conv_out.weight"].shape[0],
        "use_spatial_transformer": True,
        "legacy": False,
        "adm_in_channels": None,
        "in_channels": unet["conv_in.weight"].shape[1],
        "model_channels": model_channels,
        "num_res_blocks": list(layout.num_res_blocks),
        "transformer_depth": [depth for level in layout.down_depths for depth in level],
        "channel_mult": channel_mult,
        "transformer_depth_middle": layout.middle_depth,
        "use_linear_in_transformer": unet[attention + "proj_in.weight"].dim() == 2,
        "context_dim": unet[attention + "transformer_blocks.0.attn2.to_k.weight"].shape[1],
        "num_heads": UNET_ATTENTION_HEADS,
        "transformer_depth_output": list(reversed(up_resnet_depths)),
        "use_temporal_attention": False,
        "use_temporal_resblock": False,
    }


# ------------------------------------------------------------------------------------------- CLIP


def _clip_heads(hidden_size: int) -> int:
    return max(1, hidden_size // CLIP_HEAD_WIDTH)


def clip_text_config(text_encoder: dict[str, torch.Tensor]) -> dict:
    """CLIP text configuration (transformers' CLIPTextConfig names) of a `text_model.*` state dict."""
    try:
        token_embedding = text_encoder["text_model.embeddings.token_embedding.weight"]
        positions = text_encoder["text_model.embeddings.position_embedding.weight"].shape[0]
        intermediate = text_encoder["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]
    except KeyError as error:
        raise ValueError(f"not a CLIP text encoder: no {error.args[0]}") from None
    vocab_size, hidden_size = token_embedding.shape
    return {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate,
        "num_hidden_layers": count_blocks(text_encoder, "text_model.encoder.layers.{}."),
        "num_attention_heads": _clip_heads(hidden_size),
        "max_position_embeddings": positions,
        "hidden_act": CLIP_ACTIVATION,
        "layer_norm_eps": CLIP_LAYER_NORM_EPS,
        "projection_dim": hidden_size,
    }


def clip_vision_config(image_encoder: dict[str, torch.Tensor]) -> dict:
    """CLIP vision configuration (transformers' CLIPVisionConfig names) of an image_encoder state dict
    (`vision_model.*`, `visual_projection.weight`)."""
    try:
        patch = image_encoder["vision_model.embeddings.patch_embedding.weight"]
        positions = image_encoder["vision_model.embeddings.position_embedding.weight"].shape[0]
        intermediate = image_encoder["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0]
        projection_dim = image_encoder["visual_projection.weight"].shape[0]
    except KeyError as error:
        raise ValueError(f"not a CLIP vision tower with projection: no {error.args[0]}") from None
    hidden_size, channels, patch_size, _ = patch.shape
    side = math.isqrt(positions - 1)
    if side * side != positions - 1:
        raise ValueError(f"the vision tower has {positions} positions, not 1 + a square number of patches")
    return {
        "hidden_size": hidden_size,
        "intermediate_size": intermediate,
        "num_hidden_layers": count_blocks(image_encoder, "vision_model.encoder.layers.{}."),
        "num_attention_heads": _clip_heads(hidden_size),
        "num_channels": channels,
        "patch_size": patch_size,
        "image_size": side * patch_size,
        "projection_dim": projection_dim,
        "hidden_act": CLIP_ACTIVATION,
        "layer_norm_eps": CLIP_LAYER_NORM_EPS,
        "model_type": "clip_vision_model",
    }


# -------------------------------------------------------------------------------------------- VAE


def vae_config(vae: dict[str, torch.Tensor]) -> dict:
    """The KL autoencoder's configuration in SD single-file terms (ComfyUI's AutoencoderKL `ddconfig`
    and `embed_dim`), read from a diffusers-layout VAE state dict."""
    if "encoder.conv_in.weight" not in vae or "decoder.conv_in.weight" not in vae:
        raise ValueError("not a diffusers AutoencoderKL: no encoder/decoder conv_in weights")
    keys = list(vae)
    ch = vae["encoder.conv_in.weight"].shape[0]
    levels = count_blocks(keys, "encoder.down_blocks.{}.")
    num_res_blocks = count_blocks(keys, "encoder.down_blocks.0.resnets.{}.")
    ch_mult = []
    for level in range(levels):
        out_channels = vae[f"encoder.down_blocks.{level}.resnets.{num_res_blocks - 1}.conv2.weight"].shape[0]
        ch_mult.append(out_channels // ch)
    z_channels = vae["decoder.conv_in.weight"].shape[1]
    return {
        "ddconfig": {
            "double_z": vae["encoder.conv_out.weight"].shape[0] == 2 * z_channels,
            "z_channels": z_channels,
            "resolution": 256,
            "in_channels": vae["encoder.conv_in.weight"].shape[1],
            "out_ch": vae["decoder.conv_out.weight"].shape[0],
            "ch": ch,
            "ch_mult": ch_mult,
            "num_res_blocks": num_res_blocks,
            "attn_resolutions": [],
            "dropout": 0.0,
        },
        "embed_dim": vae["post_quant_conv.weight"].shape[1],
    }


# Older diffusers (FastComposer's era) named the VAE's mid-block attention differently.
_LEGACY_VAE_ATTENTION = {"query.": "to_q.", "key.": "to_k.", "value.": "to_v.", "proj_attn.": "to_out.0."}
_LEGACY_VAE_ATTENTION_KEY = re.compile(r"^((?:en|de)coder\.mid_block\.attentions\.0\.)(query\.|key\.|value\.|proj_attn\.)(.*)$")


def modern_vae_key(key: str) -> str:
    """Map pre-0.15 diffusers VAE attention names (query/key/value/proj_attn) to today's (to_q/.../to_out.0)."""
    match = _LEGACY_VAE_ATTENTION_KEY.match(key)
    if match is None:
        return key
    return match.group(1) + _LEGACY_VAE_ATTENTION[match.group(2)] + match.group(3)
