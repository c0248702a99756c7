"""Key names of an SD1.5 single-file checkpoint (the original LDM layout) and the official parts' names.

A single file carries the UNet under `model.diffusion_model.` (LDM block names), the CLIP text encoder
under `cond_stage_model.transformer.text_model.` and the VAE under `first_stage_model.` (LDM names, 1x1
convolutions in the middle attention). The official Face-diffuser files use diffusers names for the
UNet and VAE (facediffuser_core.checkpoint). This module maps between the two in both directions, as
renames plus the VAE attention reshape, so that no tensor data is copied; the maps are built from the
block structure read from the keys, so every size of SD1.5-family model converts.
"""

from __future__ import annotations

import torch

from .checkpoint import (
    ModelParts,
    UNetLayout,
    count_blocks,
    modern_vae_key,
    unet_layout_from_diffusers,
)

UNET_PREFIX = "model.diffusion_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."
VAE_PREFIX = "first_stage_model."

# diffusers ResnetBlock2D -> LDM ResBlock
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
# diffusers ResnetBlock2D in the VAE -> LDM ResnetBlock (same names but the shortcut)
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
# Linear in diffusers, 1x1 convolution in LDM
_VAE_ATTENTION_PROJECTIONS = ("q", "k", "v", "proj_out")


def _add_submodules(mapping: dict[str, str], source: str, target: str, names: dict[str, str]) -> None:
    for source_name, target_name in names.items():
        mapping[f"{source}{source_name}."] = f"{target}{target_name}."


def unet_module_map(layout: UNetLayout) -> dict[str, str]:
    """diffusers module prefix -> LDM module prefix, both ending in '.'; attention blocks map as a whole
    (their inner names agree in both layouts)."""
    mapping = {
        "time_embedding.linear_1.": "time_embed.0.",
        "time_embedding.linear_2.": "time_embed.2.",
        "conv_in.": "input_blocks.0.0.",
        "conv_norm_out.": "out.0.",
        "conv_out.": "out.2.",
        "mid_block.attentions.0.": "middle_block.1.",
    }
    _add_submodules(mapping, "mid_block.resnets.0.", "middle_block.0.", _UNET_RESNET)
    _add_submodules(mapping, "mid_block.resnets.1.", "middle_block.2.", _UNET_RESNET)
    block = 1
    for level, depths in enumerate(layout.down_depths):
        for index, depth in enumerate(depths):
            _add_submodules(mapping, f"down_blocks.{level}.resnets.{index}.", f"input_blocks.{block}.0.", _UNET_RESNET)
            if depth:
                mapping[f"down_blocks.{level}.attentions.{index}."] = f"input_blocks.{block}.1."
            block += 1
        if level < layout.levels - 1:
            mapping[f"down_blocks.{level}.downsamplers.0.conv."] = f"input_blocks.{block}.0.op."
            block += 1
    block = 0
    for level, depths in enumerate(layout.up_depths):
        for index, depth in enumerate(depths):
            _add_submodules(mapping, f"up_blocks.{level}.resnets.{index}.", f"output_blocks.{block}.0.", _UNET_RESNET)
            if depth:
                mapping[f"up_blocks.{level}.attentions.{index}."] = f"output_blocks.{block}.1."
            if index == len(depths) - 1 and level < layout.levels - 1:
                mapping[f"up_blocks.{level}.upsamplers.0.conv."] = f"output_blocks.{block}.{2 if depth else 1}.conv."
            block += 1
    return mapping


def unet_layout_from_ldm(unet: dict[str, torch.Tensor]) -> UNetLayout:
    """The block structure of an LDM-named UNet (prefix removed): levels end at the downsample blocks."""
    keys = list(unet)
    if "input_blocks.0.0.weight" not in unet:
        raise ValueError("not an SD UNet: no input_blocks.0.0.weight")
    down_depths: list[list[int]] = [[]]
    block = 1
    while any(key.startswith(f"input_blocks.{block}.") for key in keys):
        if f"input_blocks.{block}.0.op.weight" in unet:
            down_depths.append([])
        else:
            down_depths[-1].append(count_blocks(keys, f"input_blocks.{block}.1.transformer_blocks.{{}}."))
        block += 1
    num_res_blocks = tuple(len(depths) for depths in down_depths)
    up_depths = []
    block = 0
    for level in range(len(num_res_blocks)):
        resnets = num_res_blocks[len(num_res_blocks) - 1 - level] + 1
        up_depths.append(tuple(count_blocks(keys, f"output_blocks.{block + i}.1.transformer_blocks.{{}}.") for i in range(resnets)))
        block += resnets
    middle = count_blocks(keys, "middle_block.1.transformer_blocks.{}.")
    return UNetLayout(num_res_blocks, tuple(tuple(depths) for depths in down_depths), tuple(up_depths), middle)


