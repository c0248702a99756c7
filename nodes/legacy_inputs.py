"""Inputs as workflows saved by older releases hold them: what ComfyUI's validation must still let through, and how
such values run as they ran then. Each entry names the release that changed the input."""

from __future__ import annotations

import logging

from .official_run import NOISE_CHOICES


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_noise(noise) -> bool | str:
    """ComfyUI's validation of the `noise` input (validate_inputs, SNF Sampler and Stage Sweep), which must also let
    through the number that a UI workflow saved before 0.2.0 added the input puts there (legacy_noise_and_denoise)."""
    if noise in NOISE_CHOICES or (_is_number(noise) and 0.0 <= noise <= 1.0):
        return True
    return f"noise is {noise!r}: choose one of {', '.join(NOISE_CHOICES)}"


def legacy_noise_and_denoise(node: str, noise, denoise: float) -> tuple[str, float]:
    """A UI workflow saved before `noise` existed ends its widget values with denoise, and the frontend fills
    widgets by position: its denoise lands in `noise`, and `denoise` keeps its default. Such a workflow ran with
    ComfyUI's noise."""
    if not _is_number(noise):
        return noise, denoise
    if denoise != 1.0:
        raise ValueError(f"{node}: noise is {noise!r} and denoise {denoise!r}; a number in noise is the denoise of a "
                         f"workflow saved before noise existed, so denoise must be left at 1. Set noise to one of "
                         f"{', '.join(NOISE_CHOICES)} and denoise to the value you want")
    logging.warning("%s: noise is %r, the denoise of a workflow saved before the noise input existed: running it as it ran "
                    "then (denoise %r, ComfyUI's noise). Save the workflow again to store both inputs.", node, noise, noise)
    return "comfyui", float(noise)
