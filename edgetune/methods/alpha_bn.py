"""alpha-bn: each BatchNorm mixes its source statistics with the current sample's (no gradients).

Paper: F. You, J. Li, Z. Zhao. "Test-time Batch Statistics Calibration for Covariate Shift".
arXiv:2110.04065, 2021.

Per BatchNorm and sample: ``mean = (1 - alpha) * source_mean + alpha * sample_mean`` and
``var = (1 - alpha) * source_var + alpha * sample_var``, the sample statistics taken over the
sample's spatial positions (batch 1). Choices: alpha 0.1 (the prototypes' validation choice; on
the digits validation corruptions alpha in {0, 0.05, 0.1, 0.2} stays within 2 points of the BN
source model and 0.5 costs 15), the plain mixture of variances (no between-mean term), and no
memory across samples — each prediction depends on its own sample only, so there is no state.
Needs a backbone with BatchNorm (``mcunet-s-bn``).
"""
from __future__ import annotations

from dataclasses import dataclass

from edgetune.methods.base import Method, MethodConfig, Range, TapSpec, declare, entropy, setting, supervised_or
from edgetune.methods.bn_stats import SampleStatNorm, with_sample_norms


@dataclass(frozen=True)
class AlphaBNConfig(MethodConfig):
    alpha: float = setting(0.1, Range(0.0, 1.0), "weight of the sample's statistics against the source's")


class AlphaNorm(SampleStatNorm):
    alpha = 0.1

    def statistics(self, mean, sqmean):
        a = self.alpha
        return ((1.0 - a) * self.bn.running_mean + a * mean,
                (1.0 - a) * self.bn.running_var + a * (sqmean - mean * mean))


@declare
class AlphaBN(Method):
    name = "alpha-bn"
    paper = "You, Li, Zhao, Test-time Batch Statistics Calibration for Covariate Shift, 2021"
    Config = AlphaBNConfig
    config: AlphaBNConfig
    partitioned = False

    def __init__(self, backbone, config: AlphaBNConfig) -> None:
        super().__init__(backbone, config)
        del self.classifier  # not partitioned: the classifier stays inside the network copy
        self.net, norms = with_sample_norms(backbone, AlphaNorm, self.name)
        for norm in norms:
            norm.alpha = config.alpha

    def taps(self) -> tuple[TapSpec, ...]:
        return (TapSpec(-1, pooled=False),)

    def forward_graph(self, taps, state, momentum, target):
        logits = self.net(taps[0])
        return logits, supervised_or(entropy(logits).sum(), logits, target), []
