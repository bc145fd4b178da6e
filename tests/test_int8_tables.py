"""Exhaustive checks of the int8 lookup tables and of QLinearMul against onnxruntime's int8 session.

The tables (``compilers/int8_tables.py``) are built at compile time from the quantisation parameters;
here every one of the 256 inputs is compared with what onnxruntime computes for DequantizeLinear -> op
-> QuantizeLinear (QLinearSigmoid / QLinearLeakyRelu where it fuses them) over random parameters, and
the compiled Mul kernel over all 65,536 pairs of int8 operands. Differences are counted and printed
(one quantisation step or more); the assertion is that there are none.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from edgetune.compilers import FrozenRunner, compile_frozen
from edgetune.compilers import int8_tables as tables
from edgetune.compilers.int8_rewrite import _const_np, rewrite_int8
from edgetune.compilers.onnx_import import import_onnx

TRIALS = 12
F32 = np.float32


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.qdqisint8allowed", "1")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _qparams(names: str, scales: list[float], zps: list[int]) -> list[onnx.TensorProto]:
    out = []
    for name, s, z in zip(names, scales, zps):
        out += [helper.make_tensor(f"s{name}", TensorProto.FLOAT, [], [s]),
                helper.make_tensor(f"z{name}", TensorProto.INT8, [], [z])]
    return out


def _unary(node: onnx.NodeProto, sx: float, zx: int, sy: float, zy: int) -> onnx.ModelProto:
    """float x -> Q -> DQ -> ``node`` (d -> f) -> Q -> DQ -> y over 256 values."""
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "sx", "zx"], ["d"]), node,
             helper.make_node("QuantizeLinear", ["f", "sy", "zy"], ["qy"]),
             helper.make_node("DequantizeLinear", ["qy", "sy", "zy"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 256])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 256])],
                              _qparams("xy", [sx, sy], [zx, zy]))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


UNARY = {
    "Sigmoid": helper.make_node("Sigmoid", ["d"], ["f"]),
    "HardSigmoid": helper.make_node("HardSigmoid", ["d"], ["f"], alpha=1 / 6, beta=0.5),
    "HardSigmoid_default": helper.make_node("HardSigmoid", ["d"], ["f"]),
    "HardSwish": helper.make_node("HardSwish", ["d"], ["f"]),
    "LeakyRelu": helper.make_node("LeakyRelu", ["d"], ["f"], alpha=0.1),
    "Erf": helper.make_node("Erf", ["d"], ["f"]),  # GELU's core: left in float by the quantiser
}


def _every_int8(scale: float, zp: int) -> np.ndarray:
    """Float inputs whose QuantizeLinear is each int8 value -128..127 once."""
    return tables.dequantized_inputs(scale, zp).reshape(1, 256)


@pytest.mark.parametrize("op", list(UNARY))
def test_lookup_table_equals_onnxruntime_on_every_input(op, tmp_path, capsys):
    """The compiled table (a ``lut`` kernel, no float island) equals onnxruntime on all 256 inputs, for
    random input / output quantisations."""
    rng = np.random.default_rng(1)
    differing = 0
    for trial in range(TRIALS):
        sx, zx = float(rng.uniform(0.004, 0.12)), int(rng.integers(-80, 80))
        sy, zy = float(rng.uniform(1 / 400, 1 / 60)), int(rng.integers(-128, 60))
        model = _unary(UNARY[op], sx, zx, sy, zy)
        x = _every_int8(sx, zx)
        ref = _session(model).run(None, {"x": x})[0]
        mod = rewrite_int8(import_onnx(model))
        kernels = [gv.name_hint for gv in mod.functions.keys()]
        assert any(k.startswith("lut") for k in kernels), kernels
        if trial == 0:  # one full compile per op; the table itself is checked on every trial below
            onnx.save(model, str(tmp_path / "unary.onnx"))
            ours = FrozenRunner(compile_frozen(tmp_path / "unary.onnx", "host", tmp_path / "host"))(x)[0]
            assert np.array_equal(ours, ref)
        table = _table_of(mod)
        q_in = np.arange(-128, 128)
        ours_q = table[q_in + 128].astype(np.int32)
        ref_q = np.clip(np.rint(ref.reshape(-1) / F32(sy)) + zy, -128, 127).astype(np.int32)
        differing += int(np.count_nonzero(ours_q != ref_q))
    with capsys.disabled():
        print(f"\n{op}: {differing} of {TRIALS * 256} table entries differ from onnxruntime")
    assert differing == 0


def _table_of(mod) -> np.ndarray:
    """The int8[256] constant argument of the rewrite's ``lut`` kernel call (the table)."""
    found = []
    for block in mod["main"].body.blocks:
        for binding in block.bindings:
            value = binding.value
            if getattr(value, "args", None) and getattr(value.args[0], "name_hint", "").startswith("lut"):
                found += [c for c in map(_const_np, value.args[1].fields) if c is not None]
    assert len(found) == 1 and found[0].shape == (256,), f"{len(found)} tables"
    return found[0]


