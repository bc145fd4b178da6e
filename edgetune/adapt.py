"""The one path's first steps: ``prepare`` a backbone for a method, ``fit`` its attachments.

``Adaptable`` couples the frozen backbone (run in torch, or from the exported int8 ONNX in
onnxruntime) with a method; ``step`` is the per-sample loop body: taps -> predict -> adapt.
"""
from __future__ import annotations

import copy
import hashlib
import inspect
import json
from dataclasses import asdict
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from edgetune.data import Dataset, to_tensor
from edgetune.data.corruptions import cache_dir
from edgetune.data.roles import FIT_SAMPLES, check_mode
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


_CLASS_CODE: dict[type, bytes] = {}


def _class_code(cls: type) -> bytes:
    """The definition of a module class: its source, or (defined where no source file exists)
    the bytecode and constants of every function it defines, through its bases (memoised)."""
    if cls not in _CLASS_CODE:
        _CLASS_CODE[cls] = _read_class_code(cls)
    return _CLASS_CODE[cls]


def _read_class_code(cls: type) -> bytes:
    try:
        return inspect.getsource(cls).encode()
    except (OSError, TypeError):
        parts = [cls.__qualname__.encode()]
        for klass in cls.__mro__[:-1]:
            for attr, value in sorted(vars(klass).items()):
                code = getattr(value, "__code__", None)
                if code is not None:
                    parts += [attr.encode(), code.co_code, repr(code.co_consts).encode()]
        return b"\0".join(parts)


def model_digest(backbone: Backbone) -> str:
    """The model's definition, not only its weights: the code of every module class it is made
    of (its source, or its bytecode), functions set on module instances, the module tree (sizes,
    strides), the ONNX file's hash of a model loaded from ONNX, and the weights. Two models that
    share weights but differ in code get different digests, so no cache keyed by this goes stale."""
    h = hashlib.sha256(_backbone_digest(backbone).encode())
    source = getattr(backbone, "source", None)
    if source is not None:  # an ONNX backbone records its file's sha256 and the taps
        h.update(json.dumps(source, sort_keys=True, default=str).encode())
    for cls in sorted({type(m) for m in backbone.modules()}, key=lambda c: f"{c.__module__}.{c.__qualname__}"):
        h.update(_class_code(cls))
    for m in backbone.modules():
        for attr, value in sorted(vars(m).items()):
            code = getattr(value, "__code__", None)
            if code is not None:
                h.update(attr.encode() + code.co_code + repr(code.co_consts).encode())
    h.update(repr(backbone).encode())
    h.update(repr(tuple(backbone.input_shape)).encode())
    return h.hexdigest()


def fit_key(adaptable: Adaptable, data: Dataset, seed: int, max_samples: int = FIT_SAMPLES,
            mode: str = "labelled") -> str:
    """What determines a fit: model definition and weights, method and config, the source's
    content, mode, seed and sample cap."""
    m = adaptable.method
    h = hashlib.sha256(model_digest(adaptable.backbone).encode())
    h.update(json.dumps([m.name, type(m).__qualname__, asdict(m.config), data.digest, mode, seed, max_samples,
                         [asdict(t) for t in adaptable.frozen.specs]], sort_keys=True, default=str).encode())
    h.update(_class_code(type(m)))
    return h.hexdigest()[:24]


def source_taps(adaptable: Adaptable, images: np.ndarray, batch: int = 500) -> list[torch.Tensor]:
    """Taps of the frozen backbone (torch) for samples in a dataset layout, concatenated per tap."""
    parts: list[list[torch.Tensor]] = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            parts.append(list(adaptable.frozen(to_tensor(images[i:i + batch]))))
    return [torch.cat([p[k] for p in parts]) for k in range(len(adaptable.frozen.specs))]


@torch.no_grad()
def teacher_targets(backbone: Backbone, images: np.ndarray, batch: int = 500) -> torch.Tensor:
    """The model's own class probabilities (N x classes): the targets of an unlabelled fit."""
    backbone.eval()
    return torch.cat([torch.softmax(backbone(to_tensor(images[i:i + batch])), dim=-1)
                      for i in range(0, len(images), batch)])


def _init_from_classifier(method: Method) -> None:
    """Unlabelled fit: attachments shaped like the classifier (e.g. an exit head on a tap as wide
    as the last stage) start from its weights; the others keep their seeded initialisation.
    Methods that run the backbone themselves (bn-adapt, norm-align) have no classifier copy."""
    src = getattr(method, "classifier", None)
    if not isinstance(src, nn.Linear):
        return
    params = {id(p) for p in method.fit_parameters()}
    with torch.no_grad():
        for module in method.modules():
            if (module is not src and isinstance(module, nn.Linear) and id(module.weight) in params
                    and module.weight.shape == src.weight.shape):
                module.weight.copy_(src.weight)
                if module.bias is not None and src.bias is not None:
                    module.bias.copy_(src.bias)


