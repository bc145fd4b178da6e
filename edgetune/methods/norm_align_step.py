"""norm-align's per-sample update as a partitioned step: what a compiled runtime runs after the int8 backbone.

``NormAlign`` (``norm_align.py``) is the float reference: it runs its own copy of the backbone. On
a device the backbone is the frozen int8 graph, and norm-align's affine lives in that graph's
requantisation. This module is the other half, exported as trainable.onnx like any method's
update step::

    frozen (compiled):  image, (scale_k, offset_k) per aligned conv -> pooled tap, (sum_k, sumsq_k)
    this step:          pooled tap, (sum_k, sumsq_k), state, momentum -> logits, new state

The state of aligned conv k is its running ``mean_k`` / ``sqmean_k`` (float units of the
pre-activation) and the requantisation the *next* sample uses: ``scale_k = fl32(S * a)`` and the
int32 accumulator offset ``offset_k = rne(b / (a * accum_scale))`` (float32 holding integers),
with ``a, b`` the standardising affine of the updated statistics (``standardising_affine``) --
``edgetune.int8ref.norm_align_int8.fold_affine``'s fold, in float32. Keeping the folded pair as
state (instead of re-folding before each layer) means the frozen graph reads it as plain inputs
and checkpoint, reset and the collapse guard's restore cover it with the rest of the state;
reset = the source statistics with the identity fold (``scale = S``, ``offset = 0``).

Only the lagged order is deployable (``include_sample=False``): the statistics of a sample enter
after it was requantised, so the kernel requantises each accumulator tile as it computes it.
The statistics come from the accumulators the conv kernel already computes (``sum_k``: sum of
the unaligned int32 accumulator over the layer's positions, ``sumsq_k``: sum of its squares),
never from a label. The pooled features are aligned as in ``NormAlign`` (its head layer).

The shift gate (``gate_level`` > 0, ``norm_align_gate``) scales every fold towards the identity. The fold
for the next sample uses the gate of the statistics this step leaves (the ones up to the previous sample,
for that sample) and the noise weight ``gate_w`` after this sample; that strength is kept as state
(``gate``) for the next sample's pooled alignment, so the step computes it once. Both are 0 at reset.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from edgetune.methods.base import Schedule, TapSpec, entropy, supervised_or
from edgetune.methods import prior
from edgetune.methods.norm_align import NormAlign, RestoresSource, ema, prior_corrected, standardising_affine
from edgetune.methods.norm_align_gate import gated, global_strength, noise_weight


@dataclass(frozen=True)
class ConvConstants:
    """What the step needs of one aligned int8 conv (from the int8 graph and its source statistics)."""

    accum_scale: torch.Tensor  # fl32(sx * sw) per channel
    requant: torch.Tensor  # S = fl32(fl32(sx * sw) / sy) per channel
    source_mean: torch.Tensor
    source_sqmean: torch.Tensor
    positions: int  # output positions per channel (the statistics' n)
    spread_mean: torch.Tensor  # the shift gate's noise unit: between-image variance of one image's mean
    spread_sqmean: torch.Tensor  # ... and of its E[y^2]


def fold(mean: torch.Tensor, sqmean: torch.Tensor, source_mean: torch.Tensor, source_sqmean: torch.Tensor,
         accum_scale: torch.Tensor, requant: torch.Tensor,
         strength: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(requantisation scale, accumulator offset) of the affine mapping (mean, sqmean) onto the source's, moved
    towards the identity by the shift gate's ``strength`` (None: no gate)."""
    a, b = gated(*standardising_affine(mean, sqmean, source_mean, source_sqmean), strength)
    return requant * a, torch.round(b / (a * accum_scale))


