"""The compiled training step (TVM Relax, llvm) against the torch reference, and its compile errors.

The oracle is ``Method.step`` in torch: the compiled step streams the same taps with its own state,
parameters and optimizer state, and must agree at every step (issue 3's acceptance).
"""
from __future__ import annotations

import copy
import ctypes
import dataclasses
import shutil
import subprocess

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from edgetune.adapt import Adaptable, fit, prepare
from edgetune.compilers.train_step import (TrainStep, compile_train_step, emit_train_c, lower_train_step,
                                           read_signature)
from edgetune.data import corrupt, to_tensor
from edgetune.errors import CompileError
from edgetune.export import TRAINABLE_FILE, export, exportable_methods
from edgetune.export.manifest import OptimizerState, ParameterSpec
from edgetune.methods.feature_align import FeatureAlign

STEPS = 50
TOL = 1e-4
# every method that splits into a frozen and a trainable graph, from the registry
COMPILED = exportable_methods()


@pytest.fixture(scope="module")
def shifted(digits):
    """The first STEPS test digits with Gaussian noise (a shift, so adaptation actually moves things)."""
    return to_tensor(corrupt(digits.test_x[:STEPS], "gaussian_noise", 5, seed=0))


def _fitted(backbone, digits, method, **overrides):
    adaptable = prepare(copy.deepcopy(backbone), method, {"fit_epochs": "1", **overrides})
    fit(adaptable, digits, progress=False, use_cache=False)
    return adaptable


def _compiled(adaptable, digits, tmp_path):
    """(TrainStep, manifest) of ``adaptable`` exported (float frozen graph: only trainable.onnx matters)."""
    manifest = export(adaptable, digits, tmp_path / "bundle", quantize=False, progress=False)
    program = compile_train_step(tmp_path / "bundle" / TRAINABLE_FILE, manifest)
    return TrainStep(program), manifest


def _state(method) -> list[np.ndarray]:
    return [method.get_buffer(n).detach().numpy().copy() for n in method.state_names()]


def _torch_forward(method, taps, momentum, target) -> tuple[np.ndarray, float]:
    """(logits, loss) of torch's forward_graph at the method's current state and parameters."""
    with torch.no_grad():
        logits, loss, _ = method.forward_graph(taps, [torch.from_numpy(s) for s in _state(method)],
                                               torch.tensor([momentum]), target)
    return logits.numpy(), float(loss)


def _parameter_diff(step: TrainStep, manifest, method, initial) -> tuple[float, float]:
    """(max |compiled - torch|, max |compiled - initial|) over the trainable parameters."""
    named = dict(method.named_parameters())
    torch_name = {p.name: p.torch_name for p in manifest.trainable.parameters}
    diff = moved = 0.0
    for name, value in step.parameters().items():
        diff = max(diff, float(np.abs(value - named[torch_name[name]].detach().numpy()).max()))
        moved = max(moved, float(np.abs(value - initial[name]).max()))
    return diff, moved


@pytest.mark.slow
@pytest.mark.parametrize("method", COMPILED)
def test_compiled_step_streams_like_torch(tiny_cnn, digits, shifted, tmp_path, method):
    """The evaluation protocol with every other label revealed after its prediction was scored:
    an unsupervised step per sample, then a supervised one (lst and vqt learn only from those)."""
    adaptable = _fitted(tiny_cnn[0], digits, method)  # the method's own lr, momentum and schedule
    step, manifest = _compiled(adaptable, digits, tmp_path)
    m, initial = adaptable.method, step.parameters()
    state = _state(m)
    for i in range(STEPS):
        taps = adaptable.taps(shifted[i:i + 1])
        label = torch.nn.functional.one_hot(torch.tensor([int(digits.test_y[i])]), m.num_classes).float()
        for target in (None, label) if i % 2 else (None,):
            momentum = 0.0 if target is not None else m.momentum_now()  # feedback reads the statistics as they are
            _, loss_ref = _torch_forward(m, taps, momentum, torch.zeros(1, m.num_classes) if target is None else target)
            logits_ref = m.step(taps, target).numpy()
            logits, loss, new_state = step.step([t.numpy() for t in taps], state, momentum,
                                                None if target is None else target.numpy())
            assert np.abs(logits - logits_ref).max() <= TOL, f"sample {i}: logits differ"
            assert abs(loss - loss_ref) <= TOL, f"sample {i}: loss {loss} vs torch {loss_ref}"
            assert logits.argmax() == logits_ref.argmax(), f"sample {i}: prediction differs"
            if target is None:  # supervised feedback leaves the running statistics alone
                state = new_state
            for new, ref in zip(state, _state(m), strict=True):
                assert np.abs(new - ref).max() <= TOL, f"sample {i}: state differs"
    diff, moved = _parameter_diff(step, manifest, m, initial)
    assert diff <= TOL
    if manifest.trainable.trainable_parameters():  # far enough for a wrong gradient to show
        assert moved > 10 * TOL, "the stream must actually train the parameters"


