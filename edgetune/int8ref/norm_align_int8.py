"""norm-align on the int8 backbone: statistics from the int32 accumulators, the affine folded into requantisation.

Per sample and convolution k (forward order): the accumulators ``acc`` the layer already
produces give the pre-activation ``y = fl32(sx * sw) * acc`` per channel; its spatial mean and
E[y^2] enter the running statistics (``update_statistics``), the standardising affine
``a * y + b`` (``standardising_affine``) is folded into the layer's requantisation as
``scale = a`` (the multiplier becomes ``fl32(S * a)``) and an int32 bias correction
``offset = rne(b / (a * sx * sw))``, and the int8 output follows. No second pass, weights
untouched, no label read. The pooled features (``pooled=True``) are aligned on the float side,
as feature-align does. With the method's shift gate (``gate_level`` > 0) every affine is first
moved towards the identity by the gate's strength, from the statistics up to the previous sample
(``norm_align_gate``). Source statistics are measured on this int8 graph (identity affine), so
alignment targets what the int8 backbone produces on source data, not the float model.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from edgetune.data import to_tensor
from edgetune.errors import ConfigError
from edgetune.int8ref.qdq_model import QDQModel
from edgetune.methods.base import CollapseGuard
from edgetune.methods.norm_align import NormAlign, standardising_affine, update_statistics
from edgetune.methods.norm_align_gate import gated, global_strength, noise_weight


def fold_affine(a: torch.Tensor, b: torch.Tensor, accum_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(requant scale factor, int32 accumulator offset) equal to the float affine ``a * y + b``."""
    a32 = a.float()
    offset = torch.round(b.double() / (a32.double() * accum_scale.double()))
    return a32, offset


def int8_graph(backbone, source_images: np.ndarray, data_name: str, path: Path) -> Path:
    """Export ``backbone``'s frozen part (input -> pooled last stage) as int8 QDQ at ``path``, calibrated
    on ``source_images`` exactly as ``edgetune export`` does.

    Raises:
        ExportError: export or quantisation fails.
    """
    from edgetune.export.onnx_graphs import export_frozen
    from edgetune.export.quantize import quantize_frozen
    from edgetune.methods import TapSpec

    fp32 = path.with_suffix(".fp32.onnx")
    export_frozen(backbone, (TapSpec(len(backbone.stages) - 1, pooled=True),), fp32)
    quantize_frozen(fp32, path, source_images, data_name)
    return path


