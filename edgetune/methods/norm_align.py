"""norm-align: per-layer normalisation alignment inside the frozen backbone, forward only, batch 1.

Paper: M. J. Mirza, J. Micorek, H. Possegger, H. Bischof. "The Norm Must Go On: Dynamic
Unsupervised Domain Adaptation by Normalization". CVPR 2022 (DUA) — its decaying-momentum
running statistics, applied to every convolution of a backbone that has no BatchNorm left.

For every convolution of the export-fused backbone (its normalisation folded in, as the int8
graph has it) the method keeps an exponential moving average of the stream's per-channel mean
and second moment of the convolution's *pre-activation* (the int32 accumulator of the int8
graph), initialised from the source statistics measured at fit, and re-standardises the
pre-activation to the source's mean and variance: ``y' = a * y + b`` per channel with
``a = sqrt(var_src + eps) / sqrt(var_run + eps)`` and ``b = mean_src - a * mean_run``. In the
int8 graph that affine is folded into the layer's requantisation (int32 -> int8 scale and
bias; ``edgetune.int8ref``), so weights stay untouched and kernels stay integer.

Why a method of its own and not a ``layers=`` option of feature-align: feature-align is
partitioned (its statistics live on the float side, after the frozen graph); this method's
statistics change the frozen graph's own requantisation, so it runs the backbone itself
(``partitioned = False``, like bn-adapt) and its state is per layer, not per tap.

Choices DUA leaves open, measured on the 4 validation corruptions (``benchmarks/norm_align.py``;
mcunet-s, Fashion-MNIST, float reference, episodic mean online accuracy; source 67.0, pooled-only
feature-align 73.2):
* ``layers``: ``convs`` (every convolution, 70.5) or ``stages`` (every stage output, 71.8: the
  affine then sits on the stage's last requantisation, which may be a residual add).
* ``first_stage``: align only stages from this one on. Re-standardising the early layers undoes
  what a blur or noise changed there and costs accuracy: stages 1-3 72.6, 2-3 74.4, 3 74.3 (all
  with ``pooled``); default 2.
* ``pooled``: also align the pooled features the classifier reads (+0.8 on every conv); default on.
* ``include_sample``: the current sample enters the statistics before its own prediction (DUA;
  the layer's accumulators must all exist before requantising: an int32 buffer or a second pass
  on a microcontroller), or the affine uses the statistics up to the previous sample (``False``:
  the kernel requantises as it accumulates). 70.5 vs 70.7 on every conv: default ``False``.
* mean and variance are both re-standardised (the mean alone: 64.8).
* ``prior_rate``: the prediction goes through the online class-prior correction (``prior.py``, strength 1,
  Bayes' rule), the configuration the int8 study chose on validation (74.6 vs 74.1 on the 4 validation
  corruptions; 65.0 vs 64.9 on the 15 test corruptions); the prior is state like the statistics.
* the sample's statistics are its spatial mean and E[y^2] (batch 1 has nothing else); the
  source statistics are the population mean and E[y^2] over the source images' positions, so
  the running estimate converges to the same quantity on the target domain.
Statistics come only from the activations the forward already produces; no label is read.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from edgetune.errors import ConfigError
from edgetune.methods import prior
from edgetune.methods.norm_align_gate import gated, global_strength, noise_weight, unfused
from edgetune.methods.base import (CollapseGuard, Guard, Method, MethodConfig, Range, TapSpec, declare, ema_momentum,
                                   entropy, setting, supervised_or)

EPS = 1e-5
LAYERS = ("convs", "stages")
KINDS = ("stem", "expand", "depthwise", "project", "head")  # a conv's role (conv_kinds), as int8ref.variants names it


@dataclass(frozen=True)
class NormAlignConfig(MethodConfig):
    momentum_start: float = setting(0.1, Range(0.0, 1.0), "EMA momentum of the first test sample")
    momentum_decay: float = setting(0.94, Range(0.0, 1.0), "per-sample decay of the EMA momentum")
    momentum_floor: float = setting(0.005, Range(0.0, 1.0), "lowest EMA momentum")
    layers: str = field(default="convs", metadata={"help": "where statistics are aligned: 'convs' (every "
                                                           "convolution's pre-activation) or 'stages'"})
    include_sample: bool = field(default=False, metadata={"help": "the current sample enters the statistics "
                                                                  "before its own prediction (DUA)"})
    pooled: bool = field(default=True, metadata={"help": "also align the pooled features the classifier reads "
                                                          "(feature-align's statistics, on the float side)"})
    first_stage: int = setting(2, Range(0, 64), "align only layers in this stage and later (early layers left as "
                                                "they are)")
    kinds: str = field(default=",".join(KINDS), metadata={"help": "with layers=convs, which convolutions are "
                                                                  "aligned, by role: comma-separated from "
                                                                  f"{', '.join(KINDS)}"})
    prior_rate: float = setting(0.02, Range(0.0, 1.0), "class-prior correction of the prediction (Saerens et al. "
                                                      "2002, methods/prior.py): EMA rate of the stream's class prior; "
                                                      "0 turns it off")
    gate_level: float = setting(3.0, Range(0.0, 1e6), "shift gate (norm_align_gate.py): the fold opens when the "
                                                         "running statistics' mean z^2 passes this, fully at twice it "
                                                         "(clean cost 0.7 -> 0.15 points); 0 turns it off")


def ema(old: torch.Tensor, new: torch.Tensor, momentum: torch.Tensor) -> torch.Tensor:
    """``(1 - momentum) * old + momentum * new``, each product rounded on its own (``unfused``)."""
    return unfused((1.0 - momentum) * old) + unfused(momentum * new)


def prior_corrected(logits: torch.Tensor, class_prior: torch.Tensor, rate: float,
                    momentum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log of the prior-corrected prediction, the next class prior) for 1 x classes ``logits``
    (``prior.correct`` at strength 1, then ``prior.update``'s EMA of the corrected prediction). The prior
    moves only when the statistics do (``momentum`` > 0): a runtime with adaptation off passes momentum 0
    and must predict as the source does."""
    corrected = prior.correct(torch.softmax(logits, -1), class_prior, 1.0)
    moving = torch.clamp(momentum.to(class_prior.dtype) * 1e30, max=1.0)  # 1 for any momentum > 0, else 0
    return torch.log(corrected.clamp_min(1e-12)), ema(class_prior, corrected, rate * moving)


