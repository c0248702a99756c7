"""Face-diffuser Subject Prompt: a prompt with <|image|> markers -> the SDM's augmented conditioning and the
plain text conditioning."""

from __future__ import annotations

import logging

from comfy_api.latest import io

from ..facediffuser_core.markers import (
    MARKER,
    MARKER_EXAMPLE,
    SENTINEL,
    check_face_count,
    locate_marked_rows,
    parse_subject_markers,
    text_with_sentinels,
)
from ..facediffuser_core.regions import SUBJECTS_KEY, SubjectTokens
from .types import FaceEmbeds as FaceEmbedsType
from .types import SubjectEncoder as SubjectEncoderType

NODE_NAME = "Face-diffuser Subject Prompt"
SD1_TOKENS_KEY = "l"  # ComfyUI's SD1 tokenizer output: {"l": chunks}


def _sd1_chunks(clip, text: str) -> list:
    tokens = clip.tokenize(text, return_word_ids=True)
    if set(tokens) != {SD1_TOKENS_KEY}:
        raise ValueError(
            f"{NODE_NAME}: this CLIP has the text encoders {sorted(tokens)}, but Face-diffuser's models are SD1.5 (CLIP-L only): "
            "connect the CLIP output of the Face-diffuser SDM Loader"
        )
    return tokens[SD1_TOKENS_KEY]


def _content_tokens(chunks) -> list:
    return [entry[0] for chunk in chunks for entry in chunk if entry[2] > 0]


class FaceDiffuserSubjectPrompt(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FaceDiffuserSubjectPrompt",
            display_name=NODE_NAME,
            category="facediffuser/conditioning",
            description=(
                f"Encodes a prompt in which each person's noun is followed by {MARKER}, one marker per reference face in the "
                f"order of the photos, e.g. '{MARKER_EXAMPLE}'. The markers are removed and the prompt is encoded once: "
                "'text' is that encoding (the TDM's positive and the SDM's negative); 'augmented' is the same with each "
                "marked noun's last token replaced by the SDM's fusion of that token and the face (the SDM's positive). "
                "The third conditioning Face-diffuser needs, the empty prompt, is an ordinary CLIP Text Encode of an empty "
                "text with the same CLIP. Prompt weights like (word:1.2) and prompts longer than 75 tokens work as in CLIP "
                "Text Encode."
            ),
            inputs=[
                io.Clip.Input("clip", tooltip="The SDM's CLIP (Face-diffuser SDM Loader); the official pipeline encodes all prompts with it."),
                SubjectEncoderType.Input("subject_encoder", tooltip="From the Face-diffuser SDM Loader."),
                FaceEmbedsType.Input("face_embeds", tooltip="From Face-diffuser Encode Reference Faces, one face per marker."),
                io.String.Input("text", multiline=True, dynamic_prompts=True, default=f"a photo of a man {MARKER} in a cafe",
                                tooltip=f"The prompt, with {MARKER} right after the noun of each person (one per reference face, "
                                        "in the order of the photos)."),
            ],
            outputs=[
                io.Conditioning.Output(display_name="augmented", tooltip="The prompt with the faces fused in: the SDM's positive."),
                io.Conditioning.Output(display_name="text", tooltip="The prompt without faces: the TDM's positive and the SDM's negative."),
            ],
        )

    @classmethod
    def execute(cls, clip, subject_encoder, face_embeds, text: str) -> io.NodeOutput:
        try:
            marked = parse_subject_markers(text)
            check_face_count(marked, face_embeds.count)
        except ValueError as error:
            raise ValueError(f"{NODE_NAME}: {error}") from error
        plain_chunks = _sd1_chunks(clip, marked.text)
        try:
            rows = locate_marked_rows(
                marked, plain_chunks, _sd1_chunks(clip, text_with_sentinels(marked)), _content_tokens(_sd1_chunks(clip, SENTINEL))
            )
        except ValueError as error:
            raise ValueError(f"{NODE_NAME}: {error}") from error
        if clip.layer_idx not in (None, -1):
            # Honoured for both outputs alike, as CLIP Text Encode would; the SDM was trained on the last layer.
            logging.info("%s: encoding with CLIP layer %d (CLIP Set Last Layer); the official pipeline uses the last layer", NODE_NAME, clip.layer_idx)
        encoded = clip.encode_from_tokens(clip.tokenize(marked.text), return_pooled=True, return_dict=True)
        hidden_states = encoded.pop("cond")
        expected_rows = sum(len(chunk) for chunk in plain_chunks)
        if hidden_states.shape[1] != expected_rows:
            raise RuntimeError(
                f"{NODE_NAME}: the text encoder returned {hidden_states.shape[1]} token rows for {expected_rows} tokens; "
                "the marked rows cannot be placed (is this CLIP an SD1.5 CLIP-L?)"
            )
        try:
            augmented = subject_encoder.fuse(hidden_states, [row.row for row in rows], face_embeds)
        except ValueError as error:
            raise ValueError(f"{NODE_NAME}: {error}") from error
        logging.info("%s: faces fused at %s", NODE_NAME,
                     ", ".join(f"'{marker.word}' (chunk {row.chunk}, token {row.position})" for marker, row in zip(marked.markers, rows)))
        marked_rows = [row.row for row in rows]
        # For the sampling nodes' regions: which rows hold the subjects, and what the text said there.
        subjects = SubjectTokens(tuple(marked_rows), hidden_states.shape[1], hidden_states[0, marked_rows].detach().clone())
        return io.NodeOutput([[augmented, {**encoded, SUBJECTS_KEY: subjects}]], [[hidden_states, dict(encoded)]])


NODES = [FaceDiffuserSubjectPrompt]
