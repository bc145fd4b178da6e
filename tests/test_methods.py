"""The generic method matrix: every registered method must honour the contract in methods/base.py.

tiny-cnn for most methods, mcunet-s-bn for the BatchNorm methods, vit-tiny for the transformer
variants of vqt, lst and tinytta. The contract holds for any weights, so backbones are untrained
(seeded) except where learning is measured (``fit`` uses the shared trained tiny-cnn).
"""
from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from edgetune.adapt import fit, prepare
from edgetune.data import to_tensor
from edgetune.errors import ConfigError
from edgetune.methods import METHODS
from edgetune.methods.base import Exits
from edgetune.models import build_model
from conftest import known_settings

FAST = {"fit_epochs": "2", "lr": "0.01", "entropy_weight": "1"}  # a visible unsupervised update in a few steps
DEFAULT_MODEL = "tiny-cnn"


def _model_of(name: str) -> str:
    """tiny-cnn, unless the method refuses it: its one-line error names the model to use instead
    (the BatchNorm methods: "use mcunet-s-bn"), so a new method needs no edit here."""
    try:
        prepare(build_model(DEFAULT_MODEL), name)
    except ConfigError as err:
        match = re.search(r"use ([\w-]+)", str(err))
        assert match, f"{name} refuses {DEFAULT_MODEL} without naming a model: {err}"
        return match.group(1)
    return DEFAULT_MODEL


# The matrix comes from the registry: every method on its model, and the methods with fitted
# attachments (``fit_parameters``) again on the transformer backbone.
MODEL_OF = {name: _model_of(name) for name in METHODS.names()}
ATTACHING = [n for n in METHODS.names() if MODEL_OF[n] == DEFAULT_MODEL and METHODS.get(n).partitioned
             and prepare(build_model(DEFAULT_MODEL), n).method.fit_parameters()]
CASES = list(MODEL_OF.items()) + [(n, "vit-tiny") for n in ATTACHING]


def test_matrix_covers_every_registered_method():
    assert set(MODEL_OF) == set(METHODS.names()) and {"tinytta", "lst", "vqt"} <= set(ATTACHING)


def _backbone(model: str):
    torch.manual_seed(0)
    return build_model(model)


def _prepared(backbone, method: str, **overrides):
    torch.manual_seed(0)
    return prepare(backbone, method, known_settings(method, {**FAST, **overrides}))


def _stream(digits, n: int = 4) -> torch.Tensor:
    return to_tensor(digits.test_x[:n])


@pytest.mark.parametrize("method,model", CASES)
def test_only_declared_trainable_parameters_and_state_change(method, model, digits):
    backbone = _backbone(model)
    adaptable = _prepared(backbone, method)
    m = adaptable.method
    trainable, state = set(m.trainable_names()), set(m.state_names())
    # Gradients can only reach what is declared (nothing hidden gets computed or updated).
    assert {n for n, p in m.named_parameters() if p.requires_grad} == trainable
    before = {k: v.clone() for k, v in m.state_dict().items()}
    backbone_before = {k: v.clone() for k, v in backbone.state_dict().items()}
    x = _stream(digits)
    for i in range(len(x)):
        adaptable.step(x[i:i + 1])
    after = m.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed <= trainable | state, f"undeclared tensors changed: {sorted(changed - trainable - state)}"
    assert trainable <= changed, f"trainable parameters without an update: {sorted(trainable - changed)}"
    assert state <= changed
    assert all(torch.equal(v, backbone.state_dict()[k]) for k, v in backbone_before.items()), "backbone changed"


