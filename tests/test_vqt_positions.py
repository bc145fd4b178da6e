"""vqt's CNN options (``positions``: a learnable attention-logit bias per query and position; ``standardise``;
``align_queries``: summaries standardised by running statistics): an unfitted vqt with them predicts as without them,
ViT refuses them, and with labels the torch method and the compiled host build (int8 backbone + the C runtime with
Adam and replay) take the same steps, the position bias and the summaries' statistics included, and the bias really
moves. tiny-cnn, tens of samples."""
from __future__ import annotations

import copy
import shutil

import numpy as np
import pytest
import torch
from conftest import needs_tool

from edgetune.adapt import fit, prepare, source_taps
from edgetune.compilers.emit_learner import tap_layout
from edgetune.deploy import save_initial_state, write_target_project
from edgetune.deploy.build import build_project
from edgetune.deploy.host import HostModel
from edgetune.errors import ConfigError
from edgetune.evaluate import evaluate
from edgetune.export import export
from edgetune.export.manifest import onnx_name
from edgetune.methods.base import Learner
from edgetune.models import build_model
from edgetune.simulate import run_program, stream_samples, write_stream

LEARNER = Learner("adam", replay=5, replay_steps=2, seed=3)
N = 30
TOL = 1e-4  # as tests/test_replay.py: float32 summation order differs between torch and the C kernels
OPTIONS = {"positions": "true", "standardise": "true", "align_queries": "true"}


def test_unfitted_options_change_nothing_and_vit_refuses_them(tiny_cnn, digits):
    """Zero position biases and summaries the head reads with zero weights leave an unfitted vqt as it was; the
    summaries' running statistics follow the stream without a label."""
    plain = prepare(copy.deepcopy(tiny_cnn[0]), "vqt", {}, model_name="tiny-cnn")
    placed = prepare(copy.deepcopy(tiny_cnn[0]), "vqt", OPTIONS, model_name="tiny-cnn")
    m = placed.method
    sizes = [int(np.prod(s[1:])) for s in tiny_cnn[0].stage_shapes()]
    assert tuple(m.positions.shape) == (m.config.queries, sum(sizes)) and "positions" in m.trainable_names()
    assert "query_mean0" in m.state_names() and m.schedule() is not None
    taps = source_taps(placed, digits.test_x[:8])
    before = m.get_buffer("query_mean0").clone()
    for i in range(8):
        sample = [t[i:i + 1] for t in taps]
        assert torch.allclose(plain.method.step(sample), m.step(sample), atol=1e-5)
    assert not torch.equal(m.get_buffer("query_mean0"), before)  # the statistics moved with the stream
    with torch.no_grad():
        m.positions.normal_()  # a fitted bias does change what the queries summarise
        assert not torch.allclose(m.features(list(taps)), plain.method.features(list(taps)), atol=1e-3)
    vit = build_model("vit-tiny", num_classes=10)
    with pytest.raises(ConfigError, match="vqt: positions/standardise/align_queries are CNN options"):
        prepare(vit, "vqt", {"positions": "true"}, model_name="vit-tiny")


