"""TE definitions of the int8 kernels: one kernel per quantised op, like onnxruntime's QLinear* ops.

Each function builds the whole unit (padding with the input zero point, int32 accumulation,
bias, requantisation) as one TE computation, so the unit becomes one PrimFunc whose blocks
have fixed names — ``pad``, ``acc``, ``out`` — that ``schedule`` relies on. The arithmetic
comes from ``int8_math``.

Requantisation parameters arrive as tensors: ``(scale,)`` (float32 per output channel) or,
with ``fixed_point``, ``(multiplier, shift)`` (int64 per output channel). Other non-integer
scalars arrive in a small float32 ``params`` tensor too, never as immediates (see ``int8_math``).
"""
from __future__ import annotations

from tvm import te, tirx

from edgetune.compilers import int8_math as im


def _epilogue(requant: tuple[te.Tensor, ...], zp: int):
    if len(requant) == 2:
        mult, shift = requant
        return lambda acc, ch: im.requantize_fixed_point(acc, mult[ch], shift[ch], zp)
    (scale,) = requant
    return lambda acc, ch: im.requantize(acc, scale[ch], zp)


def qconv2d(x: te.Tensor, w: te.Tensor, bias: te.Tensor, *requant: te.Tensor, strides: tuple[int, int],
            pads: tuple[int, int, int, int], dilation: tuple[int, int], groups: int, zx: int, zy: int,
            channels_last_weight: bool = False, moments: bool = False) -> te.Tensor | list[te.Tensor]:
    """QLinearConv (NCHW activations, OIHW weights, any group count): int8 x int8 -> int32 -> int8.

    With ``channels_last_weight`` the weight arrives as [I, H, W, O] (output channels
    contiguous), for kernels vectorised over output channels (``schedule``).

    With ``moments`` (norm-align) ``requant`` is ``(scale, offset)``, both run-time inputs ([O]
    float32; ``offset`` holds integers, the folded affine's accumulator offset) and the unit returns
    ``[out, sum, sumsq]``: ``out`` requantises ``acc + bias + offset``, and ``sum`` / ``sumsq``
    ([N, O] int64, blocks ``moment_sum`` / ``moment_sumsq``) are the per-channel sum and sum of squares of the
    *unaligned* accumulator ``acc + bias`` over the output positions, read from the same
    accumulator tiles (``schedule`` computes them per tile; no second pass).

    ``bias`` already holds ``B - zx * sum(W)``: padding with ``zx`` makes the raw int8
    products equal ``sum((x - zx) * w) + zx * sum(w)`` everywhere, borders included.

    With a horizontal stride ``sw`` > 1 the padded input is stored phase-split,
    ``pad[n, c, y, x % sw, x // sw]``, so the input pixels of consecutive outputs are
    contiguous and the pixel loop vectorises into plain loads instead of gathers.
    """
    n, c, h, wd = (int(d) for d in x.shape)
    if channels_last_weight:
        cpg, kh, kw, o = (int(d) for d in w.shape)
    else:
        o, cpg, kh, kw = (int(d) for d in w.shape)
    (sh, sw), (dh, dw) = strides, dilation
    top, left, bottom, right = pads
    hp, wp = h + top + bottom, wd + left + right
    oh, ow = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
    opg = o // groups
    rc, ry, rx = te.reduce_axis((0, cpg), "rc"), te.reduce_axis((0, kh), "ry"), te.reduce_axis((0, kw), "rx")

    def padded(nn, cc, yy, xx):
        inside = tirx.all(yy >= top, yy < h + top, xx >= left, xx < wd + left)
        return tirx.if_then_else(inside, x[nn, cc, yy - top, xx - left], tirx.const(zx, x.dtype))

    if sw > 1:
        xp = te.compute((n, c, hp, sw, (wp + sw - 1) // sw),
                        lambda nn, cc, yy, ph, xq: padded(nn, cc, yy, xq * sw + ph), name="pad")
    else:
        xp = te.compute((n, c, hp, wp), padded, name="pad") if any(pads) else x

    def mac(nn, oo, i, j):
        ci = rc if groups == 1 else (oo // opg) * cpg + rc
        yy = i * sh + ry * dh
        if sw > 1:
            value = xp[nn, ci, yy, (rx * dw) % sw, j + (rx * dw) // sw]
        else:
            value = xp[nn, ci, yy, j + rx * dw]
        weight = w[rc, ry, rx, oo] if channels_last_weight else w[oo, rc, ry, rx]
        return te.sum(value.astype("int32") * weight.astype("int32"), axis=[rc, ry, rx])

    acc = te.compute((n, o, oh, ow), mac, name="acc")
    if not moments:
        epi = _epilogue(requant, zy)
        return te.compute((n, o, oh, ow), lambda nn, oo, i, j: epi(acc[nn, oo, i, j] + bias[oo], oo), name="out")
    scale, offset = requant
    epi = _epilogue((scale,), zy)
    out = te.compute((n, o, oh, ow), lambda nn, oo, i, j: epi(acc[nn, oo, i, j] + bias[oo]
                                                              + offset[oo].astype("int32"), oo), name="out")
    return [out, *accumulator_moments(acc, bias)]


def accumulator_moments(acc: te.Tensor, bias: te.Tensor) -> list[te.Tensor]:
    """Per-channel sum and sum of squares ([N, O] int64) of ``acc + bias`` over the output positions.

    int64: a square of an int32 accumulator needs 2 x 31 bits, and the sum over the positions a few
    more; float32 sums would drift past the 1e-5 the statistics are checked to.
    """
    n, o, oh, ow = (int(d) for d in acc.shape)

    def raw(nn, oo, i, j):
        return acc[nn, oo, i, j].astype("int64") + bias[oo].astype("int64")

    ri, rj = te.reduce_axis((0, oh), "si"), te.reduce_axis((0, ow), "sj")
    total = te.compute((n, o), lambda nn, oo: te.sum(raw(nn, oo, ri, rj), axis=[ri, rj]), name="moment_sum")
    qi, qj = te.reduce_axis((0, oh), "qi"), te.reduce_axis((0, ow), "qj")
    squares = te.compute((n, o), lambda nn, oo: te.sum(raw(nn, oo, qi, qj) * raw(nn, oo, qi, qj), axis=[qi, qj]),
                         name="moment_sumsq")
    return [total, squares]


def qmatmul(x: te.Tensor, w: te.Tensor, bias: te.Tensor, *requant: te.Tensor, zy: int) -> te.Tensor:
    """QGemm / QLinearMatMul with a constant [K, N] int8 weight (``bias`` holds ``B - zx * sum_k W``)."""
    m, k = (int(d) for d in x.shape)
    n = int(w.shape[1])
    rk = te.reduce_axis((0, k), "rk")
    acc = te.compute((m, n), lambda i, j: te.sum(x[i, rk].astype("int32") * w[rk, j].astype("int32"), axis=rk),
                     name="acc")
    epi = _epilogue(requant, zy)
    return te.compute((m, n), lambda i, j: epi(acc[i, j] + bias[j], j), name="out")


def qmatmul_act(a: te.Tensor, b: te.Tensor, params: te.Tensor, *, za: int, zb: int, zy: int) -> te.Tensor:
    """QLinearMatMul of two int8 activations: ``sum((a - za) * (b - zb))`` requantised by ``params[0]``."""
    m, k = (int(d) for d in a.shape)
    n = int(b.shape[1])
    rk = te.reduce_axis((0, k), "rk")
    acc = te.compute((m, n), lambda i, j: te.sum((a[i, rk].astype("int32") - za) * (b[rk, j].astype("int32") - zb),
                                                 axis=rk), name="acc")
    return te.compute((m, n), lambda i, j: im.requantize(acc[i, j], params[0], zy), name="out")


def qglobal_pool(x: te.Tensor, params: te.Tensor, *, zx: int, zy: int, keepdims: bool) -> te.Tensor:
    """QLinearGlobalAveragePool over H, W: ``sum(x) - zx * n`` requantised by ``params[0]``."""
    n, c, h, w = (int(d) for d in x.shape)
    ry, rx = te.reduce_axis((0, h), "ry"), te.reduce_axis((0, w), "rx")
    acc = te.compute((n, c), lambda nn, cc: te.sum(x[nn, cc, ry, rx].astype("int32"), axis=[ry, rx]), name="acc")
    shift, scale = zx * h * w, params[0]
    if keepdims:
        return te.compute((n, c, 1, 1), lambda nn, cc, i, j: im.requantize(acc[nn, cc] - shift, scale, zy), name="out")
    return te.compute((n, c), lambda nn, cc: im.requantize(acc[nn, cc] - shift, scale, zy), name="out")


def qavg_pool(x: te.Tensor, table: te.Tensor, params: te.Tensor, *, kernel: tuple[int, int], strides: tuple[int, int],
              pads: tuple[int, int, int, int], out_hw: tuple[int, int], count_include_pad: bool,
              zy: int) -> te.Tensor:
    """QLinearAveragePool: float32 sum of dequantized values row by row, divided, re-quantised.

    Windows are clipped to the image as onnxruntime clips them; the divisor is the kernel
    area with ``count_include_pad``, else the number of values in the clipped window. The
    dequantized values come from ``table`` (``boundary.dequant_table``), never from a multiply
    the compiler could fuse into the sum; ``params[0]`` is the output scale.
    """
    n, c, h, w = (int(d) for d in x.shape)
    (kh, kw), (sh, sw), (top, left, _, _) = kernel, strides, pads
    ry, rx = te.reduce_axis((0, kh), "ry"), te.reduce_axis((0, kw), "rx")

    def window_sum(nn, cc, i, j):
        yy, xx = i * sh - top + ry, j * sw - left + rx
        inside = tirx.all(yy >= 0, yy < h, xx >= 0, xx < w)
        value = table[x[nn, cc, tirx.max(tirx.min(yy, h - 1), 0), tirx.max(tirx.min(xx, w - 1), 0)].astype("int32")
                      + 128]
        return te.sum(tirx.if_then_else(inside, value, tirx.const(0.0, "float32")), axis=[ry, rx])

    total = te.compute((n, c, *out_hw), window_sum, name="acc")

    def divisor(i, j):
        if count_include_pad:
            return tirx.const(float(kh * kw), "float32")
        y0, x0 = i * sh - top, j * sw - left
        rows = tirx.min(y0 + kh, h) - tirx.max(y0, 0)
        cols = tirx.min(x0 + kw, w) - tirx.max(x0, 0)
        return (rows * cols).astype("float32")

    return te.compute((n, c, *out_hw), lambda nn, cc, i, j: im.average_to_int8(total[nn, cc, i, j] / divisor(i, j),
                                                                               params[0], zy), name="out")


def elementwise(fn, params: te.Tensor, *tensors: te.Tensor) -> te.Tensor:
    """``fn(p, *values)`` applied elementwise over same-shaped tensors; ``p`` lists ``params``' values."""
    p = [params[i] for i in range(int(params.shape[0]))]
    return te.compute(tensors[0].shape, lambda *idx: fn(p, *(t[idx] for t in tensors)), name="out")


def qmax_pool(x: te.Tensor, *, kernel: tuple[int, int], strides: tuple[int, int], pads: tuple[int, int, int, int],
              dilation: tuple[int, int], out_hw: tuple[int, int]) -> te.Tensor:
    """MaxPool of int8 NCHW values (exact: the max of dequantized values is the dequantized max).

    Windows are clipped to the image (padding never wins, as MaxPool pads with -inf); ``out_hw``
    comes from the imported op, so ``ceil_mode`` windows that run past the edge are clipped too.
    """
    n, c, h, w = (int(d) for d in x.shape)
    (kh, kw), (sh, sw), (dh, dw), (top, left, _, _) = kernel, strides, dilation, pads
    ry, rx = te.reduce_axis((0, kh), "ry"), te.reduce_axis((0, kw), "rx")
    lowest = tirx.const(-128, x.dtype)

    def window_max(nn, cc, i, j):
        yy, xx = i * sh - top + ry * dh, j * sw - left + rx * dw
        inside = tirx.all(yy >= 0, yy < h, xx >= 0, xx < w)
        value = x[nn, cc, tirx.max(tirx.min(yy, h - 1), 0), tirx.max(tirx.min(xx, w - 1), 0)]
        return te.max(tirx.if_then_else(inside, value, lowest), axis=[ry, rx])

    return te.compute((n, c, *out_hw), window_max, name="out")


def broadcast_binary(fn, params: te.Tensor, a: te.Tensor, b: te.Tensor) -> te.Tensor:
    """``fn(p, a, b)`` with ``b`` broadcast to ``a``'s shape (numpy rules: right-aligned, size-1 axes)."""
    p = [params[i] for i in range(int(params.shape[0]))]
    shape = [int(d) for d in a.shape]
    b_shape = [int(d) for d in b.shape]
    offset = len(shape) - len(b_shape)

    def b_at(idx):
        return b[tuple(0 if d == 1 else idx[offset + k] for k, d in enumerate(b_shape))]

    return te.compute(shape, lambda *idx: fn(p, a[idx], b_at(idx)), name="out")


def pad_int8(x: te.Tensor, *, before: tuple[int, ...], out_shape: tuple[int, ...], value: int) -> te.Tensor:
    """Constant padding of an int8 tensor: ``value`` (already quantised) outside, ``x`` shifted inside."""
    shape = [int(d) for d in x.shape]

    def at(*idx):
        inside = tirx.all(*(tirx.all(i >= b, i < b + n) for i, b, n in zip(idx, before, shape)))
        src = tuple(tirx.max(tirx.min(i - b, n - 1), 0) for i, b, n in zip(idx, before, shape))
        return tirx.if_then_else(inside, x[src], tirx.const(value, x.dtype))

    return te.compute(out_shape, at, name="out")


def lookup_table(x: te.Tensor, table: te.Tensor) -> te.Tensor:
    """An int8 -> int8 lookup: ``table[x + 128]`` (256 entries built at compile time, ``int8_tables``)."""
    return te.compute(x.shape, lambda *idx: table[x[idx].astype("int32") + 128], name="out")


def qbatch_matmul(a: te.Tensor, b: te.Tensor, params: te.Tensor, *, za: int, zb: int, zy: int) -> te.Tensor:
    """QLinearMatMul of two int8 activations ``[..., M, K] x [..., K, N]`` with the same leading (batch)
    dims: ``sum((a - za) * (b - zb))`` per batch, requantised by ``params[0]`` (attention's q.k and p.v)."""
    *lead, m, k = (int(d) for d in a.shape)
    n = int(b.shape[-1])
    rk = te.reduce_axis((0, k), "rk")

    def mac(*idx):
        batch, i, j = idx[:-2], idx[-2], idx[-1]
        return te.sum((a[(*batch, i, rk)].astype("int32") - za) * (b[(*batch, rk, j)].astype("int32") - zb), axis=rk)

    acc = te.compute((*lead, m, n), mac, name="acc")
    return te.compute((*lead, m, n), lambda *idx: im.requantize(acc[idx], params[0], zy), name="out")


def qsoftmax(x: te.Tensor, table: te.Tensor, params: te.Tensor, *, zy: int) -> te.Tensor:
    """QLinearSoftmax over the last axis (onnxruntime's int8 kernel): per row the int8 maximum, the
    float32 table of ``exp`` indexed by ``max - x`` (``int8_tables.softmax_exp_table``), their float32
    sum in row order, then ``nearbyintf(e * params[0] / sum) + zy`` with onnxruntime's clamp at 255 and
    its int32 -> int8 wrap (``params[0]`` = ``floorf(1 / y_scale)``)."""
    *lead, d = (int(v) for v in x.shape)
    rmax, rsum = te.reduce_axis((0, d), "rmax"), te.reduce_axis((0, d), "rsum")
    xmax = te.compute(tuple(lead), lambda *i: te.max(x[(*i, rmax)].astype("int32"), axis=rmax), name="xmax")
    total = te.compute(tuple(lead), lambda *i: te.sum(table[xmax[i] - x[(*i, rsum)].astype("int32")], axis=rsum),
                       name="acc")

    def out(*idx):
        row = idx[:-1]
        e = table[xmax[row] - x[idx].astype("int32")]
        vq = tirx.round((e * params[0]) / total[row]).astype("int32") + tirx.const(zy, "int32")
        w = tirx.min(vq, tirx.const(255, "int32"))
        return tirx.if_then_else(w > 127, w - 256, w).astype("int8")

    return te.compute(x.shape, out, name="out")
