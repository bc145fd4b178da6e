"""Float ops rewritten as the primitive ops they compute, before quantisation.

A LayerNormalization stays a float island of the int8 graph (its statistics need float), and
onnxruntime computes it with a fused kernel whose summation and rounding order is its own: a compiled
island cannot reproduce it bit for bit, and one last-bit difference can move a later int8 tensor by a
quantisation step. Written out as ReduceMean / Sub / Mul / ReduceMean / Add / Sqrt / Div / Mul / Add,
each op has a defined float32 result: the element-wise ones are single IEEE operations and the means
are onnxruntime's ReduceMean, whose order the compiler reproduces (``compilers/boundary.py``). Both
the int8 reference session and the compiled graph then compute the same numbers. The square is a
``Mul`` of the difference with itself (not ``Pow``), which keeps onnxruntime's graph optimiser from
fusing the pattern back into its LayerNormalization kernel.

The rewritten nodes are excluded from quantisation: the island runs between the dequantise of its
input and the quantise of its output, as the fused op did.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgetune.errors import ExportError


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _rank(model: onnx.ModelProto, name: str) -> int | None:
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        if vi.name == name and vi.type.tensor_type.HasField("shape"):
            return len(vi.type.tensor_type.shape.dim)
    return None


def _mean(src: str, dst: str, name: str, axes: list[int], axes_input: str | None) -> onnx.NodeProto:
    """ReduceMean over ``axes`` keeping them: an attribute before opset 18, the input ``axes_input`` since."""
    if axes_input is not None:
        return helper.make_node("ReduceMean", [src, axes_input], [dst], name=name, keepdims=1)
    return helper.make_node("ReduceMean", [src], [dst], name=name, axes=axes, keepdims=1)


def decompose_layer_norms(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` with every LayerNormalization written out as primitive float ops (see the
    module docstring), and the names of the nodes that replace them (to keep out of quantisation).

    Raises:
        ExportError: a LayerNormalization whose rank is unknown, or whose mean / inverse-deviation
            outputs are used (only the normalised output has a primitive form here).
    """
    model = onnx.shape_inference.infer_shapes(model)
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    nodes: list[onnx.NodeProto] = []
    names: list[str] = []
    for node in graph.node:
        if node.op_type != "LayerNormalization" or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        label = node.name or node.output[0]
        if any(o for o in node.output[1:]):
            raise ExportError(f"quantize: LayerNormalization {label} exposes its mean or inverse deviation; "
                              "use only its normalised output (export the model without them)")
        rank = _rank(model, node.input[0])
        if rank is None:
            raise ExportError(f"quantize: the rank of LayerNormalization {label}'s input is unknown; "
                              "export the model with static shapes")
        axis = int(_attr(node, "axis", -1)) % rank
        axes = list(range(axis - rank, 0))  # negative: ReduceMean over the trailing axes
        eps = np.float32(_attr(node, "epsilon", 1e-5))
        x, scale = node.input[0], node.input[1]
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        stem = f"{label}/decomposed"
        t = {k: f"{stem}/{k}" for k in ("mean", "diff", "square", "var", "var_eps", "std", "norm", "scaled")}
        eps_name = f"{stem}/epsilon"
        graph.initializer.append(numpy_helper.from_array(np.array(eps, dtype=np.float32), eps_name))
        out = node.output[0]
        axes_input = None
        if opset >= 18:  # ReduceMean's axes became an input in opset 18
            axes_input = f"{stem}/axes"
            graph.initializer.append(numpy_helper.from_array(np.array(axes, dtype=np.int64), axes_input))
        new = [
            _mean(x, t["mean"], f"{stem}/ReduceMean", axes, axes_input),
            helper.make_node("Sub", [x, t["mean"]], [t["diff"]], name=f"{stem}/Sub"),
            helper.make_node("Mul", [t["diff"], t["diff"]], [t["square"]], name=f"{stem}/Square"),
            _mean(t["square"], t["var"], f"{stem}/Variance", axes, axes_input),
            helper.make_node("Add", [t["var"], eps_name], [t["var_eps"]], name=f"{stem}/AddEpsilon"),
            helper.make_node("Sqrt", [t["var_eps"]], [t["std"]], name=f"{stem}/Sqrt"),
            helper.make_node("Div", [t["diff"], t["std"]], [t["norm"]], name=f"{stem}/Div"),
            helper.make_node("Mul", [t["norm"], scale], [t["scaled"] if bias else out], name=f"{stem}/Scale"),
        ]
        if bias:
            new.append(helper.make_node("Add", [t["scaled"], bias], [out], name=f"{stem}/Bias"))
        nodes += new
        names += [n.name for n in new]
    if not names:
        return model, []
    del graph.node[:]
    graph.node.extend(nodes)
    return model, names
