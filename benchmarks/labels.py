"""On-device learning from labels, one sample at a time (predict, score, then learn from the revealed label).

Two studies, every method in the same run on the same stream in the same order:

* transfer to a new task: a backbone trained on one dataset, a stream of another one's training
  split (new classes; each method's class layers start at zero, ``edgetune.adapt.start_new_task``;
  side networks, queries and exit heads keep their fit on the source). Prequential accuracy over
  the stream (every label revealed after its prediction is scored) and accuracy on the target's
  held-out split after N labelled samples (the method only predicts there, nothing adapts).
  Default: Fashion-MNIST -> digits and digits -> Fashion-MNIST (first ``--transfer-stream``
  training images).
* personalisation under shift: Fashion-MNIST-C severity 5, labels revealed for 5 %, 20 % and
  100 % of the samples (one seeded draw per stream, the same for every method), episodic and
  continual; mean online accuracy.

Memory per method: the analytic table of one adaptation step (``edgetune.memory``, DESIGN
section 10); "training memory" is what must sit in RAM for a step (everything but the frozen
weights, which stay in flash). The frozen backbone runs in torch float32 here (the int8 chain
torch = onnxruntime = compiled = QEMU per sample is what ``tests/test_labels.py`` checks).

    python benchmarks/labels.py                 # the committed results (results/labels/)
    python benchmarks/labels.py --quick         # tiny-cnn, a few hundred samples (a smoke run)
    python benchmarks/labels.py --part transfer --methods lst,vqt --set lst:lr=3e-3
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch

from edgetune.adapt import fit, prepare, source_taps, start_new_task
from edgetune.checkpoint import load_checkpoint
from edgetune.data import build_stream, load_dataset
from edgetune.evaluate import run_stream
from edgetune.memory import memory_table, training_bytes

TRANSFER_METHODS = ("full-finetune", "bias-only", "last-layer", "lst", "vqt", "tinytta")
PERSONAL_METHODS = ("source", "feature-align", "tinytta", "lst", "vqt", "last-layer", "bias-only", "full-finetune")
PERSONAL_CORRUPTIONS = ("gaussian_noise", "fog", "contrast", "pixelate")  # the quick measurement
FRACTIONS = (0.05, 0.2, 1.0)


def method_spec(spec: str) -> tuple[str, str, dict[str, str]]:
    """``name`` or ``name:key=value,key=value`` -> (label, method, overrides)."""
    name, _, rest = spec.partition(":")
    overrides = dict(kv.split("=", 1) for kv in rest.split(",") if kv) if rest else {}
    return spec, name, overrides


def predict(method, taps: list[torch.Tensor]) -> int:
    """The method's prediction for one sample, with nothing adapted (statistics read, not updated)."""
    state = [method.get_buffer(n) for n in method.state_names()]
    with torch.no_grad():
        logits, _, _ = method.forward_graph(taps, state, torch.zeros(1), torch.zeros(1, method.num_classes))
    return int(logits.argmax())


def held_out_accuracy(method, taps: list[torch.Tensor], labels: np.ndarray) -> float:
    return float(np.mean([predict(method, [t[i:i + 1] for t in taps]) == y for i, y in enumerate(labels)]))


def prepared(backbone, model: str, method: str, overrides: dict[str, str], source, args):
    adaptable = prepare(copy.deepcopy(backbone), method, {**args.fit_overrides, **overrides}, model_name=model,
                        seed=args.seed)
    fit(adaptable, source, seed=args.seed, progress=False, max_samples=args.fit_samples)
    return adaptable


