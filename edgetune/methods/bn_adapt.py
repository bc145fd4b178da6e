"""bn-adapt: BatchNorm statistics re-estimated from the test stream at batch 1 (DUA-style, no gradients).

Paper: M. J. Mirza, J. Micorek, H. Possegger, H. Bischof. "The Norm Must Go On: Dynamic
Unsupervised Domain Adaptation by Normalization". CVPR 2022 (DUA).

Every BatchNorm keeps an exponential moving average of the stream's per-channel mean and
second moment (initialised from its source running statistics) and normalises with it. The
current sample enters the average before its own prediction (causal, label-free, as in DUA).
Choices DUA leaves open here: no test-time augmentation (DUA builds a small batch from
augmented copies of each sample; a microcontroller stream cannot afford it), the EMA tracks
E[x^2] rather than the batch variance (the variance of one sample's spatial positions is what
batch 1 offers), and DUA's momentum schedule ``max(0.005, 0.1 * 0.94**t)``. Needs a backbone
with BatchNorm (``mcunet-s-bn``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from edgetune.methods.base import (Method, MethodConfig, Range, TapSpec, declare, ema_momentum, entropy, setting,
                                  supervised_or)
from edgetune.methods.bn_stats import SampleStatNorm, with_sample_norms


@dataclass(frozen=True)
class BNAdaptConfig(MethodConfig):
    momentum_start: float = setting(0.1, Range(0.0, 1.0), "EMA momentum of the first test sample")
    momentum_decay: float = setting(0.94, Range(0.0, 1.0), "per-sample decay of the EMA momentum")
    momentum_floor: float = setting(0.005, Range(0.0, 1.0), "lowest EMA momentum")


class RunningNorm(SampleStatNorm):
    """Normalises with the running estimate after this sample entered it (inputs set per call in ``feed``)."""

    feed: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    updated: tuple[torch.Tensor, torch.Tensor]

    def statistics(self, mean, sqmean):
        run_mean, run_sqmean, momentum = self.feed
        run_mean = (1.0 - momentum) * run_mean + momentum * mean
        run_sqmean = (1.0 - momentum) * run_sqmean + momentum * sqmean
        self.updated = (run_mean, run_sqmean)
        return run_mean, torch.clamp(run_sqmean - run_mean * run_mean, min=0.0)


@declare
class BNAdapt(Method):
    name = "bn-adapt"
    paper = "Mirza et al., The Norm Must Go On (DUA), CVPR 2022"
    Config = BNAdaptConfig
    config: BNAdaptConfig
    partitioned = False

    def __init__(self, backbone, config: BNAdaptConfig) -> None:
        super().__init__(backbone, config)
        del self.classifier  # not partitioned: the classifier stays inside the network copy
        self.net, norms = with_sample_norms(backbone, RunningNorm, self.name)
        self.norms: list[RunningNorm] = norms  # plain list: the modules already live in self.net
        for k, norm in enumerate(norms):
            self.register_buffer(f"mean{k}", norm.bn.running_mean.clone())
            self.register_buffer(f"sqmean{k}", norm.bn.running_var + norm.bn.running_mean ** 2)

    def taps(self) -> tuple[TapSpec, ...]:
        return (TapSpec(-1, pooled=False),)

    def state_names(self) -> list[str]:
        return [f"{s}{k}" for k in range(len(self.norms)) for s in ("mean", "sqmean")]

    def momentum_now(self) -> float:
        c = self.config
        return ema_momentum(self.steps, c.momentum_start, c.momentum_decay, c.momentum_floor)

    def forward_graph(self, taps, state, momentum, target):
        for k, norm in enumerate(self.norms):
            norm.feed = (state[2 * k], state[2 * k + 1], momentum)
        logits = self.net(taps[0])
        new_state = [t for norm in self.norms for t in norm.updated]
        return logits, supervised_or(entropy(logits).sum(), logits, target), new_state
