"""``edgetune eval --runtime compiled``: the whole sample in the bundle's compiled C on the host, the
same protocol and report as the torch runtimes (issue 3's compiled host runtime)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from edgetune.adapt import prepare
from edgetune.cli import main
from edgetune.errors import ConfigError
from edgetune.evaluate import evaluate
from edgetune.models import build_model

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs a host C compiler (apt install gcc)")
CORRUPTIONS = ("gaussian_noise", "contrast")


def _with_runtime_work() -> list[str]:
    """Exportable methods whose runtime has work beyond the graph: a momentum schedule or early exits."""
    from edgetune.export import exportable_methods

    def declared(name: str) -> bool:
        c = prepare(build_model("tiny-cnn"), name).method.contract()
        return c.schedule is not None or c.exits is not None

    return [n for n in exportable_methods() if declared(n)]


@pytest.mark.parametrize("method", _with_runtime_work())
def test_compiled_runtime_follows_the_int8_reference(tiny_cnn, digits, method):
    """Same segments, resets and int8 taps as ``--runtime onnx-int8`` (whose method step is torch):
    the C step predicts the same class for (nearly) every sample; float summation order may flip a
    near-tie, nothing more."""
    args = (tiny_cnn[0], "tiny-cnn", method, digits, CORRUPTIONS, 5, "episodic", 0, 60)
    small = {"fit_view_images": "200"} if method == "tinytta" else {}  # a small fit of tinytta's grid exit head
    ref = evaluate(*args, backbone_kind="onnx-int8", progress=False, overrides=small)
    got = evaluate(*args, backbone_kind="compiled", progress=False, overrides=small)
    assert got.backbone.startswith("compiled")
    assert got.result.samples == ref.result.samples == 120
    assert list(got.result.per_corruption) == list(CORRUPTIONS)
    same = np.mean(np.array(got.result.predictions) == np.array(ref.result.predictions))
    assert same >= 0.98, same
    assert abs(got.result.mean - ref.result.mean) <= 0.02
    assert got.source.predictions == ref.source.predictions  # no adaptation: int8 taps are bit-exact
    declared = got.result.early_exit_rate is not None
    assert declared == (prepare(build_model("tiny-cnn"), method).method.contract().exits is not None)


def test_compiled_runtime_refuses_methods_that_adapt_the_backbone(tiny_cnn, digits):
    with pytest.raises(ConfigError, match="no compiled program"):
        evaluate(tiny_cnn[0], "tiny-cnn", "tent", digits, ("contrast",), 5, "episodic", 0, 5,
                 backbone_kind="compiled", progress=False)


def test_cli_eval_compiled_prints_the_same_json(tiny_cnn, capsys):
    assert main(["eval", "--checkpoint", str(tiny_cnn[1]), "--method", "feature-align", "--corruption", "contrast",
                 "--samples-per-corruption", "30", "--runtime", "compiled", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["backbone"].startswith("compiled") and out["samples"] == 30
    assert set(out["per_corruption"]) == {"contrast"} and 0.0 <= out["mean_online_accuracy"] <= 1.0


def test_cli_export_for_the_host_writes_the_compiled_artifacts(tiny_cnn, tmp_path, capsys):
    out = tmp_path / "bundle"
    assert main(["export", "tiny-cnn", "--method", "feature-align", "--checkpoint", str(tiny_cnn[1]),
                 "-o", str(out)]) == 0
    assert "int8 backbone compiled for this machine" in capsys.readouterr().out
    host = out / "host"
    assert any(host.glob("*.so")) and (host / "model" / "et_model_gen.c").is_file()
    bare = tmp_path / "bare"
    assert main(["export", "tiny-cnn", "--method", "feature-align", "--checkpoint", str(tiny_cnn[1]),
                 "-o", str(bare), "--no-compile"]) == 0
    assert not (bare / "host").exists() and (bare / "manifest.json").is_file()
