"""Identity scores (facediffuser_core.identity): the optimal assignment against brute force, the per-subject
flags, the picture score and ranking, and the results' table and JSON, on made-up embeddings."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from facediffuser_core.identity import (
    ARCFACE_FAMILY,
    DLIB_MODEL,
    MISSING_SIMILARITY,
    THRESHOLDS,
    assign_subjects,
    best_first,
    cosine_similarity_matrix,
    measure_identity,
    optimal_assignment,
    threshold_for,
)
from facediffuser_core.recognition import Face


def brute_force_best_total(similarity: np.ndarray) -> float:
    """The largest summed similarity over every one-to-one matching of min(S, F) pairs."""
    rows, columns = similarity.shape
    pairs = min(rows, columns)
    if pairs == 0:
        return 0.0
    best = -np.inf
    for chosen_rows in itertools.combinations(range(rows), pairs):
        for chosen_columns in itertools.permutations(range(columns), pairs):
            best = max(best, sum(similarity[r, c] for r, c in zip(chosen_rows, chosen_columns)))
    return best


matrices = st.tuples(st.integers(0, 5), st.integers(0, 6)).flatmap(
    lambda shape: arrays(np.float64, shape, elements=st.floats(-1, 1, allow_nan=False)))


@settings(max_examples=300, deadline=None)
@given(matrices)
def test_assignment_is_one_to_one_and_as_good_as_brute_force(similarity):
    assignment = optimal_assignment(similarity)
    rows, columns = similarity.shape
    assert len(assignment) == rows
    used = [column for column in assignment if column is not None]
    assert len(used) == len(set(used)) == min(rows, columns)
    assert all(0 <= column < columns for column in used)
    total = sum(similarity[row, column] for row, column in enumerate(assignment) if column is not None)
    assert total == pytest.approx(brute_force_best_total(similarity), abs=1e-9)


@settings(max_examples=100, deadline=None)
@given(arrays(np.float64, (4, 4), elements=st.sampled_from([0.0, 0.5, 1.0])))
def test_assignment_with_many_ties(similarity):
    assignment = optimal_assignment(similarity)
    total = sum(similarity[row, column] for row, column in enumerate(assignment))
    assert total == pytest.approx(brute_force_best_total(similarity))


def test_optimal_beats_greedy_when_two_people_look_alike():
    # Greedy would give face 0 to subject 0 (0.9) and leave subject 1 with face 1 (0.1): 1.0 in total.
    similarity = np.array([[0.9, 0.8], [0.85, 0.1]])
    assert optimal_assignment(similarity) == [1, 0]


def test_cosine_similarity_matrix():
    references = np.array([[1.0, 0.0], [0.0, 2.0]])
    faces = np.array([[3.0, 0.0], [1.0, 1.0], [0.0, -1.0]])
    np.testing.assert_allclose(cosine_similarity_matrix(references, faces),
                               [[1.0, 2 ** -0.5, 0.0], [0.0, 2 ** -0.5, -1.0]])
    assert cosine_similarity_matrix(references, np.zeros((0, 2))).shape == (2, 0)
    with pytest.raises(ValueError, match="different widths"):
        cosine_similarity_matrix(references, np.zeros((1, 3)))


def test_flags_missing_mixed_and_same_person():
    # subject 0's best face is face 1; face 0 resembles subject 2 more than subject 1; subject 3 gets nothing
    similarity = np.array([
        [0.1, 0.9, 0.2],
        [0.5, 0.2, 0.1],
        [0.6, 0.1, 0.8],
        [0.0, 0.0, 0.0],
    ])
    results = assign_subjects(similarity, threshold=0.4)
    assert [r.face for r in results] == [1, 0, 2, None]
    assert [r.missing for r in results] == [False, False, False, True]
    assert [r.mixed for r in results] == [False, True, False, False]
    assert results[1].closest_subject == 2 and results[0].closest_subject == 0
    assert [r.same_person for r in results] == [True, True, True, False]
    assert results[1].similarity == 0.5 and results[3].similarity is None


def test_ranking_by_weakest_subject_with_ties_in_batch_order():
    assert best_first([0.2, 0.9, 0.2, MISSING_SIMILARITY, 0.5]) == [1, 4, 0, 2, 3]


def test_every_model_has_a_threshold_with_its_source():
    for model in (DLIB_MODEL, "glintr100", "w600k_r50"):
        assert threshold_for(model) is THRESHOLDS[model]
    assert threshold_for("some_other_arcface") is THRESHOLDS[ARCFACE_FAMILY]
    assert all(-1 < t.similarity < 1 and len(t.source) > 40 for t in THRESHOLDS.values())
    assert "0.6" in THRESHOLDS[DLIB_MODEL].source and "web-demos/src_recognition/main.py" in THRESHOLDS["w600k_r50"].source


class TableRecognizer:
    """Faces looked up by the photo's first pixel value: photo k holds the faces listed for k."""

    model = "w600k_r50"
    description = "a stand-in"

    def __init__(self, faces_by_photo: dict[int, list[Face]]):
        self.faces_by_photo = faces_by_photo

    def faces(self, photo):
        return self.faces_by_photo[int(photo[0, 0, 0])]


