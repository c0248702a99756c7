"""The SDM's region attention as ComfyUI attention patches, and which of ComfyUI's attention backends may take
its mask.

Two patch objects go on the SDM side's patcher, both reading the guider's regions (nodes.regions.SamplingRegions):
an attn2 patch (`RegionContext`) appends the plain rows to the cross-attention's keys and values, and an attn2
replace patch on every transformer block (`RegionCrossAttention`) attends with the regions. Both have `to()`,
which ComfyUI calls with the device and the dtype when it loads the model (ModelPatcher.model_patches_to), so
the plain rows go to the device once per load, not at every call. Until regions are decided (auto regions) and
after a fallback, the patches compute exactly what ComfyUI would without them.

The attention with regions is one of two computations with the same result:
- masked: ComfyUI's `optimized_attention_masked` with the additive mask (RegionAttention.bias), where the
  backend is known to honour a mask: PyTorch's, split, sub-quadratic, basic, xformers, sage 3 (which hands
  masked calls to PyTorch's), and sage where ComfyUI checks the library for mask support (0.33 on: it passes
  the mask, or hands the call to PyTorch's);
- per group: the backend without a mask, once per group of queries lying in the same regions, on the keys
  those queries see (RegionAttention.groups), where a mask would be lost or refused: sage on ComfyUI before it
  checked (the mask vanished into sageattn's **kwargs), flash (refuses a mask and logs a warning per call), an
  attention override in the model's options (ModelAttentionBackend, attention-selecting nodes), a function
  this module does not know, and another node's attn2 replacement already on the block (IPAdapter-style).
The choice is made once per run, at its first call, and logged once per backend.
"""

from __future__ import annotations

import inspect
import logging

import comfy.ldm.modules.attention as attention
import torch

# Where transformer options carry an attention override (ComfyUI's wrap_attn hands it every backend call).
OVERRIDE_KEY = "optimized_attention_override"
# Backends that honour a mask as given (sage3 hands every masked call to PyTorch's attention).
MASKING_BACKENDS = ("attention_pytorch", "attention_split", "attention_sub_quad", "attention_basic", "attention_xformers",
                    "attention3_sage")
_logged_backends: set[str] = set()


def masking_attention(transformer_options: dict):
    """ComfyUI's attention function that will honour the regions' mask in this run, or None: then regions take
    the per-group path, which needs no mask."""
    if OVERRIDE_KEY in transformer_options:  # the override, not the backend, decides what runs
        _log_once("an attention override in the model's options")
        return None
    function = attention.optimized_attention_masked
    backend = _unwrapped(function)
    known = {_unwrapped(getattr(attention, name, None)) for name in MASKING_BACKENDS}
    # ComfyUI checks sageattn's signature for a mask (SAGE_ATTENTION_SUPPORTS_MASK) from 0.33 on; before, the
    # mask was dropped without a word.
    if backend in known or (backend is _unwrapped(getattr(attention, "attention_sage", None)) and hasattr(attention, "SAGE_ATTENTION_SUPPORTS_MASK")):
        return function
    _log_once(f"ComfyUI's attention '{getattr(function, '__name__', function)}', which takes no mask here")
    return None


def _unwrapped(function):
    """The function a wrapper made with functools.wraps declares it wraps (ComfyUI's backends are wrap_attn's)."""
    try:
        return inspect.unwrap(function)
    except ValueError:  # a wrapper chain that loops
        return function


def _log_once(reason: str) -> None:
    if reason not in _logged_backends:
        _logged_backends.add(reason)
        logging.info("Face-diffuser regions: with %s, each group of queries lying in the same regions attends to its own keys "
                     "(the same result as the mask)", reason)


def _plain_attention(q, k, v, extra_options):
    """What CrossAttention computes without a mask: ComfyUI's backend, looked up at the call (nodes may swap it)."""
    return attention.optimized_attention(q, k, v, extra_options["n_heads"], attn_precision=extra_options.get("attn_precision"),
                                         transformer_options=extra_options)


def _take(keys: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """(batch, T + K, dim) keys or values -> (batch, T, dim), the given rows of each batch entry."""
    return keys.gather(1, columns.unsqueeze(-1).expand(-1, -1, keys.shape[-1]))


class RegionContext:
    """attn2 patch: the plain rows appended to the SDM's cross-attention context and value."""

    def __init__(self, regions):
        self.regions = regions

    def __call__(self, n, context, value, extra_options):
        scoped = self.regions.attention
        if scoped is None:
            return n, context, value
        return n, scoped.extend_context(context), scoped.extend_context(value)

    def to(self, device_or_dtype):
        self.regions.to(device_or_dtype)
        return self


class RegionCrossAttention:
    """attn2 replace patch: the cross-attention with the regions, through ComfyUI's backend or through the
    replacement that was on the block before (`replaced`, which takes no mask)."""

    def __init__(self, regions, replaced=None):
        self.regions = regions
        self.replaced = replaced

    def __call__(self, q, k, v, extra_options):
        scoped = self.regions.attention
        attend = self.replaced or _plain_attention
        if scoped is None:
            return attend(q, k, v, extra_options)
        chunks = self.regions.chunks(extra_options)
        shape = extra_options["activations_shape"]
        masked = None if self.replaced is not None else self.regions.masking_attention(extra_options)
        if masked is not None:
            bias = scoped.bias(chunks, shape, q.shape[0], k.shape[1], q.dtype, q.device)
            return masked(q, k, v, extra_options["n_heads"], bias, attn_precision=extra_options.get("attn_precision"),
                          transformer_options=extra_options)
        out = None
        for columns, queries in scoped.groups(chunks, shape, q.shape[0], k.shape[1], q.device):
            result = attend(q, _take(k, columns), _take(v, columns), extra_options)
            out = result if out is None else torch.where(queries, result, out)
        return out

    def to(self, device_or_dtype):
        self.regions.to(device_or_dtype)
        if hasattr(self.replaced, "to"):  # it would have been moved had it stayed on the block
            self.replaced = self.replaced.to(device_or_dtype)
        return self

    def models(self) -> list:
        return self.replaced.models() if hasattr(self.replaced, "models") else []


def attention_blocks(diffusion_model) -> list[tuple[str, int]]:
    """ComfyUI's block keys ("input", 1), ("middle", 0), ("output", 3)... of the UNet's spatial transformers."""
    kinds = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}
    blocks = []
    for name, module in diffusion_model.named_modules():
        parts = name.split(".")
        if hasattr(module, "transformer_blocks") and parts[0] in kinds:
            blocks.append((kinds[parts[0]], 0 if parts[0] == "middle_block" else int(parts[1])))
    return blocks


def patch(patcher, regions) -> None:
    """Puts the region attention on a patcher the caller owns (a clone): the context patch, a replacement on every
    transformer block, and around each replacement another node put there."""
    blocks = set(attention_blocks(patcher.model.diffusion_model))
    replaced = dict(patcher.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {}))
    patcher.set_model_attn2_patch(RegionContext(regions))
    own = RegionCrossAttention(regions)
    for kind, number in sorted(blocks):
        patcher.set_model_attn2_replace(own, kind, number)
    # ComfyUI prefers a replacement keyed with the transformer index over one keyed by the block alone.
    for key, existing in replaced.items():
        if key[:2] in blocks:
            patcher.set_model_attn2_replace(RegionCrossAttention(regions, existing), *key)
