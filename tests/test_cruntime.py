"""The C runtime, built for the host and driven through ctypes (edgetune.cruntime).

The runtime must agree with the Python reference where both exist (collapse guard, momentum
schedule), survive a power cut at any byte of a checkpoint write, and wire the per-sample
driver correctly. The model here is tests/c/fake_model.c: a hand-written stand-in for
generated code, only there to exercise the driver.
"""
from __future__ import annotations

import ctypes
import random
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest

from edgetune import cruntime as cr
from edgetune.errors import CheckpointError, ConfigError, DataError, ModelError
from edgetune.methods.base import CollapseGuard, ema_momentum
from edgetune.targets import RUNTIME_CFLAGS, RUNTIME_DIR, list_targets, runtime_sources

C_DIR = Path(__file__).parent / "c"
LAYOUT = 0x1234ABCD


@pytest.fixture(scope="module")
def lib() -> ctypes.CDLL:
    lib = cr.load(extra_sources=[C_DIR / "fake_model.c"], include_dirs=[C_DIR])
    lib.fake_model_init.argtypes = [ctypes.c_uint32, ctypes.c_float]
    lib.fake_model_sample.argtypes = [ctypes.c_uint32, ctypes.c_uint32, ctypes.POINTER(ctypes.c_float)]
    return lib


def sample(lib: ctypes.CDLL, stream: int, index: int) -> np.ndarray:
    x = np.zeros(16, np.float32)
    assert lib.fake_model_sample(stream, index, x.ctypes.data_as(ctypes.POINTER(ctypes.c_float))) == 0
    return x


def fake_runtime(lib: ctypes.CDLL, seed: int = 3, lr: float = 0.02, **kw) -> cr.Runtime:
    lib.fake_model_init(seed, lr)
    return cr.Runtime(lib, "fake_model_get", momentum=kw.pop("momentum", (0.1, 0.94, 0.005)), **kw)


# --- ABI, CRC, schedule, input checks -------------------------------------------------------------
def test_ctypes_mirrors_match_the_c_layout(lib):
    for which, mirror in enumerate(cr.ABI_MIRRORS):
        if mirror is not None:
            assert ctypes.sizeof(mirror) == cr.abi_size(lib, which), mirror.__name__
    with pytest.raises(ConfigError, match="E_ARG"):
        cr.abi_size(lib, len(cr.ABI_MIRRORS))


def test_crc32_is_zlib_compatible(lib):
    rng = np.random.default_rng(0)
    for n in (0, 1, 3, 4, 127, 128, 129, 1000):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert cr.crc32(lib, data) == zlib.crc32(data)


@pytest.mark.parametrize("start,decay,floor", [(0.1, 0.94, 0.005), (0.3, 0.99, 0.0), (1.0, 0.5, 0.25), (0.0, 0.0, 0.0)])
def test_momentum_schedule_matches_python_bit_for_bit(lib, start, decay, floor):
    for step in [*range(300), 1000, 10_000, 2**32 - 1]:
        want = np.float32(ema_momentum(step, start, decay, floor))
        assert np.float32(cr.momentum_at(lib, step, start, decay, floor)) == want, step


def test_momentum_schedule_rejects_values_outside_unit_interval(lib):
    for bad in [(1.5, 0.9, 0.0), (0.1, -0.1, 0.0), (0.1, 0.9, float("nan"))]:
        with pytest.raises(ConfigError, match="et_momentum_at failed"):
            cr.momentum_at(lib, 0, *bad)


def test_input_check_rejects_nan_inf_and_out_of_range(lib):
    x = np.linspace(-1, 1, 10).astype(np.float32)
    assert cr.first_bad_input(lib, x, -1.0, 1.0) is None  # bounds are inclusive
    for index, value in [(3, np.nan), (0, np.inf), (9, -np.inf), (5, 1.0001), (2, -2.0)]:
        y = x.copy()
        y[index] = value
        assert cr.first_bad_input(lib, y, -1.0, 1.0) == index
    y = x.copy()
    y[[4, 7]] = np.nan
    assert cr.first_bad_input(lib, y, -1.0, 1.0) == 4
    # infinite bounds still refuse infinities
    assert cr.first_bad_input(lib, np.array([0, np.inf], np.float32), -np.inf, np.inf) == 1
    with pytest.raises(ConfigError):
        cr.first_bad_input(lib, x, 1.0, -1.0)


