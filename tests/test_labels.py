"""Learning from labels: the label-learning baselines (full-finetune, bias-only, last-layer), lst and vqt
composed with alignment, the new-task opt-in (transfer) and its refusal, and that a label never reaches
the prediction it scores. Tiny models, tens of samples."""
from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch

from edgetune.adapt import fit, prepare, start_new_task
from edgetune.cli import main
from edgetune.data import to_tensor
from edgetune.data.roles import check_task
from edgetune.data.streams import Segment
from edgetune.errors import ConfigError
from edgetune.evaluate import _TorchRunner, evaluate, torch_taps, walk_stream

FAST = {"fit_epochs": "3"}
LABEL_METHODS = ("full-finetune", "bias-only", "last-layer", "lst", "vqt")
EXPORTABLE = ("last-layer", "lst", "vqt")


def _fitted(backbone, digits, method, overrides=None):
    adaptable = prepare(copy.deepcopy(backbone), method, {**FAST, **(overrides or {})}, model_name="tiny-cnn")
    fit(adaptable, digits, progress=False, max_samples=300)
    return adaptable


def _onehot(label: int, classes: int = 10) -> torch.Tensor:
    t = torch.zeros(1, classes)
    t[0, label] = 1.0
    return t


@pytest.mark.parametrize("method", ["full-finetune", "bias-only", "last-layer"])
def test_baselines_train_exactly_their_parameters_and_only_from_labels(tiny_cnn, digits, method):
    adaptable = _fitted(tiny_cnn[0], digits, method)
    m = adaptable.method
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    x = to_tensor(digits.test_x[:1])
    adaptable.step(x)  # unlabelled: nothing to learn from
    assert all(torch.equal(p, before[n]) for n, p in m.named_parameters())
    adaptable.step(x, _onehot(int(digits.test_y[0]) ^ 1))
    changed = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    trainable = set(m.trainable_names())
    assert changed and changed <= trainable
    if method == "bias-only":
        assert all(n.endswith(".bias") or ".classifier." in n for n in trainable)
        assert any(".stages." in n for n in changed)  # the backbone's own biases learn, not only the head
    if method == "last-layer":
        assert trainable == {"classifier.weight", "classifier.bias"}
    if method == "full-finetune":
        assert trainable == {n for n, _ in m.named_parameters()}


