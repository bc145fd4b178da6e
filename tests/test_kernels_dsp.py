"""Cortex-M kernels (issue 15): the DSP micro-kernels give the portable build's outputs, bit for bit, and
the kernels' speed does not depend on the -O level the project builds them with.

Measured, not assumed: the generated C kernels of mcunet-s built into the same profiling firmware as
``benchmarks/bench_kernels.py`` uses, every kernel call timed in ``qemu-system-arm -icount shift=0``,
the levels compared within one run.
"""
from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edgetune.compilers.emit_c import KERNELS_PROLOGUE
from conftest import needs_tool

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_kernels.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_kernels", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def mcunet_frozen(tmp_path_factory):
    bench = _bench()
    work = tmp_path_factory.mktemp("kernels-mcunet")
    frozen, image = bench.frozen_model("mcunet-s", work)
    return bench, frozen, image, work


def test_benchmark_reference_chain_is_onnxruntime(mcunet_frozen):
    """The int8 activations the benchmark feeds CMSIS-NN (and compares it with) are onnxruntime's:
    its last one, dequantised and averaged, is the graph's output."""
    bench, frozen, image, _ = mcunet_frozen
    layers = bench.read_layers(frozen, image)
    assert [lr.kind for lr in layers].count("add") == 5 and layers[0].kind == "stem"
    assert {lr.kind for lr in layers} == {"stem", "pointwise", "depthwise", "add"}
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdqisint8allowed", "1")
    session = ort.InferenceSession(str(frozen), options, providers=["CPUExecutionProvider"])
    (want,) = session.run(None, {"x": image})
    import onnx
    from onnx import numpy_helper
    model = onnx.load(str(frozen))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    mean = next(n for n in model.graph.node if n.op_type == "ReduceMean")
    dq = next(n for n in model.graph.node if n.output[0] == mean.input[0])
    s, z = float(inits[dq.input[1]]), int(inits[dq.input[2]])
    last = layers[-1].y.astype(np.float32)
    got = ((last - z) * np.float32(s)).mean(axis=(1, 2))
    np.testing.assert_allclose(got, want[0], rtol=1e-5, atol=1e-6)


@needs_tool("arm-none-eabi-gcc", "qemu-system-arm", "gcc")
@pytest.mark.parametrize("target,feature", [("cortex-m4", "__ARM_FEATURE_DSP 1"), ("cortex-m55", "__ARM_FEATURE_MVE")])
def test_dsp_build_equals_the_portable_build_per_sample(mcunet_frozen, tmp_path, target, feature):
    """Cortex-M4 firmware (SMLAD micro-kernels) and Cortex-M55 firmware (Helium micro-kernels, QEMU mps3-an547)
    = the same C source built for this host (their plain C loops) = onnxruntime, on each of three test images."""
    import ctypes
    import subprocess

    from edgetune.compilers.emit import aligned_empty
    from edgetune.compilers.plan import StaticPlan
    from edgetune.data import load_dataset, to_tensor

    bench, frozen, _, work = mcunet_frozen
    images = to_tensor(load_dataset("digits").test_x[10:13]).numpy()
    firmware = [np.array(bench.measure_edgetune(frozen, images[i:i + 1], "-O2", 1, work / "dsp", target)["output"],
                         np.float32) for i in range(len(images))]
    compiled = work / "dsp" / "compiled"
    kernels = (compiled / "frozen_kernels.c").read_text()
    assert kernels.count("et_dsp_pointwise_s8(") >= 17  # mcunet-s's pointwise convs take the DSP path
    from edgetune.targets import get_target
    defines = subprocess.run(["arm-none-eabi-gcc", *get_target(target).toolchain.arch_flags, "-dM", "-E", "-x", "c",
                              "/dev/null"], capture_output=True, text=True, check=True).stdout
    assert feature in defines  # the header's SIMD path is the one this firmware ran
    library = tmp_path / "frozen_host.so"
    subprocess.run(["gcc", "-std=c99", "-O2", "-ffp-contract=off", "-fPIC", "-shared", f"-I{compiled / 'include'}",
                    *(str(compiled / f) for f in ("frozen_kernels.c", "frozen_model.c", "tvm_workspace.c")),
                    "-o", str(library), "-lm"], check=True)
    lib = ctypes.CDLL(str(library))
    plan = StaticPlan.from_json((compiled / "frozen_plan.json").read_text())
    arena = aligned_empty((plan.arena_bytes,), "uint8", plan.alignment)
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdqisint8allowed", "1")
    session = ort.InferenceSession(str(frozen), options, providers=["CPUExecutionProvider"])
    for i in range(len(images)):
        sample = np.ascontiguousarray(images[i:i + 1])
        host = aligned_empty(plan.buffer(plan.outputs[0]).shape, "float32", plan.alignment)
        assert lib.frozen_run(ctypes.c_void_p(arena.ctypes.data), ctypes.c_void_p(sample.ctypes.data),
                              ctypes.c_void_p(host.ctypes.data)) == 0
        (want,) = session.run(None, {"x": sample})
        assert np.array_equal(host.reshape(-1), want.reshape(-1)), i
        assert np.array_equal(firmware[i], host.reshape(-1)), i


