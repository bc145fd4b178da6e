"""The contract every backbone fulfils: a classifier cut into stages, pooled features, a linear head.

Methods attach to stage outputs ("taps"); the partition puts the stages (and the pooling of
the taps a method reads pooled) on the frozen int8 side and ``classifier`` on the float side.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from edgetune.models.blocks import fuse_for_export


class Backbone(nn.Module):
    """Base class of every model edgetune adapts.

    Subclasses set ``input_shape`` (one sample without the batch axis: C x H x W for images,
    C x T for 1-D signals such as sensor windows), ``num_classes``, ``stages`` (an
    ``nn.ModuleList``; stage k maps stage k-1's output to its own) and ``classifier`` (an
    ``nn.Linear`` on the pooled output of the last stage), and may override ``pool``.
    ``kind`` is ``"cnn"`` (stage outputs are N x C x H x W, or N x C x T for Conv1d
    networks) or ``"vit"`` (N x tokens x C).
    """

    kind = "cnn"
    input_shape: tuple[int, ...]
    num_classes: int
    stages: nn.ModuleList
    classifier: nn.Linear

    def stage_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs

    def pool(self, feature: torch.Tensor, stage: int) -> torch.Tensor:
        """Pool one stage output to N x C: global average pooling over every axis after the
        channels (H and W of a 2-D map, T of a 1-D one)."""
        return feature.mean(dim=tuple(range(2, feature.dim())))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.stages) - 1
        return self.classifier(self.pool(self.stage_outputs(x)[-1], last))

    def stage_widths(self) -> list[int]:
        """Channels (CNN) or token width (ViT) of every stage output, from a dry run."""
        with torch.no_grad():
            outs = self.stage_outputs(torch.zeros(1, *self.input_shape))
        return [int(o.shape[1] if self.kind == "cnn" else o.shape[-1]) for o in outs]

    def stage_shapes(self) -> list[tuple[int, ...]]:
        with torch.no_grad():
            return [tuple(o.shape[1:]) for o in self.stage_outputs(torch.zeros(1, *self.input_shape))]

    def for_export(self) -> "Backbone":
        """An eval-mode copy with every foldable normalisation folded into its conv."""
        return fuse_for_export(copy.deepcopy(self).eval())
