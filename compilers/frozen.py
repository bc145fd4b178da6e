"""``compile_frozen``: the frozen int8 backbone (frozen.onnx) -> integer kernels for one target.

    ONNX -> checks (ops, static shapes, int8 coverage; one error naming every offending node)
         -> Relax (TVM's ONNX frontend) -> QDQ->integer rewrite (before any constant folding)
         -> legalise, fuse, schedule, memory-plan (pipeline.lower) -> static plan
         -> artifacts: host / aarch64 native shared library (kernels object + plan-driven C driver,
            no TVM runtime), or C source for microcontrollers

Everything lands in ``out_dir``: the artifacts, ``<prefix>_plan.json`` (the static plan) and
``<prefix>_compiled.json`` (what was compiled, where the artifacts are, compile times,
constant sizes). ``CompiledGraph.load(out_dir)`` reads them back.
"""
from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgetune.compilers import host_kernels
from edgetune.compilers.emit import EmitTarget, emit_object, link_shared, resolve_target
from edgetune.compilers.emit_c import copy_headers, emit_c_source, write_driver, write_workspace
from edgetune.compilers.int8_check import int8_problems
from edgetune.compilers.int8_rewrite import rewrite_int8
from edgetune.compilers.onnx_import import import_onnx, onnx_problems, read_onnx
from edgetune.compilers.pipeline import lower
from edgetune.compilers.plan import StaticPlan, extract_plan
from edgetune.compilers.schedule import family_of
from edgetune.errors import CheckpointError, CompileError, EdgetuneError, ToolchainError
from edgetune.export.manifest import AlignedConv
from edgetune.export.ops import float_islands
from edgetune.targets import HOST_KERNELS_DIR

PREFIX = "frozen"


@dataclass(frozen=True)
class ConstantBytes:
    """Sizes of the compiled graph's constants by role, in bytes, and the ONNX reference."""

    weights_int8: int
    bias_int32: int
    requant_params: int
    other: int
    onnx_reference: int

    @property
    def total(self) -> int:
        return self.weights_int8 + self.bias_int32 + self.requant_params + self.other

    @property
    def ratio(self) -> float:
        """Compiled constant bytes / (int8 weights + int32 biases + one float32 scale per output
        channel) counted in the ONNX graph; ~1.0 means nothing was duplicated or widened.
        ``other`` (dequantization tables of pooled taps, 1 KB each) counts against it."""
        return self.total / max(1, self.onnx_reference)


@dataclass(frozen=True)
class CompiledGraph:
    """A compiled frozen graph: its plan, the artifacts (name -> path) and how it was made."""

    onnx_path: Path
    target: str
    out_dir: Path
    plan: StaticPlan
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    artifacts: dict[str, Path]
    constant_bytes: ConstantBytes
    seconds: dict[str, float] = field(default_factory=dict)
    fixed_point: bool = False
    islands: tuple[str, ...] = ()  # "node (op)" of every float island (``edgetune.export.ops.float_islands``)

    def to_json(self) -> str:
        return json.dumps({"onnx": str(self.onnx_path), "target": self.target, "prefix": PREFIX,
                           "inputs": list(self.input_names), "outputs": list(self.output_names),
                           "artifacts": {k: v.name for k, v in self.artifacts.items()},
                           "constant_bytes": vars(self.constant_bytes) | {"ratio": self.constant_bytes.ratio},
                           "seconds": self.seconds, "fixed_point": self.fixed_point,
                           "islands": list(self.islands)}, indent=1)

    @staticmethod
    def load(out_dir: str | Path) -> "CompiledGraph":
        """Read a compile's ``frozen_compiled.json`` and plan back.

        Raises:
            CheckpointError: ``out_dir`` holds no (complete) compiled frozen graph.
        """
        d = Path(out_dir)
        try:
            raw = json.loads((d / f"{PREFIX}_compiled.json").read_text())
            plan = StaticPlan.from_json((d / f"{PREFIX}_plan.json").read_text())
            cb = dict(raw["constant_bytes"])
            cb.pop("ratio", None)
            return CompiledGraph(Path(raw["onnx"]), raw["target"], d, plan, tuple(raw["inputs"]),
                                 tuple(raw["outputs"]), {k: d / v for k, v in raw["artifacts"].items()},
                                 ConstantBytes(**cb), raw["seconds"], raw["fixed_point"], tuple(raw.get("islands", ())))
        except (OSError, KeyError, TypeError, ValueError, CompileError) as exc:
            raise CheckpointError(f"compiled graph: {d} has no readable {PREFIX}_compiled.json / {PREFIX}_plan.json "
                                  f"({exc}); run compile_frozen into it first") from None


