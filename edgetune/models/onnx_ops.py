"""The torch interpreter of ONNX ops behind ``OnnxBackbone``: one function per op in ``OPS``.

Each function takes the node (its attributes) and its evaluated inputs and returns its output(s),
computed in torch so that the graph can be fitted and traced like any torch model. QDQ nodes run
as fake quantisation: QuantizeLinear rounds half to even and saturates, DequantizeLinear scales back.
"""

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from edgetune.errors import ModelError



@dataclass(frozen=True)
class Node:
    """One ONNX node as the interpreter needs it (attributes decoded to Python values)."""

    name: str
    op: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: dict[str, Any] = field(hash=False)

    def attr(self, key: str, default: Any = None) -> Any:
        return self.attrs.get(key, default)


OpFunction = Callable[[Node, list[Any]], Any]
OPS: dict[str, OpFunction] = {}


def _op(*names: str) -> Callable[[OpFunction], OpFunction]:
    def register(fn: OpFunction) -> OpFunction:
        for n in names:
            OPS[n] = fn
        return fn
    return register


def _ints(t: Any) -> list[int]:
    """A shape/axes/pads operand as Python ints (constants in the graph: static in the export trace)."""
    return [int(v) for v in (t.tolist() if isinstance(t, torch.Tensor) else t)]


def _pad_spatial(x: torch.Tensor, pads: list[int], value: float = 0.0) -> torch.Tensor:
    """ONNX pads [b1, b2, ..., e1, e2, ...] over the spatial dims -> F.pad (last dim first)."""
    k = len(pads) // 2
    torch_pads: list[int] = []
    for d in reversed(range(k)):
        torch_pads += [pads[d], pads[d + k]]
    return F.pad(x, torch_pads, value=value) if any(torch_pads) else x


