"""ComfyUI tier: the SDM/TDM loaders against the diffusers/transformers modules the tiny checkpoints were
made from, the converter's output in ComfyUI, and the loaders' errors."""

from __future__ import annotations

import os
import re

import pytest
import torch
import torch.nn.functional as F

from dev.devkit import official_checkpoints as oc
from facediffuser_core import checkpoint, convert, sd15_keys

TOLERANCE = 1e-4


@pytest.fixture
def models_dir(comfyui, tmp_path):
    """A models/facediffuser folder for this test only."""
    import folder_paths

    folder = tmp_path / "facediffuser"
    folder.mkdir()
    folder_paths.add_model_folder_path("facediffuser", str(folder))
    yield folder
    folder_paths.folder_names_and_paths["facediffuser"][0].remove(str(folder))


def unet_inputs():
    generator = torch.Generator().manual_seed(7)
    return torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([999.0, 250.0]), torch.randn(2, 77, oc.HIDDEN, generator=generator)


def unet_output(model, x, t, context):
    with torch.no_grad():
        return model.model.diffusion_model(x, timesteps=t, context=context).float()


def assert_unet_matches(model, reference):
    x, t, context = unet_inputs()
    with torch.no_grad():
        expected = reference(x, t, encoder_hidden_states=context).sample
    torch.testing.assert_close(unet_output(model, x, t, context), expected, atol=TOLERANCE, rtol=TOLERANCE)


def encode_prompt(clip, prompt="a photo of a man and a woman in a cafe"):
    tokens = clip.tokenize(prompt)
    ids = torch.tensor([[token for token, _ in chunk] for chunk in tokens["l"]])
    return ids, clip.encode_from_tokens(tokens).float()


def assert_clip_matches(clip, reference):
    ids, hidden = encode_prompt(clip)
    with torch.no_grad():
        expected = reference(input_ids=ids).last_hidden_state
    torch.testing.assert_close(hidden, expected, atol=TOLERANCE, rtol=TOLERANCE)


def assert_vae_matches(vae, reference):
    generator = torch.Generator().manual_seed(3)
    latent = torch.randn(1, 4, 8, 8, generator=generator)
    pixels = torch.rand(1, 64, 64, 3, generator=generator)
    with torch.no_grad():
        decoded = ((reference.decode(latent).sample + 1) / 2).clamp(0, 1).movedim(1, -1)
        encoded = reference.encode(pixels.movedim(-1, 1) * 2 - 1).latent_dist.mean
    torch.testing.assert_close(vae.decode(latent).float(), decoded, atol=TOLERANCE, rtol=TOLERANCE)
    torch.testing.assert_close(vae.encode(pixels).float(), encoded, atol=TOLERANCE, rtol=TOLERANCE)


def spec_postfuse(weights, text, face):
    """SPEC.md: postfuse(t, e) = layer_norm(mlp2(mlp1(concat[t, e]) + t))."""
    def layer_norm(x, name):
        return F.layer_norm(x, x.shape[-1:], weights[f"{name}.weight"], weights[f"{name}.bias"])

    def linear(x, name):
        return F.linear(x, weights[f"{name}.weight"], weights[f"{name}.bias"])

    hidden = linear(F.gelu(linear(layer_norm(torch.cat([text, face], -1), "mlp1.layernorm"), "mlp1.fc1")), "mlp1.fc2") + text
    hidden = hidden + linear(F.gelu(linear(layer_norm(hidden, "mlp2.layernorm"), "mlp2.fc1")), "mlp2.fc2")
    return layer_norm(hidden, "layer_norm")


def test_tdm_loader_matches_the_reference_modules(comfyui, models_dir, tdm):
    oc.write_checkpoint(oc.official_state_dict(tdm), models_dir / "facediffuser_tdm.bin")
    model, clip, vae = comfyui.run("FaceDiffuserTDMLoader", ckpt_name="facediffuser_tdm.bin", weight_dtype="fp32")
    assert_unet_matches(model, tdm.unet)
    assert_clip_matches(clip, tdm.text_encoder)
    assert_vae_matches(vae, tdm.vae)


