"""Sensor shifts of 1-D inputs (float32 windows N x C x T), severities 1..5.

What a worn, re-mounted or different sensor does to its recordings. Magnitudes are relative
to each channel's standard deviation over the windows shifted together (a stream segment), so
the same severity means the same thing for an accelerometer in g and a gyroscope in rad/s.
Every draw comes from the ``rng`` passed in: deterministic given the seed.

* ``gaussian_noise``: additive white noise, sigma 0.1 .. 0.8 channel std.
* ``offset_drift``: a per-window, per-channel offset of up to 0.25 .. 2 channel std that also
  drifts linearly over the window by half as much again (bias and bias drift).
* ``gain_change``: each channel of each window scaled by exp(N(0, 0.1 .. 0.6)) (mis-calibration).
* ``dead_channel``: ceil(C * 0.1 .. 0.5) channels, chosen once for the whole segment (the same
  sensor stays dead), read a constant 0.
* ``time_warp``: each window resampled at a random speed in 1 +- 0.05 .. 0.4 around its centre
  (another walking pace; samples beyond the window repeat the edge value).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

ArrayShift = Callable[[np.ndarray, int, np.random.RandomState], np.ndarray]


def _channel_std(x: np.ndarray) -> np.ndarray:
    """Per-channel std over windows and time, shaped to broadcast (1 x C x 1); never zero."""
    std = x.std(axis=(0, 2), keepdims=True) if x.size else np.ones((1, x.shape[1], 1), np.float32)
    return np.maximum(std, 1e-6).astype(np.float32)


def gaussian_noise(x: np.ndarray, severity: int, rng: np.random.RandomState) -> np.ndarray:
    sigma = (0.1, 0.2, 0.35, 0.5, 0.8)[severity - 1]
    return (x + rng.normal(size=x.shape).astype(np.float32) * sigma * _channel_std(x)).astype(np.float32)


def offset_drift(x: np.ndarray, severity: int, rng: np.random.RandomState) -> np.ndarray:
    size = (0.25, 0.5, 1.0, 1.5, 2.0)[severity - 1]
    n, c, t = x.shape
    offset = rng.uniform(-1, 1, size=(n, c, 1)).astype(np.float32)
    drift = rng.uniform(-0.5, 0.5, size=(n, c, 1)).astype(np.float32) * np.linspace(0, 1, t, dtype=np.float32)
    return (x + size * _channel_std(x) * (offset + drift)).astype(np.float32)


def gain_change(x: np.ndarray, severity: int, rng: np.random.RandomState) -> np.ndarray:
    spread = (0.1, 0.2, 0.3, 0.45, 0.6)[severity - 1]
    gain = np.exp(rng.normal(scale=spread, size=(x.shape[0], x.shape[1], 1))).astype(np.float32)
    return (x * gain).astype(np.float32)


def dead_channel(x: np.ndarray, severity: int, rng: np.random.RandomState) -> np.ndarray:
    c = x.shape[1]
    dead = rng.permutation(c)[:max(1, math.ceil(c * (0.1, 0.2, 0.3, 0.4, 0.5)[severity - 1]))]
    out = x.astype(np.float32, copy=True)
    out[:, dead, :] = 0.0
    return out


def time_warp(x: np.ndarray, severity: int, rng: np.random.RandomState) -> np.ndarray:
    spread = (0.05, 0.1, 0.2, 0.3, 0.4)[severity - 1]
    n, c, t = x.shape
    centre = (t - 1) / 2.0
    grid = np.arange(t, dtype=np.float64)
    out = np.empty_like(x, dtype=np.float32)
    speeds = np.asarray(1.0 + rng.uniform(-spread, spread, size=n), dtype=np.float64)
    for i, speed in enumerate(speeds.tolist()):
        at = np.clip(centre + (grid - centre) * speed, 0, t - 1)
        for ch in range(c):
            out[i, ch] = np.interp(at, grid, x[i, ch])
    return out


SENSOR_SHIFTS: dict[str, ArrayShift] = {
    "gaussian_noise": gaussian_noise, "offset_drift": offset_drift, "gain_change": gain_change,
    "dead_channel": dead_channel, "time_warp": time_warp}
