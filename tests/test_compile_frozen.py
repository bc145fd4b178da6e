"""compile_frozen: int8 QDQ frozen graphs -> integer kernels, bit-exact with onnxruntime (issue 3).

The reference is onnxruntime with ``session.qdqisint8allowed=1``: every quantised op runs as an
int8 kernel (onnxruntime's default on ARM). Fixtures are built as an export builds frozen.onnx
(``edgetune.export``): backbones trained on digits, taps = pooled stage 0, stage-1 map, pooled
last stage, quantised with onnxruntime (QDQ, per-channel symmetric int8 weights).
"""
from __future__ import annotations

import copy

import ctypes
import json
import re
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
import tvm
from onnx import TensorProto, helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from torch import nn
from tvm import te

from edgetune.compilers import int8_math as im
from edgetune.compilers import CompiledGraph, FrozenRunner, StaticPlan, check_frozen, compile_bundle, compile_frozen
from edgetune.compilers.boundary import reference_mean
from edgetune.compilers.emit import aligned_empty
from edgetune.checkpoint import load_checkpoint
from edgetune.data import to_tensor
from edgetune.errors import CheckpointError, CompileError, DataError
from edgetune.export.onnx_graphs import export_frozen
from edgetune.export.ops import float_islands
from edgetune.export.quantize import quantize_frozen
from edgetune.ort_runtime import session
from edgetune.methods.base import TapSpec
from edgetune.train import train_source

QDQ_OPTIONS = {"WeightSymmetric": True, "ActivationSymmetric": False}


def ort_int8(path: Path | str) -> ort.InferenceSession:
    """onnxruntime's integer-kernel session: the reference every compiled int8 tensor must equal."""
    return session(path, int8_kernels=True)


def toolchain(*tools: str):
    missing = [t for t in tools if shutil.which(t) is None]
    return [pytest.mark.toolchain,
            pytest.mark.skipif(bool(missing), reason=f"not installed: {', '.join(missing)} (CI installs it)")]


@pytest.fixture(scope="module")
def frozen(tmp_path_factory, digits) -> dict[str, Path]:
    """model name -> frozen.onnx (int8 QDQ) written the way ``export`` writes it, from a backbone
    trained two epochs on digits (enough for realistic activation ranges; accuracy is not tested)."""
    out = {}
    for name in ("tiny-cnn", "mcunet-s"):
        d = tmp_path_factory.mktemp(f"frozen-{name}")
        train_source(name, digits, d / "ckpt", epochs=2, progress=False)
        backbone, _ = load_checkpoint(d / "ckpt")
        last = len(backbone.stages) - 1
        export_frozen(backbone, [TapSpec(0, True), TapSpec(1, False), TapSpec(last, True)], d / "float.onnx")
        quantize_frozen(d / "float.onnx", d / "frozen.onnx", digits.train_x, digits.name)
        out[name] = d / "frozen.onnx"
    return out


@pytest.fixture(scope="module")
def host(frozen, tmp_path_factory) -> dict[str, CompiledGraph]:
    return {name: compile_frozen(path, "host", tmp_path_factory.mktemp(f"host-{name}"))
            for name, path in frozen.items()}


@pytest.mark.parametrize("model", ["tiny-cnn", "mcunet-s"])
def test_host_taps_are_bit_exact_with_onnxruntime(model, frozen, host, digits):
    runner, session = FrozenRunner(host[model]), ort_int8(frozen[model])
    x = to_tensor(digits.test_x[:200]).numpy()
    differing = {name: 0 for name in host[model].output_names}
    for i in range(len(x)):
        for name, ours, ref in zip(differing, runner(x[i:i + 1]), session.run(None, {"x": x[i:i + 1]})):
            differing[name] += int(not np.array_equal(ours, ref))
    assert differing == {name: 0 for name in differing}
    consts = host[model].constant_bytes
    print(f"{model}: int8 weights {consts.weights_int8} B, int32 bias {consts.bias_int32} B, requant "
          f"{consts.requant_params} B, other {consts.other} B; compiled {consts.total} B vs ONNX "
          f"{consts.onnx_reference} B = {consts.ratio:.3f}x")
    assert consts.ratio <= 1.15
    assert consts.weights_int8 == _onnx_int8_weights(frozen[model])  # weights stay int8, nothing widened


