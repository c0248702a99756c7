"""The official script's initial latent on this device (float16, drawn as diffusers' randn_tensor draws it after
accelerate's set_seed) against the pack's official noise, and whether the float16 draw is the float32 draw
rounded; on CUDA this is what "same seed, same picture" rests on, which no CPU can check."""

from __future__ import annotations

import importlib.metadata

import torch

from . import Context, Result, Row

SEEDS = (0, 1, 42, 123456789)
SHAPES = ((1, 4, 64, 64), (2, 4, 64, 64), (1, 4, 96, 64))
TINY_SHAPES = ((1, 4, 8, 8), (2, 4, 8, 8))


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def seed_everything(seed: int) -> None:
    """accelerate's set_seed where it is installed (the official script's call), else what it does to torch."""
    try:
        from accelerate.utils import set_seed
    except ImportError:
        torch.manual_seed(seed)  # seeds every device's default generator, as set_seed does through torch
        return
    set_seed(seed)


def draw(shape: tuple[int, ...], device: str, dtype: torch.dtype) -> torch.Tensor:
    """The official pipeline's prepare_latents without a generator: diffusers' randn_tensor where installed."""
    try:
        from diffusers.utils.torch_utils import randn_tensor
    except ImportError:
        return torch.randn(shape, device=device, dtype=dtype).cpu()
    return randn_tensor(shape, generator=None, device=torch.device(device), dtype=dtype).cpu()


def official(seed: int, shape: tuple[int, ...], device: str, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    seed_everything(seed)
    return draw(shape, device, dtype)


def measure(context: Context) -> Result:
    official_run = context.comfyui.pack("nodes.official_run")
    import comfy.model_management
    import comfy.sample

    device = comfy.model_management.get_torch_device().type
    cases = []
    for shape in TINY_SHAPES if context.tiny else SHAPES:
        for seed in SEEDS:
            script = official(seed, shape, device)
            pack = official_run.official_noise(torch.zeros(shape), seed).half()
            rounded = official(seed, shape, device, torch.float32).half()
            cpu_noise = comfy.sample.prepare_noise(torch.zeros(shape), seed).half()
            cases.append({"seed": seed, "shape": list(shape), "pack_equal": torch.equal(pack, script),
                          "pack_max_difference": float((pack.float() - script.float()).abs().max()),
                          "float32_rounded_equal": torch.equal(rounded, script),
                          "float32_rounded_max_difference": float((rounded.float() - script.float()).abs().max()),
                          "cpu_noise_equal": torch.equal(cpu_noise, script)})
    total = len(cases)
    count = lambda key: sum(case[key] for case in cases)
    largest = lambda key: max(case[key] for case in cases)
    drawn_by = f"diffusers {_version('diffusers')} randn_tensor" if _version("diffusers") else "torch.randn"
    seeded_by = f"accelerate {_version('accelerate')} set_seed" if _version("accelerate") else "torch.manual_seed"
    rows = [
        Row(f"official noise on {device}: the pack's against the official draw (float16; {seeded_by}, {drawn_by})",
            f"equal in {count('pack_equal')} of {total}", "", f"largest difference {largest('pack_max_difference'):.3g}", "equal in all"),
        Row(f"official noise on {device}: the float32 draw rounded to float16 against the float16 draw",
            f"equal in {count('float32_rounded_equal')} of {total}", "", f"largest difference {largest('float32_rounded_max_difference'):.3g}", ""),
        Row(f"official noise on {device}: ComfyUI's CPU noise rounded (the pack's official noise on a CPU) against it",
            f"equal in {count('cpu_noise_equal')} of {total}", "", "", "equal on a CPU only"),
    ]
    return Result({"device": device, "seeded_by": seeded_by, "drawn_by": drawn_by, "cases": cases}, rows)
