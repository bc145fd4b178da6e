"""The corpus table: every model of tests/corpus_models.py through edgetune's int8 path.

Per model: parameters, MACs (of the frozen graph), ONNX compute ops of the int8 graph and how many
of them are float islands (``edgetune.export.ops.float_islands``), the host compile's outcome
(compiled, or the one-line refusal) and time, and for compiled models a firmware project: flash and
SRAM from the project's budget (cortex-m4 when the model fits it, else cortex-m7) and the int8
backbone's instructions per MAC on cortex-m7 in ``qemu-system-arm -icount shift=0`` (SysTick ticks
of the frozen forward, as ``benchmarks/bench_mcu.py`` measures them). Not a test: the bit-exactness
is asserted by tests/test_corpus.py. Writes results/corpus/corpus.md and corpus.json.

    python benchmarks/corpus.py            # every corpus model
    python benchmarks/corpus.py --quick    # four small ones
    python benchmarks/corpus.py --models resnet8,ds-cnn --n 10
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from corpus_models import (CORPUS, build, export_and_compile, fit_linear_probe, graph_macs,  # noqa: E402
                           labelled_samples, parameters)

from edgetune.adapt import fit, prepare  # noqa: E402
from edgetune.data import to_tensor  # noqa: E402
from edgetune.deploy import build_project, save_initial_state, write_stream, write_target_project  # noqa: E402
from edgetune.deploy.host import HostModel  # noqa: E402
from edgetune.errors import BudgetError, EdgetuneError  # noqa: E402
from edgetune.export import export  # noqa: E402
from edgetune.export.ops import float_islands  # noqa: E402
from edgetune.simulate import run_program  # noqa: E402
from edgetune.targets import get_target  # noqa: E402

QUICK = ("keras-mnist", "strided-dilated", "resnet8", "ds-cnn")
OUT = ROOT / "results" / "corpus"
SKIP_OPS = ("QuantizeLinear", "DequantizeLinear", "Constant", "Identity")


def graph_ops(path: Path) -> tuple[int, int, list[str]]:
    """(compute ops, float-island ops, island descriptions) of an int8 QDQ graph."""
    model = onnx.load(str(path))
    ops = sum(1 for n in model.graph.node if n.op_type not in SKIP_OPS)
    islands = float_islands(model)
    return ops, len(islands), [f"{i.op} {i.node}" for i in islands]


def firmware(backbone, name: str, work: Path, n: int) -> dict:
    """The firmware columns: budget on cortex-m4 (when it fits) or cortex-m7, cortex-m7's instructions
    per sample of the int8 backbone over ``n`` samples in QEMU, and how many of the firmware's
    predictions equal the host build's (a least-squares classifier on labelled structured samples)."""
    data = labelled_samples(backbone, max(512, 5 * n))
    fit_linear_probe(backbone, data)
    adaptable = prepare(copy.deepcopy(backbone), "source", model_name=name)
    fit(adaptable, data, progress=False)
    bundle = work / "bundle"
    try:
        export(adaptable, data, bundle, progress=False)
    except EdgetuneError as exc:
        return {"firmware": f"no bundle: {str(exc).splitlines()[0]}"}
    save_initial_state(bundle, adaptable.method)
    row: dict = {}
    projects = {}
    for target in ("cortex-m4", "cortex-m7"):
        try:
            projects[target] = write_target_project(bundle, target)
        except BudgetError as exc:
            row[f"{target}_refused"] = str(exc).splitlines()[0]
        except EdgetuneError as exc:
            return {"firmware": f"{target}: {str(exc).splitlines()[0]}"}
    fits = "cortex-m4" if "cortex-m4" in projects else "cortex-m7" if "cortex-m7" in projects else None
    if fits is not None:
        rows = projects[fits].budget_rows
        row.update(budget_target=fits, flash_bytes=sum(f for _, f, _ in rows), sram_bytes=sum(s for _, _, s in rows))
    if "cortex-m7" in projects:
        try:
            row.update(_run_m7(projects["cortex-m7"], bundle, data, work, n))
        except EdgetuneError as exc:  # a failed build or run is a result of the corpus, recorded as such
            row["firmware"] = f"cortex-m7: {str(exc).splitlines()[0]}"
    return row


def _run_m7(project, bundle: Path, data, work: Path, n: int) -> dict:
    """Build the cortex-m7 firmware, run ``n`` test samples in QEMU and on the host build of the same C."""
    built = build_project(project)
    x = to_tensor(data.test_x[:n]).numpy()
    stream = write_stream(work / "stream.bin", x)
    run = run_program(built, stream, work / "sim", adapt=False)
    host = HostModel(bundle, work / "host", adapt=False)
    expected = [host.step(x[i]).prediction for i in range(len(x))]
    agree = sum(a == b for a, b in zip(run.records["prediction"].tolist(), expected))
    frozen = get_target("cortex-m7").ticks_to_instructions(run.summary["ticks"]["frozen"]) / run.summary["accepted"]
    return {"m7_equals_host": f"{agree}/{len(x)}", "m7_linked_flash_bytes": built.flash_bytes,
            "m7_static_ram_bytes": built.static_ram_bytes, "m7_frozen_instructions_per_sample": frozen,
            "m7_macs": project.macs}


