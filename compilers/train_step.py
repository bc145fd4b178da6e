"""trainable.onnx + manifest -> one fused Relax training step (forward, loss, gradient, update).

The bundle's per-sample function ``forward(taps..., state..., momentum, target) -> (logits,
loss, new_state...)`` is imported with the *trainable* parameters as function inputs and every
other initialiser as a constant. Reverse-mode AD (``relax.transform.Gradient``) is applied only
to the bindings between the trainable parameters and the loss: statistics updates, alignment
and anything behind a stop-gradient enter it as inputs, so they cost no backward work and may
use ops without a registered gradient. The result is one straight-line Relax module with two
entries (this calling order is the contract with the runtimes)::

    train_step(taps..., state..., momentum, target, params..., opt_states...)
        -> (logits, loss, new_state..., new_params..., new_opt_states...)
    infer(taps..., state..., momentum, target, params...) -> (logits, loss, new_state...)

``infer`` lets a runtime gate updates (predict without learning). ``TrainStep`` runs the
compiled module in the Relax VM and keeps parameters and optimizer state between calls.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import tvm
from onnx import numpy_helper
from tvm import relax
from tvm.ir.expr import GenericConst
from tvm.relax.op.base import register_gradient

from edgetune.compilers.emit import EmitTarget, resolve_target
from edgetune.compilers.emit_c import CSources, emit_c_source, write_workspace
from edgetune.compilers.onnx_import import check_onnx, import_onnx
from edgetune.compilers.optimizers import Optimizer, optimizer_from_manifest
from edgetune.export.manifest import INPUT_ROLES, TensorSpec  # the bundle format (stdlib only)
from edgetune.compilers.pipeline import clip_takes, lower
from edgetune.compilers.plan import StaticPlan, extract_plan
from edgetune.errors import CompileError, DataError

TRAIN_STEP = "train_step"
INFER = "infer"
# ONNX Identity nodes named so are gradient stops (edgetune.methods.base.stop_gradient at export).
STOP_GRADIENT = "stop_gradient"


def _zeros(spec: TensorSpec) -> np.ndarray:
    return np.zeros(spec.shape, spec.dtype)


@dataclass(frozen=True)
class TrainSignature:
    """The calling convention of ``train_step`` / ``infer``, read from a bundle manifest."""

    taps: tuple[TensorSpec, ...]
    state: tuple[TensorSpec, ...]
    momentum: TensorSpec
    target: TensorSpec
    outputs: tuple[TensorSpec, ...]  # logits, loss, new_state... (ONNX output order)
    trainable: tuple[TensorSpec, ...]  # calling order
    opt_states: tuple[TensorSpec, ...]  # parameter-major: every state of params[0], then params[1], ...
    optimizer: Optimizer

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return (*self.taps, *self.state, self.momentum, self.target)

    def updates(self) -> dict[int, int]:
        """``train_step`` output position -> the input position it replaces after the step (running
        state, parameters, optimizer state): what a runtime copies back, or aliases."""
        n_in, n_state, nt = len(self.inputs), len(self.state), len(self.taps)
        replaced = {2 + i: nt + i for i in range(n_state)}
        replaced.update({2 + n_state + j: n_in + j for j in range(len(self.trainable) + len(self.opt_states))})
        return replaced


def _spec(entry: Any) -> TensorSpec:
    return TensorSpec(entry.name, tuple(int(d) for d in entry.shape), entry.dtype)


def read_signature(manifest: Any) -> TrainSignature:
    """The calling convention of the training step, from a bundle ``Manifest`` (or its ``trainable``
    part): inputs with roles, outputs, parameters (trainable ones first, in calling order), optimizer.

    Raises:
        CompileError: the manifest does not describe a training step (all problems listed at once).
    """
    part = getattr(manifest, "trainable", manifest)
    problems: list[str] = []
    by_role: dict[str, list[TensorSpec]] = {r: [_spec(i) for i in part.inputs if i.role == r] for r in INPUT_ROLES}
    unknown = [f"{i.name}:{i.role}" for i in part.inputs if i.role not in INPUT_ROLES]
    if unknown:
        problems.append(f"unknown input roles {unknown} (known: {', '.join(INPUT_ROLES)})")
    for role in ("momentum", "target"):
        if len(by_role[role]) != 1:
            problems.append(f"{len(by_role[role])} inputs with role {role!r} (expected 1)")
    ordered = [s.name for role in INPUT_ROLES for s in by_role[role]]
    if [i.name for i in part.inputs] != ordered:
        problems.append("inputs are not ordered taps, state, momentum, target")
    roles = [o.role for o in part.outputs]
    if roles != ["logits", "loss"] + ["state"] * len(by_role["state"]):
        problems.append(f"output roles {roles} (expected logits, loss, then one state per state input)")
    trainable = tuple(_spec(p) for p in part.parameters if p.trainable)
    optimizer = optimizer_from_manifest(part.optimizer)
    expected = [(p.name, s.shape) for p in trainable for s in optimizer.states_of(p.shape)]
    listed = [(s.of, tuple(s.shape)) for s in part.optimizer.states]
    if listed != expected:
        problems.append(f"optimizer states {listed} differ from what {optimizer.kind} keeps per trainable "
                        f"parameter {expected}")
    if problems or not by_role["momentum"] or not by_role["target"]:
        raise CompileError(f"train_step: the manifest does not describe a training step ({'; '.join(problems)}); "
                           "re-export the bundle")
    return TrainSignature(tuple(by_role["tap"]), tuple(by_role["state"]), by_role["momentum"][0],
                          by_role["target"][0], tuple(_spec(o) for o in part.outputs), trainable,
                          tuple(_spec(s) for s in part.optimizer.states), optimizer)


# --- ONNX -> Relax ----------------------------------------------------------------------------------------


def check_graph(model: onnx.ModelProto, sig: TrainSignature) -> None:
    """Check the ONNX graph against the signature before importing it.

    Raises:
        CompileError: nodes use ops the TVM ONNX frontend cannot convert or shapes are dynamic
            (``check_onnx``); or names, shapes or order differ from the manifest, or a trainable
            parameter is not an initialiser (every problem named at once).
    """
    check_onnx(model, "trainable.onnx")
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}

    def described(values) -> list[tuple[str, tuple[int, ...]]]:
        return [(v.name, tuple(d.dim_value for d in v.type.tensor_type.shape.dim)) for v in values
                if v.name not in inits]

    problems = []
    for what, got, want in (("inputs", described(graph.input), sig.inputs),
                            ("outputs", described(graph.output), sig.outputs)):
        if got != [(s.name, s.shape) for s in want]:
            problems.append(f"{what} {got} differ from the manifest's {[(s.name, s.shape) for s in want]}")
    for p in sig.trainable:
        if p.name not in inits:
            problems.append(f"trainable parameter {p.name!r} is not an initialiser")
        elif tuple(inits[p.name].dims) != p.shape:
            problems.append(f"trainable parameter {p.name!r} has shape {tuple(inits[p.name].dims)} "
                            f"(manifest: {p.shape})")
    if problems:
        raise CompileError(f"train_step: trainable.onnx does not match its manifest ({'; '.join(problems)}); "
                           "re-export the bundle so graph and manifest agree")


def _cut_stop_gradients(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Turn every stop-gradient ``Identity`` (x -> y) into a new graph output x and graph input y.

    The frontend drops ``Identity``, so a stop would vanish in Relax; as an input, y is a value the
    gradient cannot flow through, and the step feeds it x's value. Returns the new inputs (in order).

    Raises:
        CompileError: a stopped tensor has no static shape.
    """
    stops = [n for n in model.graph.node if n.op_type == "Identity" and n.name.startswith(STOP_GRADIENT)]
    if not stops:
        return []
    inferred = onnx.shape_inference.infer_shapes(model)
    known = {v.name: v for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    known.update({t.name: onnx.helper.make_tensor_value_info(t.name, t.data_type, t.dims)
                  for t in model.graph.initializer})
    missing = [n.name for n in stops if n.input[0] not in known]
    if missing:
        raise CompileError(f"train_step: no static shape for the input of stop-gradient node(s) {missing}; "
                           "export with static shapes")
    inputs, outputs = [], {o.name for o in model.graph.output}
    for k, node in enumerate(stops):
        x, y = known[node.input[0]], onnx.ValueInfoProto()
        y.CopyFrom(x)
        # exporter names ("/Op_output_0") are not C identifiers; a graph output keeps its (safe) name
        y.name = node.output[0] if node.output[0] in outputs else f"{STOP_GRADIENT}_input{k}"
        for consumer in model.graph.node:
            consumer.input[:] = [y.name if i == node.output[0] else i for i in consumer.input]
        model.graph.node.remove(node)
        model.graph.output.append(x)
        inputs.append(y)
    return inputs


def import_forward(model: onnx.ModelProto, sig: TrainSignature) -> tuple[tvm.IRModule, dict[str, np.ndarray]]:
    """Import the per-sample function for differentiation.

    The module's ``forward(inputs..., stopped..., params...) -> (outputs..., to_stop...)`` takes the
    trainable parameters as its last inputs (every other initialiser is a folded constant) and one
    input per stop-gradient, whose value is the matching extra output. Also returns the initial
    values of the trainable parameters.

    Raises:
        CompileError: see ``check_graph``; also when TVM's frontend rejects a node.
    """
    check_graph(model, sig)
    model = onnx.ModelProto.FromString(model.SerializeToString())  # edited below; keep the caller's intact
    model.graph.input.extend(_cut_stop_gradients(model))
    inits = {t.name: t for t in model.graph.initializer}
    initial = {}
    for p in sig.trainable:
        tensor = inits[p.name]
        initial[p.name] = numpy_helper.to_array(tensor).astype(p.dtype)
        # a graph input instead of an initialiser: the frontend makes it a function parameter and
        # folds every remaining initialiser into a constant.
        model.graph.initializer.remove(tensor)
        model.graph.input.append(onnx.helper.make_tensor_value_info(p.name, tensor.data_type, p.shape))
    mod = relax.transform.FoldConstant()(import_onnx(model))
    return _with_gradients(relax.transform.DeadCodeElimination(["main"])(mod)), initial


def _static_ints(expr: relax.Expr) -> list[int] | None:
    if isinstance(expr, relax.Tuple) and all(isinstance(f, tvm.tirx.IntImm) for f in expr.fields):
        return [int(f.value) for f in expr.fields]
    return None


def _differentiable(value: relax.Expr) -> relax.Expr:
    """``value`` with the forms TVM 0.27 cannot differentiate replaced by equivalents it can:
    ``strided_slice`` has no gradient (-> ``take`` of constant indices per axis), ``layer_norm``
    has none (-> means, a square root and a division), and ``take``'s gradient does not legalise
    for a scalar index (-> a one-element ``take`` and a ``reshape``)."""
    if not isinstance(value, relax.Call) or not isinstance(value.op, tvm.ir.Op):
        return value
    if value.op.name == "relax.strided_slice":
        x = value.args[0]
        spec = [_static_ints(a) for a in value.args[1:5]]
        if any(v is None for v in spec):
            return value
        shape = [int(d) for d in x.ty.shape.values]
        out = x
        for axis, begin, end, stride in zip(*spec, strict=True):
            indices = np.arange(*slice(begin, end, stride).indices(shape[axis]), dtype="int64")
            out = relax.op.take(out, relax.const(indices), axis=axis)
        return out
    if value.op.name == "relax.nn.layer_norm":
        x, gamma, beta = value.args
        attrs = value.attrs
        axes = [int(a) for a in attrs.axes]
        mean = relax.op.mean(x, axes, keepdims=True)
        centred = relax.op.subtract(x, mean)
        variance = relax.op.mean(relax.op.multiply(centred, centred), axes, keepdims=True)
        out = relax.op.divide(centred, relax.op.sqrt(relax.op.add(variance, relax.const(float(attrs.epsilon),
                                                                                         x.ty.dtype))))
        out = relax.op.multiply(out, gamma) if attrs.scale else out
        return relax.op.add(out, beta) if attrs.center else out
    index = value.args[1] if value.op.name == "relax.take" else None
    if isinstance(index, GenericConst) and index.value.numpy().ndim == 0:
        index = relax.const(index.value.numpy().reshape(1))
        return relax.op.reshape(relax.op.take(value.args[0], index, axis=value.attrs.axis), value.ty.shape)
    return value


def _with_gradients(mod: tvm.IRModule) -> tvm.IRModule:
    """``main`` re-emitted through ``_differentiable`` (before anything is differentiated, so the
    forward and the gradient's replay of it stay identical and merge)."""
    func = mod["main"]
    bindings, fields = _body(func)
    bb = relax.BlockBuilder(mod)
    params = [relax.Var(p.name, p.ty) for p in func.params]
    with bb.function("forward", params):
        with bb.dataflow():
            mapping = dict(zip(func.params, params, strict=True))
            _emit(bb, bindings, mapping, rewrite=_differentiable)
            outputs = [bb.emit_output(mapping.get(f, f)) for f in fields]
        bb.emit_func_output(relax.Tuple(outputs))
    return relax.transform.DeadCodeElimination(["forward"])(bb.get())


# --- the fused step ---------------------------------------------------------------------------------------


@relax.expr_functor.mutator
class _Substitute(relax.PyExprMutator):
    """Replace variables by others (used to re-emit bindings into a new function)."""

    def __init__(self, mapping: dict) -> None:
        super().__init__()
        self.mapping = mapping

    def visit_var_(self, op):
        return self.mapping.get(op, op)

    def visit_dataflow_var_(self, op):
        return self.mapping.get(op, op)


def _emit(bb: relax.BlockBuilder, bindings, mapping: dict, rewrite=lambda value: value) -> None:
    """Re-emit ``bindings`` into ``bb`` with fresh variables (values passed through ``rewrite``),
    extending ``mapping`` old -> new."""
    sub = _Substitute(mapping)
    for b in bindings:
        mapping[b.var] = bb.emit(rewrite(sub.visit_expr(b.value)), name_hint=b.var.name)


def _body(func: relax.Function) -> tuple[list, list[relax.Expr]]:
    """(bindings, returned fields) of a single-dataflow-block function returning a tuple."""
    blocks = list(func.body.blocks)
    if len(blocks) != 1 or not isinstance(blocks[0], relax.DataflowBlock):
        raise CompileError(f"train_step: the imported graph has {len(blocks)} blocks (control flow?); "
                           "forward_graph must be straight-line (no If/Loop)")
    bindings = list(blocks[0].bindings)
    ret = func.body.body
    values = {b.var: b.value for b in bindings}
    while isinstance(ret, relax.Var) and ret in values:
        ret = values[ret]
    fields = list(ret.fields) if isinstance(ret, relax.Tuple) else [ret]
    for i, f in enumerate(fields):  # outputs are often aliases (gv = lv): name the value itself
        while isinstance(values.get(f), relax.Var):
            f = fields[i] = values[f]
    return bindings, fields


def _depends_on(bindings, roots) -> set:
    """Variables whose value depends on one of ``roots`` (forward reachability)."""
    dep = set(roots)
    for b in bindings:
        if any(v in dep for v in relax.analysis.free_vars(b.value)):
            dep.add(b.var)
    return dep


def _feeds(bindings, root) -> set:
    """Variables ``root`` is computed from (backward reachability), ``root`` included."""
    need = {root}
    for b in reversed(bindings):
        if b.var in need:
            need.update(relax.analysis.free_vars(b.value))
    return need


def _erf_gradient(orig_var, orig_call, output_grad, ctx) -> list[relax.Expr]:
    """d erf(x) / dx = 2 / sqrt(pi) * exp(-x^2) (GELU's erf; TVM 0.27 registers no gradient for it)."""
    x = orig_call.args[0]
    slope = relax.op.multiply(relax.const(2.0 / math.sqrt(math.pi), x.ty.dtype),
                              relax.op.exp(relax.op.negative(relax.op.multiply(x, x))))
    return [relax.op.multiply(output_grad, slope)]


def _register_missing_gradients() -> None:
    """Add the gradients TVM lacks to its op registry, only where it has none (a later TVM's own wins)."""
    if tvm.ir.Op.get("relax.erf").get_attr("FPrimalGradient") is None:
        register_gradient("relax.erf", _erf_gradient)


def _missing_gradients(bindings) -> list[str]:
    """Ops on the differentiated path that Relax cannot differentiate, as 'var (op)'."""
    missing = []
    for b in bindings:
        value = b.value
        if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op):
            if value.op.name == "relax.call_tir" or value.op.get_attr("FPrimalGradient") is None:
                callee = value.args[0].name_hint if value.op.name == "relax.call_tir" else value.op.name
                missing.append(f"{b.var.name} ({callee})")
    return missing


