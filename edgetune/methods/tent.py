"""tent: entropy minimisation of every normalisation layer's affine parameters (full backpropagation).

Paper: D. Wang, E. Shelhamer, S. Liu, B. Olshausen, T. Darrell. "Tent: Fully Test-time Adaptation
by Entropy Minimization". ICLR 2021.

Tent is the memory anchor: its gradient has to travel back through the whole backbone, so the
method runs a trainable copy of the backbone itself (``partitioned = False``; its tap is the
input image) and keeps every activation for the backward pass. Choices for batch 1:

* Trainable: weight and bias of every normalisation layer (ChannelAffine of weight-standardised
  models, GroupNorm, LayerNorm, BatchNorm); everything else frozen.
* Statistics: the paper re-estimates BatchNorm statistics from the test batch; at batch 1 that
  collapses, so normalisation layers run as the backbone defines them (GroupNorm/LayerNorm per
  sample, BatchNorm with its source running statistics) — use GroupNorm/WS models.
* Optimiser: SGD with momentum 0.9 (the paper's ImageNet setting: lr 2.5e-4 at batch 64, i.e.
  ~4e-6 scaled linearly to batch 1). lr 1e-6: the validation choice of the prototypes and of the
  digits validation corruptions (tiny-cnn, episodic/continual: 1e-6 70.6/71.2, 4e-6 69.6/69.3,
  1e-5 68.9/58.8, 1e-4 54.9/31.1; source 71.4) — at batch 1 every larger step costs accuracy.
  No entropy filter; the collapse guard is on (in the prototypes' continual stream tent collapsed
  to one class without it).
* No pre-deployment fit: tent starts from the source model.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

from edgetune.methods.base import Method, MethodConfig, Range, TapSpec, declare, entropy, setting, supervised_or
from edgetune.models.blocks import NORM_LAYERS


@dataclass(frozen=True)
class TentConfig(MethodConfig):
    lr: float = setting(1e-6, Range(0.0, 10.0), "SGD learning rate of the normalisation affine parameters "
                                                "(batch 1: larger steps cost accuracy on validation)")


@declare
class Tent(Method):
    name = "tent"
    paper = "Wang et al., Tent: Fully Test-time Adaptation by Entropy Minimization, ICLR 2021"
    Config = TentConfig
    partitioned = False

    def __init__(self, backbone, config: TentConfig) -> None:
        super().__init__(backbone, config)
        del self.classifier  # not partitioned: the classifier stays inside the network copy
        self.net = copy.deepcopy(backbone).eval()
        self.net.requires_grad_(False)  # disable grad, to re-enable only what tent updates
        self._names: list[str] = []
        for module_name, module in self.net.named_modules():
            if isinstance(module, NORM_LAYERS):
                for kind in ("weight", "bias"):
                    param = getattr(module, kind, None)
                    if param is not None:
                        param.requires_grad_(True)
                        self._names.append(f"net.{module_name}.{kind}")

    def taps(self) -> tuple[TapSpec, ...]:
        return (TapSpec(-1, pooled=False),)

    def trainable_names(self) -> list[str]:
        return list(self._names)

    def fit_parameters(self):
        return []  # tent has no pre-deployment fit

    def train(self, mode: bool = True):
        # The network copy always runs in eval mode: BatchNorm must not switch to batch statistics.
        super().train(mode)
        self.net.eval()
        return self

    def forward_graph(self, taps, state, momentum, target):
        logits = self.net(taps[0])
        return logits, supervised_or(entropy(logits).sum(), logits, target), []