class _TrainedClassifier(FeatureAlign):
    """feature-align whose classifier also trains (entropy through the aligned features)."""

    def __init__(self, backbone, config):
        super().__init__(backbone, config)
        self.classifier.requires_grad_(True)  # a copy of the frozen backbone's

    def trainable_names(self):
        return ["classifier.weight", "classifier.bias"]


def _custom(backbone, digits, cls, **config):
    """An Adaptable of a test-only (unregistered) method class, prepared and fitted like ``prepare``'s."""
    backbone = copy.deepcopy(backbone).eval().requires_grad_(False)
    adaptable = Adaptable(backbone, cls(backbone, cls.Config(fit_epochs=0, **config)))
    fit(adaptable, digits, progress=False, use_cache=False)
    return adaptable


@pytest.fixture(scope="module")
def trained_classifier(tiny_cnn, digits):
    return _custom(tiny_cnn[0], digits, _TrainedClassifier, lr=0.05)


def test_infer_does_not_update_and_supervised_step_matches_torch(trained_classifier, digits, shifted, tmp_path):
    adaptable = copy.deepcopy(trained_classifier)
    m = adaptable.method
    step, manifest = _compiled(adaptable, digits, tmp_path)
    taps = adaptable.taps(shifted[:1])
    before = step.parameters()
    logits, loss, _ = step.infer([t.numpy() for t in taps], _state(m), 0.1)
    logits_ref, loss_ref = _torch_forward(m, taps, 0.1, torch.zeros(1, m.num_classes))
    assert np.abs(logits - logits_ref).max() <= TOL and abs(loss - loss_ref) <= TOL
    assert all(np.array_equal(before[k], v) for k, v in step.parameters().items())
    target = torch.nn.functional.one_hot(torch.tensor([3]), m.num_classes).float()
    for _ in range(3):  # supervised feedback: cross-entropy towards the label, statistics untouched
        _, loss_ref = _torch_forward(m, taps, 0.0, target)
        _, loss, _ = step.step([t.numpy() for t in taps], _state(m), 0.0, target.numpy())
        m.step(taps, target)
        assert abs(loss - loss_ref) <= TOL
    diff, moved = _parameter_diff(step, manifest, m, before)
    assert diff <= TOL and moved > 100 * TOL


