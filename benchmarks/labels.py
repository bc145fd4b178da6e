"""On-device learning from labels, one sample at a time (predict, score, then learn from the revealed label).

Two studies, every method in the same run on the same stream in the same order:

* transfer to a new task: a backbone trained on one dataset, a stream of another one's training
  split (new classes; each method's class layers start at zero, ``edgetune.adapt.start_new_task``;
  side networks, queries and exit heads keep their fit on the source). Prequential accuracy over
  the stream (every label revealed after its prediction is scored) and accuracy on the target's
  held-out split after N labelled samples (the method only predicts there, nothing adapts).
  Default: Fashion-MNIST -> digits and digits -> Fashion-MNIST (first ``--transfer-stream``
  training images).
* personalisation under shift: Fashion-MNIST-C severity 5, labels revealed for 5 %, 20 % and
  100 % of the samples (one seeded draw per stream, the same for every method), episodic and
  continual; mean online accuracy.

Test-time learning rates are chosen on validation data only (``--tune``): for transfer, the
held-out accuracy after every label on the target's *validation* split (Fashion-MNIST -> digits);
for personalisation, continual online accuracy with 20 % labels on the 4 validation corruptions
of held-out training images. The choice is written to ``chosen.json`` and read by the reported
run. The lr is a test-time setting: it is applied after the (cached) fit, so every lr shares one fit.

Memory per method: the analytic table of one adaptation step (``edgetune.memory``, DESIGN
section 10); "training memory" is what must sit in RAM for a step (everything but the frozen
weights, which stay in flash). The frozen backbone runs in torch float32 here (the int8 chain
torch = onnxruntime = compiled = QEMU per sample is what ``tests/test_labels.py`` checks).

    python benchmarks/labels.py --tune          # choose each learner's lr on validation data
    python benchmarks/labels.py                 # the committed results (results/labels/)
    python benchmarks/labels.py --quick         # tiny-cnn, a few hundred samples (a smoke run)
    python benchmarks/labels.py --part transfer --methods lst,vqt --set lst:lr=3e-3
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from edgetune.adapt import fit, prepare, source_taps, start_new_task
from edgetune.checkpoint import load_checkpoint
from edgetune.data import VALIDATION_CORRUPTIONS, build_stream, load_dataset
from edgetune.evaluate import run_stream
from edgetune.memory import memory_table, training_bytes
from edgetune.methods.base import Learner, declare, supervised_or
from edgetune.methods.norm_align import NormAlign

TRANSFER_METHODS = ("full-finetune", "bias-only", "last-layer", "lst", "vqt", "tinytta")
PERSONAL_METHODS = ("source", "feature-align", "tinytta", "lst", "vqt", "last-layer", "bias-only", "full-finetune")
PERSONAL_CORRUPTIONS = ("gaussian_noise", "fog", "contrast", "pixelate")  # the quick measurement
FRACTIONS = (0.05, 0.2, 1.0)
LRS = (3e-4, 1e-3, 3e-3, 1e-2)  # the --tune grid of every learner's test-time lr


# Learner settings (not method settings): how the revealed labels are learnt from, the method's ``Learner``
# (edgetune.methods.base), which every runtime runs the same way (targets/runtime/et_replay.h).
#   optim=adam   Adam with bias correction (Kingma & Ba 2015) in place of the method's SGD with momentum;
#                on a device it keeps two float32 moments per trainable parameter (SGD keeps one).
#   warmup=N     the lr ramps linearly over the first N labelled samples (Goyal et al. 2017).
#   replay=N     a buffer of the last N labelled samples' int8 taps (a scale per tap) and labels; each revealed
#                label is followed by steps on samples drawn from the buffer (experience replay, as in
#                on-device continual learning, e.g. Pellegrini et al. 2020 "Latent replay"). The stream
#                stays single-pass: only samples already seen and scored are replayed.
#   rsteps=S     replayed samples per revealed label (default 1).
# Runs before the learner moved into the method (results up to the "device" part) drew replay indices with
# numpy and replayed float taps; since then the draws are xorshift32 and the stored taps int8, as on a device.
LEARNER_KEYS = ("optim", "warmup", "replay", "rsteps")


@declare
class NormAlignClassifier(NormAlign):
    """norm-align as the unsupervised base under label learning: every aligned layer's statistics follow the
    stream as in norm-align (no label read, the collapse guard restores them), and the network's classifier
    learns from revealed labels only (cross-entropy; the unsupervised loss is 0) -- last-layer learning on
    norm-aligned features. Composed here for the study (registered while it runs), not a product method."""

    name = "norm-align-cls"

    def __init__(self, backbone, config) -> None:
        super().__init__(backbone, config)
        named = dict(self.named_parameters())
        for n in self.trainable_names():
            named[n].requires_grad_(True)  # the copied network is frozen; its classifier learns

    def trainable_names(self) -> list[str]:
        return [f"net.{n}" for n, _ in self.net.named_parameters() if n.startswith("classifier")]

    def fit_parameters(self) -> list:
        return []  # the fit measures source statistics only; the classifier starts as the source's

    def forward_graph(self, taps, state, momentum, target):
        logits, _, new_state = super().forward_graph(taps, state, momentum, target)
        return logits, supervised_or(logits.new_zeros(()), logits, target), new_state


def method_spec(spec: str) -> tuple[str, str, dict[str, str]]:
    """``name`` or ``name:key=value+key=value`` -> (label, method, overrides); learner keys stay in the
    overrides (``learner`` splits them off)."""
    name, _, rest = spec.partition(":")
    overrides = dict(kv.split("=", 1) for kv in rest.split("+") if kv) if rest else {}
    return spec, name, overrides


def learner(overrides: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(method overrides, learner settings) of a spec's overrides."""
    return ({k: v for k, v in overrides.items() if k not in LEARNER_KEYS},
            {k: v for k, v in overrides.items() if k in LEARNER_KEYS})


