"""The files ``edgetune-run`` (targets/app) reads and writes: sample streams, result records, state.

Formats (little-endian; targets/app/et_app.h is the reference):

* stream: 32-byte header ``"ETSM", version, count, input_len, classes, record_bytes, shape0, shape1``,
  then per sample ``int32 feedback label (-1: none), uint32 flags (bit 0: reset before it), float32
  x[...]``. ``shape0``/``shape1`` carry the sample shape (C x T or C x H x W; 0, 0: not given, as
  in files written before): ``shape0 = rank | C << 8``, ``shape1 = H | W << 16`` (rank 3) or
  ``T`` (rank 2) — the two words were reserved zeros, so older readers ignore them;
* results: 16-byte header ``"ETRS", version, count, record_bytes`` then per sample ``int32
  prediction, uint32 flags, uint32 ticks step, frozen, method, guard, float32 loss``;
* state: the model's registered state buffers concatenated (layout in the project's metadata).
"""
from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgetune.errors import CheckpointError, DataError

STREAM_MAGIC, RESULTS_MAGIC, VERSION = b"ETSM", b"ETRS", 1
MAX_C, MAX_SIDE = (1 << 24) - 1, (1 << 16) - 1
STREAM_HEADER = struct.Struct("<4sIIIIIII")
RESULTS_HEADER = struct.Struct("<4sIII")
RESULT_DTYPE = np.dtype([("prediction", "<i4"), ("flags", "<u4"), ("step", "<u4"), ("frozen", "<u4"),
                         ("method", "<u4"), ("guard", "<u4"), ("loss", "<f4")])
# result flags (ET_APP_F_*)
REJECTED, UPDATED, EARLY_EXIT, RESTORED, SNAPSHOT, FEEDBACK, RESET, SAVED = (1 << k for k in range(8))


def pack_shape(shape: Sequence[int]) -> tuple[int, int]:
    """The header's two shape words for a sample shape (C,T) or (C,H,W); (0, 0) when it does not fit."""
    dims = tuple(int(d) for d in shape)
    if len(dims) == 2 and dims[0] <= MAX_C and dims[1] <= 0xFFFFFFFF:
        return 2 | dims[0] << 8, dims[1]
    if len(dims) == 3 and dims[0] <= MAX_C and max(dims[1:]) <= MAX_SIDE:
        return 3 | dims[0] << 8, dims[1] | dims[2] << 16
    return 0, 0


def unpack_shape(shape0: int, shape1: int) -> tuple[int, ...] | None:
    """The sample shape of a header's two shape words (None: not recorded)."""
    rank, c = shape0 & 0xFF, shape0 >> 8
    if rank == 2:
        return (c, shape1)
    if rank == 3:
        return (c, shape1 & 0xFFFF, shape1 >> 16)
    return None


def write_stream(path: str | Path, samples: np.ndarray, resets: Sequence[bool] | None = None,
                 feedback: Sequence[int] | None = None, classes: int = 0) -> Path:
    """Write float32 ``samples`` (N x C x T or N x C x H x W; N x L: shape not recorded) as a
    stream file; ``resets[i]``: reset the model before sample i; ``feedback[i]``: label revealed
    after sample i was scored (-1: none).

    Raises:
        DataError: no samples, or ``resets`` / ``feedback`` of another length.
    """
    x = np.ascontiguousarray(samples, dtype="<f4")
    n = len(x)
    if n == 0:
        raise DataError("stream: no samples to write; pass at least one")
    shape0, shape1 = pack_shape(x.shape[1:]) if x.ndim in (3, 4) else (0, 0)
    x = x.reshape(n, -1)
    resets = [False] * n if resets is None else list(resets)
    feedback = [-1] * n if feedback is None else list(feedback)
    if len(resets) != n or len(feedback) != n:
        raise DataError(f"stream: {n} samples but {len(resets)} reset flags and {len(feedback)} feedback labels; "
                        "give one of each per sample")
    head = np.zeros(n, dtype=[("label", "<i4"), ("flags", "<u4")])
    head["label"], head["flags"] = feedback, [1 if r else 0 for r in resets]
    records = np.empty(n, dtype=[("head", head.dtype), ("x", "<f4", (x.shape[1],))])
    records["head"], records["x"] = head, x
    out = Path(path)
    with out.open("wb") as f:
        f.write(STREAM_HEADER.pack(STREAM_MAGIC, VERSION, n, x.shape[1], classes, 8 + 4 * x.shape[1], shape0,
                                   shape1))
        f.write(records.tobytes())
    return out


