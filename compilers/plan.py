"""The static plan: everything a runtime without TVM needs to run a lowered Relax function.

``extract_plan`` walks a function of a module produced by ``pipeline.lower`` — straight-line,
static shapes, storage already shared by ``StaticPlanBlockMemory`` — and records the kernel
call order with argument references, every buffer (inputs, outputs, arena tensors, views)
with its size and arena offset, each kernel's workspace and schedule, and the constants
with their dtypes and sizes (their values are returned next to the plan, not inside it).

The C emitter turns a plan into a driver (one static arena, one call per kernel); the host
runtime and the memory report read it. It is generic: any such function works, e.g. the
frozen int8 graph's ``main`` or a compiled training step.

Usage::

    plan, constants = extract_plan(lowered, "main")
    plan.to_json(); StaticPlan.from_json(text)
    plan.check()   # [] when no two buffers alive at the same time overlap in the arena
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import tvm
from tvm import relax, s_tir, tirx

from edgetune.compilers.schedule import SCHEDULE_ATTR
from edgetune.errors import CompileError

ALIGNMENT = 64  # TVM's kAllocAlignment: LLVM kernels may assume it for every buffer
FORMAT = "edgetune-static-plan/1"


@dataclass(frozen=True)
class Buffer:
    """A tensor the program reads or writes (constants are ``Constant``).

    ``kind``: ``input`` (caller-provided, ``index`` = parameter position), ``output``
    (caller-provided, ``index`` = position in the returned tuple), ``arena`` (at ``offset``
    bytes into the arena, inside planned storage ``storage``) or ``view`` (a reshape of
    ``base`` sharing its memory).
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    kind: str
    index: int = -1
    offset: int = -1
    storage: int = -1
    base: str = ""


@dataclass(frozen=True)
class Constant:
    """A constant kernel argument; ``offset`` is its aligned byte offset in the constants blob."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    offset: int


@dataclass(frozen=True)
class Storage:
    """A block of the arena that ``StaticPlanBlockMemory`` shares between buffers with disjoint lifetimes."""

    index: int
    nbytes: int
    offset: int


@dataclass(frozen=True)
class Kernel:
    """A compiled PrimFunc: its scratch memory (stack + workspace, bytes) and the schedule it got."""

    name: str
    workspace_bytes: int
    schedule: str


@dataclass(frozen=True)
class Call:
    """One kernel invocation; ``args`` name buffers or constants in the kernel's parameter order."""

    kernel: str
    args: tuple[str, ...]


@dataclass(frozen=True)
class StaticPlan:
    function: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    buffers: tuple[Buffer, ...]
    constants: tuple[Constant, ...]
    storages: tuple[Storage, ...]
    kernels: tuple[Kernel, ...]
    calls: tuple[Call, ...]
    arena_bytes: int
    constant_bytes: int
    alignment: int = ALIGNMENT
    format: str = FORMAT

    @property
    def workspace_bytes(self) -> int:
        """Scratch memory the kernels need: the largest single kernel's (they run one at a time)."""
        return max((k.workspace_bytes for k in self.kernels), default=0)

    def buffer(self, name: str) -> Buffer:
        for b in self.buffers:
            if b.name == name:
                return b
        raise KeyError(name)

    def root(self, name: str) -> Buffer:
        """The buffer that owns the memory of ``name`` (follows views)."""
        b = self.buffer(name)
        while b.kind == "view":
            b = self.buffer(b.base)
        return b

    def lifetimes(self) -> dict[str, tuple[int, int]]:
        """Arena buffer -> (first, last) call index that touches it or a view of it."""
        spans: dict[str, tuple[int, int]] = {}
        consts = {c.name for c in self.constants}
        for i, call in enumerate(self.calls):
            for arg in call.args:
                if arg in consts:
                    continue
                owner = self.root(arg)
                if owner.kind == "arena":
                    first, _ = spans.get(owner.name, (i, i))
                    spans[owner.name] = (first, i)
        return spans

    def check(self) -> list[str]:
        """Problems with the plan: arena buffers alive at the same time whose bytes overlap,
        buffers outside the arena, constants overlapping in the blob. Empty when sound."""
        problems = []
        spans = self.lifetimes()
        arena = [b for b in self.buffers if b.kind == "arena"]
        for b in arena:
            if b.offset < 0 or b.offset + b.nbytes > self.arena_bytes or b.offset % self.alignment:
                problems.append(f"{b.name} [{b.offset}, {b.offset + b.nbytes}) is outside or misaligned in the "
                                f"{self.arena_bytes}-byte arena")
        for i, a in enumerate(arena):
            for b in arena[i + 1:]:
                if a.name not in spans or b.name not in spans:
                    continue
                (a0, a1), (b0, b1) = spans[a.name], spans[b.name]
                live_together = a0 <= b1 and b0 <= a1
                overlap = a.offset < b.offset + b.nbytes and b.offset < a.offset + a.nbytes
                if live_together and overlap:
                    problems.append(f"{a.name} and {b.name} are alive together (calls {a0}-{a1}, {b0}-{b1}) "
                                    "but share arena bytes")
        ordered = sorted(self.constants, key=lambda c: c.offset)
        for first, second in zip(ordered, ordered[1:]):
            if first.offset + first.nbytes > second.offset:
                problems.append(f"constants {first.name} and {second.name} overlap in the blob")
        return problems

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @staticmethod
    def from_json(text: str) -> "StaticPlan":
        """Parse ``to_json`` output.

        Raises:
            CompileError: not a static plan of this format version.
        """
        try:
            raw = json.loads(text)
            if raw.get("format") != FORMAT:
                raise ValueError(f"format {raw.get('format')!r}")
            typed = {"buffers": Buffer, "constants": Constant, "storages": Storage, "kernels": Kernel, "calls": Call}
            values = {}
            for f in fields(StaticPlan):
                v = raw[f.name]
                if f.name in typed:
                    v = tuple(_typed(typed[f.name], item) for item in v)
                elif isinstance(v, list):
                    v = tuple(v)
                values[f.name] = v
            return StaticPlan(**values)
        except (ValueError, KeyError, TypeError) as exc:
            raise CompileError(f"plan: not a static plan ({exc}); regenerate it with this edgetune version") from None


