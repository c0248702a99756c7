"""SNF written again from SPEC.md in float64 numpy, independent of facediffuser_core, for the tests."""

import numpy as np


def reference_saliency(guidance: np.ndarray) -> np.ndarray:
    """SPEC.md, step by step in float64 numpy: |g|, 4x4 mean (stride 1, zero padding 1, padding counted),
    bilinear resize back (half-pixel centres, edge clamped), mean over channels, softmax over H*W."""
    magnitude = np.abs(guidance.astype(np.float64))
    batch, channels, height, width = magnitude.shape
    padded = np.pad(magnitude, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out_h, out_w = height - 1, width - 1
    pooled = np.zeros((batch, channels, out_h, out_w))
    for dy in range(4):
        for dx in range(4):
            pooled += padded[:, :, dy:dy + out_h, dx:dx + out_w]
    pooled /= 16.0

    def source_coordinates(out_size, in_size):
        coordinate = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
        coordinate = np.clip(coordinate, 0, None)
        low = np.minimum(np.floor(coordinate).astype(int), in_size - 1)
        high = np.minimum(low + 1, in_size - 1)
        return low, high, coordinate - low

    y0, y1, wy = source_coordinates(height, out_h)
    x0, x1, wx = source_coordinates(width, out_w)
    rows = pooled[:, :, y0, :] * (1 - wy)[:, None] + pooled[:, :, y1, :] * wy[:, None]
    resized = rows[:, :, :, x0] * (1 - wx) + rows[:, :, :, x1] * wx
    per_pixel = resized.mean(axis=1).reshape(batch, -1)
    per_pixel -= per_pixel.max(axis=1, keepdims=True)
    weights = np.exp(per_pixel)
    return (weights / weights.sum(axis=1, keepdims=True)).reshape(batch, height, width)


def reference_sdm_chosen(tdm_guidance: np.ndarray, sdm_guidance: np.ndarray) -> np.ndarray:
    """Per pixel, True where the SDM's saliency is strictly larger (ties go to the TDM)."""
    return reference_saliency(sdm_guidance) > reference_saliency(tdm_guidance)