def _differentiate(mod: tvm.IRModule, bindings, loss, params, names: list[str]) -> tuple[relax.Function, list]:
    """The loss as a function of ``params`` and of the values it reads that do not depend on them,
    differentiated by ``relax.transform.Gradient``. Returns (adjoint, those read values).

    Only the bindings between the parameters and the loss are differentiated: statistics updates,
    alignment and stop-gradient'ed values are inputs here, so they cost no backward work and need
    no gradient.
    """
    feeds = _feeds(bindings, loss)
    unread = [name for name, p in zip(names, params, strict=True) if p not in feeds]
    if unread:
        raise CompileError(f"train_step: the loss does not depend on trainable parameter(s) {', '.join(unread)} "
                           "(or only through a stop_gradient); drop them from the method's trainable_names()")
    dep = _depends_on(bindings, params)
    path = [b for b in bindings if b.var in dep and b.var in feeds]
    _register_missing_gradients()
    missing = _missing_gradients(path)
    if missing:
        raise CompileError(f"train_step: no gradient for ops on the trainable path at {', '.join(missing)}; "
                           "use differentiable ops there (e.g. relu instead of clamp) or stop_gradient")
    reads: list = []
    for b in path:
        reads += [v for v in relax.analysis.free_vars(b.value) if v not in dep and v not in reads]
    bb = relax.BlockBuilder(mod)
    new_vars = [relax.Var(v.name, v.ty) for v in reads + list(params)]
    with bb.function("trainable_loss", new_vars):
        with bb.dataflow():
            mapping = dict(zip(reads + list(params), new_vars, strict=True))
            _emit(bb, path, mapping)
            out = bb.emit_output(mapping[loss])
        bb.emit_func_output(out)
    part = bb.get()
    part = relax.transform.Gradient("trainable_loss", require_grads=new_vars[len(reads):])(part)
    return part["trainable_loss_adjoint"], reads


