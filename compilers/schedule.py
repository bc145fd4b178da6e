"""Hand TIR schedules for the int8 kernels, and the pass that applies them.

TVM's default CPU pipeline leaves kernels unscheduled: every stage of a fused kernel
(padded input, int32 accumulator, each epilogue step) is a full-size buffer walked in
naive loop order (the spike measured ~10x onnxruntime's time and 53 KB of workspace).
The templates here (direct convolution, register-blocked) fix both:

* the epilogue (requantisation, a fused residual add) is inlined and computed per tile
  of the accumulator, so the int32 accumulator shrinks to one register tile;
* the padded input is produced per output row (band of ``kh`` input rows; per channel
  for depthwise convs), not per image; strided convs store it phase-split so vector
  loads stay contiguous (``int8_kernels.qconv2d``);
* the accumulator tile is ``oc_tile`` output channels x ``lanes`` output pixels (pixel
  loop vectorised, channels unrolled); 1x1 convs vectorise the whole output plane, and
  convs with short output rows swap roles (``conv_family``: output channels in the
  vector, weights stored [I, H, W, O]).

On LLVM targets with an int8 dot-product instruction (AArch64 ``sdot``: android-arm64), regular convs
with at least ``DOT_MIN_CHANNELS`` input channels get ``_conv_dot`` instead: input channels innermost and
contiguous (the input, or its padded band, stored channels-last per output row; weights repacked
[O, H, W, I] once per call where they are not already), one int32 accumulator per output, so LLVM's loop
vectoriser turns the channel reduction into ``sdot`` (TVM 0.27's own ``tensorize`` with its AArch64 dot
intrinsics crashes, see ``_conv_dot``). Integer sums in any order: outputs unchanged.

``ScheduleConfig`` carries the per-target knobs; the applied schedule of every kernel is
recorded in its PrimFunc attribute ``edgetune.schedule`` (the static plan copies it).
Float reductions that must keep onnxruntime's summation order (pools, boundary means) are
never reordered or vectorised along the reduction.
"""
from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import tirx
from tvm.s_tir import Schedule
from tvm.s_tir.schedule import ScheduleError

SCHEDULE_ATTR = "edgetune.schedule"
FAMILIES = ("qconv2d_depthwise", "qconv2d_oc", "qconv2d", "qmatmul", "qglobal_pool", "qavg_pool", "qmax_pool",
            "ort_mean")
VECTOR_PIXELS = 16  # below this many output pixels per row, vectorise over output channels instead
DOT_MIN_CHANNELS = 16  # fewer input channels than one 16-byte dot-product vector: the direct templates


def conv_family(out_channels: int, groups: int, in_per_group: int, row_pixels: int) -> str:
    """Which conv kernel (and weight layout) a convolution gets: depthwise; ``qconv2d_oc``
    (vectorised over output channels, weights stored [I, H, W, O]) for regular convs whose
    output rows (whole planes for 1x1 convs) are too short to fill a vector; else ``qconv2d``
    (vectorised over output pixels, weights OIHW)."""
    if groups == out_channels and in_per_group == 1:
        return "qconv2d_depthwise"
    if groups == 1 and row_pixels < VECTOR_PIXELS and out_channels % VECTOR_PIXELS == 0:
        return "qconv2d_oc"
    return "qconv2d"


@dataclass(frozen=True)
class ScheduleConfig:
    """Target knobs: ``lanes`` pixels per vector (1: no vectorisation, e.g. the C target),
    ``oc_tile`` output channels per register tile, ``dot``: channel-innermost convs for an int8
    dot-product instruction (``_conv_dot``)."""

    lanes: int = 16
    oc_tile: int = 4
    vectorize: bool = True
    dot: bool = False

    @staticmethod
    def for_target(target: tvm.target.Target) -> "ScheduleConfig":
        if str(target.kind.name) == "c":
            return ScheduleConfig(lanes=4, oc_tile=2, vectorize=False)
        return ScheduleConfig(dot=has_dot_product(target))


def has_dot_product(target: tvm.target.Target) -> bool:
    """An LLVM target whose CPU has an int8 dot-product instruction LLVM vectorises reductions into
    (AArch64 with ``+dotprod``: ``sdot``)."""
    if str(target.kind.name) != "llvm":
        return False
    triple = str(target.attrs.get("mtriple", "") or "")
    return triple.startswith("aarch64") and "+dotprod" in [str(a) for a in target.attrs.get("mattr", []) or []]


