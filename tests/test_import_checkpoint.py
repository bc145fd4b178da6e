"""Pretrained torch weights in (``edgetune import-checkpoint``) and a checked ``load_checkpoint``.

Each bad input is one line on stderr, the error class's exit code, and names the fix.
"""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest
import torch

from edgetune.checkpoint import load_checkpoint
from edgetune.cli import main
from edgetune.errors import CheckpointError, EdgetuneError
from edgetune.models import build_model

USER_MODEL = "examples.user_model:small_cnn"


@pytest.fixture
def weights(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    """A small user model with seeded random weights, saved the way people save them."""
    torch.manual_seed(3)
    model = build_model(USER_MODEL, num_classes=7).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # not the builder's init: the import must carry these values
    path = tmp_path / "w.pt"
    torch.save(model.state_dict(), path)
    return model, path


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("edgetune: error: "), err
    return err


def test_import_round_trip_reproduces_the_model(weights, tmp_path, capsys):
    model, path = weights
    out = tmp_path / "ckpt"
    assert main(["import-checkpoint", "--model", USER_MODEL, "--weights", str(path), "-o", str(out)]) == 0
    assert "7 classes" in capsys.readouterr().out  # class count read from classifier.weight
    loaded, config = load_checkpoint(out)
    x = torch.randn(5, *model.input_shape)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert config["imported"]["weights"] == "w.pt"
    assert config["imported"]["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert config["input_shape"] == [1, 32, 32] and config["model"] == USER_MODEL


def test_import_lists_every_mismatch_in_one_line(weights, tmp_path, capsys):
    model, path = weights
    state = model.state_dict()
    dropped = next(iter(state))
    state.pop(dropped)
    state["extra.weight"] = torch.zeros(3)
    state["classifier.bias"] = torch.zeros(4)  # 7 rows in classifier.weight
    torch.save(state, path)
    assert main(["import-checkpoint", "--model", USER_MODEL, "--weights", str(path), "-o",
                 str(tmp_path / "c")]) == CheckpointError.exit_code
    err = _one_line(capsys)
    assert f"missing: {dropped}" in err and "unexpected: extra.weight" in err
    assert "shape mismatch: classifier.bias (4,) vs model (7,)" in err and "architecture" in err
    assert not (tmp_path / "c").exists()  # nothing written for a refused import


@pytest.mark.parametrize("damage, fragment, fix", [
    ("nan", "NaN/Inf in: classifier.weight", "retrain"),
    ("module", "holds a pickled object", "torch.save(model.state_dict()"),
    ("empty", "is empty (0 bytes)", "torch.save(model.state_dict()"),
    ("random", "is not a torch file", "torch.save(model.state_dict()"),
    ("truncated", "truncated or not a torch file", "torch.save(model.state_dict()"),
    ("list", "holds list, not a state dict", "torch.save(model.state_dict()"),
])
def test_bad_weight_files_are_one_line(weights, tmp_path, capsys, damage, fragment, fix):
    model, path = weights
    raw = path.read_bytes()
    if damage == "nan":
        state = model.state_dict()
        state["classifier.weight"][0, 0] = float("nan")
        torch.save(state, path)
    elif damage == "module":
        torch.save(model, path)
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "random":
        path.write_bytes(bytes(range(256)) * 8)
    elif damage == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "list":
        torch.save([torch.zeros(2)], path)
    assert main(["import-checkpoint", "--model", USER_MODEL, "--weights", str(path), "-o",
                 str(tmp_path / "c")]) == CheckpointError.exit_code
    err = _one_line(capsys)
    assert fragment in err and fix in err


def test_import_options_and_output_are_checked(weights, tmp_path, capsys):
    _, path = weights
    afile = tmp_path / "f"
    afile.write_text("x")
    assert main(["import-checkpoint", "--model", USER_MODEL, "--weights", str(path), "-o", str(afile / "c")]) == 1
    assert "under the file" in _one_line(capsys)
    assert main(["import-checkpoint", "--model", USER_MODEL, "--weights", str(tmp_path / "none.pt"), "-o",
                 str(tmp_path / "c")]) == CheckpointError.exit_code
    assert "is not a file" in _one_line(capsys)
    assert main(["import-checkpoint", "--model", USER_MODEL, "--weights", str(path), "--input-shape", "1,x",
                 "-o", str(tmp_path / "c")]) == 1
    assert "--input-shape must be C,H,W" in _one_line(capsys)
    assert main(["import-checkpoint", "--model", USER_MODEL, "--weights", str(path), "--input-shape", "3,32,32",
                 "-o", str(tmp_path / "c")]) == CheckpointError.exit_code
    assert "shape mismatch: stages.0" in _one_line(capsys)  # the first conv reads 1 channel, not 3
    assert main(["import-checkpoint", "--model", "examples.user_model:nothing", "--weights", str(path), "-o",
                 str(tmp_path / "c")]) == 1
    assert "cannot import" in _one_line(capsys)


def _rewrite(ckpt: Path, config=None, raw: bytes | None = None) -> None:
    if raw is not None:
        (ckpt / "weights.pt").write_bytes(raw)
        if config is None:
            config = json.loads((ckpt / "config.json").read_text())
            config["sha256"] = hashlib.sha256(raw).hexdigest()  # damage that the checksum does not catch
    if config is not None:
        (ckpt / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("damage, code, fragment", [
    ("config-list", CheckpointError.exit_code, "config.json holds a JSON list"),
    ("no-input-shape", CheckpointError.exit_code, "'input_shape' must be [C, H, W]"),
    ("wrong-types", CheckpointError.exit_code, "'num_classes' must be a positive integer (got 'ten')"),
    ("nan", CheckpointError.exit_code, "NaN/Inf in: classifier.bias"),
    ("zero-length", CheckpointError.exit_code, "is empty (0 bytes)"),
    ("truncated", CheckpointError.exit_code, "does not match the sha256"),
    ("random", CheckpointError.exit_code, "is not a torch file"),
    ("unknown-model", 1, "unknown name 'no-such-net'"),
])
def test_damaged_checkpoints_are_one_line(weights, tmp_path, capsys, damage, code, fragment):
    model, path = weights
    ckpt = tmp_path / "ckpt"
    assert main(["import-checkpoint", "--model", USER_MODEL, "--weights", str(path), "-o", str(ckpt)]) == 0
    config = json.loads((ckpt / "config.json").read_text())
    raw = (ckpt / "weights.pt").read_bytes()
    if damage == "config-list":
        _rewrite(ckpt, [config])
    elif damage == "no-input-shape":
        _rewrite(ckpt, {k: v for k, v in config.items() if k != "input_shape"})
    elif damage == "wrong-types":
        _rewrite(ckpt, {**config, "num_classes": "ten"})
    elif damage == "nan":
        state = model.state_dict()
        state["classifier.bias"][2] = float("inf")
        buf = io.BytesIO()
        torch.save(state, buf)
        _rewrite(ckpt, raw=buf.getvalue())
    elif damage == "zero-length":
        _rewrite(ckpt, raw=b"")
    elif damage == "truncated":
        (ckpt / "weights.pt").write_bytes(raw[:100])
    elif damage == "random":
        _rewrite(ckpt, raw=b"\x00garbage" * 50)
    elif damage == "unknown-model":
        _rewrite(ckpt, {**config, "model": "no-such-net"})
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(ckpt), "--method", "source", "--corruption", "contrast"]) == code
    err = _one_line(capsys)
    assert fragment in err
    if code == CheckpointError.exit_code:  # every "no usable checkpoint" names both ways to make one
        assert "import-checkpoint" in err or "torch.save" in err or "retrain" in err
    with pytest.raises(EdgetuneError):  # the API raises the same typed error
        load_checkpoint(ckpt)
