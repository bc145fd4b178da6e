"""tinytta's grid exit heads and open exits: what the heads read, which exits the runtime probes, which heads learn.

Untrained backbones from the zoo (no fit, no export): the settings' meaning only. The compiled chain (torch =
onnxruntime = host C = QEMU, fewer instructions for an early exit) is checked by tests/test_exits.py on the
default configuration, which uses these heads.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from edgetune.adapt import prepare
from edgetune.errors import ConfigError
from edgetune.methods import shifted_views
from edgetune.models import MODELS, build_model


def _tinytta(model: str, shape: tuple[int, ...], **settings):
    backbone = MODELS.get(model)(num_classes=10, input_shape=shape)
    return prepare(backbone, "tinytta", {k: str(v) for k, v in settings.items()}, model_name=model)


def test_a_grid_applies_where_the_stage_map_is_2d_and_divisible_else_the_global_pool():
    a = _tinytta("mcunet-s", (1, 32, 32), exit_grid="4,4,4")  # stage maps 16x16, 8x8, 4x4
    assert a.method.exit_grids == (4, 4, 4)
    assert [t.pooled for t in a.method.taps()] == [False, False, False, True]
    assert [h.in_features for h in a.method.heads] == [16 * 16, 24 * 16, 40 * 16]
    odd = _tinytta("mcunet-s", (1, 28, 28), exit_grid="4,4,3")  # 14x14 and 7x7 maps: 4 and 3 do not divide
    assert odd.method.exit_grids == (1, 1, 1) and all(t.pooled for t in odd.method.taps())
    sensor = _tinytta("imu-conv1d", (6, 100), exit_grid="4", exit_stages="0", exit_threshold="0.5")
    assert set(sensor.method.exit_grids) == {1}  # 1-D maps: no grid
    assert sensor.method.exits() is None  # and exit 0, meant to read a grid, stays closed: no exits at all


def test_features_pool_a_map_to_its_grid_and_pass_pooled_taps_through():
    a = _tinytta("mcunet-s", (1, 32, 32), exit_grid="4")
    m, taps = a.method, a.taps(torch.randn(1, 1, 32, 32))
    feats = m.features(taps)
    assert feats[0].shape == (1, 16 * 16)
    want = taps[0][:, :, :4, :4].mean(dim=(2, 3))  # the top-left cell of the 4x4 grid, every channel
    torch.testing.assert_close(feats[0].view(1, 16, 16)[:, :, 0], want)
    assert all(torch.equal(a, b) for a, b in zip(feats[1:], taps[1:]))
    assert all(torch.equal(a, b) for a, b in zip(m.features(feats), feats))  # features of features


def test_only_open_exits_are_declared_and_taken():
    a = _tinytta("mcunet-s", (1, 32, 32), exit_stages="1", exit_threshold="0.0")
    m = a.method
    assert m.exits().stages == (1, 3) and m.exit_taken.shape == (2,)
    x = torch.randn(1, 1, 32, 32)
    m.step(a.taps(x))
    assert m.last_exit == 1  # threshold 0: the first open exit, not exit 0
    assert m.exit_taken.tolist() == [1.0, 0.0]
    closed = _tinytta("mcunet-s", (1, 32, 32), exit_stages="1", exit_threshold="1.0").method
    assert closed.exits() is None  # never exits: no probes declared


def test_grid_heads_are_fit_but_frozen_at_test_time_pooled_heads_learn():
    a = _tinytta("mcunet-s", (1, 32, 32), exit_grid="4", exit_stages="0", exit_threshold="1.0")
    m = a.method
    assert "heads.0.weight" not in m.trainable_names() and "heads.1.weight" in m.trainable_names()
    assert not m.heads[0].weight.requires_grad  # no gradient reaches it at test time, not even a zero one
    assert any(p is m.heads[0].weight for p in m.fit_parameters()) and m.heads[0].weight.requires_grad  # the fit
    m.reset()  # as adapt.fit ends: the test-time flags again
    assert {n for n, p in m.named_parameters() if p.requires_grad} == set(m.trainable_names())
    before = {k: v.clone() for k, v in m.state_dict().items() if k.startswith("heads.")}
    for _ in range(3):
        m.step(a.taps(torch.rand(1, 1, 32, 32)))
    assert torch.equal(m.heads[0].weight, before["heads.0.weight"])
    assert not torch.equal(m.heads[1].weight, before["heads.1.weight"])
    learning = _tinytta("mcunet-s", (1, 32, 32), exit_grid="4", grid_heads_learn="true").method
    assert "heads.0.weight" in learning.trainable_names()


def test_fit_views_are_shifted_copies_with_half_label_half_classifier_targets():
    a = _tinytta("mcunet-s", (1, 32, 32), exit_grid="4")
    images = (np.random.RandomState(0).rand(20, 32, 32) * 255).astype(np.uint8)
    labels = torch.arange(20) % 10
    feats, targets = a.method.fit_views(a.frozen, images, labels, 0)
    n = 20 * shifted_views.COPIES
    assert [f.shape for f in feats] == [(n, 256), (n, 24), (n, 40), (n, 96)]
    torch.testing.assert_close(targets.sum(1), torch.ones(n))
    assert bool((targets[torch.arange(n), labels.repeat(shifted_views.COPIES)] >= 0.5).all())
    small = _tinytta("mcunet-s", (1, 32, 32), fit_view_images="5")  # the first 5 images per copy
    feats, targets = small.method.fit_views(small.frozen, images, labels, 0)
    assert len(targets) == 5 * shifted_views.COPIES and feats[0].shape == (5 * shifted_views.COPIES, 256)
    pooled = _tinytta("mcunet-s", (1, 32, 32), exit_grid="1")
    assert pooled.method.fit_views(pooled.frozen, images, labels, 0) is None  # pooled heads: the plain fit


# Whether stage 0's map takes the 4x4 grid, for the backbone kinds this names (the rest follow their stage output).
GRID_AT_STAGE_0 = {"tiny-cnn": True, "mcunet-s": True, "resnet8": True, "vit-tiny": False, "imu-conv1d": False,
                   "ds-cnn": False}


@pytest.mark.parametrize("model", MODELS.names())
def test_the_default_exit_opens_on_a_divisible_stage_0_map_and_closes_elsewhere(model):
    """tinytta's default (exit_grid 4, exit_stages 0, threshold 0.5) on every zoo backbone at its own input: a
    frozen grid head and one probe after stage 0 where stage 0 outputs a 2-D map whose sides 4 divides; elsewhere
    (transformer tokens, 1-D sensor maps, odd maps) no exits and every head pooled and learning, as without exits.
    exit_threshold=1 turns the exit off in one setting."""
    torch.manual_seed(0)
    backbone = build_model(model)
    a = prepare(backbone, "tinytta", model_name=model)
    m = a.method
    with torch.no_grad():
        stage0 = backbone.stages[0](torch.zeros(1, *backbone.input_shape))
    grid = stage0.dim() == 4 and stage0.shape[2] % 4 == 0 and stage0.shape[3] % 4 == 0
    assert grid == GRID_AT_STAGE_0.get(model, grid)
    heads = {n for n, _ in m.heads.named_parameters(prefix="heads")}
    if grid:
        assert m.exit_grids == (4,) + (1,) * (m.depth - 2) and m.exits().stages == (0, m.depth - 1)
        assert not m.taps()[0].pooled and all(t.pooled for t in m.taps()[1:])
        assert set(m.trainable_names()) == {n for n in heads if not n.startswith("heads.0.")}  # exit 0 frozen
    else:
        assert set(m.exit_grids) == {1} and m.exits() is None and all(t.pooled for t in m.taps())
        assert set(m.trainable_names()) == heads
    x = torch.rand(1, *backbone.input_shape)
    logits = a.step(x)
    assert logits.shape == (1, m.num_classes) and bool(torch.isfinite(logits).all())
    assert m.last_exit in m.exit_stages
    off = prepare(copy.deepcopy(backbone), "tinytta", {"exit_threshold": "1"}, model_name=model).method
    assert off.exits() is None and off.exit_grids == m.exit_grids  # the same heads, never an exit, no probes


def test_the_default_grid_exit_is_taken_when_confident_and_its_head_stays_frozen():
    a = _tinytta("mcunet-s", (1, 32, 32), exit_threshold="0.0", align="false", prior_rate="0")  # default exit, always
    m = a.method
    taps = a.taps(torch.rand(1, 1, 32, 32))
    with torch.no_grad():  # exit 0 alone: the prediction is the grid head's on stage 0's 4x4 cells
        expected = torch.log_softmax(m.heads[0](m.features(taps)[0]), dim=-1)
    before = m.heads[0].weight.clone()
    label = torch.nn.functional.one_hot(torch.tensor([(int(expected.argmax()) + 1) % 10]), 10).float()
    torch.testing.assert_close(m.step(taps, label), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.step(taps), expected, rtol=1e-5, atol=1e-5)
    assert m.last_exit == 0 and m.exit_taken.tolist() == [1.0, 0.0] and m.exit_counts == [1, 0, 0, 0]
    assert torch.equal(m.heads[0].weight, before)  # even a label does not move the frozen grid head


@pytest.mark.parametrize("settings", [{"exit_grid": "0"}, {"exit_stages": "3"}])
def test_bad_grid_or_stage_is_a_config_error(settings):
    with pytest.raises(ConfigError, match="exit_"):
        _tinytta("mcunet-s", (1, 32, 32), **settings)
