"""Source datasets that ship in packages: scikit-learn's digits and Debian's Fashion-MNIST.

Every dataset is returned as uint8 images N x 32 x 32 (one channel) with int64 labels and a
fixed train/val/test split, so corruptions (which work on uint8 pictures) apply directly.
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgetune.errors import DataError
from edgetune.registry import Registry

FASHION_MNIST_DIR = Path(os.environ.get("EDGETUNE_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_APT = "apt-get install -y dataset-fashion-mnist"


@dataclass(frozen=True)
class Dataset:
    """A labelled dataset split in three; images are uint8 N x 32 x 32."""

    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int = 10


DATASETS: Registry = Registry("dataset")


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 N x H x W -> float32 N x 1 x H x W in [0, 1] (the models' input convention)."""
    return torch.from_numpy(images.astype(np.float32) / 255.0)[:, None]


def _stratified_split(y: np.ndarray, fractions: tuple[float, ...], seed: int) -> list[np.ndarray]:
    rng = np.random.RandomState(seed)
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    for c in np.unique(y):
        idx = rng.permutation(np.where(y == c)[0])
        bounds = np.round(np.cumsum((0.0,) + fractions) * len(idx)).astype(int)
        for i in range(len(fractions)):
            parts[i].append(idx[bounds[i]:bounds[i + 1]])
    return [np.sort(np.concatenate(p)) for p in parts]


@DATASETS.register("digits")
def load_digits() -> Dataset:
    """scikit-learn's 1,797 8x8 digits, bilinearly upsampled to 32x32; 70/10/20 split (seed 0)."""
    from scipy.ndimage import zoom
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    small = d.images.astype(np.float32) * (255.0 / 16.0)
    big = np.stack([zoom(im, 4, order=1) for im in small])
    images = np.clip(np.round(big), 0, 255).astype(np.uint8)
    y = d.target.astype(np.int64)
    tr, va, te = _stratified_split(y, (0.7, 0.1, 0.2), seed=0)
    return Dataset("digits", images[tr], y[tr], images[va], y[va], images[te], y[te])


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path) as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


@DATASETS.register("fashion-mnist")
def load_fashion_mnist() -> Dataset:
    """Debian's dataset-fashion-mnist (60k/10k, 28x28) zero-padded to 32x32; 2,000 training
    images (200 per class, seed 0) are held out as the validation split.

    Raises:
        DataError: the package is not installed (the message gives the apt command).
    """
    files = {k: FASHION_MNIST_DIR / f"{k}.gz" for k in (
        "train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
    missing = [p.name for p in files.values() if not p.exists()]
    if missing:
        raise DataError(f"fashion-mnist: {', '.join(missing)} not found in {FASHION_MNIST_DIR}; "
                        f"install Debian's package ({FASHION_MNIST_APT}) or set EDGETUNE_FASHION_MNIST_DIR")
    pad = ((0, 0), (2, 2), (2, 2))
    x = np.pad(_read_idx(files["train-images-idx3-ubyte"]), pad)
    y = _read_idx(files["train-labels-idx1-ubyte"]).astype(np.int64)
    xt = np.pad(_read_idx(files["t10k-images-idx3-ubyte"]), pad)
    yt = _read_idx(files["t10k-labels-idx1-ubyte"]).astype(np.int64)
    rng = np.random.RandomState(0)
    held = np.sort(np.concatenate([rng.permutation(np.where(y == c)[0])[:200] for c in range(10)]))
    train = np.setdiff1d(np.arange(len(y)), held)
    return Dataset("fashion-mnist", x[train], y[train], x[held], y[held], xt, yt)


_CACHE: dict[str, Dataset] = {}


def load_dataset(name: str) -> Dataset:
    """Load (and memoise) a dataset by name.

    Raises:
        ConfigError: unknown dataset name.
        DataError: the dataset's package is missing.
    """
    if name not in _CACHE:
        _CACHE[name] = DATASETS.get(name)()
    return _CACHE[name]
