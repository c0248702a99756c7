"""The shipped workflows: both formats parse and agree, the runner's overrides find their nodes in them
(plain tier); with ComfyUI, every node and widget value fits the real nodes, links type-check,
ComfyUI's own validation accepts the API files, and each API workflow runs end to end on tiny models."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import pytest

from in_process_runs import run_in_process
import workflow_builder
from facediffuser_client.api_workflow import is_link, reference_image_loaders, set_override


OUR_NODES = {
    "FaceDiffuserSDMLoader", "FaceDiffuserTDMLoader", "FaceDiffuserInsightFaceLoader", "FaceDiffuserEncodeReferenceFaces",
    "FaceDiffuserSubjectPrompt", "FaceDiffuserSNFSampler", "FaceDiffuserGuider", "FaceDiffuserSaliencyPreview",
    "FaceDiffuserStageSweep", "FaceDiffuserIdentityScore", "FaceDiffuserStageSweepGrid", "FaceDiffuserRegionLayout",
    "FaceDiffuserAutoRegions",
}
SWEEP = "facediffuser_stage_sweep"
REGIONS = "facediffuser_two_subjects_regions"
AUTO_REGIONS = "facediffuser_two_subjects_auto_regions"
NAMES = ("facediffuser_single_subject", "facediffuser_two_subjects", "facediffuser_custom_sampling", "facediffuser_official_pndm", SWEEP,
         REGIONS, AUTO_REGIONS)
REFERENCE_PHOTOS = {"facediffuser_single_subject": 1, "facediffuser_two_subjects": 2, "facediffuser_custom_sampling": 1,
                    "facediffuser_official_pndm": 1, SWEEP: 1, REGIONS: 2, AUTO_REGIONS: 2}


def ui_workflow(name: str) -> dict:
    return json.loads((workflow_builder.WORKFLOWS_DIR / f"{name}.json").read_text())


def api_workflow(name: str) -> dict:
    return json.loads((workflow_builder.API_DIR / f"{name}.json").read_text())


def test_ui_files_are_where_the_template_browser_looks_and_api_copies_beside_them():
    assert sorted(p.stem for p in workflow_builder.WORKFLOWS_DIR.glob("*.json")) == sorted(NAMES)
    assert sorted(p.stem for p in workflow_builder.API_DIR.glob("*.json")) == sorted(NAMES)
    for name in NAMES:
        assert {"nodes", "links", "version"} <= set(ui_workflow(name))
        assert all({"class_type", "inputs"} <= set(node) for node in api_workflow(name).values())


@pytest.mark.parametrize("name", NAMES)
def test_our_node_ids_are_the_packs(name):
    types = {node["type"] for node in ui_workflow(name)["nodes"]} | {node["class_type"] for node in api_workflow(name).values()}
    ours = {t for t in types if t.startswith("FaceDiffuser")}
    assert ours <= OUR_NODES and ours


@pytest.mark.parametrize("name", NAMES)
def test_ui_and_api_formats_describe_the_same_graph(name):
    ui, api = ui_workflow(name), api_workflow(name)
    nodes = {node["id"]: node for node in ui["nodes"] if node["type"] not in workflow_builder.FRONTEND_ONLY}
    assert {str(i) for i in nodes} == set(api)
    for node_id, node in nodes.items():
        assert api[str(node_id)]["class_type"] == node["type"]
    links = {link[0]: link for link in ui["links"]}
    assert len(links) == len(ui["links"]) and ui["last_link_id"] == max(links)
    api_links = {(node_id, name_): tuple(value) for node_id, node in api.items()
                 for name_, value in node["inputs"].items() if is_link(value)}
    ui_links = set()
    for link_id, source, source_slot, target, target_slot, _ in ui["links"]:
        target_input = nodes[target]["inputs"][target_slot]
        assert target_input["link"] == link_id
        assert link_id in nodes[source]["outputs"][source_slot]["links"]
        ui_links.add((str(target), target_input["name"]))
        assert api_links[(str(target), target_input["name"])] == (str(source), source_slot)
    assert ui_links == set(api_links)
    # every link an output lists exists, and every linked input is in the links table
    for node in nodes.values():
        assert all(link in links for output in node["outputs"] for link in output["links"] or [])
        assert all(slot["link"] is None or slot["link"] in links for slot in node["inputs"])


@pytest.mark.parametrize("name", NAMES)
def test_the_runners_overrides_find_their_nodes(name):
    workflow = api_workflow(name)
    for option, value in (("prompt", "a man <|image|>"), ("seed", 7), ("steps", 20), ("cfg", 4.0)):
        assert set_override(workflow, option, value)
    if name != SWEEP:  # the sweep's alphas and betas are lists, and it samples one picture per cell
        assert set_override(workflow, "alpha", 0.2) and set_override(workflow, "beta", 0.5)
    if name not in ("facediffuser_custom_sampling", SWEEP):
        assert set_override(workflow, "batch_size", 2)
    loaders = reference_image_loaders(workflow)
    assert len(loaders) == REFERENCE_PHOTOS[name]
    assert [workflow[i]["inputs"]["image"] for i in loaders] == list(workflow_builder.SUBJECT_PHOTOS[:len(loaders)])


# --- ComfyUI tier ------------------------------------------------------------------------------------------


def _without_unlinked_outputs(text: str) -> dict:
    """Newer ComfyUI versions give some nodes outputs they lacked (0.33's Save Image and Preview Image pass
    their images on); an unlinked output is rebuilt from the node's definition when the frontend loads a
    workflow, so the files need not list it to load on every supported version."""
    workflow = json.loads(text)
    for node in workflow.get("nodes", []):
        node["outputs"] = [output for output in node.get("outputs", []) if output.get("links")]
    return workflow


def test_files_are_what_the_builder_makes(comfyui, installed):
    for path, text in workflow_builder.render_all(comfyui.nodes.NODE_CLASS_MAPPINGS).items():
        assert _without_unlinked_outputs(path.read_text()) == _without_unlinked_outputs(text), (
            f"{path} is stale: regenerate with `python tests/support/workflow_builder.py`")


def _check_widget(node_type: str, name: str, spec, value):
    where = f"{node_type}.{name} = {value!r}"
    kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
    if isinstance(kind, list) or kind == "COMBO":
        assert value in (kind if isinstance(kind, list) else options["options"]), where
    elif kind == "INT":
        assert isinstance(value, int) and not isinstance(value, bool), where
        assert options.get("min", -math.inf) <= value <= options.get("max", math.inf), where
    elif kind == "FLOAT":
        assert isinstance(value, (int, float)) and not isinstance(value, bool), where
        assert options.get("min", -math.inf) <= value <= options.get("max", math.inf), where
    elif kind == "STRING":
        assert isinstance(value, str), where
    elif kind == "BOOLEAN":
        assert isinstance(value, bool), where
    else:
        raise AssertionError(f"{where}: {kind} is not a widget type")


@pytest.mark.parametrize("name", NAMES)
def test_ui_widgets_and_links_fit_the_nodes(comfyui, installed, name):
    mappings = comfyui.nodes.NODE_CLASS_MAPPINGS
    ui = ui_workflow(name)
    nodes = {node["id"]: node for node in ui["nodes"]}
    for node in ui["nodes"]:
        if node["type"] in workflow_builder.FRONTEND_ONLY:
            continue
        assert node["type"] in mappings, f"{node['type']} is not a node of this ComfyUI"
        spec = {**mappings[node["type"]].INPUT_TYPES().get("required", {}), **mappings[node["type"]].INPUT_TYPES().get("optional", {})}
        values = list(node["widgets_values"])
        for input_name, input_spec in spec.items():
            kind, options = input_spec[0], (input_spec[1] if len(input_spec) > 1 else {})
            if not (isinstance(kind, list) or kind in workflow_builder.WIDGET_TYPES):
                continue
            assert values, f"{node['type']}: no widget value left for {input_name}"
            _check_widget(node["type"], input_name, input_spec, values.pop(0))
            if options.get("control_after_generate"):
                assert values.pop(0) in ("fixed", "increment", "decrement", "randomize")
            if options.get("image_upload"):
                assert values.pop(0) == "image"
        assert values == [], f"{node['type']}: widget values left over: {values}"
        # sockets: every required one is linked, each link's type fits both ends
        linked = {slot["name"] for slot in node["inputs"] if slot["link"] is not None}
        sockets = {slot.name: slot for slot in workflow_builder.node_inputs(mappings[node["type"]], linked) if not slot.widget}
        assert [slot["name"] for slot in node["inputs"]] == list(sockets)
        required = mappings[node["type"]].INPUT_TYPES().get("required", {})
        for slot in node["inputs"]:
            if slot["link"] is None:
                assert slot["name"].split(".")[0] not in required, f"{node['type']}.{slot['name']} is required but unlinked"
                continue
            (link,) = [link for link in ui["links"] if link[0] == slot["link"]]
            source = nodes[link[1]]
            source_type = mappings[source["type"]].RETURN_TYPES[link[2]]
            assert link[5] == source_type == sockets[slot["name"]].type == slot["type"], (node["type"], slot["name"], link)


@pytest.mark.parametrize("name", NAMES)
def test_comfyui_accepts_the_api_workflows(comfyui, installed, name):
    import execution

    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt("check", api_workflow(name), None))
    assert valid, (error, node_errors)
    assert outputs


@pytest.mark.parametrize("name", NAMES)
def test_each_api_workflow_runs_on_tiny_models(comfyui, installed, name):
    from PIL import Image

    import tiny_install

    outputs = run_in_process(comfyui, tiny_install.small_api_workflow(name))
    saved = [image for output in outputs.values() for image in output.get("images", []) if image["type"] == "output"]
    assert len(saved) == 1
    picture = Image.open(Path(installed) / "output" / saved[0]["subfolder"] / saved[0]["filename"])
    if name == SWEEP:  # the grid of its two 64x64 cells, with margins
        assert picture.size[0] > 2 * 64 and 64 < picture.size[1] < 2 * 64
    else:
        assert picture.size == (64, 64)
    previews = [image for output in outputs.values() for image in output.get("images", []) if image["type"] == "temp"]
    assert len(previews) >= REFERENCE_PHOTOS[name]  # the face crops (and the saliency maps)
    if name == SWEEP:  # the Identity Score's results for the two cells
        (identity,) = [output["facediffuser_identity"] for output in outputs.values() if "facediffuser_identity" in output]
        assert [entry["batch_index"] for entry in identity] == [0, 1] and all(len(entry["subjects"]) == 1 for entry in identity)


def test_right_after_the_setup_without_convert_the_templates_take_the_bin_files(comfyui, installed, monkeypatch):
    """The templates name the .safetensors conversions; the set-up without --convert leaves the .bin downloads. ComfyUI's
    own check refused the templates ("value not in list") on both loaders; the loaders take either format."""
    import execution
    import folder_paths
    import safetensors.torch
    import torch

    models = Path(installed) / "models" / "facediffuser"
    only_bin = Path(installed) / "only_bin"
    only_bin.mkdir(exist_ok=True)
    for name in (workflow_builder.SDM_FILE, workflow_builder.TDM_FILE):
        torch.save(safetensors.torch.load_file(str(models / name)), only_bin / Path(name).with_suffix(".bin").name)
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "facediffuser", ([str(only_bin)], {".bin", ".safetensors"}))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    for name in NAMES:
        valid, error, _, node_errors = asyncio.run(execution.validate_prompt("check", api_workflow(name), None))
        assert valid, (name, error, node_errors)
    assert comfyui.run("FaceDiffuserTDMLoader", ckpt_name=workflow_builder.TDM_FILE)[0] is not None

    missing = api_workflow(NAMES[0])
    missing["2"]["inputs"]["ckpt_name"] = "someone_else.safetensors"
    valid, _, _, node_errors = asyncio.run(execution.validate_prompt("check", missing, None))
    assert not valid
    assert "Face-diffuser SDM Loader: checkpoint 'someone_else.safetensors' not found" in json.dumps(node_errors)
    assert "python scripts/facediffuser_setup.py" in json.dumps(node_errors)
