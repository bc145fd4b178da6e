"""torch -> ONNX for both sides of the partition (opset 17, static shapes, stable names).

Uses torch's TorchScript exporter (``dynamo=False``): in torch 2.13 the dynamo exporter cannot
emit opset 17 (it starts at 18 and its down-conversion fails on ReduceMean), while the
TorchScript exporter gives a clean opset-17 graph whose initialisers keep their module names.

Gradient stops: the exporter drops ``detach``, so a stop inside ``forward_graph`` (a detached
pseudo-label, ``edgetune.methods.base.stop_gradient``) would vanish and the compiled gradient
would flow where torch's does not. While trainable.onnx is traced, every ``detach`` becomes an
``Identity`` node named ``stop_gradient_<k>`` (``STOP_GRADIENT``), which the compilers treat as a
stop (compilers/train_step.py).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import onnx
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from edgetune.adapt import FrozenTaps
from edgetune.errors import ExportError
from edgetune.export.fold import OPSET, fold_shape_arithmetic
from edgetune.export.manifest import GraphInput, GraphOutput, ParameterSpec, TapOutput, onnx_name
from edgetune.methods import Method, TapSpec
from edgetune.models import Backbone

_PREFIX = "method."
STOP_GRADIENT = "stop_gradient"
_STOP_DOMAIN = "edgetune"


class _StopGradient(torch.autograd.Function):
    """``detach`` that the TorchScript exporter keeps, as a custom node rewritten after export."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.detach()

    @staticmethod
    def symbolic(g, x):
        out = g.op(f"{_STOP_DOMAIN}::StopGradient", x)
        out.setType(x.type())
        return out


class _KeepStops(TorchFunctionMode):
    """Routes every ``Tensor.detach`` through ``_StopGradient`` (only while trainable.onnx is traced)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.detach:
            return _StopGradient.apply(args[0])
        return func(*args, **(kwargs or {}))


def _export(module: nn.Module, args: tuple[torch.Tensor, ...], path: Path, inputs: list[str], outputs: list[str],
            fold: bool) -> onnx.ModelProto:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings about shapes: export is at batch 1 on purpose
            torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs,
                              opset_version=OPSET, dynamo=False, do_constant_folding=fold)
    except Exception as exc:  # the exporter raises many types; all mean the same to a user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"export: torch.onnx.export of {path.name} failed ({first}); the module must be "
                          "traceable with static shapes (no data-dependent Python control flow)") from exc
    return onnx.load(str(path))


def export_frozen(backbone: Backbone, taps: Sequence[TapSpec], path: Path) -> tuple[TapOutput, ...]:
    """Write the float frozen graph (input "x" -> taps) from the backbone with its norms folded.

    Raises:
        ExportError: the exporter fails.
    """
    module = FrozenTaps(backbone.for_export(), taps).eval()
    x = torch.zeros(1, *backbone.input_shape)
    with torch.no_grad():
        outs = module(x)
    # The backbone is frozen: folding its constants (weights included) is what we want here.
    model = _export(module, (x,), path, ["x"], [t.name for t in taps], fold=True)
    onnx.save(fold_shape_arithmetic(model), str(path))
    return tuple(TapOutput(t.name, tuple(o.shape), "float32", t.stage, t.pooled) for t, o in zip(taps, outs))


class GraphModule(nn.Module):
    """``method.forward_graph`` with flat positional inputs and outputs, as trainable.onnx calls it:
    (taps..., state..., momentum, target) -> (logits, loss, new_state...)."""

    def __init__(self, method: Method) -> None:
        super().__init__()
        self.method = method
        self.taps, self.states = len(method.tap_inputs()), len(method.state_names())

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        taps = list(inputs[:self.taps])
        state = list(inputs[self.taps:self.taps + self.states])
        momentum, target = inputs[-2], inputs[-1]
        with _KeepStops():
            logits, loss, new_state = self.method.forward_graph(taps, state, momentum, target)
        return (logits, loss, *new_state)


def trainable_example(method: Method, taps: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Example inputs of trainable.onnx in calling order: taps, current state, momentum, zero target."""
    state = [method.get_buffer(n).detach().clone() for n in method.state_names()]
    return (*[t.detach() for t in taps], *state, torch.tensor([method.momentum_now()], dtype=torch.float32),
            torch.zeros(1, method.num_classes))


