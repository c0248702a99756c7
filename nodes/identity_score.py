"""Face-diffuser Identity Score: how well each generated picture keeps each subject's face, as numbers.

For every picture of the batch, all faces are found and embedded with a face-recognition model, compared
with the reference faces (one reference photo per subject, in the order of the prompt's <|image|>
markers) by cosine similarity, and given to the subjects one-to-one by the optimal assignment
(facediffuser_core.identity explains the scores and flags, facediffuser_core.recognition the backends).

Outputs: `scores` (a FLOAT per picture, in batch order: the weakest subject's similarity, -1 when a subject
has no face), `table` (the same per subject, in words), `annotated` (the pictures with every face boxed and
labelled), `best` (the pictures re-ordered best first, the best `keep_best` of them) and `identity` (the
results for other Face-diffuser nodes, such as the Stage Sweep Grid).

Machine-readable result. The node is an output node; its UI result, which ComfyUI keeps in
`GET /history/{prompt_id}` under `[prompt_id]["outputs"][<this node's id>]`, holds:
- "images": the annotated pictures as previews (ComfyUI's usual {"filename", "subfolder", "type": "temp"} list);
- "facediffuser_identity": a list with one object per picture, in the batch order of the node's `images` input:
    {"batch_index": int,        # the picture's index in that batch, from 0
     "rank": int,               # 0 = best picture of the batch (highest score; ties keep batch order)
     "score": float,            # the weakest subject's similarity; -1.0 when a subject is missing
     "faces": int,              # faces detected in the picture
     "model": str,              # recognition model: "glintr100", "w600k_r50", "dlib_face_recognition_resnet_model_v1", ...
     "threshold": float,        # that model's same-person cosine similarity
     "subjects": [              # one per reference photo, in marker order
        {"subject": int,        # 0 = the first <|image|> / the first reference photo
         "similarity": float | null,  # cosine similarity of reference and assigned face; null when missing
         "missing": bool,       # no face was left for this subject
         "mixed": bool,         # the assigned face is closer to another subject's reference
         "same_person": bool,   # similarity >= threshold
         "closest_subject": int | null,  # the subject whose reference the assigned face resembles most
         "face": int | null,    # index of the assigned face among the picture's detected faces
         "box": [x1, y1, x2, y2] | null}],  # its box in pixels
     "similarity": [[float]]}   # every subject (row) against every detected face (column), 4 decimals
"""

from __future__ import annotations

import logging
import sys

import numpy as np
import torch

import comfy.model_management
import comfy.utils
from comfy_api.latest import io, ui

from ..facediffuser_core.face_crop import to_uint8_array
from ..facediffuser_core.identity import measure_identity
from ..facediffuser_core.identity_view import annotate
from ..facediffuser_core.recognition import BackendUnavailable, DlibRecognizer
from .insightface_loader import NODE_NAME as INSIGHTFACE_LOADER
from .insightface_loader import recognition_backend
from .types import Identity

NODE_NAME = "Face-diffuser Identity Score"
RECOGNITION = ("insightface", "dlib")
UI_KEY = "facediffuser_identity"


def dlib_install_hint(reason: str) -> str:
    python = sys.executable
    return (
        f"{NODE_NAME}: recognition = dlib needs the dlib-bin (or dlib) and face-recognition-models packages in ComfyUI's "
        f"Python ({python}), and {reason}. Install them into that Python: `\"{python}\" -m pip install dlib-bin "
        "face-recognition-models` (the second downloads about 100 MB of model files; the portable Windows build: "
        "`python_embeded\\python.exe -m pip install ...`), then restart ComfyUI. Or choose recognition = insightface and "
        f"connect the {INSIGHTFACE_LOADER}."
    )


def _recognizer(recognition: str, face_analysis):
    if recognition == "insightface":
        if face_analysis is None:
            raise ValueError(
                f"{NODE_NAME}: recognition = insightface needs the face_analysis input: connect the {INSIGHTFACE_LOADER} "
                "(its pack must hold a recognition model, such as antelopev2's glintr100.onnx), or choose recognition = dlib."
            )
        return recognition_backend(face_analysis, NODE_NAME)
    if recognition == "dlib":
        try:
            return DlibRecognizer()
        except BackendUnavailable as error:
            raise RuntimeError(dlib_install_hint(str(error))) from error
    raise ValueError(f"{NODE_NAME}: recognition must be one of {', '.join(RECOGNITION)}, got {recognition!r}")