def test_kernels_source_unrolls_and_pins_the_level():
    assert re.search(r'#pragma GCC optimize\("O3", "fp-contract=off"\)', KERNELS_PROLOGUE)


@needs_tool("arm-none-eabi-gcc", "qemu-system-arm")
def test_o2_and_os_builds_are_within_1_15x_of_o3(mcunet_frozen):
    bench, frozen, image, work = mcunet_frozen
    runs = {level: bench.measure_edgetune(frozen, image, level, 1, work / "edgetune")
            for level in ("-O2", "-O3", "-Os")}
    layers = bench.read_layers(frozen, image)
    calls = bench.match_calls(layers, runs["-O3"]["calls"])
    # the pointwise conv with the most MACs (77 % of the backbone's instructions are pointwise)
    layer = max((lr for lr in layers if lr.kind == "pointwise"), key=lambda lr: lr.macs)
    widest = calls[layer.index]
    o3 = runs["-O3"]["calls"][widest]["instructions"]
    assert o3 > 100_000  # a real layer, not timer noise (40 instructions per SysTick tick)
    for level in ("-O2", "-Os"):
        ratio = runs[level]["calls"][widest]["instructions"] / o3
        print(f"layer {layer.index}: {level} / -O3 = {ratio:.3f}")
        assert ratio <= 1.15, (level, ratio)
    totals = {level: sum(c["instructions"] for c in r["calls"]) for level, r in runs.items()}
    assert max(totals.values()) <= 1.15 * totals["-O3"], totals


@needs_tool("gcc")
def test_pointwise_moments_kernel_equals_integer_arithmetic(tmp_path):
    """norm-align's aligned 1x1 conv micro-kernel (plain C path, as the host build runs it): int8 outputs of
    ``acc + bias + offset`` requantised as TVM's epilogue does, and the exact int64 sum and sum of squares of
    the unaligned ``acc + bias`` per channel."""
    import ctypes
    import subprocess

    runtime = Path(__file__).resolve().parent.parent / "targets" / "runtime"
    library = tmp_path / "dsp.so"
    subprocess.run(["gcc", "-std=c99", "-O2", "-ffp-contract=off", "-fPIC", "-shared", f"-I{runtime}",
                    str(runtime / "et_kernels_dsp.c"), "-o", str(library), "-lm"], check=True)
    fn = ctypes.CDLL(str(library)).et_dsp_pointwise_moments_s8
    fn.restype = ctypes.c_int32
    rng = np.random.default_rng(0)
    cin, hw, cout, zy = 40, 16, 24, -128
    x = rng.integers(-128, 128, (cin, hw), dtype=np.int8)
    w = rng.integers(-128, 128, (cout, cin), dtype=np.int8)
    bias = rng.integers(-5000, 5000, cout, dtype=np.int32)
    scale = rng.uniform(1e-4, 2e-3, cout).astype(np.float32)
    offset = rng.integers(-300, 300, cout).astype(np.float32)
    y = np.zeros((cout, hw), np.int8)
    total, squares = np.zeros(cout, np.int64), np.zeros(cout, np.int64)
    arrays = (x, w, bias, scale, offset, y, total, squares)
    assert fn(*(ctypes.c_void_p(a.ctypes.data) for a in arrays), cin, hw, cout, zy) == 0
    acc = w.astype(np.int64) @ x.astype(np.int64) + bias[:, None]
    np.testing.assert_array_equal(total, acc.sum(1))
    np.testing.assert_array_equal(squares, (acc * acc).sum(1))
    v = (acc + offset.astype(np.int64)[:, None]).astype(np.float32) * scale[:, None]
    want = np.rint(np.clip(v, np.float32(-128 - zy), np.float32(127 - zy))) + zy
    np.testing.assert_array_equal(y, want.astype(np.int8))
    assert len(np.unique(y)) > 20  # the scales put the outputs across the int8 range, not all clamped
    bad = fn(*(ctypes.c_void_p(a.ctypes.data) for a in arrays), cin + 2, hw, cout, zy)  # cin % 4 != 0
    assert bad == -1


