"""Which ONNX ops each side of the partition may contain (data, checked before anything is compiled).

Both sets are subsets of what TVM's Relax ONNX frontend imports. Shape arithmetic (Shape,
ConstantOfShape, Range) is deliberately absent: export folds it away, so a graph that still has
it had a dynamic shape. The compilers check per target whether an op lowers (int8 rewrite,
gradient); this table is the export-time contract they start from.
"""
from __future__ import annotations

_LAYOUT = ("Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Concat", "Slice", "Gather", "Split",
           "Expand", "Identity", "Constant")
_ELEMENTWISE = ("Add", "Sub", "Mul", "Div", "Sqrt", "Pow", "Erf", "Relu", "Clip", "Sigmoid", "Tanh", "HardSigmoid",
                "HardSwish")

SUPPORTED_OPS: dict[str, frozenset[str]] = {
    # int8 QDQ backbone (conv / matmul kernels) plus float islands (GroupNorm, LayerNorm, softmax).
    "frozen": frozenset(_LAYOUT + _ELEMENTWISE + (
        "QuantizeLinear", "DequantizeLinear", "Conv", "MatMul", "Gemm", "ReduceMean", "GlobalAveragePool",
        "AveragePool", "MaxPool", "InstanceNormalization", "LayerNormalization", "Softmax")),
    # float attachments: forward, loss, and the forward-only statistics updates.
    "trainable": frozenset(_LAYOUT + _ELEMENTWISE + (
        "Conv", "MatMul", "Gemm", "Neg", "Exp", "Log", "Abs", "Max", "Min", "Softmax", "LogSoftmax", "ReduceSum",
        "ReduceMean", "ReduceMax", "GlobalAveragePool", "AveragePool", "LayerNormalization", "Cast", "Where",
        "Equal", "Greater", "Less")),
}