def _extent(sch: Schedule, loop) -> int:
    return int(sch.get(loop).extent)


def _divisor(n: int, cap: int) -> int:
    """Largest power of two <= cap dividing n (1 when n is odd)."""
    d = 1
    while d * 2 <= cap and n % (d * 2) == 0:
        d *= 2
    return d


def _blocks(sch: Schedule) -> list:
    return list(sch.get_child_blocks(sch.get_sblock("root")))


def _name(sch: Schedule, block) -> str:
    return sch.get(block).name_hint


# norm-align's accumulator statistics (``int8_kernels.accumulator_moments``)
MOMENT_BLOCKS = ("moment_sum", "moment_sumsq")


def _inline_tail(sch: Schedule, after: str) -> object:
    """Inline the elementwise blocks after ``after`` into the last one; return the last (the
    accumulator statistics are reductions of their own: ``_moments_per_tile`` places them)."""
    names = [_name(sch, b) for b in _blocks(sch) if _name(sch, b) not in MOMENT_BLOCKS]
    tail = names[names.index(after) + 1:]
    for name in tail[:-1]:
        sch.compute_inline(sch.get_sblock(name))
    return sch.get_sblock(tail[-1])


def _vectorize_inner(sch: Schedule, block, cfg: ScheduleConfig) -> None:
    loops = sch.get_loops(block)
    if cfg.vectorize and loops and _extent(sch, loops[-1]) > 1:
        sch.vectorize(loops[-1])


def _moments_per_tile(sch: Schedule, tile_loop, outer_loop) -> str:
    """The accumulator statistics (when the kernel has them) summed from each accumulator tile right
    after its epilogue, while the tile is in registers: no second pass and no full accumulator
    buffer. Their initialisation runs once, before the outermost loop."""
    names = {_name(sch, b) for b in _blocks(sch)}
    present = [n for n in MOMENT_BLOCKS if n in names]
    for name in present:
        block = sch.get_sblock(name)
        sch.reverse_compute_at(block, tile_loop)
        sch.decompose_reduction(block, outer_loop)
    return ", channel moments per tile" if present else ""


def _conv(sch: Schedule, cfg: ScheduleConfig, depthwise: bool) -> str:
    acc = sch.get_sblock("acc")
    epilogue = _inline_tail(sch, "acc")
    nn, oo, i, j, rc, ry, rx = sch.get_loops(acc)
    names = [_name(sch, b) for b in _blocks(sch)]
    pointwise = "pad" not in names and _extent(sch, ry) == 1 and _extent(sch, rx) == 1
    if pointwise:
        # a 1x1 conv is a matrix product over all pixels: vectorise the whole plane
        j = sch.fuse(i, j)
    oc, ow = _extent(sch, oo), _extent(sch, j)
    lanes = _divisor(ow, cfg.lanes)
    if pointwise:
        # a tile of the fused plane must not straddle two output rows unless it holds whole rows: the
        # epilogue computed at the tile covers the tile's bounding box of (row, column), and an
        # accumulator tile that straddles rows leaves part of that box uncomputed (10x10: lanes 4 broke)
        row = _extent(sch, sch.get_loops(epilogue)[-1])
        while lanes > 1 and row % lanes and lanes % row:
            lanes //= 2
    tile = 1 if depthwise else _divisor(oc, cfg.oc_tile)
    o_out, o_in = sch.split(oo, [None, tile])
    j_out, j_in = sch.split(j, [None, lanes])
    if pointwise:
        sch.reorder(nn, o_out, j_out, rc, ry, rx, o_in, j_in)
        where = "no padding"
    elif depthwise:
        # one channel at a time: its padded plane is the only input it needs
        sch.reorder(nn, o_out, i, j_out, rc, ry, rx, o_in, j_in)
        where = "no padding"
        if "pad" in names:
            sch.compute_at(sch.get_sblock("pad"), o_out)
            where = "pad per channel"
    else:
        # output row outer: the padded input band of a row serves every output channel
        sch.reorder(nn, i, o_out, j_out, rc, ry, rx, o_in, j_in)
        where = "no padding"  # an unpadded (Keras 'valid') conv with stride 1 reads its input in place
        if "pad" in names:
            sch.compute_at(sch.get_sblock("pad"), i)
            where = "pad per output row"
    sch.reverse_compute_at(epilogue, j_out)
    moments = _moments_per_tile(sch, j_out, nn)
    for loop in (ry, rx):
        if _extent(sch, loop) > 1:
            sch.unroll(loop)
    if tile > 1:
        sch.unroll(o_in)
    vectorised = cfg.vectorize and lanes > 1
    if vectorised:
        sch.vectorize(j_in)
        _vectorize_inner(sch, epilogue, cfg)
    # after the loop annotations: the init block's loops copy them (vectorised zeroing)
    sch.decompose_reduction(acc, rc)
    kind = "pointwise" if pointwise else "depthwise" if depthwise else "direct"
    return f"{kind} conv: {tile}oc x {lanes}px register tile, {where}, epilogue per tile{moments}" + \
        (", vectorised" if vectorised else "")


