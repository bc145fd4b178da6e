"""int8 lookup tables: an elementwise float function of one int8 tensor as 256 int8 entries.

onnxruntime computes QLinearSigmoid and QLinearLeakyRelu with a 256-entry table built from the
input and output quantisation (``QlinearBuildLookupTable``: dequantize every int8 value, apply the
float function, ``MlasQuantizeLinear``), and it runs HardSigmoid, HardSwish and other elementwise
ops it leaves in float as DequantizeLinear -> float op -> QuantizeLinear, which is a function of the
int8 input alone. Either way a table built at compile time from the same float32 steps equals its
result on every element, as the field's int8 runtimes (TFLite, CMSIS-NN) do it for their
activations. The table is evaluated here in numpy, step by step in float32 the way onnxruntime's
kernels round; ``FLOAT_OPS`` lists the Relax ops whose float32 semantics are reproduced (IEEE
arithmetic, clamps, MLAS' rational logistic, MLAS' erf as its x86-64 FMA3 kernel computes it);
anything else (exp, tanh: library approximations that differ per platform) is not tabulated and
stays a float island.
"""
from __future__ import annotations

from fractions import Fraction
from typing import Callable

import numpy as np

F32 = np.float32
QMIN, QMAX = -128, 127

# MLAS' logistic (logistic.cpp, the coefficients of Eigen's rational approximation)
_LOGISTIC_RANGE = F32(18.0)
_ALPHA = tuple(F32(v) for v in (4.37031012579801e-11, 1.15627324459942e-07, 6.08574864600143e-05,
                                8.51377133304701e-03, 2.48287947061529e-01))
_BETA = tuple(F32(v) for v in (6.10247389755681e-13, 5.76102136993427e-09, 6.29106785017040e-06,
                               1.70198817374094e-03, 1.16817656904453e-01, 9.93151921023180e-01))


def _round_f32(exact: Fraction) -> F32:
    """``exact`` rounded once to float32 (nearest, ties to even): no double rounding through float64."""
    f = F32(float(exact))
    lo = np.nextafter(f, F32(-np.inf)) if Fraction(float(f)) > exact else f
    hi = np.nextafter(lo, F32(np.inf))
    below, above = exact - Fraction(float(lo)), Fraction(float(hi)) - exact
    if below != above:
        return lo if below < above else hi
    return lo if int(lo.view(np.int32)) % 2 == 0 else hi


def fma32(a: F32, b: F32, c: F32) -> F32:
    """float32 fused multiply-add (one rounding), as FMA3 / NEON ``vfmaq_f32`` compute it."""
    return _round_f32(Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c)))


def logistic(x: np.ndarray) -> np.ndarray:
    """MLAS' logistic in float32: clamp to [-18, 18], odd/even rational polynomial with fused
    multiply-adds (the kernel x86 FMA3 and aarch64 run), + 0.5, clamp to [0, 1]."""
    out = np.empty(x.shape, F32)
    for i, v in enumerate(np.clip(x.astype(F32), -_LOGISTIC_RANGE, _LOGISTIC_RANGE).ravel()):
        v2 = F32(v * v)
        p = fma32(v2, _ALPHA[0], _ALPHA[1])
        for a in _ALPHA[2:]:
            p = fma32(p, v2, a)
        p = F32(p * v)
        q = fma32(v2, _BETA[0], _BETA[1])
        for b in _BETA[2:]:
            q = fma32(q, v2, b)
        out.flat[i] = min(max(F32(F32(p / q) + F32(0.5)), F32(0.0)), F32(1.0))
    return out


# MLAS' erf (erf.cpp's constants; the polynomial of a faithfully rounded erff): |x| < 0.921875 an odd
# polynomial in x^2, above it 1 - exp(-p(|x|)) with MLAS' own exp (range reduction by log 2, degree-6
# polynomial, scaling by 2^n). erf.cpp clamps |x| to 3.725 in its generic kernel; the x86-64 kernel of
# onnxruntime 1.32 does not (no clamp agrees with it bit for bit on 20,000 values in [-12, 12], the clamp
# does not above 3.78), and exp's own lower clamp keeps large |x| finite: erf = +-1 there.
_ERF_SPLIT = F32(0.921875)
_ERF_SMALL = tuple(F32(v) for v in (-5.99104969e-4, 4.99339588e-3, -2.67667342e-2, 1.12818025e-1, -3.76124859e-1,
                                    1.28379151e-1))
_ERF_BIG = tuple(F32(v) for v in (1.72948930e-5, -3.83208680e-4, 3.88393435e-3, -2.42545605e-2, 1.06777847e-1,
                                  6.34846687e-1, 1.28717512e-1))
_EXP_LOWER, _EXP_LOG2E, _EXP_LN2_HI, _EXP_LN2_LO = F32(-88.3762626647949), F32(1.44269504088896341), \
    F32(-6.93145752e-1), F32(-1.42860677e-6)
_EXP_P = tuple(F32(v) for v in (1.38319808e-3, 8.37550033e-3, 4.16689515e-2, 1.66664466e-1, 4.99999851e-1, 1.0,
                                1.0))
_EXP_ROUND = F32(1.25829120e+7)  # 1.5 * 2^23: adding and subtracting it rounds to an integer


