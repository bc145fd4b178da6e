"""Hand-written DSP micro-kernels (``targets/runtime/et_kernels_dsp.h``) for the int8 convolutions of
Cortex-M cores with the DSP extension: dual 16-bit MACs (SMLAD) on sign-extended byte pairs.

TVM 0.27 has no Cortex-M DSP tensor intrinsics, so a kernel the micro-kernel covers is replaced, after
scheduling, by one ``call_extern`` of it with the kernel's own buffers and its output zero point (read
off the scheduled epilogue). Only kernels whose TIR has exactly the shape the micro-kernel computes
are replaced (float requantisation, no fused residual, tile-divisible shapes); every other kernel keeps
TVM's code. Applied to every C-source target: one ``et_kernels.c`` serves all the targets of a bundle
(``compile_model`` generates it for a generic C target), so the choice is the C compiler's: the header
uses SMLAD where the target's ``-mcpu`` (its JSON's ``toolchain.arch_flags``) defines
``__ARM_FEATURE_DSP`` (Cortex-M4, M7, M33, M55) and the same loops in plain C elsewhere (host, aarch64
``KERNELS=c``), with identical results.

Replaced: pointwise (1x1, stride 1, unpadded) convolutions, 3x3 depthwise and regular 3x3 convolutions
(the stem too) padded by one at the top and left with the input zero point, stride 1 or 2; and norm-align's
aligned pointwise and 3x3 depthwise convolutions (``int8_kernels.qconv2d(moments=True)``: run-time scale and
accumulator offset in, the unaligned accumulator's per-channel int64 sum and sum of squares out). Under Helium
(``__ARM_FEATURE_MVE``, Cortex-M55) the same header runs MVE code instead of SMLAD.
"""
from __future__ import annotations

import tvm
from tvm import tirx

DSP_ATTR = "edgetune.dsp"
HEADER = "et_kernels_dsp.h"
POINTWISE = "et_dsp_pointwise_s8"
POINTWISE_MOMENTS = "et_dsp_pointwise_moments_s8"  # norm-align's aligned 1x1 convs: offset in, statistics out
MAX_CIN = 256  # ET_DSP_MAX_CIN of the header
DEPTHWISE = "et_dsp_depthwise3x3_s8"
DEPTHWISE_MOMENTS = "et_dsp_depthwise3x3_moments_s8"  # norm-align's aligned depthwise convs
MAX_PLANE = 4096  # ET_DSP_MAX_PLANE of the header
CONV = "et_dsp_conv3x3_s8"
CONV_IHWO = "et_dsp_conv3x3_ihwo_s8"
MAX_K = 1152  # ET_DSP_MAX_K of the header


def buffer_shape(buf) -> tuple[int, ...]:
    return tuple(int(d) for d in buf.shape)


def _const(e) -> float | None:
    return float(e.value) if isinstance(e, (tirx.FloatImm, tirx.IntImm)) else None


def output_zero_point(func: tirx.PrimFunc) -> int | None:
    """The output zero point of a float-requantised conv epilogue
    ``int8(round(max(min(float(acc + bias) * scale, 127 - zy), -128 - zy)) [+ zy])``, or None when the
    epilogue has any other form (fixed point, a fused add, ...)."""
    from tvm.s_tir import Schedule
    sch = Schedule(func)
    try:
        store = sch.get(sch.get_sblock("out")).body
    except (ValueError, RuntimeError):
        return None
    value = store.value
    if not isinstance(value, tirx.Cast) or str(value.ty) != "int8":
        return None
    inner, zy = value.value, 0.0
    if isinstance(inner, tirx.Add) and _const(inner.b) is not None:
        inner, zy = inner.a, _const(inner.b)
    if not isinstance(inner, tvm.ir.expr.Call) or len(inner.args) != 1:
        return None
    clamp = inner.args[0]
    if not (isinstance(clamp, tirx.Max) and isinstance(clamp.a, tirx.Min)):
        return None
    lo, hi = _const(clamp.b), _const(clamp.a.b)
    if lo is None or hi is None or hi != 127 - zy or lo != -128 - zy:
        return None
    product = clamp.a.a
    if not (isinstance(product, tirx.Mul) and isinstance(product.a, tirx.Cast)
            and isinstance(product.a.value, tirx.Add)):
        return None
    return int(zy)


