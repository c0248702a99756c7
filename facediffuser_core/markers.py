"""The `<|image|>` subject markers of a Face-diffuser prompt.

The user writes `<|image|>` right after the noun that names each person ("a man <|image|> and a woman
<|image|>"), one marker per reference face, in the order of the faces. The text encoder never sees the
markers: they are removed, and each one designates the last token of the word before it, whose hidden
state the SDM's postfuse module replaces by a fusion of that state and the face embedding.

This module is pure: it parses the text (`parse_subject_markers`) and, given token sequences produced by
any tokenizer in ComfyUI's layout (chunks of (token, weight, word id) with word id 0 for the start, end
and padding tokens), finds which rows of the encoded prompt are the marked ones (`locate_marked_rows`).
Finding a row from a character position needs the tokenizer, whose prompt-weight syntax, word splitting
and chunking decide where a word lands; rather than re-implementing those, the caller tokenises the prompt
twice, once plain and once with a sentinel word where each marker was (`text_with_sentinels`), and the
sentinels show how many content tokens precede each marker.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

MARKER = "<|image|>"
MARKER_EXAMPLE = "a photo of a man <|image|> and a woman <|image|> in a cafe"

# A plain lowercase word the tokenizer splits into a few ordinary pieces; it only ever appears in the probe
# text, never in what gets encoded.
SENTINEL = "zqxfacediffusersubjectzqx"

_MARKER_WITH_LEADING_SPACE = re.compile(r"\s*" + re.escape(MARKER))
# The closing part of ComfyUI's weight syntax, "(words:1.2)" or "(words)", which produces no token.
_WEIGHT_CLOSER = re.compile(r"(?:\s*:\s*[-+]?(?:\d+\.?\d*|\.\d+))?\s*(?<!\\)\)\s*$")


@dataclass(frozen=True)
class SubjectMarker:
    """One marker: `offset` is where it stood in the marker-free text (just after `word`)."""

    offset: int
    word: str


@dataclass(frozen=True)
class MarkedPrompt:
    text: str  # the prompt with every marker removed: what the text encoder sees
    markers: tuple[SubjectMarker, ...]


@dataclass(frozen=True)
class MarkedRow:
    """Where a marked token landed: its chunk of the tokenised prompt, its position in that chunk, and its
    row in the encoded prompt (the chunks' hidden states concatenated)."""

    chunk: int
    position: int
    row: int


def _ordinal(index: int) -> str:
    return f"marker {index + 1}"


def _word_before(text: str) -> str:
    """The word that ends `text`, looking through whitespace and the closing part of a weight group."""
    stripped = text.rstrip()
    while True:
        unweighted = _WEIGHT_CLOSER.sub("", stripped)
        if unweighted == stripped:
            break
        stripped = unweighted.rstrip()
    word_start = len(stripped)
    while word_start > 0 and stripped[word_start - 1].isalnum():
        word_start -= 1
    return stripped[word_start:]


def parse_subject_markers(prompt: str) -> MarkedPrompt:
    """Remove the markers (with the whitespace before them) and record where each one stood.

    A marker glued to a following word ("man<|image|>smiling") becomes a space so the two words stay apart.
    Raises ValueError for a marker at the start, two markers with no word between them, and a marker that
    follows punctuation rather than a word.
    """
    pieces: list[str] = []
    markers: list[SubjectMarker] = []
    length = 0
    cursor = 0
    for index, match in enumerate(_MARKER_WITH_LEADING_SPACE.finditer(prompt)):
        before = prompt[cursor:match.start()]
        if not (prompt[:match.start()]).strip():
            raise ValueError(
                f"the prompt starts with {MARKER}: write each marker right after the noun that names the person, "
                f"e.g. '{MARKER_EXAMPLE}'"
            )
        if markers and not before.strip():
            raise ValueError(
                f"{_ordinal(index - 1)} and {_ordinal(index)} ({MARKER}) follow each other with no word between "
                f"them: each reference face needs its own marker after its own noun, e.g. '{MARKER_EXAMPLE}'"
            )
        pieces.append(before)
        length += len(before)
        clean_so_far = "".join(pieces)
        word = _word_before(clean_so_far)
        if not word:
            context = clean_so_far.rstrip()[-20:]
            raise ValueError(
                f"{_ordinal(index)} ({MARKER}) follows '{context}', which does not end with a word: write the marker "
                f"right after the noun that names the person, e.g. '{MARKER_EXAMPLE}'"
            )
        markers.append(SubjectMarker(offset=length, word=word))
        cursor = match.end()
        if cursor < len(prompt) and prompt[cursor].isalnum():
            pieces.append(" ")
            length += 1
    pieces.append(prompt[cursor:])
    return MarkedPrompt(text="".join(pieces), markers=tuple(markers))


def check_face_count(marked: MarkedPrompt, face_count: int) -> None:
    markers = len(marked.markers)
    if markers == face_count:
        return
    marker_words = "marker" if markers == 1 else "markers"
    face_words = "reference face was" if face_count == 1 else "reference faces were"
    raise ValueError(
        f"the prompt has {markers} {MARKER} {marker_words} but {face_count} {face_words} given: write one marker "
        f"after each person's noun, in the order of the photos, e.g. '{MARKER_EXAMPLE}'"
    )


def text_with_sentinels(marked: MarkedPrompt, sentinel: str = SENTINEL) -> str:
    """The marker-free text with the sentinel as a separate word at each marker's place."""
    pieces = []
    cursor = 0
    for marker in marked.markers:
        pieces.append(marked.text[cursor:marker.offset])
        pieces.append(f" {sentinel} ")
        cursor = marker.offset
    pieces.append(marked.text[cursor:])
    return "".join(pieces)


def _token_key(token) -> object:
    """Token ids compare by value; textual-inversion embeddings (tensors) by shape, since each tokenisation
    loads its own copy."""
    if isinstance(token, int):
        return token
    shape = getattr(token, "shape", None)
    return ("embedding", tuple(shape)) if shape is not None else ("other", repr(token))


def _content(chunks: Sequence[Sequence[tuple]]) -> list[tuple[object, int, int]]:
    """(token key, chunk, position) of every content token (word id > 0), in order."""
    return [
        (_token_key(entry[0]), chunk_index, position)
        for chunk_index, chunk in enumerate(chunks)
        for position, entry in enumerate(chunk)
        if entry[2] > 0
    ]


def locate_marked_rows(
    marked: MarkedPrompt,
    plain_chunks: Sequence[Sequence[tuple]],
    probe_chunks: Sequence[Sequence[tuple]],
    sentinel_tokens: Sequence[int],
) -> list[MarkedRow]:
    """The rows of the encoded `marked.text` that the markers designate, in marker order.

    plain_chunks: the tokenisation of `marked.text`; probe_chunks: that of `text_with_sentinels(marked)`;
    both with word ids (ComfyUI: `tokenize(text, return_word_ids=True)`). sentinel_tokens: the content
    tokens of the sentinel alone. The k-th sentinel run in the probe is preceded by as many content tokens
    as the k-th marker in the plain text; the last of those is the marked token.
    """
    plain = _content(plain_chunks)
    probe_keys = [key for key, _, _ in _content(probe_chunks)]
    sentinel = [_token_key(token) for token in sentinel_tokens]
    if not sentinel:
        raise ValueError("the sentinel word produced no tokens; the tokenizer cannot be probed for marker positions")
    kept: list[object] = []
    counts: list[int] = []
    index = 0
    while index < len(probe_keys):
        if probe_keys[index:index + len(sentinel)] == sentinel:
            counts.append(len(kept))
            index += len(sentinel)
        else:
            kept.append(probe_keys[index])
            index += 1
    if len(counts) != len(marked.markers) or kept != [key for key, _, _ in plain]:
        raise ValueError(
            f"could not locate the {MARKER} markers in the tokenised prompt (the tokenizer split the text around a "
            "marker differently with and without it); put a space after each marker"
        )
    chunk_starts = [0]
    for chunk in plain_chunks:
        chunk_starts.append(chunk_starts[-1] + len(chunk))
    rows = []
    for marker_index, (marker, count) in enumerate(zip(marked.markers, counts)):
        if count == 0:
            raise ValueError(
                f"{_ordinal(marker_index)} ({MARKER}) after '{marker.word}' has no token before it once tokenised; "
                "write it right after the noun that names the person"
            )
        _, chunk, position = plain[count - 1]
        rows.append(MarkedRow(chunk=chunk, position=position, row=chunk_starts[chunk] + position))
    if len({row.row for row in rows}) != len(rows):
        raise ValueError(f"two {MARKER} markers designate the same token: give each person its own noun")
    return rows
