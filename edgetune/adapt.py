"""The one path's first steps: ``prepare`` a backbone for a method, ``fit`` its attachments.

``Adaptable`` couples the frozen backbone (run in torch, or from the exported int8 ONNX in
onnxruntime) with a method; ``step`` is the per-sample loop body: taps -> predict -> adapt.
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import asdict
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from edgetune.data import Dataset, to_tensor
from edgetune.data.corruptions import cache_dir
from edgetune.errors import DataError
from edgetune.methods import METHODS, Method, TapSpec
from edgetune.models import Backbone

TapRunner = Callable[[torch.Tensor], list[torch.Tensor]]


class FrozenTaps(nn.Module):
    """The frozen side of the partition: input image -> the taps a method reads (what frozen.onnx is)."""

    def __init__(self, backbone: Backbone, taps: Sequence[TapSpec]) -> None:
        super().__init__()
        self.backbone = backbone
        self.specs = tuple(taps)
        self.depth = max((t.stage for t in taps), default=-1) + 1

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs: list[torch.Tensor] = []
        h = x
        for stage in self.backbone.stages[: self.depth]:
            h = stage(h)
            outs.append(h)
        return tuple(x if t.stage < 0 else (self.backbone.pool(outs[t.stage], t.stage) if t.pooled
                                            else outs[t.stage]) for t in self.specs)


class Adaptable:
    """A backbone prepared for one method: ``step(x)`` predicts a sample then adapts on it."""

    def __init__(self, backbone: Backbone, method: Method, model_name: str = "") -> None:
        self.backbone = backbone
        self.method = method
        self.model_name = model_name
        self.frozen = FrozenTaps(backbone, method.taps()).eval()
        self.tap_runner: TapRunner = self._torch_taps

    @torch.no_grad()
    def _torch_taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.frozen(x))

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.tap_runner(x)

    def step(self, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (1 x classes) for sample ``x`` (1 x C x H x W), then one adaptation step.

        Raises:
            DataError: the sample has the wrong shape or dtype, or contains NaN/Inf.
        """
        check_sample(x, self.backbone.input_shape)
        return self.method.step(self.taps(x), target)

    def reset(self) -> None:
        self.method.reset()


def check_sample(x: torch.Tensor, shape: tuple[int, ...]) -> None:
    """Reject a sample the runtime must not learn from (the C runtime applies the same rule)."""
    if x.dtype != torch.float32:
        raise DataError(f"sample: dtype must be float32 (got {x.dtype}); convert with .float()")
    if tuple(x.shape) != (1, *shape):
        raise DataError(f"sample: shape must be {(1, *shape)} (got {tuple(x.shape)}); batch size is 1")
    if not torch.isfinite(x).all():
        raise DataError("sample: contains NaN or Inf; drop or repair the sample before streaming it")


def prepare(backbone: Backbone, method: str, overrides: dict[str, str] | None = None,
            model_name: str = "", seed: int = 0) -> Adaptable:
    """Freeze ``backbone`` and attach ``method`` (config defaults, ``overrides`` as ``--set`` strings).

    Raises:
        ConfigError: unknown method or a bad override.
    """
    cls = METHODS.get(method)
    config = cls.Config().replace(overrides or {})
    backbone = backbone.eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    # Attachments are initialised from ``seed`` alone, whatever ran before in the process.
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        method_module = cls(backbone, config)
    return Adaptable(backbone, method_module, model_name)


_TAP_MEMO: dict[tuple, list[torch.Tensor]] = {}


def _backbone_digest(backbone: Backbone) -> str:
    h = hashlib.sha256()
    for v in backbone.state_dict().values():
        h.update(v.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def _fit_key(adaptable: Adaptable, data: Dataset, seed: int) -> str:
    m = adaptable.method
    h = hashlib.sha256(_backbone_digest(adaptable.backbone).encode())
    h.update(json.dumps([m.name, asdict(m.config), data.name, seed, len(data.train_y)],
                        sort_keys=True, default=str).encode())
    return h.hexdigest()[:24]


def source_taps(adaptable: Adaptable, images: np.ndarray, batch: int = 500) -> list[torch.Tensor]:
    """Taps of the frozen backbone (torch) for uint8 images, concatenated per tap."""
    parts: list[list[torch.Tensor]] = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            parts.append(list(adaptable.frozen(to_tensor(images[i:i + batch]))))
    return [torch.cat([p[k] for p in parts]) for k in range(len(adaptable.frozen.specs))]


def fit(adaptable: Adaptable, data: Dataset, seed: int = 0, progress: bool = True, use_cache: bool = True,
        max_samples: int = 20000) -> dict[str, float]:
    """Pre-deployment fit on labelled source data: measure source statistics, then train the
    method's attachments (AdamW, one-cycle schedule) with the backbone frozen.

    Results are cached (``$EDGETUNE_CACHE/fits``) by backbone weights, method config and data,
    so ``eval`` and ``export`` of the same setting fit once. Returns a small report.
    """
    method = adaptable.method
    path = cache_dir() / "fits" / f"{_fit_key(adaptable, data, seed)}.pt"
    if use_cache and path.exists():
        saved = torch.load(path, weights_only=True)
        method.load_state_dict(saved["state"])
        method._initial = None
        method.reset()
        return saved["report"]
    torch.manual_seed(seed)
    rng = np.random.RandomState(seed)
    idx = np.sort(rng.permutation(len(data.train_y))[:max_samples])
    # Source taps depend only on the frozen backbone and the tap specs: reuse them across the
    # configs of one method (hyperparameter searches fit many times in one process).
    memo_key = (_backbone_digest(adaptable.backbone), adaptable.frozen.specs, data.name, seed, max_samples)
    if memo_key not in _TAP_MEMO:
        _TAP_MEMO.clear()
        _TAP_MEMO[memo_key] = source_taps(adaptable, data.train_x[idx])
    taps = _TAP_MEMO[memo_key]
    labels = torch.from_numpy(data.train_y[idx])
    method.calibrate([taps])
    report: dict[str, float] = {}
    params = method.fit_parameters()
    if params and method.config.fit_epochs > 0:
        report = _train_attachments(method, taps, labels, params, data, adaptable, seed, progress)
    method._initial = None
    method.reset()
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state": copy.deepcopy(method.state_dict()), "report": report}, path)
    return report


def _train_attachments(method: Method, taps: list[torch.Tensor], labels: torch.Tensor, params: list[nn.Parameter],
                       data: Dataset, adaptable: Adaptable, seed: int, progress: bool) -> dict[str, float]:
    cfg = method.config
    batch = 128
    n = len(labels)
    steps = cfg.fit_epochs * ((n + batch - 1) // batch)
    opt = torch.optim.AdamW(params, lr=cfg.fit_lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.fit_lr, total_steps=steps, pct_start=0.2)
    g = torch.Generator().manual_seed(seed)
    val_taps = source_taps(adaptable, data.val_x)
    val_y = torch.from_numpy(data.val_y)
    before = _fit_val_loss(method, val_taps, val_y)
    bar = tqdm(range(cfg.fit_epochs), desc=f"fit {method.name}", disable=not progress, leave=False)
    for _ in bar:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, batch):
            b = perm[i:i + batch]
            loss = method.fit_loss([t[b] for t in taps], labels[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    after = _fit_val_loss(method, val_taps, val_y)
    return {"val_loss_before": before, "val_loss_after": after}


def _fit_val_loss(method: Method, taps: list[torch.Tensor], labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float(method.fit_loss(taps, labels))
