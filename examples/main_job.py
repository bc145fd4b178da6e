"""The main job through the Python API: train, fit tinytta, export an int8 bundle, adapt online.

    python examples/main_job.py --out runs/demo

1. train mcunet-s on scikit-learn's digits (clean source data);
2. fit tinytta's exit heads and measure source feature statistics;
3. export the bundle: frozen int8 backbone (QDQ ONNX) + trainable attachments + manifest;
4. stream the 15 corruptions at severity 5 through the int8 backbone (onnxruntime) at batch 1,
   predicting then adapting on every sample, next to the no-adaptation source floor;
5. print accuracy before/after adaptation and the memory table of one adaptation step.
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

from edgetune.adapt import fit, prepare
from edgetune.checkpoint import load_checkpoint
from edgetune.data import TEST_CORRUPTIONS, build_stream, load_dataset
from edgetune.evaluate import EvalReport, run_stream
from edgetune.export import export
from edgetune.memory import format_memory_table, memory_table
from edgetune.ort_runtime import ort_tap_function
from edgetune.train import train_source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="folder for the checkpoint and the bundle")
    parser.add_argument("--model", default="mcunet-s")
    parser.add_argument("--method", default="tinytta")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    out = Path(args.out)
    data = load_dataset("digits")

    report = train_source(args.model, data, out / "checkpoint", epochs=args.epochs, seed=args.seed)
    print(f"1. {args.model} trained on digits: clean test accuracy {100 * report['test_accuracy']:.1f}%")
    backbone, _ = load_checkpoint(out / "checkpoint")

    stream = build_stream(data, TEST_CORRUPTIONS, severity=5, protocol="episodic", seed=args.seed)
    results = {}
    for name in (args.method, "source"):
        adaptable = prepare(copy.deepcopy(backbone), name, model_name=args.model, seed=args.seed)
        fit(adaptable, data, seed=args.seed)
        bundle = out / f"bundle-{name}"
        manifest = export(adaptable, data, bundle, quantize=True)
        if name == args.method:
            print(f"2-3. fitted and exported {manifest.method} to {bundle} (frozen int8 + trainable ONNX + manifest)")
            memory = memory_table(adaptable)
        results[name] = run_stream(adaptable, stream, ort_tap_function(bundle), seed=args.seed)

    table = EvalReport(args.model, "digits", 5, "episodic", args.seed, "onnxruntime int8", results[args.method],
                       results["source"], memory)
    print("4. online accuracy at batch 1 (predict, then adapt on the same sample):")
    print(table.table())
    print("5. memory of one adaptation step at batch 1:")
    print(format_memory_table(memory))


if __name__ == "__main__":
    main()
