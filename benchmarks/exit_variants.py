"""Early-exit attempts at the 0.7x goal: exit heads fit for shift, rules recalibrated online, priced on cortex-m4.

    python benchmarks/exit_variants.py --variants base-per-exit,shift-mix --out /tmp/parts/B      # 300 per corruption
    python benchmarks/exit_variants.py --variants 4x4-shift-mix-per-exit,2x2-shift-mix-per-exit --out /tmp/parts/A
    python benchmarks/exit_variants.py --variants 4x4-first-shift-mix-per-exit --out /tmp/parts/C
    python benchmarks/exit_variants.py --merge /tmp/parts/B/variants.json,/tmp/parts/A/variants.json,\
        /tmp/parts/C/variants.json --committed results/exits/exits.json,results/exits/agreement.json \
        --out results/exits-variants                                 # one report; the committed sweeps as base
    python benchmarks/exit_variants.py --screen --variants base,shift-ce,2x2-ce,4x4-ce   # heads only (no sweeps)
    python benchmarks/exit_variants.py --quick --out /tmp/exit-variants             # 40 samples, 3 corruptions

Every variant is tinytta (mcunet-s int8, Fashion-MNIST-C severity 5, continual) with one change, and its knob
swept on the 4 validation corruptions and the 15 test corruptions; the knob's value is chosen on validation only
(the cheapest point within 0.5 points of the variant's own no-exit accuracy there). Accuracy: torch on the bundle's
int8 taps (onnxruntime), a real sequential run per point (exits change what adapts: a skipped stage's statistics
and heads stay as they were). Instructions: exit shares x the per-exit cortex-m4 QEMU table (``--costs``, measured
by ``exits.py --rule costs``), the no-exit plan as full inference.

Variants (``VARIANTS``):

* ``base``: tinytta's heads as fit today (cross-entropy on clean source taps), static threshold.
* ``shift-ce``: heads fit for shift (after Shallow-Deep Networks, Kaya et al. ICML 2019, whose internal
  classifiers are trained jointly, and BranchyNet): source images under generic label-free shifts that are not
  the test corruptions (additive noise, blur, contrast and brightness changes, random shifts, each applied to a
  whole copy of the source set at one strength, as a stream would), every copy's pooled taps re-standardised to
  the source statistics first (what tinytta's alignment does to a shifted stream), cross-entropy on the labels.
* ``shift-distill``: the same shifted copies, each head trained towards the final classifier's prediction on the
  same aligned sample (self-distillation, Li et al. ICCV 2019 "Improved techniques for training adaptive deep
  networks"; Phuong & Lampert ICCV 2019): an exit is scored by agreeing with the full network.
* ``shift-mix``: half labels, half the final classifier's prediction as the target.
* ``*-agreement``: the fitted heads under the agreement trackers (``exit_agreement.py``, after CALM): exits
  recalibrated online from the samples that ran to the end; knob: the consistency target.
* ``*-per-exit``: one threshold per early exit (BranchyNet), chosen on the validation no-exit run's prefix
  ensembles (the cheapest grid combination within a validation budget, the knob), then run for real.
* ``2x2-*``, ``4x4-*``, ``4x4-first-*``: heads on richer features (``TinyTTAGrid``): each early stage's map
  average-pooled to a 2x2 / 4x4 grid (4x4-first: exit 0 only, the others keep the global pool), every cell's
  channels aligned on their own statistics; the int8 maps come from lst's frozen graph (every stage's whole map).
  Heads larger than tinytta's pay an analytic overhead on top of the per-exit table (``head_overhead``).

The base variants can be the committed ``exits.py`` sweeps (``--committed``: same fit, streams and seed). Stream
taps and fitted heads are cached in ``--workdir``. ``benchmarks/exit_device_check.py`` runs a grid variant through
export, the host C build and QEMU.

Writes ``variants.json``, ``variants.md`` and ``variants.png`` (accuracy vs mean instructions, every variant).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from torch import nn
from torch.nn import functional as F

from edgetune.adapt import Adaptable, _train_attachments, fit, prepare
from edgetune.checkpoint import load_checkpoint
from edgetune.data import TEST_CORRUPTIONS, VALIDATION_CORRUPTIONS, build_stream, load_dataset, to_tensor
from edgetune.export import export
from edgetune.methods.align import FeatureAligner
from edgetune.methods.base import TapSpec
from edgetune.methods.tinytta import POOLED_NO_EXITS, TinyTTA, exit_head

import exits as bench  # benchmarks/exits.py: the sweep point, stream taps and the per-exit pricing

ROOT = Path(__file__).resolve().parent.parent
THRESHOLDS = (1.0, 0.99, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5, 0.4)
TARGETS = (0.7, 0.8, 0.85, 0.9, 0.95)
PER_EXIT_GRID = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 1.01)  # 1.01: the exit stays shut
BUDGETS = (0.0, 0.0025, 0.005, 0.01, 0.02)  # per-exit rule's knob: validation points the choice may give up
STAGE_SHAPES = ((16, 16, 16), (24, 8, 8), (40, 4, 4), (96, 4, 4))  # mcunet-s's stage outputs at 32 x 32 (C, H, W)
CLASSES = 10
# tinytta's adaptation on cortex-m4 (results/mcu.md: 23,109 instructions per sample beyond inference) over its 830
# trainable head parameters: what one more head parameter costs, as an estimate; pooling a map element to the grid
# is one load and one add.
INSTRUCTIONS_PER_HEAD_PARAMETER = 23_109 / 830
INSTRUCTIONS_PER_POOLED_ELEMENT = 2.0
SHIFTS = (("clean", 0.0), ("noise", 0.06), ("noise", 0.12), ("noise", 0.2), ("blur", 0.8), ("blur", 1.6),
          ("contrast", 0.5), ("contrast", 0.25), ("brightness", 0.3), ("brightness", -0.3), ("shift", 3.0),
          ("shift", 5.0))


@dataclass(frozen=True)
class Variant:
    """One attempt: what the early heads read (``features``: "pool" = the global average pool, tinytta's taps;
    "2x2" = a 2x2 average-pooled map), how they are fit (``label_weight``: None = as fit today, else the label
    weight of the fit on ``shifts``: 1 labels, 0 the final classifier's prediction) and which rule is swept."""

    name: str
    label_weight: float | None
    rule: str  # "threshold" | "agreement" | "per-exit"
    features: str = "pool"
    shifts: bool = True  # fit on the SHIFTS copies (else on clean source images only)

    @property
    def fit_key(self) -> tuple:
        return (self.label_weight, self.features, self.shifts)


VARIANTS = {v.name: v for v in (
    Variant("base", None, "threshold"), Variant("shift-ce", 1.0, "threshold"),
    Variant("shift-distill", 0.0, "threshold"), Variant("shift-mix", 0.5, "threshold"),
    Variant("base-agreement", None, "agreement"), Variant("shift-distill-agreement", 0.0, "agreement"),
    Variant("shift-mix-agreement", 0.5, "agreement"),
    Variant("2x2-ce", 1.0, "threshold", "2x2", shifts=False), Variant("2x2-shift-ce", 1.0, "threshold", "2x2"),
    Variant("2x2-shift-mix", 0.5, "threshold", "2x2"), Variant("2x2-shift-distill", 0.0, "threshold", "2x2"),
    Variant("2x2-shift-mix-agreement", 0.5, "agreement", "2x2"),
    Variant("4x4-ce", 1.0, "threshold", "4x4", shifts=False), Variant("4x4-shift-mix", 0.5, "threshold", "4x4"),
    Variant("base-per-exit", None, "per-exit"), Variant("2x2-ce-per-exit", 1.0, "per-exit", "2x2", shifts=False),
    Variant("2x2-shift-mix-per-exit", 0.5, "per-exit", "2x2"),
    Variant("4x4-shift-mix-agreement", 0.5, "agreement", "4x4"),
    Variant("4x4-first-shift-mix-per-exit", 0.5, "per-exit", "4x4-first"),
    Variant("4x4-first-shift-mix", 0.5, "threshold", "4x4-first"),
    Variant("4x4-early-shift-mix-per-exit", 0.5, "per-exit", "4x4-early"),
    Variant("4x4-ce-per-exit", 1.0, "per-exit", "4x4", shifts=False),
    Variant("4x4-shift-mix-per-exit", 0.5, "per-exit", "4x4"), Variant("4x4-shift-ce-per-exit", 1.0, "per-exit", "4x4"),
    Variant("4x4-shift-distill-per-exit", 0.0, "per-exit", "4x4"))}


class TinyTTAGrid(TinyTTA):
    """tinytta whose early exit k reads its stage's map average-pooled to ``grids[k]`` x ``grids[k]`` (grid^2 x C
    features, each aligned on its own statistics) instead of the global pool; the last exit is the backbone's
    classifier as before. A study variant (attempt c): the frozen graph hands over the early stages' whole maps."""

    grids = (2, 2, 2)

    def __init__(self, backbone, config) -> None:
        super().__init__(backbone, config)
        widths = [g * g * c for g, c in zip(self.grids, backbone.stage_widths()[:-1])] + [backbone.stage_widths()[-1]]
        self.heads = nn.ModuleList(exit_head(c, config.hidden, self.num_classes) for c in widths[:-1])
        self.aligner = FeatureAligner(widths) if config.align else None

    def taps(self) -> tuple[TapSpec, ...]:
        return tuple(TapSpec(k, pooled=k == self.depth - 1) for k in range(self.depth))

    def features(self, taps):
        """Maps (N x C x H x W) -> their grid x grid average pools flattened; pooled taps as they are."""
        return [F.adaptive_avg_pool2d(t, g).flatten(1) if t.dim() == 4 else t
                for g, t in zip((*self.grids, 1), taps)]


    def calibrate(self, batches) -> None:
        super().calibrate([self.features(b) for b in batches])

    def fit_loss(self, taps, labels):
        return super().fit_loss(self.features(taps), labels)

    def forward_graph(self, taps, state, momentum, target):
        return super().forward_graph(self.features(taps), state, momentum, target)


class TinyTTA4x4(TinyTTAGrid):
    """The grid variant at 4x4: stage 2's whole map (mcunet-s: 40 x 4 x 4), the earlier maps pooled to 4x4."""

    grids = (4, 4, 4)


class TinyTTA4x4First(TinyTTAGrid):
    """4x4 for the first exit only (the cheap one: 21 % of a sample's instructions), the global pool elsewhere: a
    quarter of the 4x4 variant's head parameters, so head, momentum and guard snapshot fit a Cortex-M4."""

    grids = (4, 1, 1)


class TinyTTA4x4Early(TinyTTAGrid):
    """4x4 for exits 0 and 1, the global pool at exit 2 (whose 4x4 head alone holds half of the 4x4 variant's
    parameters): the 4x4 variant cut to fit a Cortex-M4."""

    grids = (4, 4, 1)


GRIDS = {"2x2": TinyTTAGrid, "4x4": TinyTTA4x4, "4x4-first": TinyTTA4x4First, "4x4-early": TinyTTA4x4Early}


def features_of(method, taps):
    """The features a method's heads read (the 2x2 variant pools its maps)."""
    return method.features(taps) if isinstance(method, TinyTTAGrid) else list(taps)


def batched_taps(adaptable, method, images: np.ndarray, batch: int = 500) -> list[torch.Tensor]:
    """Source taps (float backbone) of images in a dataset layout or float N x 1 x H x W, already reduced to the
    features the heads read (a 2x2 variant's maps would not fit in memory whole)."""
    parts = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = images[i:i + batch]
            parts.append(features_of(method, adaptable.frozen(to_tensor(x) if x.dtype == np.uint8 else
                                                              torch.from_numpy(x))))
    return [torch.cat([p[k] for p in parts]) for k in range(len(parts[0]))]


def shifted(images: np.ndarray, kind: str, strength: float, rng: np.random.RandomState) -> np.ndarray:
    """A whole copy of ``images`` (N x H x W uint8) under one generic shift at one strength, as float32 in [0, 1]
    with the channel axis. None of them is a test corruption's implementation: plain additive noise, a Gaussian
    blur, a linear contrast / brightness change, an integer translation with zero fill."""
    x = images.astype(np.float32) / 255.0
    if kind == "noise":
        x = x + rng.normal(0.0, strength, x.shape).astype(np.float32)
    elif kind == "blur":
        x = ndimage.gaussian_filter(x, sigma=(0, strength, strength))
    elif kind == "contrast":
        mean = x.mean(axis=(1, 2), keepdims=True)
        x = (x - mean) * strength + mean
    elif kind == "brightness":
        x = x + strength
    elif kind == "shift":
        out = np.zeros_like(x)
        for i in range(len(x)):
            dy, dx = rng.randint(-int(strength), int(strength) + 1, size=2)
            out[i] = np.roll(np.roll(x[i], dy, 0), dx, 1)
        x = out
    return np.clip(x, 0.0, 1.0)[:, None]


def aligned(taps: list[torch.Tensor], source: list[torch.Tensor]) -> list[torch.Tensor]:
    """Pooled taps of one shifted copy re-standardised per channel to the source statistics (the state tinytta's
    feature alignment reaches on a stream of that shift)."""
    out = []
    for z, s in zip(taps, source):
        scale = torch.sqrt(s.var(0, unbiased=False) + 1e-5) / torch.sqrt(z.var(0, unbiased=False) + 1e-5)
        out.append((z - z.mean(0)) * scale + s.mean(0))
    return out


def shift_fit(adaptable, data, variant: Variant, samples: int, seed: int, epochs: int):
    """A copy of ``adaptable``'s tinytta whose heads are refit on ``SHIFTS`` copies (or the clean copy alone) of
    ``samples`` source images (aligned taps), target = label_weight x one-hot label + (1 - label_weight) x the
    final classifier's prediction on the same aligned sample."""
    rng = np.random.RandomState(seed)
    idx = np.sort(rng.permutation(len(data.train_y))[:samples])
    method = copy.deepcopy(adaptable.method)
    clean = batched_taps(adaptable, method, data.train_x[idx])
    taps, targets = [[] for _ in clean], []
    label_weight = variant.label_weight
    onehot = torch.nn.functional.one_hot(torch.from_numpy(data.train_y[idx]).long(), method.num_classes).float()
    for kind, strength in SHIFTS if variant.shifts else SHIFTS[:1]:
        x = shifted(data.train_x[idx], kind, strength, rng)
        copy_taps = aligned(batched_taps(adaptable, method, x), clean) if kind != "clean" else clean
        with torch.no_grad():
            teacher = torch.softmax(method.classifier(copy_taps[-1]), -1)
        targets.append(label_weight * onehot + (1.0 - label_weight) * teacher)
        for k, z in enumerate(copy_taps):
            taps[k].append(z)
    taps = [torch.cat(t) for t in taps]
    targets = torch.cat(targets)
    for head in method.heads:  # a fresh start: the fit is the whole training of the heads
        for layer in head.modules():
            if hasattr(layer, "reset_parameters"):
                layer.reset_parameters()
    method.config = dataclasses.replace(method.config, fit_epochs=epochs)
    hold = torch.randperm(len(targets), generator=torch.Generator().manual_seed(seed))[:2000]
    report = _train_attachments(method, taps, targets, method.fit_parameters(), [t[hold] for t in taps],
                                targets[hold], seed, progress=False)
    method._initial = None
    method.reset()
    return method, report


def prefix_report(method, taps, labels, save: Path | None = None) -> dict:
    """The no-exit run's prefix ensembles on a stream: each prefix's accuracy and agreement with the final
    prediction, and the oracle's exit shares (a screen before the sweeps)."""
    m = copy.deepcopy(method)
    m._initial = None
    m.reset()
    seen: list[torch.Tensor] = []
    select = m.select

    def recording(prefix, gate):
        seen.append(prefix.detach().clone())
        return select(prefix, gate)

    m.select = recording
    for t in taps:
        m.step(t)
    prefix = torch.stack(seen).numpy()
    if save is not None:
        np.save(save, prefix)
    pred = prefix.argmax(-1)
    first = (pred == pred[:, -1:]).argmax(1)
    return {"prefix_accuracy": (pred == labels[:, None]).mean(0).tolist(),
            "prefix_agreement": (pred == pred[:, -1:]).mean(0).tolist(),
            "oracle_share": (np.bincount(first, minlength=pred.shape[1]) / len(pred)).tolist()}


def per_exit_choice(prefix: np.ndarray, labels: np.ndarray, lengths, rel: np.ndarray, budget: float) -> tuple:
    """Per-exit thresholds (BranchyNet's, one per early exit) chosen on the validation no-exit run's prefix
    ensembles (``prefix`` N x K x C): the cheapest combination of ``PER_EXIT_GRID`` whose accuracy, replayed on
    those prefixes, stays within ``budget`` of the no-exit accuracy. The replay ignores what exiting changes in
    the adaptation, so the sweep then runs every choice for real."""
    combos = np.array(list(itertools.product(PER_EXIT_GRID, repeat=prefix.shape[1] - 1)))
    pred, conf = prefix.argmax(-1), prefix.max(-1)
    ok = np.concatenate([conf[:, None, :-1] > combos[None], np.ones((len(pred), len(combos), 1), bool)], 2)
    k = ok.argmax(2)
    right = pred[np.arange(len(pred))[:, None], k] == labels[:, None]
    cuts = np.cumsum([0, *lengths])
    acc = np.mean([right[a:b].mean(0) for a, b in zip(cuts[:-1], cuts[1:])], 0)
    base = np.mean([(pred[a:b, -1] == labels[a:b]).mean() for a, b in zip(cuts[:-1], cuts[1:])])
    cost = np.where(acc >= base - budget, rel[k].mean(0), np.inf)
    return tuple(float(t) for t in combos[int(np.argmin(cost))])


def with_gate(method, thresholds: tuple):
    """A copy of ``method`` (at its start) that exits at the first prefix k above ``thresholds[k]`` (a study hook:
    tinytta's own rule has one threshold for every exit)."""
    m = copy.deepcopy(method)
    bar = torch.tensor([*thresholds, 2.0])  # the last exit is taken whatever its confidence
    m.gate = lambda prefix: (prefix.amax(-1) > bar).float()
    m._initial = None
    m.reset()
    return m


def run_variant(variant: Variant, method, backbone, streams, costs, full, explore: int, rate: float,
                val_prefix: np.ndarray | None = None) -> dict:
    """The variant's knob swept on both splits, priced, the knob chosen on validation."""
    rows: dict[str, list[dict]] = {}
    rel = np.array([costs[k] for k in sorted(costs)]) / full
    if variant.rule == "per-exit":
        val = streams["val"]
        choices = {b: per_exit_choice(val_prefix, val[1], val[2], rel, b) for b in BUDGETS}
        print(f"{variant.name}: per-exit thresholds by validation budget {choices}", flush=True)
    for split, (taps, labels, lengths, _) in streams.items():
        if variant.rule == "threshold":
            pts = [bench.sweep_point(method, t, taps, labels, lengths) for t in THRESHOLDS]
        elif variant.rule == "per-exit":
            pts = [bench.sweep_point(method, 1.0, taps, labels, lengths)]
            for b, th in choices.items():
                p = bench.sweep_point(with_gate(method, th), 1.0, taps, labels, lengths)
                pts.append(p | {"budget": b, "thresholds": th})
        else:
            rule = {"exit_explore": explore, "exit_rate": rate, "exit_bins": 10}
            pts = [bench.sweep_point(method, 1.0, taps, labels, lengths)] + [
                bench.sweep_point(method, 1.0, taps, labels, lengths, backbone=backbone, exit_agreement=t, **rule)
                for t in TARGETS]
        rows[split] = []
        for p in pts:
            knob = p.get("exit_agreement", p.get("budget", p["threshold"] if variant.rule == "threshold" else -1.0))
            ran_plain = knob in (-1.0, 1.0) and not p.get("exit_agreement")  # the no-exit plan: no probes
            mean = full if ran_plain else sum(s * costs[k] for k, s in enumerate(p["exit_share"]))
            rows[split].append({"knob": knob, "accuracy": p["accuracy"], "exit_share": p["exit_share"],
                                "instructions_per_sample": mean, "relative_instructions": mean / full}
                               | ({"thresholds": p["thresholds"]} if "thresholds" in p else {}))
            print(f"{variant.name:<24} {split:<4} knob {knob:<5g} accuracy {100 * p['accuracy']:6.2f}  "
                  f"{mean / full:.3f}x  exits " + " ".join(f"{100 * s:5.1f}" for s in p["exit_share"]), flush=True)
    base = rows["val"][0]["accuracy"]
    ok = [p for p in rows["val"] if p["accuracy"] >= base - bench.ACCURACY_BUDGET]
    chosen = min(ok, key=lambda p: p["relative_instructions"])["knob"]
    return {"variant": variant.name, "label_weight": variant.label_weight, "rule": variant.rule, "chosen": chosen,
            "features": variant.features, "fit_on_shifts": variant.shifts,
            "validation": rows["val"], "test": rows["test"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/exits-variants")
    parser.add_argument("--samples", type=int, default=300, help="samples per corruption")
    parser.add_argument("--quick", action="store_true", help="40 samples of 3 corruptions per split (a smoke run)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of: " + ", ".join(VARIANTS))
    parser.add_argument("--costs", default="results/exits/costs-kernels2.json", help="per-exit QEMU table")
    parser.add_argument("--fit-samples", type=int, default=5000, help="source images per shifted copy")
    parser.add_argument("--fit-epochs", type=int, default=30, help="epochs of the shifted-copies fit")
    parser.add_argument("--explore", type=int, default=10, help="agreement: every N-th sample runs to the end")
    parser.add_argument("--rate", type=float, default=0.02, help="agreement: EMA rate of the trackers")
    parser.add_argument("--screen", action="store_true", help="only the prefix report of every head fit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--open-study", action="store_true", help="the grid heads cached in --workdir under one "
                        "threshold at only some exits, learning or frozen (OPEN_STUDY); writes study.json / study.md")
    parser.add_argument("--committed", default=None, help="comma-separated committed exits.py sweeps (exits.json, "
                        "agreement.json) to report as the base variants instead of running them again")
    parser.add_argument("--merge", default=None, help="comma-separated variants.json of separate runs: one report")
    parser.add_argument("--workdir", default=None, help="cache of the stream taps (default: a temporary folder)")
    args = parser.parse_args()
    if args.merge:
        merge([Path(p) for p in args.merge.split(",")], Path(args.out), args.committed, args.costs)
        return
    if args.open_study:
        open_study(args)
        return
    torch.set_num_threads(1)  # batch-1 steps of small tensors: threads only add overhead
    start = time.time()
    n = 40 if args.quick else args.samples
    val_c = VALIDATION_CORRUPTIONS[:3] if args.quick else VALIDATION_CORRUPTIONS
    test_c = TEST_CORRUPTIONS[:3] if args.quick else TEST_CORRUPTIONS
    out = Path(args.out)
    work = Path(args.workdir) if args.workdir else Path(tempfile.gettempdir()) / "edgetune-exit-variants"
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    costs = bench.load_costs(args.costs)
    full = bench.load_baseline(args.costs, costs)

    data = load_dataset("fashion-mnist")
    backbone, _ = load_checkpoint(ROOT / "checkpoints" / "mcunet-s-fashion-mnist")
    adaptable = prepare(copy.deepcopy(backbone), "tinytta", POOLED_NO_EXITS, model_name="mcunet-s", seed=args.seed)
    fit(adaptable, data, seed=args.seed, progress=False)
    cache = work / f"streams-{n}-{len(test_c)}-{args.seed}.pt"
    if cache.exists():
        streams = torch.load(cache, weights_only=False)
    else:
        bundle = work / "bundle-taps"
        export(adaptable, data, bundle, quantize=True, progress=False)  # the int8 frozen graph for the taps
        streams = {split: bench.stream_taps(bundle, build_stream(data, c, 5, "continual", args.seed, n, split=split))
                   for split, c in (("val", val_c), ("test", test_c))}
        torch.save(streams, cache)
    print(f"streams ready ({time.time() - start:.0f} s)", flush=True)

    rich: dict[str, tuple] = {}
    fits: dict[tuple, tuple] = {}
    results, screens = [], {}
    for name in args.variants.split(","):
        variant = VARIANTS[name]
        if variant.features != "pool" and variant.features not in rich:
            rich[variant.features] = rich_setup(GRIDS[variant.features], backbone, data, work, n, val_c, test_c,
                                                args.seed)
        fitted, runs = (adaptable, streams) if variant.features == "pool" else rich[variant.features]
        if variant.fit_key not in fits:
            if variant.label_weight is None:
                fits[variant.fit_key] = (adaptable.method, {})
            else:
                saved = work / ("heads-" + "-".join(map(str, variant.fit_key))
                                + f"-{args.fit_samples}-{args.fit_epochs}-{args.seed}.pt")
                if saved.exists():  # the fit is deterministic given these: reuse it across runs
                    m = copy.deepcopy(fitted.method)
                    m.load_state_dict(torch.load(saved, weights_only=True))
                    m._initial = None
                    m.reset()
                    fits[variant.fit_key] = (m, {})
                else:
                    fits[variant.fit_key] = shift_fit(fitted, data, variant, args.fit_samples, args.seed,
                                                      args.fit_epochs)
                    torch.save(fits[variant.fit_key][0].state_dict(), saved)
            method = fits[variant.fit_key][0]
            key = heads_name(variant)
            screens[key] = {split: prefix_report(method, s[0], s[1], work / f"prefix-{key_file(key)}-{split}.npy")
                            for split, s in runs.items()}
            print(f"heads {key}: " + json.dumps(screens[key]), flush=True)
        if args.screen:
            continue
        val_prefix = np.load(work / f"prefix-{key_file(heads_name(variant))}-val.npy")
        results.append(run_variant(variant, fits[variant.fit_key][0], backbone, runs, costs, full,
                                   args.explore, args.rate, val_prefix))
        write(results, screens, args, n, val_c, test_c, costs, full, start, out)


# (grid class, its cached shifted-copies fit, exits that may be taken, grid heads frozen at test time)
OPEN_STUDY = (("4x4-first", (0,), False), ("4x4-first", (0,), True), ("4x4-first", (0, 2), False),
              ("4x4-early", (0, 2), False), ("4x4-early", (0, 2), True), ("4x4", (0,), False), ("4x4", (0,), True))
OPEN_THRESHOLDS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)


def frozen_grid(method):
    """``method`` whose heads on a grid (> 1) are not updated at test time (fit, then frozen)."""
    m = copy.deepcopy(method)
    names = [n for n in m.trainable_names() if not (n.startswith("heads.") and m.grids[int(n.split(".")[1])] > 1)]
    m.trainable_names = lambda: names
    m._initial = None
    m.reset()
    return m


def open_study(args) -> None:
    """One threshold at only some exits (the others shut), with the grid heads learning or frozen: every point a real
    sequential run (torch on the int8 map taps) on validation and test; the heads are the shifted-copies fits
    (label weight 0.5) cached by earlier runs of this script in ``--workdir``."""
    torch.set_num_threads(1)
    work = Path(args.workdir) if args.workdir else Path(tempfile.gettempdir()) / "edgetune-exit-variants"
    data = load_dataset("fashion-mnist")
    backbone, _ = load_checkpoint(ROOT / "checkpoints" / "mcunet-s-fashion-mnist")
    rows = []
    for features, opened, frozen in OPEN_STUDY:
        adaptable, streams = rich_setup(GRIDS[features], backbone, data, work, args.samples, VALIDATION_CORRUPTIONS,
                                        TEST_CORRUPTIONS, args.seed)
        method = adaptable.method
        method.load_state_dict(torch.load(work / f"heads-0.5-{features}-True-{args.fit_samples}-{args.fit_epochs}-"
                                                 f"{args.seed}.pt", weights_only=True))
        method._initial = None
        method.reset()
        method = frozen_grid(method) if frozen else method
        for t in OPEN_THRESHOLDS:
            gate = tuple(t if k in opened else 1.01 for k in range(len(method.heads)))
            point = {"features": features, "open": list(opened), "grid_frozen": frozen, "threshold": t}
            for split in ("val", "test"):
                taps, labels, lengths, _ = streams[split]
                p = bench.sweep_point(with_gate(method, gate) if t < 1 else method, 1.0, taps, labels, lengths)
                point[split] = {"accuracy": p["accuracy"], "exit_share": p["exit_share"]}
            rows.append(point)
            print(f"{features:<10} open {opened} frozen {frozen!s:<5} t {t:<5g} "
                  f"val {100 * point['val']['accuracy']:.2f} test {100 * point['test']['accuracy']:.2f} test exits "
                  + " ".join(f"{100 * x:.1f}" for x in point["test"]["exit_share"]), flush=True)
    write_study(rows, args.samples, Path(args.out))


def write_study(rows: list[dict], samples: int, out: Path) -> None:
    """``study.json`` and ``study.md`` of the open-exits study."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps({"samples_per_corruption": samples, "rows": rows}, indent=1) + "\n")
    lines = ["Grid exit heads (shifted-copies fit, label weight 0.5) under one threshold at only some exits, learning "
             f"at test time or frozen; Fashion-MNIST-C severity 5, continual, mcunet-s int8, {samples} samples "
             "per corruption; torch on the int8 map taps (exit decisions and accuracy, no instructions)", "",
             "| heads | open exits | grid heads | threshold | val accuracy (%) | test accuracy (%) | "
             "test exits 0/1/2/3 (%) |", "| --- | --- | --- | ---: | ---: | ---: | --- |"]
    for r in rows:
        lines.append(f"| {r['features']} | {', '.join(map(str, r['open']))} | "
                     f"{'frozen' if r['grid_frozen'] else 'learn'} | {r['threshold']:g} | "
                     f"{100 * r['val']['accuracy']:.2f} | {100 * r['test']['accuracy']:.2f} | "
                     + " / ".join(f"{100 * x:.1f}" for x in r["test"]["exit_share"]) + " |")
    (out / "study.md").write_text("\n".join(lines) + "\n")
    plot_study(rows, out / "study.png")


def plot_study(rows: list[dict], path: Path, tinytta: float = 0.6224) -> None:
    """Test accuracy against the share of samples that exit early, one line per (heads, open exits, learning)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key in dict.fromkeys((r["features"], tuple(r["open"]), r["grid_frozen"]) for r in rows):
        pts = sorted((r for r in rows if (r["features"], tuple(r["open"]), r["grid_frozen"]) == key),
                     key=lambda r: r["threshold"])
        ax.plot([100 * (1 - r["test"]["exit_share"][-1]) for r in pts], [100 * r["test"]["accuracy"] for r in pts],
                "o-" if key[2] else "x--", ms=4, label=f"{key[0]}, open {'+'.join(map(str, key[1]))}, "
                                                      f"{'frozen' if key[2] else 'learning'}")
    ax.axhline(100 * tinytta, color="grey", lw=0.8, ls=":")
    ax.axhline(100 * (tinytta - bench.ACCURACY_BUDGET), color="grey", lw=0.8, ls="--")
    ax.set_xlabel("test samples that exit early (%)")
    ax.set_ylabel("test online accuracy (%)")
    ax.set_title("grid exit heads: learning vs frozen at test time (dotted: tinytta without exits; dashed: -0.5)",
                 fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def committed(path: Path, costs: dict[int, float], full: float) -> dict:
    """A committed sweep of ``exits.py`` (threshold: ``exits.json``, agreement: ``agreement.json``; same model, fit,
    streams and seed as here) as a variant's rows, priced with this run's table, the knob chosen as here."""
    old = json.loads(path.read_text())
    agreement = "rule" in old
    rows = {}
    for split, key in (("val", "validation"), ("test", "test")):
        rows[split] = []
        for p in old[key]:
            knob = p.get("exit_agreement", 0.0) if agreement else p["threshold"]
            mean = full if bench.no_exits(p) else sum(s * costs[k] for k, s in enumerate(p["exit_share"]))
            rows[split].append({"knob": knob, "accuracy": p["accuracy"], "exit_share": p["exit_share"],
                                "instructions_per_sample": mean, "relative_instructions": mean / full})
    base = rows["val"][0]["accuracy"]
    ok = [p for p in rows["val"] if p["accuracy"] >= base - bench.ACCURACY_BUDGET]
    return {"variant": "base-agreement" if agreement else "base", "label_weight": None,
            "rule": "agreement" if agreement else "threshold", "features": "pool", "fit_on_shifts": False,
            "chosen": min(ok, key=lambda p: p["relative_instructions"])["knob"], "validation": rows["val"],
            "test": rows["test"], "from": str(path)}


def key_file(key: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in key)


def heads_name(variant: Variant) -> str:
    if variant.label_weight is None:
        return "base (fit today: clean source, labels)"
    fit_on = "shifted copies" if variant.shifts else "clean source"
    return f"{variant.features} features, {fit_on}, label weight {variant.label_weight:g}"


def rich_setup(cls, backbone, data, work: Path, n: int, val_c, test_c, seed: int):
    """(adaptable of a grid study variant, its int8 stream taps: whole maps of the early stages, cached)."""
    backbone = prepare(copy.deepcopy(backbone), "tinytta").backbone  # frozen, as prepare leaves it
    pooled = prepare(backbone, "tinytta", POOLED_NO_EXITS).method.config  # the study's heads read pooled outputs
    adaptable = Adaptable(backbone, cls(backbone, pooled), "mcunet-s")
    adaptable.method.calibrate([batched_taps(adaptable, adaptable.method, data.train_x[:5000])])
    cache = work / f"streams-maps-{n}-{len(test_c)}-{seed}.pt"  # the same maps serve every grid
    if cache.exists():
        return adaptable, torch.load(cache, weights_only=False)
    # The int8 frozen graph that hands over every stage's whole map: lst's (maps 0..3, then the last stage's
    # pool, as tinytta's last tap); its quantisation is calibrated on the same source data as tinytta's.
    bundle = work / "bundle-taps-maps"
    lst = prepare(copy.deepcopy(backbone), "lst", model_name="mcunet-s", seed=seed)
    if [t.name for t in lst.method.taps()] != ["tap0_map", "tap1_map", "tap2_map", "tap3_map", "tap3_pool"]:
        raise SystemExit(f"exit_variants: lst's taps changed ({lst.method.taps()}); pick the maps anew")
    export(lst, data, bundle, quantize=True, progress=False)
    streams = {}
    for split, c in (("val", val_c), ("test", test_c)):
        taps, labels, lengths, x = bench.stream_taps(bundle, build_stream(data, c, 5, "continual", seed, n,
                                                                          split=split))
        streams[split] = ([t[:3] + t[4:] for t in taps], labels, lengths, x)
    torch.save(streams, cache)
    return adaptable, streams


def write(results, screens, args, n, val_c, test_c, costs, full, start, out: Path) -> None:
    result = {"data": "fashion-mnist", "model": "mcunet-s", "severity": 5, "protocol": "continual",
              "samples_per_corruption": n, "validation_corruptions": list(val_c), "test_corruptions": list(test_c),
              "costs_from": args.costs, "per_exit_instructions": costs, "no_exit_instructions": full,
              "shifts": [list(s) for s in SHIFTS], "fit_samples": args.fit_samples, "fit_epochs": args.fit_epochs,
              "agreement_rule": {"explore": args.explore, "rate": args.rate, "bins": 10},
              "heads": screens, "variants": results, "seconds": round(time.time() - start)}
    report(result, out)


def merge(paths: list[Path], out: Path, committed_from: str | None, costs_from: str) -> None:
    """One report from the ``variants.json`` of runs made apart (same streams and table; variants concatenated),
    the committed base sweeps first."""
    parts = [json.loads(p.read_text()) for p in paths]
    costs = bench.load_costs(costs_from)
    full = bench.load_baseline(costs_from, costs)
    base = [committed(Path(p), costs, full) for p in committed_from.split(",")] if committed_from else []
    result = parts[0] | {"variants": base + [v for p in parts for v in p["variants"]],
                         "heads": {k: v for p in parts for k, v in p["heads"].items()},
                         "seconds": sum(p["seconds"] for p in parts)}
    report(result, out)


def head_overhead(features: str) -> list[float]:
    """Analytic extra cortex-m4 instructions per sample of a variant's heads over tinytta's pooled ones, per exit
    taken (the per-exit table was measured with pooled heads): every extra trainable parameter of a head that ran
    at ``INSTRUCTIONS_PER_HEAD_PARAMETER`` (its forward, gradient and update, alignment of its feature) and every
    map element pooled to the grid at ``INSTRUCTIONS_PER_POOLED_ELEMENT``."""
    if features == "pool":
        return [0.0] * len(STAGE_SHAPES)
    grids = GRIDS[features].grids
    extra, total = [], 0.0
    for k, (c, h, w) in enumerate(STAGE_SHAPES):
        if k < len(STAGE_SHAPES) - 1:  # the last exit is the classifier on the global pool, as before
            cells = min(grids[k], h) * min(grids[k], w)
            total += INSTRUCTIONS_PER_HEAD_PARAMETER * (cells - 1) * c * CLASSES
            total += INSTRUCTIONS_PER_POOLED_ELEMENT * c * h * w
        extra.append(total)
    return extra


def reprice(r: dict, costs: dict[int, float], full: float) -> dict:
    """A variant's rows priced with the per-exit table plus its heads' analytic overhead (the first row of each
    split is the no-exit plan: full inference plus the overhead of every head), the knob chosen again."""
    over = head_overhead(r.get("features", "pool"))
    rows = {}
    for split in ("validation", "test"):
        rows[split] = []
        for i, p in enumerate(r[split]):
            mean = full + over[-1] if i == 0 else sum(s * (costs[k] + over[k]) for k, s in enumerate(p["exit_share"]))
            rows[split].append(p | {"instructions_per_sample": mean, "relative_instructions": mean / full})
    base = rows["validation"][0]["accuracy"]
    ok = [p for p in rows["validation"] if p["accuracy"] >= base - bench.ACCURACY_BUDGET]
    return r | rows | {"chosen": min(ok, key=lambda p: p["relative_instructions"])["knob"],
                       "head_overhead_instructions": over}


def report(result: dict, out: Path) -> None:
    """``variants.json``, ``variants.md`` and ``variants.png`` of a result."""
    out.mkdir(parents=True, exist_ok=True)
    costs = {int(k): float(v) for k, v in result["per_exit_instructions"].items()}
    result = result | {"variants": [reprice(r, costs, result["no_exit_instructions"]) for r in result["variants"]],
                       "head_overhead": {"instructions_per_head_parameter": INSTRUCTIONS_PER_HEAD_PARAMETER,
                                         "instructions_per_pooled_element": INSTRUCTIONS_PER_POOLED_ELEMENT}}
    (out / "variants.json").write_text(json.dumps(result, indent=1) + "\n")
    results, screens, n = result["variants"], result["heads"], result["samples_per_corruption"]
    base = next((r["test"][0]["accuracy"] for r in results if r["variant"] == "base"),
                results[0]["test"][0]["accuracy"])
    lines = [f"tinytta early-exit variants, Fashion-MNIST-C severity 5, continual, mcunet-s int8, {n} samples per "
             f"corruption; accuracy: torch on the int8 taps; instructions: exit shares x the per-exit cortex-m4 QEMU "
             f"table ({result['costs_from']}); 'vs base' is against tinytta without exits ({100 * base:.2f} %); "
             f"knob chosen on {', '.join(result['validation_corruptions'])}", "",
             "| variant | knob | chosen | test accuracy (%) | vs base (points) | exit shares 0/1/2/3 (%) | "
             "instructions / sample | vs full |", "| --- | ---: | :---: | ---: | ---: | --- | ---: | ---: |"]
    for r in results:
        for p in r["test"]:
            lines.append(f"| {r['variant']} | {p['knob']:g} | {'yes' if p['knob'] == r['chosen'] else ''} | "
                         f"{100 * p['accuracy']:.2f} | {100 * (p['accuracy'] - base):+.2f} | "
                         + " / ".join(f"{100 * s:.1f}" for s in p["exit_share"])
                         + f" | {p['instructions_per_sample']:,.0f} | {p['relative_instructions']:.3f} |")
    lines += ["", "Heads (no-exit run; per prefix 0..3): test accuracy / agreement with the final prediction / "
              "oracle exit shares:", ""]
    for key, s in screens.items():
        t = s["test"]
        lines.append(f"- {key}: accuracy " + " / ".join(f"{100 * a:.1f}" for a in t["prefix_accuracy"])
                     + "; agreement " + " / ".join(f"{100 * a:.1f}" for a in t["prefix_agreement"])
                     + "; oracle " + " / ".join(f"{100 * a:.1f}" for a in t["oracle_share"]))
    (out / "variants.md").write_text("\n".join(lines) + "\n")
    plot(results, base, out / "variants.png")


def plot(results, base: float, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        pts = sorted(r["test"], key=lambda p: p["relative_instructions"])
        ax.plot([p["relative_instructions"] for p in pts], [100 * p["accuracy"] for p in pts], "o-", ms=3,
                label=r["variant"])
        chosen = next(p for p in r["test"] if p["knob"] == r["chosen"])
        ax.plot(chosen["relative_instructions"], 100 * chosen["accuracy"], "k*", ms=8)
    ax.axhline(100 * (base - bench.ACCURACY_BUDGET), color="grey", lw=0.8, ls=":")
    ax.axvline(0.7, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("mean cortex-m4 instructions per sample / full inference")
    ax.set_ylabel("test online accuracy (%)")
    ax.set_title("tinytta early-exit variants, FMNIST-C sev 5 (goal: upper left of the dotted lines; * chosen)",
                 fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
