"""Auto regions without insightface or a real VAE, for the ComfyUI tier: a stand-in VAE and a face analysis that
finds fixed boxes, and the Auto Regions node made of them."""

from __future__ import annotations

import numpy as np
import torch


FACES = [(62.0, 10.0, 78.0, 28.0), (14.0, 16.0, 30.0, 34.0)]  # right, left, in the 96x64 picture


class StandInVAE:
    """Decodes a latent to a picture of its size x 8 and keeps what it was given; with `unload`, it first unloads
    every model, as loading a real VAE into a full GPU does, or those `unload(patcher)` picks."""

    def __init__(self, unload=False):
        self.latents = []
        self.unload = unload

    def decode(self, latent):
        self.latents.append(latent.clone())
        if self.unload is True:
            import comfy.model_management

            comfy.model_management.unload_all_models()
        elif self.unload:
            import comfy.model_management

            loaded = comfy.model_management.current_loaded_models
            for index in reversed(range(len(loaded))):
                if self.unload(loaded[index].model):
                    loaded.pop(index).model_unload()
        picture = torch.sigmoid(latent[:, :3]).repeat_interleave(8, dim=-2).repeat_interleave(8, dim=-1)
        return picture.movedim(1, -1)


class StandInDetector:
    """insightface's detection model with fixed answers, one list of boxes per call (the last one repeats)."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.pictures = []

    def detect(self, img, max_num=0, metric="default"):
        self.pictures.append(img)
        boxes = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        return np.asarray([[*box, 0.9] for box in boxes], dtype=np.float32).reshape(-1, 5), None


class StandInAnalysis:
    """insightface's FaceAnalysis as far as finding faces needs it: its detection model."""

    def __init__(self, *answers):
        self.det_model = StandInDetector(*answers)

    @property
    def pictures(self):
        return self.det_model.pictures


def stand_in_auto_regions(comfyui, *answers, expansion=1.0, unload=False):
    vae, analysis = StandInVAE(unload), StandInAnalysis(*(answers or (FACES,)))
    (auto,) = comfyui.run("FaceDiffuserAutoRegions", vae=vae, face_analysis=analysis, expansion=expansion)
    return auto, vae, analysis
