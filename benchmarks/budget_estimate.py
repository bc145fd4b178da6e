"""How close is the memory estimate made before compiling to the firmware that gets linked?

For each model and method the budget is estimated twice without TVM: by ``preflight_budget``
(from the torch model, before the method is fitted: what ``edgetune export`` refuses with) and
by ``estimate_bundle`` (from the exported bundle's graphs: what ``write_target_project`` checks
before compiling). Then the bundle is compiled, written for each Cortex-M target and linked with
``arm-none-eabi-gcc``; the table puts both estimates next to the linked firmware (flash: the
sections ``arm-none-eabi-size`` puts in flash; SRAM: .data + .bss + the reserved stack and heap)
and next to the generated model's own figures (``ModelMemory``: constants, arena).

    python benchmarks/budget_estimate.py [--out results/budget_estimate] [--workdir DIR]
    python benchmarks/budget_estimate.py --corpus mobilenet-v3-s,hswish-se --zoo none   # a few corpus models
    python benchmarks/budget_estimate.py --quick   # one zoo case and two small corpus models

``--workdir`` keeps the exported bundles; a bundle already there is reused (no second fit), and with
``--reuse`` so is a firmware project already written there (no second TVM compile: re-estimating a
bundle against the same linked firmware).
``--corpus`` adds models of tests/corpus_models.py (seeded random weights, a least-squares
classifier, method ``source``: the route of ``benchmarks/corpus.py``), whose int8 graphs hold the
kernels the zoo models do not (QLinearMul, lookup tables, attention MatMul, Softmax, ReduceMean).

Writes ``<out>/budget_estimate.{md,json}``. The estimate is meant to be conservative: a
negative error (estimate below the linked size) is what could let an oversized model through.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import copy
import sys

from edgetune.adapt import fit, prepare
from edgetune.checkpoint import load_checkpoint
from edgetune.data import load_dataset
from edgetune.deploy.budget import preflight_budget
from edgetune.deploy.build import build_project, find_projects
from edgetune.deploy.estimate import estimate_bundle
from edgetune.deploy.project import save_initial_state, write_target_project
from edgetune.errors import BudgetError
from edgetune.export import export
from edgetune.targets import get_target

ROOT = Path(__file__).resolve().parents[1]
CASES = (("tiny-cnn", "checkpoints/tiny-cnn-fashion-mnist"), ("mcunet-s", "checkpoints/mcunet-s-digits"))
METHODS = ("feature-align", "tinytta", "lst")
# the corpus models whose int8 graphs hold each new kernel family (default of --corpus)
CORPUS_DEFAULT = ("keras-mnist", "hswish-se", "transformer", "bn-after-relu", "normalized-input", "resnet8",
                  "mobilenet-v3-s")
QUICK_CORPUS = ("hswish-se", "transformer")
TARGETS = ("cortex-m4", "cortex-m7")
ARENA_ROW = "activation arena (frozen + method step)"


@dataclass(frozen=True)
class Row:
    model: str
    method: str
    target: str
    flash_preflight: int
    flash_bundle: int
    flash_linked: int
    sram_preflight: int
    sram_bundle: int
    sram_linked: int  # .data + .bss + reserved stack + heap
    arena_estimate: int
    arena_generated: int
    constants_estimate: int
    constants_generated: int
    preflight_seconds: float
    compile_seconds: float

    @staticmethod
    def error(estimate: int, real: int) -> float:
        return 100.0 * (estimate - real) / real


def measure(model: str, checkpoint: str, method: str, work: Path, reuse: bool = False) -> list[Row]:
    backbone, config = load_checkpoint(ROOT / checkpoint)
    data = load_dataset(config["data"])
    return _measure(model, method, prepare(backbone, method, model_name=model), data, work, reuse)


def measure_corpus(model: str, work: Path, reuse: bool = False) -> list[Row]:
    """A corpus model as benchmarks/corpus.py deploys it (method ``source``)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from corpus_models import build, fit_linear_probe, labelled_samples

    backbone = build(model)
    data = labelled_samples(backbone, 512)
    fit_linear_probe(backbone, data)
    return _measure(model, "source", prepare(copy.deepcopy(backbone), "source", model_name=model), data, work,
                    reuse)