def _pointwise_call(func: tirx.PrimFunc) -> tirx.PrimFunc | None:
    """The pointwise conv ``func`` as one call of the DSP micro-kernel, or None if it is not one it covers."""
    attrs = func.attrs or {}
    if attrs.get("edgetune.kernel") != "qconv2d" or not str(attrs.get("edgetune.schedule", "")).startswith(
            "pointwise conv"):
        return None
    if len(func.params) != 5:
        return None  # (x, w, bias, scale, out): float requantisation only
    x, w, b, s, y = (p.ty for p in func.params)  # buffer parameters carry their buffer type
    dtypes = tuple(str(t.dtype) for t in (x, w, b, s, y))
    if dtypes != ("int8", "int8", "int32", "float32", "int8"):
        return None
    (n, cin, h, wd), (cout, cpg, kh, kw) = buffer_shape(x), buffer_shape(w)
    if n != 1 or cpg != cin or (kh, kw) != (1, 1) or buffer_shape(y) != (1, cout, h, wd):
        return None
    if cout % 2 or (h * wd) % 4 or cin % 4 or cin > MAX_CIN:
        return None  # the micro-kernel's tiles must divide the layer; its input slice lives on the stack
    zy = output_zero_point(func)
    if zy is None:
        return None
    data = [tirx.op.buffer_data(p) for p in func.params]
    call = tirx.call_extern("int32", POINTWISE, *data, cin, h * wd, cout, zy)
    out = tirx.PrimFunc(func.params, tirx.Evaluate(call), func.ret_type, attrs=func.attrs)
    how = f"pointwise conv: DSP micro-kernel {POINTWISE} (channels-last 4px slice, 2oc x 2px SMLAD tile)"
    return out.with_attr("edgetune.schedule", how)


def _pointwise_moments_call(func: tirx.PrimFunc) -> tirx.PrimFunc | None:
    """norm-align's aligned pointwise conv ``func`` (x, w, bias, scale, offset -> out, sum, sumsq) as one call of
    the DSP micro-kernel that also returns the statistics, or None if it is not one it covers."""
    attrs = func.attrs or {}
    if attrs.get("edgetune.kernel") != "qconv2d" or len(func.params) != 8 or not str(
            attrs.get("edgetune.schedule", "")).startswith("pointwise conv"):
        return None
    x, w, b, s, off, y, total, squares = (p.ty for p in func.params)
    dtypes = tuple(str(t.dtype) for t in (x, w, b, s, off, y, total, squares))
    if dtypes != ("int8", "int8", "int32", "float32", "float32", "int8", "int64", "int64"):
        return None
    (n, cin, h, wd), (cout, cpg, kh, kw) = buffer_shape(x), buffer_shape(w)
    if n != 1 or cpg != cin or (kh, kw) != (1, 1) or buffer_shape(y) != (1, cout, h, wd):
        return None
    if buffer_shape(total) != (1, cout) or buffer_shape(squares) != (1, cout) or buffer_shape(off) != (cout,):
        return None
    if cout % 2 or (h * wd) % 4 or cin % 4 or cin > MAX_CIN:
        return None
    zy = output_zero_point(func)
    if zy is None:
        return None
    data = [tirx.op.buffer_data(p) for p in func.params]
    call = tirx.call_extern("int32", POINTWISE_MOMENTS, *data, cin, h * wd, cout, zy)
    out = tirx.PrimFunc(func.params, tirx.Evaluate(call), func.ret_type, attrs=func.attrs)
    how = f"pointwise conv: DSP micro-kernel {POINTWISE_MOMENTS} (2oc x 4px SMLAD tile, int64 moments per tile)"
    return out.with_attr("edgetune.schedule", how)


