"""Explicit unrolling of the scheduled kernels' small inner loops, for targets built from C source.

GCC unrolls a register tile's small loops (its pixels, its zeroing, its epilogue) only at -O3; at -O2 and
-Os the rolled tile keeps its accumulators in memory, and the kernels took 2.7x the instructions of -O3
on a Cortex-M4 (mcunet-s, ``benchmarks/bench_kernels.py``). Marked unrolled in TIR, the loops are
expanded in the C source itself, the tile's accumulators get constant indices and every -O level keeps
them in registers.

The rule is TVM's own automatic one (``tirx.UnrollLoop``'s ``auto_max_step`` / ``auto_max_depth``),
applied here at schedule time because the C code generators build with TVM's default pass options: a
loop is unrolled when no rolled loop (extent > 1) is inside it, at most ``MAX_DEPTH`` unrolled levels
are, and its body, repeated, is at most ``MAX_STEPS`` statements (16: a 2 x 4 tile's zeroing and
epilogue, not the padding rows, whose unrolling bought 6 % on depthwise convs for 3 % more flash than
the budget estimate is calibrated for). Never a whole tile (accumulation
*and* epilogue): TVM's C codegen prints an expression once per function and reuses the value where
the same expression recurs, so a repeated tile's epilogue would read the first tile's accumulators
(measured: a depthwise conv whose pixel-group loop was unrolled wrote its first group's results four
times). A 3x3 tile's group loop holds three unrolled levels (rows, columns, pixels), so the depth limit
keeps it rolled; the fidelity tests (C build = onnxruntime, bit for bit) guard the rule.
"""
from __future__ import annotations

import tvm
from tvm import tirx
from tvm.s_tir import Schedule
from tvm.s_tir.schedule import ScheduleError

MAX_STEPS = 16
MAX_DEPTH = 2
UNROLL_ATTR = "edgetune.unrolled"


def _blocks(sch: Schedule) -> list:
    """Every block of the function (nested under loops too), outer ones first."""
    out, todo = [], list(sch.get_child_blocks(sch.get_sblock("root")))
    while todo:
        b = todo.pop(0)
        out.append(b)
        todo.extend(sch.get_child_blocks(b))
    return out


def unroll_small_loops(func: tirx.PrimFunc) -> tuple[tirx.PrimFunc, int]:
    """``func`` with its small inner loops marked unrolled; returns it and how many loops were."""
    sch = Schedule(func)
    chains = []  # per block: its loops outer -> inner as (rv, For)
    for block in _blocks(sch):
        chains.append([(rv, sch.get(rv)) for rv in sch.get_loops(block)])
    loops: list = []  # unique For nodes in the order first seen
    for chain in chains:
        for rv, node in chain:
            if not any(node.same_as(n) for _, n in loops):
                loops.append((rv, node))

    def extent(node) -> int:
        return int(node.extent) if isinstance(node.extent, tirx.IntImm) else -1

    unrolled = {id_ for id_, (_, n) in enumerate(loops) if n.kind == tirx.ForKind.UNROLLED}

    def index(node) -> int:
        return next(i for i, (_, n) in enumerate(loops) if n.same_as(node))

    def below(i: int) -> list[list[int]]:
        """For each block under loop i: the loops between it and the block."""
        node = loops[i][1]
        out = []
        for chain in chains:
            nodes = [n for _, n in chain]
            pos = next((k for k, n in enumerate(nodes) if n.same_as(node)), None)
            if pos is not None:
                out.append([index(n) for n in nodes[pos + 1:]])
        return out

    reusing = [_reads_own_store_in_ssa(sch.get(block)) for block in _blocks(sch)]

    def blocks_below(i: int) -> list[int]:
        node = loops[i][1]
        return [k for k, chain in enumerate(chains) if any(n.same_as(node) for _, n in chain)]

    # innermost first: a loop's decision depends on those inside it
    depth_of = {i: max(len(b) for b in below(i)) for i in range(len(loops))}
    count = 0
    for i in sorted(range(len(loops)), key=lambda i: depth_of[i]):
        rv, node = loops[i]
        n = extent(node)
        if node.kind != tirx.ForKind.SERIAL or n <= 1:
            continue
        if any(reusing[k] for k in blocks_below(i)):
            continue  # a max/min update of its own buffer: see _reads_own_store_in_ssa
        inner = below(i)
        if any(j not in unrolled and extent(loops[j][1]) != 1 for b in inner for j in b):
            continue  # a rolled loop inside
        if max(sum(1 for j in b if extent(loops[j][1]) > 1) for b in inner) + 1 > MAX_DEPTH:
            continue
        steps = n * sum(int(_product(extent(loops[j][1]) for j in b)) for b in inner)
        if steps > MAX_STEPS:
            continue
        try:
            sch.unroll(rv)
        except ScheduleError:
            continue
        unrolled.add(i)
        count += 1
    return sch.mod["main"], count


def _reads_own_store_in_ssa(block) -> bool:
    """Whether ``block`` stores a value that reads the buffer it writes through a max or min (a max
    reduction such as a softmax's row maximum or a max pool's window). TVM's C codegen prints a max's
    operands as SSA temporaries and reuses a temporary wherever the same expression recurs in the
    scope, stores in between notwithstanding: unrolled, ``m = max(m, x0); m = max(m, x1)`` became
    ``v = m; m = max(v, x0); m = max(v, x1)`` (the last element, not the maximum; measured on the
    transformer's Softmax, whose C build then read its exp table out of bounds)."""
    from tvm.s_tir import SBlock
    body = block.body if isinstance(block, SBlock) else block
    if not isinstance(body, tirx.BufferStore):
        return False

    def walk(e, under_minmax: bool) -> bool:
        if isinstance(e, tvm.ir.expr.TensorLoad) and under_minmax and e.source.same_as(body.buffer):
            return True
        inside = under_minmax or isinstance(e, (tirx.Max, tirx.Min))
        children = [getattr(e, f) for f in ("a", "b", "value", "condition", "true_value", "false_value")
                    if isinstance(getattr(e, f, None), tvm.ir.expr.Expr)]
        children += [c for f in ("args", "indices") for c in (getattr(e, f, None) or ())
                     if isinstance(c, tvm.ir.expr.Expr)]
        return any(walk(c, inside) for c in children)

    return walk(body.value, False)


def _product(values) -> int:
    out = 1
    for v in values:
        out *= max(v, 1)
    return out


def unroll_kernels() -> tvm.transform.Pass:
    """Module pass: ``unroll_small_loops`` on every scheduled int8 kernel (once; recorded in its attributes).

    Only the int8 kernel families (``edgetune.kernel``), whose C build is checked bit for bit against
    onnxruntime: the float kernels of a training step, unrolled, met the codegen's expression reuse
    described above (tinytta's compiled host step stopped matching torch)."""

    @tvm.transform.module_pass(opt_level=0, name="edgetune.UnrollSmallLoops")
    def apply(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        for gv, func in list(mod.functions.items()):
            if not isinstance(func, tirx.PrimFunc) or UNROLL_ATTR in (func.attrs or {}):
                continue
            if "edgetune.kernel" not in (func.attrs or {}):
                continue
            try:
                done, count = unroll_small_loops(func)
            except (ScheduleError, ValueError, RuntimeError):  # opaque TIR the schedule cannot read: as it is
                done, count = func, 0
            mod[gv] = done.with_attr(UNROLL_ATTR, count)
        return mod

    return apply