def photo(key: int) -> np.ndarray:
    return np.full((8, 8, 3), key, np.uint8)


def face(x: float, *embedding: float, size: float = 10) -> Face:
    return Face((x, 0.0, x + size, size), np.array(embedding))


def test_measure_identity_end_to_end_with_a_stand_in_recognizer():
    recognizer = TableRecognizer({
        # references: two subjects; the first photo also shows a smaller second face, which is not the reference
        0: [face(0, 1, 0, 0, size=5), face(20, 0, 0, 1, size=30)],
        1: [face(0, 0, 1, 0)],
        # pictures: both people; one person only; nobody; subject 0's face twice (identity mixing)
        10: [face(0, 0.1, 0.9, 0), face(40, 0, 0.2, 0.95), face(80, 1, 1, 1)],
        11: [face(0, 0, 1, 0)],
        12: [],
        13: [face(0, 0, 0, 1), face(30, 0.1, 0, 0.9)],
    })
    seen = []
    report = measure_identity(recognizer, [photo(0), photo(1)], [photo(k) for k in (10, 11, 12, 13)], seen.append)
    assert seen == [0, 1, 2, 3]
    both, one, nobody, twice = report.images
    assert [s.face for s in both.subjects] == [1, 0] and not any(s.mixed or s.missing for s in both.subjects)
    assert both.score == pytest.approx(min(0.2 * 0 + 0.95 / np.linalg.norm([0, 0.2, 0.95]), 0.9 / np.linalg.norm([0.1, 0.9, 0])))
    assert one.subjects[0].missing and one.subjects[1].similarity == pytest.approx(1.0) and one.score == MISSING_SIMILARITY
    assert nobody.boxes == [] and all(s.missing for s in nobody.subjects) and nobody.score == MISSING_SIMILARITY
    assert twice.subjects[1].mixed and twice.subjects[1].closest_subject == 0 and not twice.subjects[0].mixed
    assert report.order() == [0, 3, 1, 2] and [image.rank for image in report.images] == [0, 2, 3, 1]
    assert [image.summary() for image in report.images] == [
        f"score {both.score:.2f}", "missing S1", "no face found", f"score {twice.score:.2f} mixed"]

    entries = json.loads(json.dumps(report.to_json()))
    assert [e["batch_index"] for e in entries] == [0, 1, 2, 3]
    assert entries[0]["model"] == "w600k_r50" and entries[0]["threshold"] == 0.28 and entries[0]["faces"] == 3
    assert entries[1]["subjects"][0] == {"subject": 0, "similarity": None, "missing": True, "mixed": False, "same_person": False,
                                         "closest_subject": None, "face": None, "box": None}
    assert entries[3]["subjects"][1]["box"] == [30.0, 0.0, 40.0, 10.0] and entries[3]["subjects"][1]["mixed"] is True

    table = report.table()
    assert "image 2 (rank 4 of 4): score -1.000, no face found" in table
    assert "subject 1: missing (no face left for this subject)" in table
    assert "MIXED: the face is closer to subject 1's reference" in table


def test_a_reference_without_a_face_is_named():
    recognizer = TableRecognizer({0: [face(0, 1, 0)], 1: []})
    with pytest.raises(ValueError, match="no face found in reference photo 1 "):
        measure_identity(recognizer, [photo(0), photo(1)], [photo(0)])
