"""Convert an official Face-diffuser checkpoint (.bin) to .safetensors.

    python -m facediffuser_core.convert INPUT.bin OUTPUT.safetensors --dtype fp16|bf16|fp32 [--overwrite]

run from the pack's folder. A TDM becomes a standard SD1.5 single-file checkpoint (LDM key names), which
ComfyUI's own checkpoint loader and the Face-diffuser TDM Loader both load. An SDM (or FastComposer
checkpoint) keeps the official key layout, re-typed, for the Face-diffuser SDM Loader.

Memory: the input is memory-mapped and the output written one tensor at a time (safetensors' format is
a JSON header followed by the raw tensor bytes), so at most one converted tensor is held at once besides
the input's mapped pages (file-backed, which the kernel can drop); the verification rereads the output
through a bounded window. Peak resident memory is about the input's size plus 64 MiB plus the largest
tensor (dev/measure_convert_memory.py measures it). The output is written to a temporary file next to the target, verified
(keys, shapes, dtypes and values, reread with safetensors) and only then renamed into place.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import CheckpointKind, classify, split_official
from .checkpoint_file import CheckpointFileError, read_state_dict
from .sd15_keys import parts_to_sd15

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_SAFETENSORS_DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
# safetensors readers expect the tensor data to start 8-byte aligned.
_HEADER_ALIGNMENT = 8
_PROGRESS_STEPS = 20
VERIFY_WINDOW_BYTES = 64 * 2**20


@dataclass(frozen=True)
class ConversionResult:
    kind: CheckpointKind
    tensors: int
    output_bytes: int


def converted_tensors(state_dict: dict[str, torch.Tensor], source: Path) -> tuple[dict[str, torch.Tensor], CheckpointKind]:
    """The output's tensors by key (not yet re-typed), sharing the input's storage; empties state_dict."""
    found = classify(state_dict)
    if found.kind is CheckpointKind.TDM:
        return parts_to_sd15(split_official(state_dict)), found.kind
    if found.kind is CheckpointKind.SDM:
        return {key: state_dict.pop(key) for key in list(state_dict) if not key.endswith("position_ids")}, found.kind
    raise ValueError(
        f"{source} is {found.description}; the converter takes an official Face-diffuser SDM or TDM checkpoint "
        "(or FastComposer's, an SDM)"
    )


def cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Floating tensors to the target dtype; integer and boolean tensors keep theirs."""
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, dtype: torch.dtype, metadata: dict[str, str], progress) -> int:
    """Write tensors (cast to dtype) as a safetensors file, one tensor in memory at a time; returns its size."""
    keys = sorted(tensors)
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for key in keys:
        tensor = tensors[key]
        target = dtype if tensor.is_floating_point() else tensor.dtype
        if target not in _SAFETENSORS_DTYPE_NAMES:
            raise ValueError(f"tensor {key!r} has dtype {target}, which safetensors cannot store")
        size = tensor.numel() * target.itemsize
        header[key] = {"dtype": _SAFETENSORS_DTYPE_NAMES[target], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % _HEADER_ALIGNMENT)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for index, key in enumerate(keys):
            data = cast(tensors[key], dtype).contiguous().reshape(-1)
            handle.write(data.view(torch.uint8).numpy().data)
            progress(index + 1, len(keys))
    return 8 + len(encoded) + offset


def verify(path: Path, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Reread the written file with safetensors and compare keys, shapes, dtypes and values.

    safetensors memory-maps the file and every page read stays resident until it is closed, so the file
    is reopened after each VERIFY_WINDOW_BYTES read: the check then adds that much to the peak, not the
    output's whole size."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as written:
        keys = set(written.keys())
    if keys != set(tensors):
        raise RuntimeError(f"verification failed: {path} has keys {sorted(keys ^ set(tensors))[:5]} that differ from the source")
    pending = sorted(keys)
    while pending:
        read = 0
        with safe_open(str(path), framework="pt") as written:
            while pending and read < VERIFY_WINDOW_BYTES:
                key = pending.pop(0)
                expected = cast(tensors[key], dtype)
                actual = written.get_tensor(key)
                if actual.shape != expected.shape or actual.dtype != expected.dtype or not torch.equal(actual, expected):
                    raise RuntimeError(f"verification failed: tensor {key!r} in {path} differs from the source")
                read += actual.numel() * actual.element_size()


def convert(source: str | Path, target: str | Path, dtype: torch.dtype, overwrite: bool = False) -> ConversionResult:
    source, target = Path(source), Path(target)
    if not source.is_file():
        raise FileNotFoundError(f"input checkpoint not found: {source}")
    if target.suffix != ".safetensors":
        raise ValueError(f"the output must be a .safetensors file, got {target}")
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass --overwrite to replace it")
    if not target.parent.is_dir():
        raise FileNotFoundError(f"output folder not found: {target.parent}")

    logging.info("reading %s", source)
    tensors, kind = converted_tensors(read_state_dict(source), source)
    logging.info("%s: %s, %d tensors -> %s (%s)", source.name, kind.value, len(tensors), target, dtype)
    started = time.monotonic()
    last_reported = [-1]

    def progress(done: int, total: int) -> None:
        step = done * _PROGRESS_STEPS // total
        if step != last_reported[0]:
            last_reported[0] = step
            logging.info("writing: %3d%% (%d/%d tensors, %.0f s)", 100 * done // total, done, total, time.monotonic() - started)

    temporary = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        size = write_safetensors(tensors, temporary, dtype, {"format": "pt", "facediffuser_kind": kind.name}, progress)
        logging.info("verifying %s", target.name)
        verify(temporary, tensors, dtype)
        os.replace(temporary, target)
    finally:
        if temporary.exists():
            temporary.unlink()
    logging.info("wrote %s (%.2f GB) in %.0f s", target, size / 1e9, time.monotonic() - started)
    return ConversionResult(kind, len(tensors), size)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m facediffuser_core.convert",
        description="Convert an official Face-diffuser SDM/TDM pytorch_model.bin to .safetensors "
        "(a TDM becomes a standard SD1.5 single-file checkpoint).",
    )
    parser.add_argument("input", type=Path, help="the official pytorch_model.bin (SDM, TDM, or FastComposer's)")
    parser.add_argument("output", type=Path, help="the .safetensors file to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES), required=True, help="dtype of the floating-point weights in the output")
    parser.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        convert(args.input, args.output, DTYPES[args.dtype], overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, CheckpointFileError, ValueError, RuntimeError) as error:
        logging.error("error: %s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
