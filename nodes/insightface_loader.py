"""Face-diffuser InsightFace Loader: an insightface face-analysis pack for cropping faces out of photos and
recognising them.

The official Face-diffuser demo takes ready-made face crops; this optional loader lets the reference-face
node find and crop the face in an ordinary photo. The pack's ArcFace recognition model (glintr100.onnx in
antelopev2, w600k_r50.onnx in buffalo_l) is loaded with the detector, on the same execution provider, for
the Identity Score node; a pack without one still serves the reference-face node, and only a node that
recognises faces reports the missing file (`recognition_backend`). insightface and onnxruntime are imported
only when this node runs, so the rest of the pack works without them.
"""

from __future__ import annotations

import glob
import logging
import os
import sys

import folder_paths
from comfy_api.latest import io

from ..facediffuser_core.insightface_packs import DEFAULT_PACK, KNOWN_PACK_FILES, recognition_file
from ..facediffuser_core.recognition import InsightFaceRecognizer

NODE_NAME = "Face-diffuser InsightFace Loader"
INSIGHTFACE_FOLDER = "insightface"
PROVIDERS = {
    "CUDA": "CUDAExecutionProvider",
    "ROCm": "ROCMExecutionProvider",
    "CoreML": "CoreMLExecutionProvider",
    "CPU": "CPUExecutionProvider",
}
AUTO_PREFERENCE = ("CUDA", "ROCm", "CoreML", "CPU")
AUTO_PACK = "auto"  # the first known pack that is installed, so that workflows run with whichever the user has
DET_SIZE_STEP = 32  # the detectors' coarsest stride: other sizes break their anchor grids


def install_hint() -> str:
    python = sys.executable
    return (
        f"{NODE_NAME} needs the insightface and onnxruntime packages, which ComfyUI's Python ({python}) cannot import. "
        f"Install them into that Python: `\"{python}\" -m pip install insightface onnxruntime`, and on a machine with an "
        f"NVIDIA GPU then swap in the GPU build: `\"{python}\" -m pip uninstall -y onnxruntime && \"{python}\" -m pip install "
        "onnxruntime-gpu` (the portable Windows build: `python_embeded\\python.exe -m pip install ...`; README 'Install'). "
        "Install only one of onnxruntime and onnxruntime-gpu: both "
        "provide the same `onnxruntime` module, so whichever is installed last overwrites the other (a later "
        "`pip install onnxruntime`, often pulled in by another package, silently removes GPU support); if the CUDA "
        "provider is missing, uninstall both and reinstall onnxruntime-gpu alone. Then restart ComfyUI. "
        "Without insightface, leave the face_analysis input of Face-diffuser Encode Reference Faces unconnected and "
        "give it face crops, as the official demo does."
    )


def insightface_roots() -> list[str]:
    """`<models_dir>/insightface`, after any folders registered under `insightface` (extra_model_paths.yaml)."""
    roots = []
    if INSIGHTFACE_FOLDER in folder_paths.folder_names_and_paths:
        roots.extend(folder_paths.get_folder_paths(INSIGHTFACE_FOLDER))
    default = os.path.join(folder_paths.models_dir, INSIGHTFACE_FOLDER)
    if default not in roots:
        roots.append(default)
    return roots


def available_packs() -> list[str]:
    names = set()
    for root in insightface_roots():
        models = os.path.join(root, "models")
        if os.path.isdir(models):
            names.update(entry for entry in os.listdir(models)
                         if os.path.isdir(os.path.join(models, entry)) and not entry.startswith("."))  # hidden: a set-up's staging
    return sorted(names)


def _onnx_files(folder: str) -> list[str]:
    return sorted(glob.glob(os.path.join(folder, "*.onnx")))


def _expected_files(pack: str) -> str:
    files = KNOWN_PACK_FILES.get(pack)
    return ", ".join(files) if files else "the pack's .onnx files, at least its face detector"


def pack_folders(pack: str) -> list[str]:
    return [os.path.join(root, "models", pack) for root in insightface_roots()]


