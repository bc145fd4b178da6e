"""tinytta: early-exit self-ensemble with pool-first exit heads, composed with feature alignment.

Paper: H. Jia, Y. D. Kwon, A. Orsino, T. Dang, D. Talia, C. Mascolo. "TinyTTA: Efficient Test-time
Adaptation via Early-exit Ensembles on Edge Devices". NeurIPS 2024. Choices the paper leaves
open, made here (DESIGN §3 has the prototype measurements behind them):

* K = the backbone's stage count (4 for every zoo model). Exit heads after stages 1..K-1 pool
  first (global average pool of the stage output, done on the frozen side): a head that
  convolves at the tap's resolution would keep a full-resolution activation for its backward
  pass. Each head is then linear by default (``hidden=0``); ``hidden=64`` gives a small MLP. On
  the Fashion-MNIST validation corruptions the MLP heads were 0.6 points better (71.45 vs 70.85,
  episodic, ``results/d``), but on mcunet-s their weights, SGD momentum and the collapse guard's
  snapshot take 87 KB of a Cortex-M4's SRAM against 10 KB for linear heads, which keeps
  adaptation within +30 % of the inference-only firmware. The last exit is the backbone's own
  classifier (copied to the float side) and is never updated: updating it hurt on the prototypes.
* Feature alignment (``align.py``, DUA's decaying momentum 0.2 * 0.98^t, floor 0.005, chosen on
  the Fashion-MNIST validation corruptions) on all K pooled taps before the heads read them
  (``align=false`` gives the paper's plain ensemble).
* Prediction: confidence-weighted ensemble of the exits computed so far,
  ``w_k = max(1e-3, 1 - H_k / ln C) * (k / K)**depth_power`` (later exits weigh more; the floor
  keeps the ensemble defined when every exit is uniform). ``depth_power`` 4, chosen on validation
  from {1, 4, 20} (71.5, 72.1, 72.05): the early heads are weaker than the last exit; at 4 they
  still add what self-training teaches them.
* Online class-prior correction of the prediction (``prior.py``, Saerens et al. 2002): the
  ensemble's prediction divided by the stream's running class prior (EMA of the corrected
  predictions, rate ``prior_rate`` 0.02, strength 1 = Bayes' rule; ``prior_rate=0`` turns it off).
  On validation it is worth +0.35 (71.75 without it); on the test corruptions +0.7 / +0.9.
* Early exit: at the first k whose prefix ensemble has max-probability > ``exit_threshold``.
  Every prefix ensemble is computed and the first confident one selected with tensor ops, so the
  graph has no data-dependent control flow and exports as it is. Stages after the exit do not
  count: their heads get no gradient and their alignment statistics stay as they were (masked),
  so the outputs do not depend on their taps and the compiled runtime skips those frozen stages.
  Default 1.0 = never exit early: early exits are often confidently
  wrong under shift, so a threshold calibrated on clean data cannot be trusted there (on the
  digits validation corruptions 0.8 exited early on 14% of samples for -0.4 points).
* Test-time loss (self-training): soft cross-entropy of every head that ran towards the
  ensemble's (stopped, prior-corrected) prediction — self-distillation from the aligned ensemble
  into the heads. Supervised mode: each head towards the label. Chosen on the 4 validation
  corruptions (``benchmarks/self_training.py``, 1,000 samples each, mean of both protocols: 72.1,
  feature-align 71.7): lr 0.05 of {1e-4, 1e-2, 0.05, 0.2} (71.9, 72.0, 72.1, 71.4); hard
  pseudo-labels 71.1; a confidence filter of 0.9 (as FixMatch) 72.1, with hard labels 72.15 (a tie:
  the simpler rule kept); the last classifier learning too 69.2 (71.2 with hard labels and the
  filter); SHOT's information maximisation 71.7 / 71.2 (lr 1e-3 / 1e-2); T3A-style running class
  prototypes added to the classifier's logits 66.6-71.5.
* Pre-deployment fit: heads trained with cross-entropy on source taps, backbone frozen (early
  exits converge slowly, hence more epochs than the other methods).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from edgetune.methods import prior
from edgetune.methods.align import FeatureAligner
from edgetune.methods.base import (Exits, Method, MethodConfig, Range, Schedule, TapSpec, declare, setting,
                                   stop_gradient)


@dataclass(frozen=True)
class TinyTTAConfig(MethodConfig):
    lr: float = setting(0.05, Range(0.0, 10.0), "SGD learning rate of the exit heads' self-training towards the "
                                                "ensemble's prediction (chosen on validation)")
    fit_epochs: int = setting(60, Range(0, 100_000), "epochs of the pre-deployment fit of the exit heads")
    hidden: int = setting(0, Range(0, 65_536), "hidden width of each exit head's MLP (0: a linear head, "
                                               "the default: 1/9 of the SRAM of hidden=64 on mcunet-s)")
    exit_threshold: float = setting(1.0, Range(0.0, 1.0), "exit early when the ensemble's max-probability "
                                                          "exceeds this (>= 1: never)")
    align: bool = field(default=True, metadata={"help": "align the pooled taps to the source statistics first"})
    momentum_start: float = setting(0.2, Range(0.0, 1.0), "alignment: EMA momentum of the first sample")
    momentum_decay: float = setting(0.98, Range(0.0, 1.0), "alignment: per-sample decay of the momentum")
    momentum_floor: float = setting(0.005, Range(0.0, 1.0), "alignment: lowest EMA momentum")
    depth_power: float = setting(4.0, Range(0.0, 100.0), "ensemble: exit k of K weighs (k/K)**depth_power")
    prior_rate: float = setting(0.02, Range(0.0, 1.0), "class-prior correction: EMA rate of the stream's class "
                                                       "prior (0: no correction)")
    prior_strength: float = setting(1.0, Range(0.0, 10.0), "class-prior correction: exponent of the prior "
                                                           "(1: Bayes' rule)")


def exit_head(width: int, hidden: int, classes: int) -> nn.Module:
    """A pool-first exit head: pooled feature (N x width) -> logits."""
    if hidden <= 0:
        return nn.Linear(width, classes)
    return nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, classes))


@declare
class TinyTTA(Method):
    name = "tinytta"
    paper = "Jia et al., TinyTTA: Efficient Test-time Adaptation via Early-exit Ensembles on Edge Devices, NeurIPS 2024"
    Config = TinyTTAConfig
    config: TinyTTAConfig
    prefix_sum: torch.Tensor
    depth_weight: torch.Tensor
    is_last: torch.Tensor
    exit_taken: torch.Tensor

    def __init__(self, backbone, config: TinyTTAConfig) -> None:
        super().__init__(backbone, config)
        widths = backbone.stage_widths()
        self.depth = len(widths)
        self.heads = nn.ModuleList(exit_head(c, config.hidden, self.num_classes) for c in widths[:-1])
        self.aligner = FeatureAligner(widths) if config.align else None
        self.register_buffer("exit_taken", torch.zeros(self.depth))
        # Constants of the ensemble as buffers: prefix sums are a matmul with a lower-triangular
        # matrix (no CumSum op to lower), depth weights (k/K)**p, and the last exit's indicator.
        k = self.depth
        self.register_buffer("prefix_sum", torch.tril(torch.ones(k, k)), persistent=False)
        depth = (torch.arange(1, k + 1, dtype=torch.float32) / k) ** config.depth_power
        self.register_buffer("depth_weight", depth, persistent=False)
        self.register_buffer("is_last", (torch.arange(k) == k - 1).float(), persistent=False)
        self.classifier.requires_grad_(False)  # the last exit is never updated
        self.last_exit: int | None = None
        self.exit_counts = [0] * self.depth  # unsupervised samples per exit since reset (integers)
        if config.prior_rate > 0:
            self.register_buffer("class_prior", prior.uniform_prior(self.num_classes))

    def taps(self) -> tuple[TapSpec, ...]:
        return tuple(TapSpec(k, pooled=True) for k in range(self.depth))

    def trainable_names(self) -> list[str]:
        return [n for n, _ in self.heads.named_parameters(prefix="heads")]

    def state_names(self) -> list[str]:
        aligned = self.aligner.state_names("aligner.") if self.aligner is not None else []
        return aligned + (["class_prior"] if self.config.prior_rate > 0 else []) + ["exit_taken"]

    def calibrate(self, batches) -> None:
        if self.aligner is not None:
            self.aligner.calibrate([torch.cat([b[k] for b in batches]) for k in range(self.depth)])

    def schedule(self) -> Schedule | None:
        c = self.config
        return Schedule(c.momentum_start, c.momentum_decay, c.momentum_floor) if self.aligner is not None else None

    def exits(self) -> Exits | None:
        # A threshold >= 1 never exits (a max-probability is at most 1): declaring no exits spares the
        # runtime its probes between stages (+1.3 % instructions per sample on mcunet-s, for nothing).
        return Exits(tuple(range(self.depth)), "exit_taken") if self.config.exit_threshold < 1.0 else None

    def fit_loss(self, taps, labels):
        # Source taps are already at the source statistics: alignment is the identity there.
        return sum(F.cross_entropy(head(z), labels) for head, z in zip(self.heads, taps))

    def ensemble(self, log_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(prediction 1 x C, one-hot exit over K) from the exits' log-probabilities K x C (no gradient)."""
        probs = log_probs.exp()
        confidence = 1.0 - (-(probs * log_probs).sum(-1)) / math.log(self.num_classes)
        weights = torch.clamp(confidence, min=1e-3) * self.depth_weight
        prefix = (self.prefix_sum @ (weights[:, None] * probs)) / (self.prefix_sum @ weights)[:, None]
        confident = torch.maximum((prefix.amax(-1) > self.config.exit_threshold).float(), self.is_last)
        chosen = confident * ((self.prefix_sum @ confident) == 1.0).float()  # the first confident prefix
        return (chosen[:, None] * prefix).sum(0, keepdim=True), chosen

    def forward_graph(self, taps, state, momentum, target):
        feats, updated = list(taps), []
        if self.aligner is not None:
            for k in range(self.depth):
                feats[k], mean, sqmean = self.aligner.align(k, taps[k], state[2 * k], state[2 * k + 1], momentum)
                updated.append((mean, sqmean))
        logits = [head(z) for head, z in zip(self.heads, feats)] + [self.classifier(feats[-1])]
        log_probs = F.log_softmax(torch.cat(logits), dim=-1)
        prediction, chosen = self.ensemble(stop_gradient(log_probs))
        if self.config.prior_rate > 0:
            prediction = prior.correct(prediction, state[-2], self.config.prior_strength)
        ran = 1.0 - self.prefix_sum @ chosen + chosen  # exit k ran iff the sample exited at k or later
        # A stage after the exit never ran: its statistics stay as they were (masked, not branched), so
        # the outputs do not depend on the taps of skipped stages and a runtime may leave them uncomputed.
        new_state = []
        for k, (mean, sqmean) in enumerate(updated):
            new_state += [ran[k] * mean + (1.0 - ran[k]) * state[2 * k],
                          ran[k] * sqmean + (1.0 - ran[k]) * state[2 * k + 1]]
        labelled = target.sum()
        soft_target = labelled * target + (1.0 - labelled) * prediction
        loss = -(ran[:-1, None] * soft_target * log_probs[:-1]).sum()
        if self.config.prior_rate > 0:
            new_state.append(prior.update(state[-2], prediction, self.config.prior_rate))
        new_state.append(chosen)
        return torch.log(prediction.clamp_min(1e-12)), loss, new_state

    def reset(self) -> None:
        super().reset()
        self.exit_counts = [0] * self.depth

    def step(self, taps, target=None):
        logits = super().step(taps, target)
        if target is None:
            self.last_exit = int(torch.argmax(self.exit_taken))
            self.exit_counts[self.last_exit] += 1
        return logits