def _onnx_int8_weights(path: Path) -> int:
    """int8 initialisers that DequantizeLinear nodes read as data (weights, not zero points)."""
    model = onnx.load(str(path))
    data = {n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return sum(onnx.numpy_helper.to_array(i).size for i in model.graph.initializer
               if i.data_type == TensorProto.INT8 and i.name in data)


class _EveryOp(nn.Module):
    """Regular, grouped and depthwise convs, a residual add, average and global pooling, a concat,
    a flatten into a Gemm, a MatMul and a transpose: every op the int8 rewrite lowers."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.c4 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(256, 10)
        self.w = nn.Parameter(torch.randn(10, 6))

    def forward(self, x):
        a = F.relu(self.c1(x))
        b = F.relu6(self.c2(a))
        c = self.c3(b) + a
        cat = torch.cat([F.avg_pool2d(c, 2), F.avg_pool2d(b, 2)], 1)
        y = self.fc(torch.flatten(cat, 1)) @ self.w
        return y, F.adaptive_avg_pool2d(b, 1).flatten(1), F.avg_pool2d(c, 2).transpose(2, 3), self.c4(c)


class _Reader(CalibrationDataReader):
    def __init__(self, shape: tuple[int, ...], n: int = 16) -> None:
        self.feeds = iter({"x": np.random.default_rng(i).standard_normal(shape).astype(np.float32)} for i in range(n))

    def get_next(self):
        return next(self.feeds, None)


def _quantize(module: nn.Module, shape: tuple[int, ...], out: Path, exclude: list[str] | None = None) -> Path:
    torch.manual_seed(0)
    fp32 = out.with_suffix(".float.onnx")
    result = module(torch.zeros(shape))
    n_out = len(result) if isinstance(result, tuple) else 1
    torch.onnx.export(module.eval(), (torch.zeros(shape),), str(fp32), input_names=["x"],
                      output_names=[f"y{i}" for i in range(n_out)], opset_version=17, dynamo=False)
    quantize_static(str(fp32), str(out), _Reader(shape), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, nodes_to_exclude=exclude or [],
                    extra_options=QDQ_OPTIONS)
    return out


def test_every_int8_op_is_bit_exact_with_onnxruntime(tmp_path):
    torch.manual_seed(0)
    path = _quantize(_EveryOp(), (1, 3, 8, 8), tmp_path / "every_op.onnx")
    graph = compile_frozen(path, "host", tmp_path / "host")
    runner, session = FrozenRunner(graph), ort_int8(path)
    rng = np.random.default_rng(1)
    for _ in range(50):
        x = rng.standard_normal((1, 3, 8, 8)).astype(np.float32) * 1.5
        for ours, ref in zip(runner(x), session.run(None, {"x": x})):
            assert np.array_equal(ours, ref)
    families = " ".join(k.name for k in graph.plan.kernels)
    for family in ("qconv2d", "qconv2d_depthwise", "qavg_pool", "qglobal_pool", "qmatmul", "add"):
        assert family in families


def test_clips_and_requantising_views_are_bit_exact(tmp_path):
    """Clip / Relu units (kept when the quantiser cannot fold them) and a Reshape whose output is
    quantised differently from its input: integer clip, float-path requantisation, view + rescale."""
    def scalar(name, value, dtype=TensorProto.FLOAT):
        return helper.make_tensor(name, dtype, [], [value])

    nodes = [helper.make_node("QuantizeLinear", ["x", "s1", "z1"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s1", "z1"], ["d"])]
    outputs = []
    for i, (op, scale, zp) in enumerate([("Clip", "s1", "z1"), ("Relu", "s2", "z2"), ("Reshape", "s2", "z2"),
                                         ("Clip", "s2", "z2")]):
        extra = {"Clip": ["lo", "hi"], "Relu": [], "Reshape": ["shape"]}[op]
        nodes += [helper.make_node(op, ["d", *extra], [f"f{i}"], name=f"{op.lower()}{i}"),
                  helper.make_node("QuantizeLinear", [f"f{i}", scale, zp], [f"q{i}"]),
                  helper.make_node("DequantizeLinear", [f"q{i}", scale, zp], [f"y{i}"])]
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None))
    inits = [scalar("s1", 0.0213), scalar("z1", -3, TensorProto.INT8), scalar("s2", 0.0111),
             scalar("z2", -128, TensorProto.INT8), scalar("lo", 0.1), scalar("hi", 2.5),
             helper.make_tensor("shape", TensorProto.INT64, [2], [1, 96])]
    graph = helper.make_graph(nodes, "clips", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 4, 4])],
                              outputs, inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "clips.onnx")
    runner = FrozenRunner(compile_frozen(tmp_path / "clips.onnx", "host", tmp_path / "host"))
    session = ort_int8(tmp_path / "clips.onnx")
    for seed in range(30):
        x = np.random.default_rng(seed).standard_normal((1, 6, 4, 4)).astype(np.float32) * 2
        for ours, ref in zip(runner(x), session.run(None, {"x": x})):
            assert np.array_equal(ours, ref)


@pytest.mark.parametrize("hw", [(1, 1), (2, 2), (3, 3), (1, 5), (4, 4), (2, 6), (5, 5), (7, 7), (8, 8), (16, 16),
                                (32, 32)])
def test_pooled_taps_sum_in_onnxruntime_order(hw, tmp_path):
    """The float boundary's spatial mean reproduces onnxruntime's ReduceMean bit for bit, for aligned
    and unaligned rows (37 channels: row starts drift through every alignment phase)."""
    c, (h, w) = 37, hw
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]),
         helper.make_node("ReduceMean", ["d"], ["y"], axes=[2, 3], keepdims=0)], "mean",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, h, w])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c])],
        [helper.make_tensor("s", TensorProto.FLOAT, [], [0.0371234]),
         helper.make_tensor("z", TensorProto.INT8, [], [-7])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "mean.onnx")
    runner = FrozenRunner(compile_frozen(tmp_path / "mean.onnx", "host", tmp_path))
    session = ort_int8(tmp_path / "mean.onnx")
    rng = np.random.default_rng(h * 100 + w)
    for _ in range(10):
        x = rng.standard_normal((1, c, h, w)).astype(np.float32) * 3
        ours, ref = runner(x)[0], session.run(None, {"x": x})[0]
        assert np.array_equal(ours, ref)
        assert np.array_equal(reference_mean(ours_q(x), 0.0371234, -7), ref)


def ours_q(x: np.ndarray) -> np.ndarray:
    """QuantizeLinear in numpy (the reference mean's input)."""
    return np.clip(np.rint(x / np.float32(0.0371234)) - 7, -128, 127).astype(np.int8)


def test_requantisation_rounds_half_to_even(tmp_path):
    """Ties (acc * scale = k + 0.5) round to even as MLAS does, in the LLVM kernels."""
    acc = te.placeholder((32,), "int32", name="acc")
    out = te.compute((32,), lambda i: im.requantize(acc[i], 0.5, 3), name="out")
    built = tvm.tirx.build(tvm.IRModule({"main": te.create_prim_func([acc, out])}), target=tvm.target.Target("llvm"))
    values = np.arange(-16, 16, dtype=np.int32)  # odd values land exactly on .5
    result = tvm.runtime.tensor(np.zeros(32, np.int8))
    built["main"](tvm.runtime.tensor(values), result)
    assert np.array_equal(result.numpy(), np.clip(np.rint(values * 0.5) + 3, -128, 127).astype(np.int8))


def test_fixed_point_requantisation_is_integer_only_and_close(frozen, digits, tmp_path):
    graph = compile_frozen(frozen["tiny-cnn"], "c", tmp_path / "c", fixed_point=True)
    source = graph.artifacts["kernels_c"].read_text()
    conv = re.search(r"int32_t __tvm_ffi_frozen_qconv2d1\([^;{]*\) \{.*?\n\}\n", source, re.S).group(0)
    assert "float" not in conv  # the whole conv, requantisation included, is integer arithmetic
    host = compile_frozen(frozen["tiny-cnn"], "host", tmp_path / "host", fixed_point=True)
    runner, session = FrozenRunner(host), ort_int8(frozen["tiny-cnn"])
    x = to_tensor(digits.test_x[:20]).numpy()
    for i in range(len(x)):
        for ours, ref in zip(runner(x[i:i + 1]), session.run(None, {"x": x[i:i + 1]})):
            assert np.abs(ours - ref).max() <= 0.1 * np.abs(ref).max() + 1e-6  # off by at most a few steps


# --- errors: one line naming every offending node -------------------------------------------------

def _model(nodes, inputs, outputs, initializers=()) -> onnx.ModelProto:
    return helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, list(initializers)),
                             opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("edgetune.test", 1)])


