"""Per-op int8 coverage: one small torch module per op / pattern, quantised the way ``export`` quantises
(``quantize_frozen``: pre-processing, onnxruntime QDQ, symmetric per-channel int8 weights), compiled for
the host with ``compile_frozen`` and compared with onnxruntime's integer-kernel session.

``int8`` cases must equal onnxruntime bit for bit and have no float island; ``island`` cases run the
listed ops in float between a dequantise and a quantise (float outputs within 1e-4 relative, int8
outputs equal).
"""
from __future__ import annotations

import ctypes
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper
from torch import nn

from edgetune.compilers import FrozenRunner, compile_frozen
from edgetune.compilers.emit import aligned_empty
from edgetune.errors import CompileError
from edgetune.export.ops import OP_TABLE, SUPPORTED_OPS, float_islands, int8_ops, relax_rules
from edgetune.export.quantize import quantize_frozen
from test_compile_frozen import ort_int8

SAMPLES = 30


class Head(nn.Module):
    """A conv (so the op under test sees a quantised activation) followed by ``fn``."""

    def __init__(self, fn: Callable, cin: int = 3, cout: int = 8, one_d: bool = False) -> None:
        super().__init__()
        self.conv = (nn.Conv1d if one_d else nn.Conv2d)(cin, cout, 3, padding=1)
        self.fn = fn

    def forward(self, x):
        return self.fn(self.conv(x))


class SqueezeExcite(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.down, self.up = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)

    def forward(self, x):
        y = F.hardswish(self.conv(x))
        w = torch.sigmoid(self.up(F.relu(self.down(F.adaptive_avg_pool2d(y, 1)))))
        return y * w


class ActTimesAct(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(12, 6), nn.Linear(12, 6)

    def forward(self, x):
        x = x.flatten(1)
        return self.a(x).t() @ self.b(x)


class Attention(nn.Module):
    """Single-head self-attention over the 25 pixels of a 5x5 map, all int8: q.k (batched MatMul of two
    activations), Softmax over the last axis, then v.attention (the 1/sqrt(d) is in q's weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.q, self.k, self.v = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = F.relu(self.conv(x))
        q, k, v = (m(y).flatten(2) for m in (self.q, self.k, self.v))  # [1, 8, 25]
        attention = torch.softmax(q.transpose(1, 2) @ k, dim=-1)  # [1, 25, 25]
        return v @ attention.transpose(1, 2)


class MeanThenLinear(nn.Module):
    """A classifier head as users export it: ReduceMean over H, W (quantised: it feeds a Gemm), then Linear.
    onnxruntime computes that ReduceMean in float between dequantize and quantize (not
    QLinearGlobalAveragePool's integer sum, which rounds differently near ties)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 64, 3, padding=1), nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).mean((2, 3)))


def _bn() -> nn.Module:
    """BatchNorm after ReLU: export cannot fold it into the conv."""
    torch.manual_seed(3)
    bn = nn.BatchNorm2d(8)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 2)
    bn.bias.data.uniform_(-0.5, 0.5)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), bn)


@dataclass(frozen=True)
class Case:
    module: Callable[[], nn.Module]
    shape: tuple[int, ...]
    islands: tuple[str, ...] = ()  # ONNX ops expected to run in float; () = all int8, bit-exact
    pads: tuple[int, ...] | None = None  # rewrite the first Conv's pads (asymmetric padding)
    family: str = ""  # an int8 kernel family the compiled plan must contain


