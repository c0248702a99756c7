"""The Saliency Preview node: shows where each model's guidance was salient and which model painted where."""

from __future__ import annotations

from comfy_api.latest import io, ui

from ..facediffuser_core import saliency_view
from .types import Saliency

LATENT_TO_PIXELS = 8  # SD1.5's VAE


class FaceDiffuserSaliencyPreview(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FaceDiffuserSaliencyPreview",
            display_name="Face-diffuser Saliency Preview",
            category="facediffuser/sampling",
            is_output_node=True,
            description=(
                "Shows pictures of the fusion stage, averaged over its steps, for each image of the batch: the TDM's saliency, the "
                "SDM's saliency (one colour scale for both: brighter = more salient), the share of fusion steps in which the "
                "SDM painted each pixel (white = always), and with an image connected, that image tinted blue where the TDM "
                "painted and orange where the SDM did. With auto regions, every picture outlines the regions found (subject 1 "
                "green, 2 magenta, 3 cyan, 4 yellow). Also outputs the SDM's region as a MASK."
            ),
            inputs=[
                Saliency.Input("saliency", tooltip="From the Face-diffuser SNF Sampler or Face-diffuser Guider."),
                io.Image.Input(
                    "image", optional=True,
                    tooltip="The decoded result of the same sampling, to draw the choice over. With the Guider, connecting it "
                            "also makes the preview run after the sampler.",
                ),
            ],
            outputs=[
                io.Image.Output("images", tooltip="Per image of the batch: TDM saliency, SDM saliency, SDM share (and overlay)."),
                io.Mask.Output("sdm_mask", tooltip="Share of the fusion steps in which the SDM painted each pixel, 0..1."),
            ],
        )

    @classmethod
    def execute(cls, saliency, image=None) -> io.NodeOutput:
        if len(saliency) == 0:
            raise ValueError(
                "Face-diffuser Saliency Preview: the saliency record is empty. Either the fusion stage had no steps "
                "(alpha equals beta, or alpha*steps rounds to the same step as beta*steps): widen beta - alpha; or, "
                "with the Face-diffuser Guider, the sampler had not run yet: connect its decoded image to this node's "
                "'image' input."
            )
        summary = saliency.to("cpu").summary()
        latent_height, latent_width = summary.sdm_fraction.shape[1:]
        size = tuple(image.shape[1:3]) if image is not None else (latent_height * LATENT_TO_PIXELS, latent_width * LATENT_TO_PIXELS)
        try:
            images, mask = saliency_view.render(summary, size, image=image.cpu() if image is not None else None,
                                                regions=saliency.regions)
        except ValueError as error:
            raise ValueError(f"Face-diffuser Saliency Preview, input 'image': {error}") from error
        return io.NodeOutput(images, mask, ui=ui.PreviewImage(images, cls=cls))


NODES = [FaceDiffuserSaliencyPreview]
