"""ctypes binding of the C runtime (``targets/runtime``) built for the host.

``build_shared`` compiles the runtime — plus, optionally, model code that fills an ``et_model``
(a bundle's generated glue, or a test's hand-written fake) — with the host target's toolchain
into a shared library in the cache (``$EDGETUNE_CACHE/cruntime/<hash>/``), once per source
content. ``load`` opens it with every runtime function's prototype declared. The classes
below drive the same C code the firmware runs: ``Guard``, ``Checkpoint`` and ``Runtime``.

Model code exposes ``et_status <getter>(const et_model **out)``; ``Runtime(lib, "<getter>")``.
"""
from __future__ import annotations

import ctypes
import enum
import hashlib
import os
import shutil
import subprocess
import tempfile
from ctypes import (CFUNCTYPE, POINTER, Structure, byref, c_char_p, c_double, c_float, c_int, c_int32, c_size_t,
                    c_uint32, c_uint64, c_void_p)
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from edgetune.errors import CheckpointError, ConfigError, DataError, EdgetuneError, ModelError, ToolchainError
from edgetune.targets import RUNTIME_CFLAGS, RUNTIME_DIR, get_target, runtime_sources


class Status(enum.IntEnum):
    """``et_status`` (targets/runtime/et_types.h)."""

    OK = 0
    E_ARG = 1
    E_INPUT = 2
    E_MODEL = 3
    E_IO = 4
    E_NO_CHECKPOINT = 5
    E_CORRUPT = 6
    E_CAPACITY = 7
    E_BAD_STATE = 8


class StateKind(enum.IntEnum):
    """``et_state_kind``: what the collapse guard does with a registered buffer."""

    PARAM = 0
    OPTIM = 1
    STAT = 2


_ERRORS: dict[int, tuple[type[EdgetuneError], str]] = {
    Status.E_ARG: (ConfigError, "check the sizes and settings passed to the runtime"),
    Status.E_INPUT: (DataError, "the sample holds NaN/Inf or an out-of-range value"),
    Status.E_MODEL: (ModelError, "the model code returned an error or produced NaN logits"),
    Status.E_IO: (CheckpointError, "check that the checkpoint storage exists and is writable"),
    Status.E_NO_CHECKPOINT: (CheckpointError, "no valid slot: save one first"),
    Status.E_CORRUPT: (CheckpointError, "the slot changed while it was read; load again"),
    Status.E_CAPACITY: (ConfigError, "make the checkpoint slots or the workspace larger"),
    Status.E_BAD_STATE: (CheckpointError, "every valid slot holds non-finite state or inconsistent counters; "
                                          "restore a backup of the checkpoint or start from the bundle's state"),
}


def check(status: int, what: str) -> None:
    """Raise the ``EdgetuneError`` matching a non-OK ``et_status`` returned by ``what``.

    Raises:
        ConfigError, DataError, ModelError, CheckpointError: by status (see ``_ERRORS``).
    """
    if status == Status.OK:
        return
    cls, hint = _ERRORS.get(status, (EdgetuneError, "unknown status: rebuild the runtime"))
    name = Status(status).name if status in Status._value2member_map_ else str(status)
    raise cls(f"C runtime: {what} failed ({name}); {hint}")


# --- mirrors of the runtime's public structs (checked against et_abi_size by the tests) ---------
class StateBuf(Structure):
    _fields_ = [("data", c_void_p), ("bytes", c_uint32), ("kind", c_uint32)]


class StateList(Structure):
    _fields_ = [("bufs", POINTER(StateBuf)), ("count", c_uint32)]


READ_FN = CFUNCTYPE(c_int, c_void_p, c_uint32, c_void_p, c_uint32)
WRITE_FN = CFUNCTYPE(c_int, c_void_p, c_uint32, c_void_p, c_uint32)
SYNC_FN = CFUNCTYPE(c_int, c_void_p)
CLOCK_FN = CFUNCTYPE(c_int, c_void_p, POINTER(c_uint64))


