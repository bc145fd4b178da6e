"""Cortex-M4 instructions per MAC of edgetune's int8 kernels, layer by layer and per kind (stem,
depthwise, pointwise, other convs, residual add, fully connected), at -O2, -O3 and -Os, next to Arm's
CMSIS-NN s8 kernels run on the same layers (same shapes, weights, biases and quantisation); and the same
on a Cortex-M55 with Helium (``--targets``, QEMU mps3-an547), compared with the Cortex-M4 in the same run.

Everything runs in ``qemu-system-arm -M mps2-an386 -icount shift=0`` (one guest instruction = 1 ns,
SysTick ticks = instructions / 40 at the board's 25 MHz), the method of ``benchmarks/bench_mcu.py``:

* edgetune: the frozen backbone compiled to C (``compile_frozen(..., "c")``), its driver built with
  ``-DEDGETUNE_PROFILE`` so every kernel call is timed, the kernels at each -O level, the rest at -O2;
  one real test image through the whole backbone.
* CMSIS-NN: built from a source folder (``--cmsis-nn DIR``; never part of this repository) at -O2, -O3
  and -Os; each conv / add of the model through ``arm_convolve_wrapper_s8``,
  ``arm_depthwise_conv_wrapper_s8`` or ``arm_elementwise_add_s8`` (NHWC, the layout it wants) on the
  activations the same image produces, requantisation parameters from the model's float scales the
  way TFLite derives them (Q31 multiplier + shift). Its outputs are compared with onnxruntime's
  integer formula (``int8_math``), which edgetune's kernels reproduce bit for bit
  (tests/test_compile_frozen.py): the table counts the outputs that differ and by how much.

The timer hook costs a constant that is measured in the same run and subtracted. Not a test.

    python benchmarks/bench_kernels.py --cmsis-nn ~/src/CMSIS-NN           # mcunet-s and tiny-cnn, M4 and M55
    python benchmarks/bench_kernels.py --quick                               # tiny-cnn, -O2/-O3, 1 rep
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from edgetune.compilers import compile_frozen
from edgetune.compilers import int8_math as im
from edgetune.compilers.emit_c import CTYPES
from edgetune.compilers.schedule import family_of
from edgetune.targets import BOARD_DIR, RUNTIME_DIR, get_target

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"mcunet-s": ("mcunet-s-digits", "digits"), "tiny-cnn": ("tiny-cnn-fashion-mnist", "fashion-mnist")}
LEVELS = ("-O2", "-O3", "-Os")
KINDS = ("stem", "pointwise", "depthwise", "conv", "add", "fc")
CMSIS_DIRS = ("ConvolutionFunctions", "NNSupportFunctions", "BasicMathFunctions", "TransposeFunctions")
MACHINE_MEMORY = {"mps2-an386": ("4M", "4M"), "mps3-an547": ("2M", "512K")}  # code, data: all QEMU has
F32 = np.float32


# --- the model's layers, read from frozen.onnx (QDQ) --------------------------------------------
@dataclass
class Layer:
    """One conv or residual add of the frozen graph with everything a kernel needs (NCHW, OIHW)."""

    index: int
    kind: str
    name: str
    out_shape: tuple[int, ...]
    macs: int  # for an add: output elements
    x: np.ndarray = field(repr=False)  # int8 input (the activation one test image produces)
    y: np.ndarray = field(repr=False)  # int8 output by onnxruntime's formula
    params: dict = field(repr=False, default_factory=dict)


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def _sat8(r: np.ndarray, zp: int) -> np.ndarray:
    return np.clip(r + zp, -128, 127).astype(np.int8)


def conv_reference(x: np.ndarray, zx: int, w: np.ndarray, bias: np.ndarray, scale: np.ndarray, zy: int,
                   strides: tuple[int, int], pads: tuple[int, int, int, int], groups: int) -> np.ndarray:
    """QLinearConv as onnxruntime computes it: int32 ``sum((x - zx) * w) + B``, then
    ``sat8(rne(float32(acc) * S) + zy)`` (``int8_math``)."""
    c, _, _ = x.shape
    o, cpg, kh, kw = w.shape
    top, left, bottom, right = pads
    xp = np.pad(x.astype(np.int64) - zx, ((0, 0), (top, bottom), (left, right)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(1, 2))[:, ::strides[0], ::strides[1]]
    opg = o // groups
    acc = np.concatenate([np.einsum("chwyx,ocyx->ohw", win[g * cpg:(g + 1) * cpg], w[g * opg:(g + 1) * opg]
                                    .astype(np.int64)) for g in range(groups)]) + bias.reshape(-1, 1, 1)
    f = acc.astype(F32) * scale.astype(F32).reshape(-1, 1, 1)
    f = np.clip(f, F32(-128 - zy), F32(127 - zy))
    return _sat8(np.rint(f), zy)


def add_reference(a: np.ndarray, za: int, sa: float, b: np.ndarray, zb: int, sb: float, sy: float,
                  zy: int) -> np.ndarray:
    """QLinearAdd as onnxruntime's kernel (and edgetune's) computes it: two FMAs in float32, exact in
    float64 (``int8_math.add_is_exact``), rounded once."""
    ra, rb, fixed = im.add_params(sa, za, sb, zb, sy, zy)
    f = (a.astype(np.float64) * float(ra) + (b.astype(np.float64) * float(rb) + float(fixed))).astype(F32)
    return _sat8(np.rint(np.clip(f, F32(-128), F32(127))), 0)


def read_layers(path: Path, image: np.ndarray) -> list[Layer]:
    """The convs and adds of ``path`` in graph order, with the int8 activations ``image`` produces
    (the input's QuantizeLinear, then each layer by onnxruntime's formula)."""
    model = onnx.load(str(path))
    inits = _inits(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def scalar(name: str) -> float | int:
        return inits[name].reshape(-1)[0].item()

    def dq(name: str) -> tuple[str, np.ndarray, np.ndarray]:
        node = producer[name]
        assert node.op_type == "DequantizeLinear", node.op_type
        return node.input[0], inits[node.input[1]], inits[node.input[2]]

    def q_after(name: str) -> onnx.NodeProto:
        (node,) = [n for n in consumers[name] if n.op_type == "QuantizeLinear"]
        return node

    acts: dict[str, np.ndarray] = {}
    layers: list[Layer] = []
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] in {i.name for i in model.graph.input}:
            s, z = scalar(node.input[1]), int(scalar(node.input[2]))
            f = np.clip(image.astype(F32) / F32(s), F32(-128 - z), F32(127 - z))
            acts[node.output[0]] = _sat8(np.rint(f), z)
        elif node.op_type == "Conv":
            xq, sx, zx = dq(node.input[0])
            wq, sw, _ = dq(node.input[1])
            bq, _, _ = dq(node.input[2])
            qn = q_after(node.output[0])
            sy, zy = scalar(qn.input[1]), int(scalar(qn.input[2]))
            a = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
            w, b = inits[wq], inits[bq].astype(np.int64)
            strides, pads, groups = tuple(a.get("strides", (1, 1))), tuple(a.get("pads", (0, 0, 0, 0))), a["group"]
            scale = im.requant_scale(sx, np.broadcast_to(sw, (w.shape[0],)), sy)
            x = acts[xq][0]
            y = conv_reference(x, int(zx), w, b, scale, zy, strides, pads, groups)
            acts[qn.output[0]] = y[None]
            depthwise = groups > 1 and groups == w.shape[0] and w.shape[1] == 1
            kind = ("depthwise" if depthwise else "stem" if not any(lr.kind != "add" for lr in layers)
                    else "pointwise" if w.shape[2:] == (1, 1) else "conv")
            layers.append(Layer(len(layers), kind, node.name or qn.output[0], (1, *y.shape),
                                int(y.size) * int(np.prod(w.shape[1:])), x, y,
                                dict(zx=int(zx), zy=zy, w=w, bias=b, scale=scale, strides=strides, pads=pads,
                                     groups=groups)))
        elif node.op_type == "Add":
            (aq, sa, za), (bq, sb, zb) = dq(node.input[0]), dq(node.input[1])
            qn = q_after(node.output[0])
            sy, zy = scalar(qn.input[1]), int(scalar(qn.input[2]))
            xa, xb = acts[aq], acts[bq]
            y = add_reference(xa, int(za), float(sa), xb, int(zb), float(sb), sy, zy)
            acts[qn.output[0]] = y
            layers.append(Layer(len(layers), "add", node.name or qn.output[0], y.shape, int(y.size), xa[0], y[0],
                                dict(b=xb[0], za=int(za), zb=int(zb), sa=float(sa), sb=float(sb), sy=float(sy),
                                     zy=zy)))
        elif node.op_type in ("Gemm", "MatMul"):
            raise SystemExit(f"bench_kernels: {path.name} has a {node.op_type}; fully connected layers are not "
                             "measured yet")
    return layers


# --- building and running firmware -----------------------------------------------------------------
def _run(cmd: list[str], cwd: Path | None = None, timeout: float = 1800) -> str:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise SystemExit(f"bench_kernels: {' '.join(cmd[:3])} ... failed:\n{(done.stderr or done.stdout)[-2000:]}")
    return done.stdout


def _cc(src: Path, obj: Path, opt: str, includes: list[Path], defines: tuple[str, ...] = (),
        target: str = "cortex-m4") -> Path:
    tc = get_target(target).toolchain
    obj.parent.mkdir(parents=True, exist_ok=True)
    flags = [f for f in tc.cflags if not f.startswith("-O")]
    _run([tc.cc, *tc.arch_flags, *flags, opt, "-std=c99", "-ffp-contract=off", *defines,
          *(f"-I{i}" for i in includes), "-c", str(src), "-o", str(obj)])
    return obj


def link_and_run(objs: list[Path], work: Path, target: str = "cortex-m4") -> str:
    """Link ``objs`` with the board support of ``target``'s QEMU machine and run the program there; its stdout."""
    t = get_target(target)
    board = [_cc(s, work / "board" / (s.stem + ".o"), "-O2", [BOARD_DIR / "cortex-m", RUNTIME_DIR], target=target)
             for s in t.board.sources()]
    # the benchmark programs hold whole layers' data: the machine's memory, not the target's budget
    script = (BOARD_DIR / t.board.machine / "link.ld.in").read_text() + \
        (BOARD_DIR / "cortex-m" / "sections.ld.in").read_text()
    flash, ram = MACHINE_MEMORY[t.board.machine]
    for key, value in (("FLASH_BYTES", flash), ("RAM_BYTES", ram), ("STACK_BYTES", str(t.board.stack_bytes)),
                       ("HEAP_BYTES", str(t.board.heap_bytes))):
        script = script.replace(f"@{key}@", value)
    (work / "link.ld").write_text(script)
    elf = work / "bench.elf"
    tc = t.toolchain
    _run([tc.cc, *tc.arch_flags, *tc.ldflags, "-T", str(work / "link.ld"), *map(str, objs + board), "-o", str(elf),
          *tc.libs])
    return _run(t.simulator_command(elf), cwd=work)


