"""Recovers from git history what the compatibility suite keeps frozen (run once per new shipped state; the
frozen files are checked in and never regenerated, since they stand for what users saved):

- workflows/<commit>/...: each distinct state of the shipped workflows/ folder, as of the commit that made it;
- schemas/<commit>.json: each distinct set of node schemas the pack has had (tests/schema_lock.py's form),
  read by loading the pack as of that commit into ComfyUI;
- prompts/<commit>/<name>.json: today's shipped API workflows as they are written against each earlier
  schema (the pack's nodes given only the inputs that schema had), where that differs from what is frozen
  already, the schema had every node the workflow uses, and each input left out is at its default (a
  workflow written against that schema could not ask for anything else).

    cd tests && COMFYUI_PATH=/path/to/ComfyUI python compat/freeze.py
"""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE.parent))  # tests/: schema_lock, and standalone for the dev kit's path
import standalone  # noqa: E402,F401


def git(*args: str) -> bytes:
    return subprocess.run(["git", "-C", str(REPO), *args], check=True, capture_output=True).stdout


def commits(*paths: str) -> list[str]:
    """Oldest first, each commit whose tree of `paths` differs from every earlier one's."""
    seen, result = set(), []
    for commit in reversed(git("log", "--format=%H", "--", *paths).decode().split()):
        trees = tuple(git("rev-parse", *(f"{commit}:{path}" for path in paths)).decode().split())
        if trees not in seen:
            seen.add(trees)
            result.append(commit)
    return result


def freeze_workflows() -> None:
    # Which commit first made a state depends on the history a run walks (a merge brings its branch's commits), so a
    # state frozen before is recognised by its files, not by its folder's name.
    frozen = [{path.relative_to(folder): path.read_bytes() for path in folder.rglob("*.json")}
              for folder in (HERE / "workflows").iterdir()]
    for commit in commits("workflows"):
        with tarfile.open(fileobj=io.BytesIO(git("archive", commit, "workflows"))) as archive:
            state = {Path(member.name).relative_to("workflows"): archive.extractfile(member).read()
                     for member in archive.getmembers() if member.isfile() and member.name.endswith(".json")}
        if state in frozen:
            continue
        frozen.append(state)
        for relative, content in state.items():
            path = HERE / "workflows" / commit[:10] / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)


def freeze_schemas() -> None:
    import schema_lock
    from dev.devkit import comfy_harness

    comfyui = comfy_harness.start()
    mappings = comfyui.nodes.NODE_CLASS_MAPPINGS
    current = {k: v for k, v in mappings.items() if k.startswith(schema_lock.PREFIX)}
    known = {path.stem: json.loads(path.read_text()) for path in (HERE / "schemas").glob("*.json")}
    scratch = Path(tempfile.mkdtemp(prefix="facediffuser-history-"))
    for commit in commits("nodes", "__init__.py"):
        pack = scratch / f"pack_{commit[:10]}"
        pack.mkdir()
        with tarfile.open(fileobj=io.BytesIO(git("archive", commit))) as archive:
            archive.extractall(pack, filter="data")
        for node_id in list(mappings):
            if node_id.startswith(schema_lock.PREFIX):
                del mappings[node_id]
        if not asyncio.run(comfyui.nodes.load_custom_node(str(pack))):
            print(f"{commit[:10]}: does not load here, skipped")
            continue
        schemas = schema_lock.pack_schemas(mappings)
        if schemas in known.values():
            continue
        # Files frozen before the lock held combo options gain the options of the first state they stand for: an option
        # a saved workflow could hold then must still be offered.
        name = next((stem for stem, frozen in known.items() if frozen == _without_options(schemas)), commit[:10])
        known[name] = schemas
        (HERE / "schemas").mkdir(exist_ok=True)
        (HERE / "schemas" / f"{name}.json").write_text(schema_lock.render(schemas))
    mappings.update(current)


def _without_options(schemas: dict) -> dict:
    return {node_id: {key: value for key, value in schema.items() if key != "options"} for node_id, schema in schemas.items()}


def prompt_for_schema(workflow: dict, schemas: dict, today: dict) -> dict | None:
    import schema_lock

    prompt = json.loads(json.dumps(workflow))
    for node in prompt.values():
        if not node["class_type"].startswith(schema_lock.PREFIX):
            continue
        if node["class_type"] not in schemas:
            return None
        schema = schemas[node["class_type"]]
        known = {entry[0] for entry in schema["required"] + schema["optional"]}
        defaults = {entry[0]: entry[2] for entry in today[node["class_type"]]["optional"] if len(entry) > 2}
        if any(name not in known and defaults.get(name, object()) != value for name, value in node["inputs"].items()):
            return None
        node["inputs"] = {name: value for name, value in node["inputs"].items() if name in known}
    return prompt


def _canonical(workflow: dict) -> str:
    return json.dumps(workflow, sort_keys=True)


def freeze_prompts() -> None:
    import schema_lock

    today = json.loads(schema_lock.LOCK_FILE.read_text())
    frozen = {_canonical(json.loads(path.read_text())) for path in HERE.glob("workflows/*/api/*.json")}
    for schemas_file in sorted((HERE / "schemas").glob("*.json")):
        schemas = json.loads(schemas_file.read_text())
        for shipped in sorted((REPO / "workflows" / "api").glob("*.json")):
            prompt = prompt_for_schema(json.loads(shipped.read_text()), schemas, today)
            if prompt is not None and _canonical(prompt) not in frozen:
                frozen.add(_canonical(prompt))
                target = HERE / "prompts" / schemas_file.stem / shipped.name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(json.dumps(prompt, indent=2) + "\n")


if __name__ == "__main__":
    freeze_workflows()
    freeze_schemas()
    freeze_prompts()