IMG = (1, 3, 10, 10)
CASES = {
    "conv_valid": Case(lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)), IMG,
                       family="qconv2d"),
    "conv_stride_dilation": Case(lambda: nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=2, dilation=2),
                                                       nn.Conv2d(8, 16, 3, stride=(1, 2))), IMG),
    "conv_asymmetric_pads": Case(lambda: nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU()), IMG,
                                 pads=(0, 1, 1, 0)),
    "conv_groups": Case(lambda: nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, groups=4, padding=1),
                                              nn.Conv2d(8, 8, 3, groups=8)), IMG, family="qconv2d_depthwise"),
    "conv1d": Case(lambda: nn.Sequential(nn.Conv1d(6, 8, 5), nn.ReLU(), nn.Conv1d(8, 8, 3, stride=2, padding=1),
                                         nn.Conv1d(8, 8, 3, groups=8, dilation=2)), (1, 6, 40)),
    "maxpool": Case(lambda: Head(lambda y: F.max_pool2d(y, 3, 2, 1)), IMG, family="qmax_pool"),
    "maxpool_valid_ceil": Case(lambda: Head(lambda y: F.max_pool2d(F.relu(y), 3, 2, ceil_mode=True)), IMG),
    "maxpool1d": Case(lambda: Head(lambda y: F.max_pool1d(y, 2), cin=6, one_d=True), (1, 6, 40)),
    "avgpool_padded": Case(lambda: Head(lambda y: F.avg_pool2d(y, 3, 2, 1)), IMG, family="qavg_pool"),
    "avgpool_exclude_pad": Case(lambda: Head(lambda y: F.avg_pool2d(y, 3, 2, 1, count_include_pad=False)), IMG),
    "avgpool1d": Case(lambda: Head(lambda y: F.avg_pool1d(y, 3, 2, 1), cin=6, one_d=True), (1, 6, 40)),
    "global_avgpool1d": Case(lambda: Head(lambda y: F.adaptive_avg_pool1d(y, 1).flatten(1), cin=6, one_d=True),
                             (1, 6, 40)),
    "reduce_mean_time": Case(lambda: Head(lambda y: F.relu(y).mean(-1), cin=6, one_d=True), (1, 6, 40)),
    "global_avgpool": Case(lambda: Head(lambda y: F.adaptive_avg_pool2d(y, 1)), IMG, family="qglobal_pool"),
    "pad": Case(lambda: Head(lambda y: F.relu(F.pad(y, (1, 2, 0, 1)))), IMG),
    "pad_then_conv": Case(lambda: nn.Sequential(nn.Conv2d(3, 8, 1), nn.ZeroPad2d((0, 1, 0, 1)),
                                                nn.Conv2d(8, 8, 3, stride=2)), IMG),  # Keras 'same', stride 2
    "pad_reflect": Case(lambda: Head(lambda y: F.pad(y, (1, 1, 1, 1), mode="reflect")), IMG, islands=("Pad",)),
    "pad_value": Case(lambda: Head(lambda y: F.pad(y, (2, 0, 1, 1), value=0.37)), IMG),
    "add_residual": Case(lambda: Head(lambda y: y + F.relu(y)), IMG),
    "add_broadcast": Case(lambda: Head(lambda y: y + y.mean((2, 3), keepdim=True)), IMG),
    "add_broadcast_first": Case(lambda: Head(lambda y: y.mean((2, 3), keepdim=True) + F.relu(y)), IMG),
    "add_constant": Case(lambda: Head(lambda y: F.relu(y) + torch.linspace(-1, 1, 8).reshape(8, 1, 1)), IMG),
    "sub": Case(lambda: Head(lambda y: y - y[:, :1]), IMG, islands=("Sub",)),
    "mul": Case(lambda: Head(lambda y: y * F.relu(y)), IMG, family="mul"),
    "mul_constant": Case(lambda: Head(lambda y: F.relu(y) * torch.linspace(0.5, 2, 10)), IMG),
    "concat": Case(lambda: Head(lambda y: torch.cat([y, F.relu(y)], 1)), IMG),
    "relu6": Case(lambda: Head(lambda y: F.relu6(y)), IMG),
    "leaky_relu": Case(lambda: Head(lambda y: F.leaky_relu(y, 0.1)), IMG, family="lut"),
    "hardsigmoid": Case(lambda: Head(lambda y: F.hardsigmoid(y) + y), IMG, family="lut"),
    # torch exports hardswish as x * HardSigmoid(x); onnxruntime quantises the Mul (QLinearMul)
    "hardswish": Case(lambda: Head(lambda y: F.relu(F.hardswish(y))), IMG, family="mul"),
    "sigmoid": Case(lambda: Head(lambda y: torch.sigmoid(y)), IMG, family="lut"),
    "squeeze_excitation": Case(SqueezeExcite, IMG, family="mul"),
    "views": Case(lambda: Head(lambda y: y.reshape(1, 8, 100).transpose(1, 2).unsqueeze(0).squeeze(0).flatten(1)),
                  IMG),
    "slice": Case(lambda: Head(lambda y: F.relu(y[:, 2:6, 1:7:2])), IMG),
    "gemm": Case(lambda: nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.Flatten(), nn.Linear(64, 10)), IMG,
                 family="qmatmul"),
    "matmul_activations": Case(ActTimesAct, (1, 3, 2, 2), islands=("Flatten",)),  # a view of the float input
    "attention": Case(Attention, IMG, family="qsoftmax"),
    "batchnorm_unfolded": Case(_bn, IMG, islands=("BatchNormalization",)),
    "reduce_mean_spatial": Case(lambda: Head(lambda y: y.mean((2, 3))), IMG),
    "reduce_mean_quantized": Case(MeanThenLinear, IMG, family="ort_mean"),
    "reduce_mean_channels": Case(lambda: Head(lambda y: F.relu(y.mean(1, keepdim=True))), IMG,
                                 islands=("ReduceMean", "Relu")),
}


