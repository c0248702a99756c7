"""Tiny SD1.5-shaped ComfyUI models with random weights, for the ComfyUI tier (import after ComfyUI started)."""

from __future__ import annotations

import math

import torch

CONTEXT_DIM = 32

# Same family as SD1.5 (spatial transformers, no ADM, eps prediction), two levels, 32/64 channels.
TINY_UNET_CONFIG = {
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 32,
    "channel_mult": [1, 2],
    "num_res_blocks": [1, 1],
    "transformer_depth": [1, 0],
    "transformer_depth_output": [1, 1, 0, 0],
    "transformer_depth_middle": 1,
    "context_dim": CONTEXT_DIM,
    "num_heads": 8,
    "num_head_channels": -1,
    "use_spatial_transformer": True,
    "use_linear_in_transformer": False,
    "legacy": False,
    "adm_in_channels": None,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
    "image_size": 32,
}


def randomise(module: torch.nn.Module, seed: int) -> None:
    """ComfyUI's ops skip weight init; give every parameter a scale that keeps activations O(1)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if parameter.dim() > 1:
                fan_in = math.prod(parameter.shape[1:])
                parameter.copy_(noise / math.sqrt(fan_in))
            elif "norm" in name and name.endswith("weight"):
                parameter.copy_(1.0 + 0.1 * noise)
            else:
                parameter.copy_(0.1 * noise)


def sd15_patcher(seed: int):
    """A ModelPatcher around a tiny random SD1.5-family model, on CPU in float32."""
    import comfy.model_patcher
    import comfy.supported_models

    model_config = comfy.supported_models.SD15(dict(TINY_UNET_CONFIG))
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    randomise(model.diffusion_model, seed)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def controlnet(seed: int, device: torch.device = torch.device("cpu")):
    """A ControlNet of the tiny UNets' structure with random (not zero) output convolutions, so it acts."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.ops

    config = {k: v for k, v in TINY_UNET_CONFIG.items() if k != "out_channels"}
    control_model = comfy.cldm.cldm.ControlNet(hint_channels=3, dtype=torch.float32, device="cpu",
                                               operations=comfy.ops.disable_weight_init, **config)
    randomise(control_model, seed)
    return comfy.controlnet.ControlNet(control_model, load_device=device, manual_cast_dtype=None)


def write_lora(model_patcher, path, seed: int = 8) -> None:
    """A LoRA file (ComfyUI's full-difference format) for the tiny UNet's output convolution, strong enough to
    change the picture."""
    import safetensors.torch

    weight = model_patcher.model.state_dict()["diffusion_model.out.2.weight"]
    diff = torch.randn(weight.shape, generator=torch.Generator().manual_seed(seed)) * 0.5
    safetensors.torch.save_file({"diffusion_model.out.2.diff": diff}, str(path))


def model_pair():
    """A tiny TDM and SDM: (tdm, sdm)."""
    return sd15_patcher(1), sd15_patcher(2)


def three_conditionings():
    """Face-diffuser's three conditionings for the tiny models, by input name."""
    return {"augmented": conditioning(10), "text": conditioning(11), "null": conditioning(12)}


def conditioning(seed: int, tokens: int = 77):
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, tokens, CONTEXT_DIM, generator=generator), {}]]


def empty_latent(batch: int = 1, height: int = 8, width: int = 8):
    return {"samples": torch.zeros(batch, 4, height, width)}
