"""Loaders for the official Face-diffuser checkpoints (and FastComposer's, which has the SDM layout).

The files are read and classified by facediffuser_core; the networks are built from their parts by
nodes.networks, sized from their tensor shapes. Each part of the state dict is released as soon as its ComfyUI
object holds the weights.
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch

import comfy.model_patcher
import comfy.sd
import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..facediffuser_core import checkpoint
from ..facediffuser_core.checkpoint import CheckpointKind, ModelParts
from ..facediffuser_core.checkpoint_file import CheckpointFileError, read_state_dict
from ..facediffuser_core.postfuse import PostfuseModule
from ..facediffuser_core.sd15_keys import sd15_to_parts
from . import networks
from .subject_encoder import SubjectEncoder
from .types import SubjectEncoder as SubjectEncoderType

MODEL_FOLDER = "facediffuser"
MODEL_EXTENSIONS = {".bin", ".safetensors"}
WEIGHT_DTYPES = {"default": None, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
ALL_KINDS = (CheckpointKind.SDM, CheckpointKind.TDM, CheckpointKind.SD15)


# A model's two formats: the official download (renamed .bin) and its conversion. The shipped templates name the
# conversion, the set-up leaves the .bin unless asked to convert, so a loader takes either for the other's name.
CHECKPOINT_FORMATS = (".safetensors", ".bin")


def register_model_folder() -> None:
    """models/facediffuser, also reachable through extra_model_paths.yaml under the key `facediffuser`."""
    folder_paths.add_model_folder_path(MODEL_FOLDER, os.path.join(folder_paths.models_dir, MODEL_FOLDER), is_default=True)
    folder_paths.folder_names_and_paths[MODEL_FOLDER][1].update(MODEL_EXTENSIONS)


def installed_name(ckpt_name: str) -> str | None:
    """The file ckpt_name names in the model folders, else the same model in its other format, else None."""
    names = folder_paths.get_filename_list(MODEL_FOLDER)
    if ckpt_name in names:
        return ckpt_name
    stem, suffix = os.path.splitext(ckpt_name)
    if suffix in CHECKPOINT_FORMATS:
        return next((stem + other for other in CHECKPOINT_FORMATS if stem + other in names), None)
    return None


def missing_checkpoint(node: str, ckpt_name: str) -> str:
    folders = folder_paths.get_folder_paths(MODEL_FOLDER)
    return (f"{node}: checkpoint '{ckpt_name}' not found; expected it at {os.path.join(folders[0], ckpt_name)} "
            f"(searched: {', '.join(folders)}). Run `python scripts/facediffuser_setup.py` from the pack's folder, "
            f"or pick one of the files there in the loader")


def validate_checkpoint(node: str, ckpt_name: str) -> bool | str:
    """Replaces ComfyUI's check of the combo value, which refuses a template's .safetensors name when only the .bin
    is in place."""
    return True if installed_name(ckpt_name) is not None else missing_checkpoint(node, ckpt_name)


def resolve_path(node: str, ckpt_name: str) -> str:
    installed = installed_name(ckpt_name)
    if installed is not None and installed != ckpt_name:
        logging.info("%s: %s is not installed; loading the same model from %s", node, ckpt_name, installed)
    path = folder_paths.get_full_path(MODEL_FOLDER, installed or ckpt_name)
    if path is None:
        raise FileNotFoundError(missing_checkpoint(node, ckpt_name))
    return path


def read_parts(node: str, path: str, accepted: tuple[CheckpointKind, ...], expected: str) -> tuple[ModelParts, str]:
    """The checkpoint's parts and what it was classified as, or a ValueError naming node, file, found and expected."""
    try:
        state_dict = read_state_dict(path)
    except CheckpointFileError as error:
        raise CheckpointFileError(f"{node}: {error}") from error
    found = checkpoint.classify(state_dict)
    if found.kind not in accepted:
        raise ValueError(f"{node}: {os.path.basename(path)} is {found.description}; expected {expected}. {accepted_hint(found.kind)}")
    if found.kind is CheckpointKind.SD15:
        return sd15_to_parts(state_dict), found.description
    return checkpoint.split_official(state_dict), found.description


