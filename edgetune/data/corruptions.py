"""Shifts, one registry: the image corruptions (Hendrycks & Dietterich, 2019: the 15 standard
ones plus the 4 extra ones) and the sensor shifts of 1-D inputs (``edgetune.data.sensor_shifts``).

A shift has an image version, an array version, or both (``gaussian_noise`` is either,
depending on the samples); ``none`` (alias ``clean``) streams the data as it is, the setting
of a real shift such as another camera or another user.

Image corruptions come from PyPI's ``imagecorruptions-imaug`` (offline). It takes H x W or
H x W x 3 uint8 pictures of at least 32 x 32 pixels: a grey image is replicated to three
channels, corrupted and averaged back; RGB is corrupted as it is; other channel counts
channel by channel as grey; pictures smaller than 32 px are reflection-padded to 32, corrupted
and cropped back. Float32 images in [0, 1] are corrupted at 8 bits and scaled back. Results are
cached under ``$EDGETUNE_CACHE`` (default ``~/.cache/edgetune``), keyed by the pictures' bytes,
because some corruptions (glass blur, zoom blur) take milliseconds per image.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgetune.data.sensor_shifts import SENSOR_SHIFTS
from edgetune.errors import ConfigError
from edgetune.registry import Registry

TEST_CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
    "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
    "jpeg_compression")
# Reserved for choosing hyperparameters; never reported.
VALIDATION_CORRUPTIONS = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
ALL_CORRUPTIONS = TEST_CORRUPTIONS + VALIDATION_CORRUPTIONS
NO_SHIFT = ("none", "clean")
MIN_SIDE = 32  # imagecorruptions refuses smaller pictures

ArrayShift = Callable[[np.ndarray, int, np.random.RandomState], np.ndarray]


@dataclass(frozen=True)
class Shift:
    """One named shift: ``image`` applies to uint8 pictures (by name, in imagecorruptions),
    ``array`` is the sensor version for float32 N x C x T windows (None: not defined there)."""

    name: str
    image: bool
    array: ArrayShift | None

    def kinds(self) -> str:
        return "/".join(k for k, on in (("image", self.image), ("1-D", self.array is not None)) if on)


SHIFTS: Registry[Shift] = Registry("corruption")
for _name in ALL_CORRUPTIONS:
    SHIFTS.add(_name, Shift(_name, True, SENSOR_SHIFTS.get(_name)))
for _name, _fn in SENSOR_SHIFTS.items():
    if _name not in SHIFTS:
        SHIFTS.add(_name, Shift(_name, False, _fn))
SENSOR_CORRUPTIONS = tuple(SENSOR_SHIFTS)


def cache_dir() -> Path:
    return Path(os.environ.get("EDGETUNE_CACHE", Path.home() / ".cache" / "edgetune"))


def parse_corruptions(spec: str, kind: str = "image") -> tuple[str, ...]:
    """``"all"`` -> the 15 test corruptions (images) or every sensor shift (``kind="array"``,
    1-D samples); ``"val"`` -> the 4 extra image ones; ``none``/``clean``; else a comma list.

    Raises:
        ConfigError: an unknown name, or a name that has no version for ``kind``.
    """
    if spec == "all":
        return TEST_CORRUPTIONS if kind == "image" else SENSOR_CORRUPTIONS
    if spec == "val":
        return VALIDATION_CORRUPTIONS
    names = tuple(s.strip() for s in spec.split(",") if s.strip())
    bad = [n for n in names if n not in SHIFTS and n not in NO_SHIFT]
    if bad or not names:
        raise ConfigError(f"corruption: unknown {bad or spec!r}; use 'all', 'val', 'none' or names from "
                          "`edgetune list corruptions`")
    if kind != "image":
        wrong = [n for n in names if n not in NO_SHIFT and SHIFTS.get(n).array is None]
        if wrong:
            raise ConfigError(f"corruption: {', '.join(wrong)} apply to images, not to 1-D samples; use 'all', "
                              f"'none' or sensor shifts ({', '.join(SENSOR_CORRUPTIONS)})")
    return names


def corrupt(images: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    """Shift samples in a dataset layout (deterministic given ``seed``): uint8 pictures
    (N x H x W or N x C x H x W), float32 images in [0, 1], or float32 N x C x T windows
    (sensor shifts). ``none``/``clean`` returns a copy.

    Raises:
        ConfigError: unknown name, severity outside 1..5, or a shift that does not apply to the
            samples (an image corruption on 1-D windows, float images outside [0, 1]).
    """
    if name in NO_SHIFT:
        return images.copy()
    shift = SHIFTS.get(name)
    if not 1 <= severity <= 5:
        raise ConfigError(f"corruption: severity must be 1..5 (got {severity}); pass --severity 1..5")
    one_d = images.dtype != np.uint8 and images.ndim == 3
    if one_d:
        if shift.array is None:
            raise ConfigError(f"corruption: {name} applies to images, not to 1-D samples {images.shape[1:]}; use "
                              f"a sensor shift ({', '.join(SENSOR_CORRUPTIONS)}) or 'none'")
        return shift.array(np.asarray(images, dtype=np.float32), severity, np.random.RandomState(seed))
    if images.dtype != np.uint8:
        lo, hi = (float(images.min()), float(images.max())) if images.size else (0.0, 1.0)
        if lo < 0.0 or hi > 1.0:
            raise ConfigError(f"corruption: {name} needs uint8 pictures or float images in [0, 1] (got values in "
                              f"[{lo:.3g}, {hi:.3g}]); store the images as uint8, or stream them with 'none'")
        as8 = np.clip(np.round(images * 255.0), 0, 255).astype(np.uint8)
        return corrupt(as8, name, severity, seed).astype(np.float32) / 255.0
    return _corrupt_pictures(images, name, severity, seed)


def _corrupt_pictures(images: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    key = hashlib.sha1(images.tobytes() + f"{images.shape}/{name}/{severity}/{seed}".encode()).hexdigest()[:20]
    path = cache_dir() / "corruptions" / f"{name}-{severity}-{key}.npy"
    if path.exists():
        return np.load(path)
    out = np.empty_like(images)
    np.random.seed(seed)  # imagecorruptions draws from numpy's global generator
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, im in enumerate(images):
            out[i] = _corrupt_one(im, name, severity)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, out)
    tmp.replace(path)
    return out


def _corrupt_one(im: np.ndarray, name: str, severity: int) -> np.ndarray:
    """One uint8 picture, H x W or C x H x W."""
    from imagecorruptions import corrupt as _corrupt

    if im.ndim == 3 and im.shape[0] != 3:  # neither grey nor RGB: channel by channel
        return np.stack([_corrupt_one(c, name, severity) for c in im])
    hwc = im.transpose(1, 2, 0) if im.ndim == 3 else np.repeat(im[:, :, None], 3, axis=2)
    h, w = hwc.shape[:2]
    pad = ((0, max(0, MIN_SIDE - h)), (0, max(0, MIN_SIDE - w)), (0, 0))
    big = np.pad(hwc, pad, mode="reflect" if min(h, w) > 1 else "edge")
    c = np.asarray(_corrupt(np.ascontiguousarray(big), corruption_name=name, severity=severity))[:h, :w]
    c = np.clip(np.round(c.astype(np.float32)), 0, 255).astype(np.uint8)
    if im.ndim == 3:
        return c.transpose(2, 0, 1)
    return np.clip(np.round(c.astype(np.float32).mean(axis=2)), 0, 255).astype(np.uint8)