def trainable_signature(method: Method, example: Sequence[torch.Tensor]) -> tuple[tuple[GraphInput, ...],
                                                                                     tuple[GraphOutput, ...]]:
    """Names, shapes and roles of trainable.onnx's inputs and outputs (the bundle contract)."""
    tap_names = method.tap_inputs()
    state_names = [f"state_{onnx_name(n)}" for n in method.state_names()]
    roles = ["tap"] * len(tap_names) + ["state"] * len(state_names) + ["momentum", "target"]
    names = tap_names + state_names + ["momentum", "target"]
    inputs = tuple(GraphInput(n, tuple(t.shape), "float32", r) for n, t, r in zip(names, example, roles))
    outputs = [GraphOutput("logits", (1, method.num_classes), "float32", "logits"),
               GraphOutput("loss", (), "float32", "loss")]
    outputs += [GraphOutput(f"new_{s}", i.shape, "float32", "state", s)
                for s, i in zip(state_names, inputs[len(tap_names):])]
    return inputs, tuple(outputs)


def export_trainable(method: Method, taps: Sequence[torch.Tensor], path: Path) -> tuple[
        tuple[GraphInput, ...], tuple[GraphOutput, ...], tuple[ParameterSpec, ...]]:
    """Write trainable.onnx: ``forward_graph`` with parameters as named initialisers (never folded).

    Raises:
        ExportError: the exporter fails, ONNX names collide, or a trainable parameter is not used.
    """
    example = trainable_example(method, taps)
    inputs, outputs = trainable_signature(method, example)
    was_training = method.training
    method.eval()
    try:
        # Folding off: the exporter's folding would bake transformed parameters into anonymous constants.
        model = _export(GraphModule(method), example, path, [i.name for i in inputs], [o.name for o in outputs],
                        fold=False)
    finally:
        method.train(was_training)
    _rename_initialisers(model)
    _name_stops(model)
    # The exporter drops inputs the graph does not read (source ignores momentum); the calling
    # convention keeps every one, in order.
    del model.graph.input[:]
    model.graph.input.extend(onnx.helper.make_tensor_value_info(i.name, onnx.TensorProto.FLOAT, i.shape)
                             for i in inputs)
    model = fold_shape_arithmetic(model)
    onnx.save(model, str(path))
    return inputs, outputs, _parameters(method, model)


def _name_stops(model: onnx.ModelProto) -> None:
    stops = [n for n in model.graph.node if n.domain == _STOP_DOMAIN]
    for k, node in enumerate(stops):
        node.op_type, node.domain, node.name = "Identity", "", f"{STOP_GRADIENT}_{k}"
    kept = [o for o in model.opset_import if o.domain != _STOP_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(kept)


def _rename_initialisers(model: onnx.ModelProto) -> None:
    renames = {t.name: onnx_name(t.name.removeprefix(_PREFIX)) for t in model.graph.initializer}
    clash = sorted({n for n in renames.values() if list(renames.values()).count(n) > 1} |
                   (set(renames.values()) & {i.name for i in model.graph.input}))
    if clash:
        raise ExportError(f"trainable.onnx: ONNX names collide after replacing '.' by '_' ({', '.join(clash)}); "
                          "rename the method's parameters or buffers")
    for t in model.graph.initializer:
        t.name = renames[t.name]
    for node in model.graph.node:
        for k, name in enumerate(node.input):
            if name in renames:
                node.input[k] = renames[name]


def _parameters(method: Method, model: onnx.ModelProto) -> tuple[ParameterSpec, ...]:
    present = {t.name for t in model.graph.initializer}
    named = dict(method.named_parameters())
    trainable = method.trainable_names()
    unused = [n for n in trainable if onnx_name(n) not in present]
    if unused:
        raise ExportError(f"trainable.onnx: trainable parameter(s) {', '.join(unused)} are not used by "
                          f"{method.name}.forward_graph; remove them from trainable_names() or use them")
    order = trainable + [n for n in named if n not in trainable and onnx_name(n) in present]
    return tuple(ParameterSpec(onnx_name(n), tuple(named[n].shape), "float32", n in trainable, n) for n in order)
