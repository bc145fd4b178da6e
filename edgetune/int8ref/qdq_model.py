"""An integer simulation of a conv/add QDQ graph, equal to onnxruntime's int8 session bit for bit.

Why not onnxruntime itself: norm-align changes every convolution's requantisation per sample
(a per-channel scale and bias that depend on statistics of the same forward pass), which a
fixed ORT session cannot take. This reference runs the graph's integer arithmetic in torch
(float64 holds every int32 accumulator exactly) with onnxruntime's formulas as
``compilers/int8_math.py`` documents them (``session.qdqisint8allowed=1``):

* input QuantizeLinear: ``sat8(rne(fl32(x / s)) + z)``;
* QLinearConv: ``acc = sum((x - zx) * w) + bias`` (int32), ``y = sat8(rne(fl32(acc) * S) + zy)``
  with ``S = fl32(fl32(sx * sw) / sy)`` per output channel;
* QLinearAdd: ``y = sat8(rne(fma32(a, ra, fma32(b, rb, F))))`` (each FMA one float32 rounding);
* the output ReduceMean runs in float on the dequantised int8 values.

A hook per convolution sees the accumulator and may return a per-channel (scale, offset) folded
into the requantisation: ``y = sat8(rne(fl32(acc + offset) * fl32(S * scale)) + zy)``. With no
hook the result is onnxruntime's; ``tests/test_norm_align.py`` checks it against a session.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from edgetune.errors import ModelError

QMIN, QMAX = -128, 127
F32 = np.float32
# acc (N x C x ...) of conv k -> per-channel (scale, int offset) folded into its requantisation, or None
ConvHook = Callable[[int, torch.Tensor], "tuple[torch.Tensor, torch.Tensor] | None"]


@dataclass(frozen=True)
class QTensor:
    """Quantisation of one int8 activation."""

    scale: float
    zero_point: int


@dataclass(frozen=True)
class ConvOp:
    """One QLinearConv: int8 weights, int32 bias, geometry and the per-channel requantisation scale."""

    src: str
    dst: str
    weight: torch.Tensor  # int8 values as float32, O x I/g x k...
    bias: torch.Tensor  # int32 values as float64, O
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    groups: int
    accum_scale: torch.Tensor  # fl32(sx * sw) per channel: what one accumulator unit is worth in float
    requant: torch.Tensor  # S = fl32(fl32(sx * sw) / sy), float32, per channel


@dataclass(frozen=True)
class AddOp:
    a: str
    b: str
    dst: str
    ra: float
    rb: float
    fixed: float


def exact_in_float32(w_q: np.ndarray) -> bool:
    """Whether every partial sum of one output's (x - zx) * w products fits float32's 24-bit significand."""
    per_output = np.abs(w_q.astype(np.int64)).reshape(len(w_q), -1).sum(1).max()
    return int(per_output) * 255 < 2 ** 24


def _round_sat(f: torch.Tensor, zp: int) -> torch.Tensor:
    """float32 -> int8 values as MLAS does: clamp to the zero-point-shifted range, round half even, add zp."""
    return torch.round(torch.clamp(f, QMIN - zp, QMAX - zp)) + zp


class QDQModel:
    """The QDQ graph ``path`` (input ``x`` -> conv / add int8 chain -> float ReduceMean) as integer work.

    Raises (on construction):
        ModelError: an op other than QuantizeLinear, DequantizeLinear, Conv, Add, ReduceMean.
    """

    def __init__(self, path: str | Path) -> None:
        model = onnx.load(str(path))
        init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        dq: dict[str, tuple[str, ...]] = {}  # DequantizeLinear output -> its inputs
        self.q: dict[str, QTensor] = {}  # int8 tensor name -> quantisation
        self.ops: list = []
        self.input_name = model.graph.input[0].name
        self.input_q: tuple[str, QTensor] | None = None
        self.output: tuple[str, str] | None = None  # (int8 tensor averaged, graph output name)
        pending: dict[str, object] = {}  # float output of a conv/add -> its op, until its QuantizeLinear
        unsupported = []
        for node in model.graph.node:
            ins = list(node.input)
            if node.op_type == "DequantizeLinear":
                dq[node.output[0]] = tuple(ins)
            elif node.op_type == "QuantizeLinear":
                qt = QTensor(float(init[ins[1]]), int(init[ins[2]]))
                self.q[node.output[0]] = qt
                if ins[0] == self.input_name:
                    self.input_q = (node.output[0], qt)
                else:
                    self.ops.append(pending.pop(ins[0])(node.output[0], qt))
            elif node.op_type == "Conv":
                pending[node.output[0]] = self._conv(node, ins, dq, init)
            elif node.op_type == "Add":
                pending[node.output[0]] = self._add(ins, dq)
            elif node.op_type == "ReduceMean":
                self.output = (dq[ins[0]][0], node.output[0])
            else:
                unsupported.append(f"{node.op_type} ({node.name})")
        if unsupported or pending or self.input_q is None or self.output is None:
            raise ModelError(f"int8ref: the graph is not a conv/add QDQ chain ending in ReduceMean "
                             f"(unsupported: {', '.join(unsupported) or 'none'}); use a zoo CNN such as mcunet-s")

    def _conv(self, node, ins, dq, init):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        src = dq[ins[0]][0]
        w_q, w_s = init[dq[ins[1]][0]], init[dq[ins[1]][1]]
        b_q = init[dq[ins[2]][0]]
        pads = attrs.get("pads", [0] * 2 * (w_q.ndim - 2))
        if pads[: len(pads) // 2] != pads[len(pads) // 2:]:
            raise ModelError(f"int8ref: conv {node.name} has asymmetric padding {pads}; export with symmetric pads")

        def make(dst: str, out: QTensor) -> ConvOp:
            sx = F32(self.q[src].scale)
            accum = (sx * np.asarray(w_s, F32)).astype(F32)
            if not exact_in_float32(w_q):
                raise ModelError(f"int8ref: conv {node.name} sums {w_q[0].size} products per output, too many for "
                                 "an exact float32 accumulation; split the layer")
            return ConvOp(src, dst, torch.from_numpy(w_q.astype(np.float32)), torch.from_numpy(b_q.astype(np.float64)),
                          tuple(attrs.get("strides", [1])), tuple(pads[: len(pads) // 2]), int(attrs.get("group", 1)),
                          torch.from_numpy(accum), torch.from_numpy((accum / F32(out.scale)).astype(F32)))
        return make

    def _add(self, ins, dq):
        a, b = dq[ins[0]][0], dq[ins[1]][0]

        def make(dst: str, out: QTensor) -> AddOp:
            qa, qb = self.q[a], self.q[b]
            ra, rb = F32(F32(qa.scale) / F32(out.scale)), F32(F32(qb.scale) / F32(out.scale))
            fixed = F32(F32(out.zero_point) - F32(F32(ra * F32(qa.zero_point)) + F32(rb * F32(qb.zero_point))))
            return AddOp(a, b, dst, float(ra), float(rb), float(fixed))
        return make

    @property
    def convs(self) -> list[ConvOp]:
        return [op for op in self.ops if isinstance(op, ConvOp)]

    def accumulate(self, op: ConvOp, x: torch.Tensor) -> torch.Tensor:
        """int32 accumulators (as float64) of ``op`` on int8 input values ``x``."""
        conv = F.conv2d if x.dim() == 4 else F.conv1d
        zx = self.q[op.src].zero_point
        # float32 is exact here and ~20x faster than float64: every partial sum of int8 x int8
        # products stays below 2**24 (``exact_in_float32``); the int32 bias is added in float64
        acc = conv((x - zx).float(), op.weight, None, op.stride, op.padding, 1, op.groups).double()
        return acc + op.bias.reshape((1, -1) + (1,) * (acc.dim() - 2))

    def requantize(self, op: ConvOp, acc: torch.Tensor, scale: torch.Tensor | None = None,
                   offset: torch.Tensor | None = None) -> torch.Tensor:
        """int8 values of ``op``'s output; ``scale`` / ``offset`` (per channel: C, or N x C per sample) fold an
        affine in."""
        # a 2-D scale / offset is per sample and channel (N x C): independent streams in one batch
        def per_channel(t: torch.Tensor) -> torch.Tensor:
            rows = t.shape[0] if t.dim() == 2 else 1
            return t.reshape((rows, -1) + (1,) * (acc.dim() - 2))
        s = op.requant if scale is None else (op.requant * scale.float()).float()
        if offset is not None:
            acc = acc + per_channel(offset.double())
        f = acc.float() * per_channel(s)
        return _round_sat(f, self.q[op.dst].zero_point)

    def add(self, op: AddOp, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        t = (b * op.rb + op.fixed).float().double()  # int8 * f32 + f32 is exact in float64: one rounding
        r = (a * op.ra + t).float()
        return _round_sat(r, 0)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        assert self.input_q is not None
        qt = self.input_q[1]
        f = (x.float() / torch.tensor(qt.scale, dtype=torch.float32)).float()
        return _round_sat(f, qt.zero_point).double()

    def run(self, x: torch.Tensor, hook: ConvHook | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Pooled float output (N x C) and every int8 tensor (values as float64) for float input ``x``."""
        assert self.input_q is not None and self.output is not None
        vals = {self.input_q[0]: self.quantize_input(x)}
        k = 0
        for op in self.ops:
            if isinstance(op, ConvOp):
                acc = self.accumulate(op, vals[op.src])
                fold = hook(k, acc) if hook is not None else None
                vals[op.dst] = self.requantize(op, acc, *(fold or (None, None))).double()
                k += 1
            else:
                vals[op.dst] = self.add(op, vals[op.a], vals[op.b]).double()
        name = self.output[0]
        qt = self.q[name]
        deq = ((vals[name] - qt.zero_point).float() * torch.tensor(qt.scale, dtype=torch.float32)).float()
        return deq.mean(dim=tuple(range(2, deq.dim()))), vals
