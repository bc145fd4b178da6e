"""Backbone checkpoints: a folder with ``weights.pt`` and ``config.json`` (with the weights' sha256).

Three ways in: ``train-source`` trains a model and saves it, ``import_checkpoint`` turns weights
trained elsewhere into the same folder, and ``load_checkpoint`` reads either back, checking
everything a hand-edited or damaged folder can get wrong before a number is computed from it.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from edgetune.errors import CheckpointError, EdgetuneError, ModelError
from edgetune.models import Backbone, build_model
from edgetune.version import __version__

FORMAT = "edgetune-checkpoint/1"
CONFIG_FILE, WEIGHTS_FILE = "config.json", "weights.pt"
# Where a checkpoint comes from, for the fix of every "no usable checkpoint" error.
HOW_TO_CREATE = ("train one with `edgetune train-source --model M -o DIR`, or bring weights trained elsewhere with "
                 "`edgetune import-checkpoint --model module:callable --weights W.pt -o DIR`")


def save_checkpoint(directory: str | Path, model_name: str, model: Backbone, meta: dict[str, Any]) -> Path:
    """Write ``model``'s weights and a config (model name, shapes, ``meta``) to ``directory``.

    Raises:
        CheckpointError: ``directory`` is a file, or cannot be written (read-only, under a file).
    """
    out = Path(directory)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    raw = buf.getvalue()
    config = {"format": FORMAT, "edgetune_version": __version__, "model": model_name,
              "num_classes": model.num_classes, "input_shape": list(model.input_shape),
              "sha256": hashlib.sha256(raw).hexdigest(), **meta}
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / WEIGHTS_FILE).write_bytes(raw)
        (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    except OSError as exc:
        raise CheckpointError(f"checkpoint: cannot write {out} ({exc.strerror or type(exc).__name__}); "
                              "give -o a new folder in a writable location (not under a file)") from None
    return out


def check_output_folder(directory: str | Path, option: str = "-o") -> Path:
    """Refuse an output folder that is a file or a non-empty folder that is not a checkpoint.

    Raises:
        CheckpointError: as described.
    """
    out = Path(directory)
    for parent in [out, *out.parents]:
        if parent.exists() and not parent.is_dir():
            raise CheckpointError(f"checkpoint: {option} {out} is {'a file' if parent == out else 'under the file'}"
                                  f"{'' if parent == out else ' ' + str(parent)}; give a folder path")
    if out.is_dir() and any(out.iterdir()) and not (out / CONFIG_FILE).exists():
        raise CheckpointError(f"checkpoint: {option} {out} is a non-empty folder without {CONFIG_FILE} (not a "
                              "checkpoint); give a new or empty folder so nothing else is overwritten")
    return out


def _config_problems(config: Any) -> list[str]:
    if not isinstance(config, dict):
        return [f"config.json holds a JSON {type(config).__name__}, not an object"]
    problems = []
    if config.get("format", FORMAT) != FORMAT:  # older checkpoints have no format field: read as the current one
        problems.append(f"'format' is {config.get('format')!r}, this edgetune reads {FORMAT!r}")
    if not isinstance(config.get("model"), str) or not config.get("model"):
        problems.append(f"'model' must be a model name string (got {config.get('model')!r})")
    k = config.get("num_classes")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        problems.append(f"'num_classes' must be a positive integer (got {k!r})")
    shape = config.get("input_shape")
    if not (isinstance(shape, list) and len(shape) in (2, 3)
            and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
        problems.append(f"'input_shape' must be [C, H, W] or [C, T] of positive integers (got {shape!r})")
    if not isinstance(config.get("sha256"), str):
        problems.append(f"'sha256' must be the weights' hex digest (got {config.get('sha256')!r})")
    return problems


def read_state_dict(raw: bytes, source: str) -> dict[str, torch.Tensor]:
    """A state dict from the bytes of a ``torch.save`` file, without running pickled code.

    Accepts a bare state dict, one nested under ``state_dict`` / ``model_state_dict`` (training
    framework checkpoints), and strips a ``module.`` prefix that every key has (DataParallel).

    Raises:
        CheckpointError: empty, truncated or random bytes; a pickled whole module; not tensors.
    """
    save_hint = "save it with `torch.save(model.state_dict(), 'W.pt')`"
    if not raw:
        raise CheckpointError(f"checkpoint: {source} is empty (0 bytes); {save_hint} again")
    try:
        obj = torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found:  # weights_only refuses classes: the file pickles a whole model object
            raise CheckpointError(f"checkpoint: {source} holds a pickled object ({found.group(1)}), not a state "
                                  f"dict; load it where its class is defined and {save_hint}") from None
        raise CheckpointError(f"checkpoint: {source} is not a torch file ({str(exc).splitlines()[0][:80]}); "
                              f"{save_hint}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0][:80] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint: {source} is truncated or not a torch file ({len(raw)} bytes: "
                              f"{first}); {save_hint}") from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        kind = type(obj).__name__ if not isinstance(obj, dict) else "a dict whose values are not all tensors"
        raise CheckpointError(f"checkpoint: {source} holds {kind}, not a state dict of tensors; {save_hint}")
    keys = list(obj)
    if all(k.startswith("module.") for k in keys):
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
    return obj


def check_state_dict(model: Backbone, state: dict[str, torch.Tensor], model_name: str, source: str) -> None:
    """Every key present with its shape, nothing extra, every value finite; all problems in one line.

    Raises:
        CheckpointError: listing missing keys, unexpected keys, shape mismatches and non-finite tensors.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}" for k, v in expected.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    nonfinite = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    parts = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes),
                         ("NaN/Inf in", nonfinite)):
        if names:
            shown = ", ".join(names[:6]) + (f", ... ({len(names)} in all)" if len(names) > 6 else "")
            parts.append(f"{label}: {shown}")
    if parts:
        fix = ("retrain or re-export the weights (non-finite values are never scored)" if nonfinite and len(parts) == 1
               else f"check that {model_name!r} is the architecture the weights were trained with "
                    "(and --num-classes / --input-shape)")
        raise CheckpointError(f"checkpoint: weights in {source} do not fit model {model_name!r} "
                              f"({'; '.join(parts)}); {fix}")


