"""Model zoo registry and loading of user models (``package.module:callable``)."""
from __future__ import annotations

import importlib
from typing import Callable

from edgetune.errors import ConfigError, ModelError
from edgetune.models.backbone import Backbone
from edgetune.models.zoo import McuNetS, TinyCNN, VitTiny
from edgetune.registry import Registry

ModelFactory = Callable[..., Backbone]
MODELS: Registry[ModelFactory] = Registry("model")
MODELS.add("tiny-cnn", lambda **kw: TinyCNN(**kw))
MODELS.add("mcunet-s", lambda **kw: McuNetS(norm="ws", **kw))
MODELS.add("mcunet-s-gn", lambda **kw: McuNetS(norm="gn", **kw))
MODELS.add("mcunet-s-bn", lambda **kw: McuNetS(norm="bn", **kw))
MODELS.add("vit-tiny", lambda **kw: VitTiny(**kw))

MODEL_HELP = {
    "tiny-cnn": "4 conv stages, ~28k params, weight-standardised (tests)",
    "mcunet-s": "MobileNetV2-style inverted residuals + depthwise, ~130k params, weight-standardised",
    "mcunet-s-gn": "mcunet-s with GroupNorm (per-sample statistics; tent's batch-1 model)",
    "mcunet-s-bn": "mcunet-s with BatchNorm (bn-adapt / alpha-bn baselines)",
    "vit-tiny": "ViT, 32x32, patch 4, 4 layers, width 64 (vqt's faithful setting)",
}


def build_model(name: str, num_classes: int = 10, in_channels: int = 1, image_size: int = 32) -> Backbone:
    """Build a zoo model or a user model given as ``package.module:callable``.

    Raises:
        ConfigError: unknown zoo name or a user reference that cannot be imported.
        ModelError: the user callable does not return a ``Backbone``.
    """
    kwargs = dict(num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    if ":" not in name:
        return MODELS.get(name)(**kwargs)
    module_name, _, attr = name.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"model: cannot import {name!r} ({exc}); give an importable "
                          "package.module:callable") from None
    model = factory(**kwargs)
    if not isinstance(model, Backbone):
        raise ModelError(f"model: {name} returned {type(model).__name__}, not an edgetune Backbone; "
                         "subclass edgetune.models.Backbone (set stages, classifier, input_shape)")
    return model


__all__ = ["Backbone", "MODELS", "MODEL_HELP", "build_model"]