def _emit_forward(bb: relax.BlockBuilder, bindings, mapping: dict, stops: list[tuple]) -> None:
    """Re-emit the forward bindings; a stop-gradient input takes its stopped value once that is
    computed, and bindings reading it wait until then (the frontend does not keep ONNX node order)."""
    pending = list(stops)
    reads = {b.var: relax.analysis.free_vars(b.value) for b in bindings}
    sub = _Substitute(mapping)

    def resolve() -> None:
        for x, y in list(pending):
            if x in mapping or not isinstance(x, relax.Var):
                mapping[y] = mapping.get(x, x)
                pending.remove((x, y))

    resolve()
    waiting = list(bindings)
    while waiting:
        later = []
        for b in waiting:
            if all(v in mapping for v in reads[b.var]):
                mapping[b.var] = bb.emit(sub.visit_expr(b.value), name_hint=b.var.name)
                resolve()
            else:
                later.append(b)
        if len(later) == len(waiting):
            raise CompileError(f"train_step: {len(later)} bindings wait on a stop-gradient that feeds itself; "
                               "a stop_gradient's input must not depend on its output")
        waiting = later


def build_train_module(mod: tvm.IRModule, sig: TrainSignature) -> tvm.IRModule:
    """``train_step`` and ``infer`` (see the module docstring) from ``import_forward``'s module.

    ``train_step`` is the forward, the adjoint of the loss and the optimizer update in one
    dataflow block; common subexpressions are merged, so the forward is computed once.

    Raises:
        CompileError: the graph has control flow, the loss does not depend on the trainable
            parameters, or an op on the trainable path has no gradient.
    """
    func = mod["forward"]
    bindings, fields = _body(func)
    n_in, n_out = len(sig.inputs), len(sig.outputs)
    n_stop = len(fields) - n_out
    inputs, stopped = list(func.params[:n_in]), list(func.params[n_in:n_in + n_stop])
    params = list(func.params[n_in + n_stop:])
    outputs, stops = fields[:n_out], list(zip(fields[n_out:], stopped, strict=True))
    adjoint: relax.Function | None = None
    reads: list = []
    if params:
        adjoint, reads = _differentiate(mod, bindings, outputs[1], params, [p.name for p in sig.trainable])

    def fresh(specs):
        return [relax.Var(s.name, relax.TensorType(s.shape, s.dtype)) for s in specs]

    bb = relax.BlockBuilder(mod)
    for name, update in ((TRAIN_STEP, True), (INFER, False)):
        new_inputs, new_params = fresh(sig.inputs), fresh(sig.trainable)
        new_states = fresh(sig.opt_states) if update else []
        with bb.function(name, new_inputs + new_params + new_states):
            with bb.dataflow():
                mapping = dict(zip(inputs + params, new_inputs + new_params, strict=True))
                _emit_forward(bb, bindings, mapping, stops)
                results = [mapping.get(f, f) for f in outputs]
                if update:
                    grads = []
                    if adjoint is not None:
                        amap = dict(zip(adjoint.params, [mapping[v] for v in reads] + new_params, strict=True))
                        _emit(bb, _body(adjoint)[0], amap)
                        grads = [amap[g] for g in adjoint.body.body.fields[1].fields]
                    new_p, new_s = _emit_updates(bb, sig, new_params, grads, new_states)
                    results += new_p + new_s
                results = [bb.emit_output(v) for v in results]
            bb.emit_func_output(relax.Tuple(results))
    out = bb.get()
    # the adjoint replays the part of the forward it needs: merge it with the forward already emitted
    out = relax.transform.EliminateCommonSubexpr()(out)
    out = relax.transform.CanonicalizeBindings()(out)
    return relax.transform.DeadCodeElimination([TRAIN_STEP, INFER])(out)


