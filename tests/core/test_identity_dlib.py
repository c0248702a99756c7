"""Identity scores with a real face-recognition model, dlib's ResNet (installed from PyPI with the test
dependencies), on real photos: scikit-image's astronaut and the six people of insightface's group photo t1.jpg."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import skimage.data
from PIL import Image

from face_photos import face_photo, insightface_image, side_by_side
from facediffuser_core.identity import DLIB_MODEL, MISSING_SIMILARITY, cosine_similarity_matrix, measure_identity, threshold_for
from facediffuser_core.recognition import DlibRecognizer

THRESHOLD = threshold_for(DLIB_MODEL).similarity
DLIB_SAME_PERSON_DISTANCE = 0.6  # dlib's own rule on its raw descriptors


@pytest.fixture(scope="module")
def dlib_recognizer():
    return DlibRecognizer()


@pytest.fixture(scope="module")
def group(dlib_recognizer):
    """t1.jpg and its six faces, left to right."""
    photo = insightface_image("t1.jpg")
    faces = sorted(dlib_recognizer.faces(photo), key=lambda face: face.box[0])
    assert len(faces) == 6
    return photo, faces


def largest(faces):
    return max(faces, key=lambda face: (face.box[2] - face.box[0]) * (face.box[3] - face.box[1]))


def similarity(a, b) -> float:
    return float(cosine_similarity_matrix(a.embedding[None], b.embedding[None])[0, 0])


def astronaut_variants() -> dict[str, np.ndarray]:
    photo = skimage.data.astronaut()
    grey = np.repeat(photo.mean(axis=2, keepdims=True), 3, axis=2).astype(np.uint8)
    return {
        "crop": photo[20:300, 100:400],
        "mirror": photo[:, ::-1],
        "grey": grey,
        "channels swapped": photo[..., ::-1],
        "darker": (photo * 0.6).astype(np.uint8),
        "brighter": np.clip(photo * 1.3 + 20, 0, 255).astype(np.uint8),
        "half size": np.asarray(Image.fromarray(photo).resize((256, 256), Image.BILINEAR)),
    }


@pytest.fixture(scope="module")
def astronaut_faces(dlib_recognizer):
    original = largest(dlib_recognizer.faces(skimage.data.astronaut()))
    variants = {name: largest(dlib_recognizer.faces(np.ascontiguousarray(photo))) for name, photo in astronaut_variants().items()}
    return original, variants


def test_the_same_person_under_crops_flips_and_colour_changes_is_above_the_threshold(astronaut_faces):
    original, variants = astronaut_faces
    for name, face in variants.items():
        assert similarity(original, face) >= THRESHOLD, name


def test_different_people_are_below_the_threshold(group, astronaut_faces):
    _, faces = group
    original, _ = astronaut_faces
    for a, b in itertools.combinations([*faces, original], 2):
        assert similarity(a, b) < THRESHOLD


def test_the_cosine_threshold_agrees_with_dlibs_own_distance_rule(group, astronaut_faces):
    _, faces = group
    original, variants = astronaut_faces
    everyone = [*faces, original, *variants.values()]
    for a, b in itertools.combinations(everyone, 2):
        same_by_distance = np.linalg.norm(a.embedding - b.embedding) < DLIB_SAME_PERSON_DISTANCE
        assert same_by_distance == (similarity(a, b) >= THRESHOLD)


def test_assignment_finds_each_subjects_face_in_the_group_photo(dlib_recognizer, group):
    photo, faces = group
    subjects = [4, 0, 2]  # portraits of three of the six, in an order unrelated to the photo's
    references = [face_photo(photo, faces[index].box) for index in subjects]
    report = measure_identity(dlib_recognizer, references, [photo])
    (result,) = report.images
    assert len(result.boxes) == 6
    for subject, expected in zip(result.subjects, subjects):
        assert result.boxes[subject.face] == faces[expected].box
        assert subject.same_person and not subject.mixed and not subject.missing
    assert result.score == min(s.similarity for s in result.subjects) >= THRESHOLD


def test_a_face_painted_with_the_other_subjects_identity_is_flagged_mixed(dlib_recognizer, group):
    photo, faces = group
    first, second = (face_photo(photo, faces[index].box) for index in (1, 3))
    # both people in the picture show the second subject's face (the left one mirrored)
    picture = side_by_side(np.ascontiguousarray(second[:, ::-1]), second)
    report = measure_identity(dlib_recognizer, [first, second], [picture])
    subject_1, subject_2 = report.images[0].subjects
    assert subject_1.mixed and subject_1.closest_subject == 1 and not subject_1.same_person
    assert not subject_2.mixed and subject_2.same_person
    assert "subject 1: " in report.table() and "MIXED: the face is closer to subject 2's reference" in report.table()


def test_a_missing_face_is_flagged_missing(dlib_recognizer, group):
    photo, faces = group
    first, second = (face_photo(photo, faces[index].box) for index in (1, 3))
    report = measure_identity(dlib_recognizer, [first, second], [side_by_side(second)])
    subject_1, subject_2 = report.images[0].subjects
    assert subject_1.missing and subject_1.similarity is None and subject_1.face is None
    assert subject_2.same_person
    assert report.images[0].score == MISSING_SIMILARITY


def test_a_picture_without_faces_is_a_result_not_an_error(dlib_recognizer):
    astronaut = skimage.data.astronaut()
    report = measure_identity(dlib_recognizer, [astronaut], [skimage.data.coffee(), astronaut])
    coffee, same = report.images
    assert coffee.boxes == [] and coffee.subjects[0].missing and coffee.score == MISSING_SIMILARITY
    assert same.subjects[0].similarity == pytest.approx(1.0)
    assert report.order() == [1, 0]
    assert "image 0 (rank 2 of 2): score -1.000, no face found" in report.table()


def test_a_reference_photo_without_a_face_is_an_error_naming_it(dlib_recognizer):
    with pytest.raises(ValueError, match="no face found in reference photo 1"):
        measure_identity(dlib_recognizer, [skimage.data.astronaut(), skimage.data.coffee()], [skimage.data.astronaut()])
