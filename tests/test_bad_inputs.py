"""Every bad input is refused in one line that says how to fix it (issue "Nothing silent, nothing lost").

Two tables, one row per case: ``CLI`` (the verbs, run in-process through ``edgetune.cli.main``)
and ``API`` (the public functions). A CLI row asserts the exit code, that stderr is exactly one
line starting with ``edgetune: error:`` and that the line names the fix; an API row asserts the
``EdgetuneError`` subclass, a one-line message and the fix. Cases that used to be accepted
silently (NaN weights, data of another shape, clamped counts, edited bundles) are rows too: the
refusal is what they assert. The artefacts are real: a tiny-cnn checkpoint trained for one epoch
on digits, and one exported cortex-m4 bundle (project written, not built).
"""
from __future__ import annotations


import hashlib
import io
import json
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from edgetune.cli import main
from edgetune.errors import CheckpointError, ConfigError, DataError, EdgetuneError, ModelError

# How a fix reads: a verb telling the user what to do next.
FIX = re.compile(r"\b(pass|give|use|run|re-run|rerun|drop|restore|check|re-export|export|pick|install|add|set|"
                 r"see|train|write|make|build|subclass|rebuild|remove|delete|choose|retrain|fix|save|bring|create)\b",
                 re.IGNORECASE)

USER_MODULE = '''
"""User callables for the bad-input table."""
from edgetune.models import build_model


def raises(num_classes=10, input_shape=(1, 32, 32)):
    raise RuntimeError("my model is broken")


def wrong_classes(num_classes=10, input_shape=(1, 32, 32)):
    return build_model("tiny-cnn", num_classes=3, input_shape=input_shape)


def wrong_shape(num_classes=10, input_shape=(1, 32, 32)):
    return build_model("tiny-cnn", num_classes=num_classes, input_shape=(3, 16, 16))


def not_a_model(num_classes=10, input_shape=(1, 32, 32)):
    return "a string"


NOT_CALLABLE = 3
'''


@dataclass
class Ctx:
    """Paths of the shared artefacts and a scratch folder per row."""

    ckpt: Path
    bundle: Path
    tmp: Path
    npz_other: Path  # a labelled .npz of 3 x 16 x 16 samples: another shape than the checkpoint's 1 x 32 x 32

    def file(self, name: str = "a-file", text: str = "x") -> Path:
        p = self.tmp / name
        p.write_text(text)
        return p

    def ckpt_copy(self, name: str = "ck") -> Path:
        out = self.tmp / name
        shutil.copytree(self.ckpt, out)
        return out

    def bundle_copy(self, name: str = "bd") -> Path:
        out = self.tmp / name
        shutil.copytree(self.bundle, out)
        return out


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("bad-inputs")
    ckpt, bundle = root / "ckpt", root / "bundle"
    assert main(["train-source", "--model", "tiny-cnn", "--epochs", "1", "--train-images", "300", "-o",
                 str(ckpt)]) == 0
    assert main(["export", "tiny-cnn", "--method", "feature-align", "--checkpoint", str(ckpt), "-o", str(bundle),
                 "--target", "cortex-m4"]) == 0
    rng = np.random.default_rng(0)
    npz = root / "other.npz"
    np.savez(npz, x_train=rng.random((40, 3, 16, 16), dtype=np.float32), y_train=rng.integers(0, 10, 40),
             x_test=rng.random((20, 3, 16, 16), dtype=np.float32), y_test=rng.integers(0, 10, 20))
    (root / "et_bad_user_models.py").write_text(USER_MODULE)
    sys.path.insert(0, str(root))
    yield ckpt, bundle, npz
    sys.path.remove(str(root))


@pytest.fixture
def ctx(artefacts, tmp_path) -> Ctx:
    ckpt, bundle, npz = artefacts
    return Ctx(ckpt, bundle, tmp_path, npz)


# ---------------------------------------------------------------- damaging artefacts


def _save_weights(ck: Path, state: dict, fix_hash: bool = True) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    (ck / "weights.pt").write_bytes(buf.getvalue())
    if fix_hash:  # a consistent checkpoint: only the content is wrong
        cfg = json.loads((ck / "config.json").read_text())
        cfg["sha256"] = hashlib.sha256(buf.getvalue()).hexdigest()
        (ck / "config.json").write_text(json.dumps(cfg))


def _state(ck: Path) -> dict:
    return torch.load(ck / "weights.pt", weights_only=True)


def ck_nonfinite(value: float) -> Callable[[Ctx], Path]:
    def make(c: Ctx) -> Path:
        ck = c.ckpt_copy()
        state = _state(ck)
        key = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
        state[key].view(-1)[0] = value
        _save_weights(ck, state)
        return ck
    return make