def read_stream_header(path: str | Path) -> dict:
    """count, input_len, classes and the sample shape (None: not recorded) of a stream file.

    Raises:
        DataError: not a stream file.
    """
    raw = Path(path).read_bytes()[:STREAM_HEADER.size]
    if len(raw) < STREAM_HEADER.size:
        raise DataError(f"stream: {path} is shorter than the 32-byte header; write it with write_stream")
    magic, version, count, input_len, classes, _, shape0, shape1 = STREAM_HEADER.unpack(raw)
    if magic != STREAM_MAGIC or version != VERSION:
        raise DataError(f"stream: {path} is not an edgetune stream (magic {magic!r}, version {version}); write it "
                        "with write_stream")
    return {"count": count, "input_len": input_len, "classes": classes, "shape": unpack_shape(shape0, shape1)}


def read_results(path: str | Path) -> np.ndarray:
    """The per-sample records of a results file (structured array, fields of ``RESULT_DTYPE``).

    Raises:
        CheckpointError: missing, not a results file, or truncated (the run did not finish).
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"results: cannot read {p} ({exc.strerror}); the run did not write it") from None
    if len(raw) < RESULTS_HEADER.size:
        raise CheckpointError(f"results: {p} is shorter than its header; the run did not finish")
    magic, version, count, size = RESULTS_HEADER.unpack_from(raw)
    if magic != RESULTS_MAGIC or version != VERSION or size != RESULT_DTYPE.itemsize:
        raise CheckpointError(f"results: {p} is not an edgetune-run results file (magic {magic!r}, version "
                              f"{version}, record {size} bytes); rebuild the program")
    body = raw[RESULTS_HEADER.size:]
    if len(body) != count * size:
        raise CheckpointError(f"results: {p} holds {len(body) // size} of {count} records; the run stopped early")
    return np.frombuffer(body, dtype=RESULT_DTYPE)


@dataclass(frozen=True)
class StateEntry:
    """One registered state buffer: name, what it is (param / optim / stat), shape."""

    name: str
    kind: str
    shape: tuple[int, ...]


def read_state(path: str | Path, layout: Sequence[StateEntry]) -> dict[str, np.ndarray]:
    """The final state file split by ``layout`` into float32 arrays.

    Raises:
        CheckpointError: the file is missing or its size does not match the layout.
    """
    p = Path(path)
    try:
        raw = np.fromfile(p, dtype="<f4")
    except OSError as exc:
        raise CheckpointError(f"state: cannot read {p} ({exc}); the run did not write it") from None
    sizes = [int(np.prod(e.shape, dtype=np.int64)) for e in layout]
    if raw.size != sum(sizes):
        raise CheckpointError(f"state: {p} holds {raw.size} floats, the layout {sum(sizes)}; "
                              "read it with the metadata of the program that wrote it")
    out, at = {}, 0
    for entry, size in zip(layout, sizes):
        out[entry.name] = raw[at:at + size].reshape(entry.shape).copy()
        at += size
    return out


__all__ = ["EARLY_EXIT", "FEEDBACK", "REJECTED", "RESET", "RESTORED", "RESULT_DTYPE", "SAVED", "SNAPSHOT", "UPDATED",
           "StateEntry", "pack_shape", "read_results", "read_state", "read_stream_header", "unpack_shape",
           "write_stream"]