def test_unsupported_ops_are_all_named_in_one_line(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    model = _model([helper.make_node("Relu", ["x"], ["a"], name="ok_relu"),
                    helper.make_node("Frobnicate", ["a"], ["b"], name="first_bad", domain="edgetune.test"),
                    helper.make_node("Twiddle", ["b"], ["y"], name="second_bad", domain="edgetune.test")], [x], [y])
    onnx.save(model, tmp_path / "bad.onnx")
    with pytest.raises(CompileError) as err:
        compile_frozen(tmp_path / "bad.onnx", "host", tmp_path / "out")
    message = str(err.value)
    assert "\n" not in message and "first_bad" in message and "second_bad" in message
    assert "Frobnicate" in message and "Twiddle" in message and "ok_relu (Relu): no TVM" not in message
    assert not (tmp_path / "out").exists()  # nothing is written before the checks pass


def test_dynamic_shapes_are_named_in_one_line(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4])
    w = helper.make_tensor_value_info("w", TensorProto.FLOAT, None)
    model = _model([helper.make_node("Relu", ["x"], ["y"], name="relu"),
                    helper.make_node("NonZero", ["z"], ["nz"], name="nonzero"),
                    helper.make_node("Cast", ["nz"], ["w"], name="cast", to=TensorProto.FLOAT)], [x, z], [y, w])
    with pytest.raises(CompileError) as err:
        check_frozen(model)
    message = str(err.value)
    assert "\n" not in message and "x (graph input): dynamic shape [batch, 4]" in message
    assert "nonzero (NonZero): produces dynamic shapes" in message


