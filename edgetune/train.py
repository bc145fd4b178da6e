"""``train-source``: train a zoo backbone on the clean source split (the pretrained model TTA starts from).

The model is built for the data's sample shape (C x H x W or C x T) and class count, and the
checkpoint records the data it was trained on (``data``: the built-in name or the folder's /
file's absolute path, with ``data_resize`` / ``data_crop`` and ``data_digest``): that is the
default source when the checkpoint is evaluated or exported (``edgetune.data.roles``).
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from edgetune.checkpoint import save_checkpoint
from edgetune.data import Dataset, load_data, to_tensor
from edgetune.errors import ConfigError, DataError
from edgetune.models import Backbone, build_model


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A random +-2 px shift of the whole batch (zero padding); 1-D windows: +-2 time steps."""
    dx, dy = torch.randint(0, 5, (2,), generator=g).tolist()
    if x.dim() == 3:
        return F.pad(x, (2, 2))[:, :, dx:dx + x.shape[2]]
    pad = F.pad(x, (2, 2, 2, 2))
    return pad[:, :, dy:dy + x.shape[2], dx:dx + x.shape[3]]


@torch.no_grad()
def accuracy(model: Backbone, images: np.ndarray, labels: np.ndarray, batch: int = 1000) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(labels), batch):
        correct += int((model(to_tensor(images[i:i + batch])).argmax(1).numpy() == labels[i:i + batch]).sum())
    return correct / max(1, len(labels))


def training_subset(data: Dataset, images: int | None, seed: int) -> Dataset:
    """``data`` with a seeded ``images``-sized subset of its training split (None: all of it)."""
    if images is None or images == len(data.train_y):
        return data
    if images <= 0:
        raise ConfigError(f"train-source: --train-images must be positive (got {images}); pass a positive count "
                          "or drop it (all training images)")
    if images > len(data.train_y):  # never a silent clamp: the user asked for images that do not exist
        raise ConfigError(f"train-source: --train-images {images} is more than the {len(data.train_y)} training "
                          f"images of {data.name}; pass --train-images {len(data.train_y)} or fewer, or drop it "
                          "(all of them)")
    keep = np.random.RandomState(seed).permutation(len(data.train_y))[:images]
    return dataclasses.replace(data, train_x=data.train_x[keep], train_y=data.train_y[keep])


def train_source(model_name: str, data: Dataset | str, out_dir: str | Path, epochs: int = 10, lr: float = 3e-3,
                 batch: int = 128, seed: int = 0, progress: bool = True, augment: bool = True,
                 train_images: int | None = None, resize: tuple[int, int] | None = None,
                 crop: tuple[int, int] | None = None) -> dict[str, float]:
    """Train ``model_name`` on ``data``'s clean training split and write a checkpoint to ``out_dir``.

    ``data``: anything ``edgetune.data.load_data`` takes (``resize`` / ``crop`` applied and
    recorded). The model is built for the data's sample shape and classes. AdamW with a
    one-cycle schedule and (unless ``augment`` is off) shift augmentation, on the whole training
    split or a seeded subset of ``train_images``; returns validation/test accuracy.

    Raises:
        ConfigError: a non-positive epoch count, batch size or subset size, or a subset larger than the
            training split.
        DataError: data without labels, or that cannot be loaded.
    """
    if epochs <= 0 or batch <= 0:
        raise ConfigError(f"train-source: --epochs and --batch must be positive (got {epochs}, {batch})")
    data = load_data(data, resize, crop)
    if not data.labelled:
        raise DataError(f"train-source: {data.name} has no labels; training needs one class subfolder per class "
                        "(image folder) or y (.npz)")
    digest = data.digest
    data = training_subset(data, train_images, seed)
    torch.manual_seed(seed)
    model = build_model(model_name, num_classes=data.num_classes, input_shape=data.sample_shape)
    x_train, y_train = to_tensor(data.train_x), torch.from_numpy(data.train_y)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    steps_per_epoch = (len(y_train) + batch - 1) // batch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.2)
    g = torch.Generator().manual_seed(seed)
    start = time.time()
    bar = tqdm(range(epochs), desc=f"train {model_name} on {data.name}", disable=not progress)
    for _ in bar:
        model.train()
        perm = torch.randperm(len(y_train), generator=g)
        for i in range(0, len(y_train), batch):
            b = perm[i:i + batch]
            x = _augment(x_train[b], g) if augment else x_train[b]
            loss = F.cross_entropy(model(x), y_train[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", val=f"{accuracy(model, data.val_x, data.val_y):.3f}")
    report = {"val_accuracy": accuracy(model, data.val_x, data.val_y),
              "test_accuracy": accuracy(model, data.test_x, data.test_y),
              "train_seconds": round(time.time() - start, 1)}
    save_checkpoint(out_dir, model_name, model.eval(),
                    {"data": data.name, "data_resize": list(resize) if resize else None,
                     "data_crop": list(crop) if crop else None, "data_digest": digest, "epochs": epochs, "lr": lr,
                     "seed": seed, "augment": augment, "train_images": len(y_train), **report})
    return report
