"""The micro-kernels of ``targets/runtime/et_kernels_dsp.h`` one by one: Helium (MVE) on a simulated
Cortex-M55 (QEMU mps3-an547) and SMLAD on a Cortex-M4 (mps2-an386); every output byte equals onnxruntime's
formula for the layer (int32 accumulation, float32 requantisation rounded half to even), on shapes that
exercise the tail-predicated channel group (pointwise channel counts and conv window sizes K = 9 * cin
that are not multiples of 16), odd depthwise and conv sizes at stride 1 and 2 with any input zero point
as padding, exact ties (scale 0.5), saturation both ways and a tiny scale.

The whole-model check (a mcunet-s firmware on the Cortex-M55 = the host build = onnxruntime, per sample)
is ``tests/test_kernels_dsp.py``.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import needs_tool
from edgetune.targets import BOARD_DIR, RUNTIME_DIR, get_target

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_kernels.py"
# (cin, pixels, cout): mcunet-s's widest and narrowest pointwise layers, two tails (24, 40 % 16) and a 4-tail (20)
SHAPES = [(16, 64, 8), (24, 16, 6), (40, 8, 4), (256, 4, 4), (20, 8, 6)]
# (channels, height, width, stride): mcunet-s's depthwise shapes, odd sizes (tail lanes, odd output columns)
DEPTHWISE = [(4, 16, 16, 1), (4, 16, 16, 2), (6, 8, 8, 2), (5, 4, 4, 1), (3, 7, 9, 2), (3, 5, 6, 1), (2, 9, 7, 1)]
# (cin, height, width, cout, stride): the stems (K = 9), tiny-cnn's convs, a K with a 4-tail (K = 27 % 16)
CONV = [(1, 32, 32, 4, 2), (16, 8, 8, 4, 2), (32, 8, 8, 6, 1), (3, 7, 8, 2, 1), (4, 9, 7, 2, 2)]

PROLOGUE = """#pragma GCC optimize("O3", "fp-contract=off")
#include <stdint.h>
#include <stdio.h>
#include "et_board.h"
#if defined(__arm__) && !defined(__ARM_FEATURE_DIRECTED_ROUNDING)
static inline float et_nearbyintf(float x) {
  if (x < 8388608.0f && x > -8388608.0f) {
    float m = x >= 0.0f ? 8388608.0f : -8388608.0f;
    return (x + m) - m;
  }
  return x;
}
#else
#include <math.h>
#define et_nearbyintf nearbyintf
#endif
#include "et_kernels_dsp.h"
static int8_t y[4096];
"""


def _bench():
    spec = importlib.util.spec_from_file_location("bench_kernels", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _carr(ctype: str, name: str, values: np.ndarray) -> str:
    flat = np.asarray(values).reshape(-1)
    items = [float(v).hex() + "f" for v in flat] if ctype == "float" else [str(int(v)) for v in flat]
    return f"static const {ctype} {name}[] = {{{', '.join(items)}}};"


def _requant(acc: np.ndarray, scale: np.ndarray, zy: int) -> np.ndarray:
    f = np.clip(acc.astype(np.float32) * scale, np.float32(-128 - zy), np.float32(127 - zy))
    return (np.rint(f) + zy).astype(np.int8)


def _scales(rng: np.random.Generator, n: int) -> np.ndarray:
    scale = (rng.random(n) * 3e-3).astype(np.float32)
    scale[:4] = (0.5, 1e-6, 2.0, 0.25)[:n]  # exact ties, all zeros, saturation at both ends, ties again
    return scale


def _print(n: int) -> str:
    return f"  for (int j = 0; j < {n}; ++j) printf(\"%d \", y[j]);\n  printf(\"\\n\");"


def _conv_case(rng: np.random.Generator, cin: int, h: int, wd: int, cout: int, s: int) -> tuple:
    """A random 3x3 conv (stride ``s``, the input zero point as padding) and its requantised int8 output:
    (x, w OIHW, bias, scale, zx, zy, oh, ow, expected)."""
    x = rng.integers(-128, 128, (cin, h, wd), dtype=np.int8)
    w = rng.integers(-128, 128, (cout, cin, 3, 3), dtype=np.int8)
    bias = rng.integers(-5000, 5000, cout).astype(np.int32)
    scale, zx, zy = _scales(rng, cout), int(rng.integers(-128, 128)), int(rng.integers(-128, 128))
    oh, ow = (h - 1) // s + 1, (wd - 1) // s + 1
    xp = np.pad(x.astype(np.int64), ((0, 0), (1, 2), (1, 2)), constant_values=zx)
    win = np.stack([xp[:, ry:ry + (oh - 1) * s + 1:s, rx:rx + (ow - 1) * s + 1:s]
                    for ry in range(3) for rx in range(3)], axis=1)  # [cin][9][oh][ow]
    acc = np.einsum("ctyx,oct->oyx", win, w.reshape(cout, cin, 9).astype(np.int64)) + bias[:, None, None]
    return x, w, bias, scale, zx, zy, oh, ow, _requant(acc, scale[:, None, None], zy)


def _layers(rng: np.random.Generator) -> tuple[str, list[np.ndarray]]:
    """The C program's layer data and calls, and each layer's expected output (onnxruntime's formula)."""
    decls, calls, want = [], [], []
    for i, (cin, hw, cout) in enumerate(SHAPES):
        x = rng.integers(-128, 128, (cin, hw), dtype=np.int8)
        w = rng.integers(-128, 128, (cout, cin), dtype=np.int8)
        bias = rng.integers(-5000, 5000, cout).astype(np.int32)
        scale, zy = _scales(rng, cout), int(rng.integers(-20, 20))
        want.append(_requant(w.astype(np.int64) @ x.astype(np.int64) + bias[:, None], scale[:, None], zy))
        decls += [_carr("int8_t", f"x{i}", x), _carr("int8_t", f"w{i}", w), _carr("int32_t", f"b{i}", bias),
                  _carr("float", f"s{i}", scale)]
        calls.append(f"  if (et_dsp_pointwise_s8(x{i}, w{i}, b{i}, s{i}, y, {cin}, {hw}, {cout}, {zy})) return 1;\n"
                     + _print(hw * cout))
    for i, (ch, h, wd, s) in enumerate(DEPTHWISE):
        x = rng.integers(-128, 128, (ch, h, wd), dtype=np.int8)
        w = rng.integers(-128, 128, (ch, 3, 3), dtype=np.int8)
        bias = rng.integers(-5000, 5000, ch).astype(np.int32)
        scale, zx, zy = _scales(rng, ch), int(rng.integers(-128, 128)), int(rng.integers(-128, 128))
        oh, ow = (h - 1) // s + 1, (wd - 1) // s + 1  # padding 1 at the start, what the output needs at the end
        xp = np.pad(x.astype(np.int64), ((0, 0), (1, 2), (1, 2)), constant_values=zx)
        acc = np.zeros((ch, oh, ow), np.int64) + bias[:, None, None]
        for ry in range(3):
            for rx in range(3):
                acc += xp[:, ry:ry + (oh - 1) * s + 1:s, rx:rx + (ow - 1) * s + 1:s] * w[:, ry, rx, None, None]
        want.append(_requant(acc, scale[:, None, None], zy))
        decls += [_carr("int8_t", f"dx{i}", x), _carr("int8_t", f"dw{i}", w), _carr("int32_t", f"db{i}", bias),
                  _carr("float", f"ds{i}", scale)]
        calls.append(f"  if (et_dsp_depthwise3x3_s8(dx{i}, dw{i}, db{i}, ds{i}, y, {ch}, {h}, {wd}, {oh}, {ow}, {s}, "
                     f"{zx}, {zy})) return 1;\n" + _print(ch * oh * ow))
    for i, (cin, h, wd, cout, s) in enumerate(CONV):
        x, w, bias, scale, zx, zy, oh, ow, out = _conv_case(rng, cin, h, wd, cout, s)
        want.append(out)
        decls += [_carr("int8_t", f"cx{i}", x), _carr("int8_t", f"cw{i}", w), _carr("int32_t", f"cb{i}", bias),
                  _carr("float", f"cs{i}", scale)]
        calls.append(f"  if (et_dsp_conv3x3_s8(cx{i}, cw{i}, cb{i}, cs{i}, y, {cin}, {h}, {wd}, {cout}, {oh}, {ow}, "
                     f"{s}, {zx}, {zy})) return 1;\n" + _print(cout * oh * ow))
    for i, (cin, h, wd, cout, s) in enumerate(CONV[1:3]):  # the same convs with IHWO weights: Helium only
        x, w, bias, scale, zx, zy, oh, ow, out = _conv_case(rng, cin, h, wd, cout, s)
        want.append(out)
        decls += [_carr("int8_t", f"ix{i}", x), _carr("int8_t", f"iw{i}", w.transpose(1, 2, 3, 0)),
                  _carr("int32_t", f"ib{i}", bias), _carr("float", f"is{i}", scale)]
        calls.append(f"  if (et_dsp_conv3x3_ihwo_s8(ix{i}, iw{i}, ib{i}, is{i}, y, {cin}, {h}, {wd}, {cout}, {oh}, "
                     f"{ow}, {s}, {zx}, {zy})) {{ printf(\"no\\n\"); }} else {{\n" + _print(cout * oh * ow) + "\n  }")
    main = "int main(void) {\n" + "\n".join(calls) + "\n  return 0;\n}\n"
    return PROLOGUE + "\n".join(decls) + "\n" + main, want


@needs_tool("arm-none-eabi-gcc", "qemu-system-arm")
@pytest.mark.parametrize("target,simd", [("cortex-m55", ("vmladava.s8", "vcvtn.s32.f32", "vmla.s32")),
                                         ("cortex-m4", ("smlad", "vcvtr.s32.f32", "smlabb"))])
def test_micro_kernels_are_onnxruntime_bit_for_bit(tmp_path, target, simd):
    source, want = _layers(np.random.default_rng(15))
    (tmp_path / "main.c").write_text(source)
    bench = _bench()
    flags = get_target(target).toolchain.arch_flags
    asm = subprocess.run(["arm-none-eabi-gcc", *flags, "-std=c99", "-O2", f"-I{RUNTIME_DIR}",
                          f"-I{BOARD_DIR / 'cortex-m'}", "-S", str(tmp_path / "main.c"), "-o", "-"],
                         capture_output=True, text=True, check=True).stdout
    assert all(op in asm for op in simd)  # the core's SIMD path ran, not the plain C loops
    obj = bench._cc(tmp_path / "main.c", tmp_path / "main.o", "-O2", [BOARD_DIR / "cortex-m", RUNTIME_DIR],
                    target=target)
    rows = [r for r in bench.link_and_run([obj], tmp_path, target).splitlines() if r.strip()]
    assert len(rows) == len(want)
    ihwo = rows[-2:]  # IHWO weights: Helium runs them, other cores answer "no" (TVM's kernel runs instead)
    if target != "cortex-m55":
        assert ihwo == ["no", "no"]
        rows, want = rows[:-2], want[:-2]
    for shape, row, ref in zip(SHAPES + DEPTHWISE + CONV + CONV[1:3], rows, want):
        got = np.array(row.split(), dtype=np.int64).reshape(ref.shape)
        assert np.array_equal(got, ref), (shape, int(np.sum(got != ref)))
    values = set(np.concatenate([r.reshape(-1) for r in want]).tolist())
    assert {-128, 127} <= values  # the data reached both clamps
