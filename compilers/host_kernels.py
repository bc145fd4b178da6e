"""Host (x86-64) micro-kernels: the int8 convolutions and residual adds of the host library as calls of
hand-written kernels (``targets/host/et_kernels_x86.h``) instead of TVM's LLVM code.

TVM 0.27's ``Schedule.tensorize`` crashes (see ``schedule._conv_dot``), so the AVX-512 VNNI instruction
(VPDPBUSD, 64 byte products per instruction) cannot come from a tensor intrinsic; LLVM's vectoriser does
not form it from TIR either. After lowering, every kernel a micro-kernel covers becomes one
``call_extern`` of it with the kernel's own buffers (the static plan and its arena do not change), and
the host C compiler builds the header at ``-O3 -march=native`` into the library (``frozen.compile_frozen``).

The convolutions read their weights in the order the inner loop does ([O, H, W, I], output channels
blocked by register tile: ``blocked``) and their bias with ``- 128 * sum(w)`` folded in (the kernels feed
activations as ``x + 128``: VPDPBUSD multiplies unsigned by signed bytes): ``route`` rewrites those
constants offline, same shapes and sizes. Only kernels whose TIR has exactly the form the micro-kernels
compute are replaced (float requantisation, one image, one group, any kernel size, stride and top / left
padding read off the TIR, no dilation: ``_geometry``), and only when the host compiler targets a CPU with
AVX-512 VNNI (``vnni_available``): elsewhere the header's plain C path gives the same bytes but is slower
than TVM's vectorised code, so the kernels stay TVM's. The residual add (``int8_math.add``) is replaced on
every such host too: TVM's LLVM backend emits its two ``fmaf`` per element as library calls (36 us of
mcunet-s's first 16x16x16 add), the micro-kernel as vector FMAs. Depthwise convs have a micro-kernel as
well, exact but slower than TVM's own (``ROUTE_DEPTHWISE``).
"""
from __future__ import annotations

import functools
import platform
import shutil
import subprocess
from dataclasses import dataclass, replace

import numpy as np
import tvm
import tvm.sym
from tvm import tirx
from tvm.s_tir import Schedule

from edgetune.compilers.dsp_kernels import buffer_shape, output_zero_point
from edgetune.compilers.plan import StaticPlan

HEADER = "et_kernels_x86.h"
SOURCE = "et_kernels_x86.c"
POINTWISE = "et_x86_pointwise_s8"
CONV = "et_x86_conv_s8"
DEPTHWISE = "et_x86_depthwise_s8"
ADD = "et_x86_add_s8"
MAX_PACKED = 1 << 18  # ET_X86_MAX_PACKED of the header
CFLAGS = ("-O3", "-march=native")  # the host library only runs on the machine that built it
VNNI_MACROS = ("__AVX512F__", "__AVX512BW__", "__AVX512VL__", "__AVX512VNNI__")
# the depthwise micro-kernel is exact but slower than TVM's own vectorised depthwise kernels on mcunet-s
# (0.46x vs 0.43x onnxruntime's default session, bench_linux --attempts): not routed unless switched on
ROUTE_DEPTHWISE = False


@dataclass(frozen=True)
class Replaced:
    """A kernel the host micro-kernels took over: the new PrimFunc, what it does, and how its conv
    weights are stored (``weight_order``: the numpy transpose to [O, H, W, I]; None: not a conv)."""

    func: tirx.PrimFunc
    how: str
    weight_order: tuple[int, ...] | None = None
    blocked: bool = True  # conv weights in the tiles' blocked layout (``blocked``); else [O, H, W, I] as they are


@functools.cache
def vnni_available(cc: str = "gcc") -> bool:
    """Whether ``cc -march=native`` compiles the header's AVX-512 VNNI path on this machine (x86-64 only)."""
    if platform.machine().lower() not in ("x86_64", "amd64") or shutil.which(cc) is None:
        return False
    done = subprocess.run([cc, "-march=native", "-dM", "-E", "-x", "c", "-"], input="", capture_output=True,
                          text=True)
    return done.returncode == 0 and all(f"#define {m} 1" in done.stdout for m in VNNI_MACROS)


def _float_conv(func: tirx.PrimFunc) -> tuple | None:
    """(x, w, y) shapes of a float-requantised conv kernel ``(x, w, bias, scale, out)``, or None."""
    if len(func.params) != 5:
        return None  # norm-align's convs (run-time requantisation, moments) and fixed point keep TVM's code
    x, w, b, s, y = (p.ty for p in func.params)
    if tuple(str(t.dtype) for t in (x, w, b, s, y)) != ("int8", "int8", "int32", "float32", "int8"):
        return None
    return buffer_shape(x), buffer_shape(w), buffer_shape(y)