class IO(Structure):
    _fields_ = [("read", READ_FN), ("write", WRITE_FN), ("sync", SYNC_FN), ("ctx", c_void_p)]


class IOMem(Structure):
    _fields_ = [("base", c_void_p), ("bytes", c_uint32)]


class IOStdio(Structure):
    _fields_ = [("file", c_void_p)]


class IOPosix(Structure):
    _fields_ = [("fd", c_int)]


class Ckpt(Structure):
    _fields_ = [("io", IO), ("base", c_uint32), ("slot_bytes", c_uint32), ("newest", c_int32), ("seq", c_uint32),
                ("older", c_int32), ("older_seq", c_uint32), ("scanned_layout", c_uint32),
                ("scanned_payload", c_uint32), ("scanned", c_uint32)]


class GuardConfig(Structure):
    _fields_ = [("rate", c_double), ("max_share", c_double), ("every", c_uint32), ("warmup", c_uint32)]


class GuardStruct(Structure):
    _fields_ = [("hist", POINTER(c_float)), ("classes", c_uint32), ("seen", c_uint32), ("keep", c_float),
                ("add", c_float), ("max_share", c_double), ("every", c_uint32), ("warmup", c_uint32)]


class MomentumSchedule(Structure):
    _fields_ = [("start", c_double), ("decay", c_double), ("floor", c_double)]


class Model(Structure):
    _fields_ = [("input_len", c_uint32), ("classes", c_uint32), ("input_min", c_float), ("input_max", c_float),
                ("taps", POINTER(c_float)), ("logits", POINTER(c_float)), ("target", POINTER(c_float)),
                ("state", POINTER(StateBuf)), ("state_count", c_uint32), ("layout_id", c_uint32),
                ("ctx", c_void_p), ("frozen_forward", c_void_p), ("infer", c_void_p), ("train_step", c_void_p)]


class StepArgs(Structure):
    _fields_ = [("taps", POINTER(c_float)), ("momentum", c_float), ("target", POINTER(c_float)),
                ("labelled", c_uint32)]


class StepInfo(Structure):
    _fields_ = [("loss", c_float), ("early_exit", c_uint32)]


class RuntimeConfig(Structure):
    _fields_ = [("momentum", MomentumSchedule), ("guard", GuardConfig), ("adapt", c_uint32), ("use_guard", c_uint32),
                ("clock", CLOCK_FN), ("clock_ctx", c_void_p)]


COUNTER_NAMES = ("samples", "rejected", "updates", "restores", "snapshots", "early_exits", "labelled", "saves")


class Counters(Structure):
    _fields_ = [(n, c_uint32) for n in COUNTER_NAMES]


class StepResult(Structure):
    _fields_ = [("prediction", c_int32), ("loss", c_float), ("momentum", c_float), ("updated", c_uint32),
                ("early_exit", c_uint32), ("restored", c_uint32), ("snapshot", c_uint32),
                ("ticks_frozen", c_uint32), ("ticks_method", c_uint32), ("ticks_guard", c_uint32)]


# et_abi_struct order -> the mirror (None: opaque, allocated by size)
ABI_MIRRORS: tuple[type[Structure] | None, ...] = (
    StateBuf, StateList, IO, IOMem, IOStdio, IOPosix, Ckpt, GuardConfig, GuardStruct, MomentumSchedule, Model,
    StepArgs, StepInfo, RuntimeConfig, Counters, StepResult, None)
ABI_RUNTIME = 16

