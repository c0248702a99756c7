"""The whole pack in ComfyUI (loaders -> faces -> subject prompt -> SNF sampler -> decode) against the official
algorithm rebuilt on diffusers and transformers with the same tiny weights and the same photos."""

from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

SEED = 11
PROMPT = "a photo of a man <|image|> and a woman <|image|> in a cafe"
STEPS, CFG = 10, 5.0


def photos() -> list[np.ndarray]:
    """Two real faces, public domain / bundled with insightface, both 256x256 so they batch in one IMAGE."""
    import insightface

    hanks = Image.open(Path(insightface.__file__).parent / "data" / "images" / "Tom_Hanks_54745.png").convert("RGB")
    astronaut = Image.fromarray(skimage.data.astronaut()[0:300, 100:400])
    return [np.asarray(image.resize((256, 256), Image.BILINEAR)) for image in (hanks, astronaut)]


@pytest.fixture(scope="module")
def pack_outputs(comfyui, tmp_path_factory):
    import folder_paths
    from dev.devkit import official_checkpoints

    folder = tmp_path_factory.mktemp("facediffuser")
    references = {"tdm": official_checkpoints.build_tdm(seed=0), "sdm": official_checkpoints.build_sdm(seed=1)}
    for kind, refs in references.items():
        official_checkpoints.write_checkpoint(official_checkpoints.official_state_dict(refs), folder / f"tiny_{kind}.bin")

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(folder_paths.folder_names_and_paths, "facediffuser", ([str(folder)], {".bin", ".safetensors"}))
        sdm, clip, vae, subject_encoder = comfyui.run("FaceDiffuserSDMLoader", ckpt_name="tiny_sdm.bin", weight_dtype="fp32")
        tdm, _, _ = comfyui.run("FaceDiffuserTDMLoader", ckpt_name="tiny_tdm.bin", weight_dtype="fp32")

    images = torch.from_numpy(np.stack(photos())).float() / 255
    face_embeds, _ = comfyui.run("FaceDiffuserEncodeReferenceFaces", images=images, subject_encoder=subject_encoder,
                                 face="largest", face_index=0, margin=0.3, object_resolution=512)
    augmented, text = comfyui.run("FaceDiffuserSubjectPrompt", clip=clip, subject_encoder=subject_encoder,
                                  face_embeds=face_embeds, text=PROMPT)
    null = comfyui.run("CLIPTextEncode", clip=clip, text="")[0]
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    sampled, saliency = comfyui.run(
        "FaceDiffuserSNFSampler", tdm=tdm, sdm=sdm, augmented=augmented, text=text, null=null, latent_image=latent,
        seed=SEED, steps=STEPS, cfg=CFG, sampler_name="ddim", scheduler="ddim_uniform", alpha=0.3, beta=0.6, denoise=1.0,
    )
    image = comfyui.run("VAEDecode", samples=sampled, vae=vae)[0]
    return references, face_embeds.embeddings, sampled["samples"], saliency, image, latent


@pytest.fixture(scope="module")
def official_outputs(comfyui, pack_outputs):
    import comfy.sample
    import official_reference
    from transformers import CLIPTokenizer

    references, _, _, _, _, latent = pack_outputs
    tdm, sdm = references["tdm"], references["sdm"]
    tokenizer = CLIPTokenizer.from_pretrained(str(comfyui.root / "comfy" / "sd1_tokenizer"))

    pixels = torch.stack([official_reference.official_face_pixels(torch.from_numpy(p).permute(2, 0, 1))[0] for p in photos()])
    with torch.no_grad():
        faces = sdm.image_encoder(pixel_values=pixels).image_embeds
        null_ids = tokenizer("", padding="max_length", max_length=official_reference.CLIP_TOKENS).input_ids
        null = sdm.text_encoder(torch.tensor([null_ids])).last_hidden_state
    augmented, text = official_reference.encode_official_prompt(tokenizer, sdm.text_encoder, sdm.postfuse.state_dict(), PROMPT, faces)
    noise = comfy.sample.prepare_noise(latent["samples"], SEED)
    latents, choices = official_reference.sample(tdm.unet, sdm.unet, augmented, text, null, noise,
                                                 steps=STEPS, cfg=CFG, scene_end=3, fusion_end=6)
    with torch.no_grad():
        image = (sdm.vae.decode(latents).sample / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    return faces, latents, choices, image


def test_face_embeddings_match(pack_outputs, official_outputs):
    torch.testing.assert_close(pack_outputs[1], official_outputs[0], rtol=1e-4, atol=1e-5)


def test_final_latents_and_fusion_choices_match(pack_outputs, official_outputs):
    _, _, sampled, saliency, _, _ = pack_outputs
    _, latents, choices, _ = official_outputs
    assert saliency.steps == [3, 4, 5]
    for decision, chosen in zip(saliency.decisions, choices):
        assert torch.equal(decision.sdm_chosen, chosen)
    scale = latents.abs().max()
    # Stated tolerance: two float32 implementations of text, vision and UNet over 10 steps.
    torch.testing.assert_close(sampled / scale, latents / scale, rtol=0, atol=5e-5)


def test_decoded_images_match(pack_outputs, official_outputs):
    image, expected = pack_outputs[4], official_outputs[3]
    assert image.shape == expected.shape == (1, 64, 64, 3)
    torch.testing.assert_close(image, expected, rtol=0, atol=1e-3)


def test_the_faces_change_the_picture(comfyui, pack_outputs):
    """Guards against a pipeline that ignores the faces: the augmented prompt must differ from the text one
    at the marked rows, so the SDM's guidance is not zero."""
    _, embeddings, _, saliency, _, _ = pack_outputs
    assert embeddings.shape == (2, 32) and not torch.allclose(embeddings[0], embeddings[1])
    fraction = saliency.summary().sdm_fraction
    assert 0 < fraction.mean() < 1
