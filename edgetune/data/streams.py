"""Test streams: which samples arrive in which order, per protocol (batch size 1).

* ``episodic`` — one segment per corruption; the method is reset before each.
* ``continual`` — all corruptions back to back in one segment, never reset.
* ``label-shift`` — like episodic, but each segment is ordered in long runs of one class
  (class-imbalanced in time), the setting where batch statistics and entropy methods break.

Every shift of ``edgetune.data.corruptions`` applies (image corruptions to pictures, sensor
shifts to 1-D windows). ``none`` streams the data as it is; when the dataset groups its test
samples (``Dataset.test_groups``, e.g. HAPT's subjects) a ``none`` stream is one segment per
group in recorded order (the real shift: episodic resets per group), the first
``samples_per_corruption`` of each group. Unlabelled samples carry label -1.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgetune.data.corruptions import NO_SHIFT, corrupt
from edgetune.data.datasets import Dataset
from edgetune.errors import ConfigError

PROTOCOLS = ("episodic", "continual", "label-shift")


@dataclass(frozen=True)
class Segment:
    """Consecutive samples of one corruption; ``reset`` says the method is reset before it."""

    corruption: str
    images: np.ndarray  # samples in a Dataset layout (uint8 pictures or float32 arrays)
    labels: np.ndarray  # int64 N (-1: no label)
    reset: bool
    group: str = ""  # the recorded group (subject) of a real-shift segment

    @property
    def name(self) -> str:
        """The segment's key in reports: the corruption, or corruption/group."""
        return f"{self.corruption}/{self.group}" if self.group else self.corruption


def build_stream(data: Dataset, corruptions: tuple[str, ...], severity: int, protocol: str,
                 seed: int = 0, samples_per_corruption: int | None = None, split: str = "test") -> list[Segment]:
    """Corrupted segments of the ``split`` images, in the protocol's order.

    Each corruption sees its own seeded permutation of the split (first N samples when
    ``samples_per_corruption`` is given); everything is deterministic given ``seed``.

    Raises:
        ConfigError: unknown protocol or a non-positive sample count.
    """
    if protocol not in PROTOCOLS:
        raise ConfigError(f"protocol: unknown {protocol!r} (known: {', '.join(PROTOCOLS)}); pass one of them "
                          "(--protocol)")
    if samples_per_corruption is not None and samples_per_corruption <= 0:
        raise ConfigError(f"stream: --samples-per-corruption must be positive (got {samples_per_corruption}); "
                          "pass a count of 1 or more")
    x_all, y_all = (data.test_x, data.test_y) if split == "test" else (data.val_x, data.val_y)
    groups = data.test_groups if split == "test" else None
    segments: list[Segment] = []
    for i, name in enumerate(corruptions):
        if name in NO_SHIFT and groups is not None:
            segments += _group_segments(x_all, y_all, groups, name, protocol, samples_per_corruption,
                                        np.random.RandomState(seed * 1000 + i), first=not segments)
            continue
        rng = np.random.RandomState(seed * 1000 + i)
        order = rng.permutation(len(y_all))[:samples_per_corruption]
        if protocol == "label-shift":
            order = _class_runs(order, y_all, rng)
        images = corrupt(x_all[order], name, severity, seed=seed * 1000 + 17 * i + severity)
        segments.append(Segment(name, images, y_all[order], reset=protocol != "continual" or not segments))
    return segments


def _group_segments(x: np.ndarray, y: np.ndarray, groups: np.ndarray, name: str, protocol: str, n: int | None,
                    rng: np.random.RandomState, first: bool) -> list[Segment]:
    """One unshifted segment per group, in recorded order (class runs for label-shift)."""
    out: list[Segment] = []
    for g in dict.fromkeys(groups.tolist()):  # groups in order of appearance
        order = np.where(groups == g)[0][:n]
        if protocol == "label-shift":
            order = _class_runs(order, y, rng)
        out.append(Segment(name, x[order].copy(), y[order], reset=protocol != "continual" or (first and not out),
                           group=str(g)))
    return out


def _class_runs(order: np.ndarray, labels: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    """Reorder so classes arrive in runs: sort by class, classes in a random order."""
    classes = rng.permutation(np.unique(labels[order]))
    rank = {int(c): r for r, c in enumerate(classes)}
    keys = np.array([rank[int(labels[j])] for j in order])
    return order[np.argsort(keys, kind="stable")]
