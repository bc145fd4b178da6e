"""norm-align's shift gate: how far the running statistics sit from the source's, in units of the noise they would
have on an unshifted stream, and the fold's strength from it.

Why: on clean data norm-align's running statistics only fluctuate around the source's (a window of a few hundred
samples), yet the fold follows every fluctuation and costs accuracy (0.7 points on the clean Fashion-MNIST test
stream). A running estimate ``r_t = (1 - m_t) r_{t-1} + m_t s_t`` started at the source value has, on an
unshifted i.i.d. stream, variance ``W_t * spread`` per channel, with ``W_t = (1 - m_t)^2 W_{t-1} + m_t^2``
(``W_0 = 0``) and ``spread`` the between-sample variance of one sample's statistic on source images (measured at
calibration). ``z^2 = (r_t - source)^2 / (W_t * spread)`` is then about 1 per channel without a shift and grows
with the sample count under one. Two gates read it:

* ``global`` (norm-align's default, ``gate_level`` 3, chosen on the 4 validation corruptions and clean validation
  images): one strength per stream from the mean ``z^2`` over every aligned conv channel (the pooled features
  when no conv is aligned), 0 up to ``level``, rising linearly to 1 at ``2 * level``; the fold ``(a, b)``
  becomes ``(1 + g (a - 1), g b)``;
* ``channel`` (the int8 study only): a strength per channel, ``max(0, 1 - level / z^2)`` (positive-part
  James-Stein shrinkage of the estimated shift towards none).

Both read the statistics up to the previous sample (nothing waits for the current forward) and one constant per
channel and statistic; nothing reads a label. Products that feed an add go through ``unfused`` (see there): the
compiled step rounds them as torch does on every backend.
"""
from __future__ import annotations

import torch

GATES = ("", "global", "channel")
TINY = 1e-30  # a channel with no spread on source (constant output): its z is 0 unless it moved
FLOAT32_LOWEST = -3.4028234663852886e38  # max(x, this) is x for every finite float32


def unfused(product: torch.Tensor) -> torch.Tensor:
    """``product`` as it is (for every finite value), kept a product in a compiled graph: TVM's LLVM backend
    (aarch64) contracts a multiply feeding an add into one fused multiply-add, rounding once where the C
    build (``-ffp-contract=off``) and torch round twice, and a fold next to a rounding tie of its integer
    offset then moves by one unit. A select in between is an op LLVM does not fuse across; a select, not a
    ``maximum``: ONNX Max imports into TVM as stack + max, a reduction its operator fusion does not fuse, so
    every product of the step would be a buffer of its own in the arena (24 KB for mcunet-s's 2,224 aligned
    channels), where a select fuses into the kernel that computes the product."""
    lowest = torch.tensor(FLOAT32_LOWEST, dtype=product.dtype)
    return torch.where(product > lowest, product, lowest)


def noise_weight(w2: torch.Tensor, momentum: torch.Tensor) -> torch.Tensor:
    """``W`` after one more update with ``momentum``: the running estimate's variance in units of one sample's."""
    keep = 1.0 - momentum
    return unfused(keep * keep * w2) + unfused(momentum * momentum)


def z2(used: tuple[torch.Tensor, torch.Tensor], source: tuple[torch.Tensor, torch.Tensor],
       spread: tuple[torch.Tensor, torch.Tensor], w2: torch.Tensor) -> torch.Tensor:
    """Per-channel squared distance of (mean, E[y^2]) to the source's in noise units, averaged over the two."""
    parts = [(u - s) * (u - s) / (unfused(w2 * sp) + TINY) for u, s, sp in zip(used, source, spread)]
    return 0.5 * (parts[0] + parts[1])


def global_gate(mean_z2: torch.Tensor, level: torch.Tensor | float) -> torch.Tensor:
    """0 below ``level``, 1 from ``2 * level`` on, linear between."""
    return torch.clamp((mean_z2 - level) / level, 0.0, 1.0)


def channel_gate(channel_z2: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """Positive-part James-Stein: ``max(0, 1 - level / z^2)`` per channel (0 where nothing moved)."""
    return torch.clamp(1.0 - level / torch.clamp(channel_z2, min=TINY), 0.0, 1.0)


def global_strength(stats, sources, spreads, w2: torch.Tensor, level: float) -> torch.Tensor:
    """The ``global`` gate (a 1-element tensor) over every channel of the layers given (lists of (mean, E[y^2])
    pairs: running, source, spread)."""
    total = sum(z2(u, s, sp, w2).sum() for u, s, sp in zip(stats, sources, spreads))
    count = sum(len(s[0]) for s in sources)
    return global_gate(torch.reshape(torch.as_tensor(total / count), (1,)), level)


def gated(a: torch.Tensor, b: torch.Tensor, strength: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The affine ``(a, b)`` moved towards the identity by ``strength`` (None: as it is)."""
    if strength is None:
        return a, b
    return unfused(strength * (a - 1.0)) + 1.0, strength * b


__all__ = ["GATES", "channel_gate", "gated", "global_gate", "global_strength", "noise_weight", "unfused",
           "z2"]
