"""Deployed cost per target and method: instructions per sample (inference vs adaptation),
instructions per MAC of the int8 backbone, SRAM and flash; the SRAM adaptation adds over the same
firmware built inference-only; and tent's budget on a microcontroller (it back-propagates through
the whole backbone, so it cannot be exported: its memory is the analytic one of edgetune.memory).

Every figure comes from a simulated run (``edgetune.simulate``): Cortex-M in qemu-system-arm
(-icount shift=0, SysTick), ARM Linux under qemu-aarch64-static (instructions counted block by
block on a short run). Not a test. Results merge into ``results/mcu.json`` across invocations (so
the matrix can be run in pieces) and are rendered to ``results/mcu.md``.

    python benchmarks/bench_mcu.py --methods tinytta --targets cortex-m4,rpi4 --n 100
    python benchmarks/bench_mcu.py --extras          # inference-only SRAM baseline + tent's budget
    python benchmarks/bench_mcu.py --methods tinytta --targets cortex-m4 --set exit_threshold=0.5 --out results/x
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from edgetune.adapt import fit, prepare
from edgetune.checkpoint import load_checkpoint
from edgetune.data import load_dataset
from edgetune.data.corruptions import cache_dir
from edgetune.deploy import TargetProject, analytic_budget, save_initial_state, write_stream, write_target_project
from edgetune.errors import BudgetError
from edgetune.export import export
from edgetune.memory import memory_table
from edgetune.simulate import simulate, stream_samples
from edgetune.targets import get_target
from edgetune.train import train_source

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("feature-align", "tinytta", "lst", "vqt")
TARGETS = ("cortex-m4", "cortex-m7", "cortex-m55", "rpi4", "android-arm64")


def checkpoint(path: Path, model: str, data) -> torch.nn.Module:
    if not (path / "config.json").is_file():
        train_source(model, data, path, epochs=15, progress=False)
    return load_checkpoint(path)[0]


def bundle_for(backbone, model: str, method: str, data, out: Path, overrides: dict[str, str] | None = None) -> Path:
    adaptable = prepare(copy.deepcopy(backbone), method, overrides, model_name=model)
    fit(adaptable, data, progress=False)
    export(adaptable, data, out, progress=False)
    save_initial_state(out, adaptable.method)
    return out


def native_peak_rss(project: TargetProject, n: int, work: Path) -> int:
    """Peak resident set (bytes) of ``edgetune-run`` over an ``n``-sample stream, for a Linux
    project built natively for this machine from the same sources (``KERNELS=c``: the C of the
    target plan's kernels, the host's gcc and libc). qemu-aarch64-static cannot report the guest's
    memory: its own RSS includes the translator, so the native build is the measurable stand-in for
    the device program."""
    native = work / "native"
    if native.exists():
        shutil.rmtree(native)
    shutil.copytree(project.directory, native, ignore=shutil.ignore_patterns("build", "sim"))
    subprocess.run(["make", "-j2", "KERNELS=c", "CC=gcc", "AR=ar", "ARCH=", "build/edgetune-run"], cwd=native,
                   check=True, capture_output=True)
    x, _, resets, feedback = stream_samples("digits", ("gaussian_noise",), 5, "episodic", n)
    stream = write_stream(native / "stream.bin", x, resets, feedback, project.classes)
    # GNU time forks the program itself: a child forked straight from this (large) Python process
    # would inherit its high-water mark into ru_maxrss across exec
    proc = subprocess.run(["/usr/bin/time", "-f", "peak-rss-kb %M", str(native / "build" / "edgetune-run"),
                           str(stream), "--state=state.bin"], cwd=native, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"native edgetune-run failed ({proc.stderr.strip()[-300:]})")
    return 1024 * int(proc.stderr.strip().splitlines()[-1].split()[-1])


def measure(bundle: Path, target: str, n: int, inference_only: bool = False) -> dict:
    """One simulated deployment, or the budget refusal."""
    try:
        project = write_target_project(bundle, target, inference_only=inference_only,
                                       out_dir=bundle / (target + ("-inference" if inference_only else "")))
    except BudgetError as exc:
        return {"refused": str(exc)}
    report = simulate(project.directory, n=n, workdir=project.directory / "sim")
    row = report.to_json()
    row["memory"] = project.memory
    if get_target(target).kind == "linux":
        row["peak_rss_bytes"] = native_peak_rss(project, n, project.directory)
        row["bundle_bytes"] = sum(f.stat().st_size for f in (project.directory / "build").glob("*") if f.is_file())
    return row


def tent_budget(backbone_gn, data, target: str) -> dict:
    adaptable = prepare(copy.deepcopy(backbone_gn), "tent", model_name="mcunet-s-gn")
    table = memory_table(adaptable)
    budget = analytic_budget(get_target(target), table)
    return {"memory": table, "flash_bytes": budget.flash, "sram_bytes": budget.sram,
            "fits": not budget.problems(), "table": budget.table()}


def _n(v, digits: int = 0) -> str:
    if v is None:
        return "-"
    return f"{v:,.{digits}f}"


def render(results: dict) -> str:
    lines = ["# Deployed cost per target and method (mcunet-s, digits, gaussian_noise severity 5)", "",
             "Simulated: Cortex-M in `qemu-system-arm -icount shift=0` (SysTick ticks = guest instructions), "
             "ARM Linux under `qemu-aarch64-static` (guest instructions counted per translated block on a 4-sample "
             "run). SRAM = .data + .bss + the stack's painted high-water mark (the newlib stdio heap used by the "
             "semihosting harness is not counted); flash = code + constants. Linux: flash = size of `edgetune-run` "
             "(the frozen graph lowered and scheduled for the target CPU, e.g. dot-product convs on android-arm64, "
             "kernels from TVM's LLVM backend), bundle = `edgetune-run` + `libedgetune.so` + "
             "`libedgetune.a`, peak RSS = `edgetune-run` built natively from the same sources (QEMU user mode "
             "cannot report the guest's memory).",
             "", "| method | target | online acc. | source acc. | instr./sample | inference | adaptation | "
             "adapt. / inference | instr./MAC | SRAM B | flash B | bundle B | peak RSS B |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(results.get("runs", {})):
        r = results["runs"][key]
        method, target = key.split("|")
        if "refused" in r:
            lines.append(f"| {method} | {target} | refused by the budget check: "
                         f"{r['refused'].splitlines()[0].split('(')[1].split(')')[0]} | | | | | | | | | | |")
            continue
        ratio = (r["adaptation_instructions_per_sample"] / r["inference_instructions_per_sample"]
                 if r["inference_instructions_per_sample"] and r["adaptation_instructions_per_sample"] is not None
                 else None)  # None with early exits: the source run takes other paths
        lines.append(f"| {method} | {target} | {100 * r['online_accuracy']:.1f} | {100 * r['source_accuracy']:.1f} | "
                     f"{_n(r['instructions_per_sample'])} | {_n(r['inference_instructions_per_sample'])} | "
                     f"{_n(r['adaptation_instructions_per_sample'])} | "
                     f"{'-' if ratio is None else f'{100 * ratio:.1f} %'} | {_n(r['instructions_per_mac'], 2)} | "
                     f"{_n(r['sram_bytes'])} | {_n(r['flash_bytes'])} | {_n(r.get('bundle_bytes'))} | "
                     f"{_n(r.get('peak_rss_bytes'))} |")
    extras = results.get("extras", {})
    if "inference_only" in extras:
        e = extras["inference_only"]
        lines += ["", "## What adaptation costs in SRAM (mcunet-s + tinytta, cortex-m4)", "",
                  f"Same firmware built inference-only (no training step, parameters in flash): SRAM "
                  f"{_n(e['inference_only_sram'])} B; with adaptation {_n(e['adaptive_sram'])} B: "
                  f"{100 * (e['adaptive_sram'] / e['inference_only_sram'] - 1):+.0f} % (goal: <= +30 %).", "",
                  "| part | inference-only B | adaptive B |", "|---|---|---|"]
        for k in e["adaptive_memory"]:
            lines.append(f"| {k} | {_n(e['inference_only_memory'].get(k))} | {_n(e['adaptive_memory'][k])} |")
    if "overhead" in extras:
        lines += ["", "## SRAM with adaptation vs the same firmware built inference-only, per method", "",
                  "| method | target | inference-only B | with adaptation B | overhead |", "|---|---|---|---|---|"]
        for method, o in sorted(extras["overhead"].items()):
            lines.append(f"| {method} | {o['target']} | {_n(o['inference_only_sram'])} | {_n(o['adaptive_sram'])} | "
                         f"{100 * (o['adaptive_sram'] / o['inference_only_sram'] - 1):+.0f} % |")
    if "tent" in extras:
        t = extras["tent"]
        lines += ["", "## tent (full back-propagation, mcunet-s-gn) on cortex-m4", "",
                  f"{'fits' if t['fits'] else 'refused by the budget check'}: SRAM {_n(t['sram_bytes'])} B, "
                  f"flash {_n(t['flash_bytes'])} B (analytic, edgetune.memory; tent cannot be exported).", "", "```",
                  t["table"], "```"]
    lines += ["", "![instructions per sample and SRAM](mcu.png)", "",
              f"Generated by `python benchmarks/bench_mcu.py` ({results.get('when', '')})."]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """Two panels: instructions per sample (inference + adaptation) per method and target, and the
    SRAM of each method's firmware with and without adaptation."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {k: r for k, r in results.get("runs", {}).items() if "refused" not in r}
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    keys = sorted(runs, key=lambda k: (k.split("|")[1], k.split("|")[0]))
    labels = [k.replace("|", "\n") for k in keys]
    # with early exits the adaptation share is not defined (see edgetune.simulate): the whole bar is the adapted run
    adaptation = [(runs[k]["adaptation_instructions_per_sample"] or 0) / 1e6 for k in keys]
    inference = [runs[k]["instructions_per_sample"] / 1e6 - a for k, a in zip(keys, adaptation)]
    x = list(range(len(keys)))
    left.bar(x, inference, label="inference")
    left.bar(x, adaptation, bottom=inference, label="adaptation")
    left.set_xticks(x, labels, rotation=90, fontsize=7)
    left.set_ylabel("guest instructions per sample (millions)")
    left.set_title("cost per sample (mcunet-s, int8)")
    left.legend()
    overhead = results.get("extras", {}).get("overhead", {})
    if overhead:
        methods = sorted(overhead)
        xs = list(range(len(methods)))
        right.bar([i - 0.2 for i in xs], [overhead[m]["inference_only_sram"] / 1024 for m in methods], 0.4,
                  label="inference-only")
        right.bar([i + 0.2 for i in xs], [overhead[m]["adaptive_sram"] / 1024 for m in methods], 0.4,
                  label="with adaptation")
        right.set_xticks(xs, [f"{m}\n{overhead[m]['target']}" for m in methods])
        right.axhline(256, color="grey", linestyle="--", linewidth=1)
        right.text(len(methods) - 0.5, 258, "cortex-m4 SRAM", ha="right", va="bottom", fontsize=8)
        right.set_ylabel("SRAM (KB)")
        right.set_title("what adaptation adds in SRAM")
        right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--targets", default=",".join(TARGETS))
    p.add_argument("--n", type=int, default=100, help="samples per simulated stream")
    p.add_argument("--extras", action="store_true", help="inference-only SRAM baseline and tent's budget only")
    p.add_argument("--work", default=None, help="checkpoints and bundles (default: the edgetune cache)")
    p.add_argument("--out", default="results")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every method in --methods (as `edgetune eval --set`; with --extras: "
                        "tinytta's, and only its inference-only comparison runs); repeatable")
    args = p.parse_args(argv)
    bad = [s for s in args.set if "=" not in s]
    if bad:
        p.error(f"--set takes KEY=VALUE (got {bad[0]!r}); e.g. --set exit_threshold=0.5")
    overrides = dict(s.split("=", 1) for s in args.set)
    # bundles with overrides get their own folder, so the cached default bundles stay what they were
    suffix = "".join(f"-{k}={v}" for k, v in sorted(overrides.items()))
    torch.set_num_threads(1)
    work, out = Path(args.work) if args.work else cache_dir() / "bench-mcu", Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "mcu.json"
    results = json.loads(store.read_text()) if store.is_file() else {}
    data = load_dataset("digits")
    backbone = checkpoint(ROOT / "checkpoints" / "mcunet-s-digits", "mcunet-s", data)
    if args.extras:
        bundle = bundle_for(backbone, "mcunet-s", "tinytta", data, work / f"bundle-tinytta{suffix}", overrides)
        adaptive = measure(bundle, "cortex-m4", args.n)
        baseline = measure(bundle, "cortex-m4", args.n, inference_only=True)
        results.setdefault("extras", {})["inference_only"] = {
            "adaptive_sram": adaptive["sram_bytes"], "inference_only_sram": baseline["sram_bytes"],
            "adaptive_memory": adaptive["memory"], "inference_only_memory": baseline["memory"],
            "overrides": overrides}
        # --set is tinytta's configuration here: the other methods' comparison and tent's budget are left out
        if not overrides:
            overhead = results["extras"].setdefault("overhead", {})
            for method, target in (("feature-align", "cortex-m4"), ("tinytta", "cortex-m4"), ("lst", "cortex-m4"),
                                   ("vqt", "cortex-m7")):
                b = bundle_for(backbone, "mcunet-s", method, data, work / f"bundle-{method}")
                adaptive, baseline = measure(b, target, args.n), measure(b, target, args.n, inference_only=True)
                overhead[method] = {"target": target, "adaptive_sram": adaptive["sram_bytes"],
                                    "inference_only_sram": baseline["sram_bytes"]}
            results["extras"]["tent"] = tent_budget(checkpoint(work / "mcunet-s-gn", "mcunet-s-gn", data), data,
                                                    "cortex-m4")
    else:
        for method in args.methods.split(","):
            bundle = bundle_for(backbone, "mcunet-s", method, data, work / f"bundle-{method}{suffix}", overrides)
            for target in args.targets.split(","):
                start = time.perf_counter()
                label = f"{method} ({','.join(f'{k}={v}' for k, v in sorted(overrides.items()))})" if overrides \
                    else method
                results.setdefault("runs", {})[f"{label}|{target}"] = measure(bundle, target, args.n)
                print(f"{method} on {target}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    results["when"] = time.strftime("%Y-%m-%d")
    store.write_text(json.dumps(results, indent=1) + "\n")
    text = render(results)
    (out / "mcu.md").write_text(text)
    plot(results, out / "mcu.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