def _emit_updates(bb, sig: TrainSignature, params, grads, states) -> tuple[list, list]:
    new_params, new_states = [], []
    k = 0
    for spec, p, g in zip(sig.trainable, params, grads, strict=True):
        n = len(sig.optimizer.states_of(spec.shape))
        p_new, s_new = sig.optimizer.emit(bb, p, g, list(states[k:k + n]))
        new_params.append(p_new)
        new_states.extend(s_new)
        k += n
    return new_params, new_states


@dataclass(frozen=True)
class TrainProgram:
    """The fused training step before code generation: Relax module + calling convention + initial values."""

    module: tvm.IRModule
    signature: TrainSignature
    initial_params: dict[str, np.ndarray]


def compile_train_step(model: onnx.ModelProto | str | Path, manifest: Any) -> TrainProgram:
    """Build ``train_step`` / ``infer`` from ``trainable.onnx`` and its bundle manifest.

    Raises:
        CompileError: the manifest or graph is malformed or cannot be differentiated (see
            ``read_signature``, ``check_graph``, ``build_train_module``).
    """
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    sig = read_signature(manifest)
    mod, initial = import_forward(model, sig)
    return TrainProgram(clip_takes(build_train_module(mod, sig)), sig, initial)


@dataclass(frozen=True)
class LoweredTrainStep:
    """``train_step`` and ``infer`` through the shared pipeline: the lowered module and one static plan
    (with its constants) per entry, the contract of runtimes without TVM."""

    module: tvm.IRModule
    plans: dict[str, StaticPlan]
    constants: dict[str, dict[str, np.ndarray]]


