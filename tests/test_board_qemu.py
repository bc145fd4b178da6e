"""Board support + the C runtime on simulated Cortex-M hardware (qemu-system-arm).

A test firmware (tests/c/fw_main.c: runtime + tests/c/fake_model.c + board support) is built
with arm-none-eabi-gcc from each microcontroller target's data and run under QEMU with
``-semihosting -icount shift=0``: SysTick counts guest instructions, the stack is painted at
reset, checkpoints go through semihosting files, and QEMU is killed in the middle of one.
"""
from __future__ import annotations

import ctypes
import shutil
import struct
import subprocess
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from edgetune import cruntime as cr
from edgetune.targets import RUNTIME_CFLAGS, Target, get_target, runtime_sources

C_DIR = Path(__file__).parent / "c"
MCUS = ["cortex-m4", "cortex-m7", "cortex-m55"]

pytestmark = [
    pytest.mark.toolchain,
    pytest.mark.skipif(shutil.which("qemu-system-arm") is None or shutil.which("arm-none-eabi-gcc") is None,
                       reason="qemu-system-arm and arm-none-eabi-gcc are needed (apt install qemu-system-arm "
                              "gcc-arm-none-eabi libnewlib-arm-none-eabi)"),
]


def build_firmware(target: Target, sources: list[Path], out: Path, defines: tuple[str, ...] = (),
                   runtime: bool = True) -> subprocess.CompletedProcess[str]:
    """Compile and link ``sources`` (+ the runtime) + the board support into ``out/fw.elf``, with
    the target's flags and its budget in the linker script."""
    assert target.board is not None
    tc = target.toolchain
    out.mkdir(parents=True, exist_ok=True)
    (out / "fw.ld").write_text(target.linker_script())
    incs = [f"-I{d}" for d in (*target.board.include_dirs, C_DIR)]
    all_sources = [*sources, *(runtime_sources() if runtime else []), *target.board.sources()]
    cmd = [tc.cc, *tc.compile_flags, *RUNTIME_CFLAGS, *incs, *defines, *map(str, all_sources), *tc.link_flags,
           "-T", str(out / "fw.ld"), f"-Wl,-Map={out / 'fw.map'}", "-o", str(out / "fw.elf"), *tc.libs]
    return subprocess.run(cmd, capture_output=True, text=True)


