"""onnxruntime's float ReduceMean: at the float boundary of the int8 graph and inside float islands.

The bundle's pooled taps are ``ReduceMean(DequantizeLinear(q))`` on the output side of the
last quantised op. onnxruntime computes that mean in float32 with Eigen's vectorised sum
(SSE: four lanes, a row's first unaligned elements added last, lanes combined pairwise),
so a plain left-to-right sum differs from it in the last bit for about a third of the
channels. This kernel adds the dequantized values in exactly that order, which makes the
pooled taps identical to onnxruntime's (checked for row lengths 1..256 in the tests). The same
order serves a ReduceMean of float values inside a float island (``float_mean``: a LayerNorm's
statistics, written out by ``edgetune.export.decompose``).

The dequantized values come from a 256-entry table (``dequant_table``) rather than a
multiplication: LLVM contracts a multiply feeding an add into one FMA on targets that have
it (TVM enables FP contraction), which would round differently from onnxruntime.
"""
from __future__ import annotations

import numpy as np
from tvm import te, tirx

PACKET = 4  # float lanes of Eigen's SSE packet in onnxruntime's x86-64 build
ALIGN_FLOATS = 4  # Eigen aligns packet loads to 16 bytes; ORT buffers are at least that aligned


def eigen_sum(leaves: list, start: int) -> object:
    """Sum ``leaves`` in the order of Eigen's ``redux`` (linear vectorised traversal).

    ``start`` is the number of leading elements before the first 16-byte aligned one; they
    and the tail that does not fill a packet are added one by one after the vector part.
    Works on anything with ``+`` (TIR expressions, numpy float32 scalars).
    """
    size = len(leaves)
    start = min(start, size)
    full = (size - start) // PACKET * PACKET
    pairs = (size - start) // (2 * PACKET) * 2 * PACKET
    if full == 0:
        acc = leaves[0]
        for leaf in leaves[1:]:
            acc = acc + leaf
        return acc
    lanes = list(leaves[start:start + PACKET])
    if full > PACKET:
        second = list(leaves[start + PACKET:start + 2 * PACKET])
        for i in range(start + 2 * PACKET, start + pairs, 2 * PACKET):
            lanes = [lanes[j] + leaves[i + j] for j in range(PACKET)]
            second = [second[j] + leaves[i + PACKET + j] for j in range(PACKET)]
        lanes = [a + b for a, b in zip(lanes, second)]
        if full > pairs:
            lanes = [lanes[j] + leaves[start + pairs + j] for j in range(PACKET)]
    while len(lanes) > 1:
        half = len(lanes) // 2
        lanes = [lanes[j] + lanes[j + half] for j in range(half)]
    acc = lanes[0]
    for i in list(range(start)) + list(range(start + full, size)):
        acc = acc + leaves[i]
    return acc


def row_start(row: int, row_len: int) -> int:
    """Elements before the first aligned one in row ``row`` of a contiguous [rows, row_len] buffer."""
    offset = (row * row_len) % ALIGN_FLOATS
    return (ALIGN_FLOATS - offset) % ALIGN_FLOATS


def dequant_table(scale: float, zp: int) -> np.ndarray:
    """``table[q + 128] = fl32(float(q - zp) * scale)`` for every int8 ``q`` (DequantizeLinear's values)."""
    return ((np.arange(-128, 128, dtype=np.int32) - zp).astype(np.float32) * np.float32(scale)).astype(np.float32)