def update_statistics(mean: torch.Tensor, sqmean: torch.Tensor, y: torch.Tensor,
                      momentum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Running (mean, E[y^2]) per channel after sample ``y`` (1 x C x ...) entered with ``momentum``."""
    dims = (0,) + tuple(range(2, y.dim()))
    return (ema(mean, y.mean(dims).to(mean.dtype), momentum),
            ema(sqmean, (y * y).mean(dims).to(mean.dtype), momentum))


def standardising_affine(mean: torch.Tensor, sqmean: torch.Tensor, source_mean: torch.Tensor,
                         source_sqmean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (a, b) with ``a * y + b`` mapping running statistics (mean, E[y^2]) onto the source's."""
    var = torch.clamp(sqmean - unfused(mean * mean), min=0.0)
    src_var = torch.clamp(source_sqmean - unfused(source_mean * source_mean), min=0.0)
    a = torch.sqrt(src_var + EPS) / torch.sqrt(var + EPS)
    return a, source_mean - unfused(a * mean)


class AlignedLayer(nn.Module):
    """A frozen layer whose per-channel output is re-standardised to the source statistics.

    Modes (set by the owner): ``record`` accumulates source sums; otherwise ``feed`` holds
    (running mean, running E[y^2], momentum) and ``updated`` receives the new running pair.
    """

    def __init__(self, inner: nn.Module, channels: int) -> None:
        super().__init__()
        self.inner = inner
        self.register_buffer("source_mean", torch.zeros(channels))
        self.register_buffer("source_sqmean", torch.ones(channels))
        # the shift gate's noise unit: between-sample variance of one source image's mean and E[y^2]
        self.register_buffer("spread_mean", torch.zeros(channels))
        self.register_buffer("spread_sqmean", torch.zeros(channels))
        self.record: list[torch.Tensor] | None = None
        self.gate: torch.Tensor | None = None  # the shift gate's strength for this sample (None: no gate)
        self.include_sample = True
        self.feed: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.updated: tuple[torch.Tensor, torch.Tensor] | None = None
        self.conv_index = -1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        if self.record is not None:
            dims = (0,) + tuple(range(2, y.dim()))  # source pass: sums over every position of every image
            y64 = y.double()
            m, q = y64.mean(dims[1:]) if y.dim() > 2 else y64, (y64 * y64).mean(dims[1:]) if y.dim() > 2 else y64 * y64
            parts = (y64.sum(dims), (y64 * y64).sum(dims), torch.tensor(y.numel() / y.shape[1]), m.sum(0),
                     (m * m).sum(0), q.sum(0), (q * q).sum(0), torch.tensor(float(y.shape[0])))
            for k, part in enumerate(parts):
                self.record[k] += part.clone()
            return y
        if self.feed is None:
            return y
        run_mean, run_sqmean, momentum = self.feed
        self.updated = update_statistics(run_mean, run_sqmean, y, momentum)
        a, b = gated(*standardising_affine(*(self.updated if self.include_sample else (run_mean, run_sqmean)),
                                           self.source_mean, self.source_sqmean), self.gate)
        shape = (1, -1) + (1,) * (y.dim() - 2)
        return unfused(y * a.reshape(shape)) + b.reshape(shape)


def conv_kinds(convs: list[nn.Module]) -> list[str]:
    """Each conv's role in an MBConv backbone (forward order): ``kinds_from_groups`` of their groups."""
    return kinds_from_groups([getattr(c, "groups", 1) for c in convs])


def kinds_from_groups(groups: list[int]) -> list[str]:
    """The roles of convs in forward order from their groups and neighbours alone: a depthwise conv, the
    1x1 expansion before one, the 1x1 projection after one, else the stem (first) or a head."""
    depthwise = [g > 1 for g in groups]
    kinds = []
    for k, dw in enumerate(depthwise):
        if dw:
            kinds.append("depthwise")
        elif k + 1 < len(depthwise) and depthwise[k + 1]:
            kinds.append("expand")
        elif k > 0 and depthwise[k - 1]:
            kinds.append("project")
        else:
            kinds.append("stem" if k == 0 else "head")
    return kinds


def aligned_network(backbone, layers: str, pooled: bool = False, first_stage: int = 0,
                    kinds: tuple[str, ...] = KINDS) -> tuple[nn.Module, list[AlignedLayer]]:
    """An eval-mode fused copy of ``backbone`` with an ``AlignedLayer`` around every conv (of a role in
    ``kinds``) or stage of stage ``first_stage`` and later (and the pooled features when ``pooled``), in
    forward order.
    Each layer's ``conv_index`` is its convolution's position among all of the backbone's
    convolutions in forward order (the int8 graph's numbering; -1 for stages and the pooled layer).

    Raises:
        ConfigError: unknown ``layers`` or ``kinds``, or a backbone without convolutions.
    """
    if layers not in LAYERS:
        raise ConfigError(f"norm-align: layers={layers!r} is unknown; use one of {', '.join(LAYERS)}")
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ConfigError(f"norm-align: kinds={','.join(kinds)!r} names no or unknown roles ({', '.join(unknown)}); "
                          f"give some of {', '.join(KINDS)}")
    net = backbone.for_export().requires_grad_(False)
    wrapped: list[AlignedLayer] = []
    if layers == "stages":
        widths = backbone.stage_widths()
        for k, stage in enumerate(list(net.stages)):
            wrapped.append(AlignedLayer(stage, widths[k]))
            net.stages[k] = wrapped[-1]
    else:
        _wrap_convs(net, wrapped)
    if not wrapped:
        raise ConfigError("norm-align: the backbone has no Conv1d/Conv2d to align; use feature-align")
    stage_of = {id(m): k for k, stage in enumerate(net.stages) for m in stage.modules()}
    if first_stage >= len(net.stages):
        raise ConfigError(f"norm-align: first_stage={first_stage} but the backbone has {len(net.stages)} stages; "
                          f"give 0 to {len(net.stages) - 1}")
    if pooled:  # the classifier's input: one more layer, after every conv in forward order
        head = AlignedLayer(nn.Identity(), net.classifier.in_features)
        net.classifier = nn.Sequential(head, net.classifier)
        wrapped.append(head)
    # named_children order is definition order; the forward order is what the runtime needs
    order: list[AlignedLayer] = []
    hooks = [w.register_forward_hook(lambda m, i, o: order.append(m)) for w in wrapped]
    with torch.no_grad():
        net(torch.zeros(1, *backbone.input_shape))
    for h in hooks:
        h.remove()
    convs = [m for m in order if not isinstance(m.inner, nn.Identity)]
    role = {}
    for k, (m, kind) in enumerate(zip(convs, conv_kinds([m.inner for m in convs]))):
        m.conv_index = k if layers == "convs" else -1
        role[id(m)] = kind if layers == "convs" else kinds[0]
    return net, [m for m in order if stage_of.get(id(m), len(net.stages)) >= first_stage
                 and role.get(id(m), kinds[0]) in kinds]


def _wrap_convs(net: nn.Module, wrapped: list[AlignedLayer]) -> None:
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (nn.Conv1d, nn.Conv2d)):
                wrapped.append(AlignedLayer(child, child.out_channels))
                setattr(parent, name, wrapped[-1])