def _window_pads(node: Node, x: torch.Tensor, kernel: list[int], strides: list[int],
                 dilations: list[int]) -> list[int]:
    auto = node.attr("auto_pad", "NOTSET")
    k = len(kernel)
    if auto in ("NOTSET", "VALID"):
        return list(node.attr("pads", [0] * 2 * k)) if auto == "NOTSET" else [0] * 2 * k
    begin, end = [], []
    for d in range(k):
        size = x.shape[2 + d]
        out = -(-size // strides[d])
        total = max(0, (out - 1) * strides[d] + (kernel[d] - 1) * dilations[d] + 1 - size)
        small, big = total // 2, total - total // 2
        begin.append(small if auto == "SAME_UPPER" else big)
        end.append(big if auto == "SAME_UPPER" else small)
    return begin + end


def _symmetric(pads: list[int]) -> bool:
    k = len(pads) // 2
    return pads[:k] == pads[k:]


@_op("Conv")
def _conv(node: Node, a: list[Any]) -> torch.Tensor:
    x, w = a[0], a[1]
    b = a[2] if len(a) > 2 else None
    k = w.dim() - 2
    strides = list(node.attr("strides", [1] * k))
    dilations = list(node.attr("dilations", [1] * k))
    pads = _window_pads(node, x, list(w.shape[2:]), strides, dilations)
    padding: Any = pads[:k]
    if not _symmetric(pads):
        x, padding = _pad_spatial(x, pads), 0
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[k]
    return conv(x, w, b, strides, padding, dilations, node.attr("group", 1))


def _pool(node: Node, x: torch.Tensor, kind: str) -> torch.Tensor:
    kernel = list(node.attr("kernel_shape"))
    k = len(kernel)
    strides = list(node.attr("strides", [1] * k))
    dilations = list(node.attr("dilations", [1] * k))
    pads = _window_pads(node, x, kernel, strides, dilations)
    ceil = bool(node.attr("ceil_mode", 0))
    if kind == "max":
        padding: Any = pads[:k]
        if not _symmetric(pads) or any(2 * p > kk for p, kk in zip(pads[:k], kernel)):
            x, padding = _pad_spatial(x, pads, float("-inf")), 0
        max_pool: Callable[..., torch.Tensor] = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[k]
        return max_pool(x, kernel, strides, padding, dilations, ceil)
    include = bool(node.attr("count_include_pad", 0))
    padding = pads[:k]
    if not _symmetric(pads):
        if not include:
            raise ModelError(f"onnx: AveragePool {node.name!r} has asymmetric pads {pads} without "
                             "count_include_pad; re-export the model with symmetric padding")
        x, padding = _pad_spatial(x, pads), 0
    avg_pool: Callable[..., torch.Tensor] = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[k]
    return avg_pool(x, kernel, strides, padding, ceil, include)


OPS["MaxPool"] = lambda n, a: _pool(n, a[0], "max")
OPS["AveragePool"] = lambda n, a: _pool(n, a[0], "avg")
OPS["GlobalAveragePool"] = lambda n, a: a[0].mean(dim=tuple(range(2, a[0].dim())), keepdim=True)
OPS["GlobalMaxPool"] = lambda n, a: a[0].amax(dim=tuple(range(2, a[0].dim())), keepdim=True)
OPS["Relu"] = lambda n, a: F.relu(a[0])
OPS["LeakyRelu"] = lambda n, a: F.leaky_relu(a[0], n.attr("alpha", 0.01))
OPS["Sigmoid"] = lambda n, a: torch.sigmoid(a[0])
OPS["Tanh"] = lambda n, a: torch.tanh(a[0])
OPS["HardSwish"] = lambda n, a: F.hardswish(a[0])
OPS["HardSigmoid"] = lambda n, a: torch.clamp(n.attr("alpha", 0.2) * a[0] + n.attr("beta", 0.5), 0.0, 1.0)
OPS["Erf"] = lambda n, a: torch.erf(a[0])
OPS["Exp"] = lambda n, a: torch.exp(a[0])
OPS["Sqrt"] = lambda n, a: torch.sqrt(a[0])
OPS["Neg"] = lambda n, a: -a[0]
OPS["Reciprocal"] = lambda n, a: 1.0 / a[0]
OPS["Pow"] = lambda n, a: torch.pow(a[0], a[1])
OPS["Add"] = lambda n, a: a[0] + a[1]
OPS["Sub"] = lambda n, a: a[0] - a[1]
OPS["Mul"] = lambda n, a: a[0] * a[1]
OPS["Div"] = lambda n, a: a[0] / a[1]
OPS["MatMul"] = lambda n, a: torch.matmul(a[0], a[1])
OPS["Identity"] = lambda n, a: a[0]
OPS["Dropout"] = lambda n, a: a[0]  # inference graph: dropout is the identity
OPS["Softmax"] = lambda n, a: torch.softmax(a[0], dim=n.attr("axis", -1))
OPS["Concat"] = lambda n, a: torch.cat([t for t in a if t is not None], dim=n.attr("axis"))
OPS["Transpose"] = lambda n, a: a[0].permute(*(n.attr("perm") or list(reversed(range(a[0].dim())))))
OPS["Shape"] = lambda n, a: torch.tensor(list(a[0].shape), dtype=torch.int64)


_TORCH_DTYPES = {onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.INT64: torch.int64,
                 onnx.TensorProto.INT32: torch.int32, onnx.TensorProto.BOOL: torch.bool,
                 onnx.TensorProto.INT8: torch.int8, onnx.TensorProto.UINT8: torch.uint8}
OPS["Equal"] = lambda n, a: a[0] == a[1]
OPS["Where"] = lambda n, a: torch.where(a[0].bool(), a[1], a[2])
OPS["Cast"] = lambda n, a: a[0].to(_TORCH_DTYPES[n.attr("to")])


@_op("ConstantOfShape")
def _constant_of_shape(node: Node, a: list[Any]) -> torch.Tensor:
    value = node.attr("value")
    fill = torch.from_numpy(np.array(value).reshape(-1)) if value is not None else torch.zeros(1)
    return fill.reshape(()).expand(_ints(a[0])).clone()


@_op("Expand")
def _expand(node: Node, a: list[Any]) -> torch.Tensor:
    shape = _ints(a[1])
    rank = max(len(shape), a[0].dim())
    have = [1] * (rank - a[0].dim()) + list(a[0].shape)
    want = [1] * (rank - len(shape)) + shape
    return a[0].reshape(have).expand([max(h, w) if 1 in (h, w) else h for h, w in zip(have, want)])


@_op("InstanceNormalization")
def _instance_norm(node: Node, a: list[Any]) -> torch.Tensor:
    return F.instance_norm(a[0], weight=a[1], bias=a[2], eps=node.attr("epsilon", 1e-5))


@_op("Clip")
def _clip(node: Node, a: list[Any]) -> torch.Tensor:
    lo = a[1] if len(a) > 1 and a[1] is not None else node.attr("min")
    hi = a[2] if len(a) > 2 and a[2] is not None else node.attr("max")
    lo = float(lo) if lo is not None else None
    hi = float(hi) if hi is not None else None
    return torch.clamp(a[0], lo, hi)


@_op("Flatten")
def _flatten(node: Node, a: list[Any]) -> torch.Tensor:
    axis = node.attr("axis", 1) % max(1, a[0].dim())
    return a[0].reshape(1, -1) if axis == 0 else a[0].flatten(axis).flatten(0, axis - 1)


@_op("Reshape")
def _reshape(node: Node, a: list[Any]) -> torch.Tensor:
    x, shape = a[0], _ints(a[1])
    shape = [x.shape[i] if s == 0 and not node.attr("allowzero", 0) else s for i, s in enumerate(shape)]
    # The file was exported at batch 1: its literal batch of 1 stands for "the batch" (fit runs batched).
    if shape and shape[0] == 1 and x.shape[0] != 1:
        shape[0] = x.shape[0]
    return x.reshape(shape)


def _axes(node: Node, a: list[Any], position: int) -> list[int] | None:
    if len(a) > position and a[position] is not None:
        return _ints(a[position])
    axes = node.attr("axes")
    return list(axes) if axes is not None else None


@_op("Squeeze")
def _squeeze(node: Node, a: list[Any]) -> torch.Tensor:
    axes = _axes(node, a, 1)
    x = a[0]
    if axes is None:
        return x.squeeze()
    for ax in sorted((ax % x.dim() for ax in axes), reverse=True):
        x = x.squeeze(ax)
    return x


@_op("Unsqueeze")
def _unsqueeze(node: Node, a: list[Any]) -> torch.Tensor:
    x = a[0]
    axes = _axes(node, a, 1) or []
    rank = x.dim() + len(axes)
    for ax in sorted(ax % rank for ax in axes):
        x = x.unsqueeze(ax)
    return x


def _reduce(fn: Callable[..., torch.Tensor]) -> OpFunction:
    def run(node: Node, a: list[Any]) -> torch.Tensor:
        axes = _axes(node, a, 1)
        keep = bool(node.attr("keepdims", 1))
        if axes is None or not axes:
            if node.attr("noop_with_empty_axes", 0):
                return a[0]
            axes = list(range(a[0].dim()))
        return fn(a[0], dim=tuple(ax % a[0].dim() for ax in axes), keepdim=keep)
    return run


OPS["ReduceMean"] = _reduce(torch.mean)
OPS["ReduceSum"] = _reduce(torch.sum)
OPS["ReduceMax"] = _reduce(torch.amax)


@_op("Gemm")
def _gemm(node: Node, a: list[Any]) -> torch.Tensor:
    x, w = a[0], a[1]
    if node.attr("transA", 0):
        x = x.t()
    if not node.attr("transB", 0):
        w = w.t()
    alpha, beta = node.attr("alpha", 1.0), node.attr("beta", 1.0)
    bias = a[2] if len(a) > 2 and a[2] is not None else None
    if alpha == 1.0 and beta == 1.0:
        return F.linear(x, w, bias)
    y = alpha * F.linear(x, w)
    return y + beta * bias if bias is not None else y


@_op("BatchNormalization")
def _batch_norm(node: Node, a: list[Any]) -> torch.Tensor:
    x, scale, bias, mean, var = a[:5]
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, node.attr("epsilon", 1e-5))