def install_learner(method, settings: dict[str, str], seed: int) -> None:
    """Give ``method`` the ``Learner`` of a spec's learner settings (none: its default, one SGD step per label).
    Its memory (Adam's moments, the replay buffer) is then in ``memory_table``."""
    if settings:
        method.use_learner(Learner(settings.get("optim", "sgd"), int(settings.get("warmup", 0)),
                                   int(settings.get("replay", 0)), int(settings.get("rsteps", 1)), seed))


def predict(method, taps: list[torch.Tensor]) -> int:
    """The method's prediction for one sample, with nothing adapted (statistics read, not updated)."""
    state = [method.get_buffer(n) for n in method.state_names()]
    with torch.no_grad():
        logits, _, _ = method.forward_graph(taps, state, torch.zeros(1), torch.zeros(1, method.num_classes))
    return int(logits.argmax())


def held_out_accuracy(method, taps: list[torch.Tensor], labels: np.ndarray) -> float:
    return float(np.mean([predict(method, [t[i:i + 1] for t in taps]) == y for i, y in enumerate(labels)]))


def prepared(backbone, model: str, method: str, overrides: dict[str, str], source, args, lr: float | None = None):
    """Prepared and fitted; ``lr`` (a test-time setting) replaces the config's after the fit."""
    overrides, _ = learner(overrides)
    adaptable = prepare(copy.deepcopy(backbone), method, {**args.fit_overrides, **overrides}, model_name=model,
                        seed=args.seed)
    fit(adaptable, source, seed=args.seed, progress=False, max_samples=args.fit_samples)
    if lr is not None and adaptable.method.trainable_names():
        adaptable.method.config = dataclasses.replace(adaptable.method.config, lr=lr)
        adaptable.method.reset()  # rebuilds the optimizer with the new lr from the fitted state
    return adaptable


def chosen_lr(args, study: str, label: str) -> float | None:
    return args.chosen.get(study, {}).get(label)


def transfer(args, ckpt: str, target_name: str, tune: bool = False) -> list[dict]:
    """One direction of the transfer study: rows with the learning curve and held-out accuracies
    (``tune``: every lr of ``LRS``, held out on the validation split)."""
    backbone, cfg = load_checkpoint(ckpt)
    source, target = load_dataset(cfg["data"]), load_dataset(target_name)
    rng = np.random.RandomState(args.seed)
    order = rng.permutation(len(target.train_y))[:args.transfer_stream]
    x, y = target.train_x[order], target.train_y[order]
    pool_x, pool_y = (target.val_x, target.val_y) if tune else (target.test_x, target.test_y)
    held = rng.permutation(len(pool_y))[:args.held_out]
    hx, hy = pool_x[held], pool_y[held]
    checkpoints = sorted({n for n in (200, 1000) if n < len(y)} | {len(y)})
    rows = []
    runs = [(spec, lr) for spec in map(method_spec, args.transfer_methods.split(","))
            for lr in (args.lrs if tune else (chosen_lr(args, "transfer", spec[0]),))]
    for (label, method, overrides), lr in runs:
        start = time.time()
        adaptable = prepared(backbone, cfg["model"], method, overrides, source, args, lr)
        reinitialised = start_new_task(adaptable)
        m = adaptable.method
        settings = learner(overrides)[1]
        install_learner(m, settings, args.seed)
        taps, held_taps = source_taps(adaptable, x), source_taps(adaptable, hx)
        correct, held_acc = [], {}
        for i in range(len(y)):
            sample = [t[i:i + 1] for t in taps]
            correct.append(int(m.step(sample).argmax()) == int(y[i]))
            target_1h = torch.zeros(1, m.num_classes)
            target_1h[0, int(y[i])] = 1.0
            m.step(sample, target_1h)  # the label is revealed only after the prediction was scored
            if i + 1 in checkpoints:
                held_acc[i + 1] = held_out_accuracy(m, held_taps, hy)
        mem = memory_table(adaptable)
        row = {"study": "transfer", "direction": f"{cfg['data']} -> {target_name}", "model": cfg["model"],
               "method": label, "overrides": {**args.fit_overrides, **overrides}, "lr": m.config.lr,
               "split": "val" if tune else "test", "reinitialised": reinitialised,
               "stream": len(y), "held_out": len(hy), "prequential": float(np.mean(correct)),
               "curve": np.cumsum(correct).tolist(), "held_out_accuracy": held_acc, "memory_bytes": mem,
               "training_bytes": training_bytes(mem),
               "seconds": round(time.time() - start, 1)}
        rows.append(row)
        print(f"transfer {row['direction']:<28} {label:<24} lr {m.config.lr:<7g} "
              f"prequential {100 * row['prequential']:5.1f}  held-out "
              + "  ".join(f"N={n}: {100 * a:5.1f}" for n, a in held_acc.items())
              + f"  train mem {row['training_bytes'] / 1024:8.1f} KB  ({row['seconds']} s)", flush=True)
    return rows


