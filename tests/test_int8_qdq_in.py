"""A QDQ ONNX quantised by its owner with onnxruntime: the oracle is onnxruntime's own int8 session of it.

The committed digits mcunet-s (full model, logits out) is exported to ONNX and quantised the way a user
does (``quantize_static``, 100 calibration images, no pre-processing). Its compiled form must equal
onnxruntime's int8 session of that very file, logits bit for bit on every digits test sample. Against
edgetune's own int8 model of the same weights (the torch path: 256 seeded calibration images,
pre-processing) predictions differ on a few samples; the test measures why: quantised with the user's
settings on edgetune's 256 images, the two agree on every sample, so the difference is the owner's
calibration (other activation scales), not the compiler.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from edgetune.checkpoint import load_checkpoint
from edgetune.compilers import FrozenRunner, compile_frozen
from edgetune.data import to_tensor
from edgetune.export.quantize import calibration_images, quantize_graph
from edgetune.ort_runtime import session as ort_session

CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "mcunet-s-digits"


class _Images(CalibrationDataReader):
    def __init__(self, images: np.ndarray) -> None:
        self.feeds = iter([{"input": to_tensor(images[i:i + 1]).numpy()} for i in range(len(images))])

    def get_next(self):
        return next(self.feeds, None)


def _user_quantised(float_path: Path, images: np.ndarray, out: Path) -> Path:
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)
    try:
        quantize_static(str(float_path), str(out), _Images(images), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    finally:
        logging.getLogger().setLevel(level)
    return out


def _predictions(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort_session(path, int8_kernels=True)
    return np.array([int(session.run(None, {"input": x[i:i + 1]})[0].argmax()) for i in range(len(x))])


def test_user_qdq_compiles_to_onnxruntime_and_differs_from_edgetune_only_by_calibration(digits, tmp_path, capsys):
    backbone, _ = load_checkpoint(CHECKPOINT)
    float_path = tmp_path / "mcunet.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(backbone.for_export(), torch.zeros(1, *backbone.input_shape), str(float_path),
                          input_names=["input"], output_names=["logits"], opset_version=17, dynamo=False)
    ours = calibration_images(digits.train_x)  # what edgetune's export calibrates on
    user = _user_quantised(float_path, digits.train_x[:100], tmp_path / "user.onnx")
    user_on_ours = _user_quantised(float_path, ours, tmp_path / "user_256.onnx")
    quantize_graph(float_path, tmp_path / "edgetune.onnx", lambda: _Images(ours))
    x = to_tensor(digits.test_x).numpy()

    runner = FrozenRunner(compile_frozen(user, "host", tmp_path / "host"))
    session = ort_session(user, int8_kernels=True)
    identical = sum(np.array_equal(runner(x[i:i + 1])[0], session.run(None, {"input": x[i:i + 1]})[0])
                    for i in range(len(x)))
    reference = _predictions(tmp_path / "edgetune.onnx", x)
    agree_user = float(np.mean(_predictions(user, x) == reference))
    agree_same_images = float(np.mean(_predictions(user_on_ours, x) == reference))
    with capsys.disabled():
        print(f"\nuser QDQ mcunet-s: compiled logits = onnxruntime's on {identical} of {len(x)} samples; predictions "
              f"agree with edgetune's int8 model on {agree_user:.2%} (user calibration, 100 images) and "
              f"{agree_same_images:.2%} (user settings, edgetune's 256 images)")
    assert identical == len(x)
    assert agree_same_images == 1.0
