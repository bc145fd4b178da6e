"""norm-align variants on the int8 reference, many independent streams in one batch.

``Int8NormAlign`` runs one fitted torch ``NormAlign`` one sample at a time; a validation grid
or a full-size table (15 corruptions x 2,000 samples x several methods) that way spends most of
its time in per-sample Python. ``AlignedStreams`` runs N rows in lockstep, each row its own
stream with its own ``Variant`` and its own state: row r of a step is sample t of stream r.
The integer arithmetic is ``QDQModel``'s with a per-row (N x C) requantisation affine, so every
row computes exactly what a single-row run computes (``tests/test_norm_align.py`` checks the
default variant against ``Int8NormAlign`` prediction by prediction).

What a variant may change (the attempts at the accuracy goal; README "norm-align"):

* which convolutions are aligned: from stage ``first_stage`` on, and only of the ``kinds`` given
  (``stem``, ``expand``, ``depthwise``, ``project``, ``head``: an MBConv's 1x1 expansion, its
  depthwise conv, its 1x1 projection; the stem and the last 1x1 conv);
* ``mode``: re-standardise mean and variance (``both``, DUA), the variance only around the running
  mean (``var``), or shift the mean only (``mean``);
* ``strength`` lam: the affine moved part of the way, ``a' = 1 + lam (a - 1)``, ``b' = lam b``;
* ``instance``: the affine uses ``(1 - w) * running + w * sample`` statistics (NOTE's instance-aware
  normalisation / alpha-BN's mixing, at batch 1: the layer's accumulators must all exist before it
  requantises, an int32 buffer of one layer on a microcontroller);
* the momentum schedule of the convolutions and of the pooled alignment (DUA's start, decay, floor);
* ``prior_rate``: online class-prior correction of the prediction (Saerens et al. 2002, ``prior.py``);
* ``gate`` / ``gate_level``: a shift detector scales the fold (convs and pooled) towards the identity when
  the running statistics sit within their own noise of the source's (``shift_gate.py``: one strength
  per stream, ``global``, or per channel, ``channel``), so an unshifted stream is left nearly as is.

Statistics come only from accumulators and pooled features the forward already produces; no label
is read anywhere in this file.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from edgetune.errors import ConfigError
from edgetune.int8ref.norm_align_int8 import fold_affine
from edgetune.int8ref.qdq_model import ConvOp, QDQModel
from edgetune.int8ref.shift_gate import GATES, channel_gate, global_gate, noise_weight, z2
from edgetune.methods import prior
from edgetune.methods.norm_align import kinds_from_groups, standardising_affine

KINDS = ("stem", "expand", "depthwise", "project", "head")
MODES = ("both", "var", "mean")
DUA = (0.1, 0.94, 0.005)  # DUA's momentum schedule: start, per-sample decay, floor (norm-align's default)


@dataclass(frozen=True)
class Variant:
    """One configuration of norm-align on the int8 reference (defaults: norm-align's validated one)."""

    name: str = "norm-align"
    first_stage: int = 2  # convs of this stage and later are aligned; the stage count aligns none
    kinds: tuple[str, ...] = KINDS
    mode: str = "both"
    strength: float = 1.0
    instance: float = 0.0
    include_sample: bool = False  # DUA: the sample enters the running statistics before its own affine
    momentum: tuple[float, float, float] = DUA
    pooled: bool = True
    pooled_momentum: tuple[float, float, float] = DUA
    prior_rate: float = 0.0
    prior_strength: float = 1.0
    tinytta: bool = False  # the row's prediction is a tinytta method's, fed the aligned backbone's pooled stages
    gate: str = ""  # shift detector on the fold's strength: "" (none), "global" or "channel" (shift_gate.py)
    gate_level: float = 4.0  # global: mean z^2 where the fold starts (full at twice it); channel: the shrinkage

    def check(self, stages: int) -> None:
        """Raises ConfigError on a value outside its range."""
        bad = [f"kinds {k!r}" for k in self.kinds if k not in KINDS]
        bad += [f"mode {self.mode!r}"] if self.mode not in MODES else []
        bad += [f"first_stage {self.first_stage}"] if not 0 <= self.first_stage <= stages else []
        bad += [f"instance {self.instance}"] if not 0.0 <= self.instance <= 1.0 else []
        bad += [f"gate {self.gate!r}"] if self.gate not in GATES else []
        bad += [f"gate_level {self.gate_level}"] if not self.gate_level > 0.0 else []
        if bad:
            raise ConfigError(f"int8ref: variant {self.name!r} has {', '.join(bad)}; kinds from {', '.join(KINDS)}, "
                              f"modes {', '.join(MODES)}, gates {GATES}, first_stage 0..{stages}, instance 0..1, "
                              "gate_level > 0")


def momentum_at(step: int, schedule: tuple[float, float, float]) -> float:
    start, decay, floor = schedule
    return max(floor, start * decay ** step)


def conv_kinds(convs: list[ConvOp]) -> list[str]:
    """Each conv's role in an MBConv backbone, from the graph alone (groups and neighbours)."""
    return kinds_from_groups([op.groups for op in convs])


class AlignedStreams:
    """N streams (rows) of norm-align variants on one int8 graph, stepped together.

    ``conv_stage[k]`` is conv k's stage; ``classifier`` the float classifier on the pooled features;
    ``tinytta`` (optional) a fitted tinytta method, copied for each row whose variant asks for it.

    Raises (on construction):
        ConfigError: a variant out of range, or ``conv_stage`` not matching the graph's convs.
    """

    def __init__(self, qdq: QDQModel, conv_stage: list[int], classifier: nn.Module, variants: list[Variant],
                 tinytta=None) -> None:
        if len(conv_stage) != len(qdq.convs):
            raise ConfigError(f"int8ref: {len(conv_stage)} conv stages for a graph of {len(qdq.convs)} convs; build "
                              "both from the same backbone")
        stages = max(conv_stage) + 1
        for v in variants:
            v.check(stages)
        if any(v.tinytta for v in variants) and tinytta is None:
            raise ConfigError("int8ref: a tinytta variant needs a fitted tinytta method; pass tinytta=")
        self.qdq, self.classifier, self.variants = qdq, classifier, variants
        kinds = conv_kinds(qdq.convs)
        # rows x convs: which (row, conv) pairs are aligned; the others fold the identity (bit-exact no-op)
        self.aligned = torch.tensor([[conv_stage[k] >= v.first_stage and kinds[k] in v.kinds
                                      for k in range(len(kinds))] for v in variants])
        self.stage_ends = self._stage_ends(conv_stage)
        self.tinytta = [copy.deepcopy(tinytta) if v.tinytta else None for v in variants]
        self.source: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.pooled_source = (torch.zeros(0), torch.zeros(0))
        # between-sample variance of each sample's (mean, E[y^2]) on source: the shift gate's noise unit
        self.spread: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.pooled_spread = (torch.zeros(0), torch.zeros(0))
        self.gated = torch.tensor([[v.gate != ""] for v in variants])
        self.steps = 0

    def _stage_ends(self, conv_stage: list[int]) -> list[str]:
        """The int8 tensor that ends each stage (the last op before the next stage's first conv)."""
        ends, k, last = [], 0, ""
        for op in self.qdq.ops:
            if isinstance(op, ConvOp):
                if k > 0 and conv_stage[k] != conv_stage[k - 1]:
                    ends.append(last)
                k += 1
            last = op.dst
        return ends + [last]

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor, batch: int = 250) -> None:
        """Source statistics (identity affine) of every conv's pre-activation and of the pooled features."""
        sums: list[list] = [[0.0, 0.0, 0] for _ in self.qdq.convs]
        per_sample: list[list] = [[0.0, 0.0, 0.0, 0.0] for _ in self.qdq.convs]

        def record(k: int, acc: torch.Tensor):
            y = acc * self.qdq.convs[k].accum_scale.double().reshape((1, -1) + (1,) * (acc.dim() - 2))
            dims = (0,) + tuple(range(2, y.dim()))
            sums[k][0] = sums[k][0] + y.sum(dims)
            sums[k][1] = sums[k][1] + (y * y).sum(dims)
            sums[k][2] += y.numel() // y.shape[1]
            mean, sq = y.mean(dims[1:]), (y * y).mean(dims[1:])
            for j, t in enumerate((mean, mean * mean, sq, sq * sq)):
                per_sample[k][j] = per_sample[k][j] + t.sum(0)
            return None

        pooled, taps = [], []
        for i in range(0, len(x), batch):
            out, vals = self.qdq.run(x[i:i + batch], record)
            pooled.append(out.double())
            taps.append(self._stage_taps(vals, slice(None)))
        self.source = [(s / n, sq / n) for s, sq, n in sums]
        n = len(x)
        self.spread = [(m2 / n - (m / n) ** 2, q2 / n - (q / n) ** 2) for m, m2, q, q2 in per_sample]
        p = torch.cat(pooled)
        self.pooled_source = (p.mean(0).float(), (p * p).mean(0).float())
        self.pooled_spread = (p.var(0, unbiased=False), (p * p).var(0, unbiased=False))
        for method in self.tinytta:  # its pooled-tap alignment targets what the int8 graph gives on source
            if method is not None:
                method.calibrate([[torch.cat([t[k] for t in taps]) for k in range(len(self.stage_ends))]])
                method._initial = None
        self.reset()

    def reset(self) -> None:
        """Every row back to the source statistics (and its tinytta copy to its fitted state)."""
        n = len(self.variants)
        self.state = [(m.expand(n, -1).clone(), sq.expand(n, -1).clone()) for m, sq in self.source]
        self.pooled_state = tuple(t.expand(n, -1).clone() for t in self.pooled_source)
        classes = self.classifier.out_features
        self.prior = prior.uniform_prior(classes).expand(n, -1).clone()
        self.w2 = torch.zeros(n, 1, dtype=torch.float64)  # the running estimates' noise weight (shift_gate.py)
        self.pooled_w2 = torch.zeros(n, 1, dtype=torch.float64)
        for method in self.tinytta:
            if method is not None:
                method.reset()
        self.steps = 0

    def _momenta(self, which: str, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor([[momentum_at(self.steps, getattr(v, which))] for v in self.variants], dtype=dtype)

    def _affine(self, k: int, y: torch.Tensor, momentum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dims = tuple(range(2, y.dim()))
        sample = (y.mean(dims), (y * y).mean(dims))
        old = self.state[k]
        new = tuple((1.0 - momentum) * o + momentum * s for o, s in zip(old, sample))
        self.state[k] = new  # type: ignore[assignment]
        include = torch.tensor([[v.include_sample] for v in self.variants])
        w = torch.tensor([[v.instance] for v in self.variants], dtype=torch.float64)
        used = [torch.where(include, n, o) for n, o in zip(new, old)]
        if bool((w > 0).any()):
            used = [(1.0 - w) * u + w * s for u, s in zip(used, sample)]
        a, b = standardising_affine(used[0], used[1], *self.source[k])
        mean_only = torch.tensor([[v.mode == "mean"] for v in self.variants])
        var_only = torch.tensor([[v.mode == "var"] for v in self.variants])
        b = torch.where(var_only, used[0] * (1.0 - a), b)  # a (y - m) + m: the running mean kept
        b = torch.where(mean_only, self.source[k][0] - used[0], b)
        a = torch.where(mean_only, torch.ones_like(a), a)
        lam = torch.tensor([[v.strength] for v in self.variants], dtype=torch.float64)
        if bool((lam != 1.0).any()):
            a, b = 1.0 + lam * (a - 1.0), lam * b
        a, b = self._gate_affine(a, b, tuple(used), self.source[k], self.spread[k], self.w2_used)
        keep = self.aligned[:, k:k + 1]
        return torch.where(keep, a, torch.ones_like(a)), torch.where(keep, b, torch.zeros_like(b))

    @torch.no_grad()
    def step(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted class per row (N) for ``x`` (N x C x H x W: row r is stream r's next sample); then
        every row's statistics hold that sample."""
        momentum = self._momenta("momentum", torch.float64)
        pooled_momentum = self._momenta("pooled_momentum", torch.float64)
        include = torch.tensor([[v.include_sample] for v in self.variants])
        w2 = noise_weight(self.w2, momentum), noise_weight(self.pooled_w2, pooled_momentum)
        self.w2_used = torch.where(include, w2[0], self.w2)
        self.pooled_w2_used = torch.where(include, w2[1], self.pooled_w2)
        if bool(self.gated.any()):
            self.global_strength = self._global_strength()
        any_aligned = self.aligned.any(0)

        def align(k: int, acc: torch.Tensor):
            if not bool(any_aligned[k]):
                return None
            op = self.qdq.convs[k]
            y = acc * op.accum_scale.double().reshape((1, -1) + (1,) * (acc.dim() - 2))
            return fold_affine(*self._affine(k, y, momentum), op.accum_scale)

        pooled, vals = self.qdq.run(x, align)
        logits = self._classify(pooled)
        probs = torch.softmax(logits, -1)
        rate = torch.tensor([[v.prior_rate] for v in self.variants])
        strength = torch.tensor([[v.prior_strength] for v in self.variants])
        corrected = probs / (probs.shape[-1] * self.prior) ** strength
        corrected = corrected / corrected.sum(-1, keepdim=True)
        self.prior = torch.where(rate > 0, prior.update(self.prior, corrected, rate), self.prior)
        pred = torch.where(rate[:, 0] > 0, corrected.argmax(-1), logits.argmax(-1))
        for r, method in enumerate(self.tinytta):
            if method is not None:
                pred[r] = int(method.step(self._stage_taps(vals, slice(r, r + 1))).argmax())
        self.w2, self.pooled_w2 = w2
        self.steps += 1
        return pred

    def _global_strength(self) -> torch.Tensor:
        """The ``global`` gate per row (N x 1), from the statistics up to the previous sample: the mean z^2 over
        the row's aligned conv channels (its pooled features when it aligns no conv)."""
        n = len(self.variants)
        total, count = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
        for k, (src, spread) in enumerate(zip(self.source, self.spread)):
            on = self.aligned[:, k]
            if bool(on.any()):
                z = z2(self.state[k], src, spread, self.w2).sum(1)
                total, count = total + torch.where(on, z, 0.0), count + on.double() * len(src[0])
        pooled = z2(self.pooled_state, self.pooled_source, self.pooled_spread, self.pooled_w2).sum(1)
        none = count == 0
        total = torch.where(none, pooled, total)
        count = torch.where(none, float(len(self.pooled_source[0])), count)
        levels = torch.tensor([v.gate_level for v in self.variants], dtype=torch.float64)
        return global_gate(total / count, levels)[:, None]

    def _gate_affine(self, a: torch.Tensor, b: torch.Tensor, used: tuple, source: tuple, spread: tuple,
                     w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The gated rows' affine moved towards the identity by their gate's strength (the others as they are)."""
        if not bool(self.gated.any()):
            return a, b
        levels = torch.tensor([[v.gate_level] for v in self.variants], dtype=torch.float64)
        per_channel = torch.tensor([[v.gate == "channel"] for v in self.variants])
        lam = torch.where(per_channel, channel_gate(z2(used, source, spread, w2), levels),
                          self.global_strength).to(a.dtype)
        return torch.where(self.gated, 1.0 + lam * (a - 1.0), a), torch.where(self.gated, lam * b, b)

    def _classify(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled alignment (float, as feature-align) for the rows that ask for it, then the classifier."""
        m = self._momenta("pooled_momentum", torch.float32)
        old = self.pooled_state
        new = ((1.0 - m) * old[0] + m * pooled, (1.0 - m) * old[1] + m * (pooled * pooled))
        self.pooled_state = new
        include = torch.tensor([[v.include_sample] for v in self.variants])
        used = [torch.where(include, n, o) for n, o in zip(new, old)]
        a, b = standardising_affine(used[0], used[1], *self.pooled_source)
        a, b = self._gate_affine(a, b, tuple(used), self.pooled_source, self.pooled_spread, self.pooled_w2_used)
        on = torch.tensor([[v.pooled and not v.tinytta] for v in self.variants])
        return self.classifier(torch.where(on, pooled * a + b, pooled))

    def _stage_taps(self, vals: dict[str, torch.Tensor], rows: slice) -> list[torch.Tensor]:
        """The pooled stage outputs of ``rows``, dequantised as the exported graph's ReduceMean taps are."""
        taps = []
        for name in self.stage_ends:
            qt = self.qdq.q[name]
            v = vals[name][rows]
            deq = ((v - qt.zero_point).float() * torch.tensor(qt.scale, dtype=torch.float32)).float()
            taps.append(deq.mean(dim=tuple(range(2, deq.dim()))))
        return taps


def conv_stages(backbone) -> list[int]:
    """The stage of each of ``backbone``'s convolutions, in the int8 graph's (forward) order."""
    from edgetune.methods.norm_align import aligned_network
    stages = len(backbone.stages)
    firsts = [{m.conv_index for m in aligned_network(copy.deepcopy(backbone), "convs", False, s)[1]}
              for s in range(stages)]
    return [max(s for s in range(stages) if k in firsts[s]) for k in sorted(firsts[0])]