class RestoresSource(Method):
    """The collapse guard of a method whose adapted state is statistics (no weights to snapshot): a trip sends
    every state buffer back to its value after fit (the source statistics, the identity fold), the schedule
    goes on. Declared (``Guard.restore = "source"``), so the bundle's generated model hands the C runtime its
    reset as the guard's restore (``edgetune_model_restore_source``): every app does the same."""

    def guard(self) -> Guard | None:
        g = super().guard()
        return dataclasses.replace(g, restore="source") if g else None

    def reset(self) -> None:
        super().reset()
        g = self.guard()
        self._guard = CollapseGuard(self.num_classes, g.rate, g.max_share, g.every, g.warmup) if g else None

    def _guard_step(self, prediction: int) -> None:
        if self._guard is not None and self._guard.observe(prediction) == "restore":
            self.restore_source()
            self.restores += 1

    @torch.no_grad()
    def restore_source(self) -> None:
        """Every state buffer back to its value at the last ``reset`` point (the step count is kept)."""
        if self._initial is None:
            self._initial = self._snapshot()
        for name in self.state_names():
            self.get_buffer(name).copy_(self._initial[name])


@declare
class NormAlign(RestoresSource):
    name = "norm-align"
    paper = "Mirza et al., The Norm Must Go On (DUA), CVPR 2022 (per-layer, through the requantisation)"
    Config = NormAlignConfig
    config: NormAlignConfig
    partitioned = False
    folds_into_int8 = True  # exported as the int8 graph + NormAlignStep (edgetune.export.norm_align)

    def __init__(self, backbone, config: NormAlignConfig) -> None:
        super().__init__(backbone, config)
        del self.classifier  # not partitioned: the classifier stays inside the network copy
        self.net, layers = aligned_network(copy.deepcopy(backbone), config.layers, config.pooled,
                                           config.first_stage, tuple(k.strip() for k in config.kinds.split(",")))
        self.aligned: list[AlignedLayer] = layers  # plain list: the modules already live in self.net
        for k, layer in enumerate(layers):
            layer.include_sample = config.include_sample
            self.register_buffer(f"mean{k}", torch.zeros_like(layer.source_mean))
            self.register_buffer(f"sqmean{k}", torch.ones_like(layer.source_mean))
        if config.gate_level > 0:  # the running estimates' noise weight W (norm_align_gate.py), 0 at reset
            self.register_buffer("gate_w", torch.zeros(1))
        if config.prior_rate > 0:
            self.register_buffer("class_prior", prior.uniform_prior(self.num_classes))

    def taps(self) -> tuple[TapSpec, ...]:
        return (TapSpec(-1, pooled=False),)

    def state_names(self) -> list[str]:
        names = [f"{s}{k}" for k in range(len(self.aligned)) for s in ("mean", "sqmean")]
        return names + (["gate_w"] if self.config.gate_level > 0 else []) + (["class_prior"]
                                                                             if self.config.prior_rate > 0 else [])

    def gate_strength(self, stats: list[tuple[torch.Tensor, torch.Tensor]], w2: torch.Tensor) -> torch.Tensor | None:
        """The shift gate's strength from the running statistics (``stats``, one pair per aligned layer) up to
        the previous sample and their noise weight ``w2`` (None without a gate): over every aligned conv's
        channels, the pooled features' when no conv is aligned."""
        if self.config.gate_level <= 0:
            return None
        convs = [k for k, m in enumerate(self.aligned) if not isinstance(m.inner, nn.Identity)] or \
            list(range(len(self.aligned)))
        layers = [self.aligned[k] for k in convs]
        return global_strength([stats[k] for k in convs], [(m.source_mean, m.source_sqmean) for m in layers],
                               [(m.spread_mean, m.spread_sqmean) for m in layers], w2, self.config.gate_level)

    @torch.no_grad()
    def calibrate(self, batches) -> None:
        """Source statistics of every aligned layer (population mean and E[y^2] over images and positions) and
        the shift gate's noise unit (the between-image variance of one image's mean and E[y^2])."""
        for layer in self.aligned:
            c = len(layer.source_mean)
            layer.record = [torch.zeros(() if k in (2, 7) else c, dtype=torch.float64) for k in range(8)]
            layer.feed = None
        for batch in batches:
            for i in range(0, len(batch[0]), 500):
                self.net(batch[0][i:i + 500])
        for k, layer in enumerate(self.aligned):
            total, squares, n, m, m2, q, q2, images = layer.record or []
            mean, sqmean = (total / n).float(), (squares / n).float()
            layer.source_mean.copy_(mean)
            layer.source_sqmean.copy_(sqmean)
            layer.spread_mean.copy_((m2 / images - (m / images) ** 2).clamp_min(0.0).float())
            layer.spread_sqmean.copy_((q2 / images - (q / images) ** 2).clamp_min(0.0).float())
            self.get_buffer(f"mean{k}").copy_(mean)
            self.get_buffer(f"sqmean{k}").copy_(sqmean)
            layer.record = None

    def momentum_now(self) -> float:
        c = self.config
        return ema_momentum(self.steps, c.momentum_start, c.momentum_decay, c.momentum_floor)

    @torch.no_grad()
    def classify(self, pooled: torch.Tensor, momentum: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        """The float side of an int8 run (``edgetune.int8ref``): pooled alignment, when configured (moved
        towards the identity by the shift gate's ``gate``), the classifier, then the class-prior correction; the
        pooled statistics and the prior are updated in place (the gate's noise weight is the caller's)."""
        if not self.config.pooled:
            logits = self.net.classifier(pooled)
        else:
            k = len(self.aligned) - 1
            head = self.aligned[k]
            head.feed, head.gate = (self.get_buffer(f"mean{k}"), self.get_buffer(f"sqmean{k}"), momentum), gate
            logits = self.net.classifier(pooled)
            for name, value in zip((f"mean{k}", f"sqmean{k}"), head.updated or ()):
                self.get_buffer(name).copy_(value)
            head.feed, head.gate = None, None
        if self.config.prior_rate > 0:
            logits, next_prior = prior_corrected(logits, self.get_buffer("class_prior"), self.config.prior_rate,
                                                 momentum)
            self.get_buffer("class_prior").copy_(next_prior)
        return logits

    def forward_graph(self, taps, state, momentum, target):
        n = len(self.aligned)
        has_gate = self.config.gate_level > 0
        strength = self.gate_strength([(state[2 * k], state[2 * k + 1]) for k in range(n)], state[2 * n]) \
            if has_gate else None
        for k, layer in enumerate(self.aligned):
            layer.feed, layer.gate = (state[2 * k], state[2 * k + 1], momentum), strength
        logits = self.net(taps[0])
        new_state = [t for layer in self.aligned for t in (layer.updated or (None, None))]
        for layer in self.aligned:
            layer.feed, layer.gate = None, None
        if has_gate:
            new_state.append(noise_weight(state[2 * n], momentum))
        if self.config.prior_rate > 0:
            logits, next_prior = prior_corrected(logits, state[-1], self.config.prior_rate, momentum)
            new_state.append(next_prior)
        return logits, supervised_or(entropy(logits).sum(), logits, target), new_state