def spatial_mean(q: te.Tensor, table: te.Tensor, keepdims: bool) -> te.Tensor:
    """TE: ``mean(dequantize(q), axes=[2, 3])`` of an int8 NCHW tensor, summed in onnxruntime's order.

    ``table`` is ``dequant_table(scale, zp)``: the dequantized values are table entries (no multiply
    an FMA could absorb).
    """
    w = int(q.shape[3])
    return _ort_mean(tuple(int(d) for d in q.shape),
                     lambda b, ch, i: table[q[b, ch, i // w, i % w].astype("int32") + 128], keepdims)


def float_mean(x: te.Tensor, keepdims: bool) -> te.Tensor:
    """TE: ``mean(x, axes=[2, 3])`` of a float32 NCHW tensor in onnxruntime's order (a ReduceMean
    inside a float island, e.g. a LayerNorm's statistics written out by ``edgetune.export.decompose``)."""
    w = int(x.shape[3])
    return _ort_mean(tuple(int(d) for d in x.shape), lambda b, ch, i: x[b, ch, i // w, i % w], keepdims)


def _ort_mean(shape: tuple[int, int, int, int], leaf, keepdims: bool) -> te.Tensor:
    """Means of the rows ``leaf(b, ch, i)``, ``i < h * w``, in Eigen's order.

    Rows whose length is a multiple of the packet are always aligned: their lanes become loops
    (``_packet_mean``). Other rows are written out as one addition tree per alignment phase (they
    are short: odd spatial sizes).
    """
    n, c, h, w = shape
    hw = h * w
    if hw % (2 * PACKET) in (0, PACKET) and hw >= 2 * PACKET:
        return _packet_mean(shape, leaf, keepdims)

    def compute(b, ch, *rest):
        leaves = [leaf(b, ch, i) for i in range(hw)]
        row = b * c + ch
        # the alignment of a row repeats with period ALIGN_FLOATS rows; one tree per phase
        phases = {row_start(r, hw) for r in range(ALIGN_FLOATS)}
        total = None
        for r in range(ALIGN_FLOATS - 1, -1, -1):
            tree = eigen_sum(leaves, row_start(r, hw))
            total = tree if total is None else tirx.Select(
                tirx.floormod(row * hw, ALIGN_FLOATS) == (r * hw) % ALIGN_FLOATS, tree, total)
            if len(phases) == 1:
                break
        return total / tirx.const(np.float32(hw), "float32")

    out = (n, c, 1, 1) if keepdims else (n, c)
    return te.compute(out, compute, name="out")


def _packet_mean(shape: tuple[int, int, int, int], leaf, keepdims: bool) -> te.Tensor:
    """``eigen_sum`` of aligned rows (length a multiple of PACKET, at least two packets) as loops:
    two packet accumulators run over pairs of packets (sequential sums, as Eigen's loop adds),
    a last odd packet joins them, then the lanes combine pairwise."""
    n, c, h, w = shape
    hw = h * w
    pairs = hw // (2 * PACKET)
    k = te.reduce_axis((0, pairs), "k")

    # starting from +0.0 changes nothing (0 + v == v) unless every leaf is -0.0, which dequantized
    # values and squares never are
    packets = te.compute((n, c, 2, PACKET), lambda b, ch, half, j: te.sum(
        leaf(b, ch, k * 2 * PACKET + half * PACKET + j), axis=k), name="acc")

    def compute(b, ch, *rest):
        lanes = [packets[b, ch, 0, j] + packets[b, ch, 1, j] for j in range(PACKET)]
        if hw % (2 * PACKET):
            lanes = [lanes[j] + leaf(b, ch, pairs * 2 * PACKET + j) for j in range(PACKET)]
        while len(lanes) > 1:
            half = len(lanes) // 2
            lanes = [lanes[j] + lanes[j + half] for j in range(half)]
        return lanes[0] / tirx.const(np.float32(hw), "float32")

    out = (n, c, 1, 1) if keepdims else (n, c)
    return te.compute(out, compute, name="out")


def reference_mean(q: np.ndarray, scale: float, zp: int) -> np.ndarray:
    """numpy twin of the kernel (for tests): [N, C, H, W] int8 -> [N, C] float32."""
    n, c, h, w = q.shape
    v = ((q.astype(np.int32) - zp).astype(np.float32) * np.float32(scale)).reshape(n * c, h * w)
    sums = [eigen_sum(list(v[r]), row_start(r, h * w)) for r in range(n * c)]
    return (np.array(sums, np.float32) / np.float32(h * w)).reshape(n, c)


