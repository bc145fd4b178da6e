"""Learning a new task on the device (transfer): ``export --task new`` restarts the method's class layers at zero
for the stream's classes and says so in the manifest; ``simulate`` of that bundle learns the new classes from
revealed labels in QEMU exactly as the compiled host build does, and refuses streams of other classes;
``eval --learner`` gives the method its learner on every runtime. The committed tiny-cnn trained on
Fashion-MNIST, a digits stream, a few hundred samples."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgetune.cli import main
from edgetune.export.manifest import TaskSpec, load_manifest

ROOT = Path(__file__).resolve().parent.parent
FASHION = ROOT / "checkpoints" / "tiny-cnn-fashion-mnist"
N = 200  # digits samples streamed through the firmware, every label revealed after its sample was scored
QEMU_TOOLS = ("arm-none-eabi-gcc", "qemu-system-arm", "make")
FAST = ["--set", "fit_epochs=1", "--set", "lr=0.01"]


@pytest.fixture(scope="module")
def transfer(tmp_path_factory):
    """lst on the Fashion-MNIST tiny-cnn, exported for the digits task with a cortex-m4 project (not built)."""
    out = tmp_path_factory.mktemp("task-new") / "bundle"
    assert main(["export", "tiny-cnn", "--checkpoint", str(FASHION), "--method", "lst", "--task", "new",
                 "--data", "digits", "--target", "cortex-m4", "-o", str(out), *FAST]) == 0
    return out


def test_export_task_new_restarts_the_class_layers_and_the_manifest_says_so(transfer, capsys):
    manifest = load_manifest(transfer)
    task = manifest.task
    assert task.kind == "new" and task.data == "digits"
    assert set(task.reinitialised) == {"classifier.weight", "classifier.bias", "head.weight", "head.bias"}
    trainable = {p.name for p in manifest.trainable.parameters if p.trainable}
    assert {"classifier_bias", "head_bias", "classifier_weight", "head_weight"} <= trainable  # none merged away
    weights = {i.name: numpy_helper.to_array(i) for i in onnx.load(transfer / "trainable.onnx").graph.initializer}
    for name in ("classifier_weight", "head_weight"):
        assert not np.any(weights[name]), name  # start at zero: the source's classes are forgotten
    for name in ("classifier_bias", "head_bias"):
        assert np.abs(weights[name]).max() <= 1e-29, name  # zero, or 1e-30 to stay a distinct initialiser
    assert np.abs(weights["ladders_0_weight"]).max() > 0  # what is not a class layer keeps its fit
    source = json.loads((transfer / "source.json").read_text())
    assert source["data"] == "fashion-mnist"  # the source stays the model's own training data, not the stream
    assert main(["inspect", str(transfer)]) == 0
    assert "task: new (the classes of digits" in capsys.readouterr().out


def test_old_manifests_read_as_the_same_task(transfer):
    from edgetune.export.manifest import Manifest, manifest_digest

    manifest = load_manifest(transfer)
    raw = json.loads(manifest.to_json())
    del raw["task"]
    old = Manifest.from_json(json.dumps(raw))
    assert old.task == TaskSpec() and "task: same" in old.describe()
    assert manifest_digest(old) != manifest.digest  # the task is sealed: editing it out is detected
    same = Manifest.from_json(json.dumps({**raw, "task": {"kind": "same", "data": "", "reinitialised": []}}))
    assert manifest_digest(same) == manifest_digest(old)  # an explicit default keeps an old bundle's digest


@pytest.mark.toolchain
@pytest.mark.skipif(any(shutil.which(t) is None for t in QEMU_TOOLS), reason=f"needs {', '.join(QEMU_TOOLS)}")
def test_simulate_learns_the_new_classes_in_qemu_as_the_host_build_does(transfer, tmp_path, capsys):
    from edgetune.deploy.host import HostModel
    from edgetune.simulate import simulate, stream_samples

    assert main(["simulate", str(transfer), "--data", "digits", "--corruption", "none", "--labelled-fraction", "1",
                 "--n", str(N), "--workdir", str(tmp_path / "sim"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["task"] == "new" and out["data"] == "digits" and out["n"] == N
    first, second = out["halves"]
    assert out["source_accuracy"] <= 0.15  # zero class layers and nothing learnt: no better than chance
    assert second > max(first, 0.25), out["halves"]  # it learns the digits on the device, one label at a time
    report = simulate(transfer, data="digits", corruption="none", n=N, labelled_fraction=1.0,
                      workdir=tmp_path / "sim2")
    assert "prequential accuracy" in report.table() and "new task" in report.table()
    x, _, _, feedback = stream_samples("digits", ("none",), 5, "episodic", N, 0, 1.0, (1, 32, 32))
    host = HostModel(transfer, workdir=tmp_path / "host")
    predictions = []
    for i in range(N):
        predictions.append(host.step(x[i]).prediction)
        host.feedback(x[i], int(feedback[i]))  # revealed only after the prediction was scored
    assert predictions == report.predictions  # the firmware in QEMU = the compiled host build, per sample


@pytest.mark.parametrize("argv, says", [
    (["--data", "digits"], "--labelled-fraction"),  # a new task learns from revealed labels only
    (["--data", "fashion-mnist", "--labelled-fraction", "1"], "--task new --data fashion-mnist"),
])
def test_simulate_refuses_a_stream_the_new_task_bundle_does_not_learn(transfer, argv, says, capsys):
    assert main(["simulate", str(transfer), "--corruption", "none", "--n", "20", *argv]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("edgetune: error: simulate:") and says in err, err


def test_eval_learner_reaches_the_method_on_every_runtime(capsys):
    """``eval --learner``: the replay buffer and Adam's moments are in the method's memory, and the learner changes
    what is learnt from the labels (onnxruntime int8 taps, method step in torch), and the compiled C runtime takes
    the same steps (sample by sample the same predictions)."""
    from edgetune.checkpoint import load_checkpoint
    from edgetune.evaluate import evaluate
    from edgetune.methods.base import Learner

    learner = Learner("adam", replay=6, replay_steps=2)
    assert main(["eval", "--checkpoint", str(FASHION), "--method", "last-layer", "--data", "digits", "--task", "new",
                 "--corruption", "none", "--samples-per-corruption", "20", "--labelled-fraction", "1", "--json",
                 "--set", "fit_epochs=0", "--learner", "optimizer=adam,replay=6,replay_steps=2"]) == 0
    memory = json.loads(capsys.readouterr().out)["memory_bytes"]
    assert memory["replay_buffer"] > 0 and memory["optimizer_state"] >= 8 * (10 * 48 + 10)  # Adam: two moments

    backbone, _ = load_checkpoint(FASHION)
    args = (backbone, "tiny-cnn", "last-layer", "digits", ("none",), 5, "episodic", 0, 60)
    kw = {"overrides": {"fit_epochs": "0", "lr": "0.01"}, "labelled_fraction": 1.0, "progress": False,
          "source": "fashion-mnist", "task": "new"}
    plain = evaluate(*args, backbone_kind="onnx-int8", **kw).result
    ref = evaluate(*args, backbone_kind="onnx-int8", learner=learner, **kw).result
    got = evaluate(*args, backbone_kind="compiled", learner=learner, **kw).result
    assert ref.predictions != plain.predictions  # replayed Adam steps learn otherwise than one SGD step per label
    same = np.mean(np.array(got.predictions) == np.array(ref.predictions))
    assert same >= 0.98, same  # the compiled runtime replays as the torch step does (a float near-tie may flip)
