"""Datasets, corruptions and test streams."""
from edgetune.data.corruptions import (ALL_CORRUPTIONS, TEST_CORRUPTIONS, VALIDATION_CORRUPTIONS, corrupt,
                                       parse_corruptions)
from edgetune.data.datasets import DATASETS, Dataset, load_dataset, to_tensor
from edgetune.data.streams import PROTOCOLS, Segment, build_stream

__all__ = ["ALL_CORRUPTIONS", "TEST_CORRUPTIONS", "VALIDATION_CORRUPTIONS", "corrupt", "parse_corruptions",
           "DATASETS", "Dataset", "load_dataset", "to_tensor", "PROTOCOLS", "Segment", "build_stream"]
