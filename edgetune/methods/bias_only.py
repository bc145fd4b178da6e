"""bias-only: the biases of every layer (and the classifier) learn from revealed labels (TinyTL's bias update).

Paper: H. Cai, C. Gan, L. Zhu, S. Han. "TinyTL: Reduce Memory, Not Parameters for Efficient On-Device
Learning". NeurIPS 2020. TinyTL's observation: a weight's gradient needs the layer's input activation,
a bias's does not, so freezing the weights and updating the biases removes most of the training
memory of fine-tuning. Choices the paper leaves open here:

* Trainable: every ``bias`` of the network copy (on ``ws`` models the biases live in the per-channel
  affine after each weight-standardised conv) and the classifier's weight and bias — TinyTL trains
  the head with the biases (a new task's classes need one). TinyTL's lite residual modules are left
  out: they are new layers with activations of their own, and the question asked here is what the
  bias update alone buys.
* Everything else as ``full-finetune`` (one float copy of the backbone, not partitioned; batch 1,
  SGD momentum 0.9; labels only; no backward pass on an unlabelled sample; guard off; no fit).
* lr 3e-4: with 20 % labels under shift (``benchmarks/labels.py --tune``: mcunet-s, the 4
  validation corruptions, continual) 3e-4 / 1e-3 / 3e-3 / 1e-2 gave 70.2 / 62.8 / 45.2 / 26.5;
  for a new task's fresh classifier the benchmark uses 1e-2 (not tuned there: no time was left).
* Memory: what torch keeps for the backward pass is measured, not assumed (``edgetune.memory``):
  the activations the bias gradients pass through (ReLU masks, the inputs of the norm affines)
  are still kept, as TinyTL notes for non-linearities.
"""
from __future__ import annotations

from dataclasses import dataclass

from edgetune.methods.base import Range, declare, setting
from edgetune.methods.full_finetune import FullFinetune, FullFinetuneConfig


@dataclass(frozen=True)
class BiasOnlyConfig(FullFinetuneConfig):
    lr: float = setting(3e-4, Range(0.0, 10.0), "SGD learning rate of the biases and the classifier "
                                                "(revealed labels only)")


@declare
class BiasOnly(FullFinetune):
    name = "bias-only"
    paper = "Cai, Gan, Zhu, Han, TinyTL: Reduce Memory, Not Parameters for Efficient On-Device Learning, NeurIPS 2020"
    Config = BiasOnlyConfig
    config: BiasOnlyConfig

    def learns(self, name, param) -> bool:
        return name.endswith(".bias") or name.startswith("classifier.")
