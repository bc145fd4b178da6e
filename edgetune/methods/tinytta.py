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
* Exit rule ``exit_agreement`` > 0 (off by default): per-exit agreement trackers by confidence bin,
  recalibrated online from the samples that ran to the end (``exit_agreement.py``, after CALM); it
  replaces ``exit_threshold``. Measured (``benchmarks/exits.py --rule agreement``, ``results/exits``):
  no better than the static threshold (test: target 0.9 0.94x instructions at -0.2 points, 0.8 0.88x
  at -1.2; threshold 0.85 0.90x at -0.5), so neither is on by default. ``gate`` is the static rule's hook:
  ``benchmarks/exit_variants.py`` swaps in per-exit thresholds there (results/exits-variants: heads on a 4x4
  pooled stage map, fit on shifted source copies, reach 0.69x at +0.2 points but do not fit a Cortex-M4's SRAM).
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

from edgetune.methods import exit_agreement, prior
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
    exit_agreement: float = setting(0.0, Range(0.0, 1.0), "exit rule: open exit k for a confidence bin while the "
                                                          "samples that ran to the end agreed with it at least this "
                                                          "often (0: the static exit_threshold)")
    exit_bins: int = setting(10, Range(1, 100), "exit rule: confidence bins of each exit's agreement tracker")
    exit_explore: int = setting(10, Range(0, 1_000_000), "exit rule: every N-th sample runs to the end to feed "
                                                         "the trackers (0: never)")
    exit_rate: float = setting(0.05, Range(0.0, 1.0, lo_open=True), "exit rule: EMA rate of the agreement trackers")


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
        if config.exit_agreement > 0:  # the trackers start empty: every exit closed until they have evidence
            self.register_buffer("exit_hits", torch.zeros(k - 1, config.exit_bins))
            self.register_buffer("exit_seen", torch.zeros(k - 1, config.exit_bins))
            self.register_buffer("exit_clock", torch.zeros(1))
            self.register_buffer("suffix", exit_agreement.suffix_matrix(config.exit_bins), persistent=False)

    def taps(self) -> tuple[TapSpec, ...]:
        return tuple(TapSpec(k, pooled=True) for k in range(self.depth))

    def trainable_names(self) -> list[str]:
        return [n for n, _ in self.heads.named_parameters(prefix="heads")]

    def state_names(self) -> list[str]:
        aligned = self.aligner.state_names("aligner.") if self.aligner is not None else []
        tracked = ["exit_hits", "exit_seen", "exit_clock"] if self.config.exit_agreement > 0 else []
        return aligned + (["class_prior"] if self.config.prior_rate > 0 else []) + tracked + ["exit_taken"]

    def calibrate(self, batches) -> None:
        if self.aligner is not None:
            self.aligner.calibrate([torch.cat([b[k] for b in batches]) for k in range(self.depth)])

    def schedule(self) -> Schedule | None:
        c = self.config
        return Schedule(c.momentum_start, c.momentum_decay, c.momentum_floor) if self.aligner is not None else None

    def exits(self) -> Exits | None:
        # A threshold >= 1 never exits (a max-probability is at most 1): declaring no exits spares the
        # runtime its probes between stages (+1.3 % instructions per sample on mcunet-s, for nothing).
        exits = self.config.exit_threshold < 1.0 or self.config.exit_agreement > 0
        return Exits(tuple(range(self.depth)), "exit_taken") if exits else None

    def fit_loss(self, taps, labels):
        # Source taps are already at the source statistics: alignment is the identity there.
        return sum(F.cross_entropy(head(z), labels) for head, z in zip(self.heads, taps))

    def prefixes(self, log_probs: torch.Tensor) -> torch.Tensor:
        """The prefix ensembles K x C (row k: exits 0..k) from the exits' log-probabilities K x C."""
        probs = log_probs.exp()
        confidence = 1.0 - (-(probs * log_probs).sum(-1)) / math.log(self.num_classes)
        weights = torch.clamp(confidence, min=1e-3) * self.depth_weight
        return (self.prefix_sum @ (weights[:, None] * probs)) / (self.prefix_sum @ weights)[:, None]

    def select(self, prefix: torch.Tensor, gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(prediction 1 x C, one-hot exit over K): the first prefix whose ``gate`` (K, 0/1) is set, else the last."""
        confident = torch.maximum(gate, self.is_last)
        chosen = confident * ((self.prefix_sum @ confident) == 1.0).float()  # the first confident prefix
        return (chosen[:, None] * prefix).sum(0, keepdim=True), chosen

    def gate(self, prefix: torch.Tensor) -> torch.Tensor:
        """The static rule: 1 for every prefix (K x C) confident enough to exit at, else 0."""
        return (prefix.amax(-1) > self.config.exit_threshold).float()

    def ensemble(self, log_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(prediction 1 x C, one-hot exit over K) by the static threshold (no gradient)."""
        prefix = self.prefixes(log_probs)
        return self.select(prefix, self.gate(prefix))

    def forward_graph(self, taps, state, momentum, target):
        feats, updated = list(taps), []
        if self.aligner is not None:
            for k in range(self.depth):
                feats[k], mean, sqmean = self.aligner.align(k, taps[k], state[2 * k], state[2 * k + 1], momentum)
                updated.append((mean, sqmean))
        logits = [head(z) for head, z in zip(self.heads, feats)] + [self.classifier(feats[-1])]
        log_probs = F.log_softmax(torch.cat(logits), dim=-1)
        c, at = self.config, 2 * self.depth if self.aligner is not None else 0  # state after the statistics
        class_prior = state[at] if c.prior_rate > 0 else None
        prefix = self.prefixes(stop_gradient(log_probs))
        corrected = prior.correct(prefix, class_prior, c.prior_strength) if class_prior is not None else prefix
        if c.exit_agreement > 0:
            hits, seen, clock = state[at + (class_prior is not None):][:3]
            onehot = exit_agreement.bin_onehot(prefix[:-1].amax(-1), c.exit_bins)
            explore, clock = exit_agreement.explore_now(clock, c.exit_explore)
            gate = exit_agreement.open_exits(onehot, hits, seen, self.suffix, c.exit_agreement,
                                             c.exit_rate) * (1.0 - explore)
            prediction, chosen = self.select(corrected, torch.cat([gate, torch.zeros(1)]))
            tracked = [*exit_agreement.update(hits, seen, onehot, corrected, chosen[-1:], c.exit_rate), clock]
        else:
            prediction, chosen = self.select(corrected, self.gate(prefix))
            tracked = []
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
        if class_prior is not None:
            new_state.append(prior.update(class_prior, prediction, c.prior_rate))
        new_state += tracked + [chosen]
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
