"""An existing ONNX file as the model: ``edgetune export model.onnx --taps ...`` and ``eval --model model.onnx``.

mcunet-s trained on digits, exported by torch to ONNX (float) and quantised by onnxruntime's
quantiser (QDQ, as a user would, calibrated on the images edgetune's own export calibrates on), goes
through export -> eval (torch / onnx-int8 / compiled) -> cortex-m4 simulate; its predictions equal the
torch-defined path's sample by sample. (With its owner's own calibration images the int8 model is a
different one: ``test_int8_qdq_in.py`` measures that case against onnxruntime.)
"""
from __future__ import annotations

import json
import logging
import shutil
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import helper

from edgetune.cli import main
from edgetune.data import to_tensor
from edgetune.errors import ConfigError, ModelError
from edgetune.evaluate import evaluate
from edgetune.export.quantize import calibration_images
from edgetune.models.onnx_backbone import load_onnx_backbone, tap_candidates

from conftest import needs_tool

STREAM = (("gaussian_noise",), 5, "episodic", 0, 40)
# The zoo's four stage outputs as torch.onnx.export names them (QDQ: the dequantised tensor after each).
ZOO_TAPS = ["/stages.0/stages.0.1/Add_output_0", "/stages.1/stages.1.1/Add_output_0",
            "/stages.2/stages.2.1/Add_output_0", "/stages.3/stages.3.3/stages.3.3.1/Clip_output_0"]


