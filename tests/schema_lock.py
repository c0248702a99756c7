"""The pack's node schemas as ComfyUI serves them, in a form that can be locked in a file: for each node id, its
required and optional inputs in the order the frontend lays out their widgets (saved UI workflows store widget
values by position), each with its type, the default of every optional input (what a saved workflow that lacks
it gets), the outputs in order (links in saved workflows name outputs by index) and, for combo inputs, the options
the pack itself offers (a saved workflow holds the option it was saved with).

tests/schema_lock.json is the lock; tests/test_schema_lock_comfyui.py fails on any difference from it. After a
deliberate change (a new optional input, say), regenerate it and add a CHANGELOG.md note:

    cd tests && COMFYUI_PATH=/path/to/ComfyUI python schema_lock.py

Combo options that are ComfyUI's are left out: its sampler and scheduler lists differ between its versions, and a
checkpoint list names the files installed. The pack's own options are locked (`pndm_official` among the samplers).
"""

from __future__ import annotations

import json
from pathlib import Path

LOCK_FILE = Path(__file__).resolve().parent / "schema_lock.json"
PREFIX = "FaceDiffuser"


def _input_type(definition) -> str:
    kind = definition[0]
    return "COMBO" if isinstance(kind, list) else kind


def _combo_options(definition) -> list | None:
    if isinstance(definition[0], list):
        return definition[0]
    if definition[0] == "COMBO" and len(definition) > 1:
        return definition[1].get("options")
    return None


def node_schema(node_class, comfyui_options: frozenset = frozenset()) -> dict:
    spec = node_class.INPUT_TYPES()
    schema = {}
    combos = {}
    for section in ("required", "optional"):
        entries = []
        for name, definition in spec.get(section, {}).items():
            entry = [name, _input_type(definition)]
            options = definition[1] if len(definition) > 1 else {}
            if section == "optional" and "default" in options:
                entry.append(options["default"])
            entries.append(entry)
            own = [option for option in _combo_options(definition) or [] if option not in comfyui_options]
            if own:
                combos[name] = own
        schema[section] = entries
    names = list(getattr(node_class, "RETURN_NAMES", None) or node_class.RETURN_TYPES)
    schema["outputs"] = [[name, kind] for name, kind in zip(names, node_class.RETURN_TYPES)]
    if combos:
        schema["options"] = combos
    return schema


def comfyui_options() -> frozenset:
    """Combo options that come from the running ComfyUI, not from the pack: its samplers, schedulers and file lists."""
    import comfy.samplers
    import folder_paths

    files = {name for folder in folder_paths.folder_names_and_paths for name in folder_paths.get_filename_list(folder)}
    return frozenset(comfy.samplers.SAMPLER_NAMES) | frozenset(comfy.samplers.SCHEDULER_NAMES) | files


def pack_schemas(mappings: dict) -> dict:
    ours = comfyui_options()
    return {node_id: node_schema(mappings[node_id], ours) for node_id in sorted(mappings) if node_id.startswith(PREFIX)}


def render(schemas: dict) -> str:
    return json.dumps(schemas, indent=1) + "\n"


if __name__ == "__main__":
    import sys

    import standalone  # noqa: F401  (the dev kit's path, as pytest.ini gives the tests)
    from dev.devkit import comfy_harness

    target = Path(sys.argv[1]) if len(sys.argv) > 1 else LOCK_FILE  # another file: for the test of this command
    target.write_text(render(pack_schemas(comfy_harness.start().nodes.NODE_CLASS_MAPPINGS)))
    print(f"wrote {target}; add a note on the change to CHANGELOG.md")
