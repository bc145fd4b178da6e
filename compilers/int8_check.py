"""Which nodes of a QDQ graph the int8 rewrite can lower, decided on the ONNX graph (with names).

A quantised op is a *unit*: its float inputs come from ``DequantizeLinear`` nodes and its
output goes only to ``QuantizeLinear`` nodes (onnxruntime's QDQ node units). ``check_int8``
walks every node once, collects every node that breaks the contract ``int8_rewrite``
implements, and fails with one line naming them all, before anything is lowered.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from edgetune.errors import CompileError

# op type -> ops whose output may also leave the graph as float (the float boundary)
UNIT_OPS = {"Conv", "Gemm", "MatMul", "Add", "Concat", "AveragePool", "GlobalAveragePool", "ReduceMean",
            "Relu", "Clip", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze"}
VIEW_OPS = {"Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze"}
BOUNDARY_OPS = VIEW_OPS | {"ReduceMean"}
SHAPE_INPUTS = {"Reshape": {1}, "Clip": {1, 2}, "ReduceMean": {1}, "Squeeze": {1}, "Unsqueeze": {1}}


@dataclass
class _Graph:
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
        inferred = onnx.shape_inference.infer_shapes(self.model)
        for v in list(inferred.graph.value_info) + list(g.input) + list(g.output):
            self.shapes[v.name] = [d.dim_value for d in v.type.tensor_type.shape.dim]
        self.outputs = {o.name for o in g.output}
        self.inputs = {i.name for i in g.input if i.name not in self.consts}

    def dq(self, tensor: str) -> onnx.NodeProto | None:
        node = self.producer.get(tensor)
        return node if node is not None and node.op_type == "DequantizeLinear" else None


def _name(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


def _attr(node: onnx.NodeProto, key: str, default: object = None) -> object:
    for a in node.attribute:
        if a.name == key:
            return onnx.helper.get_attribute_value(a)
    return default


def _qparams_problem(g: _Graph, node: onnx.NodeProto, what: str) -> str | None:
    """Activations must be int8 with one constant scale and zero point."""
    scale = g.consts.get(node.input[1])
    zp = g.consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if scale is None or (len(node.input) > 2 and node.input[2] and zp is None):
        return f"{what} has non-constant quantisation parameters"
    if scale.size != 1:
        return f"{what} is quantised per channel (activations must be per tensor)"
    if zp is None or zp.dtype != np.int8:
        return f"{what} is not int8 (zero point type {None if zp is None else zp.dtype})"
    return None


def _activation_input(g: _Graph, tensor: str) -> str | None:
    """Problem with a float data input of a unit, or None when it is a dequantized activation."""
    dq = g.dq(tensor)
    if dq is None:
        return f"input {tensor} is float (not produced by DequantizeLinear)"
    if dq.input[0] in g.consts:
        return f"input {tensor} is a constant where an activation is expected"
    return None  # its quantisation parameters are checked on the DequantizeLinear node itself


def _const_input(g: _Graph, tensor: str, dtype: type, what: str, symmetric: bool = True) -> str | None:
    dq = g.dq(tensor)
    if dq is None or dq.input[0] not in g.consts:
        return f"{what} {tensor} is not a quantised constant (DequantizeLinear of an initializer)"
    data = g.consts[dq.input[0]]
    if data.dtype != dtype:
        return f"{what} {tensor} is {data.dtype}, expected {np.dtype(dtype).name}"
    zp = g.consts.get(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else np.zeros(1, dtype)
    if zp is None or (symmetric and np.any(zp != 0)):
        return f"{what} {tensor} has a non-zero zero point (asymmetric weights are not supported)"
    return None


def _unit_problems(g: _Graph, node: onnx.NodeProto) -> list[str]:
    op = node.op_type
    if op not in UNIT_OPS:
        return [f"no int8 lowering for {op}"]
    problems: list[str] = []
    data_inputs = [i for k, i in enumerate(node.input) if i and k not in SHAPE_INPUTS.get(op, set())]
    for k, i in enumerate(node.input):
        if i and k in SHAPE_INPUTS.get(op, set()) and i not in g.consts:
            problems.append(f"input {i} must be a constant")
    if op == "Conv":
        problems += [p for p in (_activation_input(g, node.input[0]),
                                 _const_input(g, node.input[1], np.int8, "weight")) if p]
        if len(node.input) > 2 and node.input[2]:
            problems += [p for p in (_const_input(g, node.input[2], np.int32, "bias"),) if p]
    elif op == "Gemm":
        if _attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0 or _attr(node, "beta", 1.0) != 1.0:
            problems.append("Gemm with transA or alpha/beta != 1")
        problems += [p for p in (_activation_input(g, node.input[0]),
                                 _const_input(g, node.input[1], np.int8, "weight")) if p]
        if len(node.input) > 2 and node.input[2]:
            problems += [p for p in (_const_input(g, node.input[2], np.int32, "bias"),) if p]
    elif op == "MatMul":
        problems += [p for p in (_activation_input(g, node.input[0]),) if p]
        dq = g.dq(node.input[1])
        if dq is not None and dq.input[0] in g.consts:
            problems += [p for p in (_const_input(g, node.input[1], np.int8, "weight"),) if p]
        else:
            problems += [p for p in (_activation_input(g, node.input[1]),) if p]
    else:
        problems += [p for p in (_activation_input(g, i) for i in data_inputs) if p]
    if op == "Add" and not problems:
        problems += _same_shape(g, node)
    if op == "ReduceMean":
        problems += _spatial_axes(g, node)
    if op in ("AveragePool",) and _attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        problems.append("AveragePool with auto_pad")
    return problems


def _same_shape(g: _Graph, node: onnx.NodeProto) -> list[str]:
    a, b = (g.shapes.get(i) for i in node.input[:2])
    if a is not None and b is not None and a != b:
        return [f"broadcasting Add ({a} + {b}); only same-shape (residual) adds are lowered"]
    return []


def _spatial_axes(g: _Graph, node: onnx.NodeProto) -> list[str]:
    attr = _attr(node, "axes")
    axes = list(attr) if isinstance(attr, (list, tuple)) else None
    if axes is None and len(node.input) > 1 and node.input[1] in g.consts:
        axes = g.consts[node.input[1]].tolist()
    if axes is None or sorted(int(a) % 4 for a in axes) != [2, 3]:
        return [f"ReduceMean over axes {axes}; only spatial means (axes 2, 3 of NCHW) are lowered"]
    return []


def _output_problems(g: _Graph, node: onnx.NodeProto) -> list[str]:
    """A unit's output must be re-quantised, except at the float boundary."""
    problems = []
    for o in node.output:
        users = g.consumers.get(o, [])
        floats = [u for u in users if u.op_type != "QuantizeLinear"]
        if floats:
            problems.append(f"output {o} is used in float by {', '.join(_name(u) for u in floats)}")
        if o in g.outputs and node.op_type not in BOUNDARY_OPS:
            problems.append(f"graph output {o} is computed in float (only DequantizeLinear, a view op or a "
                            "spatial ReduceMean may produce a float output)")
        if not users and o not in g.outputs:
            problems.append(f"output {o} is unused")
    return problems


