"""Plain tier: classifying official checkpoints, configs read from shapes, the SD1.5 key map and the converter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from dev.devkit import official_checkpoints as oc
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from facediffuser_core import checkpoint, convert, sd15_keys
from facediffuser_core.checkpoint import CheckpointKind
from facediffuser_core.checkpoint_file import CheckpointFileError, read_state_dict

PACK_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def real_size():
    return oc.real_size_references()


def kind_of(state_dict):
    return checkpoint.classify(state_dict).kind


# ------------------------------------------------------------------------------------ classification


def test_official_layouts_are_recognised(tdm, sdm):
    sdm_state = oc.official_state_dict(sdm)
    assert kind_of(sdm_state) is CheckpointKind.SDM
    assert "FastComposer" in checkpoint.classify(sdm_state).description
    assert kind_of({k: v for k, v in sdm_state.items() if not k.startswith("vae.")}) is CheckpointKind.SDM
    tdm_state = oc.official_state_dict(tdm)
    assert kind_of(tdm_state) is CheckpointKind.TDM
    converted = sd15_keys.parts_to_sd15(checkpoint.split_official(tdm_state))
    assert kind_of(converted) is CheckpointKind.SD15


@pytest.mark.parametrize(
    "state_dict, words",
    [
        ({}, "empty"),
        ({"conditioner.embedders.0.transformer.text_model.x": torch.zeros(1), "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, "SDXL"),
        ({"cond_stage_model.model.token_embedding.weight": torch.zeros(1), "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, "SD2"),
        ({"lora_unet_down_blocks_0.lora_down.weight": torch.zeros(1)}, "LoRA"),
        ({"conv_in.weight": torch.zeros(1), "down_blocks.0.resnets.0.conv1.weight": torch.zeros(1)}, "bare diffusers UNet"),
        ({"input_blocks.0.0.weight": torch.zeros(1)}, "bare UNet"),
        ({"unet.conv_in.weight": torch.zeros(1), "text_encoder.final_layer_norm.weight": torch.zeros(1)}, "truncated"),
        ({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, "without cond_stage_model"),
        ({"foo.weight": torch.zeros(1)}, "foo"),
    ],
)
def test_other_files_are_described(state_dict, words):
    found = checkpoint.classify(state_dict)
    assert found.kind is CheckpointKind.OTHER
    assert words in found.description


def test_split_strips_prefixes_drops_buffers_and_empties_the_source(sdm):
    state = oc.official_state_dict(sdm)
    parts = checkpoint.split_official(state)
    assert state == {}
    assert set(parts.unet) == set(sdm.unet.state_dict())
    # transformers' CLIPTextModel names may or may not carry the text_model level; the split always does.
    text_keys = {"text_model." + k.removeprefix("text_model.") for k in sdm.text_encoder.state_dict() if not k.endswith("position_ids")}
    assert set(parts.text_encoder) == text_keys
    assert set(parts.image_encoder) == {k for k in sdm.image_encoder.state_dict() if not k.endswith("position_ids")}
    assert set(parts.vae) == set(sdm.vae.state_dict())
    assert set(parts.postfuse) == set(sdm.postfuse.state_dict())
    with pytest.raises(ValueError, match="unexpected key 'extra.weight'"):
        checkpoint.split_official({"unet.conv_in.weight": torch.zeros(1), "extra.weight": torch.zeros(1)})


# --------------------------------------------------------------------------------- configs from shapes


def test_tiny_configs_match_the_reference_configs(sdm):
    parts = checkpoint.split_official(oc.official_state_dict(sdm))
    unet = sdm.unet.config
    assert checkpoint.unet_config(parts.unet) == {
        "use_checkpoint": False, "image_size": 32, "out_channels": unet.out_channels, "use_spatial_transformer": True,
        "legacy": False, "adm_in_channels": None, "in_channels": unet.in_channels, "model_channels": 32,
        "num_res_blocks": [1, 1], "transformer_depth": [1, 0], "channel_mult": [1, 2], "transformer_depth_middle": 1,
        "use_linear_in_transformer": False, "context_dim": unet.cross_attention_dim, "num_heads": 8,
        "transformer_depth_output": [1, 1, 0, 0],
        "use_temporal_attention": False, "use_temporal_resblock": False,
    }
    text = sdm.text_encoder.config
    derived = checkpoint.clip_text_config(parts.text_encoder)
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings", "hidden_act"):
        assert derived[name] == getattr(text, name), name
    vision = sdm.image_encoder.config
    derived = checkpoint.clip_vision_config(parts.image_encoder)
    for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size", "image_size", "projection_dim", "hidden_act"):
        assert derived[name] == getattr(vision, name), name
    vae = checkpoint.vae_config(parts.vae)
    assert vae["ddconfig"]["ch"] == 32 and vae["ddconfig"]["ch_mult"] == [1, 1, 1, 1]
    assert vae["ddconfig"]["num_res_blocks"] == sdm.vae.config.layers_per_block
    assert vae["ddconfig"]["z_channels"] == vae["embed_dim"] == sdm.vae.config.latent_channels


def test_real_size_configs_are_sd15_clip_l_and_vit_l(real_size):
    parts = checkpoint.split_official(dict(oc.official_items(real_size)))
    # ComfyUI's SD15 entry in comfy/model_detection.py, without dtype.
    assert checkpoint.unet_config(parts.unet) == {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
        "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
        "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
        "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        "use_temporal_attention": False, "use_temporal_resblock": False,
    }
    text = checkpoint.clip_text_config(parts.text_encoder)
    assert (text["hidden_size"], text["num_hidden_layers"], text["num_attention_heads"], text["intermediate_size"]) == (768, 12, 12, 3072)
    assert (text["vocab_size"], text["max_position_embeddings"]) == (49408, 77)
    vision = checkpoint.clip_vision_config(parts.image_encoder)
    assert (vision["hidden_size"], vision["num_hidden_layers"], vision["num_attention_heads"], vision["intermediate_size"]) == (1024, 24, 16, 4096)
    assert (vision["patch_size"], vision["image_size"], vision["projection_dim"]) == (14, 224, 768)
    # ComfyUI's default SD1.x VAE ddconfig (comfy/sd.py)
    assert checkpoint.vae_config(parts.vae) == {
        "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                     "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0},
        "embed_dim": 4,
    }


# ------------------------------------------------------------------------------------ SD1.5 key map


@pytest.mark.parametrize("size", ["tiny", "real"])
def test_sd15_key_map_agrees_with_diffusers_converters_and_inverts(size, tdm, real_size):
    refs = tdm if size == "tiny" else real_size
    parts = checkpoint.split_official(dict(oc.official_items(refs)))
    single_file = sd15_keys.parts_to_sd15(parts)
    # diffusers' own LDM -> diffusers converters are the independent reference for the UNet and VAE names.
    unet_back = convert_ldm_unet_checkpoint(dict(single_file), dict(refs.unet.config))
    assert set(unet_back) == set(parts.unet)
    vae_ldm = {k.removeprefix("first_stage_model."): v for k, v in single_file.items() if k.startswith("first_stage_model.")}
    vae_back = convert_ldm_vae_checkpoint(vae_ldm, dict(refs.vae.config))
    assert set(vae_back) == set(parts.vae)
    text = {k.removeprefix("cond_stage_model.transformer."): v for k, v in single_file.items() if k.startswith("cond_stage_model.transformer.")}
    assert set(text) == set(parts.text_encoder)
    if size == "tiny":
        assert all(torch.equal(unet_back[k], parts.unet[k]) for k in parts.unet)
        assert all(torch.equal(vae_back[k].reshape(parts.vae[k].shape), parts.vae[k]) for k in parts.vae)
    round_trip = sd15_keys.sd15_to_parts(dict(single_file))
    for name in ("unet", "text_encoder", "vae"):
        original, back = getattr(parts, name), getattr(round_trip, name)
        assert set(back) == set(original), name
        assert all(back[k].shape == original[k].shape for k in original), name


def test_legacy_vae_attention_names_convert_like_the_current_ones(tdm):
    parts = checkpoint.split_official(oc.official_state_dict(tdm))
    legacy = {"to_q.": "query.", "to_k.": "key.", "to_v.": "value.", "to_out.0.": "proj_attn."}
    old_vae = {}
    for key, tensor in parts.vae.items():
        for new, old in legacy.items():
            key = key.replace(f"attentions.0.{new}", f"attentions.0.{old}")
        old_vae[key] = tensor
    assert any(".query." in key for key in old_vae)
    modern = sd15_keys.parts_to_sd15(parts)
    parts.vae = old_vae
    assert sd15_keys.parts_to_sd15(parts).keys() == modern.keys()


# ------------------------------------------------------------------------------------------- files


def test_read_state_dict_errors(tmp_path, tdm):
    missing = tmp_path / "nowhere" / "tdm.bin"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        read_state_dict(missing)
    good = oc.write_checkpoint(oc.official_state_dict(tdm), tmp_path / "tdm.bin")
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointFileError, match="truncated or corrupt, re-download"):
        read_state_dict(truncated)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointFileError, match="truncated or corrupt, re-download"):
        read_state_dict(broken)
    objects = tmp_path / "objects.bin"
    torch.save({"weights": torch.nn.Linear(2, 2)}, objects)
    with pytest.raises(CheckpointFileError, match="other than tensors"):
        read_state_dict(objects)


def test_legacy_torch_format_loads_without_mmap(tmp_path):
    path = tmp_path / "legacy.bin"
    torch.save({"a": torch.arange(4.0)}, path, _use_new_zipfile_serialization=False)
    assert torch.equal(read_state_dict(path)["a"], torch.arange(4.0))


# -------------------------------------------------------------------------------------- converter


def test_tdm_converts_to_an_sd15_single_file(tmp_path, tdm):
    official = oc.official_state_dict(tdm)
    source = oc.write_checkpoint(official, tmp_path / "tdm.bin")
    target = tmp_path / "tdm.safetensors"
    result = convert.convert(source, target, torch.float32)
    assert result.kind is CheckpointKind.TDM
    written = safetensors.torch.load_file(str(target))
    expected = sd15_keys.parts_to_sd15(checkpoint.split_official(oc.official_state_dict(tdm)))
    assert written.keys() == expected.keys()
    assert all(torch.equal(written[k], expected[k]) for k in expected)
    assert kind_of(written) is CheckpointKind.SD15
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sdm_keeps_the_official_layout_retyped(tmp_path, sdm, dtype):
    official = oc.official_state_dict(sdm)
    source = oc.write_checkpoint(official, tmp_path / "sdm.bin")
    target = tmp_path / "sdm.safetensors"
    convert.convert(source, target, dtype)
    written = safetensors.torch.load_file(str(target))
    assert written.keys() == {k for k in official if not k.endswith("position_ids")}
    assert all(written[k].dtype == dtype and torch.equal(written[k], official[k].to(dtype)) for k in written)


def test_converter_refuses_bad_requests(tmp_path, tdm):
    source = oc.write_checkpoint(oc.official_state_dict(tdm), tmp_path / "tdm.bin")
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert.convert(source, target, torch.float16)
    assert target.read_bytes() == b"keep me"
    convert.convert(source, target, torch.float16, overwrite=True)
    assert kind_of(safetensors.torch.load_file(str(target))) is CheckpointKind.SD15
    unet_only = oc.write_checkpoint({k: v for k, v in oc.official_state_dict(tdm).items() if k.startswith("unet.")}, tmp_path / "unet.bin")
    with pytest.raises(ValueError, match="incomplete official-layout file"):
        convert.convert(unet_only, tmp_path / "unet.safetensors", torch.float16)
    with pytest.raises(ValueError, match=r"\.safetensors"):
        convert.convert(source, tmp_path / "out.ckpt", torch.float16)


def test_command_line(tmp_path, tdm, caplog):
    source = oc.write_checkpoint(oc.official_state_dict(tdm), tmp_path / "tdm.bin")
    target = tmp_path / "tdm.safetensors"
    arguments = [str(source), str(target), "--dtype", "fp16"]
    done = subprocess.run([sys.executable, "-m", "facediffuser_core.convert", *arguments], cwd=PACK_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "100%" in done.stderr and "verifying" in done.stderr
    assert convert.main(arguments) == 1
    assert "--overwrite" in caplog.text
    absent = tmp_path / "absent.bin"
    assert convert.main([str(absent), str(tmp_path / "other.safetensors"), "--dtype", "fp16"]) == 1
    assert f"input checkpoint not found: {absent}" in caplog.text
