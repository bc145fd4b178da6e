"""Your own data through the CLI (issue 11's acceptance): an RGB image folder on the ResNet-8
reference model (train-source, eval on the torch / onnx-int8 / compiled runtimes, export for
cortex-m7 with --build, simulate with a corruption and with none), a .npz of 6 x 100 sensor
windows on the Conv1d reference model (eval under each sensor shift, simulate on cortex-m4 with
every prediction equal to the host build's), and the source roles (a checkpoint's recorded
source, never the stream's labelled split; unlabelled and no-source modes labelled in the JSON).

Everything goes through ``edgetune.cli.main``; data is written by the tests (small: a few hundred
samples, tiny epochs) so the file stays within a few minutes.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import needs_tool
from edgetune.cli import main

SENSOR_SHIFTS = 5  # `--corruption all` on 1-D inputs
MCU_TOOLS = ("arm-none-eabi-gcc", "qemu-system-arm", "make")
FIT = "fit_epochs=5"  # tinytta's exit heads: a short pre-deployment fit (the default 60 epochs is minutes here)
TINTS = np.array([[1.0, 0.3, 0.3], [0.3, 1.0, 0.3], [0.3, 0.3, 1.0]], dtype=np.float32)


def run_json(capsys, argv: list[str]) -> dict:
    """``edgetune <argv> --json``: exit code 0 and the one JSON object it prints."""
    capsys.readouterr()
    code = main([*argv, "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out)


def run_ok(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    code = main(argv)
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


# --- data written by the tests -------------------------------------------------------------------------

def write_rgb_folder(root: Path, per_class: int = 60, classes: int = 10) -> Path:
    """The built-in digits (1 x 32 x 32) tinted into three colour channels (a tint per sample, so
    colour carries no class) and written as RGB PNGs, one subfolder per class."""
    from edgetune.data import load_dataset

    digits = load_dataset("digits")
    rng = np.random.default_rng(0)
    folder = root / "rgb-digits"
    for c in range(classes):
        (folder / f"class_{c}").mkdir(parents=True)
        picks = np.flatnonzero(digits.train_y == c)[:per_class]
        for k, i in enumerate(picks):
            grey = digits.train_x[i].astype(np.float32)  # H x W uint8
            rgb = grey[..., None] * TINTS[rng.integers(3)][None, None, :]
            Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB").save(folder / f"class_{c}" / f"{k}.png")
    return folder


def sensor_windows(n: int, seed: int, classes: int = 6, phase: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """n windows of 6 channels x 100 samples: class k is a sine of frequency k+1 on channel k (and
    a weaker one on the next channel) in noise; ``phase`` shifts the recording (another user)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(classes, size=n)
    t = np.arange(100, dtype=np.float32) / 100
    x = rng.normal(0, 0.3, size=(n, 6, 100)).astype(np.float32)
    for i, k in enumerate(y):
        x[i, k] += np.sin(2 * np.pi * (k + 1) * t + phase + rng.uniform(0, 2 * np.pi))
        x[i, (k + 1) % 6] += 0.5 * np.sin(2 * np.pi * (k + 2) * t + rng.uniform(0, 2 * np.pi))
    return x.astype(np.float32), y.astype(np.int64)


@pytest.fixture(scope="module")
def rgb(tmp_path_factory) -> tuple[Path, Path]:
    """(image folder, resnet8 checkpoint trained on it through the CLI)."""
    root = tmp_path_factory.mktemp("own-rgb")
    folder = write_rgb_folder(root)
    ckpt = root / "ckpt"
    out = _train(["train-source", "--model", "resnet8", "--data", str(folder), "-o", str(ckpt), "--epochs", "10",
                  "--lr", "0.01"])
    assert "wrote" in out and "test accuracy" in out
    config = json.loads((ckpt / "config.json").read_text()) if (ckpt / "config.json").is_file() else None
    if config is not None:  # the checkpoint remembers the data it was trained on
        assert config.get("data") == str(folder.resolve()) or config.get("data") == str(folder)
    return folder, ckpt