def check_frozen(model: onnx.ModelProto, where: str = "frozen graph") -> None:
    """All reasons ``model`` cannot be compiled, as one error: unsupported ops, dynamic shapes
    and nodes the int8 rewrite cannot lower, each with its node name.

    Raises:
        CompileError: one line naming every offending node.
    """
    problems = onnx_problems(model)
    named = {p.split(" (", 1)[0] for p in problems}
    problems += [p for p in int8_problems(model) if p.split(" (", 1)[0] not in named]
    if problems:
        raise CompileError(f"compile: {where} cannot be compiled to int8 kernels: {'; '.join(problems)}; export "
                           "it with static shapes, ops TVM converts, and onnxruntime QDQ quantisation (int8 "
                           "per-tensor activations, symmetric int8 weights)")


def _constant_bytes(model: onnx.ModelProto, plan: StaticPlan, constants: dict[str, np.ndarray]) -> ConstantBytes:
    # dequantization tables of the float-boundary kernels (pooled taps, average pools)
    tables = {a for call in plan.calls if family_of(call.kernel) in ("ort_mean", "qavg_pool")
              for a in call.args if a in constants and constants[a].dtype == np.float32 and constants[a].size == 256}
    weights = sum(a.nbytes for a in constants.values() if a.dtype == np.int8)
    bias = sum(a.nbytes for a in constants.values() if a.dtype == np.int32)
    requant = sum(a.nbytes for k, a in constants.items() if a.dtype in (np.float32, np.int64) and k not in tables)
    other = sum(a.nbytes for a in constants.values()) - weights - bias - requant
    ref_weights = ref_bias = ref_scales = 0
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            t = onnx.numpy_helper.to_array(inits[node.input[0]])
            if t.dtype == np.int8:
                ref_weights += t.size
                scale = inits.get(node.input[1])  # per output channel (or per tensor): one float32 each
                ref_scales += 4 * (onnx.numpy_helper.to_array(scale).size if scale is not None else 1)
            elif t.dtype == np.int32:
                ref_bias += 4 * t.size
    return ConstantBytes(weights, bias, requant, other, ref_weights + ref_bias + ref_scales)


@dataclass(frozen=True)
class LoweredFrozen:
    """The frozen graph lowered and planned for one TVM target: what every back-end emits from."""

    source: Path
    model: onnx.ModelProto = field(repr=False)
    module: Any = field(repr=False)  # tvm.IRModule from ``pipeline.lower``
    plan: StaticPlan
    constants: dict[str, np.ndarray] = field(repr=False)
    seconds: dict[str, float]


