"""Face-diffuser Subject Prompt in ComfyUI, on a tiny SDM with the real SD1 tokenizer.

References: ComfyUI's own CLIP Text Encode for the text conditioning, transformers' CLIPTextModel for the
encoder output, the SPEC postfuse formula (tests/spec_postfuse.py) for the marked rows, and the
tokenizer's tokens of the marked word for where the rows are.
"""

import pytest
import torch

from dev.devkit.official_checkpoints import HIDDEN
from subject_fixtures import TinySDM, loaded_tiny_sdm
from spec_postfuse import spec_postfuse


@pytest.fixture(scope="module")
def sdm(comfyui, tmp_path_factory):
    with loaded_tiny_sdm(comfyui, tmp_path_factory.mktemp("facediffuser")) as loaded:
        yield loaded


def face_embeds(comfyui, count: int, seed: int = 0):
    FaceEmbeds = comfyui.pack("nodes.subject_encoder").FaceEmbeds
    return FaceEmbeds(torch.randn(count, HIDDEN, generator=torch.Generator().manual_seed(seed)))


def subject_prompt(comfyui, sdm, text: str, faces):
    return comfyui.run("FaceDiffuserSubjectPrompt", clip=sdm.clip, subject_encoder=sdm.subject_encoder, face_embeds=faces, text=text)


def last_token_of(clip, word: str) -> int:
    """The id of the last token the SD1 tokenizer gives a word on its own."""
    tokens = clip.tokenize(word, return_word_ids=True)["l"]
    return [token for chunk in tokens for token, _, word_id in chunk if word_id > 0][-1]


def postfuse_weights(sdm) -> dict:
    return sdm.refs.postfuse.state_dict()


def check_augmented(comfyui, sdm, text: str, clean_text: str, words: list[str]):
    faces = face_embeds(comfyui, len(words))
    augmented, plain = subject_prompt(comfyui, sdm, text, faces)
    (expected_text,) = comfyui.nodes.CLIPTextEncode().encode(sdm.clip, clean_text)
    torch.testing.assert_close(plain[0][0], expected_text[0][0])
    torch.testing.assert_close(plain[0][1]["pooled_output"], expected_text[0][1]["pooled_output"])
    assert "pooled_output" in augmented[0][1]

    hidden, fused = plain[0][0], augmented[0][0]
    tokens = [token for chunk in sdm.clip.tokenize(clean_text)["l"] for token, _ in chunk]
    assert hidden.shape[1] == len(tokens)
    changed = sorted(set(torch.nonzero((fused != hidden).any(dim=-1)[0]).flatten().tolist()))
    assert len(changed) == len(words)
    # markers, faces and changed rows all go in prompt order: the k-th changed row holds word k and face k
    for face, (row, word) in enumerate(zip(changed, words)):
        assert tokens[row] == last_token_of(sdm.clip, word)
        expected = spec_postfuse(postfuse_weights(sdm), hidden[:, row].float(), faces.embeddings[face:face + 1])
        torch.testing.assert_close(fused[:, row], expected.to(fused.dtype), rtol=1e-4, atol=1e-4)
    # What the sampling nodes' regions need: the marked rows, the prompt's length and the plain states there.
    subjects = augmented[0][1][comfyui.pack("facediffuser_core.regions").SUBJECTS_KEY]
    assert list(subjects.rows) == changed and subjects.prompt_rows == hidden.shape[1]
    assert torch.equal(subjects.plain, hidden[0, changed])
    return changed


def test_text_conditioning_is_the_final_layer_norm_output(comfyui, sdm):
    _, plain = subject_prompt(comfyui, sdm, "a photo of a man <|image|> in a cafe", face_embeds(comfyui, 1))
    ids = torch.tensor([[token for token, _ in sdm.clip.tokenize("a photo of a man in a cafe")["l"][0]]])
    with torch.no_grad():
        expected = sdm.refs.text_encoder(input_ids=ids).last_hidden_state
    torch.testing.assert_close(plain[0][0], expected, rtol=1e-4, atol=1e-4)


