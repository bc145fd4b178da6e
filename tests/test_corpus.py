"""The corpus acceptance test (issue 10): models written the way users write them, through the whole path.

Every corpus model (tests/corpus_models.py) is exported to int8 QDQ ONNX the way ``edgetune export``
writes frozen.onnx, then compiled for the host. Exactly two outcomes are accepted:

(a) it compiles, and on 50 samples the compiled taps equal onnxruntime's integer-kernel session
    (``session.qdqisint8allowed=1``) bit for bit where the tap is an int8 tensor (its producer is a
    DequantizeLinear), and within 1e-4 of the tap's largest magnitude where it is float (a pooled
    tap or a float island at the end). The transformer's float islands are exact too: export writes
    each LayerNormalization out as ReduceMeans (summed in onnxruntime's order) and single IEEE ops
    whose products are rounded before any add (``edgetune.export.decompose``), and GELU's Erf is an
    int8 table of MLAS' own erf. Only downstream of a float island whose arithmetic is TVM's (a MatMul
    or Softmax left unquantised, an InstanceNorm, ...: ``REDUCING_ISLANDS``) can results differ in the
    last bit and flip a later int8 rounding, so there a tap may differ by at most one quantisation step
    of the int8 tensor it is computed from; the test prints how often it does;
(b) export or compile refuses it with ONE ``EdgetuneError`` line naming the offending node, with no
    TVM text in it (a table may follow only a budget refusal).

Anything else (another exception type, a traceback in the message, a wrong number) fails. The
outcome of each model is printed (``corpus <name>: compiled|refused ...``). As int8 coverage
grows, models move from (b) to (a); the assertions stay as they are.

Three corpus models also go to a Cortex-M7 firmware (generated C, arm-none-eabi-gcc,
qemu-system-arm): on 50 samples the firmware predicts what the host build of the same C predicts,
or the budget check refuses it with the table (benchmarks/corpus.py does the same for every
compiled corpus model).
"""
from __future__ import annotations

import copy
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from conftest import known_settings
from corpus_models import (CORPUS, Outcome, build, export_and_compile, fit_linear_probe, frozen_taps, graph_macs,
                           labelled_samples, sample_inputs)
from edgetune.compilers import FrozenRunner
from edgetune.errors import BudgetError, EdgetuneError
from edgetune.export.onnx_graphs import export_frozen
from test_compile_frozen import ort_int8

SAMPLES = 50
FLOAT_TOL = 1e-4
TVM_TEXT = ("Traceback", "tvm.", "ScheduleError", "TVMError", 'File "', "InternalError")


@pytest.fixture(scope="module")
def directories(tmp_path_factory) -> dict[str, Path]:
    """Where each corpus model's graphs are written (frozen_float.onnx, frozen.onnx, host/)."""
    return {name: tmp_path_factory.mktemp(f"corpus-{name}") for name in CORPUS}


@pytest.fixture(scope="module")
def outcomes(directories) -> dict[str, Outcome | Exception]:
    """Every corpus model exported and compiled once; an unexpected exception is kept (and re-raised
    by that model's test) so one broken model does not hide the others' outcomes."""
    results: dict[str, Outcome | Exception] = {}
    for name in CORPUS:
        try:
            results[name] = export_and_compile(name, directories[name])
        except Exception as exc:  # noqa: BLE001 - reported by the model's own test
            results[name] = exc
    return results


def test_corpus_covers_what_users_write(outcomes, directories, tmp_path):
    """At least 12 architectures, with every construct the issue lists visible in their float graphs."""
    assert len(CORPUS) >= 12
    ops: set[str] = set()
    conv_attrs: set[str] = set()
    for name in CORPUS:
        path = directories[name] / "frozen_float.onnx"
        if not path.exists():  # the export failed before writing it: write it here
            backbone = build(name)
            path = tmp_path / f"{name}.onnx"
            export_frozen(backbone, frozen_taps(backbone), path)
        graph = onnx.load(str(path)).graph
        inits = {i.name: i for i in graph.initializer}
        for node in graph.node:
            ops.add(node.op_type)
            if node.op_type == "Conv":
                attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
                w = inits.get(node.input[1])
                if attrs.get("group", 1) > 1:
                    conv_attrs.add("grouped")
                if any(d > 1 for d in attrs.get("dilations", [])):
                    conv_attrs.add("dilated")
                if any(s > 1 for s in attrs.get("strides", [])):
                    conv_attrs.add("strided")
                if w is not None and len(w.dims) == 3:
                    conv_attrs.add("1-d")
                if w is not None and max(w.dims[2:]) > 1 and not any(attrs.get("pads", [])):
                    conv_attrs.add("unpadded")
    missing = ({"MaxPool", "BatchNormalization", "HardSwish", "HardSigmoid", "Sigmoid", "LayerNormalization",
                "Softmax", "Erf", "Concat", "Pad", "Add", "Sub", "Div"} - ops) | (
        {"grouped", "dilated", "strided", "1-d", "unpadded"} - conv_attrs)
    assert not missing, f"constructs missing from the corpus's float graphs: {sorted(missing)}"