def _typed(cls: type, item: dict) -> object:
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in item.items()})


def _nbytes(shape: tuple[int, ...], dtype: str) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype("uint8" if dtype == "bool" else dtype).itemsize


def _align(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def _tensor_type(expr: relax.Expr) -> tuple[tuple[int, ...], str]:
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None or not isinstance(ty.shape, relax.ShapeExpr):
        raise CompileError(f"plan: {expr} has no static tensor type ({ty}); only static-shape programs have a "
                           "static plan")
    try:
        shape = tuple(int(d) for d in ty.shape.values)
    except TypeError:
        raise CompileError(f"plan: {expr} has a symbolic shape {ty.shape}; compile with static shapes") from None
    return shape, str(ty.dtype)


def _const_array(expr: relax.Expr) -> np.ndarray | None:
    value = getattr(expr, "value", None)
    if value is not None and hasattr(value, "numpy"):
        return value.numpy()
    data = getattr(expr, "data", None)
    return data.numpy() if data is not None and hasattr(data, "numpy") else None


_WORKSPACE_PASSES = [s_tir.transform.CanonicalizeLoop(), s_tir.transform.LowerCrossThreadReduction(),
                     s_tir.transform.LowerInitBlock(), s_tir.transform.PlanAndUpdateBufferAllocationLocation(),
                     s_tir.transform.ConvertBlocksToOpaque(), s_tir.transform.CompactBufferAllocation(),
                     s_tir.transform.LowerMatchBuffer(), s_tir.transform.LowerOpaqueBlock(),
                     tirx.transform.FlattenBuffer(), tirx.transform.NarrowDataType(32),
                     s_tir.transform.LoopPartition(), tirx.transform.VectorizeLoop(True),
                     tirx.transform.StorageRewrite()]


def kernel_workspace(func: tirx.PrimFunc) -> int:
    """Bytes a kernel allocates for itself (stack arrays and TVMBackendAllocWorkspace), after
    the TIR passes that compact and share its buffers."""
    lowered = tvm.transform.Sequential(_WORKSPACE_PASSES)(tvm.IRModule({"main": func}))
    sizes = s_tir.analysis.calculate_allocated_bytes(lowered["main"])["main"]
    return int(sum(int(v) for v in sizes.values()))


class _Walker:
    def __init__(self, mod: tvm.IRModule, function: str) -> None:
        self.mod = mod
        self.function = function
        self.buffers: dict[str, Buffer] = {}
        self.var_buffer: dict[relax.Var, str] = {}
        self.storage_bytes: dict[relax.Var, int] = {}
        self.storage_order: list[relax.Var] = []
        self.storage_of: dict[str, relax.Var] = {}
        self.constants: list[tuple[relax.Expr, np.ndarray]] = []
        self.calls: list[Call] = []
        self.names: set[str] = set()
        self.tuples: dict[relax.Var, relax.Tuple] = {}

    def fresh(self, hint: str) -> str:
        name, k = hint, 1
        while name in self.names:
            name, k = f"{hint}_{k}", k + 1
        self.names.add(name)
        return name

    def arg(self, expr: relax.Expr) -> str:
        arr = _const_array(expr)
        if arr is not None:
            for i, (c, _) in enumerate(self.constants):
                if c.same_as(expr):
                    return f"c{i}"
            self.constants.append((expr, arr))
            self.names.add(f"c{len(self.constants) - 1}")
            return f"c{len(self.constants) - 1}"
        if isinstance(expr, relax.Var) and expr in self.var_buffer:
            return self.var_buffer[expr]
        raise CompileError(f"plan: kernel argument {expr} is neither a buffer nor a constant; only straight-line "
                           "programs of tensor kernels have a static plan")

    def walk(self) -> tuple[list[str], list[str]]:
        func = self.mod[self.function]
        inputs = []
        for i, p in enumerate(func.params):
            shape, dtype = _tensor_type(p)
            name = self.fresh(p.name)
            self.buffers[name] = Buffer(name, shape, dtype, _nbytes(shape, dtype), "input", index=i)
            self.var_buffer[p] = name
            inputs.append(name)
        body = func.body
        for block in body.blocks:
            for binding in block.bindings:
                self.bind(binding.var, binding.value)
        ret = body.body
        fields_ = list(ret.fields) if isinstance(ret, relax.Tuple) else [ret]
        if isinstance(ret, relax.Var) and ret not in self.var_buffer and isinstance(ret.ty, relax.TupleType):
            fields_ = list(self.tuples[ret].fields)
        return inputs, [self.arg(f) for f in fields_]

    def bind(self, var: relax.Var, value: relax.Expr) -> None:
        if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op):
            op = value.op.name
            if op == "relax.memory.alloc_storage":
                # the size is already in bytes whatever the dtype (a 256-float block is R.shape([1024]))
                self.storage_bytes[var] = int(value.args[0].values[0])
                self.storage_order.append(var)
            elif op == "relax.memory.alloc_tensor":
                shape, dtype = _tensor_type(var)
                name = self.fresh(var.name)
                storage = value.args[0]
                self.buffers[name] = Buffer(name, shape, dtype, _nbytes(shape, dtype), "arena",
                                            offset=int(value.args[1].value))
                self.storage_of[name] = storage
                self.var_buffer[var] = name
            elif op == "relax.builtin.alloc_tensor":
                shape, dtype = _tensor_type(var)
                name = self.fresh(var.name)
                self.buffers[name] = Buffer(name, shape, dtype, _nbytes(shape, dtype), "output")
                self.var_buffer[var] = name
            elif op == "relax.reshape":
                shape, dtype = _tensor_type(var)
                name = self.fresh(var.name)
                self.buffers[name] = Buffer(name, shape, dtype, _nbytes(shape, dtype), "view",
                                            base=self.arg(value.args[0]), offset=0)
                self.var_buffer[var] = name
            elif op in ("relax.null_value",):
                pass
            else:
                raise CompileError(f"plan: {self.function} calls {op}, which has no static-plan meaning; lower the "
                                   "module with edgetune.compilers.pipeline.lower")
        elif isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.GlobalVar):
            callee = self.mod[value.op]
            if not isinstance(callee, tirx.PrimFunc):
                raise CompileError(f"plan: {self.function} calls the Relax function {value.op.name}; inline it "
                                   "or plan it separately")
            self.calls.append(Call(value.op.name_hint, tuple(self.arg(a) for a in value.args)))
        elif isinstance(value, relax.Var):
            if value in self.var_buffer:
                self.var_buffer[var] = self.var_buffer[value]
            elif value in self.tuples:
                self.tuples[var] = self.tuples[value]
        elif isinstance(value, relax.Tuple):
            self.tuples[var] = value
        elif isinstance(value, relax.TupleGetItem) and value.tuple_value in self.tuples:
            self.var_buffer[var] = self.arg(self.tuples[value.tuple_value].fields[int(value.index)])
        else:
            raise CompileError(f"plan: unsupported binding {type(value).__name__} in {self.function}; only "
                               "straight-line static-shape programs have a static plan")


