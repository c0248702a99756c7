"""ComfyUI's dynamic-VRAM model patcher as far as the pack meets it, on a CPU (import after ComfyUI started).

On NVIDIA with recent torch, ComfyUI's main.py installs `ModelPatcherDynamic` (comfy-aimdo) as
`comfy.model_patcher.CoreModelPatcher`, the patcher every loader builds. On a CPU that class falls back to
the classic patcher, so CPU tests never see it. This stand-in keeps the part of its contract the pack
depends on: `is_dynamic()` is true; weight hooks are refused, with the real class's error; a non-dynamic
copy comes from `get_non_dynamic_delegate()` / `clone(disable_dynamic=True)`, which rebuilds the model
through the loader's `cached_patcher_init` (and fails without one, as the real class does). Loading and
running stay the classic patcher's, so that sampling works on a CPU.
"""

from __future__ import annotations

import contextlib

import comfy.model_patcher


class CpuDynamicPatcher(comfy.model_patcher.ModelPatcher):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.non_dynamic_delegate_model = None

    def is_dynamic(self):
        return True

    get_non_dynamic_delegate = comfy.model_patcher.ModelPatcherDynamic.get_non_dynamic_delegate
    patch_hook_weight_to_device = comfy.model_patcher.ModelPatcherDynamic.patch_hook_weight_to_device


@contextlib.contextmanager
def as_default_patcher():
    """Loaders build CpuDynamicPatcher while inside, as they build ModelPatcherDynamic on an NVIDIA GPU."""
    original = comfy.model_patcher.CoreModelPatcher
    comfy.model_patcher.CoreModelPatcher = CpuDynamicPatcher
    try:
        yield
    finally:
        comfy.model_patcher.CoreModelPatcher = original
