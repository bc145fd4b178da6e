"""The 15 standard corruptions (Hendrycks & Dietterich, 2019) plus the 4 extra ones.

Corruptions come from PyPI's ``imagecorruptions-imaug`` (offline, needs >= 32 px): a
grey image is replicated to three channels, corrupted, and averaged back to one channel.
Results are cached under ``$EDGETUNE_CACHE`` (default ``~/.cache/edgetune``) because some
corruptions (glass blur, zoom blur) take milliseconds per image.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import numpy as np

from edgetune.errors import ConfigError

TEST_CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
    "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
    "jpeg_compression")
# Reserved for choosing hyperparameters; never reported.
VALIDATION_CORRUPTIONS = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
ALL_CORRUPTIONS = TEST_CORRUPTIONS + VALIDATION_CORRUPTIONS


def cache_dir() -> Path:
    return Path(os.environ.get("EDGETUNE_CACHE", Path.home() / ".cache" / "edgetune"))


def parse_corruptions(spec: str) -> tuple[str, ...]:
    """``"all"`` -> the 15 test corruptions; ``"val"`` -> the 4 extra ones; else a comma list.

    Raises:
        ConfigError: an unknown corruption name.
    """
    if spec == "all":
        return TEST_CORRUPTIONS
    if spec == "val":
        return VALIDATION_CORRUPTIONS
    names = tuple(s.strip() for s in spec.split(",") if s.strip())
    bad = [n for n in names if n not in ALL_CORRUPTIONS and n != "clean"]
    if bad or not names:
        raise ConfigError(f"corruption: unknown {bad or spec!r}; use 'all', 'val', 'clean' or names from "
                          "`edgetune list corruptions`")
    return names


def corrupt(images: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    """Corrupt uint8 N x H x W images (deterministic given ``seed``); ``clean`` returns a copy.

    Raises:
        ConfigError: unknown name or severity outside 1..5.
    """
    if name == "clean":
        return images.copy()
    if name not in ALL_CORRUPTIONS:
        raise ConfigError(f"corruption: unknown {name!r}; see `edgetune list corruptions`")
    if not 1 <= severity <= 5:
        raise ConfigError(f"corruption: severity must be 1..5 (got {severity})")
    key = hashlib.sha1(images.tobytes() + f"{name}/{severity}/{seed}".encode()).hexdigest()[:20]
    path = cache_dir() / "corruptions" / f"{name}-{severity}-{key}.npy"
    if path.exists():
        return np.load(path)
    from imagecorruptions import corrupt as _corrupt

    out = np.empty_like(images)
    np.random.seed(seed)  # imagecorruptions draws from numpy's global generator
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, im in enumerate(images):
            rgb = np.repeat(im[:, :, None], 3, axis=2)
            c = np.asarray(_corrupt(rgb, corruption_name=name, severity=severity))
            out[i] = np.clip(np.round(c.astype(np.float32).mean(axis=2)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, out)
    tmp.replace(path)
    return out
