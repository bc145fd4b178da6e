"""LayerNormalization written out as primitive float ops before quantisation (edgetune.export.decompose)."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgetune.errors import ExportError
from edgetune.export.decompose import decompose_layer_norms


def _layer_norm_graph(shape: tuple[int, ...], axis: int, bias: bool, opset: int, extra_outputs: bool = False
                      ) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    norm_shape = shape[axis:]
    inits = [numpy_helper.from_array(rng.normal(1, 0.2, norm_shape).astype(np.float32), "gamma")]
    inputs = ["x", "gamma"]
    if bias:
        inits.append(numpy_helper.from_array(rng.normal(0, 0.2, norm_shape).astype(np.float32), "beta"))
        inputs.append("beta")
    outputs = ["y", "mean", "inv_std"] if extra_outputs else ["y"]
    node = helper.make_node("LayerNormalization", inputs, outputs, name="ln", axis=axis, epsilon=1e-5)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return session.run(["y"], {"x": x})[0]


@pytest.mark.parametrize("shape,axis,bias,opset", [((1, 16, 32), -1, True, 17), ((2, 5, 24), 2, False, 17),
                                                   ((1, 4, 6, 8), 2, True, 18), ((1, 7, 33), -1, True, 18)])
def test_written_out_layer_norm_computes_the_same_function(shape, axis, bias, opset):
    model = _layer_norm_graph(shape, axis, bias, opset)
    out, names = decompose_layer_norms(model)
    ops = [n.op_type for n in out.graph.node]
    assert "LayerNormalization" not in ops and "Pow" not in ops  # Pow would let onnxruntime fuse it back
    assert ops.count("ReduceMean") == 2 and sorted(names) == sorted(n.name for n in out.graph.node)
    onnx.checker.check_model(out)
    x = np.random.default_rng(1).normal(0.3, 2.0, shape).astype(np.float32)
    np.testing.assert_allclose(_run(out, x), _run(model, x), rtol=1e-5, atol=1e-5)


def test_written_out_layer_norm_is_its_primitive_ops_in_float32():
    """onnxruntime's result of the written-out graph is the float32 arithmetic of its ops, op by op: a
    numpy twin with the same means (the ReduceMean's own order is checked by the compiler's tests)."""
    model = _layer_norm_graph((1, 16, 32), -1, True, 17)
    out, _ = decompose_layer_norms(model)
    x = np.random.default_rng(2).normal(0.0, 1.5, (1, 16, 32)).astype(np.float32)
    gamma, beta = (numpy_helper.to_array(t) for t in model.graph.initializer)
    y = _run(out, x)
    mean = x.mean(axis=-1, keepdims=True, dtype=np.float64).astype(np.float32)
    d = x - mean
    var = (d * d).mean(axis=-1, keepdims=True, dtype=np.float64).astype(np.float32)
    ref = d / np.sqrt(var + np.float32(1e-5)) * gamma + beta
    assert float(np.abs(y - ref).max()) <= 1e-5 * float(np.abs(ref).max())


def test_a_model_without_layer_norm_is_unchanged():
    node = helper.make_node("Relu", ["x"], ["y"], name="r")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    out, names = decompose_layer_norms(model)
    assert names == [] and [n.op_type for n in out.graph.node] == ["Relu"]


def test_statistics_outputs_are_refused_in_one_line():
    with pytest.raises(ExportError) as caught:
        decompose_layer_norms(_layer_norm_graph((1, 16, 32), -1, True, 17, extra_outputs=True))
    message = str(caught.value)
    assert "\n" not in message and "ln" in message and message.startswith("quantize: ")
