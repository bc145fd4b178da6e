"""QDQ -> integer rewrite of an imported frozen graph (runs BEFORE constant folding).

TVM's ONNX frontend imports an onnxruntime QDQ model as fake quantisation: every op runs in
float between ``dequantize`` and ``quantize``, and constant folding would turn the int8
weights back into float32 ones. This pass rebuilds ``main`` with one integer kernel per
quantised op (``int8_kernels``): weights stay int8 constants, biases become int32 constants
with the input zero-point correction folded in, requantisation parameters are per-channel
constants.

The walk is lazy: ``dequantize`` and float ops are only recorded; a ``quantize`` decides how
the float expression it closes is computed in integers, and a graph output decides what
crosses the float boundary (a ``dequantize``, a view of one, or a spatial mean of one). A
float op that is neither closed by a ``quantize`` nor part of the boundary is an error,
never a silent float kernel.

Problems are reported with ONNX node names by ``int8_check.check_int8`` before this pass
runs; an error raised here means the two disagree (a compiler bug), and says so.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
import tvm
from tvm import relax, tirx

from edgetune.compilers import int8_kernels as kernels
from edgetune.compilers import int8_math as im
from edgetune.compilers.boundary import dequant_table, spatial_mean
from edgetune.compilers.schedule import conv_family
from edgetune.errors import CompileError

R = relax.op
F32 = np.float32
VIEW_OPS = ("relax.reshape", "relax.permute_dims", "relax.squeeze", "relax.expand_dims", "relax.flatten")
KERNEL_ATTR = "edgetune.kernel"  # PrimFunc attribute: which int8 kernel family (read by schedule)


@dataclass(frozen=True)
class _Q:
    """An int8 activation of the new function with its (per-tensor) quantisation."""

    expr: relax.Expr
    scale: F32
    zp: int


@dataclass(frozen=True)
class _DQ:
    """``dequantize`` of an int8 activation, with the dequantize's own parameters."""

    q: relax.Expr
    scale: F32
    zp: int


@dataclass(frozen=True)
class _QConst:
    """A quantised constant (weight or bias) seen through a ``dequantize``."""

    data: np.ndarray
    scale: np.ndarray
    zp: np.ndarray
    axis: int


@dataclass(frozen=True)
class _Float:
    """A float op of the imported graph, computed only once a ``quantize`` or output asks for it."""

    call: relax.Call


@dataclass(frozen=True)
class _Input:
    var: relax.Var


@dataclass(frozen=True)
class _Tuple:
    items: tuple


class _Unsupported(Exception):
    pass


def _const_np(expr: relax.Expr) -> np.ndarray | None:
    value = getattr(expr, "value", None)
    if value is not None and hasattr(value, "numpy"):
        return value.numpy()
    data = getattr(expr, "data", None)
    return data.numpy() if data is not None and hasattr(data, "numpy") else None


def _scalar(arr: np.ndarray, what: str) -> np.ndarray:
    if arr.size != 1:
        raise _Unsupported(f"{what} must be per-tensor (got shape {list(arr.shape)})")
    return arr.reshape(())


def _shape(expr: relax.Expr) -> list[int]:
    return [int(d) for d in expr.ty.shape.values]