def resolve_pack_dir(pack: str) -> str:
    """The folder holding the pack's .onnx files; a clear error for a missing or doubly nested pack."""
    candidates = pack_folders(pack)
    for folder in candidates:
        if _onnx_files(folder):
            return folder
    expected = candidates[-1] if len(candidates) == 1 else " or ".join(candidates)
    for folder in candidates:
        if not os.path.isdir(folder):
            continue
        nested = sorted(sub for sub in glob.glob(os.path.join(folder, "*")) if os.path.isdir(sub) and _onnx_files(sub))
        if nested:
            raise ValueError(
                f"{NODE_NAME}: the insightface pack '{pack}' is nested one folder too deep: its .onnx files are in {nested[0]}, "
                f"but they must be directly in {folder} (unzipping often adds that extra '{os.path.basename(nested[0])}' "
                f"folder). Move {_expected_files(pack)} up into {folder} and delete the empty folder."
            )
        raise ValueError(f"{NODE_NAME}: the folder {folder} has no .onnx files; put {_expected_files(pack)} directly in it.")
    raise ValueError(
        f"{NODE_NAME}: the insightface pack '{pack}' was not found. Expected the folder {expected} holding "
        f"{_expected_files(pack)} directly (models/insightface/models/{pack}/*.onnx)."
    )


def resolve_auto_pack() -> tuple[str, str]:
    """The first known pack (in KNOWN_PACK_FILES order) with .onnx files in its folder, and that folder. When none
    is installed, a known pack's folder that exists but is misplaced explains itself; otherwise the error lists
    every folder looked in."""
    for pack in KNOWN_PACK_FILES:
        for folder in pack_folders(pack):
            if _onnx_files(folder):
                return pack, folder
    for pack in KNOWN_PACK_FILES:
        if any(os.path.isdir(folder) for folder in pack_folders(pack)):
            resolve_pack_dir(pack)  # raises what is wrong with it
    looked = "; ".join(folder for pack in KNOWN_PACK_FILES for folder in pack_folders(pack))
    raise ValueError(
        f"{NODE_NAME}: pack '{AUTO_PACK}' found no insightface pack; looked for {' and '.join(KNOWN_PACK_FILES)} in: {looked}. "
        f"Install one with `python scripts/facediffuser_setup.py` (from the pack's folder, with ComfyUI's Python; it installs "
        f"{DEFAULT_PACK}), or put a pack's .onnx files directly in one of those folders."
    )


def choose_provider(requested: str, available: list[str]) -> str:
    """The onnxruntime execution provider to use; an unavailable request falls back to the CPU, with a warning."""
    if requested == "auto":
        for name in AUTO_PREFERENCE:
            if PROVIDERS[name] in available:
                return PROVIDERS[name]
        return PROVIDERS["CPU"]
    wanted = PROVIDERS[requested]
    if wanted in available:
        return wanted
    logging.warning(
        "%s: %s is not available in this onnxruntime (available: %s); using CPUExecutionProvider. For GPU face detection "
        "install onnxruntime-gpu (CUDA) or the ROCm build, and only that one onnxruntime package.",
        NODE_NAME, wanted, ", ".join(available) or "none",
    )
    return PROVIDERS["CPU"]


def recognition_backend(analysis, node: str) -> InsightFaceRecognizer:
    """The loaded pack's detector and ArcFace model as a recognition backend; an error naming the file to add
    when the pack has no recognition model."""
    if not hasattr(analysis, "models") or not hasattr(analysis, "get"):
        raise ValueError(f"{node}: face_analysis must be an insightface FaceAnalysis, such as {NODE_NAME} gives; got {type(analysis).__name__}")
    if "recognition" in analysis.models:
        return InsightFaceRecognizer(analysis)
    folder = getattr(analysis, "model_dir", "the pack's folder")
    wanted = recognition_file(os.path.basename(str(folder)))
    wanted = wanted or "an ArcFace recognition model (.onnx, 112x112 face in, 512-d embedding out; glintr100.onnx of antelopev2 or w600k_r50.onnx of buffalo_l)"
    raise ValueError(
        f"{node}: the insightface pack in {folder} has no face-recognition model, only what detects faces. Put {wanted} "
        f"directly into {folder} (the loader notices the new file at the next run), or choose recognition = dlib."
    )


class FaceDiffuserInsightFaceLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        packs = available_packs() or sorted(KNOWN_PACK_FILES)
        return io.Schema(
            node_id="FaceDiffuserInsightFaceLoader",
            display_name=NODE_NAME,
            category="facediffuser/loaders",
            description=(
                "Loads an insightface face-analysis pack (antelopev2, buffalo_l, ...) from models/insightface/models/<name>/, "
                "whose .onnx files must sit directly in that folder; 'auto' takes whichever known pack is installed. "
                "Optional: Face-diffuser Encode Reference Faces uses it to find and crop the face in ordinary photos, "
                "Face-diffuser Identity Score to find and recognise faces (with the pack's recognition model). Needs the "
                "insightface and onnxruntime packages."
            ),
            inputs=[
                io.Combo.Input("pack", options=[AUTO_PACK, *packs], default=AUTO_PACK,
                               tooltip=f"The folder name under models/insightface/models/. {AUTO_PACK}: the first of "
                                       f"{', '.join(KNOWN_PACK_FILES)} that is installed (the log says which)."),
                io.Combo.Input("provider", options=["auto", *PROVIDERS], default="auto",
                               tooltip="Where onnxruntime runs the models. auto takes CUDA, ROCm or CoreML when this onnxruntime "
                                       "offers it, else the CPU; an unavailable choice falls back to the CPU (the log says which ran)."),
                io.Int.Input("det_size", default=640, min=128, max=2048, step=DET_SIZE_STEP,
                             tooltip="Side of the square the photo is scaled into for detection (a multiple of 32). 640 suits "
                                     "most photos; larger finds smaller faces, more slowly."),
            ],
            outputs=[io.FaceAnalysis.Output(display_name="face_analysis")],
        )

    @classmethod
    def fingerprint_inputs(cls, pack: str, provider: str, det_size: int):
        # ComfyUI reuses a loaded pack while the inputs stay the same; a file added to the pack (such as the
        # recognition model the Identity Score asked for) must load it anew. 'auto' may pick any known pack.
        folders = [folder for name in (KNOWN_PACK_FILES if pack == AUTO_PACK else [pack]) for folder in pack_folders(name)]
        return tuple((path, os.path.getmtime(path)) for folder in folders for path in _onnx_files(folder))

    @classmethod
    def execute(cls, pack: str, provider: str, det_size: int) -> io.NodeOutput:
        if det_size % DET_SIZE_STEP:
            raise ValueError(f"{NODE_NAME}: det_size must be a multiple of {DET_SIZE_STEP}, got {det_size}")
        try:
            import onnxruntime
            from insightface.app import FaceAnalysis
        except ImportError as error:
            raise RuntimeError(f"{install_hint()} (import error: {error})") from error
        pack, pack_dir = resolve_auto_pack() if pack == AUTO_PACK else (pack, resolve_pack_dir(pack))
        chosen = choose_provider(provider, list(onnxruntime.get_available_providers()))
        providers = [chosen] if chosen == PROVIDERS["CPU"] else [chosen, PROVIDERS["CPU"]]
        # A folder path (not a bare name) keeps insightface from trying to download the pack.
        try:
            analysis = FaceAnalysis(name=pack_dir, providers=providers)
        except (AssertionError, KeyError) as error:  # insightface asserts that a detector was found
            raise ValueError(
                f"{NODE_NAME}: no face detector among the .onnx files of {pack_dir} "
                f"({', '.join(os.path.basename(f) for f in _onnx_files(pack_dir))}); expected {_expected_files(pack)}"
            ) from error
        analysis.prepare(ctx_id=-1 if chosen == PROVIDERS["CPU"] else 0, det_size=(det_size, det_size))
        logging.info("%s: loaded '%s' from %s with %s (det_size %d)", NODE_NAME, pack, pack_dir, chosen, det_size)
        recognition = analysis.models.get("recognition")
        if recognition is None:
            logging.info("%s: '%s' has no face-recognition model (%s): enough for Encode Reference Faces, not for Identity Score",
                         NODE_NAME, pack, recognition_file(pack) or "an ArcFace .onnx")
        else:
            logging.info("%s: face recognition with %s", NODE_NAME, os.path.basename(recognition.model_file))
        return io.NodeOutput(analysis)


NODES = [FaceDiffuserInsightFaceLoader]