@_op("LayerNormalization")
def _layer_norm(node: Node, a: list[Any]) -> torch.Tensor:
    x, scale = a[0], a[1]
    bias = a[2] if len(a) > 2 else None
    axis = node.attr("axis", -1) % x.dim()
    return F.layer_norm(x, tuple(x.shape[axis:]), scale, bias, node.attr("epsilon", 1e-5))


@_op("Pad")
def _pad(node: Node, a: list[Any]) -> torch.Tensor:
    x = a[0]
    pads = _ints(a[1]) if len(a) > 1 and a[1] is not None else list(node.attr("pads"))
    value = float(a[2]) if len(a) > 2 and a[2] is not None else node.attr("value", 0.0)
    axes = _axes(node, a, 3) or list(range(x.dim()))
    k = len(axes)
    full = [0] * (2 * x.dim())
    for i, ax in enumerate(axes):
        full[ax % x.dim()], full[x.dim() + ax % x.dim()] = pads[i], pads[i + k]
    torch_pads: list[int] = []
    for d in reversed(range(x.dim())):
        torch_pads += [full[d], full[d + x.dim()]]
    mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}[node.attr("mode", "constant")]
    return F.pad(x, torch_pads, mode=mode, value=value) if mode == "constant" else F.pad(x, torch_pads, mode=mode)