class _Lowering:
    def __init__(self, func: relax.Function, fixed_point: bool) -> None:
        self.func = func
        self.fixed_point = fixed_point
        self.bb = relax.BlockBuilder()
        self.env: dict[relax.Var, object] = {}

    def emit_kernel(self, family: str, te_func, *args, **kwargs) -> relax.Var:
        """Emit one int8 kernel (a TE unit) and tag its PrimFunc with its family for the scheduler."""
        var = self.bb.emit_te(te_func, *args, primfunc_name_hint=family, **kwargs)
        gvar = self.bb.lookup_binding(var).args[0]
        self.bb.update_func(gvar, self.bb.get()[gvar].with_attr(KERNEL_ATTR, family))
        return var

    @staticmethod
    def params(*values: float | np.floating) -> relax.Expr:
        """Non-integer scalars of a kernel as a float32 constant tensor (kept exact in C source)."""
        return relax.const(np.array(values or (0.0,), F32))

    def requant_consts(self, scale: np.ndarray) -> tuple[relax.Expr, ...]:
        if self.fixed_point:
            mult, shift = im.fixed_point_params(scale)
            return relax.const(mult.astype(np.int64)), relax.const(shift.astype(np.int64))
        return (relax.const(scale.astype(F32)),)

    # --- values -------------------------------------------------------------------------
    def value(self, expr: relax.Expr) -> object:
        if isinstance(expr, relax.Var):
            if expr not in self.env:
                raise _Unsupported(f"unknown variable {expr.name}")
            return self.env[expr]
        if isinstance(expr, relax.Tuple):
            return _Tuple(tuple(self.value(f) for f in expr.fields))
        return expr

    def activation(self, expr: relax.Expr, what: str) -> _DQ:
        v = self.value(expr)
        if isinstance(v, _DQ):
            return v
        raise _Unsupported(f"{what} is not a dequantized int8 activation")

    # --- the walk -----------------------------------------------------------------------
    def run(self) -> tvm.IRModule:
        params = list(self.func.params)
        for p in params:
            self.env[p] = _Input(p)
        attrs = dict(self.func.attrs.items()) if self.func.attrs else {}
        with self.bb.function("main", params=params, attrs=attrs):
            with self.bb.dataflow():
                for block in self.func.body.blocks:
                    for binding in block.bindings:
                        self.bind(binding.var, binding.value)
                out = self.output(self.value(self.func.body.body))
                gv = self.bb.emit_output(out)
            self.bb.emit_func_output(gv)
        return self.bb.get()

    def bind(self, var: relax.Var, value: relax.Expr) -> None:
        if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op):
            name = value.op.name
            if name == "relax.quantize":
                self.env[var] = self.quantize(value)
            elif name == "relax.dequantize":
                self.env[var] = self.dequantize(value)
            else:
                self.env[var] = _Float(value)
        elif isinstance(value, (relax.Var, relax.Tuple)):
            self.env[var] = self.value(value)
        else:
            raise _Unsupported(f"binding of {type(value).__name__}")

    def dequantize(self, call: relax.Call) -> object:
        data, scale, zp = call.args
        s, z = _const_np(scale), _const_np(zp)
        if s is None or z is None:
            raise _Unsupported("dequantize with non-constant scale or zero point")
        arr = _const_np(data)
        if arr is not None:
            return _QConst(arr, s.astype(F32).reshape(-1), z.reshape(-1), int(call.attrs.axis))
        q = self.value(data)
        if not isinstance(q, _Q):
            raise _Unsupported("dequantize of a value that is not an int8 activation")
        return _DQ(q.expr, F32(_scalar(s, "activation scale")), int(_scalar(z, "activation zero point")))

    def quantize(self, call: relax.Call) -> _Q:
        src, scale, zp = call.args
        s, z = _const_np(scale), _const_np(zp)
        if s is None or z is None or str(call.attrs.out_dtype) != "int8":
            raise _Unsupported("quantize must produce int8 with constant parameters")
        sy, zy = F32(_scalar(s, "output scale")), int(_scalar(z, "output zero point"))
        return _Q(self.lower(self.value(src), sy, zy), sy, zy)

    # --- lowering rules: float expression closed by quantize(sy, zy) -> int8 -------------
    def lower(self, v: object, sy: F32, zy: int) -> relax.Expr:
        if isinstance(v, _Input):
            return self.emit_kernel("quantize", partial(kernels.elementwise, lambda p, x: im.quantize(x, p[0], zy)),
                                    self.params(sy), v.var)
        if isinstance(v, _DQ):
            return self.rescale(v, sy, zy)
        if not isinstance(v, _Float):
            raise _Unsupported(f"quantize of {type(v).__name__}")
        call = v.call
        name = call.op.name
        rules = {"relax.add": self.lower_add, "relax.nn.conv2d": lambda c, s, z: self.conv(c, None, s, z),
                 "relax.matmul": lambda c, s, z: self.matmul(c, None, s, z), "relax.mean": self.global_pool,
                 "relax.nn.avg_pool2d": self.avg_pool, "relax.concat": self.concat,
                 "relax.nn.relu": self.clip, "relax.clip": self.clip, "relax.maximum": self.clip,
                 "relax.minimum": self.clip, "relax.call_tir": self.clip}
        if name in rules:
            return rules[name](call, sy, zy)
        if name in VIEW_OPS:
            x = self.activation(call.args[0], name)
            moved = self.bb.emit(relax.Call(call.op, [x.q, *call.args[1:]], call.attrs))
            return self.rescale(_DQ(moved, x.scale, x.zp), sy, zy)
        raise _Unsupported(f"no int8 lowering for {name}")

    def rescale(self, x: _DQ, sy: F32, zy: int) -> relax.Expr:
        if F32(x.scale) == F32(sy) and x.zp == zy:
            return x.q
        fn = partial(kernels.elementwise, lambda p, q: im.rescale(q, p[0], x.zp, p[1], zy))
        return self.emit_kernel("rescale", fn, self.params(x.scale, sy), x.q)

    def lower_add(self, call: relax.Call, sy: F32, zy: int) -> relax.Expr:
        lhs, rhs = (self.value(a) for a in call.args)
        for main, bias in ((lhs, rhs), (rhs, lhs)):
            if isinstance(main, _Float) and main.call.op.name in ("relax.nn.conv2d", "relax.matmul"):
                const = self.bias_const(bias)
                if const is not None:
                    lower = self.conv if main.call.op.name == "relax.nn.conv2d" else self.matmul
                    return lower(main.call, const, sy, zy)
        a = self.activation(call.args[0], "add input")
        b = self.activation(call.args[1], "add input")
        if _shape(a.q) != _shape(b.q):
            raise _Unsupported("add of differently shaped tensors (broadcast)")
        ra, rb, fixed = im.add_params(a.scale, a.zp, b.scale, b.zp, sy, zy)
        if not im.add_is_exact(ra, rb, fixed):
            raise _Unsupported("add whose scales are too far apart to reproduce onnxruntime exactly")
        return self.emit_kernel("add", partial(kernels.elementwise, lambda p, qa, qb: im.add(qa, qb, p[0], p[1], p[2])),
                                self.params(ra, rb, fixed), a.q, b.q)

    def bias_const(self, v: object) -> _QConst | None:
        if isinstance(v, _Float) and v.call.op.name == "relax.reshape":
            v = self.value(v.call.args[0])
        return v if isinstance(v, _QConst) else None

    def weight(self, expr: relax.Expr) -> _QConst:
        v = self.value(expr)
        if not isinstance(v, _QConst) or v.data.dtype != np.int8:
            raise _Unsupported("weight is not a dequantized int8 constant")
        if np.any(v.zp != 0):
            raise _Unsupported("weight zero point is not 0 (asymmetric weights)")
        return v

    def bias_int32(self, bias: _QConst | None, n: int, correction: np.ndarray) -> np.ndarray:
        """int32 bias with ``- zx * sum(W)`` folded in (onnxruntime adds the raw int32 bias)."""
        total = -correction.astype(np.int64)
        if bias is not None:
            if bias.data.dtype != np.int32 or np.any(bias.zp != 0):
                raise _Unsupported("bias is not a symmetric int32 constant")
            total = total + np.broadcast_to(bias.data.astype(np.int64).reshape(-1), (n,))
        if np.abs(total).max(initial=0) >= 2 ** 31:
            raise _Unsupported("bias does not fit int32")
        return total.astype(np.int32)

    def conv(self, call: relax.Call, bias: _QConst | None, sy: F32, zy: int) -> relax.Expr:
        x = self.activation(call.args[0], "conv input")
        w = self.weight(call.args[1])
        a = call.attrs
        if str(a.data_layout) != "NCHW" or str(a.kernel_layout) != "OIHW" or str(a.out_layout) != "NCHW":
            raise _Unsupported("conv layout other than NCHW/OIHW")
        if w.data.ndim != 4:
            raise _Unsupported("conv that is not 2-D")
        o = w.data.shape[0]
        pad = [int(p) for p in a.padding]  # top, left, bottom, right
        b = self.bias_int32(bias, o, x.zp * w.data.astype(np.int64).sum(axis=(1, 2, 3)))
        scale = im.requant_scale(x.scale, np.broadcast_to(w.scale, (o,)), sy)
        groups = int(a.groups)
        out_hw = _shape(call)[2:]
        pointwise = w.data.shape[2:] == (1, 1) and not any(pad) and all(int(s) == 1 for s in a.strides)
        family = conv_family(o, groups, w.data.shape[1], out_hw[0] * out_hw[1] if pointwise else out_hw[1])
        weight = np.ascontiguousarray(w.data.transpose(1, 2, 3, 0)) if family == "qconv2d_oc" else w.data
        return self.emit_kernel(family, kernels.qconv2d, x.q, relax.const(weight), relax.const(b),
                                *self.requant_consts(scale), strides=tuple(int(s) for s in a.strides),
                                pads=tuple(pad), dilation=tuple(int(d) for d in a.dilation), groups=groups,
                                zx=x.zp, zy=zy, channels_last_weight=family == "qconv2d_oc")

    def matmul(self, call: relax.Call, bias: _QConst | None, sy: F32, zy: int) -> relax.Expr:
        a = self.activation(call.args[0], "matmul input")
        if len(_shape(a.q)) != 2:
            raise _Unsupported("matmul input that is not 2-D")
        rhs = self.value(call.args[1])
        if isinstance(rhs, _DQ):
            if bias is not None or len(_shape(rhs.q)) != 2:
                raise _Unsupported("activation x activation matmul with a bias or not 2-D")
            scale = im.requant_scale(a.scale, rhs.scale, sy)
            return self.emit_kernel("qmatmul", kernels.qmatmul_act, a.q, rhs.q, self.params(scale), za=a.zp,
                                    zb=rhs.zp, zy=zy)
        if isinstance(rhs, _Float) and rhs.call.op.name == "relax.permute_dims":
            w = self.weight(rhs.call.args[0])  # Gemm transB=1: W is [N, K]
            axes = [int(i) for i in rhs.call.attrs.axes] if rhs.call.attrs.axes is not None else [1, 0]
            if w.data.ndim != 2 or axes != [1, 0]:
                raise _Unsupported("matmul weight transpose other than a 2-D transpose")
            wkn, out_axis = np.ascontiguousarray(w.data.T), 0
        else:
            w = self.weight(call.args[1])
            if w.data.ndim != 2:
                raise _Unsupported("matmul weight is not 2-D")
            wkn, out_axis = w.data, 1
        n = wkn.shape[1]
        if w.scale.size > 1 and w.axis % 2 != out_axis:
            raise _Unsupported("matmul weight scale is per input channel")
        b = self.bias_int32(bias, n, a.zp * wkn.astype(np.int64).sum(axis=0))
        scale = im.requant_scale(a.scale, np.broadcast_to(w.scale, (n,)), sy)
        return self.emit_kernel("qmatmul", kernels.qmatmul, a.q, relax.const(wkn), relax.const(b),
                                *self.requant_consts(scale), zy=zy)

    def spatial_axes(self, call: relax.Call, x: relax.Expr) -> None:
        rank = len(_shape(x))
        axes = sorted(int(i) % rank for i in call.attrs.axis)
        if rank != 4 or axes != [2, 3]:
            raise _Unsupported(f"mean over axes {axes} (only spatial means of NCHW tensors)")

    def global_pool(self, call: relax.Call, sy: F32, zy: int) -> relax.Expr:
        x = self.activation(call.args[0], "mean input")
        self.spatial_axes(call, x.q)
        _, _, h, w = _shape(x.q)
        scale = F32(F32(x.scale) / F32(F32(sy) * F32(h * w)))  # QLinearGlobalAveragePool's scale
        return self.emit_kernel("qglobal_pool", kernels.qglobal_pool, x.q, self.params(scale), zx=x.zp, zy=zy,
                                keepdims=bool(call.attrs.keepdims))

    def avg_pool(self, call: relax.Call, sy: F32, zy: int) -> relax.Expr:
        x = self.activation(call.args[0], "pool input")
        a = call.attrs
        if str(a.layout) != "NCHW" or any(int(d) != 1 for d in a.dilation):
            raise _Unsupported("average pool with a layout other than NCHW or with dilation")
        out_hw = tuple(_shape(call)[2:])
        return self.emit_kernel("qavg_pool", kernels.qavg_pool, x.q, relax.const(dequant_table(x.scale, x.zp)),
                                self.params(sy), kernel=tuple(int(k) for k in a.pool_size),
                                strides=tuple(int(s) for s in a.strides), pads=tuple(int(p) for p in a.padding),
                                out_hw=out_hw, count_include_pad=bool(a.count_include_pad), zy=zy)

    def concat(self, call: relax.Call, sy: F32, zy: int) -> relax.Expr:
        parts = self.value(call.args[0])
        if not isinstance(parts, _Tuple):
            raise _Unsupported("concat of a non-tuple")
        items = []
        for item in parts.items:
            if not isinstance(item, _DQ):
                raise _Unsupported("concat input is not a dequantized int8 activation")
            items.append(self.rescale(item, sy, zy))
        return self.bb.emit(R.concat(items, axis=int(call.attrs.axis)))

    def scalar_constant(self, expr: relax.Expr) -> float | None:
        """A scalar bound: a constant, or the frontend's ``where(isnan(c), +-inf, c)`` around one."""
        arr = _const_np(expr)
        if arr is None:
            v = self.value(expr)
            if not (isinstance(v, _Float) and v.call.op.name == "relax.where"):
                return None
            inf, value = (_const_np(a) for a in v.call.args[1:])
            if inf is None or value is None:
                return None
            arr = value if not np.isnan(value).any() else inf
        return float(arr.reshape(())) if arr.size == 1 else None

    def clip_bounds(self, call: relax.Call) -> tuple[_DQ, float, float]:
        """(input, lo, hi) of Relu, Clip (the frontend's maximum / minimum kernels) or Max/Min."""
        lo, hi = -np.inf, np.inf
        v: object = _Float(call)
        while isinstance(v, _Float):
            c = v.call
            kind = c.op.name
            args = list(c.args)
            if kind == "relax.call_tir":
                kind, args = f"relax.{c.args[0].name_hint}", list(c.args[1].fields)
            if kind == "relax.nn.relu":
                lo, v = max(lo, 0.0), self.value(args[0])
                continue
            if kind == "relax.clip":
                lo, hi = max(lo, float(args[1].value.value)), min(hi, float(args[2].value.value))
                v = self.value(args[0])
                continue
            if kind not in ("relax.maximum", "relax.minimum"):
                raise _Unsupported(f"no int8 lowering for {kind}")
            bound = self.scalar_constant(args[1])
            if bound is None:
                raise _Unsupported(f"{kind} with a non-constant or non-scalar bound")
            lo, hi = (max(lo, bound), hi) if kind == "relax.maximum" else (lo, min(hi, bound))
            v = self.value(args[0])
        if not isinstance(v, _DQ):
            raise _Unsupported("clip input is not a dequantized int8 activation")
        return v, lo, hi

    def clip(self, call: relax.Call, sy: F32, zy: int) -> relax.Expr:
        x, lo, hi = self.clip_bounds(call)
        if F32(x.scale) == F32(sy) and x.zp == zy:
            # same quantisation in and out: an integer clip at the quantised bounds
            qlo = int(np.clip(np.rint(F32(lo) / F32(sy)) + zy, im.QMIN, im.QMAX)) if np.isfinite(lo) else im.QMIN
            qhi = int(np.clip(np.rint(F32(hi) / F32(sy)) + zy, im.QMIN, im.QMAX)) if np.isfinite(hi) else im.QMAX
            return self.emit_kernel("clip", partial(kernels.elementwise, lambda p, q: tirx.max(
                tirx.min(q, tirx.const(qhi, "int8")), tirx.const(qlo, "int8"))), self.params(), x.q)
        has_lo, has_hi = bool(np.isfinite(lo)), bool(np.isfinite(hi))
        return self.emit_kernel("clip", partial(kernels.elementwise, lambda p, q: im.clip_float(
            q, p[0], x.zp, p[2] if has_lo else None, p[3] if has_hi else None, p[1], zy)),
            self.params(x.scale, sy, lo if has_lo else 0.0, hi if has_hi else 0.0), x.q)

    # --- the float boundary -------------------------------------------------------------
    def output(self, v: object) -> relax.Expr:
        if isinstance(v, _Tuple):
            return relax.Tuple([self.output(item) for item in v.items])
        if isinstance(v, _DQ):
            fn = partial(kernels.elementwise, lambda p, q: im.dequantize(q, p[0], v.zp))
            return self.emit_kernel("dequantize", fn, self.params(v.scale), v.q)
        if isinstance(v, _Q):
            return v.expr
        if isinstance(v, _Float) and v.call.op.name in VIEW_OPS:
            x = self.activation(v.call.args[0], "output view input")
            moved = self.bb.emit(relax.Call(v.call.op, [x.q, *v.call.args[1:]], v.call.attrs))
            return self.output(_DQ(moved, x.scale, x.zp))
        if isinstance(v, _Float) and v.call.op.name == "relax.mean":
            x = self.activation(v.call.args[0], "output mean input")
            self.spatial_axes(v.call, x.q)
            return self.emit_kernel("ort_mean", spatial_mean, x.q, relax.const(dequant_table(x.scale, x.zp)),
                                    keepdims=bool(v.call.attrs.keepdims))
        raise _Unsupported(f"graph output computed in float by {getattr(getattr(v, 'call', None), 'op', v)}")


def rewrite_int8(mod: tvm.IRModule, fixed_point: bool = False) -> tvm.IRModule:
    """Lower the fake-quant ``main`` of an imported QDQ graph to integer kernels.

    ``fixed_point`` selects integer-only requantisation (see ``int8_math``).

    Raises:
        CompileError: a part of the graph has no integer lowering (after ``check_int8``
            passed this is a compiler bug; the message names the Relax op).
    """
    try:
        out = _Lowering(mod["main"], fixed_point).run()
    except _Unsupported as exc:
        raise CompileError(f"int8: cannot lower the graph to integer kernels ({exc}); int8_check should have "
                           "reported this with node names — please report it as a compiler bug") from None
    return relax.transform.DeadCodeElimination()(out)