def _int8_outputs(path: Path) -> set[str]:
    """Graph outputs that are int8 tensors: produced by a DequantizeLinear."""
    graph = onnx.load(str(path)).graph
    producers = {out: node.op_type for node in graph.node for out in node.output}
    return {o.name for o in graph.output if producers.get(o.name) == "DequantizeLinear"}


def _node_names(outcome: Outcome) -> set[str]:
    names: set[str] = set()
    for path in outcome.directory.glob("*.onnx") if outcome.directory else ():
        names |= {n.name for n in onnx.load(str(path)).graph.node if n.name}
    return names


def check_refusal(outcome: Outcome) -> None:
    """(b): one EdgetuneError line, no TVM text, naming a node of the model's graph."""
    message = outcome.refusal
    assert message.strip(), f"{outcome.name}: empty refusal"
    for text in TVM_TEXT:
        assert text not in message, f"{outcome.name}: refusal carries TVM/Python internals ({text!r}): {message}"
    assert "\n" not in message, f"{outcome.name}: refusal is more than one line: {message!r}"
    assert re.match(r"^[\w .()/-]+: ", message), f"{outcome.name}: not 'component: what; how': {message}"
    named = [n for n in _node_names(outcome) if re.search(rf"(?<![\w/.]){re.escape(n)}(?![\w/])", message)]
    assert named, f"{outcome.name}: the refusal names no node of the graph: {message}"


# islands whose float order is TVM's, not onnxruntime's (a ReduceMean over trailing axes is not one: it
# sums in onnxruntime's order, and export writes a LayerNormalization out as such means and IEEE ops)
REDUCING_ISLANDS = {"MatMul", "Gemm", "Softmax", "ReduceSum", "InstanceNormalization", "GroupNormalization", "Conv",
                    "Erf"}  # not a reduction; an island only where it is no function of one int8 tensor


def _after_reducing_island(path: Path) -> dict[str, float]:
    """Graph outputs downstream of a float island that reduces (sums in an order of its own), each with
    the quantisation step of the int8 tensor it is computed from (the scale of its DequantizeLinear)."""
    from edgetune.export.ops import float_islands

    model = onnx.load(str(path))
    graph = model.graph
    reducing = {i.node for i in float_islands(model) if i.op in REDUCING_ISLANDS}
    producer = {out: node for node in graph.node for out in node.output}
    consts = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    out: dict[str, float] = {}
    for o in graph.output:
        seen, todo, step, after = set(), [o.name], None, False
        while todo:  # breadth first: the first DequantizeLinear met is the one nearest the output
            node = producer.get(todo.pop(0))
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            if step is None and node.op_type == "DequantizeLinear" and node.input[1] in consts:
                step = float(consts[node.input[1]].max())
            after = after or (node.name or node.output[0]) in reducing
            todo += [i for i in node.input if i]
        if after:
            out[o.name] = step if step is not None else 0.0
    return out


def check_bit_exact(outcome: Outcome) -> None:
    """(a): the compiled taps equal onnxruntime's int8 session on SAMPLES samples."""
    assert outcome.compiled is not None and outcome.onnx is not None
    runner, session = FrozenRunner(outcome.compiled), ort_int8(outcome.onnx)
    int8 = _int8_outputs(outcome.onnx)
    after_island = _after_reducing_island(outcome.onnx)
    off_by_a_step = {n: 0 for n in after_island}
    names = [o.name for o in session.get_outputs()]
    assert list(outcome.compiled.output_names) == names
    x = sample_inputs(outcome.input_shape, SAMPLES)
    differing = {n: 0 for n in names}
    worst = {n: 0.0 for n in names}
    for i in range(SAMPLES):
        sample = x[i:i + 1]
        for name, ours, ref in zip(names, runner(sample), session.run(None, {"x": sample})):
            assert ours.shape == ref.shape and ours.dtype == ref.dtype, name
            if name in after_island:
                diff = float(np.abs(ours.astype(np.float64) - ref).max())
                assert diff <= after_island[name] * (1 + 1e-6), \
                    f"{outcome.name}: {name} off by {diff}, more than one quantisation step ({after_island[name]})"
                off_by_a_step[name] += int(diff > 0)
            elif name in int8:
                differing[name] += int(not np.array_equal(ours, ref))
            else:
                scale = max(float(np.abs(ref).max()), 1e-6)
                worst[name] = max(worst[name], float(np.abs(ours.astype(np.float64) - ref).max()) / scale)
    if after_island:
        print(f"corpus {outcome.name}: samples within one quantisation step after a reducing float island: "
              f"{off_by_a_step} of {SAMPLES}")
    assert differing == {n: 0 for n in names}, f"{outcome.name}: int8 taps differ on some samples: {differing}"
    assert all(w <= FLOAT_TOL for w in worst.values()), f"{outcome.name}: float taps off by {worst} (relative)"