def ck_weights_bytes(how: str) -> Callable[[Ctx], Path]:
    def make(c: Ctx) -> Path:
        ck = c.ckpt_copy()
        raw = (ck / "weights.pt").read_bytes()
        new = {"truncated": raw[: len(raw) // 2], "empty": b"",
               "random": np.random.default_rng(1).bytes(len(raw))}[how]
        (ck / "weights.pt").write_bytes(new)
        return ck
    return make


def ck_state_edit(how: str) -> Callable[[Ctx], Path]:
    def make(c: Ctx) -> Path:
        ck = c.ckpt_copy()
        state = _state(ck)
        key = next(iter(state))
        if how == "missing-key":
            state.pop(key)
        elif how == "wrong-shape":
            state[key] = torch.zeros(3, 3)
        elif how == "extra-key":
            state["bogus.weight"] = torch.zeros(2)
        elif how == "unhashed":  # finite, right shapes, but not the weights config.json's sha256 names
            state[key] = state[key] + 0.01
        _save_weights(ck, state, fix_hash=how != "unhashed")
        return ck
    return make


def ck_config(edit: Callable[[dict], object], raw: str | None = None) -> Callable[[Ctx], Path]:
    def make(c: Ctx) -> Path:
        ck = c.ckpt_copy()
        if raw is not None:
            (ck / "config.json").write_text(raw)
            return ck
        cfg = json.loads((ck / "config.json").read_text())
        new = edit(cfg)
        (ck / "config.json").write_text(json.dumps(cfg if new is None else new))
        return ck
    return make


def _pop(key: str) -> Callable[[dict], None]:
    def edit(cfg: dict) -> None:
        cfg.pop(key)
    return edit


def _put(key: str, value) -> Callable[[dict], None]:
    def edit(cfg: dict) -> None:
        cfg[key] = value
    return edit


def bd_edit(how: str) -> Callable[[Ctx], Path]:
    """A copy of the bundle with one file edited after export."""
    def make(c: Ctx) -> Path:
        b = c.bundle_copy()
        if how == "frozen":
            p = b / "frozen.onnx"
            raw = bytearray(p.read_bytes())
            raw[len(raw) // 2] ^= 0xFF
            p.write_bytes(bytes(raw))
        elif how == "trainable-missing":
            (b / "trainable.onnx").unlink()
        elif how == "manifest-lr":
            m = json.loads((b / "manifest.json").read_text())
            m["trainable"]["optimizer"]["lr"] = 10.0
            (b / "manifest.json").write_text(json.dumps(m))
        elif how == "manifest-classes":
            m = json.loads((b / "manifest.json").read_text())
            m["num_classes"] = 7
            (b / "manifest.json").write_text(json.dumps(m))
        elif how == "initial-state":
            with np.load(b / "initial_state.npz") as d:
                arrays = {k: d[k] * 0 + 1e30 for k in d.files}
            np.savez(b / "initial_state.npz", **arrays)
        elif how == "initial-state-missing":
            (b / "initial_state.npz").unlink()
        elif how == "source":
            s = json.loads((b / "source.json").read_text())
            s["data"] = "fashion-mnist"
            (b / "source.json").write_text(json.dumps(s))
        elif how == "manifest-list":
            (b / "manifest.json").write_text("[1, 2]")
        elif how == "manifest-garbage":
            (b / "manifest.json").write_text("{not json")
        elif how == "manifest-format":
            m = json.loads((b / "manifest.json").read_text())
            m["format"] = "edgetune-bundle/99"
            (b / "manifest.json").write_text(json.dumps(m))
        elif how == "manifest-type":
            m = json.loads((b / "manifest.json").read_text())
            m["num_classes"] = "ten"
            (b / "manifest.json").write_text(json.dumps(m))
        elif how == "manifest-missing":
            (b / "manifest.json").unlink()
        elif how == "no-project":
            shutil.rmtree(b / "cortex-m4")
        return b
    return make


def plain(path: str) -> Callable[[Ctx], str]:
    return lambda c: path


# ---------------------------------------------------------------- the CLI table

CK = "{ck}"  # placeholder: the row's checkpoint (the good one unless the row makes another)
BD = "{bd}"  # placeholder: the row's bundle
EVAL = ["eval", "--checkpoint", CK, "--method", "source", "--corruption", "gaussian_noise",
        "--samples-per-corruption", "8"]
EXPORT = ["export", "tiny-cnn", "--method", "feature-align", "--checkpoint", CK, "-o", "{tmp}/out"]
TRAIN = ["train-source", "--model", "tiny-cnn", "--epochs", "1", "--train-images", "64", "-o", "{tmp}/ck-new"]
SIM = ["simulate", BD, "--n", "20"]


@dataclass(frozen=True)
class Row:
    id: str
    argv: list[str]
    code: int
    ck: Callable[[Ctx], Path] | None = None  # makes the row's checkpoint
    bd: Callable[[Ctx], Path] | None = None  # makes the row's bundle
    setup: Callable[[Ctx], None] | None = None  # anything else the row needs on disk
    says: str = ""  # a phrase the error line must contain (what is wrong, or the fix's key)


def _mkfile(name: str) -> Callable[[Ctx], None]:
    return lambda c: c.file(name) and None


def _mkdir_junk(name: str) -> Callable[[Ctx], None]:
    def make(c: Ctx) -> None:
        (c.tmp / name).mkdir()
        (c.tmp / name / "notes.txt").write_text("mine")
    return make


CLI = [
    # usage: argparse, exit 2
    Row("no-verb", [], 2),
    Row("unknown-verb", ["frobnicate"], 2),
    Row("list-unknown-kind", ["list", "gadgets"], 2),
    Row("train-no-model", ["train-source", "-o", "{tmp}/x"], 2),
    Row("train-no-out", ["train-source", "--model", "tiny-cnn"], 2),
    Row("train-epochs-0", [*TRAIN, "--epochs", "0"], 2, says="positive"),
    Row("train-epochs-text", [*TRAIN, "--epochs", "ten"], 2),
    Row("train-lr-negative", [*TRAIN, "--lr", "-1"], 2, says="positive"),
    Row("train-lr-nan", [*TRAIN, "--lr", "nan"], 2),
    Row("train-lr-inf", [*TRAIN, "--lr", "inf"], 2),
    Row("train-lr-zero", [*TRAIN, "--lr", "0"], 2),
    Row("train-seed-negative", [*TRAIN, "--seed", "-1"], 2),
    Row("train-seed-huge", [*TRAIN, "--seed", str(2 ** 40)], 2),
    Row("train-images-0", [*TRAIN, "--train-images", "0"], 1, says="positive"),
    Row("train-images-negative", [*TRAIN, "--train-images", "-5"], 1, says="positive"),
    Row("train-images-text", [*TRAIN, "--train-images", "many"], 2),
    # train-source: values and paths
    Row("train-images-more-than-data", [*TRAIN, "--train-images", "100000"], 1, says="1258"),
    Row("train-model-typo", [*TRAIN, "--model", "tiny-cn"], 1, says="did you mean"),
    Row("train-model-unknown", [*TRAIN, "--model", "resnet9000"], 1, says="edgetune list models"),
    Row("train-user-model-raises", [*TRAIN, "--model", "et_bad_user_models:raises"], 4, says="my model is broken"),
    Row("train-user-model-wrong-classes", [*TRAIN, "--model", "et_bad_user_models:wrong_classes"], 4),
    Row("train-user-model-wrong-shape", [*TRAIN, "--model", "et_bad_user_models:wrong_shape"], 4),
    Row("train-user-model-not-backbone", [*TRAIN, "--model", "et_bad_user_models:not_a_model"], 4),
    Row("train-user-model-not-callable", [*TRAIN, "--model", "et_bad_user_models:NOT_CALLABLE"], 4),
    Row("train-user-module-missing", [*TRAIN, "--model", "no_such_module_xyz:f"], 1),
    Row("train-user-attr-missing", [*TRAIN, "--model", "et_bad_user_models:nothing"], 1),
    Row("train-out-under-file", [*TRAIN[:-1], "{tmp}/a-file/ck"], 1, setup=_mkfile("a-file")),
    Row("train-out-is-file", [*TRAIN[:-1], "{tmp}/a-file"], 5, setup=_mkfile("a-file")),
    Row("train-out-non-checkpoint-folder", [*TRAIN[:-1], "{tmp}/mine"], 5, setup=_mkdir_junk("mine"),
        says="not a checkpoint"),
    Row("train-data-unknown", [*TRAIN, "--data", "no-such-dataset"], 3),
    Row("train-data-missing-path", [*TRAIN, "--data", "{tmp}/gone/"], 3),
    Row("train-data-garbage-npz", [*TRAIN, "--data", "{tmp}/bad.npz"], 3, setup=lambda c: c.file("bad.npz", "junk")),
    Row("train-data-npz-no-labels", [*TRAIN, "--data", "{tmp}/nolab.npz"], 3,
        setup=lambda c: np.savez(c.tmp / "nolab.npz", x_train=np.zeros((10, 1, 8, 8), np.float32),
                                 x_test=np.zeros((5, 1, 8, 8), np.float32))),
    Row("train-data-npz-nan", [*TRAIN, "--data", "{tmp}/nan.npz"], 3,
        setup=lambda c: np.savez(c.tmp / "nan.npz", x_train=np.full((10, 1, 8, 8), np.nan, np.float32),
                                 y_train=np.zeros(10, int), x_test=np.zeros((5, 1, 8, 8), np.float32),
                                 y_test=np.zeros(5, int))),
    Row("train-resize-bad", [*TRAIN, "--resize", "0x0"], 2),
    # import-checkpoint
    Row("import-no-weights", ["import-checkpoint", "--model", "tiny-cnn", "-o", "{tmp}/o"], 2),
    Row("import-weights-missing", ["import-checkpoint", "--model", "tiny-cnn", "--weights", "{tmp}/gone.pt", "-o",
                                   "{tmp}/o"], 5),
    Row("import-weights-garbage", ["import-checkpoint", "--model", "tiny-cnn", "--weights", "{tmp}/w.pt", "-o",
                                   "{tmp}/o"], 5, setup=lambda c: c.file("w.pt", "garbage")),
    Row("import-weights-empty", ["import-checkpoint", "--model", "tiny-cnn", "--weights", "{tmp}/w.pt", "-o",
                                 "{tmp}/o"], 5, setup=lambda c: c.file("w.pt", "")),
    Row("import-weights-nan", ["import-checkpoint", "--model", "tiny-cnn", "--weights", "{ck}/weights.pt", "-o",
                               "{tmp}/o"], 5, ck=ck_nonfinite(float("nan")), says="finite"),
    Row("import-input-shape-bad", ["import-checkpoint", "--model", "tiny-cnn", "--weights", "{ck}/weights.pt",
                                   "--input-shape", "a,b", "-o", "{tmp}/o"], 1),
    Row("import-num-classes-0", ["import-checkpoint", "--model", "tiny-cnn", "--weights", "{ck}/weights.pt",
                                 "--num-classes", "0", "-o", "{tmp}/o"], 2),
    Row("import-num-classes-mismatch", ["import-checkpoint", "--model", "tiny-cnn", "--weights", "{ck}/weights.pt",
                                        "--num-classes", "4", "-o", "{tmp}/o"], 5),
    Row("import-out-under-file", ["import-checkpoint", "--model", "tiny-cnn", "--weights", "{ck}/weights.pt", "-o",
                                  "{tmp}/a-file/o"], 1, setup=_mkfile("a-file")),
    Row("import-model-unknown", ["import-checkpoint", "--model", "nosuchnet", "--weights", "{ck}/weights.pt", "-o",
                                 "{tmp}/o"], 1, says="edgetune list models"),
    Row("import-user-model-raises", ["import-checkpoint", "--model", "et_bad_user_models:raises", "--weights",
                                     "{ck}/weights.pt", "-o", "{tmp}/o"], 4),
    # eval: checkpoints
    Row("eval-no-method", ["eval", "--checkpoint", CK], 2),
    Row("eval-no-checkpoint", ["eval", "--method", "source"], 2),
    Row("eval-checkpoint-missing", [*EVAL[:2], "{tmp}/gone", *EVAL[3:]], 5),
    Row("eval-checkpoint-empty-folder", [*EVAL[:2], "{tmp}/empty", *EVAL[3:]], 5,
        setup=lambda c: (c.tmp / "empty").mkdir()),
    Row("eval-checkpoint-is-file", [*EVAL[:2], "{tmp}/a-file", *EVAL[3:]], 5, setup=_mkfile("a-file")),
    Row("eval-weights-nan", EVAL, 5, ck=ck_nonfinite(float("nan")), says="finite"),
    Row("eval-weights-inf", EVAL, 5, ck=ck_nonfinite(float("inf")), says="finite"),
    Row("eval-weights-neg-inf", EVAL, 5, ck=ck_nonfinite(float("-inf")), says="finite"),
    Row("eval-weights-truncated", EVAL, 5, ck=ck_weights_bytes("truncated")),
    Row("eval-weights-empty", EVAL, 5, ck=ck_weights_bytes("empty")),
    Row("eval-weights-random", EVAL, 5, ck=ck_weights_bytes("random")),
    Row("eval-weights-missing-key", EVAL, 5, ck=ck_state_edit("missing-key")),
    Row("eval-weights-wrong-shape", EVAL, 5, ck=ck_state_edit("wrong-shape")),
    Row("eval-weights-extra-key", EVAL, 5, ck=ck_state_edit("extra-key")),
    Row("eval-weights-hash-mismatch", EVAL, 5, ck=ck_state_edit("unhashed"), says="sha256"),
    Row("eval-config-list", EVAL, 5, ck=ck_config(lambda cfg: [cfg])),
    Row("eval-config-not-json", EVAL, 5, ck=ck_config(None, raw="{model: tiny")),
    Row("eval-config-empty", EVAL, 5, ck=ck_config(None, raw="")),
    Row("eval-config-no-input-shape", EVAL, 5, ck=ck_config(_pop("input_shape")), says="input_shape"),
    Row("eval-config-no-model", EVAL, 5, ck=ck_config(_pop("model"))),
    Row("eval-config-no-hash", EVAL, 5, ck=ck_config(_pop("sha256"))),
    Row("eval-config-classes-text", EVAL, 5, ck=ck_config(_put("num_classes", "ten")), says="num_classes"),
    Row("eval-config-classes-zero", EVAL, 5, ck=ck_config(_put("num_classes", 0))),
    Row("eval-config-classes-wrong", EVAL, 5, ck=ck_config(_put("num_classes", 4))),
    Row("eval-config-shape-text", EVAL, 5, ck=ck_config(_put("input_shape", "1x32x32"))),
    Row("eval-config-shape-negative", EVAL, 5, ck=ck_config(_put("input_shape", [1, -32, 32]))),
    Row("eval-config-model-number", EVAL, 5, ck=ck_config(_put("model", 7))),
    Row("eval-config-model-unknown", EVAL, 1, ck=ck_config(_put("model", "nosuchnet"))),
    Row("eval-config-format", EVAL, 5, ck=ck_config(_put("format", "edgetune-checkpoint/99"))),
    # eval: the checkpoint's data is the default stream; a checkpoint whose recorded data is gone says so
    Row("eval-default-data-gone", EVAL, 3, ck=ck_config(_put("data", "/nonexistent/edgetune/gone.npz")),
        says="gone.npz"),
    Row("eval-model-mismatch", [*EVAL, "--model", "mcunet-s"], 1, says="--model"),
    Row("eval-method-unknown", [*EVAL[:-5], "tnet", *EVAL[-4:]], 1, says="did you mean"),
    Row("eval-set-lr-negative", [*EVAL[:4], "tent", *EVAL[5:], "--set", "lr=-1"], 1, says="lr"),
    Row("eval-set-lr-nan", [*EVAL[:4], "tent", *EVAL[5:], "--set", "lr=nan"], 1, says="lr"),
    Row("eval-set-lr-huge", [*EVAL[:4], "tent", *EVAL[5:], "--set", "lr=1e30"], 1, says="lr"),
    Row("eval-set-lr-text", [*EVAL[:4], "tent", *EVAL[5:], "--set", "lr=fast"], 1, says="lr"),
    Row("eval-set-hidden-negative", [*EVAL[:4], "tinytta", *EVAL[5:], "--set", "hidden=-4"], 1, says="hidden"),
    Row("eval-set-hidden-float", [*EVAL[:4], "tinytta", *EVAL[5:], "--set", "hidden=2.5"], 1, says="hidden"),
    Row("eval-set-unknown-key", [*EVAL[:4], "tent", *EVAL[5:], "--set", "lrr=0.1"], 1),
    Row("eval-set-no-equals", [*EVAL[:4], "tent", *EVAL[5:], "--set", "lr"], 1, says="key=value"),
    Row("eval-severity-6", [*EVAL, "--severity", "6"], 2),
    Row("eval-severity-0", [*EVAL, "--severity", "0"], 2),
    Row("eval-protocol-unknown", [*EVAL, "--protocol", "random"], 2),
    Row("eval-fraction-2", [*EVAL, "--labelled-fraction", "2"], 2),
    Row("eval-fraction-negative", [*EVAL, "--labelled-fraction", "-0.1"], 2),
    Row("eval-samples-0", [*EVAL, "--samples-per-corruption", "0"], 2),
    Row("eval-seed-negative", [*EVAL, "--seed", "-3"], 2),
    Row("eval-runtime-unknown", [*EVAL, "--runtime", "gpu"], 2),
    Row("eval-corruption-unknown", [*EVAL[:6], "gausian_noise", *EVAL[7:]], 1, says="edgetune list corruptions"),
    Row("eval-data-other-shape", [*EVAL, "--data", "{npz}"], 3, says="16"),
    Row("eval-data-missing", [*EVAL, "--data", "{tmp}/gone.npz"], 3),
    Row("eval-taps-with-checkpoint", [*EVAL, "--taps", "a,b"], 1, says="drop"),
    Row("eval-onnx-with-checkpoint", [*EVAL, "--model", "{tmp}/m.onnx"], 1, setup=_mkfile("m.onnx"), says="drop"),
    Row("eval-onnx-garbage", ["eval", "--model", "{tmp}/m.onnx", "--method", "source"], 4, setup=_mkfile("m.onnx")),
    Row("eval-onnx-missing", ["eval", "--model", "{tmp}/gone.onnx", "--method", "source"], 4),
    # export
    Row("export-no-out", EXPORT[:-2], 2),
    Row("export-seed-negative", [*EXPORT, "--seed", "-1"], 2),
    Row("export-seed-text", [*EXPORT, "--seed", "x"], 2),
    Row("export-out-under-file", [*EXPORT[:-1], "{tmp}/a-file/out"], 1, setup=_mkfile("a-file")),
    Row("export-out-non-bundle-folder", [*EXPORT[:-1], "{tmp}/mine"], 6, setup=_mkdir_junk("mine"),
        says="not a bundle"),
    Row("export-model-mismatch", ["export", "mcunet-s", *EXPORT[2:]], 1, says="model argument"),
    Row("export-method-unknown", [*EXPORT[:3], "fature-align", *EXPORT[4:]], 1, says="did you mean"),
    Row("export-target-unknown", [*EXPORT, "--target", "cortex-m99"], 1, says="edgetune list targets"),
    Row("export-data-other-shape", [*EXPORT, "--data", "{npz}"], 3, says="16"),
    Row("export-set-lr-negative", [*EXPORT, "--set", "lr=-1"], 1, says="lr"),
    Row("export-learner-unknown-key", [*EXPORT, "--learner", "optimiser=adam"], 1, says="optimizer"),
    Row("export-learner-not-integer", [*EXPORT, "--learner", "replay=many"], 1, says="whole number"),
    Row("export-learner-bad-optimizer", [*EXPORT, "--learner", "optimizer=rmsprop"], 1, says="adam"),
    Row("export-learner-no-value", [*EXPORT, "--learner", "adam"], 1, says="KEY=VALUE"),
    Row("eval-learner-unknown-key", [*EVAL, "--learner", "optimiser=adam"], 1, says="optimizer"),
    Row("eval-learner-not-integer", [*EVAL, "--learner", "replay=many"], 1, says="whole number"),
    Row("eval-learner-without-labels", [*EVAL, "--learner", "replay=4"], 1, says="--labelled-fraction"),
    Row("export-task-new-no-stream", [*EXPORT, "--task", "new"], 1, says="--data"),
    Row("export-task-new-no-class-layer-learns", [*EXPORT, "--task", "new", "--data", "digits"], 1,
        says="cannot learn new classes"),
    Row("export-task-unknown", [*EXPORT, "--task", "other"], 2),
    Row("export-weights-nan", EXPORT, 5, ck=ck_nonfinite(float("nan")), says="finite"),
    Row("export-weights-truncated", EXPORT, 5, ck=ck_weights_bytes("truncated")),
    Row("export-no-checkpoint", ["export", "tiny-cnn", "--method", "source", "-o", "{tmp}/out"], 2),
    # inspect
    Row("inspect-missing", ["inspect", "{tmp}/gone"], 5),
    Row("inspect-not-bundle", ["inspect", "{tmp}"], 5),
    Row("inspect-manifest-missing", ["inspect", BD], 5, bd=bd_edit("manifest-missing")),
    Row("inspect-manifest-garbage", ["inspect", BD], 5, bd=bd_edit("manifest-garbage")),
    Row("inspect-manifest-list", ["inspect", BD], 5, bd=bd_edit("manifest-list")),
    Row("inspect-manifest-format", ["inspect", BD], 5, bd=bd_edit("manifest-format")),
    Row("inspect-manifest-type", ["inspect", BD], 5, bd=bd_edit("manifest-type")),
    Row("inspect-frozen-edited", ["inspect", BD], 5, bd=bd_edit("frozen"), says="frozen.onnx"),
    Row("inspect-trainable-missing", ["inspect", BD], 5, bd=bd_edit("trainable-missing")),
    Row("inspect-manifest-edited", ["inspect", BD], 5, bd=bd_edit("manifest-lr"), says="manifest"),
    Row("inspect-initial-state-edited", ["inspect", BD], 5, bd=bd_edit("initial-state"), says="initial_state"),
    Row("inspect-initial-state-missing", ["inspect", BD], 5, bd=bd_edit("initial-state-missing"),
        says="initial_state"),
    Row("inspect-source-edited", ["inspect", BD], 5, bd=bd_edit("source"), says="source.json"),
    Row("inspect-onnx-garbage", ["inspect", "{tmp}/m.onnx"], 4, setup=_mkfile("m.onnx")),
    # build
    Row("build-missing", ["build", "{tmp}/gone"], 5),
    Row("build-no-project", ["build", BD], 5, bd=bd_edit("no-project"), says="--target"),
    Row("build-target-not-in-bundle", ["build", BD, "--target", "cortex-m7"], 5),
    Row("build-frozen-edited", ["build", BD], 5, bd=bd_edit("frozen"), says="frozen.onnx"),
    Row("build-manifest-edited", ["build", BD], 5, bd=bd_edit("manifest-classes"), says="manifest"),
    Row("build-initial-state-edited", ["build", BD], 5, bd=bd_edit("initial-state"), says="initial_state"),
    # simulate
    Row("simulate-missing", ["simulate", "{tmp}/gone"], 5),
    Row("simulate-n-0", [*SIM[:2], "--n", "0"], 1, says="--n must be at least 1"),
    Row("simulate-n-text", [*SIM[:2], "--n", "lots"], 2),
    Row("simulate-n-huge", [*SIM[:2], "--n", "1000000000"], 1, says="--n"),
    Row("simulate-seed-negative", [*SIM, "--seed", "-1"], 2),
    Row("simulate-fraction-1.5", [*SIM, "--labelled-fraction", "1.5"], 2),
    Row("simulate-severity-9", [*SIM, "--severity", "9"], 2),
    Row("simulate-protocol-unknown", [*SIM, "--protocol", "shuffle"], 2),
    Row("simulate-workdir-file", [*SIM, "--workdir", "{tmp}/a-file"], 1, setup=_mkfile("a-file"), says="--workdir"),
    Row("simulate-workdir-under-file", [*SIM, "--workdir", "{tmp}/a-file/w"], 1, setup=_mkfile("a-file"),
        says="--workdir"),
    Row("simulate-data-other-shape", [*SIM, "--data", "{npz}"], 3, says="16"),
    Row("simulate-data-missing", [*SIM, "--data", "{tmp}/gone.npz"], 3),
    Row("simulate-corruption-unknown", [*SIM, "--corruption", "fog2"], 1),
    Row("simulate-target-unknown", [*SIM, "--target", "cortex-m99"], 5),
    Row("simulate-frozen-edited", SIM, 5, bd=bd_edit("frozen"), says="frozen.onnx"),
    Row("simulate-manifest-edited", SIM, 5, bd=bd_edit("manifest-lr"), says="manifest"),
    Row("simulate-initial-state-edited", SIM, 5, bd=bd_edit("initial-state"), says="initial_state"),
    Row("simulate-source-edited", SIM, 5, bd=bd_edit("source"), says="source.json"),
    Row("simulate-stream-of-other-classes", [*SIM, "--data", "fashion-mnist", "--labelled-fraction", "1"], 1,
        says="--task new"),
]


def _argv(row: Row, c: Ctx) -> list[str]:
    ck = row.ck(c) if row.ck else c.ckpt
    bd = row.bd(c) if row.bd else c.bundle
    if row.setup:
        row.setup(c)
    return [a.format(ck=ck, bd=bd, tmp=c.tmp, npz=c.npz_other) for a in row.argv]


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("row", CLI, ids=[r.id for r in CLI])
def test_cli_bad_input(row: Row, ctx: Ctx, capsys, monkeypatch):
    monkeypatch.delenv("EDGETUNE_DEBUG", raising=False)
    code, out, err = run_cli(_argv(row, ctx), capsys)
    assert err.count("\n") == 1 and err.startswith("edgetune: error: "), err
    assert "Traceback" not in err and "internal error" not in err, err
    assert code == row.code, (code, err)
    assert FIX.search(err.split("edgetune: error: ", 1)[1]), f"no fix in: {err}"
    assert row.says in err, err


def test_cli_rows_are_distinct_and_many():
    assert len({r.id for r in CLI}) == len(CLI)
    assert len(CLI) + len(API) >= 100


# ---------------------------------------------------------------- the API table


@dataclass(frozen=True)
class ApiRow:
    id: str
    call: Callable[[Ctx], object]
    error: type[EdgetuneError]
    says: str = ""


def _backbone(c: Ctx):
    from edgetune.checkpoint import load_checkpoint
    return load_checkpoint(c.ckpt)[0]


def _prepared(c: Ctx, method: str = "feature-align", overrides: dict | None = None):
    from edgetune.adapt import prepare
    return prepare(_backbone(c), method, overrides, model_name="tiny-cnn")


def _fit(c: Ctx, data) -> object:
    from edgetune.adapt import fit
    return fit(_prepared(c), data, progress=False, use_cache=False)


def _load(spec) -> Callable[[Ctx], object]:
    def call(c: Ctx):
        from edgetune.data import load_data
        return load_data(spec(c) if callable(spec) else spec)
    return call


def _export(c: Ctx, out) -> object:
    from edgetune.adapt import fit
    from edgetune.data import load_data
    from edgetune.export import export
    a = _prepared(c)
    digits = load_data("digits")
    fit(a, digits, progress=False)
    return export(a, digits, out(c), progress=False)


def _evaluate(c: Ctx, **kw) -> object:
    from edgetune.evaluate import evaluate
    args = dict(method="source", data="digits", corruptions="gaussian_noise", severity=5, protocol="episodic",
                samples_per_corruption=8, progress=False)
    args.update(kw)
    return evaluate(_backbone(c), "tiny-cnn", args.pop("method"), args.pop("data"), args.pop("corruptions"),
                    args.pop("severity"), args.pop("protocol"), **args)


def _npz_classes(c: Ctx, classes: int) -> str:
    """A labelled .npz of the checkpoint's 1 x 32 x 32 samples with ``classes`` classes (in the row's folder)."""
    rng = np.random.default_rng(0)
    path = c.tmp / f"classes{classes}.npz"
    y = np.arange(60) % classes
    np.savez(path, x_train=rng.random((60, 1, 32, 32), dtype=np.float32), y_train=y,
             x_test=rng.random((60, 1, 32, 32), dtype=np.float32), y_test=y)
    return str(path)


def _learner():
    from edgetune.methods.base import Learner
    return Learner(replay=4)


def _simulate(c: Ctx, bundle=None, **kw) -> object:
    from edgetune.simulate import simulate
    return simulate(bundle(c) if bundle else c.bundle, **kw)


def _load_ck(make) -> Callable[[Ctx], object]:
    def call(c: Ctx):
        from edgetune.checkpoint import load_checkpoint
        return load_checkpoint(make(c) if callable(make) else make)
    return call


def _build(name: str, **kw) -> Callable[[Ctx], object]:
    def call(c: Ctx):
        from edgetune.models import build_model
        return build_model(name, **kw)
    return call


API = [
    ApiRow("build_model-unknown", _build("tiny-cn"), ConfigError, "did you mean"),
    ApiRow("build_model-unknown-lists", _build("nosuchnet"), ConfigError, "edgetune list models"),
    ApiRow("build_model-user-raises", _build("et_bad_user_models:raises"), ModelError, "my model is broken"),
    ApiRow("build_model-user-wrong-classes", _build("et_bad_user_models:wrong_classes", num_classes=10), ModelError),
    ApiRow("build_model-user-wrong-shape", _build("et_bad_user_models:wrong_shape", input_shape=(1, 32, 32)),
           ModelError),
    ApiRow("build_model-user-not-backbone", _build("et_bad_user_models:not_a_model"), ModelError),
    ApiRow("build_model-user-not-callable", _build("et_bad_user_models:NOT_CALLABLE"), ModelError),
    ApiRow("build_model-user-import", _build("no_such_module_xyz:f"), ConfigError),
    ApiRow("build_model-shape-negative", _build("tiny-cnn", input_shape=(1, -3, 3)), ConfigError),
    ApiRow("build_model-shape-rank", _build("tiny-cnn", input_shape=(1,)), ConfigError),
    ApiRow("build_model-classes-0", _build("tiny-cnn", num_classes=0), ConfigError, "num_classes"),
    ApiRow("build_model-classes-negative", _build("tiny-cnn", num_classes=-2), ConfigError, "num_classes"),
    ApiRow("load_checkpoint-missing", _load_ck("/nonexistent/edgetune-ckpt"), CheckpointError),
    ApiRow("load_checkpoint-nan", _load_ck(ck_nonfinite(float("nan"))), CheckpointError, "finite"),
    ApiRow("load_checkpoint-inf", _load_ck(ck_nonfinite(float("inf"))), CheckpointError, "finite"),
    ApiRow("load_checkpoint-truncated", _load_ck(ck_weights_bytes("truncated")), CheckpointError),
    ApiRow("load_checkpoint-random", _load_ck(ck_weights_bytes("random")), CheckpointError),
    ApiRow("load_checkpoint-config-list", _load_ck(ck_config(lambda cfg: [cfg])), CheckpointError),
    ApiRow("prepare-unknown-method", lambda c: _prepared(c, "tnet"), ConfigError, "did you mean"),
    ApiRow("prepare-lr-negative", lambda c: _prepared(c, "tent", {"lr": "-1"}), ConfigError, "lr"),
    ApiRow("prepare-lr-nan", lambda c: _prepared(c, "tent", {"lr": "nan"}), ConfigError, "lr"),
    ApiRow("prepare-hidden-negative", lambda c: _prepared(c, "tinytta", {"hidden": "-4"}), ConfigError, "hidden"),
    ApiRow("prepare-unknown-key", lambda c: _prepared(c, "tent", {"nope": "1"}), ConfigError),
    ApiRow("export-out-under-file", lambda c: _export(c, lambda c2: c2.file("f") / "out"), EdgetuneError),
    ApiRow("evaluate-method-unknown", lambda c: _evaluate(c, method="tnet"), ConfigError),
    ApiRow("evaluate-data-other-shape", lambda c: _evaluate(c, data=str(c.npz_other)), DataError, "16"),
    ApiRow("evaluate-corruption-unknown", lambda c: _evaluate(c, corruptions="fogg"), ConfigError),
    ApiRow("simulate-n-0", lambda c: _simulate(c, n=0), ConfigError),
    ApiRow("simulate-n-huge", lambda c: _simulate(c, n=10 ** 9), ConfigError, "n"),
    ApiRow("simulate-data-other-shape", lambda c: _simulate(c, data=str(c.npz_other)), DataError, "16"),
    ApiRow("simulate-frozen-edited", lambda c: _simulate(c, bd_edit("frozen")), CheckpointError, "frozen.onnx"),
    ApiRow("simulate-workdir-file", lambda c: _simulate(c, workdir=c.file("wd")), ConfigError),
    ApiRow("simulate-stream-of-other-classes", lambda c: _simulate(c, data="fashion-mnist"), ConfigError, "--task new"),
    ApiRow("evaluate-learner-without-labels", lambda c: _evaluate(c, learner=_learner()), ConfigError,
           "--labelled-fraction"),
    ApiRow("evaluate-task-new-more-classes", lambda c: _evaluate(c, method="last-layer", task="new",
                                                                 labelled_fraction=1.0, data=_npz_classes(c, 12)),
           ConfigError, "12 classes"),
    ApiRow("load_data-unknown", _load("no-such-dataset"), DataError),
    ApiRow("load_data-missing-path", _load("/nonexistent/edgetune/data.npz"), DataError),
    ApiRow("load_data-garbage-npz", _load(lambda c: str(c.file("g.npz", "junk"))), DataError),
    ApiRow("load_data-int", _load(42), DataError),
]


@pytest.mark.parametrize("row", API, ids=[r.id for r in API])
def test_api_bad_input(row: ApiRow, ctx: Ctx):
    with pytest.raises(EdgetuneError) as info:
        row.call(ctx)
    message = str(info.value)
    assert isinstance(info.value, row.error), (type(info.value).__name__, message)
    assert "\n" not in message, message
    assert FIX.search(message), f"no fix in: {message}"
    assert row.says in message, message


# ---------------------------------------------------------------- what used to pass silently, now said


def test_eval_defaults_to_the_checkpoint_data(ctx: Ctx, capsys):
    """No --data: the stream is the checkpoint's training data (an .npz here), not digits."""
    ck = ctx.tmp / "npz-ck"
    assert main(["train-source", "--model", "tiny-cnn", "--epochs", "1", "--data", str(ctx.npz_other), "-o",
                 str(ck)]) == 0
    code, out, err = run_cli(["eval", "--checkpoint", str(ck), "--method", "source", "--corruption", "none",
                              "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert "other.npz" in json.dumps(report["data"]) and "digits" not in json.dumps(report["data"])


def test_describe_says_as_given(artefacts):
    """A graph the user quantised is described as such, not as calibrated on 0 images."""
    import dataclasses

    from edgetune.export import load_manifest
    manifest = load_manifest(artefacts[1])
    q = dataclasses.replace(manifest.quantization, calibration_method="as given", calibration_samples=0,
                            calibration_data="model.onnx")
    text = dataclasses.replace(manifest, quantization=q).describe()
    assert "quantised as given (model.onnx)" in text and "calibrated on 0" not in text


def test_a_bad_input_with_debug_shows_the_traceback(ctx: Ctx):
    ck = ck_nonfinite(float("nan"))(ctx)
    with pytest.raises(CheckpointError):
        main(["--debug", *[a.format(ck=ck) for a in EVAL]])


def test_copy_of_bundle_is_intact(ctx: Ctx, capsys):
    """The table's edits are to copies: an untouched copy of the bundle still inspects (the check is not
    refusing everything)."""
    code, out, err = run_cli(["inspect", str(ctx.bundle_copy())], capsys)
    assert code == 0 and err == "", err
    assert "feature-align on tiny-cnn" in out



