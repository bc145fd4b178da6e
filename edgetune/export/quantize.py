"""Static int8 quantisation of the frozen graph with onnxruntime (QDQ, calibrated on source images).

Symmetric per-channel int8 weights, asymmetric int8 activations (min/max calibration), the
format the compilers' QDQ -> integer rewrite expects: Quantize/DequantizeLinear pairs around
float ops, weights stored as int8 initialisers with their own DequantizeLinear.

Attention's MatMuls (2-D, or batched activation x activation) and a Softmax over the last axis have
int8 rules that reproduce onnxruntime's QLinearMatMul and QLinearSoftmax, so they stay quantised.
A MatMul or Softmax whose rule's preconditions fail (broadcast batch dimensions, a Softmax over
another axis: ``edgetune.export.ops.float_islands``) is left unquantised (quantised again without
it, until nothing changes): onnxruntime's int8 session would otherwise run it as its integer kernel,
which a compiled float island does not reproduce; with the exclusion both compute it in float
between the same dequantise and quantise. Elementwise islands stay quantised: their float
computation between dequantise and quantise equals what onnxruntime's int8 session computes.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      quant_pre_process, quantize_static)

import onnx

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


MAX_EXCLUSION_PASSES = 4
EXCLUDED_ISLAND_OPS = frozenset({"MatMul", "Softmax"})  # as islands, onnxruntime's integer kernel differs


def quantize_graph(fp32_path: Path, out_path: Path, reader: Callable[[], CalibrationDataReader]) -> list[str]:
    """onnxruntime's static QDQ quantisation of ``fp32_path`` into ``out_path`` with edgetune's
    settings, calibrated on what ``reader()`` yields, leaving MatMul and Softmax nodes the op table
    cannot lower to int8 in float, and every LayerNormalization written out as float primitives
    (``edgetune.export.decompose``) outside quantisation. Returns the nodes left in float.

    Raises:
        ExportError: onnxruntime fails to quantise the graph.
    """
    from edgetune.export.decompose import decompose_layer_norms
    from edgetune.export.ops import float_islands

    quiet = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # ORT logs a warning per unquantised op via the root logger
    excluded: set[str] = set()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            pre = Path(tmp) / "pre.onnx"
            quant_pre_process(str(fp32_path), str(pre))
            model, decomposed = decompose_layer_norms(onnx.load(str(pre)))
            if decomposed:
                onnx.save(model, str(pre))
            excluded |= set(decomposed)
            names = {n.output[0]: n.name for n in model.graph.node if n.output}
            for _ in range(MAX_EXCLUSION_PASSES):
                quantize_static(str(pre), str(out_path), reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                                calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=sorted(excluded),
                                extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})
                islands = {names.get(i.node, i.node) for i in float_islands(onnx.load(str(out_path)))
                           if i.op in EXCLUDED_ISLAND_OPS}
                if islands <= excluded:
                    break
                excluded |= islands
    except ExportError:
        raise
    except Exception as exc:  # onnxruntime raises RuntimeError, ValueError, Fail, ...: all are fatal here
        raise ExportError(f"quantize: onnxruntime could not quantise {fp32_path.name} ({type(exc).__name__}: "
                          f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); "
                          "export with --no-quantize to keep the backbone float") from exc
    finally:
        logging.getLogger().setLevel(quiet)
    return sorted(excluded)


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
    quantize_graph(fp32_path, out_path, lambda: SourceImages(calib))
    return spec