def _measure(model: str, method: str, adaptable, data, work: Path, reuse: bool) -> list[Row]:
    t0 = time.perf_counter()
    pre = {t: preflight_budget(adaptable, t, check=False) for t in TARGETS}
    preflight_seconds = (time.perf_counter() - t0) / len(TARGETS)
    bundle = work / f"{model}-{method}"
    if not (bundle / "manifest.json").is_file():  # a bundle kept in --workdir is reused as it is
        fit(adaptable, data, seed=0)
        export(adaptable, data, bundle, target=TARGETS[0], progress=False)
        save_initial_state(bundle, adaptable.method)
    rows = []
    for name in TARGETS:
        target = get_target(name)
        estimate = estimate_bundle(bundle, target)
        p = pre[name]
        t0 = time.perf_counter()
        kept = find_projects(bundle, name) if reuse and (bundle / name / "project.json").is_file() else []
        try:
            project = kept[0] if kept else write_target_project(bundle, target)
        except BudgetError as exc:  # refused from the estimate, before compiling: nothing linked to compare
            print(f"{model} {method} {name}: refused ({str(exc).splitlines()[0][:160]})", flush=True)
            rows.append(Row(model, method, name, p.flash if p else 0, estimate.flash, 0, p.sram if p else 0,
                            estimate.sram, 0, next(r.sram for r in estimate.rows if r.what == ARENA_ROW), 0,
                            estimate.rows[0].flash, 0, round(preflight_seconds, 2), round(time.perf_counter() - t0, 1)))
            continue
        compile_seconds = sum(project.compile_seconds.values()) if kept else time.perf_counter() - t0
        built = build_project(project)
        board = target.board
        sram_linked = built.static_ram_bytes + (board.stack_bytes + board.heap_bytes if board else 0)
        rows.append(Row(model, method, name, p.flash if p else 0, estimate.flash, built.flash_bytes,
                        p.sram if p else 0, estimate.sram, sram_linked,
                        next(r.sram for r in estimate.rows if r.what == ARENA_ROW), project.memory["arena"],
                        estimate.rows[0].flash, project.memory["flash_constants"], round(preflight_seconds, 2),
                        round(compile_seconds, 1)))
        r = rows[-1]
        print(f"{model} {method} {name}: flash {r.flash_bundle:,} vs {r.flash_linked:,} "
              f"({Row.error(r.flash_bundle, r.flash_linked):+.1f}%), SRAM {r.sram_bundle:,} vs {r.sram_linked:,} "
              f"({Row.error(r.sram_bundle, r.sram_linked):+.1f}%)", flush=True)
    return rows


def _range(values: list[float]) -> str:
    return f"{min(values):+.1f}% .. {max(values):+.1f}%"


def table(rows: list[Row]) -> str:
    err = Row.error
    head = ("| model | method | target | flash preflight | flash bundle est. | flash linked | error (pre / bundle) "
            "| SRAM preflight | SRAM bundle est. | SRAM linked | error (pre / bundle) | arena est. / generated "
            "| preflight s | compile s |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in rows:
        if not r.flash_linked:
            lines.append(f"| {r.model} | {r.method} | {r.target} | {r.flash_preflight:,} | {r.flash_bundle:,} | - | - "
                         f"| {r.sram_preflight:,} | {r.sram_bundle:,} | refused before compiling | - "
                         f"| {r.arena_estimate:,} / - | {r.preflight_seconds} | {r.compile_seconds} |")
            continue
        flash_err = f"{err(r.flash_preflight, r.flash_linked):+.1f}% / {err(r.flash_bundle, r.flash_linked):+.1f}%"
        sram_err = f"{err(r.sram_preflight, r.sram_linked):+.1f}% / {err(r.sram_bundle, r.sram_linked):+.1f}%"
        lines.append(
            f"| {r.model} | {r.method} | {r.target} | {r.flash_preflight:,} | {r.flash_bundle:,} | {r.flash_linked:,} "
            f"| {flash_err} | {r.sram_preflight:,} | {r.sram_bundle:,} | {r.sram_linked:,} | {sram_err} "
            f"| {r.arena_estimate:,} / {r.arena_generated:,} | {r.preflight_seconds} | {r.compile_seconds} |")
    rows = [r for r in rows if r.flash_linked]
    lines += ["", f"bundle estimate: flash {_range([err(r.flash_bundle, r.flash_linked) for r in rows])}, "
                  f"SRAM {_range([err(r.sram_bundle, r.sram_linked) for r in rows])}; preflight (before fit): "
                  f"flash {_range([err(r.flash_preflight, r.flash_linked) for r in rows])}, "
                  f"SRAM {_range([err(r.sram_preflight, r.sram_linked) for r in rows])}"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "results" / "budget_estimate"))
    ap.add_argument("--workdir", default=None, help="keep the bundles and firmware here (default: a temp folder)")
    ap.add_argument("--corpus", default=",".join(CORPUS_DEFAULT),
                    help="comma-separated models of tests/corpus_models.py ('' for none)")
    ap.add_argument("--zoo", default="", help="comma-separated MODEL:METHOD zoo cases (default: every model "
                    "with every method; 'none' for none)")
    ap.add_argument("--quick", action="store_true",
                    help=f"tiny-cnn + feature-align and {', '.join(QUICK_CORPUS)} only")
    ap.add_argument("--reuse", action="store_true", help="reuse firmware projects already in --workdir")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    every = [(model, ckpt, method) for model, ckpt in CASES for method in METHODS]
    picked = args.zoo.split(",") if args.zoo and args.zoo != "none" else []
    zoo = [] if args.zoo == "none" else [c for c in every if f"{c[0]}:{c[2]}" in picked] if picked else (
        every[:1] if args.quick else every)
    corpus = list(QUICK_CORPUS) if args.quick else [m for m in args.corpus.split(",") if m]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        rows = [r for model, ckpt, method in zoo for r in measure(model, ckpt, method, work, args.reuse)]
        rows += [r for model in corpus for r in measure_corpus(model, work, args.reuse)]
    text = table(rows)
    print(text)
    argv = [a for a in sys.argv[1:] if a != args.workdir and a != "--workdir"]  # no machine paths in results
    (out / "budget_estimate.md").write_text(
        "Memory estimated before compiling vs the linked Cortex-M firmware "
        f"(`python benchmarks/budget_estimate.py {' '.join(argv)}`).\n\n" + text + "\n")
    (out / "budget_estimate.json").write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")


if __name__ == "__main__":
    main()
