"""norm-align compiled: host runtime vs the integer reference, devices vs the host build, cost vs feature-align.

For one stream (gaussian_noise severity 5, episodic) of a backbone (mcunet-s on digits by default):

* the host C runtime (``HostModel``: TVM's C kernels + the C runtime) against the integer reference
  (``edgetune.int8ref.Int8NormAlign``, folds in float64): predictions per sample;
* each device target in its simulator (``edgetune.simulate``: cortex-m4 in qemu-system-arm, rpi4 under
  qemu-aarch64-static) against the host build: predictions per sample and the final state;
* SRAM, flash and instructions per sample on each target, next to feature-align's firmware on the
  same stream, with the model's memory split (state, taps, arena) from the generated code.

Not a test. Writes ``results/norm_align_compiled/{results.json,README.md,cost.png}``.

    python benchmarks/norm_align_compiled.py --n 300 --targets cortex-m4,rpi4
    python benchmarks/norm_align_compiled.py --n 300 --targets cortex-m4 --set first_stage=3 --tag stage3
    python benchmarks/norm_align_compiled.py --quick          # 40 samples, cortex-m4 only
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from edgetune.adapt import fit, prepare
from edgetune.checkpoint import load_checkpoint
from edgetune.data import load_dataset, to_tensor
from edgetune.data.corruptions import cache_dir
from edgetune.deploy import save_initial_state, write_target_project
from edgetune.deploy.host import HostModel
from edgetune.errors import EdgetuneError
from edgetune.export import export
from edgetune.export.norm_align import CALIBRATION_IMAGES
from edgetune.int8ref.norm_align_int8 import Int8NormAlign
from edgetune.int8ref.qdq_model import QDQModel
from edgetune.simulate import simulate, stream_samples

ROOT = Path(__file__).resolve().parent.parent
CORRUPTION, SEVERITY = "gaussian_noise", 5


def bundle_for(backbone, data, method: str, overrides: dict[str, str], out: Path):
    adaptable = prepare(copy.deepcopy(backbone), method, overrides, model_name="mcunet-s")
    fit(adaptable, data, progress=False)
    export(adaptable, data, out, progress=False)
    save_initial_state(out, adaptable.method)
    return adaptable


def host_run(bundle: Path, x: np.ndarray, work: Path) -> tuple[list[int], dict[str, np.ndarray], int]:
    """Predictions, final state and collapse-guard restores of the host C runtime (the bundle's guard restores
    source: its runtime links the generated restore, no hand wiring)."""
    host = HostModel(bundle, workdir=work)
    host.reset()
    predictions = [host.step(x[i]).prediction for i in range(len(x))]
    return predictions, host.state(), host.counters()["restores"]


def device_run(bundle: Path, target: str, data: str, n: int) -> dict:
    project = write_target_project(bundle, target, out_dir=bundle / target)
    report = simulate(project.directory, data=data, corruption=CORRUPTION, severity=SEVERITY, n=n,
                      workdir=project.directory / "sim")
    row = report.to_json()
    row["memory"] = project.memory
    row["predictions_list"] = report.predictions
    row["final_state_arrays"] = report.final_state
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="digits", help="digits or fashion-mnist (checkpoints/mcunet-s-<data>)")
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--targets", default="cortex-m4,rpi4")
    p.add_argument("--set", action="append", default=[], help="norm-align config key=value")
    p.add_argument("--tag", default="default", help="name of this configuration in the results")
    p.add_argument("--quick", action="store_true", help="40 samples, cortex-m4 only")
    p.add_argument("--no-baseline", action="store_true", help="skip feature-align's firmware")
    p.add_argument("--out", default="results/norm_align_compiled")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.targets = 40, "cortex-m4"
    torch.set_num_threads(1)
    overrides = dict(kv.split("=", 1) for kv in args.set)
    out, work = Path(args.out), cache_dir() / "bench-norm-align-compiled" / f"{args.data}-{args.tag}"
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    store = out / "results.json"
    results = json.loads(store.read_text()) if store.is_file() else {}
    data = load_dataset(args.data)
    backbone = load_checkpoint(ROOT / "checkpoints" / f"mcunet-s-{args.data}")[0]
    shape = tuple(backbone.input_shape)
    x, labels, _, _ = stream_samples(args.data, (CORRUPTION,), SEVERITY, "episodic", args.n, 0, 0.0, shape)

    t0 = time.perf_counter()
    adaptable = bundle_for(backbone, data, "norm-align", overrides, work / "bundle")
    host_pred, host_state, host_restores = host_run(work / "bundle", x, work / "host")
    ref = Int8NormAlign(copy.deepcopy(adaptable.method), QDQModel(work / "bundle" / "frozen.onnx"))
    ref.calibrate(data.train_x[:CALIBRATION_IMAGES])
    xt = to_tensor(x)
    ref_pred = [int(ref.step(xt[i:i + 1]).argmax()) for i in range(len(x))]
    row: dict = {"data": args.data, "n": args.n, "config": overrides, "stream": f"{CORRUPTION} severity {SEVERITY}",
                 "host_accuracy": float(np.mean(np.asarray(host_pred) == labels)),
                 "reference_accuracy": float(np.mean(np.asarray(ref_pred) == labels)),
                 "host_equals_reference": sum(a == b for a, b in zip(host_pred, ref_pred)),
                 "restores": {"host": host_restores, "reference": ref.restores}, "targets": {}}
    print(f"host = reference on {row['host_equals_reference']}/{len(x)} ({time.perf_counter() - t0:.0f} s)",
          file=sys.stderr)
    for target in args.targets.split(","):
        t0 = time.perf_counter()
        try:
            dev = device_run(work / "bundle", target, args.data, args.n)
        except EdgetuneError as exc:  # a target that does not build is recorded, the others still run
            row["targets"][target] = {"error": str(exc)[:400]}
            print(f"{target}: {exc}", file=sys.stderr)
            continue
        pred, state = dev.pop("predictions_list"), dev.pop("final_state_arrays")
        dev["equals_host"] = sum(a == b for a, b in zip(pred, host_pred))
        # statistics and folds bit for bit; the class prior (a softmax: libm expf, the classifier's matmul) apart
        dev["state_equals_host"] = set(state) == set(host_state) and all(
            np.array_equal(np.asarray(state[k]).reshape(-1), v.reshape(-1)) for k, v in host_state.items()
            if k != "state_class_prior")
        if "state_class_prior" in host_state:
            prior = host_state["state_class_prior"].reshape(-1)
            dev["prior_max_rel_diff"] = float(np.abs(np.asarray(state["state_class_prior"]).reshape(-1) - prior).max()
                                              / prior.max())
        row["targets"][target] = dev
        print(f"{target}: = host on {dev['equals_host']}/{len(x)}, SRAM {dev.get('sram_bytes')}, "
              f"{dev.get('instructions_per_sample')} instr/sample ({time.perf_counter() - t0:.0f} s)",
              file=sys.stderr)
    results.setdefault("runs", {})[f"{args.data}|{args.tag}"] = row
    if not args.no_baseline and "cortex-m4" in args.targets.split(","):
        bundle_for(backbone, data, "feature-align", {}, work / "bundle-feature-align")
        base = device_run(work / "bundle-feature-align", "cortex-m4", args.data, args.n)
        base.pop("predictions_list"), base.pop("final_state_arrays")
        results.setdefault("feature-align", {})[args.data] = base
    results["when"] = time.strftime("%Y-%m-%d")
    store.write_text(json.dumps(results, indent=1, default=str) + "\n")
    text = render(results)
    (out / "README.md").write_text(text)
    plot(results, out / "cost.png")
    print(text)
    return 0


def _n(v) -> str:
    return "-" if v is None else f"{v:,.0f}"


def render(results: dict) -> str:
    lines = ["# norm-align compiled: fidelity and cost", "",
             "Stream: gaussian_noise severity 5, episodic, mcunet-s. host = the C runtime built for this machine "
             "(`HostModel`); reference = `edgetune.int8ref.Int8NormAlign` (folds in float64); devices in their "
             "simulators (`edgetune.simulate`). Made by `python benchmarks/norm_align_compiled.py` (options in "
             "each row's config).", "",
             "| data | config | n | host = reference | target | = host (predictions) | statistics and folds = host | "
             "online acc. | source acc. | SRAM B | flash B | instr./sample | frozen forward instr. | "
             "vs feature-align SRAM | vs feature-align instr. |", "|" + "---|" * 16]
    for key, row in sorted(results.get("runs", {}).items()):
        data, tag = key.split("|")
        base = results.get("feature-align", {}).get(data, {})
        for target, dev in row["targets"].items():
            if "error" in dev:
                lines.append(f"| {data} | {tag} | {row['n']} | {row['host_equals_reference']}/{row['n']} | {target} | "
                             f"failed to build: {dev['error'][:120]} |" + " |" * 11)
                continue
            sram, ins = dev.get("sram_bytes"), dev.get("instructions_per_sample")
            rs = f"{100 * (sram / base['sram_bytes'] - 1):+.1f} %" if sram and base.get("sram_bytes") and \
                target == "cortex-m4" else "-"
            ri = f"{100 * (ins / base['instructions_per_sample'] - 1):+.1f} %" if ins and \
                base.get("instructions_per_sample") and target == "cortex-m4" else "-"
            lines.append(f"| {data} | {tag} {row['config'] or ''} | {row['n']} | {row['host_equals_reference']}/"
                         f"{row['n']} | {target} | {dev['equals_host']}/{row['n']} | {dev['state_equals_host']} | "
                         f"{100 * dev['online_accuracy']:.1f} | {100 * dev['source_accuracy']:.1f} | {_n(sram)} | "
                         f"{_n(dev.get('flash_bytes'))} | {_n(ins)} | "
                         f"{_n(dev.get('frozen_instructions_per_sample'))} | {rs} | {ri} |")
    for data, base in sorted(results.get("feature-align", {}).items()):
        lines.append(f"| {data} | feature-align | {base['n']} | - | cortex-m4 | - | - | "
                     f"{100 * base['online_accuracy']:.1f} | {100 * base['source_accuracy']:.1f} | "
                     f"{_n(base.get('sram_bytes'))} | {_n(base.get('flash_bytes'))} | "
                     f"{_n(base.get('instructions_per_sample'))} | "
                     f"{_n(base.get('frozen_instructions_per_sample'))} | - | - |")
    lines += ["", "## Where norm-align's SRAM goes (cortex-m4, generated model, bytes)", "",
              "| data | config | state | taps | arena | workspace | feature-align state | feature-align taps | "
              "feature-align arena |", "|" + "---|" * 9]
    for key, row in sorted(results.get("runs", {}).items()):
        data, tag = key.split("|")
        m = row["targets"].get("cortex-m4", {}).get("memory")
        b = results.get("feature-align", {}).get(data, {}).get("memory", {})
        if m:
            lines.append(f"| {data} | {tag} | {_n(m['state'])} | {_n(m['taps'])} | {_n(m['arena'])} | "
                         f"{_n(m['workspace'])} | {_n(b.get('state'))} | {_n(b.get('taps'))} | {_n(b.get('arena'))} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, sram, ins = [], [], []
    for data, base in sorted(results.get("feature-align", {}).items()):
        names.append(f"feature-align\n{data}")
        sram.append(base.get("sram_bytes") or 0)
        ins.append(base.get("instructions_per_sample") or 0)
    for key, row in sorted(results.get("runs", {}).items()):
        dev = row["targets"].get("cortex-m4")
        if dev:
            names.append(f"norm-align {key.split('|')[1]}\n{key.split('|')[0]}")
            sram.append(dev.get("sram_bytes") or 0)
            ins.append(dev.get("instructions_per_sample") or 0)
    if not names:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, values, title in ((axes[0], [s / 1024 for s in sram], "SRAM (KB)"),
                              (axes[1], [i / 1e6 for i in ins], "instructions / sample (M)")):
        ax.bar(range(len(names)), values, color=["#888"] * len(results.get("feature-align", {})) + ["#3a7"] *
               (len(names) - len(results.get("feature-align", {}))))
        ax.set_xticks(range(len(names)), names, fontsize=7)
        ax.set_title(f"cortex-m4: {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
