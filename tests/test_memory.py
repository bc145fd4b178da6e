"""Memory accounting: categories for every method, hand-counted values, and issue 2's acceptance
(the attachments' backward cost is at most a fifth of tent's on mcunet-s; feature-align's is zero).

Memory depends on shapes and on what autograd keeps, not on trained values: untrained models do.
"""
from __future__ import annotations

import pytest

from edgetune.adapt import prepare
from edgetune.memory import (CATEGORIES, backward_bytes, format_memory_comparison, format_memory_table,
                             memory_table, training_bytes)
from edgetune.methods import METHODS
from edgetune.models import build_model

NEEDS_BATCHNORM = ("bn-adapt", "alpha-bn")
ATTACHMENTS = ("tinytta", "lst", "vqt")
TRAINS_EVERY_WEIGHT = ("full-finetune",)  # no frozen weight left: the model is its trainable parameters


@pytest.fixture(scope="module")
def tables():
    """method -> memory table on mcunet-s (the BatchNorm baselines on its BatchNorm twin)."""
    return {name: memory_table(prepare(build_model("mcunet-s-bn" if name in NEEDS_BATCHNORM else "mcunet-s"), name))
            for name in METHODS.names()}


@pytest.mark.parametrize("method", METHODS.names())
def test_every_category_is_counted(tables, method):
    table = tables[method]
    assert tuple(table) == CATEGORIES
    assert all(isinstance(v, int) and v >= 0 for v in table.values())
    assert table["peak_forward_activations"] > 0
    if method in TRAINS_EVERY_WEIGHT:
        assert table["frozen_weights"] == 0 and table["trainable_params"] > 0
    else:
        assert table["frozen_weights"] > 0
    assert table["gradients"] == table["trainable_params"]


@pytest.mark.parametrize("method", ATTACHMENTS)
def test_attachments_cost_at_most_a_fifth_of_tent(tables, method):
    assert 0 < backward_bytes(tables[method]) <= backward_bytes(tables["tent"]) / 5


def test_feature_align_keeps_nothing_for_backward(tables):
    table = tables["feature-align"]
    assert backward_bytes(table) == 0 and table["trainable_params"] == 0
    assert table["state"] == 2 * 96 * 4  # running mean and second moment of the 96-wide pooled feature


def test_tiny_cnn_counted_by_hand():
    table = memory_table(prepare(build_model("tiny-cnn"), "source"))
    # int8 conv weights 3*3*(1*16 + 16*32 + 32*32 + 32*48) = 27,792 bytes, plus a float32 scale and
    # an int32 bias per output channel: 8 * (16 + 32 + 32 + 48) = 1,024 bytes.
    assert table["frozen_weights"] == 27_792 + 1_024
    # peak while stage 1 runs: its int8 input 16x32x32 and output 32x16x16 (the ReLU6 runs in place)
    assert table["peak_forward_activations"] == 16 * 32 * 32 + 32 * 16 * 16
    assert table["float_constants"] == 4 * (48 * 10 + 10)  # the float classifier


def test_tent_saves_the_whole_float_backbone():
    backbone = build_model("tiny-cnn")
    adaptable = prepare(backbone, "tent")
    flags = {n: p.requires_grad for n, p in adaptable.method.named_parameters()}
    table = memory_table(adaptable)
    # every stage output at least, in float32
    assert table["saved_for_backward"] >= 4 * (16 * 32 * 32 + 32 * 16 * 16 + 32 * 8 * 8 + 48 * 4 * 4)
    # measuring leaves the method as it was
    assert {n: p.requires_grad for n, p in adaptable.method.named_parameters()} == flags
    assert all(p.grad is None for p in adaptable.method.parameters())


def test_pool_first_exit_heads_keep_almost_nothing(tables):
    assert tables["tinytta"]["saved_for_backward"] < 4096


def test_tables_print(tables):
    one = format_memory_table(tables["tinytta"])
    assert all(c in one for c in CATEGORIES) and "total" in one
    both = format_memory_comparison({"tent": tables["tent"], "tinytta": tables["tinytta"]}).splitlines()
    assert both[0].split() == ["category", "tent", "tinytta"]
    assert len(both) == len(CATEGORIES) + 3


def test_full_finetune_keeps_every_weight_in_ram_and_its_optimizer_state(tables):
    full = tables["full-finetune"]
    weights = 4 * sum(p.numel() for p in build_model("mcunet-s").parameters())
    assert full["trainable_params"] == full["gradients"] == full["optimizer_state"] == weights
    assert full["saved_for_backward"] >= tables["tent"]["saved_for_backward"]  # every activation, as tent


def test_label_learning_memory_ranks_as_the_methods_promise(tables):
    """Issue 12's memory side: lst and vqt train at <= 1/5 of full fine-tuning's memory; bias-only (TinyTL)
    below full fine-tuning; last-layer the least of the learners."""
    full = training_bytes(tables["full-finetune"])
    for method in ("lst", "vqt"):
        assert training_bytes(tables[method]) <= full / 5
    assert training_bytes(tables["last-layer"]) < training_bytes(tables["lst"])
    assert training_bytes(tables["bias-only"]) < full
    assert tables["bias-only"]["trainable_params"] < tables["full-finetune"]["trainable_params"] / 20
    assert training_bytes(tables["last-layer"]) == sum(tables["last-layer"].values()) - tables["last-layer"][
        "frozen_weights"]
