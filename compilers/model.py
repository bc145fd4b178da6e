"""``compile_model``: the one compile of a bundle -- its manifest in, the generated model out.

    frozen.onnx    -> ``frozen.lower_frozen`` (read, check, int8 rewrite, import, lower, plan)
    trainable.onnx -> ``train_step.compile_train_step`` / ``lower_train_step`` (infer, train_step)
    both plans     -> TVM's C kernels (one file) + ``emit_model.emit_model`` (the plans as C)

Microcontrollers and the host build get the C target's lowering: TVM's C codegen, the same source
on every such target, so a host build of the generated model is an exact oracle of a device build.
A Linux target (``tvm_target``: its LLVM target) gets its own lowering of the frozen graph, scheduled
for its CPU (e.g. android-arm64's dot-product convs): the driver is emitted from that plan, and
``emit_kernels_object`` builds that plan's kernels with LLVM; ``kernels_c`` is then the same kernels
as plain C (vectorised loops made serial), for builds without the LLVM object. The two lowerings'
plans differ (arena, weight layouts, kernel arguments), so a Linux plan's frozen kernels are named
``f_<plan id>_<kernel>``: a driver links only with kernels of its own lowering, any other pairing is an
undefined symbol at link time. The training step is lowered for C in both (its float kernels are the
same, so the host build stays the oracle of its results). ``compile_frozen`` (``OUT/host/``'s native
library of the frozen graph alone) starts from the same ``lower_frozen``.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import tvm
from tvm import tirx

from edgetune.compilers.emit import kernel_module
from edgetune.compilers.emit_c import c_kernels
from edgetune.compilers.emit_learner import learner_source
from edgetune.compilers.emit_model import Interface, ModelSources, Planned, Tensor, emit_model
from edgetune.compilers.frozen import compile_stage, lower_frozen
from edgetune.compilers.pipeline import source_kernels
from edgetune.compilers.plan import ALIGNMENT
from edgetune.compilers.train_step import INFER, TRAIN_STEP, compile_train_step, lower_train_step
from edgetune.errors import CompileError

C_TARGET = {"kind": "c"}


@dataclass(frozen=True)
class GeneratedModel:
    """Everything a firmware or ``edgetune-run`` needs of one bundle, as text."""

    sources: ModelSources
    kernels_c: str  # TVM's C kernels of every plan (one file: the codegen defines module-level symbols)
    workspace_bytes: int  # the LIFO pool those kernels need
    kernels: int  # distinct kernels
    seconds: dict[str, float]
    kernels_ir: Any = field(repr=False, compare=False)  # the kernels' TIR (tvm.IRModule), for LLVM objects
    tvm_target: Mapping[str, Any] | None = None  # the Linux target the frozen graph was lowered for; None: C
    frozen_prefix: str = "f_"  # the frozen kernels' symbol prefix: "f_<plan id>_" for a Linux target's plan


def plan_id(plan_json: str, tvm_target: Mapping[str, Any]) -> str:
    """Eight hex digits naming one Linux lowering of a frozen graph (its plan and the target): part of
    its kernels' symbols, so a driver and kernels of different lowerings cannot be linked together."""
    text = plan_json + json.dumps(dict(tvm_target), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def compile_model(bundle_dir: str | Path, manifest, initial_state: Mapping[str, np.ndarray],
                  inference_only: bool = False, tvm_target: Mapping[str, Any] | None = None) -> GeneratedModel:
    """Compile a bundle's two graphs to kernels and emit the model code around their plans.

    ``manifest`` is the bundle's (``edgetune.export.load_manifest``), ``initial_state`` the
    running statistics' initial values by state name. ``inference_only``: no training step; the
    parameters become constants. ``tvm_target``: None for the C target (microcontrollers, the host
    build); a Linux target's LLVM target (``Target.tvm_target``) lowers the frozen graph for that CPU
    (see the module docstring), for ``emit_kernels_object``.

    Raises:
        CompileError: a graph cannot be compiled or planned (one line; a TVM failure in the frozen
            graph's stages names its nodes), or the plans disagree with the manifest.
    """
    bundle = Path(bundle_dir)
    target = tvm.target.Target(C_TARGET)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    na = manifest.norm_align
    aligned = na.convs if na is not None else ()
    if tvm_target is None:
        # lowered without the C-source passes (the lowering LLVM objects used to build too); the C build
        # below gets them through source_kernels
        frozen_low = lower_frozen(bundle / manifest.frozen.file, target, "c", source=False, aligned=aligned)
        frozen_prefix = "f_"
    else:
        llvm = _llvm_target(tvm_target)
        frozen_low = lower_frozen(bundle / manifest.frozen.file, llvm, str(llvm.attrs.get("mcpu", "llvm")),
                                  source=False, aligned=aligned)
        frozen_prefix = f"f_{plan_id(frozen_low.plan.to_json(), tvm_target)}_"
    seconds["frozen"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    program = compile_train_step(bundle / manifest.trainable.file, manifest)
    lowered = lower_train_step(program, "c", source=False)
    seconds["train_step"] = time.perf_counter() - t0

    learns = not inference_only and manifest.trainable.optimizer.lr > 0
    iface = interface_from_manifest(manifest, initial_state, program.initial_params, learns)
    kernels: dict[str, tirx.PrimFunc] = {}
    entries = [(frozen_low.module, frozen_low.plan, frozen_prefix[:-1]), (lowered.module, lowered.plans[INFER], "t")]
    if iface.learns:
        entries.append((lowered.module, lowered.plans[TRAIN_STEP], "t"))
    for module, plan, prefix in entries:  # infer and train_step share kernels: one copy each
        kernels.update({gv.name_hint: f for gv, f in kernel_module(module, plan, prefix).functions.items()})

    t0 = time.perf_counter()
    with compile_stage("C code generation", frozen_low.source, frozen_low.model):
        # C targets: the C-source kernel passes (DSP micro-kernels, explicit unrolling); a Linux plan's C is
        # the LLVM object's kernels with their vectorised loops serial (C has no vector types)
        c_module = (source_kernels(tvm.IRModule(kernels)) if tvm_target is None
                    else tvm.tirx.transform.VectorizeLoop(False)(tvm.IRModule(kernels)))
        with tvm.transform.PassContext(opt_level=3, config={"tirx.disable_assert": True}):
            built = tvm.tirx.build(c_module, target=target)
        kernels_c = c_kernels(built.inspect_source())
    seconds["codegen"] = time.perf_counter() - t0

    def planned(low, plan, consts, prefix) -> Planned:
        return Planned(plan, consts, {k.name: low[k.name] for k in plan.kernels}, prefix)

    frozen = planned(frozen_low.module, frozen_low.plan, frozen_low.constants, frozen_prefix)
    infer = planned(lowered.module, lowered.plans[INFER], lowered.constants[INFER], "t_")
    train = (planned(lowered.module, lowered.plans[TRAIN_STEP], lowered.constants[TRAIN_STEP], "t_")
             if iface.learns else None)
    sources = emit_model(iface, frozen, infer, train)
    learner = learner_source(manifest) if iface.learns else ""  # replay buffer + lr warm-up, when declared
    if learner:
        files = dict(sources.files)
        files["et_model_gen.c"] += "\n" + learner
        sources = replace(sources, files=files)
    pool = workspace_pool_bytes(kernels_c)  # exact; the plans' figure also counts kernel stack arrays
    sources = replace(sources, memory=replace(sources.memory, workspace=pool))
    return GeneratedModel(sources, kernels_c, pool, len(kernels), seconds, tvm.IRModule(kernels),
                          None if tvm_target is None else dict(tvm_target), frozen_prefix)


def _llvm_target(tvm_target: Mapping[str, Any]) -> tvm.target.Target:
    try:
        target = tvm.target.Target(dict(tvm_target))
    except (ValueError, RuntimeError) as exc:  # what tvm-ffi raises for a bad target
        raise CompileError(f"compile: TVM does not accept the target {dict(tvm_target)} "
                           f"({str(exc).splitlines()[0][:120]}); check the target's tvm_target") from None
    if str(target.kind.name) != "llvm":
        raise CompileError(f"compile: a Linux target's lowering needs an LLVM target (got kind "
                           f"{target.kind.name}); give the target's tvm_target, or None for the C target")
    return target


def emit_kernels_object(generated: GeneratedModel, tvm_target: Mapping[str, Any], path: Path) -> Path:
    """The same kernels as ``generated.kernels_c`` (same plan, same symbols), compiled by TVM's LLVM
    backend for ``tvm_target`` (e.g. aarch64 with the CPU's features) into an object file.
    ``generated`` must come from ``compile_model(..., tvm_target=tvm_target)``: its frozen kernels were
    scheduled for that CPU and its driver expects them.

    Raises:
        CompileError: ``generated`` was lowered for another target, or LLVM fails.
    """
    if generated.tvm_target is None or dict(generated.tvm_target) != dict(tvm_target):
        lowered = "the C target" if generated.tvm_target is None else str(dict(generated.tvm_target))
        raise CompileError(f"emit: the kernels were lowered for {lowered}, not {dict(tvm_target)} (their driver "
                           "expects that plan); compile the model with compile_model(..., tvm_target=...) of "
                           "this target")
    try:
        with tvm.transform.PassContext(opt_level=3, config={"tirx.disable_assert": True}):
            built = tvm.tirx.build(generated.kernels_ir, target=tvm.target.Target(dict(tvm_target)))
        path.parent.mkdir(parents=True, exist_ok=True)
        built.write_to_file(str(path))
    except (ValueError, RuntimeError) as exc:  # what tvm-ffi raises for a failed build
        raise CompileError(f"emit: LLVM could not compile the kernels for {tvm_target} "
                           f"({str(exc).splitlines()[0][:120]}); check the target's tvm_target") from None
    return path


def workspace_pool_bytes(kernels_c: str) -> int:
    """The workspace pool the C kernels need: the largest per-kernel sum of aligned
    ``TVMBackendAllocWorkspace`` requests (kernels run one at a time and free LIFO)."""
    need = 0
    for m in re.finditer(r"int32_t __tvm_ffi_(\w+)\(void\* self_handle[^)]*\) \{(.*?)\n\}\n", kernels_c, re.S):
        sizes = re.findall(r"TVMBackendAllocWorkspace\(\d+, \w+, \(uint64_t\)(\d+)ULL", m.group(2))
        need = max(need, sum((int(s) + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT for s in sizes))
    return need


def interface_from_manifest(manifest, initial_state: Mapping[str, np.ndarray],
                            initial_params: Mapping[str, np.ndarray], learns: bool) -> Interface:
    """The model interface a bundle manifest describes (its typed fields, including the method's
    declared runtime contract: schedule, guard, exits).

    Raises:
        CompileError: a state tensor has no initial value, or norm-align's frozen inputs are not state.
    """
    t = manifest.trainable
    missing = [i.name for i in t.inputs if i.role == "state" and i.name not in initial_state]
    if missing:
        raise CompileError(f"compile: no initial value for state {', '.join(missing)}; the bundle must carry "
                           "its running statistics' initial values (initial_state.npz)")
    states = tuple(Tensor(i.name, tuple(i.shape), np.asarray(initial_state[i.name], np.float32))
                   for i in t.inputs if i.role == "state")
    params = tuple(Tensor(p.name, tuple(p.shape), np.asarray(initial_params[p.name], np.float32))
                   for p in t.parameters if p.trainable)
    opt = tuple(Tensor(s.name, tuple(s.shape)) for s in t.optimizer.states)
    runtime = manifest.runtime
    sched = runtime.momentum_schedule
    schedule = (sched.start, sched.decay, sched.floor) if sched is not None else (0.0, 0.0, 0.0)
    taps = tuple(Tensor(o.name, tuple(o.shape)) for o in manifest.frozen.outputs)
    stages = tuple(o.stage for o in manifest.frozen.outputs)
    frozen_states: tuple[str, ...] = ()
    na = manifest.norm_align
    if na is not None:  # the compiled frozen graph's extra outputs (statistics) and inputs (folds, from the state)
        taps += tuple(Tensor(name, (1, a.channels)) for a in sorted(na.convs, key=lambda a: a.conv)
                      for name in (a.sum, a.sumsq))
        stages = ()
        frozen_states = tuple(name for a in sorted(na.convs, key=lambda a: a.conv) for name in (a.scale, a.offset))
        unknown = [n for n in frozen_states if n not in {s.name for s in states}]
        if unknown:
            raise CompileError(f"compile: norm_align names frozen inputs {', '.join(unknown)} that are not state "
                               "inputs of trainable.onnx; re-export the bundle")
    return Interface(f"{manifest.method} on {manifest.model}", tuple(manifest.input.shape), manifest.num_classes,
                     taps, states, params, opt, schedule, runtime.guard, learns and bool(params), runtime.exits,
                     stages, frozen_states)


__all__ = ["GeneratedModel", "compile_model", "emit_kernels_object", "interface_from_manifest", "plan_id",
           "workspace_pool_bytes"]
