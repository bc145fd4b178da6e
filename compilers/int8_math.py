"""Integer arithmetic of the int8 backbone, written to reproduce onnxruntime's CPU kernels bit for bit.

onnxruntime (x86, ``session.qdqisint8allowed=1``, the configuration that runs a QDQ graph as
true int8 kernels — the default on ARM) evaluates every quantised op as exact integer work
followed by a float32 requantisation. The formulas here are the ones its kernels use; the
tests compare every op against onnxruntime on random inputs:

* conv / matmul / gemm (QLinearConv, QLinearMatMul, QGemm -> MlasRequantizeOutput):
  ``acc = sum((x - zx) * w) + bias`` in int32, then
  ``y = sat8(round_half_even(float32(acc) * S) + zy)`` with ``S = fl32(fl32(sx * sw) / sy)``.
* global average pooling (QLinearGlobalAveragePool): ``acc = sum(x) - zx * n`` and the same
  requantisation with ``S = fl32(sx / fl32(sy * n))``.
* residual add (QLinearAdd, AVX2 kernel): two fused multiply-adds in float32,
  ``y = sat8(rne(fma(a, sa/sc, fma(b, sb/sc, F))))`` with ``F = zc - (sa/sc * za + sb/sc * zb)``.
  A float32 FMA of an int8 value is reproduced exactly as float64 arithmetic rounded once
  to float32 (``add_is_exact`` checks the operands fit in 53 bits), so no target needs FMA.
* multiply (QLinearMul, SSE2 / NEON kernels): ``p = (a - za) * (b - zb)`` in int32, then
  ``y = sat8(rne(fl32(fl32(float(p) * r) + zc)))`` with ``r = fl32(fl32(sa * sb) / sc)``.
* what onnxruntime computes through float (input QuantizeLinear, average pooling,
  requantising reshapes and concats, output DequantizeLinear) uses the same float32 steps.

``fixed_point=True`` selects integer-only requantisation instead (int32 multiplier, right
shift, round half up, as CMSIS-NN / TFLite do): no float unit needed, but results differ
from onnxruntime by one step wherever the float32 product lands near a rounding tie.

Every function returns a TIR scalar expression, so the formulas live in one place and the
TE kernels (``int8_kernels``) inline them into their loops. Non-integer parameters (scales,
ratios) should be passed as expressions loaded from constant tensors, not Python floats:
TVM's C codegen prints float immediates with 7 significant digits, which changes them.
"""
from __future__ import annotations

from typing import TypeAlias

import numpy as np
from tvm import tirx
from tvm.ir.expr import Expr as PrimExpr

F32 = np.float32
QMIN, QMAX = -128, 127


def requant_scale(sx: np.ndarray | float, sw: np.ndarray | float, sy: np.ndarray | float) -> np.ndarray:
    """onnxruntime's output scale ``fl32(fl32(sx * sw) / sy)`` (per output channel when ``sw`` is)."""
    return ((np.asarray(sx, F32) * np.asarray(sw, F32)).astype(F32) / np.asarray(sy, F32)).astype(F32)


