"""Static int8 quantisation of the frozen graph with onnxruntime (QDQ, calibrated on source images).

Symmetric per-channel int8 weights, asymmetric int8 activations (min/max calibration), the
format the compilers' QDQ -> integer rewrite expects: Quantize/DequantizeLinear pairs around
float ops, weights stored as int8 initialisers with their own DequantizeLinear.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      quant_pre_process, quantize_static)

from edgetune.data import to_tensor
from edgetune.errors import ExportError
from edgetune.export.manifest import QuantizationSpec

CALIBRATION_SAMPLES = 256


class SourceImages(CalibrationDataReader):
    """Feeds uint8 N x H x W source images one at a time (the graph is batch 1) as input "x"."""

    def __init__(self, images: np.ndarray) -> None:
        self._feeds = iter([{"x": to_tensor(images[i:i + 1]).numpy()} for i in range(len(images))])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def calibration_images(images: np.ndarray, samples: int = CALIBRATION_SAMPLES, seed: int = 0) -> np.ndarray:
    """A seeded random subset of the source training images (all of them if there are fewer)."""
    order = np.random.RandomState(seed).permutation(len(images))[:samples]
    return images[np.sort(order)]


def quantize_frozen(fp32_path: Path, out_path: Path, images: np.ndarray, data_name: str) -> QuantizationSpec:
    """Quantise ``fp32_path`` into ``out_path`` (int8 QDQ) calibrated on ``images``; returns what was done.

    Raises:
        ExportError: no calibration images, or onnxruntime fails to quantise the graph.
    """
    if len(images) == 0:
        raise ExportError("quantize: no source images to calibrate on (empty training split); "
                          "use a dataset with training images or export with --no-quantize")
    calib = calibration_images(images)
    spec = QuantizationSpec(format="QDQ", per_channel=True, weight_type="int8", activation_type="int8",
                            weight_symmetric=True, activation_symmetric=False, calibration_method="minmax",
                            calibration_samples=len(calib), calibration_data=f"{data_name}/train")
    quiet = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # ORT logs a warning per unquantised op via the root logger
    try:
        with tempfile.TemporaryDirectory() as tmp:
            pre = Path(tmp) / "pre.onnx"
            quant_pre_process(str(fp32_path), str(pre))
            quantize_static(str(pre), str(out_path), SourceImages(calib), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax,
                            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})
    except Exception as exc:  # onnxruntime raises RuntimeError, ValueError, Fail, ...: all are fatal here
        raise ExportError(f"quantize: onnxruntime could not quantise {fp32_path.name} ({type(exc).__name__}: "
                          f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); "
                          "export with --no-quantize to keep the backbone float") from exc
    finally:
        logging.getLogger().setLevel(quiet)
    return spec
