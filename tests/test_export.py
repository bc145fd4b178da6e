"""Export: the bundle contract, ONNX-vs-torch numerics for every exportable method, int8 agreement,
and one test per validation error."""
from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from edgetune.adapt import fit, prepare
from edgetune.data import to_tensor
from edgetune.errors import CheckpointError, ConfigError, ExportError
from edgetune.export import (FROZEN_FILE, MANIFEST_FILE, SUPPORTED_OPS, TRAINABLE_FILE, Manifest, export,
                             exportable_methods, load_manifest, validate_onnx)
from edgetune.memory import CATEGORIES
from edgetune.methods import METHODS
from edgetune.methods.base import ema_momentum, entropy, stop_gradient, supervised_or
from edgetune.methods.source import Source
from edgetune.models import build_model
from edgetune.ort_runtime import OrtTaps, OrtTrainable

MODELS = ("tiny-cnn", "mcunet-s")
EXPORTABLE = exportable_methods()
# norm-align runs the backbone itself but exports as the int8 graph + its step (tests/test_norm_align_compiled.py)
WHOLE_BACKBONE = [n for n in METHODS.names() if n not in EXPORTABLE and not METHODS.get(n).folds_into_int8]
TOL = 1e-4


@pytest.fixture(scope="module")
def backbones(tiny_cnn, mcunet):
    return {"tiny-cnn": tiny_cnn[0], "mcunet-s": mcunet[0]}


@pytest.fixture(scope="module")
def fitted(backbones, digits):
    """(model, method) -> an Adaptable fitted briefly on digits (numerics do not need a good fit)."""
    cache = {}

    def get(model: str, method: str):
        if (model, method) not in cache:
            adaptable = prepare(copy.deepcopy(backbones[model]), method, {"fit_epochs": "1"}, model_name=model)
            fit(adaptable, digits, progress=False, use_cache=False)
            cache[model, method] = adaptable
        return cache[model, method]

    return get


@pytest.fixture(scope="module")
def bundle(fitted, digits, tmp_path_factory):
    """(model, method, quantize) -> (bundle dir, manifest), exported once per module."""
    cache = {}

    def get(model: str, method: str, quantize: bool = False):
        if (model, method, quantize) not in cache:
            out = tmp_path_factory.mktemp("bundles") / f"{model}-{method}-{'int8' if quantize else 'float'}"
            cache[model, method, quantize] = out, export(fitted(model, method), digits, out, quantize=quantize,
                                                         progress=False)
        return cache[model, method, quantize]

    return get


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


# --- numerics ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("method", EXPORTABLE)
def test_float_frozen_graph_matches_torch_taps(bundle, fitted, digits, model, method):
    out, _ = bundle(model, method)
    adaptable, runner = fitted(model, method), OrtTaps(out)
    x = to_tensor(digits.test_x[:20])
    for k in range(len(x)):
        got, want = runner(x[k:k + 1]), adaptable.taps(x[k:k + 1])
        assert len(got) == len(want) == len(adaptable.method.taps())
        assert max(max_diff(g, w) for g, w in zip(got, want)) <= TOL


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("method", EXPORTABLE)
def test_trainable_graph_matches_torch_forward_graph(bundle, fitted, digits, model, method):
    """A short stream: state carried from step to step, momentum on its schedule, every other
    sample with a one-hot target (the supervised branch of the loss)."""
    out, manifest = bundle(model, method)
    adaptable, runner = fitted(model, method), OrtTrainable(out)
    m = adaptable.method
    schedule = manifest.runtime.momentum_schedule
    state = [m.get_buffer(n).detach().clone() for n in m.state_names()]
    x = to_tensor(digits.test_x[:16])
    for k in range(len(x)):
        taps = adaptable.taps(x[k:k + 1])
        momentum = torch.tensor([ema_momentum(k, schedule.start, schedule.decay, schedule.floor) if schedule else 0.0])
        target = torch.zeros(1, m.num_classes)
        if k % 2:
            target[0, int(digits.test_y[k])] = 1.0
        with torch.no_grad():
            logits, loss, new_state = m.forward_graph(taps, state, momentum, target)
        o_logits, o_loss, o_state = runner(taps, state, momentum, target)
        assert max_diff(o_logits, logits) <= TOL
        assert max_diff(o_loss, loss) <= TOL
        assert len(o_state) == len(new_state)
        assert all(max_diff(o, s) <= TOL for o, s in zip(o_state, new_state))
        state = [s.clone() for s in new_state]


