"""Face-recognition backends: find every face in a photo and embed it, for identity scores.

Two backends, both optional packages imported only when used:
- insightface: a loaded `FaceAnalysis` whose pack holds a detector and an ArcFace recognition model
  (antelopev2's glintr100.onnx, buffalo_l's w600k_r50.onnx). Faces are aligned by their five landmarks to
  the 112x112 crop ArcFace was trained on; the embedding is 512-d.
- dlib: its HOG face detector (the image upsampled once, so faces from about 40 pixels are found), its
  5-point landmark model for alignment and its face-recognition ResNet (128-d), from the PyPI packages
  dlib-bin (or dlib) and face-recognition-models (which holds the model files). Runs on any CPU.

Photos are RGB uint8 arrays (H, W, 3).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass

import numpy as np

from .identity import DLIB_MODEL

DLIB_MODEL_FILES = {
    "landmarks": "shape_predictor_5_face_landmarks.dat",
    "recognition": f"{DLIB_MODEL}.dat",
}
# dlib's detector finds faces down to 80x80 pixels; one upsampling halves that.
DLIB_UPSAMPLE = 1


@dataclass
class Face:
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels
    embedding: np.ndarray


class BackendUnavailable(RuntimeError):
    """A backend's package or model file is missing; the message says which."""


def _rgb(photo: np.ndarray) -> np.ndarray:
    photo = np.asarray(photo)
    if photo.dtype != np.uint8 or photo.ndim != 3 or photo.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 photo (height, width, 3), got {photo.dtype} {photo.shape}")
    return np.ascontiguousarray(photo)


class InsightFaceRecognizer:
    """Detection and ArcFace embeddings from an insightface FaceAnalysis that has a recognition model."""

    def __init__(self, analysis):
        recognition = analysis.models.get("recognition") if hasattr(analysis, "models") else None
        if recognition is None:
            raise BackendUnavailable("the face analysis has no recognition model")
        self.analysis = analysis
        self.model = os.path.splitext(os.path.basename(recognition.model_file))[0]
        self.description = f"insightface {os.path.basename(recognition.model_file)}"

    def faces(self, photo: np.ndarray) -> list[Face]:
        bgr = np.ascontiguousarray(_rgb(photo)[:, :, ::-1])  # insightface reads OpenCV's channel order
        return [Face(tuple(float(v) for v in face.bbox[:4]), np.asarray(face.embedding, dtype=np.float64))
                for face in self.analysis.get(bgr)]


def dlib_model_folder() -> str:
    """Where face-recognition-models keeps dlib's model files. Found without importing the package, whose
    __init__ needs setuptools' pkg_resources, which recent setuptools no longer ship."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or spec.origin is None:
        raise BackendUnavailable("the face-recognition-models package (dlib's model files) is not installed")
    return os.path.join(os.path.dirname(spec.origin), "models")


@functools.lru_cache(maxsize=1)
def _dlib_models():
    try:
        import dlib
    except ImportError as error:
        raise BackendUnavailable(f"the dlib package is not installed ({error})") from error
    folder = dlib_model_folder()
    paths = {role: os.path.join(folder, name) for role, name in DLIB_MODEL_FILES.items()}
    missing = [path for path in paths.values() if not os.path.isfile(path)]
    if missing:
        raise BackendUnavailable(f"dlib's model files are missing: {', '.join(missing)} (reinstall face-recognition-models)")
    return (dlib.get_frontal_face_detector(), dlib.shape_predictor(paths["landmarks"]),
            dlib.face_recognition_model_v1(paths["recognition"]))


class DlibRecognizer:
    """dlib's HOG detector, 5-point alignment and face-recognition ResNet (loaded once per process)."""

    model = DLIB_MODEL
    description = f"dlib {DLIB_MODEL} (dlib's HOG face detector)"

    def __init__(self):
        self.detector, self.landmarks, self.recognition = _dlib_models()

    def faces(self, photo: np.ndarray) -> list[Face]:
        rgb = _rgb(photo)
        faces = []
        for rect in self.detector(rgb, DLIB_UPSAMPLE):
            descriptor = self.recognition.compute_face_descriptor(rgb, self.landmarks(rgb, rect))
            box = (float(rect.left()), float(rect.top()), float(rect.right()), float(rect.bottom()))
            faces.append(Face(box, np.asarray(descriptor, dtype=np.float64)))
        return faces
