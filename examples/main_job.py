"""The main job through the Python API: a pretrained model keeps learning on a simulated Cortex-M.

    python examples/main_job.py --out runs/demo                 # Fashion-MNIST, committed checkpoint
    python examples/main_job.py --data digits --train-epochs 15  # train on digits first
    python examples/main_job.py --no-exits --out runs/no-exits   # tinytta without its early exit (comparison)

1. load the committed mcunet-s checkpoint for the data (or train one on the clean source split);
2. fit tinytta's early-exit heads on labelled source data (before deployment; its early exit, a 4x4-grid head after
   the first stage, is fit on shifted copies of the source and then frozen);
3. export the bundle (int8 frozen backbone + trainable heads) and write the firmware project for
   cortex-m4: TVM's C kernels, the model's plan and weights, the C runtime, board support and a
   linker script sized to the target's 256 KB SRAM / 1 MB flash; build it with arm-none-eabi-gcc;
4. stream a corrupted test stream into the firmware under qemu-system-arm, one sample at a time,
   twice on the same samples: adapting, and with adaptation off;
5. print accuracy with and without adaptation, SRAM, flash and guest instructions per sample;
6. when the bundle declares early exits (tinytta's default; ``--no-exits`` sets its exit_threshold to 1: no exits,
   no probes), the share of samples that exited early and the instructions they saved, from the adapting run's
   per-sample records.
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

from edgetune.adapt import fit, prepare
from edgetune.checkpoint import load_checkpoint
from edgetune.data import load_dataset, record_source, source_info
from edgetune.deploy import build_project, save_initial_state, write_target_project
from edgetune.deploy.streams import EARLY_EXIT
from edgetune.export import export
from edgetune.simulate import run_program, simulate
from edgetune.targets import get_target
from edgetune.train import train_source

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="folder for the checkpoint, bundle and simulation files")
    parser.add_argument("--data", default="fashion-mnist", choices=["fashion-mnist", "digits"])
    parser.add_argument("--model", default="mcunet-s")
    parser.add_argument("--method", default="tinytta")
    parser.add_argument("--target", default="cortex-m4")
    parser.add_argument("--train-epochs", type=int, default=0,
                        help="train the backbone for this many epochs instead of loading checkpoints/<model>-<data>")
    parser.add_argument("--corruption", default="gaussian_noise", help="a name, a comma list or 'all'")
    parser.add_argument("--severity", type=int, default=5)
    parser.add_argument("--protocol", default="continual", choices=["episodic", "continual", "label-shift"])
    parser.add_argument("--n", type=int, default=500, help="samples streamed into the simulated device")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-exits", action="store_true",
                        help="tinytta without its early exit (exit_threshold=1: no sample exits, no probes; the same "
                             "heads), for comparison")
    args = parser.parse_args()
    torch.set_num_threads(2)
    out = Path(args.out)
    data = load_dataset(args.data)

    committed = ROOT / "checkpoints" / f"{args.model}-{args.data}"
    if args.train_epochs or not committed.is_dir():
        report = train_source(args.model, data, out / "checkpoint", epochs=args.train_epochs or 15, seed=args.seed)
        print(f"1. trained {args.model} on {args.data}: clean test accuracy {100 * report['test_accuracy']:.1f}%")
        backbone, _ = load_checkpoint(out / "checkpoint")
    else:
        backbone, config = load_checkpoint(committed)
        print(f"1. loaded checkpoints/{committed.name} ({config['model']} trained on clean {args.data})")

    # tinytta exits early by default (a frozen 4x4-grid head after stage 0); --no-exits is its threshold 1
    if args.no_exits and args.method != "tinytta":
        parser.error(f"--no-exits: only tinytta has early exits (got --method {args.method}); drop --no-exits")
    overrides = {"exit_threshold": "1"} if args.no_exits else {}
    adaptable = prepare(copy.deepcopy(backbone), args.method, overrides, model_name=args.model, seed=args.seed)
    fit(adaptable, data, seed=args.seed)
    print(f"2. fitted {args.method}'s attachments on labelled {args.data} source data")

    bundle = out / "bundle"
    manifest = export(adaptable, data, bundle, quantize=True, target=args.target)
    record_source(bundle, source_info(data, "labelled", "the checkpoint's training data"))
    save_initial_state(bundle, adaptable.method)  # also seals the bundle (every file's hash)
    project = write_target_project(bundle, args.target)
    built = build_project(project)
    print(f"3. exported {manifest.method} on {manifest.model} and built {built.program.relative_to(bundle)} for "
          f"{args.target}: flash {built.flash_bytes:,} B, static RAM {built.static_ram_bytes:,} B")

    print(f"4. streaming {args.n} samples ({args.corruption}, severity {args.severity}, {args.protocol}) through "
          f"the firmware in QEMU, with and without adaptation ...")
    report = simulate(bundle, args.data, args.corruption, args.severity, args.n, args.protocol, args.seed,
                      target=args.target, workdir=out / "simulation")
    print("5. result")
    print(report.table())
    if manifest.runtime.exits is not None:
        print("6. early exits")
        print(exit_savings(built, out / "simulation" / "stream.bin", out / "exits", args.target))


def exit_savings(built, stream: Path, work: Path, target: str) -> str:
    """The adapting run again (same firmware, same samples), read per sample: the share that exited early and the
    instructions saved against running every sample through every stage (the cost of the samples that did)."""
    records = run_program(built, stream, work, adapt=True).records
    instructions = records["step"].astype(float) * get_target(target).ticks_to_instructions(1)
    early = (records["flags"] & EARLY_EXIT) != 0
    if early.all() or not early.any():
        return f"  early exits {100 * early.mean():.1f} % of {len(early)} samples (no comparison: all or none exit)"
    full = instructions[~early].mean()
    return (f"  early exits {100 * early.mean():.1f} % of {len(early)} samples; {instructions.mean():,.0f} "
            f"instructions per sample against {full:,.0f} for a sample that runs every stage: "
            f"{100 * (1 - instructions.mean() / full):.1f} % saved")


if __name__ == "__main__":
    main()