def vae_module_map(levels: int, num_res_blocks: int) -> dict[str, str]:
    """diffusers AutoencoderKL module prefix -> LDM module prefix (both ending in '.')."""
    mapping = {"quant_conv.": "quant_conv.", "post_quant_conv.": "post_quant_conv."}
    for part in ("encoder", "decoder"):
        mapping[f"{part}.conv_in."] = f"{part}.conv_in."
        mapping[f"{part}.conv_out."] = f"{part}.conv_out."
        mapping[f"{part}.conv_norm_out."] = f"{part}.norm_out."
        for index in range(2):
            _add_submodules(mapping, f"{part}.mid_block.resnets.{index}.", f"{part}.mid.block_{index + 1}.", _VAE_RESNET)
        _add_submodules(mapping, f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", _VAE_ATTENTION)
    for level in range(levels):
        for index in range(num_res_blocks):
            _add_submodules(mapping, f"encoder.down_blocks.{level}.resnets.{index}.", f"encoder.down.{level}.block.{index}.", _VAE_RESNET)
        ldm_level = levels - 1 - level
        for index in range(num_res_blocks + 1):
            _add_submodules(mapping, f"decoder.up_blocks.{level}.resnets.{index}.", f"decoder.up.{ldm_level}.block.{index}.", _VAE_RESNET)
        if level < levels - 1:
            mapping[f"encoder.down_blocks.{level}.downsamplers.0.conv."] = f"encoder.down.{level}.downsample.conv."
            mapping[f"decoder.up_blocks.{level}.upsamplers.0.conv."] = f"decoder.up.{ldm_level}.upsample.conv."
    return mapping


def _rename(key: str, mapping: dict[str, str], what: str) -> str:
    """Rename by the longest mapped module prefix of `key`."""
    end = len(key)
    while end > 0:
        end = key.rfind(".", 0, end)
        if end < 0:
            break
        prefix = key[: end + 1]
        if prefix in mapping:
            return mapping[prefix] + key[end + 1:]
    raise ValueError(f"the {what} key {key!r} has no counterpart in the other layout (unexpected block)")


def _is_vae_projection_weight(ldm_key: str) -> bool:
    return any(ldm_key.endswith(f"mid.attn_1.{name}.weight") for name in _VAE_ATTENTION_PROJECTIONS)


def parts_to_sd15(parts: ModelParts) -> dict[str, torch.Tensor]:
    """UNet, text encoder and VAE of official-layout parts -> one SD1.5 single-file state dict (LDM names).
    Tensors are shared, not copied."""
    if not (parts.unet and parts.text_encoder and parts.vae):
        missing = [name for name in ("unet", "text_encoder", "vae") if not getattr(parts, name)]
        raise ValueError(f"an SD1.5 single file needs a UNet, a text encoder and a VAE; missing: {', '.join(missing)}")
    out: dict[str, torch.Tensor] = {}
    unet_map = unet_module_map(unet_layout_from_diffusers(parts.unet))
    for key, tensor in parts.unet.items():
        out[UNET_PREFIX + _rename(key, unet_map, "UNet")] = tensor
    for key, tensor in parts.text_encoder.items():
        out[TEXT_ENCODER_PREFIX + key] = tensor
    vae = {modern_vae_key(key): tensor for key, tensor in parts.vae.items()}
    vae_map = vae_module_map(count_blocks(vae, "encoder.down_blocks.{}."), count_blocks(vae, "encoder.down_blocks.0.resnets.{}."))
    for key, tensor in vae.items():
        ldm_key = _rename(key, vae_map, "VAE")
        if _is_vae_projection_weight(ldm_key) and tensor.dim() == 2:
            tensor = tensor.reshape(*tensor.shape, 1, 1)
        out[VAE_PREFIX + ldm_key] = tensor
    return out


def sd15_to_parts(state_dict: dict[str, torch.Tensor]) -> ModelParts:
    """An SD1.5 single-file state dict -> official-layout parts (diffusers UNet and VAE names, text encoder
    as `text_model.*`), emptying `state_dict` as it goes. Keys outside the three networks (EMA copies,
    schedule buffers such as alphas_cumprod, position_ids) are dropped."""
    unet, text_encoder, vae = {}, {}, {}
    for key in list(state_dict):
        tensor = state_dict.pop(key)
        if key.endswith("position_ids"):
            continue
        if key.startswith(UNET_PREFIX):
            unet[key[len(UNET_PREFIX):]] = tensor
        elif key.startswith(TEXT_ENCODER_PREFIX):
            name = key[len(TEXT_ENCODER_PREFIX):]
            # Some SD1 files omit the text_model level, as the official layout does.
            text_encoder[name if name.startswith("text_model.") else "text_model." + name] = tensor
        elif key.startswith(VAE_PREFIX):
            vae[key[len(VAE_PREFIX):]] = tensor
    parts = ModelParts()
    unet_map = {ldm: diffusers for diffusers, ldm in unet_module_map(unet_layout_from_ldm(unet)).items()}
    parts.unet = {_rename(key, unet_map, "UNet"): tensor for key, tensor in unet.items()}
    parts.text_encoder = text_encoder
    vae_map = {ldm: diffusers for diffusers, ldm in vae_module_map(count_blocks(vae, "encoder.down.{}."), count_blocks(vae, "encoder.down.0.block.{}.")).items()}
    for key, tensor in vae.items():
        if _is_vae_projection_weight(key) and tensor.dim() == 4:
            tensor = tensor.reshape(tensor.shape[0], tensor.shape[1])
        parts.vae[_rename(key, vae_map, "VAE")] = tensor
    return parts
