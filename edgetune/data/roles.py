"""Who reads which data: the *source* (what ``fit`` and int8 calibration read) and the *stream*
(what evaluation and simulation score), kept apart and reported.

Source modes (``SOURCE_MODES``):

* ``labelled`` — the source's training split with its labels (statistics, calibration, and
  the attachments trained with cross-entropy);
* ``unlabelled`` — the same samples, labels never read: statistics and calibration, and the
  attachments distilled from the model's own classifier (source-free adaptation);
* ``none`` — no source at all: a warm-up on the first ``warmup`` samples of the stream (in
  stream order, as the device sees them) serves as an unlabelled source. Those samples are
  still streamed and scored afterwards like every other.

The default source of a checkpoint is the data it was trained on (``config.json`` key
``data``, written by ``train-source``), never the labelled training split of the evaluated
dataset; with no record and no source given, ``checkpoint_source`` refuses.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgetune.errors import ConfigError, DataError

if TYPE_CHECKING:  # the CLI reads this module's constants while building its parser: no torch import here
    from edgetune.data.datasets import Dataset

SOURCE_MODES = ("labelled", "unlabelled", "none")
WARMUP = 200  # stream samples of the no-source warm-up
FIT_SAMPLES = 20000  # source samples a fit reads at most (a seeded subset of larger sources)
SOURCE_FILE = "source.json"  # what a bundle was fitted and calibrated on


@dataclass(frozen=True)
class SourceInfo:
    """What served as source, for every report: mode, data, split, sample count, labels used, why."""

    mode: str
    data: str
    split: str
    samples: int
    labels_used: bool
    origin: str

    def line(self) -> str:
        labels = "labels used" if self.labels_used else "no labels used"
        return f"source: {self.data} ({self.split}, {self.samples:,} samples, {labels}; {self.origin})"

    def to_json(self) -> dict:
        return asdict(self)


def check_mode(mode: str) -> None:
    """Raises: ConfigError: an unknown source mode."""
    if mode not in SOURCE_MODES:
        raise ConfigError(f"source: unknown mode {mode!r}; pick one of {', '.join(SOURCE_MODES)}")


TASKS = ("same", "new")


def check_task(task: str, labelled_fraction: float, stream: str | None = None, source: str | None = None) -> None:
    """A stream's task against its source: ``same`` classes (the default) or a ``new`` task (transfer).

    Two different built-in datasets never share classes (digit 3 is not Fashion-MNIST's dress), so
    scoring one on a model of the other with ``same`` would print a silently wrong number: refused.
    Folders and ``.npz`` files may be the user's own recordings of the same classes: allowed.

    Raises:
        ConfigError: an unknown task; ``new`` without revealed labels; ``same`` with a stream of
            another built-in dataset than the source.
    """
    from edgetune.data.datasets import DATASETS

    if task not in TASKS:
        raise ConfigError(f"task: unknown task {task!r}; pick one of {', '.join(TASKS)}")
    if task == "new" and not labelled_fraction > 0:
        raise ConfigError(f"task: a new task learns its classes from revealed labels only (labelled fraction "
                          f"{labelled_fraction:g}); pass --labelled-fraction F with F > 0")
    builtin = set(DATASETS.names())
    if task == "same" and source is not None and stream != source and {stream, source} <= builtin:
        raise ConfigError(f"task: the stream {stream} is another dataset than the source {source} the model was "
                          f"fitted on (other classes: its accuracy would be silently wrong); pass --task new to "
                          f"learn the stream's classes from revealed labels (--labelled-fraction F), or stream "
                          f"{source}")


def source_info(source: "Dataset", mode: str, origin: str, samples: int | None = None) -> SourceInfo:
    """What a fit on ``source`` in ``mode`` read (``samples``: default as many as ``fit`` reads)."""
    split = "first stream samples (warm-up)" if mode == "none" else "training split"
    n = min(len(source.train_x), FIT_SAMPLES) if samples is None else samples
    return SourceInfo(mode, source.name, split, n, mode == "labelled", origin)


def checkpoint_source(config: dict, source: Any = None, mode: str = "labelled",
                      resize: tuple[int, int] | None = None, crop: tuple[int, int] | None = None,
                      command: str = "eval") -> tuple["Dataset | None", str]:
    """The source for a checkpoint (its ``config``): ``source`` when given, else the data the
    checkpoint records (``data``, with its ``data_resize`` / ``data_crop``), else a refusal.
    Mode ``none`` needs no source (returns None; ``export`` refuses it: the device has no
    warm-up). Returns the dataset and where it came from.

    Raises:
        ConfigError: an unknown mode, mode ``none`` for export, or no source given and none recorded.
        DataError: the source cannot be loaded, or mode ``labelled`` with an unlabelled source.
    """
    from edgetune.data.sources import describe, load_data

    check_mode(mode)
    if mode == "none" and command == "export":
        raise ConfigError("export: --source-mode none has no source to fit and calibrate the bundle on (the warm-up "
                          "on stream samples exists in eval only); pass --source-mode unlabelled with unlabelled "
                          "--source-data DATA")
    if mode == "none":
        if source is not None:
            raise ConfigError(f"{command}: --source-mode none uses no source, but --source-data {describe(source)} "
                              "was given; drop one of them")
        return None, ""  # evaluate names the warm-up itself
    if source is not None:
        data, origin = load_data(source, resize, crop), "given as --source-data"
    elif config.get("data"):
        rec_resize, rec_crop = config.get("data_resize"), config.get("data_crop")
        try:
            data = load_data(config["data"], tuple(rec_resize) if rec_resize else None,
                             tuple(rec_crop) if rec_crop else None)
        except DataError as exc:
            raise DataError(f"{command}: the checkpoint's training data {config['data']!r} cannot be loaded "
                            f"({exc}); pass --source-data DATA") from None
        origin = "the checkpoint's training data"
    else:
        raise ConfigError(f"{command}: the model records no training data, so nothing may serve as its source by "
                          "default (the evaluated data's labelled split would make adaptation look better than it "
                          "is); pass --source-data DATA (add --source-mode unlabelled to use no labels) or "
                          "--source-mode none")
    if not len(data.train_x):
        raise DataError(f"{command}: source {data.name} has no training samples (only a test split); pass a source "
                        "with training samples (--source-data)")
    if mode == "labelled" and not data.labelled:
        raise DataError(f"{command}: source {data.name} has no labels; pass --source-mode unlabelled (statistics "
                        "and distillation only) or a labelled --source-data")
    return data, origin


def checkpoint_stream(config: dict, data: Any = None, resize: tuple[int, int] | None = None,
                      crop: tuple[int, int] | None = None,
                      command: str = "eval") -> tuple[Any, tuple[int, int] | None, tuple[int, int] | None]:
    """The stream ``(data, resize, crop)`` of a checkpoint: ``data`` when given, else the data the
    checkpoint was trained on (its test split), with the recorded resize / crop unless given.

    Raises:
        ConfigError: no ``data`` given and none recorded.
    """
    if data is None:
        if not config.get("data"):
            raise ConfigError(f"{command}: the model records no training data, so there is no default stream; pass "
                              "--data DATA (a built-in name, an image folder or a .npz)")
        data = config["data"]
    if data == config.get("data"):
        resize = resize or (tuple(config["data_resize"]) if config.get("data_resize") else None)
        crop = crop or (tuple(config["data_crop"]) if config.get("data_crop") else None)
    return data, resize, crop


def warmup_source(samples: np.ndarray, stream_name: str, warmup: int = WARMUP) -> "Dataset":
    """An unlabelled source made of the first ``warmup`` stream samples (mode ``none``).

    Raises:
        ConfigError: ``warmup`` < 1.
    """
    from edgetune.data.datasets import Dataset

    if warmup < 1:
        raise ConfigError(f"source: the warm-up needs at least 1 sample (got {warmup}); pass --warmup K")
    x = samples[:warmup]
    y = np.full(len(x), -1, dtype=np.int64)
    return Dataset(f"{stream_name} (first {len(x)} stream samples)", x, y, x, y, x, y, num_classes=0,
                   description="warm-up on the stream, no labels")


def record_source(bundle_dir: str | Path, info: SourceInfo) -> Path:
    """Write ``info`` into a bundle (``source.json``) so ``simulate`` can say what it was fitted on."""
    path = Path(bundle_dir) / SOURCE_FILE
    path.write_text(json.dumps(info.to_json(), indent=2) + "\n")
    return path


def recorded_source(bundle_dir: str | Path) -> SourceInfo | None:
    """The bundle's ``source.json`` (``bundle_dir`` may be one of its target projects), or None
    for a bundle exported without one."""
    for folder in (Path(bundle_dir), Path(bundle_dir).parent):
        try:
            return SourceInfo(**json.loads((folder / SOURCE_FILE).read_text()))
        except (OSError, ValueError, TypeError):
            continue
    return None


__all__ = ["FIT_SAMPLES", "SOURCE_MODES", "TASKS", "WARMUP", "SourceInfo", "check_mode", "check_task",
           "checkpoint_source",
           "checkpoint_stream", "record_source", "recorded_source", "source_info", "warmup_source"]
