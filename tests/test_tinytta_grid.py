"""tinytta's grid exit heads and open exits: what the heads read, which exits the runtime probes, which heads learn.

Untrained backbones from the zoo (no fit, no export): the settings' meaning only. The compiled chain (torch =
onnxruntime = host C = QEMU, fewer instructions for an early exit) is checked by tests/test_exits.py on the
default configuration, which uses these heads.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgetune.adapt import prepare
from edgetune.errors import ConfigError
from edgetune.methods import shifted_views
from edgetune.models import MODELS


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
    assert any(p is m.heads[0].weight for p in m.fit_parameters())
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
    pooled = _tinytta("mcunet-s", (1, 32, 32), exit_grid="1")
    assert pooled.method.fit_views(pooled.frozen, images, labels, 0) is None  # pooled heads: the plain fit


@pytest.mark.parametrize("settings", [{"exit_grid": "0"}, {"exit_stages": "3"}])
def test_bad_grid_or_stage_is_a_config_error(settings):
    with pytest.raises(ConfigError, match="exit_"):
        _tinytta("mcunet-s", (1, 32, 32), **settings)
