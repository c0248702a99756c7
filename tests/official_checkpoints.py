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

import comfy_harness

# diffusers and transformers import torchvision, whose registry build needs CPU stand-ins for its ops.
comfy_harness._register_cpu_nms()

from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from transformers import (  # noqa: E402
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

import safetensors.torch  # noqa: E402

from facediffuser_core.postfuse import PostfuseModule  # noqa: E402

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


def tiny_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
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


def build_tdm(seed: int = 0) -> OfficialReferences:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    return OfficialReferences(
        unet=_prepare(tiny_unet(), generator),
        text_encoder=_prepare(tiny_text_encoder(), generator),
        vae=_prepare(tiny_vae(), generator),
    )


def build_sdm(seed: int = 1) -> OfficialReferences:
    refs = build_tdm(seed)
    generator = torch.Generator().manual_seed(seed + 1000)
    refs.image_encoder = _prepare(tiny_image_encoder(), generator)
    refs.postfuse = _prepare(PostfuseModule(HIDDEN), generator)
    return refs


def official_state_dict(refs: OfficialReferences, dtype: torch.dtype | None = None, with_position_ids: bool = True) -> dict[str, torch.Tensor]:
    """The references' weights under the official prefixes (text encoder without its text_model level).

    with_position_ids adds the `*.position_ids` buffers that the official files may carry."""
    state: dict[str, torch.Tensor] = {}

    def add(prefix: str, tensors: dict[str, torch.Tensor]) -> None:
        for key, tensor in tensors.items():
            state[prefix + key] = tensor.detach().clone() if dtype is None else tensor.detach().to(dtype)

    add("unet.", refs.unet.state_dict())
    text = {key.removeprefix("text_model."): value for key, value in refs.text_encoder.state_dict().items()}
    add("text_encoder.", text)
    add("vae.", refs.vae.state_dict())
    if refs.image_encoder is not None:
        add("image_encoder.", refs.image_encoder.state_dict())
    if refs.postfuse is not None:
        add("postfuse_module.", refs.postfuse.state_dict())
    if with_position_ids:
        state["text_encoder.embeddings.position_ids"] = torch.arange(MAX_POSITIONS).unsqueeze(0)
        if refs.image_encoder is not None:
            positions = (VISION_IMAGE_SIZE // VISION_PATCH) ** 2 + 1
            state["image_encoder.vision_model.embeddings.position_ids"] = torch.arange(positions).unsqueeze(0)
    else:
        state = {key: value for key, value in state.items() if not key.endswith("position_ids")}
    return state


def write_checkpoint(state_dict: dict[str, torch.Tensor], path: Path) -> Path:
    """torch.save for `.bin` (the official format), safetensors for `.safetensors`."""
    path = Path(path)
    if path.suffix == ".safetensors":
        safetensors.torch.save_file({key: value.contiguous() for key, value in state_dict.items()}, str(path))
    else:
        torch.save(state_dict, path)
    return path
