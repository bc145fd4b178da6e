"""Early exits that save compute: tinytta's exit threshold swept on Fashion-MNIST-C, accuracy against
mean guest instructions per sample on a simulated Cortex-M4.

    python benchmarks/exits.py --out results/exits-grid              # tinytta's default exit, 300 per corruption
    python benchmarks/exits.py --quick --out /tmp/exits               # 40 per corruption, 3 corruptions

tinytta runs with its config defaults (the frozen 4x4-grid exit after stage 0) plus ``--set`` (repeatable). The
earlier studies on pooled heads at every exit (``results/exits``) take ``--set exit_grid=1 --set exit_stages=``.

The rule (TinyTTA's, Jia et al. NeurIPS 2024, on the *aligned* ensemble): exit at the first stage
whose confidence-weighted prefix ensemble of the aligned exits has max-probability above the
threshold. The threshold is chosen on the 4 validation corruptions only (applied to held-out
training images): the lowest threshold whose validation accuracy stays within 0.5 points of
tinytta without exits (threshold 1.0); a lower threshold only exits more and earlier, so it is
the cheapest acceptable one. Then, on the 15 test corruptions (severity 5, continual):

* accuracy and the share of samples per exit, for every threshold of the sweep: torch's tinytta on
  the bundle's int8 taps (onnxruntime), which tests/test_exits.py shows takes the same exits and
  predictions as the compiled runtime and the firmware;
* instructions: the firmware of the chosen threshold and of threshold 1.0 (no early exits) run the
  whole test stream in qemu-system-arm (SysTick counts guest instructions). Each sample's
  instructions depend only on where it exited (the plan runs a fixed kernel sequence per path), so
  the sweep's mean instructions are the exit shares times the per-exit instructions measured in
  those two runs (an exit stage never taken there has no measured cost and the point is left out).

Writes ``exits.json``, ``exits.md`` and ``exits.png`` to ``--out``.

``--rule agreement`` studies the drift-aware rule instead (tinytta's ``exit_agreement``: per-exit agreement
trackers by confidence bin, fed by the samples that run to the end, ``edgetune/methods/exit_agreement.py``):
its target swept on the same streams, chosen on validation the same way, in Python only (torch on the int8
taps); instructions = exit shares x the per-exit instructions measured in QEMU in the same run (the first
``--cost-samples`` test samples through the firmware at thresholds 0, 0.5 and 1: every exit taken). It writes
``agreement.json``, ``agreement.md`` and ``agreement.png``.

    python benchmarks/exits.py --rule agreement --rate 0.02 --set exit_grid=1 --set exit_stages= --out results/exits

``--rule bounds``: what any exit rule on tinytta's heads could reach, from the prefix ensembles of the no-exit
run on the test stream (``bounds.json``, ``bounds.md``): an oracle that exits at the first prefix whose
prediction equals the final one (no accuracy lost), and the static per-exit thresholds chosen per corruption
on the test stream itself (the best any online recalibration of thresholds could do), traded off by lambda.
Instructions from ``--costs`` (an ``agreement.json`` with the per-exit table).

``--rule costs``: the per-exit table alone (``--out``/``--costs-out``): the firmware at thresholds 0, 0.5 and 1 on
the first ``--cost-samples`` test samples, each sample filed under the exit the compiled runtime took (host build of
the same bundle, checked equal to the firmware), plus the no-exit plan's cost (threshold 1), which the re-priced
tables use as full inference. ``--reprice FILE --costs TABLE``: a committed ``exits.json`` or ``agreement.json``
re-priced with another per-exit table (exit decisions and accuracy kept; nothing measured).

    python benchmarks/exits.py --rule costs --cost-samples 100 --set exit_grid=1 --set exit_stages= \
        --out results/exits --costs-out costs-kernels2.json
    python benchmarks/exits.py --reprice results/exits/exits-kernels1.json --costs results/exits/costs-kernels2.json
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
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
from edgetune.deploy import build_project, save_initial_state, write_target_project
from edgetune.deploy.host import HostModel
from edgetune.deploy.streams import EARLY_EXIT, write_stream
from edgetune.export import export
from edgetune.ort_runtime import OrtTaps
from edgetune.simulate import run_program
from edgetune.targets import get_target

ROOT = Path(__file__).resolve().parent.parent
THRESHOLDS = (1.0, 0.999, 0.995, 0.99, 0.98, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5, 0.4)
ACCURACY_BUDGET = 0.005  # the goal: at most 0.5 points below tinytta without exits
TARGETS = (0.7, 0.8, 0.9, 0.95, 0.98, 0.99)  # the agreement rule's consistency targets


def stream_taps(bundle: Path, segments) -> tuple[list[list[torch.Tensor]], np.ndarray, list[int], np.ndarray]:
    """(int8 taps per sample, labels, segment lengths, float32 samples) of a stream."""
    runner = OrtTaps(bundle)
    x = np.concatenate([to_tensor(s.images).numpy() for s in segments])
    taps = [runner(torch.from_numpy(x[i:i + 1])) for i in range(len(x))]
    return taps, np.concatenate([s.labels for s in segments]), [len(s.labels) for s in segments], x


def configured(method, backbone, **overrides):
    """The fitted ``method`` with config ``overrides`` (a fresh instance: the agreement rule's trackers are
    buffers that exist only when the rule is on), at its start."""
    m = type(method)(backbone, dataclasses.replace(method.config, **overrides))
    m.load_state_dict(method.state_dict(), strict=False)  # heads, statistics; new trackers start empty
    m.reset()
    return m


def sweep_point(method, threshold: float, taps, labels, lengths, backbone=None, **rule) -> dict:
    """tinytta at ``threshold`` (or the agreement ``rule``) over one continual stream: accuracy (mean over
    corruptions) and exits."""
    if backbone is not None:
        m = configured(method, backbone, exit_threshold=threshold, **rule)
    else:
        m = copy.deepcopy(method)
        m.config = dataclasses.replace(m.config, exit_threshold=threshold)
        m._initial = None
        m.reset()
    preds, exits = [], []
    for t in taps:
        preds.append(int(m.step(t).argmax()))
        exits.append(m.last_exit)
    correct = np.array(preds) == labels
    bounds = np.cumsum([0, *lengths])
    per = [float(correct[a:b].mean()) for a, b in zip(bounds[:-1], bounds[1:])]
    share = np.bincount(exits, minlength=m.depth) / len(exits)
    return {"threshold": threshold, **rule, "accuracy": float(np.mean(per)), "exit_share": share.tolist(),
            "predictions": preds, "exits": exits}


def firmware_run(adaptable, data, threshold: float, x: np.ndarray, work: Path) -> np.ndarray:
    """Per-sample records of the cortex-m4 firmware of tinytta at ``threshold`` over samples ``x``."""
    a = copy.deepcopy(adaptable)
    a.method.config = dataclasses.replace(a.method.config, exit_threshold=threshold)
    a.method._initial = None
    a.method.reset()
    bundle = work / f"bundle-{threshold:g}"
    export(a, data, bundle, quantize=True, target="cortex-m4", progress=False)
    save_initial_state(bundle, a.method)
    built = build_project(write_target_project(bundle, "cortex-m4"))
    stream = write_stream(work / f"stream-{threshold:g}.bin", x, None, None, built.project.classes)
    return run_program(built, stream, work / f"run-{threshold:g}", adapt=True).records


def instructions(records: np.ndarray) -> np.ndarray:
    """Guest instructions per sample of a firmware run (SysTick ticks under ``-icount shift=0``)."""
    return records["step"].astype(float) * get_target("cortex-m4").ticks_to_instructions(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/exits")
    parser.add_argument("--samples", type=int, default=300, help="samples per corruption")
    parser.add_argument("--quick", action="store_true", help="40 samples of 3 corruptions per split (a smoke run)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="bundles and firmware (default: a temporary folder)")
    parser.add_argument("--rule", default="threshold", choices=["threshold", "agreement", "bounds", "costs"])
    parser.add_argument("--costs", default="results/exits/exits.json,results/exits/agreement.json",
                        help="bounds, --reprice: per-exit instructions (comma-separated result files, first wins)")
    parser.add_argument("--cost-samples", type=int, default=40, help="agreement: test samples run in QEMU (at "
                                                                      "thresholds 0, 0.5, 1) for the per-exit table")
    parser.add_argument("--explore", type=int, default=10, help="agreement: every N-th sample runs to the end")
    parser.add_argument("--rate", type=float, default=0.05, help="agreement: EMA rate of the trackers")
    parser.add_argument("--bins", type=int, default=10, help="agreement: confidence bins per exit")
    parser.add_argument("--reprice", default=None, help="re-price this exits.json (threshold sweep) or "
                                                         "agreement.json with --costs (nothing measured)")
    parser.add_argument("--costs-out", default="costs.json", help="costs: file name of the per-exit table in --out")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a tinytta setting over its defaults (repeatable), e.g. --set exit_grid=1 "
                             "--set exit_stages= for pooled heads at every exit")
    args = parser.parse_args()
    if args.reprice:
        reprice(Path(args.reprice), args.costs, Path(args.out))
        return
    torch.set_num_threads(2)
    start = time.time()
    n = 40 if args.quick else args.samples
    val_c = VALIDATION_CORRUPTIONS[:3] if args.quick else VALIDATION_CORRUPTIONS
    test_c = TEST_CORRUPTIONS[:3] if args.quick else TEST_CORRUPTIONS
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="edgetune-exits-"))
    work.mkdir(parents=True, exist_ok=True)

    data = load_dataset("fashion-mnist")
    backbone, _ = load_checkpoint(ROOT / "checkpoints" / "mcunet-s-fashion-mnist")
    overrides = dict(kv.split("=", 1) for kv in args.set)
    adaptable = prepare(copy.deepcopy(backbone), "tinytta", overrides, model_name="mcunet-s", seed=args.seed)
    fit(adaptable, data, seed=args.seed, progress=False)
    print(f"fit ready ({time.time() - start:.0f} s)", flush=True)
    taps_bundle = work / "bundle-taps"
    export(adaptable, data, taps_bundle, quantize=True, progress=False)  # the int8 frozen graph for the taps
    if args.rule == "costs":
        segments = build_stream(data, test_c, 5, "continual", args.seed, n, split="test")
        x = np.concatenate([to_tensor(s.images).numpy() for s in segments])[:args.cost_samples]
        runner = OrtTaps(taps_bundle)  # taps of the measured samples only (torch's exits for them)
        taps = [runner(torch.from_numpy(x[i:i + 1])) for i in range(len(x))]
        cost_table(args, adaptable, data, x, taps, work, start)
        return

    streams = {}
    for split, corruptions in (("val", val_c), ("test", test_c)):
        segments = build_stream(data, corruptions, 5, "continual", args.seed, n, split=split)
        streams[split] = stream_taps(taps_bundle, segments)
    if args.rule == "agreement":
        agreement_study(args, adaptable, backbone, data, streams, val_c, test_c, n, work, start)
        return
    if args.rule == "bounds":
        bounds(args, adaptable.method, streams["test"], n)
        return
    sweep = {split: [sweep_point(adaptable.method, t, *streams[split][:3]) for t in THRESHOLDS]
             for split in streams}
    for split in sweep:
        for p in sweep[split]:
            print(f"{split:<5} threshold {p['threshold']:<6g} accuracy {100 * p['accuracy']:6.2f}  exits "
                  + " ".join(f"{100 * s:5.1f}" for s in p["exit_share"]), flush=True)
    full_val = sweep["val"][0]["accuracy"]
    ok = [p for p in sweep["val"] if p["accuracy"] >= full_val - ACCURACY_BUDGET]
    chosen = min(ok, key=lambda p: p["threshold"])["threshold"]
    print(f"chosen on validation: threshold {chosen:g}", flush=True)

    x_test = streams["test"][3]
    runs = {t: firmware_run(adaptable, data, t, x_test, work) for t in dict.fromkeys((1.0, chosen))}
    by_t = {p["threshold"]: p for p in sweep["test"]}
    depth = adaptable.method.depth
    cost: dict[int, list[float]] = {k: [] for k in range(depth)}
    agree = {}
    for t, records in runs.items():
        exits = np.array(by_t[t]["exits"])
        flagged = (records["flags"] & EARLY_EXIT) != 0
        agree[t] = {"exits": float(np.mean(flagged == (exits < depth - 1))),
                    "predictions": float(np.mean(records["prediction"] == np.array(by_t[t]["predictions"])))}
        if t < 1.0 or len(runs) == 1:  # the per-exit table from the plan with probes (the no-exit plan has none)
            for k in range(depth):
                cost[k] += instructions(records)[exits == k].tolist()
    per_exit = {k: float(np.mean(v)) if v else None for k, v in cost.items()}
    full = float(instructions(runs[1.0]).mean())  # full inference: the no-exit plan, measured on the same stream
    rows = []
    for p in sweep["test"]:
        known = all(per_exit[k] is not None for k, s in enumerate(p["exit_share"]) if s > 0)
        mean = sum(s * per_exit[k] for k, s in enumerate(p["exit_share"]) if s > 0) if known else None
        mean = full if no_exits(p) else mean
        rows.append({"threshold": p["threshold"], "accuracy": p["accuracy"], "exit_share": p["exit_share"],
                     "early_exit_share": 1.0 - p["exit_share"][-1],
                     "instructions_per_sample": mean, "relative_instructions": mean / full if mean and full else None,
                     "measured_in_qemu": p["threshold"] in runs})
    measured = {f"{t:g}": {"instructions_per_sample": float(instructions(r).mean()),
                           "accuracy": float(np.mean(r["prediction"] == streams["test"][1])),
                           "early_exit_share": float(np.mean((r["flags"] & EARLY_EXIT) != 0)),
                           "agreement_with_torch": agree[t]} for t, r in runs.items()}
    result = {"data": "fashion-mnist", "model": "mcunet-s", "severity": 5, "protocol": "continual",
              "samples_per_corruption": n, "validation_corruptions": list(val_c), "test_corruptions": list(test_c),
              "settings": overrides, "chosen_threshold": chosen, "per_exit_instructions": per_exit,
              "no_exit_instructions": full, "qemu": measured,
              "validation": [{k: v for k, v in p.items() if k not in ("predictions", "exits")} for p in sweep["val"]],
              "test": rows, "seconds": round(time.time() - start)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "exits.json").write_text(json.dumps(result, indent=1) + "\n")
    write_table(result, out / "exits.md")
    plot(result, out / "exits.png")
    print((out / "exits.md").read_text())


def load_costs(paths: str) -> dict[int, float]:
    """Per-exit instructions merged from the ``per_exit_instructions`` of comma-separated result files (the
    first file that measured an exit wins)."""
    costs: dict[int, float] = {}
    for path in paths.split(","):
        for k, v in json.loads(Path(path).read_text())["per_exit_instructions"].items():
            if v is not None and int(k) not in costs:
                costs[int(k)] = float(v)
    return dict(sorted(costs.items()))


def load_baseline(paths: str, costs: dict[int, float]) -> float:
    """Instructions of a sample through the no-exit plan (threshold 1: the frozen graph in one go), from the first
    result file that measured it (``no_exit_instructions``); else the last exit's cost (older tables priced both
    alike)."""
    for path in paths.split(","):
        value = json.loads(Path(path).read_text()).get("no_exit_instructions")
        if value is not None:
            return float(value)
    return costs[max(costs)]


def no_exits(p: dict) -> bool:
    """A sweep row that ran the no-exit plan (threshold 1 without the agreement rule)."""
    return p["threshold"] >= 1.0 and not p.get("exit_agreement")


def bounds(args, method, stream, n: int) -> None:
    """Upper bounds of exit rules on these heads (see the module docstring)."""
    taps, labels, lengths, _ = stream
    m = copy.deepcopy(method)
    m._initial = None
    m.reset()
    seen: list[torch.Tensor] = []
    select = m.select

    def recording(prefix, gate):  # the prefix ensembles as scored (class-prior corrected)
        seen.append(prefix.detach().clone())
        return select(prefix, gate)

    m.select = recording
    for t in taps:
        m.step(t)
    prefix = torch.stack(seen).numpy()  # N x K x C
    costs = load_costs(args.costs)
    rel = np.array([costs[k] for k in sorted(costs)]) / load_baseline(args.costs, costs)  # vs the no-exit plan
    pred = prefix.argmax(-1)
    final = pred[:, -1]
    first = (pred == final[:, None]).argmax(1)
    oracle = {"relative_instructions": float(rel[first].mean()), "exit_share": np.bincount(
        first, minlength=len(rel)).tolist(), "accuracy_delta": 0.0}
    grid = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 1.01)
    combos = np.array(list(itertools.product(grid, repeat=len(rel) - 1)))
    conf = prefix.max(-1)
    bounds_ = np.cumsum([0, *lengths])
    per = []  # per corruption: (correct, instructions) of every threshold combination
    for a, b in zip(bounds_[:-1], bounds_[1:]):
        ok = conf[a:b, None, :-1] > combos[None]  # samples x combos x early exits
        ok = np.concatenate([ok, np.ones(ok.shape[:2] + (1,), bool)], axis=2)
        exit_k = ok.argmax(2)
        right = pred[a:b][np.arange(b - a)[:, None], exit_k] == labels[a:b, None]
        per.append((right.sum(0), rel[exit_k].sum(0)))
    base = float(np.mean(final == labels))
    trade = []
    for lam in (0.5, 1, 2, 3, 5, 10, 20, 50):
        picks = [int(np.argmin(c - lam * r)) for r, c in per]
        right = sum(int(r[j]) for (r, _), j in zip(per, picks))
        cost = sum(float(c[j]) for (_, c), j in zip(per, picks))
        trade.append({"lambda": lam, "accuracy_delta": right / len(labels) - base,
                      "relative_instructions": cost / len(labels)})
    result = {"samples_per_corruption": n, "costs_from": args.costs, "per_exit_relative": rel.tolist(),
              "accuracy_no_exits": base, "oracle": oracle, "per_corruption_thresholds": trade}
    out = Path(args.out)
    (out / "bounds.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["Upper bounds of exit rules on tinytta's heads (test stream, no-exit run's prefix ensembles)", "",
             "oracle (exit at the first prefix that equals the final prediction): "
             f"{oracle['relative_instructions']:.3f}x at +0.00 points; exit shares "
             + ", ".join(f"{100 * s / len(labels):.1f} %" for s in oracle["exit_share"]), "",
             "per-exit thresholds on the corrected prefix's max-probability, chosen per corruption on the test "
             "stream itself (what any online recalibration of thresholds could reach at best):", "",
             "| lambda | vs no exits (points) | vs full |", "| ---: | ---: | ---: |"]
    lines += [f"| {t['lambda']:g} | {100 * t['accuracy_delta']:+.2f} | {t['relative_instructions']:.3f} |"
              for t in trade]
    (out / "bounds.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def exit_costs(adaptable, data, x: np.ndarray, taps, work: Path) -> dict[int, float]:
    """Mean guest instructions of a sample per exit taken (see ``exit_samples``)."""
    return {k: float(np.mean(v)) for k, v in exit_samples(adaptable, data, x, taps, work)[0].items()}


def exit_samples(adaptable, data, x: np.ndarray, taps, work: Path) -> tuple[dict[int, list[float]], dict]:
    """Guest instructions of every sample per exit taken, measured in one go (one compiler state): the firmware
    at thresholds 0 (every sample exits at exit 0), 1 (none exits: the no-exit plan) and 0.5 (exits in between)
    on ``x``. A sample's exit is the one the compiled runtime took (the host build of the same bundle, whose
    ``exit_taken`` state names it; host = firmware is checked per sample), so the table prices the plan's paths
    even where torch on ``taps`` would exit elsewhere. Also returns the no-exit plan's instructions and how
    often torch, host and firmware agree. Raises SystemExit when an exit was taken by no sample or host and
    firmware disagree."""
    depth = adaptable.method.depth
    seen: dict[int, list[float]] = {k: [] for k in range(depth)}
    info: dict = {}
    for threshold in (0.0, 0.5, 1.0):
        records = firmware_run(adaptable, data, threshold, x, work)
        host = HostModel(work / f"bundle-{threshold:g}", workdir=work / f"host-{threshold:g}")
        compiled = []
        for i in range(len(x)):
            step = host.step(x[i])
            taken = int(np.argmax(host.state()["state_exit_taken"]))  # one-hot over the declared exits
            compiled.append(adaptable.method.exit_stages[taken] if step.early_exit else depth - 1)
            if step.prediction != int(records["prediction"][i]) or step.early_exit != bool(
                    records["flags"][i] & EARLY_EXIT):
                raise SystemExit(f"exits: host and firmware disagree at sample {i} (threshold {threshold:g})")
        m = copy.deepcopy(adaptable.method)
        m.config = dataclasses.replace(m.config, exit_threshold=threshold)
        m._initial = None
        m.reset()
        torch_exits = []
        for t in taps:
            m.step(t)
            torch_exits.append(m.last_exit)
        info[f"{threshold:g}"] = {"torch_exit_agreement": float(np.mean(np.array(torch_exits) == compiled)),
                                  "exit_share_compiled": np.bincount(compiled, minlength=depth).tolist(),
                                  "exit_share_torch": np.bincount(torch_exits, minlength=depth).tolist()}
        if threshold >= 1.0:  # the no-exit plan runs the frozen graph in one go, not stage by stage
            info["no_exit_instructions"] = float(instructions(records).mean())
            continue
        for k, cost in zip(compiled, instructions(records)):
            seen[k].append(float(cost))
    missing = [k for k in adaptable.method.exit_stages if not seen[k]]  # closed exits are never taken
    if missing:
        raise SystemExit(f"exits: no measured sample took exit(s) {missing}; raise --cost-samples")
    return {k: v for k, v in seen.items() if v}, info


def cost_table(args, adaptable, data, x: np.ndarray, taps, work: Path, start: float) -> None:
    """The per-exit cortex-m4 QEMU table alone (``--rule costs``), written to ``--out``/``--costs-out`` with the
    spread per exit (it should be narrow: a sample's cost is fixed by its exit path)."""
    seen, info = exit_samples(adaptable, data, x, taps, work)
    result = {"target": "cortex-m4", "model": "mcunet-s", "method": "tinytta", "data": "fashion-mnist",
              "stream": f"the first {len(x)} samples of the continual test stream (severity 5)",
              "thresholds_run": [0.0, 0.5, 1.0],
              "per_exit_instructions": {k: float(np.mean(v)) for k, v in seen.items()},
              "no_exit_instructions": info.pop("no_exit_instructions"),
              "per_exit_samples": {k: len(v) for k, v in seen.items()},
              "per_exit_min": {k: float(np.min(v)) for k, v in seen.items()},
              "per_exit_max": {k: float(np.max(v)) for k, v in seen.items()},
              "exits_per_threshold": info,
              "command": f"python benchmarks/exits.py --rule costs --cost-samples {len(x)} --out {args.out} "
                         f"--costs-out {args.costs_out}" + "".join(f" --set {kv}" for kv in args.set),
              "settings": dict(kv.split("=", 1) for kv in args.set), "seconds": round(time.time() - start)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / args.costs_out).write_text(json.dumps(result, indent=1) + "\n")
    for k, v in seen.items():
        print(f"exit {k}: {np.mean(v):,.0f} instructions ({len(v)} samples, {np.min(v):,.0f} .. {np.max(v):,.0f})")


def reprice(path: Path, costs_from: str, out: Path) -> None:
    """Re-price a committed threshold sweep (``exits.json``) or agreement sweep (``agreement.json``) with the
    per-exit table of ``costs_from``: the exit decisions and accuracies stay, the instructions are recomputed."""
    old = json.loads(path.read_text())
    costs = load_costs(costs_from)
    full = load_baseline(costs_from, costs)
    if "rule" in old:  # an agreement sweep
        measured = old.get("per_exit_instructions_this_run", old["per_exit_instructions"])
        old["per_exit_instructions_this_run"] = {int(k): v for k, v in measured.items()}
        write_agreement(price(old, costs, costs_from, full), out)
        return
    result = price_thresholds(old, costs, costs_from, full)
    out.mkdir(parents=True, exist_ok=True)
    (out / "exits.json").write_text(json.dumps(result, indent=1) + "\n")
    write_table(result, out / "exits.md")
    plot(result, out / "exits.png")
    print((out / "exits.md").read_text())


def price_thresholds(result: dict, costs: dict[int, float], source: str, full: float) -> dict:
    """A threshold sweep (``exits.json``) with every test row's instructions = exit shares x ``costs`` (the no-exit
    row: ``full``, the no-exit plan's cost); the chosen threshold and the QEMU runs' own measurements (the old
    pricing) stay as they were measured."""
    rows = []
    for p in result["test"]:
        mean = full if no_exits(p) else sum(s * costs[k] for k, s in enumerate(p["exit_share"]))
        rows.append(p | {"instructions_per_sample": mean, "relative_instructions": mean / full})
    old = {k: v for k, v in result["per_exit_instructions"].items()}
    return result | {"test": rows, "per_exit_instructions": costs, "no_exit_instructions": full, "costs_from": source,
                     "per_exit_instructions_before": result.get("per_exit_instructions_before", old)}


def agreement_study(args, adaptable, backbone, data, streams, val_c, test_c, n, work, start) -> None:
    """The agreement rule's target swept on both splits, the target chosen on validation, instructions from
    the per-exit QEMU table (exit 0 measured here when the table lacks it)."""
    rule = {"exit_explore": args.explore, "exit_rate": args.rate, "exit_bins": args.bins}
    sweep = {}
    for split in streams:
        base = sweep_point(adaptable.method, 1.0, *streams[split][:3])
        sweep[split] = [base] + [sweep_point(adaptable.method, 1.0, *streams[split][:3], backbone=backbone,
                                             exit_agreement=t, **rule) for t in TARGETS]
        for p in sweep[split]:
            print(f"{split:<5} target {p.get('exit_agreement', 0):<5g} accuracy {100 * p['accuracy']:6.2f}  exits "
                  + " ".join(f"{100 * s:5.1f}" for s in p["exit_share"]), flush=True)
    k = args.cost_samples
    costs = exit_costs(adaptable, data, streams["test"][3][:k], streams["test"][0][:k], work)
    result = {"data": "fashion-mnist", "model": "mcunet-s", "severity": 5, "protocol": "continual", "rule": rule,
              "samples_per_corruption": n, "validation_corruptions": list(val_c), "test_corruptions": list(test_c),
              "per_exit_instructions_this_run": costs, "seconds": round(time.time() - start),
              "validation": [{k: v for k, v in p.items() if k not in ("predictions", "exits")} for p in sweep["val"]],
              "test": [{k: v for k, v in p.items() if k not in ("predictions", "exits")} for p in sweep["test"]]}
    write_agreement(price(result, costs, "this run"), Path(args.out))


def price(result: dict, costs: dict[int, float], source: str, full: float | None = None) -> dict:
    """``result`` with every row's instructions (exit shares x ``costs``; the no-exit row at ``full``, the no-exit
    plan's cost, default the last exit's) and the target chosen on validation."""
    full = costs[max(costs)] if full is None else full

    def priced(p: dict) -> dict:
        mean = full if no_exits(p) else sum(s * costs[k] for k, s in enumerate(p["exit_share"]))
        return p | {"target": p.get("exit_agreement", 0.0), "early_exit_share": 1.0 - p["exit_share"][-1],
                    "instructions_per_sample": mean, "relative_instructions": mean / full}

    rows = {split: [priced(p) for p in result[key]] for split, key in (("val", "validation"), ("test", "test"))}
    ok = [p for p in rows["val"][1:] if p["accuracy"] >= rows["val"][0]["accuracy"] - ACCURACY_BUDGET]
    chosen = min(ok, key=lambda p: p["relative_instructions"])["target"] if ok else None
    return result | {"validation": rows["val"], "test": rows["test"], "chosen_target": chosen,
                     "per_exit_instructions": costs, "no_exit_instructions": full, "costs_from": source}


def write_agreement(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "agreement.json").write_text(json.dumps(result, indent=1) + "\n")
    rows = {"val": result["validation"], "test": result["test"]}
    base = rows["test"][0]
    r = result["rule"]
    lines = [f"tinytta agreement-tracker exits (explore every {r['exit_explore']}, rate {r['exit_rate']:g}, "
             f"{r['exit_bins']} bins), Fashion-MNIST-C severity 5, continual, mcunet-s int8, "
             f"{result['samples_per_corruption']} samples per corruption; accuracy: torch on the int8 taps; "
             "instructions: exit shares x the per-exit cortex-m4 QEMU table; target chosen on "
             f"{', '.join(result['validation_corruptions'])}: {result['chosen_target']}", "",
             "| target | val accuracy (%) | val vs no exits | test accuracy (%) | test vs no exits (points) | "
             "early exits (%) | instructions / sample | vs full |", "|" + " ---: |" * 8]
    for v, t in zip(rows["val"], rows["test"]):
        lines.append(f"| {t['target']:g}{' (no exits)' if not t['target'] else ''} | {100 * v['accuracy']:.2f} | "
                     f"{100 * (v['accuracy'] - rows['val'][0]['accuracy']):+.2f} | {100 * t['accuracy']:.2f} | "
                     f"{100 * (t['accuracy'] - base['accuracy']):+.2f} | {100 * t['early_exit_share']:.1f} | "
                     f"{t['instructions_per_sample']:,.0f} | {t['relative_instructions']:.3f} |")
    lines += ["", f"Per-exit instructions (QEMU, {result['costs_from']}): " + ", ".join(
        f"exit {k}: {v:,.0f}" for k, v in result["per_exit_instructions"].items())
        + f"; no-exit plan: {result.get('no_exit_instructions', result['test'][0]['instructions_per_sample']):,.0f}",
        "Measured in this run's firmware: " + ", ".join(
        f"exit {k}: {v:,.0f}" for k, v in result["per_exit_instructions_this_run"].items())]
    (out / "agreement.md").write_text("\n".join(lines) + "\n")
    plot_frontier(result, out / "agreement.png")
    print((out / "agreement.md").read_text())


def plot_frontier(r: dict, path: Path) -> None:
    """Accuracy vs instructions of the agreement rule next to the threshold rule (when its json is beside)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    pts = sorted(r["test"], key=lambda p: p["relative_instructions"])
    ax.plot([p["relative_instructions"] for p in pts], [100 * p["accuracy"] for p in pts], "o-",
            label="agreement trackers (target)")
    for p in pts:
        ax.annotate(f"{p['target']:g}", (p["relative_instructions"], 100 * p["accuracy"]), fontsize=7)
    threshold = path.parent / "exits.json"
    if threshold.exists():
        t = [row for row in json.loads(threshold.read_text())["test"] if row["relative_instructions"]]
        ax.plot([p["relative_instructions"] for p in t], [100 * p["accuracy"] for p in t], "s--",
                label="static threshold")
    base = 100 * r["test"][0]["accuracy"]
    ax.axhline(base - 100 * ACCURACY_BUDGET, color="grey", lw=0.8, ls=":")
    ax.axvline(0.7, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("mean cortex-m4 instructions per sample / full inference")
    ax.set_ylabel("test online accuracy (%)")
    ax.set_title("tinytta early exits, FMNIST-C sev 5 (goal: upper left of the dotted lines)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_table(r: dict, path: Path) -> None:
    base = next(row for row in r["test"] if row["threshold"] == 1.0)
    lines = [f"tinytta early exits, Fashion-MNIST-C severity 5, continual, mcunet-s int8, cortex-m4 (QEMU), "
             f"{r['samples_per_corruption']} samples per corruption; threshold chosen on "
             f"{', '.join(r['validation_corruptions'])}: {r['chosen_threshold']:g}", "",
             "| threshold | test accuracy (%) | vs no exits (points) | early exits (%) | instructions / sample | "
             "vs full |", "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    repriced = "costs_from" in r  # re-priced: the QEMU runs' firmware predates the per-exit table
    for row in r["test"]:
        ins = row["instructions_per_sample"]
        mark = " (QEMU run)" if row["measured_in_qemu"] else ""
        lines.append(f"| {row['threshold']:g}{mark} | {100 * row['accuracy']:.2f} | "
                     f"{100 * (row['accuracy'] - base['accuracy']):+.2f} | {100 * row['early_exit_share']:.1f} | "
                     + (f"{ins:,.0f} | {row['relative_instructions']:.3f} |" if ins else "- | - |"))
    lines += ["", f"Per-exit instructions (QEMU{', ' + r['costs_from'] if repriced else ''}): " + ", ".join(
        f"exit {k}: {v:,.0f}" if v else f"exit {k}: not taken" for k, v in r["per_exit_instructions"].items())
        + (f"; no-exit plan (threshold 1): {r['no_exit_instructions']:,.0f}" if repriced else "")]
    if repriced:
        lines += ["Re-priced: every row's instructions are its exit shares x this table (exit decisions and accuracy "
                  "as measured); the sweep was priced before with " + ", ".join(
                      f"exit {k}: {v:,.0f}" if v else f"exit {k}: not taken"
                      for k, v in r["per_exit_instructions_before"].items()) + "; its QEMU runs (that firmware): "
                  + "; ".join(f"threshold {t}: {q['instructions_per_sample']:,.0f} instructions / sample"
                              for t, q in r["qemu"].items())]
    lines += [
        "QEMU runs vs torch on the int8 taps (share of samples that agree): " + "; ".join(
            f"threshold {t}: exits {100 * q['agreement_with_torch']['exits']:.1f} %, predictions "
            f"{100 * q['agreement_with_torch']['predictions']:.1f} %" for t, q in r["qemu"].items())]
    path.write_text("\n".join(lines) + "\n")


def plot(r: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [row for row in r["test"] if row["instructions_per_sample"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p["instructions_per_sample"] / 1e6 for p in pts], [100 * p["accuracy"] for p in pts], "o-",
            label="per-exit table: " + r.get("costs_from", "this run's QEMU runs"))
    for p in pts:
        ax.annotate(f"{p['threshold']:g}", (p["instructions_per_sample"] / 1e6, 100 * p["accuracy"]), fontsize=7)
    before = {int(k): v for k, v in r.get("per_exit_instructions_before", {}).items()}
    if before:  # the old pricing beside the new one, where it priced every exit taken
        old = [(sum(s * before[k] for k, s in enumerate(p["exit_share"]) if s > 0), 100 * p["accuracy"])
               for p in r["test"] if all(before[k] for k, s in enumerate(p["exit_share"]) if s > 0)]
        ax.plot([c / 1e6 for c, _ in old], [a for _, a in old], "s--", color="grey", label="before (older kernels)")
        ax.legend(fontsize=7)
    ax.set_xlabel("mean guest instructions per sample (millions, cortex-m4 QEMU)")
    ax.set_ylabel("online accuracy (%)")
    ax.set_title("tinytta early-exit threshold sweep, Fashion-MNIST-C sev 5")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
