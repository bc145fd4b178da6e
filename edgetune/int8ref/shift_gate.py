"""A shift detector for norm-align: how far the running statistics sit from the source's, in units of the
noise they would have on an unshifted stream, and a gate on the fold's strength from it.

Why: on clean data norm-align's running statistics only fluctuate around the source's (a window of a
few hundred samples), yet the fold follows every fluctuation and costs accuracy. A running estimate
``r_t = (1 - m_t) r_{t-1} + m_t s_t`` started at the source value has, on an unshifted i.i.d. stream,
variance ``W_t * spread`` per channel, with ``W_t = (1 - m_t)^2 W_{t-1} + m_t^2`` (``W_0 = 0``) and
``spread`` the between-sample variance of the per-sample statistic on source images (measured at
calibration). ``z^2 = (r_t - source)^2 / (W_t * spread)`` is then about 1 per channel without a shift
and grows with the sample count under one. Two gates read it:

* ``global``: one strength per stream from the mean ``z^2`` over every aligned channel, 0 up to
  ``level``, rising linearly to 1 at ``2 * level`` (a shift detector with a soft threshold);
* ``channel``: a strength per channel, ``max(0, 1 - level / z^2)`` (positive-part James-Stein
  shrinkage of the estimated shift towards none).

Both only read statistics the method already keeps (plus one constant per channel and statistic);
nothing here reads a label.
"""
from __future__ import annotations

import torch

GATES = ("", "global", "channel")
_TINY = 1e-30  # a channel with no spread on source (constant output): its z is 0 unless it moved


def noise_weight(w2: torch.Tensor, momentum: torch.Tensor) -> torch.Tensor:
    """``W`` after one more update with ``momentum``: the running estimate's variance in units of one sample's."""
    return (1.0 - momentum) ** 2 * w2 + momentum ** 2


def z2(used: tuple[torch.Tensor, torch.Tensor], source: tuple[torch.Tensor, torch.Tensor],
       spread: tuple[torch.Tensor, torch.Tensor], w2: torch.Tensor) -> torch.Tensor:
    """Per-channel squared distance of (mean, E[y^2]) to the source's in noise units, averaged over the two."""
    parts = [(u - s) ** 2 / (w2 * sp + _TINY) for u, s, sp in zip(used, source, spread)]
    return 0.5 * (parts[0] + parts[1])


def global_gate(mean_z2: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """0 below ``level``, 1 from ``2 * level`` on, linear between."""
    return torch.clamp((mean_z2 - level) / level, 0.0, 1.0)


def channel_gate(channel_z2: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """Positive-part James-Stein: ``max(0, 1 - level / z^2)`` per channel (0 where nothing moved)."""
    return torch.clamp(1.0 - level / torch.clamp(channel_z2, min=_TINY), 0.0, 1.0)