def accepted_hint(kind: CheckpointKind) -> str:
    if kind is CheckpointKind.TDM or kind is CheckpointKind.SD15:
        return "Load it with Face-diffuser TDM Loader."
    if kind is CheckpointKind.SDM:
        return "Load it with Face-diffuser SDM Loader."
    return "Choose the official Face-diffuser SDM/TDM file (or FastComposer's, as an SDM)."


def describe(name: str, kind: str, model, clip, vae_present: bool) -> str:
    return (
        f"{name}: {kind}; UNet {model.model.get_dtype()} {comfy.utils.calculate_parameters(model.model.diffusion_model.state_dict()) / 1e6:.0f}M params, "
        f"text encoder {clip.cond_stage_model.clip_l.transformer.num_layers} layers" + ("" if vae_present else "; no VAE in the file")
    )


@contextlib.contextmanager
def building(node: str, ckpt_name: str):
    """Structure problems found while building the networks, reported with the node, the file and the fix."""
    try:
        yield
    except ValueError as error:
        raise ValueError(
            f"{node}: {ckpt_name} cannot be loaded: {error}. The file does not hold the SD1.5-family networks a "
            "Face-diffuser checkpoint has; check that it is the official SDM/TDM file (or its conversion) and "
            "re-download it if it is."
        ) from error


def load_common(node: str, path: str, parts: ModelParts, weight_dtype: str):
    dtype = WEIGHT_DTYPES[weight_dtype]
    model = networks.build_model(parts.unet, dtype)
    clip = networks.build_clip(parts.text_encoder, dtype)
    # As core's loaders do: a dynamic-VRAM patcher (ComfyUI's default on NVIDIA) is rebuilt from the file as a
    # classic one when something needs a non-dynamic copy (TorchCompileModel, Set CLIP Hooks, hooked
    # conditionings, MultiGPU clones).
    model.cached_patcher_init = (rebuild_patcher, (node, path, "unet", weight_dtype))
    clip.patcher.cached_patcher_init = (rebuild_patcher, (node, path, "text_encoder", weight_dtype))
    if parts.vae:
        vae = networks.build_vae(parts.vae)
        vae.patcher.cached_patcher_init = (rebuild_patcher, (node, path, "vae", weight_dtype))
    else:
        vae = comfy.sd.VAE(sd={})
        logging.warning("%s: the checkpoint has no VAE; its VAE output cannot decode: use the TDM's VAE", node)
    parts.vae = {}
    return model, clip, vae


def rebuild_patcher(node: str, path: str, part: str, weight_dtype: str, disable_dynamic: bool = False) -> comfy.model_patcher.ModelPatcher:
    """One network of a checkpoint file freshly built from the file: the cached_patcher_init factory."""
    parts, _ = read_parts(node, path, ALL_KINDS, "the checkpoint this loader read before")
    dtype = WEIGHT_DTYPES[weight_dtype]
    with building(node, os.path.basename(path)):
        if part == "unet":
            return networks.build_model(parts.unet, dtype, disable_dynamic)
        if part == "text_encoder":
            return networks.build_clip(parts.text_encoder, dtype, disable_dynamic).patcher
        # Core rebuilds a VAE with its default patcher whatever is asked (comfy.sd.load_vae_patcher); so do we.
        return networks.build_vae(parts.vae).patcher


CKPT_TOOLTIP = ("A file in models/facediffuser: the official pytorch_model.bin (renamed) or its .safetensors conversion. "
                "A name whose file is missing loads the same model in the other format (.bin or .safetensors) when that is there.")
DTYPE_TOOLTIP = (
    "Weight dtype of the UNet, text encoder and (SDM) vision tower. 'default' lets ComfyUI choose for your "
    "device, as its checkpoint loader does; the VAE always uses ComfyUI's choice (VAEs overflow in fp16)."
)


def ckpt_input() -> io.Combo.Input:
    return io.Combo.Input("ckpt_name", options=folder_paths.get_filename_list(MODEL_FOLDER), tooltip=CKPT_TOOLTIP)


