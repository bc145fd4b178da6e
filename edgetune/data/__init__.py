"""Data: datasets and data sources, source roles, shifts (corruptions and sensor shifts), test streams.

Names are imported from their modules on first use, so the CLI can read the data options
(``edgetune.data.options``) while building its parser without importing torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "corruptions": ("ALL_CORRUPTIONS", "NO_SHIFT", "SENSOR_CORRUPTIONS", "SHIFTS", "TEST_CORRUPTIONS",
                    "VALIDATION_CORRUPTIONS", "corrupt", "parse_corruptions"),
    "datasets": ("DATASETS", "Dataset", "load_dataset", "shape_of", "to_tensor"),
    "hapt": ("load_hapt",),
    "roles": ("SOURCE_MODES", "WARMUP", "SourceInfo", "checkpoint_source", "checkpoint_stream", "record_source",
              "recorded_source", "source_info", "warmup_source"),
    "sources": ("conform", "conformed", "load_data"),
    "streams": ("PROTOCOLS", "Segment", "build_stream"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = ["ALL_CORRUPTIONS", "DATASETS", "Dataset", "NO_SHIFT", "PROTOCOLS", "SENSOR_CORRUPTIONS", "SHIFTS",
           "SOURCE_MODES", "Segment", "SourceInfo", "TEST_CORRUPTIONS", "VALIDATION_CORRUPTIONS", "WARMUP",
           "build_stream", "checkpoint_source", "checkpoint_stream", "conform", "conformed", "corrupt", "load_data",
           "load_dataset", "load_hapt", "parse_corruptions", "record_source", "recorded_source", "shape_of",
           "source_info", "to_tensor", "warmup_source"]  # every name of _EXPORTS


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'edgetune.data' has no attribute {name!r}")
    if _MODULE_OF[name] == "datasets":
        importlib.import_module("edgetune.data.hapt")  # registers the 'hapt' built-in with the other datasets
    return getattr(importlib.import_module(f"edgetune.data.{_MODULE_OF[name]}"), name)


if TYPE_CHECKING:
    from edgetune.data.corruptions import (ALL_CORRUPTIONS, NO_SHIFT, SENSOR_CORRUPTIONS, SHIFTS, TEST_CORRUPTIONS,
                                           VALIDATION_CORRUPTIONS, corrupt, parse_corruptions)
    from edgetune.data.datasets import DATASETS, Dataset, load_dataset, shape_of, to_tensor
    from edgetune.data.hapt import load_hapt
    from edgetune.data.roles import (SOURCE_MODES, WARMUP, SourceInfo, checkpoint_source, checkpoint_stream,
                                     record_source, recorded_source, source_info, warmup_source)
    from edgetune.data.sources import conform, conformed, load_data
    from edgetune.data.streams import PROTOCOLS, Segment, build_stream
