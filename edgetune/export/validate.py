"""Checks before a bundle is written: the partition (torch and ONNX), ops, static shapes, dtypes.

Every check collects all problems and raises one ``ExportError`` (one line) listing them.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import onnx
import torch
from google.protobuf.message import DecodeError

from edgetune.errors import ExportError
from edgetune.export.fold import OPSET
from edgetune.export.manifest import onnx_name

# ONNX vs torch agreement required at export (float32 graphs; the tests demand 1e-4 absolute).
NUMERIC_ATOL, NUMERIC_RTOL = 1e-4, 1e-5
# Element types a graph may hold: float32 data, int8 / int32 quantised data, int64 shapes and axes.
ALLOWED_DTYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.INT8, onnx.TensorProto.INT32,
                            onnx.TensorProto.INT64, onnx.TensorProto.BOOL})


def _fail(label: str, problems: Sequence[str], fix: str) -> None:
    if problems:
        raise ExportError(f"{label}: {len(problems)} problem(s): {'; '.join(problems)}; {fix}")


def _load(source: str | Path | onnx.ModelProto, label: str) -> onnx.ModelProto:
    if isinstance(source, onnx.ModelProto):
        return source
    try:
        return onnx.load(str(source))
    except (DecodeError, OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ExportError(f"{label}: not a readable ONNX model ({type(exc).__name__}: {first}); re-export it") from None


def _dims(vi: onnx.ValueInfoProto) -> tuple[int, ...] | None:
    """Static shape of a value, or None when any dimension is symbolic or unknown."""
    t = vi.type.tensor_type
    if not t.HasField("shape") or not all(d.HasField("dim_value") for d in t.shape.dim):
        return None
    return tuple(d.dim_value for d in t.shape.dim)


def validate_onnx(source: str | Path | onnx.ModelProto, supported_ops: Iterable[str], *, label: str | None = None,
                  inputs: Sequence[tuple[str, tuple[int, ...]]] | None = None,
                  outputs: Sequence[tuple[str, tuple[int, ...]]] | None = None) -> onnx.ModelProto:
    """Check one graph: well-formed, opset >= 17, only ``supported_ops``, static shapes on every tensor,
    allowed element types, float32 inputs/outputs, and (when given) exactly ``inputs`` / ``outputs``
    as (name, shape) in order. Returns the shape-inferred model.

    Raises:
        ExportError: one line listing every problem (unsupported ops with their node names at once).
    """
    label = label or (Path(source).name if not isinstance(source, onnx.ModelProto) else "onnx")
    model = _load(source, label)
    try:
        onnx.checker.check_model(model)
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise ExportError(f"{label}: malformed ONNX ({first}); re-export the graph") from None
    g = model.graph
    problems: list[str] = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < OPSET:
        problems.append(f"opset {opset} < {OPSET}")

    unsupported: dict[str, list[str]] = defaultdict(list)
    allowed = set(supported_ops)
    for k, node in enumerate(g.node):
        op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        if op not in allowed:
            unsupported[op].append(node.name or f"#{k}")
    if unsupported:
        problems.append("unsupported ops: " + ", ".join(f"{op} (nodes {', '.join(n)})" for op, n in
                                                          sorted(unsupported.items())))

    initialised = {t.name for t in g.initializer}
    values = [v for v in list(g.input) + list(g.value_info) + list(g.output) if v.name not in initialised]
    dynamic = [v.name for v in values if _dims(v) is None]
    produced = {o for n in g.node for o in n.output} - {v.name for v in values}
    dynamic += sorted(produced - initialised)  # shape inference could not even tell the rank
    if dynamic:
        problems.append(f"dynamic or unknown shapes: {', '.join(dict.fromkeys(dynamic))}")

    bad_types = [f"{v.name} ({onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type)})" for v in values
                 if v.type.tensor_type.elem_type not in ALLOWED_DTYPES]
    bad_types += [f"{v.name} ({onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type)}, must be float32)"
                  for v in list(g.input) + list(g.output) if v.type.tensor_type.elem_type != onnx.TensorProto.FLOAT]
    bad_types += [f"{t.name} ({onnx.TensorProto.DataType.Name(t.data_type)})" for t in g.initializer
                  if t.data_type not in ALLOWED_DTYPES]
    if bad_types:
        problems.append(f"wrong dtypes: {', '.join(dict.fromkeys(bad_types))}")

    for kind, got, want in (("inputs", g.input, inputs), ("outputs", g.output, outputs)):
        have = [(v.name, _dims(v)) for v in got]
        if want is not None and have != [(n, tuple(s)) for n, s in want]:
            problems.append(f"{kind} are {have}, expected {[(n, tuple(s)) for n, s in want]}")
    _fail(label, problems, "export with static input shapes and only the ops in edgetune.export.ops.SUPPORTED_OPS")
    return model


def check_partition(adaptable, x: torch.Tensor) -> None:
    """Check, in torch, that the partition is real: the taps carry no autograd history, and the
    gradient of ``loss`` reaches every trainable parameter and nothing of the backbone.

    Backbone parameters are switched to ``requires_grad`` for the check (and restored), so a
    ``forward_graph`` that secretly reads the backbone is caught.

    Raises:
        ExportError: taps with history, backbone parameters reached by the loss, trainable
            parameters the loss does not reach, or outputs of the wrong shape.
    """
    method, backbone = adaptable.method, adaptable.backbone
    label = f"partition of {method.name}"
    problems: list[str] = []
    with torch.enable_grad():
        history = [t.name for t, v in zip(method.taps(), adaptable.frozen(x)) if v.requires_grad]
    if history:
        problems.append(f"taps {', '.join(history)} require grad (a backbone parameter is trainable)")
    backbone_params = dict(backbone.named_parameters())
    trainable = set(method.trainable_names())
    params = {**{f"backbone.{n}": p for n, p in backbone_params.items()}, **dict(method.named_parameters())}
    flags = {n: p.requires_grad for n, p in params.items()}
    try:
        for n, p in params.items():
            p.requires_grad_(n.startswith("backbone.") or n in trainable)
            p.grad = None
        with torch.no_grad():
            taps = [t.detach().requires_grad_() for t in adaptable.frozen(x)]
        state = [method.get_buffer(n).detach().clone() for n in method.state_names()]
        with torch.enable_grad():
            logits, loss, new_state = method.forward_graph(taps, state, torch.tensor([method.momentum_now()]),
                                                           torch.zeros(1, method.num_classes))
            if tuple(logits.shape) != (1, method.num_classes):
                problems.append(f"logits have shape {tuple(logits.shape)}, expected (1, {method.num_classes})")
            if loss.dim() != 0:
                problems.append(f"loss has shape {tuple(loss.shape)}, expected a scalar")
            shapes = [(tuple(a.shape), tuple(b.shape)) for a, b in zip(state, new_state)]
            if len(new_state) != len(state) or any(a != b for a, b in shapes):
                problems.append(f"new_state shapes {[tuple(s.shape) for s in new_state]} differ from the state's "
                                f"{[tuple(s.shape) for s in state]}")
            if loss.requires_grad:
                loss.backward()
        reached = [n for n in backbone_params if params[f"backbone.{n}"].grad is not None]
        if reached:
            problems.append(f"the loss reaches backbone parameters ({', '.join(reached[:5])}"
                            f"{', ...' if len(reached) > 5 else ''}): forward_graph must read only the taps")
        unknown = [n for n in method.trainable_names() if n not in params]
        if unknown:
            problems.append(f"trainable_names() lists unknown parameters ({', '.join(unknown)})")
        dead = [n for n in method.trainable_names() if n in params and params[n].grad is None]
        if dead:
            problems.append(f"trainable parameters get no gradient from the loss ({', '.join(dead)})")
    finally:
        for n, p in params.items():
            p.requires_grad_(flags[n])
            p.grad = None
    _fail(label, problems, f"fix {type(method).__name__}.forward_graph / trainable_names()")


def check_trainable_initialisers(model: onnx.ModelProto, method) -> None:
    """Check that trainable.onnx holds only the method's own parameters and buffers (ONNX-side
    partition check: a backbone weight that leaked into the trainable side shows up here).

    Raises:
        ExportError: initialisers that are not a parameter or buffer of the method.
    """
    own = {onnx_name(n) for n, _ in method.named_parameters()} | {onnx_name(n) for n, _ in method.named_buffers()}
    foreign = [t.name for t in model.graph.initializer if t.name not in own]
    _fail("trainable.onnx", [f"initialisers that are not {method.name}'s parameters or buffers: "
                             f"{', '.join(foreign)}"] if foreign else [],
          "forward_graph must read only its inputs and the method's own modules")


def _worst(pairs: Iterable[tuple[str, np.ndarray, np.ndarray]]) -> list[str]:
    problems = []
    for name, got, want in pairs:
        if got.shape != want.shape:
            problems.append(f"{name} has shape {got.shape}, torch gives {want.shape}")
            continue
        diff = float(np.abs(got.astype(np.float64) - want).max()) if got.size else 0.0
        if not diff <= NUMERIC_ATOL + NUMERIC_RTOL * float(np.abs(want).max(initial=0.0)):
            problems.append(f"{name} differs from torch by {diff:.3g}")
    return problems


def check_frozen_numerics(path: Path, adaptable, images: torch.Tensor) -> None:
    """Check that the float frozen graph reproduces the torch taps on ``images`` (N x C x H x W).

    Raises:
        ExportError: a tap differs by more than ``NUMERIC_ATOL`` + ``NUMERIC_RTOL`` x its magnitude.
    """
    from edgetune.ort_runtime import session  # ort_runtime imports this package's manifest

    sess = session(path)
    names = [t.name for t in adaptable.method.taps()]
    problems: list[str] = []
    for k in range(len(images)):
        x = images[k:k + 1]
        with torch.no_grad():
            want = [t.numpy() for t in adaptable.frozen(x)]
        got = sess.run(names, {"x": x.numpy()})
        problems += _worst([(f"{n} (sample {k})", g, w) for n, g, w in zip(names, got, want)])
    _fail(path.name, problems[:5], "a torch op was exported wrongly; report it with the model definition")


def check_trainable_numerics(bundle_dir: Path, manifest, adaptable, images: torch.Tensor) -> None:
    """Check that trainable.onnx, run from the bundle, reproduces ``forward_graph`` in torch (logits,
    loss, new state) on ``images``, unsupervised and with a one-hot target.

    Raises:
        ExportError: an output differs by more than ``NUMERIC_ATOL`` + ``NUMERIC_RTOL`` x its magnitude.
    """
    from edgetune.ort_runtime import OrtTrainable  # ort_runtime imports this package's manifest

    method = adaptable.method
    runner = OrtTrainable(bundle_dir, manifest)
    state = [method.get_buffer(n).detach().clone() for n in method.state_names()]
    momentum = torch.tensor([method.momentum_now()])
    names = [o.name for o in manifest.trainable.outputs]
    problems: list[str] = []
    for k in range(len(images)):
        with torch.no_grad():
            taps = list(adaptable.frozen(images[k:k + 1]))
        target = torch.zeros(1, method.num_classes)
        if k % 2:
            target[0, k % method.num_classes] = 1.0
        with torch.no_grad():
            logits, loss, new_state = method.forward_graph(taps, state, momentum, target)
        o_logits, o_loss, o_state = runner(taps, state, momentum, target)
        want = [logits, loss, *new_state]
        got = [o_logits, o_loss, *o_state]
        problems += _worst([(f"{n} (sample {k})", g.numpy(), w.numpy()) for n, g, w in zip(names, got, want)])
    _fail("trainable.onnx", problems[:5], f"a torch op of {type(method).__name__}.forward_graph was exported "
                                          "wrongly; report it with the method")