def extract_plan(mod: tvm.IRModule, function: str = "main") -> tuple[StaticPlan, dict[str, np.ndarray]]:
    """The static plan of ``mod[function]`` (a module from ``pipeline.lower``) and its constants' values.

    Raises:
        CompileError: the function is not straight-line with static shapes (control flow,
            symbolic shapes, calls that are not kernels), or an output escapes planning.
    """
    if function not in [gv.name_hint for gv in mod.get_global_vars()]:
        raise CompileError(f"plan: the module has no function {function!r}")
    walker = _Walker(mod, function)
    inputs, outputs = walker.walk()

    buffers = dict(walker.buffers)
    for pos, name in enumerate(outputs):
        owner = name
        while buffers[owner].kind == "view":
            owner = buffers[owner].base
        if buffers[owner].kind == "output" and buffers[owner].index < 0:
            buffers[owner] = _replace(buffers[owner], index=pos)
    stray = [b.name for b in buffers.values() if b.kind == "output" and b.index < 0]
    if stray:
        raise CompileError(f"plan: buffers {', '.join(stray)} escape storage planning without being returned")

    storages, offset = [], 0
    storage_index = {}
    for i, var in enumerate(walker.storage_order):
        storages.append(Storage(i, walker.storage_bytes[var], offset))
        storage_index[var] = i
        offset += _align(walker.storage_bytes[var])
    arena_bytes = offset
    for name, storage in walker.storage_of.items():
        b = buffers[name]
        s = storages[storage_index[storage]]
        buffers[name] = _replace(b, storage=s.index, offset=s.offset + b.offset)

    constants, values, blob = [], {}, 0
    for i, (_, arr) in enumerate(walker.constants):
        name = f"c{i}"
        constants.append(Constant(name, tuple(int(d) for d in arr.shape), str(arr.dtype), int(arr.nbytes), blob))
        values[name] = arr
        blob += _align(int(arr.nbytes))

    kernels = []
    for name in dict.fromkeys(c.kernel for c in walker.calls):
        func = mod[name]
        kernels.append(Kernel(name, kernel_workspace(func), str((func.attrs or {}).get(SCHEDULE_ATTR, "unscheduled"))))

    plan = StaticPlan(function, tuple(inputs), tuple(outputs), tuple(buffers.values()), tuple(constants),
                      tuple(storages), tuple(kernels), tuple(walker.calls), arena_bytes, blob)
    return plan, values


