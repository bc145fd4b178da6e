"""Learning from labels with a replay buffer, Adam and an lr warm-up (``Learner``) on every runtime: the torch
method, the compiled host build and the Cortex-M7 firmware in QEMU take the same steps per sample (the replay's
draws, int8 taps and warm-up blend included), and the buffer's bytes are what the memory table says. tiny-cnn,
tens of samples."""
from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import subprocess

import numpy as np
import pytest
import torch

from edgetune.compilers.emit_learner import tap_layout
from edgetune.adapt import fit, prepare
from edgetune.deploy import save_initial_state, write_target_project
from edgetune.deploy.build import build_project
from edgetune.deploy.host import HostModel
from edgetune.errors import CheckpointError, ConfigError
from edgetune.export import export
from edgetune.export.manifest import Manifest, load_manifest, manifest_digest
from edgetune.memory import memory_table, replay_bytes
from edgetune.methods.base import Learner, quantise_tap, xorshift32
from edgetune.simulate import run_program, stream_samples, write_stream

LEARNER = Learner("adam", warmup=6, replay=5, replay_steps=2, seed=11)
N = 30
TOL = 1e-4  # as tests/test_firmware.py: float32 summation order differs between torch and the C kernels
QEMU_TOOLS = ("arm-none-eabi-gcc", "qemu-system-arm", "make")


@pytest.fixture(scope="module")
def learned(tiny_cnn, digits, tmp_path_factory):
    """lst on tiny-cnn with the learner, exported int8 (the bundle carries Adam and the learner)."""
    adaptable = prepare(copy.deepcopy(tiny_cnn[0]), "lst", {"fit_epochs": "2", "lr": "0.003"}, model_name="tiny-cnn")
    fit(adaptable, digits, progress=False, max_samples=300)
    adaptable.method.use_learner(LEARNER)
    bundle = tmp_path_factory.mktemp("replay-bundle")
    export(adaptable, digits, bundle, progress=False)
    save_initial_state(bundle, adaptable.method)
    return adaptable, bundle


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    """A continual shifted stream with 2 of 3 labels revealed (a label of -1: not revealed)."""
    x, _, resets, feedback = stream_samples("digits", ("gaussian_noise",), 5, "continual", N, labelled_fraction=0.67)
    path = write_stream(tmp_path_factory.mktemp("replay-stream") / "stream.bin", x, resets, feedback, 10)
    return x, feedback, path


def _torch_names(manifest) -> dict[str, str]:
    return {p.name: p.torch_name for p in manifest.trainable.parameters if p.trainable}


def test_learner_settings_are_checked_and_the_replay_primitives_match_c():
    with pytest.raises(ConfigError, match="optimizer 'lion'"):
        Learner("lion")
    with pytest.raises(ConfigError, match="replay_steps=0"):
        Learner(replay=4, replay_steps=0)
    with pytest.raises(ConfigError, match="seed=4294967296"):
        Learner(seed=2 ** 32)
    state, seen = 11, []
    for _ in range(3):
        state = xorshift32(state)
        seen.append(state)
    assert seen == [2974059, 738900491, 305599086]  # Marsaglia's xorshift32 (13, 17, 5) from 11, as et_replay.c
    q, scale = quantise_tap(torch.tensor([[1.0, -7.9375, 0.03125, 0.09375]]))  # scale 7.9375 / 127 = 1/16
    assert float(scale) == 0.0625 and q.tolist() == [[16, -127, 0, 2]]  # 0.5 -> 0 and 1.5 -> 2: half to even
    zero, s0 = quantise_tap(torch.zeros(1, 3))
    assert float(s0) == 0.0 and zero.tolist() == [[0, 0, 0]]


def test_bundle_declares_the_learner_and_counts_its_bytes(learned):
    adaptable, bundle = learned
    manifest = load_manifest(bundle)
    learner = manifest.runtime.learner
    assert (learner.replay, learner.replay_steps, learner.warmup, learner.seed) == (5, 2, 6, 11)
    assert manifest.trainable.optimizer.kind == "adam"
    trainable = {p.name for p in manifest.trainable.parameters if p.trainable}
    assert {s.of for s in manifest.trainable.optimizer.states} == trainable
    _, lengths = tap_layout(manifest)
    params = sum(p.numel() for p in adaptable.method._trainable())
    assert manifest.memory["replay_buffer"] == replay_bytes(LEARNER, list(lengths), 4 * params)
    assert manifest.memory["replay_buffer"] >= 6 * sum(lengths)  # N + 1 int8 slots of every tap
    assert manifest.memory["optimizer_state"] == 8 * params + 4 * len(trainable)  # Adam: two moments + a step
    assert "replay 5 samples x 2 steps" in manifest.describe()
    plain = dataclasses.replace(adaptable.method.contract(), learner=Learner())
    assert plain.learner.replay == 0 and memory_table(adaptable)["replay_buffer"] > 0
    # bundles written before the field read as "no learner", and their digest does not depend on it
    plain_manifest = dataclasses.replace(manifest, runtime=dataclasses.replace(manifest.runtime, learner=None))
    raw = json.loads(plain_manifest.to_json())
    del raw["runtime"]["learner"]
    old = Manifest.from_json(json.dumps(raw))
    assert old.runtime.learner is None and manifest_digest(old) == manifest_digest(plain_manifest)
    assert "replay" not in old.describe()
    # a learner that cannot be run is refused when the bundle is read
    bad = dataclasses.replace(manifest, runtime=dataclasses.replace(
        manifest.runtime, learner=dataclasses.replace(learner, replay_steps=0)))
    with pytest.raises(CheckpointError, match="runtime.learner"):
        Manifest.from_json(bad.to_json())