_P = POINTER
_PROTOTYPES: dict[str, list[Any]] = {
    "et_abi_size": [c_uint32, _P(c_uint32)],
    "et_crc32_update": [_P(c_uint32), c_void_p, c_size_t],
    "et_input_check": [_P(c_float), c_uint32, c_float, c_float, _P(c_uint32)],
    "et_momentum_at": [_P(MomentumSchedule), c_uint32, _P(c_float)],
    "et_guard_init": [_P(GuardStruct), _P(GuardConfig), _P(c_float), c_uint32],
    "et_guard_reset": [_P(GuardStruct)],
    "et_guard_observe": [_P(GuardStruct), c_uint32, _P(c_int)],
    "et_io_mem_open": [_P(IO), _P(IOMem), c_void_p, c_uint32],
    "et_io_stdio_open": [_P(IO), _P(IOStdio), c_char_p],
    "et_io_stdio_close": [_P(IOStdio)],
    "et_io_posix_open": [_P(IO), _P(IOPosix), c_char_p],
    "et_io_posix_close": [_P(IOPosix)],
    "et_ckpt_open": [_P(Ckpt), _P(IO), c_uint32, c_uint32],
    "et_ckpt_payload_bytes": [_P(StateList), c_uint32, _P(c_uint32)],
    "et_ckpt_load": [_P(Ckpt), _P(StateList), c_uint32, c_uint32, _P(c_uint32)],
    "et_ckpt_save": [_P(Ckpt), _P(StateList), c_uint32, c_uint32, _P(c_uint32)],
    "et_runtime_work_bytes": [_P(Model), _P(c_uint32)],
    "et_runtime_init": [c_void_p, _P(Model), _P(RuntimeConfig), c_void_p, c_uint32],
    "et_runtime_step": [c_void_p, _P(c_float), _P(StepResult)],
    "et_runtime_feedback": [c_void_p, _P(c_float), c_uint32, _P(StepResult)],
    "et_runtime_counters": [c_void_p, _P(Counters)],
    "et_runtime_save": [c_void_p, _P(Ckpt), _P(c_uint32)],
    "et_runtime_boot": [c_void_p, _P(Ckpt), _P(c_uint32)],
    "et_runtime_payload_bytes": [c_void_p, _P(c_uint32)],
}
HEADER_BYTES = 24  # ET_CKPT_HEADER_BYTES


def cache_dir() -> Path:
    """Same place as edgetune.data.corruptions.cache_dir, without importing torch (4 s) to find it."""
    return Path(os.environ.get("EDGETUNE_CACHE", Path.home() / ".cache" / "edgetune"))


def slot_bytes(payload: int) -> int:
    """``ET_CKPT_SLOT_BYTES``: room for one checkpoint slot holding ``payload`` bytes."""
    return HEADER_BYTES + ((payload + 7) & ~7)


# --- building -------------------------------------------------------------------------------
def _compile(cc: str, flags: Sequence[str], sources: Sequence[Path], workdir: Path) -> list[Path]:
    workdir.mkdir()
    _run([cc, *flags, "-c", *map(str, sources)], workdir, "compiling " + ", ".join(s.name for s in sources))
    return [workdir / (s.stem + ".o") for s in sources]


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()[:20]
        raise ToolchainError(f"cruntime: {what} failed ({cmd[0]} exit {proc.returncode}): "
                             + " | ".join(detail) + "; fix the C source or the flags")