# --- collapse guard: same verdicts as the Python reference -----------------------------------------
def _prediction_streams() -> list[tuple[int, list[int]]]:
    rng = random.Random(1)
    streams = [(10, [rng.randrange(10) for _ in range(600)])]
    # hovering around the 0.8 threshold: the float32 histogram decides, so both must round alike
    streams.append((4, [0 if rng.random() < 0.8 else rng.randrange(1, 4) for _ in range(3000)]))
    streams.append((2, [0] * 150 + [1] * 150 + [0, 1] * 100 + [1] * 400))
    streams.append((7, [3] * 1000))
    return streams


@pytest.mark.parametrize("settings", [{}, {"rate": 0.05, "max_share": 0.6, "every": 7, "warmup": 20}])
def test_guard_matches_python_collapse_guard(lib, settings):
    for classes, preds in _prediction_streams():
        ref = CollapseGuard(classes, **settings)
        guard = cr.Guard(lib, classes, **settings)
        verdicts = []
        for i, p in enumerate(preds):
            want, got = ref.observe(p), guard.observe(p)
            assert got == want, f"sample {i}: C says {got}, Python {want}"
            assert np.array_equal(guard.hist, ref.hist.numpy()), f"sample {i}: histograms differ"
            assert guard.seen == ref.seen
            verdicts.append(got)
        if classes == 7:
            # a collapsed stream restores once per warm-up
            assert verdicts.count("restore") == len(preds) // settings.get("warmup", 100)
    assert "snapshot" in verdicts and "restore" in verdicts


def test_guard_rejects_invalid_settings(lib):
    for bad in [{"rate": 0.0}, {"every": 0}, {"max_share": 1.5}]:
        with pytest.raises(ConfigError, match="et_guard_init"):
            cr.Guard(lib, 4, **bad)
    guard = cr.Guard(lib, 3)
    with pytest.raises(ConfigError, match="et_guard_observe"):
        guard.observe(3)


# --- A/B checkpoints ---------------------------------------------------------------------------------
def _state(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(7).astype(np.float32), rng.integers(-128, 127, 13, dtype=np.int8),
            rng.standard_normal((2, 3)).astype(np.float32)]


def _empty() -> list[np.ndarray]:
    return [np.zeros_like(a) for a in _state(0)]


def _payload() -> int:
    return sum(a.nbytes for a in _state(0))


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return all(x.tobytes() == y.tobytes() for x, y in zip(a, b))


def test_checkpoint_alternates_slots_and_boots_newest(lib, tmp_path):
    slot = cr.slot_bytes(_payload())
    ck = cr.Checkpoint.file(lib, tmp_path / "state.bin", slot)
    assert ck.load(_empty(), LAYOUT) is None  # first boot: nothing valid
    for seq in (1, 2, 3):
        assert ck.save(_state(seq), LAYOUT) == seq
        assert ck.newest_slot == (seq - 1) % 2
    ck.close()
    out = _empty()
    ck = cr.Checkpoint.file(lib, tmp_path / "state.bin", slot)
    assert ck.load(out, LAYOUT) == 3 and _same(out, _state(3))
    # another layout (a different model) or another payload length is never loaded
    assert ck.load(_empty(), LAYOUT + 1) is None
    assert ck.load(_empty()[:2], LAYOUT) is None
    ck.close()


