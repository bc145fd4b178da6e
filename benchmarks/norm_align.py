"""norm-align on Fashion-MNIST-C: per-layer alignment inside the int8 backbone, next to source, pooled
alignment (feature-align) and the BatchNorm twin's bn-adapt at batch 1 and batch 64.

The int8 rows run the exported QDQ backbone through ``edgetune.int8ref`` (onnxruntime's integer
arithmetic, bit-exact with its session when nothing is folded) with each convolution's affine
folded into its requantisation; the classifier and the pooled alignment run in float, as on the
device. ``source`` is the same graph with nothing folded; ``feature-align`` aligns only the pooled
features (its validated momentum). bn-adapt runs the BatchNorm twin in torch float: batch 1 is
the deployable DUA-style running estimate, batch 64 the big-batch reference (each chunk of 64
consecutive stream samples normalised with its own statistics; not deployable).

    python benchmarks/norm_align.py --split val --tune --samples 2000       # choose on validation
    python benchmarks/norm_align.py --split test --samples 2000             # 15 corruptions + clean
    python benchmarks/norm_align.py --quick                                  # 100 samples, 3 corruptions
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from edgetune.adapt import fit, prepare
from edgetune.checkpoint import load_checkpoint
from edgetune.data import TEST_CORRUPTIONS, VALIDATION_CORRUPTIONS, build_stream, load_dataset, to_tensor
from edgetune.evaluate import run_stream, walk_stream
from edgetune.export.quantize import calibration_images
from edgetune.int8ref.norm_align_int8 import Int8NormAlign, int8_graph
from edgetune.int8ref.qdq_model import QDQModel
from edgetune.methods import norm_align  # noqa: F401 - registers norm-align

# Validation grid (int8): which stages to align; DUA's momentum schedule stays at its defaults. The float
# exploration behind it (every conv, stage outputs, mean only) is in the README section.
GRID = {"first_stage": ["1", "2", "3"], "include_sample": ["true", "false"], "pooled": ["true"]}
FEATURE_ALIGN = {"momentum_start": "0.2", "momentum_decay": "0.98", "momentum_floor": "0.005"}  # its validated values
SOURCE_STATS_IMAGES = 2000


class Int8Runner:
    """``walk_stream``'s runner for an ``Int8NormAlign`` (predict, then the statistics stay in)."""

    restores = 0

    def __init__(self, model: Int8NormAlign, align: bool) -> None:
        self.model, self.align, self.x = model, align, torch.empty(0)

    def reset(self) -> None:
        self.model.reset()

    def begin(self, images: np.ndarray) -> None:
        self.x = to_tensor(images)

    def step(self, i: int) -> tuple[int, None]:
        return int(self.model.step(self.x[i:i + 1], self.align).argmax()), None

    def feedback(self, i: int, label: int) -> None:  # the unsupervised protocol reveals no label
        raise NotImplementedError


def int8_row(name, backbone, cfg, data, qdq, segments, overrides, align=True):
    # no float fit: every statistic the int8 run uses is measured on the int8 graph by ``calibrate``
    adaptable = prepare(copy.deepcopy(backbone), "norm-align", overrides, model_name=cfg["model"])
    model = Int8NormAlign(adaptable.method, qdq)
    model.calibrate(calibration_images(data.train_x, SOURCE_STATS_IMAGES))
    return walk_stream(Int8Runner(model, align), segments, name, progress=False)


