"""lst: ladder side-tuning — a narrow side network fed by the frozen backbone's stage outputs.

Paper: Y.-L. Sung, J. Cho, M. Bansal. "LST: Ladder Side-Tuning for Parameter and Memory Efficient
Transfer Learning". NeurIPS 2022. The taps are graph inputs (computed by the frozen int8 side),
so no gradient can reach the backbone: only the side network keeps activations for backward.

As in the paper: side width = backbone width / r (r=8); a ladder per stage projects the stage
output to side width (1x1 conv for CNN feature maps, linear for ViT tokens); the side state is
mixed as ``h = mu_i * h + (1 - mu_i) * ladder_i(tap_i)`` with ``mu_i = sigmoid(alpha_i / T)``,
T=0.1, alpha_i=0 at start. Choices the paper leaves open (it only treats equal-width transformers):

* Side width per stage: ``ceil(C_i / r)``, mirroring the backbone's own widening.
* Side blocks: stage 0 has none (its ladder is the side network's stem); side block i
  (i=1..K-1) carries the side state from stage i-1 to stage i before the ladder mix — the narrow
  twin of backbone stage i. No block after the last mix: the head reads the last mix directly.
* CNN side block: 3x3 conv (bias) + ReLU; it changes the width and downsamples by the stage's
  resolution ratio with its stride (a learned downsampling, like the backbone's own strided
  convs). No normalisation layer: the side network stays batch-agnostic and trivially exportable.
* ViT side block: a pre-norm transformer layer of side width, one head, MLP 2x the width.
* Head: linear on the final side state, average-pooled over positions (or tokens).
* Initialisation: PyTorch defaults (not the paper's pruned backbone weights: the backbone's
  stages change width and resolution, so there is no layer-for-layer twin to prune from).
* Test time: the whole side network and head learn by SGD from revealed labels (supervised mode,
  lr 1e-3). Entropy minimisation is available (``entropy_weight``) but off by default: on the
  digits validation corruptions it cost accuracy at every lr tried (1e-4: -5 points episodic,
  -28 continual, despite the collapse guard), as unsupervised updates did on the prototypes.
* Composed with forward-only alignment (``align``, on by default): the side network's output is
  a residual on the backbone's own prediction, ``logits = classifier(align(pooled last stage)) +
  head(side)``, where ``align`` is DUA's running re-standardisation (``FeatureAligner``, the same
  estimator and momentum schedule as ``feature-align``). Why: without labels lst never updates, so
  on its own it cannot follow a shift that alignment follows for free; measured on main before
  this choice (Fashion-MNIST-C, 20 % labels, continual): lst 49.5 vs feature-align 52.6. LST itself
  combines side and backbone (its ladders read the backbone); here the backbone's aligned output
  joins at the end as well. With a zero side output lst is exactly ``feature-align``; the head
  keeps PyTorch's default initialisation (a zero head starves the side network of gradient
  until the head has grown, and the fit would start at a point it barely leaves), and the fit
  trains the side network and head on the residual over the frozen source classifier. At test
  time the classifier learns from labels too (it is what ``last-layer`` trains: lst must do at
  least as well). ``align=false`` is the side network alone, as in the paper. ``zero_start``
  with ``fit_epochs=0`` is the other start measured for personalisation (``benchmarks/labels.py``):
  a side network that has not seen the source adds nothing until labels teach it.
  Measured with ``benchmarks/labels.py`` (mcunet-s, ``results/labels/``): transfer Fashion-MNIST ->
  digits, held-out accuracy after 1,258 labels, aligned 80.8 vs ``align=false`` 61.3 (full
  fine-tuning 90.5); Fashion-MNIST-C with 20 % labels (episodic) aligned 51.2, feature-align 53.7.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from edgetune.errors import ModelError
from edgetune.methods.align import FeatureAligner
from edgetune.methods.base import (Method, MethodConfig, Range, Schedule, TapSpec, declare, entropy, setting,
                                   supervised_or)
from edgetune.models.zoo import TransformerLayer


@dataclass(frozen=True)
class LSTConfig(MethodConfig):
    lr: float = setting(1e-3, Range(0.0, 10.0), "SGD learning rate of the side network and head at test time")
    entropy_weight: float = setting(0.0, Range(0.0, 100.0), "weight of the unsupervised entropy loss (0: learn "
                                                            "only from revealed labels, the supervised mode)")
    reduction: int = setting(8, Range(1, 4096), "r: side width = backbone stage width / r (rounded up)")
    temperature: float = setting(0.1, Range(0.0, 100.0, lo_open=True),
                                 "T of the ladder gates mu_i = sigmoid(alpha_i / T)")
    align: bool = field(default=True, metadata={"help": "add the aligned backbone prediction (forward-only "
                                                        "feature alignment, as feature-align) to the side output"})
    momentum_start: float = setting(0.1, Range(0.0, 1.0), "alignment: EMA momentum of the first sample")
    momentum_decay: float = setting(0.94, Range(0.0, 1.0), "alignment: per-sample decay of the momentum")
    momentum_floor: float = setting(0.005, Range(0.0, 1.0), "alignment: lowest EMA momentum")
    zero_start: bool = field(default=False, metadata={"help": "start the side head at zero (with align and "
                                                              "fit_epochs=0: exactly feature-align until labels "
                                                              "teach the side network)"})


def side_width(width: int, reduction: int) -> int:
    return max(1, math.ceil(width / max(1, reduction)))


@declare
class LST(Method):
    name = "lst"
    paper = ("Sung, Cho, Bansal, LST: Ladder Side-Tuning for Parameter and Memory Efficient Transfer Learning, "
             "NeurIPS 2022")
    Config = LSTConfig
    config: LSTConfig

    def __init__(self, backbone, config: LSTConfig) -> None:
        super().__init__(backbone, config)
        shapes = backbone.stage_shapes()
        self.depth = len(shapes)
        self.vit = backbone.kind == "vit"
        widths = [s[-1] if self.vit else s[0] for s in shapes]
        side = [side_width(c, config.reduction) for c in widths]
        if self.vit:
            self.ladders = nn.ModuleList(nn.Linear(c, s) for c, s in zip(widths, side))
            self.blocks = nn.ModuleList(self._vit_block(side[i - 1], side[i]) for i in range(1, self.depth))
        else:  # 1-D stages (N x C x T) get 1-D convs, images 2-D ones
            conv = nn.Conv1d if len(shapes[0]) == 2 else nn.Conv2d
            self.ladders = nn.ModuleList(conv(c, s, 1) for c, s in zip(widths, side))
            self.blocks = nn.ModuleList(
                nn.Sequential(conv(side[i - 1], side[i], 3, self._stride(shapes, i), 1), nn.ReLU())
                for i in range(1, self.depth))
        self.alphas = nn.Parameter(torch.zeros(max(0, self.depth - 1)))
        self.head = nn.Linear(side[-1], self.num_classes)
        self.aligner = FeatureAligner([widths[-1]]) if config.align else None
        if self.aligner is not None:
            self.classifier.requires_grad_(True)  # learns from labels (the copy inherits requires_grad=False)
        if config.zero_start:
            with torch.no_grad():
                self.head.weight.zero_()
                self.head.bias.zero_()

    @staticmethod
    def _vit_block(cin: int, cout: int) -> nn.Module:
        layer = TransformerLayer(cout, heads=1, mlp=2 * cout)
        return layer if cin == cout else nn.Sequential(nn.Linear(cin, cout), layer)

    @staticmethod
    def _stride(shapes: list[tuple[int, ...]], i: int) -> int:
        before, after = shapes[i - 1][1], shapes[i][1]
        if after <= 0 or before % after or any(b != before // after * a for b, a in zip(shapes[i - 1][1:],
                                                                                          shapes[i][1:])):
            raise ModelError(f"lst: stage {i} output {shapes[i]} is not an integer downsampling of stage {i - 1} "
                             f"output {shapes[i - 1]}; lst needs stage resolutions that divide each other")
        return before // after

    def taps(self) -> tuple[TapSpec, ...]:
        aligned = (TapSpec(self.depth - 1, pooled=True),) if self.aligner is not None else ()
        return tuple(TapSpec(k, pooled=False) for k in range(self.depth)) + aligned

    def trainable_names(self) -> list[str]:
        return [n for n, _ in self.named_parameters() if self.aligner is not None or not n.startswith("classifier.")]

    def fit_parameters(self):
        named = dict(self.named_parameters())  # the fit trains the side network; the classifier is the source's
        return [named[n] for n in self.trainable_names() if not n.startswith("classifier.")]

    def state_names(self) -> list[str]:
        return self.aligner.state_names("aligner.") if self.aligner is not None else []

    def calibrate(self, batches) -> None:
        if self.aligner is not None:
            self.aligner.calibrate([torch.cat([b[self.depth] for b in batches])])

    def schedule(self) -> Schedule | None:
        c = self.config
        return Schedule(c.momentum_start, c.momentum_decay, c.momentum_floor) if self.aligner is not None else None

    def logits(self, taps: list[torch.Tensor]) -> torch.Tensor:
        """Side network + head on a batch of stage outputs (any batch size)."""
        h = self.ladders[0](taps[0])
        for i in range(1, self.depth):
            mu = torch.sigmoid(self.alphas[i - 1] / self.config.temperature)
            h = mu * self.blocks[i - 1](h) + (1.0 - mu) * self.ladders[i](taps[i])
        return self.head(h.mean(dim=1) if self.vit else h.mean(dim=tuple(range(2, h.dim()))))

    def fit_loss(self, taps, labels):
        # Source taps are at the source statistics already: alignment is the identity there.
        residual = self.classifier(taps[self.depth]) if self.aligner is not None else 0.0
        return F.cross_entropy(self.logits(taps[:self.depth]) + residual, labels)

    def forward_graph(self, taps, state, momentum, target):
        logits, new_state = self.logits(taps[:self.depth]), []
        if self.aligner is not None:
            z, mean, sqmean = self.aligner.align(0, taps[self.depth], state[0], state[1], momentum)
            logits, new_state = logits + self.classifier(z), [mean, sqmean]
        return logits, supervised_or(self.config.entropy_weight * entropy(logits).sum(), logits, target), new_state
