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

``batch > 1`` is a *reference, not a deployable mode*: the big-batch test-time BatchNorm of
Schneider et al. (NeurIPS 2020) and Nado et al. (2020), every BatchNorm normalising a batch of
``batch`` consecutive stream samples with that batch's own statistics (no running estimate).
It needs the whole batch before the first prediction, so ``step`` refuses it; benchmarks call
``predict_batch`` on consecutive chunks of the stream instead.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from edgetune.errors import ConfigError
from edgetune.methods.base import (Method, MethodConfig, Range, TapSpec, declare, ema_momentum, entropy, setting,
                                  supervised_or)
from edgetune.methods.bn_stats import SampleStatNorm, with_sample_norms


@dataclass(frozen=True)
class BNAdaptConfig(MethodConfig):
    momentum_start: float = setting(0.1, Range(0.0, 1.0), "EMA momentum of the first test sample")
    momentum_decay: float = setting(0.94, Range(0.0, 1.0), "per-sample decay of the EMA momentum")
    momentum_floor: float = setting(0.005, Range(0.0, 1.0), "lowest EMA momentum")
    batch: int = setting(1, Range(1, 4096), "reference only (not deployable): >1 normalises each batch of this "
                                            "many stream samples with its own statistics (predict_batch)")


class RunningNorm(SampleStatNorm):
    """Normalises with the running estimate after this sample entered it (inputs set per call in ``feed``);
    with ``feed`` None (``predict_batch``), with the statistics of the call's own batch."""

    feed: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    updated: tuple[torch.Tensor, torch.Tensor]

    def statistics(self, mean, sqmean):
        if self.feed is None:
            return mean, torch.clamp(sqmean - mean * mean, min=0.0)
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

    def step(self, taps, target=None):
        """See ``Method.step``.

        Raises:
            ConfigError: ``batch > 1`` (a reference that needs the whole batch: use ``predict_batch``).
        """
        if self.config.batch > 1:
            raise ConfigError(f"bn-adapt: batch={self.config.batch} is a big-batch reference, not a per-sample "
                              "mode; stream with batch=1, or call predict_batch on chunks of the stream")
        return super().step(taps, target)

    @torch.no_grad()
    def predict_batch(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of a batch of stream images N x C x H x W, every BatchNorm using this batch's statistics."""
        for norm in self.norms:
            norm.feed = None
        return self.net(images)

    def forward_graph(self, taps, state, momentum, target):
        for k, norm in enumerate(self.norms):
            norm.feed = (state[2 * k], state[2 * k + 1], momentum)
        logits = self.net(taps[0])
        new_state = [t for norm in self.norms for t in norm.updated]
        return logits, supervised_or(entropy(logits).sum(), logits, target), new_state