def _conv_oc(sch: Schedule, cfg: ScheduleConfig) -> str:
    """Regular conv with short output rows: output channels in the vector, a few pixels unrolled."""
    acc = sch.get_sblock("acc")
    epilogue = _inline_tail(sch, "acc")
    nn, oo, i, j, rc, ry, rx = sch.get_loops(acc)
    names = [_name(sch, b) for b in _blocks(sch)]
    lanes = _divisor(_extent(sch, oo), cfg.lanes)
    pixels = _divisor(_extent(sch, j), cfg.oc_tile)
    o_out, o_in = sch.split(oo, [None, lanes])
    j_out, j_in = sch.split(j, [None, pixels])
    sch.reorder(nn, i, o_out, j_out, rc, ry, rx, j_in, o_in)
    where = "no padding"
    if "pad" in names:
        sch.compute_at(sch.get_sblock("pad"), i)
        where = "pad per output row"
    sch.reverse_compute_at(epilogue, j_out)
    moments = _moments_per_tile(sch, j_out, nn)
    for loop in (ry, rx):
        if _extent(sch, loop) > 1:
            sch.unroll(loop)
    if pixels > 1:
        sch.unroll(j_in)
    vectorised = cfg.vectorize and lanes > 1
    if vectorised:
        sch.vectorize(o_in)
    sch.decompose_reduction(acc, rc)
    return f"channel-vector conv: {lanes}oc x {pixels}px register tile, {where}, epilogue per tile{moments}" + \
        (", vectorised" if vectorised else "")


def _channels_last(ndim: int):
    # NCHW -> NHWC; the phase-split padded input of strided convs [N, C, H, PH, W/PH] -> [N, H, PH, W/PH, C]
    if ndim == 4:
        return lambda n, c, y, x: (n, y, x, c)
    return lambda n, c, y, p, x: (n, y, p, x, c)


def dot_eligible(sch: Schedule) -> bool:
    """A regular (groups = 1) conv with enough input channels for a 16-byte dot-product vector."""
    acc = sch.get_sblock("acc")
    loops = sch.get_loops(acc)
    return len(loops) == 7 and _extent(sch, loops[4]) >= DOT_MIN_CHANNELS