@pytest.fixture(scope="module")
def learned(tiny_cnn, digits, tmp_path_factory):
    """vqt with both options on tiny-cnn and the study's kind of learner, exported int8."""
    adaptable = prepare(copy.deepcopy(tiny_cnn[0]), "vqt", {"fit_epochs": "2", "lr": "0.003", **OPTIONS},
                        model_name="tiny-cnn")
    fit(adaptable, digits, progress=False, max_samples=300)
    adaptable.method.use_learner(LEARNER)
    bundle = tmp_path_factory.mktemp("vqt-positions-bundle")
    export(adaptable, digits, bundle, progress=False)
    save_initial_state(bundle, adaptable.method)
    return adaptable, bundle


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs a host C compiler (apt install gcc)")
def test_torch_and_compiled_host_learn_the_position_bias_alike(learned):
    """Per sample the same prediction; at the end the same weights (within float32 summation noise), and the
    position bias has moved from where the fit left it by far more than that noise."""
    adaptable, bundle = learned
    x, _, _, feedback = stream_samples("digits", ("gaussian_noise",), 5, "continual", N, labelled_fraction=0.67)
    method = copy.deepcopy(adaptable.method)
    method.reset()
    fitted = method.positions.detach().clone()
    model = HostModel(bundle)
    offsets, lengths = tap_layout(model.manifest)
    shapes = [tuple(o.shape) for o in model.manifest.frozen.outputs]
    host, ref = [], []
    for i in range(len(x)):
        host.append(model.step(x[i]).prediction)
        buf = np.ctypeslib.as_array(model.runtime.model.contents.taps, shape=(offsets[-1] + lengths[-1],))
        taps = [torch.from_numpy(buf[o:o + n].copy().reshape(s)) for o, n, s in zip(offsets, lengths, shapes)]
        ref.append(int(method.step(taps).argmax()))  # torch on the very taps the C frozen forward computed
        if feedback[i] >= 0:
            model.feedback(x[i], int(feedback[i]))
            method.step(taps, torch.nn.functional.one_hot(torch.tensor([int(feedback[i])]), 10).float())
    assert host == ref
    state = model.state()
    names = {p.torch_name: p.name for p in model.manifest.trainable.parameters if p.trainable}
    assert "positions" in names
    for torch_name, name in names.items():
        ref_w = dict(method.named_parameters())[torch_name].detach().numpy().reshape(state[name].shape)
        assert np.abs(state[name] - ref_w).max() <= TOL, torch_name
    stats = [n for n in method.state_names() if n.startswith("query_")]
    assert stats and all(f"state_{onnx_name(n)}" in state for n in stats), sorted(state)
    for n in stats:  # the summaries' running statistics, followed in C as in torch
        assert np.abs(state[f"state_{onnx_name(n)}"] - method.get_buffer(n).numpy()).max() <= TOL, n
    moved = float((method.positions.detach() - fitted).abs().max())
    assert moved > 100 * TOL, moved  # the labels reached the position bias (in C as in torch, checked above)


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs a host C compiler (apt install gcc)")
def test_label_feedback_with_the_options_agrees_int8_reference_and_compiled(tiny_cnn, digits):
    """As tests/test_labels.py for vqt's defaults: with half the labels revealed, torch on onnxruntime int8 taps and
    the whole sample in compiled C predict the same class per sample (a float near-tie may flip one)."""
    args = (tiny_cnn[0], "tiny-cnn", "vqt", digits, ("gaussian_noise", "contrast"), 5, "continual", 0, 30)
    kw = {"overrides": {"fit_epochs": "3", **OPTIONS}, "labelled_fraction": 0.5, "progress": False}
    ref = evaluate(*args, backbone_kind="onnx-int8", **kw)
    got = evaluate(*args, backbone_kind="compiled", **kw)
    assert got.result.samples == ref.result.samples == 60
    assert np.mean(np.array(got.result.predictions) == np.array(ref.result.predictions)) >= 0.98


@pytest.mark.toolchain
@needs_tool("arm-none-eabi-gcc", "qemu-system-arm", "make")
def test_cortex_m7_in_qemu_matches_the_host_build_with_the_options(learned, digits, tmp_path):
    """The firmware takes the host build's steps with the options: every prediction, and the final weights and
    summary statistics within 1e-4. vqt's own learner (SGD, one step per label): with Adam's moments or a replay
    buffer of tiny-cnn's full-resolution taps the firmware would not fit the 512 KB of SRAM (Adam and the replay
    are checked in QEMU by tests/test_replay.py)."""
    adaptable = copy.deepcopy(learned[0])
    adaptable.method.use_learner(Learner())
    bundle = tmp_path / "bundle"
    export(adaptable, digits, bundle, progress=False)
    save_initial_state(bundle, adaptable.method)
    x, _, resets, feedback = stream_samples("digits", ("gaussian_noise",), 5, "continual", N, labelled_fraction=0.67)
    path = write_stream(tmp_path / "stream.bin", x, resets, feedback, 10)
    model, host = HostModel(bundle), []
    for i in range(len(x)):
        host.append(model.step(x[i]).prediction)
        if feedback[i] >= 0:
            model.feedback(x[i], int(feedback[i]))
    built = build_project(write_target_project(bundle, "cortex-m7", out_dir=tmp_path / "m7"))
    run = run_program(built, path, tmp_path / "run", adapt=True)
    assert run.records["prediction"].tolist() == host
    state = model.state()
    assert "positions" in state and any(n.startswith("state_query_mean") for n in state)
    for name, value in state.items():
        assert np.abs(run.state[name] - value).max() <= TOL, name
