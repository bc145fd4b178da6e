"""What the int8 rewrite does with each node of a QDQ graph, decided on the ONNX graph (with names).

A quantised op is a *unit*: its float inputs come from ``DequantizeLinear`` nodes and its
output goes only to ``QuantizeLinear`` nodes (onnxruntime's QDQ node units). Which ops have an
int8 rule, and their preconditions, come from the op table (``edgetune.export.ops``); a node
that is not a unit runs as a float island (``float_islands``). The only hard errors are
quantisation parameters the integer kernels cannot represent; ``check_int8`` reports every one
of them in one line, before anything is lowered.
"""
from __future__ import annotations

import numpy as np
import onnx

from edgetune.errors import CompileError
from edgetune.export.ops import (SHAPE_INPUTS, QdqGraph, boundary_ops, float_islands, int8_ops, int8_precondition,
                                 node_name, view_ops)

# derived from the op table (kept as names other modules and tests read)
UNIT_OPS = set(int8_ops())
VIEW_OPS = set(view_ops())
BOUNDARY_OPS = set(boundary_ops())

__all__ = ["BOUNDARY_OPS", "SHAPE_INPUTS", "UNIT_OPS", "VIEW_OPS", "check_int8", "float_islands", "int8_precondition",
           "int8_problems"]


def _qparams_problem(g: QdqGraph, node: onnx.NodeProto, what: str) -> str | None:
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


def int8_problems(model: onnx.ModelProto) -> list[str]:
    """Every quantisation the integer kernels cannot represent, as ``node (op): reason`` strings.

    Nodes without an int8 rule are not problems: they become float islands.
    """
    g = QdqGraph(model)
    problems: list[str] = []
    for node in model.graph.node:
        op = node.op_type
        if op == "QuantizeLinear":
            found = _qparams_problem(g, node, "output")
            src = g.producer.get(node.input[0])
            if src is not None and src.op_type == "QuantizeLinear":
                found = found or "quantizes an int8 tensor"
            reasons = [found] if found else []
        elif op == "DequantizeLinear":
            if node.input[0] in g.consts:
                continue  # a weight or bias: a float constant of an island if its unit cannot use it
            reasons = [p for p in (_qparams_problem(g, node, "input"),) if p]
            if g.producer.get(node.input[0]) is None and node.input[0] not in g.inputs:
                reasons.append(f"input {node.input[0]} has no producer")
        else:
            continue
        problems += [f"{node_name(node)} ({op}): {r}" for r in reasons]
    return problems


def check_int8(model: onnx.ModelProto) -> None:
    """Fail once, naming every node whose quantisation the integer kernels cannot represent.

    Raises:
        CompileError: one line listing ``node (op): reason`` for every offending node.
    """
    problems = int8_problems(model)
    if problems:
        raise CompileError(f"int8: {len(problems)} node(s) cannot be lowered to integer kernels: "
                           f"{'; '.join(problems)}; quantise them (onnxruntime QDQ, int8 per-tensor activations, "
                           "symmetric int8 weights) or move them out of the frozen graph")