def transfer(args, ckpt: str, target_name: str) -> list[dict]:
    """One direction of the transfer study: rows with the learning curve and held-out accuracies."""
    backbone, cfg = load_checkpoint(ckpt)
    source, target = load_dataset(cfg["data"]), load_dataset(target_name)
    rng = np.random.RandomState(args.seed)
    order = rng.permutation(len(target.train_y))[:args.transfer_stream]
    x, y = target.train_x[order], target.train_y[order]
    held = rng.permutation(len(target.test_y))[:args.held_out]
    hx, hy = target.test_x[held], target.test_y[held]
    checkpoints = sorted({n for n in (200, 1000) if n < len(y)} | {len(y)})
    rows = []
    for label, method, overrides in map(method_spec, args.transfer_methods.split(",")):
        start = time.time()
        adaptable = prepared(backbone, cfg["model"], method, overrides, source, args)
        reinitialised = start_new_task(adaptable)
        m = adaptable.method
        taps, held_taps = source_taps(adaptable, x), source_taps(adaptable, hx)
        correct, held_acc = [], {}
        for i in range(len(y)):
            sample = [t[i:i + 1] for t in taps]
            correct.append(int(m.step(sample).argmax()) == int(y[i]))
            target_1h = torch.zeros(1, m.num_classes)
            target_1h[0, int(y[i])] = 1.0
            m.step(sample, target_1h)  # the label is revealed only after the prediction was scored
            if i + 1 in checkpoints:
                held_acc[i + 1] = held_out_accuracy(m, held_taps, hy)
        mem = memory_table(adaptable)
        row = {"study": "transfer", "direction": f"{cfg['data']} -> {target_name}", "model": cfg["model"],
               "method": label, "overrides": {**args.fit_overrides, **overrides}, "reinitialised": reinitialised,
               "stream": len(y), "held_out": len(hy), "prequential": float(np.mean(correct)),
               "curve": np.cumsum(correct).tolist(), "held_out_accuracy": held_acc, "memory_bytes": mem,
               "training_bytes": training_bytes(mem), "seconds": round(time.time() - start, 1)}
        rows.append(row)
        print(f"transfer {row['direction']:<28} {label:<24} prequential {100 * row['prequential']:5.1f}  held-out "
              + "  ".join(f"N={n}: {100 * a:5.1f}" for n, a in held_acc.items())
              + f"  train mem {training_bytes(mem) / 1024:8.1f} KB  ({row['seconds']} s)", flush=True)
    return rows


class CachedTaps:
    """Frozen taps depend only on the backbone, the tap specs and the images: compute them once."""

    def __init__(self) -> None:
        self.cache: dict[tuple, list[torch.Tensor]] = {}

    def __call__(self, adaptable, images):
        key = (adaptable.frozen.specs, images.shape, hash(images.tobytes()))
        if key not in self.cache:
            self.cache[key] = source_taps(adaptable, images)
        return self.cache[key]


def personalisation(args) -> list[dict]:
    backbone, cfg = load_checkpoint(args.checkpoint)
    data = load_dataset(cfg["data"])
    corruptions = tuple(args.corruptions.split(","))
    taps = CachedTaps()
    rows = []
    for protocol in ("episodic", "continual"):
        segments = build_stream(data, corruptions, 5, protocol, args.seed, args.samples)
        for label, method, overrides in map(method_spec, args.personal_methods.split(",")):
            adaptable = prepared(backbone, cfg["model"], method, overrides, data, args)
            learns = bool(adaptable.method.trainable_names()) and adaptable.method.config.lr > 0
            for fraction in FRACTIONS if learns else (0.0,):
                start = time.time()
                adaptable.reset()
                result = run_stream(adaptable, segments, taps, fraction, args.seed, progress=False)
                mem = memory_table(adaptable)
                rows.append({"study": "personalisation", "protocol": protocol, "model": cfg["model"],
                             "method": label, "overrides": {**args.fit_overrides, **overrides},
                             "labelled_fraction": fraction, "mean": result.mean,
                             "per_corruption": result.per_corruption, "restores": result.restores,
                             "memory_bytes": mem, "training_bytes": training_bytes(mem),
                             "seconds": round(time.time() - start, 1)})
                print(f"personal {protocol:<10} {label:<24} labels {fraction:4.0%}  {100 * result.mean:5.1f}  "
                      f"({rows[-1]['seconds']} s)", flush=True)
    return rows