def _slug(label: str) -> str:
    return label.replace(":", "_").replace("=", "-").replace("+", "_")


def held_out_compiled(model, images: np.ndarray, labels: np.ndarray) -> float:
    """Held-out accuracy of a compiled host model's current weights: a second runtime on the same model with
    adaptation off (infer at momentum 0: nothing changes, as ``predict``)."""
    from edgetune import cruntime as cr
    from edgetune.deploy.host import MODEL_GETTER

    s = model.manifest.runtime.momentum_schedule
    probe = cr.Runtime(model.lib, MODEL_GETTER, adapt=False, guard=False,
                       momentum=(s.start, s.decay, s.floor) if s else (0.0, 0.0, 0.0))
    return float(np.mean([probe.step(images[i]).prediction == int(y) for i, y in enumerate(labels)]))


def device(args) -> list[dict]:
    """The transfer study's configurations (``--device-methods``) on a device's code: each exported int8
    after ``start_new_task`` and its learner, then the same digits stream in the same order as the torch rows
    through the compiled host runtime (TVM's int8 kernels + the C runtime with the bundle's replay buffer and
    warm-up), the torch method beside it on the same stream; with ``--device-target``, the firmware in QEMU
    (SRAM measured, ``--mcu-n`` samples, every label revealed)."""
    from edgetune.data import to_tensor
    from edgetune.deploy import save_initial_state, write_target_project
    from edgetune.deploy.host import HostModel
    from edgetune.errors import BudgetError, ToolchainError
    from edgetune.export import export
    from edgetune.export.manifest import TaskSpec, seal_bundle
    from edgetune.simulate import simulate

    backbone, cfg = load_checkpoint(args.checkpoint)
    source, target = load_dataset(cfg["data"]), load_dataset("digits")
    rng = np.random.RandomState(args.seed)  # the draws of ``transfer``: the same stream, order and held-out set
    order = rng.permutation(len(target.train_y))[:args.transfer_stream]
    x, y = target.train_x[order], target.train_y[order]
    held = rng.permutation(len(target.test_y))[:args.held_out]
    hx, hy = target.test_x[held], target.test_y[held]
    xs, hxs = to_tensor(x).numpy(), to_tensor(hx).numpy()
    checkpoints = sorted({n for n in (200, 1000) if n < len(y)} | {len(y)})
    rows = []
    for label, method, overrides in map(method_spec, args.device_methods.split(",")):
        start = time.time()
        adaptable = prepared(backbone, cfg["model"], method, overrides, source, args,
                             chosen_lr(args, "transfer", label))
        reinitialised = start_new_task(adaptable)  # duplicate zero tensors come back distinct (exportable)
        install_learner(adaptable.method, learner(overrides)[1], args.seed)
        bundle = Path(args.work) / f"device-{cfg['model']}-{_slug(label)}"
        export(adaptable, source, bundle, progress=False)
        save_initial_state(bundle, adaptable.method)
        seal_bundle(bundle, TaskSpec("new", "digits", tuple(reinitialised)))  # the bundle says what it learns
        mem = memory_table(adaptable)
        base = {"study": "device", "direction": f"{cfg['data']} -> digits", "model": cfg["model"], "method": label,
                "lr": adaptable.method.config.lr, "reinitialised": reinitialised, "stream": len(y),
                "held_out": len(hy), "memory_bytes": mem, "training_bytes": training_bytes(mem)}
        model = HostModel(bundle, workdir=bundle / "host")
        correct, held_acc = [], {}
        for i in range(len(y)):
            correct.append(model.step(xs[i]).prediction == int(y[i]))
            model.feedback(xs[i], int(y[i]))  # revealed only after the prediction was scored
            if i + 1 in checkpoints:
                held_acc[i + 1] = held_out_compiled(model, hxs, hy)
        row = {**base, "runtime": "compiled host", "learner_built": model.manifest.runtime.learner is not None,
               "prequential": float(np.mean(correct)), "curve": np.cumsum(correct).tolist(),
               "held_out_accuracy": held_acc, "seconds": round(time.time() - start, 1)}
        rows.append(row)
        print(f"device compiled-host {label:<40} prequential {100 * row['prequential']:5.1f}  held-out "
              + "  ".join(f"N={n}: {100 * a:5.1f}" for n, a in held_acc.items()) + f"  ({row['seconds']} s)",
              flush=True)
        if args.device_target:
            start = time.time()
            out = {**base, "runtime": f"{args.device_target} (QEMU)", "simulated_samples": args.mcu_n}
            try:
                project = write_target_project(bundle, args.device_target, out_dir=bundle / args.device_target)
                generated = (project.directory / "model" / "et_model_gen.c").read_text()
                out["learner_built"] = "edgetune_model_learner(" in generated
                report = simulate(project.directory, data="digits", corruption="none", n=args.mcu_n,
                                  labelled_fraction=1.0, workdir=project.directory / "sim").to_json()
                out.update(sram_bytes=report["sram_bytes"], flash_bytes=report.get("flash_bytes"),
                           online_accuracy=report.get("online_accuracy"),
                           instructions_per_sample=report.get("instructions_per_sample"))
            except (BudgetError, ToolchainError) as exc:
                out["refused"] = str(exc).splitlines()[0]
            out["seconds"] = round(time.time() - start, 1)
            rows.append(out)
            print(f"device {args.device_target} {label:<40} " + json.dumps(
                {k: v for k, v in out.items() if k not in ("memory_bytes", "study", "reinitialised")}), flush=True)
    return rows