def stage_segments(plan: StaticPlan, groups: list[list[int]]) -> tuple[StaticPlan, tuple[int, ...]] | None:
    """The plan with its calls reordered so that the outputs at positions ``groups[k]`` (and every
    earlier group's) are complete after the first ``ends[k]`` calls: a runtime may then stop after
    segment k (an early exit skips the rest of the frozen graph). Returns (plan, ends).

    A buffer is produced by the first call that touches it (destination-passing style); a call
    needs the producers of the other buffers it touches. The order within each segment is the
    original one. None when the reordered plan would be unsound: a call before its inputs, or
    arena buffers that would now be alive together while sharing bytes (``StaticPlan.check``).
    """
    consts = {c.name for c in plan.constants}
    producer: dict[str, int] = {}
    for i, call in enumerate(plan.calls):
        for arg in call.args:
            if arg not in consts:
                producer.setdefault(plan.root(arg).name, i)
    deps = [{producer[plan.root(a).name] for a in call.args if a not in consts} - {i}
            for i, call in enumerate(plan.calls)]
    order: list[int] = []
    placed: set[int] = set()
    ends = []
    for group in groups:
        stack = [producer[plan.root(plan.outputs[pos]).name] for pos in group if plan.root(plan.outputs[pos]).name
                 in producer]
        needed: set[int] = set()
        while stack:
            i = stack.pop()
            if i not in needed and i not in placed:
                needed.add(i)
                stack.extend(deps[i])
        order += sorted(needed)
        placed |= needed
        ends.append(len(order))
    order += [i for i in range(len(plan.calls)) if i not in placed]
    ends[-1] = len(order)  # the last segment runs whatever is left
    position = {i: p for p, i in enumerate(order)}
    if any(position[d] > position[i] for i in order for d in deps[i]):
        return None
    segmented = replace(plan, calls=tuple(plan.calls[i] for i in order))
    return (segmented, tuple(ends)) if not segmented.check() else None


def _replace(b: Buffer, **changes: object) -> Buffer:
    return Buffer(**{**asdict(b), **changes})
