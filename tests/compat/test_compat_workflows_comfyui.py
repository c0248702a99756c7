"""Saved workflows keep working: every state of the shipped workflows (tests/compat/workflows/<commit>, in API and
UI format) and today's API workflows as written against earlier node schemas (tests/compat/prompts/<commit>),
frozen from git history by tests/compat/freeze.py, validate, run on tiny models and give the same latents as
today's shipped workflow of the same name. UI files are turned into prompts as the frontend does: widget values
by position onto today's widgets, the missing ones at their defaults."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import workflow_builder
from in_process_runs import run_in_process

COMPAT = Path(__file__).resolve().parent
API_FILES = sorted(COMPAT.glob("workflows/*/api/*.json")) + sorted(COMPAT.glob("prompts/*/*.json"))
UI_FILES = sorted(COMPAT.glob("workflows/*/*.json"))
_latents: dict[str, list[torch.Tensor]] = {}


def _ids(paths):
    return [str(path.relative_to(COMPAT)) for path in paths]


def ui_to_prompt(ui: dict, mappings: dict) -> dict:
    links = {link[0]: link for link in ui["links"]}
    prompt = {}
    for node in ui["nodes"]:
        if node["type"] in workflow_builder.FRONTEND_ONLY:
            continue
        assert node.get("mode", 0) == 0, node
        node_class = mappings[node["type"]]
        inputs = {}
        for slot in node["inputs"]:
            if slot["link"] is not None:
                _, source, source_slot, _, _, kind = links[slot["link"]]
                assert node_class_output_type(mappings, ui, source, source_slot) == kind, (node["type"], slot["name"])
                inputs[slot["name"]] = [str(source), source_slot]
        values = list(node["widgets_values"])
        for slot in workflow_builder.node_inputs(node_class, set(inputs)):
            if not slot.widget:
                continue
            inputs[slot.name] = values.pop(0) if values else workflow_builder.widget_value(node["type"], slot, {})
            for extra in ("control_after_generate", "image_upload"):
                if slot.options.get(extra) and values:
                    values.pop(0)
        assert values == [], f"{node['type']}: widget values left over: {values}"
        prompt[str(node["id"])] = {"inputs": inputs, "class_type": node["type"]}
    return prompt


def node_class_output_type(mappings: dict, ui: dict, node_id: int, slot: int) -> str:
    (source,) = [node for node in ui["nodes"] if node["id"] == node_id]
    return mappings[source["type"]].RETURN_TYPES[slot]


def latents_of(comfyui, installed_root: Path, prompt: dict) -> list[torch.Tensor]:
    """The LATENTs that the prompt's VAE Decode nodes decode, run at a tiny size; each distinct prompt runs once."""
    import safetensors.torch
    import tiny_install

    prompt = tiny_install.shrink(json.loads(json.dumps(prompt)))
    key = json.dumps(prompt, sort_keys=True)
    if key not in _latents:
        decoders = sorted((node_id for node_id, node in prompt.items() if node["class_type"] == "VAEDecode"), key=int)
        assert decoders
        for index, node_id in enumerate(decoders):
            prompt[f"compat_{index}"] = {"class_type": "SaveLatent",
                                         "inputs": {"samples": prompt[node_id]["inputs"]["samples"], "filename_prefix": "compat"}}
        outputs = run_in_process(comfyui, prompt)
        _latents[key] = []
        for index in range(len(decoders)):
            (saved,) = outputs[f"compat_{index}"]["latents"]
            path = installed_root / "output" / saved["subfolder"] / saved["filename"]
            _latents[key].append(safetensors.torch.load_file(str(path))["latent_tensor"])
    return _latents[key]


def today(comfyui, installed_root: Path, name: str) -> list[torch.Tensor]:
    return latents_of(comfyui, installed_root, json.loads((workflow_builder.API_DIR / name).read_text()))


def assert_same_latents(got: list[torch.Tensor], expected: list[torch.Tensor]):
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_every_shipped_state_and_schema_is_frozen():
    states = {path.parent.name for path in COMPAT.glob("workflows/*/*.json")}
    assert len(states) >= 11  # the distinct states of workflows/ in git history up to 0.2.0
    assert {path.name for path in API_FILES} == {path.name for path in workflow_builder.API_DIR.glob("*.json")}
    assert any("noise" not in node["inputs"] for path in API_FILES for node in json.loads(path.read_text()).values()
               if node["class_type"] == "FaceDiffuserSNFSampler")


@pytest.mark.parametrize("path", API_FILES, ids=_ids(API_FILES))
def test_a_saved_api_workflow_runs_and_gives_todays_latent(comfyui, installed, path):
    assert_same_latents(latents_of(comfyui, installed, json.loads(path.read_text())), today(comfyui, installed, path.name))


@pytest.mark.parametrize("path", UI_FILES, ids=_ids(UI_FILES))
def test_a_saved_ui_workflow_loads_runs_and_gives_todays_latent(comfyui, installed, path):
    prompt = ui_to_prompt(json.loads(path.read_text()), comfyui.nodes.NODE_CLASS_MAPPINGS)
    assert_same_latents(latents_of(comfyui, installed, prompt), today(comfyui, installed, path.name))


def test_a_number_in_noise_is_the_denoise_of_a_workflow_from_before_noise(comfyui, installed):
    """The frontend's reading of a pre-`noise` UI workflow, by hand: its denoise lands in `noise`."""
    workflow = json.loads((workflow_builder.API_DIR / "facediffuser_single_subject.json").read_text())
    (sampler,) = [node for node in workflow.values() if node["class_type"] == "FaceDiffuserSNFSampler"]
    sampler["inputs"].update(denoise=0.5, noise="comfyui")
    expected = latents_of(comfyui, installed, workflow)
    sampler["inputs"].update(denoise=1.0, noise=0.5)
    assert_same_latents(latents_of(comfyui, installed, workflow), expected)
    sampler["inputs"].update(denoise=0.7, noise=0.5)
    with pytest.raises(AssertionError, match="FaceDiffuserSNFSampler"):
        latents_of(comfyui, installed, workflow)
    with pytest.raises(ValueError, match="SNF Sampler: noise is 0.5 and denoise 0.7; .* denoise must be left at 1"):
        comfyui.run("FaceDiffuserSNFSampler", noise=0.5, denoise=0.7, **{name: None for name in (
            "tdm", "sdm", "augmented", "text", "null", "latent_image", "seed", "steps", "cfg", "sampler_name", "scheduler",
            "alpha", "beta")})
    assert comfyui.node("FaceDiffuserSNFSampler").validate_inputs(noise="random") == "noise is 'random': choose one of comfyui, official"
