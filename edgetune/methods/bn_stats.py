"""BatchNorm driven by per-sample statistics: the shared engine of ``bn-adapt`` and ``alpha-bn``.

Both methods run a copy of the backbone (``partitioned = False``) in which every BatchNorm is
replaced by a ``SampleStatNorm`` subclass; the subclass decides which mean and variance
normalise the current sample. Nothing is learned, nothing keeps activations for a backward pass.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from edgetune.errors import ConfigError
from edgetune.models import Backbone
from edgetune.models.blocks import NORM_LAYERS


class SampleStatNorm(nn.Module):
    """An eval-mode BatchNorm2d whose statistics come from ``statistics(sample mean, sample E[x^2])``."""

    def __init__(self, bn: nn.BatchNorm2d) -> None:
        super().__init__()
        self.bn = bn  # keeps the source affine and running statistics (all frozen)

    def statistics(self, mean: torch.Tensor, sqmean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, variance) per channel that normalise this call's input."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean, var = self.statistics(x.mean(dim=(0, 2, 3)), (x * x).mean(dim=(0, 2, 3)))
        scale = self.bn.weight / torch.sqrt(var + self.bn.eps)
        return (x - mean[None, :, None, None]) * scale[None, :, None, None] + self.bn.bias[None, :, None, None]


def with_sample_norms(backbone: Backbone, norm: type[SampleStatNorm], method: str) -> tuple[Backbone, list]:
    """A frozen eval-mode copy of ``backbone`` with every BatchNorm2d replaced by ``norm``.

    Returns the copy and the new norm modules in network order.

    Raises:
        ConfigError: the backbone has no BatchNorm2d.
    """
    net = copy.deepcopy(backbone).eval().requires_grad_(False)
    replaced = []
    for parent in list(net.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                new = norm(child)
                setattr(parent, child_name, new)
                replaced.append(new)
    if not replaced:
        kinds = sorted({type(m).__name__ for m in net.modules() if isinstance(m, NORM_LAYERS)}) or ["none"]
        raise ConfigError(f"{method}: the backbone has no BatchNorm layer (normalisation: {', '.join(kinds)}); "
                          f"use mcunet-s-bn (or another model with BatchNorm2d)")
    return net, replaced