@pytest.mark.parametrize("method,model", list(MODEL_OF.items()))
def test_declared_runtime_contract_drives_the_torch_step(method, model, digits):
    """What a runtime reads from the manifest is what torch does: the momentum of every step is the
    declared schedule's (0 without one), and a declared exits state holds the one-hot of one exit."""
    adaptable = _prepared(_backbone(model), method)
    m = adaptable.method
    c = m.contract()
    x = _stream(digits, 3)
    for i in range(len(x)):
        if m.partitioned:  # a partitioned method's runtime computes momentum from the declaration only
            assert m.momentum_now() == (c.schedule.at(m.steps) if c.schedule is not None else 0.0)
        adaptable.step(x[i:i + 1])
        if c.exits is not None:
            taken = m.get_buffer(c.exits.state)
            assert taken.shape == (c.exits.count,) and sorted(taken.tolist()) == [0.0] * (c.exits.count - 1) + [1.0]
    assert c.labels.use == ("target" if m.trainable_names() else "none") or c.labels.use in ("none", "target")
    assert (c.guard is not None) == bool(m.config.guard)


def test_contradictory_declarations_are_refused_in_one_line(digits):
    m = _prepared(_backbone("tiny-cnn"), "tinytta").method
    m.exits = lambda: Exits((0, 9), "no_such_buffer")
    with pytest.raises(ConfigError) as err:
        m.contract()
    assert "\n" not in str(err.value) and "no_such_buffer" in str(err.value) and "[0, 9]" in str(err.value)


@pytest.mark.parametrize("method", ATTACHING)
def test_fit_improves_the_attachments(method, digits, tiny_cnn):
    torch.manual_seed(0)
    small = {"fit_epochs": "3", "fit_view_images": "200"}  # tinytta: its grid exit head fit on 200 images per copy
    adaptable = prepare(tiny_cnn[0], method, known_settings(method, small))
    report = fit(adaptable, digits, progress=False, use_cache=False, max_samples=400)
    assert report["val_loss_after"] < report["val_loss_before"] - 0.01


@pytest.mark.parametrize("method,model", CASES)
def test_labels_reach_only_supervised_steps(method, model, digits):
    adaptable = _prepared(_backbone(model), method)
    m = adaptable.method
    targets: list[torch.Tensor] = []
    graph = m.forward_graph

    def spy(taps, state, momentum, target):
        targets.append(target.clone())
        return graph(taps, state, momentum, target)

    m.forward_graph = spy
    x = _stream(digits, 3)
    for i in range(len(x)):
        adaptable.step(x[i:i + 1])
    assert len(targets) == 3 and all(t.shape == (1, m.num_classes) and not t.any() for t in targets)
    statistics = {n: m.get_buffer(n).clone() for n in m.state_names()}
    weights = {n: p.detach().clone() for n, p in m.named_trainable()}
    steps = m.steps
    label = torch.zeros(1, m.num_classes)
    label[0, int(digits.test_y[3])] = 1.0
    adaptable.step(_stream(digits, 4)[3:4], label)
    assert torch.equal(targets[-1], label)
    assert m.steps == steps and all(torch.equal(m.get_buffer(n), v) for n, v in statistics.items())
    learned = [n for n, p in m.named_trainable() if not torch.equal(p, weights[n])]
    assert bool(learned) == bool(weights), "a supervised step must update the trainable parameters"


@pytest.mark.parametrize("name", METHODS.names())
def test_config_fields_have_help_and_overrides_are_checked(name):
    config_cls = METHODS.get(name).Config
    config = config_cls()
    assert all(f.metadata.get("help") for f in dataclasses.fields(config)), "every field needs help text"
    changed = config.replace({"lr": "0.5", "guard": "false", "fit_epochs": "7"})
    assert (changed.lr, changed.guard, changed.fit_epochs) == (0.5, False, 7)
    assert type(changed) is config_cls
    with pytest.raises(ConfigError, match="no field 'learning_rate'"):
        config.replace({"learning_rate": "0.1"})
    with pytest.raises(ConfigError, match="lr expects float"):
        config.replace({"lr": "fast"})


@pytest.mark.parametrize("method", ["bn-adapt", "alpha-bn"])
def test_batchnorm_methods_refuse_models_without_batchnorm(method):
    with pytest.raises(ConfigError, match=f"^{method}: the backbone has no BatchNorm.*use mcunet-s-bn"):
        prepare(build_model("tiny-cnn"), method)


