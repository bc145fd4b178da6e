"""Linux targets and the host against onnxruntime: the same int8 model, batch 1, one thread.

For each model (the committed checkpoint's frozen.onnx, int8 QDQ, as ``bench_kernels`` builds it):

* host: wall time per sample of the compiled backbone (``compile_frozen(..., "host")``, one thread)
  next to onnxruntime's CPU sessions on the same model, one intra-op thread each: the QDQ model with
  default options, the QDQ model with ``session.qdqisint8allowed=1`` (every op an integer kernel, the
  arithmetic the compiled backbone reproduces bit for bit), and the same float model quantised by
  onnxruntime in its QOperator form (QLinearConv etc., same calibration). Median of many calls,
  engines interleaved in rounds, one process.
* aarch64 (rpi4: Cortex-A72 NEON; android-arm64: ARMv8.2-A + dot product): guest instructions per
  sample under ``qemu-aarch64-static`` (``-d in_asm,exec,nochain``: every executed translation block
  counted with the instructions it was translated from; runs of ``few`` and ``many`` samples
  subtracted so start-up, session creation and I/O cancel out) of the compiled backbone (the
  target's ``tvm_target``, a static program calling ``frozen_run``) and of onnxruntime's aarch64
  build (``--onnxruntime-aarch64 DIR``: a folder holding ``libonnxruntime.so*`` from onnxruntime's
  aarch64 wheel; ``benchmarks/ort_driver.c`` runs it; the column is skipped without the flag).
  Every compiled output is compared with onnxruntime's integer session's.

The host library calls the x86 micro-kernels where the host has AVX-512 VNNI (``compilers/host_kernels.py``;
the table counts the kernels that do); ``--attempts`` compares them with TVM's own templates and their
plain C path. ``--models ...,reference`` adds the zoo's five reference models (host rows only).

No network at run time. Not a test.

    python benchmarks/bench_linux.py --models tiny-cnn,mcunet-s,reference --onnxruntime-aarch64 DIR
    python benchmarks/bench_linux.py --attempts                      # the host and aarch64 variants
    python benchmarks/bench_linux.py --quick                         # tiny-cnn, few calls
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
from bench_kernels import MODELS, frozen_model  # noqa: E402  (the same models and frozen.onnx)

from edgetune.compilers import FrozenRunner, compile_frozen, host_kernels  # noqa: E402
from edgetune.compilers.emit import EmitTarget  # noqa: E402
from edgetune.deploy.project import backbone_macs  # noqa: E402
from edgetune.ort_runtime import session  # noqa: E402
from edgetune.simulate import count_trace  # noqa: E402
from edgetune.targets import get_target  # noqa: E402

LINUX_TARGETS = ("rpi4", "android-arm64")
# the zoo's reference models (tests/corpus_models.py: seeded weights, exported as the corpus exports them);
# host rows only (``--models reference`` adds them)
REFERENCE = ("resnet8", "ds-cnn", "mobilenet-v1-025", "mobilenet-v3-s", "imu-conv1d")
ORT_DRIVER = ROOT / "benchmarks" / "ort_driver.c"


# --- models ---------------------------------------------------------------------------------------
def model_frozen(model: str, work: Path) -> Path:
    """frozen.onnx of a zoo model (``bench_kernels.frozen_model``) or of a reference model (the corpus's export)."""
    if model in REFERENCE:
        from corpus_models import build, export_int8

        out = work / "frozen.onnx"
        return out if out.is_file() else export_int8(build(model), work)
    return frozen_model(model, work)[0]


def qoperator_model(work: Path, model: str) -> Path:
    """The float model of ``model_frozen`` quantised by onnxruntime in its QOperator form (QLinearConv,
    QLinearAdd, ...), with the settings and calibration images of edgetune's QDQ export."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = work / "qoperator.onnx"
    if not out.is_file():
        if model in REFERENCE:
            from corpus_models import CALIBRATION, _Samples, build, calibration_inputs

            source = work / "frozen_float.onnx"
            reader = _Samples(calibration_inputs(build(model).input_shape, CALIBRATION))
        else:
            from edgetune.data import load_dataset
            from edgetune.export.quantize import SourceImages, calibration_images

            source = work / "float.onnx"
            reader = SourceImages(calibration_images(load_dataset(MODELS[model][1]).train_x))
        pre = work / "qoperator_pre.onnx"
        quant_pre_process(str(source), str(pre))
        quantize_static(str(pre), str(out), reader,
                        quant_format=QuantFormat.QOperator, per_channel=True, activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                        extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})
    return out


def test_images(model: str, n: int) -> np.ndarray:
    if model in REFERENCE:
        from corpus_models import build, sample_inputs

        return sample_inputs(build(model).input_shape, n)
    from edgetune.data import load_dataset, to_tensor

    return to_tensor(load_dataset(MODELS[model][1]).test_x[:n]).numpy().astype(np.float32)


# --- host: wall time ------------------------------------------------------------------------------
def time_engines(calls: dict, rounds: int, per_round: int) -> dict[str, dict]:
    """Per-call microseconds of each engine: every call timed on its own, engines interleaved round by
    round (so load on the shared machine hits all of them alike); median and 10th percentile."""
    for fn in calls.values():
        for _ in range(20):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in calls}
    clock = time.perf_counter_ns
    for _ in range(rounds):
        for k, fn in calls.items():
            got = samples[k]
            for _ in range(per_round):
                t0 = clock()
                fn()
                got.append((clock() - t0) / 1e3)
    return {k: {"median_us": statistics.median(v), "p10_us": float(np.percentile(v, 10)), "calls": len(v)}
            for k, v in samples.items()}


def bench_host(model: str, frozen: Path, qop: Path, x: np.ndarray, rounds: int, per_round: int, work: Path) -> dict:
    graph = compile_frozen(frozen, "host", work / "host")
    runner = FrozenRunner(graph)
    sessions = {"ort_qdq_default": session(frozen, int8_kernels=False),
                "ort_qdq_int8": session(frozen, int8_kernels=True), "ort_qoperator": session(qop, int8_kernels=False)}
    equal = sum(all(np.array_equal(a, b) for a, b in zip(runner(x[i:i + 1]),
                                                          sessions["ort_qdq_int8"].run(None, {"x": x[i:i + 1]})))
                for i in range(len(x)))
    kernels = graph.plan.kernels
    one = x[:1]
    calls = {"edgetune": lambda: runner(one)}
    calls.update({k: (lambda s=s: s.run(None, {"x": one})) for k, s in sessions.items()})
    times = time_engines(calls, rounds, per_round)
    best = min((k for k in times if k.startswith("ort")), key=lambda k: times[k]["median_us"])
    return {"times": times, "equal_to_ort_int8": equal, "samples_checked": len(x), "best_ort": best,
            "ratio_to_best_ort": times["edgetune"]["median_us"] / times[best]["median_us"],
            "micro_kernels": sum("x86 micro-kernel" in k.schedule for k in kernels), "kernels": len(kernels),
            "schedules": sorted({k.schedule for k in kernels if getattr(k, "schedule", None)})}


# --- aarch64: instructions under qemu-aarch64 -----------------------------------------------------
def traced_instructions(cmd: list[str], work: Path, env: dict | None = None) -> int:
    """All guest instructions of one QEMU user-mode run of ``cmd`` (its log streamed through a FIFO,
    never written to disk: onnxruntime's start-up alone logs gigabytes)."""
    fifo = work / "trace.fifo"
    if fifo.exists():
        fifo.unlink()
    os.mkfifo(fifo)
    result: dict[str, int] = {}

    def read() -> None:
        with fifo.open(errors="replace") as f:
            result["n"] = count_trace(f)[0]

    reader = threading.Thread(target=read)
    reader.start()
    proc = subprocess.run([cmd[0], "-d", "in_asm,exec,nochain", "-D", str(fifo), *cmd[1:]], cwd=work,
                          capture_output=True, text=True, timeout=3600, env=env)
    reader.join()
    fifo.unlink()
    if proc.returncode != 0:
        raise RuntimeError(f"bench_linux: {' '.join(cmd[:3])} failed ({proc.returncode}): {proc.stderr[-400:]}")
    return result["n"]


def per_sample(run, x: np.ndarray, few: int, many: int, work: Path) -> tuple[float, np.ndarray]:
    """(instructions per sample over samples ``few``..``many - 1``, outputs of the ``many`` run)."""
    counts = []
    for k in (few, many):
        (work / "in.bin").write_bytes(np.ascontiguousarray(x[:k]).tobytes())
        counts.append(run(k))
    return (counts[1] - counts[0]) / (many - few), np.fromfile(work / "out.bin", np.float32)


FROZEN_MAIN = """/* bench_linux: run the compiled frozen graph on N samples (input file -> output file) */
#include <stdio.h>
#include <stdlib.h>
#include "frozen_model.h"
static uint8_t arena[FROZEN_ARENA_BYTES + 1] __attribute__((aligned(FROZEN_ALIGNMENT)));
static float in0[FROZEN_IN0_ELEMS] __attribute__((aligned(FROZEN_ALIGNMENT)));
%(decls)s
int main(int argc, char **argv) {
    if (argc != 4) return 1;
    FILE *fi = fopen(argv[1], "rb"), *fo = fopen(argv[2], "wb");
    int n = atoi(argv[3]);
    if (!fi || !fo) return 1;
    for (int s = 0; s < n; s++) {
        if (fread(in0, sizeof(float), FROZEN_IN0_ELEMS, fi) != FROZEN_IN0_ELEMS) return 1;
        if (frozen_run(arena, in0%(args)s)) return 2;
%(writes)s
    }
    fclose(fi);
    fclose(fo);
    return 0;
}
"""


def emit_target(name: str) -> EmitTarget:
    """An ``EmitTarget`` from targets/<name>.json (its TVM target and toolchain)."""
    t = get_target(name)
    return EmitTarget(name, dict(t.tvm_target), t.toolchain.cc, tuple(t.toolchain.arch_flags) + ("-O2",))


def frozen_program(frozen: Path, target: str, work: Path) -> tuple[Path, object]:
    """A static aarch64 program running the backbone compiled for ``target`` (its kernels object from
    TVM's LLVM backend for the target's CPU), and the compiled graph."""
    graph = compile_frozen(frozen, emit_target(target), work / target)
    outs = graph.plan.outputs
    for n in outs:
        if str(graph.plan.buffer(n).dtype) != "float32":
            raise RuntimeError(f"bench_linux: output {n} is {graph.plan.buffer(n).dtype}, the driver writes float32")
    decls = "\n".join(f"static float out{i}[FROZEN_OUT{i}_ELEMS] __attribute__((aligned(FROZEN_ALIGNMENT)));"
                      for i in range(len(outs)))
    args = "".join(f", out{i}" for i in range(len(outs)))
    writes = "\n".join(f"        fwrite(out{i}, sizeof(float), FROZEN_OUT{i}_ELEMS, fo);" for i in range(len(outs)))
    main = work / target / "bench_main.c"
    main.write_text(FROZEN_MAIN % {"decls": decls, "args": args, "writes": writes})
    a = graph.artifacts
    t = get_target(target)
    program = work / target / "frozen_bench"
    cmd = [t.toolchain.cc, *t.toolchain.arch_flags, "-O2", "-static", f"-I{a['include']}", f"-I{work / target}",
           str(main), str(a["model_c"]), str(a["workspace_c"]), str(a["kernels_o"]), "-lm", "-o", str(program)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return program, graph


def ort_library(folder: Path) -> Path:
    found = sorted(folder.rglob("libonnxruntime.so*"))
    if not found:
        raise SystemExit(f"bench_linux: no libonnxruntime.so* under {folder}; unpack onnxruntime's aarch64 wheel "
                         "(pip download onnxruntime --platform manylinux_2_27_aarch64 --only-binary=:all: --no-deps) "
                         "there")
    return found[0]


# QEMU's CPU model per target (its ID registers and hwcaps are what onnxruntime's kernel dispatch reads):
# the Cortex-A55 of android-arm64 is not in QEMU 7.2; the A76 has the same ISA (ARMv8.2-A, dot product, no i8mm)
QEMU_CPU = {"rpi4": ("cortex-a72", "0x0", "0xd08", "fp asimd evtstrm crc32 cpuid"),
            "android-arm64": ("cortex-a76", "0x4", "0xd0b", "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp "
                              "asimdhp cpuid asimdrdm lrcpc dcpop asimddp")}


def guest_root(target: str, work: Path) -> Path:
    """QEMU's ``-L`` prefix for ``target``: the aarch64 libraries plus an ARM ``/proc/cpuinfo`` and a one-CPU
    ``/sys`` view. QEMU 7.2 user mode passes the host's x86 /proc/cpuinfo through, and onnxruntime's cpuinfo
    library crashes on it (NULL dereference while loading); QEMU opens an absolute path under the prefix first."""
    _, variant, part, features = QEMU_CPU[target]
    root = work / f"root-{target}"
    (root / "proc").mkdir(parents=True, exist_ok=True)
    cpu = root / "sys" / "devices" / "system" / "cpu"
    cpu.mkdir(parents=True, exist_ok=True)
    if not (root / "lib").exists():
        (root / "lib").symlink_to("/usr/aarch64-linux-gnu/lib")
    (root / "proc" / "cpuinfo").write_text(
        f"processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: {features}\nCPU implementer\t: 0x41\n"
        f"CPU architecture: 8\nCPU variant\t: {variant}\nCPU part\t: {part}\nCPU revision\t: 1\n\n")
    for name in ("possible", "present", "online", "kernel_max"):
        (cpu / name).write_text("0\n")
    return root


def compare(out: np.ndarray, expected: np.ndarray) -> dict:
    """How outputs differ from onnxruntime's integer session on the host (dequantised taps)."""
    differ = out != expected
    return {"equal_to_ort_int8": bool(out.shape == expected.shape and not differ.any()),
            "values_differing": int(differ.sum()) if out.shape == expected.shape else -1,
            "max_abs_difference": float(np.abs(out - expected).max()) if out.shape == expected.shape else -1.0}


def bench_aarch64(model: str, frozen: Path, qop: Path, x: np.ndarray, ort_dir: Path | None, few: int, many: int,
                  work: Path) -> dict:
    shape = x.shape[1:]
    ref = session(frozen, int8_kernels=True)
    expected = np.concatenate([np.concatenate([o.ravel() for o in ref.run(None, {"x": x[i:i + 1]})])
                               for i in range(many)])
    macs = backbone_macs(frozen)
    rows: dict[str, dict] = {}
    driver = None
    if ort_dir is not None:
        lib = ort_library(ort_dir)
        driver = work / "ort_driver"
        subprocess.run(["aarch64-linux-gnu-gcc", "-O2", str(ORT_DRIVER), "-ldl", "-o", str(driver)], check=True,
                       capture_output=True, text=True)
        env = dict(os.environ, LD_LIBRARY_PATH=str(lib.parent))
    for target in LINUX_TARGETS:
        qemu = ["qemu-aarch64-static", "-L", str(guest_root(target, work)), "-cpu", QEMU_CPU[target][0]]
        program, graph = frozen_program(frozen, target, work)
        insns, out = per_sample(lambda k, p=program, q=qemu: traced_instructions(
            [*q, str(p), "in.bin", "out.bin", str(k)], work), x, few, many, work)
        row = {"edgetune": {"instructions": insns, "per_mac": insns / macs, **compare(out, expected),
                            "schedules": sorted({k.schedule.split(":")[0] for k in graph.plan.kernels})}}
        print(f"  {model} {target} edgetune: {insns:,.0f} instructions per sample ({insns / macs:.2f} per MAC)",
              flush=True)
        if driver is not None:
            # on ARM, onnxruntime's default QDQ session already runs every op as an integer kernel
            # (session.qdqisint8allowed is on by default there): one QDQ row, plus the QOperator model
            for name, path, extra in (("ort_qdq_int8", frozen, ["int8"]), ("ort_qoperator", qop, [])):
                insns, out = per_sample(lambda k, p=path, e=extra, q=qemu: traced_instructions(
                    [*q, str(driver), str(lib), str(p), "in.bin", "out.bin", str(k), *map(str, shape), *e],
                    work, env), x, few, many, work)
                row[name] = {"instructions": insns, "per_mac": insns / macs, **compare(out, expected)}
                print(f"  {model} {target} {name}: {insns:,.0f} ({insns / macs:.2f} per MAC)", flush=True)
            best = min((k for k in row if k.startswith("ort")), key=lambda k: row[k]["instructions"])
            row["best_ort"] = best
            row["ratio_to_best_ort"] = row["edgetune"]["instructions"] / row[best]["instructions"]
        rows[target] = row
    return {"macs": macs, "targets": rows, "samples": [few, many]}


# --- schedule attempts ---------------------------------------------------------------------------
# the schedule variants tried against each goal: ScheduleConfig overrides for LLVM targets (the C path is
# never touched); "shipped" is what ScheduleConfig.for_target picks
VARIANTS = {"shipped": None, "no-dot": {"dot": False}, "dot": {"dot": True}, "oc_tile 8": {"oc_tile": 8},
            "lanes 32": {"lanes": 32}}


@contextmanager
def schedule_variant(name: str):
    """``ScheduleConfig.for_target`` overridden for LLVM targets while compiling a variant."""
    from edgetune.compilers import schedule as sched

    shipped = sched.ScheduleConfig.for_target
    knobs = VARIANTS[name]

    def chosen(target):
        cfg = shipped(target)
        return cfg if knobs is None or str(target.kind.name) != "llvm" else replace(cfg, **knobs)

    sched.ScheduleConfig.for_target = staticmethod(chosen)
    try:
        yield
    finally:
        sched.ScheduleConfig.for_target = staticmethod(shipped)


# the host variants: (schedule variant, x86 micro-kernels routed, their C flags (None: host_kernels.CFLAGS),
# depthwise micro-kernel routed). "tvm ..." are TVM's own kernels only (the host library before the
# micro-kernels); "plain C" routes the micro-kernels built without -march (the header's fallback, what a CPU
# without AVX-512 VNNI would run); "+ depthwise" routes the depthwise convs to their micro-kernel too
HOST_VARIANTS = {"shipped": ("shipped", True, None, False), "micro-kernels + depthwise": ("shipped", True, None, True),
                 "micro-kernels plain C": ("shipped", True, ("-O2",), False),
                 "tvm only": ("shipped", False, None, False), "tvm dot": ("dot", False, None, False),
                 "tvm oc_tile 8": ("oc_tile 8", False, None, False), "tvm lanes 32": ("lanes 32", False, None, False)}


@contextmanager
def host_variant(name: str):
    """A ``HOST_VARIANTS`` entry in force while compiling for the host."""
    variant, routed, cflags, depthwise = HOST_VARIANTS[name]
    saved = host_kernels.vnni_available, host_kernels.CFLAGS, host_kernels.ROUTE_DEPTHWISE
    if not routed:
        host_kernels.vnni_available = lambda cc="gcc": False
    elif cflags is not None:
        host_kernels.vnni_available = lambda cc="gcc": True
        host_kernels.CFLAGS = cflags
    host_kernels.ROUTE_DEPTHWISE = depthwise
    try:
        with schedule_variant(variant):
            yield
    finally:
        host_kernels.vnni_available, host_kernels.CFLAGS, host_kernels.ROUTE_DEPTHWISE = saved


def bench_attempts(model: str, frozen: Path, x: np.ndarray, rounds: int, per_round: int, work: Path) -> dict:
    """Host wall time of each variant next to onnxruntime's default QDQ session (the fastest one on x86), and
    aarch64 instructions per sample of the dot / no-dot variants; each variant's outputs checked."""
    ref = session(frozen, int8_kernels=True)
    expected = [ref.run(None, {"x": x[i:i + 1]}) for i in range(len(x))]
    runners, exact = {}, {}
    for name in HOST_VARIANTS:
        with host_variant(name):
            runners[name] = FrozenRunner(compile_frozen(frozen, "host", work / f"host-{name.replace(' ', '')}"))
        exact[name] = all(np.array_equal(a, b) for i in range(len(x))
                          for a, b in zip(runners[name](x[i:i + 1]), expected[i]))
    default = session(frozen, int8_kernels=False)
    one = x[:1]
    calls = {k: (lambda r=r: r(one)) for k, r in runners.items()}
    calls["ort_qdq_default"] = lambda: default.run(None, {"x": one})
    times = time_engines(calls, rounds, per_round)
    host = {k: {"median_us": v["median_us"], "ratio_to_ort_default": v["median_us"] / times["ort_qdq_default"]
                ["median_us"], "bit_exact": exact.get(k)} for k, v in times.items()}
    macs = backbone_macs(frozen)
    flat = np.concatenate([np.concatenate([o.ravel() for o in e]) for e in expected])
    (work / "in.bin").write_bytes(np.ascontiguousarray(x).tobytes())
    arm: dict[str, dict] = {}
    for target in LINUX_TARGETS:
        qemu = ["qemu-aarch64-static", "-L", str(guest_root(target, work)), "-cpu", QEMU_CPU[target][0]]
        for name in ("no-dot", "dot"):
            w = work / f"{target}-{name}"
            w.mkdir(parents=True, exist_ok=True)
            with schedule_variant(name):
                program, _ = frozen_program(frozen, target, w)
            insns, out = per_sample(lambda k, p=program, q=qemu, w=w: traced_instructions(
                [*q, str(p), "in.bin", "out.bin", str(k)], w), x, 1, len(x), w)
            arm[f"{target} {name}"] = {"instructions": insns, "per_mac": insns / macs,
                                       "bit_exact": bool(np.array_equal(out, flat[:out.size]))}
    return {"host": host, "aarch64": arm, "macs": macs}


def render_attempts(results: dict) -> str:
    lines = ["# Schedule attempts (Linux targets and host)", "",
             f"`python benchmarks/bench_linux.py {results['argv']}` ({results['when']}).", "",
             "Host: median wall time per sample, batch 1, one thread, next to onnxruntime's default QDQ session "
             "in the same interleaved rounds. aarch64: guest instructions per sample under qemu-aarch64.", "",
             "| model | variant | host us | / onnxruntime default | bit-exact |", "|---|---|---|---|---|"]
    for model, r in results["models"].items():
        for k, v in r["attempts"]["host"].items():
            lines.append(f"| {model} | {k} | {v['median_us']:.1f} | {v['ratio_to_ort_default']:.2f}x | "
                         f"{'-' if v['bit_exact'] is None else v['bit_exact']} |")
    lines += ["", "| model | target, variant | instructions per sample | per MAC | bit-exact |",
              "|---|---|---|---|---|"]
    for model, r in results["models"].items():
        for k, v in r["attempts"]["aarch64"].items():
            lines.append(f"| {model} | {k} | {v['instructions']:,.0f} | {v['per_mac']:.3f} | {v['bit_exact']} |")
    return "\n".join(lines) + "\n"


# --- report ---------------------------------------------------------------------------------------
def render(results: dict) -> str:
    lines = ["# Linux targets and host against onnxruntime", "",
             f"`python benchmarks/bench_linux.py {results['argv']}` ({results['when']}).", "",
             "## Host: wall time per sample (batch 1, one thread, median of interleaved calls)", "",
             "| model | edgetune | onnxruntime QDQ default | QDQ int8 kernels | QOperator | best onnxruntime | "
             "edgetune / best | bit-exact (edgetune = ORT int8) | kernels on x86 micro-kernels |",
             "|---|---|---|---|---|---|---|---|---|"]
    for model, r in results["models"].items():
        h = r.get("host")
        if not h:
            continue
        t = h["times"]
        lines.append(f"| {model} | {t['edgetune']['median_us']:.1f} us | {t['ort_qdq_default']['median_us']:.1f} us | "
                     f"{t['ort_qdq_int8']['median_us']:.1f} us | {t['ort_qoperator']['median_us']:.1f} us | "
                     f"{h['best_ort']} | **{h['ratio_to_best_ort']:.2f}x** | "
                     f"{h['equal_to_ort_int8']}/{h['samples_checked']} | "
                     f"{h.get('micro_kernels', 0)} of {h.get('kernels', '-')} |")
    lines += ["", "## aarch64 under qemu-aarch64: guest instructions per sample (per backbone MAC)", "",
              "| model | target (QEMU CPU) | MACs | edgetune | onnxruntime QDQ (integer kernels) | "
              "onnxruntime QOperator | edgetune / best onnxruntime |", "|---|---|---|---|---|---|---|"]
    for model, r in results["models"].items():
        a = r.get("aarch64")
        for target, row in (a or {}).get("targets", {}).items():
            def cell(k: str, row: dict = row) -> str:
                c = row.get(k)
                return "-" if c is None else (f"{c['instructions']:,.0f} ({c['per_mac']:.2f})"
                                              + ("" if c["equal_to_ort_int8"] else " *"))
            ratio = f"**{row['ratio_to_best_ort']:.2f}x**" if "ratio_to_best_ort" in row else "-"
            lines.append(f"| {model} | {target} ({QEMU_CPU[target][0]}) | {a['macs']:,} | {cell('edgetune')} | "
                         f"{cell('ort_qdq_int8')} | {cell('ort_qoperator')} | {ratio} |")
    lines += ["", "`*`: some outputs differ from onnxruntime's integer session on the host for the same images "
              "(json: values_differing, max_abs_difference)."]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    host = [(m, r["host"]["times"]) for m, r in results["models"].items() if r.get("host")]
    engines = ["edgetune", "ort_qdq_default", "ort_qdq_int8", "ort_qoperator"]
    width = 0.8 / len(engines)
    for j, e in enumerate(engines):
        axes[0].bar([i + j * width for i in range(len(host))], [t[e]["median_us"] for _, t in host], width, label=e)
    axes[0].set_xticks([i + 0.4 - width / 2 for i in range(len(host))], [m for m, _ in host], rotation=30,
                       ha="right", fontsize=8)
    axes[0].set_yscale("log")  # the reference models span 14 us to 1.4 ms
    axes[0].set_ylabel("host us per sample (median, 1 thread, log)")
    axes[0].legend(fontsize=8)
    bars = [(f"{m}\n{t}", row) for m, r in results["models"].items()
            for t, row in r.get("aarch64", {}).get("targets", {}).items()]
    width = 0.8 / len(engines)
    for j, e in enumerate(engines):
        axes[1].bar([i + j * width for i in range(len(bars))], [row.get(e, {}).get("per_mac", 0) for _, row in bars],
                    width, label=e)
    axes[1].axhline(1.0, color="k", lw=0.8, ls="--")
    axes[1].set_xticks([i + 0.4 - width / 2 for i in range(len(bars))], [b for b, _ in bars], fontsize=8)
    axes[1].set_ylabel("aarch64 instructions per backbone MAC (qemu)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="tiny-cnn,mcunet-s",
                   help=f"comma list; 'reference' stands for {', '.join(REFERENCE)} (host rows only)")
    p.add_argument("--onnxruntime-aarch64", type=Path, default=None,
                   help="folder holding libonnxruntime.so* of onnxruntime's aarch64 wheel (column skipped without)")
    p.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds (host)")
    p.add_argument("--per-round", type=int, default=200, help="timed calls per engine and round (host)")
    p.add_argument("--samples", type=int, default=50, help="test images checked for bit-exactness (host)")
    p.add_argument("--few", type=int, default=1, help="samples of the shorter traced run (aarch64)")
    p.add_argument("--many", type=int, default=4, help="samples of the longer traced run (aarch64)")
    p.add_argument("--skip", default="", help="comma list of parts to skip: host, aarch64")
    p.add_argument("--attempts", action="store_true", help="measure the schedule variants instead (attempts.*)")
    p.add_argument("--quick", action="store_true", help="tiny-cnn, few calls, 1 vs 2 traced samples")
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--out", type=Path, default=ROOT / "results" / "linux_kernels")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.rounds, args.per_round, args.samples, args.many = "tiny-cnn", 3, 50, 5, 2
    if args.onnxruntime_aarch64 is not None:
        ort_library(args.onnxruntime_aarch64)
    skip = set(filter(None, args.skip.split(",")))
    if shutil.which("qemu-aarch64-static") is None or shutil.which("aarch64-linux-gnu-gcc") is None:
        print("bench_linux: qemu-aarch64-static or aarch64-linux-gnu-gcc missing: aarch64 part skipped")
        skip.add("aarch64")
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-linux-"))
    results = {"models": {}, "when": time.strftime("%Y-%m-%d"), "onnxruntime_host": ort.__version__,
               "argv": " ".join("DIR" if a.startswith("/") else a for a in (argv or sys.argv[1:]))}
    models = [m for name in args.models.split(",") for m in (REFERENCE if name == "reference" else (name,))]
    for model in models:
        mw = work / model
        mw.mkdir(parents=True, exist_ok=True)
        frozen = model_frozen(model, mw)
        if args.attempts:
            results["models"][model] = {"attempts": bench_attempts(model, frozen, test_images(model, args.many),
                                                                   args.rounds, args.per_round, mw / "attempts")}
            print(render_attempts(results), flush=True)
            continue
        qop = qoperator_model(mw, model)
        x = test_images(model, max(args.samples, args.many))
        r: dict = {}
        if "host" not in skip:
            r["host"] = bench_host(model, frozen, qop, x[:args.samples], args.rounds, args.per_round, mw)
            print(f"{model} host: " + ", ".join(f"{k} {v['median_us']:.1f} us" for k, v in r["host"]["times"].items())
                  + f"; edgetune / best onnxruntime {r['host']['ratio_to_best_ort']:.2f}x", flush=True)
        if "aarch64" not in skip and model not in REFERENCE:
            r["aarch64"] = bench_aarch64(model, frozen, qop, x, args.onnxruntime_aarch64, args.few, args.many, mw)
        results["models"][model] = r
    args.out.mkdir(parents=True, exist_ok=True)
    if args.attempts:
        (args.out / "attempts.json").write_text(json.dumps(results, indent=1) + "\n")
        (args.out / "attempts.md").write_text(render_attempts(results))
        return 0
    (args.out / "linux.json").write_text(json.dumps(results, indent=1) + "\n")
    text = render(results)
    (args.out / "linux.md").write_text(text)
    plot(results, args.out / "linux.png")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