def _conv_dot(sch: Schedule, channels_last_weight: bool) -> str:
    """Regular conv, input channels innermost: every output is one scalar int32 reduction over
    contiguous int8 channels (input band channels-last, weights [O, H, W, I]), which LLVM's loop
    vectoriser turns into ``sdot`` on AArch64 with the dot-product extension. The accumulator is
    stored [N, H, W, O] and the epilogue runs per output pixel (all its channels).

    TVM 0.27's ``Schedule.tensorize`` (with ``ARM_DOT_4x4_i8_SDOT_INTRIN`` or any intrinsic) crashes
    the process (segfault in ``ffi::ToJSONGraph``), so the instruction comes from LLVM instead."""
    acc = sch.get_sblock("acc")
    epilogue = _inline_tail(sch, "acc")
    names = [_name(sch, b) for b in _blocks(sch)]
    sch.transform_layout(acc, ("write", 0), lambda n, o, y, x: (n, y, x, o))
    weights = sch.cache_read(acc, 1, "global")
    if channels_last_weight:  # [I, H, W, O]
        sch.transform_layout(weights, ("write", 0), lambda c, y, x, o: (o, y, x, c))
    else:  # [O, I, H, W]
        sch.transform_layout(weights, ("write", 0), lambda o, c, y, x: (o, y, x, c))
    padded = "pad" in names
    source = sch.get_sblock("pad") if padded else sch.cache_read(acc, 0, "global")
    ndim = len(sch.get(source).writes[0].region)
    sch.transform_layout(source, ("write", 0), _channels_last(ndim))
    nn, oo, i, j, rc, ry, rx = sch.get_loops(acc)
    sch.reorder(nn, i, j, oo, ry, rx, rc)
    # the input band of one output row, channels-last: every output channel and pixel of the row reads it
    sch.compute_at(source, i)
    sch.reverse_compute_at(epilogue, j)
    moments = _moments_per_tile(sch, j, nn)
    sch.decompose_reduction(acc, ry)
    return (f"dot conv: input channels innermost ({'padded band' if padded else 'input row'} channels-last per "
            f"output row, weights repacked OHWI), one int32 reduction per output, epilogue per pixel{moments}")


def _matmul(sch: Schedule, cfg: ScheduleConfig) -> str:
    acc = sch.get_sblock("acc")
    epilogue = _inline_tail(sch, "acc")
    i, j, k = sch.get_loops(acc)
    lanes = _divisor(_extent(sch, j), cfg.lanes)
    j_out, j_in = sch.split(j, [None, lanes])
    sch.reorder(i, j_out, k, j_in)
    sch.reverse_compute_at(epilogue, j_out)
    if cfg.vectorize and lanes > 1:
        sch.vectorize(j_in)
        _vectorize_inner(sch, epilogue, cfg)
    sch.decompose_reduction(acc, k)
    return f"matmul: {lanes}-column tile, epilogue per tile" + (", vectorised" if cfg.vectorize and lanes > 1 else "")


def _reduces(sch: Schedule, block) -> bool:
    return any(int(iv.iter_type) != 0 for iv in sch.get(block).iter_vars)


def _epilogue_per_output(sch: Schedule, name: str) -> tuple[object, int]:
    """Inline the elementwise blocks after reduction ``name`` into one epilogue computed per output
    element, under the reduction's data-parallel loops; the reduction's own loops (and so its
    summation order) stay as they are. Returns (reduction block, its data-parallel loop count)."""
    acc = sch.get_sblock(name)
    epilogue = _inline_tail(sch, name)
    spatial = sum(1 for iv in sch.get(acc).iter_vars if int(iv.iter_type) == 0)
    if spatial:
        sch.reverse_compute_at(epilogue, sch.get_loops(acc)[spatial - 1])
    return acc, spatial


def _pool(sch: Schedule, cfg: ScheduleConfig) -> str:
    # the summation order of float pools is onnxruntime's: only the epilogue moves, and the
    # initialisation gets its own loop (C compilers then see it dominate the sum: no
    # maybe-uninitialized warning under -Werror)
    acc, spatial = _epilogue_per_output(sch, "acc")
    loops = sch.get_loops(acc)
    if spatial and len(loops) > spatial:
        sch.decompose_reduction(acc, loops[spatial])
    return "pool: epilogue per output element, summation order kept"


def _float_reduction(sch: Schedule) -> str:
    """A float kernel with one reduction (matmul, sum, max of a training step): its elementwise
    producers inlined, its epilogue computed per output element so the reduced intermediate is a
    scalar instead of a whole tensor in the workspace. The summation order is kept."""
    blocks = _blocks(sch)
    reducing = [b for b in blocks if _reduces(sch, b)]
    if len(reducing) != 1:
        return "unscheduled (several reductions; not an int8 kernel family)"
    name = _name(sch, reducing[0])
    for b in blocks[:blocks.index(reducing[0])]:
        try:
            sch.compute_inline(b)
        except ScheduleError:  # read twice or not injective: it stays a stage of its own
            pass
    if _name(sch, _blocks(sch)[-1]) == name:
        return "float reduction: producers inlined, summation order kept"
    acc, spatial = _epilogue_per_output(sch, name)
    if spatial == 0:
        return "float reduction: producers inlined, summation order kept"
    loops = sch.get_loops(acc)
    if len(loops) > spatial:  # the initialisation in its own loop: C compilers then see it dominate
        sch.decompose_reduction(acc, loops[spatial])
    return "float reduction: epilogue per output element, summation order kept"


