"""Export: split a fitted ``Adaptable`` into a bundle (frozen int8 ONNX + trainable ONNX + manifest)."""
from edgetune.export.bundle import build_bundle, export, exportable_methods
from edgetune.export.manifest import (FORMAT, FROZEN_FILE, MANIFEST_FILE, TRAINABLE_FILE, Manifest, load_manifest,
                                      onnx_name, seal_bundle)
from edgetune.export.ops import SUPPORTED_OPS
from edgetune.export.validate import check_partition, validate_onnx

__all__ = ["FORMAT", "FROZEN_FILE", "MANIFEST_FILE", "TRAINABLE_FILE", "Manifest", "SUPPORTED_OPS", "build_bundle",
           "check_partition", "export", "exportable_methods", "load_manifest", "onnx_name", "seal_bundle",
           "validate_onnx"]