def measure(name: str, work: Path, n: int, mcu: bool) -> dict:
    backbone = build(name)
    outcome = export_and_compile(name, work)
    row: dict = {"model": name, "input_shape": list(backbone.input_shape), "params": parameters(backbone),
                 "status": outcome.status, "reason": outcome.refusal, "compile_seconds": round(outcome.seconds, 2)}
    if outcome.directory is not None and (outcome.directory / "frozen_float.onnx").exists():
        row["macs"] = graph_macs(outcome.directory / "frozen_float.onnx")
    if outcome.onnx is not None:
        row["ops"], row["island_ops"], row["islands"] = graph_ops(outcome.onnx)
    if outcome.compiled is not None and mcu:
        row.update(firmware(backbone, name, work / "firmware", n))
        if row.get("m7_frozen_instructions_per_sample") and row.get("macs"):
            row["m7_instructions_per_mac"] = row["m7_frozen_instructions_per_sample"] / row["macs"]
    return row


def _n(v, fmt: str = ",.0f") -> str:
    return "-" if v is None else format(v, fmt)


def _by_op(islands: list[str]) -> str:
    counts = Counter(i.split(" ", 1)[0] for i in islands)
    return ", ".join(f"{op} x{k}" if k > 1 else op for op, k in counts.items())


def render(rows: list[dict], n: int) -> str:
    lines = ["# The model corpus through edgetune's int8 path", "",
             "Models of `tests/corpus_models.py` (seeded random weights), exported to int8 QDQ ONNX as "
             "`edgetune export` writes frozen.onnx and compiled for the host; tests/test_corpus.py asserts the "
             "compiled taps equal onnxruntime's int8 session bit for bit (or a one-line refusal). ops = ONNX "
             "compute nodes of the int8 graph (without Quantize/DequantizeLinear), islands = those computed in "
             "float. Flash / SRAM: the firmware project's budget (method `source`) on cortex-m4 when the model "
             f"fits it, else cortex-m7. instr./MAC: cortex-m7 in QEMU, the int8 backbone's instructions per "
             f"sample ({n} samples) / MACs; M7 = host: the firmware's predictions equal to the host build's of the "
             "same generated C (a least-squares classifier on labelled structured samples). Compile: host compile "
             "seconds (`compile_frozen`).", "",
             "| model | input | params | MACs | ops | islands | flash B | SRAM B | budget on | instr./MAC (M7) | "
             "M7 = host | compile s | status |", "|" + "---|" * 13]
    for r in rows:
        status = r["status"] if not r["reason"] else f"{r['status']}: {r['reason']}"
        if r.get("firmware"):
            status += f" (firmware: {r['firmware']})"
        lines.append(f"| {r['model']} | {'x'.join(map(str, r['input_shape']))} | {r['params']:,} | "
                     f"{_n(r.get('macs'))} | {_n(r.get('ops'), 'd')} | {_n(r.get('island_ops'), 'd')} | "
                     f"{_n(r.get('flash_bytes'))} | {_n(r.get('sram_bytes'))} | {r.get('budget_target', '-')} | "
                     f"{_n(r.get('m7_instructions_per_mac'), '.2f')} | {r.get('m7_equals_host', '-')} | "
                     f"{r['compile_seconds']:.1f} | "
                     f"{status.replace('|', '/')} |")
    islands = [f"- {r['model']}: {_by_op(r['islands'])}" for r in rows if r.get("islands")]
    if islands:
        lines += ["", "Float islands by op (node names in corpus.json):", *islands]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    parser.add_argument("--models", default="", help="comma-separated corpus names (default: all)")
    parser.add_argument("--n", type=int, default=50, help="samples per QEMU run (instructions per MAC, agreement)")
    parser.add_argument("--no-mcu", action="store_true", help="host compile only (no firmware, no QEMU)")
    parser.add_argument("--update", action="store_true",
                        help="merge these models' rows into the existing corpus.json instead of replacing it")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    names = args.models.split(",") if args.models else list(QUICK if args.quick else CORPUS)
    unknown = [m for m in names if m not in CORPUS]
    if unknown:
        parser.error(f"unknown corpus models {unknown}; known: {', '.join(CORPUS)}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgetune-corpus-") as tmp:
        for name in names:
            start = time.perf_counter()
            row = measure(name, Path(tmp) / name, args.n, not args.no_mcu)
            # messages may quote generated files: keep this machine's temporary paths out of the results
            rows.append(json.loads(json.dumps(row).replace(tmp, "<work>")))
            print(f"{name}: {rows[-1]['status']} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    previous = args.out / "corpus.json"
    if args.update and previous.exists():
        fresh = {r["model"]: r for r in rows}
        kept = {r["model"]: r for r in json.loads(previous.read_text())}
        rows = [fresh.get(m, kept.get(m)) for m in CORPUS if m in fresh or m in kept]
    args.out.mkdir(parents=True, exist_ok=True)
    table = render(rows, args.n)
    (args.out / "corpus.md").write_text(table)
    (args.out / "corpus.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(table)


if __name__ == "__main__":
    main()