@needs_tool("gcc")
@pytest.mark.parametrize("stride", [1, 2])
def test_depthwise_moments_kernel_equals_integer_arithmetic(tmp_path, stride):
    """norm-align's aligned 3x3 depthwise micro-kernel (plain C path): padding with the input zero point, the
    offset added before requantisation, exact int64 sum and sum of squares of ``acc + bias`` per channel."""
    import ctypes
    import subprocess

    runtime = Path(__file__).resolve().parent.parent / "targets" / "runtime"
    library = tmp_path / "dsp.so"
    subprocess.run(["gcc", "-std=c99", "-O2", "-ffp-contract=off", "-fPIC", "-shared", f"-I{runtime}",
                    str(runtime / "et_kernels_dsp.c"), "-o", str(library), "-lm"], check=True)
    fn = ctypes.CDLL(str(library)).et_dsp_depthwise3x3_moments_s8
    fn.restype = ctypes.c_int32
    rng = np.random.default_rng(stride)
    ch, h, zx, zy = 12, 8, -5, -128
    o = (h + 1 - 3) // stride + 1 + (1 if stride == 1 else 0)  # padded by one at the top/left, as the model's
    x = rng.integers(-128, 128, (ch, h, h), dtype=np.int8)
    w = rng.integers(-128, 128, (ch, 3, 3), dtype=np.int8)
    bias = rng.integers(-3000, 3000, ch, dtype=np.int32)
    scale = rng.uniform(2e-4, 2e-3, ch).astype(np.float32)
    offset = rng.integers(-200, 200, ch).astype(np.float32)
    y = np.zeros((ch, o, o), np.int8)
    total, squares = np.zeros(ch, np.int64), np.zeros(ch, np.int64)
    arrays = (x, w, bias, scale, offset, y, total, squares)
    assert fn(*(ctypes.c_void_p(a.ctypes.data) for a in arrays), ch, h, h, o, o, stride, zx, zy) == 0
    plane = np.full((ch, h + 3, h + 3), zx, np.int64)
    plane[:, 1:h + 1, 1:h + 1] = x
    acc = np.zeros((ch, o, o), np.int64) + bias[:, None, None]
    for ry in range(3):
        for rx in range(3):
            acc += plane[:, ry:ry + stride * o:stride, rx:rx + stride * o:stride] * w[:, ry, rx][:, None, None]
    np.testing.assert_array_equal(total, acc.sum((1, 2)))
    np.testing.assert_array_equal(squares, (acc * acc).sum((1, 2)))
    v = (acc + offset.astype(np.int64)[:, None, None]).astype(np.float32) * scale[:, None, None]
    want = np.rint(np.clip(v, np.float32(-128 - zy), np.float32(127 - zy))) + zy
    np.testing.assert_array_equal(y, want.astype(np.int8))
    assert len(np.unique(y)) > 20
