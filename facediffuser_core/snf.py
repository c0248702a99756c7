"""Saliency-adaptive Noise Fusion (SNF), the per-pixel choice between the two models' predictions.

Face-diffuser (CVPR 2024) lets the text-driven model (TDM) and the subject-augmented model (SDM) paint
the same latent during the fusion stage. At each fusion step each model's classifier-free guidance
response is turned into a saliency map, and every latent pixel takes the full guided prediction (all
channels) of the model whose map is larger there.

Everything here is plain PyTorch, independent of ComfyUI, and works for any batch size, latent size
and floating dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# The paper's smoothing window. A 4x4 window with stride 1 and padding 1 gives (H-1)x(W-1), which is
# then resized back to HxW; a latent needs at least 2 pixels on each side for that to be defined.
SMOOTHING_KERNEL = 4
SMOOTHING_PADDING = 1
MIN_LATENT_SIDE = 2


def guidance_response(cond_denoised: torch.Tensor, uncond_denoised: torch.Tensor, sigma: torch.Tensor, cfg: float) -> torch.Tensor:
    """g = s * (e(cond) - e(uncond)), the part of the guided prediction that guidance adds, in epsilon space
    (SNF's softmax is not scale-invariant), from the denoised predictions ComfyUI's models give.

    With denoised = x - sigma * eps, e(cond) - e(uncond) = (uncond_denoised - cond_denoised) / sigma: three
    elementwise operations (in place after the first), none on the host.
    """
    return (uncond_denoised - cond_denoised).mul_(cfg).div_(sigma.reshape(-1, *([1] * (cond_denoised.dim() - 1))))


def saliency_map(guidance: torch.Tensor) -> torch.Tensor:
    """Saliency of one model's guidance response: (B, C, H, W) -> (B, H, W), each sample summing to 1.

    |g| is smoothed with a 4x4 average pool (stride 1, padding 1), resized back to HxW bilinearly,
    averaged over channels, and softmax-normalised over all H*W positions of each sample.
    The maths runs in float32 whatever the input dtype: the softmax over 4096+ positions of fp16 values
    would otherwise lose most of the differences that decide the choice.
    """
    if guidance.dim() != 4:
        raise ValueError(f"SNF expects a (batch, channels, height, width) guidance tensor, got shape {tuple(guidance.shape)}")
    batch, _, height, width = guidance.shape
    if height < MIN_LATENT_SIDE or width < MIN_LATENT_SIDE:
        raise ValueError(
            f"SNF needs a latent of at least {MIN_LATENT_SIDE}x{MIN_LATENT_SIDE} pixels, got {height}x{width}; "
            "use an image of at least 16x16 pixels"
        )
    # Pooling and resizing are linear and act on each channel alike, so the channel mean can come first
    # (a quarter of the work), and both are separable: one (H x H) and one (W x W) matrix, the same maths
    # as avg_pool2d then interpolate in two matrix products instead of two slow CPU kernels per channel.
    magnitude = guidance.abs().mean(dim=1, dtype=torch.float32)
    rows, columns = smoothing_operator(height, guidance.device), smoothing_operator(width, guidance.device)
    smoothed = rows @ magnitude @ columns.T
    return smoothed.reshape(batch, height * width).softmax(dim=-1).reshape(batch, height, width)


_smoothing_operators: dict[tuple[int, torch.device], torch.Tensor] = {}


def smoothing_operator(size: int, device: torch.device) -> torch.Tensor:
    """The (size x size) float32 matrix of one axis of SNF's smoothing: a 4-wide mean (stride 1, zero padding
    1, padding counted) to size - 1 values, then linear resizing back to size with half-pixel centres."""
    key = (size, device)
    if key not in _smoothing_operators:
        # Kept across runs: made inside ComfyUI's inference mode, it would be an inference tensor, which a later
        # computation that autograd tracks (a sampler taking gradients) may not use.
        with torch.inference_mode(False):
            _smoothing_operators[key] = _smoothing_matrix(size).to(device)
    return _smoothing_operators[key]


def _smoothing_matrix(size: int) -> torch.Tensor:
    unit_signals = torch.eye(size, dtype=torch.float64).unsqueeze(1)  # each column of the identity as a signal
    pooled = F.avg_pool1d(unit_signals, kernel_size=SMOOTHING_KERNEL, stride=1, padding=SMOOTHING_PADDING)
    resized = F.interpolate(pooled, size=size, mode="linear", align_corners=False).squeeze(1)
    return resized.T.to(torch.float32).contiguous()


@dataclass
class FusionDecision:
    """What SNF decided at one model evaluation: both saliency maps and where the SDM was chosen."""

    tdm_saliency: torch.Tensor  # (B, H, W) float32
    sdm_saliency: torch.Tensor  # (B, H, W) float32
    sdm_chosen: torch.Tensor  # (B, H, W) bool; ties go to the TDM


def decide(tdm_guidance: torch.Tensor, sdm_guidance: torch.Tensor) -> FusionDecision:
    """Compare the two models' saliency maps; both guidance responses must be in epsilon space."""
    if tdm_guidance.shape != sdm_guidance.shape:
        raise ValueError(
            f"SNF needs both models' predictions in one shape, got TDM {tuple(tdm_guidance.shape)} "
            f"and SDM {tuple(sdm_guidance.shape)}"
        )
    # Both maps in one batch: half the kernels, and each sample's map is computed as on its own.
    tdm_saliency, sdm_saliency = saliency_map(torch.cat([tdm_guidance, sdm_guidance])).split(tdm_guidance.shape[0])
    return FusionDecision(tdm_saliency, sdm_saliency, sdm_saliency > tdm_saliency)


