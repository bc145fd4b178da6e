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
* Early exit: at the first open exit k whose prefix ensemble has max-probability > ``exit_threshold``.
  Every prefix ensemble is computed and the first confident one selected with tensor ops, so the
  graph has no data-dependent control flow and exports as it is. Stages after the exit do not
  count: their heads get no gradient and their alignment statistics stay as they were (masked),
  so the outputs do not depend on their taps and the compiled runtime skips those frozen stages.
* Default early exit (``exit_grid=4``, ``exit_stages=0``, ``exit_threshold=0.5``): one early exit, after stage 0,
  whose head reads stage 0's map average-pooled to a 4x4 grid (mcunet-s: 256 features instead of 16),
  each cell aligned on its own statistics. It is fit on generic shifted copies of the source
  (``fit_views``, ``shifted_views.py``: noise, blur, contrast, brightness, translation; none a test
  corruption; target half label, half the final classifier) and then frozen: weights in flash, no SGD
  momentum or guard snapshot, and no self-training, which on validation cost 1-3 points at every
  threshold (an exit that trains towards its own exits reinforces its mistakes). The runtime probes
  once, after stage 0. Why this placement: stage 0 costs a fifth of a sample, and its 4x4 head is right
  on ~60 % of shifted samples (its global-pool head: 24 %); exits 1 and 2 add a probe each for few
  exits. Measured on Fashion-MNIST-C (``benchmarks/exits.py``, ``results/exits-grid``): threshold chosen
  on the 4 validation corruptions; 0.46x of full inference's cortex-m4 QEMU instructions at +1.1 points
  over the same heads without exits. ``exit_threshold=1`` turns exits off (no probes; the grid head still
  votes in the ensemble); ``exit_grid=1`` with ``exit_stages=`` (empty) gives the earlier pooled heads at
  every exit. On a model whose stage 0 has no 2-D map the grid divides (1-D sensor convs, transformers,
  small or odd maps), that exit stays closed: no exits, every head pooled and self-training, as without
  exits. Earlier rules and heads (a threshold on the pooled heads, agreement trackers, per-exit
  thresholds, heads fit for shift, 2x2 / 4x4 grids at every exit) are in ``results/exits`` and
  ``results/exits-variants``.
* Exit rule ``exit_agreement`` > 0 (off by default): per-exit agreement trackers by confidence bin,
  recalibrated online from the samples that ran to the end (``exit_agreement.py``, after CALM); it
  replaces ``exit_threshold``. Measured on the pooled heads (``benchmarks/exits.py --rule agreement``,
  ``results/exits``): no better than the static threshold. ``gate`` is the static rule's hook
  (``benchmarks/exit_variants.py`` swaps in per-exit thresholds there).
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