def _host_run(bundle, x, feedback, method=None):
    """The compiled host build over the stream; with ``method``, the torch method steps on the very taps the C
    frozen forward computed, sample by sample (its predictions are returned beside the host's)."""
    model = HostModel(bundle)
    assert model.manifest.runtime.learner is not None and model.lib.edgetune_model_learner  # built in by default
    offsets, lengths = tap_layout(model.manifest)
    shapes = [tuple(o.shape) for o in model.manifest.frozen.outputs]
    host, ref = [], []
    for i in range(len(x)):
        host.append(model.step(x[i]).prediction)
        if method is not None:
            buf = np.ctypeslib.as_array(model.runtime.model.contents.taps, shape=(offsets[-1] + lengths[-1],))
            taps = [torch.from_numpy(buf[o:o + n].copy().reshape(s)) for o, n, s in zip(offsets, lengths, shapes)]
            ref.append(int(method.step(taps).argmax()))
        if feedback[i] >= 0:
            model.feedback(x[i], int(feedback[i]))
            if method is not None:
                method.step(taps, torch.nn.functional.one_hot(torch.tensor([int(feedback[i])]), 10).float())
    return model, host, ref


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs a host C compiler (apt install gcc)")
def test_torch_and_compiled_host_take_the_same_replayed_steps(learned, stream):
    """Per sample the same prediction, at the end the same weights (within float32 summation noise); without
    the learner the torch method ends elsewhere, so the replay and warm-up were really taken in C."""
    adaptable, bundle = learned
    x, feedback, _ = stream
    method = copy.deepcopy(adaptable.method)
    method.reset()
    model, host, ref = _host_run(bundle, x, feedback, method)
    assert host == ref
    plain = copy.deepcopy(adaptable.method)
    plain.use_learner(dataclasses.replace(LEARNER, replay=0))
    _, _, plain_ref = _host_run(bundle, x, feedback, plain)
    state, names = model.state(), _torch_names(model.manifest)
    now, other = dict(method.named_parameters()), dict(plain.named_parameters())
    moved_apart = 0.0
    for name, torch_name in names.items():
        ref_w = now[torch_name].detach().numpy().reshape(state[name].shape)
        assert np.abs(state[name] - ref_w).max() <= TOL, name
        moved_apart = max(moved_apart, float(np.abs(ref_w - other[torch_name].detach().numpy().reshape(
            ref_w.shape)).max()))
    assert moved_apart > 100 * TOL  # replay changes the weights: the comparison above is not vacuous
    assert model.counters()["labelled"] == sum(f >= 0 for f in feedback)


@pytest.mark.toolchain
@pytest.mark.skipif(any(shutil.which(t) is None for t in QEMU_TOOLS), reason=f"needs {', '.join(QEMU_TOOLS)}")
def test_cortex_m7_in_qemu_matches_the_host_build(learned, stream, tmp_path):
    """The firmware replays as the host build does (every prediction, final state within 1e-4), and the
    learner's static workspace is the bytes the memory table counts."""
    _, bundle = learned
    x, feedback, path = stream
    model, host, _ = _host_run(bundle, x, feedback)
    project = write_target_project(bundle, "cortex-m7", out_dir=tmp_path / "m7")
    assert "edgetune_model_learner(" in (project.directory / "model" / "et_model_gen.c").read_text()
    built = build_project(project)
    run = run_program(built, path, tmp_path / "run", adapt=True)
    assert run.records["prediction"].tolist() == host
    for name, value in model.state().items():
        assert np.abs(run.state[name] - value).max() <= TOL, name
    symbols = subprocess.run(["arm-none-eabi-nm", "-S", str(built.program)], capture_output=True, text=True,
                             check=True).stdout
    size = next(int(line.split()[1], 16) for line in symbols.splitlines() if line.endswith(" et_learner_work"))
    assert size == (model.manifest.memory["replay_buffer"] + 3) // 4 * 4 + 4  # + the word the C rounds up by


def test_export_cli_writes_the_learner_it_is_given(tiny_cnn, tmp_path):
    """``edgetune export --learner`` puts the learner in the bundle: Adam in the optimizer, the replay and warm-up in
    the manifest's runtime contract (bad specs are refused in one line: tests/test_bad_inputs.py)."""
    from edgetune.cli import main

    _, ckpt, _ = tiny_cnn
    out = tmp_path / "bundle"
    assert main(["export", "tiny-cnn", "--method", "last-layer", "--checkpoint", str(ckpt), "-o", str(out),
                 "--no-compile", "--learner", "optimizer=adam,replay=4,replay_steps=2,warmup=3"]) == 0
    manifest = load_manifest(out)
    assert manifest.trainable.optimizer.kind == "adam"
    learner = manifest.runtime.learner
    assert (learner.replay, learner.replay_steps, learner.warmup) == (4, 2, 3)
    assert manifest.memory["replay_buffer"] > 0