def lower_train_step(program: TrainProgram, target: str | EmitTarget = "host",
                     source: bool | None = None) -> LoweredTrainStep:
    """Legalise, fuse, schedule and memory-plan the training step for ``target`` (``source``: see
    ``pipeline.lower``).

    Raises:
        CompileError: an entry cannot be planned (not straight-line) or its plan is unsound.
        ConfigError: unknown target name.
    """
    lowered = lower(program.module, resolve_target(target).target(), source=source)
    plans, constants = {}, {}
    for entry in (TRAIN_STEP, INFER):
        plans[entry], constants[entry] = extract_plan(lowered, entry)
        problems = plans[entry].check()
        if problems:
            raise CompileError(f"train_step: the static plan of {entry} is unsound ({'; '.join(problems)}); "
                               "this is a compiler bug, please report it")
    return LoweredTrainStep(lowered, plans, constants)


def emit_train_c(lowered: LoweredTrainStep, out_dir: str | Path, prefix: str = "edgetune_train") -> dict[str, CSources]:
    """C sources (no TVM runtime, asserts stripped) of ``<prefix>_train_step_run`` and ``<prefix>_infer_run``
    from ``lower_train_step(program, "c")``.

    Each ``_run(arena, inputs..., outputs...)`` takes the calling order of the module docstring; new
    running state, parameters and optimizer state come back as outputs, which the caller copies over
    its persistent buffers (``TrainSignature.updates`` says which over which).
    """
    out = Path(out_dir)
    sources = {entry: emit_c_source(lowered.module, plan, lowered.constants[entry], out, f"{prefix}_{entry}",
                                    "trainable.onnx") for entry, plan in lowered.plans.items()}
    # one workspace pool serves both entries (they never run at the same time)
    write_workspace(out / "tvm_workspace.c", max(p.workspace_bytes for p in lowered.plans.values()))
    return sources