def probe(args) -> list[dict]:
    """Why vqt's summaries were under-used (the evidence for vqt's ``align_queries``): a linear head on
    [pooled last stage ‖ every stage average-pooled] -- vqt's head input at zero queries -- learnt one label at a
    time (Adam, zero start, one pass over the transfer stream, each label followed by 3 steps on samples drawn
    from the last 24) from the features as they are, standardised per feature by the source's statistics (2,000
    Fashion-MNIST training images), by the stream's own, or LayerNorm'd per stage; held-out accuracy on the digits
    validation split. Offline (the stream's statistics are an oracle a device does not have); float torch."""
    import torch.nn.functional as F
    from edgetune.adapt import prepare

    backbone, cfg = load_checkpoint(args.checkpoint)
    source, target = load_dataset(cfg["data"]), load_dataset("digits")
    rng = np.random.RandomState(args.seed)  # the draws of ``transfer``'s validation run
    order = rng.permutation(len(target.train_y))[:args.transfer_stream]
    held = rng.permutation(len(target.val_y))[:args.held_out]
    y, hy = torch.as_tensor(target.train_y[order]).long(), torch.as_tensor(target.val_y[held]).long()
    adaptable = prepare(copy.deepcopy(backbone), "vqt", {}, model_name=cfg["model"], seed=args.seed)

    def pooled(images: np.ndarray, layer_norm: bool = False) -> torch.Tensor:
        taps = source_taps(adaptable, images)
        parts = [t.flatten(2).mean(2) for t in taps[:-1]]
        return torch.cat([taps[-1]] + [F.layer_norm(z, z.shape[-1:]) if layer_norm else z for z in parts], 1)

    f, hf, src = pooled(target.train_x[order]), pooled(target.val_x[held]), pooled(source.train_x[:2000])
    standard = {"as they are": (f, hf)}
    for name, ref in (("source statistics", src), ("stream statistics (oracle)", f)):
        mean, std = ref.mean(0), ref.std(0) + 1e-5
        standard[name] = ((f - mean) / std, (hf - mean) / std)
    standard["LayerNorm per stage"] = (pooled(target.train_x[order], True), pooled(target.val_x[held], True))
    rows = []
    for name, (a, b) in standard.items():
        for lr in args.lrs:
            torch.manual_seed(args.seed)
            head = torch.nn.Linear(a.shape[1], 10)
            torch.nn.init.zeros_(head.weight)
            torch.nn.init.zeros_(head.bias)
            opt, draws = torch.optim.Adam(head.parameters(), lr), np.random.RandomState(args.seed)
            for i in range(len(y)):
                for j in [i] + (draws.randint(max(0, i - 24), i, 3).tolist() if i else []):
                    opt.zero_grad()
                    F.cross_entropy(head(a[j:j + 1]), y[j:j + 1]).backward()
                    opt.step()
            acc = float((head(b).argmax(1) == hy).float().mean())
            rows.append({"study": "probe", "features": name, "lr": lr, "held_out": len(hy), "accuracy": acc})
            print(f"probe {name:<28} lr {lr:<7g} validation held-out {100 * acc:5.1f}", flush=True)
    return rows


class CachedTaps:
    """Frozen taps depend only on the backbone, the tap specs and the images: compute them once."""

    def __init__(self) -> None:
        self.cache: dict[tuple, list[torch.Tensor]] = {}

    def __call__(self, adaptable, images):
        key = (adaptable.frozen.specs, images.shape, hash(images.tobytes()))
        if key not in self.cache:
            self.cache[key] = source_taps(adaptable, images)
        return self.cache[key]