@pytest.mark.parametrize("model", MODELS)
def test_int8_frozen_graph_agrees_with_float_top1(bundle, fitted, digits, model):
    int8_dir, manifest = bundle(model, "source", quantize=True)
    float_dir, _ = bundle(model, "source")
    assert manifest.frozen.quantized and manifest.quantization is not None
    graph = onnx.load(str(int8_dir / FROZEN_FILE))
    ops = {n.op_type for n in graph.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    # every conv weight is stored as int8 (not folded back into float)
    inits = {t.name: t for t in graph.graph.initializer}
    conv_weights = [n.input[1] for n in graph.graph.node if n.op_type == "Conv"]
    producers = {o: n for n in graph.graph.node for o in n.output}
    assert all(inits[producers[w].input[0]].data_type == TensorProto.INT8 for w in conv_weights)

    method = fitted(model, "source").method
    int8, fp32 = OrtTaps(int8_dir), OrtTaps(float_dir)
    x = to_tensor(digits.test_x)
    zero = (torch.zeros(1), torch.zeros(1, method.num_classes))

    def top1(taps):
        with torch.no_grad():
            return int(method.forward_graph(taps, [], *zero)[0].argmax())

    agree = np.mean([top1(int8(x[k:k + 1])) == top1(fp32(x[k:k + 1])) for k in range(len(x))])
    assert agree >= 0.99, f"int8 agrees with float on {agree:.2%} of {len(x)} clean digits"


# --- the bundle contract --------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", EXPORTABLE)
def test_bundle_follows_the_contract(bundle, fitted, method):
    out, manifest = bundle("mcunet-s", method)
    m = fitted("mcunet-s", method).method
    assert sorted(p.name for p in out.iterdir()) == sorted([FROZEN_FILE, TRAINABLE_FILE, MANIFEST_FILE])
    frozen, trainable = (onnx.load(str(out / f)) for f in (FROZEN_FILE, TRAINABLE_FILE))
    tap_names = [t.name for t in m.taps()]
    assert [i.name for i in frozen.graph.input] == ["x"]
    assert [o.name for o in frozen.graph.output] == [o.name for o in manifest.frozen.outputs] == tap_names
    roles = ["tap"] * len(tap_names) + ["state"] * len(m.state_names()) + ["momentum", "target"]
    assert [i.role for i in manifest.trainable.inputs] == roles
    assert [i.name for i in trainable.graph.input] == [i.name for i in manifest.trainable.inputs]
    assert [o.name for o in trainable.graph.output] == [o.name for o in manifest.trainable.outputs]
    assert [i.shape for i in manifest.trainable.inputs[:len(tap_names)]] == [o.shape for o in manifest.frozen.outputs]
    for g in (frozen, trainable):
        assert next(o.version for o in g.opset_import if o.domain == "") == 17
    # parameters: named initialisers holding the torch values, trainable ones first in calling order
    params = dict(m.named_parameters())
    inits = {t.name: numpy_helper.to_array(t) for t in trainable.graph.initializer}
    assert [p.torch_name for p in manifest.trainable.trainable_parameters()] == m.trainable_names()
    for p in manifest.trainable.parameters:
        assert p.name == p.torch_name.replace(".", "_")
        np.testing.assert_array_equal(inits[p.name], params[p.torch_name].detach().numpy())
    states = manifest.trainable.optimizer.states
    assert [s.of for s in states] == ([p.name for p in manifest.trainable.trainable_parameters()]
                                      if m.config.momentum > 0 else [])
    assert tuple(manifest.memory) == CATEGORIES
    # the runtime contract is the method's declarations, typed (never re-derived from config names)
    c, r = m.contract(), manifest.runtime
    assert (r.momentum_schedule is None) == (c.schedule is None) and (r.guard is None) == (c.guard is None)
    if c.schedule is not None:
        s = r.momentum_schedule
        assert (s.start, s.decay, s.floor) == (c.schedule.start, c.schedule.decay, c.schedule.floor)
    if c.guard is not None:
        assert (r.guard.rate, r.guard.max_share, r.guard.every, r.guard.warmup) == (
            c.guard.rate, c.guard.max_share, c.guard.every, c.guard.warmup)
    assert r.labels == c.labels.use
    assert (r.exits is None) == (c.exits is None)
    if c.exits is not None:
        assert r.exits.stages == c.exits.stages and r.exits.state == f"state_{c.exits.state.replace('.', '_')}"
        assert r.exits.state in [i.name for i in manifest.trainable.inputs if i.role == "state"]


def test_gradient_stops_stay_visible_in_the_trainable_graph(bundle):
    """tinytta's pseudo-label goes through stop_gradient: the compiler must see the stop."""
    out, _ = bundle("tiny-cnn", "tinytta")
    nodes = onnx.load(str(out / TRAINABLE_FILE)).graph.node
    stops = [n for n in nodes if n.name.startswith("stop_gradient")]
    assert stops and all(n.op_type == "Identity" and n.domain == "" for n in stops)


@pytest.mark.parametrize("method", EXPORTABLE)
def test_manifest_round_trips(bundle, method):
    out, manifest = bundle("tiny-cnn", method)
    assert load_manifest(out) == manifest
    assert Manifest.from_json(manifest.to_json()) == manifest
    assert manifest.method in manifest.describe()


# --- what export refuses ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", WHOLE_BACKBONE)
def test_methods_that_adapt_the_backbone_are_refused(method, digits, tmp_path):
    adaptable = prepare(build_model("mcunet-s-bn"), method)
    with pytest.raises(ExportError, match=f"{method}.*adapts the backbone itself") as err:
        export(adaptable, digits, tmp_path / "out", progress=False)
    assert all(name in str(err.value) for name in EXPORTABLE)
    assert not (tmp_path / "out").exists()


class ReadsBackbone(Source):
    """Broken on purpose: classifies with the backbone's own classifier, so the loss reaches the backbone."""

    name = "reads-backbone"

    def forward_graph(self, taps, state, momentum, target):
        logits = self.backbone.classifier(taps[0])
        return logits, supervised_or(entropy(logits).sum(), logits, target), []


class DeadParameter(Source):
    """Broken on purpose: declares the classifier trainable but cuts its gradient."""

    name = "dead-parameter"

    def trainable_names(self):
        return ["classifier.weight", "classifier.bias"]

    def forward_graph(self, taps, state, momentum, target):
        logits = stop_gradient(self.classifier(taps[0]))
        return logits, supervised_or(entropy(logits).sum(), logits, target), []


def with_method(backbone, cls):
    adaptable = prepare(copy.deepcopy(backbone), "source", model_name="tiny-cnn")
    adaptable.method = cls(adaptable.backbone, adaptable.method.config)
    return adaptable


def test_partition_check_finds_a_loss_that_reaches_the_backbone(backbones, digits, tmp_path):
    with pytest.raises(ExportError, match="reaches backbone parameters.*classifier"):
        export(with_method(backbones["tiny-cnn"], ReadsBackbone), digits, tmp_path / "out", progress=False)


def test_partition_check_finds_trainable_parameters_without_gradient(backbones, digits, tmp_path):
    with pytest.raises(ExportError, match="no gradient from the loss.*classifier.weight"):
        export(with_method(backbones["tiny-cnn"], DeadParameter), digits, tmp_path / "out", progress=False)


def test_failed_export_keeps_the_previous_bundle(backbones, digits, tmp_path):
    out = tmp_path / "bundle"
    export(with_method(backbones["tiny-cnn"], Source), digits, out, quantize=False, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ExportError):
        export(with_method(backbones["tiny-cnn"], ReadsBackbone), digits, out, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]  # no staging folder left behind


def test_unknown_target_is_refused_before_any_work(fitted, digits, tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'host'"):
        export(fitted("tiny-cnn", "source"), digits, tmp_path / "out", target="hots", progress=False)
    assert not (tmp_path / "out").exists()


def test_export_does_not_overwrite_a_folder_that_is_not_a_bundle(fitted, digits, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not a bundle"):
        export(fitted("tiny-cnn", "source"), digits, tmp_path, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


# --- validate_onnx: one error per problem kind ------------------------------------------------------------------


def graph(nodes, inputs, outputs, opset=17):
    g = helper.make_graph(nodes, "g", inputs, outputs)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def f32(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def test_unsupported_ops_are_all_listed_at_once():
    model = graph([helper.make_node("Sin", ["x"], ["a"], name="s1"),
                   helper.make_node("Cos", ["a"], ["b"], name="c1"),
                   helper.make_node("Sin", ["b"], ["y"], name="s2")], [f32("x", [1, 4])], [f32("y", [1, 4])])
    with pytest.raises(ExportError) as err:
        validate_onnx(model, SUPPORTED_OPS["frozen"], label="frozen.onnx")
    message = str(err.value)
    assert "\n" not in message and message.startswith("frozen.onnx: ")
    assert "Cos (nodes c1)" in message and "Sin (nodes s1, s2)" in message


def test_dynamic_shapes_are_rejected(fitted, tmp_path):
    adaptable = fitted("tiny-cnn", "source")
    path = tmp_path / "dynamic.onnx"
    torch.onnx.export(adaptable.frozen, (torch.zeros(1, 1, 32, 32),), str(path), input_names=["x"],
                      output_names=["tap3_pool"], opset_version=17, dynamo=False, dynamic_axes={"x": {0: "batch"}})
    with pytest.raises(ExportError, match="dynamic or unknown shapes: x, .*tap3_pool"):
        validate_onnx(path, SUPPORTED_OPS["frozen"] | {"Shape"})


def test_malformed_files_are_rejected(tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\x01 definitely not protobuf \xff" * 10)
    with pytest.raises(ExportError, match="garbage.onnx: not a readable ONNX model"):
        validate_onnx(garbage, SUPPORTED_OPS["frozen"])
    dangling = graph([helper.make_node("Relu", ["missing"], ["y"], name="r")], [f32("x", [1, 4])],
                     [f32("y", [1, 4])])
    with pytest.raises(ExportError, match="malformed ONNX"):
        validate_onnx(dangling, SUPPORTED_OPS["frozen"])


def test_wrong_dtypes_and_io_are_rejected():
    double = helper.make_tensor_value_info("x", TensorProto.DOUBLE, [1, 4])
    model = graph([helper.make_node("Relu", ["x"], ["y"], name="r")], [double],
                  [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [1, 4])])
    with pytest.raises(ExportError, match=r"wrong dtypes: x \(DOUBLE\)"):
        validate_onnx(model, SUPPORTED_OPS["frozen"])
    ok = graph([helper.make_node("Relu", ["x"], ["y"], name="r")], [f32("x", [1, 4])], [f32("y", [1, 4])])
    validate_onnx(ok, SUPPORTED_OPS["frozen"], inputs=[("x", (1, 4))], outputs=[("y", (1, 4))])
    with pytest.raises(ExportError, match="inputs are"):
        validate_onnx(ok, SUPPORTED_OPS["frozen"], inputs=[("image", (1, 4))])


# --- load_manifest: corrupt, edited, unknown versions -------------------------------------------------------------


def broken_copy(bundle_dir, tmp_path, edit):
    out = tmp_path / "copy"
    out.mkdir()
    for p in bundle_dir.iterdir():
        (out / p.name).write_bytes(p.read_bytes())
    edit(out)
    return out


def rewrite_manifest(change):
    def edit(out):
        raw = json.loads((out / MANIFEST_FILE).read_text())
        change(raw)
        (out / MANIFEST_FILE).write_text(json.dumps(raw))
    return edit


@pytest.mark.parametrize("edit, message", [
    (lambda out: (out / MANIFEST_FILE).write_text("{not json"), "manifest: not valid JSON"),
    (rewrite_manifest(lambda raw: raw.update(format="edgetune-bundle/99")), "unknown format 'edgetune-bundle/99'"),
    (rewrite_manifest(lambda raw: raw.update(format="edgetune-bundle/1")),
     "format 'edgetune-bundle/1' was written before methods declared .*re-export"),
    (rewrite_manifest(lambda raw: raw.pop("runtime")), "manifest lacks field 'runtime'"),
    (rewrite_manifest(lambda raw: raw["runtime"].update(labels="sometimes")), "runtime.labels is 'sometimes'"),
    (rewrite_manifest(lambda raw: raw.pop("format")), "no 'format' field"),
    (rewrite_manifest(lambda raw: raw["trainable"].pop("parameters")), "trainable lacks field 'parameters'"),
    (rewrite_manifest(lambda raw: raw.update(num_classes="ten")), "num_classes should be int"),
    (lambda out: (out / TRAINABLE_FILE).write_bytes(b"edited"), "does not match the sha256"),
    (lambda out: (out / FROZEN_FILE).unlink(), "frozen.onnx is missing"),
    (lambda out: (out / MANIFEST_FILE).unlink(), "manifest.json not found"),
])
def test_load_manifest_rejects_broken_bundles(bundle, tmp_path, edit, message):
    good, _ = bundle("tiny-cnn", "source")
    with pytest.raises(CheckpointError, match=message):
        load_manifest(broken_copy(good, tmp_path, edit))