from edgetune.errors import ConfigError
from edgetune.methods import exit_agreement, prior, shifted_views
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
    exit_threshold: float = setting(0.5, Range(0.0, 1.0), "exit early when the ensemble's max-probability "
                                                          "exceeds this (1: never, no probes)")
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
    exit_grid: tuple[int, ...] = field(default=(4,), metadata={
        "help": "early exit k's head reads its stage's map average-pooled to g x g (g: the k-th entry; 1 or no "
                "entry: the global pool); a grid applies where the stage output is a 2-D map whose sides g divides, "
                "else that exit stays closed"})
    exit_stages: tuple[int, ...] = field(default=(0,), metadata={
        "help": "the early exits that may be taken (exit k: after stage k; empty: every early exit); the runtime "
                "probes only after these stages"})
    fit_view_images: int = setting(shifted_views.SAMPLES, Range(1, 1_000_000), "fit of grid heads: source images per "
                                   "shifted copy (default: the measured fit; fewer fit faster and worse)")
    grid_heads_learn: bool = field(default=False, metadata={
        "help": "heads on a grid (exit_grid > 1) self-train at test time too (default: fit on source, then frozen)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        bad = [g for g in self.exit_grid if g < 1] + [k for k in self.exit_stages if k < 0]
        if bad:
            raise ConfigError(f"TinyTTAConfig: exit_grid entries must be >= 1 and exit_stages >= 0 (got "
                              f"exit_grid={self.exit_grid}, exit_stages={self.exit_stages}); e.g. exit_grid=4,1,1")


# The default before the grid exit: pooled heads at every stage, no exits (the studies that read pooled stage
# outputs, and the README rows "without exits", pass these settings).
POOLED_NO_EXITS = {"exit_grid": "", "exit_stages": "", "exit_threshold": "1"}

FIT_LABEL_WEIGHT = 0.5  # grid heads' fit target: this much label, the rest the final classifier (results/exits-grid)


def exit_grids(backbone, grid: tuple[int, ...]) -> tuple[int, ...]:
    """The grid of each early exit: ``grid``'s entry where the stage's output is an N x C x H x W map whose
    sides it divides, else 1 (the global pool)."""
    depth = len(backbone.stage_widths())
    wanted = [(grid[k] if k < len(grid) else 1) for k in range(depth - 1)]
    if all(g == 1 for g in wanted):
        return tuple(wanted)
    with torch.no_grad():
        h, shapes = torch.zeros(1, *backbone.input_shape), []
        for stage in backbone.stages[:depth - 1]:
            h = stage(h)
            shapes.append(tuple(h.shape))
    return tuple(g if len(s) == 4 and s[2] % g == 0 and s[3] % g == 0 else 1 for g, s in zip(wanted, shapes))


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
        self.exit_grids = exit_grids(backbone, config.exit_grid)
        features = [g * g * c for g, c in zip(self.exit_grids, widths[:-1])] + [widths[-1]]
        self.heads = nn.ModuleList(exit_head(c, config.hidden, self.num_classes) for c in features[:-1])
        self.aligner = FeatureAligner(features) if config.align else None
        k = self.depth
        opened = tuple(sorted(set(config.exit_stages))) or tuple(range(k - 1))
        if opened[-1] >= k - 1:
            raise ConfigError(f"tinytta: exit_stages {config.exit_stages} names a stage without an early exit (the "
                              f"model has early exits 0..{k - 2}); give stages below {k - 1}")
        # An exit whose head should read a grid but cannot (its stage has no 2-D map the grid divides) stays
        # closed: its global-pool head is far weaker (on mcunet-s 24 % vs 60 % right under shift).
        wanted = [config.exit_grid[j] if j < len(config.exit_grid) else 1 for j in range(k - 1)]
        opened = tuple(j for j in opened if not (wanted[j] > 1 and self.exit_grids[j] == 1))
        self.exit_stages = (*opened, k - 1)  # the declared exits: the open early ones, then the full network
        # Constants of the ensemble as buffers: prefix sums are a matmul with a lower-triangular
        # matrix (no CumSum op to lower), depth weights (k/K)**p, and the last exit's indicator.
        self.register_buffer("prefix_sum", torch.tril(torch.ones(k, k)), persistent=False)
        depth = (torch.arange(1, k + 1, dtype=torch.float32) / k) ** config.depth_power
        self.register_buffer("depth_weight", depth, persistent=False)
        self.register_buffer("is_last", (torch.arange(k) == k - 1).float(), persistent=False)
        # Which exits may be taken (0/1 over K), and the declared exits' rows of the K exits: the exit state
        # holds the one-hot over the declared exits, which is what the runtime's probe k reads.
        self.register_buffer("exit_open", torch.tensor([float(j in opened) for j in range(k)]), persistent=False)
        self.register_buffer("declared", torch.eye(k)[list(self.exit_stages)], persistent=False)
        self.register_buffer("exit_taken", torch.zeros(len(self.exit_stages)))
        # Heads on a grid are fit on shifted source copies and then frozen (flash, no momentum, no snapshot):
        # self-training an exit that decides its own exits reinforces its mistakes (results/exits-grid).
        learns = [float(g == 1 or config.grid_heads_learn) for g in self.exit_grids]
        self.register_buffer("head_learns", torch.tensor(learns), persistent=False)
        self._freeze_heads()
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
        return tuple(TapSpec(k, pooled=k == self.depth - 1 or self.exit_grids[k] == 1) for k in range(self.depth))

    def features(self, taps) -> list[torch.Tensor]:
        """What the heads read: a map tap (N x C x H x W) average-pooled to its exit's grid and flattened;
        pooled taps (N x C) as they are, so features of features are the features."""
        return [F.adaptive_avg_pool2d(t, g).flatten(1) if t.dim() == 4 else t
                for g, t in zip((*self.exit_grids, 1), taps)]

    def trainable_names(self) -> list[str]:
        return [n for n, _ in self.heads.named_parameters(prefix="heads") if self.head_learns[int(n.split(".")[1])]]

    def fit_parameters(self) -> list[nn.Parameter]:
        # Frozen grid heads are fit too: gradients reach every head during the fit, which ends in ``reset``
        # (adapt.fit), where the test-time flags come back.
        self.heads.requires_grad_(True)
        return list(self.heads.parameters())

    def _freeze_heads(self) -> None:
        """Gradients reach only the heads that learn at test time (a frozen grid head gets none, not a zero one)."""
        for head, learns in zip(self.heads, self.head_learns.tolist()):
            head.requires_grad_(bool(learns))

    def state_names(self) -> list[str]:
        aligned = self.aligner.state_names("aligner.") if self.aligner is not None else []
        tracked = ["exit_hits", "exit_seen", "exit_clock"] if self.config.exit_agreement > 0 else []
        return aligned + (["class_prior"] if self.config.prior_rate > 0 else []) + tracked + ["exit_taken"]

    def calibrate(self, batches) -> None:
        if self.aligner is not None:
            feats = [self.features(b) for b in batches]
            self.aligner.calibrate([torch.cat([f[k] for f in feats]) for k in range(self.depth)])

    def fit_views(self, frozen, images, targets, seed: int):
        """The pre-deployment fit's data when a head reads a grid: (features, soft targets) of
        ``shifted_views.COPIES`` copies of the first ``fit_view_images`` source images, each copy
        under one generic shift (none of them a test corruption) and re-standardised to the clean copy's
        statistics (what alignment does to such a stream); target = half the label, half the final
        classifier's prediction on the aligned sample (after Kaya et al., Shallow-Deep Networks, ICML
        2019, and self-distillation, Phuong & Lampert, ICCV 2019). None with only pooled heads (the
        plain fit). ``frozen``: images -> taps; ``targets``: class indices or probabilities.

        Raises:
            DataError: the images are not 2-D maps with channels (blur and translation need them).
        """
        if all(g == 1 for g in self.exit_grids):
            return None
        n = min(len(images), self.config.fit_view_images)
        x, targets = shifted_views.as_float(images[:n]), targets[:n]
        labels = targets if targets.dim() == 2 else F.one_hot(targets.long(), self.num_classes).float()
        rng = torch.Generator().manual_seed(seed)
        clean = self._view_features(frozen, x)
        feats, soft = [[] for _ in clean], []
        for view in shifted_views.views(x, rng):
            z = clean if view is None else shifted_views.restandardise(self._view_features(frozen, view), clean)
            with torch.no_grad():
                teacher = torch.softmax(self.classifier(z[-1]), -1)
            soft.append(FIT_LABEL_WEIGHT * labels + (1.0 - FIT_LABEL_WEIGHT) * teacher)
            for k, f in enumerate(z):
                feats[k].append(f)
        return [torch.cat(f) for f in feats], torch.cat(soft)

    @torch.no_grad()
    def _view_features(self, frozen, x: torch.Tensor, batch: int = 500) -> list[torch.Tensor]:
        parts = [self.features(frozen(x[i:i + batch])) for i in range(0, len(x), batch)]
        return [torch.cat([p[k] for p in parts]) for k in range(self.depth)]

    def schedule(self) -> Schedule | None:
        c = self.config
        return Schedule(c.momentum_start, c.momentum_decay, c.momentum_floor) if self.aligner is not None else None

    def exits(self) -> Exits | None:
        # A threshold >= 1 never exits (a max-probability is at most 1): declaring no exits spares the
        # runtime its probes between stages (+1.3 % instructions per sample on mcunet-s, for nothing).
        exits = (self.config.exit_threshold < 1.0 or self.config.exit_agreement > 0) and len(self.exit_stages) > 1
        return Exits(self.exit_stages, "exit_taken") if exits else None

    def fit_loss(self, taps, labels):
        # Source taps are already at the source statistics: alignment is the identity there.
        return sum(F.cross_entropy(head(z), labels) for head, z in zip(self.heads, self.features(taps)))

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
        return (prefix.amax(-1) > self.config.exit_threshold).float() * self.exit_open

    def ensemble(self, log_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(prediction 1 x C, one-hot exit over K) by the static threshold (no gradient)."""
        prefix = self.prefixes(log_probs)
        return self.select(prefix, self.gate(prefix))

    def forward_graph(self, taps, state, momentum, target):
        taps = self.features(taps)
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
                                             c.exit_rate) * (1.0 - explore) * self.exit_open[:-1]
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
        loss = -((ran[:-1] * self.head_learns)[:, None] * soft_target * log_probs[:-1]).sum()
        if class_prior is not None:
            new_state.append(prior.update(class_prior, prediction, c.prior_rate))
        new_state += tracked + [self.declared @ chosen]
        return torch.log(prediction.clamp_min(1e-12)), loss, new_state

    def reset(self) -> None:
        self._freeze_heads()  # before the optimizer is rebuilt over the trainable parameters
        super().reset()
        self.exit_counts = [0] * self.depth

    def step(self, taps, target=None):
        logits = super().step(taps, target)
        if target is None:
            self.last_exit = self.exit_stages[int(torch.argmax(self.exit_taken))]
            self.exit_counts[self.last_exit] += 1
        return logits