def personalisation(args, tune: bool = False) -> list[dict]:
    """The personalisation study (``tune``: every lr of ``LRS``, 20 % labels, continual, on the validation
    corruptions of held-out training images)."""
    backbone, cfg = load_checkpoint(args.checkpoint)
    data = load_dataset(cfg["data"])
    corruptions = VALIDATION_CORRUPTIONS if tune else tuple(args.corruptions.split(","))
    taps = CachedTaps()
    rows = []
    for protocol in ("continual",) if tune else ("episodic", "continual"):
        segments = build_stream(data, corruptions, 5, protocol, args.seed, args.samples,
                                split="val" if tune else "test")
        specs = list(map(method_spec, args.personal_methods.split(",")))
        runs = [(spec, lr) for spec in specs
                for lr in (args.lrs if tune else (chosen_lr(args, "personal", spec[0]),))]
        for (label, method, overrides), lr in runs:
            adaptable = prepared(backbone, cfg["model"], method, overrides, data, args, lr)
            settings = learner(overrides)[1]
            install_learner(adaptable.method, settings, args.seed)
            learns = bool(adaptable.method.trainable_names()) and adaptable.method.config.lr > 0
            if tune and not learns:
                continue
            for fraction in ((0.2,) if tune else FRACTIONS) if learns else (0.0,):
                start = time.time()
                adaptable.reset()
                result = run_stream(adaptable, segments, taps, fraction, args.seed, progress=False)
                mem = memory_table(adaptable)
                rows.append({"study": "personalisation", "protocol": protocol, "model": cfg["model"],
                             "method": label, "overrides": {**args.fit_overrides, **overrides},
                             "lr": adaptable.method.config.lr, "split": "val" if tune else "test",
                             "labelled_fraction": fraction, "mean": result.mean,
                             "per_corruption": result.per_corruption, "restores": result.restores,
                             "memory_bytes": mem, "training_bytes": training_bytes(mem),
                             "seconds": round(time.time() - start, 1)})
                print(f"personal {protocol:<10} {label:<24} lr {adaptable.method.config.lr:<7g} labels "
                      f"{fraction:4.0%}  {100 * result.mean:5.1f}  "
                      f"({rows[-1]['seconds']} s)", flush=True)
    return rows


def mcu(args) -> list[dict]:
    """Measured SRAM on cortex-m7 (QEMU) of every exportable learner, learning from 20 % labels, next to
    the analytic training memory; the non-partitioned ones get the analytic budget check only."""
    from edgetune.deploy import analytic_budget, save_initial_state, write_target_project
    from edgetune.errors import BudgetError
    from edgetune.export import export
    from edgetune.simulate import simulate
    from edgetune.targets import get_target

    backbone, cfg = load_checkpoint(args.checkpoint)
    data = load_dataset(cfg["data"])
    rows = []
    for label, method, overrides in map(method_spec, args.mcu_methods.split(",")):
        start = time.time()
        adaptable = prepared(backbone, cfg["model"], method, overrides, data, args, chosen_lr(args, "personal", label))
        mem = memory_table(adaptable)
        row = {"study": "mcu", "target": args.mcu_target, "model": cfg["model"], "method": label,
               "lr": adaptable.method.config.lr, "memory_bytes": mem, "training_bytes": training_bytes(mem)}
        if adaptable.method.partitioned:
            bundle = Path(args.work) / f"{cfg['model']}-{label.replace(':', '_').replace('=', '-')}"
            export(adaptable, data, bundle, progress=False)
            save_initial_state(bundle, adaptable.method)
            try:
                project = write_target_project(bundle, args.mcu_target, out_dir=bundle / args.mcu_target)
                report = simulate(project.directory, data=cfg["data"], n=args.mcu_n, labelled_fraction=0.2,
                                  workdir=project.directory / "sim").to_json()
                row.update(sram_bytes=report["sram_bytes"], flash_bytes=report.get("flash_bytes"),
                           online_accuracy=report.get("online_accuracy"), simulated_samples=args.mcu_n)
            except BudgetError as exc:
                row["refused"] = str(exc).splitlines()[0]
        else:
            budget = analytic_budget(get_target(args.mcu_target), mem)
            row.update(analytic_sram_bytes=budget.sram, fits=not budget.problems(),
                       why="adapts the float backbone itself: no exported program, analytic budget only")
        row["seconds"] = round(time.time() - start, 1)
        rows.append(row)
        print(f"mcu {args.mcu_target} {label:<16} " + json.dumps({k: v for k, v in row.items()
                                                                   if k not in ("memory_bytes", "study")}), flush=True)
    return rows


def _kb(n: int) -> str:
    return f"{n / 1024:,.1f}"