EDGETUNE_MAIN = r"""/* Times every kernel call of one backbone run (generated by benchmarks/bench_kernels.py). */
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include "et_board.h"
#include "frozen_model.h"

#define CALLS %(calls)d
#define REPS %(reps)d
static uint8_t arena[FROZEN_ARENA_BYTES + 1] __attribute__((aligned(64)));
%(buffers)s
static uint64_t begin, ticks[CALLS + 1];

void frozen_profile(int32_t call, int32_t end) {
  uint64_t t;
  et_board_ticks(NULL, &t);
  if (!end) begin = t; else ticks[call] += t - begin;
}

int main(void) {
  const float image[] = {%(image)s};
  for (uint32_t i = 0; i < FROZEN_IN0_ELEMS; ++i) in0[i] = image[i];
  et_board_clock_start();
  for (int r = 0; r < REPS; ++r) { frozen_profile(CALLS, 0); frozen_profile(CALLS, 1); } /* the hook's cost */
  for (int r = 0; r < REPS; ++r) {
    if (frozen_run(arena, %(args)s) != 0) return 1;
  }
  for (int i = 0; i <= CALLS; ++i) printf("call %%d %%llu\n", i, (unsigned long long)ticks[i]);
  for (uint32_t i = 0; i < FROZEN_OUT0_ELEMS; ++i) {
    uint32_t bits;
    memcpy(&bits, &out0[i], 4);
    printf("out %%lu %%08lx\n", (unsigned long)i, (unsigned long)bits);
  }
  return 0;
}
"""


