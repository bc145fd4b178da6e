"""Device check of an exit_variants.py grid variant: export -> onnxruntime taps -> compiled host C -> Cortex-M QEMU.

    python benchmarks/exit_device_check.py --variant TinyTTA4x4First \
        --heads WORKDIR/heads-0.5-4x4-first-True-5000-30-0.pt \
        --thresholds 0.85,0.8,0.95 --target cortex-m4 --samples 60 --workdir WORKDIR
    python benchmarks/exit_device_check.py --baseline --target cortex-m4 --samples 60

The heads are a fit cached by ``exit_variants.py`` (its ``--workdir``), and the per-exit thresholds go into the
exported graph as constants. ``--samples`` samples are spread evenly over the 15 test corruptions of the continual
stream. The check prints whether the host build takes torch's predictions and exits and whether the firmware takes
the host's, then the guest instructions per exit taken. ``--baseline`` runs tinytta as fit today without exits
(its no-exit plan) on the same samples and the same tree: the denominator for these kernels.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import exit_variants as ev
import exits as bench
from edgetune.adapt import fit, prepare
from edgetune.checkpoint import load_checkpoint
from edgetune.methods.tinytta import POOLED_NO_EXITS
from edgetune.data import TEST_CORRUPTIONS, build_stream, load_dataset, to_tensor
from edgetune.deploy import build_project, save_initial_state, write_target_project
from edgetune.deploy.host import HostModel
from edgetune.deploy.streams import EARLY_EXIT, write_stream
from edgetune.export import export
from edgetune.ort_runtime import OrtTaps
from edgetune.simulate import run_program


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="TinyTTA4x4First", help="a grid class of exit_variants.py")
    parser.add_argument("--heads", help="the variant's fitted heads (a state dict cached by exit_variants.py)")
    parser.add_argument("--thresholds", default="0.85,0.8,0.95", help="per-exit thresholds of the early exits")
    parser.add_argument("--target", default="cortex-m4")
    parser.add_argument("--samples", type=int, default=60)
    parser.add_argument("--baseline", action="store_true", help="tinytta's no-exit plan instead of a variant")
    parser.add_argument("--workdir", default=None, help="exit_variants.py's cache (stream taps, calibration)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cache = Path(args.workdir) if args.workdir else Path(tempfile.gettempdir()) / "edgetune-exit-variants"
    work = Path(tempfile.mkdtemp(prefix="edgetune-exit-check-"))
    data = load_dataset("fashion-mnist")
    backbone, _ = load_checkpoint(ev.ROOT / "checkpoints" / "mcunet-s-fashion-mnist")
    segments = build_stream(data, TEST_CORRUPTIONS, 5, "continual", 0, 300, split="test")
    x = np.concatenate([to_tensor(s.images).numpy() for s in segments])
    x = x[np.linspace(0, len(x) - 1, args.samples).astype(int)]
    start = time.time()
    if args.baseline:
        adaptable = prepare(copy.deepcopy(backbone), "tinytta", POOLED_NO_EXITS, model_name="mcunet-s", seed=0)
        fit(adaptable, data, seed=0, progress=False)
        method = adaptable.method
    else:
        adaptable, _ = ev.rich_setup(getattr(ev, args.variant), backbone, data, cache, 300, (), TEST_CORRUPTIONS, 0)
        method = adaptable.method
        method.load_state_dict(torch.load(args.heads, weights_only=True))
        method.config = dataclasses.replace(method.config, exit_threshold=0.99)  # declares exits; the gate decides
        bar = torch.tensor([*(float(t) for t in args.thresholds.split(",")), 2.0])
        method.gate = lambda prefix: (prefix.amax(-1) > bar).float()
        method._initial = None
        method.reset()
    bundle = work / "bundle"
    export(adaptable, data, bundle, quantize=True, target=args.target, progress=False)
    save_initial_state(bundle, method)
    built = build_project(write_target_project(bundle, args.target))
    records = run_program(built, write_stream(work / "stream.bin", x, None, None, built.project.classes),
                          work / "run", adapt=True).records
    cost = bench.instructions(records)
    if args.baseline:
        print(f"tinytta no-exit plan on {args.target}: {cost.mean():,.0f} instructions per sample "
              f"({cost.min():,.0f} .. {cost.max():,.0f}), {time.time() - start:.0f} s")
        return
    m = copy.deepcopy(method)
    m._initial = None
    m.reset()
    taps_of = OrtTaps(bundle)
    preds, exits = [], []
    for i in range(len(x)):
        preds.append(int(m.step(taps_of(torch.from_numpy(x[i:i + 1]))).argmax()))
        exits.append(m.last_exit)
    host = HostModel(bundle, workdir=work / "host")
    steps = [host.step(x[i]) for i in range(len(x))]
    early = np.array(exits) < m.depth - 1
    print(f"torch exits per exit: {np.bincount(exits, minlength=m.depth).tolist()}")
    print(f"host = torch: predictions {np.mean([s.prediction for s in steps] == np.array(preds)):.3f}, exits "
          f"{np.mean(np.array([s.early_exit for s in steps]) == early):.3f}")
    flagged = (records["flags"] & EARLY_EXIT) != 0
    print(f"firmware = host: predictions {np.mean(records['prediction'] == [s.prediction for s in steps]):.3f}, "
          f"exits {np.mean(flagged == np.array([s.early_exit for s in steps])):.3f}")
    for k in range(m.depth):
        taken = np.array(exits) == k
        if taken.any():
            print(f"exit {k}: {cost[taken].mean():,.0f} instructions ({taken.sum()} samples, "
                  f"{cost[taken].min():,.0f} .. {cost[taken].max():,.0f})")
    print(f"mean {cost.mean():,.0f} instructions per sample, {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
