"""Stand-ins for the attention libraries ComfyUI can use, none of which runs (or installs) on a CPU: each has the
real library's module path and function signature, and computes with PyTorch's scaled_dot_product_attention,
counting its calls. What each real one does with arguments it has no parameter for is kept: sageattn of both
generations swallows them in **kwargs (a mask given there is lost), sageattn3_blackwell takes attn_mask and
ignores it.

    install("flash")   # sys.modules gets flash_attn with flash_attn_func; CALLS["flash"] counts its calls
"""

from __future__ import annotations

import sys
import types

import torch
import torch.nn.functional as F

CALLS: dict[str, int] = {}


def _count(name: str) -> None:
    CALLS[name] = CALLS.get(name, 0) + 1


def _heads_first(tensor: torch.Tensor, layout: str) -> torch.Tensor:
    """(B, N, H, D) ("NHD") or (B, H, N, D) ("HND") -> (B, H, N, D)."""
    return tensor.transpose(1, 2) if layout == "NHD" else tensor


def sageattn_v1(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None, smooth_k=True, **kwargs):
    """sageattention 1.x's sageattn."""
    _count("sage_v1")
    out = F.scaled_dot_product_attention(*(_heads_first(t, tensor_layout) for t in (q, k, v)), is_causal=is_causal, scale=sm_scale)
    return _heads_first(out, tensor_layout)


def sageattn_v2(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None, return_lse=False, **kwargs):
    """sageattention 2.x's sageattn (ComfyUI never asks for the log-sum-exp)."""
    _count("sage_v2")
    if return_lse:
        raise NotImplementedError("the stand-in computes no log-sum-exp")
    out = F.scaled_dot_product_attention(*(_heads_first(t, tensor_layout) for t in (q, k, v)), is_causal=is_causal, scale=sm_scale)
    return _heads_first(out, tensor_layout)


def sageattn3_blackwell(q, k, v, attn_mask=None, is_causal=False, per_block_mean=True, **kwargs):
    """sageattn3's kernel entry, (B, H, N, D); the real one accepts attn_mask and never reads it."""
    _count("sage3")
    return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash_attn 2.x's flash_attn_func, (B, N, H, D)."""
    _count("flash")
    out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), dropout_p=dropout_p, is_causal=causal,
                                         scale=softmax_scale)
    return out.transpose(1, 2)


def memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None, *, op=None, output_dtype=None):
    """xformers.ops.memory_efficient_attention, (B, M, H, K), with a tensor attn_bias broadcast to (B, H, Mq, Mk)."""
    _count("xformers")
    out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (query, key, value)), attn_mask=attn_bias, dropout_p=p,
                                         scale=scale)
    return out.transpose(1, 2)


def _module(name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    return module


def modules(library: str) -> dict[str, types.ModuleType]:
    """The sys.modules entries that stand in for one library."""
    if library == "sage_v1":
        return {"sageattention": _module("sageattention", sageattn=sageattn_v1)}
    if library == "sage_v2":
        return {"sageattention": _module("sageattention", sageattn=sageattn_v2)}
    if library == "sage3":
        return {"sageattn3": _module("sageattn3", sageattn3_blackwell=sageattn3_blackwell)}
    if library == "flash":
        return {"flash_attn": _module("flash_attn", flash_attn_func=flash_attn_func)}
    if library == "xformers":
        ops = _module("xformers.ops", memory_efficient_attention=memory_efficient_attention)
        version = _module("xformers.version", __version__="0.0.30")
        return {"xformers": _module("xformers", ops=ops, version=version, __version__="0.0.30", _has_cpp_library=True),
                "xformers.ops": ops, "xformers.version": version}
    raise KeyError(library)


def install(library: str) -> None:
    sys.modules.update(modules(library))


def uninstall(library: str) -> None:
    for name in modules(library):
        sys.modules.pop(name, None)