def test_every_storage_backend_holds_the_same_slots(lib, tmp_path):
    slot = cr.slot_bytes(_payload())
    region = bytearray(2 * slot)
    stores = [cr.Checkpoint.file(lib, tmp_path / "posix.bin", slot), cr.Checkpoint.stdio(lib, tmp_path / "c.bin", slot),
              cr.Checkpoint.memory(lib, region, slot)]
    for ck in stores:
        assert ck.save(_state(1), LAYOUT) == 1 and ck.save(_state(2), LAYOUT) == 2
        ck.close()
    posix = (tmp_path / "posix.bin").read_bytes()  # a file ends after slot 1's payload, the region does not
    assert posix == (tmp_path / "c.bin").read_bytes() == bytes(region[:len(posix)])
    assert not any(region[len(posix):])
    out = _empty()
    ck = cr.Checkpoint.stdio(lib, tmp_path / "c.bin", slot)
    assert ck.load(out, LAYOUT) == 2 and _same(out, _state(2))
    ck.close()
    small = cr.Checkpoint.memory(lib, bytearray(slot + 10), slot)
    assert small.save(_state(1), LAYOUT) == 1  # slot 0 fits
    with pytest.raises(CheckpointError, match="E_IO"):  # slot 1 lies past the region's end
        small.save(_state(2), LAYOUT)


def test_checkpoint_file_format_is_the_documented_header(lib, tmp_path):
    slot = cr.slot_bytes(_payload())
    ck = cr.Checkpoint.file(lib, tmp_path / "state.bin", slot)
    ck.save(_state(1), LAYOUT)
    ck.save(_state(2), LAYOUT)
    ck.close()
    raw = (tmp_path / "state.bin").read_bytes()
    for index, seq in ((0, 1), (1, 2)):
        s = raw[index * slot:(index + 1) * slot]
        magic, version, got_seq, length, layout, crc = struct.unpack_from("<4sIIIII", s)
        payload = s[24:24 + length]
        assert (magic, version, got_seq, length, layout) == (b"ETCK", 1, seq, _payload(), LAYOUT)
        assert crc == zlib.crc32(s[4:20] + payload)
        assert payload == b"".join(a.tobytes() for a in _state(seq))


def test_checkpoint_sequence_numbers_survive_wraparound(lib):
    payload = b"".join(a.tobytes() for a in _state(5))
    slot = cr.slot_bytes(len(payload))
    region = bytearray(2 * slot)
    fields = struct.pack("<IIII", 1, 0xFFFFFFFF, len(payload), LAYOUT)
    region[:24 + len(payload)] = b"ETCK" + fields + struct.pack("<I", zlib.crc32(fields + payload)) + payload
    ck = cr.Checkpoint.memory(lib, region, slot)
    out = _empty()
    assert ck.load(out, LAYOUT) == 0xFFFFFFFF and _same(out, _state(5))
    assert ck.save(_state(6), LAYOUT) == 1  # 0 means "none": the successor of 2**32-1 is 1
    ck = cr.Checkpoint.memory(lib, region, slot)
    assert ck.load(out, LAYOUT) == 1 and _same(out, _state(6))


def test_checkpoint_refuses_state_larger_than_a_slot(lib, tmp_path):
    ck = cr.Checkpoint.file(lib, tmp_path / "small.bin", cr.slot_bytes(_payload()) - 8)
    with pytest.raises(ConfigError, match="E_CAPACITY"):
        ck.save(_state(1), LAYOUT)
    with pytest.raises(CheckpointError, match="E_IO"):
        cr.Checkpoint.file(lib, tmp_path / "missing-dir" / "x.bin", 64)


