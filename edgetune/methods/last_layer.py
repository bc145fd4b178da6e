"""last-layer: only the classifier learns from revealed labels — the usual on-device learning in TinyML.

Reference: the "last layer only" / linear-probe baseline of on-device training (e.g. TinyTL, Cai et
al., NeurIPS 2020, "FT-Last"; Lin et al., "On-Device Training Under 256KB Memory", NeurIPS 2022,
whose sparse update starts from it). The frozen int8 backbone computes the pooled last-stage
feature (one tap, as ``feature-align``); the float side is the classifier alone, so it is
partitioned, exportable and runs compiled on every target. Choices:

* Trainable: the classifier's weight and bias, starting from the backbone's classifier (no
  pre-deployment fit: it was trained with the backbone).
* No feature alignment: this is the baseline as TinyML uses it (``feature-align`` is the
  alignment-only one; lst and vqt compose both).
* Batch 1, SGD with momentum 0.9 (the shared optimizer), lr 1e-3: on the transfer validation
  protocol of ``benchmarks/labels.py`` (mcunet-s, Fashion-MNIST -> digits) 3e-4 / 1e-3 / 3e-3 / 1e-2
  gave 66.7 / 70.0 / 57.2 / 61.1 held-out; with 20 % labels under shift (4 validation corruptions,
  continual) 69.0 / 65.9 / 60.4 / 56.2, so the personalisation runs use 3e-4.
* Labels only (``entropy_weight`` 0): an unlabelled sample's loss is zero, so its step only
  carries the SGD momentum of earlier labelled samples (every runtime does the same).
* The collapse guard is off: labels cannot drive a collapse, and a fresh head on a new task
  starts by predicting one class, which the guard would mistake for collapse.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from edgetune.methods.base import Method, MethodConfig, Range, TapSpec, declare, entropy, setting, supervised_or


@dataclass(frozen=True)
class LastLayerConfig(MethodConfig):
    lr: float = setting(1e-3, Range(0.0, 10.0), "SGD learning rate of the classifier (revealed labels only)")
    entropy_weight: float = setting(0.0, Range(0.0, 100.0), "weight of the unsupervised entropy loss (0: learn "
                                                            "only from revealed labels)")
    guard: bool = field(default=False, metadata={"help": "collapse guard (off: labels cannot drive a collapse)"})


@declare
class LastLayer(Method):
    name = "last-layer"
    paper = "last-layer-only baseline of on-device learning (Cai et al. TinyTL, NeurIPS 2020: FT-Last)"
    Config = LastLayerConfig
    config: LastLayerConfig

    def __init__(self, backbone, config: LastLayerConfig) -> None:
        super().__init__(backbone, config)
        self.last = len(backbone.stages) - 1
        self.classifier.requires_grad_(True)  # the copy inherits the frozen backbone's requires_grad=False

    def taps(self) -> tuple[TapSpec, ...]:
        return (TapSpec(self.last, pooled=True),)

    def trainable_names(self) -> list[str]:
        return [n for n, _ in self.classifier.named_parameters(prefix="classifier")]

    def fit_parameters(self):
        return []  # the classifier was trained with the backbone: nothing to fit

    def forward_graph(self, taps, state, momentum, target):
        logits = self.classifier(taps[0])
        return logits, supervised_or(self.config.entropy_weight * entropy(logits).sum(), logits, target), []