def _mul(b: np.ndarray, s: list[float], z: list[int]) -> onnx.ModelProto:
    """x -> Q -> DQ, times DequantizeLinear(int8 constant ``b``) -> Q -> DQ -> y (QLinearMul's constant input)."""
    nodes = [helper.make_node("QuantizeLinear", ["x", "sa", "za"], ["qa"]),
             helper.make_node("DequantizeLinear", ["qa", "sa", "za"], ["da"]),
             helper.make_node("DequantizeLinear", ["b", "sb", "zb"], ["db"]),
             helper.make_node("Mul", ["da", "db"], ["f"]),
             helper.make_node("QuantizeLinear", ["f", "sc", "zc"], ["qc"]),
             helper.make_node("DequantizeLinear", ["qc", "sc", "zc"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 256, 256])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 256, 256])],
                              [*_qparams("abc", s, z), onnx.numpy_helper.from_array(b, "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("broadcast", [False, True])
def test_mul_equals_qlinearmul_on_every_pair_of_int8_operands(broadcast, tmp_path, capsys):
    """All 65,536 (a, b) pairs, b a quantised constant of the same shape or broadcast over rows
    ([1, 256, 1]), for two quantisations each: the compiled Mul equals QLinearMul bit for bit."""
    rng = np.random.default_rng(3)
    differing = 0
    values = np.arange(-128, 128, dtype=np.int8)
    b = values.reshape(1, 256, 1)  # b[0, i] = int8 value i
    if not broadcast:
        b = np.ascontiguousarray(np.broadcast_to(b, (1, 256, 256)))
    for k in range(2):
        s = [float(rng.uniform(0.01, 0.1)), float(rng.uniform(0.01, 0.1)), 0.0]
        z = [int(rng.integers(-40, 40)), 0 if k == 0 else int(rng.integers(-40, 40)), int(rng.integers(-100, 20))]
        s[2] = s[0] * s[1] * float(rng.uniform(40, 160))  # a realistic product range
        model = _mul(b, s, z)
        onnx.save(model, str(tmp_path / f"mul{k}.onnx"))
        graph = compile_frozen(tmp_path / f"mul{k}.onnx", "host", tmp_path / f"host{k}")
        assert any("mul" in c.name for c in graph.plan.kernels) and not graph.islands
        x = np.repeat(_every_int8(s[0], z[0]), 256, axis=0)[None].astype(F32)  # x quantises to a[0, i, j] = j
        ref = _session(model).run(None, {"x": x})[0]
        ours = FrozenRunner(graph)(x)[0]
        differing += int(np.count_nonzero(ours != ref))
    with capsys.disabled():
        print(f"\nMul ({'broadcast' if broadcast else 'same shape'} constant): {differing} of {2 * 65536} "
              "products differ from onnxruntime")
    assert differing == 0
