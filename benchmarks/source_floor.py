"""How much feature alignment gains depends on the source model: one table, several source recipes.

Feature alignment (``feature-align``) re-standardises the pooled features the classifier reads;
on Fashion-MNIST-C it lands in the low 60s on every backbone we tried, so its margin over
``source`` is set by how robust the source model already is. This script makes that visible:
for each source recipe (architecture, training subset, augmentation) it trains the model (or
uses the committed checkpoint), then streams the 15 test corruptions at severity 5 through
``source`` and ``feature-align`` with the int8 backbone in onnxruntime, episodic protocol,
``feature-align``'s hyperparameters as chosen on validation for mcunet-s
(``results/a/fashion-mnist-chosen.json``).

    python benchmarks/source_floor.py [--samples 2000] [--out results/source_floor]

Writes ``<out>/source_floor.{md,json,png}``; checkpoints it trains go to ``<out>/checkpoints``.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from edgetune.checkpoint import load_checkpoint
from edgetune.data import TEST_CORRUPTIONS, load_dataset
from edgetune.evaluate import evaluate
from edgetune.train import train_source


@dataclass(frozen=True)
class Recipe:
    name: str
    model: str
    committed: str | None = None  # a committed checkpoint trained with this recipe
    train_images: int | None = None
    augment: bool = True
    epochs: int = 4


RECIPES = (
    Recipe("mcunet-s, 24k images, shift aug (committed)", "mcunet-s", "checkpoints/mcunet-s-fashion-mnist"),
    Recipe("mcunet-s, 24k images, no aug", "mcunet-s", train_images=24_000, augment=False),
    Recipe("mcunet-s, 58k images, shift aug", "mcunet-s"),
    Recipe("mcunet-s-gn, 24k images, shift aug (committed)", "mcunet-s-gn",
           "checkpoints/mcunet-s-gn-fashion-mnist"),
    Recipe("tiny-cnn (plain CNN), 58k images, shift aug (committed)", "tiny-cnn",
           "checkpoints/tiny-cnn-fashion-mnist", epochs=6),
)


def checkpoint(recipe: Recipe, data, work: Path) -> Path:
    if recipe.committed:
        return Path(recipe.committed)
    path = work / recipe.name.replace(", ", "-").replace(" ", "_")
    if not (path / "config.json").exists():
        train_source(recipe.model, data, path, epochs=recipe.epochs, lr=5e-3, augment=recipe.augment,
                     train_images=recipe.train_images)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=2000, help="samples per corruption")
    p.add_argument("--chosen", default="results/a/fashion-mnist-chosen.json")
    p.add_argument("--out", default="results/source_floor")
    args = p.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_dataset("fashion-mnist")
    overrides = json.loads(Path(args.chosen).read_text()).get("feature-align", {})
    rows = []
    for recipe in RECIPES:
        backbone, cfg = load_checkpoint(checkpoint(recipe, data, out / "checkpoints"))
        report = evaluate(backbone, cfg["model"], "feature-align", data, TEST_CORRUPTIONS, 5, "episodic", 0,
                          args.samples, "onnx-int8", overrides).to_json()
        row = {"recipe": recipe.name, "clean": 100 * cfg["test_accuracy"],
               "source": 100 * report["source_mean_online_accuracy"],
               "feature_align": 100 * report["mean_online_accuracy"]}
        rows.append(row)
        print(f"{row['recipe']:<58} clean {row['clean']:5.1f}  source {row['source']:5.1f}  "
              f"feature-align {row['feature_align']:5.1f}  ({row['feature_align'] - row['source']:+.1f})", flush=True)
    (out / "source_floor.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = [f"Fashion-MNIST-C severity 5, {args.samples} samples per corruption, episodic, batch 1, int8 backbone "
             f"(onnxruntime), feature-align {json.dumps(overrides)}", "",
             "| source recipe | clean | source | feature-align | gain |", "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['recipe']} | {r['clean']:.1f} | {r['source']:.1f} | {r['feature_align']:.1f} | "
              f"{r['feature_align'] - r['source']:+.1f} |" for r in rows]
    (out / "source_floor.md").write_text("\n".join(lines) + "\n")
    plot(rows, out / "source_floor.png")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for r in rows:
        ax.annotate("", (r["source"], r["feature_align"]), (r["source"], r["source"]),
                    arrowprops={"arrowstyle": "->", "color": "tab:blue"})
        ax.plot([r["source"]], [r["feature_align"]], "o", label=r["recipe"])
    lo = min(r["source"] for r in rows) - 3
    hi = max(r["feature_align"] for r in rows) + 3
    ax.plot([lo, hi], [lo, hi], "k:", lw=1, label="no gain")
    ax.plot([lo, hi], [lo + 10, hi + 10], "r--", lw=1, label="+10 points")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi + 10)
    ax.set_xlabel("source accuracy (%)")
    ax.set_ylabel("feature-align accuracy (%)")
    ax.set_title("Fashion-MNIST-C sev. 5: alignment gain vs source floor")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
