"""vqt: visual query tuning — learnable queries summarise every layer's frozen features for a linear head.

Paper: C.-H. Tu, Z. Mai, W.-L. Chao. "Visual Query Tuning: Towards Effective Usage of Intermediate
Representations for Parameter and Memory Efficient Transfer Learning". CVPR 2023.

ViT (faithful): per layer, ``queries`` learnable tokens run through that layer with keys and
values from the layer's original tokens only (``TransformerLayer.forward_queries``), so the
backbone's own features are unchanged; the query outputs are collected and dropped; a linear
head reads [final CLS ‖ all query outputs]. Only queries and head train; the layers the queries
run through are frozen float copies held by this module. Choices the paper leaves open:

* Taps are stage outputs, so layer k+1's input is stage k's output: queries run through layers
  1..K-1. Layer 0 gets no queries — its input is the patch embedding inside stage 0, which is not
  a stage output (tapping it would split stage 0 off the frozen graph for one query set).
* Each query output is standardised by a parameter-free LayerNorm (the residual stream's scale
  grows with depth; the final CLS tap already carries the backbone's final LayerNorm).
* Queries start as N(0, 0.02^2) (VPT-style prompt initialisation); m=2 per layer (the head's
  input, and what its backward keeps, grow with m).

CNN (the same idea without attention layers): per stage, m learnable vectors attend to the
stage's frozen feature map (softmax over the H*W positions of ``q . x_p / sqrt(C)``; keys and
values are the features themselves) and return attention-weighted summaries; the head reads
[pooled last stage ‖ all summaries]. Taps: every stage's map plus the pooled last stage. Queries
start at zero, i.e. as global average pooling. Three choices the paper leaves open for CNNs (it has
no CNN form), all off by default (the defaults' measured rows predate them):

* ``positions``: a ViT's tokens carry a position embedding, a conv feature map does not, so a
  content-only query cannot pick out a region. With ``positions`` each query also has a learnable
  logit bias per position of each stage (``softmax(q . x_p / sqrt(C) + b_{q,p})``; m x H*W floats
  per stage, one tensor over all stages), zero at start so an unfitted vqt is unchanged (global
  average pooling). ViT refuses it (its tokens already carry positions).
* ``standardise``: each CNN query summary through a parameter-free LayerNorm, as the ViT path does.
* ``align_queries``: every feature of every CNN query summary re-standardised to zero mean and unit
  variance by its own running statistics (the estimator and momentum schedule of ``align``; source
  statistics measured at calibration; the statistics are behind a gradient stop, as BatchNorm's in
  eval mode; the fit standardises by its batch's statistics). Why: the head reads the final
  feature at its source scale beside summaries of the early stages whose values are ~10x smaller,
  and one learning rate per weight then leaves those summaries barely used. Measured before the
  choice (``benchmarks/labels.py --part probe``: a linear head on [final ‖ average-pooled stages],
  one label at a time over the digits stream, Adam, replay 24 x 3, best lr, 180 validation images):
  features as they are 82.2, standardised per feature by the stream's statistics 93.3, by the
  source's 86.7, LayerNorm per stage 85.6. Transfer Fashion-MNIST -> digits (mcunet-s, 1,258
  labels, held-out test; full fine-tuning 90.5), Adam + replay 24 x 3: nothing 83.0, ``positions``
  81.9, ``standardise`` 84.1, ``align_queries`` 90.3, ``align_queries`` + ``positions`` 90.5; with
  vqt's own SGD learner ``align_queries`` 91.4. Not the default: on Fashion-MNIST-C with 20 % labels
  (continual) it measured 45.8 against vqt's 48.2.

Both: the head starts as the backbone's classifier on the final feature with zero weights on the
queries, so an unfitted vqt predicts exactly like ``source``. Test time: queries
and head learn by SGD from revealed labels (supervised mode, lr 1e-4); entropy minimisation
(``entropy_weight``) is off by default — on the digits validation corruptions it cost accuracy at
every lr tried (1e-4: -3 points episodic, -8 continual), as unsupervised updates did on the prototypes.

Composed with forward-only alignment (``align``, on by default): the pooled final feature the head
reads is re-standardised by DUA's running statistics (``FeatureAligner``, the same estimator and
momentum schedule as ``feature-align``) before the head sees it; the query summaries are not
aligned (they are attention-weighted averages of the same maps and move with them). Why: without
labels vqt never updates, so on its own it cannot follow a shift that alignment follows for free;
measured on main before this choice (Fashion-MNIST-C, 20 % labels, continual): vqt 50.0 vs
feature-align 52.6. An unfitted aligned vqt predicts exactly like ``feature-align``; then the
queries and head learn from labels. ``align=false`` is vqt as in the paper.
Measured with ``benchmarks/labels.py`` (mcunet-s, ``results/labels/``): transfer Fashion-MNIST ->
digits, held-out accuracy after 1,258 labels, aligned 74.7 vs ``align=false`` 72.4 (full fine-tuning
90.5); Fashion-MNIST-C with 20 % labels (episodic) aligned 48.3, feature-align 53.7.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from edgetune.errors import ConfigError, ModelError
from edgetune.methods.align import EPS, FeatureAligner
from edgetune.methods.base import (Method, MethodConfig, Range, Schedule, TapSpec, declare, entropy, setting,
                                   stop_gradient, supervised_or)
from edgetune.models.zoo import TransformerLayer


@dataclass(frozen=True)
class VQTConfig(MethodConfig):
    lr: float = setting(1e-4, Range(0.0, 10.0), "SGD learning rate of queries and head at test time")
    entropy_weight: float = setting(0.0, Range(0.0, 100.0), "weight of the unsupervised entropy loss (0: learn "
                                                            "only from revealed labels, the supervised mode)")
    queries: int = setting(2, Range(1, 256), "learnable query tokens per layer (ViT) or per stage (CNN)")
    positions: bool = field(default=False, metadata={"help": "CNN: a learnable attention-logit bias per query and "
                                                              "position (queries can pick out regions)"})
    standardise: bool = field(default=False, metadata={"help": "CNN: standardise each query summary (parameter-free "
                                                                "LayerNorm, as the ViT path)"})
    align_queries: bool = field(default=False, metadata={"help": "CNN: standardise every query summary feature by "
                                                                  "its running statistics (as align does the final "
                                                                  "feature)"})
    align: bool = field(default=True, metadata={"help": "align the final feature the head reads (forward-only "
                                                        "feature alignment, as feature-align)"})
    momentum_start: float = setting(0.1, Range(0.0, 1.0), "alignment: EMA momentum of the first sample")
    momentum_decay: float = setting(0.94, Range(0.0, 1.0), "alignment: per-sample decay of the momentum")
    momentum_floor: float = setting(0.005, Range(0.0, 1.0), "alignment: lowest EMA momentum")


@declare
class VQT(Method):
    name = "vqt"
    paper = "Tu, Mai, Chao, Visual Query Tuning, CVPR 2023"
    Config = VQTConfig
    config: VQTConfig

    def __init__(self, backbone, config: VQTConfig) -> None:
        """Raises:
            ConfigError: a CNN option (positions, standardise, align_queries) on a ViT backbone.
            ModelError: a ViT whose stages have no ``forward_queries``.
        """
        super().__init__(backbone, config)
        self.depth = len(backbone.stages)
        self.vit = backbone.kind == "vit"
        widths = backbone.stage_widths()
        m = max(1, config.queries)
        if self.vit and (config.positions or config.standardise or config.align_queries):
            raise ConfigError("vqt: positions/standardise/align_queries are CNN options (observed a ViT backbone, "
                              "whose tokens carry position embeddings and whose query outputs are standardised "
                              "already); drop them")
        if self.vit:
            layers = list(backbone.stages[1:])
            missing = [k + 1 for k, layer in enumerate(layers) if not hasattr(layer, "forward_queries")]
            if missing:
                raise ModelError(f"vqt: ViT stages {missing} have no forward_queries(queries, tokens); build the "
                                 "model from edgetune.models.zoo.TransformerLayer or use a CNN backbone")
            self.layers = copy.deepcopy(nn.ModuleList(layers)).requires_grad_(False)
            self.queries = nn.ParameterList(nn.Parameter(torch.randn(m, widths[k + 1]) * 0.02)
                                            for k in range(self.depth - 1))
            summary = sum(m * widths[k + 1] for k in range(self.depth - 1))
        else:
            self.queries = nn.ParameterList(nn.Parameter(torch.zeros(m, c)) for c in widths)
            summary = m * sum(widths)
            # one tensor for every stage's position biases: zero-initialised tensors of equal shape would be
            # merged into one initialiser by the ONNX exporter (see edgetune.adapt.start_new_task)
            self.sizes = [math.prod(shape[1:]) for shape in backbone.stage_shapes()]
            if config.positions:
                self.positions = nn.Parameter(torch.zeros(m, sum(self.sizes)))
            if config.align_queries:  # running statistics of every summary feature: mean and E[x^2]
                for k, c in enumerate(widths):
                    self.register_buffer(f"query_mean{k}", torch.zeros(m * c))
                    self.register_buffer(f"query_sqmean{k}", torch.ones(m * c))
        self.head = nn.Linear(widths[-1] + summary, self.num_classes)
        with torch.no_grad():  # start as the source classifier: queries contribute nothing until fitted
            self.head.weight.zero_()
            self.head.weight[:, :widths[-1]] = self.classifier.weight
            self.head.bias.copy_(self.classifier.bias)
        self.aligner = FeatureAligner([widths[-1]]) if config.align else None

    def taps(self) -> tuple[TapSpec, ...]:
        queried = range(self.depth - 1) if self.vit else range(self.depth)
        return tuple(TapSpec(k, pooled=False) for k in queried) + (TapSpec(self.depth - 1, pooled=True),)

    def trainable_names(self) -> list[str]:
        return [n for n, _ in self.named_parameters() if n.startswith(("queries.", "head.")) or n == "positions"]

    def state_names(self) -> list[str]:
        names = self.aligner.state_names("aligner.") if self.aligner is not None else []
        if self.config.align_queries:
            names += [f"query_{s}{k}" for k in range(len(self.queries)) for s in ("mean", "sqmean")]
        return names

    def calibrate(self, batches) -> None:
        if self.aligner is not None:
            self.aligner.calibrate([torch.cat([b[-1] for b in batches])])
        if self.config.align_queries:
            with torch.no_grad():
                taps = [torch.cat([b[k] for b in batches]) for k in range(len(batches[0]))]
                for k, z in enumerate(self.summaries(taps)):
                    mean = z.double().mean(0)
                    getattr(self, f"query_mean{k}").copy_(mean.float())
                    getattr(self, f"query_sqmean{k}").copy_((z.double() ** 2).mean(0).float())

    def schedule(self) -> Schedule | None:
        c = self.config
        aligns = self.aligner is not None or c.align_queries
        return Schedule(c.momentum_start, c.momentum_decay, c.momentum_floor) if aligns else None

    def features(self, taps: list[torch.Tensor]) -> torch.Tensor:
        """[final feature ‖ query summaries] for a batch of taps (any batch size)."""
        return torch.cat([taps[-1]] + self.summaries(taps), 1)

    def summaries(self, taps: list[torch.Tensor]) -> list[torch.Tensor]:
        """Every layer's / stage's query summary, N x (m * C) each (not aligned)."""
        n = taps[0].shape[0]
        if self.vit:
            parts = []
            for k, layer in enumerate(self.layers):
                out = cast(TransformerLayer, layer).forward_queries(self.queries[k].expand(n, -1, -1), taps[k])
                parts.append(F.layer_norm(out, out.shape[-1:]).flatten(1))
            return parts
        parts, offset = [], 0
        for q, fmap, size in zip(self.queries, taps[:-1], self.sizes):
            flat = fmap.flatten(2)  # N x C x HW
            scores = q @ flat * flat.shape[1] ** -0.5  # N x m x HW
            if self.config.positions:
                scores = scores + self.positions[:, offset:offset + size]
            offset += size
            summary = torch.softmax(scores, dim=-1) @ flat.transpose(1, 2)  # N x m x C
            if self.config.standardise:
                summary = F.layer_norm(summary, summary.shape[-1:])
            parts.append(summary.flatten(1))
        return parts

    def fit_loss(self, taps, labels):
        if not self.config.align_queries:
            return F.cross_entropy(self.head(self.features(taps)), labels)
        # the fit's batch stands in for the running statistics the stream keeps at test time
        parts = [(z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + EPS) for z in self.summaries(taps)]
        return F.cross_entropy(self.head(torch.cat([taps[-1]] + parts, 1)), labels)

    def forward_graph(self, taps, state, momentum, target):
        taps, new_state = list(taps), []
        if self.aligner is not None:  # source taps in fit_loss are at the source statistics: no alignment there
            taps[-1], mean, sqmean = self.aligner.align(0, taps[-1], state[0], state[1], momentum)
            new_state = [mean, sqmean]
        if not self.config.align_queries:
            logits = self.head(self.features(taps))
        else:
            parts, stats = [taps[-1]], list(state[len(new_state):])
            for k, z in enumerate(self.summaries(taps)):
                x = stop_gradient(z)[0]  # the statistics follow the sample but carry no gradient
                mean = (1.0 - momentum) * stats[2 * k] + momentum * x
                sqmean = (1.0 - momentum) * stats[2 * k + 1] + momentum * x * x
                var = torch.clamp(sqmean - mean * mean, min=0.0)
                parts.append((z - mean) / torch.sqrt(var + EPS))
                new_state += [mean, sqmean]
            logits = self.head(torch.cat(parts, 1))
        return logits, supervised_or(self.config.entropy_weight * entropy(logits).sum(), logits, target), new_state