@pytest.mark.parametrize("method,overrides", [("bn-adapt", {"momentum_start": "0", "momentum_floor": "0"}),
                                              ("alpha-bn", {"alpha": "0"})])
def test_batchnorm_methods_reduce_to_the_source_model(method, overrides, digits):
    """With no weight on the test statistics both methods are exactly the BatchNorm model in eval mode."""
    torch.manual_seed(0)
    backbone = build_model("mcunet-s-bn")
    with torch.no_grad():  # non-trivial source statistics
        for mod in backbone.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    adaptable = prepare(backbone, method, overrides)
    x = _stream(digits, 1)
    with torch.no_grad():
        expected = backbone(x)
    torch.testing.assert_close(adaptable.step(x), expected, rtol=1e-5, atol=1e-5)


def test_tinytta_early_exit_selects_the_first_confident_prefix_and_updates_only_heads_that_ran(digits):
    x = _stream(digits, 2)
    # pooled heads at every exit (exit_grid 1, every stage open), so that each head reads its pooled tap and learns
    pooled = {"exit_grid": "1", "exit_stages": ""}
    never = _prepared(_backbone("tiny-cnn"), "tinytta", exit_threshold="1", **pooled)
    never.step(x[:1])
    assert never.method.last_exit == never.method.depth - 1 and never.method.exits() is None
    always = _prepared(_backbone("tiny-cnn"), "tinytta", exit_threshold="0", align="false", **pooled)
    m = always.method
    heads_before = [{k: v.clone() for k, v in h.state_dict().items()} for h in m.heads]
    with torch.no_grad():  # exit 0 alone: the prediction is the first head's
        expected = torch.log_softmax(m.heads[0](always.taps(x[1:2])[0]), dim=-1)
    torch.testing.assert_close(always.step(x[1:2]), expected, rtol=1e-5, atol=1e-5)
    assert m.last_exit == 0 and m.exit_counts == [1, 0, 0, 0] and m.exit_taken.tolist() == [1.0, 0.0, 0.0, 0.0]
    # alone, the first head's soft target is its own prediction (a zero gradient): feedback with a
    # label moves it, and still only the heads that ran
    label = (int(expected.argmax()) + 1) % m.num_classes
    always.step(x[1:2], torch.nn.functional.one_hot(torch.tensor([label]), m.num_classes).float())
    assert m.last_exit == 0
    for k, head in enumerate(m.heads):
        same = all(torch.equal(v, head.state_dict()[n]) for n, v in heads_before[k].items())
        assert same == (k > 0), f"head {k} {'did not change' if same else 'changed'}"


def test_agreement_trackers_open_a_confidence_bin_only_on_evidence():
    from edgetune.methods import exit_agreement as ea
    onehot = ea.bin_onehot(torch.tensor([0.0, 0.55, 1.0]), 10)
    assert onehot.argmax(-1).tolist() == [0, 5, 9] and onehot.sum().item() == 3
    suffix = ea.suffix_matrix(4)
    sample = ea.bin_onehot(torch.tensor([0.9]), 4)  # the top bin
    empty = torch.zeros(1, 4)
    assert ea.open_exits(sample, empty, empty, suffix, 0.5, 0.1).item() == 0.0  # no evidence: closed
    hits, seen = empty, empty
    for agree in (True,) * 10:  # samples that ran to the end, confident in the top bin, agreeing with the final
        final = torch.tensor([[0.9, 0.1]]) if agree else torch.tensor([[0.1, 0.9]])
        hits, seen = ea.update(hits, seen, sample, torch.cat([torch.tensor([[0.9, 0.1]]), final]), torch.ones(1), 0.1)
    assert ea.open_exits(sample, hits, seen, suffix, 0.5, 0.1).item() == 1.0
    low = ea.bin_onehot(torch.tensor([0.3]), 4)  # a lower bin with no evidence of its own sums the bins above it
    assert ea.open_exits(low, hits, seen, suffix, 0.5, 0.1).item() == 1.0
    unchanged = ea.update(hits, seen, sample, torch.tensor([[0.9, 0.1], [0.1, 0.9]]), torch.zeros(1), 0.1)
    assert torch.equal(unchanged[0], hits) and torch.equal(unchanged[1], seen)  # an exited sample teaches nothing
    for _ in range(30):  # disagreement closes it again
        hits, seen = ea.update(hits, seen, sample, torch.tensor([[0.9, 0.1], [0.1, 0.9]]), torch.ones(1), 0.1)
    assert ea.open_exits(sample, hits, seen, suffix, 0.5, 0.1).item() == 0.0
    clock, explored = torch.zeros(1), []
    for _ in range(7):
        e, clock = ea.explore_now(clock, 3)
        explored.append(int(e.item()))
    assert explored == [1, 0, 0, 1, 0, 0, 1]


