"""Model zoo, checkpoints, data streams and the registry."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edgetune.checkpoint import load_checkpoint, save_checkpoint
from edgetune.data import TEST_CORRUPTIONS, build_stream, corrupt, parse_corruptions
from edgetune.data.datasets import load_fashion_mnist
from edgetune.errors import CheckpointError, ConfigError, DataError, ModelError
from edgetune.models import MODELS, build_model
from edgetune.registry import Registry


@pytest.mark.parametrize("name", ["tiny-cnn", "mcunet-s", "mcunet-s-bn", "mcunet-s-gn", "vit-tiny"])
def test_zoo_folds_for_export_without_changing_outputs(name):
    torch.manual_seed(0)
    model = build_model(name).eval()
    if name == "mcunet-s-bn":  # non-trivial running statistics
        model.train()
        with torch.no_grad():
            model(torch.rand(16, 1, 32, 32))
        model.eval()
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), model.for_export()(x), atol=1e-5)
    assert len(model.stage_shapes()) == 4


def test_mcunet_size_and_depthwise():
    model = build_model("mcunet-s")
    n = sum(p.numel() for p in model.parameters())
    assert 100_000 <= n <= 300_000
    assert any(isinstance(m, torch.nn.Conv2d) and m.groups > 1 for m in model.modules())


def test_user_model_reference_and_errors():
    model = build_model("examples.user_model:small_cnn")
    assert model.stage_widths() == [8, 16]
    with pytest.raises(ConfigError, match="cannot import"):
        build_model("no.such.module:thing")
    with pytest.raises(ModelError, match="not an edgetune Backbone"):
        build_model("torch.nn:Identity")


def test_registry_did_you_mean():
    with pytest.raises(ConfigError, match="did you mean 'mcunet-s'"):
        MODELS.get("mcunet_s")
    reg: Registry[int] = Registry("thing")
    reg.add("a", 1)
    with pytest.raises(ConfigError, match="registered twice"):
        reg.add("a", 2)


def test_checkpoint_round_trip_and_corruption(tmp_path):
    model = build_model("tiny-cnn")
    save_checkpoint(tmp_path, "tiny-cnn", model, {"data": "digits"})
    loaded, cfg = load_checkpoint(tmp_path)
    assert cfg["model"] == "tiny-cnn"
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    raw = bytearray((tmp_path / "weights.pt").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (tmp_path / "weights.pt").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="is not a folder|lacks config.json"):
        load_checkpoint(tmp_path / "missing")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(tmp_path)


def test_digits_split(digits):
    assert digits.train_x.dtype == np.uint8 and digits.train_x.shape[1:] == (32, 32)
    assert len(digits.test_y) == 359 and len(set(digits.test_y)) == 10
    assert not set(map(bytes, digits.test_x[:50])) & set(map(bytes, digits.train_x))


def test_streams_are_deterministic_and_follow_the_protocol(digits):
    names = ("gaussian_noise", "contrast")
    a = build_stream(digits, names, 5, "episodic", seed=1, samples_per_corruption=40)
    b = build_stream(digits, names, 5, "episodic", seed=1, samples_per_corruption=40)
    assert all(np.array_equal(x.images, y.images) and np.array_equal(x.labels, y.labels) for x, y in zip(a, b))
    assert [s.reset for s in a] == [True, True]
    cont = build_stream(digits, names, 5, "continual", seed=1, samples_per_corruption=40)
    assert [s.reset for s in cont] == [True, False]
    shifted = build_stream(digits, names, 5, "label-shift", seed=1, samples_per_corruption=40)
    runs = np.sum(np.diff(shifted[0].labels) != 0)
    assert runs == len(set(shifted[0].labels)) - 1  # one run per class
    c = build_stream(digits, names, 5, "episodic", seed=2, samples_per_corruption=40)
    assert not np.array_equal(a[0].images, c[0].images)


def test_corruptions_change_images_and_reject_bad_names(digits):
    x = digits.test_x[:8]
    assert len(parse_corruptions("all")) == 15 and parse_corruptions("all") == TEST_CORRUPTIONS
    for name in ("gaussian_noise", "contrast", "glass_blur"):
        y = corrupt(x, name, 5, seed=0)
        assert y.shape == x.shape and y.dtype == np.uint8 and not np.array_equal(x, y)
    with pytest.raises(ConfigError, match="unknown"):
        parse_corruptions("gaussian_noize")
    with pytest.raises(ConfigError, match="severity"):
        corrupt(x, "contrast", 6, seed=0)
    with pytest.raises(ConfigError, match="protocol"):
        build_stream(digits, ("contrast",), 5, "online")


def test_fashion_mnist_missing_names_the_apt_command(monkeypatch, tmp_path):
    monkeypatch.setattr("edgetune.data.datasets.FASHION_MNIST_DIR", tmp_path)
    with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist()


def test_checkpoint_config_is_json(tiny_cnn):
    _, ckpt, report = tiny_cnn
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["model"] == "tiny-cnn" and report["test_accuracy"] > 0.85