def write_tables(rows: list[dict], path: Path, args) -> None:
    lines = ["# Learning from labels", ""]
    transfer_rows = [r for r in rows if r["study"] == "transfer"]
    for direction in dict.fromkeys(r["direction"] for r in transfer_rows):
        rs = [r for r in transfer_rows if r["direction"] == direction]
        ns = list(rs[0]["held_out_accuracy"])
        lines += [f"## Transfer {direction} ({rs[0]['model']}, stream of {rs[0]['stream']} labelled samples, "
                  f"held-out {rs[0]['held_out']} test samples)", "",
                  "| method | prequential | " + " | ".join(f"held-out after {n}" for n in ns)
                  + " | training memory (KB) | x full-finetune | re-initialised |",
                  "| --- | ---: | " + " | ".join("---:" for _ in ns) + " | ---: | ---: | --- |"]
        full = next((r["training_bytes"] for r in rs if r["method"] == "full-finetune"), None)
        for r in rs:
            ratio = f"{r['training_bytes'] / full:.2f}" if full else "-"
            lines.append(f"| {r['method']} | {100 * r['prequential']:.1f} | "
                         + " | ".join(f"{100 * r['held_out_accuracy'][n]:.1f}" for n in ns)
                         + f" | {_kb(r['training_bytes'])} | {ratio} | {', '.join(r['reinitialised'])} |")
        lines.append("")
    personal = [r for r in rows if r["study"] == "personalisation"]
    if personal:
        lines += [f"## Personalisation: {personal[0]['model']}, Fashion-MNIST-C severity 5 "
                  f"({args.corruptions}; {args.samples} samples each), mean online accuracy (%)", "",
                  "| method | " + " | ".join(f"{p} {f:.0%}" for p in ("episodic", "continual") for f in FRACTIONS)
                  + " | training memory (KB) |",
                  "| --- | " + " | ".join("---:" for _ in range(2 * len(FRACTIONS))) + " | ---: |"]
        for method in dict.fromkeys(r["method"] for r in personal):
            cells = []
            for p in ("episodic", "continual"):
                for f in FRACTIONS:
                    hit = [r for r in personal if r["method"] == method and r["protocol"] == p
                           and r["labelled_fraction"] in (f, 0.0)]
                    cells.append(f"{100 * hit[0]['mean']:.1f}" if hit else "-")
            mem = next(r["training_bytes"] for r in personal if r["method"] == method)
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {_kb(mem)} |")
        lines += ["", "source and feature-align have nothing that learns from labels: one run each, the same number "
                      "in every labelled-fraction column.", ""]
    mcu_rows = [r for r in rows if r["study"] == "mcu"]
    if mcu_rows:
        lines += [f"## Memory on {mcu_rows[0]['target']} ({mcu_rows[0]['model']}; measured: QEMU, 20 % labels, "
                  f"SRAM = .data + .bss + stack high-water mark)", "",
                  "| method | analytic training memory (KB) | measured SRAM (KB) | flash (KB) |",
                  "| --- | ---: | ---: | ---: |"]
        for r in mcu_rows:
            sram = (_kb(r["sram_bytes"]) if r.get("sram_bytes") else r.get("refused") or
                    f"not exportable; analytic budget {_kb(r['analytic_sram_bytes'])} "
                    f"({'fits' if r['fits'] else 'does not fit'})")
            flash = _kb(r["flash_bytes"]) if r.get("flash_bytes") else "-"
            lines.append(f"| {r['method']} | {_kb(r['training_bytes'])} | {sram} | {flash} |")
        lines.append("")
    probe_rows = [r for r in rows if r["study"] == "probe"]
    if probe_rows:
        lrs = list(dict.fromkeys(r["lr"] for r in probe_rows))
        lines += [f"## Linear head on [pooled last stage ‖ stages average-pooled], one label at a time (Adam, "
                  f"replay 24 x 3), held-out on {probe_rows[0]['held_out']} validation images", "",
                  "| features | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |", "| --- |" + " ---: |" * len(lrs)]
        for name in dict.fromkeys(r["features"] for r in probe_rows):
            acc = {r["lr"]: r["accuracy"] for r in probe_rows if r["features"] == name}
            lines.append(f"| {name} | " + " | ".join(f"{100 * acc[lr]:.1f}" for lr in lrs) + " |")
        lines.append("")
    device_rows = [r for r in rows if r["study"] == "device"]
    if device_rows:
        r0 = device_rows[0]
        lines += [f"## On a device's code: transfer {r0['direction']} ({r0['model']}, int8 frozen backbone, stream of "
                  f"{r0['stream']} labelled samples, held-out {r0['held_out']} test samples)", "",
                  "| method | runtime | prequential | held-out after "
                  + " | after ".join(map(str, r0.get("held_out_accuracy", {}) or ["-"]))
                  + " | training memory (KB, analytic) | measured SRAM (KB) | flash (KB) |",
                  "| --- | --- | ---: | " + " | ".join("---:" for _ in (r0.get("held_out_accuracy") or [0]))
                  + " | ---: | ---: | ---: |"]
        for r in device_rows:
            held = r.get("held_out_accuracy") or {}
            cells = " | ".join(f"{100 * v:.1f}" for v in held.values()) if held else " | ".join(
                "-" for _ in (r0.get("held_out_accuracy") or [0]))
            pre = f"{100 * r['prequential']:.1f}" if "prequential" in r else (
                f"{100 * r['online_accuracy']:.1f} (first {r['simulated_samples']})" if r.get("online_accuracy")
                is not None else "-")
            sram = _kb(r["sram_bytes"]) if r.get("sram_bytes") else r.get("refused", "-")
            flash = _kb(r["flash_bytes"]) if r.get("flash_bytes") else "-"
            lines.append(f"| {r['method']} | {r['runtime']} | {pre} | {cells} | {_kb(r['training_bytes'])} | {sram} | "
                         f"{flash} |")
        lines.append("")
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    transfer_rows = [r for r in rows if r["study"] == "transfer"]
    directions = list(dict.fromkeys(r["direction"] for r in transfer_rows))
    if directions:
        fig, axes = plt.subplots(1, len(directions), figsize=(6 * len(directions), 4), squeeze=False)
        for ax, direction in zip(axes[0], directions):
            for r in (r for r in transfer_rows if r["direction"] == direction):
                c = np.asarray(r["curve"], dtype=float)
                window = 100
                hits = np.diff(np.concatenate([[0.0], c]))
                running = np.convolve(hits, np.ones(window) / window, mode="valid")
                ax.plot(np.arange(window, len(c) + 1), 100 * running, label=r["method"])
            ax.set_title(f"transfer {direction}: prequential accuracy")
            ax.set_xlabel("labelled samples seen")
            ax.set_ylabel(f"accuracy over the last {window} (%)")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "transfer_curves.png", dpi=120)
        fig, axes = plt.subplots(1, len(directions), figsize=(6 * len(directions), 4), squeeze=False)
        for ax, direction in zip(axes[0], directions):
            for r in (r for r in transfer_rows if r["direction"] == direction):
                acc = 100 * list(r["held_out_accuracy"].values())[-1]
                ax.scatter(r["training_bytes"] / 1024, acc)
                ax.annotate(r["method"], (r["training_bytes"] / 1024, acc), fontsize=7)
            for r in (r for r in rows if r["study"] == "device" and r["direction"] == direction
                      and r.get("held_out_accuracy")):  # the same learners on the compiled host runtime
                acc = 100 * list(r["held_out_accuracy"].values())[-1]
                ax.scatter(r["training_bytes"] / 1024, acc, marker="s", facecolors="none", edgecolors="k")
                ax.annotate(f"{r['method']} (compiled)", (r["training_bytes"] / 1024, acc), fontsize=6)
            ax.set_xscale("log")
            ax.set_xlabel("training memory of one step (KB, log)")
            ax.set_ylabel("held-out accuracy after all labels (%)")
            ax.set_title(f"transfer {direction}: accuracy vs memory")
        fig.tight_layout()
        fig.savefig(out / "pareto.png", dpi=120)
    personal = [r for r in rows if r["study"] == "personalisation"]
    if personal:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4))
        for ax, protocol in zip(axes, ("episodic", "continual")):
            for method in dict.fromkeys(r["method"] for r in personal):
                rs = [r for r in personal if r["method"] == method and r["protocol"] == protocol]
                xs = [100 * f for f in FRACTIONS] if len(rs) > 1 else [100 * FRACTIONS[0], 100 * FRACTIONS[-1]]
                ys = [100 * r["mean"] for r in rs] if len(rs) > 1 else [100 * rs[0]["mean"]] * 2
                ax.plot(xs, ys, marker="o", label=method)
            ax.set_xscale("log")
            ax.set_xlabel("labelled samples (%)")
            ax.set_ylabel("mean online accuracy (%)")
            ax.set_title(f"Fashion-MNIST-C sev 5, {protocol}")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "personalisation.png", dpi=120)


