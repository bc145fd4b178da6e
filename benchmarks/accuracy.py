"""Online accuracy of every method on a corrupted stream, next to source: tables, JSON and a plot.

Hyperparameters are chosen on the validation split only (the 4 extra corruptions applied to
held-out *training* images): ``--split val --tune`` runs each method's grid and writes the
chosen overrides; ``--split test`` reports the 15 test corruptions with those overrides.

    python benchmarks/accuracy.py --data fashion-mnist --split val --tune --samples 2000
    python benchmarks/accuracy.py --data fashion-mnist --split test --samples 2000
    python benchmarks/accuracy.py --split test --source-mode unlabelled --methods source,feature-align,tinytta

``--source-mode`` says what fit and int8 calibration read (``edgetune.data.roles``): the labelled
training split (the default), the same images without their labels, or nothing at all (a
warm-up on the first ``--warmup`` samples of each protocol's stream, scored like the rest).

Each method runs on the backbone it needs (bn-adapt / alpha-bn on the BatchNorm twin), with
the frozen part in onnxruntime int8 (``--backbone onnx-int8``, the default) where the method
is partitioned.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch

from edgetune.adapt import fit, prepare
from edgetune.checkpoint import load_checkpoint
from edgetune.data import TEST_CORRUPTIONS, VALIDATION_CORRUPTIONS, build_stream, load_dataset, warmup_source
from edgetune.evaluate import run_stream, tap_function
from edgetune.memory import memory_table

METHODS = ("source", "bn-adapt", "alpha-bn", "tent", "feature-align", "tinytta", "lst", "vqt")
BN_METHODS = ("bn-adapt", "alpha-bn")
# Candidate overrides per method (validation split only). Each key lists values to cross.
GRIDS: dict[str, dict[str, list[str]]] = {
    "feature-align": {"momentum_start": ["0.05", "0.1", "0.2"], "momentum_decay": ["0.9", "0.94", "0.98"],
                      "momentum_floor": ["0.005", "0.02"]},
    "tinytta": {"lr": ["0", "1e-4", "1e-3"]},  # exit-head width: chosen for memory (results/d)
    # lst and vqt update only on revealed labels by default (entropy cost accuracy on digits), so
    # their unsupervised results do not depend on lr: nothing to choose here.
    "tent": {"lr": ["1e-6", "1e-5", "1e-4"]},
    "alpha-bn": {"alpha": ["0.05", "0.1", "0.2"]},
    "bn-adapt": {"momentum_start": ["0.05", "0.1"], "momentum_floor": ["0.001", "0.01"]},
}


def grid(method: str) -> list[dict[str, str]]:
    g = GRIDS.get(method, {})
    keys = list(g)
    return [dict(zip(keys, vals)) for vals in itertools.product(*(g[k] for k in keys))] or [{}]


class CachedTaps:
    """Frozen taps depend only on the backbone, the tap specs and the images: compute them once."""

    def __init__(self, inner, key: str) -> None:
        self.inner, self.key, self.cache = inner, key, {}

    def __call__(self, adaptable, images):
        k = hashlib.sha1(images.tobytes()).hexdigest()
        if k not in self.cache:
            self.cache[k] = self.inner(adaptable, images)
        return self.cache[k]


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    data = load_dataset(args.data)
    corruptions = VALIDATION_CORRUPTIONS if args.split == "val" else TEST_CORRUPTIONS
    paths = {"main": args.checkpoint, "bn": args.bn_checkpoint}
    ckpts: dict[str, tuple] = {}
    chosen_path = Path(args.out) / f"{args.data}-chosen.json"
    chosen = json.loads(chosen_path.read_text()) if chosen_path.exists() and not args.tune else {}
    rows = []
    tap_cache: dict[tuple, CachedTaps] = {}
    for protocol in args.protocols.split(","):
        segments = build_stream(data, corruptions, args.severity, protocol, args.seed, args.samples,
                                split="test" if args.split == "test" else "val")
        source = data if args.source_mode != "none" else warmup_source(
            np.concatenate([s.images for s in segments]), data.name, args.warmup)
        for method in args.methods.split(","):
            which = "bn" if method in BN_METHODS else "main"
            if which not in ckpts:
                ckpts[which] = load_checkpoint(paths[which])
            backbone, cfg = ckpts[which]
            configs = grid(method) if args.tune else [chosen.get(method, {})]
            for overrides in configs:
                start = time.time()
                adaptable = prepare(copy.deepcopy(backbone), method, overrides, model_name=cfg["model"])
                fit(adaptable, source, seed=args.seed, progress=False, mode=args.source_mode)
                key = (which, tuple(adaptable.method.taps()), protocol if args.source_mode == "none" else "")
                if key not in tap_cache:
                    fn, label = tap_function(adaptable, source, args.backbone)
                    tap_cache[key] = CachedTaps(fn, label)
                result = run_stream(adaptable, segments, tap_cache[key], seed=args.seed, progress=False)
                mem = memory_table(adaptable)
                row = {"method": method, "model": cfg["model"], "protocol": protocol, "overrides": overrides,
                       "source_mode": args.source_mode,
                       "backbone": tap_cache[key].key, "mean": result.mean, "per_corruption": result.per_corruption,
                       "early_exit_rate": result.early_exit_rate, "restores": result.restores,
                       "memory_bytes": mem, "seconds": round(time.time() - start, 1)}
                rows.append(row)
                print(f"{protocol:<10} {method:<14} {json.dumps(overrides):<70} {100 * result.mean:6.2f}  "
                      f"({row['seconds']} s)", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"{args.data}-{args.split}-sev{args.severity}" + ("" if args.source_mode == "labelled" else
                                                           f"-{args.source_mode}-source")
    (out / f"{tag}.json").write_text(json.dumps(rows, indent=1) + "\n")
    if args.tune:
        best = {}
        for method in {r["method"] for r in rows}:
            by_cfg: dict[str, list[float]] = {}
            for r in rows:
                if r["method"] == method:
                    by_cfg.setdefault(json.dumps(r["overrides"], sort_keys=True), []).append(r["mean"])
            best[method] = json.loads(max(by_cfg, key=lambda k: np.mean(by_cfg[k])))
        chosen_path.write_text(json.dumps(best, indent=1, sort_keys=True) + "\n")
        print(f"chosen on validation -> {chosen_path}: {best}")
    else:
        write_table(rows, out / f"{tag}.md", args)
        plot(rows, out / f"{tag}.png", args)


def write_table(rows: list[dict], path: Path, args: argparse.Namespace) -> None:
    protocols = list(dict.fromkeys(r["protocol"] for r in rows))
    lines = [f"Mean online accuracy (%), {args.data}, severity {args.severity}, {args.samples or 'all'} samples per "
             f"corruption, batch 1, seed {args.seed}, source: {args.source_mode}"
             + (f" (warm-up on the first {args.warmup} stream samples)" if args.source_mode == "none" else ""), "",
             "| method | backbone model | " + " | ".join(protocols) + " | early exit | restores |",
             "| --- | --- | " + " | ".join("---:" for _ in protocols) + " | ---: | ---: |"]
    for method in dict.fromkeys(r["method"] for r in rows):
        rs = {r["protocol"]: r for r in rows if r["method"] == method}
        first = next(iter(rs.values()))
        ee = first["early_exit_rate"]
        lines.append(f"| {method} | {first['model']} | " + " | ".join(f"{100 * rs[p]['mean']:.1f}" for p in protocols)
                     + f" | {'' if ee is None else f'{100 * ee:.0f}%'} | {sum(r['restores'] for r in rs.values())} |")
    lines += ["", "Per corruption (episodic):", "",
              "| method | " + " | ".join(c[:10] for c in next(iter(rows))["per_corruption"]) + " |",
              "| --- | " + " | ".join("---:" for _ in next(iter(rows))["per_corruption"]) + " |"]
    for r in rows:
        if r["protocol"] == protocols[0]:
            lines.append(f"| {r['method']} | " + " | ".join(f"{100 * v:.1f}" for v in r["per_corruption"].values())
                         + " |")
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot(rows: list[dict], path: Path, args: argparse.Namespace) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    methods = list(dict.fromkeys(r["method"] for r in rows))
    protocols = list(dict.fromkeys(r["protocol"] for r in rows))
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(protocols)
    for i, p in enumerate(protocols):
        vals = [100 * next(r["mean"] for r in rows if r["method"] == m and r["protocol"] == p) for m in methods]
        ax.bar(np.arange(len(methods)) + i * width, vals, width, label=p)
    ax.set_xticks(np.arange(len(methods)) + width * (len(protocols) - 1) / 2, methods, rotation=20)
    ax.set_ylabel("mean online accuracy (%)")
    ax.set_title(f"{args.data}-C severity {args.severity}, batch 1")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="fashion-mnist", choices=["digits", "fashion-mnist"])
    p.add_argument("--checkpoint", default="checkpoints/mcunet-s-fashion-mnist")
    p.add_argument("--bn-checkpoint", default="checkpoints/mcunet-s-bn-fashion-mnist")
    p.add_argument("--split", default="test", choices=["val", "test"])
    p.add_argument("--tune", action="store_true", help="run each method's grid (validation split only)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--protocols", default="episodic,continual")
    p.add_argument("--severity", type=int, default=5)
    p.add_argument("--samples", type=int, default=2000, help="samples per corruption")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backbone", default="onnx-int8", choices=["torch", "onnx-int8"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--source-mode", default="labelled", choices=["labelled", "unlabelled", "none"],
                   help="what fit and int8 calibration read: the labelled training split, its images only, or a "
                        "warm-up on the stream")
    p.add_argument("--warmup", type=int, default=200, help="--source-mode none: stream samples in the warm-up")
    p.add_argument("--out", default="results")
    args = p.parse_args()
    if args.tune and args.split != "val":
        p.error("--tune chooses hyperparameters and is allowed on --split val only")
    run(args)


if __name__ == "__main__":
    main()
