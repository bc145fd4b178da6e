"""The ``edgetune`` command line: one verb per stage of the pipeline.

Every error is one line ``edgetune: error: <component>: <what>; <how to fix>`` with an exit code
per error class (``EXIT_CODES``, shown in ``--help``); usage errors exit 2; anything else is a bug
and says how to get its traceback (``--debug`` or ``EDGETUNE_DEBUG=1``).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Any

from edgetune.data.options import add_data_options
from edgetune.errors import (BUG_EXIT_CODE, EXIT_CODES, INTERRUPTED_EXIT_CODE, USAGE_EXIT_CODE, BudgetError,
                             ConfigError, EdgetuneError)
from edgetune.version import __version__


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (like every other error) and exit 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(USAGE_EXIT_CODE, f"edgetune: error: {self.prog}: {message}; see `{self.prog} --help`\n")


def _number(cast: type, valid, expected: str, in_range: str):
    """An argparse type: ``cast(text)`` that ``valid(value)`` accepts, else one line saying what is expected."""
    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected} (got {text!r})") from None
        if not valid(value):
            raise argparse.ArgumentTypeError(f"must be {in_range} (got {value if cast is int else text})")
        return value
    return parse


_count = _number(int, lambda v: v >= 1, "a positive integer", "a positive integer")  # sample counts, epochs
_seed = _number(int, lambda v: 0 <= v < 2 ** 32, "an integer >= 0", "in [0, 2^32)")  # numpy's seeds are unsigned
_rate = _number(float, lambda v: math.isfinite(v) and v > 0, "a positive number", "positive and finite")
_fraction = _number(float, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]", "in [0, 1]")


def _check_out(path: str, option: str = "-o") -> None:
    """Refuse an output path under a file or in a folder that cannot be written, before any work.

    Raises:
        ConfigError: as described.
    """
    out = Path(path)
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise ConfigError(f"{option}: {out} is under the file {parent}; give a path in a folder")
    existing = next((p for p in [out, *out.parents] if p.exists()), Path("."))
    if existing.is_dir() and not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{option}: cannot write in {existing} (read-only); give a path in a writable folder")


def _overrides(pairs: list[str]) -> dict[str, str]:
    out = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set: expected key=value (got {p!r}); e.g. --set lr=0.001")
        out[key.strip()] = value.strip()
    return out


LEARNER_HELP = ("how revealed labels are learnt from on every runtime, as KEY=VALUE,...: optimizer=sgd|adam, "
                "warmup=N (labels of linear lr warm-up), replay=N (a buffer of the last N labelled samples' int8 "
                "taps), replay_steps=S (replayed steps per label), seed=N; e.g. optimizer=adam,replay=24,"
                "replay_steps=3 (default: one SGD step per label)")


def _learner(spec: str | None):
    """The ``Learner`` of a ``--learner`` spec (None: the method's default).

    Raises:
        ConfigError: an unknown key, a value that is not an integer, or settings ``Learner`` refuses.
    """
    if spec is None:
        return None
    from dataclasses import fields

    from edgetune.methods.base import Learner
    known = {f.name for f in fields(Learner)}
    values: dict[str, Any] = {}  # str (optimizer) or int (the counts): Learner checks each
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        key, sep, value = (t.strip() for t in part.partition("="))
        if not sep or not key:
            raise ConfigError(f"--learner: expected KEY=VALUE,... (got {part!r}); give e.g. --learner "
                              "optimizer=adam,replay=24,replay_steps=3")
        if key not in known:
            raise ConfigError(f"--learner: unknown setting {key!r}; use {', '.join(sorted(known))} "
                              "(e.g. --learner optimizer=adam,replay=24,replay_steps=3)")
        if key == "optimizer":
            values[key] = value
            continue
        try:
            values[key] = int(value)
        except ValueError:
            raise ConfigError(f"--learner: {key}={value!r} is not an integer; give a whole number, e.g. "
                              f"{key}=24") from None
    return Learner(**values)


def _cmd_list(args: argparse.Namespace) -> None:
    if args.what == "models":
        from edgetune.models import MODEL_HELP, MODELS
        width = max(len(n) for n in MODELS)
        for n in MODELS:
            print(f"{n:<{width}}  {MODEL_HELP.get(n, '')}")
    elif args.what == "methods":
        from edgetune.methods import METHODS
        for n in METHODS:
            cls = METHODS.get(n)
            print(f"{n:<14} {cls.paper}")
            if args.verbose:
                cfg = cls.Config()
                for f in fields(cfg):
                    print(f"    {f.name}={getattr(cfg, f.name)!r}: {f.metadata.get('help', '')}")
    elif args.what == "corruptions":
        from edgetune.data import TEST_CORRUPTIONS, VALIDATION_CORRUPTIONS
        print("test (reported):      " + ", ".join(TEST_CORRUPTIONS))
        print("validation (tuning):  " + ", ".join(VALIDATION_CORRUPTIONS))
    elif args.what == "targets":
        from edgetune.targets import list_targets
        for t in list_targets():
            print(t.describe())


def _is_onnx(model: str | None) -> bool:
    return bool(model) and str(model).lower().endswith(".onnx")


def _load(args: argparse.Namespace):
    """The backbone ``args`` names: an ONNX file (``--taps``, ``--classifier``) or a checkpoint folder.

    Raises:
        ConfigError, ModelError, CheckpointError: see ``load_onnx_backbone`` / ``load_checkpoint``.
    """
    model: str | None = getattr(args, "model", None)
    if model is not None and _is_onnx(model):
        from edgetune.models.onnx_backbone import check_taps_for_method, load_onnx_backbone
        if args.checkpoint:
            raise ConfigError(f"{args.command}: --checkpoint is not used with an ONNX model (its weights are in "
                              f"{model}); drop --checkpoint")
        taps = [t.strip() for t in args.taps.split(",") if t.strip()] if args.taps else None
        graph = load_onnx_backbone(model, taps, args.classifier)
        check_taps_for_method(graph, args.method)
        return graph, {"model": Path(model).name, "num_classes": graph.num_classes,
                       "input_shape": list(graph.input_shape), "onnx": graph.source}
    if getattr(args, "taps", None) or getattr(args, "classifier", None):
        raise ConfigError(f"{args.command}: --taps and --classifier apply to an ONNX model (MODEL.onnx); "
                          "drop them for a checkpoint")
    if not args.checkpoint:
        from edgetune.checkpoint import HOW_TO_CREATE
        args.usage_error(f"--checkpoint CKPT is required unless the model is an .onnx file ({HOW_TO_CREATE})")
    from edgetune.checkpoint import load_checkpoint
    backbone, config = load_checkpoint(args.checkpoint)
    if model and model != config["model"]:
        option = "the model argument" if args.command == "export" else "--model"
        raise ConfigError(f"{args.command}: {option} {model!r} does not match the checkpoint's model "
                          f"{config['model']!r}; pass {config['model']} or the matching checkpoint")
    return backbone, config


def _cmd_train(args: argparse.Namespace) -> None:
    from edgetune.checkpoint import check_output_folder
    from edgetune.train import train_source
    _check_out(args.out)
    check_output_folder(args.out)
    report = train_source(args.model, args.data, args.out, epochs=args.epochs, lr=args.lr, seed=args.seed,
                          augment=not args.no_augment, train_images=args.train_images, resize=args.resize,
                          crop=args.crop)
    print(f"wrote {args.out}: val accuracy {100 * report['val_accuracy']:.1f}%, "
          f"test accuracy {100 * report['test_accuracy']:.1f}% ({report['train_seconds']} s)")


def _cmd_eval(args: argparse.Namespace) -> None:
    from edgetune.data import checkpoint_source, checkpoint_stream
    from edgetune.evaluate import evaluate

    learner = _learner(args.learner)  # before the data and the fit: a bad spec is refused at once
    backbone, config = _load(args)
    data, resize, crop = checkpoint_stream(config, args.data, args.resize, args.crop)
    source, origin = checkpoint_source(config, args.source_data, args.source_mode, resize, crop)
    report = evaluate(backbone, config["model"], args.method, data, args.corruption, args.severity, args.protocol,
                      args.seed, args.samples_per_corruption, args.backbone, _overrides(args.set),
                      args.labelled_fraction, progress=not args.json, source=source, source_mode=args.source_mode,
                      warmup=args.warmup, source_origin=origin, resize=resize, crop=crop, task=args.task,
                      learner=learner)
    print(json.dumps(report.to_json(), indent=2) if args.json else report.table())


def _new_task_stream(args: argparse.Namespace, backbone) -> str:
    """The name of the stream whose classes a ``--task new`` bundle learns (``--data``), checked before the fit.

    Raises:
        ConfigError: no ``--data``, or a stream of more classes than the model outputs.
        DataError: the stream cannot be loaded, or has no labels to learn its classes from.
    """
    from edgetune.data import load_data
    from edgetune.data.datasets import DATASETS
    from edgetune.errors import DataError
    from edgetune.evaluate import check_stream_classes

    if not args.data:
        raise ConfigError("export: --task new learns the classes of the stream the device will see, but no stream "
                          "was named; pass --data DATA (e.g. --data digits; the source stays the checkpoint's "
                          "training data, or --source-data)")
    stream = load_data(args.data, args.resize, args.crop)
    if not stream.labelled:
        raise DataError(f"export: --task new learns the classes of {args.data} from revealed labels, but it has no "
                        "labels; pass labelled stream data (--data)")
    check_stream_classes(stream.num_classes, backbone.num_classes, str(args.data), "export")
    return stream.name if stream.name in DATASETS.names() else Path(stream.name).name  # no machine path in a bundle


def _cmd_export(args: argparse.Namespace) -> None:
    from edgetune.adapt import fit, prepare, start_new_task
    from edgetune.data import checkpoint_source, conform, record_source, source_info
    from edgetune.export import export
    _check_out(args.out)
    learner = _learner(args.learner)  # before the data and the fit: a bad spec is refused at once
    backbone, config = _load(args)
    from edgetune.deploy.budget import preflight_budget  # before data and fit: oversized models refused in seconds
    preflight_budget(backbone, args.target, args.method, _overrides(args.set), not args.no_quantize, config["model"])
    new_task = args.task == "new"
    stream = _new_task_stream(args, backbone) if new_task else ""
    # a new task's --data is the stream; the source stays the model's own training data unless --source-data
    source, origin = checkpoint_source(config, args.source_data or (None if new_task else args.data),
                                       args.source_mode, args.resize, args.crop, command="export")
    assert source is not None  # checkpoint_source refuses export's only source-less mode ("none")
    source = conform(source, backbone.input_shape, "source-data")
    adaptable = prepare(backbone, args.method, _overrides(args.set), model_name=config["model"])
    if learner is not None:
        adaptable.method.use_learner(learner)
    if new_task:
        import copy
        start_new_task(copy.deepcopy(adaptable))  # a method with no class layer to restart: refused before the fit
    fit(adaptable, source, seed=args.seed, mode=args.source_mode)
    restarted = start_new_task(adaptable) if new_task else []  # the class layers start at zero for the stream
    manifest = export(adaptable, source, args.out, quantize=not args.no_quantize, target=args.target)
    record_source(args.out, source_info(source, args.source_mode, origin))
    from edgetune.export import seal_bundle
    from edgetune.export.manifest import TaskSpec
    # source.json is written after export: its hash goes into the manifest too, with a new task's classes
    seal_bundle(args.out, TaskSpec("new", stream, tuple(restarted)) if new_task else None)
    print(f"wrote {args.out} ({manifest.method} on {manifest.model}, target {args.target})"
          + (f"; new task: {', '.join(restarted)} start at zero and learn the classes of {stream} from revealed "
             "labels on the device" if new_task else ""))
    from edgetune.deploy.commands import deploy_after_export
    line = deploy_after_export(args.out, adaptable.method, args.target, build_it=args.build,
                               compile_host=not args.no_compile)
    if line:
        print(line)


def _cmd_import(args: argparse.Namespace) -> None:
    from edgetune.checkpoint import import_checkpoint, parse_input_shape
    _check_out(args.out)
    shape = parse_input_shape(args.input_shape) if args.input_shape else None
    config = import_checkpoint(args.model, args.weights, args.out, shape, args.num_classes)
    print(f"wrote {args.out}: {config['model']}, {config['num_classes']} classes, input {config['input_shape']}, "
          f"from {config['imported']['weights']}")


def _inspect_onnx(path: str, classifier: str | None) -> None:
    from edgetune.models.onnx_backbone import tap_candidates
    candidates, per_stage = tap_candidates(path, classifier)
    print(f"{path}: tap candidates (tensors every path passes through), in graph order")
    for c in candidates:
        print(f"  {c.name:<60} {'x'.join(str(d) for d in c.shape):<14} {c.op:<18} {c.why}")
    print(f"default (source, feature-align): --taps {candidates[-1].name}")
    print(f"per stage (tinytta, lst, vqt):    --taps {','.join(per_stage)}")


def _cmd_inspect(args: argparse.Namespace) -> None:
    if _is_onnx(args.bundle):
        _inspect_onnx(args.bundle, args.classifier)
        return
    from edgetune.export import load_manifest
    from edgetune.memory import format_memory_table
    manifest = load_manifest(args.bundle)
    print(manifest.describe())
    print(format_memory_table(manifest.memory))


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="edgetune", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Keep a pretrained model learning on the device it is deployed to: int8 frozen backbone, "
                    "small trainable attachments, test-time adaptation one sample at a time.",
        epilog="exit codes:\n" + "\n".join(f"  {code:>3}  {what}" for code, what in sorted(EXIT_CODES.items()))
               + "\n  0    success\n\nerrors print one line; --debug (or EDGETUNE_DEBUG=1) shows the traceback")
    p.add_argument("--version", action="version", version=f"edgetune {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("list", help="list models, methods, targets or corruptions")
    s.add_argument("what", choices=["models", "methods", "targets", "corruptions"])
    s.add_argument("-v", "--verbose", action="store_true", help="methods: show every config field with its help")
    s.set_defaults(func=_cmd_list)

    s = sub.add_parser("train-source", help="train a zoo backbone on clean source data (writes a checkpoint)")
    s.add_argument("--model", required=True, help="zoo name (see `edgetune list models`) or package.module:callable")
    add_data_options(s, "digits", "training data (its training split; recorded in the checkpoint):")
    s.add_argument("-o", "--out", required=True, help="checkpoint folder to write")
    s.add_argument("--epochs", type=_count, default=15)
    s.add_argument("--lr", type=_rate, default=3e-3)
    s.add_argument("--seed", type=_seed, default=0)
    s.add_argument("--train-images", type=int, default=None, metavar="N",
                   help="train on a seeded subset of N training images (default: all; more than the data has "
                        "is an error)")
    s.add_argument("--no-augment", action="store_true", help="no random-shift augmentation")
    s.set_defaults(func=_cmd_train)

    s = sub.add_parser("import-checkpoint", help="make a checkpoint from torch weights trained elsewhere")
    s.add_argument("--model", required=True, help="package.module:callable building the architecture (or a zoo name)")
    s.add_argument("--weights", required=True, help="file written by torch.save(model.state_dict(), 'W.pt')")
    s.add_argument("--input-shape", default=None, metavar="C,H,W",
                   help="input the model was trained on (C,H,W or C,T; default: the model's own)")
    s.add_argument("--num-classes", type=_count, default=None, metavar="K",
                   help="classes (default: rows of classifier.weight in the weights)")
    s.add_argument("-o", "--out", required=True, help="checkpoint folder to write")
    s.set_defaults(func=_cmd_import)

    s = sub.add_parser("eval", help="online test-time adaptation on a corrupted stream, next to source")
    s.add_argument("--model", help="a model.onnx file (then no --checkpoint), or a model name (optional: taken "
                                   "from the checkpoint)")
    s.add_argument("--checkpoint", default=None, help="folder written by train-source or import-checkpoint")
    _onnx_options(s)
    s.add_argument("--method", required=True, help="see `edgetune list methods`")
    add_data_options(s, None, "the stream (its test split; default: the checkpoint's training data):", source=True,
                     warmup=True)
    s.add_argument("--corruption", default="all",
                   help="'all' (the 15 image corruptions; the 5 sensor shifts for 1-D inputs), 'none' (the data as "
                        "it is: a real shift), or a comma list (`edgetune list corruptions`)")
    s.add_argument("--severity", type=int, default=5, choices=range(1, 6), metavar="{1..5}")
    s.add_argument("--protocol", default="episodic", choices=["episodic", "continual", "label-shift"])
    s.add_argument("--seed", type=_seed, default=0)
    s.add_argument("--samples-per-corruption", type=_count, default=None, metavar="N",
                   help="first N samples of a seeded permutation of the test split (default: all)")
    s.add_argument("--runtime", "--backbone", dest="backbone", default="torch",
                   choices=["torch", "onnx-int8", "compiled"],
                   help="torch: the float torch reference; onnx-int8: the exported int8 frozen.onnx in onnxruntime, "
                        "method step in torch; compiled: the whole sample in the bundle's TVM-compiled C (int8 "
                        "backbone + training step + C runtime) built for this machine")
    s.add_argument("--labelled-fraction", type=_fraction, default=0.0, metavar="P",
                   help="supervised mode: reveal the label of this fraction of samples after scoring them")
    s.add_argument("--task", default="same", choices=["same", "new"],
                   help="same: the stream has the source's classes; new: transfer to the stream's own classes (the "
                        "method's class layers start at zero and learn them from revealed labels; needs "
                        "--labelled-fraction). A stream of another built-in dataset than the source needs 'new'")
    s.add_argument("--learner", default=None, metavar="KEY=VALUE,...", help=LEARNER_HELP + "; needs "
                   "--labelled-fraction")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a method config field (see `edgetune list methods -v`)")
    s.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    s.set_defaults(func=_cmd_eval, usage_error=s.error)

    s = sub.add_parser("export", help="fit the method's attachments and write a deployable bundle")
    s.add_argument("model", help="a model.onnx file (then no --checkpoint), or the checkpoint's model name")
    s.add_argument("--method", required=True)
    s.add_argument("--checkpoint", default=None, help="folder written by train-source or import-checkpoint")
    _onnx_options(s)
    s.add_argument("--target", default="host", help="see `edgetune list targets`")
    s.add_argument("-o", "--out", required=True, help="bundle folder to write")
    add_data_options(s, None, "same as --source-data:", source=True)
    s.add_argument("--no-quantize", action="store_true", help="keep the frozen backbone in float32")
    s.add_argument("--seed", type=_seed, default=0)
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a method config field (see `edgetune list methods -v`)")
    s.add_argument("--learner", default=None, metavar="KEY=VALUE,...", help=LEARNER_HELP)
    s.add_argument("--task", default="same", choices=["same", "new"],
                   help="same: the bundle predicts the source's classes; new: transfer to the classes of the stream "
                        "--data names (the method's class layers start at zero and learn them on the device from "
                        "revealed labels: simulate --labelled-fraction F); the source stays the model's training "
                        "data (or --source-data)")
    s.add_argument("--no-compile", action="store_true",
                   help="host: only the ONNX bundle, without compiling it for this machine")
    s.add_argument("--build", action="store_true",
                   help="device targets: also build the project with the target's toolchain (as `edgetune build`)")
    s.set_defaults(func=_cmd_export, usage_error=s.error)

    s = sub.add_parser("inspect", help="print a bundle's manifest and memory table, or a model.onnx's tap candidates")
    s.add_argument("bundle", help="bundle folder, or a .onnx model")
    s.add_argument("--classifier", default=None, metavar="NODE", help="model.onnx: the classifier Gemm/MatMul")
    s.set_defaults(func=_cmd_inspect)

    from edgetune.deploy.commands import add_commands
    add_commands(sub)
    for command in sub.choices.values():
        # --debug is accepted after the verb too; SUPPRESS keeps the top-level value when absent.
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show the traceback of an error")
    return p


def _onnx_options(s: argparse.ArgumentParser) -> None:
    s.add_argument("--taps", default=None, metavar="NAME[,NAME...]",
                   help="model.onnx: tensor names where the stages end, in graph order (default: the classifier's "
                        "input feature; `edgetune inspect model.onnx` lists candidates)")
    s.add_argument("--classifier", default=None, metavar="NODE",
                   help="model.onnx: the Gemm/MatMul that becomes the trainable classifier (default: the last)")


def _quiet() -> None:
    """Normal output is edgetune's own: third-party warnings and INFO logs stay out of it."""
    warnings.filterwarnings("ignore")
    logging.getLogger().setLevel(logging.ERROR)


@contextlib.contextmanager
def _native_stderr_to_null():
    """Silence what native libraries write straight to file descriptor 2 (TVM's C++ LOG(WARNING) has no
    switch), while Python's ``sys.stderr`` (progress bars, the error line) keeps the real stream.

    Only when ``sys.stderr`` is descriptor 2 itself (a terminal or a redirected file); under a capturing
    test runner nothing changes. Every tool edgetune runs as a subprocess captures its own output.
    """
    try:
        real = sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):
        real = False
    if not real:
        yield
        return
    sys.stderr.flush()
    # ``saved`` stays open for the life of the process: a progress bar may still hold the stream on it.
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    old_stderr = sys.stderr
    os.dup2(null, 2)
    os.close(null)
    sys.stderr = open(saved, "w", buffering=1, encoding=old_stderr.encoding, errors="backslashreplace",
                      closefd=False)
    try:
        yield
    finally:
        sys.stderr.flush()
        sys.stderr = old_stderr
        os.dup2(saved, 2)


