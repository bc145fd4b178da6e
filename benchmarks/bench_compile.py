"""Benchmark: the compiled int8 backbone vs onnxruntime on the same int8 ONNX, batch 1, one thread.

For each model: train briefly on digits, export frozen.onnx as a bundle does (edgetune.export),
compile it for the host, check the taps are bit-identical to onnxruntime's, then time both
side by side (interleaved rounds, best round reported). onnxruntime is timed twice: with
``session.qdqisint8allowed=1`` (every op an int8 kernel — the configuration the compiled
graph reproduces bit for bit, and onnxruntime's default on ARM) and with default x86 options
(which runs part of the graph as fake-quant float).

    python benchmarks/bench_compile.py [--models tiny-cnn mcunet-s] [--epochs 3] [--iters 300]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from edgetune.checkpoint import load_checkpoint
from edgetune.compilers import FrozenRunner, compile_frozen
from edgetune.data import load_dataset, to_tensor
from edgetune.export.onnx_graphs import export_frozen
from edgetune.export.quantize import quantize_frozen
from edgetune.methods.base import TapSpec
from edgetune.ort_runtime import session
from edgetune.train import train_source


def frozen_onnx(model: str, epochs: int, work: Path) -> Path:
    """A bundle-style frozen.onnx of ``model`` trained ``epochs`` epochs: stage-1 map + pooled last stage."""
    data = load_dataset("digits")
    train_source(model, data, work / model, epochs=epochs, progress=False)
    backbone, _ = load_checkpoint(work / model)
    last = len(backbone.stages) - 1
    fp32 = work / f"{model}_float.onnx"
    export_frozen(backbone, [TapSpec(1, False), TapSpec(last, True)], fp32)
    out = work / f"{model}_frozen.onnx"
    quantize_frozen(fp32, out, data.train_x, data.name)
    return out


def per_call_us(fn, iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters * 1e6


def time_side_by_side(engines: dict, x: np.ndarray, iters: int, rounds: int) -> dict[str, float]:
    """Best per-call microseconds of each engine over interleaved rounds (same input, same run)."""
    calls = {k: (lambda e=e: e(x)) if isinstance(e, FrozenRunner) else (lambda e=e: e.run(None, {"x": x}))
             for k, e in engines.items()}
    for fn in calls.values():
        per_call_us(fn, 20)
    best = {k: float("inf") for k in calls}
    for _ in range(rounds):
        for k, fn in calls.items():
            best[k] = min(best[k], per_call_us(fn, iters))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["tiny-cnn", "mcunet-s"])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--iters", type=int, default=300, help="calls per timing round")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (best is reported)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    x = to_tensor(load_dataset("digits").test_x[:200]).numpy()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for model in args.models:
            path = frozen_onnx(model, args.epochs, work)
            compile_s = {}
            for target in ("host", "aarch64", "c"):
                start = time.perf_counter()
                graph = compile_frozen(path, target, work / f"{model}_{target}")
                compile_s[target] = time.perf_counter() - start
            graph = compile_frozen(path, "host", work / f"{model}_host")
            runner = FrozenRunner(graph)
            int8, default = session(path, int8_kernels=True), session(path, int8_kernels=False)
            same = all(np.array_equal(a, b) for i in range(len(x))
                       for a, b in zip(runner(x[i:i + 1]), int8.run(None, {"x": x[i:i + 1]})))
            best = time_side_by_side({"tvm": runner, "ort_int8": int8, "ort_default": default}, x[:1], args.iters,
                                     args.rounds)
            rows.append((model, compile_s, best, same, graph))

    print("\nbatch-1 latency, one thread (best of interleaved rounds); ratio = TVM / onnxruntime")
    print(f"{'model':10} {'TVM us':>8} {'ORT int8 us':>11} {'ratio':>6} {'ORT default us':>14} "
          f"{'ratio':>6} {'taps == ORT int8':>16} {'arena B':>8} {'workspace B':>11} {'const B':>8} {'vs ONNX':>7}")
    for model, _, t, same, g in rows:
        print(f"{model:10} {t['tvm']:8.1f} {t['ort_int8']:11.1f} {t['tvm'] / t['ort_int8']:6.2f} "
              f"{t['ort_default']:14.1f} {t['tvm'] / t['ort_default']:6.2f} {str(same):>16} "
              f"{g.plan.arena_bytes:8d} {g.plan.workspace_bytes:11d} {g.constant_bytes.total:8d} "
              f"{g.constant_bytes.ratio:7.3f}")
    print(f"\n{'compile time (s)':16} {'host':>6} {'aarch64':>8} {'c':>6}   host by stage")
    for model, compile_s, _, _, g in rows:
        stages = ", ".join(f"{k} {v:.1f}" for k, v in g.seconds.items() if k != "total")
        print(f"{model:16} {compile_s['host']:6.1f} {compile_s['aarch64']:8.1f} {compile_s['c']:6.1f}   {stages}")


if __name__ == "__main__":
    main()