def run(target: Target, elf: Path, args: list[str], cwd: Path, timeout: float = 120) -> list[str]:
    proc = subprocess.run(target.simulator_command(elf, args), cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"QEMU exit {proc.returncode}: {proc.stdout[-2000:]} {proc.stderr[-2000:]}"
    return proc.stdout.splitlines()


def line(lines: list[str], tag: str) -> list[str]:
    found = [ln.split()[1:] for ln in lines if ln.startswith(tag + " ") or ln == tag]
    assert len(found) == 1, f"expected one {tag} line in {lines[-20:]}"
    return found[0]


@pytest.fixture(scope="module")
def firmware(tmp_path_factory) -> dict[str, Path]:
    built = {}
    for name in MCUS:
        out = tmp_path_factory.mktemp(name)
        proc = build_firmware(get_target(name), [C_DIR / "fw_main.c", C_DIR / "fake_model.c"], out)
        assert proc.returncode == 0, proc.stderr
        built[name] = out / "fw.elf"
    return built


@pytest.mark.parametrize("name", MCUS)
def test_systick_counts_guest_instructions(firmware, name, tmp_path):
    """A loop of exactly 2 instructions per iteration, timed with SysTick: the target's clock_hz
    must turn ticks into instructions (DESIGN section 8: to 0.1%)."""
    target = get_target(name)
    for n in (100_000, 3_000_000):  # the second run wraps the 24-bit SysTick counter
        got_n, ticks = map(int, line(run(target, firmware[name], ["calib", str(n)], tmp_path), "CALIB"))
        insns = target.ticks_to_instructions(ticks)
        assert got_n == n
        assert abs(insns - 2 * n) <= max(0.001 * 2 * n, 2 * target.ticks_to_instructions(1)), (ticks, insns)


def host_run(stream: int, n: int, seed: int, lr: float) -> tuple[list[int], dict[str, int], list[np.ndarray]]:
    lib = cr.load(extra_sources=[C_DIR / "fake_model.c"], include_dirs=[C_DIR])
    lib.fake_model_init.argtypes = [ctypes.c_uint32, ctypes.c_float]
    lib.fake_model_sample.argtypes = [ctypes.c_uint32, ctypes.c_uint32, ctypes.POINTER(ctypes.c_float)]
    lib.fake_model_init(seed, lr)
    rt = cr.Runtime(lib, "fake_model_get", momentum=(0.1, 0.94, 0.005))
    preds = []
    for i in range(n):
        x = np.zeros(16, np.float32)
        lib.fake_model_sample(stream, i, x.ctypes.data_as(ctypes.POINTER(ctypes.c_float)))
        preds.append(rt.step(x).prediction)
    return preds, rt.counters(), [a.copy() for a in rt.state()]


@pytest.mark.parametrize("name", MCUS)
def test_firmware_runtime_matches_the_host_build(firmware, name, tmp_path):
    """300 streaming samples with adaptation and the collapse guard: same predictions, counters
    and (within 1e-4) adapted state as the same C compiled for the host; plus the measurements."""
    target = get_target(name)
    seed, lr_e4, n = 3, 200, 300
    lines = run(target, firmware[name], ["run", "0", str(n), str(seed), str(lr_e4)], tmp_path)
    preds = [int(ln.split()[2]) for ln in lines if ln.startswith("S ")]
    want_preds, want_counters, want_state = host_run(0, n, seed, np.float32(lr_e4 * 1e-4))
    assert preds == want_preds
    counters = dict(zip(cr.COUNTER_NAMES, map(int, line(lines, "COUNTERS"))))
    assert counters == want_counters and counters["restores"] >= 1 and counters["rejected"] >= 1
    words = np.array([int(w, 16) for w in line(lines, "STATE")], dtype=np.uint32).view(np.float32)
    assert np.allclose(words, np.concatenate([a.reshape(-1) for a in want_state]), atol=1e-4, rtol=0)

    accepted, total, frozen, method, guard = map(int, line(lines, "TICKS"))
    per_sample = target.ticks_to_instructions(total) / accepted
    parts = [target.ticks_to_instructions(t) / accepted for t in (frozen, method, guard)]
    assert 0 < sum(parts) <= per_sample  # the phases are inside the step
    assert 200 < per_sample < 20_000  # a 16->8->4 toy: hundreds to a few thousand instructions
    used, size = map(int, line(lines, "STACK"))
    assert 0 < used < size and used < 2048  # painted at reset; runtime + model stay small
    runtime = per_sample - parts[0] - parts[1]  # everything but the model's own code
    print(f"\n{name}: {per_sample:.0f} instructions/sample: model frozen {parts[0]:.0f} + method {parts[1]:.0f}, "
          f"runtime {runtime:.0f} (of which argmax + guard {parts[2]:.0f}); stack high-water {used} of {size} bytes")


def read_slots(path: Path) -> dict[int, int]:
    """Slot index -> sequence number of every valid slot, parsed on the host with zlib (an
    independent reader of the documented format)."""
    raw = path.read_bytes()
    payload = struct.unpack_from("<I", raw, 12)[0] if len(raw) >= 24 else 0
    slot = cr.slot_bytes(payload)
    valid = {}
    for index in (0, 1):
        s = raw[index * slot:(index + 1) * slot]
        if len(s) < 24:
            continue
        magic, version, seq, length, _layout, crc = struct.unpack_from("<4sIIIII", s)
        body = s[24:24 + length]
        if magic == b"ETCK" and version == 1 and len(body) == length and zlib.crc32(s[4:20] + body) == crc:
            valid[index] = seq
    return valid


@pytest.mark.parametrize("name", ["cortex-m4"])
def test_power_cut_during_a_checkpoint_write_resumes_from_the_previous_slot(firmware, name, tmp_path):
    target, elf = get_target(name), firmware[name]
    assert line(run(target, elf, ["persist", "state.bin", "0", "100"], tmp_path), "BOOT") == ["none"]
    lines = run(target, elf, ["persist", "state.bin", "100", "100"], tmp_path)
    assert line(lines, "BOOT")[0] == "1"
    seq, good = line(lines, "SAVED")
    payload = int(line(lines, "SAVING")[0])
    assert seq == "2" and read_slots(tmp_path / "state.bin") == {0: 1, 1: 2}
    pristine = (tmp_path / "state.bin").read_bytes()
    # bytes a save writes: 4 (magic cleared) + payload + 20 (header) + 4 (magic): cut in each part
    for cut in (2, 4 + payload // 2, 4 + payload + 10, 4 + payload + 20 + 2):
        (tmp_path / "state.bin").write_bytes(pristine)
        proc = subprocess.Popen(target.simulator_command(elf, ["persist", "state.bin", "200", "100", str(cut)]),
                                cwd=tmp_path, stdout=subprocess.PIPE, text=True)
        seen, deadline = [], time.monotonic() + 60
        try:
            assert proc.stdout is not None
            for out in proc.stdout:  # the firmware flushed the partial write and now spins
                seen.append(out.strip())
                if out.startswith("CUT") or time.monotonic() > deadline:
                    break
        finally:
            proc.kill()  # the power cut
            proc.wait()
        assert seen[-1] == f"CUT {cut}", seen
        assert (tmp_path / "state.bin").read_bytes() != pristine  # the write really started
        assert read_slots(tmp_path / "state.bin") == {1: 2}  # slot 0 (older) torn, slot 1 intact
        boot = line(run(target, elf, ["persist", "state.bin", "200", "0"], tmp_path), "BOOT")
        assert boot == ["2", good], f"cut after {cut} bytes"
    # and without a cut the same save completes and becomes the newest
    (tmp_path / "state.bin").write_bytes(pristine)
    lines = run(target, elf, ["persist", "state.bin", "200", "100"], tmp_path)
    assert line(lines, "SAVED")[0] == "3" and read_slots(tmp_path / "state.bin") == {0: 3, 1: 2}


BIG_MAIN = """
#include <stdint.h>
#ifdef IN_RAM
static volatile uint8_t big[BIG_BYTES];
#else
const uint8_t big[BIG_BYTES] = {1};
#endif
int main(void) { return (int)((const volatile uint8_t *)big)[BIG_BYTES - 1]; }
"""


@pytest.mark.parametrize("name", MCUS)
def test_linker_script_refuses_firmware_over_the_budget(name, tmp_path):
    target = get_target(name)
    assert target.board is not None and target.ram_bytes is not None and target.flash_bytes is not None
    src = tmp_path / "big.c"
    src.write_text(BIG_MAIN)
    reserved = target.board.stack_bytes + target.board.heap_bytes
    cases = [("ram-over", ["-DIN_RAM", f"-DBIG_BYTES={target.ram_bytes}"], "region `RAM' overflowed"),
             ("ram-fits", ["-DIN_RAM", f"-DBIG_BYTES={target.ram_bytes - reserved - 8192}"], None),
             ("flash-over", [f"-DBIG_BYTES={target.flash_bytes}"], "region `FLASH' overflowed"),
             ("flash-fits", [f"-DBIG_BYTES={target.flash_bytes - 64 * 1024}"], None)]
    for case, defines, error in cases:
        proc = build_firmware(target, [src], tmp_path / case, tuple(defines), runtime=False)
        if error is None:
            assert proc.returncode == 0, f"{case}: {proc.stderr}"
        else:
            assert proc.returncode != 0 and error in proc.stderr, f"{case}: {proc.stderr}"


OVERFLOW_MAIN = """
#include <stdint.h>
#include <stdio.h>
static volatile uint32_t sink;
static void recurse(uint32_t n) {
  volatile uint32_t frame[64];
  frame[0] = n;
  sink = frame[0];
  if (n) recurse(n - 1);
  sink += frame[1];
}
int main(void) {
  printf("start\\n");
  fflush(stdout);
  recurse(1000000u);
  printf("survived\\n");
  return 0;
}
"""


@pytest.mark.parametrize("name", MCUS)
def test_stack_overflow_stops_the_simulation_with_an_error(name, tmp_path):
    """The stack guard (MPU region on v7-M, MSPLIM on v8-M) turns an overflow into a fault, and a
    fault ends QEMU with exit status 1 and a message instead of hanging or corrupting memory."""
    target = get_target(name)
    src = tmp_path / "overflow.c"
    src.write_text(OVERFLOW_MAIN)
    proc = build_firmware(target, [src], tmp_path / "fw", runtime=False)
    assert proc.returncode == 0, proc.stderr
    run_ = subprocess.run(target.simulator_command(tmp_path / "fw" / "fw.elf"), capture_output=True, text=True,
                          timeout=60)
    assert run_.returncode == 1 and "survived" not in run_.stdout
    assert "edgetune board: fault" in run_.stdout + run_.stderr
