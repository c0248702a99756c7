"""The pack's node schemas against the checked-in lock (tests/compat/schema_lock.json) and against every schema the pack
has had (tests/compat/schemas, recovered from git history): a change fails here until it is made on purpose, and
no change may break a workflow saved against an earlier version."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import schema_lock

HISTORY = sorted((Path(__file__).resolve().parent / "schemas").glob("*.json"))
REGENERATE = "cd tests && COMFYUI_PATH=/path/to/ComfyUI python support/schema_lock.py"


def incompatibilities(old: dict, new: dict) -> list[str]:
    """What a workflow saved against the `old` schemas would meet in the `new` ones."""
    problems = []
    for node_id, before in old.items():
        if node_id not in new:
            problems.append(f"{node_id}: removed (saved workflows name it; keep the id or load it under a replacement)")
            continue
        after = new[node_id]
        types_after = {entry[0]: entry[1] for entry in after["required"] + after["optional"]}
        names_before = set()
        for name, kind, *_ in before["required"] + before["optional"]:
            names_before.add(name)
            if types_after.get(name) != kind:
                problems.append(f"{node_id}.{name}: was {kind}, now {types_after.get(name, 'gone')}")
        problems += [f"{node_id}.{name}: required, but saved workflows lack it (make it optional with the old behaviour "
                     "as its default)" for name, *_ in after["required"] if name not in names_before]
        for name, options in before.get("options", {}).items():
            gone = [option for option in options if option not in after.get("options", {}).get(name, [])]
            if gone:
                problems.append(f"{node_id}.{name}: options {gone} removed (saved workflows hold the option they were saved "
                                "with: keep it, or read it as the option that replaces it)")
        if after["outputs"][:len(before["outputs"])] != before["outputs"]:
            problems.append(f"{node_id}: outputs {before['outputs']} became {after['outputs']} (links name outputs by index: "
                            "add new outputs at the end)")
    return problems


def test_the_schemas_are_the_locked_ones(comfyui):
    current = schema_lock.pack_schemas(comfyui.nodes.NODE_CLASS_MAPPINGS)
    locked = json.loads(schema_lock.LOCK_FILE.read_text())
    assert current == locked, (
        "The pack's node schemas differ from tests/compat/schema_lock.json. If the change is deliberate and compatible "
        f"(test_no_schema_the_pack_had_is_broken passes), regenerate the lock with `{REGENERATE}` and add a note "
        "to CHANGELOG.md")


@pytest.mark.parametrize("history", HISTORY, ids=[path.stem for path in HISTORY])
def test_no_schema_the_pack_had_is_broken(comfyui, history):
    current = schema_lock.pack_schemas(comfyui.nodes.NODE_CLASS_MAPPINGS)
    assert incompatibilities(json.loads(history.read_text()), current) == []


@pytest.mark.slow  # 8.7 s here
def test_the_regeneration_command_writes_the_lock(comfyui, tmp_path):
    """The documented command, run as a process against the same ComfyUI, writing beside the lock instead."""
    import subprocess
    import sys

    tests = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "support/schema_lock.py", str(tmp_path / "lock.json")], cwd=tests, check=True, capture_output=True,
                   timeout=600)
    assert (tmp_path / "lock.json").read_text() == schema_lock.LOCK_FILE.read_text()


def test_the_history_covers_the_shipped_nodes():
    assert len(HISTORY) >= 7
    assert set(json.loads(HISTORY[-1].read_text())) <= set(json.loads(schema_lock.LOCK_FILE.read_text()))


def test_incompatible_changes_are_found():
    node = {"required": [["steps", "INT"]], "optional": [["denoise", "FLOAT", 1.0]], "outputs": [["LATENT", "LATENT"]]}
    old = {"N": node}
    assert incompatibilities(old, old) == []
    grown = {"N": {**node, "optional": node["optional"] + [["noise", "COMBO", "comfyui"]],
                   "outputs": node["outputs"] + [["saliency", "S"]]}}
    assert incompatibilities(old, grown) == []
    assert "required" in incompatibilities(old, {"N": {**node, "required": node["required"] + [["noise", "COMBO"]]}})[0]
    assert "outputs" in incompatibilities(old, {"N": {**node, "outputs": [["saliency", "S"], ["LATENT", "LATENT"]]}})[0]
    assert "was FLOAT" in incompatibilities(old, {"N": {**node, "optional": []}})[0]
    assert "removed" in incompatibilities(old, {})[0]
    combo = {"N": {**node, "options": {"layout": ["halves", "thirds"]}}}
    assert incompatibilities(combo, {"N": {**node, "options": {"layout": ["halves", "thirds", "boxes"]}}}) == []
    assert "['thirds'] removed" in incompatibilities(combo, {"N": {**node, "options": {"layout": ["halves"]}}})[0]


def test_the_lock_holds_the_packs_own_combo_options_only():
    """A removed option of the pack's breaks the workflows saved with it; ComfyUI's samplers and schedulers, which differ
    between its versions, are not the pack's to lock, but the sampler the pack adds is."""
    locked = json.loads(schema_lock.LOCK_FILE.read_text())
    assert locked["FaceDiffuserRegionLayout"]["options"]["layout"] == ["halves", "thirds", "boxes"]
    assert locked["FaceDiffuserSNFSampler"]["options"] == {"sampler_name": ["pndm_official"], "scheduler": ["pndm_official"],
                                                        "noise": ["comfyui", "official"], "outside_regions": ["snf", "tdm"]}
    assert "options" not in locked["FaceDiffuserSaliencyPreview"]