def measure_edgetune(frozen: Path, image: np.ndarray, level: str, reps: int, work: Path,
                     target: str = "cortex-m4") -> dict:
    """Per plan call: kernel name and guest instructions per run on ``target`` (the hook's cost subtracted)."""
    compiled = work / "compiled"
    if not (compiled / "frozen_plan.json").is_file():
        compile_frozen(frozen, "c", compiled)
    from edgetune.compilers.plan import StaticPlan
    plan = StaticPlan.from_json((compiled / "frozen_plan.json").read_text())
    inputs, outputs = [plan.buffer(n) for n in plan.inputs], [plan.buffer(n) for n in plan.outputs]
    assert len(inputs) == 1 and inputs[0].dtype == "float32", "the backbone takes one float image"
    buffers = [f"static {CTYPES[b.dtype]} {p}[{int(np.prod(b.shape))}] __attribute__((aligned(64)));"
               for p, b in [("in0", inputs[0])] + [(f"out{i}", b) for i, b in enumerate(outputs)]]
    build = work / target / level
    main = build / "bench_main.c"
    main.parent.mkdir(parents=True, exist_ok=True)
    main.write_text(EDGETUNE_MAIN % {"calls": len(plan.calls), "reps": reps, "buffers": "\n".join(buffers),
                                     "image": ", ".join(f"{float(v).hex()}f" for v in image.reshape(-1)),
                                     "args": ", ".join(["in0"] + [f"out{i}" for i in range(len(outputs))])})
    inc = [compiled, compiled / "include", BOARD_DIR / "cortex-m", RUNTIME_DIR]
    objs = [_cc(compiled / "frozen_kernels.c", build / "kernels.o", level, inc, target=target),
            _cc(compiled / "frozen_model.c", build / "model.o", "-O2", inc, ("-DEDGETUNE_PROFILE",), target),
            _cc(compiled / "tvm_workspace.c", build / "workspace.o", "-O2", inc, target=target),
            _cc(main, build / "main.o", "-O2", inc, target=target)]
    out = link_and_run(objs, build, target)
    ticks = {int(m.group(1)): int(m.group(2)) for m in re.finditer(r"^call (\d+) (\d+)$", out, re.M)}
    got = np.array([int(m.group(2), 16) for m in re.finditer(r"^out (\d+) ([0-9a-f]+)$", out, re.M)], np.uint32)
    check_output(frozen, image, got.view(np.float32), f"{target} {level}")
    per_tick = 1e9 / get_target(target).simulator.clock_hz
    hook = ticks[len(plan.calls)] / reps
    return {"calls": [{"kernel": c.kernel, "out_shape": list(plan.buffer(c.args[-1]).shape),
                       "instructions": max(0.0, (ticks[i] / reps - hook)) * per_tick}
                      for i, c in enumerate(plan.calls)],
            "hook_instructions": hook * per_tick, "output": got.view(np.float32).tolist()}


