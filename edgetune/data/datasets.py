"""The ``Dataset`` type and the built-in datasets that ship in packages: scikit-learn's digits,
Debian's Fashion-MNIST (and HAPT, ``edgetune.data.hapt``).

A dataset holds a fixed train/val/test split. Its samples are in one of three layouts, told
apart by dtype and rank (``to_tensor`` turns each into the models' float32 N x C x ... input):

* uint8 N x H x W — grey images (the built-ins: 32 x 32), values 0..255;
* uint8 N x C x H x W — images with C channels (RGB: C = 3), values 0..255;
* float32 N x C x ... — arrays fed to the model as they are (sensor windows N x C x T, or images).

Images keep uint8 semantics because the corruptions work on uint8 pictures. Labels are int64;
-1 marks a sample without a label (an unlabelled source or stream).
"""
from __future__ import annotations

import gzip
import os
import hashlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from edgetune.errors import DataError
from edgetune.registry import Registry

FASHION_MNIST_DIR = Path(os.environ.get("EDGETUNE_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_APT = "apt-get install -y dataset-fashion-mnist"


@dataclass(frozen=True)
class Dataset:
    """A dataset split in three (layouts in the module docstring; label -1: unlabelled).

    ``test_groups`` optionally names the group (e.g. the subject) of every test sample: a
    stream with no synthetic shift is then cut into one segment per group (the real shift).
    ``description`` says where the samples came from (shown in reports).
    """

    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int = 10
    test_groups: np.ndarray | None = None
    description: str = ""

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """One sample as the model sees it: C x H x W (images) or C x T (1-D arrays)."""
        return shape_of(self.train_x if len(self.train_x) else self.test_x)

    @property
    def kind(self) -> str:
        """``image`` (uint8 pictures: the image corruptions apply) or ``array`` (float32 as is)."""
        return "image" if self.train_x.dtype == np.uint8 else "array"

    @property
    def labelled(self) -> bool:
        """Every training sample has a label."""
        return bool(len(self.train_y)) and bool((self.train_y >= 0).all())

    @cached_property
    def digest(self) -> str:
        """Content hash of every array (the data identity that keys caches)."""
        h = hashlib.sha256(self.name.encode())
        for a in (self.train_x, self.train_y, self.val_x, self.val_y, self.test_x, self.test_y, self.test_groups):
            if a is not None:
                h.update(str((a.dtype, a.shape)).encode())
                h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()[:24]


DATASETS: Registry = Registry("dataset")


def shape_of(x: np.ndarray) -> tuple[int, ...]:
    """The model input shape of one sample of ``x`` (a layout of the module docstring)."""
    if x.dtype == np.uint8 and x.ndim == 3:
        return (1, *x.shape[1:])
    return tuple(int(d) for d in x.shape[1:])


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """Samples in a dataset layout -> the models' float32 N x C x ... input: uint8 images scaled
    to [0, 1] (grey N x H x W gains the channel axis), float32 arrays as they are."""
    if images.dtype == np.uint8:
        x = torch.from_numpy(images.astype(np.float32) / 255.0)
        return x[:, None] if images.ndim == 3 else x
    return torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))


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
    return Dataset("digits", images[tr], y[tr], images[va], y[va], images[te], y[te],
                   description="scikit-learn digits upsampled to 32x32")


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
    return Dataset("fashion-mnist", x[train], y[train], x[held], y[held], xt, yt,
                   description="Fashion-MNIST padded to 32x32")


_CACHE: dict[str, Dataset] = {}


def load_dataset(name: str) -> Dataset:
    """Load (and memoise) a built-in dataset by name; ``edgetune.data.load_data`` also takes
    image folders, ``.npz`` files and torch datasets.

    Raises:
        ConfigError: unknown dataset name.
        DataError: the dataset's package is missing.
    """
    if name not in _CACHE:
        _CACHE[name] = DATASETS.get(name)()
    return _CACHE[name]