def _erf_one(x: F32) -> F32:
    """One value of MLAS' erf, the way its FMA3 kernel (the one onnxruntime runs on x86-64 with AVX2)
    evaluates every lane: both branches, selected by ``|x| >= 0.921875``; every step one float32
    rounding (a fused multiply-add is one)."""
    a = abs(x)
    if a < _ERF_SPLIT:
        s = F32(a * a)
        r = fma32(_ERF_SMALL[0], s, _ERF_SMALL[1])
        for c in _ERF_SMALL[2:]:
            r = fma32(r, s, c)
        r = fma32(r, a, a)
    else:
        r = fma32(_ERF_BIG[0], a, _ERF_BIG[1])
        for c in _ERF_BIG[2:]:
            r = fma32(r, a, c)
        e = max(F32(-fma32(r, a, a)), _EXP_LOWER)
        n = F32(fma32(_EXP_LOG2E, e, _EXP_ROUND) - _EXP_ROUND)
        f = fma32(n, _EXP_LN2_LO, fma32(n, _EXP_LN2_HI, e))
        p = _EXP_P[0]
        for c in _EXP_P[1:]:
            p = fma32(p, f, c)
        r = F32(F32(1.0) - F32(p * F32(2.0) ** int(n)))
    return F32(-r) if np.signbit(x) else r


def erf(x: np.ndarray) -> np.ndarray:
    """MLAS' erf in float32 (``MlasErfKernelFma3``), elementwise."""
    x = np.asarray(x, F32)
    return np.array([_erf_one(v) for v in x.ravel()], F32).reshape(x.shape)


def _f(fn: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
    return lambda *args: np.asarray(fn(*(np.asarray(a, F32) for a in args)), F32)


# Relax op -> its float32 semantics (numpy float32 arithmetic is IEEE single precision, unfused)
FLOAT_OPS: dict[str, Callable[..., np.ndarray]] = {
    "relax.add": _f(np.add),
    "relax.subtract": _f(np.subtract),
    "relax.multiply": _f(np.multiply),
    "relax.divide": _f(np.divide),
    "relax.maximum": _f(np.maximum),
    "relax.minimum": _f(np.minimum),
    "relax.negative": _f(np.negative),
    "relax.nn.relu": _f(lambda x: np.maximum(x, F32(0.0))),
    "relax.sigmoid": _f(logistic),
    "relax.erf": _f(erf),
}


def leaky_relu(alpha: float) -> Callable[[np.ndarray], np.ndarray]:
    """onnxruntime's LeakyRelu: ``x >= 0 ? x : x * alpha`` in float32."""
    return _f(lambda x: np.where(x >= 0, x, x * F32(alpha)))


def clip(lo: float, hi: float) -> Callable[[np.ndarray], np.ndarray]:
    return _f(lambda x: np.minimum(np.maximum(x, F32(lo)), F32(hi)))


def dequantized_inputs(scale: float, zp: int) -> np.ndarray:
    """DequantizeLinear of every int8 value -128..127 in float32: ``fl32(float(q - z) * s)``."""
    return (np.arange(QMIN, QMAX + 1, dtype=np.int32) - zp).astype(F32) * F32(scale)


def quantize(values: np.ndarray, scale: float, zp: int) -> np.ndarray:
    """MlasQuantizeLinear: ``sat8(rne(x / s) + z)`` with a true float32 division."""
    return np.clip(np.rint((values.astype(F32) / F32(scale)).astype(F32)) + zp, QMIN, QMAX).astype(np.int8)


def lookup_table(outputs: np.ndarray, scale: float, zp: int) -> np.ndarray:
    """The int8 table of float outputs for the inputs of ``dequantized_inputs`` (entry ``q + 128``).

    Raises:
        ValueError: ``outputs`` is not 256 finite values.
    """
    values = np.asarray(outputs, F32).reshape(-1)
    if values.size != QMAX - QMIN + 1 or not np.all(np.isfinite(values)):
        raise ValueError(f"a lookup table needs 256 finite values (got {values.size})")
    return quantize(values, scale, zp)


FLT_MAX = F32(np.finfo(np.float32).max)


def softmax_exp_table(x_scale: float, reduce_len: int) -> np.ndarray:
    """QLinearSoftmax's float32 ``exp`` table (``QlinearBuildLookupTableUint32``, int8 input), indexed by
    ``d = max - x`` (0..255): ``exp((-d + shift) * sx)`` in double with ``shift = max(0, log(FLT_MAX /
    D) - 5) / sx`` (headroom so a row of D values sums below FLT_MAX), rounded to float32.
    ``math.exp`` is the C library's, the one onnxruntime calls."""
    import math

    sx = float(F32(x_scale))
    shift = max(0.0, math.log(float(F32(FLT_MAX / F32(reduce_len)))) - 5.0) / sx
    # onnxruntime's entry i (i = 255 - d) is exp((double(i) - 255 + shift) * sx), evaluated left to right
    return np.array([F32(math.exp(((float(255 - d) - 255.0) + shift) * sx)) for d in range(256)], F32)


def softmax_output_scale(y_scale: float) -> F32:
    """QLinearSoftmax's output multiplier ``floorf(1.0f / y_scale)``."""
    return F32(np.floor(F32(1.0) / F32(y_scale)))
