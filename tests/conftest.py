"""Shared fixtures: digits data and small backbones trained once per test session."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def _hermetic_cache(tmp_path_factory):
    """Every test session starts from an empty cache (fits, corruptions), so nothing stale leaks in."""
    path = tmp_path_factory.mktemp("edgetune-cache")
    old = os.environ.get("EDGETUNE_CACHE")
    os.environ["EDGETUNE_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("EDGETUNE_CACHE", None)
    else:
        os.environ["EDGETUNE_CACHE"] = old


@pytest.fixture(scope="session")
def digits():
    from edgetune.data import load_dataset
    return load_dataset("digits")


def _trained(tmp_path_factory, digits, model: str, epochs: int):
    from edgetune.checkpoint import load_checkpoint
    from edgetune.train import train_source
    out = tmp_path_factory.mktemp(f"ckpt-{model}")
    report = train_source(model, digits, out, epochs=epochs, progress=False)
    backbone, _ = load_checkpoint(out)
    return backbone, out, report


@pytest.fixture(scope="session")
def tiny_cnn(tmp_path_factory, digits):
    """(backbone, checkpoint dir, report): tiny-cnn trained on digits (~94% test accuracy)."""
    return _trained(tmp_path_factory, digits, "tiny-cnn", 15)


@pytest.fixture(scope="session")
def mcunet(tmp_path_factory, digits):
    """(backbone, checkpoint dir, report): mcunet-s trained on digits (~96% test accuracy)."""
    return _trained(tmp_path_factory, digits, "mcunet-s", 15)


@pytest.fixture(scope="session")
def mcunet_bn(tmp_path_factory, digits):
    return _trained(tmp_path_factory, digits, "mcunet-s-bn", 10)


@pytest.fixture(scope="session")
def vit(tmp_path_factory, digits):
    return _trained(tmp_path_factory, digits, "vit-tiny", 10)


def needs_tool(*tools: str):
    """Skip marker for tests that need an external tool — only where it is truly absent."""
    missing = [t for t in tools if shutil.which(t) is None]
    return pytest.mark.skipif(bool(missing), reason=f"not installed: {', '.join(missing)} (CI installs it)")


def known_settings(method: str, settings: dict[str, str]) -> dict[str, str]:
    """The entries of ``settings`` that are config fields of ``method``: one set of overrides for every method of a
    parametrised test (e.g. ``fit_view_images`` reaches tinytta only)."""
    import dataclasses

    from edgetune.methods import METHODS
    fields = {f.name for f in dataclasses.fields(METHODS.get(method).Config)}
    return {k: v for k, v in settings.items() if k in fields}