def batch_row(backbone, cfg, data, segments, batch: int, continual: bool):
    """bn-adapt's big-batch reference: chunks of ``batch`` consecutive samples, each with its own statistics."""
    adaptable = prepare(copy.deepcopy(backbone), "bn-adapt", {"batch": str(batch)}, model_name=cfg["model"])
    fit(adaptable, data, seed=0, progress=False)
    groups = [segments] if continual else [[s] for s in segments]
    per = {}
    for group in groups:
        x = torch.cat([to_tensor(s.images) for s in group])
        pred = torch.cat([adaptable.method.predict_batch(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)])
        start = 0
        for s in group:
            per[s.name] = float((pred[start:start + len(s.labels)].numpy() == s.labels).mean())
            start += len(s.labels)
    return per


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    data = load_dataset("fashion-mnist")
    main, main_cfg = load_checkpoint(args.checkpoint)
    bn, bn_cfg = load_checkpoint(args.bn_checkpoint)
    qdq = QDQModel(int8_graph(main, data.train_x, data.name, Path(tempfile.mkdtemp()) / "frozen.onnx"))
    chosen_path = Path(args.out) / "chosen.json"
    corruptions = (VALIDATION_CORRUPTIONS if args.split == "val" else TEST_CORRUPTIONS)[:args.corruptions]
    rows = []

    def record(method, protocol, backbone, per, overrides, start):
        row = {"method": method, "protocol": protocol, "backbone": backbone, "overrides": overrides,
               "per_corruption": per, "mean": float(np.mean(list(per.values()))), "seconds": round(time.time() - start)}
        rows.append(row)
        print(f"{protocol:<10} {method:<26} {json.dumps(overrides):<60} {100 * row['mean']:6.2f} ({row['seconds']} s)",
              flush=True)

    for protocol in args.protocols.split(","):
        segments = build_stream(data, corruptions, args.severity, protocol, 0, args.samples,
                                split="test" if args.split == "test" else "val")
        if args.tune:
            grid = {**GRID, **json.loads(args.grid)}
            configs = [dict(zip(grid, v)) for v in itertools.product(*grid.values())]
        elif args.configs:
            configs = json.loads(args.configs)
        else:
            configs = [json.loads(chosen_path.read_text())] if chosen_path.exists() else [{}]
        for overrides in configs if "norm-align" in args.rows else []:
            t = time.time()
            if args.backbone == "torch":  # the float reference (any layers= choice)
                adaptable = prepare(copy.deepcopy(main), "norm-align", overrides, model_name=main_cfg["model"])
                fit(adaptable, data, seed=0, progress=False)
                per = run_stream(adaptable, segments, progress=False).per_corruption
            else:
                per = int8_row("norm-align", main, main_cfg, data, qdq, segments, overrides).per_corruption
            record("norm-align", protocol, f"mcunet-s {args.backbone}", per, overrides, t)
        if args.tune:
            continue
        if "source" in args.rows:
            t = time.time()
            record("source", protocol, "mcunet-s int8",
                   int8_row("source", main, main_cfg, data, qdq, segments, {}, align=False).per_corruption, {}, t)
        if "feature-align" in args.rows:
            t = time.time()
            fa = {**FEATURE_ALIGN, "pooled": "true"}
            record("feature-align (pooled only)", protocol, "mcunet-s int8",
                   int8_row("feature-align", main, main_cfg, data, qdq, segments, fa, align=False).per_corruption, fa,
                   t)
        if "bn-adapt-64" in args.rows:
            t = time.time()
            record("bn-adapt batch 64 (reference)", protocol, "mcunet-s-bn float",
                   batch_row(bn, bn_cfg, data, segments, 64, protocol == "continual"), {"batch": "64"}, t)
        if "bn-adapt-1" in args.rows:
            t = time.time()
            adaptable = prepare(copy.deepcopy(bn), "bn-adapt", args.bn_batch1_overrides, model_name=bn_cfg["model"])
            fit(adaptable, data, seed=0, progress=False)
            record("bn-adapt batch 1", protocol, "mcunet-s-bn float",
                   run_stream(adaptable, segments, progress=False).per_corruption, args.bn_batch1_overrides, t)
    if "clean" in args.rows and not args.tune:
        clean = build_stream(data, ("none",), args.severity, "episodic", 0, args.samples)
        overrides = json.loads(chosen_path.read_text()) if chosen_path.exists() else {}
        for name, ovr, align in (("norm-align", overrides, True), ("source", {}, False)):
            t = time.time()
            record(name, "clean", "mcunet-s int8",
                   int8_row(name, main, main_cfg, data, qdq, clean, ovr, align).per_corruption, ovr, t)
    write(rows, args)


