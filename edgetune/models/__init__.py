"""Model zoo registry and loading of user models (``package.module:callable``)."""
from __future__ import annotations

import importlib
import inspect
from typing import Callable

from edgetune.errors import ConfigError, EdgetuneError, ModelError
from edgetune.models.backbone import Backbone
from edgetune.models.reference import DSCNN, IMUConv1d, MobileNetV1, MobileNetV3Small, ResNet8
from edgetune.models.zoo import McuNetS, TinyCNN, VitTiny
from edgetune.registry import Registry

# A factory takes num_classes and input_shape (None: the model's own default input).
ModelFactory = Callable[..., Backbone]
MODELS: Registry[ModelFactory] = Registry("model")
MODELS.add("tiny-cnn", lambda **kw: TinyCNN(**kw))
MODELS.add("mcunet-s", lambda **kw: McuNetS(norm="ws", **kw))
MODELS.add("mcunet-s-gn", lambda **kw: McuNetS(norm="gn", **kw))
MODELS.add("mcunet-s-bn", lambda **kw: McuNetS(norm="bn", **kw))
MODELS.add("vit-tiny", lambda **kw: VitTiny(**kw))
MODELS.add("resnet8", lambda input_shape=None, **kw: ResNet8(input_shape=input_shape or (3, 32, 32), **kw))
MODELS.add("ds-cnn", lambda input_shape=None, **kw: DSCNN(input_shape=input_shape or (1, 49, 10), **kw))
MODELS.add("mobilenet-v1-025",
           lambda input_shape=None, **kw: MobileNetV1(input_shape=input_shape or (3, 96, 96), **kw))
MODELS.add("mobilenet-v3-s",
           lambda input_shape=None, **kw: MobileNetV3Small(input_shape=input_shape or (3, 32, 32), **kw))
MODELS.add("imu-conv1d", lambda input_shape=None, **kw: IMUConv1d(input_shape=input_shape or (6, 100), **kw))

MODEL_HELP = {
    "tiny-cnn": "4 conv stages, ~28k params, weight-standardised (tests)",
    "mcunet-s": "MobileNetV2-style inverted residuals + depthwise, ~130k params, weight-standardised",
    "mcunet-s-gn": "mcunet-s with GroupNorm (per-sample statistics; tent's batch-1 model)",
    "mcunet-s-bn": "mcunet-s with BatchNorm (bn-adapt / alpha-bn baselines)",
    "vit-tiny": "ViT, 32x32, patch 4, 4 layers, width 64 (vqt's faithful setting)",
    "resnet8": "MLPerf Tiny image classification ResNet-8, 3x32x32, 16-32-64 residual stacks, BN, ~78k params",
    "ds-cnn": "MLPerf Tiny keyword spotting DS-CNN, 1x49x10 MFCC, 64 channels, 4 separable blocks, ~23k params",
    "mobilenet-v1-025": "MLPerf Tiny visual wake words MobileNetV1 x0.25, 3x96x96, 2 classes, ~214k params",
    "mobilenet-v3-s": "MobileNetV3-small style (hardswish, squeeze-excitation, BN), 3x32x32, x0.5, ~260k params",
    "imu-conv1d": "Conv1d network for 6x100 IMU windows (N x C x T), 6 classes, ~35k params",
}


def _input_shape(in_channels: int | None, image_size: int | None,
                 input_shape: tuple[int, ...] | None) -> tuple[int, ...] | None:
    if input_shape is not None:
        shape = tuple(int(d) for d in input_shape)
        if len(shape) not in (2, 3) or min(shape) < 1:
            raise ConfigError(f"model: input shape must be C,T or C,H,W with positive sizes (got {shape}); "
                              "give e.g. 3,32,32 or 6,100")
        return shape
    if in_channels is None and image_size is None:
        return None
    size = image_size if image_size is not None else 32
    return (in_channels if in_channels is not None else 1, size, size)


