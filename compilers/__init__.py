"""ONNX -> TVM (Relax) compilers: the frozen int8 backbone and the trainable training step.

Frozen graph (issue 3)::

    from edgetune.compilers import compile_frozen, FrozenRunner
    graph = compile_frozen("bundle/frozen.onnx", target="host", out_dir="bundle/host")
    taps = FrozenRunner(graph)(x)          # numpy taps, identical to onnxruntime's int8 taps
    graph.plan                             # StaticPlan: calls, arena, workspace, constants

"Identical" means bit for bit with onnxruntime running the QDQ graph as int8 kernels
(``SessionOptions.add_session_config_entry("session.qdqisint8allowed", "1")``, its default on
ARM). onnxruntime's default x86 session computes some convolutions in float (fake
quantisation) instead, whose rounding no integer kernel reproduces.

A bundle (issue 10: one compile path)::

    from edgetune.compilers import compile_model
    generated = compile_model("bundle", manifest, initial_state)   # GeneratedModel: the model's C

``compile_model`` and ``compile_frozen`` both start from ``lower_frozen`` (read, check, int8
rewrite, import, lower, plan of frozen.onnx).

Building blocks shared with other compiles: ``pipeline.lower`` / ``pipeline.build_vm`` (the
pass sequence) and ``plan.extract_plan`` / ``StaticPlan`` (the static plan of any lowered,
straight-line, static-shape Relax function); ``emit`` / ``emit_c`` turn a plan into a native
library or C source.
"""
from edgetune.compilers.emit import EmitTarget, resolve_target
from edgetune.compilers.frozen import (CompiledGraph, ConstantBytes, LoweredFrozen, check_frozen, compile_bundle,
                                       compile_frozen, lower_frozen)
from edgetune.compilers.model import GeneratedModel, compile_model
from edgetune.compilers.pipeline import build_vm, lower
from edgetune.compilers.plan import StaticPlan, extract_plan
from edgetune.compilers.runner import FrozenRunner

__all__ = ["CompiledGraph", "ConstantBytes", "EmitTarget", "FrozenRunner", "GeneratedModel", "LoweredFrozen",
           "StaticPlan", "build_vm", "check_frozen", "compile_bundle", "compile_frozen", "compile_model",
           "extract_plan", "lower", "lower_frozen", "resolve_target"]
