"""Face-diffuser Identity Score in ComfyUI, on real photos: the insightface path with the InsightFace Loader's
recognition model (a stand-in in ArcFace's layout, tests/support/insightface_test_pack.py), the dlib path with dlib's
real ResNet, the outputs, the UI result a headless client reads, and the errors."""

from __future__ import annotations

import json
import logging
import sys

import numpy as np
import pytest
import skimage.data
from PIL import Image

from face_photos import comfy_image, face_photo, insightface_image, side_by_side
from insightface_test_pack import recognition_reference, write_detector_pack, write_recognition_model
from subject_fixtures import models_dir

PACK = "recognitionpack"
NODE = "FaceDiffuserIdentityScore"


@pytest.fixture(scope="module")
def insightface_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    pack = root / "insightface" / "models" / PACK
    write_detector_pack(pack)
    write_recognition_model(pack)
    write_detector_pack(root / "insightface" / "models" / "antelopev2")  # a pack without its glintr100.onnx
    with models_dir(root):
        yield root


@pytest.fixture(scope="module")
def face_analysis(comfyui, insightface_models):
    (analysis,) = comfyui.run("FaceDiffuserInsightFaceLoader", pack=PACK, provider="auto", det_size=640)
    return analysis


@pytest.fixture(scope="module")
def group():
    return insightface_image("t1.jpg")


def score(comfyui, references, images, recognition="dlib", keep_best=0, face_analysis=None, **choice):
    """The node's NodeOutput (outputs and UI result), as ComfyUI's executor gets it."""
    inputs = dict(references=comfy_image(*references), images=comfy_image(*images), recognition=recognition, keep_best=keep_best,
                  **choice)
    if face_analysis is not None:
        inputs["face_analysis"] = face_analysis
    return comfyui.node(NODE).PREPARE_CLASS_CLONE({}).execute(**inputs)


def test_the_loader_provides_the_packs_recognition_model_on_the_fallback_provider(comfyui, insightface_models, caplog):
    with caplog.at_level(logging.INFO):
        (analysis,) = comfyui.run("FaceDiffuserInsightFaceLoader", pack=PACK, provider="CUDA", det_size=640)
    assert "face recognition with arcface_stand_in.onnx" in caplog.text
    assert set(analysis.models) == {"detection", "recognition"}
    assert analysis.models["recognition"].session.get_providers() == ["CPUExecutionProvider"]


def test_insightface_path_finds_each_subject_with_the_packs_recognition_model(comfyui, face_analysis, group):
    from insightface.utils import face_align

    bgr = np.ascontiguousarray(group[:, :, ::-1])
    detected = sorted(face_analysis.get(bgr), key=lambda face: face.bbox[0])
    assert len(detected) == 6
    subjects = [3, 5, 1]
    references = [face_photo(group, detected[index].bbox[:4], size=240) for index in subjects]
    output = score(comfyui, references, [group], recognition="insightface", face_analysis=face_analysis)
    (entry,) = output.ui["facediffuser_identity"]
    assert entry["model"] == "arcface_stand_in" and entry["faces"] == 6

    def embedding(photo_bgr, face):
        """The stand-in model's embedding computed from insightface's own alignment, in numpy."""
        return recognition_reference(face_align.norm_crop(photo_bgr, landmark=face.kps, image_size=112)[:, :, ::-1])

    reference_embeddings = []
    for photo in references:
        photo_bgr = np.ascontiguousarray(photo[:, :, ::-1])
        (face,) = face_analysis.get(photo_bgr)
        reference_embeddings.append(embedding(photo_bgr, face))
    for subject, index in zip(entry["subjects"], subjects):
        np.testing.assert_allclose(subject["box"], np.round(detected[index].bbox[:4], 1), atol=0.051)
        expected = embedding(bgr, detected[index])
        reference = reference_embeddings[subject["subject"]]
        assert subject["similarity"] == pytest.approx(expected @ reference / np.linalg.norm(expected) / np.linalg.norm(reference), abs=1e-5)
        assert subject["same_person"] and not subject["mixed"]


def test_a_pack_without_recognition_fails_only_where_recognition_is_needed(comfyui, insightface_models, group):
    (detector_only,) = comfyui.run("FaceDiffuserInsightFaceLoader", pack="antelopev2", provider="CPU", det_size=640)
    folder = insightface_models / "insightface" / "models" / "antelopev2"
    with pytest.raises(ValueError) as error:
        score(comfyui, [group], [group], recognition="insightface", face_analysis=detector_only)
    message = str(error.value)
    assert message.startswith("Face-diffuser Identity Score: ") and "glintr100.onnx" in message and str(folder) in message
    assert "recognition = dlib" in message
    # detection alone still works for the reference-face node
    boxes = comfyui.pack("nodes.reference_faces").detect_face_boxes(detector_only, comfy_image(group)[0])
    assert len(boxes) == 6
    # adding the file changes the loader's fingerprint, so ComfyUI loads the pack anew instead of reusing it; also
    # with pack 'auto', the shipped workflows' choice, which is no folder's name
    loader = comfyui.node("FaceDiffuserInsightFaceLoader")
    packs = ("antelopev2", "auto")
    before = [loader.fingerprint_inputs(pack=pack, provider="CPU", det_size=640) for pack in packs]
    added = write_recognition_model(folder, "glintr100.onnx")
    try:
        after = [loader.fingerprint_inputs(pack=pack, provider="CPU", det_size=640) for pack in packs]
        assert [new != old for new, old in zip(after, before)] == [True, True]
    finally:
        added.unlink()


