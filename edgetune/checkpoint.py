"""Backbone checkpoints: a folder with ``weights.pt`` and ``config.json`` (with the weights' sha256)."""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import torch

from edgetune.errors import CheckpointError
from edgetune.models import Backbone, build_model
from edgetune.version import __version__


def save_checkpoint(directory: str | Path, model_name: str, model: Backbone, meta: dict[str, Any]) -> Path:
    """Write ``model``'s weights and a config (model name, shapes, ``meta``) to ``directory``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    raw = buf.getvalue()
    (out / "weights.pt").write_bytes(raw)
    config = {"format": "edgetune-checkpoint/1", "edgetune_version": __version__, "model": model_name,
              "num_classes": model.num_classes, "input_shape": list(model.input_shape),
              "sha256": hashlib.sha256(raw).hexdigest(), **meta}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def load_checkpoint(directory: str | Path) -> tuple[Backbone, dict[str, Any]]:
    """Rebuild the backbone a checkpoint folder describes and load its weights (eval mode).

    Raises:
        CheckpointError: missing files, a checksum mismatch, or weights that do not fit the model.
    """
    d = Path(directory)
    cfg_path, w_path = d / "config.json", d / "weights.pt"
    if not cfg_path.exists() or not w_path.exists():
        raise CheckpointError(f"checkpoint: {d} lacks config.json or weights.pt; "
                              "create one with `edgetune train-source -o DIR`")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint: {cfg_path} is not valid JSON ({exc}); re-run train-source") from None
    raw = w_path.read_bytes()
    if hashlib.sha256(raw).hexdigest() != config.get("sha256"):
        raise CheckpointError(f"checkpoint: {w_path} does not match the sha256 in config.json (corrupt or "
                              "edited); re-run `edgetune train-source`")
    c, h, w = config["input_shape"]
    model = build_model(config["model"], num_classes=config["num_classes"], in_channels=c, image_size=h)
    try:
        model.load_state_dict(torch.load(io.BytesIO(raw), weights_only=True))
    except (RuntimeError, KeyError) as exc:
        raise CheckpointError(f"checkpoint: weights do not fit model {config['model']!r} "
                              f"({str(exc).splitlines()[0]}); check the model name in config.json") from None
    return model.eval(), config