def _export(case: Case, out: Path) -> Path:
    torch.manual_seed(0)
    module = case.module().eval()
    fp32 = out / "float.onnx"
    torch.onnx.export(module, (torch.zeros(case.shape),), str(fp32), input_names=["x"], output_names=["y"],
                      opset_version=17, dynamo=False)
    if case.pads is not None:
        model = onnx.load(str(fp32))
        conv = next(n for n in model.graph.node if n.op_type == "Conv")
        for a in conv.attribute:
            if a.name == "pads":
                a.ints[:] = list(case.pads)
        del model.graph.value_info[:]
        model.graph.output[0].type.tensor_type.ClearField("shape")
        onnx.save(onnx.shape_inference.infer_shapes(model), str(fp32))
    calibration = np.random.default_rng(7).standard_normal((16, *case.shape[1:])).astype(np.float32)
    quantize_frozen(fp32, out / "frozen.onnx", calibration, "random")
    return out / "frozen.onnx"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """case name -> (frozen.onnx, compiled graph), compiled once."""
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            d = tmp_path_factory.mktemp(name)
            path = _export(CASES[name], d)
            cache[name] = (path, compile_frozen(path, "host", d / "host"))
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(CASES))
def test_op_matches_onnxruntime_integer_kernels(name, compiled):
    case = CASES[name]
    path, graph = compiled(name)
    model = onnx.load(str(path))
    assert sorted({i.op for i in float_islands(model)}) == sorted(set(case.islands))
    assert {entry.rsplit(" (", 1)[1].rstrip(")") for entry in graph.islands} == set(case.islands)  # the record
    if case.family:
        assert any(case.family in k.name for k in graph.plan.kernels)
    runner, session = FrozenRunner(graph), ort_int8(path)
    rng = np.random.default_rng(11)
    exact = not case.islands
    for k in range(SAMPLES):
        x = rng.standard_normal(case.shape).astype(np.float32) * (1.0 + k % 3)
        if k == 0:
            x[...] = 0.0  # structured samples: all zero, and saturating values
        elif k == 1:
            x = np.sign(x) * 8.0
        for ours, ref in zip(runner(x), session.run(None, {"x": x})):
            assert ours.shape == ref.shape
            if exact:
                assert np.array_equal(ours, ref), f"sample {k}: {np.count_nonzero(ours != ref)} values differ"
            else:
                assert np.allclose(ours, ref, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(ref).max()))), \
                    f"sample {k}: max difference {np.abs(ours - ref).max()}"


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not installed")
@pytest.mark.parametrize("name", ["squeeze_excitation", "attention", "batchnorm_unfolded"])
def test_c_source_builds_and_matches_onnxruntime(name, tmp_path):
    """The Cortex-M path: the kernels (lookup tables, QLinearMul, batched MatMul, QLinearSoftmax, a float
    island) are TVM's C codegen of their TIR, built warning-free with -ffp-contract=off, and equal
    onnxruntime's int8 session on the host."""
    case = CASES[name]
    path = _export(case, tmp_path)
    graph = compile_frozen(path, "c", tmp_path / "c")
    a = graph.artifacts
    library = tmp_path / "libfrozen.so"
    subprocess.run(["gcc", "-std=c99", "-O2", "-Wall", "-Wextra", "-Werror", "-fPIC", "-ffp-contract=off",
                    f"-I{a['include']}", "-shared", str(a["kernels_c"]), str(a["model_c"]), str(a["workspace_c"]),
                    "-o", str(library), "-lm"], check=True)
    lib, plan = ctypes.CDLL(str(library)), graph.plan
    arena = aligned_empty((plan.arena_bytes,), "uint8", plan.alignment)
    out = aligned_empty(plan.buffer(plan.outputs[0]).shape, "float32", plan.alignment)
    session = ort_int8(path)
    rng = np.random.default_rng(5)
    for _ in range(20):
        x = np.ascontiguousarray(rng.standard_normal(case.shape).astype(np.float32))
        assert lib.frozen_run(ctypes.c_void_p(arena.ctypes.data), ctypes.c_void_p(x.ctypes.data),
                              ctypes.c_void_p(out.ctypes.data)) == 0
        ref = session.run(None, {"x": x})[0]
        assert np.array_equal(out.reshape(ref.shape), ref)