def _pad_value(func: tirx.PrimFunc) -> int | None:
    """The input zero point a conv's ``pad`` block fills with, when the block pads one row and one column at
    the top and left (reads ``x[..., yy - 1, ... - 1]``); None for any other padding."""
    from tvm.s_tir import Schedule
    sch = Schedule(func)
    try:
        value = sch.get(sch.get_sblock("pad")).body.value
    except (ValueError, RuntimeError, AttributeError):
        return None
    if not (isinstance(value, tvm.ir.expr.Call) and len(value.args) == 3 and isinstance(value.args[2], tirx.IntImm)):
        return None
    load = value.args[1]
    if not isinstance(load, tvm.ir.TensorLoad) or len(load.indices) != 4:
        return None
    for index in load.indices[2:]:  # row, column: "... - 1"
        if not (isinstance(index, tirx.Sub) and isinstance(index.b, tirx.IntImm) and int(index.b.value) == 1):
            return None
    return int(value.args[2].value)


def _stride(size: int, out: int) -> int | None:
    """The stride of a 3x3 conv padded by 1 at the start and 0 or 1 at the end, from its input and output size."""
    for s in (1, 2):
        if out in {(size + pad - 2) // s + 1 for pad in (0, 1)}:
            return s
    return None


def _depthwise_call(func: tirx.PrimFunc) -> tirx.PrimFunc | None:
    """The 3x3 depthwise conv ``func`` as one call of the DSP micro-kernel, or None if it is not one it covers;
    norm-align's aligned one (x, w, bias, scale, offset -> out, sum, sumsq) as a call of the kernel that also
    returns the statistics."""
    attrs = func.attrs or {}
    if attrs.get("edgetune.kernel") != "qconv2d_depthwise" or len(func.params) not in (5, 8):
        return None
    moments = len(func.params) == 8
    x, w, b, s, *rest = (p.ty for p in func.params)
    y = rest[1] if moments else rest[0]
    want = ("int8", "int8", "int32", "float32", "float32", "int8", "int64", "int64") if moments else \
        ("int8", "int8", "int32", "float32", "int8")
    if tuple(str(p.ty.dtype) for p in func.params) != want:
        return None
    (n, ch, h, wd), (cout, cpg, kh, kw) = buffer_shape(x), buffer_shape(w)
    if n != 1 or cout != ch or cpg != 1 or (kh, kw) != (3, 3) or len(buffer_shape(y)) != 4 or min(h, wd) < 4:
        return None
    _, _, oh, ow = buffer_shape(y)
    stride = _stride(h, oh)
    if stride is None or stride != _stride(wd, ow):
        return None
    pitch = ((((ow + 3) // 4) * 4 - 1) * stride + 6) & ~3  # et_dw_row of the header
    if ((oh - 1) * stride + 3) * pitch > MAX_PLANE:
        return None
    zx, zy = _pad_value(func), output_zero_point(func)
    if zx is None or zy is None:
        return None
    if moments and any(buffer_shape(rest[k]) != shape for k, shape in ((0, (ch,)), (2, (1, ch)), (3, (1, ch)))):
        return None
    data = [tirx.op.buffer_data(p) for p in func.params]
    name = DEPTHWISE_MOMENTS if moments else DEPTHWISE
    call = tirx.call_extern("int32", name, *data, ch, h, wd, oh, ow, stride, zx, zy)
    out = tirx.PrimFunc(func.params, tirx.Evaluate(call), func.ret_type, attrs=func.attrs)
    how = f"depthwise conv: DSP micro-kernel {name} (padded plane per channel, requantised per row)"
    return out.with_attr("edgetune.schedule", how)


def _conv_call(func: tirx.PrimFunc) -> tirx.PrimFunc | None:
    """The regular 3x3 conv ``func`` (one group; the stem too) as one call of the im2col micro-kernel, or None.

    TVM's channel-vector convs (``qconv2d_oc``) have IHWO weights: their micro-kernel exists for Helium only,
    so their function calls it and keeps TVM's loops (unrolled here, as ``unroll.py`` would) for a nonzero
    return: ``if (et_dsp_conv3x3_ihwo_s8(...) != 0) { TVM's kernel }``, a constant the C compiler folds."""
    attrs = func.attrs or {}
    kernel = attrs.get("edgetune.kernel")
    if kernel not in ("qconv2d", "qconv2d_oc") or len(func.params) != 5:
        return None
    x, w, b, s, y = (p.ty for p in func.params)
    if tuple(str(t.dtype) for t in (x, w, b, s, y)) != ("int8", "int8", "int32", "float32", "int8"):
        return None
    ihwo = kernel == "qconv2d_oc"
    (n, cin, h, wd), wshape = buffer_shape(x), buffer_shape(w)
    cpg, kh, kw, cout = wshape if ihwo else (wshape[1], wshape[2], wshape[3], wshape[0])
    if n != 1 or cpg != cin or (kh, kw) != (3, 3) or len(buffer_shape(y)) != 4 or min(h, wd) < 4:
        return None
    _, _, oh, ow = buffer_shape(y)
    stride = _stride(h, oh)
    if stride is None or stride != _stride(wd, ow) or cout % 2 or (oh * ow) % 4 or 9 * cin > MAX_K:
        return None
    zx, zy = _pad_value(func), output_zero_point(func)
    if zx is None or zy is None:
        return None
    data = [tirx.op.buffer_data(p) for p in func.params]
    if ihwo:
        return _with_fallback(func, tirx.call_extern("int32", CONV_IHWO, *data, cin, h, wd, cout, oh, ow, stride, zx,
                                                     zy))
    call = tirx.call_extern("int32", CONV, *data, cin, h, wd, cout, oh, ow, stride, zx, zy)
    out = tirx.PrimFunc(func.params, tirx.Evaluate(call), func.ret_type, attrs=func.attrs)
    how = f"direct conv: DSP micro-kernel {CONV} (im2col of 4 pixels, 2oc x 2px SMLAD / 4px x 2oc VMLADAVA tile)"
    return out.with_attr("edgetune.schedule", how)


def _with_fallback(func: tirx.PrimFunc, call) -> tirx.PrimFunc | None:
    """``func`` whose root block runs its own body only when ``call`` returns nonzero (its loops unrolled first)."""
    import tvm.s_tir as st

    from edgetune.compilers.unroll import UNROLL_ATTR, unroll_small_loops
    try:
        func, count = unroll_small_loops(func)
    except (ValueError, RuntimeError):
        return None
    realize = func.body
    if not isinstance(realize, st.SBlockRealize):
        return None
    root = realize.block
    guarded = tirx.IfThenElse(tirx.NE(call, tirx.IntImm("int32", 0)), root.body, None)
    block = st.SBlock(root.iter_vars, root.reads, root.writes, root.name_hint, guarded, root.init,
                      root.alloc_buffers, root.match_buffers, root.annotations)
    out = tirx.PrimFunc(func.params, st.SBlockRealize(realize.iter_values, realize.predicate, block), func.ret_type,
                        attrs=func.attrs)
    how = f"{func.attrs['edgetune.schedule']}; Helium: micro-kernel {CONV_IHWO} (gathered weight rows)"
    return out.with_attr("edgetune.schedule", how).with_attr(UNROLL_ATTR, count)


def dsp_kernels() -> tvm.transform.Pass:
    """Module pass: every kernel a DSP micro-kernel covers becomes a call of it (once; attribute ``DSP_ATTR``)."""

    @tvm.transform.module_pass(opt_level=0, name="edgetune.DspKernels")
    def apply(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        for gv, func in list(mod.functions.items()):
            if not isinstance(func, tirx.PrimFunc) or DSP_ATTR in (func.attrs or {}):
                continue
            replaced = _pointwise_call(func) or _pointwise_moments_call(func) or _depthwise_call(func) or \
                _conv_call(func)
            mod[gv] = (replaced or func).with_attr(DSP_ATTR, replaced is not None)
        return mod

    return apply