def test_insightface_without_a_face_analysis_says_what_to_connect(comfyui, group):
    with pytest.raises(ValueError, match="recognition = insightface needs the face_analysis input: connect the Face-diffuser InsightFace Loader"):
        score(comfyui, [group], [group], recognition="insightface")


def test_dlib_outputs_scores_table_annotated_and_best_first(comfyui, group):
    astronaut = skimage.data.astronaut()[:280, 90:370]  # her head: the full photo has a face-like patch on the suit
    portrait = face_photo(group, (724, 367, 832, 474), size=240)  # the fourth person from the left
    # pictures: nobody; both; the second subject only; the astronaut twice (mixing); all four 240x240 squares
    pictures = [side_by_side(skimage.data.coffee(), skimage.data.coffee()), side_by_side(astronaut, portrait),
                side_by_side(portrait, skimage.data.coffee()), side_by_side(astronaut, astronaut[:, ::-1])]
    output = score(comfyui, [side_by_side(astronaut), portrait], pictures, keep_best=2)
    scores, table, annotated, best, identity = output.result
    assert len(scores) == 4 and scores[0] == -1.0 and scores[2] == -1.0
    assert scores[1] >= identity.threshold.similarity and scores[3] < scores[1]
    assert identity.order() == [1, 3, 0, 2]
    assert "image 0 (rank 3 of 4): score -1.000, no face found" in table and "MIXED" in table
    assert annotated.shape == (4, 240, 480, 3) and 0 <= float(annotated.min()) and float(annotated.max()) <= 1
    assert not np.allclose(annotated[1].numpy(), comfy_image(pictures[1])[0].numpy(), atol=1 / 255)  # boxes drawn
    np.testing.assert_array_equal(best.numpy(), comfy_image(pictures[1], pictures[3]).numpy())

    entries = json.loads(json.dumps(output.ui["facediffuser_identity"]))  # what /history serves
    assert [e["batch_index"] for e in entries] == [0, 1, 2, 3] and [e["rank"] for e in entries] == [2, 0, 3, 1]
    assert entries[3]["subjects"][1]["mixed"] and entries[3]["subjects"][1]["closest_subject"] == 0
    assert entries[2]["subjects"][0]["missing"] and entries[2]["subjects"][0]["similarity"] is None
    assert entries[1]["model"] == "dlib_face_recognition_resnet_model_v1" and entries[1]["threshold"] == 0.93
    assert len(output.ui["images"]) == 4 and all(image["type"] == "temp" for image in output.ui["images"])


def test_dlib_with_a_face_analysis_connected_says_it_is_not_used(comfyui, face_analysis):
    astronaut = skimage.data.astronaut()
    output = score(comfyui, [astronaut], [astronaut], face_analysis=face_analysis)
    assert "The connected face_analysis is not used" in output.result[1]


def test_missing_dlib_explains_the_install(comfyui, monkeypatch):
    recognition = comfyui.pack("facediffuser_core.recognition")
    recognition._dlib_models.cache_clear()
    monkeypatch.setitem(sys.modules, "dlib", None)  # makes `import dlib` raise ImportError
    try:
        with pytest.raises(RuntimeError) as error:
            score(comfyui, [skimage.data.astronaut()], [skimage.data.astronaut()])
    finally:
        recognition._dlib_models.cache_clear()
    message = str(error.value)
    assert "pip install dlib-bin face-recognition-models" in message and sys.executable in message
    assert "the dlib package is not installed" in message


def test_a_reference_without_a_face_names_the_node_and_the_photo(comfyui):
    coffee = np.asarray(skimage.data.coffee()[:400, :400])
    with pytest.raises(ValueError, match="Face-diffuser Identity Score: no face found in reference photo 1"):
        score(comfyui, [skimage.data.astronaut()[:400, :400], coffee], [coffee])


@pytest.mark.slow  # 2.3 s here
def test_the_reference_face_is_chosen_as_the_encoder_chooses_it(comfyui, group):
    """A reference photo with two people: the score is about the one face / face_index pick, as in Encode
    Reference Faces, not always the largest."""
    astronaut = skimage.data.astronaut()[:280, 90:370]
    portrait = face_photo(group, (724, 367, 832, 474), size=240)
    small = np.zeros((240, 240, 3), np.uint8)
    small[60:180, 60:180] = np.asarray(Image.fromarray(portrait).resize((120, 120), Image.BILINEAR))
    two_people = np.concatenate([side_by_side(astronaut), small], axis=1)  # the astronaut's face larger, on the left
    pictures = [side_by_side(portrait, skimage.data.coffee()), side_by_side(skimage.data.coffee(), astronaut)]

    def similarities(**choice):
        (entries,) = [score(comfyui, [two_people], pictures, **choice).ui["facediffuser_identity"]]
        return [entry["subjects"][0]["similarity"] for entry in entries]

    alone = [entry["subjects"][0]["similarity"] for entry in score(comfyui, [side_by_side(portrait)], pictures).ui["facediffuser_identity"]]
    largest, second = similarities(), similarities(face="index", face_index=1)
    assert largest == similarities(face="index", face_index=0)  # the astronaut: the largest and the leftmost
    assert largest[1] > largest[0] and second[0] > second[1]  # each choice recognises its own person
    assert second[0] == pytest.approx(alone[0], abs=0.05)
    with pytest.raises(ValueError, match="Identity Score: reference photo 0: face index 2 asked for, but only 2 faces"):
        similarities(face="index", face_index=2)