def test_nodes_left_float_by_the_quantiser_become_named_float_islands(tmp_path):
    """Two convs left float by the quantiser (and the graph input fed to them) are not errors: they
    run in float between a dequantise and a quantise, and ``float_islands`` names them."""
    module = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                           nn.Conv2d(4, 4, 1))
    float_model = tmp_path / "probe.onnx"
    torch.onnx.export(module, (torch.zeros(1, 1, 6, 6),), str(float_model), input_names=["x"], output_names=["y0"],
                      opset_version=17, dynamo=False)
    convs = [n.name for n in onnx.load(str(float_model)).graph.node if n.op_type == "Conv"]
    path = _quantize(module, (1, 1, 6, 6), tmp_path / "partly.onnx", exclude=[convs[1], convs[2]])
    islands = float_islands(onnx.load(str(path)))
    assert [i.node for i in islands] == convs[1:]
    assert islands[0].macs == 4 * 6 * 6 * 4 * 9 and islands[0].weight_bytes == 4 * (4 * 4 * 9 + 4)
    runner, session = FrozenRunner(compile_frozen(path, "host", tmp_path / "out")), ort_int8(path)
    for seed in range(10):
        x = np.random.default_rng(seed).standard_normal((1, 1, 6, 6)).astype(np.float32)
        ours, ref = runner(x)[0], session.run(None, {"x": x})[0]
        assert np.allclose(ours, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


# --- the static plan ---------------------------------------------------------------------------------

def test_static_plan_roundtrips_and_live_buffers_never_overlap(host):
    plan = host["mcunet-s"].plan
    assert StaticPlan.from_json(plan.to_json()) == plan
    assert plan.check() == []
    # independent of plan.check: recompute lifetimes from the call order
    first, last = {}, {}
    for i, call in enumerate(plan.calls):
        for arg in call.args:
            if arg.startswith("c") and arg in {c.name for c in plan.constants}:
                continue
            root = plan.root(arg)
            if root.kind == "arena":
                first.setdefault(root.name, i)
                last[root.name] = i
    arena = [plan.buffer(n) for n in first]
    for a in arena:
        for b in arena:
            if a.name < b.name and first[a.name] <= last[b.name] and first[b.name] <= last[a.name]:
                assert a.offset + a.nbytes <= b.offset or b.offset + b.nbytes <= a.offset, (a, b)
    assert sum(b.nbytes for b in arena) > plan.arena_bytes  # storage is reused, not one buffer per tensor
    assert all(k.schedule != "unscheduled" for k in plan.kernels)
    assert plan.workspace_bytes < 4096 and all(0 <= c.offset for c in plan.constants)
    # a plan whose live buffers collide is caught
    victim, other = arena[0], next(b for b in arena[1:] if first[b.name] <= last[arena[0].name])
    broken = replace(plan, buffers=tuple(replace(b, offset=other.offset) if b.name == victim.name else b
                                         for b in plan.buffers))
    assert broken.check()
    with pytest.raises(CompileError):
        StaticPlan.from_json(json.dumps({"format": "something-else"}))


def test_compiled_graph_reloads_and_runner_checks_input(host, tmp_path):
    graph = CompiledGraph.load(host["tiny-cnn"].out_dir)
    assert graph.plan == host["tiny-cnn"].plan and graph.output_names == host["tiny-cnn"].output_names
    runner = FrozenRunner(host["tiny-cnn"].out_dir)
    with pytest.raises(DataError):
        runner(np.zeros((1, 1, 16, 16), np.float32))
    with pytest.raises(CheckpointError):
        CompiledGraph.load(tmp_path)


def test_compile_bundle_reads_the_manifest(tiny_cnn, digits, tmp_path):
    """compile_bundle reads the bundle through the one bundle format (load_manifest): a real bundle
    compiles; an edited manifest or a swapped frozen.onnx is refused before any compile."""
    from edgetune.adapt import prepare
    from edgetune.export import export

    bundle = tmp_path / "bundle"
    export(prepare(copy.deepcopy(tiny_cnn[0]), "source", model_name="tiny-cnn"), digits, bundle, progress=False)
    graph = compile_bundle(bundle, "c")
    assert graph.out_dir == bundle / "c" and (bundle / "c" / "frozen_plan.json").exists()
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["frozen"]["outputs"][0]["name"] = "renamed"
    edited = tmp_path / "edited"
    shutil.copytree(bundle, edited)
    (edited / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError):
        compile_bundle(edited, "c", tmp_path / "again")
    swapped = tmp_path / "swapped"
    shutil.copytree(bundle, swapped)
    shutil.copyfile(bundle / "trainable.onnx", swapped / "frozen.onnx")
    with pytest.raises(CheckpointError, match="frozen"):
        compile_bundle(swapped, "c", tmp_path / "again2")


# --- emitters ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def c_source(frozen, tmp_path_factory) -> CompiledGraph:
    return compile_frozen(frozen["mcunet-s"], "c", tmp_path_factory.mktemp("c-mcunet"))


def _run_c_library(graph: CompiledGraph, library: Path, x: np.ndarray) -> list[np.ndarray]:
    lib = ctypes.CDLL(str(library))
    plan = graph.plan
    arena = aligned_empty((plan.arena_bytes,), "uint8", plan.alignment)
    outs = [aligned_empty(plan.buffer(n).shape, "float32", plan.alignment) for n in plan.outputs]
    results = []
    for i in range(len(x)):
        sample = np.ascontiguousarray(x[i:i + 1])
        assert lib.frozen_run(ctypes.c_void_p(arena.ctypes.data), ctypes.c_void_p(sample.ctypes.data),
                              *[ctypes.c_void_p(o.ctypes.data) for o in outs]) == 0
        results.append([o.copy() for o in outs])
    return results


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not installed")
def test_c_source_builds_warning_free_and_is_bit_exact(c_source, frozen, digits, tmp_path):
    a = c_source.artifacts
    flags = ["-std=c99", "-O2", "-Wall", "-Wextra", "-Werror", "-fPIC", f"-I{a['include']}"]
    for source in (a["kernels_c"], a["model_c"], a["workspace_c"]):
        subprocess.run(["gcc", *flags, "-c", str(source), "-o", str(tmp_path / (source.stem + ".o"))], check=True)
    library = tmp_path / "libfrozen_c.so"
    subprocess.run(["gcc", *flags, "-shared", str(a["kernels_c"]), str(a["model_c"]), str(a["workspace_c"]), "-o",
                    str(library), "-lm"], check=True)
    # TVM's C codegen prints float immediates with 7 digits: every non-integer constant must be data
    literals = re.findall(r"\b\d+\.\d+e[-+]\d+f?\b", a["kernels_c"].read_text())
    assert all(float(v.rstrip("f")).is_integer() for v in literals)
    x = to_tensor(digits.test_x[:20]).numpy()
    session = ort_int8(frozen["mcunet-s"])
    for i, outs in enumerate(_run_c_library(c_source, library, x)):
        for ours, ref in zip(outs, session.run(None, {"x": x[i:i + 1]})):
            assert np.array_equal(ours, ref)


@pytest.mark.parametrize("cpu", ["cortex-m4", "cortex-m55"])
@pytest.mark.toolchain
@pytest.mark.skipif(shutil.which("arm-none-eabi-gcc") is None, reason="arm-none-eabi-gcc not installed (CI has it)")
def test_c_source_builds_for_cortex_m(c_source, cpu, tmp_path):
    a = c_source.artifacts
    fpu = ["-mfloat-abi=hard", "-mfpu=fpv4-sp-d16"] if cpu == "cortex-m4" else ["-mfloat-abi=hard"]
    for source in (a["kernels_c"], a["model_c"], a["workspace_c"]):
        subprocess.run(["arm-none-eabi-gcc", f"-mcpu={cpu}", "-mthumb", *fpu, "-std=c99", "-O2", "-Wall", "-Wextra",
                        "-Werror", f"-I{a['include']}", "-c", str(source), "-o", str(tmp_path / (source.stem + ".o"))],
                       check=True)


AARCH64_MAIN = r"""
#include <stdio.h>
#include <stdint.h>
#include "frozen_model.h"
static uint8_t arena[FROZEN_ARENA_BYTES] __attribute__((aligned(64)));
static float x[FROZEN_IN0_ELEMS] __attribute__((aligned(64)));
static float out0[FROZEN_OUT0_ELEMS] __attribute__((aligned(64)));
static float out1[FROZEN_OUT1_ELEMS] __attribute__((aligned(64)));
static float out2[FROZEN_OUT2_ELEMS] __attribute__((aligned(64)));
int main(int argc, char** argv) {
  FILE* in = fopen(argv[1], "rb");
  FILE* out = fopen(argv[2], "wb");
  (void)argc;
  while (fread(x, sizeof x, 1, in) == 1) {
    if (frozen_run(arena, x, out0, out1, out2) != 0) return 1;
    fwrite(out0, sizeof out0, 1, out);
    fwrite(out1, sizeof out1, 1, out);
    fwrite(out2, sizeof out2, 1, out);
  }
  fclose(in);
  fclose(out);
  return 0;
}
"""


@pytest.mark.toolchain
@pytest.mark.skipif(any(shutil.which(t) is None for t in ("aarch64-linux-gnu-gcc", "qemu-aarch64-static")),
                    reason="aarch64-linux-gnu-gcc or qemu-aarch64-static not installed (CI has them)")
def test_aarch64_build_is_bit_exact_under_qemu(frozen, digits, tmp_path):
    graph = compile_frozen(frozen["tiny-cnn"], "aarch64", tmp_path / "a64")
    a = graph.artifacts
    assert a["library"].read_bytes()[18] == 183  # ELF e_machine: EM_AARCH64
    (tmp_path / "main.c").write_text(AARCH64_MAIN)
    exe = tmp_path / "frozen_a64"
    subprocess.run(["aarch64-linux-gnu-gcc", "-static", "-O2", f"-I{a['include']}", f"-I{graph.out_dir}",
                    str(tmp_path / "main.c"),
                    str(a["model_c"]), str(a["workspace_c"]), str(a["kernels_o"]), "-o", str(exe), "-lm"], check=True)
    x = to_tensor(digits.test_x[:10]).numpy()
    x.tofile(tmp_path / "in.bin")
    subprocess.run(["qemu-aarch64-static", str(exe), str(tmp_path / "in.bin"), str(tmp_path / "out.bin")],
                   check=True, timeout=120)
    flat = np.fromfile(tmp_path / "out.bin", np.float32)
    session = ort_int8(frozen["tiny-cnn"])
    sizes = [int(np.prod(graph.plan.buffer(n).shape)) for n in graph.plan.outputs]
    offset = 0
    for i in range(len(x)):
        for ref, size in zip(session.run(None, {"x": x[i:i + 1]}), sizes):
            assert np.array_equal(flat[offset:offset + size], ref.reshape(-1))
            offset += size
