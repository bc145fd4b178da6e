"""Benchmark: the compiled training step vs torch eager, batch 1, one thread, side by side.

For each method on mcunet-s (committed digits checkpoint): fit, export, compile trainable.onnx
into the fused training step (forward, loss, gradient, SGD update; ``compilers/train_step.py``)
for the host, then time one streaming step on the same taps in interleaved rounds: torch eager
(``Method.step``: forward, backward, optimizer, statistics update) against the compiled step
called through the Relax VM (its per-call Python and argument-copy overhead included). Prints a
table of microseconds per step, the ratio, and the compile time per method; not a test.

    python benchmarks/bench_train_step.py [--methods feature-align,tinytta,lst,vqt] [--iters 200]
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

from edgetune.adapt import fit, prepare, source_taps
from edgetune.checkpoint import load_checkpoint
from edgetune.compilers.train_step import TrainStep, compile_train_step
from edgetune.data import build_stream, load_dataset
from edgetune.export import export

ROOT = Path(__file__).resolve().parent.parent


def per_call_us(fn, n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        fn(i)
    return 1e6 * (time.perf_counter() - start) / n


def time_method(name: str, backbone, model: str, data, images, rounds: int) -> tuple[float, float, float]:
    """(torch eager us per step, compiled us per step, compile seconds) of one method."""
    # lst and vqt learn only from revealed labels by default: switch their entropy loss on to time an update
    overrides = {"fit_epochs": "3"} | ({"entropy_weight": "1.0"} if name in ("lst", "vqt") else {})
    adaptable = prepare(copy.deepcopy(backbone), name, overrides, model_name=model)
    fit(adaptable, data, progress=False)
    bundle = Path(tempfile.mkdtemp(prefix="bench-train-"))
    manifest = export(adaptable, data, bundle, progress=False)
    t0 = time.perf_counter()
    step = TrainStep(compile_train_step(bundle / manifest.trainable.file, manifest))
    compile_s = time.perf_counter() - t0
    taps = source_taps(adaptable, images)
    method = adaptable.method
    np_taps = [[t[i:i + 1].numpy() for t in taps] for i in range(len(images))]
    state = [[method.get_buffer(n).detach().numpy().copy() for n in method.state_names()]]

    def eager(i: int) -> None:
        method.step([t[i:i + 1] for t in taps])

    def compiled(i: int) -> None:
        _, _, new_state = step.step(np_taps[i], state[0], 0.05)
        state[0] = new_state or state[0]

    best = {"torch": float("inf"), "compiled": float("inf")}
    for _ in range(rounds):
        adaptable.reset()
        step.reset()
        best["torch"] = min(best["torch"], per_call_us(eager, len(images)))
        best["compiled"] = min(best["compiled"], per_call_us(compiled, len(images)))
    return best["torch"], best["compiled"], compile_s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "mcunet-s-digits"))
    p.add_argument("--methods", default="feature-align,tinytta,lst,vqt")
    p.add_argument("--iters", type=int, default=200, help="steps per round")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the best of each engine is kept")
    args = p.parse_args()
    torch.set_num_threads(1)
    backbone, config = load_checkpoint(args.checkpoint)
    data = load_dataset("digits")
    images = build_stream(data, ("gaussian_noise",), 5, "episodic", 0, args.iters)[0].images
    rows = []
    for name in args.methods.split(","):
        torch_us, compiled_us, compile_s = time_method(name, backbone, config["model"], data, images, args.rounds)
        rows.append((name, torch_us, compiled_us, compile_s))
        print(f"{name}: torch {torch_us:.0f} us, compiled {compiled_us:.0f} us, compile {compile_s:.1f} s")
    print("\n| method | torch eager step | compiled step (Relax VM) | ratio | compile time |")
    print("| --- | --- | --- | --- | --- |")
    for name, t, c, s in rows:
        print(f"| {name} | {t:.0f} us | {c:.0f} us | {c / t:.2f} | {s:.1f} s |")


if __name__ == "__main__":
    main()