def _kb(n: int) -> str:
    return f"{n / 1024:,.1f}"


def write_tables(rows: list[dict], path: Path, args) -> None:
    lines = ["# Learning from labels", ""]
    transfer_rows = [r for r in rows if r["study"] == "transfer"]
    for direction in dict.fromkeys(r["direction"] for r in transfer_rows):
        rs = [r for r in transfer_rows if r["direction"] == direction]
        ns = list(rs[0]["held_out_accuracy"])
        lines += [f"## Transfer {direction} ({rs[0]['model']}, stream of {rs[0]['stream']} labelled samples, "
                  f"held-out {rs[0]['held_out']} test samples)", "",
                  "| method | prequential | " + " | ".join(f"held-out after {n}" for n in ns)
                  + " | training memory (KB) | x full-finetune | re-initialised |",
                  "| --- | ---: | " + " | ".join("---:" for _ in ns) + " | ---: | ---: | --- |"]
        full = next((r["training_bytes"] for r in rs if r["method"] == "full-finetune"), None)
        for r in rs:
            ratio = f"{r['training_bytes'] / full:.2f}" if full else "-"
            lines.append(f"| {r['method']} | {100 * r['prequential']:.1f} | "
                         + " | ".join(f"{100 * r['held_out_accuracy'][n]:.1f}" for n in ns)
                         + f" | {_kb(r['training_bytes'])} | {ratio} | {', '.join(r['reinitialised'])} |")
        lines.append("")
    personal = [r for r in rows if r["study"] == "personalisation"]
    if personal:
        lines += [f"## Personalisation: {personal[0]['model']}, Fashion-MNIST-C severity 5 "
                  f"({args.corruptions}; {args.samples} samples each), mean online accuracy (%)", "",
                  "| method | " + " | ".join(f"{p} {f:.0%}" for p in ("episodic", "continual") for f in FRACTIONS)
                  + " | training memory (KB) |",
                  "| --- | " + " | ".join("---:" for _ in range(2 * len(FRACTIONS))) + " | ---: |"]
        for method in dict.fromkeys(r["method"] for r in personal):
            cells = []
            for p in ("episodic", "continual"):
                for f in FRACTIONS:
                    hit = [r for r in personal if r["method"] == method and r["protocol"] == p
                           and r["labelled_fraction"] in (f, 0.0)]
                    cells.append(f"{100 * hit[0]['mean']:.1f}" if hit else "-")
            mem = next(r["training_bytes"] for r in personal if r["method"] == method)
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {_kb(mem)} |")
        lines += ["", "source and feature-align have nothing that learns from labels: one run each, the same number "
                      "in every labelled-fraction column.", ""]
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    transfer_rows = [r for r in rows if r["study"] == "transfer"]
    directions = list(dict.fromkeys(r["direction"] for r in transfer_rows))
    if directions:
        fig, axes = plt.subplots(1, len(directions), figsize=(6 * len(directions), 4), squeeze=False)
        for ax, direction in zip(axes[0], directions):
            for r in (r for r in transfer_rows if r["direction"] == direction):
                c = np.asarray(r["curve"], dtype=float)
                window = 100
                hits = np.diff(np.concatenate([[0.0], c]))
                running = np.convolve(hits, np.ones(window) / window, mode="valid")
                ax.plot(np.arange(window, len(c) + 1), 100 * running, label=r["method"])
            ax.set_title(f"transfer {direction}: prequential accuracy")
            ax.set_xlabel("labelled samples seen")
            ax.set_ylabel(f"accuracy over the last {window} (%)")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "transfer_curves.png", dpi=120)
        fig, axes = plt.subplots(1, len(directions), figsize=(6 * len(directions), 4), squeeze=False)
        for ax, direction in zip(axes[0], directions):
            for r in (r for r in transfer_rows if r["direction"] == direction):
                acc = 100 * list(r["held_out_accuracy"].values())[-1]
                ax.scatter(r["training_bytes"] / 1024, acc)
                ax.annotate(r["method"], (r["training_bytes"] / 1024, acc), fontsize=7)
            ax.set_xscale("log")
            ax.set_xlabel("training memory of one step (KB, log)")
            ax.set_ylabel("held-out accuracy after all labels (%)")
            ax.set_title(f"transfer {direction}: accuracy vs memory")
        fig.tight_layout()
        fig.savefig(out / "pareto.png", dpi=120)
    personal = [r for r in rows if r["study"] == "personalisation"]
    if personal:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4))
        for ax, protocol in zip(axes, ("episodic", "continual")):
            for method in dict.fromkeys(r["method"] for r in personal):
                rs = [r for r in personal if r["method"] == method and r["protocol"] == protocol]
                xs = [100 * f for f in FRACTIONS] if len(rs) > 1 else [100 * FRACTIONS[0], 100 * FRACTIONS[-1]]
                ys = [100 * r["mean"] for r in rs] if len(rs) > 1 else [100 * rs[0]["mean"]] * 2
                ax.plot(xs, ys, marker="o", label=method)
            ax.set_xscale("log")
            ax.set_xlabel("labelled samples (%)")
            ax.set_ylabel("mean online accuracy (%)")
            ax.set_title(f"Fashion-MNIST-C sev 5, {protocol}")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "personalisation.png", dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny-cnn, few samples, 2 fit epochs: a smoke run")
    p.add_argument("--part", default="all", choices=["all", "transfer", "personal"])
    p.add_argument("--checkpoint", default="checkpoints/mcunet-s-fashion-mnist")
    p.add_argument("--reverse-checkpoint", default="checkpoints/mcunet-s-digits",
                   help="the reverse transfer's backbone (trained on digits; '' skips the reverse)")
    p.add_argument("--transfer-methods", default=",".join(TRANSFER_METHODS))
    p.add_argument("--personal-methods", default=",".join(PERSONAL_METHODS))
    p.add_argument("--transfer-stream", type=int, default=2000, help="labelled stream samples (at most)")
    p.add_argument("--held-out", type=int, default=1000, help="held-out test samples (at most)")
    p.add_argument("--corruptions", default=",".join(PERSONAL_CORRUPTIONS))
    p.add_argument("--samples", type=int, default=1000, help="personalisation: samples per corruption")
    p.add_argument("--fit-samples", type=int, default=20000, help="source samples the attachments' fit reads")
    p.add_argument("--fit-epochs", type=int, default=None, help="override every method's fit epochs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="results/labels")
    args = p.parse_args()
    if args.quick:
        args.checkpoint, args.reverse_checkpoint = "checkpoints/tiny-cnn-fashion-mnist", ""
        args.transfer_stream, args.held_out, args.samples, args.fit_samples = 300, 100, 100, 1000
        args.corruptions, args.fit_epochs = "gaussian_noise,fog", args.fit_epochs or 2
        args.out = args.out if args.out != "results/labels" else "results/labels/quick"
    args.fit_overrides = {"fit_epochs": str(args.fit_epochs)} if args.fit_epochs is not None else {}
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    if args.part in ("all", "transfer"):
        rows += transfer(args, args.checkpoint, "digits")
        if args.reverse_checkpoint:
            rows += transfer(args, args.reverse_checkpoint, "fashion-mnist")
    if args.part in ("all", "personal"):
        rows += personalisation(args)
    tag = "labels" if args.part == "all" else f"labels-{args.part}"
    settings = {k: v for k, v in vars(args).items() if k != "fit_overrides"}
    (out / f"{tag}.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=1) + "\n")
    write_tables(rows, out / f"{tag}.md", args)
    plot(rows, out)


if __name__ == "__main__":
    main()