def _elementwise(sch: Schedule, cfg: ScheduleConfig) -> str:
    blocks = _blocks(sch)
    if any(_reduces(sch, b) for b in blocks):
        return _float_reduction(sch)
    for b in blocks[:-1]:
        try:
            sch.compute_inline(b)
        except ScheduleError:  # e.g. a block read by two consumers: it stays a stage of its own
            return "elementwise: stages kept"
    last = sch.get_sblock(_name(sch, _blocks(sch)[-1]))
    loops = sch.get_loops(last)
    if not loops:
        return "elementwise: scalar"
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    lanes = _divisor(_extent(sch, fused), cfg.lanes)
    if cfg.vectorize and lanes > 1:
        _, inner = sch.split(fused, [None, lanes])
        sch.vectorize(inner)
        return f"elementwise: fused loop, {lanes} lanes"
    return "elementwise: fused loop"


def _boundary_mean(sch: Schedule) -> str:
    names = [_name(sch, b) for b in _blocks(sch)]
    if "acc" not in names:
        return "boundary mean: onnxruntime summation order (one addition tree per row)"
    # the packet accumulators of one channel, computed where that channel's mean is: 32 bytes
    out = sch.get_sblock(names[-1])
    sch.compute_at(sch.get_sblock("acc"), sch.get_loops(out)[1])
    return "boundary mean: onnxruntime summation order, packet accumulators per channel"


def family_of(name: str) -> str:
    """The kernel family a (possibly fused) PrimFunc name belongs to, or "elementwise"."""
    for family in FAMILIES:
        if family in name:
            return family
    return "elementwise"


def schedule_func(func: tirx.PrimFunc, name: str, cfg: ScheduleConfig) -> tuple[tirx.PrimFunc, str]:
    """Schedule one kernel; returns the scheduled function and a one-line description.

    A kernel the templates cannot schedule (opaque TIR, or an int8 kernel that FuseOps fused with
    a float island's broadcast or slice) runs as TVM lowered it, and the record says so.
    """
    family = family_of(name)
    if cfg.dot and family in ("qconv2d", "qconv2d_oc"):
        sch = Schedule(func)
        try:
            if dot_eligible(sch):
                how = _conv_dot(sch, family == "qconv2d_oc")
                return sch.mod["main"], how
        except (ScheduleError, ValueError, RuntimeError):  # e.g. a fused float island: the direct templates
            pass
    sch = Schedule(func)
    try:
        if family in ("qconv2d", "qconv2d_depthwise"):
            how = _conv(sch, cfg, family == "qconv2d_depthwise")
        elif family == "qconv2d_oc":
            how = _conv_oc(sch, cfg)
        elif family == "qmatmul":
            how = _matmul(sch, cfg)
        elif family == "qmax_pool":
            how = "max pool: one int8 window per output element"
        elif family in ("qglobal_pool", "qavg_pool"):
            how = _pool(sch, cfg)
        elif family == "ort_mean":
            how = _boundary_mean(sch)
        else:
            how = _elementwise(sch, cfg)
    except (ScheduleError, ValueError, RuntimeError) as exc:  # tvm-ffi raises ValueError for failed checks
        return func, f"unscheduled ({str(exc).strip().splitlines()[0][:80]})"
    return sch.mod["main"], how


def schedule_kernels(cfg: ScheduleConfig) -> tvm.transform.Pass:
    """Module pass: schedule every PrimFunc that has not been scheduled yet and record how."""

    @tvm.transform.module_pass(opt_level=0, name="edgetune.ScheduleKernels")
    def apply(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        for gv, func in list(mod.functions.items()):
            if not isinstance(func, tirx.PrimFunc) or SCHEDULE_ATTR in (func.attrs or {}):
                continue
            scheduled, how = schedule_func(func, gv.name_hint, cfg)
            mod[gv] = scheduled.with_attr(SCHEDULE_ATTR, how)
        return mod

    return apply