def test_augmented_differs_exactly_at_the_marked_rows(comfyui, sdm):
    changed = check_augmented(comfyui, sdm, "a photo of a man <|image|> and a woman <|image|> in a cafe",
                              "a photo of a man and a woman in a cafe", ["man", "woman"])
    assert changed == [5, 8]


def test_weights_and_multi_token_words(comfyui, sdm):
    check_augmented(comfyui, sdm, "an (astronaut:1.3) <|image|> next to a (smiling firefighter <|image|>:0.8), detailed",
                    "an (astronaut:1.3) next to a (smiling firefighter:0.8), detailed", ["astronaut", "firefighter"])


def test_markers_beyond_75_tokens(comfyui, sdm):
    filler = ", ".join(["highly detailed", "cinematic lighting", "sharp focus"] * 9)
    text = f"{filler}, a man <|image|> and a (girl:1.1) <|image|> {filler}, a grandmother <|image|> at the end"
    clean = f"{filler}, a man and a (girl:1.1) {filler}, a grandmother at the end"
    assert len(sdm.clip.tokenize(clean)["l"]) >= 3
    changed = check_augmented(comfyui, sdm, text, clean, ["man", "girl", "grandmother"])
    assert changed[0] >= 77 and changed[-1] >= 2 * 77


def test_clip_set_last_layer_is_honoured_for_both_outputs(comfyui, sdm):
    clip = sdm.clip.clone()
    clip.clip_layer(-2)
    faces = face_embeds(comfyui, 1)
    augmented, plain = comfyui.run("FaceDiffuserSubjectPrompt", clip=clip, subject_encoder=sdm.subject_encoder, face_embeds=faces,
                                   text="a man <|image|> reading")
    (expected,) = comfyui.nodes.CLIPTextEncode().encode(clip, "a man reading")
    torch.testing.assert_close(plain[0][0], expected[0][0])
    changed = torch.nonzero((augmented[0][0] != plain[0][0]).any(dim=-1)[0]).flatten().tolist()
    assert changed == [2]


@pytest.mark.parametrize(
    "text, faces, message",
    [
        ("a man <|image|> in a cafe", 2, "the prompt has 1 <|image|> marker but 2 reference faces were given: write one marker after "
                                         "each person's noun, in the order of the photos"),
        ("<|image|> a man", 1, "starts with <|image|>"),
        ("a man <|image|><|image|>", 2, "follow each other"),
        ("a man, <|image|>", 1, "does not end with a word"),
    ],
)
def test_prompt_errors(comfyui, sdm, text, faces, message):
    with pytest.raises(ValueError, match="Face-diffuser Subject Prompt: .*" + message.replace("|", r"\|")):
        subject_prompt(comfyui, sdm, text, face_embeds(comfyui, faces))


def test_a_clip_that_is_not_sd1_is_refused(comfyui, sdm):
    class TwoEncoderClip:
        layer_idx = None

        def tokenize(self, text, return_word_ids=False):
            return {"g": [], "l": []}

    sdxl_like = TinySDM(refs=sdm.refs, model=sdm.model, clip=TwoEncoderClip(), subject_encoder=sdm.subject_encoder)
    with pytest.raises(ValueError, match="SD1.5 .*Face-diffuser SDM Loader"):
        subject_prompt(comfyui, sdxl_like, "a man <|image|>", face_embeds(comfyui, 1))


def test_face_embeddings_from_another_encoder_are_refused(comfyui, sdm):
    FaceEmbeds = comfyui.pack("nodes.subject_encoder").FaceEmbeds
    foreign = FaceEmbeds(torch.randn(1, HIDDEN // 2))
    with pytest.raises(ValueError, match=r"Face-diffuser Subject Prompt: the face embeddings are 16 wide but the postfuse is 32 wide"):
        subject_prompt(comfyui, sdm, "a man <|image|> on a boat", foreign)