def build_shared(extra_sources: Sequence[str | Path] = (), include_dirs: Sequence[str | Path] = (),
                 libs: Sequence[str] = (), extra_cflags: Sequence[str] | None = None) -> Path:
    """The host shared library of the runtime + ``extra_sources``, built on first use and cached.

    The runtime compiles with its strict flags (``RUNTIME_CFLAGS``); extra sources with the same
    flags unless ``extra_cflags`` replaces them (generated code may not be ``-Werror`` clean).

    Raises:
        ToolchainError: the host C compiler is missing or a compile/link failed (with its output).
    """
    tc = get_target("host").toolchain
    cc = shutil.which(tc.cc)
    if cc is None:
        raise ToolchainError(f"cruntime: host C compiler {tc.cc!r} not found on PATH; install gcc (apt install gcc)")
    runtime = runtime_sources()
    extras = [Path(s).resolve() for s in extra_sources]
    incs = [f"-I{d}" for d in (RUNTIME_DIR, *map(Path, include_dirs))]
    strict = [*tc.compile_flags, *RUNTIME_CFLAGS, "-fPIC", *incs]
    loose = strict if extra_cflags is None else [*tc.compile_flags, "-fPIC", *extra_cflags, *incs]
    key = hashlib.sha256(repr((cc, strict, loose, list(libs), tc.link_flags, tc.libs)).encode())
    headers = [h for d in (RUNTIME_DIR, *map(Path, include_dirs)) for h in sorted(Path(d).glob("*.h"))]
    for f in (*runtime, *extras, *headers):
        key.update(f.name.encode() + b"\0" + f.read_bytes())
    out = cache_dir() / "cruntime" / key.hexdigest()[:20] / "libedgetune_rt.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        objs = _compile(cc, strict, runtime, Path(tmp) / "runtime")
        if extras:
            objs += _compile(cc, loose, extras, Path(tmp) / "extra")
        lib = Path(tmp) / out.name
        _run([cc, "-shared", *tc.link_flags, *map(str, objs), "-o", str(lib), *tc.libs, *libs], Path(tmp), "linking")
        os.replace(lib, out)  # atomic: concurrent builders never see a half-written library
    return out


def load(extra_sources: Sequence[str | Path] = (), include_dirs: Sequence[str | Path] = (), libs: Sequence[str] = (),
         extra_cflags: Sequence[str] | None = None) -> ctypes.CDLL:
    """``build_shared`` then open it with the runtime's prototypes declared (see ``build_shared``).

    Raises:
        ToolchainError: as ``build_shared``.
    """
    lib = ctypes.CDLL(str(build_shared(extra_sources, include_dirs, libs, extra_cflags)))
    for name, argtypes in _PROTOTYPES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, c_int
    return lib


def abi_size(lib: ctypes.CDLL, which: int) -> int:
    """sizeof the runtime struct number ``which`` (``et_abi_struct``) as the C compiler laid it out."""
    n = c_uint32()
    check(lib.et_abi_size(which, byref(n)), "et_abi_size")
    return n.value


# --- small pure functions ---------------------------------------------------------------------
def crc32(lib: ctypes.CDLL, data: bytes) -> int:
    """The runtime's CRC-32 of ``data`` (zlib-compatible)."""
    crc = c_uint32(0)
    check(lib.et_crc32_update(byref(crc), data, len(data)), "et_crc32_update")
    return crc.value


def momentum_at(lib: ctypes.CDLL, step: int, start: float, decay: float, floor: float) -> float:
    """The float32 EMA momentum the runtime hands the graph at ``step``.

    Raises:
        ConfigError: start, decay or floor outside [0, 1].
    """
    out = c_float()
    check(lib.et_momentum_at(byref(MomentumSchedule(start, decay, floor)), step, byref(out)), "et_momentum_at")
    return out.value


def _floats(x: np.ndarray | Sequence[float]) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32).reshape(-1))


def first_bad_input(lib: ctypes.CDLL, x: np.ndarray, lo: float, hi: float) -> int | None:
    """Index of the first NaN/Inf/out-of-range value of ``x`` (the runtime's check), None if valid.

    Raises:
        ConfigError: empty input or lo > hi.
    """
    v = _floats(x)
    bad = c_uint32()
    st = lib.et_input_check(v.ctypes.data_as(POINTER(c_float)), v.size, lo, hi, byref(bad))
    if st == Status.E_INPUT:
        return bad.value
    check(st, "et_input_check")
    return None