class NormAlignStep(RestoresSource):
    """The update step of a fitted ``NormAlign`` whose aligned convs are ``convs`` (in state order)."""

    name = "norm-align"
    paper = NormAlign.paper
    Config = NormAlign.Config

    def __init__(self, method: NormAlign, convs: list[ConvConstants]) -> None:
        super().__init__(method.backbone, method.config)
        self.last = len(method.backbone.stages) - 1
        self.positions = [c.positions for c in convs]
        # the classifier with the pooled alignment in front of it (NormAlign's head), or plain
        self.classifier = copy.deepcopy(method.net.classifier)
        self.pooled = bool(method.config.pooled)
        for k, c in enumerate(convs):
            for name, value in (("accum_scale", c.accum_scale), ("requant", c.requant),
                                ("source_mean", c.source_mean), ("source_sqmean", c.source_sqmean),
                                ("spread_mean", c.spread_mean), ("spread_sqmean", c.spread_sqmean)):
                self.register_buffer(f"{name}{k}", value.detach().float().clone())
            scale, offset = fold(c.source_mean.float(), c.source_sqmean.float(), c.source_mean.float(),
                                 c.source_sqmean.float(), c.accum_scale.float(), c.requant.float())
            for name, value in (("mean", c.source_mean), ("sqmean", c.source_sqmean), ("scale", scale),
                                ("offset", offset)):
                self.register_buffer(f"{name}{k}", value.detach().float().clone())
        if self.pooled:
            head = self.classifier[0]
            self.register_buffer("head_mean", head.source_mean.detach().clone())
            self.register_buffer("head_sqmean", head.source_sqmean.detach().clone())
        self.gate_level = float(method.config.gate_level) if convs or self.pooled else 0.0  # nothing to gate
        if self.gate_level > 0:
            self.register_buffer("gate_w", torch.zeros(1))
            self.register_buffer("gate", torch.zeros(1))
        self.prior_rate = float(method.config.prior_rate)
        if self.prior_rate > 0:
            self.register_buffer("class_prior", prior.uniform_prior(self.num_classes))

    def taps(self) -> tuple[TapSpec, ...]:
        return (TapSpec(self.last, pooled=True),)

    def tap_inputs(self) -> list[str]:
        return [*super().tap_inputs(), *[f"{s}{k}" for k in range(len(self.positions)) for s in ("sum", "sumsq")]]

    def state_names(self) -> list[str]:
        names = [f"{s}{k}" for k in range(len(self.positions)) for s in ("mean", "sqmean", "scale", "offset")]
        return names + (["head_mean", "head_sqmean"] if self.pooled else []) + \
            (["gate_w", "gate"] if self.gate_level > 0 else []) + (["class_prior"] if self.prior_rate > 0 else [])

    def schedule(self) -> Schedule:
        c = self.config
        return Schedule(c.momentum_start, c.momentum_decay, c.momentum_floor)

    def forward_graph(self, taps, state, momentum, target):
        convs = len(self.positions)
        at = 4 * convs + (2 if self.pooled else 0)  # the gate's state: noise weight, then this sample's strength
        has_gate = self.gate_level > 0
        head_state: list[torch.Tensor] = []
        if self.pooled:
            head = self.classifier[0]
            head.feed, head.gate = (state[4 * convs], state[4 * convs + 1], momentum), state[at + 1] if has_gate \
                else None
            logits = self.classifier(taps[0])
            head_state = list(head.updated or ())
            head.feed, head.gate = None, None
        else:
            logits = self.classifier(taps[0])
        stats = []
        for k, n in enumerate(self.positions):
            total, squares = taps[1 + 2 * k][0], taps[2 + 2 * k][0]
            unit = self.get_buffer(f"accum_scale{k}")
            stats.append((ema(state[4 * k], unit * total / n, momentum),
                          ema(state[4 * k + 1], unit * unit * squares / n, momentum)))
        gate_state: list[torch.Tensor] = []
        strength = None
        if has_gate:  # the next sample's strength, from the statistics it will see as the previous ones
            w2 = noise_weight(state[at], momentum)
            layers = range(convs) if convs else []
            strength = global_strength(
                stats if convs else [tuple(head_state)],
                [(self.get_buffer(f"source_mean{k}"), self.get_buffer(f"source_sqmean{k}")) for k in layers]
                or [(self.classifier[0].source_mean, self.classifier[0].source_sqmean)],
                [(self.get_buffer(f"spread_mean{k}"), self.get_buffer(f"spread_sqmean{k}")) for k in layers]
                or [(self.classifier[0].spread_mean, self.classifier[0].spread_sqmean)], w2, self.gate_level)
            gate_state = [w2, strength]
        new_state: list[torch.Tensor] = []
        for k, (mean, sqmean) in enumerate(stats):
            scale, offset = fold(mean, sqmean, self.get_buffer(f"source_mean{k}"), self.get_buffer(f"source_sqmean{k}"),
                                 self.get_buffer(f"accum_scale{k}"), self.get_buffer(f"requant{k}"), strength)
            new_state += [mean, sqmean, scale, offset]
        new_state += head_state + gate_state
        if self.prior_rate > 0:
            logits, next_prior = prior_corrected(logits, state[-1], self.prior_rate, momentum)
            new_state.append(next_prior)
        return logits, supervised_or(entropy(logits).sum(), logits, target), new_state
