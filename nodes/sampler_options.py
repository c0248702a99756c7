"""What a sampler adds to the model options it passes back with each evaluation (cfg++ samplers add a post-cfg
function that captures the unconditional prediction, and set `disable_cfg1_optimization`), so that the guider can
give the same additions to each model's own options."""

from __future__ import annotations

import torch


def sampler_additions(given: dict, received: dict) -> dict:
    """What a sampler added to the model options it was given: entries appended to lists (cfg++ samplers add
    a post-cfg function that captures the unconditional prediction) and values it set or replaced (they
    also set `disable_cfg1_optimization`). Samplers copy the options before changing them, so what they
    left untouched is the very same object."""
    additions = {}
    for key, value in received.items():
        original = given.get(key)
        if key in given and value is original:
            continue
        if isinstance(value, dict) and isinstance(original, dict):
            nested = sampler_additions(original, value)
            if nested:
                additions[key] = nested
        elif isinstance(value, list) and isinstance(original, list) and value[:len(original)] == original:
            if len(value) > len(original):
                additions[key] = value[len(original):]
        elif isinstance(value, torch.Tensor) or isinstance(original, torch.Tensor) or value != original:
            additions[key] = value
    return additions


def with_additions(options: dict, additions: dict) -> dict:
    """`options` with a sampler's additions: lists extended, dictionaries merged, other values replaced;
    `options` itself when there are none."""
    if not additions:
        return options
    merged = dict(options)
    for key, value in additions.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = with_additions(merged[key], value)
        elif isinstance(value, list) and isinstance(merged.get(key), list):
            merged[key] = merged[key] + value
        else:
            merged[key] = value
    return merged