def test_tinytta_agreement_rule_exits_where_trackers_are_open_and_explores(digits):
    a = _prepared(_backbone("tiny-cnn"), "tinytta", exit_agreement="0.5", exit_explore="3", align="false")
    m = a.method
    assert m.exits() is not None and {"exit_hits", "exit_seen", "exit_clock"} <= set(m.state_names())
    x = _stream(digits, 4)
    a.step(x[:1])  # trackers empty: every exit closed (and sample 0 explores)
    assert m.last_exit == m.depth - 1 and m.exit_seen.sum() > 0
    with torch.no_grad():  # every bin of every exit agreed so far: all open
        m.exit_hits.fill_(1.0)
        m.exit_seen.fill_(1.0)
    before = m.exit_hits.clone()
    a.step(x[1:2])
    assert m.last_exit == 0 and torch.equal(m.exit_hits, before)  # exited: the trackers stay as they were
    a.step(x[2:3])
    assert m.last_exit == 0
    a.step(x[3:4])  # the third sample after the first: exploration runs it to the end
    assert m.last_exit == m.depth - 1


@pytest.mark.parametrize("model", ["tiny-cnn", "vit-tiny"])
def test_vqt_starts_as_the_source_classifier(model, digits):
    backbone = _backbone(model)
    # unaligned: alignment moves it
    adaptable = prepare(backbone, "vqt", known_settings("vqt", {"lr": "0", "align": "false"}))
    x = _stream(digits, 1)
    with torch.no_grad():
        torch.testing.assert_close(adaptable.step(x), backbone(x), rtol=1e-5, atol=1e-5)


def test_tent_trains_exactly_the_normalisation_affines():
    from edgetune.models.blocks import NORM_LAYERS
    backbone = build_model("mcunet-s")
    method = prepare(backbone, "tent").method
    norms = [m for m in backbone.modules() if isinstance(m, NORM_LAYERS)]
    assert len(method.trainable_names()) == 2 * len(norms) and norms
    assert all(n.startswith("net.") and n.rsplit(".", 1)[1] in ("weight", "bias") for n in method.trainable_names())


@pytest.mark.parametrize("method,key,value", [
    ("tinytta", "lr", "-1"), ("tinytta", "lr", "nan"), ("tinytta", "lr", "1e30"), ("tinytta", "hidden", "-4"),
    ("tinytta", "exit_threshold", "1.5"), ("feature-align", "momentum_floor", "inf"), ("lst", "temperature", "0"),
    ("lst", "reduction", "0"), ("vqt", "queries", "0"), ("tent", "momentum", "1"), ("alpha-bn", "alpha", "-0.1")])
def test_out_of_range_settings_are_refused_with_the_range(method, key, value):
    with pytest.raises(ConfigError) as err:
        METHODS.get(method).Config().replace({key: value})
    message = str(err.value)
    assert "\n" not in message and f"{key}=" in message and re.search(r"outside [\[(][-\d.]+, [-\d.e+]+[\])]", message)


def test_every_numeric_setting_of_every_method_declares_its_range():
    for name in METHODS.names():
        config = METHODS.get(name).Config()
        for f in dataclasses.fields(config):
            if isinstance(getattr(config, f.name), (int, float)) and not isinstance(getattr(config, f.name), bool):
                assert getattr(config, f.name) in f.metadata["range"], (name, f.name)  # the default is valid too
