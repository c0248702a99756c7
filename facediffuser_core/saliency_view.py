"""Pictures of a run's SNF decisions: where each model's guidance was salient and which model painted where."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .snf import SaliencySummary

# An inferno-like ramp from black through purple and orange to pale yellow: dark is "not salient".
_HEAT_STOPS = torch.tensor(
    [
        [0.00, 0.00, 0.02],
        [0.34, 0.06, 0.43],
        [0.73, 0.21, 0.33],
        [0.98, 0.55, 0.04],
        [0.99, 1.00, 0.64],
    ]
)
TDM_TINT = torch.tensor([0.15, 0.45, 1.00])
SDM_TINT = torch.tensor([1.00, 0.45, 0.10])
OVERLAY_OPACITY = 0.45
# Outlines of the regions auto regions found, by subject in marker order (then repeating).
REGION_COLOURS = torch.tensor([[0.10, 0.90, 0.20], [0.95, 0.10, 0.85], [0.10, 0.90, 0.95], [1.00, 0.90, 0.10]])
OUTLINE_FRACTION = 1 / 128  # the outline's width as a share of the panel's shorter side (at least one pixel)


def heatmap(values: torch.Tensor) -> torch.Tensor:
    """(..., H, W) values in [0, 1] -> (..., H, W, 3) RGB."""
    stops = _HEAT_STOPS.to(values.device)
    position = values.clamp(0, 1) * (len(stops) - 1)
    lower = position.floor().long().clamp(max=len(stops) - 2)
    weight = (position - lower).unsqueeze(-1)
    return stops[lower] * (1 - weight) + stops[lower + 1] * weight


def _resize(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    # Nearest keeps each latent pixel a visible block, so the picture shows the real decision grid.
    return F.interpolate(maps.unsqueeze(1), size=size, mode="nearest").squeeze(1)


def outline(panels: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) pictures with each region's (K, h, w) border drawn in its subject's colour."""
    height, width = panels.shape[1:3]
    inside = _resize(regions.float(), (height, width)) >= 0.5
    radius = max(1, round(min(height, width) * OUTLINE_FRACTION))
    eroded = -F.max_pool2d(-inside.float().unsqueeze(1), 2 * radius + 1, stride=1, padding=radius).squeeze(1)
    panels = panels.clone()
    for subject, (region, core) in enumerate(zip(inside, eroded >= 0.5)):
        panels[:, region & ~core] = REGION_COLOURS[subject % len(REGION_COLOURS)].to(panels)
    return panels


def render(summary: SaliencySummary, size: tuple[int, int], image: torch.Tensor | None = None,
           regions: torch.Tensor | None = None):
    """Pictures of a run, per sample: TDM saliency, SDM saliency, share of fusion steps painted by the SDM,
    and, with `image` (B, H, W, 3), that image tinted blue where the TDM painted and orange where the SDM did.
    With `regions` (K, h, w), the regions auto regions used, every picture outlines them.

    Both saliency maps of a sample share one colour scale, from the lower to the higher of their values, so
    their brightness compares directly.
    Returns (images (B*k, H, W, 3) in sample-major order, sdm_mask (B, H, W)).
    """
    batch = summary.sdm_fraction.shape[0]
    if image is not None and image.shape[0] != batch:
        raise ValueError(
            f"the image batch has {image.shape[0]} images but the saliency record {batch} samples: connect the "
            "decoded output of the same sampling run"
        )
    # Softmax maps over thousands of pixels all sit near 1/(H*W); stretching the range that both maps of a
    # sample span shows their structure while keeping the two comparable.
    both = torch.stack([summary.tdm_saliency, summary.sdm_saliency], dim=1)
    low = both.amin(dim=(1, 2, 3), keepdim=True)
    span = (both.amax(dim=(1, 2, 3), keepdim=True) - low).clamp(min=torch.finfo(torch.float32).tiny)
    stretched = (both - low) / span
    tdm = heatmap(_resize(stretched[:, 0], size))
    sdm = heatmap(_resize(stretched[:, 1], size))
    mask = _resize(summary.sdm_fraction, size)
    choice = mask.unsqueeze(-1).expand(-1, -1, -1, 3)
    panels = [tdm, sdm, choice]
    if image is not None:
        tint = TDM_TINT * (1 - mask.unsqueeze(-1)) + SDM_TINT * mask.unsqueeze(-1)
        panels.append(image[..., :3].float() * (1 - OVERLAY_OPACITY) + tint * OVERLAY_OPACITY)
    images = torch.stack(panels, dim=1).reshape(-1, *size, 3)
    return (images if regions is None else outline(images, regions)), mask