def _error_line(text: str) -> None:
    """The one error line, on a line of its own: progress bars the failure left open are closed first."""
    from tqdm import tqdm
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
    print(text, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = bool(getattr(args, "debug", False)) or os.environ.get("EDGETUNE_DEBUG", "") not in ("", "0")
    if not debug:
        _quiet()
    try:
        with contextlib.nullcontext() if debug else _native_stderr_to_null():
            args.func(args)
    except EdgetuneError as exc:
        if debug:
            raise
        first, _, table = str(exc).partition("\n")
        _error_line(f"edgetune: error: {' '.join(first.split())}")  # one line, whatever a message quoted
        if isinstance(exc, BudgetError) and table:  # what takes the memory, as the table it is
            print(table, file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("edgetune: interrupted", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    except OSError as exc:  # the machine refused (disk full, permissions): the user's to fix, not a bug
        if debug:
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        _error_line(f"edgetune: error: {args.command}: {exc.strerror or type(exc).__name__}{where}; check the path, "
                    "its permissions and free space")
        return ConfigError.exit_code
    except Exception as exc:  # anything else is a bug in edgetune: say so in one line, keep the traceback opt-in
        if debug:
            raise
        what = " ".join(str(exc).split())[:160]
        _error_line(f"edgetune: error: internal error in {args.command} ({type(exc).__name__}: {what}); this is a "
                    "bug in edgetune: re-run with --debug (or EDGETUNE_DEBUG=1) for the traceback and report it")
        return BUG_EXIT_CODE
    return 0


if __name__ == "__main__":
    sys.exit(main())