@pytest.fixture(scope="module")
def sensors(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(.npz A, .npz B with another phase, imu-conv1d checkpoint trained on A through the CLI)."""
    root = tmp_path_factory.mktemp("own-npz")
    a, b = root / "a.npz", root / "b.npz"
    np.savez(a, **dict(zip("xy", sensor_windows(600, 0))))
    np.savez(b, **dict(zip("xy", sensor_windows(300, 1, phase=1.0))))
    ckpt = root / "ckpt"
    out = _train(["train-source", "--model", "imu-conv1d", "--data", str(a), "-o", str(ckpt), "--epochs", "6"])
    accuracy = float(out.split("test accuracy")[1].split("%")[0])
    assert accuracy > 60, out  # the class signal is learnt (chance: 16.7 %)
    return a, b, ckpt


def _train(argv: list[str]) -> str:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(argv)
    assert code == 0, buf.getvalue()
    return buf.getvalue()


# --- 1. an RGB image folder ----------------------------------------------------------------------------

@pytest.mark.parametrize("runtime", ["torch", "onnx-int8", "compiled"])
def test_rgb_folder_eval_with_tinytta_on_every_runtime(rgb, runtime, capsys):
    folder, ckpt = rgb
    d = run_json(capsys, ["eval", "--checkpoint", str(ckpt), "--method", "tinytta", "--corruption",
                          "none", "--samples-per-corruption", "30",
                          "--runtime", runtime, "--set", FIT])
    assert d["model"] == "resnet8" and d["method"] == "tinytta" and d["samples"] == 30
    assert str(folder.resolve()) in d["data"] or folder.name in d["data"]  # the stream defaults to the training data
    src = d["source_data"]
    assert src["mode"] == "labelled" and src["labels_used"] is True
    assert src["origin"] == "the checkpoint's training data"
    assert folder.name in src["data"] and src["samples"] > 0
    assert list(d["per_corruption"]) == ["none"]  # the folder as it is
    for acc in (*d["per_corruption"].values(), *d["source_per_corruption"].values()):
        assert 0.0 <= acc <= 1.0
    assert d["source_mean_online_accuracy"] > 0.3  # well above chance (0.1): the colour folder was learnt


@needs_tool(*MCU_TOOLS)
@pytest.mark.toolchain
def test_rgb_folder_export_for_cortex_m7_and_simulate(rgb, tmp_path, capsys):
    folder, ckpt = rgb
    bundle = tmp_path / "bundle"
    out = run_ok(capsys, ["export", "resnet8", "--method", "tinytta", "--checkpoint", str(ckpt), "--target",
                          "cortex-m7", "-o", str(bundle), "--build", "--set", FIT])
    assert "built fw.elf" in out and (bundle / "cortex-m7" / "build" / "fw.elf").is_file()
    recorded = json.loads((bundle / "source.json").read_text())
    assert folder.name in recorded["data"] and recorded["labels_used"] is True
    for corruption in ("fog", "none"):
        d = run_json(capsys, ["simulate", str(bundle), "--data", str(folder), "--corruption", corruption, "--n",
                              "12", "--workdir", str(tmp_path / f"sim-{corruption}")])
        assert d["target"] == "cortex-m7" and d["method"] == "tinytta" and d["n"] == 12
        assert d["corruption"] == corruption and folder.name in d["data"]
        assert 0.0 <= d["online_accuracy"] <= 1.0 and 0.0 <= d["source_accuracy"] <= 1.0
        assert d["sram_bytes"] > 0 and d["flash_bytes"] > 0 and d["instructions_per_sample"] > 100_000
        assert d["rejected"] == 0
    assert d["source_accuracy"] > 0.2  # the unshifted data: far above chance (0.1)


# --- 2. a .npz of sensor windows -----------------------------------------------------------------------

def test_sensor_npz_eval_with_feature_align_under_each_sensor_shift(sensors, capsys):
    a, _, ckpt = sensors
    d = run_json(capsys, ["eval", "--checkpoint", str(ckpt), "--method", "feature-align", "--corruption", "all",
                          "--samples-per-corruption", "30"])
    assert d["model"] == "imu-conv1d" and d["method"] == "feature-align" and d["samples"] == 30 * SENSOR_SHIFTS
    assert a.name in d["data"] and a.name in d["source_data"]["data"]
    assert len(d["per_corruption"]) == SENSOR_SHIFTS and set(d["per_corruption"]) == set(d["source_per_corruption"])
    for acc in (*d["per_corruption"].values(), *d["source_per_corruption"].values()):
        assert 0.0 <= acc <= 1.0
    # the shifts differ: not all five rows alike (a shift that does nothing would leave its row at the clean value)
    assert len({round(v, 4) for v in d["source_per_corruption"].values()}) > 1


@needs_tool(*MCU_TOOLS)
@pytest.mark.toolchain
def test_sensor_npz_simulate_on_cortex_m4_agrees_with_the_host_build(sensors, tmp_path, capsys):
    from edgetune.deploy import read_results
    from edgetune.deploy.host import HostModel
    from edgetune.simulate import stream_samples

    a, _, ckpt = sensors
    bundle = tmp_path / "bundle"
    out = run_ok(capsys, ["export", "imu-conv1d", "--method", "feature-align", "--checkpoint", str(ckpt),
                          "--target", "cortex-m4", "-o", str(bundle), "--build"])
    assert "built fw.elf" in out
    work = tmp_path / "sim"
    n, shift = 30, "offset_drift"
    d = run_json(capsys, ["simulate", str(bundle), "--corruption", shift, "--severity", "3", "--n", str(n),
                          "--workdir", str(work)])
    assert d["target"] == "cortex-m4" and d["n"] == n and a.name in d["data"] and d["corruption"] == shift
    assert d["sram_bytes"] > 0 and d["flash_bytes"] > 0
    # the same stream (one corruption: one episode) through the bundle's C built for the host
    x, _, resets, feedback = stream_samples(str(a), (shift,), 3, "episodic", n, input_shape=(6, 100))
    assert resets == [True] + [False] * (n - 1) and feedback == [-1] * n
    host = HostModel(bundle)
    host_predictions = [host.step(x[i]).prediction for i in range(n)]
    device = read_results(work / "adapt_results.bin")["prediction"].tolist()
    assert device == host_predictions
    assert d["online_accuracy"] == pytest.approx(np.mean(np.array(host_predictions) == _labels(str(a), shift, n)))


def _labels(data: str, shift: str, n: int) -> np.ndarray:
    from edgetune.simulate import stream_samples
    return stream_samples(data, (shift,), 3, "episodic", n, input_shape=(6, 100))[1]


# --- 3. source roles -----------------------------------------------------------------------------------

def test_eval_on_other_data_uses_the_checkpoints_recorded_source(sensors, capsys):
    a, b, ckpt = sensors
    d = run_json(capsys, ["eval", "--checkpoint", str(ckpt), "--method", "feature-align", "--data", str(b),
                          "--corruption", "none", "--samples-per-corruption", "30"])
    assert b.name in d["data"]  # the stream is B ...
    src = d["source_data"]
    assert a.name in src["data"] and b.name not in src["data"]  # ... the source A, never B's labelled split
    assert src["origin"] == "the checkpoint's training data" and src["mode"] == "labelled"
    assert src["split"] == "training split" and src["labels_used"] is True
    assert list(d["per_corruption"]) == ["none"]


@pytest.mark.parametrize("mode", ["unlabelled", "none"])
def test_source_free_modes_run_and_are_labelled(sensors, mode, capsys):
    a, b, ckpt = sensors
    argv = ["eval", "--checkpoint", str(ckpt), "--method", "feature-align", "--data", str(b), "--corruption",
            "none", "--samples-per-corruption", "40", "--source-mode", mode]
    if mode == "none":
        argv += ["--warmup", "10"]
    d = run_json(capsys, argv)
    src = d["source_data"]
    assert src["mode"] == mode and src["labels_used"] is False and d["samples"] == 40
    if mode == "unlabelled":
        assert a.name in src["data"] and src["split"] == "training split" and src["samples"] > 0
    else:
        assert "warm-up" in src["split"] and src["samples"] == 10 and b.name in src["data"] + src["origin"]
    acc = d["mean_online_accuracy"]
    assert acc is not None and 0.0 <= acc <= 1.0
