"""The lowering pass sequence shared by every compile (frozen int8 graph, training step).

``lower`` takes a Relax module (integer kernels already emitted, or any other static-shape
Relax program) to the *planned* form: legalised, fused, scheduled, in destination-passing
style, with storage reuse decided by ``StaticPlanBlockMemory``. That form is what
``plan.extract_plan`` reads. ``build_vm`` finishes the same module for TVM's Relax VM (the
host runner); the emitters in ``emit`` build it for shared libraries and C source.

Usage::

    lowered = lower(mod, target)            # IRModule, every PrimFunc scheduled
    plan, consts = extract_plan(lowered)    # the static plan of lowered["main"]
    exe = build_vm(lowered, target)         # tvm.runtime.Executable for relax.VirtualMachine
"""
from __future__ import annotations

import tvm
from tvm import relax

from edgetune.compilers.dsp_kernels import dsp_kernels
from edgetune.compilers.schedule import ScheduleConfig, schedule_kernels
from edgetune.compilers.unroll import unroll_kernels


def _fuse_passes() -> list[tvm.transform.Pass]:
    return [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(),
            relax.transform.FuseOps(), relax.transform.FuseTIR()]


def _plan_passes() -> list[tvm.transform.Pass]:
    return [relax.transform.DeadCodeElimination(),
            relax.transform.RewriteDataflowReshape(),  # reshapes become views, not copies
            relax.transform.ToNonDataflow(), relax.transform.RemovePurityChecking(),
            relax.transform.CallTIRRewrite(),  # explicit output buffers (destination-passing style)
            relax.transform.StaticPlanBlockMemory()]  # storage reuse -> alloc_storage / alloc_tensor


def _vm_passes() -> list[tvm.transform.Pass]:
    return [relax.transform.LowerAllocTensor(), relax.transform.KillAfterLastUse(),
            relax.transform.LowerRuntimeBuiltin(), relax.transform.ComputePrimValue(),
            relax.transform.VMShapeLower(), relax.transform.AttachGlobalSymbol()]


def _source_passes() -> list[tvm.transform.Pass]:
    # C source targets: pointwise convs call the DSP micro-kernels (the same loops in plain C where the
    # core has no DSP extension), the other kernels get their small loops unrolled in the source (any
    # -O level is then fast); LLVM targets vectorise and unroll by themselves
    return [dsp_kernels(), unroll_kernels()]


def source_kernels(mod: tvm.IRModule) -> tvm.IRModule:
    """A copy of ``mod`` (scheduled kernels) with the C-source kernel passes applied: the form
    ``tirx.build`` gets for a C target; the LLVM targets build ``mod`` itself."""
    return tvm.transform.Sequential(_source_passes())(tvm.IRModule(dict(mod.functions.items())))


def lower(mod: tvm.IRModule, target: tvm.target.Target, schedule: ScheduleConfig | None = None,
          source: bool | None = None) -> tvm.IRModule:
    """Legalise, fuse, schedule and memory-plan ``mod`` for ``target``.

    ``schedule`` defaults to ``ScheduleConfig.for_target(target)``. ``source``: apply the C-source
    kernel passes (``source_kernels``); default: when ``target`` is C. A caller that builds the same
    kernels both as C and with LLVM lowers with ``source=False`` and applies ``source_kernels`` to the
    C build only. Runs before any ``FoldConstant`` the caller might add, so the caller's constants
    keep their dtypes.
    """
    cfg = schedule or ScheduleConfig.for_target(target)
    use_source = str(target.kind.name) == "c" if source is None else source
    passes = _fuse_passes() + [schedule_kernels(cfg)] + (_source_passes() if use_source else []) + _plan_passes()
    with target, tvm.transform.PassContext(opt_level=3):
        return tvm.transform.Sequential(passes)(_fuse_transposes(clip_takes(mod)))


@relax.expr_functor.mutator
class _ClipTakes(relax.PyExprMutator):
    def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: D102
        call = super().visit_call_(call)
        if call.op == tvm.ir.Op.get("relax.take") and call.attrs.mode == "fast":
            return relax.op.take(call.args[0], call.args[1], call.attrs.axis, mode="clip")
        return call


def clip_takes(mod: tvm.IRModule) -> tvm.IRModule:
    """Every ``take`` (ONNX Gather) in "clip" instead of TVM's default "fast" mode.

    The ONNX frontend already maps negative indices into range, so for every valid index both
    modes read the same element; "fast" would read out of bounds on a bad one, and its legaliser
    prints a C++ warning per kernel on every compile (26 lines on the main job).
    """
    out = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
    for gvar, func in mod.functions.items():
        if isinstance(func, relax.Function):
            out[gvar] = _ClipTakes().visit_expr(func)
    return out


def _fuse_transposes(mod: tvm.IRModule) -> tvm.IRModule:
    """matmul(x, transpose(w)) -> one NT-matmul kernel, so a training step's backward pass reads
    weights in place instead of keeping transposed copies in the arena (on mcunet-s + tinytta the
    training step's arena drops from 69 KB to 13 KB). TVM's pass rejects some batched matmuls
    (it assumes the last two axes are swapped); those modules keep their explicit transposes."""
    try:
        return relax.transform.FuseTransposeMatmul()(mod)
    except (ValueError, RuntimeError):  # what tvm-ffi raises for a failed pass
        return mod


def build_vm(lowered: tvm.IRModule, target: tvm.target.Target) -> tvm.runtime.Executable:
    """Finish a module from ``lower`` for the Relax VM and compile its kernels for ``target``."""

    @tvm.transform.module_pass(opt_level=0, name="edgetune.VMFinalize")
    def finalize(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return tvm.transform.Sequential(_vm_passes())(mod)

    with target:
        return tvm.compile(lowered, target=target, relax_pipeline=finalize)