def fixed_point_params(scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float multiplier(s) ``M`` -> (Q31 mantissa ``m0``, right shift ``s``) with ``M ~= m0 * 2**-s``."""
    mant, exp = np.frexp(np.asarray(scale, np.float64))
    m0 = np.round(mant * (1 << 31)).astype(np.int64)
    carry = m0 == (1 << 31)
    m0[carry] //= 2
    exp[carry] += 1
    return m0, (31 - exp).astype(np.int64)


def add_params(sa: float, za: int, sb: float, zb: int, sc: float, zc: int) -> tuple[F32, F32, F32]:
    """(sa/sc, sb/sc, F) in float32, ``F = zc - (ra * za + rb * zb)`` as onnxruntime evaluates it."""
    ra, rb = F32(F32(sa) / F32(sc)), F32(F32(sb) / F32(sc))
    fixed = F32(F32(zc) - F32(F32(ra * F32(za)) + F32(rb * F32(zb))))
    return ra, rb, fixed


def mul_ratio(sa: float, sb: float, sc: float) -> F32:
    """QLinearMul's ``ScaleA * ScaleB / ScaleC`` in float32 (left to right, as C evaluates it)."""
    return F32(F32(F32(sa) * F32(sb)) / F32(sc))


def mul_fits(ratio: F32, za: int, zb: int, zc: int) -> bool:
    """Whether every ``p * ratio + zc`` of int8 operands stays inside int32 (onnxruntime's float -> int32
    conversion returns INT_MIN beyond it, a value no kernel here reproduces)."""
    widest = (128 + abs(za)) * (128 + abs(zb))
    return widest * abs(float(ratio)) + abs(zc) + 1 < 2.0 ** 31


def add_is_exact(ra: F32, rb: F32, fixed: F32) -> bool:
    """Whether every ``a * ra + b * rb + F`` (int8 a, b) is exact in float64 (53-bit significand)."""
    terms = [abs(float(v)) for v in (ra, rb, fixed) if v != 0]
    if not terms:
        return True
    lsb = min(float(np.spacing(F32(t))) for t in terms)
    top = 128 * abs(float(ra)) + 128 * abs(float(rb)) + abs(float(fixed)) + 1
    return np.log2(top) - np.log2(lsb) < 52


Scalar: TypeAlias = "PrimExpr | float"


def _f32(value: Scalar) -> PrimExpr:
    if isinstance(value, (int, float, np.floating, np.integer)):
        return tirx.const(F32(value), "float32")
    return value


def _int8_from_float(f: PrimExpr, zp: int) -> PrimExpr:
    """float32 -> int8 as MLAS does: clamp to the zero-point-shifted range, round half to even, add zp.

    Clamping before rounding equals saturating after it (the bounds are integers) and keeps
    the float -> int conversion defined for any input.
    """
    f = tirx.max(tirx.min(f, _f32(QMAX - zp)), _f32(QMIN - zp))
    # tirx.round lowers to llvm.nearbyint / C nearbyintf: round half to even in the default FP
    # environment (tested on ties); unlike tirx.nearbyint, TVM can vectorise it
    r = tirx.round(f)
    if zp:
        r = r + _f32(zp)  # exact: small integers
    return r.astype("int8")


def requantize(acc: PrimExpr, scale: Scalar, zp: int) -> PrimExpr:
    """int32 accumulator -> int8: ``sat8(rne(float32(acc) * scale) + zp)`` (MlasRequantizeOutput)."""
    return _int8_from_float(acc.astype("float32") * _f32(scale), zp)


def requantize_fixed_point(acc: PrimExpr, multiplier: PrimExpr, shift: PrimExpr,
                           zp: int) -> PrimExpr:
    """int32 accumulator -> int8 with integers only: ``((acc * m0 + 2**(s-1)) >> s) + zp``, saturated.

    ``multiplier`` and ``shift`` are int64 expressions (``fixed_point_params``).
    """
    one = tirx.const(1, "int64")
    a = acc.astype("int64") * multiplier + tirx.shift_left(one, shift - one)
    a = tirx.shift_right(a, shift) + tirx.const(zp, "int64")
    return tirx.max(tirx.min(a, tirx.const(QMAX, "int64")), tirx.const(QMIN, "int64")).astype("int8")


def quantize(x: PrimExpr, scale: Scalar, zp: int) -> PrimExpr:
    """QuantizeLinear of a float32 value: ``sat8(rne(x / s) + z)`` (a true division, as MLAS does)."""
    return _int8_from_float(x / _f32(scale), zp)


def dequantize(q: PrimExpr, scale: Scalar, zp: int) -> PrimExpr:
    """DequantizeLinear: ``fl32(float(q - z) * s)`` — the float boundary of the int8 graph."""
    return (q.astype("int32") - tirx.const(zp, "int32")).astype("float32") * _f32(scale)


def rescale(q: PrimExpr, s_in: Scalar, z_in: int, s_out: Scalar, z_out: int) -> PrimExpr:
    """int8 -> int8 through float, as an unfused DequantizeLinear -> QuantizeLinear pair computes it."""
    return quantize(dequantize(q, s_in, z_in), s_out, z_out)


def clip_float(q: PrimExpr, s_in: Scalar, z_in: int, lo: Scalar | None, hi: Scalar | None, s_out: Scalar,
               z_out: int) -> PrimExpr:
    """DequantizeLinear -> Clip/Relu -> QuantizeLinear in float32; ``None`` bounds are open."""
    d = dequantize(q, s_in, z_in)
    if lo is not None:
        d = tirx.max(d, _f32(lo))
    if hi is not None:
        d = tirx.min(d, _f32(hi))
    return quantize(d, s_out, z_out)


def _fma32(a: PrimExpr, b: Scalar, c: PrimExpr) -> PrimExpr:
    """float32 ``fmaf(float(a), b, c)`` for an int8 ``a`` (one rounding). A call to C's ``fmaf``:
    one instruction where the FPU fuses (Cortex-M4F, aarch64), correctly rounded everywhere; the
    same value as the float64 arithmetic ``add_is_exact`` reasons about, without software doubles
    on single-precision microcontrollers."""
    return tirx.call_pure_extern("float32", "fmaf", a.astype("float32"), _f32(b), c)


def add(a: PrimExpr, b: PrimExpr, ra: Scalar, rb: Scalar, fixed: Scalar) -> PrimExpr:
    """QLinearAdd of two int8 values with ``add_params`` (onnxruntime's AVX2 kernel, bit for bit)."""
    t = _fma32(b, rb, _f32(fixed))
    r = _fma32(a, ra, t)
    return _int8_from_float(r, 0)


def mul(a: PrimExpr, b: PrimExpr, za: int, zb: int, ratio: Scalar, zero: Scalar, zc: int) -> PrimExpr:
    """QLinearMul of two int8 values with ``mul_ratio`` (onnxruntime's SSE2 / NEON kernels, bit for bit).

    The product is rounded once to float32 by ``fmaf(p, ratio, zero)`` with ``zero`` = 0 loaded from
    the params tensor: a plain multiply would be contracted with the ``+ zc`` that follows into one
    fused multiply-add by TVM's LLVM backend (measured: 62 of 4096 results differ on x86), and
    onnxruntime rounds twice. The sign of a zero product is irrelevant: ``zc`` is added next.
    """
    p = (a.astype("int32") - tirx.const(za, "int32")) * (b.astype("int32") - tirx.const(zb, "int32"))
    x = tirx.call_pure_extern("float32", "fmaf", p.astype("float32"), _f32(ratio), _f32(zero))
    return _int8_from_float(x + _f32(float(zc)), 0)


def average_to_int8(mean: PrimExpr, scale: Scalar, zp: int) -> PrimExpr:
    """QLinearAveragePool's output step: ``sat8(rne(fl32(mean / s) + z))`` (zp added before rounding)."""
    f = mean / _f32(scale) + _f32(zp)
    return tirx.round(tirx.max(tirx.min(f, _f32(QMAX)), _f32(QMIN))).astype("int8")
