"""Regions under each attention backend ComfyUI offers, chosen the way ComfyUI chooses it, in one process of its own
(test_regions_backends_comfyui.py runs it; choosing a backend changes ComfyUI's attention module for the process).

    COMFYUI_PATH=... python attention_backends.py RESULT.json

ComfyUI picks its backend when `comfy.ldm.modules.attention` is imported, from the command-line flags and the
libraries it can import. Here ComfyUI starts once on the CPU; then for each backend the flags are set as its
command-line option sets them, the library's stand-in (attention_stand_ins) is made importable, and that module
is imported again (importlib.reload), which runs ComfyUI's own choice. xformers has no flag: ComfyUI takes it
when it is installed on a GPU, so `xformers_enabled()` answers yes while the module is imported. Basic, sage 3
and a function ComfyUI does not ship have no flag either: nodes put them in place of the chosen backend, as
here; an attention override goes into the model's transformer options, as ComfyUI's ModelAttentionBackend node
(0.33) puts it there.

For each backend, one three-stage run with regions and one without, tiny models, the same prompts and seed as
the regions tests; the result file holds per backend the largest difference to the PyTorch-attention runs, the
stand-in library's calls, the warnings and errors ComfyUI logged, and how regions attended.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import sys

import standalone  # noqa: F401  (the pack and the dev kit on the path when run as a command)

import attention_stand_ins
from dev.devkit import comfy_harness, tiny_comfy

# backend -> (the command-line flags that choose it, the library stand-in it calls, how it is put in place)
BACKENDS = {
    "pytorch": ({"use_pytorch_cross_attention": True}, None, "flag"),
    "split": ({"use_split_cross_attention": True}, None, "flag"),
    "sub_quad": ({"use_quad_cross_attention": True}, None, "flag"),
    "xformers": ({}, "xformers", "installed"),
    "flash": ({"use_flash_attention": True}, "flash", "flag"),
    "sage_v1": ({"use_sage_attention": True}, "sage_v1", "flag"),
    "sage_v2": ({"use_sage_attention": True}, "sage_v2", "flag"),
    "sage3": ({}, "sage3", "function"),
    "basic": ({}, None, "function"),
    "unknown": ({}, None, "function"),
    "override": ({}, None, "override"),
}
FLAGS = ("use_pytorch_cross_attention", "use_split_cross_attention", "use_quad_cross_attention", "use_flash_attention",
         "use_sage_attention")
# What ComfyUI logs when a backend gives up on a call and falls back.
FALLBACK_MESSAGES = ("Flash Attention failed", "Error running sage attention", "Error running SageAttention3")


class LogRecords(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def drops_masks(attention):
    """An attention function as a custom node might install it: PyTorch's attention, losing any mask it is given."""
    def attention_without_masks(q, k, v, heads, mask=None, **kwargs):
        return attention.attention_pytorch(q, k, v, heads, **kwargs)
    return attention_without_masks


@contextlib.contextmanager
def selected(backend: str, sdm):
    """ComfyUI's attention module with `backend` chosen; yields the SDM to sample with."""
    import comfy.cli_args
    import comfy.ldm.modules.attention as attention
    import comfy.model_management as model_management

    flags, library, how = BACKENDS[backend]
    args = comfy.cli_args.args
    saved = {name: getattr(args, name) for name in FLAGS}
    pytorch_enabled, xformers_enabled = model_management.ENABLE_PYTORCH_ATTENTION, model_management.xformers_enabled
    try:
        for name in FLAGS:
            setattr(args, name, flags.get(name, False))
        # model_management reads --use-pytorch-cross-attention once, at its import.
        model_management.ENABLE_PYTORCH_ATTENTION = flags.get("use_pytorch_cross_attention", False)
        if library is not None:
            attention_stand_ins.install(library)
        if how == "installed":
            model_management.xformers_enabled = lambda: True
        importlib.reload(attention)
        model_management.xformers_enabled = xformers_enabled
        if how == "function":
            function = {"basic": attention.attention_basic, "sage3": attention.attention3_sage,
                        "unknown": drops_masks(attention)}[backend]
            attention.optimized_attention = attention.optimized_attention_masked = function
        if how == "override":
            sdm = sdm.clone()
            without_masks = drops_masks(attention)
            overrides = attention_stand_ins.CALLS

            def override(function, *args, **kwargs):
                overrides["override"] = overrides.get("override", 0) + 1
                return without_masks(*args, **kwargs)

            sdm.model_options["transformer_options"]["optimized_attention_override"] = override
        yield sdm
    finally:
        for name, value in saved.items():
            setattr(args, name, value)
        model_management.ENABLE_PYTORCH_ATTENTION = pytorch_enabled
        model_management.xformers_enabled = xformers_enabled
        if library is not None:
            attention_stand_ins.uninstall(library)
        importlib.reload(attention)


def relative_difference(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def main(out_path: str) -> None:
    from test_regions_comfyui import halves, sample, subject_conds

    comfyui = comfy_harness.start()
    import comfy.ldm.modules.attention as attention

    region_patch = comfyui.pack("nodes.region_patch")
    tdm, sdm = tiny_comfy.model_pair()
    conds = subject_conds(comfyui)
    masks = halves(comfyui)
    records = LogRecords()
    logging.getLogger().addHandler(records)
    logging.getLogger().setLevel(logging.INFO)
    run = dict(alpha=0.34, beta=0.67, steps=3)
    results, reference = {}, None
    for backend in BACKENDS:
        attention_stand_ins.CALLS.clear()
        records.records.clear()
        with selected(backend, sdm) as model:
            chosen = attention.optimized_attention_masked
            overridden = model.model_options["transformer_options"]
            masking = region_patch.masking_attention(overridden)
            with_regions = sample(comfyui, tdm, model, conds, regions=masks, **run)[0]["samples"]
            plain = sample(comfyui, tdm, model, conds, **run)[0]["samples"]
        if reference is None:
            reference = (with_regions, plain)
        messages = [record.getMessage() for record in records.records]
        results[backend] = {
            "backend": getattr(chosen, "__name__", repr(chosen)),
            "path": "masked" if masking is not None else "per group",
            "comfyui_checks_sage_masks": hasattr(attention, "SAGE_ATTENTION_SUPPORTS_MASK"),
            "regions_difference": relative_difference(with_regions, reference[0]),
            "plain_difference": relative_difference(plain, reference[1]),
            "regions_change_the_picture": relative_difference(with_regions, plain),
            "calls": dict(attention_stand_ins.CALLS),
            "fallbacks": [message for message in messages if any(text in message for text in FALLBACK_MESSAGES)],
            "region_notes": [message for message in messages if message.startswith("Face-diffuser regions:")],
        }
        print(backend, json.dumps(results[backend]), flush=True)
    with open(out_path, "w") as out:
        json.dump(results, out, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
