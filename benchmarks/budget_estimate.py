"""How close is the memory estimate made before compiling to the firmware that gets linked?

For each model and method the budget is estimated twice without TVM: by ``preflight_budget``
(from the torch model, before the method is fitted: what ``edgetune export`` refuses with) and
by ``estimate_bundle`` (from the exported bundle's graphs: what ``write_target_project`` checks
before compiling). Then the bundle is compiled, written for each Cortex-M target and linked with
``arm-none-eabi-gcc``; the table puts both estimates next to the linked firmware (flash: the
sections ``arm-none-eabi-size`` puts in flash; SRAM: .data + .bss + the reserved stack and heap)
and next to the generated model's own figures (``ModelMemory``: constants, arena).

    python benchmarks/budget_estimate.py [--out results/budget_estimate] [--workdir DIR]

``--workdir`` keeps the exported bundles; a bundle already there is reused (no second fit).

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

from edgetune.adapt import fit, prepare
from edgetune.checkpoint import load_checkpoint
from edgetune.data import load_dataset
from edgetune.deploy.budget import preflight_budget
from edgetune.deploy.build import build_project
from edgetune.deploy.estimate import estimate_bundle
from edgetune.deploy.project import save_initial_state, write_target_project
from edgetune.errors import BudgetError
from edgetune.export import export
from edgetune.targets import get_target

ROOT = Path(__file__).resolve().parents[1]
CASES = (("tiny-cnn", "checkpoints/tiny-cnn-fashion-mnist"), ("mcunet-s", "checkpoints/mcunet-s-digits"))
METHODS = ("feature-align", "tinytta", "lst")
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


def measure(model: str, checkpoint: str, method: str, work: Path) -> list[Row]:
    backbone, config = load_checkpoint(ROOT / checkpoint)
    data = load_dataset(config["data"])
    adaptable = prepare(backbone, method, model_name=model)
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
        try:
            project = write_target_project(bundle, target)
        except BudgetError as exc:  # refused from the estimate, before compiling: nothing linked to compare
            print(f"{model} {method} {name}: refused ({str(exc).splitlines()[0][:160]})", flush=True)
            rows.append(Row(model, method, name, p.flash if p else 0, estimate.flash, 0, p.sram if p else 0,
                            estimate.sram, 0, next(r.sram for r in estimate.rows if r.what == ARENA_ROW), 0,
                            estimate.rows[0].flash, 0, round(preflight_seconds, 2), round(time.perf_counter() - t0, 1)))
            continue
        compile_seconds = time.perf_counter() - t0
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
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        rows = [r for model, ckpt in CASES for method in METHODS for r in measure(model, ckpt, method, work)]
    text = table(rows)
    print(text)
    (out / "budget_estimate.md").write_text(
        "Memory estimated before compiling vs the linked Cortex-M firmware "
        "(`python benchmarks/budget_estimate.py`).\n\n" + text + "\n")
    (out / "budget_estimate.json").write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")


if __name__ == "__main__":
    main()