def _pointwise(func: tirx.PrimFunc) -> Replaced | None:
    attrs = func.attrs or {}
    if attrs.get("edgetune.kernel") != "qconv2d" or not str(attrs.get("edgetune.schedule", "")).startswith(
            "pointwise conv"):
        return None
    shapes = _float_conv(func)
    if shapes is None:
        return None
    (n, cin, h, wd), (cout, cpg, kh, kw), out = shapes
    if n != 1 or cpg != cin or (kh, kw) != (1, 1) or out != (1, cout, h, wd) or cin % 4 or cin * h * wd > MAX_PACKED:
        return None
    zy = output_zero_point(func)
    if zy is None:
        return None
    call = tirx.call_extern("int32", POINTWISE, *_data(func), cin, h * wd, cout, zy)
    return Replaced(_calling(func, call), f"pointwise conv: x86 micro-kernel {POINTWISE} (VPDPBUSD, 16px x 16oc "
                                          "tile, input repacked 4 channels per pixel)", (0, 2, 3, 1), True)


def _value_at(e, binds: dict) -> int | None:
    """An integer index expression evaluated with its variables bound to constants (None if it is not one)."""
    analyzer = tvm.sym.Analyzer()
    for var, value in binds.items():
        analyzer.bind(var, tirx.const(value, str(getattr(var.ty, "dtype", "int64"))))
    out = analyzer.simplify(e)
    return int(out.value) if isinstance(out, tirx.IntImm) else None


def _geometry(func: tirx.PrimFunc) -> tuple[int, int, int, int, int] | None:
    """(row stride, column stride, top padding, left padding, input zero point) of a conv kernel, read off
    its TIR: the accumulator's input index evaluated at unit steps of the output pixel and the tap (which
    also proves there is no dilation), and the padding block's source index and fill value. None when
    the kernel does not have the ``int8_kernels.qconv2d`` form."""
    sch = Schedule(func)
    names = {sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))}
    try:
        acc = sch.get(sch.get_sblock("acc_update" if "acc_update" in names or "acc_init" in names else "acc"))
    except (ValueError, RuntimeError):
        return None
    value = acc.body.value
    if not (isinstance(value, tirx.Add) and isinstance(value.b, tirx.Mul) and isinstance(value.b.a, tirx.Cast)):
        return None
    load = value.b.a.value
    iv = [v.var for v in acc.iter_vars]
    if not isinstance(load, tvm.ir.TensorLoad) or len(iv) != 7 or len(load.indices) not in (4, 5):
        return None
    _, _, i, j, _, ry, rx = iv
    idx = load.indices
    phases = int(load.source.ty.shape[3]) if len(idx) == 5 else 1

    def at(var=None, step: int = 0) -> tuple[int | None, int | None]:
        binds = {v: 0 for v in iv} | ({var: step} if var is not None else {})
        row = _value_at(idx[2], binds)
        col = _value_at(idx[3], binds) if len(idx) == 4 else None
        if len(idx) == 5:
            q, phase = _value_at(idx[4], binds), _value_at(idx[3], binds)
            col = None if q is None or phase is None else q * phases + phase
        return row, col

    origin, down, right, tap_down, tap_right = at(), at(i, 1), at(j, 1), at(ry, 1), at(rx, 1)
    if origin != (0, 0) or None in (*down, *right, *tap_down, *tap_right):
        return None
    sh, sw = down[0], right[1]
    if (down[1], right[0], tap_down, tap_right) != (0, 0, (1, 0), (0, 1)) or sh < 1 or sw < 1:
        return None  # dilated, transposed or otherwise unusual indexing: TVM's code
    if load.source.same_as(func.params[0]):
        return sh, sw, 0, 0, 0  # unpadded (and unit column stride): the input read in place
    try:
        pad = sch.get(sch.get_sblock("pad"))
    except (ValueError, RuntimeError):
        return None
    fill = pad.body.value
    if not (_is_call(fill, "prim.if_then_else") and isinstance(fill.args[2], tirx.IntImm)
            and isinstance(fill.args[1], tvm.ir.TensorLoad) and fill.args[1].source.same_as(func.params[0])):
        return None
    zeros = {v.var: 0 for v in pad.iter_vars}
    top, left = (_value_at(e, zeros) for e in fill.args[1].indices[2:4])
    if top is None or left is None or top > 0 or left > 0:
        return None
    return sh, sw, -top, -left, int(fill.args[2].value)