def _build(model_name: str, num_classes: int, input_shape: tuple[int, ...] | None) -> Backbone:
    try:
        model = build_model(model_name, num_classes=num_classes, input_shape=input_shape)
    except EdgetuneError:
        raise
    except Exception as exc:  # a user callable can raise anything: it is their model, not our bug
        raise ModelError(f"model: building {model_name!r} raised {type(exc).__name__}: "
                         f"{str(exc).strip().splitlines()[0][:100] if str(exc).strip() else ''}; "
                         "fix the callable (it is called with num_classes and input_shape)") from None
    if model.num_classes != num_classes:
        raise ModelError(f"model: {model_name!r} built with num_classes={num_classes} reports "
                         f"num_classes={model.num_classes}; make the callable honour num_classes")
    return model


def load_checkpoint(directory: str | Path) -> tuple[Backbone, dict[str, Any]]:
    """Rebuild the backbone a checkpoint folder describes and load its weights (eval mode).

    Raises:
        CheckpointError: missing files, config.json that is not valid (JSON, an object, the fields'
            types), a checksum mismatch, weights that are empty, truncated or not a state dict,
            weights that do not fit the model, or non-finite weights.
        ModelError, ConfigError: the model named in config.json cannot be built.
    """
    d = Path(directory)
    cfg_path, w_path = d / CONFIG_FILE, d / WEIGHTS_FILE
    if not d.is_dir():
        raise CheckpointError(f"checkpoint: {d} is not a folder; give a checkpoint folder ({HOW_TO_CREATE})")
    if not cfg_path.is_file() or not w_path.is_file():
        raise CheckpointError(f"checkpoint: {d} lacks {CONFIG_FILE} or {WEIGHTS_FILE}; {HOW_TO_CREATE}")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint: {cfg_path} is not valid JSON ({exc}); restore it or {HOW_TO_CREATE}"
                              ) from None
    problems = _config_problems(config)
    if problems:
        raise CheckpointError(f"checkpoint: {cfg_path} is malformed ({'; '.join(problems)}); restore the file "
                              f"written with the weights or {HOW_TO_CREATE}")
    raw = w_path.read_bytes()
    if not raw:
        raise CheckpointError(f"checkpoint: {w_path} is empty (0 bytes); {HOW_TO_CREATE}")
    if hashlib.sha256(raw).hexdigest() != config["sha256"]:
        raise CheckpointError(f"checkpoint: {w_path} does not match the sha256 in config.json (corrupt, truncated "
                              f"or edited, {len(raw)} bytes); restore it or {HOW_TO_CREATE}")
    state = read_state_dict(raw, str(w_path))
    model = _build(config["model"], config["num_classes"], tuple(config["input_shape"]))
    check_state_dict(model, state, config["model"], str(w_path))
    model.load_state_dict(state)
    return model.eval(), config