class Guard:
    """The C collapse guard (same algorithm as ``edgetune.methods.base.CollapseGuard``)."""

    VERDICTS = ("ok", "snapshot", "restore")

    def __init__(self, lib: ctypes.CDLL, classes: int, rate: float = 0.02, max_share: float = 0.8, every: int = 50,
                 warmup: int = 100) -> None:
        self._lib = lib
        self.hist = np.zeros(classes, dtype=np.float32)
        self._g = GuardStruct()
        cfg = GuardConfig(rate, max_share, every, warmup)
        check(lib.et_guard_init(byref(self._g), byref(cfg), self.hist.ctypes.data_as(POINTER(c_float)), classes),
              "et_guard_init")

    @property
    def seen(self) -> int:
        return self._g.seen

    def observe(self, prediction: int) -> str:
        """Record one prediction; ``"restore"``, ``"snapshot"`` or ``"ok"`` like the Python guard."""
        verdict = c_int()
        check(self._lib.et_guard_observe(byref(self._g), prediction, byref(verdict)), "et_guard_observe")
        return self.VERDICTS[verdict.value]


# --- persistence -------------------------------------------------------------------------------
def _state_list(arrays: Sequence[np.ndarray], writable: bool) -> tuple[StateList, Any]:
    for a in arrays:
        if not a.flags.c_contiguous or (writable and not a.flags.writeable):
            raise ConfigError("cruntime: checkpoint buffers must be C-contiguous (and writable to load); "
                              "use np.ascontiguousarray")
    bufs = (StateBuf * max(1, len(arrays)))(*[StateBuf(a.ctypes.data, a.nbytes, StateKind.STAT) for a in arrays])
    return StateList(bufs, len(arrays)), bufs


class Checkpoint:
    """An A/B checkpoint store (``et_ckpt``) on some storage; keeps that storage alive."""

    def __init__(self, lib: ctypes.CDLL, io: IO, slot_bytes: int, base: int = 0, keep: Any = None,
                 close: Callable[[], None] | None = None) -> None:
        self._lib, self._keep, self._close = lib, (io, keep), close
        self.ck = Ckpt()
        check(lib.et_ckpt_open(byref(self.ck), byref(io), base, slot_bytes), "et_ckpt_open")

    @classmethod
    def file(cls, lib: ctypes.CDLL, path: str | Path, slot_bytes: int, base: int = 0) -> "Checkpoint":
        """Slots in a POSIX file (created when missing; fsync is the durability barrier).

        Raises:
            CheckpointError: the file cannot be opened.
        """
        io, f = IO(), IOPosix(-1)
        check(lib.et_io_posix_open(byref(io), byref(f), str(path).encode()), f"opening {path}")
        return cls(lib, io, slot_bytes, base, keep=f, close=lambda: check(lib.et_io_posix_close(byref(f)), "close"))

    @classmethod
    def stdio(cls, lib: ctypes.CDLL, path: str | Path, slot_bytes: int, base: int = 0) -> "Checkpoint":
        """Slots in a C stdio file: the implementation bare-metal builds use over semihosting.

        Raises:
            CheckpointError: the file cannot be opened.
        """
        io, f = IO(), IOStdio()
        check(lib.et_io_stdio_open(byref(io), byref(f), str(path).encode()), f"opening {path}")
        return cls(lib, io, slot_bytes, base, keep=f, close=lambda: check(lib.et_io_stdio_close(byref(f)), "close"))

    @classmethod
    def memory(cls, lib: ctypes.CDLL, region: bytearray, slot_bytes: int, base: int = 0) -> "Checkpoint":
        """Slots in a memory region (the RAM/flash-region storage of bare-metal builds)."""
        io, m = IO(), IOMem()
        buf = (ctypes.c_char * len(region)).from_buffer(region)
        check(lib.et_io_mem_open(byref(io), byref(m), buf, len(region)), "et_io_mem_open")
        return cls(lib, io, slot_bytes, base, keep=(m, buf))

    @classmethod
    def callbacks(cls, lib: ctypes.CDLL, read: Callable[[int, int], bytes | None],
                  write: Callable[[int, bytes], bool], sync: Callable[[], bool], slot_bytes: int) -> "Checkpoint":
        """Slots in storage implemented in Python: ``read(offset, n) -> bytes | None``,
        ``write(offset, data) -> ok``, ``sync() -> ok`` (e.g. to inject power cuts in tests)."""

        def c_read(_ctx: Any, off: int, dst: int, n: int) -> int:
            data = read(off, n)
            if data is None or len(data) != n:
                return Status.E_IO
            ctypes.memmove(dst, data, n)
            return Status.OK

        def c_write(_ctx: Any, off: int, src: int, n: int) -> int:
            return Status.OK if write(off, ctypes.string_at(src, n)) else Status.E_IO

        fns = (READ_FN(c_read), WRITE_FN(c_write), SYNC_FN(lambda _ctx: Status.OK if sync() else Status.E_IO))
        return cls(lib, IO(*fns, None), slot_bytes, keep=fns)

    @property
    def newest_slot(self) -> int:
        """Slot (0/1) the last load/save found or wrote; -1 when none is valid."""
        return self.ck.newest

    def save(self, arrays: Sequence[np.ndarray], layout_id: int) -> int:
        """Write ``arrays`` into the older slot; returns the new sequence number.

        Raises:
            CheckpointError: the storage failed; ConfigError: the arrays do not fit a slot.
        """
        lst, keep = _state_list(arrays, writable=False)
        seq = c_uint32()
        check(self._lib.et_ckpt_save(byref(self.ck), byref(lst), 1, layout_id, byref(seq)), "et_ckpt_save")
        del keep
        return seq.value

    def load(self, arrays: Sequence[np.ndarray], layout_id: int) -> int | None:
        """Fill ``arrays`` from the newest valid slot; its sequence number, or None when no slot is
        valid (then the arrays are untouched).

        Raises:
            CheckpointError: the storage failed or changed while it was read.
        """
        lst, keep = _state_list(arrays, writable=True)
        seq = c_uint32()
        st = self._lib.et_ckpt_load(byref(self.ck), byref(lst), 1, layout_id, byref(seq))
        del keep
        if st == Status.E_NO_CHECKPOINT:
            return None
        check(st, "et_ckpt_load")
        return seq.value

    def close(self) -> None:
        if self._close is not None:
            self._close()
            self._close = None


