"""Generic shifted copies of source images: the pre-deployment fit data of exit heads that must hold under shift.

An early exit is only worth taking if its head stays right when the data drifts. Its fit therefore sees whole
copies of the source images, each under one generic, label-free shift at one strength (as a stream would be):
additive Gaussian noise, a Gaussian blur, a linear contrast or brightness change, a random translation. None of
them is a test corruption's implementation. Each copy's features are then re-standardised to the clean copy's
statistics, the state test-time feature alignment reaches on a stream of that shift.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from edgetune.data import to_tensor
from edgetune.errors import DataError

SAMPLES = 5000  # source images per copy by default (tinytta: fit_view_images)
# (kind, strength); the first copy is the clean one. Chosen once for the exit-heads study (results/exits-variants).
SHIFTS = (("clean", 0.0), ("noise", 0.06), ("noise", 0.12), ("noise", 0.2), ("blur", 0.8), ("blur", 1.6),
          ("contrast", 0.5), ("contrast", 0.25), ("brightness", 0.3), ("brightness", -0.3), ("shift", 3.0),
          ("shift", 5.0))
COPIES = len(SHIFTS)


def as_float(images: np.ndarray) -> torch.Tensor:
    """Source images in a dataset layout -> float N x C x H x W in [0, 1].

    Raises:
        DataError: the samples are not 2-D images with a channel axis.
    """
    x = to_tensor(images)
    if x.dim() != 4:
        raise DataError(f"shifted views: source samples must be images N x C x H x W (got shape {tuple(x.shape)}); "
                        "use exit heads on the global pool (exit_grid=1) for non-image data")
    return x


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = int(np.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)  # separable: rows, then columns
    return F.conv2d(x, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def shifted(x: torch.Tensor, kind: str, strength: float, rng: torch.Generator) -> torch.Tensor:
    """A copy of ``x`` (float N x C x H x W in [0, 1]) under one generic shift at one strength, clipped to [0, 1]."""
    if kind == "noise":
        x = x + strength * torch.randn(x.shape, generator=rng)
    elif kind == "blur":
        x = _blur(x, strength)
    elif kind == "contrast":
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * strength + mean
    elif kind == "brightness":
        x = x + strength
    elif kind == "shift":  # a random translation per image (wrapping around)
        reach = int(strength)
        moves = torch.randint(-reach, reach + 1, (len(x), 2), generator=rng)
        x = torch.stack([torch.roll(img, (int(dy), int(dx)), dims=(1, 2)) for img, (dy, dx) in zip(x, moves)])
    return x.clamp(0.0, 1.0)


def views(x: torch.Tensor, rng: torch.Generator) -> Iterator[torch.Tensor | None]:
    """Every copy of ``SHIFTS`` in order: None for the clean one (the caller has it), else the shifted images."""
    for kind, strength in SHIFTS:
        yield None if kind == "clean" else shifted(x, kind, strength, rng)


def restandardise(features: list[torch.Tensor], clean: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each feature (N x D) of one shifted copy re-standardised per dimension to the clean copy's mean and variance."""
    out = []
    for z, s in zip(features, clean):
        scale = torch.sqrt(s.var(0, unbiased=False) + 1e-5) / torch.sqrt(z.var(0, unbiased=False) + 1e-5)
        out.append((z - z.mean(0)) * scale + s.mean(0))
    return out