def _conv(func: tirx.PrimFunc) -> Replaced | None:
    kernel = (func.attrs or {}).get("edgetune.kernel")
    if kernel not in ("qconv2d", "qconv2d_oc"):
        return None
    shapes = _float_conv(func)
    if shapes is None:
        return None
    ihwo = kernel == "qconv2d_oc"
    (n, cin, h, wd), wshape, out = shapes
    cpg, kh, kw, cout = wshape if ihwo else (wshape[1], wshape[2], wshape[3], wshape[0])
    if n != 1 or cpg != cin or len(out) != 4 or out[1] != cout:
        return None
    _, _, oh, ow = out
    geometry, zy = _geometry(func), output_zero_point(func)
    if geometry is None or zy is None:
        return None
    sh, sw, top, left, zx = geometry
    if 4 * ((cin + 3) // 4) * ((oh - 1) * sh + kh) * ((ow - 1) * sw + kw) > MAX_PACKED:
        return None
    call = tirx.call_extern("int32", CONV, *_data(func), cin, h, wd, cout, oh, ow, kh, kw, sh, sw, top, left, zx, zy)
    return Replaced(_calling(func, call), f"direct conv: x86 micro-kernel {CONV} (VPDPBUSD, im2col of 16px in "
                                          "groups of 4 channels, 16oc tile)", (3, 1, 2, 0) if ihwo else (0, 2, 3, 1),
                    cin % 4 == 0)


def _depthwise(func: tirx.PrimFunc) -> Replaced | None:
    if (func.attrs or {}).get("edgetune.kernel") != "qconv2d_depthwise":
        return None
    shapes = _float_conv(func)
    if shapes is None:
        return None
    (n, ch, h, wd), (cout, cpg, kh, kw), out = shapes
    if n != 1 or cout != ch or cpg != 1 or len(out) != 4 or out[1] != ch:
        return None
    _, _, oh, ow = out
    geometry, zy = _geometry(func), output_zero_point(func)
    if geometry is None or zy is None:
        return None
    sh, sw, top, left, zx = geometry
    if ((oh - 1) * sh + kh) * sw * (((ow - 1) * sw + kw + sw - 1) // sw) > MAX_PACKED:
        return None
    call = tirx.call_extern("int32", DEPTHWISE, *_data(func), ch, h, wd, oh, ow, kh, kw, sh, sw, top, left, zx, zy)
    return Replaced(_calling(func, call), f"depthwise conv: x86 micro-kernel {DEPTHWISE} (phase-split padded plane "
                                          "per channel, 16 outputs per vector)")


def _is_call(e, name: str) -> bool:
    return isinstance(e, tvm.ir.expr.Call) and e.op.name == name


def _load_of(e, param, index: int | None = None):
    """The load of ``param`` that ``e`` (or ``float32(e)``) is, at constant ``index`` when given, else None."""
    if isinstance(e, tirx.Cast) and str(e.ty) == "float32":
        e = e.value
    if not isinstance(e, tvm.ir.TensorLoad) or not e.source.same_as(param):
        return None
    if index is not None and not (len(e.indices) == 1 and isinstance(e.indices[0], tirx.IntImm)
                                  and int(e.indices[0].value) == index):
        return None
    return e


def _is_fmaf(e) -> bool:
    return _is_call(e, "tirx.call_pure_extern") and len(e.args) == 4 and str(e.args[0].value) == "fmaf"


def _add(func: tirx.PrimFunc) -> Replaced | None:
    """QLinearAdd ``int8(round(max(min(fmaf(a, p[0], fmaf(b, p[1], p[2])), 127), -128)))`` of two same-shape
    tensors (no broadcast) as one call of the vector-FMA micro-kernel, or None for any other form."""
    if (func.attrs or {}).get("edgetune.kernel") != "add" or len(func.params) != 4:
        return None
    params, y = func.params[:3], func.params[3]
    types = [v.ty for v in func.params]
    if (tuple(str(t.dtype) for t in types) != ("float32", "int8", "int8", "int8") or buffer_shape(types[0]) != (3,)
            or not buffer_shape(types[1]) == buffer_shape(types[2]) == buffer_shape(types[3])):
        return None
    try:
        sch = Schedule(func)
        store = sch.get(sch.get_sblock("out")).body
    except (ValueError, RuntimeError, AttributeError):
        return None
    v = store.value
    if not (isinstance(v, tirx.Cast) and str(v.ty) == "int8" and _is_call(v.value, "tirx.round")):
        return None
    clamp = v.value.args[0]
    if not (isinstance(clamp, tirx.Max) and isinstance(clamp.a, tirx.Min) and _const_is(clamp.b, -128.0)
            and _const_is(clamp.a.b, 127.0) and _is_fmaf(clamp.a.a) and _is_fmaf(clamp.a.a.args[3])):
        return None
    outer = clamp.a.a
    inner = outer.args[3]
    p = params[0]
    if any(_load_of(e, p, k) is None for e, k in ((outer.args[2], 0), (inner.args[2], 1), (inner.args[3], 2))):
        return None
    operands = []
    for e in (outer.args[1], inner.args[1]):
        found = [q for q in params[1:] if _load_of(e, q) is not None]
        if len(found) != 1:
            return None
        ld = _load_of(e, found[0])
        for k, (i, o) in enumerate(zip(ld.indices, store.indices)):  # elementwise: the output's own index
            broadcast = isinstance(i, tirx.IntImm) and int(i.value) == 0 and buffer_shape(types[3])[k] == 1
            if not (i.same_as(o) or broadcast):
                return None
        operands.append(found[0])
    call = tirx.call_extern("int32", ADD, *(tirx.op.buffer_data(q) for q in (p, *operands, y)),
                            int(np.prod(buffer_shape(types[3]))))
    return Replaced(_calling(func, call), f"elementwise: x86 micro-kernel {ADD} (vector FMAs)")


def _const_is(e, value: float) -> bool:
    return isinstance(e, (tirx.FloatImm, tirx.IntImm)) and float(e.value) == value


def _data(func: tirx.PrimFunc) -> list:
    return [tirx.op.buffer_data(p) for p in func.params]


def _calling(func: tirx.PrimFunc, call) -> tirx.PrimFunc:
    return tirx.PrimFunc(func.params, tirx.Evaluate(call), func.ret_type, attrs=func.attrs)


def replacement(func: tirx.PrimFunc) -> Replaced | None:
    """The micro-kernel call that replaces ``func``, or None when none covers it exactly."""
    return _pointwise(func) or _conv(func) or (_depthwise(func) if ROUTE_DEPTHWISE else None) or _add(func)


@dataclass(frozen=True)
class HostKernels:
    """The lowered module, plan and constants with the micro-kernels routed in; ``replaced``: kernel -> how."""

    module: tvm.IRModule
    plan: StaticPlan
    constants: dict[str, np.ndarray]
    replaced: dict[str, str]


def blocked(w: np.ndarray) -> np.ndarray:
    """[O, K] weights (K % 4 == 0) in the layout the micro-kernels' register tiles read (``et_x86_widx``):
    output channels in blocks of 16, then 8, then 4, then 1, each block [K / 4][channels][4], flattened."""
    cout, k = w.shape
    parts, start = [], 0
    for size in (16, 8, 4):
        end = start + (cout - start) // size * size
        parts += [w[o:o + size].reshape(size, k // 4, 4).transpose(1, 0, 2).ravel() for o in range(start, end, size)]
        start = end
    parts.append(w[start:].ravel())
    return np.concatenate(parts)


def _packed(w: np.ndarray, b: np.ndarray, r: Replaced) -> tuple[np.ndarray, np.ndarray]:
    """The weights in [O, H, W, I] order, blocked when ``r.blocked`` (stored in the original shape: the same
    bytes count), and the bias minus 128 * the sum of its output channel's weights (int32, wrapping as the
    kernels' sums do)."""
    ohwi = np.ascontiguousarray(w.transpose(r.weight_order))
    rows = ohwi.reshape(ohwi.shape[0], -1)
    sums = rows.astype(np.int64).sum(axis=1)
    packed = blocked(rows) if r.blocked else rows.ravel()
    return packed.reshape(w.shape), (b.astype(np.int64) - 128 * sums).astype(np.int32)


def route(lowered: tvm.IRModule, plan: StaticPlan, constants: dict[str, np.ndarray]) -> HostKernels:
    """Replace every kernel of ``plan`` a host micro-kernel covers by a call of it, and rewrite the
    replaced convolutions' weight and bias constants offline (new dict; ``constants`` is not changed).

    A conv kernel whose weight or bias constant another call also reads keeps TVM's code (its
    constants are rewritten for exactly one reader)."""
    readers: dict[str, int] = {}
    for call in plan.calls:
        for a in call.args:
            readers[a] = readers.get(a, 0) + 1
    candidates = {k.name: r for k in plan.kernels if (r := replacement(lowered[k.name])) is not None}
    for call in plan.calls:
        r = candidates.get(call.kernel)
        if r is not None and r.weight_order is not None and not all(
                a in constants and readers[a] == 1 for a in call.args[1:3]):
            del candidates[call.kernel]
    new_constants = dict(constants)
    for call in plan.calls:
        r = candidates.get(call.kernel)
        if r is not None and r.weight_order is not None:
            w, b = call.args[1:3]
            new_constants[w], new_constants[b] = _packed(constants[w], constants[b], r)
    module = tvm.IRModule(dict(lowered.functions.items()), attrs=lowered.attrs)
    for name, r in candidates.items():
        module[name] = r.func.with_attr("edgetune.schedule", r.how)
    kernels = tuple(replace(k, schedule=candidates[k.name].how) if k.name in candidates else k for k in plan.kernels)
    return HostKernels(module, replace(plan, kernels=kernels), new_constants,
                       {name: r.how for name, r in candidates.items()})
