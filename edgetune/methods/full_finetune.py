"""full-finetune: every parameter of the model learns from revealed labels, one sample at a time.

The baseline of on-device learning from labels: the accuracy ceiling and the memory worst case
(the whole float model, its gradients, its optimizer state and every activation the backward pass
needs). The standard transfer-learning reference that parameter- and memory-efficient methods
measure themselves against — e.g. LST (Sung et al., NeurIPS 2022) and VQT (Tu et al., CVPR 2023)
report "full fine-tuning" as their upper bound; TinyTL (Cai et al., NeurIPS 2020) as the memory
bound. Choices for a device stream:

* Like ``tent`` the method runs a trainable float copy of the backbone (``partitioned = False``;
  its tap is the input image): there is no frozen int8 part, so it runs in torch only.
* Trainable: every parameter, the classifier included (``bias-only`` narrows this set).
* Batch 1, SGD with momentum 0.9 (the shared optimizer of every method), lr 1e-3: on the transfer
  validation protocol of ``benchmarks/labels.py`` (mcunet-s, Fashion-MNIST -> digits, held-out
  accuracy on digits' validation split after 1,258 labels) 1e-3 gave 92.8, 3e-4 86.7; with 20 %
  labels under shift (4 validation corruptions, continual) 3e-4 gave 68.5 (the benchmark passes it).
* Labels only: the unsupervised loss is off (``entropy_weight`` 0), and an unlabelled sample is
  only predicted (no backward pass at all, a compute saving a device would take too); a sample
  whose label is revealed after scoring gets one SGD step on its cross-entropy.
* The collapse guard is off: it protects unsupervised updates from drifting to one class; a
  revealed label cannot drive that drift (and a fresh head on a new task starts by predicting one
  class, which the guard would mistake for collapse).
* No pre-deployment fit: the model is the source model.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from edgetune.methods.base import Method, MethodConfig, Range, TapSpec, declare, entropy, setting, supervised_or


@dataclass(frozen=True)
class FullFinetuneConfig(MethodConfig):
    lr: float = setting(1e-3, Range(0.0, 10.0), "SGD learning rate of every parameter (revealed labels only)")
    entropy_weight: float = setting(0.0, Range(0.0, 100.0), "weight of the unsupervised entropy loss (0: learn "
                                                            "only from revealed labels)")
    guard: bool = field(default=False, metadata={"help": "collapse guard (off: labels cannot drive a collapse)"})


@declare
class FullFinetune(Method):
    name = "full-finetune"
    paper = "full fine-tuning baseline (as in Sung et al. LST, NeurIPS 2022; Cai et al. TinyTL, NeurIPS 2020)"
    Config = FullFinetuneConfig
    config: FullFinetuneConfig
    partitioned = False

    def __init__(self, backbone, config: FullFinetuneConfig) -> None:
        super().__init__(backbone, config)
        del self.classifier  # not partitioned: the classifier stays inside the network copy
        self.net = copy.deepcopy(backbone).eval()
        self.net.requires_grad_(False)  # disable grad, to re-enable only what this method updates
        self._names: list[str] = []
        for name, param in self.net.named_parameters():
            if self.learns(name, param):
                param.requires_grad_(True)
                self._names.append(f"net.{name}")

    def learns(self, name: str, param: nn.Parameter) -> bool:
        """Whether the network copy's parameter ``name`` is trained (here: all of them)."""
        return True

    def taps(self) -> tuple[TapSpec, ...]:
        return (TapSpec(-1, pooled=False),)

    def trainable_names(self) -> list[str]:
        return list(self._names)

    def fit_parameters(self):
        return []  # no pre-deployment fit: the model is the source model

    def train(self, mode: bool = True):
        # The network copy always runs in eval mode: BatchNorm must not switch to batch statistics.
        super().train(mode)
        self.net.eval()
        return self

    def step(self, taps, target=None):
        if target is None and self.config.entropy_weight == 0.0:
            # Nothing to learn from an unlabelled sample: predict only, no backward pass.
            if self._initial is None:
                self.reset()
            with torch.no_grad():
                logits = self.net(taps[0])
            self.steps += 1
            self._guard_step(int(logits.argmax()))
            return logits
        return super().step(taps, target)

    def forward_graph(self, taps, state, momentum, target):
        logits = self.net(taps[0])
        return logits, supervised_or(self.config.entropy_weight * entropy(logits).sum(), logits, target), []
