"""Test streams: which samples arrive in which order, per protocol (batch size 1).

* ``episodic`` — one segment per corruption; the method is reset before each.
* ``continual`` — all corruptions back to back in one segment, never reset.
* ``label-shift`` — like episodic, but each segment is ordered in long runs of one class
  (class-imbalanced in time), the setting where batch statistics and entropy methods break.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgetune.data.corruptions import corrupt
from edgetune.data.datasets import Dataset
from edgetune.errors import ConfigError

PROTOCOLS = ("episodic", "continual", "label-shift")


@dataclass(frozen=True)
class Segment:
    """Consecutive samples of one corruption; ``reset`` says the method is reset before it."""

    corruption: str
    images: np.ndarray  # uint8 N x 32 x 32
    labels: np.ndarray  # int64 N
    reset: bool


def build_stream(data: Dataset, corruptions: tuple[str, ...], severity: int, protocol: str,
                 seed: int = 0, samples_per_corruption: int | None = None, split: str = "test") -> list[Segment]:
    """Corrupted segments of the ``split`` images, in the protocol's order.

    Each corruption sees its own seeded permutation of the split (first N samples when
    ``samples_per_corruption`` is given); everything is deterministic given ``seed``.

    Raises:
        ConfigError: unknown protocol or a non-positive sample count.
    """
    if protocol not in PROTOCOLS:
        raise ConfigError(f"protocol: unknown {protocol!r} (known: {', '.join(PROTOCOLS)})")
    if samples_per_corruption is not None and samples_per_corruption <= 0:
        raise ConfigError(f"stream: --samples-per-corruption must be positive (got {samples_per_corruption})")
    x_all, y_all = (data.test_x, data.test_y) if split == "test" else (data.val_x, data.val_y)
    segments = []
    for i, name in enumerate(corruptions):
        rng = np.random.RandomState(seed * 1000 + i)
        order = rng.permutation(len(y_all))[:samples_per_corruption]
        if protocol == "label-shift":
            order = _class_runs(order, y_all, rng)
        images = corrupt(x_all[order], name, severity, seed=seed * 1000 + 17 * i + severity)
        segments.append(Segment(name, images, y_all[order], reset=protocol != "continual" or i == 0))
    return segments


def _class_runs(order: np.ndarray, labels: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    """Reorder so classes arrive in runs: sort by class, classes in a random order."""
    classes = rng.permutation(np.unique(labels[order]))
    rank = {int(c): r for r, c in enumerate(classes)}
    keys = np.array([rank[int(labels[j])] for j in order])
    return order[np.argsort(keys, kind="stable")]
