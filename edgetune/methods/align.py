"""Forward-only alignment of feature statistics at batch 1 (the piece every method can compose with).

After DUA (Mirza et al., CVPR 2022, "The Norm Must Go On"): per tapped feature, an exponential
moving average of the test stream's per-channel mean and second moment, initialised from the
source statistics measured at export, with a decaying momentum; features are re-standardised
to the source mean/variance. The current sample enters the average before its own prediction
(causal and label-free, as in DUA).

Choices DUA leaves open for this setting: statistics of *pooled* features (N x C) rather than
of normalisation inputs; momentum ``max(floor, start * decay**t)`` with start 0.1, decay 0.94,
floor 0.005 (chosen on the 4 validation corruptions in the prototypes).
"""
from __future__ import annotations

import torch
from torch import nn

EPS = 1e-5


class FeatureAligner(nn.Module):
    """Running statistics of ``len(widths)`` pooled features and their re-standardisation."""

    def __init__(self, widths: list[int]) -> None:
        super().__init__()
        self.count = len(widths)
        for k, c in enumerate(widths):
            self.register_buffer(f"source_mean{k}", torch.zeros(c))
            self.register_buffer(f"source_var{k}", torch.ones(c))
            self.register_buffer(f"mean{k}", torch.zeros(c))
            self.register_buffer(f"sqmean{k}", torch.ones(c))

    def state_names(self, prefix: str) -> list[str]:
        return [f"{prefix}{s}{k}" for k in range(self.count) for s in ("mean", "sqmean")]

    @torch.no_grad()
    def calibrate(self, features: list[torch.Tensor]) -> None:
        """Set source (and initial running) statistics from source features N x C, one per tap."""
        for k, z in enumerate(features):
            mean, var = z.double().mean(0), z.double().var(0, unbiased=False)
            getattr(self, f"source_mean{k}").copy_(mean.float())
            getattr(self, f"source_var{k}").copy_(var.float())
            getattr(self, f"mean{k}").copy_(mean.float())
            getattr(self, f"sqmean{k}").copy_((var + mean ** 2).float())

    def align(self, k: int, z: torch.Tensor, mean: torch.Tensor, sqmean: torch.Tensor,
              momentum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Update tap ``k``'s statistics with sample ``z`` (1 x C) and return (aligned z, mean, sqmean)."""
        x = z[0]
        mean = (1.0 - momentum) * mean + momentum * x
        sqmean = (1.0 - momentum) * sqmean + momentum * x * x
        var = torch.clamp(sqmean - mean * mean, min=0.0)
        scale = torch.sqrt(getattr(self, f"source_var{k}") + EPS) / torch.sqrt(var + EPS)
        aligned = (x - mean) * scale + getattr(self, f"source_mean{k}")
        return aligned[None], mean, sqmean