def _qdq_around(nodes: list, last: str, inits: tuple = (), domains: tuple = ()) -> onnx.ModelProto:
    """x -> Q -> DQ ("d") -> ``nodes`` -> ``last`` -> Q -> DQ -> y, all [1, 4, 6]."""
    scalar = [helper.make_tensor("s", TensorProto.FLOAT, [], [0.05]),
              helper.make_tensor("z", TensorProto.INT8, [], [0])]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]), *nodes,
             helper.make_node("QuantizeLinear", [last, "s", "z"], ["q2"]),
             helper.make_node("DequantizeLinear", ["q2", "s", "z"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6])], scalar + list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   *(helper.make_opsetid(d, 1) for d in domains)])


def test_custom_domain_op_is_one_line_naming_the_node(tmp_path):
    """An op TVM cannot import at all is refused before compiling, in one line naming the node."""
    model = _qdq_around([helper.make_node("MyOp", ["d"], ["f"], name="my_custom_node", domain="com.example"),
                         helper.make_node("Unknown2", ["f"], ["g"], name="second_custom", domain="com.example")],
                        "g", domains=("com.example",))
    onnx.save(model, tmp_path / "custom.onnx")
    with pytest.raises(CompileError) as err:
        compile_frozen(tmp_path / "custom.onnx", "host", tmp_path / "out")
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message
    assert "my_custom_node (com.example.MyOp)" in message and "second_custom (com.example.Unknown2)" in message
    assert not (tmp_path / "out").exists()


def test_op_tvm_imports_but_cannot_lower_is_one_line_naming_the_node(tmp_path):
    """CumSum imports (a float island) but has no static kernel: one CompileError line naming the node,
    no TVM traceback."""
    model = _qdq_around([helper.make_node("CumSum", ["d", "axis"], ["f"], name="running_total")], "f",
                        inits=(helper.make_tensor("axis", TensorProto.INT64, [], [2]),))
    onnx.save(model, tmp_path / "cumsum.onnx")
    with pytest.raises(CompileError) as err:
        compile_frozen(tmp_path / "cumsum.onnx", "host", tmp_path / "out")
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message and "running_total (CumSum)" in message


def test_op_table_is_the_one_source_of_the_three_checks():
    """The export check, the int8 check and the rewrite's dispatch all come from the op table, and every
    Relax op a rule names exists; every frozen op is one TVM's ONNX frontend converts."""
    import tvm
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    from edgetune.compilers import int8_check, int8_rewrite

    assert SUPPORTED_OPS["frozen"] == {r.op for r in OP_TABLE.values() if r.frozen}
    assert SUPPORTED_OPS["trainable"] == {r.op for r in OP_TABLE.values() if r.trainable}
    assert int8_check.UNIT_OPS == set(int8_ops())
    assert int8_check.VIEW_OPS == {r.op for r in OP_TABLE.values() if r.int8 == "view"}
    assert int8_rewrite.RELAX_RULES == relax_rules()
    assert {r.int8 for r in OP_TABLE.values() if r.op in int8_ops()} <= set(int8_rewrite.RULE_METHODS)
    assert all(callable(getattr(int8_rewrite._Lowering, m)) for m in int8_rewrite.RULE_METHODS.values())
    for relax_op in relax_rules():
        if not relax_op.startswith("call_tir:"):  # a TIR kernel of the frontend, not a Relax op
            assert tvm.ir.Op.get(relax_op) is not None
    convertible = set(_get_convert_map()) | {"Constant"}
    assert SUPPORTED_OPS["frozen"] <= convertible, SUPPORTED_OPS["frozen"] - convertible


def test_op_table_imports_without_tvm():
    code = "import sys, edgetune.export.ops as o; o.float_islands; assert 'tvm' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
