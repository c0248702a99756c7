"""The networks of an official Face-diffuser checkpoint as ComfyUI objects, built from the parts of its state dict:
the UNet as an SD1.5-family MODEL, the text encoder as SD1.5's CLIP, the VAE, the CLIP vision tower. Their sizes
come from the tensor shapes (facediffuser_core.checkpoint), so ComfyUI's fixed-architecture detection is not
involved and fine-tunes of any SD1.5-family size load; each part is emptied as its ComfyUI object takes the
weights. Errors are ValueErrors saying what does not fit, for the loader to name its node and file.
"""

from __future__ import annotations

import json
import os
import tempfile

import torch

import comfy.clip_vision
import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
import comfy.supported_models
import comfy.supported_models_base
import comfy.utils
import folder_paths

from ..facediffuser_core import checkpoint

# CLIP weights ComfyUI's SD1.5 text model has and the official text encoder lacks; both are unused for SD1.5.
OPTIONAL_CLIP_KEYS = ("clip_l.logit_scale", "clip_l.transformer.text_projection.weight")


def patcher_class(disable_dynamic: bool) -> type:
    """ComfyUI's default patcher (the dynamic-VRAM one on NVIDIA, which main.py installs as CoreModelPatcher,
    so it is read at call time), or the classic one when a non-dynamic copy is asked for."""
    return comfy.model_patcher.ModelPatcher if disable_dynamic else comfy.model_patcher.CoreModelPatcher


def build_model(unet: dict[str, torch.Tensor], dtype: torch.dtype | None, disable_dynamic: bool = False) -> comfy.model_patcher.ModelPatcher:
    """An SD1.5-family MODEL from a diffusers-layout UNet state dict (emptied as its weights are taken)."""
    unet_config = checkpoint.unet_config(unet)
    model_config = comfy.supported_models.SD15(unet_config)
    parameters = comfy.utils.calculate_parameters(unet)
    load_device = comfy.model_management.get_torch_device()
    if dtype is None:
        dtype = comfy.model_management.unet_dtype(
            model_params=parameters,
            supported_dtypes=list(model_config.supported_inference_dtypes),
            weight_dtype=comfy.utils.weight_dtype(unet),
        )
    manual_cast = comfy.model_management.unet_manual_cast(dtype, load_device, model_config.supported_inference_dtypes)
    model_config.set_inference_dtype(dtype, manual_cast)

    ldm = {}
    for diffusers_key, ldm_key in comfy.utils.unet_to_diffusers(model_config.unet_config).items():
        if diffusers_key in unet:
            ldm[ldm_key] = unet.pop(diffusers_key)
    if unet:
        raise ValueError(f"the UNet has {len(unet)} weights outside the SD1.5 structure read from its shapes, e.g. {sorted(unet)[:3]}")

    model = model_config.get_model(ldm, "", device=comfy.model_management.unet_inital_load_device(parameters, dtype))
    missing = set(model.diffusion_model.state_dict()) - set(ldm)
    if missing:
        raise ValueError(f"the UNet lacks {len(missing)} weights its structure needs, e.g. {sorted(missing)[:3]}: the file is incomplete")
    patcher = patcher_class(disable_dynamic)(model, load_device=load_device, offload_device=comfy.model_management.unet_offload_device())
    model.load_model_weights(ldm, "", assign=patcher.is_dynamic())
    return patcher


def build_clip(text_encoder: dict[str, torch.Tensor], dtype: torch.dtype | None, disable_dynamic: bool = False) -> comfy.sd.CLIP:
    """ComfyUI's SD1.5 CLIP (bundled tokenizer) sized from a `text_model.*` state dict."""
    config = checkpoint.clip_text_config(text_encoder)
    if config["vocab_size"] != checkpoint.SD15_VOCAB_SIZE:
        raise ValueError(f"the text encoder has a vocabulary of {config['vocab_size']}, SD1.5's tokenizer needs {checkpoint.SD15_VOCAB_SIZE}")
    clip_sd = {"clip_l.transformer." + key: text_encoder.pop(key) for key in list(text_encoder)}
    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    options = {"clip_l_model_config": config}
    if dtype is not None:
        options["dtype"] = dtype
    clip = comfy.sd.CLIP(
        target,
        embedding_directory=folder_paths.get_folder_paths("embeddings"),
        parameters=comfy.utils.calculate_parameters(clip_sd),
        model_options=options,
        disable_dynamic=disable_dynamic,
    )
    missing, unexpected = clip.load_sd(clip_sd, full_model=True)
    missing = [key for key in missing if key not in OPTIONAL_CLIP_KEYS]
    if missing or unexpected:
        raise ValueError(f"the text encoder does not fit CLIP: missing {missing[:3]}, unexpected {list(unexpected)[:3]}")
    return clip


def build_vae(vae: dict[str, torch.Tensor]) -> comfy.sd.VAE:
    """ComfyUI's VAE from a diffusers-layout AutoencoderKL state dict, its size read from the shapes."""
    config = checkpoint.vae_config(vae)
    levels = len(config["ddconfig"]["ch_mult"])
    if levels != 4:
        raise ValueError(f"the VAE has {levels} levels; SD1.5's latent space needs 4 (a downscale of 8)")
    return comfy.sd.VAE(sd=vae, config={"params": config})


def build_clip_vision(image_encoder: dict[str, torch.Tensor], dtype: torch.dtype | None) -> comfy.clip_vision.ClipVisionModel:
    """ComfyUI's CLIP vision model (with projection) sized from the image_encoder state dict."""
    config = checkpoint.clip_vision_config(image_encoder)
    # ClipVisionModel only takes its configuration as a JSON file.
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(config, handle)
    try:
        clip_vision = comfy.clip_vision.ClipVisionModel(handle.name)
    finally:
        os.unlink(handle.name)
    if dtype is not None:
        # ClipVisionModel always builds in ComfyUI's text-encoder dtype; its ops cast weights per call.
        clip_vision.model.to(dtype)
        clip_vision.dtype = dtype
    missing, unexpected = clip_vision.load_sd(image_encoder)
    if missing or unexpected:
        raise ValueError(f"the image encoder does not fit CLIP ViT: missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]}")
    image_encoder.clear()
    return clip_vision
