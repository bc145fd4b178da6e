"""Data sources, one abstraction: whatever the user points at becomes a ``Dataset``.

``load_data(spec)`` takes

* a built-in name (``digits``, ``fashion-mnist``, ``hapt``);
* an image folder: one subfolder per class of PNG/JPEG files (read by Pillow; grey stays
  N x H x W, colour becomes N x 3 x H x W, both uint8). A folder of image files without class
  subfolders is unlabelled (labels -1); a folder with ``train/`` and/or ``test/`` (and optionally
  ``val/``) subfolders keeps that split (only ``test/``: a stream to score, nothing to fit on);
* a ``.npz`` with ``x`` as N x C x H x W, N x H x W x C, N x H x W (grey) or N x C x T (1-D) and
  an optional ``y``, or with its own split ``x_train``/``y_train``, ``x_val``/``y_val``,
  ``x_test``/``y_test`` (any of them); uint8 ``x`` are pictures, anything else becomes float32;
* in the API also a ``Dataset``, a torch ``Dataset`` or any iterable of ``(x, y)`` or ``x``.

A labelled folder or ``.npz`` without its own split is split 70/10/20 (stratified, seed 0), so
``train-source`` and ``eval`` of the same files never share a sample: the source role reads the
training split, the stream role the test split. An unlabelled source is not split (every split
is all of it); neither is a torch dataset or iterable (pass one per role).

Samples keep their size unless ``resize`` / ``crop`` are given; ``conform`` then checks them
against a model's input and names both shapes when they differ.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from edgetune.data import hapt  # noqa: F401  (registers the 'hapt' built-in)
from edgetune.data.datasets import DATASETS, Dataset, load_dataset, shape_of
from edgetune.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
SPLIT = (0.7, 0.1, 0.2)
_MEMO: dict[tuple, Dataset] = {}


def load_data(spec: Any, resize: tuple[int, int] | None = None, crop: tuple[int, int] | None = None,
              name: str | None = None) -> Dataset:
    """The ``Dataset`` that ``spec`` names (see the module docstring), resized / centre-cropped
    to ``resize`` / ``crop`` (H, W) only when they are given. Folders and files are memoised.

    Raises:
        DataError: a path that does not exist or holds no readable samples, mixed sizes without
            ``resize``, a malformed ``.npz``, or a missing built-in dataset package.
        ConfigError: ``resize`` / ``crop`` that are not two positive sizes.
    """
    if isinstance(spec, Dataset):
        data = spec
    elif isinstance(spec, (str, Path)):
        key = (str(spec), resize, crop)
        if key not in _MEMO:
            _MEMO[key] = reshape(_load_named(str(spec), resize), resize, crop)
        return _MEMO[key]
    else:
        data = _from_iterable(spec, name or type(spec).__name__)
    return reshape(data, resize, crop)


def describe(spec: Any) -> str:
    """What a spec is, for messages: a built-in name, a folder, a file or a Python object."""
    if isinstance(spec, Dataset):
        return spec.name
    if isinstance(spec, (str, Path)):
        return str(spec)
    return type(spec).__name__


def _load_named(spec: str, resize: tuple[int, int] | None) -> Dataset:
    if spec in DATASETS:
        return load_dataset(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _load_folder(path, resize)
    if path.suffix == ".npz" and path.is_file():
        return _load_npz(path)
    builtin = ", ".join(DATASETS.names())
    raise DataError(f"data: {spec!r} is neither a built-in dataset ({builtin}) nor an existing image folder or "
                    ".npz file; pass one of those")


# --- image folders ------------------------------------------------------------------------------

def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _read_images(files: list[Path], resize: tuple[int, int] | None) -> np.ndarray:
    """uint8 N x H x W (every file grey) or N x 3 x H x W (any file in colour)."""
    from PIL import Image

    pictures = []
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
                pictures.append(im.copy())
        except OSError as exc:
            raise DataError(f"data: cannot read image {f} ({exc}); remove or re-save the file") from None
    grey = all(p.mode in ("L", "1", "I;16", "I", "F") for p in pictures)
    mode = "L" if grey else "RGB"
    arrays = []
    for p in pictures:
        p = p.convert(mode)
        if resize is not None:
            p = p.resize((resize[1], resize[0]), Image.Resampling.BILINEAR)
        a = np.asarray(p, dtype=np.uint8)
        arrays.append(a if grey else a.transpose(2, 0, 1))
    sizes = sorted({a.shape[-2:] for a in arrays})
    if len(sizes) > 1:
        raise DataError(f"data: images of {files[0].parent.parent} have different sizes ({sizes[0]} and {sizes[-1]}, "
                        "H x W); pass --resize H,W to bring them to one size")
    return np.stack(arrays)


def _labelled_folder(folder: Path, resize: tuple[int, int] | None,
                     classes: list[str] | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    subdirs = sorted(p.name for p in folder.iterdir() if p.is_dir() and _image_files(p))
    classes = classes or subdirs
    unknown = sorted(set(subdirs) - set(classes))
    if unknown:
        raise DataError(f"data: {folder} has class folders {unknown} that the training split lacks; use the same "
                        "class folder names in every split")
    files, labels = [], []
    for k, c in enumerate(classes):
        if (folder / c).is_dir():
            found = _image_files(folder / c)
            files += found
            labels += [k] * len(found)
    return _read_images(files, resize), np.asarray(labels, dtype=np.int64), classes


def _load_folder(folder: Path, resize: tuple[int, int] | None) -> Dataset:
    name = str(folder.resolve())
    splits = [s for s in ("train", "val", "test") if (folder / s).is_dir()]
    if "train" in splits or "test" in splits:
        classes = sorted({p.name for s in splits for p in (folder / s).iterdir() if p.is_dir() and _image_files(p)})
        parts = {s: _labelled_folder(folder / s, resize, classes)[:2] for s in splits}
        return _own_split(name, parts, len(classes), f"image folder ({len(classes)} classes, own split)")
    if any(p.is_dir() and _image_files(p) for p in folder.iterdir()):
        x, y, classes = _labelled_folder(folder, resize)
        return split_labelled(name, x, y, len(classes), f"image folder ({len(classes)} classes)")
    files = _image_files(folder)
    if not files:
        raise DataError(f"data: {folder} holds no images ({', '.join(IMAGE_SUFFIXES[:3])}, ...) and no class "
                        "folders of images; point at a folder of images or of class subfolders")
    return unlabelled(name, _read_images(files, resize), "image folder without labels")


# --- arrays ---------------------------------------------------------------------------------------

def _layout(x: np.ndarray, where: str) -> np.ndarray:
    """An array in one of the ``Dataset`` layouts (see edgetune.data.datasets)."""
    if x.ndim == 4:
        if x.shape[3] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
            x = x.transpose(0, 3, 1, 2)  # N x H x W x C
        if x.dtype == np.uint8 and x.shape[1] == 1:
            x = x[:, 0]
    elif x.ndim == 3:
        pass  # uint8: grey pictures N x H x W; otherwise N x C x T
    else:
        raise DataError(f"data: {where} has x of shape {x.shape}; expected N x C x H x W, N x H x W x C, "
                        "N x H x W or N x C x T")
    x = np.ascontiguousarray(x if x.dtype == np.uint8 else x.astype(np.float32))
    if x.dtype != np.uint8 and not np.isfinite(x).all():
        raise DataError(f"data: {where} holds NaN or Inf samples; drop or repair them")
    return x


def _labels(y: Any, n: int, where: str) -> np.ndarray:
    y = np.asarray(y).reshape(-1)
    if len(y) != n:
        raise DataError(f"data: {where} has {n} samples but {len(y)} labels; give one label per sample")
    if not np.issubdtype(y.dtype, np.integer) and not np.all(np.mod(y, 1) == 0):
        raise DataError(f"data: {where} labels must be class indices 0..K-1 (got {y.dtype}); store integers")
    return y.astype(np.int64)


def _load_npz(path: Path) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError) as exc:
        raise DataError(f"data: cannot read {path} ({exc}); save it with numpy.savez(path, x=..., y=...)") from None
    name = str(path.resolve())
    own = [s for s in ("train", "val", "test") if f"x_{s}" in arrays]
    if own:
        missing = [s for s in own if f"y_{s}" not in arrays]
        if missing:
            raise DataError(f"data: {path} has x_{missing[0]} but no y_{missing[0]}; give labels for every split "
                            "(or save one unsplit x)")
        parts = {s: (_layout(arrays[f"x_{s}"], f"{path} (x_{s})"),
                     _labels(arrays[f"y_{s}"], len(arrays[f"x_{s}"]), f"{path} (y_{s})")) for s in own}
        classes = max(int(y.max()) + 1 if len(y) else 0 for _, y in parts.values())
        return _own_split(name, parts, classes, ".npz with its own split")
    if "x" not in arrays:
        raise DataError(f"data: {path} has no array 'x' (has {sorted(arrays)}); save it with "
                        "numpy.savez(path, x=..., y=...)")
    x = _layout(arrays["x"], str(path))
    if "y" not in arrays:
        return unlabelled(name, x, ".npz without labels")
    y = _labels(arrays["y"], len(x), str(path))
    return split_labelled(name, x, y, int(y.max()) + 1 if len(y) else 0, ".npz")


def _from_iterable(items: Iterable, name: str) -> Dataset:
    """A torch Dataset or an iterable of (x, y) or x; not split (see the module docstring)."""
    xs, ys = [], []
    try:
        for item in items:
            x, y = item if isinstance(item, (tuple, list)) and len(item) == 2 else (item, -1)
            xs.append(np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x))
            ys.append(int(y))
    except TypeError as exc:
        raise DataError(f"data: cannot iterate {name} ({exc}); pass a torch Dataset or an iterable of (x, y) or "
                        "x") from None
    if not xs:
        raise DataError(f"data: {name} yielded no samples; pass at least one")
    if len({a.shape for a in xs}) > 1:
        raise DataError(f"data: {name} yields samples of different shapes ({xs[0].shape} and "
                        f"{next(a.shape for a in xs if a.shape != xs[0].shape)}); give one shape")
    x = np.stack(xs)
    if x.dtype != np.uint8:
        x = x.astype(np.float32)
    x = _layout(x if x.ndim > 2 else x[:, None], name)
    y = np.asarray(ys, dtype=np.int64)
    k = int(y.max()) + 1 if (y >= 0).any() else 0
    return Dataset(name, x, y, x[:0], y[:0], x, y, num_classes=k, description="Python samples")


def _own_split(name: str, parts: dict[str, tuple[np.ndarray, np.ndarray]], classes: int,
               description: str) -> Dataset:
    """A dataset from the splits the user made; a missing split is empty."""
    some_x, some_y = next(iter(parts.values()))
    shapes = {x.shape[1:] for x, _ in parts.values()}
    if len(shapes) > 1 or len({x.dtype for x, _ in parts.values()}) > 1:
        raise DataError(f"data: the splits of {name} hold samples of different shapes or types ({sorted(shapes)}); "
                        "give every split the same layout")
    x_empty, y_empty = some_x[:0], some_y[:0]
    get = {s: parts.get(s, (x_empty, y_empty)) for s in ("train", "val", "test")}
    return Dataset(name, *get["train"], *get["val"], *get["test"], num_classes=classes, description=description)


def unlabelled(name: str, x: np.ndarray, description: str) -> Dataset:
    """Samples without labels: every split is all of them (labels -1)."""
    y = np.full(len(x), -1, dtype=np.int64)
    return Dataset(name, x, y, x, y, x, y, num_classes=0, description=description)


def split_labelled(name: str, x: np.ndarray, y: np.ndarray, classes: int, description: str,
                   seed: int = 0) -> Dataset:
    """A stratified 70/10/20 split (seeded), the same every time for the same samples."""
    from edgetune.data.datasets import _stratified_split

    tr, va, te = _stratified_split(y, SPLIT, seed)
    return Dataset(name, x[tr], y[tr], x[va], y[va], x[te], y[te], num_classes=classes,
                   description=f"{description}, split 70/10/20")


# --- sizes ---------------------------------------------------------------------------------------

def _resize_array(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    if x.dtype == np.uint8:
        t = torch.from_numpy(x.astype(np.float32))
        t = t[:, None] if x.ndim == 3 else t
        out = F.interpolate(t, size=size, mode="bilinear", align_corners=False)
        out = out[:, 0] if x.ndim == 3 else out
        return np.clip(np.round(out.numpy()), 0, 255).astype(np.uint8)
    if x.ndim == 3:  # N x C x T: resample time
        return F.interpolate(torch.from_numpy(x), size=size[-1], mode="linear", align_corners=False).numpy()
    return F.interpolate(torch.from_numpy(x), size=size, mode="bilinear", align_corners=False).numpy()


def _crop_array(x: np.ndarray, size: tuple[int, int], name: str) -> np.ndarray:
    h, w = x.shape[-2:]
    if size[0] > h or size[1] > w:
        raise DataError(f"data: cannot crop {name}'s {h}x{w} samples to {size[0]}x{size[1]}; crop to at most the "
                        "sample size, or --resize first")
    top, left = (h - size[0]) // 2, (w - size[1]) // 2
    return np.ascontiguousarray(x[..., top:top + size[0], left:left + size[1]])


def _size_of(x: np.ndarray) -> tuple[int, ...]:
    """What ``--resize`` changes: H, W of images; the length T of 1-D windows (float N x C x T)."""
    return tuple(x.shape[-1:]) if x.dtype != np.uint8 and x.ndim == 3 else tuple(x.shape[-2:])


def reshape(data: Dataset, resize: tuple[int, int] | None, crop: tuple[int, int] | None) -> Dataset:
    """``data`` with every split resized (bilinear) then centre-cropped (H, W) where asked.

    Raises:
        ConfigError: sizes that are not positive; DataError: a crop larger than the samples.
    """
    import dataclasses

    from edgetune.errors import ConfigError

    for option, size in (("--resize", resize), ("--crop", crop)):
        if size is not None and (len(size) != 2 or min(size) < 1):
            raise ConfigError(f"data: {option} takes two positive sizes H,W (got {size}); e.g. {option} 32,32")
    if resize is None and crop is None:
        return data
    parts = {}
    for split in ("train_x", "val_x", "test_x"):
        x = getattr(data, split)
        wanted = (resize[1],) if resize is not None and len(_size_of(x)) == 1 else resize
        if resize is not None and _size_of(x) != tuple(wanted or ()):
            x = _resize_array(x, (int(resize[0]), int(resize[1])))
        if crop is not None:
            x = _crop_array(x, (int(crop[0]), int(crop[1])), data.name)
        parts[split] = x
    return dataclasses.replace(data, **parts)


def conform(data: Dataset, input_shape: tuple[int, ...], role: str = "data") -> Dataset:
    """Check that ``data``'s samples have the model's input shape.

    Raises:
        DataError: one line naming both shapes and the option that fixes it.
    """
    have = data.sample_shape
    want = tuple(int(d) for d in input_shape)
    if have == want:
        return data
    if len(want) == 3 and want == (1, *have) and data.kind == "array":  # float N x H x W: grey images
        import dataclasses
        return dataclasses.replace(data, **{k: getattr(data, k)[:, None] for k in ("train_x", "val_x", "test_x")})
    fmt = "x".join
    if len(have) != len(want) or have[0] != want[0]:
        fix = (f"give samples with {want[0]} channel(s) ({'grey' if want[0] == 1 else 'RGB' if want[0] == 3 else ''} "
               f"images or {fmt(map(str, want))} arrays)" if len(have) == len(want)
               else f"give {'images' if len(want) == 3 else '1-D windows'} of shape {fmt(map(str, want))}")
    else:
        fix = f"pass --resize {','.join(map(str, want[1:]))} (or --crop) to bring them to the model's size"
    raise DataError(f"{role}: samples of {data.name} are {fmt(map(str, have))} but the model takes "
                    f"{fmt(map(str, want))}; {fix}")


def conformed(spec: Any, input_shape: tuple[int, ...], role: str = "data", resize: tuple[int, int] | None = None,
              crop: tuple[int, int] | None = None) -> Dataset:
    """``load_data`` then ``conform``: the data of one role, ready for a model.

    Raises:
        DataError, ConfigError: see ``load_data`` and ``conform``.
    """
    return conform(load_data(spec, resize, crop), input_shape, role)


__all__ = ["conform", "conformed", "describe", "load_data", "reshape", "split_labelled", "unlabelled", "shape_of"]