class PowerCutStorage:
    """Storage that dies after `budget` more bytes: the write in flight lands partially, later
    writes and syncs fail. With lose_unsynced, whatever was written since the last sync may
    also be lost (a random subset of those writes survives), as with a disk cache."""

    def __init__(self, image: bytearray, budget: int | None, lose_unsynced: random.Random | None = None) -> None:
        self.live, self.durable = image, bytearray(image)
        self.budget, self.rng, self.pending = budget, lose_unsynced, []
        self.dead = False
        self.written = 0

    def read(self, off: int, n: int) -> bytes | None:
        return None if self.dead or off + n > len(self.live) else bytes(self.live[off:off + n])

    def write(self, off: int, data: bytes) -> bool:
        if self.dead:
            return False
        if self.budget is not None and self.written + len(data) > self.budget:
            data = data[:self.budget - self.written]
            self.dead = True
        self.live[off:off + len(data)] = data
        self.pending.append((off, data))
        self.written += len(data)
        return not self.dead

    def sync(self) -> bool:
        if not self.dead:
            self.durable, self.pending = bytearray(self.live), []
        return not self.dead

    def after_cut(self) -> bytearray:
        if self.rng is None:
            return bytearray(self.live)
        image = bytearray(self.durable)
        for off, data in self.pending:
            if self.rng.random() < 0.5:
                image[off:off + len(data)] = data
        return image

    def checkpoint(self, lib: ctypes.CDLL, slot: int) -> cr.Checkpoint:
        return cr.Checkpoint.callbacks(lib, self.read, self.write, self.sync, slot)


