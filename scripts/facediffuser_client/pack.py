"""The node pack around the client: its folder, and facediffuser_core's modules that the client shares with the nodes."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

PACK_ROOT = Path(__file__).resolve().parents[2]


def core(module: str) -> ModuleType:
    """facediffuser_core.<module>: model_folders, insightface_packs, markers and region_layouts need only the standard
    library (the others need torch). The pack's root goes on sys.path here, the client's one such edit, and only when a module is
    asked for: the nodes use the same rules (where ComfyUI and the models are), so they live in the pack, and a Ray
    worker node may receive this package without the pack."""
    if str(PACK_ROOT) not in sys.path:
        sys.path.insert(0, str(PACK_ROOT))
    return importlib.import_module(f"facediffuser_core.{module}")