def tune(args, path: Path) -> None:
    """Every learner's lr on validation data; the best per study goes to ``path`` (all runs beside it)."""
    rows: list[dict] = []
    if args.part in ("all", "transfer"):
        rows += transfer(args, args.checkpoint, "digits", tune=True)
    if args.part in ("all", "personal"):
        rows += personalisation(args, tune=True)
    chosen: dict[str, dict[str, float]] = json.loads(path.read_text()) if path.exists() else {}
    for r in rows:
        study = "transfer" if r["study"] == "transfer" else "personal"
        score = list(r["held_out_accuracy"].values())[-1] if study == "transfer" else r["mean"]
        best = [x for x in rows if x["study"] == r["study"] and x["method"] == r["method"]]
        # transfer: a tie on the held-out accuracy (a few hundred images) goes to the better prequential accuracy
        top = max(best, key=lambda x: (list(x["held_out_accuracy"].values())[-1], x["prequential"])
                  if study == "transfer" else x["mean"])
        if r is top:
            chosen.setdefault(study, {})[r["method"]] = r["lr"]
            print(f"chosen {study} {r['method']}: lr {r['lr']:g} ({100 * score:.1f} on validation)")
    path.write_text(json.dumps(chosen, indent=1, sort_keys=True) + "\n")
    (path.parent / f"tuning-{args.part}{'-' + args.tag if args.tag else ''}.json").write_text(
        json.dumps(rows, indent=1) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny-cnn, few samples, 2 fit epochs: a smoke run")
    p.add_argument("--tune", action="store_true", help="choose every learner's lr on validation data (chosen.json)")
    p.add_argument("--part", default="all", choices=["all", "transfer", "personal", "mcu", "device", "probe"])
    p.add_argument("--device-methods", default="lst:optim=adam+replay=24+rsteps=3+reduction=4",
                   help="device part: transfer specs run through the compiled host runtime")
    p.add_argument("--device-target", default="", help="device part: also simulate this MCU target in QEMU")
    p.add_argument("--mcu-methods", default="feature-align,tinytta,last-layer,lst,vqt,bias-only,full-finetune")
    p.add_argument("--mcu-target", default="cortex-m7")
    p.add_argument("--mcu-n", type=int, default=30, help="samples streamed in QEMU per method")
    p.add_argument("--work", default="/tmp/edgetune-labels", help="bundles and target projects (scratch)")
    p.add_argument("--checkpoint", default="checkpoints/mcunet-s-fashion-mnist")
    p.add_argument("--reverse-checkpoint", default="checkpoints/mcunet-s-digits",
                   help="the reverse transfer's backbone (trained on digits; '' skips the reverse)")
    p.add_argument("--transfer-methods", default=",".join(TRANSFER_METHODS))
    p.add_argument("--directions", default="forward,reverse", help="transfer: forward (the --checkpoint's data -> "
                                                                   "digits) and/or reverse (digits -> Fashion-MNIST)")
    p.add_argument("--render", default="", metavar="JSON[,JSON]", help="only write tables and plots of these runs")
    p.add_argument("--tag", default="", help="name of this run's json/md (default: labels[-PART])")
    p.add_argument("--personal-methods", default=",".join(PERSONAL_METHODS))
    p.add_argument("--transfer-stream", type=int, default=2000, help="labelled stream samples (at most)")
    p.add_argument("--held-out", type=int, default=1000, help="held-out test samples (at most)")
    p.add_argument("--corruptions", default=",".join(PERSONAL_CORRUPTIONS))
    p.add_argument("--samples", type=int, default=1000, help="personalisation: samples per corruption")
    p.add_argument("--fit-samples", type=int, default=20000, help="source samples the attachments' fit reads")
    p.add_argument("--fit-epochs", type=int, default=None, help="override every method's fit epochs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="results/labels")
    p.add_argument("--lrs", default=",".join(map(str, LRS)), help="--tune: the test-time lr grid")
    args = p.parse_args()
    args.lrs = tuple(float(v) for v in args.lrs.split(","))
    if args.quick:
        args.checkpoint, args.reverse_checkpoint = "checkpoints/tiny-cnn-fashion-mnist", ""
        args.transfer_stream, args.held_out, args.samples, args.fit_samples = 300, 100, 100, 1000
        args.corruptions, args.fit_epochs = "gaussian_noise,fog", args.fit_epochs or 2
        args.out = args.out if args.out != "results/labels" else "results/labels/quick"
    args.fit_overrides = {"fit_epochs": str(args.fit_epochs)} if args.fit_epochs is not None else {}
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chosen_path = out / "chosen.json"
    args.chosen = json.loads(chosen_path.read_text()) if chosen_path.exists() and not args.tune else {}
    rows: list[dict] = []
    if args.tune:
        tune(args, chosen_path)
        return
    if args.render:  # tables and plots of earlier runs (parts run in parallel), nothing measured
        for f in args.render.split(","):
            run = json.loads(Path(f).read_text())
            rows += run["rows"]
            if any(r["study"] == "personalisation" for r in run["rows"]):  # the table names the run's stream
                args.samples, args.corruptions = run["settings"]["samples"], run["settings"]["corruptions"]
        write_tables(rows, out / f"{args.tag or 'labels'}.md", args)
        plot(rows, out)
        return
    if args.part in ("all", "transfer") and "forward" in args.directions:
        rows += transfer(args, args.checkpoint, "digits")
    if args.part in ("all", "transfer") and "reverse" in args.directions and args.reverse_checkpoint:
        rows += transfer(args, args.reverse_checkpoint, "fashion-mnist")
    if args.part in ("all", "personal"):
        rows += personalisation(args)
    if args.part in ("all", "mcu"):
        rows += mcu(args)
    if args.part == "device":
        rows += device(args)
    if args.part == "probe":
        rows += probe(args)
    tag = args.tag or ("labels" if args.part == "all" else f"labels-{args.part}")
    settings = {k: v for k, v in vars(args).items() if k not in ("fit_overrides", "chosen")}
    settings["chosen_lr"] = args.chosen
    settings["work"] = "WORKDIR"  # scratch bundles, not part of the results (and no machine path in them)
    (out / f"{tag}.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=1) + "\n")
    write_tables(rows, out / f"{tag}.md", args)
    plot(rows, out)


if __name__ == "__main__":
    main()