def test_adam_matches_torch(trained_classifier, digits, shifted, tmp_path):
    """The optional optimizer: a manifest asking for Adam gets torch.optim.Adam's updates."""
    adaptable = copy.deepcopy(trained_classifier)
    m = adaptable.method
    base = export(adaptable, digits, tmp_path / "bundle", quantize=False, progress=False).trainable
    states = tuple(OptimizerState(f"adam_{kind}_{p.name}", shape, "float32", p.name)
                   for p in base.trainable_parameters()
                   for kind, shape in (("exp_avg", p.shape), ("exp_avg_sq", p.shape), ("step", ())))
    part = dataclasses.replace(base, optimizer=dataclasses.replace(base.optimizer, kind="adam", lr=0.01,
                                                                   states=states))
    step = TrainStep(compile_train_step(tmp_path / "bundle" / TRAINABLE_FILE, part))
    params = [p for _, p in m.named_trainable()]
    optimizer = torch.optim.Adam(params, lr=0.01)
    zeros = torch.zeros(1, m.num_classes)
    for i in range(20):
        taps = adaptable.taps(shifted[i:i + 1])
        state = [m.get_buffer(n) for n in m.state_names()]
        logits_ref, loss_ref, _ = m.forward_graph(taps, state, torch.tensor([0.0]), zeros)
        optimizer.zero_grad()
        loss_ref.backward()
        optimizer.step()
        logits, loss, _ = step.step([t.numpy() for t in taps], _state(m), 0.0)
        assert np.abs(logits - logits_ref.detach().numpy()).max() <= TOL and abs(loss - float(loss_ref.detach())) <= TOL
    for (name, value), p in zip(step.parameters().items(), params, strict=True):
        assert np.abs(value - p.detach().numpy()).max() <= TOL, name


def _aligned(shape, dtype="float32", alignment=64) -> np.ndarray:
    """A zeroed array whose data starts on an ``alignment``-byte boundary (the plan's contract)."""
    nbytes = max(1, int(np.prod(shape))) * np.dtype(dtype).itemsize
    raw = np.zeros(nbytes + alignment, np.uint8)
    start = -raw.ctypes.data % alignment
    return raw[start:start + nbytes].view(dtype)[:int(np.prod(shape))].reshape(shape)


@pytest.mark.toolchain
@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not installed (CI installs it)")
def test_c_source_compiles_and_trains_like_the_vm(trained_classifier, digits, shifted, tmp_path):
    """The emitted C (static plan + TVM's C kernels, no TVM runtime) builds warning-free and its
    train step, fed back its own outputs, follows the Relax VM's step for step."""
    adaptable = copy.deepcopy(trained_classifier)
    manifest = export(adaptable, digits, tmp_path / "bundle", quantize=False, progress=False)
    program = compile_train_step(tmp_path / "bundle" / TRAINABLE_FILE, manifest)
    lowered = lower_train_step(program, "c")
    sources = emit_train_c(lowered, tmp_path / "c")
    for entry, src in sources.items():
        library = tmp_path / f"lib{entry}.so"
        subprocess.run(["gcc", "-std=c99", "-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC",
                        "-I", str(src.include_dir), "-o", str(library), *map(str, src.sources)],
                       check=True, capture_output=True, text=True)
    run = ctypes.CDLL(str(tmp_path / "libtrain_step.so")).edgetune_train_train_step_run
    plan, sig = lowered.plans["train_step"], program.signature
    arena = _aligned((plan.arena_bytes,), "uint8")
    inputs = [_aligned(s.shape) for s in (*sig.inputs, *sig.trainable, *sig.opt_states)]
    outputs = [_aligned(plan.buffer(n).shape, plan.buffer(n).dtype) for n in plan.outputs]
    for spec, buf in zip(sig.trainable, inputs[len(sig.inputs):], strict=False):
        buf[...] = program.initial_params[spec.name]
    state = _state(adaptable.method)
    for i, value in enumerate(state):
        inputs[len(sig.taps) + i][...] = value
    step = TrainStep(program)
    for i in range(10):
        taps = [t.numpy() for t in adaptable.taps(shifted[i:i + 1])]
        for buf, tap in zip(inputs, taps, strict=False):
            buf[...] = tap
        inputs[len(sig.taps) + len(sig.state)][...] = 0.1  # momentum
        assert run(ctypes.c_void_p(arena.ctypes.data), *[ctypes.c_void_p(b.ctypes.data) for b in inputs + outputs]) == 0
        logits, loss, state = step.step(taps, state, 0.1)
        assert np.abs(outputs[0] - logits).max() <= TOL and abs(float(outputs[1]) - loss) <= TOL
        for out, into in sig.updates().items():
            inputs[into][...] = outputs[out]
    assert plan.check() == []


# --- errors ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def classifier_bundle(trained_classifier, digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle")
    manifest = export(copy.deepcopy(trained_classifier), digits, out, quantize=False, progress=False)
    return onnx.load(str(out / TRAINABLE_FILE)), manifest