def check_output(frozen: Path, image: np.ndarray, got: np.ndarray, level: str) -> None:
    """The firmware's backbone output must be onnxruntime's, bit for bit (timing wrong code is worthless).

    Raises:
        SystemExit: it is not.
    """
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdqisint8allowed", "1")
    session = ort.InferenceSession(str(frozen), options, providers=["CPUExecutionProvider"])
    want = session.run(None, {session.get_inputs()[0].name: image})[0].reshape(-1)
    if got.shape != want.shape or not np.array_equal(got, want):
        raise SystemExit(f"bench_kernels: the {level} firmware's output is not onnxruntime's "
                         f"({int(np.sum(got != want)) if got.shape == want.shape else got.shape} values differ)")


def cmsis_library(cmsis: Path, level: str, work: Path, target: str = "cortex-m4") -> list[Path]:
    """CMSIS-NN's s8 sources (convolution, support, basic maths) compiled for ``target`` at ``level`` (its
    headers pick the Helium code where the compiler defines ``__ARM_FEATURE_MVE``, the DSP code elsewhere)."""
    objs = []
    for sub in CMSIS_DIRS:
        for src in sorted((cmsis / "Source" / sub).glob("*.c")):
            if re.search(r"_f(16|32)", src.stem):
                continue  # float variants (they need CMSIS-DSP's float16 types): no int8 model calls them
            obj = work / f"cmsis-{target}{level}" / (src.stem + ".o")
            if not obj.is_file():
                _cc(src, obj, level, [cmsis / "Include"], target=target)
            objs.append(obj)
    return objs


def _carr(ctype: str, name: str, values: np.ndarray) -> str:
    flat = ", ".join(str(int(v)) for v in np.asarray(values).reshape(-1))
    return f"static const {ctype} {name}[{max(1, np.asarray(values).size)}] __attribute__((aligned(4))) = {{{flat}}};"


def _quant_multiplier(real: float) -> tuple[int, int]:
    """TFLite's QuantizeMultiplier: ``real ~= m * 2**(shift - 31)``, m a Q31 mantissa (CMSIS-NN's convention)."""
    if real == 0:
        return 0, 0
    mant, exp = np.frexp(real)
    m = int(round(mant * (1 << 31)))
    if m == 1 << 31:
        m //= 2
        exp += 1
    return m, int(exp)