@pytest.mark.parametrize("lose_unsynced", [False, True])
def test_power_cut_at_every_byte_of_a_save_boots_the_previous_slot(lib, lose_unsynced):
    slot = cr.slot_bytes(_payload())
    image = bytearray(2 * slot)
    setup = PowerCutStorage(image, None).checkpoint(lib, slot)
    setup.save(_state(1), LAYOUT)  # slot 0
    setup.save(_state(2), LAYOUT)  # slot 1: the newest; the next save overwrites slot 0
    probe = PowerCutStorage(bytearray(image), None)
    probe.checkpoint(lib, slot).save(_state(3), LAYOUT)
    total = probe.written
    assert total >= _payload() + 24
    rng = random.Random(7) if lose_unsynced else None
    for cut in range(total + 1):
        storage = PowerCutStorage(bytearray(image), cut, rng)
        ck = storage.checkpoint(lib, slot)
        ck.load(_empty(), LAYOUT)  # boot, as the device would before saving
        if cut < total:
            with pytest.raises(CheckpointError, match="E_IO"):
                ck.save(_state(3), LAYOUT)
        else:
            assert ck.save(_state(3), LAYOUT) == 3
        # reboot on what survived the cut
        after = storage.after_cut() if cut < total else storage.live
        out = _empty()
        seq = PowerCutStorage(after, None).checkpoint(lib, slot).load(out, LAYOUT)
        if cut < total:
            assert seq == 2 and _same(out, _state(2)), f"cut after {cut} bytes"
        else:
            assert seq == 3 and _same(out, _state(3))
        if cut in (0, total // 2, total - 1):
            # the device goes on: its next save must not touch the surviving slot
            again = PowerCutStorage(after, None).checkpoint(lib, slot)
            again.load(_empty(), LAYOUT)
            assert again.save(_state(4), LAYOUT) == 3
            out = _empty()
            assert again.load(out, LAYOUT) == 3 and _same(out, _state(4))


def test_corrupt_or_truncated_newest_slot_boots_the_previous(lib, tmp_path):
    slot = cr.slot_bytes(_payload())
    path = tmp_path / "state.bin"
    ck = cr.Checkpoint.file(lib, path, slot)
    ck.save(_state(1), LAYOUT)
    ck.save(_state(2), LAYOUT)  # newest, in slot 1
    ck.close()
    good = path.read_bytes()
    used = 24 + _payload()
    for pos in range(slot, slot + used):  # flip each byte of the newest slot in turn
        bad = bytearray(good)
        bad[pos] ^= 0x40
        path.write_bytes(bytes(bad))
        ck, out = cr.Checkpoint.file(lib, path, slot), _empty()
        assert ck.load(out, LAYOUT) == 1 and _same(out, _state(1)), f"byte {pos - slot} flipped"
        ck.close()
    for length in (slot, slot + 3, slot + 24, slot + used - 1):  # the file ends inside the newest slot
        path.write_bytes(good[:length])
        ck, out = cr.Checkpoint.file(lib, path, slot), _empty()
        assert ck.load(out, LAYOUT) == 1 and _same(out, _state(1)), f"truncated at {length}"
        ck.close()
    path.write_bytes(good[:used - 1])  # the older slot is damaged too: nothing to boot
    ck = cr.Checkpoint.file(lib, path, slot)
    assert ck.load(_empty(), LAYOUT) is None
    ck.close()


# --- the per-sample driver, with the fake model -------------------------------------------------------
def test_driver_wires_schedule_statistics_counters_and_rejections(lib):
    rt = fake_runtime(lib, seed=1, lr=0.005)
    model = rt.model.contents
    kinds = rt.state_kinds()
    assert kinds == [cr.StateKind.PARAM, cr.StateKind.PARAM, cr.StateKind.OPTIM, cr.StateKind.OPTIM,
                     cr.StateKind.STAT]
    accepted = exits = 0
    for i in range(120):
        x = sample(lib, 0, i)
        mean_before = rt.state()[4].copy()
        w_before = rt.state()[0].copy()
        r = rt.step(x)
        if not np.isfinite(x).all() or np.abs(x).max() > 4:
            assert r.rejected and r.prediction == -1 and not r.updated
            assert np.array_equal(rt.state()[4], mean_before) and np.array_equal(rt.state()[0], w_before)
            continue
        m = np.float32(ema_momentum(accepted, 0.1, 0.94, 0.005))
        assert not r.rejected and r.updated and r.momentum == m
        taps = np.ctypeslib.as_array(model.taps, (8,))
        want = np.float32(1 - m) * mean_before + m * taps  # the fake model's EMA, float32 like C
        assert np.array_equal(rt.state()[4], want)
        assert not np.array_equal(rt.state()[0], w_before)  # train_step ran
        accepted += 1
        exits += r.early_exit
    c = rt.counters()
    assert c["samples"] == 120 and c["rejected"] == 120 - accepted == 3
    assert c["updates"] == accepted and c["labelled"] == 0 and c["early_exits"] == exits


def test_driver_guard_restores_last_good_weights_and_clears_optimizer(lib):
    rt = fake_runtime(lib, seed=3, lr=0.02)
    ref = CollapseGuard(4)
    good = [a.copy() for a in rt.state()[:2]]  # the weights at start are the first good ones
    restores = 0
    for i in range(300):
        r = rt.step(sample(lib, 0, i))
        if r.rejected:
            continue
        verdict = ref.observe(r.prediction)
        assert (r.restored, r.snapshot) == (verdict == "restore", verdict == "snapshot"), f"sample {i}"
        state = rt.state()
        if r.snapshot:
            good = [a.copy() for a in state[:2]]
        if r.restored:
            restores += 1
            assert all(np.array_equal(a, g) for a, g in zip(state[:2], good))
            assert not state[2].any() and not state[3].any()  # SGD momentum cleared
            assert state[4].any()  # running statistics are kept
    assert restores == rt.counters()["restores"] >= 1


def test_driver_without_adaptation_or_guard(lib):
    rt = fake_runtime(lib, seed=3, lr=0.02, adapt=False)
    before = [a.copy() for a in rt.state()]
    for i in range(60):
        r = rt.step(sample(lib, 1, i))
        assert r.momentum == 0 and not r.updated
    assert all(np.array_equal(a, b) for a, b in zip(rt.state(), before))  # source behaviour: nothing moves
    assert rt.counters()["updates"] == 0
    rt = fake_runtime(lib, seed=3, lr=0.02, guard=False)
    for i in range(300):
        rt.step(sample(lib, 1, i))  # the collapsing stream
    assert rt.counters()["restores"] == 0 and rt.counters()["snapshots"] == 0


def test_feedback_updates_weights_but_not_statistics_schedule_or_guard(lib):
    rt = fake_runtime(lib, seed=1, lr=0.005)
    for i in range(5):
        rt.step(sample(lib, 0, i))
    mean, w = rt.state()[4].copy(), rt.state()[0].copy()
    r = rt.feedback(sample(lib, 0, 5), label=1)
    assert r.updated and r.momentum == 0 and r.loss > 0
    assert np.array_equal(rt.state()[4], mean) and not np.array_equal(rt.state()[0], w)
    assert rt.step(sample(lib, 0, 6)).momentum == np.float32(ema_momentum(5, 0.1, 0.94, 0.005))
    assert rt.counters()["labelled"] == 1
    with pytest.raises(ConfigError, match="et_runtime_feedback"):
        rt.feedback(sample(lib, 0, 7), label=4)


def test_driver_refuses_wrong_sizes_and_reports_diverged_models(lib):
    rt = fake_runtime(lib)
    with pytest.raises(DataError, match="expected 16"):
        rt.step(np.zeros(15, np.float32))
    rt.state()[0][:] = np.nan  # diverged weights: NaN logits must not become a prediction
    with pytest.raises(ModelError, match="E_MODEL"):
        rt.step(sample(lib, 0, 0))


def test_reboot_from_checkpoint_resumes_exactly(lib, tmp_path):
    """Save at a healthy moment, keep going; a 'rebooted' runtime loading that save and fed the
    same samples must make the same predictions and end in the same state, bit for bit."""
    rt = fake_runtime(lib, seed=1, lr=0.005)
    ck = cr.Checkpoint.file(lib, tmp_path / "rt.bin", cr.slot_bytes(rt.payload_bytes()))
    assert rt.boot(ck) is None
    i = 0
    while True:
        r = rt.step(sample(lib, 0, i))
        i += 1
        if r.snapshot and i >= 100:
            break
    assert rt.save(ck) == 1
    saved = [a.copy() for a in rt.state()]
    counters = rt.counters()
    tail = [rt.step(sample(lib, 0, j)).prediction for j in range(i, i + 150)]
    final = [a.copy() for a in rt.state()]
    ck.close()

    rt2 = fake_runtime(lib, seed=1, lr=0.005)  # same frozen part (flash); the boot must replace all state
    for buf in rt2.state():
        buf[:] = np.random.default_rng(0).standard_normal(buf.shape)
    ck2 = cr.Checkpoint.file(lib, tmp_path / "rt.bin", cr.slot_bytes(rt2.payload_bytes()))
    assert rt2.boot(ck2) == 1
    assert all(np.array_equal(a, b) for a, b in zip(rt2.state(), saved))
    assert rt2.counters() == counters
    assert [rt2.step(sample(lib, 0, j)).prediction for j in range(i, i + 150)] == tail
    assert all(np.array_equal(a, b) for a, b in zip(rt2.state(), final))
    assert rt2.save(ck2) == 2
    ck2.close()


# --- one source for every target ------------------------------------------------------------------------
@pytest.mark.toolchain
@pytest.mark.parametrize("target", [t for t in list_targets()], ids=lambda t: t.name)
def test_runtime_compiles_warning_free_for_every_target(target, tmp_path):
    cc = shutil.which(target.toolchain.cc)
    if cc is None:
        pytest.skip(f"{target.toolchain.cc} not installed")
    cmd = [cc, *target.toolchain.compile_flags, *RUNTIME_CFLAGS, "-pedantic", "-Wshadow", "-Wconversion",
           f"-I{RUNTIME_DIR}", "-c", *map(str, runtime_sources())]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    size = shutil.which(target.toolchain.size)
    if target.kind == "mcu" and size:
        # the conv micro-kernels (et_kernels_dsp.c) are the model's kernels, not the runtime: their size
        # depends on the core's SIMD path (Helium's are the largest) and is the model's flash
        objs = sorted(str(p) for p in tmp_path.glob("*.o") if p.name != "et_kernels_dsp.o")
        lines = subprocess.run([size, "-t", *objs], capture_output=True, text=True, check=True).stdout.splitlines()
        text, data, bss = (int(v) for v in lines[-1].split()[:3])
        assert data == 0 and bss == 0  # no global state: everything lives in the caller's structs
        assert text < 8 * 1024