# --- the per-sample driver ----------------------------------------------------------------------
@dataclass(frozen=True)
class Step:
    """What ``et_runtime_step`` reports for one sample (``prediction`` -1 when rejected)."""

    prediction: int
    loss: float
    momentum: float
    rejected: bool
    updated: bool
    early_exit: bool
    restored: bool
    snapshot: bool


class Runtime:
    """``et_runtime`` around the ``et_model`` that ``lib``'s function ``model_getter`` returns."""

    def __init__(self, lib: ctypes.CDLL, model_getter: str, *, adapt: bool = True, guard: bool = True,
                 momentum: tuple[float, float, float] = (0.0, 0.0, 0.0), rate: float = 0.02,
                 max_share: float = 0.8, every: int = 50, warmup: int = 100) -> None:
        """``momentum``: (start, decay, floor) of the EMA schedule; guard settings as ``CollapseGuard``.

        Raises:
            ConfigError: the model or settings are invalid (status E_ARG / E_CAPACITY).
        """
        self._lib = lib
        getter = getattr(lib, model_getter)
        getter.argtypes, getter.restype = [POINTER(POINTER(Model))], c_int
        ptr = POINTER(Model)()
        check(getter(byref(ptr)), model_getter)
        self.model = ptr
        need = c_uint32()
        check(lib.et_runtime_work_bytes(ptr, byref(need)), "et_runtime_work_bytes")
        self._work = (c_uint32 * max(1, (need.value + 3) // 4))()
        self._rt = (ctypes.c_uint64 * ((abi_size(lib, ABI_RUNTIME) + 7) // 8))()
        self._config = RuntimeConfig(MomentumSchedule(*momentum), GuardConfig(rate, max_share, every, warmup),
                                     int(adapt), int(guard), CLOCK_FN(), None)
        check(lib.et_runtime_init(self._rt, ptr, byref(self._config), self._work, ctypes.sizeof(self._work)),
              "et_runtime_init")

    @property
    def input_len(self) -> int:
        return self.model.contents.input_len

    @property
    def classes(self) -> int:
        return self.model.contents.classes

    def _input(self, x: np.ndarray | Sequence[float]) -> np.ndarray:
        v = _floats(x)
        if v.size != self.input_len:
            raise DataError(f"cruntime: sample has {v.size} values (expected {self.input_len}); "
                            "pass one sample of the model's input shape")
        return v

    def _result(self, st: int, r: StepResult, what: str) -> Step:
        if st != Status.E_INPUT:
            check(st, what)
        return Step(r.prediction, r.loss, r.momentum, st == Status.E_INPUT, bool(r.updated), bool(r.early_exit),
                    bool(r.restored), bool(r.snapshot))

    def step(self, x: np.ndarray | Sequence[float]) -> Step:
        """One unsupervised sample: predict, then adapt. A rejected sample gives ``rejected=True``.

        Raises:
            DataError: wrong number of values; ModelError: the model code failed.
        """
        v, r = self._input(x), StepResult()
        return self._result(self._lib.et_runtime_step(self._rt, v.ctypes.data_as(POINTER(c_float)), byref(r)),
                            r, "et_runtime_step")

    def feedback(self, x: np.ndarray | Sequence[float], label: int) -> Step:
        """Supervised feedback on an already scored sample (see ``et_runtime_feedback``).

        Raises:
            DataError: wrong number of values; ConfigError: label out of range; ModelError.
        """
        v, r = self._input(x), StepResult()
        return self._result(self._lib.et_runtime_feedback(self._rt, v.ctypes.data_as(POINTER(c_float)), label,
                                                          byref(r)), r, "et_runtime_feedback")

    def counters(self) -> dict[str, int]:
        c = Counters()
        check(self._lib.et_runtime_counters(self._rt, byref(c)), "et_runtime_counters")
        return {n: getattr(c, n) for n in COUNTER_NAMES}

    def state(self) -> list[np.ndarray]:
        """Views (float32) on the model's registered state buffers, in registration order."""
        m = self.model.contents
        out = []
        for i in range(m.state_count):
            b = m.state[i]
            out.append(np.ctypeslib.as_array((c_float * (b.bytes // 4)).from_address(b.data)))
        return out

    def state_kinds(self) -> list[StateKind]:
        m = self.model.contents
        return [StateKind(m.state[i].kind) for i in range(m.state_count)]

    def payload_bytes(self) -> int:
        n = c_uint32()
        check(self._lib.et_runtime_payload_bytes(self._rt, byref(n)), "et_runtime_payload_bytes")
        return n.value

    def save(self, ckpt: Checkpoint) -> int:
        """Persist the adapted state (and the runtime's schedule/guard/counters); the new sequence number.

        Raises:
            CheckpointError, ConfigError: storage failure or slots too small.
        """
        seq = c_uint32()
        check(self._lib.et_runtime_save(self._rt, byref(ckpt.ck), byref(seq)), "et_runtime_save")
        return seq.value

    def boot(self, ckpt: Checkpoint) -> int | None:
        """Load the newest valid checkpoint whose state is finite and whose counters are consistent
        (else the other valid slot); its sequence number, or None when there is no valid slot.

        Raises:
            CheckpointError: storage failure, a slot that changed while it was read, or every valid
                slot holding unusable state (the runtime must then be initialised again).
        """
        seq = c_uint32()
        st = self._lib.et_runtime_boot(self._rt, byref(ckpt.ck), byref(seq))
        if st == Status.E_NO_CHECKPOINT:
            return None
        check(st, "et_runtime_boot")
        return seq.value


__all__ = ["ABI_MIRRORS", "Checkpoint", "Guard", "Runtime", "StateKind", "Status", "Step", "abi_size", "build_shared",
           "check", "crc32", "first_bad_input", "load", "momentum_at", "slot_bytes"]
