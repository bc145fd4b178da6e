"""QDQ -> integer rewrite of an imported frozen graph (runs BEFORE constant folding).

TVM's ONNX frontend imports an onnxruntime QDQ model as fake quantisation: every op runs in
float between ``dequantize`` and ``quantize``, and constant folding would turn the int8
weights back into float32 ones. This pass rebuilds ``main`` with one integer kernel per
quantised op (``int8_kernels``): weights stay int8 constants, biases become int32 constants
with the input zero-point correction folded in, requantisation parameters are per-channel
constants.

The walk is lazy: ``dequantize`` and float ops are only recorded; a ``quantize`` decides how
the float expression it closes is computed in integers, and a graph output decides what
crosses the float boundary (a ``dequantize``, a view of one, or a spatial mean of one). Which
Relax op gets which int8 rule comes from the op table (``edgetune.export.ops.relax_rules``).

A float expression with no int8 rule, or whose rule's preconditions fail, is first tried as an
int8 lookup table (``lut``): when it is elementwise in ONE int8 activation, with scalar constants
and ops whose float32 steps ``int8_tables`` reproduces (Sigmoid, HardSigmoid, HardSwish,
LeakyRelu, arithmetic with scalars), its 256 results are computed at compile time. Otherwise it
becomes a *float island*: its int8 inputs are dequantized (DequantizeLinear's arithmetic), the imported float
ops run as TVM lowers them, and the ``quantize`` that closes it is a QuantizeLinear kernel —
what onnxruntime computes for ops it leaves in float. ``float_islands`` (op table) lists them
with ONNX node names; quantisation the kernels cannot represent is reported by
``int8_check.check_int8`` before this pass runs.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import tvm
from tvm import relax, tirx, topi

from edgetune.compilers import int8_kernels as kernels
from edgetune.compilers import int8_math as im
from edgetune.compilers import int8_tables as tables
from edgetune.compilers.boundary import dequant_table, float_mean, spatial_mean
from edgetune.compilers.schedule import conv_family
from edgetune.errors import CompileError
from edgetune.export.manifest import AlignedConv
from edgetune.export.ops import relax_rules

R = relax.op
F32 = np.float32
RELAX_RULES = relax_rules()  # Relax op -> int8 rule name (the op table's single dispatch)
VIEW_OPS = tuple(op for op, rule in RELAX_RULES.items() if rule == "view")
# float ops an island's dequantize may fuse into (same-shape or broadcast elementwise work)
ELEMENTWISE_FLOAT = frozenset(f"relax.{op}" for op in (
    "add", "subtract", "multiply", "divide", "maximum", "minimum", "power", "clip", "sigmoid", "tanh", "exp",
    "sqrt", "rsqrt", "erf", "negative", "abs", "round", "floor", "ceil", "where", "nn.relu", "nn.leakyrelu",
    "nn.gelu", "nn.silu"))
# float ops that may absorb a product into a fused multiply-add: TVM's LLVM backend contracts a multiply
# feeding an add on targets with FMA, onnxruntime rounds the product first; a product reaching one of them
# (directly or through a view) is computed in a kernel of its own (``contraction_barrier``)
CONTRACTING_FLOAT = frozenset({"relax.add", "relax.subtract", *VIEW_OPS})
# int8 rule of the op table -> the method of ``_Lowering`` that lowers it
RULE_METHODS = {"conv": "conv_unit", "matmul": "matmul_unit", "add": "lower_add", "mul": "lower_mul",
                "lut": "lut", "softmax": "softmax", "concat": "concat",
                "avg_pool": "avg_pool", "global_pool": "global_pool", "mean": "global_pool", "max_pool": "max_pool",
                "clip": "clip", "view": "view", "pad": "pad"}
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


@dataclass(frozen=True, eq=False)
class _Item:
    """Element ``index`` of a tuple-valued float op (batch_norm's result, split)."""

    base: object
    index: int


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


def _dequantized(v: _QConst) -> np.ndarray:
    """DequantizeLinear of a quantised constant in float32 (per axis when its scale is)."""
    shape = [1] * v.data.ndim
    if v.scale.size > 1:
        shape[v.axis % v.data.ndim] = -1
    value = (v.data.astype(np.int32) - v.zp.reshape(shape).astype(np.int32)).astype(F32) * v.scale.reshape(shape)
    return value.astype(F32)


def _rule_key(call: relax.Call) -> str:
    """The op table's Relax key of a call: the op name, or ``call_tir:<kernel>`` for the frontend's
    TIR kernels (topi's pad, maximum, minimum), digits stripped from the kernel name."""
    if call.op.name == "relax.call_tir":
        return "call_tir:" + call.args[0].name_hint.rstrip("0123456789")
    return call.op.name


def _pad_widths(func: tirx.PrimFunc, in_shape: list[int], out_shape: list[int]) -> tuple[list[int], float]:
    """(pads before each axis, pad value) of topi's constant pad kernel: ``out[i] = if_then_else(inside,
    A[i - before], value)``; raises ``_Unsupported`` for any other kernel (reflect, edge, crops)."""
    node = func.body
    while not isinstance(node, tirx.BufferStore):
        node = getattr(node, "block", None) or getattr(node, "body", None)
        if node is None:
            raise _Unsupported("pad kernel is not a single store")
    value = node.value
    if not (isinstance(value, tvm.ir.Call) and value.op.name == "prim.if_then_else"
            and isinstance(value.args[2], tirx.FloatImm)):
        raise _Unsupported("pad that is not a constant pad")
    before = []
    for index in value.args[1].indices:
        if isinstance(index, tirx.Var):
            before.append(0)
        elif isinstance(index, tirx.Sub) and isinstance(index.a, tirx.Var) and isinstance(index.b, tirx.IntImm):
            before.append(int(index.b.value))
        else:
            raise _Unsupported("pad with an index that is not a shift")
    if len(before) != len(in_shape) or any(o - i - b < 0 or b < 0 for o, i, b in zip(out_shape, in_shape, before)):
        raise _Unsupported("pad that crops")
    return before, float(value.args[2].value)


def _bound(arg: object) -> float:
    """A clip bound of relax.clip: a PrimValue, or a plain number (the frontend's HardSwish)."""
    value = getattr(arg, "value", arg)
    return float(getattr(value, "value", value))


def _shape(expr: relax.Expr) -> list[int]:
    return [int(d) for d in expr.ty.shape.values]


class _Lowering:
    def __init__(self, mod: tvm.IRModule, fixed_point: bool, aligned: Sequence[AlignedConv] = ()) -> None:
        self.mod = mod
        self.func = mod["main"]
        self.fixed_point = fixed_point
        # norm-align: conv position (graph order) -> its spec and its two run-time inputs
        self.aligned = {a.conv: (a, relax.Var(a.scale, relax.TensorType((a.channels,), "float32")),
                                 relax.Var(a.offset, relax.TensorType((a.channels,), "float32")))
                        for a in aligned}
        self.convs = 0  # convolutions lowered so far
        self.moments: list[relax.Expr] = []  # the aligned convs' statistics, appended to main's outputs
        self.bb = relax.BlockBuilder()
        self.env: dict[relax.Var, object] = {}
        self.floats: dict[int, relax.Expr] = {}  # id(value) -> its float tensor in the new function
        self.islands: list[str] = []  # Relax ops computed in float (for the compile record)
        self.rules = {rule: getattr(self, method) for rule, method in RULE_METHODS.items()}

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
        extra = [v for k in sorted(self.aligned) for v in self.aligned[k][1:]]
        with self.bb.function("main", params=params + extra, attrs=attrs):
            with self.bb.dataflow():
                for block in self.func.body.blocks:
                    for binding in block.bindings:
                        self.bind(binding.var, binding.value)
                out = self.output(self.value(self.func.body.body))
                missing = sorted(k for k in self.aligned if k >= self.convs)
                if missing:
                    raise _Unsupported(f"norm-align names conv {missing[0]} but the graph lowers {self.convs} convs")
                if self.moments:  # after the taps, in the manifest's order: sum, sumsq per aligned conv
                    taps = list(out.fields) if isinstance(out, relax.Tuple) else [out]
                    out = relax.Tuple(taps + self.moments)
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
        elif isinstance(value, relax.TupleGetItem):
            base = self.value(value.tuple_value)
            self.env[var] = base.items[int(value.index)] if isinstance(base, _Tuple) else _Item(base, int(value.index))
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
        const = _const_np(v) if isinstance(v, relax.Expr) else None
        if const is not None:  # QuantizeLinear of a float constant, done once here (IEEE division, as MLAS)
            return relax.const(np.clip(np.rint(const.astype(F32) / sy) + zy, im.QMIN, im.QMAX).astype(np.int8))
        if not isinstance(v, _Float):
            return self.island(v, sy, zy)
        call = v.call
        rule = RELAX_RULES.get(_rule_key(call)) if isinstance(call.op, tvm.ir.Op) else None
        if rule is not None:
            try:
                return self.rules[rule](call, sy, zy)
            except _Unsupported:
                pass  # the rule's preconditions do not hold here: a table, else the expression runs in float
        try:
            return self.lut(call, sy, zy)
        except _Unsupported:
            return self.island(v, sy, zy)

    def conv_unit(self, call: relax.Call, sy: F32, zy: int) -> relax.Expr:
        return self.conv(call, None, sy, zy)

    def matmul_unit(self, call: relax.Call, sy: F32, zy: int) -> relax.Expr:
        return self.matmul(call, None, sy, zy)

    def pad(self, call: relax.Call, sy: F32, zy: int) -> relax.Expr:
        """Constant Pad on int8: the input requantised, the border ``QuantizeLinear(value)`` (exact:
        the float pad only adds copies of ``value``)."""
        args = call.args[1].fields if isinstance(call.args[1], relax.Tuple) else [call.args[1]]
        if len(args) != 1:
            raise _Unsupported("pad with more than one input")
        x = self.activation(args[0], "pad input")
        before, value = _pad_widths(self.mod[call.args[0]], _shape(x.q), _shape(call))
        q_value = int(np.clip(np.rint(F32(value) / sy) + zy, im.QMIN, im.QMAX))
        moved = self.rescale(x, sy, zy)
        return self.emit_kernel("pad", kernels.pad_int8, moved, before=tuple(before), out_shape=tuple(_shape(call)),
                                value=q_value)

    def view(self, call: relax.Call, sy: F32, zy: int) -> relax.Expr:
        """Data movement commutes with the (monotonic, elementwise) requantisation: move int8, rescale."""
        x = self.activation(call.args[0], call.op.name)
        moved = self.bb.emit(relax.Call(call.op, [x.q, *call.args[1:]], call.attrs))
        return self.rescale(_DQ(moved, x.scale, x.zp), sy, zy)

    # --- lookup tables ------------------------------------------------------------------
    def lut(self, call: relax.Call, sy: F32, zy: int) -> relax.Expr:
        """An elementwise float expression of one int8 activation as a 256-entry int8 table: every
        input value dequantized, the expression evaluated in float32 as onnxruntime rounds it, the
        result quantized (QLinearSigmoid / QLinearLeakyRelu build theirs the same way; for ops it
        leaves in float, DQ -> op -> Q is the same function of the int8 input)."""
        sources: list[_DQ] = []
        values = self.tabulate(_Float(call), sources)
        if not sources:
            raise _Unsupported("a constant expression")
        x = sources[0]
        if _shape(call) != _shape(x.q) or np.shape(values) != (256,):
            raise _Unsupported("a table whose output has another shape than its input")
        try:
            table = tables.lookup_table(values, sy, zy)
        except ValueError as exc:
            raise _Unsupported(str(exc)) from None
        return self.emit_kernel("lut", kernels.lookup_table, x.q, relax.const(table))

    def tabulate(self, v: object, sources: list[_DQ]) -> np.ndarray:
        """float32 values of ``v`` for the 256 int8 values of its one activation input (a scalar for
        constants); raises ``_Unsupported`` for anything ``int8_tables`` does not reproduce."""
        if isinstance(v, _DQ):
            if sources and not (sources[0].q.same_as(v.q) and sources[0].scale == v.scale
                                and sources[0].zp == v.zp):
                raise _Unsupported("an expression of two int8 activations")
            sources[:1] = [v]
            return tables.dequantized_inputs(v.scale, v.zp)
        const = _dequantized(v) if isinstance(v, _QConst) else _const_np(v) if isinstance(v, relax.Expr) else None
        if const is not None:
            if const.size != 1:
                raise _Unsupported("a constant that is not a scalar")
            return const.astype(F32).reshape(())
        if not isinstance(v, _Float) or not isinstance(v.call.op, tvm.ir.Op):
            raise _Unsupported(f"{type(v).__name__} in a table")
        call, name = v.call, v.call.op.name
        args = list(call.args)
        if name == "relax.call_tir":  # the frontend's maximum / minimum kernels (Clip)
            name, args = "relax." + call.args[0].name_hint.rstrip("0123456789"), list(call.args[1].fields)
        if name == "relax.clip":
            return tables.clip(_bound(args[1]), _bound(args[2]))(self.tabulate(self.value(args[0]), sources))
        if name == "relax.nn.leakyrelu":
            return tables.leaky_relu(float(call.attrs.alpha))(self.tabulate(self.value(args[0]), sources))
        if name not in tables.FLOAT_OPS:
            raise _Unsupported(f"{name} in a table")
        operands = []
        for arg in args:
            bound = self.scalar_constant(arg) if name in ("relax.maximum", "relax.minimum") else None
            operands.append(F32(bound) if bound is not None else self.tabulate(self.value(arg), sources))
        return tables.FLOAT_OPS[name](*operands)

    # --- float islands ------------------------------------------------------------------
    def island(self, v: object, sy: F32, zy: int) -> relax.Expr:
        """``quantize(f)`` of a float expression with no int8 rule: f in float, then QuantizeLinear."""
        f = self.floating(v)
        fn = partial(kernels.elementwise, lambda p, x: im.quantize(x, p[0], zy))
        return self.emit_kernel("quantize", fn, self.params(sy), f)

    def floating(self, v: object, user: str = "") -> relax.Expr:
        """The float32 tensor of a value, as onnxruntime's float ops see it (emitted once)."""
        if isinstance(v, _Input):
            return v.var
        if isinstance(v, relax.Expr):  # a constant or shape argument of the imported graph
            return v
        if isinstance(v, _Tuple):
            return relax.Tuple([self.floating(item) for item in v.items])
        if isinstance(v, _Q):
            raise _Unsupported("an int8 tensor is used by a float op without a DequantizeLinear")
        key = id(v)
        if key in self.floats:
            if isinstance(v, _DQ) and (user not in ELEMENTWISE_FLOAT or user in CONTRACTING_FLOAT):
                self.opaque(self.floats[key])
            return self.floats[key]
        if isinstance(v, _DQ):
            fn = partial(kernels.elementwise, lambda p, q: im.dequantize(q, p[0], v.zp))
            out = self.emit_kernel("dequantize", fn, self.params(v.scale), v.q)
            if user not in ELEMENTWISE_FLOAT or user in CONTRACTING_FLOAT:
                self.opaque(out)  # a dequantized value is a product: see CONTRACTING_FLOAT
        elif isinstance(v, _QConst):
            out = relax.const(_dequantized(v))
        elif isinstance(v, _Item):
            out = self.batch_norm_affine(v)
            if out is None:
                out = self.bb.emit(relax.TupleGetItem(self.floating(v.base), v.index))
        elif isinstance(v, _Float):
            out = self.island_mean(v.call)
            if out is None:
                out = self.contraction_barrier(v.call)
            if out is None:
                out = self.bb.emit(self.float_call(v.call))
            self.islands.append(v.call.op.name if isinstance(v.call.op, tvm.ir.Op) else str(v.call.op))
        else:
            raise _Unsupported(f"float value of {type(v).__name__}")
        self.floats[key] = out
        return out

    def contraction_barrier(self, call: relax.Call) -> relax.Expr | None:
        """A float32 multiply of an island as a kernel of its own (opaque to FuseOps), so its product is
        rounded to float32 before any add or reduction uses it, as onnxruntime's separate Mul node does
        (fused, LLVM would contract the two into one FMA on targets that have it). None for other ops."""
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.multiply"
                and str(call.ty.dtype) == "float32"):
            return None
        a, b = (self.float_arg(arg, "relax.multiply") for arg in call.args)
        out = self.bb.emit_te(topi.multiply, a, b, primfunc_name_hint="island_multiply")
        self.opaque(out)
        return out

    def island_mean(self, call: relax.Call) -> relax.Expr | None:
        """A float ReduceMean over the trailing axes (a spatial mean, or the last axis of a rank-3
        tensor) in onnxruntime's summation order, or None for any other op (TVM's own then)."""
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.mean"
                and any(int(i) < 0 for i in call.attrs.axis)):  # negative: an imported ReduceMean
            return None
        try:
            arg = self.value(call.args[0]) if isinstance(call.args[0], relax.Var) else None
        except _Unsupported:
            return None
        if isinstance(arg, _DQ):
            try:
                return self.ort_mean(call, arg)
            except _Unsupported:
                return None
        if arg is None or isinstance(arg, _Q):
            return None
        shape = _shape(call.args[0])
        rank, axes = len(shape), sorted(int(i) % len(shape) for i in call.attrs.axis)
        if not ((rank == 4 and axes == [2, 3]) or (rank == 3 and axes == [2])):
            return None
        x = self.floating(arg, "relax.mean")
        if rank == 3:
            x = self.bb.emit(R.reshape(x, (shape[0], shape[1], 1, shape[2])))
        y = self.emit_kernel("ort_mean", float_mean, x, keepdims=bool(call.attrs.keepdims))
        return self.bb.emit(R.reshape(y, _shape(call))) if rank == 3 else y

    def batch_norm_affine(self, v: _Item) -> relax.Expr | None:
        """An inference BatchNormalization as one per-channel affine ``x * s + b`` (``s = gamma /
        sqrt(var + eps)``, ``b = beta - mean * s`` in float32): elementwise, so the island's dequantize
        fuses into it and it needs no float buffer. None when it is not such a batch norm."""
        base = v.base
        if not (isinstance(base, _Float) and isinstance(base.call.op, tvm.ir.Op)
                and base.call.op.name == "relax.nn.batch_norm" and v.index == 0):
            return None
        a = base.call.attrs
        params = [self.float_constant(arg) for arg in base.call.args[1:5]]
        if bool(a.training) or any(p is None for p in params):
            return None
        gamma, beta, mean, var = (p.astype(F32) for p in params)
        scale = (gamma / np.sqrt(var + F32(float(a.epsilon)))).astype(F32) if bool(a.scale) else \
            (F32(1) / np.sqrt(var + F32(float(a.epsilon)))).astype(F32)
        shift = (beta - mean * scale).astype(F32) if bool(a.center) else (-mean * scale).astype(F32)
        rank = len(_shape(base.call.args[0]))
        shape = [1] * rank
        shape[int(a.axis) % rank] = -1
        x = self.float_arg(base.call.args[0], "relax.multiply")
        self.islands.append("relax.nn.batch_norm (per-channel affine)")
        return self.bb.emit(R.add(R.multiply(x, relax.const(scale.reshape(shape))), relax.const(shift.reshape(shape))))

    def float_constant(self, arg: relax.Expr) -> np.ndarray | None:
        """The float32 value of a constant argument (a constant, or a dequantized quantised one)."""
        v = self.value(arg) if isinstance(arg, relax.Var) else arg
        if isinstance(v, _QConst):
            return _dequantized(v)
        return _const_np(v) if isinstance(v, relax.Expr) else None

    def opaque(self, var: relax.Var) -> None:
        """Make a dequantize kernel opaque to FuseOps: an int8 kernel fused with an island's slices or
        reductions no longer matches its schedule template (it would run unscheduled). Used only before
        non-elementwise float ops: before elementwise ones it fuses, and the island needs no float buffer."""
        gvar = self.bb.lookup_binding(var).args[0]
        self.bb.update_func(gvar, self.bb.get()[gvar].with_attr("op_pattern", 8))

    def float_arg(self, arg: relax.Expr, user: str = "") -> relax.Expr:
        if isinstance(arg, relax.Var):
            return self.floating(self.value(arg), user)
        if isinstance(arg, relax.Tuple):
            return relax.Tuple([self.float_arg(f) for f in arg.fields])
        if isinstance(arg, tvm.ir.GlobalVar):  # a call_tir kernel of the imported module (e.g. topi's pad)
            return self.bb.add_func(self.mod[arg], arg.name_hint)
        return arg

    def float_call(self, call: relax.Call) -> relax.Call:
        user = call.op.name if isinstance(call.op, tvm.ir.Op) else ""
        return relax.Call(call.op, [self.float_arg(a, user) for a in call.args], call.attrs, call.ty_args)

    def rescale(self, x: _DQ, sy: F32, zy: int) -> relax.Expr:
        if F32(x.scale) == F32(sy) and x.zp == zy:
            return x.q
        fn = partial(kernels.elementwise, lambda p, q: im.rescale(q, p[0], x.zp, p[1], zy))
        return self.emit_kernel("rescale", fn, self.params(x.scale, sy), x.q)

    def lower_add(self, call: relax.Call, sy: F32, zy: int) -> relax.Expr:
        lhs, rhs = (self.value(a) for a in call.args)
        for main, bias in ((lhs, rhs), (rhs, lhs)):
            if isinstance(main, _Float) and main.call.op.name in ("relax.nn.conv2d", "relax.nn.conv1d",
                                                                  "relax.matmul"):
                const = self.bias_const(bias)
                if const is not None:
                    lower = self.matmul if main.call.op.name == "relax.matmul" else self.conv
                    return lower(main.call, const, sy, zy)
        a, b = (self.binary_operand(x) for x in call.args)
        out = _shape(call)
        if _shape(a.q) != out and _shape(b.q) == out:
            # onnxruntime's QLinearAdd passes the broadcast operand as MLAS' scalar ("B") side,
            # whose product is the inner fused multiply-add: swap so ``b`` is the broadcast one
            a, b = b, a
        elif _shape(a.q) != out:
            raise _Unsupported("add where both operands are broadcast")
        ra, rb, fixed = im.add_params(a.scale, a.zp, b.scale, b.zp, sy, zy)
        if not im.add_is_exact(ra, rb, fixed):
            raise _Unsupported("add whose scales are too far apart to reproduce onnxruntime exactly")
        fn = partial(kernels.broadcast_binary, lambda p, qa, qb: im.add(qa, qb, p[0], p[1], p[2]))
        return self.emit_kernel("add", fn, self.params(ra, rb, fixed), a.q, b.q)

    def lower_mul(self, call: relax.Call, sy: F32, zy: int) -> relax.Expr:
        """QLinearMul, with broadcasting (squeeze-excitation's [N, C, 1, 1] scale) and per-tensor
        quantised constants; hardswish's ``x * HardSigmoid(x)`` is a table then this."""
        a, b = (self.binary_operand(x) for x in call.args)
        out = _shape(call)
        if _shape(a.q) != out and _shape(b.q) == out:
            a, b = b, a  # the product commutes (so does onnxruntime's scalar-B loop): broadcast ``b``
        elif _shape(a.q) != out:
            raise _Unsupported("mul where both operands are broadcast")
        ratio = im.mul_ratio(a.scale, b.scale, sy)
        if not im.mul_fits(ratio, a.zp, b.zp, zy):
            raise _Unsupported("mul whose products leave the int32 range onnxruntime converts")
        fn = partial(kernels.broadcast_binary, lambda p, qa, qb: im.mul(qa, qb, a.zp, b.zp, p[0], p[1], zy))
        return self.emit_kernel("mul", fn, self.params(ratio, 0.0), a.q, b.q)

    def binary_operand(self, expr: relax.Expr) -> _DQ:
        """An int8 activation, or a per-tensor quantised constant as one (QLinearAdd's / QLinearMul's
        constant input)."""
        v = self.value(expr)
        if isinstance(v, _QConst) and v.scale.size == 1 and v.zp.size == 1 and v.data.dtype == np.int8:
            return _DQ(relax.const(v.data), F32(v.scale.reshape(())), int(v.zp.reshape(())))
        return self.activation(expr, "binary op input")

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
        """QLinearConv; a 1-D conv (N x C x T) runs as a 2-D one with H = 1."""
        x = self.activation(call.args[0], "conv input")
        w = self.weight(call.args[1])
        a = call.attrs
        one_d = call.op.name == "relax.nn.conv1d"
        layouts = ("NCW", "OIW", "NCW") if one_d else ("NCHW", "OIHW", "NCHW")
        if (str(a.data_layout), str(a.kernel_layout), str(a.out_layout)) != layouts:
            raise _Unsupported(f"conv layout other than {'/'.join(layouts[:2])}")
        if w.data.ndim != (3 if one_d else 4):
            raise _Unsupported("conv weight of unexpected rank")
        o = w.data.shape[0]
        if one_d:  # [l, r] -> top 0, left l, bottom 0, right r; H = 1 everywhere
            left, right = (int(p) for p in a.padding)
            pad, strides, dilation = [0, left, 0, right], (1, int(a.strides[0])), (1, int(a.dilation[0]))
            n, c, t = _shape(x.q)
            xq = self.bb.emit(R.reshape(x.q, (n, c, 1, t)))
            wdata = w.data[:, :, None, :]
            out_hw = [1, _shape(call)[2]]
        else:
            pad = [int(p) for p in a.padding]  # top, left, bottom, right
            strides, dilation = tuple(int(s) for s in a.strides), tuple(int(d) for d in a.dilation)
            xq, wdata, out_hw = x.q, w.data, _shape(call)[2:]
        b = self.bias_int32(bias, o, x.zp * wdata.astype(np.int64).sum(axis=(1, 2, 3)))
        scale = im.requant_scale(x.scale, np.broadcast_to(w.scale, (o,)), sy)
        groups = int(a.groups)
        pointwise = wdata.shape[2:] == (1, 1) and not any(pad) and all(s == 1 for s in strides)
        family = conv_family(o, groups, wdata.shape[1], out_hw[0] * out_hw[1] if pointwise else out_hw[1])
        weight = np.ascontiguousarray(wdata.transpose(1, 2, 3, 0)) if family == "qconv2d_oc" else wdata
        geometry = dict(strides=strides, pads=tuple(pad), dilation=dilation, groups=groups, zx=x.zp, zy=zy,
                        channels_last_weight=family == "qconv2d_oc")
        spec = self.aligned.get(self.convs)
        if spec is not None:
            y = self.aligned_conv(family, spec, xq, weight, b, geometry)
        else:
            y = self.emit_kernel(family, kernels.qconv2d, xq, relax.const(weight), relax.const(b),
                                 *self.requant_consts(scale), **geometry)
        self.convs += 1
        return self.bb.emit(R.reshape(y, _shape(call))) if one_d else y

    def aligned_conv(self, family: str, spec: tuple, xq: relax.Expr, weight: np.ndarray, bias: np.ndarray,
                     geometry: dict) -> relax.Expr:
        """norm-align's conv: requantisation scale and accumulator offset are run-time inputs (the
        method's state), and the same kernel returns the unaligned accumulator's per-channel sum and
        sum of squares, handed out as float32 [1, C] outputs of ``main``."""
        aligned, scale, offset = spec
        if self.fixed_point:
            raise _Unsupported("norm-align with fixed-point requantisation (its scale changes per sample)")
        if len(bias) != aligned.channels:
            raise _Unsupported(f"norm-align conv {aligned.conv} ({aligned.node}) has {len(bias)} output channels, "
                               f"the manifest says {aligned.channels}")
        parts = self.emit_kernel(family, kernels.qconv2d, xq, relax.const(weight), relax.const(bias), scale, offset,
                                 moments=True, **geometry)
        for k in (1, 2):
            moment = self.bb.emit(relax.TupleGetItem(parts, k))
            self.moments.append(self.bb.emit(R.astype(moment, "float32")))
        return self.bb.emit(relax.TupleGetItem(parts, 0))

    def matmul(self, call: relax.Call, bias: _QConst | None, sy: F32, zy: int) -> relax.Expr:
        a = self.activation(call.args[0], "matmul input")
        rhs = self.value(call.args[1])
        if isinstance(rhs, _DQ) and len(_shape(a.q)) > 2:  # batched activation x activation (attention)
            if bias is not None or _shape(a.q)[:-2] != _shape(rhs.q)[:-2]:
                raise _Unsupported("batched matmul with a bias or with broadcast batch dimensions")
            scale = im.requant_scale(a.scale, rhs.scale, sy)
            return self.emit_kernel("qbmm", kernels.qbatch_matmul, a.q, rhs.q, self.params(scale), za=a.zp,
                                    zb=rhs.zp, zy=zy)
        if len(_shape(a.q)) != 2:
            raise _Unsupported("matmul input that is not 2-D")
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

    def softmax(self, call: relax.Call, sy: F32, zy: int) -> relax.Expr:
        """QLinearSoftmax over the last axis: an exp table from the input scale and row length."""
        x = self.activation(call.args[0], "softmax input")
        shape = _shape(x.q)
        if int(call.attrs.axis) % len(shape) != len(shape) - 1:
            raise _Unsupported("softmax over an axis other than the last")
        table = tables.softmax_exp_table(x.scale, shape[-1])
        return self.emit_kernel("qsoftmax", kernels.qsoftmax, x.q, relax.const(table),
                                self.params(tables.softmax_output_scale(sy)), zy=zy)

    def spatial_axes(self, call: relax.Call, x: relax.Expr) -> None:
        rank = len(_shape(x))
        axes = sorted(int(i) % rank for i in call.attrs.axis)
        if rank != 4 or axes != [2, 3]:
            raise _Unsupported(f"mean over axes {axes} (only spatial means of NCHW tensors)")

    def as_2d(self, x: _DQ) -> relax.Expr:
        """An N x C x T int8 tensor as N x C x 1 x T (1-D pools and means run as 2-D ones)."""
        n, c, t = _shape(x.q)
        return self.bb.emit(R.reshape(x.q, (n, c, 1, t)))

    def global_pool(self, call: relax.Call, sy: F32, zy: int) -> relax.Expr:
        """QLinearGlobalAveragePool (a GlobalAveragePool); a ReduceMean (negative axes, see
        ``onnx_import.mark_reduce_means``) is onnxruntime's float mean, then QuantizeLinear."""
        if any(int(i) < 0 for i in call.attrs.axis):
            f = self.ort_mean(call, self.activation(call.args[0], "mean input"))
            fn = partial(kernels.elementwise, lambda p, x: im.quantize(x, p[0], zy))
            return self.emit_kernel("quantize", fn, self.params(sy), f)
        x = self.activation(call.args[0], "mean input")
        rank = len(_shape(x.q))
        axes = sorted(int(i) % rank for i in call.attrs.axis)
        if rank == 3 and axes == [2]:
            xq = self.as_2d(x)
        else:
            self.spatial_axes(call, x.q)
            xq = x.q
        _, _, h, w = _shape(xq)
        scale = F32(F32(x.scale) / F32(F32(sy) * F32(h * w)))  # QLinearGlobalAveragePool's scale
        y = self.emit_kernel("qglobal_pool", kernels.qglobal_pool, xq, self.params(scale), zx=x.zp, zy=zy,
                             keepdims=bool(call.attrs.keepdims))
        return self.bb.emit(R.reshape(y, _shape(call))) if rank == 3 else y

    def avg_pool(self, call: relax.Call, sy: F32, zy: int) -> relax.Expr:
        x = self.activation(call.args[0], "pool input")
        a = call.attrs
        one_d = call.op.name == "relax.nn.avg_pool1d"
        if str(a.layout) != ("NCW" if one_d else "NCHW") or any(int(d) != 1 for d in a.dilation):
            raise _Unsupported("average pool with a layout other than NCHW / NCW or with dilation")
        if one_d:
            xq, kernel, strides = self.as_2d(x), (1, int(a.pool_size[0])), (1, int(a.strides[0]))
            pads, out_hw = (0, int(a.padding[0]), 0, int(a.padding[1])), (1, _shape(call)[2])
        else:
            xq, kernel, strides = x.q, tuple(int(k) for k in a.pool_size), tuple(int(s) for s in a.strides)
            pads, out_hw = tuple(int(p) for p in a.padding), tuple(_shape(call)[2:])
        y = self.emit_kernel("qavg_pool", kernels.qavg_pool, xq, relax.const(dequant_table(x.scale, x.zp)),
                             self.params(sy), kernel=kernel, strides=strides, pads=pads, out_hw=out_hw,
                             count_include_pad=bool(a.count_include_pad), zy=zy)
        return self.bb.emit(R.reshape(y, _shape(call))) if one_d else y

    def max_pool(self, call: relax.Call, sy: F32, zy: int) -> relax.Expr:
        """MaxPool on int8 (dequantization is monotonic, so the max commutes with it), then rescale;
        a 1-D pool runs as a 2-D one with H = 1."""
        x = self.activation(call.args[0], "pool input")
        a = call.attrs
        one_d = call.op.name == "relax.nn.max_pool1d"
        if str(a.layout) != ("NCW" if one_d else "NCHW"):
            raise _Unsupported("max pool with a layout other than NCHW / NCW")
        if one_d:
            xq, kernel, strides = self.as_2d(x), (1, int(a.pool_size[0])), (1, int(a.strides[0]))
            dilation, pads = (1, int(a.dilation[0])), (0, int(a.padding[0]), 0, int(a.padding[1]))
            out_hw = (1, _shape(call)[2])
        else:
            xq, kernel, strides = x.q, tuple(int(k) for k in a.pool_size), tuple(int(s) for s in a.strides)
            dilation, pads = tuple(int(d) for d in a.dilation), tuple(int(p) for p in a.padding)
            out_hw = tuple(_shape(call)[2:])
        y = self.emit_kernel("qmax_pool", kernels.qmax_pool, xq, kernel=kernel, strides=strides, pads=pads,
                             dilation=dilation, out_hw=out_hw)
        if one_d:
            y = self.bb.emit(R.reshape(y, _shape(call)))
        return self.rescale(_DQ(y, x.scale, x.zp), sy, zy)

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
                lo, hi = max(lo, _bound(args[1])), min(hi, _bound(args[2]))
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

    def ort_mean(self, call: relax.Call, x: _DQ) -> relax.Expr:
        """onnxruntime's float ReduceMean of a dequantized map (its summation order), spatial or over time."""
        rank = len(_shape(x.q))
        if rank == 3 and sorted(int(i) % 3 for i in call.attrs.axis) == [2]:
            xq = self.as_2d(x)  # a mean over time of N x C x T: the same rows as a spatial mean
        else:
            self.spatial_axes(call, x.q)
            xq = x.q
        y = self.emit_kernel("ort_mean", spatial_mean, xq, relax.const(dequant_table(x.scale, x.zp)),
                             keepdims=bool(call.attrs.keepdims))
        return self.bb.emit(R.reshape(y, _shape(call))) if rank == 3 else y

    # --- the float boundary -------------------------------------------------------------
    def output(self, v: object) -> relax.Expr:
        if isinstance(v, _Tuple):
            return relax.Tuple([self.output(item) for item in v.items])
        if isinstance(v, _DQ):
            fn = partial(kernels.elementwise, lambda p, q: im.dequantize(q, p[0], v.zp))
            return self.emit_kernel("dequantize", fn, self.params(v.scale), v.q)
        if isinstance(v, _Q):
            return v.expr
        try:
            if isinstance(v, _Float) and v.call.op.name in VIEW_OPS:
                x = self.activation(v.call.args[0], "output view input")
                moved = self.bb.emit(relax.Call(v.call.op, [x.q, *v.call.args[1:]], v.call.attrs))
                return self.output(_DQ(moved, x.scale, x.zp))
            if isinstance(v, _Float) and v.call.op.name == "relax.mean":
                return self.ort_mean(v.call, self.activation(v.call.args[0], "output mean input"))
        except _Unsupported:
            pass  # not a boundary of a dequantized int8 tensor: computed in float
        return self.floating(v)  # a float island ending at the graph output