def cmsis_layer_source(layers: list[Layer], reps: int) -> str:
    """One C file: every layer's data (NHWC), the CMSIS-NN call, the timing and the comparison."""
    out = ["#include <stdint.h>", "#include <stdio.h>", "#include \"arm_nnfunctions.h\"", "#include \"et_board.h\"",
           "", f"#define REPS {reps}", "static int8_t output[%d] __attribute__((aligned(4)));"
           % max(int(np.prod(lr.out_shape)) for lr in layers),
           "static int8_t scratch[65536] __attribute__((aligned(4)));", "",
           "static void report(int layer, uint64_t ticks, const int8_t *want, int n) {",
           "  int diff = 0, worst = 0;",
           "  for (int i = 0; i < n; ++i) {",
           "    int d = output[i] - want[i];",
           "    if (d) { ++diff; if (d < 0) d = -d; if (d > worst) worst = d; }",
           "  }",
           "  printf(\"layer %d %llu %d %d\\n\", layer, (unsigned long long)ticks, diff, worst);",
           "}", ""]
    calls = []
    for lr in layers:
        i, p = lr.index, lr.params
        want = lr.y.transpose(1, 2, 0)  # CHW -> HWC
        out.append(_carr("int8_t", f"x{i}", lr.x.transpose(1, 2, 0)))
        out.append(_carr("int8_t", f"y{i}", want))
        n = int(want.size)
        if lr.kind == "add":
            ra = p["sa"] / (2 * max(p["sa"], p["sb"]))
            rb = p["sb"] / (2 * max(p["sa"], p["sb"]))
            ro = 2 * max(p["sa"], p["sb"]) / ((1 << 20) * p["sy"])
            (ma, sa), (mb, sb), (mo, so) = (_quant_multiplier(v) for v in (ra, rb, ro))
            out.append(_carr("int8_t", f"b{i}", p["b"].transpose(1, 2, 0)))
            call = (f"arm_elementwise_add_s8(x{i}, b{i}, {-p['za']}, {ma}, {sa}, {-p['zb']}, {mb}, {sb}, 20, output, "
                    f"{p['zy']}, {mo}, {so}, -128, 127, {n})")
            calls.append((i, [], call, n))
            continue
        w, c, h, wd = p["w"], *lr.x.shape
        o, _, kh, kw = w.shape
        depthwise = lr.kind == "depthwise"
        filt = w.transpose(1, 2, 3, 0) if depthwise else w.transpose(0, 2, 3, 1)  # [1,H,W,O] / OHWI
        mult, shift = zip(*(_quant_multiplier(float(s)) for s in p["scale"]))
        out += [_carr("int8_t", f"w{i}", filt), _carr("int32_t", f"b{i}", p["bias"]),
                _carr("int32_t", f"m{i}", np.array(mult)).replace("static const", "static"),
                _carr("int32_t", f"s{i}", np.array(shift)).replace("static const", "static")]
        _, oh, ow = lr.y.shape
        top, left = p["pads"][0], p["pads"][1]
        dims = (f"cmsis_nn_dims in = {{1, {h}, {wd}, {c}}}, fd = {{{1 if depthwise else o}, {kh}, {kw}, "
                f"{o if depthwise else c}}}, bd = {{1, 1, 1, {o}}}, od = {{1, {oh}, {ow}, {o}}};")
        quant = f"cmsis_nn_per_channel_quant_params q = {{m{i}, s{i}}};"
        common = (f".input_offset = {-p['zx']}, .output_offset = {p['zy']}, .stride = {{{p['strides'][1]}, "
                  f"{p['strides'][0]}}}, .padding = {{{left}, {top}}}, .dilation = {{1, 1}}, "
                  ".activation = {-128, 127}")
        if depthwise:
            setup = [dims, quant, f"cmsis_nn_dw_conv_params cp = {{{common}, .ch_mult = 1}};",
                     "int32_t need = arm_depthwise_conv_wrapper_s8_get_buffer_size(&cp, &in, &fd, &od);"]
            call = f"arm_depthwise_conv_wrapper_s8(&ctx, &cp, &q, &in, x{i}, &fd, w{i}, &bd, b{i}, &od, output)"
        else:
            setup = [dims, quant, f"cmsis_nn_conv_params cp = {{{common}}};",
                     "int32_t need = arm_convolve_wrapper_s8_get_buffer_size(&cp, &in, &fd, &od);"]
            call = f"arm_convolve_wrapper_s8(&ctx, &cp, &q, &in, x{i}, &fd, w{i}, &bd, b{i}, &od, output)"
        calls.append((i, setup, call, n))
    out += ["", "int main(void) {", "  uint64_t t0, t1, hook;", "  et_board_clock_start();",
            "  et_board_ticks(NULL, &t0);", "  et_board_ticks(NULL, &t1);", "  hook = t1 - t0;"]
    for i, setup, call, n in calls:
        out.append("  {")
        out += [f"    {s}" for s in setup]
        if setup:
            out += ["    cmsis_nn_context ctx = {scratch, need};",
                    f"    if (need > (int32_t)sizeof scratch) {{ printf(\"layer {i} scratch %ld\\n\", (long)need); "
                    "return 2; }"]
        out += ["    uint64_t total = 0;", "    for (int r = 0; r < REPS; ++r) {",
                "      et_board_ticks(NULL, &t0);", f"      if ({call} != ARM_CMSIS_NN_SUCCESS) return 3;",
                "      et_board_ticks(NULL, &t1);", "      total += t1 - t0 - hook;", "    }",
                f"    report({i}, total, y{i}, {n});", "  }"]
    out += ["  return 0;", "}", ""]
    return "\n".join(out)


def measure_cmsis(cmsis: Path, layers: list[Layer], level: str, reps: int, work: Path,
                  target: str = "cortex-m4") -> dict:
    """Per layer: CMSIS-NN's guest instructions per call and how many outputs differ from onnxruntime's."""
    src = work / "cmsis_layers.c"
    work.mkdir(parents=True, exist_ok=True)
    if not src.is_file():
        src.write_text(cmsis_layer_source(layers, reps))
    inc = [cmsis / "Include", BOARD_DIR / "cortex-m", RUNTIME_DIR]
    build = work / target / level
    objs = cmsis_library(cmsis, level, work.parent.parent, target) + [_cc(src, build / "layers.o", "-O2", inc,
                                                                           target=target)]
    out = link_and_run(objs, build, target)
    per_tick = 1e9 / get_target(target).simulator.clock_hz
    rows = {}
    for m in re.finditer(r"^layer (\d+) (\d+) (\d+) (\d+)$", out, re.M):
        rows[int(m.group(1))] = {"instructions": int(m.group(2)) / reps * per_tick, "differing": int(m.group(3)),
                                 "max_abs_diff": int(m.group(4))}
    if len(rows) != len(layers):
        raise SystemExit(f"bench_kernels: CMSIS-NN run reported {len(rows)} of {len(layers)} layers:\n{out[-1000:]}")
    return rows