@pytest.fixture(scope="module")
def onnx_models(mcunet, digits, tmp_path_factory):
    """(float.onnx, qdq.onnx) of the digits-trained mcunet-s, written as their owners would."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    backbone = mcunet[0]
    out = tmp_path_factory.mktemp("onnx-in")
    float_path, qdq_path = out / "mcunet.onnx", out / "mcunet_qdq.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(backbone.for_export(), torch.zeros(1, *backbone.input_shape), str(float_path),
                          input_names=["input"], output_names=["logits"], opset_version=17, dynamo=False)

    class Images(CalibrationDataReader):
        def __init__(self) -> None:
            images = calibration_images(digits.train_x)
            self.feeds = iter([{"input": to_tensor(images[i:i + 1]).numpy()} for i in range(len(images))])

        def get_next(self):
            return next(self.feeds, None)

    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)
    quantize_static(str(float_path), str(qdq_path), Images(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    logging.getLogger().setLevel(level)
    return float_path, qdq_path


def _eval(backbone, name, method, digits, runtime):
    return evaluate(backbone, name, method, digits, *STREAM, backbone_kind=runtime, progress=False)


def test_float_onnx_is_the_torch_model(mcunet, onnx_models, digits):
    """Interpreted ONNX == the torch module, and every runtime predicts what the torch-defined path does."""
    zoo = mcunet[0]
    model = load_onnx_backbone(onnx_models[0])
    x = to_tensor(digits.test_x[:16])
    with torch.no_grad():
        assert float((model(x) - zoo(x)).abs().max()) < 1e-4
    assert model.num_classes == 10 and tuple(model.input_shape) == (1, 32, 32)
    for runtime in ("torch", "onnx-int8", "compiled") if shutil.which("gcc") else ("torch", "onnx-int8"):
        ref = _eval(zoo, "mcunet-s", "feature-align", digits, runtime)
        got = _eval(model, "mcunet.onnx", "feature-align", digits, runtime)
        assert got.result.predictions == ref.result.predictions, runtime
        assert got.source.predictions == ref.source.predictions, runtime


def test_qdq_onnx_is_taken_as_given(mcunet, onnx_models, digits, tmp_path, capsys):
    """No re-quantisation: frozen.onnx holds the user's own int8 weights; the compiled runtime follows
    onnxruntime on it, and predictions stay with the torch-defined (float-calibrated) path."""
    _, qdq = onnx_models
    candidates, per_stage = tap_candidates(qdq)
    assert len(per_stage) == 3 and all(t.endswith("DequantizeLinear_Output") for t in per_stage)
    out = tmp_path / "bundle"
    assert main(["export", str(qdq), "--taps", ",".join(per_stage), "--method", "tinytta", "--data", "digits",
                 "--no-compile", "--set", "fit_epochs=2", "-o", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quantization"]["calibration_method"] == "as given"
    assert len(manifest["frozen"]["outputs"]) == 3
    given = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(qdq)).graph.initializer
             if t.data_type == onnx.TensorProto.INT8}
    frozen = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(out / "frozen.onnx")).graph.initializer
              if t.data_type == onnx.TensorProto.INT8}
    assert frozen and all(np.array_equal(v, given[k]) for k, v in frozen.items())  # the user's int8 weights
    model = load_onnx_backbone(qdq)
    ref = _eval(mcunet[0], "mcunet-s", "feature-align", digits, "onnx-int8")
    ort = _eval(model, "mcunet_qdq.onnx", "feature-align", digits, "onnx-int8")
    agree = float(np.mean(np.array(ort.result.predictions) == np.array(ref.result.predictions)))
    if shutil.which("gcc"):
        compiled = _eval(model, "mcunet_qdq.onnx", "feature-align", digits, "compiled")
        assert compiled.source.predictions == ort.source.predictions  # int8 taps: bit-exact with onnxruntime
        agree_compiled = float(np.mean(np.array(compiled.result.predictions) == np.array(ref.result.predictions)))
        with capsys.disabled():
            print(f"\nQDQ file vs torch path (feature-align): onnx-int8 {agree:.2%}, compiled {agree_compiled:.2%}")
        assert compiled.source.predictions == ref.source.predictions
        assert compiled.result.predictions == ref.result.predictions
    assert ort.source.predictions == ref.source.predictions
    assert ort.result.predictions == ref.result.predictions


@needs_tool("arm-none-eabi-gcc", "qemu-system-arm")
def test_cortex_m4_firmware_from_onnx_predicts_as_the_torch_path(mcunet, onnx_models, tmp_path, capsys):
    from edgetune.simulate import simulate
    runs = {}
    qdq_taps = [f"{t}_DequantizeLinear_Output" for t in ZOO_TAPS]
    for name, model in (("zoo", ["mcunet-s", "--checkpoint", str(mcunet[1])]),
                        ("float", [str(onnx_models[0]), "--taps", ",".join(ZOO_TAPS)]),
                        ("qdq", [str(onnx_models[1]), "--taps", ",".join(qdq_taps)])):
        out = tmp_path / name
        assert main(["export", *model, "--method", "tinytta", "--data", "digits", "--target", "cortex-m4",
                     "-o", str(out), "--build", "--set", "fit_epochs=3"]) == 0
        capsys.readouterr()
        runs[name] = simulate(out, "digits", "gaussian_noise", 5, 30, workdir=tmp_path / f"sim-{name}",
                              progress=False)
    # The float file re-exported by edgetune is the same int8 model: the same firmware decisions.
    assert runs["float"].predictions == runs["zoo"].predictions
    assert runs["float"].source_predictions == runs["zoo"].source_predictions
    # The QDQ file, quantised by onnxruntime on the same calibration images: the same decisions too.
    with capsys.disabled():
        agree = np.mean(np.array(runs["qdq"].predictions) == np.array(runs["zoo"].predictions))
        print(f"\ncortex-m4 firmware from the QDQ file vs the torch path: {agree:.2%} of predictions")
    assert runs["qdq"].source_predictions == runs["zoo"].source_predictions
    assert runs["qdq"].predictions == runs["zoo"].predictions


def test_cli_inspect_and_eval_on_an_onnx_file(onnx_models, capsys):
    path = str(onnx_models[0])
    assert main(["inspect", path]) == 0
    out = capsys.readouterr().out
    assert "/ReduceMean_output_0" in out and "per stage (tinytta, lst, vqt):    --taps " in out
    per_stage = out.strip().splitlines()[-1].split("--taps ")[1]
    eval_args = ["eval", "--model", path, "--taps", per_stage, "--method", "tinytta", "--corruption", "contrast",
                 "--samples-per-corruption", "20", "--set", "fit_epochs=1", "--json"]
    # an ONNX file records no data: no default stream, and the stream is never taken as the source
    assert main(eval_args) == 1 and "--data DATA" in capsys.readouterr().err
    assert main([*eval_args, "--data", "digits"]) == 1 and "--source-data" in capsys.readouterr().err
    assert main([*eval_args, "--data", "digits", "--source-data", "digits"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["samples"] == 20 and report["model"] == "mcunet.onnx"
    assert report["source_data"]["labels_used"] is True and report["source_data"]["origin"] == "given as --source-data"


def test_onnx_errors_are_one_line(onnx_models, tmp_path, capsys):
    path = str(onnx_models[0])

    def one_line(code: int) -> str:
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("edgetune: error: onnx: "), err
        return err

    base = ["--method", "tinytta", "--data", "digits", "-o", str(tmp_path / "b")]
    assert main(["export", path, *base]) == ConfigError.exit_code
    assert "tinytta attaches to every stage and needs at least 2 taps (got 1" in one_line(1)
    inner = "/stages.1/stages.1.1/body/body.0/body.0.0/Conv_output_0"  # inside a residual block
    assert main(["export", path, "--taps", f"{inner},/ReduceMean_output_0", *base]) == ConfigError.exit_code
    assert "is not computed from" in one_line(1)
    assert main(["export", path, "--taps", "nope", *base]) == ConfigError.exit_code
    assert "--taps nope not found" in one_line(1)
    assert main(["export", path, "--classifier", "nope", "--method", "source", "--data", "digits", "-o",
                 str(tmp_path / "b")]) == ConfigError.exit_code
    assert "pick one of /classifier/Gemm" in one_line(1)
    assert main(["eval", "--model", path, "--checkpoint", "x", "--method", "source"]) == ConfigError.exit_code
    assert "--checkpoint is not used with an ONNX model" in capsys.readouterr().err

    # A custom-domain op and an op the interpreter lacks: both listed, with their node names, at once.
    model = onnx.load(path)
    g = model.graph
    relu = next(n for n in g.node if n.op_type == "Add")
    relu_out = relu.output[0]
    g.node.insert(list(g.node).index(relu) + 1, helper.make_node("Magic", [relu_out], ["magic_out"],
                                                                 name="my_magic", domain="com.acme"))
    g.node.append(helper.make_node("Resize", ["logits"], ["unused"], name="my_resize"))
    for n in g.node:
        if n is not g.node[-1] and n.name != "my_magic":
            n.input[:] = ["magic_out" if i == relu_out and n.name != "my_magic" else i for i in n.input]
    model.opset_import.append(helper.make_opsetid("com.acme", 1))
    bad = tmp_path / "bad.onnx"
    onnx.save(model, str(bad))
    assert main(["export", str(bad), "--method", "source", "--data", "digits", "-o",
                 str(tmp_path / "b")]) == ModelError.exit_code
    err = one_line(ModelError.exit_code)
    assert "com.acme::Magic (node 'my_magic')" in err and "Resize (node 'my_resize')" in err


@pytest.mark.parametrize("name", ["resnet8", "ds-cnn", "mobilenet-v3-s", "imu-conv1d", "mcunet-s-gn", "vit-tiny"])
def test_interpreter_follows_onnxruntime_on_zoo_architectures(name, tmp_path):
    """Ops beyond mcunet-s (MaxPool-free ResNet adds, hardswish + squeeze-excitation, Conv1d, GroupNorm as
    InstanceNormalization, attention with a class token expanded at batch 1), batched, against onnxruntime;
    ``inspect``'s per-stage suggestion cuts every one of them into at least two stages."""
    import onnxruntime

    from edgetune.models import build_model
    torch.manual_seed(0)
    model = build_model(name).eval()
    path = tmp_path / f"{name}.onnx"
    x = torch.randn(3, *model.input_shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, x[:1], str(path), input_names=["input"], opset_version=17, dynamo=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    want = np.concatenate([session.run(None, {"input": x[i:i + 1].numpy()})[0] for i in range(3)])
    _, per_stage = tap_candidates(path)
    assert len(per_stage) >= 2
    backbone = load_onnx_backbone(path, per_stage)
    with torch.no_grad():
        got = backbone(x).numpy()
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, float(np.abs(want).max()))
    assert len(backbone.stages) == len(per_stage)