@pytest.mark.parametrize("method", ["lst", "vqt"])
def test_aligned_lst_and_vqt_compose_feature_align(tiny_cnn, digits, method):
    """Aligned lst / vqt are feature-align plus what they learn: with their own contribution at zero
    (lst: a zero side head; vqt unfitted: zero query weights) they predict exactly like feature-align on
    a shifted stream; align=false does not."""
    segments = [Segment("contrast", digits.test_x[:40] // 3, digits.test_y[:40], True)]
    got = {}
    for name, overrides in ((method, {}), (method + "-raw", {"align": "false"}), ("feature-align", {})):
        adaptable = prepare(copy.deepcopy(tiny_cnn[0]), name.removesuffix("-raw"), {"fit_epochs": "0", **overrides})
        fit(adaptable, digits, progress=False, max_samples=300)
        if name.startswith("lst"):
            with torch.no_grad():
                adaptable.method.head.weight.zero_()
                adaptable.method.head.bias.zero_()
            adaptable.method._initial = None
            adaptable.reset()
        got[name] = walk_stream(_TorchRunner(adaptable, torch_taps), segments, name, progress=False).predictions
    assert got[method] == got["feature-align"]
    assert got[method + "-raw"] != got["feature-align"]


@pytest.mark.parametrize("method", LABEL_METHODS)
def test_a_label_never_reaches_the_prediction_it_scores(tiny_cnn, digits, method):
    """Two streams differing only in sample k's label: every prediction up to and including k is the same;
    the label of k takes effect from sample k+1 on (it is revealed after k is scored)."""
    n, k = 12, 5
    labels = digits.test_y[:n].copy()
    other = labels.copy()
    other[k] = (labels[k] + 1) % 10
    preds, logits = [], []
    for ys in (labels, other):
        adaptable = _fitted(tiny_cnn[0], digits, method)
        runner = _TorchRunner(adaptable, torch_taps)
        seen: list[torch.Tensor] = []
        step = adaptable.method.step

        def record(taps, target=None, step=step, seen=seen):
            out = step(taps, target)
            if target is None:
                seen.append(out)
            return out

        adaptable.method.step = record  # type: ignore[method-assign]
        result = walk_stream(runner, [Segment("none", digits.test_x[:n], ys, True)], method, 1.0, progress=False)
        preds.append(result.predictions)
        logits.append(seen)
    assert preds[0][:k + 1] == preds[1][:k + 1]
    assert all(torch.equal(a, b) for a, b in zip(logits[0][:k + 1], logits[1][:k + 1]))
    assert not torch.equal(logits[0][k + 1], logits[1][k + 1])  # the label did reach the next prediction


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs a host C compiler (apt install gcc)")
@pytest.mark.parametrize("method", EXPORTABLE)
def test_label_feedback_agrees_int8_reference_and_compiled(tiny_cnn, digits, method):
    """With half the labels revealed: the method step in torch on onnxruntime int8 taps and the whole
    sample in compiled C predict the same class per sample (float summation order may flip a near-tie)."""
    args = (tiny_cnn[0], "tiny-cnn", method, digits, ("gaussian_noise", "contrast"), 5, "continual", 0, 30)
    kw = {"overrides": FAST, "labelled_fraction": 0.5, "progress": False}
    ref = evaluate(*args, backbone_kind="onnx-int8", **kw)
    got = evaluate(*args, backbone_kind="compiled", **kw)
    same = np.mean(np.array(got.result.predictions) == np.array(ref.result.predictions))
    assert got.result.samples == ref.result.samples == 60
    assert same >= 0.98, same
    no_labels = evaluate(*args, backbone_kind="compiled", overrides=FAST, progress=False)
    assert no_labels.result.predictions != got.result.predictions  # the labels were learned from


def test_check_task_refuses_another_builtin_dataset_and_new_without_labels():
    check_task("same", 0.0, "digits", "digits")
    check_task("same", 0.0, "my-folder", "digits")  # the user's own data may share the classes
    check_task("new", 0.2, "digits", "fashion-mnist")
    with pytest.raises(ConfigError, match="--task new"):
        check_task("same", 1.0, "digits", "fashion-mnist")
    with pytest.raises(ConfigError, match="--labelled-fraction"):
        check_task("new", 0.0, "digits", "fashion-mnist")
    with pytest.raises(ConfigError, match="unknown task"):
        check_task("other", 1.0)


def test_new_task_needs_a_method_that_learns_its_classes(tiny_cnn, digits):
    adaptable = _fitted(tiny_cnn[0], digits, "feature-align")
    with pytest.raises(ConfigError, match="cannot learn new classes"):
        start_new_task(adaptable)
    lst = _fitted(tiny_cnn[0], digits, "lst")
    names = start_new_task(lst)
    assert {"head.weight", "classifier.weight"} <= set(names)
    assert float(lst.method.head.weight.detach().abs().sum()) == 0.0
    lst.method.head.weight.data.fill_(1.0)
    lst.reset()  # reset returns to the new task's start, not to the source classes
    assert float(lst.method.head.weight.detach().abs().sum()) == 0.0


def test_cli_transfer_opt_in_learns_the_new_classes_and_says_so(tiny_cnn, capsys):
    """A digits model on a Fashion-MNIST stream: refused as the same task, learned as a new one."""
    base = ["eval", "--checkpoint", str(tiny_cnn[1]), "--method", "last-layer", "--data", "fashion-mnist",
            "--corruption", "none", "--samples-per-corruption", "300", "--set", "fit_epochs=0", "--set", "lr=0.01"]
    assert main(base + ["--labelled-fraction", "1"]) == 1
    assert "--task new" in capsys.readouterr().err
    assert main(base + ["--task", "new"]) == 1
    assert "--labelled-fraction" in capsys.readouterr().err
    assert main(base + ["--task", "new", "--labelled-fraction", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["task"] == "new" and out["reinitialised"] == ["classifier.weight", "classifier.bias"]
    assert out["mean_online_accuracy"] > 0.18  # chance is 0.1: the classifier learns the new classes online