def int8_problems(model: onnx.ModelProto) -> list[str]:
    """Every reason the int8 rewrite cannot lower ``model``, as ``node (op): reason`` strings."""
    g = _Graph(model)
    problems: list[str] = []
    for name in g.inputs:
        floats = [u for u in g.consumers.get(name, []) if u.op_type != "QuantizeLinear"]
        if floats:
            problems.append(f"graph input {name} (input): used in float by {', '.join(_name(u) for u in floats)}")
    for node in model.graph.node:
        op = node.op_type
        if op == "Constant":
            continue
        if op == "QuantizeLinear":
            found = _qparams_problem(g, node, "output")
            src = g.producer.get(node.input[0])
            if src is not None and src.op_type == "QuantizeLinear":
                found = found or "quantizes an int8 tensor"
            reasons = [found] if found else []
        elif op == "DequantizeLinear":
            if node.input[0] in g.consts:
                continue  # a weight or bias: checked by the unit that uses it
            reasons = [p for p in (_qparams_problem(g, node, "input"),) if p]
            src = g.producer.get(node.input[0])
            if src is None and node.input[0] not in g.inputs:
                reasons.append(f"input {node.input[0]} has no producer")
        else:
            reasons = _unit_problems(g, node) + _output_problems(g, node)
        problems += [f"{_name(node)} ({op}): {r}" for r in reasons]
    return problems


def check_int8(model: onnx.ModelProto) -> None:
    """Fail once, naming every node the int8 rewrite cannot lower.

    Raises:
        CompileError: one line listing ``node (op): reason`` for every offending node.
    """
    problems = int8_problems(model)
    if problems:
        raise CompileError(f"int8: {len(problems)} node(s) cannot be lowered to integer kernels: "
                           f"{'; '.join(problems)}; quantise them (onnxruntime QDQ, int8 per-tensor activations, "
                           "symmetric int8 weights) or move them out of the frozen graph")
