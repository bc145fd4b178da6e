"""Fold the shape arithmetic the torch exporter leaves in a graph, never its parameters.

``torch.onnx.export`` with constant folding on would also fold trainable parameters (a chunked
weight becomes a new anonymous initialiser), so trainable.onnx is exported with folding off and
this pass evaluates only nodes whose inputs are Constant nodes or the ``Shape`` of a tensor
whose shape is static. Initialisers (parameters, buffers) are never treated as constants.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

OPSET = 17


def _static_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    g = inferred.graph
    shapes = {}
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        t = vi.type.tensor_type
        if t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim):
            shapes[vi.name] = [d.dim_value for d in t.shape.dim]
    # A parameter's shape is fixed even though its value is not (``weight.chunk(3)`` asks for it).
    shapes.update({t.name: list(t.dims) for t in g.initializer})
    return shapes


def _evaluate(node: onnx.NodeProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
              for n, v in feeds.items()]
    outputs = [helper.make_tensor_value_info(n, onnx.TensorProto.UNDEFINED, None) for n in node.output]
    graph = helper.make_graph([node], "fold", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    return [np.asarray(v) for v in ReferenceEvaluator(model).run(None, feeds)]


def _shape_of(node: onnx.NodeProto, shape: list[int]) -> np.ndarray:
    attrs = {a.name: a.i for a in node.attribute}
    start, end = attrs.get("start", 0), attrs.get("end", len(shape))
    return np.array(shape[start:end], dtype=np.int64)


def fold_shape_arithmetic(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with constant subgraphs (Shape of static tensors and what follows) replaced
    by Constant nodes, and nodes and initialisers nobody reads removed."""
    shapes = _static_shapes(model)
    known: dict[str, np.ndarray] = {}
    nodes: list[onnx.NodeProto] = []
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        if node.op_type == "Constant":
            known[node.output[0]] = _evaluate(node, {})[0]
            nodes.append(node)
            continue
        if node.op_type == "Shape" and node.input[0] in shapes:
            values = [_shape_of(node, shapes[node.input[0]])]
        elif node.input and all(i in known for i in node.input if i):
            values = _evaluate(node, {i: known[i] for i in node.input if i})
        else:
            nodes.append(node)
            continue
        for name, value in zip(node.output, values):
            known[name] = value
            nodes.append(helper.make_node("Constant", [], [name], name=f"{node.name or node.op_type}_folded",
                                          value=numpy_helper.from_array(value, name)))
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(_live(nodes, {o.name for o in model.graph.output}))
    used = {i for n in out.graph.node for i in n.input} | {o.name for o in out.graph.output}
    kept = [t for t in out.graph.initializer if t.name in used]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    return out


def _live(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    needed = set(outputs)
    kept = []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    return kept[::-1]
