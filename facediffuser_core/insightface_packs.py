"""The insightface model packs people download, as their release zips unpack them, and where to get them.

Plain data without imports, so that the first-run check can read it on a machine without torch.
A pack lives in <models>/insightface/models/<pack>/ with these files directly in it. The reference-face
node only detects faces, so the detector, listed last, is the file a pack cannot do without. The Identity
Score node also needs the pack's ArcFace recognition model (RECOGNITION_FILES).
"""

KNOWN_PACK_FILES = {
    "antelopev2": ("1k3d68.onnx", "2d106det.onnx", "genderage.onnx", "glintr100.onnx", "scrfd_10g_bnkps.onnx"),
    "buffalo_l": ("1k3d68.onnx", "2d106det.onnx", "genderage.onnx", "w600k_r50.onnx", "det_10g.onnx"),
}

# Packs with an official download. insightface's v0.7 release has buffalo_l.zip but no antelopev2.zip
# (the antelopev2 address other packs give answers 404), so antelopev2 comes only from a source the user names.
PACK_SOURCES = {
    "buffalo_l": "https://github.com/deepinsight/insightface/releases/download/v0.7/buffalo_l.zip",
}
DEFAULT_PACK = "buffalo_l"
PACKS_LICENCE = ("insightface's pretrained models are for non-commercial research use only "
                 "(https://github.com/deepinsight/insightface#license)")


def detector_file(pack: str) -> str:
    return KNOWN_PACK_FILES[pack][-1]


# Each pack's ArcFace face-recognition model (112x112 aligned face in, 512-d embedding out).
RECOGNITION_FILES = {"antelopev2": "glintr100.onnx", "buffalo_l": "w600k_r50.onnx"}


def recognition_file(pack: str) -> str | None:
    return RECOGNITION_FILES.get(pack)