class Int8NormAlign:
    """A fitted torch ``NormAlign`` (its config, momentum schedule, pooled alignment and classifier)
    run on the int8 graph ``qdq``. ``step(x)`` predicts one sample, then its statistics stay in; with
    the method's collapse guard (``config.guard``) a collapse sends every statistic back to source.

    Raises (on construction):
        ConfigError: ``layers='stages'`` (a stage's last requantisation may be an add: only
            convolution requantisations are folded here) or a graph whose convs do not match.
    """

    def __init__(self, method: NormAlign, qdq: QDQModel) -> None:
        if method.config.layers != "convs":
            raise ConfigError(f"int8ref: norm-align layers={method.config.layers!r} has no int8 reference; "
                              "use layers=convs")
        self.method, self.qdq, self.convs = method, qdq, qdq.convs
        self.heads = [m for m in method.aligned if isinstance(m.inner, torch.nn.Identity)]
        # graph conv index -> position in the state (only the aligned convs keep statistics)
        self.slot = {m.conv_index: k for k, m in enumerate(m for m in method.aligned if m.conv_index >= 0)}
        total = sum(1 for m in method.net.modules() if getattr(m, "conv_index", -1) >= 0)
        if len(self.convs) != total:
            raise ConfigError(f"int8ref: the int8 graph has {len(self.convs)} convs, the method's backbone "
                              f"{total}; build both from the same backbone")
        width = [len(self.convs[k].requant) for k in self.slot]
        self.source = [(torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)) for c in width]
        self.spread = [(torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)) for c in width]
        self.w2 = torch.zeros(1, dtype=torch.float64)  # the shift gate's noise weight (float64, as the statistics)
        self.state: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.steps = 0
        self.restores = 0
        self.guard: CollapseGuard | None = None

    def gate_strength(self) -> torch.Tensor | None:
        """The shift gate's strength (float64) from the statistics up to the previous sample (None: no gate)."""
        if not self.slot:  # no aligned conv: the pooled features' statistics decide, in the method
            k = len(self.method.aligned) - 1
            stats = [(self.method.get_buffer(f"mean{k}"), self.method.get_buffer(f"sqmean{k}"))] \
                if self.heads else []
            return self.method.gate_strength(stats, self.w2.float()) if stats else None
        if self.method.config.gate_level <= 0:
            return None
        return global_strength(self.state, self.source, self.spread, self.w2, self.method.config.gate_level)

    def pre_activation(self, k: int, acc: torch.Tensor) -> torch.Tensor:
        return acc * self.convs[k].accum_scale.double().reshape((1, -1) + (1,) * (acc.dim() - 2))

    @torch.no_grad()
    def calibrate(self, images: np.ndarray, batch: int = 250) -> None:
        """Source statistics of every conv's pre-activation on the int8 graph (identity affine)."""
        sums = [[0.0, 0.0, 0] for _ in self.slot]
        per_image = [[0.0, 0.0, 0.0, 0.0] for _ in self.slot]  # sums of each image's mean, mean^2, E[y^2], E[y^2]^2

        def record(k: int, acc: torch.Tensor):
            if k not in self.slot:
                return None
            y = self.pre_activation(k, acc)
            k = self.slot[k]
            dims = (0,) + tuple(range(2, y.dim()))
            sums[k][0] = sums[k][0] + y.sum(dims)
            sums[k][1] = sums[k][1] + (y * y).sum(dims)
            sums[k][2] += y.numel() // y.shape[1]
            m, q = y.mean(dims[1:]), (y * y).mean(dims[1:])
            for j, t in enumerate((m, m * m, q, q * q)):
                per_image[k][j] = per_image[k][j] + t.sum(0)
            return None

        pooled = torch.cat([self.qdq.run(to_tensor(images[i:i + batch]), record)[0]
                            for i in range(0, len(images), batch)]).double()
        self.source = [(s / n, sq / n) for s, sq, n in sums]
        count = len(images)
        self.spread = [((m2 / count - (m / count) ** 2).clamp_min(0.0), (q2 / count - (q / count) ** 2).clamp_min(0.0))
                       for m, m2, q, q2 in per_image]
        for head in self.heads:  # the pooled features' source statistics, as the int8 graph gives them
            k = self.method.aligned.index(head)
            for name, value in ((f"mean{k}", pooled.mean(0)), (f"sqmean{k}", (pooled * pooled).mean(0))):
                self.method.get_buffer(name).copy_(value.float())
            head.source_mean.copy_(pooled.mean(0).float())
            head.source_sqmean.copy_((pooled * pooled).mean(0).float())
            head.spread_mean.copy_(pooled.var(0, unbiased=False).float())
            head.spread_sqmean.copy_((pooled * pooled).var(0, unbiased=False).float())
        self.method._initial = None  # the method's reset point now holds the int8 source statistics
        self.reset()

    def reset(self) -> None:
        self.state = [(m.clone(), sq.clone()) for m, sq in self.source]
        self.w2 = torch.zeros(1, dtype=torch.float64)
        self.method.reset()  # the float side's pooled statistics back to source
        self.steps = 0
        g = self.method.guard()
        self.guard = CollapseGuard(self.method.num_classes, g.rate, g.max_share, g.every, g.warmup) if g else None

    @torch.no_grad()
    def step(self, x: torch.Tensor, convs: bool = True) -> torch.Tensor:
        """Logits (1 x classes) of one sample (1 x C x H x W float), then its statistics stay in the state.

        ``convs=False`` folds nothing (onnxruntime's graph as exported; only a pooled alignment, if
        configured, runs): the source and feature-align rows of the same runner.
        """
        momentum = torch.tensor(self.method.momentum_now(), dtype=torch.float64)
        include = self.method.config.include_sample
        strength = self.gate_strength() if convs else None

        def align(k: int, acc: torch.Tensor):
            if k not in self.slot:
                return None
            y, op, k = self.pre_activation(k, acc), self.convs[k], self.slot[k]
            old = self.state[k]
            self.state[k] = update_statistics(*old, y, momentum)
            a, b = gated(*standardising_affine(*(self.state[k] if include else old), *self.source[k]), strength)
            return fold_affine(a, b, op.accum_scale)

        pooled, _ = self.qdq.run(x, align if convs else None)
        logits = self.method.classify(pooled, momentum.float(), None if strength is None else strength.float())
        if convs:
            self.w2 = noise_weight(self.w2, momentum)
        self.method.steps += 1
        self.steps += 1
        if convs and self.guard is not None and self.guard.observe(int(logits.argmax())) == "restore":
            # a collapse: every statistic and fold back to source, as the compiled runtime's guard does
            self.state = [(m.clone(), sq.clone()) for m, sq in self.source]
            self.w2 = torch.zeros(1, dtype=torch.float64)
            self.method.restore_source()
            self.restores += 1
        return logits
