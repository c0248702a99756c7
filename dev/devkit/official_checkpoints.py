"""Tiny Face-diffuser checkpoints in the exact official key layout, built from diffusers and transformers
models, for tests that need an SDM or a TDM file without the real multi-GB weights.

    refs = build_tdm(seed=0)                      # reference modules (eval mode, float32)
    state_dict = official_state_dict(refs)        # unet.*, text_encoder.* (no text_model level), vae.*
    write_checkpoint(state_dict, tmp_path / "tdm.bin")          # torch.save, as the official files
    write_checkpoint(state_dict, tmp_path / "tdm.safetensors")

`build_sdm` adds the CLIP vision tower with projection (image_encoder.*) and the postfuse MLP
(postfuse_module.*). The sizes follow facediffuser_core.checkpoint's rules for what shapes cannot tell:
8 UNet attention heads, CLIP heads = max(1, hidden // 64), quick_gelu. The text encoder's vocabulary is
the real one (49408) so that ComfyUI's bundled SD1.5 tokenizer ids index it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from facediffuser_client.pack import core

from . import comfy_harness

# diffusers and transformers import torchvision, whose registry build needs CPU stand-ins for its ops.
comfy_harness.register_cpu_torchvision_ops()

from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from transformers import (  # noqa: E402
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

import safetensors.torch  # noqa: E402

PostfuseModule = core("postfuse").PostfuseModule

HIDDEN = 32  # text width, UNet context width, vision projection width and postfuse width alike
VOCAB_SIZE = 49408
MAX_POSITIONS = 77
VISION_IMAGE_SIZE = 224
VISION_PATCH = 32


@dataclass
class OfficialReferences:
    """The independent reference modules a tiny checkpoint was made from (float32, eval mode)."""

    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    image_encoder: CLIPVisionModelWithProjection | None = None
    postfuse: PostfuseModule | None = None


def tiny_unet(attention_at_full_size: bool = True) -> UNet2DConditionModel:
    """attention_at_full_size=False puts the attention at the half-size level instead (as SDXL leaves its top level
    without): 16 times fewer attention scores, for runs at the workflows' own 512 px."""
    levels = ("CrossAttnDownBlock2D", "DownBlock2D") if attention_at_full_size else ("DownBlock2D", "CrossAttnDownBlock2D")
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=levels,
        up_block_types=tuple(name.replace("Down", "Up") for name in reversed(levels)),
        cross_attention_dim=HIDDEN,
        norm_num_groups=32,
        attention_head_dim=8,  # diffusers' name for the number of heads in SD1.5-style UNets
    )


def tiny_text_encoder() -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=1,
        max_position_embeddings=MAX_POSITIONS,
        hidden_act="quick_gelu",
        projection_dim=HIDDEN,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModel(config)


def tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
    )


def tiny_image_encoder() -> CLIPVisionModelWithProjection:
    config = CLIPVisionConfig(
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=1,
        image_size=VISION_IMAGE_SIZE,
        patch_size=VISION_PATCH,
        projection_dim=HIDDEN,
        hidden_act="quick_gelu",
    )
    return CLIPVisionModelWithProjection(config)


def _randomise_norms(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Default inits leave norms at weight 1, bias 0 and many biases at 0, where a wrong key mapping of
    those tensors would go unnoticed; random values make every tensor matter."""
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if name.endswith("bias") or "norm" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1 + (1.0 if name.endswith("weight") else 0.0))


def _prepare(module: torch.nn.Module, generator: torch.Generator):
    _randomise_norms(module, generator)
    return module.eval().float()


def build_tdm(seed: int = 0, attention_at_full_size: bool = True) -> OfficialReferences:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    return OfficialReferences(
        unet=_prepare(tiny_unet(attention_at_full_size), generator),
        text_encoder=_prepare(tiny_text_encoder(), generator),
        vae=_prepare(tiny_vae(), generator),
    )


def build_sdm(seed: int = 1, attention_at_full_size: bool = True) -> OfficialReferences:
    refs = build_tdm(seed, attention_at_full_size)
    generator = torch.Generator().manual_seed(seed + 1000)
    refs.image_encoder = _prepare(tiny_image_encoder(), generator)
    refs.postfuse = _prepare(PostfuseModule(HIDDEN), generator)
    return refs


def official_items(refs: OfficialReferences):
    """(official key, tensor) for every weight of the references, the text encoder without its
    text_model level; `*.position_ids` buffers left out."""
    for prefix, module in (
        ("unet.", refs.unet),
        ("text_encoder.", refs.text_encoder),
        ("vae.", refs.vae),
        ("image_encoder.", refs.image_encoder),
        ("postfuse_module.", refs.postfuse),
    ):
        if module is None:
            continue
        for key, tensor in module.state_dict().items():
            if not key.endswith("position_ids"):
                yield prefix + (key.removeprefix("text_model.") if prefix == "text_encoder." else key), tensor


def official_state_dict(refs: OfficialReferences, dtype: torch.dtype | None = None, with_position_ids: bool = True) -> dict[str, torch.Tensor]:
    """The references' weights under the official prefixes, as copies (cast to dtype if given).

    with_position_ids adds the `*.position_ids` buffers that the official files may carry."""
    state = {key: tensor.detach().clone() if dtype is None else tensor.detach().to(dtype) for key, tensor in official_items(refs)}
    if with_position_ids:
        state["text_encoder.embeddings.position_ids"] = torch.arange(MAX_POSITIONS).unsqueeze(0)
        if refs.image_encoder is not None:
            positions = (VISION_IMAGE_SIZE // VISION_PATCH) ** 2 + 1
            state["image_encoder.vision_model.embeddings.position_ids"] = torch.arange(positions).unsqueeze(0)
    return state


def write_checkpoint(state_dict: dict[str, torch.Tensor], path: Path) -> Path:
    """torch.save for `.bin` (the official format), safetensors for `.safetensors`."""
    path = Path(path)
    if path.suffix == ".safetensors":
        safetensors.torch.save_file({key: value.contiguous() for key, value in state_dict.items()}, str(path))
    else:
        torch.save(state_dict, path)
    return path


def real_size_references() -> OfficialReferences:
    """SD1.5/CLIP-L/ViT-L/14-sized modules on the meta device (shapes only, no memory): the sizes of the
    real Face-diffuser files, for checks of shape-derived configs and key maps."""
    with torch.device("meta"):
        return OfficialReferences(
            unet=UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8),
            text_encoder=CLIPTextModel(
                CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768)
            ),
            vae=AutoencoderKL(
                block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2,
            ),
            image_encoder=CLIPVisionModelWithProjection(
                CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14, projection_dim=768)
            ),
            postfuse=PostfuseModule(768),
        )


def real_size_state_dict() -> dict[str, torch.Tensor]:
    """An SDM-layout state dict of meta tensors at the real files' sizes."""
    return dict(official_items(real_size_references()))


def loaded_unets(comfyui, prepare=lambda unet: unet):
    """The tiny TDM's and SDM's reference UNets (after `prepare`) and the same weights loaded by the pack's
    loader code into ComfyUI patchers: ([tdm_unet, sdm_unet], [tdm_patcher, sdm_patcher])."""
    from facediffuser_core import checkpoint

    networks = comfyui.pack("nodes.networks")
    references, patchers = [], []
    for build in (build_tdm, build_sdm):
        refs = build()
        prepare(refs.unet)
        parts = checkpoint.split_official(official_state_dict(refs))
        references.append(refs.unet)
        patchers.append(networks.build_model(parts.unet, torch.float32))
    return references, patchers