def _uint8_pictures(images: torch.Tensor, name: str) -> list[np.ndarray]:
    if images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"{NODE_NAME}: {name} must be an RGB IMAGE batch (batch, height, width, 3), got shape {tuple(images.shape)}")
    return list(to_uint8_array(images))


class FaceDiffuserIdentityScore(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FaceDiffuserIdentityScore",
            display_name=NODE_NAME,
            category="facediffuser/identity",
            is_output_node=True,
            description=(
                "Measures how well each picture keeps each person: finds and recognises every face, compares it with the "
                "reference photos (cosine similarity of face-recognition embeddings), gives faces to subjects one-to-one by "
                "the best total match, and flags a subject without a face (missing) or whose face looks more like another "
                "subject (mixed). Each picture's score is its weakest subject's similarity; green labels reach the model's "
                "same-person threshold. Also orders the pictures best first, for best-of-N."
            ),
            inputs=[
                io.Image.Input("references", tooltip="The reference photos, one per subject, batched in the order of the <|image|> "
                                                      "markers: the same batch Encode Reference Faces takes; face and face_index choose the face in each."),
                io.Image.Input("images", tooltip="The generated pictures to score (e.g. VAE Decode's output)."),
                io.Combo.Input("recognition", options=list(RECOGNITION), default="insightface",
                               tooltip="insightface: the face_analysis pack's detector and ArcFace model (glintr100.onnx in "
                                       "antelopev2, w600k_r50.onnx in buffalo_l). dlib: dlib's own detector and ResNet on the CPU "
                                       "(needs the dlib-bin and face-recognition-models packages)."),
                io.Int.Input("keep_best", default=0, min=0, max=4096,
                             tooltip="How many pictures the best output keeps, best first; 0 keeps them all, re-ordered."),
                io.FaceAnalysis.Input("face_analysis", optional=True,
                                      tooltip="Face-diffuser InsightFace Loader, for recognition = insightface (dlib does not use it)."),
                io.Combo.Input("face", options=["largest", "index"], default="largest", optional=True,
                               tooltip="Which face of each reference photo is its subject: set it as in Encode Reference Faces, so "
                                       "that the score measures the person that was encoded. largest, or the one at face_index "
                                       "counted from the left."),
                io.Int.Input("face_index", default=0, min=0, max=63, optional=True,
                             tooltip="With face = index: the reference face's position from the left in each photo, 0 = leftmost "
                                     "(as in Encode Reference Faces)."),
            ],
            outputs=[
                io.Float.Output("scores", is_output_list=True,
                                tooltip="One FLOAT per picture, in batch order: its weakest subject's cosine similarity (-1 when a subject has no face)."),
                io.String.Output("table", tooltip="Every picture's subjects, similarities and flags, in words."),
                io.Image.Output("annotated", tooltip="The pictures with each face boxed and labelled with its subject and similarity."),
                io.Image.Output("best", tooltip="The pictures ordered best first, the best keep_best of them."),
                Identity.Output("identity", tooltip="The results, for the Face-diffuser Stage Sweep Grid."),
            ],
        )

    @classmethod
    def execute(cls, references, images, recognition, keep_best, face_analysis=None, face="largest", face_index=0) -> io.NodeOutput:
        recognizer = _recognizer(recognition, face_analysis)
        reference_photos = _uint8_pictures(references, "references")
        pictures = _uint8_pictures(images, "images")
        progress = comfy.utils.ProgressBar(len(pictures))

        def on_picture(index: int) -> None:
            comfy.model_management.throw_exception_if_processing_interrupted()
            progress.update_absolute(index)

        try:
            report = measure_identity(recognizer, reference_photos, pictures, on_picture, face, face_index)
        except ValueError as error:
            raise ValueError(f"{NODE_NAME}: {error}") from error
        progress.update_absolute(len(pictures))
        table = report.table()
        if recognition == "dlib" and face_analysis is not None:
            table += "\nThe connected face_analysis is not used: recognition = dlib finds faces with dlib's own detector."
            logging.warning("%s: face_analysis is connected but recognition = dlib does not use it", NODE_NAME)
        logging.info("%s: %s", NODE_NAME, table)
        annotated = torch.from_numpy(np.stack([annotate(picture, result, report.threshold.similarity)
                                               for picture, result in zip(pictures, report.images)])).float() / 255
        order = report.order()[:keep_best or None]
        best = images[torch.tensor(order, dtype=torch.long)]
        ui_result = {**ui.PreviewImage(annotated, cls=cls).as_dict(), UI_KEY: report.to_json()}
        return io.NodeOutput(report.scores, table, annotated, best, report, ui=ui_result)


NODES = [FaceDiffuserIdentityScore]
