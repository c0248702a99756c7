"""The node help pages ComfyUI's node docs panel shows (web/docs/<node id>.md, served through the pack's
WEB_DIRECTORY): one per node, titled with its display name, naming every input and output its schema has.
tests/test_canvas_browser_comfyui.py opens each in a real browser."""

from __future__ import annotations

import re

import schema_lock
from dev.devkit import comfy_harness

HELP = comfy_harness.REPO_ROOT / "web" / "docs"


def test_every_node_has_a_help_page_and_every_page_a_node(comfyui):
    nodes = schema_lock.pack_schemas(comfyui.nodes.NODE_CLASS_MAPPINGS)
    assert sorted(path.stem for path in HELP.glob("*.md")) == sorted(nodes)


def test_each_help_page_names_its_nodes_inputs_and_outputs(comfyui):
    mappings = comfyui.nodes.NODE_CLASS_MAPPINGS
    missing = []
    for node_id, schema in schema_lock.pack_schemas(mappings).items():
        page = HELP / f"{node_id}.md"
        text = page.read_text(encoding="utf-8")
        title = mappings[node_id].GET_SCHEMA().display_name
        if text.splitlines()[0] != f"# {title}":
            missing.append(f"{page.name}: its first line must be '# {title}'")
        for section in ("## Inputs", "## Outputs", "## Example"):
            if section not in text.splitlines():
                missing.append(f"{page.name}: no '{section}' section")
        named = set(re.findall(r"`([^`]+)`", text))
        for name, *_ in schema["required"] + schema["optional"] + schema["outputs"]:
            if name not in named:
                missing.append(f"{page.name}: `{name}` (in the node's schema) is not named")
    assert missing == [], "\n".join(missing)