def write(rows: list[dict], args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "quick" if args.quick else f"{args.split}-sev{args.severity}" + (f"-{args.tag}" if args.tag else "")
    summary = {"samples_per_corruption": args.samples, "rows": rows}
    (out / f"{tag}.json").write_text(json.dumps(summary, indent=1) + "\n")
    if args.tune:
        best = max((r for r in rows if r["protocol"] == "episodic"), key=lambda r: r["mean"])
        (out / "chosen.json").write_text(json.dumps(best["overrides"], indent=1, sort_keys=True) + "\n")
        print(f"chosen on validation -> {out / 'chosen.json'}: {best['overrides']}")
        return
    protocols = [p for p in dict.fromkeys(r["protocol"] for r in rows) if p != "clean"] or ["clean"]
    methods = list(dict.fromkeys(r["method"] for r in rows if r["protocol"] in protocols))
    get = {(r["method"], r["protocol"]): r for r in rows}
    lines = [f"Mean online accuracy (%), fashion-mnist-C, {args.split} corruptions, severity {args.severity}, "
             f"{args.samples} samples per corruption, batch 1 (except the batch-64 reference), seed 0", "",
             "| method | backbone | " + " | ".join(protocols) + " | clean |",
             "| --- | --- | " + " | ".join("---:" for _ in protocols) + " | ---: |"]
    for m in methods:
        first = next(r for r in rows if r["method"] == m)
        clean = get.get((m, "clean"))
        clean_cell = "" if clean is None else f"{100 * clean['mean']:.1f}"
        lines.append(f"| {m} | {first['backbone']} | " + " | ".join(
            f"{100 * get[(m, p)]['mean']:.1f}" if (m, p) in get else "" for p in protocols) + f" | {clean_cell} |")
    corrs = list(next(iter(rows))["per_corruption"])
    lines += ["", f"Per corruption ({protocols[0]}):", "", "| method | " + " | ".join(c[:10] for c in corrs) + " |",
              "| --- | " + " | ".join("---:" for _ in corrs) + " |"]
    for m in methods:
        if (m, protocols[0]) in get:
            lines.append(f"| {m} | " + " | ".join(f"{100 * v:.1f}" for v in get[(m, protocols[0])]["per_corruption"]
                                                   .values()) + " |")
    (out / f"{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(get, methods, corrs, protocols[0], out / f"{tag}.png", args)


def plot(get: dict, methods: list[str], corrs: list[str], protocol: str, path: Path, args) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(12, 4))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        if (m, protocol) in get:
            vals = [100 * get[(m, protocol)]["per_corruption"][c] for c in corrs]
            ax.bar(np.arange(len(corrs)) + i * width, vals, width, label=m)
    ax.set_xticks(np.arange(len(corrs)) + width * (len(methods) - 1) / 2, [c[:12] for c in corrs], rotation=35,
                  ha="right")
    ax.set_ylabel("online accuracy (%)")
    ax.set_title(f"fashion-mnist-C severity {args.severity}, {protocol}, {args.samples} samples per corruption")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8, ncol=len(methods), loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="checkpoints/mcunet-s-fashion-mnist")
    p.add_argument("--bn-checkpoint", default="checkpoints/mcunet-s-bn-fashion-mnist")
    p.add_argument("--split", default="test", choices=["val", "test"])
    p.add_argument("--tune", action="store_true", help="run norm-align's grid (validation split only)")
    p.add_argument("--protocols", default="episodic,continual")
    p.add_argument("--severity", type=int, default=5)
    p.add_argument("--samples", type=int, default=2000, help="samples per corruption")
    p.add_argument("--corruptions", type=int, default=15, help="the first N corruptions of the split")
    p.add_argument("--rows", default="norm-align,source,feature-align,bn-adapt-64,clean",
                   help="which rows: norm-align, source, feature-align, bn-adapt-64, bn-adapt-1 (slow: torch per "
                        "sample), clean (norm-align and source on the clean test stream)")
    p.add_argument("--grid", default="{}", help='--tune: JSON overriding grid entries, e.g. \'{"include_sample": '
                                                 '["false"]}\' (to split the grid over processes)')
    p.add_argument("--configs", default="", help='norm-align overrides to run instead of chosen.json, a JSON list '
                                                 'such as \'[{"layers": "stages"}, {}]\'')
    p.add_argument("--backbone", default="int8", choices=["int8", "torch"],
                   help="norm-align rows on the int8 reference (default) or the float torch reference")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="100 samples of 3 corruptions, episodic (a smoke run)")
    p.add_argument("--out", default="results/norm_align")
    p.add_argument("--merge", action="store_true", help="tables and plot from every tagged run's JSON in --out")
    p.add_argument("--tag", default="", help="suffix of the output files (runs split over processes)")
    args = p.parse_args()
    if args.tune and args.split != "val":
        p.error("--tune chooses hyperparameters and is allowed on --split val only")
    args.bn_batch1_overrides = {"momentum_floor": "0.001", "momentum_start": "0.05"}  # results/a's validated choice
    args.rows = set(args.rows.split(","))
    if args.quick:
        args.samples, args.corruptions, args.protocols = 100, 3, "episodic"
    if args.merge:
        # source and feature-align from benchmarks/accuracy.py (onnxruntime int8, the same streams) when
        # its output sits in <out>/baselines, then every tagged run of this script
        base = Path(args.out) / "baselines" / f"fashion-mnist-{args.split}-sev{args.severity}.json"
        rows = [{**r, "backbone": "mcunet-s int8 (onnxruntime)"} for r in json.loads(base.read_text())] \
            if base.exists() else []
        parts = sorted(Path(args.out).glob(f"{args.split}-sev{args.severity}-*.json"))
        write(rows + [r for part in parts for r in json.loads(part.read_text())["rows"]], args)
        return
    run(args)


if __name__ == "__main__":
    main()
