"""Subject markers: parsing, errors, and finding the marked rows in a ComfyUI-shaped token layout.

The plain tier uses a small word-level tokenizer written here with ComfyUI's layout (chunks of 77: start
token, up to 75 content tokens, end token, padding; word id 0 for the special tokens; weight syntax
stripped). The ComfyUI tier (pack_nodes/test_subject_prompt_comfyui.py) checks the same on ComfyUI's real SD1 tokenizer.
"""

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from facediffuser_core.markers import (
    MARKER,
    SENTINEL,
    check_face_count,
    locate_marked_rows,
    parse_subject_markers,
    text_with_sentinels,
)

START, END = 1, 2
CHUNK_CONTENT = 75


class WordTokenizer:
    """One token per word or punctuation mark; ids assigned on first sight."""

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def words(self, text: str) -> list[str]:
        text = re.sub(r":\s*[-+]?\d*\.?\d+\s*\)", " ", text).replace("(", " ").replace(")", " ")
        return re.findall(r"\w+|[^\w\s]", text)

    def tokenize(self, text: str) -> list[list[tuple[int, float, int]]]:
        content = [(self.vocab.setdefault(word, len(self.vocab) + 10), 1.0, 1) for word in self.words(text)]
        chunks = []
        for start in range(0, max(len(content), 1), CHUNK_CONTENT):
            body = content[start:start + CHUNK_CONTENT]
            chunk = [(START, 1.0, 0), *body, (END, 1.0, 0)]
            chunks.append(chunk + [(END, 1.0, 0)] * (77 - len(chunk)))
        return chunks

    def content_tokens(self, text: str) -> list[int]:
        return [token for chunk in self.tokenize(text) for token, _, word in chunk if word > 0]


def locate(prompt: str, tokenizer: WordTokenizer | None = None):
    tokenizer = tokenizer or WordTokenizer()
    marked = parse_subject_markers(prompt)
    rows = locate_marked_rows(marked, tokenizer.tokenize(marked.text), tokenizer.tokenize(text_with_sentinels(marked)),
                              tokenizer.content_tokens(SENTINEL))
    return marked, rows


def test_official_example():
    marked, rows = locate("a photo of a man <|image|> and a woman <|image|> in a cafe")
    assert marked.text == "a photo of a man and a woman in a cafe"
    assert [m.word for m in marked.markers] == ["man", "woman"]
    assert [(r.chunk, r.position, r.row) for r in rows] == [(0, 5, 5), (0, 8, 8)]


def test_weights_around_and_inside_markers():
    marked = parse_subject_markers("a (man:1.2) <|image|> and (a woman <|image|>:0.8), (smiling)")
    assert marked.text == "a (man:1.2) and (a woman:0.8), (smiling)"
    assert [m.word for m in marked.markers] == ["man", "woman"]


def test_marker_glued_to_the_next_word_keeps_the_words_apart():
    marked = parse_subject_markers("a man<|image|>smiling")
    assert marked.text == "a man smiling" and marked.markers[0].word == "man"


def test_markers_past_the_first_chunk():
    prompt = " ".join(f"w{i}" for i in range(80)) + " a man <|image|> and " + " ".join(f"v{i}" for i in range(70)) + " a girl <|image|>"
    _, rows = locate(prompt)
    # content index 81 ("man") -> chunk 1, position 81 - 75 + 1; "girl" is content index 81 + 1 + 70 + 2 = 154
    assert [(r.chunk, r.position, r.row) for r in rows] == [(1, 7, 77 + 7), (2, 5, 154 + 5)]


@pytest.mark.parametrize(
    "prompt, message",
    [
        ("<|image|> a man", "starts with <|image|>"),
        ("  <|image|>", "starts with <|image|>"),
        ("a man <|image|> <|image|> and", "marker 1 and marker 2 .* follow each other"),
        ("a man <|image|><|image|>", "follow each other"),
        ("a man, <|image|> smiling", "marker 1 .* follows 'a man,', which does not end with a word"),
        ("a man and (a woman) <|image|> and ( <|image|>", "marker 2 .* does not end with a word"),
    ],
)
def test_marker_errors(prompt, message):
    with pytest.raises(ValueError, match=message):
        parse_subject_markers(prompt)


def test_face_count_error_names_both_counts():
    marked = parse_subject_markers("a man <|image|> in a cafe")
    check_face_count(marked, 1)
    with pytest.raises(ValueError, match=re.escape(
        "the prompt has 1 <|image|> marker but 2 reference faces were given: write one marker after each "
        "person's noun, in the order of the photos")):
        check_face_count(marked, 2)
    with pytest.raises(ValueError, match="has 0 <|image|> markers but 1 reference face was given"):
        check_face_count(parse_subject_markers("a man"), 1)


def test_a_tokenizer_that_merges_across_the_marker_is_detected():
    class Merging(WordTokenizer):
        def words(self, text):  # glues a sentinel to the word after it, unlike the plain text
            return super().words(text.replace(SENTINEL + "  ", SENTINEL))

    with pytest.raises(ValueError, match="could not locate"):
        locate("a man <|image|> and", Merging())


WORDS = st.sampled_from(["man", "woman", "photo", "cafe", "red", "hat", "a", "of", "42", "été"])


@st.composite
def prompts(draw):
    """A prompt of words, some weighted, some followed by commas or markers; returns it with the index
    (among all words) of each marked word."""
    count = draw(st.integers(1, 170))
    pieces, marked_words = [], []
    for index in range(count):
        word = draw(WORDS)
        style = draw(st.sampled_from(["plain", "weighted", "emphasis"]))
        marker = index > 0 or draw(st.booleans())
        marker = marker and draw(st.integers(0, 9)) == 0
        if style == "weighted":
            piece = f"({word} <|image|>:1.3)" if marker and draw(st.booleans()) else f"({word}:1.3)"
        elif style == "emphasis":
            piece = f"({word})"
        else:
            piece = word
        if marker and MARKER not in piece:
            piece += draw(st.sampled_from([" <|image|>", "<|image|>", "   <|image|>  "]))
        if marker:
            marked_words.append(index)
        pieces.append(piece)
        if draw(st.integers(0, 5)) == 0:
            pieces.append(",")
    return " ".join(pieces), marked_words


@pytest.mark.slow  # 4.8 s here
@settings(max_examples=150, deadline=None)
@given(prompts())
def test_marked_rows_hold_the_marked_words(case):
    prompt, marked_words = case
    tokenizer = WordTokenizer()
    marked, rows = locate(prompt, tokenizer)
    assert MARKER not in marked.text
    assert len(rows) == len(marked_words)
    plain = tokenizer.tokenize(marked.text)
    words_only = [i for i, word in enumerate(tokenizer.words(marked.text)) if word != ","]
    for row, word_index, marker in zip(rows, marked_words, marked.markers):
        content_index = words_only[word_index]
        assert (row.chunk, row.position) == (content_index // CHUNK_CONTENT, content_index % CHUNK_CONTENT + 1)
        assert row.row == row.chunk * 77 + row.position
        assert plain[row.chunk][row.position][0] == tokenizer.vocab[marker.word]