def fuse(tdm_prediction: torch.Tensor, sdm_prediction: torch.Tensor, decision: FusionDecision) -> torch.Tensor:
    """Take, per latent pixel and across all channels, the chosen model's guided prediction.

    The predictions may be in epsilon or in denoised (x0) space: with the same x and sigma the two are
    an elementwise affine map of each other, so a per-pixel choice commutes with the conversion.
    """
    return torch.where(decision.sdm_chosen.unsqueeze(1), sdm_prediction, tdm_prediction)


@dataclass
class SaliencyRecord:
    """The SNF decisions of one sampling run, in evaluation order, for previews and inspection.

    Tensors stay on the device they were computed on until `to(...)` is called, so that recording a
    decision never forces a device-to-host copy in the middle of sampling.
    """

    steps: list[int] = field(default_factory=list)
    decisions: list[FusionDecision] = field(default_factory=list)
    regions: torch.Tensor | None = None  # (K, H, W) the regions auto regions found and used, at the picture's size

    def add(self, step: int, decision: FusionDecision) -> None:
        self.steps.append(step)
        self.decisions.append(decision)

    def clear(self) -> None:
        self.steps.clear()
        self.decisions.clear()
        self.regions = None

    def __len__(self) -> int:
        return len(self.decisions)

    def to(self, device: torch.device | str) -> "SaliencyRecord":
        moved = [
            FusionDecision(d.tdm_saliency.to(device), d.sdm_saliency.to(device), d.sdm_chosen.to(device))
            for d in self.decisions
        ]
        return SaliencyRecord(list(self.steps), moved, self.regions)

    def summary(self) -> "SaliencySummary":
        """Average over all recorded fusion evaluations."""
        if not self.decisions:
            raise ValueError(
                "The saliency record holds no fusion step: the fusion stage was empty "
                "(alpha equals beta, or the sampling ran fewer steps than alpha asks for)"
            )
        tdm = torch.stack([d.tdm_saliency.float() for d in self.decisions]).mean(0)
        sdm = torch.stack([d.sdm_saliency.float() for d in self.decisions]).mean(0)
        chosen = torch.stack([d.sdm_chosen.float() for d in self.decisions]).mean(0)
        return SaliencySummary(tdm, sdm, chosen)


@dataclass
class SaliencySummary:
    """A whole run's SNF decisions averaged per latent pixel, each (B, H, W) float32."""

    tdm_saliency: torch.Tensor
    sdm_saliency: torch.Tensor
    sdm_fraction: torch.Tensor  # share of the fusion evaluations in which the SDM painted the pixel