def parse_input_shape(text: str) -> tuple[int, ...]:
    """``"C,H,W"`` (or ``"C,T"``) -> a tuple of positive ints.

    Raises:
        ConfigError: not 2 or 3 comma-separated positive integers.
    """
    from edgetune.errors import ConfigError
    try:
        dims = tuple(int(p) for p in text.split(","))
    except ValueError:
        dims = ()
    if len(dims) not in (2, 3) or any(d <= 0 for d in dims):
        raise ConfigError(f"import-checkpoint: --input-shape must be C,H,W (or C,T) positive integers "
                          f"(got {text!r}); give e.g. --input-shape 1,32,32")
    return dims


def import_checkpoint(model_name: str, weights: str | Path, out_dir: str | Path,
                      input_shape: tuple[int, ...] | None = None, num_classes: int | None = None) -> dict[str, Any]:
    """Write a checkpoint folder from weights trained elsewhere for the model ``model_name``.

    ``num_classes`` defaults to the rows of ``classifier.weight`` in the state dict; ``input_shape``
    to the model builder's default. Returns the written config (which records the source file).

    Raises:
        CheckpointError: the weights file is missing, empty, corrupt, a pickled module, does not fit
            the model (all missing/unexpected/mis-shaped keys listed at once) or holds NaN/Inf;
            ``out_dir`` is a file, under a file, a non-checkpoint folder or not writable.
        ModelError, ConfigError: the model cannot be built, or its forward pass fails or returns
            something other than finite N x num_classes logits.
    """
    out = check_output_folder(out_dir)
    src = Path(weights)
    if not src.is_file():
        raise CheckpointError(f"import-checkpoint: --weights {src} is not a file; give the file written by "
                              "`torch.save(model.state_dict(), 'W.pt')`")
    raw = src.read_bytes()
    state = read_state_dict(raw, str(src))
    if num_classes is None:
        head = state.get("classifier.weight")
        num_classes = int(head.shape[0]) if head is not None and head.dim() == 2 else 10
    if num_classes < 1:
        raise CheckpointError(f"import-checkpoint: --num-classes must be positive (got {num_classes})")
    model = _build(model_name, num_classes, tuple(input_shape) if input_shape else None)
    check_state_dict(model, state, model_name, str(src))
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        try:
            logits = model(torch.zeros(2, *model.input_shape))
        except Exception as exc:  # the user's forward: any error is theirs to fix
            raise ModelError(f"model: {model_name} forward on a 2 x {list(model.input_shape)} input raised "
                             f"{type(exc).__name__} ({str(exc).strip().splitlines()[0][:100] if str(exc) else ''}); "
                             "check --input-shape and the model's forward") from None
    if tuple(logits.shape) != (2, num_classes) or not math.isfinite(float(logits.abs().sum())):
        raise ModelError(f"model: {model_name} returns logits of shape {tuple(logits.shape)} for 2 samples "
                         f"(expected (2, {num_classes}), finite); check --num-classes and the classifier")
    meta = {"imported": {"weights": src.name, "weights_sha256": hashlib.sha256(raw).hexdigest(),
                         "model": model_name, "edgetune_version": __version__}}
    save_checkpoint(out, model_name, model, meta)
    return json.loads((out / CONFIG_FILE).read_text())