# --- one model ---------------------------------------------------------------------------------
def frozen_model(model: str, work: Path) -> tuple[Path, np.ndarray]:
    """frozen.onnx of the committed checkpoint (the last stage's pooled features, as export writes it)
    and one test image of its dataset."""
    from edgetune.checkpoint import load_checkpoint
    from edgetune.data import load_dataset, to_tensor
    from edgetune.export.onnx_graphs import export_frozen
    from edgetune.export.quantize import quantize_frozen
    from edgetune.methods.base import TapSpec

    ckpt, dataset = MODELS[model]
    data = load_dataset(dataset)
    out = work / "frozen.onnx"
    if not out.is_file():
        backbone, _ = load_checkpoint(ROOT / "checkpoints" / ckpt)
        export_frozen(backbone, [TapSpec(len(backbone.stages) - 1, True)], work / "float.onnx")
        quantize_frozen(work / "float.onnx", out, data.train_x, data.name)
    return out, to_tensor(data.test_x[:1]).numpy()


def match_calls(layers: list[Layer], calls: list[dict]) -> list[int]:
    """The plan call of each layer: convs and adds appear in graph order in both."""
    picked = [i for i, c in enumerate(calls) if family_of(c["kernel"]).startswith("qconv2d")
              or c["kernel"].startswith("add")]
    if len(picked) != len(layers) or any(calls[i]["out_shape"] != list(lr.out_shape)
                                         for i, lr in zip(picked, layers)):
        raise SystemExit("bench_kernels: the compiled plan's conv/add calls do not line up with the graph's "
                         f"({[calls[i]['kernel'] for i in picked]} vs {[lr.kind for lr in layers]})")
    return picked