class TrainStep:
    """The compiled training step on the host (Relax VM, llvm), with parameters and optimizer state
    kept between calls — from the caller's view they are updated in place.
    """

    def __init__(self, program: TrainProgram, target: str | EmitTarget = "host") -> None:
        """Compile ``program`` for ``target`` (an LLVM target this machine runs: "host").

        Raises:
            ConfigError: unknown target name.
        """
        self.signature = program.signature
        self._initial = {k: v.copy() for k, v in program.initial_params.items()}
        exe = tvm.compile(program.module, target=resolve_target(target).target())
        self._device = tvm.cpu()
        self._vm = relax.VirtualMachine(exe, self._device)
        self._train, self._infer = self._vm[TRAIN_STEP], self._vm[INFER]
        # inputs are copied into the same tensors every call (no allocation per sample)
        self._inputs = [tvm.runtime.empty(s.shape, s.dtype, self._device) for s in self.signature.inputs]
        self.reset()

    def reset(self) -> None:
        """Parameters back to the bundle's values, optimizer state zeroed (a fresh optimizer)."""
        self.restore(self._initial)

    def restore(self, params: Mapping[str, np.ndarray]) -> None:
        """Load trainable parameters (e.g. the collapse guard's last good ones) and zero the optimizer
        state, as torch's guard does by clearing ``optimizer.state``.

        Raises:
            DataError: a parameter is missing or has the wrong shape.
        """
        sig = self.signature
        self._params = [tvm.runtime.tensor(_checked(params.get(s.name), s), self._device) for s in sig.trainable]
        self._opt_states = [tvm.runtime.tensor(_zeros(s), self._device) for s in sig.opt_states]

    def _load(self, taps: Sequence, state: Sequence, momentum, target) -> list:
        sig = self.signature
        if len(taps) != len(sig.taps) or len(state) != len(sig.state):
            raise DataError(f"train_step: expected {len(sig.taps)} taps and {len(sig.state)} state tensors "
                            f"(got {len(taps)} and {len(state)}); pass them in the manifest's order")
        target = _zeros(sig.target) if target is None else target
        momentum = np.full(sig.momentum.shape, momentum, dtype=sig.momentum.dtype)
        for buf, value, spec in zip(self._inputs, [*taps, *state, momentum, target], sig.inputs, strict=True):
            buf.copyfrom(_checked(value, spec))
        return self._inputs

    def step(self, taps: Sequence, state: Sequence, momentum: float, target=None):
        """Predict one sample and update the parameters on it; ``target`` (one-hot [1, C]) only in
        supervised feedback. Returns (logits [1, C], loss, new_state list) as numpy / float.

        Raises:
            DataError: a tensor has the wrong count or shape.
        """
        out = list(self._train(*self._load(taps, state, momentum, target), *self._params, *self._opt_states))
        head, n = 2 + len(self.signature.state), len(self._params)
        self._params, self._opt_states = out[head:head + n], out[head + n:]
        return _results(out[:head])

    def infer(self, taps: Sequence, state: Sequence, momentum: float, target=None):
        """Like ``step`` but nothing is learned (a runtime that gates updates calls this)."""
        return _results(list(self._infer(*self._load(taps, state, momentum, target), *self._params)))

    def parameters(self) -> dict[str, np.ndarray]:
        """Current trainable parameters by manifest name (copies)."""
        return {s.name: p.numpy() for s, p in zip(self.signature.trainable, self._params, strict=True)}


def _checked(value, spec: TensorSpec) -> np.ndarray:
    arr = None if value is None else np.ascontiguousarray(value, dtype=spec.dtype)
    if arr is None or arr.shape != spec.shape:
        raise DataError(f"train_step: {spec.name!r} must have shape {spec.shape} "
                        f"(got {None if arr is None else arr.shape}); pass tensors in the manifest's order and shapes")
    return arr


def _results(out: list) -> tuple[np.ndarray, float, list[np.ndarray]]:
    return out[0].numpy(), float(out[1].numpy()), [s.numpy() for s in out[2:]]
