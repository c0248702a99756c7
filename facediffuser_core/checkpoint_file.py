"""Reading a checkpoint file into a state dict, safely and with errors a user can act on.

`.bin`/`.pt`/`.ckpt` files are read with torch.load(weights_only=True), memory-mapped so that tensors stay
backed by the file until they are used; `.safetensors` with safetensors. A file that holds anything
but tensors is refused rather than unpickled.
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from pathlib import Path

import torch

SAFETENSORS_SUFFIX = ".safetensors"

CORRUPT_HINT = "the file is truncated or corrupt, re-download it"


class CheckpointFileError(ValueError):
    """The file exists but cannot be read as a checkpoint."""


def _load_pickle(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as error:
        # Only files written by torch.save's zip format can be memory-mapped; older ones load whole.
        if "mmap can only be used with files saved with" not in str(error):
            raise
        logging.info("%s uses torch's legacy format, which cannot be memory-mapped: loading it whole", path)
        return torch.load(path, map_location="cpu", weights_only=True)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, by key. Raises FileNotFoundError naming the exact path when it is
    absent and CheckpointFileError when it is unreadable (truncated, corrupt, or not only tensors)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointFileError(f"{path} is empty (0 bytes): {CORRUPT_HINT}")
    if path.suffix == SAFETENSORS_SUFFIX:
        import safetensors.torch

        try:
            loaded: object = safetensors.torch.load_file(str(path))
        except Exception as error:  # safetensors raises its own SafetensorError and OSError variants
            raise CheckpointFileError(f"cannot read {path} as safetensors ({error}): {CORRUPT_HINT}") from error
    else:
        try:
            loaded = _load_pickle(path)
        except pickle.UnpicklingError as error:
            if "Weights only load failed" in str(error):
                raise CheckpointFileError(
                    f"{path} contains Python objects other than tensors; it is not a plain state dict, and "
                    "unpickling it could run code, so it is refused"
                ) from error
            raise CheckpointFileError(f"cannot read {path} ({error}): {CORRUPT_HINT}") from error
        except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as error:
            raise CheckpointFileError(f"cannot read {path} ({error}): {CORRUPT_HINT}") from error
    return _tensors_only(loaded, path)


def _tensors_only(loaded: object, path: Path) -> dict[str, torch.Tensor]:
    # Training scripts sometimes wrap the weights as {"state_dict": {...}}.
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise CheckpointFileError(f"{path} holds a {type(loaded).__name__}, not a state dict of tensors")
    not_tensors = [key for key, value in loaded.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise CheckpointFileError(f"{path} is not a plain state dict: {len(not_tensors)} entries are not tensors, e.g. {not_tensors[:3]}")
    return loaded