def _measure_target(frozen: Path, image: np.ndarray, layers: list[Layer], target: str, levels: tuple[str, ...],
                    cmsis: Path | None, reps: int, work: Path, model: str) -> dict:
    """edgetune at each level and CMSIS-NN at its three levels, on one target."""
    out: dict = {"edgetune": {}, "cmsis_nn": {}}
    for level in levels:
        start = time.perf_counter()
        run = measure_edgetune(frozen, image, level, reps, work / "edgetune", target)
        picked = match_calls(layers, run["calls"])
        out["edgetune"][level] = {"per_layer": [run["calls"][i]["instructions"] for i in picked],
                                  "total": sum(c["instructions"] for c in run["calls"]),
                                  "kernels": [c["kernel"] for c in run["calls"]],
                                  "hook_instructions": run["hook_instructions"]}
        print(f"{model} {target} edgetune {level}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    if cmsis is not None:
        for level in LEVELS:
            start = time.perf_counter()
            rows = measure_cmsis(cmsis, layers, level, reps, work / "cmsis", target)
            out["cmsis_nn"][level] = [rows[lr.index] for lr in layers]
            print(f"{model} {target} CMSIS-NN {level}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return out


def bench_model(model: str, levels: tuple[str, ...], cmsis: Path | None, reps: int, work: Path,
                targets: tuple[str, ...] = ("cortex-m4",)) -> dict:
    """The first target's figures at the top level (``edgetune``, ``cmsis_nn``); every target's under ``targets``."""
    work.mkdir(parents=True, exist_ok=True)
    frozen, image = frozen_model(model, work)
    layers = read_layers(frozen, image)
    result: dict = {"layers": [{"index": lr.index, "kind": lr.kind, "name": lr.name, "out_shape": list(lr.out_shape),
                                "macs": lr.macs, "in_channels": int(lr.x.shape[0])} for lr in layers],
                    "targets": {}}
    for target in targets:
        result["targets"][target] = _measure_target(frozen, image, layers, target, levels, cmsis, reps, work, model)
    result.update(result["targets"][targets[0]])
    return result


# --- tables and plot ------------------------------------------------------------------------------
def summarise(r: dict) -> dict:
    """Per kind and overall: instructions and instructions per MAC for each build."""
    layers = r["layers"]
    conv = [i for i, lr in enumerate(layers) if lr["kind"] != "add"]
    conv_macs = sum(layers[i]["macs"] for i in conv)
    builds = {f"edgetune {lv}": e["per_layer"] for lv, e in r["edgetune"].items()}
    if r["cmsis_nn"]:
        best = min(r["cmsis_nn"], key=lambda lv: sum(x["instructions"] for x in r["cmsis_nn"][lv]))
        builds[f"CMSIS-NN {best}"] = [x["instructions"] for x in r["cmsis_nn"][best]]
    out: dict = {"builds": {}}
    for b, per in builds.items():
        kinds = {}
        for kind in KINDS:
            idx = [i for i, lr in enumerate(layers) if lr["kind"] == kind]
            if idx:
                ins = sum(per[i] for i in idx)
                kinds[kind] = {"instructions": ins, "per_mac": ins / sum(layers[i]["macs"] for i in idx)}
        convs = sum(per[i] for i in conv)
        out["builds"][b] = {"kinds": kinds, "conv_instructions": convs, "conv_per_mac": convs / conv_macs}
        if b.startswith("edgetune"):
            out["builds"][b]["backbone_per_mac"] = r["edgetune"][b.split()[1]]["total"] / conv_macs
    out["conv_macs"] = conv_macs
    return out


def _per_mac(summary: dict, build: str, kind: str) -> float | None:
    """A build's instructions per MAC of one kind, of all convs, or of the whole backbone (None: not measured)."""
    b = summary["builds"][build]
    if kind == "all convs":
        return b["conv_per_mac"]
    if kind == "whole backbone":
        return b.get("backbone_per_mac")
    return b["kinds"][kind]["per_mac"]


def _other_targets(r: dict, first: dict) -> list[str]:
    """Per kind on every further target (Cortex-M55 with Helium), next to the first target's -O3 build of the
    same run and to CMSIS-NN built for that target."""
    names = list(r.get("targets", {}))
    ref = "edgetune -O3" if "edgetune -O3" in first["builds"] else next(iter(first["builds"]))
    lines: list[str] = []
    for name in names[1:]:
        s = summarise({"layers": r["layers"], **r["targets"][name]})
        builds = list(s["builds"])
        cm = next((b for b in builds if b.startswith("CMSIS")), None)
        own = "edgetune -O3" if "edgetune -O3" in builds else builds[0]
        head = [f"{name} {b}" for b in builds] + [f"{names[0]} {ref}", f"{own} / {names[0]}"]
        if cm:
            head.append(f"{own} / CMSIS-NN ({name})")
        lines += ["", f"### {name} (instructions per MAC; add: per element), {names[0]} in the same run", "",
                  "| kind | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
        for kind in KINDS + ("all convs", "whole backbone"):
            if kind not in ("all convs", "whole backbone") and kind not in s["builds"][own]["kinds"]:
                continue
            cells = [_per_mac(s, b, kind) for b in builds] + [_per_mac(first, ref, kind)]
            mine, base = _per_mac(s, own, kind), _per_mac(first, ref, kind)
            cells.append(None if mine is None or base is None else mine / base)
            if cm:
                c = _per_mac(s, cm, kind)
                cells.append(None if mine is None or c is None else mine / c)
            text = ["-" if v is None else f"{v:.2f}" for v in cells]
            text[len(builds) + 1:] = [t if t == "-" else t + "x" for t in text[len(builds) + 1:]]
            lines.append(f"| {kind} | " + " | ".join(text) + " |")
    return lines


def render(results: dict) -> str:
    lines = ["# Cortex-M int8 kernels: edgetune vs CMSIS-NN, per layer and per kind", "",
             "Guest instructions in `qemu-system-arm -M mps2-an386 -icount shift=0` (SysTick, 40 instructions per "
             "tick), per MAC for convs (per output element for adds). edgetune: TVM's C kernels at each -O level "
             "(arm-none-eabi-gcc, `-mcpu=cortex-m4 -mfloat-abi=hard`), one real image through the backbone, every "
             "kernel call timed. CMSIS-NN: its s8 kernels on the same layers (NHWC, same weights, biases, zero "
             "points; multipliers derived from the same float scales), at its best level of -O2/-O3/-Os. "
             "Further targets (Cortex-M55 with Helium: `qemu-system-arm -M mps3-an547`, 31.25 instructions per "
             "tick) run the same builds for their core, CMSIS-NN with its Helium code. "
             "\"differ\" counts CMSIS-NN outputs that are not onnxruntime's (= edgetune's, bit for bit): its "
             "fixed-point requantisation rounds differently near ties.", ""]
    for model, r in results["models"].items():
        s = summarise(r)
        builds = list(s["builds"])
        lines += [f"## {model} ({s['conv_macs']:,} conv MACs)", "", "### Per kind (instructions per MAC; add: per "
                  "element)", "", "| kind | " + " | ".join(builds) + (" | edgetune -O3 / CMSIS-NN |" if r["cmsis_nn"]
                                                                        else " |"),
                  "|---" * (len(builds) + 1 + bool(r["cmsis_nn"])) + "|"]
        cm = next((b for b in builds if b.startswith("CMSIS")), None)
        o3 = "edgetune -O3" if "edgetune -O3" in builds else builds[0]
        for kind in KINDS + ("all convs",):
            cells, ratio = [], ""
            for b in builds:
                k = s["builds"][b]
                v = k["conv_per_mac"] if kind == "all convs" else k["kinds"].get(kind, {}).get("per_mac")
                cells.append("-" if v is None else f"{v:.2f}")
            if kind != "all convs" and kind not in s["builds"][builds[0]]["kinds"]:
                continue
            if cm:
                a = s["builds"][o3]["conv_instructions" if kind == "all convs" else "kinds"]
                c = s["builds"][cm]["conv_instructions" if kind == "all convs" else "kinds"]
                a = a if kind == "all convs" else a[kind]["instructions"]
                c = c if kind == "all convs" else c[kind]["instructions"]
                ratio = f" {a / c:.2f}x |"
            lines.append(f"| {kind} | " + " | ".join(cells) + " |" + ratio)
        back = " / ".join(f"{lv} {s['builds'][f'edgetune {lv}']['backbone_per_mac']:.2f}" for lv in r["edgetune"])
        lines += ["", f"Whole backbone (every kernel, incl. input quantisation and the final mean) per conv MAC: "
                  f"{back}."]
        if "edgetune -O3" in builds:
            ref = s["builds"]["edgetune -O3"]["conv_instructions"]
            rel = ", ".join(f"{b.split()[1]} {s['builds'][b]['conv_instructions'] / ref:.2f}x"
                            for b in builds if b.startswith("edgetune"))
            lines.append(f"All convs relative to -O3: {rel}.")
        lines += _other_targets(r, s)
        lines += ["", "### Per layer", "",
                  "| # | kind | out shape | in ch | MACs | " + " | ".join(builds)
                  + (" | ratio | differ / max diff |" if cm else " |"),
                  "|---" * (5 + len(builds) + (2 if cm else 0)) + "|"]
        best = cm.split()[1] if cm else None
        for i, lr in enumerate(r["layers"]):
            per = [r["edgetune"][b.split()[1]]["per_layer"][i] if b.startswith("edgetune")
                   else r["cmsis_nn"][best][i]["instructions"] for b in builds]
            cells = [f"{v / lr['macs']:.2f}" for v in per]
            extra = ""
            if cm:
                c = r["cmsis_nn"][best][i]
                extra = (f" {per[builds.index(o3)] / c['instructions']:.2f}x | {c['differing']} / "
                         f"{c['max_abs_diff']} |")
            lines.append(f"| {i} | {lr['kind']} | {'x'.join(map(str, lr['out_shape'][1:]))} | {lr['in_channels']} | "
                         f"{lr['macs']:,} | " + " | ".join(cells) + " |" + extra)
        lines.append("")
    lines += ["![instructions per MAC by kind](kernels.png)", "",
              f"Generated by `python benchmarks/bench_kernels.py {results.get('argv', '')}` "
              f"({results.get('when', '')})."]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results["models"])
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        s = summarise(results["models"][model])
        builds = list(s["builds"])
        kinds = [k for k in KINDS if k in s["builds"][builds[0]]["kinds"]] + ["all convs"]
        width = 0.8 / len(builds)
        for j, b in enumerate(builds):
            vals = [s["builds"][b]["conv_per_mac"] if k == "all convs" else s["builds"][b]["kinds"][k]["per_mac"]
                    for k in kinds]
            ax.bar([i + j * width for i in range(len(kinds))], vals, width, label=b)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(kinds))], kinds)
        ax.set_ylabel("Cortex-M4 instructions per MAC (add: per element)")
        ax.set_title(model)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="mcunet-s,tiny-cnn")
    p.add_argument("--levels", default=",".join(LEVELS), help="-O levels of edgetune's kernels")
    p.add_argument("--cmsis-nn", type=Path, default=None, help="CMSIS-NN source folder (its column is skipped "
                   "without it)")
    p.add_argument("--reps", type=int, default=3, help="runs per measurement (averaged)")
    p.add_argument("--targets", default="cortex-m4,cortex-m55", help="Cortex-M targets (the first is the main "
                   "table; the others are compared with it)")
    p.add_argument("--quick", action="store_true", help="tiny-cnn, -O2 and -O3, one run")
    p.add_argument("--work", type=Path, default=None, help="build folder (default: a fresh temporary one)")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "kernels")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.levels, args.reps = "tiny-cnn", "-O2,-O3", 1
    if args.cmsis_nn is not None and not (args.cmsis_nn / "Include" / "arm_nnfunctions.h").is_file():
        raise SystemExit(f"bench_kernels: {args.cmsis_nn} is not a CMSIS-NN source folder (no "
                         "Include/arm_nnfunctions.h); clone https://github.com/ARM-software/CMSIS-NN there")
    import tempfile
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-kernels-"))
    results = {"models": {}, "when": time.strftime("%Y-%m-%d"),
               "argv": " ".join(a if not a.startswith("/") else "DIR" for a in (argv or sys.argv[1:]))}
    for model in args.models.split(","):
        results["models"][model] = bench_model(model, tuple(args.levels.split(",")), args.cmsis_nn, args.reps,
                                               work / model, tuple(args.targets.split(",")))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernels.json").write_text(json.dumps(results, indent=1) + "\n")
    text = render(results)
    (args.out / "kernels.md").write_text(text)
    plot(results, args.out / "kernels.png")
    print(text)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
