"""Export: split a fitted ``Adaptable`` into a bundle (frozen int8 ONNX + trainable ONNX + manifest).

``edgetune.export.manifest`` (the bundle format) imports only the standard library, and so does this
package's import: the exporter's names, which need torch and the methods, load on first use. That is
what lets the compilers read bundles through the same typed manifest without importing torch.
"""
from __future__ import annotations

import importlib
from typing import Any

from edgetune.export.manifest import (FORMAT, FROZEN_FILE, MANIFEST_FILE, TRAINABLE_FILE, Manifest, load_manifest,
                                      onnx_name, seal_bundle)

_LAZY = {"build_bundle": "bundle", "export": "bundle", "exportable_methods": "bundle", "SUPPORTED_OPS": "ops",
         "check_partition": "validate", "validate_onnx": "validate"}

__all__ = ["FORMAT", "FROZEN_FILE", "MANIFEST_FILE", "TRAINABLE_FILE", "Manifest", "SUPPORTED_OPS", "build_bundle",
           "check_partition", "export", "exportable_methods", "load_manifest", "onnx_name", "seal_bundle",
           "validate_onnx"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"edgetune.export.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'edgetune.export' has no attribute {name!r}")