def dtype_input() -> io.Combo.Input:
    return io.Combo.Input("weight_dtype", options=list(WEIGHT_DTYPES), default="default", tooltip=DTYPE_TOOLTIP)


class CheckpointLoader(io.ComfyNode):
    DISPLAY = ""

    @classmethod
    def validate_inputs(cls, ckpt_name: str) -> bool | str:
        return validate_checkpoint(cls.DISPLAY, ckpt_name)


class FaceDiffuserSDMLoader(CheckpointLoader):
    DISPLAY = "Face-diffuser SDM Loader"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FaceDiffuserSDMLoader",
            display_name=cls.DISPLAY,
            category="facediffuser/loaders",
            description=(
                "Loads the subject-augmented diffusion model (SDM) of Face-diffuser, or a FastComposer checkpoint, "
                "which has the same layout: its SD1.5 UNet, text encoder and VAE, and the subject encoder "
                "(CLIP ViT-L/14 vision tower, projection and postfuse MLP) that writes reference faces into the prompt."
            ),
            inputs=[ckpt_input(), dtype_input()],
            outputs=[
                io.Model.Output(tooltip="The SDM's UNet."),
                io.Clip.Output(tooltip="The SDM's text encoder; Face-diffuser encodes all three prompts with it."),
                io.Vae.Output(tooltip="The SDM's VAE (unusable if the file carries none)."),
                SubjectEncoderType.Output(tooltip="Vision tower + postfuse, for Face-diffuser Encode Reference Faces / Subject Prompt."),
            ],
        )

    @classmethod
    def execute(cls, ckpt_name: str, weight_dtype: str = "default") -> io.NodeOutput:
        path = resolve_path(cls.DISPLAY, ckpt_name)
        parts, found = read_parts(cls.DISPLAY, path, (CheckpointKind.SDM,), "an SDM (Face-diffuser SDM or FastComposer)")
        dtype = WEIGHT_DTYPES[weight_dtype]
        with building(cls.DISPLAY, ckpt_name):
            model, clip, vae = load_common(cls.DISPLAY, path, parts, weight_dtype)
            encoder = SubjectEncoder(clip_vision=networks.build_clip_vision(parts.image_encoder, dtype), postfuse=PostfuseModule.from_state_dict(parts.postfuse))
        parts.postfuse = {}
        logging.info("Face-diffuser: loaded %s", describe(ckpt_name, found, model, clip, vae.first_stage_model is not None))
        return io.NodeOutput(model, clip, vae, encoder)


class FaceDiffuserTDMLoader(CheckpointLoader):
    DISPLAY = "Face-diffuser TDM Loader"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FaceDiffuserTDMLoader",
            display_name=cls.DISPLAY,
            category="facediffuser/loaders",
            description=(
                "Loads the text-driven diffusion model (TDM) of Face-diffuser: the official file, or its conversion, "
                "which is an ordinary SD1.5 single-file checkpoint (any SD1.5 checkpoint loads here too)."
            ),
            inputs=[ckpt_input(), dtype_input()],
            outputs=[
                io.Model.Output(tooltip="The TDM's UNet."),
                io.Clip.Output(tooltip="The TDM's text encoder."),
                io.Vae.Output(tooltip="The TDM's VAE."),
            ],
        )

    @classmethod
    def execute(cls, ckpt_name: str, weight_dtype: str = "default") -> io.NodeOutput:
        path = resolve_path(cls.DISPLAY, ckpt_name)
        parts, found = read_parts(
            cls.DISPLAY,
            path,
            (CheckpointKind.TDM, CheckpointKind.SD15),
            "a TDM (unet, text_encoder and vae weights) or an SD1.5 single-file checkpoint such as a converted TDM",
        )
        with building(cls.DISPLAY, ckpt_name):
            model, clip, vae = load_common(cls.DISPLAY, path, parts, weight_dtype)
        logging.info("Face-diffuser: loaded %s", describe(ckpt_name, found, model, clip, True))
        return io.NodeOutput(model, clip, vae)


NODES = [FaceDiffuserSDMLoader, FaceDiffuserTDMLoader]
