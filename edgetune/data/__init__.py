"""Data: datasets and data sources, source roles, shifts (corruptions and sensor shifts), test streams."""
from edgetune.data.corruptions import (ALL_CORRUPTIONS, NO_SHIFT, SENSOR_CORRUPTIONS, SHIFTS, TEST_CORRUPTIONS,
                                       VALIDATION_CORRUPTIONS, corrupt, parse_corruptions)
from edgetune.data.datasets import DATASETS, Dataset, load_dataset, shape_of, to_tensor
from edgetune.data.hapt import load_hapt
from edgetune.data.roles import (SOURCE_MODES, WARMUP, SourceInfo, checkpoint_source, checkpoint_stream, record_source,
                                 recorded_source, source_info, warmup_source)
from edgetune.data.sources import conform, conformed, load_data
from edgetune.data.streams import PROTOCOLS, Segment, build_stream

__all__ = ["ALL_CORRUPTIONS", "NO_SHIFT", "SENSOR_CORRUPTIONS", "SHIFTS", "TEST_CORRUPTIONS", "VALIDATION_CORRUPTIONS",
           "corrupt", "parse_corruptions", "DATASETS", "Dataset", "load_dataset", "shape_of", "to_tensor", "load_hapt",
           "SOURCE_MODES", "WARMUP", "SourceInfo", "checkpoint_source", "checkpoint_stream", "record_source",
           "recorded_source", "source_info",
           "warmup_source", "conform", "conformed", "load_data", "PROTOCOLS", "Segment", "build_stream"]