@_op("Slice")
def _slice(node: Node, a: list[Any]) -> torch.Tensor:
    x = a[0]
    starts, ends = _ints(a[1]), _ints(a[2])
    axes = _ints(a[3]) if len(a) > 3 and a[3] is not None else list(range(len(starts)))
    steps = _ints(a[4]) if len(a) > 4 and a[4] is not None else [1] * len(starts)
    index: list[Any] = [slice(None)] * x.dim()
    for s, e, ax, st in zip(starts, ends, axes, steps):
        if st < 0:
            raise ModelError(f"onnx: Slice {node.name!r} has a negative step ({st}); re-export without flips")
        size = x.shape[ax]
        index[ax % x.dim()] = slice(max(0, min(size, s if s >= 0 else s + size)),
                                    max(0, min(size, e if e >= 0 else e + size)), st)
    return x[tuple(index)]


@_op("Gather")
def _gather(node: Node, a: list[Any]) -> torch.Tensor:
    x, idx = a[0], a[1]
    axis = node.attr("axis", 0) % x.dim()
    idx = torch.as_tensor(idx, dtype=torch.int64)
    out = torch.index_select(x, axis, idx.reshape(-1) % x.shape[axis])
    return out.reshape(*x.shape[:axis], *idx.shape, *x.shape[axis + 1:])


def _per_axis(t: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
    """A per-tensor (scalar) or per-axis (1-D) quantisation parameter shaped to broadcast over ``x``."""
    if t.dim() == 0 or t.numel() == 1:
        return t.reshape(())
    shape = [1] * x.dim()
    shape[axis % x.dim()] = -1
    return t.reshape(shape)


_QRANGE = {torch.int8: (-128, 127), torch.uint8: (0, 255), torch.int16: (-32768, 32767),
           torch.uint16: (0, 65535), torch.int32: (-2 ** 31, 2 ** 31 - 1)}


@_op("QuantizeLinear")
def _quantize(node: Node, a: list[Any]) -> torch.Tensor:
    x, scale = a[0], a[1]
    zp = a[2] if len(a) > 2 and a[2] is not None else torch.zeros((), dtype=torch.uint8)
    lo, hi = _QRANGE[zp.dtype]
    axis = node.attr("axis", 1)
    # Fake quantisation: integer values carried in float32 (round half to even, as ONNX specifies).
    q = torch.round(x / _per_axis(scale, x, axis)) + _per_axis(zp, x, axis).to(torch.float32)
    return torch.clamp(q, lo, hi)


@_op("DequantizeLinear")
def _dequantize(node: Node, a: list[Any]) -> torch.Tensor:
    q, scale = a[0].to(torch.float32), a[1]
    zp = a[2] if len(a) > 2 and a[2] is not None else None
    axis = node.attr("axis", 1)
    if zp is not None:
        q = q - _per_axis(zp, q, axis).to(torch.float32)
    return q * _per_axis(scale, q, axis)
