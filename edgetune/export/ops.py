"""The op table: for every ONNX op edgetune accepts, its export-time sides, int8 rule and kernel family.

One row per ONNX op (the pattern of TVM's Relax ONNX frontend: one converter per op, one map).
Everything else derives from it:

* ``SUPPORTED_OPS`` — the export-time contract per side of the partition (``frozen``,
  ``trainable``), checked by ``edgetune.export.validate`` before anything is compiled;
* ``int8_ops()`` / ``view_ops()`` / ``boundary_ops()`` / ``SHAPE_INPUTS`` — what the compilers'
  int8 check (``compilers/int8_check.py``) treats as a quantised unit;
* ``relax_rules()`` — the Relax op -> int8 rule dispatch of the QDQ rewrite
  (``compilers/int8_rewrite.py``).

An op whose rule is ``ISLAND`` (or whose int8 rule's preconditions fail on a given node) runs in
float between a dequantise and a quantise: a *float island*. ``float_islands`` lists them for a
QDQ graph with their bytes and MACs, from the ONNX graph alone (no TVM import): this module is
imported by ``edgetune`` code that must not pull in TVM.

Shape arithmetic (Shape, ConstantOfShape, Range) is deliberately absent: export folds it away,
so a graph that still has it had a dynamic shape.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

ISLAND = "island"  # computed in float between dequantize and quantize
QDQ = "qdq"  # QuantizeLinear / DequantizeLinear themselves
FLOAT_ONLY = "float-only"  # only on the trainable side


@dataclass(frozen=True)
class OpRule:
    """One ONNX op: which sides may hold it, how the int8 rewrite lowers it, which kernel runs it.

    ``int8``: the rewrite rule (``conv``, ``matmul``, ``add``, ``mul``, ``lut``, ``softmax``, ``concat``,
    ``avg_pool``, ``global_pool``, ``max_pool``, ``mean``, ``clip``, ``view``, ``pad``), ``island``,
    ``qdq`` or ``float-only``. ``family``: the kernel that runs it (``lookup table (int8)``: a
    256-entry table built at compile time, see ``compilers/int8_tables.py``).
    ``relax``: the Relax ops TVM's frontend emits for it that the rule lowers.
    ``shape_inputs``: input positions that must be constants (shapes, axes, bounds).
    A ``call_tir:<kernel>`` entry in ``relax`` names a TIR kernel the frontend emits (topi's pad).
    ``boundary``: may turn an int8 tensor into a float graph output without a float kernel.
    """

    op: str
    frozen: bool
    trainable: bool
    int8: str
    family: str
    relax: tuple[str, ...] = ()
    shape_inputs: frozenset[int] = frozenset()
    boundary: bool = False


def _r(op: str, int8: str, family: str, relax: tuple[str, ...] = (), *, frozen: bool = True, trainable: bool = True,
       shape_inputs: tuple[int, ...] = (), boundary: bool = False) -> OpRule:
    return OpRule(op, frozen, trainable, int8, family, relax, frozenset(shape_inputs), boundary)


_VIEW = "data movement (int8)"
_FLOAT = "float island"
_LUT = "lookup table (int8)"
OP_TABLE: dict[str, OpRule] = {r.op: r for r in (
    _r("QuantizeLinear", QDQ, "elementwise", ("relax.quantize",), trainable=False),
    _r("DequantizeLinear", QDQ, "elementwise", ("relax.dequantize",), trainable=False),
    _r("Conv", "conv", "qconv2d", ("relax.nn.conv2d", "relax.nn.conv1d")),
    _r("Gemm", "matmul", "qmatmul", ("relax.matmul",)),
    _r("MatMul", "matmul", "qmatmul", ("relax.matmul",)),
    _r("Add", "add", "elementwise", ("relax.add",)),
    _r("Mul", "mul", "elementwise", ("relax.multiply",)),
    _r("Softmax", "softmax", "qsoftmax (exp table, float32 row sum)", ("relax.nn.softmax",)),
    # 256-entry int8 tables built at compile time (QLinearSigmoid / QLinearLeakyRelu, or DQ -> op -> Q);
    # HardSigmoid and HardSwish import as clip / add / multiply chains, tabulated when those rules fail
    _r("Sigmoid", "lut", _LUT, ("relax.sigmoid",)),
    _r("HardSigmoid", "lut", _LUT),
    _r("HardSwish", "lut", _LUT),
    _r("LeakyRelu", "lut", _LUT, ("relax.nn.leakyrelu",), trainable=False),
    # onnxruntime leaves Erf in float; GELU's DQ -> Div -> Erf -> Q is one table (MLAS' erf reproduced)
    _r("Erf", "lut", _LUT, ("relax.erf",)),
    _r("Concat", "concat", _VIEW, ("relax.concat",)),
    _r("AveragePool", "avg_pool", "qavg_pool", ("relax.nn.avg_pool2d", "relax.nn.avg_pool1d")),
    _r("GlobalAveragePool", "global_pool", "qglobal_pool", ("relax.mean",)),
    # onnxruntime has no integer ReduceMean: a float mean in its summation order, then QuantizeLinear
    _r("ReduceMean", "mean", "ort_mean", ("relax.mean",), shape_inputs=(1,), boundary=True),
    _r("MaxPool", "max_pool", "qmax_pool", ("relax.nn.max_pool2d", "relax.nn.max_pool1d"), trainable=False),
    _r("Relu", "clip", "elementwise", ("relax.nn.relu",)),
    _r("Clip", "clip", "elementwise", ("relax.clip", "relax.maximum", "relax.minimum", "call_tir:maximum",
                                       "call_tir:minimum"), shape_inputs=(1, 2)),
    _r("Pad", "pad", _VIEW, ("call_tir:pad",), trainable=False, shape_inputs=(1, 2, 3)),
    _r("Reshape", "view", _VIEW, ("relax.reshape",), shape_inputs=(1,), boundary=True),
    _r("Flatten", "view", _VIEW, ("relax.flatten",), boundary=True),
    _r("Transpose", "view", _VIEW, ("relax.permute_dims",), boundary=True),
    _r("Squeeze", "view", _VIEW, ("relax.squeeze",), shape_inputs=(1,), boundary=True),
    _r("Unsqueeze", "view", _VIEW, ("relax.expand_dims",), shape_inputs=(1,), boundary=True),
    _r("Slice", "view", _VIEW, ("relax.strided_slice",), shape_inputs=(1, 2, 3, 4), boundary=True),
    # no int8 rule: float islands on the frozen side (onnxruntime runs most of them in float too)
    *(_r(op, ISLAND, _FLOAT) for op in (
        "Sub", "Div", "Sqrt", "Pow", "Tanh",
        "LayerNormalization", "Gather", "Split", "Expand", "Identity", "Constant", "Neg", "Exp", "Abs", "Max", "Min",
        "ReduceMax")),
    *(_r(op, ISLAND, _FLOAT, trainable=False) for op in (
        "InstanceNormalization", "Resize", "Elu", "Softplus", "Gelu")),
    # an unfolded BatchNormalization: one float32 per-channel affine x * s + b, fused with its dequantize
    _r("BatchNormalization", ISLAND, "per-channel affine (float)", ("relax.nn.batch_norm",), trainable=False),
    *(_r(op, FLOAT_ONLY, "float", frozen=False) for op in (
        "Log", "LogSoftmax", "ReduceSum", "Cast", "Where", "Equal", "Greater", "Less",
        "Round")),  # Round: norm-align's step folds its integer accumulator offset (round half to even)
)}

SUPPORTED_OPS: dict[str, frozenset[str]] = {
    "frozen": frozenset(r.op for r in OP_TABLE.values() if r.frozen),
    "trainable": frozenset(r.op for r in OP_TABLE.values() if r.trainable),
}
SHAPE_INPUTS: dict[str, frozenset[int]] = {r.op: r.shape_inputs for r in OP_TABLE.values() if r.shape_inputs}


def int8_ops() -> frozenset[str]:
    """ONNX ops with an int8 rule (quantised units of the int8 check)."""
    return frozenset(r.op for r in OP_TABLE.values() if r.int8 not in (ISLAND, QDQ, FLOAT_ONLY))


def view_ops() -> frozenset[str]:
    return frozenset(r.op for r in OP_TABLE.values() if r.int8 == "view")


def boundary_ops() -> frozenset[str]:
    return frozenset(r.op for r in OP_TABLE.values() if r.boundary)


def relax_rules() -> dict[str, str]:
    """Relax op name -> int8 rule (the rewrite's dispatch)."""
    return {relax: r.int8 for r in OP_TABLE.values() if r.int8 not in (ISLAND, QDQ, FLOAT_ONLY) for relax in r.relax}


# --- the ONNX-level view of a QDQ graph (shared with the compilers' int8 check) -----------------

@dataclass
class QdqGraph:
    """Constants, producers, consumers and inferred shapes of a QDQ graph."""

    model: onnx.ModelProto
    consts: dict[str, np.ndarray] = field(default_factory=dict)
    producer: dict[str, onnx.NodeProto] = field(default_factory=dict)
    consumers: dict[str, list[onnx.NodeProto]] = field(default_factory=dict)
    shapes: dict[str, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        g = self.model.graph
        self.consts = {i.name: numpy_helper.to_array(i) for i in g.initializer}
        for n in g.node:
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
                self.consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
            for o in n.output:
                self.producer[o] = n
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        try:
            inferred = onnx.shape_inference.infer_shapes(self.model)
        except Exception:  # a graph ONNX cannot infer keeps the shapes it declares
            inferred = self.model
        for v in list(inferred.graph.value_info) + list(g.input) + list(g.output):
            self.shapes[v.name] = [d.dim_value for d in v.type.tensor_type.shape.dim]
        self.outputs = {o.name for o in g.output}
        self.inputs = {i.name for i in g.input if i.name not in self.consts}

    def dq(self, tensor: str) -> onnx.NodeProto | None:
        node = self.producer.get(tensor)
        return node if node is not None and node.op_type == "DequantizeLinear" else None

    def elements(self, tensor: str) -> int:
        if tensor in self.consts:
            return int(self.consts[tensor].size)
        return int(np.prod(self.shapes.get(tensor) or [0]))


def node_name(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


def attr(node: onnx.NodeProto, key: str, default: object = None) -> object:
    for a in node.attribute:
        if a.name == key:
            return onnx.helper.get_attribute_value(a)
    return default


def _activation_input(g: QdqGraph, tensor: str) -> str | None:
    dq = g.dq(tensor)
    if dq is None:
        return f"input {tensor} is float (not produced by DequantizeLinear)"
    if dq.input[0] in g.consts:
        return f"input {tensor} is a constant where an activation is expected"
    return None


def _const_input(g: QdqGraph, tensor: str, dtype: type, what: str) -> str | None:
    dq = g.dq(tensor)
    if dq is None or dq.input[0] not in g.consts:
        return f"{what} {tensor} is not a quantised constant"
    data = g.consts[dq.input[0]]
    if data.dtype != dtype:
        return f"{what} {tensor} is {data.dtype}, not {np.dtype(dtype).name}"
    zp = g.consts.get(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else np.zeros(1, dtype)
    if zp is None or np.any(zp != 0):
        return f"{what} {tensor} has a non-zero zero point (asymmetric weights)"
    return None


# float ops with a scalar constant operand that a lookup table absorbs (its input is then "DQ -> op")
_TABLE_PREFIX_OPS = ("Div", "Mul", "Add", "Sub", "Neg")


def _scalar_const(g: QdqGraph, tensor: str) -> bool:
    value = g.consts.get(tensor)
    if value is None and _quantised_const(g, tensor):
        value = g.consts[g.dq(tensor).input[0]]
    return value is not None and value.size == 1


def _table_prefix(g: QdqGraph, tensor: str) -> onnx.NodeProto | None:
    """The float op producing ``tensor`` when a lookup table can absorb it: an elementwise op of one
    dequantized activation and scalar constants (GELU's ``x / sqrt(2)`` before Erf)."""
    node = g.producer.get(tensor)
    if node is None or node.op_type not in _TABLE_PREFIX_OPS:
        return None
    variable = [i for i in node.input if i and not _scalar_const(g, i)]
    return node if len(variable) == 1 and _activation_input(g, variable[0]) is None else None


def _absorbed_by_table(g: QdqGraph, node: onnx.NodeProto) -> bool:
    """``node`` is computed inside the lookup tables of all its consumers, not as a float island."""
    users = [u for o in node.output for u in g.consumers.get(o, [])]
    return (bool(users) and all(_table_prefix(g, o) is node for o in node.output)
            and all(OP_TABLE.get(u.op_type) is not None and OP_TABLE[u.op_type].int8 == "lut"
                    and not int8_precondition(g, u) for u in users))


def _quantised_const(g: QdqGraph, tensor: str) -> bool:
    """A DequantizeLinear of initializers (the compiler folds it into a float constant)."""
    dq = g.dq(tensor)
    return dq is not None and all(not i or i in g.consts for i in dq.input)


def _per_tensor_const(g: QdqGraph, tensor: str) -> bool:
    dq = g.dq(tensor)
    if dq is None or dq.input[0] not in g.consts or g.consts[dq.input[0]].dtype != np.int8:
        return False
    return all(len(dq.input) > k and dq.input[k] in g.consts and g.consts[dq.input[k]].size == 1 for k in (1, 2))


def _spatial_mean(g: QdqGraph, node: onnx.NodeProto) -> str | None:
    value = attr(node, "axes")
    axes = list(value) if isinstance(value, (list, tuple)) else None
    if axes is None and len(node.input) > 1 and node.input[1] in g.consts:
        axes = g.consts[node.input[1]].tolist()
    rank = len(g.shapes.get(node.input[0]) or [])
    spatial = {4: [2, 3], 3: [2]}.get(rank)
    if axes is None or spatial is None or sorted(int(a) % rank for a in axes) != spatial:
        return f"mean over axes {axes} (int8 only for spatial means of NCHW / NCT maps)"
    return None


def int8_precondition(g: QdqGraph, node: onnx.NodeProto) -> list[str]:
    """Why ``node`` (an op with an int8 rule) cannot run as an int8 unit, or [] when it can."""
    op = node.op_type
    rule = OP_TABLE.get(op)
    if rule is None or rule.int8 in (ISLAND, QDQ, FLOAT_ONLY):
        return ["no int8 rule"]
    shape_in = rule.shape_inputs
    problems = [f"input {i} must be a constant" for k, i in enumerate(node.input)
                if i and k in shape_in and i not in g.consts and not _quantised_const(g, i)]
    if op in ("Conv", "Gemm"):
        problems += [p for p in (_activation_input(g, node.input[0]),
                                 _const_input(g, node.input[1], np.int8, "weight")) if p]
        if len(node.input) > 2 and node.input[2]:
            problems += [p for p in (_const_input(g, node.input[2], np.int32, "bias"),) if p]
        if op == "Gemm" and (attr(node, "transA", 0) or attr(node, "alpha", 1.0) != 1.0
                             or attr(node, "beta", 1.0) != 1.0):
            problems.append("Gemm with transA or alpha/beta != 1")
        if op == "Conv" and len(g.shapes.get(node.input[0]) or []) not in (0, 3, 4):
            problems.append("Conv that is neither 1-D nor 2-D")
    elif op == "MatMul":
        dq = g.dq(node.input[1])
        second = (_const_input(g, node.input[1], np.int8, "weight") if dq is not None and dq.input[0] in g.consts
                  else _activation_input(g, node.input[1]))
        problems += [p for p in (_activation_input(g, node.input[0]), second) if p]
        a_shape, b_shape = g.shapes.get(node.input[0]) or [0, 0], g.shapes.get(node.input[1]) or [0, 0]
        batched = dq is not None and dq.input[0] not in g.consts and len(a_shape) == len(b_shape) > 2
        if batched and a_shape[:-2] != b_shape[:-2]:
            problems.append("batched MatMul with broadcast batch dimensions")
        elif len(a_shape) != 2 and not batched:
            problems.append("MatMul of a tensor that is not 2-D (int8 only for 2-D or batched activation x activation)")
    elif op in ("Add", "Mul"):  # an operand may be a per-tensor quantised constant (QLinearAdd / QLinearMul)
        problems += [p for p in (_activation_input(g, i) for i in node.input if not _per_tensor_const(g, i)) if p]
    elif rule.int8 == "lut":  # the table may start with a scalar-constant float op (see _table_prefix)
        problems += [p for p in (_activation_input(g, i) for i in node.input
                                 if i and _table_prefix(g, i) is None) if p]
    else:
        problems += [p for p in (_activation_input(g, i) for k, i in enumerate(node.input)
                                 if i and k not in shape_in) if p]
    if op == "ReduceMean":
        problems += [p for p in (_spatial_mean(g, node),) if p]
    if op == "Softmax":
        opset = max((o.version for o in g.model.opset_import if o.domain in ("", "ai.onnx")), default=0)
        rank = len(g.shapes.get(node.input[0]) or [])
        axis = attr(node, "axis", -1 if opset >= 13 else 1)
        if opset < 13 or rank == 0 or int(axis) % rank != rank - 1:  # type: ignore[call-overload]
            problems.append("Softmax that is not over the last axis (opset 13+)")
    if op == "Pad" and attr(node, "mode", b"constant") not in (b"constant", "constant"):
        problems.append("Pad that is not a constant pad (int8 only for constant padding)")
    if op == "Pad" and len(node.input) > 1 and node.input[1] in g.consts and np.any(g.consts[node.input[1]] < 0):
        problems.append("Pad with negative pads (a crop)")
    if op in ("AveragePool", "MaxPool") and attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        problems.append(f"{op} with auto_pad")
    for o in node.output:
        users = g.consumers.get(o, [])
        floats = [u for u in users if u.op_type != "QuantizeLinear"]
        if floats:
            problems.append(f"output {o} is used in float by {', '.join(node_name(u) for u in floats)}")
        if o in g.outputs and not rule.boundary:
            problems.append(f"graph output {o} is float")
    return problems


# --- float islands --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Island:
    """A node of a QDQ graph that runs in float: its name, op, why, float bytes it touches, MACs."""

    node: str
    op: str
    reason: str
    weight_bytes: int
    activation_bytes: int
    macs: int

    @property
    def bytes(self) -> int:
        return self.weight_bytes + self.activation_bytes


def _macs(g: QdqGraph, node: onnx.NodeProto) -> int:
    op = node.op_type
    out = g.elements(node.output[0]) if node.output else 0
    if op == "Conv" and len(node.input) > 1:
        w = g.shapes.get(node.input[1]) or list(getattr(g.consts.get(node.input[1]), "shape", []))
        return out * int(np.prod(w[1:])) if w else out
    if op in ("Gemm", "MatMul") and len(node.input) > 1:
        a = g.shapes.get(node.input[0]) or []
        return out * (int(a[-1]) if a else 1)
    return out


def float_islands(model: onnx.ModelProto) -> list[Island]:
    """Every node of a QDQ graph that the int8 rewrite computes in float, with its cost.

    A node is an island when its op has no int8 rule, or the rule's preconditions fail (a float
    input, a float consumer, an asymmetric weight, ...). Weight bytes count the float constants
    it reads (dequantized weights become float32); activation bytes its float inputs and outputs.
    """
    g = QdqGraph(model)
    islands = []
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear", "Constant") or node.domain not in ("", "ai.onnx"):
            continue
        problems = int8_precondition(g, node)
        if not problems or _absorbed_by_table(g, node):
            continue
        weights = acts = 0
        for i in node.input:
            if not i:
                continue
            dq = g.dq(i)
            if i in g.consts or (dq is not None and dq.input[0] in g.consts):
                weights += 4 * g.elements(dq.input[0] if dq is not None else i)
            else:
                acts += 4 * g.elements(i)
        acts += sum(4 * g.elements(o) for o in node.output if o)
        islands.append(Island(node_name(node), node.op_type, "; ".join(problems), weights, acts, _macs(g, node)))
    return islands
