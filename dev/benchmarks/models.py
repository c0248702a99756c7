"""The benchmark's models and settings: SD1.5-size UNets with random weights (or a null UNet), the presets,
the prompts and latents, and ComfyUI started in this process."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from facediffuser_client.pack import core
from dev.devkit import comfy_harness, tiny_comfy

_schedule = core("schedule")
OFFICIAL_DEMO_ALPHA, OFFICIAL_DEMO_BETA = _schedule.OFFICIAL_DEMO_ALPHA, _schedule.OFFICIAL_DEMO_BETA
StageSchedule, StepLocator = _schedule.StageSchedule, _schedule.StepLocator

SDM, TDM = "SDM", "TDM"
SEED = 0
CFG = 5.0
SAMPLER, SCHEDULER = "ddim", "ddim_uniform"
CONTEXT_TOKENS, CONTEXT_DIM = 77, 768

# SD1.5's UNet (859.5M parameters), as comfy/model_detection.py describes it.
SD15_UNET = {
    "in_channels": 4, "out_channels": 4, "model_channels": 320, "channel_mult": [1, 2, 4, 4],
    "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "transformer_depth_middle": 1,
    "context_dim": CONTEXT_DIM, "num_heads": 8, "num_head_channels": -1, "use_spatial_transformer": True,
    "use_linear_in_transformer": False, "legacy": False, "adm_in_channels": None, "use_temporal_resblock": False,
    "use_temporal_attention": False, "use_checkpoint": False, "image_size": 32,
}
# The same blocks, attention layers and text context with a tenth of the channels (10.4M parameters).
SMALL_UNET = {**SD15_UNET, "model_channels": 32}
# The tests' tiny UNet at SD1.5's text width: a run in seconds, for rehearsals of the measurements, not figures.
TINY_UNET = {**tiny_comfy.TINY_UNET_CONFIG, "context_dim": CONTEXT_DIM}
# SD1.5's model around a NullUNet: ComfyUI builds no UNet from this configuration.
NULL_UNET = {**SD15_UNET, "disable_unet_model_creation": True}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Preset:
    name: str
    unet_config: dict
    latent_side: int
    steps: int
    dtype: str
    repeats: int


PRESETS = {
    # 10 steps at the official fractions keep the official 1.30 evaluation ratio (26 rows against 20).
    "sd15-cpu": Preset("SD1.5-size UNets", SD15_UNET, latent_side=16, steps=10, dtype="bf16", repeats=2),
    "quick": Preset("small UNets of SD1.5's structure", SMALL_UNET, latent_side=16, steps=10, dtype="fp32", repeats=5),
    "sd15-cuda": Preset("SD1.5-size UNets", SD15_UNET, latent_side=64, steps=50, dtype="fp16", repeats=3),
    # 512x512 and the official 50 steps: a run is then the samplers' and the pack's host work alone.
    "tiny": Preset("tiny UNets (the tests' size, for rehearsals)", TINY_UNET, latent_side=8, steps=10, dtype="fp32", repeats=1),
    "null": Preset("null UNets (SD1.5's interface and latent, next to no work)", NULL_UNET, latent_side=64, steps=50, dtype="fp32", repeats=25),
}


# --------------------------------------------------------------------------------------------------
# ComfyUI and the models


def start_comfyui(device: str):
    """ComfyUI in this process, as the tests start it; on CUDA without the harness's CPU flag."""
    if comfy_harness.comfyui_path() is None:
        raise SystemExit(f"benchmark: {comfy_harness.SKIP_REASON}")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("benchmark: --device cuda needs a CUDA build of torch and a visible GPU; "
                             f"this torch ({torch.__version__}) sees none. Run without --device for the CPU figures.")
    comfyui = comfy_harness.start(cpu=device != "cuda")
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False  # same for both samplers; tqdm would only add noise to the timings
    logging.getLogger().setLevel(logging.WARNING)
    return comfyui


class NullUNet(torch.nn.Module):
    """SD1.5's UNet as ComfyUI calls it (latent, timesteps, text context, options) for a few elementwise
    operations: a scale per latent channel and the context's mean, so that the conditional and unconditional
    predictions differ (SNF then has guidance to compare) and a run's time is what surrounds the UNet."""

    def __init__(self, seed: int, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype
        generator = torch.Generator().manual_seed(seed)
        self.scale = torch.nn.Parameter(0.5 + 0.1 * torch.randn(1, 4, 1, 1, generator=generator).to(dtype), requires_grad=False)

    def forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):
        return x * self.scale + context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1).to(x.dtype)


def build_model(unet_config: dict, seed: int, dtype: torch.dtype, device: str):
    """A ComfyUI model patcher around an SD1.5-family UNet with random weights (or a NullUNet), loaded on
    `device` by ComfyUI's model management like any checkpoint (built on the CPU, moved at the first load)."""
    import comfy.model_patcher
    import comfy.supported_models

    model_config = comfy.supported_models.SD15(dict(unet_config))
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({})
    if unet_config.get("disable_unet_model_creation"):
        model.diffusion_model = NullUNet(seed, dtype)
    else:
        tiny_comfy.randomise(model.diffusion_model, seed)
    model.eval()
    return comfy.model_patcher.CoreModelPatcher(model, load_device=torch.device(device), offload_device=torch.device("cpu"))


def weight_bytes(patcher) -> int:
    return sum(p.numel() * p.element_size() for p in patcher.model.diffusion_model.parameters())


def parameter_count(patcher) -> int:
    return sum(p.numel() for p in patcher.model.diffusion_model.parameters())


def conditionings() -> dict:
    """The SNF sampler's three prompts at SD1.5's context shape (77 tokens of 768)."""
    generator = torch.Generator().manual_seed(SEED)
    return {name: [[torch.randn(1, CONTEXT_TOKENS, CONTEXT_DIM, generator=generator), {}]]
            for name in ("augmented", "text", "null")}


def empty_latent(side: int) -> dict:
    return {"samples": torch.zeros(1, 4, side, side)}


