"""feature-align: forward-only feature-statistics alignment at batch 1 (no gradients).

Paper: M. J. Mirza, J. Micorek, H. Possegger, H. Bischof. "The Norm Must Go On: Dynamic
Unsupervised Domain Adaptation by Normalization". CVPR 2022 (DUA).

DUA re-estimates BatchNorm statistics from a handful of test samples with a decaying
momentum. Here the same estimator aligns the *pooled* features the classifier reads (so it
works on batch-agnostic backbones with no BatchNorm, and the frozen backbone stays int8).
See ``align.py`` for the statistics; the choices DUA leaves open are listed there and in
``FeatureAlignConfig``. No parameter is trained and nothing is saved for a backward pass.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from edgetune.methods.align import FeatureAligner
from edgetune.methods.base import (Method, MethodConfig, Range, Schedule, TapSpec, declare, entropy, setting,
                                  supervised_or)


@dataclass(frozen=True)
class FeatureAlignConfig(MethodConfig):
    momentum_start: float = setting(0.1, Range(0.0, 1.0), "EMA momentum of the first test sample")
    momentum_decay: float = setting(0.94, Range(0.0, 1.0), "per-sample decay of the EMA momentum")
    momentum_floor: float = setting(0.005, Range(0.0, 1.0), "lowest EMA momentum")


@declare
class FeatureAlign(Method):
    name = "feature-align"
    paper = "Mirza et al., The Norm Must Go On (DUA), CVPR 2022"
    Config = FeatureAlignConfig
    config: FeatureAlignConfig

    def __init__(self, backbone, config: FeatureAlignConfig) -> None:
        super().__init__(backbone, config)
        self.last = len(backbone.stages) - 1
        self.aligner = FeatureAligner([backbone.stage_widths()[self.last]])

    def taps(self) -> tuple[TapSpec, ...]:
        return (TapSpec(self.last, pooled=True),)

    def state_names(self) -> list[str]:
        return self.aligner.state_names("aligner.")

    def calibrate(self, batches) -> None:
        self.aligner.calibrate([torch.cat([b[0] for b in batches])])

    def schedule(self) -> Schedule:
        c = self.config
        return Schedule(c.momentum_start, c.momentum_decay, c.momentum_floor)

    def forward_graph(self, taps, state, momentum, target):
        z, mean, sqmean = self.aligner.align(0, taps[0], state[0], state[1], momentum)
        logits = self.classifier(z)
        return logits, supervised_or(entropy(logits).sum(), logits, target), [mean, sqmean]
