"""Face-diffuser Stage Sweep and Stage Sweep Grid: one seed sampled over a grid of alpha and beta values, and
the labelled picture of it (facediffuser_core.stage_sweep), so the identity/scene trade-off is seen at once.

The sweep runs the SNF Sampler's procedure (nodes.sampling.snf_sample) once per cell inside one node
execution: both models are requested for every cell but loaded once, and stay loaded between cells, so the
grid costs the sampling runs it contains and no more memory than one of them.
"""

from __future__ import annotations

import logging

import torch

import comfy.model_management
from comfy_api.latest import io

from ..facediffuser_core.face_crop import to_uint8_array
from ..facediffuser_core.stage_sweep import StageGrid, grid_picture
from . import legacy_inputs
from . import regions as region_inputs
from .sampling import model_and_conditioning_inputs, noise_and_denoise_inputs, schedule_inputs, snf_sample
from .types import Identity, StageSweep

SWEEP_NAME = "Face-diffuser Stage Sweep"
GRID_NAME = "Face-diffuser Stage Sweep Grid"


class FaceDiffuserStageSweep(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FaceDiffuserStageSweep",
            display_name=SWEEP_NAME,
            category="facediffuser/sampling",
            description=(
                "Samples one seed with the SNF Sampler at every combination of the listed alpha (rows) and beta (columns) "
                "values, in one run with the models loaded once. Outputs the pictures' latents, row by row, and the grid "
                "for the Stage Sweep Grid. Splits with beta below alpha are skipped and shown empty. Costs one SNF sampling "
                "per cell."
            ),
            inputs=[
                *model_and_conditioning_inputs(),
                io.Latent.Input("latent_image", tooltip="A latent of batch size 1 (Empty Latent Image): one picture per cell."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="The one seed every cell is sampled from, so cells differ only by their split."),
                *schedule_inputs(),
                io.String.Input("alphas", default="0.2, 0.3, 0.4",
                                tooltip="The grid's rows: ends of scene construction as fractions of the steps, separated by commas."),
                io.String.Input("betas", default="0.5, 0.6, 0.7",
                                tooltip="The grid's columns: ends of fusion as fractions of the steps, separated by commas."),
                *noise_and_denoise_inputs("As in the SNF Sampler: below 1, only the last steps of a longer schedule run."),
                *region_inputs.inputs(),
            ],
            outputs=[
                io.Latent.Output(tooltip="One picture per sampled cell, row by row (alpha), left to right (beta)."),
                StageSweep.Output("sweep", tooltip="The alpha and beta values, for the Face-diffuser Stage Sweep Grid."),
            ],
        )

    @classmethod
    def validate_inputs(cls, noise="comfyui") -> bool | str:
        return legacy_inputs.check_noise(noise)

    @classmethod
    def execute(cls, tdm, sdm, augmented, text, null, latent_image, seed, steps, cfg, sampler_name, scheduler,
                alphas, betas, noise="comfyui", denoise=1.0, regions=None, outside_regions="snf", auto_regions=None) -> io.NodeOutput:
        noise, denoise = legacy_inputs.legacy_noise_and_denoise(SWEEP_NAME, noise, denoise)
        try:
            grid = StageGrid.parse(alphas, betas)
        except ValueError as error:
            raise ValueError(f"{SWEEP_NAME}: {error}") from error
        if latent_image["samples"].shape[0] != 1:
            raise ValueError(
                f"{SWEEP_NAME}: latent_image has a batch of {latent_image['samples'].shape[0]}; the sweep samples one picture "
                "per cell from one seed, so give it batch size 1 (Empty Latent Image's batch_size)"
            )
        cells = grid.cells
        if not cells:
            raise ValueError(f"{SWEEP_NAME}: every beta ({betas}) is below every alpha ({alphas}), so no split exists: "
                             "fusion ends at beta, which must not come before alpha")
        if grid.skipped:
            logging.info("%s: %d split(s) with beta below alpha are skipped", SWEEP_NAME, grid.skipped)
        samples = []
        for index, cell in enumerate(cells):
            comfy.model_management.throw_exception_if_processing_interrupted()
            logging.info("%s: cell %d of %d, alpha %g, beta %g", SWEEP_NAME, index + 1, len(cells), cell.alpha, cell.beta)
            out, _ = snf_sample(SWEEP_NAME, tdm, sdm, augmented, text, null, latent_image, seed, steps, cfg,
                                sampler_name, scheduler, cell.alpha, cell.beta, denoise, noise_kind=noise,
                                masks=regions, outside_regions=outside_regions, auto_regions=auto_regions)
            samples.append(out["samples"])
        out["samples"] = torch.cat(samples)
        out.pop("batch_index", None)  # the cells' batch, not the input's position in a larger one
        return io.NodeOutput(out, grid)


class FaceDiffuserStageSweepGrid(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FaceDiffuserStageSweepGrid",
            display_name=GRID_NAME,
            category="facediffuser/sampling",
            description=(
                "Lays a Stage Sweep's decoded pictures out as a grid, alpha by rows and beta by columns, with the values in "
                "the margins. With the Identity Score's results connected, each cell shows its identity score (green at or "
                "above the model's same-person threshold) and the best cell is framed."
            ),
            inputs=[
                io.Image.Input("images", tooltip="The sweep's pictures: VAE Decode of the Stage Sweep's LATENT."),
                StageSweep.Input("sweep", tooltip="From the Face-diffuser Stage Sweep."),
                Identity.Input("identity", optional=True,
                               tooltip="Face-diffuser Identity Score's identity output for the same pictures."),
            ],
            outputs=[io.Image.Output(display_name="grid")],
        )

    @classmethod
    def execute(cls, images, sweep: StageGrid, identity=None) -> io.NodeOutput:
        cells = len(sweep.cells)
        if images.shape[0] != cells:
            raise ValueError(f"{GRID_NAME}: images has {images.shape[0]} pictures but the sweep sampled {cells} cells: connect the "
                             "VAE Decode of this Stage Sweep's LATENT")
        if identity is not None and len(identity.images) != cells:
            raise ValueError(f"{GRID_NAME}: identity scored {len(identity.images)} pictures but the sweep sampled {cells} cells: "
                             "score the same decoded pictures")
        pictures = to_uint8_array(images)
        picture = grid_picture(sweep, pictures, identity)
        return io.NodeOutput(torch.from_numpy(picture).float().unsqueeze(0) / 255)


NODES = [FaceDiffuserStageSweep, FaceDiffuserStageSweepGrid]