def lower_frozen(onnx_path: str | Path, tvm_target: Any, target_name: str, fixed_point: bool = False,
                 source: bool | None = None, aligned: Sequence[AlignedConv] = ()) -> LoweredFrozen:
    """The one chain from frozen.onnx to a static plan: read, check, import, int8 rewrite, lower
    and plan for ``tvm_target`` (a ``tvm.target.Target``), each stage's failure one ``CompileError``
    line. ``compile_frozen`` and ``compilers.model.compile_model`` both start here. ``aligned``: a
    norm-align bundle's convolutions, which take their requantisation from inputs and return their
    accumulator statistics (``int8_rewrite.rewrite_int8``); ``source``: see ``pipeline.lower``.

    Raises:
        CompileError: the file is unreadable, the graph has unsupported ops, dynamic shapes or nodes
            the int8 rewrite cannot lower (one line naming all of them), or a stage fails or
            yields an unsound plan.
    """
    src = Path(onnx_path)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    model = read_onnx(src)
    check_frozen(model, str(src))
    with compile_stage("import and int8 rewrite", src, model):
        mod = rewrite_int8(import_onnx(model), fixed_point, aligned)
    seconds["import_rewrite"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    with compile_stage(f"lowering for {target_name}", src, model):
        lowered = lower(mod, tvm_target, source=source)  # source: see pipeline.lower
        plan, constants = extract_plan(lowered, "main")
    problems = plan.check()
    if problems:
        raise CompileError(f"compile: the static plan of {src.name} is unsound ({'; '.join(problems)}); "
                           "this is a compiler bug, please report it")
    seconds["lower_plan"] = time.perf_counter() - t0
    return LoweredFrozen(src, model, lowered, plan, constants, seconds)


def compile_frozen(onnx_path: str | Path, target: str | EmitTarget = "host", out_dir: str | Path = "compiled",
                   fixed_point: bool = False) -> CompiledGraph:
    """Compile frozen.onnx (int8 QDQ) for ``target`` ("host", "aarch64", "c" or an ``EmitTarget``).

    ``fixed_point`` selects integer-only requantisation (no float unit needed; not bit-exact
    with onnxruntime, see ``int8_math``).

    Raises:
        CompileError: the graph has unsupported ops, dynamic shapes or nodes the int8 rewrite
            cannot lower (one line naming all of them), or cannot be planned.
        ConfigError: unknown target name.
        ToolchainError: the cross compiler for ``target`` is missing or fails.
    """
    emit_target = resolve_target(target)
    out = Path(out_dir)
    low = lower_frozen(onnx_path, emit_target.target(), emit_target.name, fixed_point)
    src, model, lowered, plan, constants, seconds = (low.source, low.model, low.module, low.plan, low.constants,
                                                     dict(low.seconds))

    t0 = time.perf_counter()
    micro = emit_target.name == "host" and host_kernels.vnni_available(emit_target.cc or "gcc")
    if micro:  # the host's convolutions and adds as AVX-512 VNNI micro-kernels (host_kernels)
        routed = host_kernels.route(lowered, plan, constants)
        lowered, plan, constants, micro = routed.module, routed.plan, routed.constants, bool(routed.replaced)
    out.mkdir(parents=True, exist_ok=True)
    with compile_stage(f"code generation for {emit_target.name}", src, model):
        artifacts = _emit(lowered, plan, constants, emit_target, out, src.name, micro)
    seconds["emit"] = time.perf_counter() - t0
    seconds["total"] = sum(seconds.values())

    initializers = {i.name for i in model.graph.initializer}
    graph = CompiledGraph(src, emit_target.name, out, plan,
                          tuple(i.name for i in model.graph.input if i.name not in initializers),
                          tuple(o.name for o in model.graph.output), artifacts,
                          _constant_bytes(model, plan, constants), seconds, fixed_point,
                          tuple(f"{i.node} ({i.op})" for i in float_islands(model)))
    (out / f"{PREFIX}_plan.json").write_text(plan.to_json())
    (out / f"{PREFIX}_compiled.json").write_text(graph.to_json())
    return graph


@contextmanager
def compile_stage(what: str, src: Path, model: onnx.ModelProto):
    """Turn any failure inside TVM into one ``CompileError`` line (never a TVM traceback) naming the
    ONNX nodes to change: the float island whose Relax op failed when the message names one (e.g.
    ``relax.cumsum`` -> a CumSum node), else every island (the int8 kernels are tested op by op).

    Raises:
        CompileError: the stage failed.
    """
    try:
        yield
    except EdgetuneError as exc:
        if not isinstance(exc, CompileError):
            raise
        raise CompileError(_stage_message(what, src, model, str(exc), "")) from None
    except Exception as exc:  # TVM raises TVMError, ValueError, RuntimeError, AttributeError, ...
        lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
        reason = next((ln for ln in lines if "Error" in ln or "failed" in ln.lower()), lines[0] if lines else "")
        raise CompileError(_stage_message(what, src, model, reason, type(exc).__name__ + ": ")) from None


def _stage_message(what: str, src: Path, model: onnx.ModelProto, reason: str, kind: str) -> str:
    islands = float_islands(model)
    ops = {m.lower().replace("_", "") for m in re.findall(r"relax\.(?:nn\.)?(\w+)", reason)}
    culprits = [i for i in islands if i.op.lower() in ops]
    if culprits:
        where = (f"node(s) {', '.join(f'{i.node} ({i.op})' for i in culprits)} run in float and TVM cannot lower "
                 "them to a static kernel sequence")
    elif islands:
        where = (f"its float islands are {', '.join(f'{i.node} ({i.op})' for i in islands[:8])}"
                 f"{' and more' if len(islands) > 8 else ''}")
    else:
        where = "it has no float island"
    return (f"compile: {what} of {src.name} failed ({kind}{reason[:200]}); {where}; replace or quantise those "
            "nodes, or move them out of the frozen graph (report the graph if it is all int8)")


def _emit(lowered, plan: StaticPlan, constants: dict[str, np.ndarray], target: EmitTarget, out: Path,
          source: str, micro: bool = False) -> dict[str, Path]:
    if target.kind == "c":
        c = emit_c_source(lowered, plan, constants, out, PREFIX, source)
        return {"kernels_c": c.kernels, "model_c": c.model, "model_h": c.header, "workspace_c": c.workspace,
                "include": c.include_dir}
    kernels = emit_object(lowered, plan, target, out / f"{PREFIX}_kernels_{target.name}.o", PREFIX)
    model, header = write_driver(plan, constants, out, PREFIX, source)
    workspace = write_workspace(out / "tvm_workspace.c", plan.workspace_bytes)
    include = copy_headers(out / "include")
    extra = {"micro_kernels_o": micro_kernels_object(target, out / f"{PREFIX}_micro_kernels.o")} if micro else {}
    library = link_shared(target, [model, workspace, kernels, *extra.values()], include,
                          out / f"{PREFIX}_{target.name}.so")
    return {"library": library, "kernels_o": kernels, "model_c": model, "model_h": header, "workspace_c": workspace,
            "include": include, **extra}


def micro_kernels_object(target: EmitTarget, path: Path, cflags: Sequence[str] | None = None) -> Path:
    """The host micro-kernels (``targets/host/et_kernels_x86.c``) compiled by ``target.cc`` with ``cflags``
    (default ``host_kernels.CFLAGS``: ``-O3 -march=native``, the header's AVX-512 VNNI path where the CPU has it).

    Raises:
        ToolchainError: the compiler is missing or fails (its first error line is shown).
    """
    cc = target.cc or "gcc"
    cmd = [cc, *(host_kernels.CFLAGS if cflags is None else cflags), "-fPIC", "-c", f"-I{HOST_KERNELS_DIR}",
           str(HOST_KERNELS_DIR / host_kernels.SOURCE), "-o", str(path)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as exc:
        raise ToolchainError(f"compile: {cc} cannot run ({exc}); install gcc") from None
    if done.returncode != 0:
        first = next((ln for ln in done.stderr.splitlines() if "error" in ln), done.stderr.strip()[:200])
        raise ToolchainError(f"compile: {cc} failed to build the host micro-kernels ({first}); check the toolchain")
    return path


def compile_bundle(bundle_dir: str | Path, target: str | EmitTarget = "host", out_dir: str | Path | None = None,
                   fixed_point: bool = False) -> CompiledGraph:
    """Compile the frozen graph of an exported bundle into ``bundle/<target>/`` (or ``out_dir``).

    The manifest's frozen outputs must be frozen.onnx's outputs, in order.

    Raises:
        CheckpointError: no readable or an edited bundle (``load_manifest``), or the manifest disagrees
            with frozen.onnx.
        CompileError, ConfigError, ToolchainError: as ``compile_frozen``.
    """
    from edgetune.export.manifest import load_manifest  # the bundle format: one module, hashes checked

    bundle = Path(bundle_dir)
    frozen = load_manifest(bundle).frozen
    names = [o.name for o in frozen.outputs]
    name = target if isinstance(target, str) else target.name
    graph = compile_frozen(bundle / frozen.file, target, out_dir or bundle / name, fixed_point)
    if list(graph.output_names) != names:
        raise CheckpointError(f"compile: manifest.json lists frozen outputs {names} but {frozen.file} has "
                              f"{list(graph.output_names)}; re-export the bundle")
    return graph