@pytest.mark.parametrize("name", list(CORPUS))
def test_model_is_bit_exact_or_refused_in_one_line(name, outcomes, capsys):
    outcome = outcomes[name]
    if isinstance(outcome, Exception):
        raise outcome  # not an EdgetuneError: a crash a user would see as a traceback
    params = outcome.params
    macs = graph_macs(outcome.directory / "frozen_float.onnx") if outcome.directory else 0
    if outcome.compiled is not None:
        check_bit_exact(outcome)
        kernels = len(outcome.compiled.plan.calls)
        line = f"compiled, bit-exact on {SAMPLES} samples ({kernels} kernel calls, {outcome.seconds:.1f} s)"
    else:
        check_refusal(outcome)
        line = f"refused at {outcome.stage}: {outcome.refusal}"
    with capsys.disabled():
        print(f"\ncorpus {name} ({params:,} params, {macs:,} MACs): {line}")


def _with_custom_op(path: Path, out: Path) -> str:
    """Copy of a graph with its middle compute node turned into an op of an unknown domain; its name."""
    model = onnx.load(str(path))
    compute = [n for n in model.graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear", "Constant")]
    node = compute[len(compute) // 2]
    node.name = "user_custom_op"
    node.op_type, node.domain = "FancyActivation", "com.example"
    del node.attribute[:]
    model.opset_import.append(onnx.helper.make_opsetid("com.example", 1))
    onnx.save(model, str(out))
    return node.name


@pytest.mark.parametrize("name", list(CORPUS))
def test_an_unsupported_op_is_one_line_naming_the_node(name, outcomes, directories, tmp_path):
    """A custom-domain op forced into the model's int8 graph: the export check and the compiler's check
    each refuse it in one line naming the node, with no TVM text."""
    from edgetune.compilers import compile_frozen
    from edgetune.errors import CompileError, ExportError
    from edgetune.export.ops import SUPPORTED_OPS
    from edgetune.export.validate import validate_onnx

    outcomes[name]  # the fixture wrote the graphs
    source = directories[name] / "frozen.onnx"
    if not source.exists():  # refused before quantisation: the float graph carries the op instead
        source = directories[name] / "frozen_float.onnx"
    node = _with_custom_op(source, tmp_path / "custom.onnx")
    for stage, call, error in (("export", lambda: validate_onnx(tmp_path / "custom.onnx", SUPPORTED_OPS["frozen"]),
                                ExportError),
                               ("compile", lambda: compile_frozen(tmp_path / "custom.onnx", "host", tmp_path / "h"),
                                CompileError)):
        with pytest.raises(error) as caught:
            call()
        message = str(caught.value)
        assert "\n" not in message and node in message, f"{stage}: {message}"
        assert not any(t in message for t in TVM_TEXT), f"{stage}: {message}"


# --- Cortex-M7 in QEMU: the firmware predicts what the host build predicts -------------------------------------

MCU_MODELS = ("keras-mnist", "grouped-shuffle", "imu-conv1d", "transformer")
MCU_TARGET = "cortex-m7"
MCU_TOOLS = ("arm-none-eabi-gcc", "qemu-system-arm", "make")


@pytest.mark.toolchain
@pytest.mark.skipif(any(shutil.which(t) is None for t in MCU_TOOLS), reason=f"needs {', '.join(MCU_TOOLS)}")
@pytest.mark.parametrize("name", MCU_MODELS)
def test_cortex_m_firmware_predicts_as_the_host_build(name, digits, tmp_path, capsys):
    """keras-mnist (unpadded convs, max-pooling) and grouped-shuffle on digits; imu-conv1d (1-D convs, a
    1-D mean) and the transformer (Softmax, LayerNorm written out as float ops) on labelled structured
    samples of their shapes."""
    _firmware_equals_host(name, MCU_TARGET, digits, tmp_path, capsys)


def test_gelu_is_one_lookup_table(outcomes):
    """The transformer's GELU (x / sqrt 2 -> Erf -> +1 -> * x -> * 0.5): DQ -> Div -> Erf -> Q is one int8
    table (MLAS' erf reproduced), so neither the Div nor the Erf is listed or compiled as a float island;
    what stays float are the LayerNorms, the attention scale and the final mean."""
    outcome = outcomes["transformer"]
    assert isinstance(outcome, Outcome) and outcome.compiled is not None, outcome
    islands = " ".join(outcome.compiled.islands)
    assert "Erf" not in islands and "mlp.1/Div" not in islands, islands
    assert "LayerNormalization" in islands
    assert "lut" in " ".join(k.name for k in outcome.compiled.plan.kernels)


@pytest.mark.toolchain
@pytest.mark.skipif(any(shutil.which(t) is None for t in MCU_TOOLS), reason=f"needs {', '.join(MCU_TOOLS)}")
def test_lookup_tables_and_mul_on_cortex_m4(digits, tmp_path, capsys):
    """hswish-se compiles with no float island left (hardswish = HardSigmoid table + QLinearMul,
    squeeze-excitation = Sigmoid table + broadcast Mul); a digits net of the same ops (hswish-se's features
    hardly vary on structured samples) runs on Cortex-M4 and predicts what the host build does."""
    from corpus_models import HardswishSEDigits

    outcome = export_and_compile("hswish-se", tmp_path / "host-compile")
    assert outcome.compiled is not None and not outcome.compiled.islands, outcome.refusal
    kernels = " ".join(k.name for k in outcome.compiled.plan.kernels)
    assert "lut" in kernels and "mul" in kernels
    torch.manual_seed(0)
    assert _firmware_equals_host("hardswish-se-digits", "cortex-m4", digits, tmp_path, capsys,
                                 HardswishSEDigits().eval()), "fits cortex-m4"


def _firmware_equals_host(name: str, target: str, digits, tmp_path: Path, capsys, backbone=None) -> bool:
    """Export ``name`` (method source), write and build its ``target`` firmware and assert its predictions
    on SAMPLES samples equal the host build of the same C, and those onnxruntime's (True); or a budget /
    one-line refusal (False)."""
    from edgetune.adapt import fit, prepare
    from edgetune.data import to_tensor
    from edgetune.deploy import build_project, save_initial_state, write_stream, write_target_project
    from edgetune.deploy.host import HostModel
    from edgetune.export import export
    from edgetune.simulate import run_program

    backbone = build(name) if backbone is None else backbone
    data = digits if backbone.input_shape == (1, 32, 32) else labelled_samples(backbone)
    fit_linear_probe(backbone, data)
    adaptable = prepare(copy.deepcopy(backbone), "source", model_name=name)
    fit(adaptable, data, progress=False)
    bundle = tmp_path / "bundle"
    try:
        export(adaptable, data, bundle, progress=False)
        save_initial_state(bundle, adaptable.method)
        project = write_target_project(bundle, target)
    except BudgetError as exc:
        assert "budget" in str(exc) and not any(t in str(exc) for t in TVM_TEXT)
        with capsys.disabled():
            print(f"\ncorpus {name} on {target}: refused by the budget check: {str(exc).splitlines()[0]}")
        return False
    except EdgetuneError as exc:  # the compile refuses it: the same one-line rule as on the host
        check_refusal(Outcome(name, None, None, str(exc), "firmware", directory=bundle))
        with capsys.disabled():
            print(f"\ncorpus {name} on {target}: refused: {exc}")
        return False
    x = to_tensor(data.test_x[:SAMPLES]).numpy()
    assert len(x) == SAMPLES
    stream = write_stream(tmp_path / "stream.bin", x)
    host = HostModel(bundle, tmp_path / "host", adapt=False)
    expected = [host.step(x[i]).prediction for i in range(len(x))]
    # the C build itself against onnxruntime: firmware = host build alone would pass two equally wrong C builds
    assert expected == _onnxruntime_predictions(bundle, x), f"{name}: the host C build differs from onnxruntime"
    built = build_project(project)
    run = run_program(built, stream, tmp_path / "sim", adapt=False)
    assert run.records["prediction"].tolist() == expected
    assert len(set(expected)) > 1  # a constant prediction would hide a broken backbone
    with capsys.disabled():
        print(f"\ncorpus {name} on {target}: {len(expected)} firmware predictions = host build = onnxruntime "
              f"(flash {built.flash_bytes:,} B, static RAM {built.static_ram_bytes:,} B)")
    return True


def _onnxruntime_predictions(bundle: Path, x: np.ndarray) -> list[int]:
    """Predictions of a ``source`` bundle with onnxruntime: frozen.onnx's int8 session, then trainable.onnx
    (the classifier) on its taps. ``source`` has no state: its other inputs (momentum, target) do not
    reach the logits."""
    from edgetune.ort_runtime import OrtTaps, OrtTrainable

    taps, step = OrtTaps(bundle), OrtTrainable(bundle)
    specs = step.manifest.trainable.inputs
    others = [s.name for s in specs if s.name not in taps.names]
    assert set(others) <= {"momentum", "target"}, others
    out = []
    for i in range(len(x)):
        tap = dict(zip(taps.names, taps(torch.from_numpy(x[i:i + 1]))))
        feeds = {s.name: (tap[s.name].numpy() if s.name in tap else np.zeros([int(d) for d in s.shape], np.float32))
                 for s in specs}
        logits = step.session.run([step.outputs[0]], feeds)[0]
        out.append(int(np.argmax(logits)))
    return out


# --- the reference models of the zoo: shapes, folding, pooling, methods -----------------------------------------

REFERENCE = {"resnet8": (3, 32, 32), "ds-cnn": (1, 49, 10), "mobilenet-v1-025": (3, 96, 96),
             "mobilenet-v3-s": (3, 32, 32), "imu-conv1d": (6, 100)}
METHODS = ("source", "feature-align", "tinytta", "lst", "vqt")


@pytest.fixture(scope="module")
def references() -> dict:
    """The reference models built once (running statistics from training-mode passes: folding does real work)."""
    return {name: build(name) for name in REFERENCE}


@pytest.mark.parametrize("name", list(REFERENCE))
def test_reference_model_folds_its_batchnorms_and_pools_every_axis(name, references):
    model = copy.deepcopy(references[name])
    assert model.input_shape == REFERENCE[name]
    x = torch.from_numpy(sample_inputs(model.input_shape, 3))
    exported = model.for_export()
    assert not [m for m in exported.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        assert torch.allclose(model(x), exported(x), atol=1e-5, rtol=1e-4)
        outs = model.stage_outputs(x)
    shapes = model.stage_shapes()
    assert [tuple(o.shape[1:]) for o in outs] == shapes and len({len(s) for s in shapes}) == 1
    assert len(shapes[0]) == len(model.input_shape)  # 1-D stays 1-D (N x C x T), 2-D stays 2-D
    pooled = model.pool(outs[-1], len(outs) - 1)
    assert pooled.shape == (3, model.stage_widths()[-1])
    assert torch.allclose(pooled, outs[-1].flatten(2).mean(-1), atol=1e-6)


def test_build_model_takes_any_input_shape():
    from edgetune.errors import ConfigError, ModelError
    from edgetune.models import build_model

    assert build_model("ds-cnn", num_classes=35).classifier.out_features == 35
    assert build_model("tiny-cnn", input_shape=(3, 24, 40)).stage_shapes()[-1] == (48, 3, 5)
    assert build_model("tiny-cnn", in_channels=3, image_size=16).input_shape == (3, 16, 16)  # the older callers
    assert build_model("imu-conv1d", input_shape=(3, 64)).stage_shapes()[-1] == (64, 16)
    assert build_model("examples.user_model:small_cnn", input_shape=(1, 32, 32)).input_shape == (1, 32, 32)
    with pytest.raises(ModelError, match="C x H x W"):
        build_model("tiny-cnn", input_shape=(6, 100))
    with pytest.raises(ConfigError, match="square"):
        build_model("examples.user_model:small_cnn", input_shape=(1, 32, 16))
    with pytest.raises(ConfigError, match="input shape"):
        build_model("resnet8", input_shape=(3, 0, 32))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list(REFERENCE))
def test_methods_prepare_and_step_on_reference_models(name, method, references):
    from edgetune.adapt import prepare

    overrides = known_settings(method, {"lr": "0.01", "entropy_weight": "1"})
    backbone = copy.deepcopy(references[name])
    adaptable = prepare(backbone, method, overrides, model_name=name)
    logits = adaptable.step(torch.from_numpy(sample_inputs(backbone.input_shape, 1)))
    assert logits.shape == (1, backbone.num_classes) and torch.isfinite(logits).all()