def fit(adaptable: Adaptable, data: Dataset, seed: int = 0, progress: bool = True, use_cache: bool = True,
        max_samples: int = FIT_SAMPLES, mode: str = "labelled") -> dict[str, float]:
    """Pre-deployment fit on the source ``data`` (its training split): measure source statistics,
    then train the method's attachments (AdamW, one-cycle schedule) with the backbone frozen.

    ``mode`` (``edgetune.data.roles``): ``labelled`` trains with cross-entropy on the labels;
    ``unlabelled`` and ``none`` (``data`` is then the stream's warm-up) never read a label:
    attachments shaped like the classifier start from it and all are trained by distillation
    towards the model's own predictions. Results are cached (``$EDGETUNE_CACHE/fits``) by
    ``fit_key``, so ``eval`` and ``export`` of the same setting fit once. Returns a small report.

    Raises:
        ConfigError: an unknown mode.
        DataError: ``data`` is not a data source (anything ``edgetune.data.load_data`` takes), its
            samples are not shaped like the model's input, mode ``labelled`` on a source without
            labels, or a source without samples.
    """
    from edgetune.data import conform, load_data

    check_mode(mode)
    data = conform(data if isinstance(data, Dataset) else load_data(data), adaptable.backbone.input_shape, "source")
    if not len(data.train_x):
        raise DataError(f"source: {data.name} has no training samples; pass a source with samples")
    if mode == "labelled" and not data.labelled:
        raise DataError(f"source: {data.name} has no labels; fit it with mode 'unlabelled' (statistics and "
                        "distillation only)")
    method = adaptable.method
    path = cache_dir() / "fits" / f"{fit_key(adaptable, data, seed, max_samples, mode)}.pt"
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
    memo_key = (model_digest(adaptable.backbone), adaptable.frozen.specs, data.digest, seed, max_samples)
    if memo_key not in _TAP_MEMO:
        _TAP_MEMO.clear()
        _TAP_MEMO[memo_key] = source_taps(adaptable, data.train_x[idx])
    taps = _TAP_MEMO[memo_key]
    labelled = mode == "labelled"
    targets = torch.from_numpy(data.train_y[idx]) if labelled else teacher_targets(adaptable.backbone,
                                                                                   data.train_x[idx])
    method.calibrate([taps])
    report: dict[str, float] = {}
    params = method.fit_parameters()
    if not labelled:
        _init_from_classifier(method)
    # A method may fit on views of the source besides the clean taps (tinytta's grid exit heads: shifted
    # copies); ``fit_views`` returns (taps, targets) to train on, or None for the plain fit.
    views = getattr(method, "fit_views", None)
    if params and method.config.fit_epochs > 0 and views is not None:
        taps, targets = views(adaptable.frozen, data.train_x[idx], targets, seed) or (taps, targets)
    if params and method.config.fit_epochs > 0:
        val_x = data.val_x if len(data.val_x) else data.train_x[idx]
        val_y = (torch.from_numpy(data.val_y if len(data.val_x) else data.train_y[idx]) if labelled
                 else teacher_targets(adaptable.backbone, val_x))
        report = _train_attachments(method, taps, targets, params, source_taps(adaptable, val_x), val_y, seed,
                                    progress)
    method._initial = None
    method.reset()
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state": copy.deepcopy(method.state_dict()), "report": report}, path)
    return report


def _train_attachments(method: Method, taps: list[torch.Tensor], labels: torch.Tensor, params: list[nn.Parameter],
                       val_taps: list[torch.Tensor], val_y: torch.Tensor, seed: int,
                       progress: bool) -> dict[str, float]:
    """``labels``: class indices (labelled fit) or the model's probabilities (distillation)."""
    cfg = method.config
    batch = 128
    n = len(labels)
    steps = cfg.fit_epochs * ((n + batch - 1) // batch)
    opt = torch.optim.AdamW(params, lr=cfg.fit_lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.fit_lr, total_steps=steps, pct_start=0.2)
    g = torch.Generator().manual_seed(seed)
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



def start_new_task(adaptable: Adaptable) -> list[str]:
    """Transfer to a new task (new classes): every layer of the method that outputs the classes (a
    ``Linear`` with ``num_classes`` outputs: the classifier, heads, exit heads) starts at zero and
    learns them from revealed labels; everything else (side network, queries, statistics) stays as
    the fit left it. Returns the re-initialised parameter names (the report says them).

    Zero, not a random draw: a fresh class layer should know nothing (uniform predictions), and it
    is the same on every runtime without carrying a seed. The k-th zero tensor of a shape already
    restarted (lst's ``head.bias`` beside ``classifier.bias``) is filled with k * 1e-30 instead: torch's
    ONNX exporter keeps one initialiser for equal constants, and trainable.onnx would lose a trainable
    parameter (the logits move by 1e-30, so only exact ties change, the same on every runtime).

    Raises:
        ConfigError: the method has no class layer, or no re-initialised parameter is trainable, so the
            method cannot learn the new classes.
    """
    from edgetune.errors import ConfigError

    method = adaptable.method
    names: list[str] = []
    seen: dict[tuple[int, ...], int] = {}
    with torch.no_grad():
        for module_name, module in method.named_modules():
            if isinstance(module, nn.Linear) and module.out_features == method.num_classes:
                for kind, param in module.named_parameters(recurse=False):
                    k = seen.get(tuple(param.shape), 0)
                    seen[tuple(param.shape)] = k + 1
                    param.fill_(k * 1e-30)
                    names.append(f"{module_name}.{kind}")
    if not names:
        raise ConfigError(f"task: {method.name} has no class layer to restart (no Linear with {method.num_classes} "
                          "outputs); use a method that learns from labels (last-layer, lst, vqt, bias-only, "
                          "full-finetune)")
    learns = set(method.trainable_names()) if method.config.lr > 0 else set()
    if not learns & set(names):
        trainable = ", ".join(method.trainable_names()) or "none"
        raise ConfigError(f"task: {method.name} cannot learn new classes (its class layers {', '.join(names)} are "
                          f"not trained at test time; trainable: {trainable}); use a method that learns from labels "
                          "(last-layer, lst, vqt, bias-only, full-finetune)")
    method._initial = None  # reset() returns to the new task's start, not to the source classes
    method.reset()
    return names
