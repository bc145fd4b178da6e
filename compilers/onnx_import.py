"""ONNX -> Relax import with the checks that must pass before anything is lowered.

Every problem of a graph is collected first (unsupported ops, dynamic or unknown shapes),
then reported once as a ``CompileError`` whose single line names every offending node.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import tvm
from onnx import numpy_helper, shape_inference
from tvm.relax.frontend.onnx import from_onnx

from edgetune.compilers.pipeline import clip_takes
from edgetune.errors import CompileError
from edgetune.export.ops import SHAPE_INPUTS

MIN_OPSET = 13


def read_onnx(path: str | Path) -> onnx.ModelProto:
    """Read an ONNX file (no checks).

    Raises:
        CompileError: the file is missing or not ONNX.
    """
    p = Path(path)
    if not p.is_file():
        raise CompileError(f"onnx: {p} does not exist; export the bundle first (edgetune export)")
    try:
        return onnx.load(str(p))
    except Exception as exc:  # onnx raises DecodeError or protobuf errors; both mean "not ONNX"
        raise CompileError(f"onnx: {p} is not a readable ONNX model ({type(exc).__name__}); re-export it") from None


def _opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 1


def _node_name(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


def _dims(value: onnx.ValueInfoProto) -> list[int | str] | None:
    """Static dims as ints, symbolic or missing ones as strings; None when the rank is unknown."""
    if not value.type.HasField("tensor_type") or not value.type.tensor_type.HasField("shape"):
        return None
    return [int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or "?")
            for d in value.type.tensor_type.shape.dim]


def _dynamic_roots(model: onnx.ModelProto, skip: set[str]) -> list[str]:
    """Where dynamic shapes enter: symbolic graph inputs, and nodes whose outputs are dynamic
    although all their inputs are static (a Shape-driven Reshape, NonZero, ...)."""
    init_names = {i.name for i in model.graph.initializer}
    shapes: dict[str, list[int | str] | None] = {}
    for v in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        shapes.setdefault(v.name, _dims(v))
    for name in init_names:
        shapes[name] = [1]
    for n in model.graph.node:
        if n.op_type == "Constant":
            shapes.setdefault(n.output[0], [1])

    def static(name: str) -> bool:
        dims = shapes.get(name)
        return dims is not None and not any(isinstance(d, str) for d in dims)

    roots = []
    for v in model.graph.input:
        if v.name not in init_names and not static(v.name):
            dims = shapes.get(v.name)
            shown = "unknown rank" if dims is None else "[" + ", ".join(str(d) for d in dims) + "]"
            roots.append(f"{v.name} (graph input): dynamic shape {shown}")
    for n in model.graph.node:
        if n.op_type == "Constant" or _node_name(n) in skip:
            continue
        if all(static(i) for i in n.input if i) and not all(static(o) for o in n.output if o):
            bad = [o for o in n.output if o and not static(o)]
            roots.append(f"{_node_name(n)} ({n.op_type}): produces dynamic shapes ({', '.join(bad)})")
    return roots


def onnx_problems(model: onnx.ModelProto) -> list[str]:
    """Every reason TVM cannot import ``model`` with static shapes, as ``name (op): reason``.

    Shapes are checked after ONNX shape inference and reported where dynamic shapes enter
    (a symbolic input, a Shape-driven Reshape), not on every tensor downstream of them.
    """
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    problems: list[str] = []
    opset = _opset(model)
    if opset < MIN_OPSET:
        problems.append(f"graph (opset): opset {opset} is older than {MIN_OPSET}")
    known = set(_get_convert_map()) | {"Constant"}
    bad = [n for n in model.graph.node if n.op_type not in known or n.domain not in ("", "ai.onnx")]
    problems += [f"{_node_name(n)} ({n.domain + '.' if n.domain else ''}{n.op_type}): no TVM converter for this op"
                 for n in bad]
    try:
        inferred = shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # a failed inference shows up as the unknown shapes it leaves behind
        inferred = model
    return problems + _dynamic_roots(inferred, {_node_name(n) for n in bad})


def check_onnx(model: onnx.ModelProto, where: str = "graph") -> None:
    """Fail once, naming every unsupported node and every source of dynamic shapes.

    Raises:
        CompileError: one line listing ``name (op): reason`` for each problem.
    """
    problems = onnx_problems(model)
    if problems:
        raise CompileError(f"onnx: {where} cannot be compiled: {'; '.join(problems)}; export with static shapes "
                           "(batch 1) and only ops TVM's ONNX frontend converts")


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """``read_onnx`` then ``check_onnx``.

    Raises:
        CompileError: missing or unreadable file, unsupported ops or dynamic shapes.
    """
    model = read_onnx(path)
    check_onnx(model, str(path))
    return model


def fold_constant_operands(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` where a DequantizeLinear of an initializer that feeds an operand the op table
    marks as constant (Pad's value, Clip's bounds, ...) is replaced by its float32 value: the quantiser
    quantises such constants, and TVM's frontend only converts them as plain constants."""
    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    folded: dict[str, onnx.TensorProto] = {}
    for node in model.graph.node:
        for k in SHAPE_INPUTS.get(node.op_type, ()):
            dq = producer.get(node.input[k]) if k < len(node.input) and node.input[k] else None
            if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
                continue
            if any(i and i not in inits for i in dq.input) or dq.output[0] in folded:
                continue
            q, scale = (numpy_helper.to_array(inits[i]) for i in dq.input[:2])
            zp = numpy_helper.to_array(inits[dq.input[2]]) if len(dq.input) > 2 and dq.input[2] else 0
            value = ((q.astype(np.int32) - np.asarray(zp).astype(np.int32)).astype(np.float32) *
                     np.asarray(scale, np.float32)).astype(np.float32)
            folded[dq.output[0]] = numpy_helper.from_array(value.reshape(q.shape), dq.output[0])
    if not folded:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    keep = [n for n in out.graph.node if not (n.op_type == "DequantizeLinear" and n.output[0] in folded)]
    del out.graph.node[:]
    out.graph.node.extend(keep)
    out.graph.initializer.extend(folded.values())
    return out