def test_manifest_naming_an_unknown_parameter_fails(classifier_bundle):
    model, manifest = classifier_bundle
    params = list(manifest.trainable.parameters)
    old, params[0] = params[0].name, dataclasses.replace(params[0], name="no_such_weight")
    states = tuple(dataclasses.replace(s, of="no_such_weight") if s.of == old else s
                   for s in manifest.trainable.optimizer.states)
    part = dataclasses.replace(manifest.trainable, parameters=tuple(params),
                               optimizer=dataclasses.replace(manifest.trainable.optimizer, states=states))
    with pytest.raises(CompileError, match="'no_such_weight' is not an initialiser"):
        compile_train_step(model, part)


def test_optimizer_states_must_match_the_parameters(classifier_bundle):
    model, manifest = classifier_bundle
    part = dataclasses.replace(manifest.trainable, optimizer=dataclasses.replace(
        manifest.trainable.optimizer, states=manifest.trainable.optimizer.states[:1]))
    with pytest.raises(CompileError, match="optimizer states .* differ from what sgd keeps"):
        read_signature(part)


def test_unknown_optimizer_kind_is_named(classifier_bundle):
    _, manifest = classifier_bundle
    part = dataclasses.replace(manifest.trainable,
                               optimizer=dataclasses.replace(manifest.trainable.optimizer, kind="lion"))
    with pytest.raises(CompileError, match="unknown optimizer kind 'lion' .*sgd, adam"):
        read_signature(part)


def test_unsupported_op_and_dynamic_shape_are_named(classifier_bundle):
    model, manifest = classifier_bundle
    model = copy.deepcopy(model)
    logits = model.graph.output[0].name
    model.graph.node.append(helper.make_node("NoSuchOp", [logits], ["odd"], name="odd_node"))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    with pytest.raises(CompileError) as failure:
        compile_train_step(model, manifest)
    message = str(failure.value)  # one line naming both offenders (wording is onnx_import's)
    assert "\n" not in message and "odd_node (NoSuchOp)" in message and "tap3_pool" in message


class _ClampedClassifier(_TrainedClassifier):
    """Trains the classifier through a clamp, an op whose TVM lowering has no gradient."""

    def forward_graph(self, taps, state, momentum, target):
        logits, _, new_state = super().forward_graph(taps, state, momentum, target)
        clamped = logits.clamp(min=-5.0)
        return clamped, -(torch.log_softmax(clamped, -1) * target).sum(), new_state


def test_clamp_on_the_trainable_path_is_named(tiny_cnn, digits, tmp_path):
    adaptable = _custom(tiny_cnn[0], digits, _ClampedClassifier, lr=0.05)
    with pytest.raises(CompileError, match="no gradient for ops on the trainable path at .*maximum"):
        _compiled(adaptable, digits, tmp_path)


def test_a_parameter_the_loss_does_not_read_is_refused(classifier_bundle):
    """A 'trainable' parameter that only shifts the running mean (export refuses this too)."""
    model, manifest = copy.deepcopy(classifier_bundle[0]), classifier_bundle[1]
    mean = model.graph.output[2].name
    for node in model.graph.node:
        node.input[:] = ["unshifted" if i == mean else i for i in node.input]
        node.output[:] = ["unshifted" if o == mean else o for o in node.output]
    model.graph.node.append(helper.make_node("Add", ["unshifted", "shift"], [mean], name="shift_mean"))
    width = manifest.trainable.inputs[0].shape[1]
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(width, np.float32), "shift"))
    part = manifest.trainable
    shift = ParameterSpec("shift", (width,), "float32", True, "shift")
    part = dataclasses.replace(part, parameters=(shift, *part.parameters), optimizer=dataclasses.replace(
        part.optimizer, states=(OptimizerState("sgd_momentum_shift", (width,), "float32", "shift"),
                                *part.optimizer.states)))
    with pytest.raises(CompileError, match="loss does not depend on trainable parameter.*shift"):
        compile_train_step(model, part)