def test_sdm_loader_matches_the_reference_modules(comfyui, models_dir, sdm):
    oc.write_checkpoint(oc.official_state_dict(sdm), models_dir / "facediffuser_sdm.safetensors")
    model, clip, vae, encoder = comfyui.run("FaceDiffuserSDMLoader", ckpt_name="facediffuser_sdm.safetensors", weight_dtype="fp32")
    assert_unet_matches(model, sdm.unet)
    assert_clip_matches(clip, sdm.text_encoder)
    assert_vae_matches(vae, sdm.vae)
    pixels = torch.randn(2, 3, oc.VISION_IMAGE_SIZE, oc.VISION_IMAGE_SIZE, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = sdm.image_encoder(pixel_values=pixels).image_embeds
    torch.testing.assert_close(encoder.embed(pixels), expected, atol=TOLERANCE, rtol=TOLERANCE)
    _, hidden = encode_prompt(clip)
    faces = torch.randn(hidden.shape[1], oc.HIDDEN, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        fused = encoder.postfuse(hidden[0], faces)
        expected = spec_postfuse(sdm.postfuse.state_dict(), hidden[0], faces)
    torch.testing.assert_close(fused, expected, atol=TOLERANCE, rtol=TOLERANCE)


def test_default_dtype_loads_close_to_the_references(comfyui, models_dir, sdm):
    """With ComfyUI's own dtype choice (fp16 text and vision towers on CPU) outputs stay close."""
    oc.write_checkpoint(oc.official_state_dict(sdm), models_dir / "sdm.bin")
    _, clip, _, encoder = comfyui.run("FaceDiffuserSDMLoader", ckpt_name="sdm.bin", weight_dtype="default")
    ids, hidden = encode_prompt(clip)
    pixels = torch.randn(1, 3, oc.VISION_IMAGE_SIZE, oc.VISION_IMAGE_SIZE, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected_hidden = sdm.text_encoder(input_ids=ids).last_hidden_state
        expected_embeds = sdm.image_encoder(pixel_values=pixels).image_embeds
    torch.testing.assert_close(hidden, expected_hidden, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(encoder.embed(pixels), expected_embeds, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("kind", ["tdm", "sdm"])
def test_converted_files_load_to_the_same_models(comfyui, models_dir, tdm, sdm, kind):
    refs = tdm if kind == "tdm" else sdm
    node = "FaceDiffuserTDMLoader" if kind == "tdm" else "FaceDiffuserSDMLoader"
    source = oc.write_checkpoint(oc.official_state_dict(refs), models_dir / f"{kind}.bin")
    convert.convert(source, models_dir / f"{kind}_fp32.safetensors", torch.float32)
    convert.convert(source, models_dir / f"{kind}_fp16.safetensors", torch.float16)
    original = comfyui.run(node, ckpt_name=f"{kind}.bin", weight_dtype="fp32")
    exact = comfyui.run(node, ckpt_name=f"{kind}_fp32.safetensors", weight_dtype="fp32")
    half = comfyui.run(node, ckpt_name=f"{kind}_fp16.safetensors", weight_dtype="fp32")
    inputs = unet_inputs()
    reference = unet_output(original[0], *inputs)
    assert torch.equal(unet_output(exact[0], *inputs), reference)
    torch.testing.assert_close(unet_output(half[0], *inputs), reference, atol=2e-2, rtol=2e-2)
    assert torch.equal(encode_prompt(exact[1])[1], encode_prompt(original[1])[1])
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    assert torch.equal(exact[2].decode(latent), original[2].decode(latent))
    if kind == "sdm":
        pixels = torch.randn(1, 3, oc.VISION_IMAGE_SIZE, oc.VISION_IMAGE_SIZE)
        assert torch.equal(exact[3].embed(pixels), original[3].embed(pixels))
        torch.testing.assert_close(half[3].embed(pixels), original[3].embed(pixels), atol=2e-2, rtol=2e-2)


def test_converted_tdm_has_the_names_comfyui_checkpoints_use(comfyui, tdm):
    """What CheckpointLoaderSimple does with an SD1.5 file, done on the tiny converted TDM (ComfyUI's
    architecture matching only knows SD1.5's real sizes, so it is not called; the real sizes are
    checked in the next test): LDM UNet names into ComfyUI's SD1.5 UNet, `cond_stage_model.` through
    SD15.process_clip_state_dict into its CLIP, `first_stage_model.` into its VAE."""
    import comfy.model_detection
    import comfy.sd
    import comfy.supported_models

    single_file = sd15_keys.parts_to_sd15(checkpoint.split_official(oc.official_state_dict(tdm)))
    detected = comfy.model_detection.detect_unet_config(single_file, "model.diffusion_model.")
    derived = checkpoint.unet_config(checkpoint.split_official(oc.official_state_dict(tdm)).unet)
    shared = set(detected) & set(derived) - {"num_heads", "num_head_channels"}
    assert {k: detected[k] for k in shared} == {k: derived[k] for k in shared}

    model_config = comfy.supported_models.SD15(derived)
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({}, "")
    unet_keys = {k for k in single_file if k.startswith("model.diffusion_model.")}
    assert {"model.diffusion_model." + k for k in model.diffusion_model.state_dict()} == unet_keys
    model.load_model_weights(dict(single_file), "model.diffusion_model.")
    x, t, context = unet_inputs()
    with torch.no_grad():
        expected = tdm.unet(x, t, encoder_hidden_states=context).sample
        torch.testing.assert_close(model.diffusion_model(x, timesteps=t, context=context), expected, atol=TOLERANCE, rtol=TOLERANCE)

    clip_sd = model_config.process_clip_state_dict(dict(single_file))
    parts = sd15_keys.sd15_to_parts(dict(single_file))
    clip = comfyui.pack("nodes.networks").build_clip(parts.text_encoder, torch.float32)
    expected_clip_keys = set(clip.cond_stage_model.state_dict()) - {"clip_l.logit_scale", "clip_l.transformer.text_projection.weight"}
    assert set(clip_sd) == expected_clip_keys

    vae_sd = {k.removeprefix("first_stage_model."): v for k, v in single_file.items() if k.startswith("first_stage_model.")}
    vae = comfy.sd.VAE(sd=vae_sd, config={"params": checkpoint.vae_config(parts.vae)})
    assert set(vae.first_stage_model.state_dict()) == set(vae_sd)
    assert_vae_matches(vae, tdm.vae)


def test_converted_real_size_tdm_is_detected_as_sd15_by_comfyui(comfyui):
    """At the real files' sizes (meta tensors, no memory) ComfyUI's checkpoint detection recognises the
    converted TDM as SD1.5 and its SD1.5 UNet, CLIP-L and VAE expect exactly the converted names and shapes."""
    import comfy.ldm.models.autoencoder
    import comfy.model_detection
    import comfy.sd1_clip
    import comfy.supported_models

    official = oc.real_size_state_dict()
    parts = checkpoint.split_official(dict(official))
    assert checkpoint.unet_config(parts.unet) | {"dtype": None} == comfy.model_detection.unet_config_from_diffusers_unet(parts.unet)
    parts.image_encoder, parts.postfuse = {}, {}
    single_file = sd15_keys.parts_to_sd15(parts)

    model_config = comfy.model_detection.model_config_from_unet(single_file, "model.diffusion_model.")
    assert type(model_config) is comfy.supported_models.SD15
    with torch.device("meta"):
        model_config.set_inference_dtype(torch.float32, None)
        unet = model_config.get_model({}, "", device="meta").diffusion_model
        clip = comfy.sd1_clip.SD1ClipModel(device="meta", dtype=torch.float32)
        vae = comfy.ldm.models.autoencoder.AutoencoderKL(**checkpoint.vae_config(parts.vae))

    def shapes(state, prefix=""):
        return {prefix + k: tuple(v.shape) for k, v in state.items()}

    def section(prefix):
        return {k: tuple(v.shape) for k, v in single_file.items() if k.startswith(prefix)}

    assert shapes(unet.state_dict(), "model.diffusion_model.") == section("model.diffusion_model.")
    clip_expected = shapes(clip.state_dict())
    for optional in ("clip_l.logit_scale", "clip_l.transformer.text_projection.weight"):
        clip_expected.pop(optional)
    assert shapes(model_config.process_clip_state_dict(dict(single_file))) == clip_expected
    assert shapes(vae.state_dict(), "first_stage_model.") == section("first_stage_model.")


def test_wrong_kinds_are_refused_with_the_fix(comfyui, models_dir, tdm, sdm):
    oc.write_checkpoint(oc.official_state_dict(tdm), models_dir / "tdm.bin")
    oc.write_checkpoint(oc.official_state_dict(sdm), models_dir / "sdm.bin")
    unet_only = {k: v for k, v in oc.official_state_dict(tdm).items() if k.startswith("unet.")}
    oc.write_checkpoint({k.removeprefix("unet."): v for k, v in unet_only.items()}, models_dir / "bare_unet.safetensors")
    with pytest.raises(ValueError, match=r"Face-diffuser SDM Loader: tdm\.bin is a TDM \(no image_encoder/postfuse_module weights\).*Face-diffuser TDM Loader"):
        comfyui.run("FaceDiffuserSDMLoader", ckpt_name="tdm.bin")
    with pytest.raises(ValueError, match=r"Face-diffuser TDM Loader: sdm\.bin is an SDM \(Face-diffuser SDM or FastComposer\).*Face-diffuser SDM Loader"):
        comfyui.run("FaceDiffuserTDMLoader", ckpt_name="sdm.bin")
    with pytest.raises(ValueError, match=r"bare_unet\.safetensors is a bare diffusers UNet.*expected a TDM"):
        comfyui.run("FaceDiffuserTDMLoader", ckpt_name="bare_unet.safetensors")


def test_structure_problems_name_the_node_the_file_and_the_fix(comfyui, models_dir, tdm):
    state = oc.official_state_dict(tdm)
    state["text_encoder.embeddings.token_embedding.weight"] = state["text_encoder.embeddings.token_embedding.weight"][:1000]
    oc.write_checkpoint(state, models_dir / "small_vocab.safetensors")
    with pytest.raises(ValueError, match=r"Face-diffuser TDM Loader: small_vocab\.safetensors cannot be loaded: the text encoder has a "
                                         r"vocabulary of 1000.*official SDM/TDM file"):
        comfyui.run("FaceDiffuserTDMLoader", ckpt_name="small_vocab.safetensors")


def test_missing_and_truncated_files(comfyui, models_dir, tdm):
    import folder_paths

    expected_path = os.path.join(folder_paths.get_folder_paths("facediffuser")[0], "facediffuser_tdm.bin")
    with pytest.raises(FileNotFoundError, match=re.escape(f"Face-diffuser TDM Loader: checkpoint 'facediffuser_tdm.bin' not found; expected it at {expected_path}")):
        comfyui.run("FaceDiffuserTDMLoader", ckpt_name="facediffuser_tdm.bin")
    good = oc.write_checkpoint(oc.official_state_dict(tdm), models_dir / "good.bin")
    (models_dir / "cut.bin").write_bytes(good.read_bytes()[:100_000])
    with pytest.raises(ValueError, match="^Face-diffuser TDM Loader: cannot read .*cut.bin .*truncated or corrupt, re-download"):
        comfyui.run("FaceDiffuserTDMLoader", ckpt_name="cut.bin")


def test_sdm_without_vae_loads_with_an_unusable_vae(comfyui, models_dir, sdm):
    """The VAE is optional in the SDM layout; like ComfyUI's checkpoint loader, the VAE output then
    fails only when used."""
    state = {k: v for k, v in oc.official_state_dict(sdm).items() if not k.startswith("vae.")}
    oc.write_checkpoint(state, models_dir / "sdm_no_vae.safetensors")
    model, _, vae, _ = comfyui.run("FaceDiffuserSDMLoader", ckpt_name="sdm_no_vae.safetensors", weight_dtype="fp32")
    assert_unet_matches(model, sdm.unet)
    with pytest.raises(RuntimeError, match="VAE is invalid"):
        vae.decode(torch.zeros(1, 4, 8, 8))