def mark_reduce_means(model: onnx.ModelProto) -> onnx.ModelProto:
    """ReduceMean axes rewritten as negative numbers (the same axes): TVM imports ReduceMean and
    GlobalAveragePool to the same ``relax.mean``, but onnxruntime's int8 session computes them
    differently (a quantised GlobalAveragePool is QLinearGlobalAveragePool's integer sum, a ReduceMean
    always a float mean between dequantize and quantize). GlobalAveragePool's axes import as
    positive numbers, so the sign tells the int8 rewrite which one it sees."""
    ranks = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # a graph ONNX cannot infer: its ReduceMeans keep their axes (treated as pools)
        return model
    for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        if v.type.tensor_type.HasField("shape"):
            ranks[v.name] = len(v.type.tensor_type.shape.dim)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {i.name: i for i in out.graph.initializer}
    for node in out.graph.node:
        rank = ranks.get(node.input[0]) if node.op_type == "ReduceMean" and node.input else None
        if not rank:
            continue
        for a in node.attribute:
            if a.name == "axes":
                a.ints[:] = [int(x) % rank - rank for x in a.ints]
        if len(node.input) > 1 and node.input[1] in inits:
            axes = numpy_helper.to_array(inits[node.input[1]])
            name = f"{node.input[1]}_negative_{node.output[0]}"
            out.graph.initializer.append(numpy_helper.from_array((axes % rank - rank).astype(np.int64), name))
            node.input[1] = name
    return out


def import_onnx(model: onnx.ModelProto) -> tvm.IRModule:
    """Convert a checked model to a Relax module; initialisers become constants (not inputs).

    Raises:
        CompileError: TVM's converter rejects the graph (the message carries its reason).
    """
    model = mark_reduce_means(fold_constant_operands(model))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # renaming notices for names like "/stages.0/Conv"
            mod = from_onnx(model, keep_params_in_input=False)
    except Exception as exc:  # the frontend raises ValueError, TVMError, OpNotImplemented, AssertionError
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CompileError(f"onnx: TVM's ONNX frontend rejected the graph ({first}); "
                           "simplify the export or report the op") from None
    return clip_takes(mod)  # before any FoldConstant legalises a Gather in TVM's warning "fast" mode