def _call_user(factory: Callable[..., object], name: str, classes: dict[str, int],
               shape: tuple[int, ...] | None) -> object:
    """Call a user callable with ``input_shape`` when it takes one, else with ``in_channels`` and
    ``image_size`` (the older convention, square images only)."""
    try:
        takes_shape = "input_shape" in inspect.signature(factory).parameters
    except (TypeError, ValueError):  # no signature to read (a builtin): the older convention
        takes_shape = False
    if shape is None:
        return factory(**classes)
    if takes_shape:
        return factory(**classes, input_shape=shape)
    if len(shape) != 3 or shape[1] != shape[2]:
        raise ConfigError(f"model: {name} takes in_channels and image_size, so only square images, but the input "
                          f"shape is {shape}; add an input_shape parameter to the callable")
    return factory(**classes, in_channels=shape[0], image_size=shape[1])


def build_model(name: str, num_classes: int | None = None, in_channels: int | None = None,
                image_size: int | None = None, input_shape: tuple[int, ...] | None = None) -> Backbone:
    """Build a zoo model or a user model given as ``package.module:callable``.

    The input is ``input_shape`` (C,H,W or C,T) when given, else a square ``in_channels`` x
    ``image_size`` image when either is given, else the model's default (``edgetune list models``);
    ``num_classes`` None keeps the model's default (10, or the reference model's benchmark: 12
    keywords for ds-cnn, 2 for mobilenet-v1-025, 6 activities for imu-conv1d).

    Raises:
        ConfigError: unknown zoo name, a user reference that cannot be imported, a malformed
            input shape, or a non-square shape for a user callable without ``input_shape``.
        ModelError: the user callable does not return a ``Backbone``, or a zoo model does not
            take inputs of that rank.
    """
    shape = _input_shape(in_channels, image_size, input_shape)
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 1):
        raise ConfigError(f"model: num_classes must be a positive integer (got {num_classes!r}); pass the number "
                          "of classes of the data")
    classes = {} if num_classes is None else {"num_classes": num_classes}
    if ":" not in name:
        factory = MODELS.get(name)
        return factory(**classes) if shape is None else factory(**classes, input_shape=shape)
    module_name, _, attr = name.partition(":")
    try:
        user = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"model: cannot import {name!r} ({exc}); give an importable "
                          "package.module:callable") from None
    if not callable(user):
        raise ModelError(f"model: {name} is a {type(user).__name__}, not a callable; give a function or class "
                         "that returns an edgetune Backbone")
    try:
        model = _call_user(user, name, classes, shape)
    except EdgetuneError:
        raise
    except Exception as exc:  # the user's code can raise anything: theirs to fix, not an edgetune bug
        what = " ".join(str(exc).split())[:160]
        raise ModelError(f"model: {name} raised {type(exc).__name__}: {what}; fix the callable (run it alone to "
                         "see the traceback, or re-run with --debug)") from exc
    if not isinstance(model, Backbone):
        raise ModelError(f"model: {name} returned {type(model).__name__}, not an edgetune Backbone; "
                         "subclass edgetune.models.Backbone (set stages, classifier, input_shape)")
    _check_user_model(model, name, num_classes, shape)
    return model


def _check_user_model(model: Backbone, name: str, num_classes: int | None, shape: tuple[int, ...] | None) -> None:
    """A user model must take the input it was asked for and give one logit per class: one dry
    forward of a zero sample, so a wrong model fails here and not as a torch error mid-training.

    Raises:
        ModelError: another input shape or class count than asked for, or the forward raises.
    """
    import torch

    want = tuple(shape) if shape is not None else tuple(model.input_shape)
    if tuple(model.input_shape) != want:
        raise ModelError(f"model: {name} was asked for input {list(want)} but reports input_shape "
                         f"{list(model.input_shape)}; build the model for the input_shape it is given")
    if num_classes is not None and model.num_classes != num_classes:
        raise ModelError(f"model: {name} was asked for {num_classes} classes but reports num_classes="
                         f"{model.num_classes}; build the classifier with the num_classes it is given")
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(torch.zeros(1, *want))
    except Exception as exc:
        what = " ".join(str(exc).split())[:160]
        raise ModelError(f"model: {name} fails on a 1 x {list(want)} input ({type(exc).__name__}: {what}); build "
                         "the model for the input_shape it is given") from exc
    finally:
        model.train(was)
    if tuple(logits.shape) != (1, model.num_classes):
        raise ModelError(f"model: {name} returns logits of shape {tuple(logits.shape)} for 1 sample, not "
                         f"(1, {model.num_classes}); give it a classifier with num_classes outputs")


__all__ = ["Backbone", "MODELS", "MODEL_HELP", "build_model"]