def rewrite_int8(mod: tvm.IRModule, fixed_point: bool = False, aligned: Sequence[AlignedConv] = ()) -> tvm.IRModule:
    """Lower the fake-quant ``main`` of an imported QDQ graph to integer kernels.

    ``fixed_point`` selects integer-only requantisation (see ``int8_math``). ``aligned`` (norm-align,
    the manifest's ``norm_align.convs``): those convolutions (by position in graph order) take their
    requantisation scale and accumulator offset as extra inputs of ``main`` (after the image, in
    order, named as the manifest says) and give their accumulators' per-channel sum and sum of
    squares as extra outputs (after the taps).

    Raises:
        CompileError: a part of the graph has no integer lowering (after ``check_int8``
            passed this is a compiler bug; the message names the Relax op).
    """
    try:
        out = _Lowering(mod, fixed_point, aligned).run()
    except _Unsupported as exc:
        raise CompileError(f"int8: cannot lower the graph to integer kernels ({exc}); int8_check should have "
                           "reported this with node names — please report it as a compiler bug") from None
    except (ValueError, RuntimeError, TypeError, AttributeError, KeyError) as exc:  # TVM errors while rebuilding
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise CompileError(f"int8: rewriting the graph to integer kernels failed ({type(exc).__name__}: {first}); "
                           "please report the graph as a compiler bug") from None
    return relax.transform.DeadCodeElimination()(out)
