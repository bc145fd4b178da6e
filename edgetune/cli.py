"""The ``edgetune`` command line: one verb per stage of the pipeline.

Errors a user can fix print one line and exit 1; usage errors exit 2; ``--debug`` shows tracebacks.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

from edgetune.errors import ConfigError, EdgetuneError
from edgetune.version import __version__


def _overrides(pairs: list[str]) -> dict[str, str]:
    out = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set: expected key=value (got {p!r}); e.g. --set lr=0.001")
        out[key.strip()] = value.strip()
    return out


def _cmd_list(args: argparse.Namespace) -> None:
    if args.what == "models":
        from edgetune.models import MODEL_HELP, MODELS
        for n in MODELS:
            print(f"{n:<14} {MODEL_HELP.get(n, '')}")
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


def _load(args: argparse.Namespace):
    from edgetune.checkpoint import load_checkpoint
    backbone, config = load_checkpoint(args.checkpoint)
    model = getattr(args, "model", None)
    if model and model != config["model"]:
        raise ConfigError(f"--model {model} does not match the checkpoint's model {config['model']!r}; "
                          "drop --model or pass the matching checkpoint")
    return backbone, config


def _cmd_train(args: argparse.Namespace) -> None:
    from edgetune.data import load_dataset
    from edgetune.train import train_source
    report = train_source(args.model, load_dataset(args.data), args.out, epochs=args.epochs, lr=args.lr,
                          seed=args.seed, augment=not args.no_augment, train_images=args.train_images)
    print(f"wrote {args.out}: val accuracy {100 * report['val_accuracy']:.1f}%, "
          f"test accuracy {100 * report['test_accuracy']:.1f}% ({report['train_seconds']} s)")


def _cmd_eval(args: argparse.Namespace) -> None:
    from edgetune.data import load_dataset, parse_corruptions
    from edgetune.evaluate import evaluate

    backbone, config = _load(args)
    report = evaluate(backbone, config["model"], args.method, load_dataset(args.data),
                      parse_corruptions(args.corruption), args.severity, args.protocol, args.seed,
                      args.samples_per_corruption, args.backbone, _overrides(args.set),
                      args.labelled_fraction, progress=not args.json)
    print(json.dumps(report.to_json(), indent=2) if args.json else report.table())


def _cmd_export(args: argparse.Namespace) -> None:
    from edgetune.adapt import fit, prepare
    from edgetune.data import load_dataset
    from edgetune.export import export
    backbone, config = _load(args)
    data = load_dataset(args.data or config.get("data", "digits"))
    adaptable = prepare(backbone, args.method, _overrides(args.set), model_name=config["model"])
    fit(adaptable, data, seed=args.seed)
    manifest = export(adaptable, data, args.out, quantize=not args.no_quantize, target=args.target)
    print(f"wrote {args.out} ({manifest.method} on {manifest.model}, target {args.target})")
    from edgetune.deploy.commands import deploy_after_export
    line = deploy_after_export(args.out, adaptable.method, args.target, build_it=args.build,
                               compile_host=not args.no_compile)
    if line:
        print(line)


def _cmd_inspect(args: argparse.Namespace) -> None:
    from edgetune.export import load_manifest
    from edgetune.memory import format_memory_table
    manifest = load_manifest(args.bundle)
    print(manifest.describe())
    print(format_memory_table(manifest.memory))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgetune",
        description="Keep a pretrained model learning on the device it is deployed to: int8 frozen backbone, "
                    "small trainable attachments, test-time adaptation one sample at a time.")
    p.add_argument("--version", action="version", version=f"edgetune {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("list", help="list models, methods, targets or corruptions")
    s.add_argument("what", choices=["models", "methods", "targets", "corruptions"])
    s.add_argument("-v", "--verbose", action="store_true", help="methods: show every config field with its help")
    s.set_defaults(func=_cmd_list)

    s = sub.add_parser("train-source", help="train a zoo backbone on clean source data (writes a checkpoint)")
    s.add_argument("--model", required=True, help="zoo name (see `edgetune list models`) or package.module:callable")
    s.add_argument("--data", default="digits", choices=["digits", "fashion-mnist"])
    s.add_argument("-o", "--out", required=True, help="checkpoint folder to write")
    s.add_argument("--epochs", type=int, default=15)
    s.add_argument("--lr", type=float, default=3e-3)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--train-images", type=int, default=None, metavar="N",
                   help="train on a seeded subset of N training images (default: all)")
    s.add_argument("--no-augment", action="store_true", help="no random-shift augmentation")
    s.set_defaults(func=_cmd_train)

    s = sub.add_parser("eval", help="online test-time adaptation on a corrupted stream, next to source")
    s.add_argument("--model", help="model name (optional: taken from the checkpoint)")
    s.add_argument("--checkpoint", required=True, help="folder written by train-source")
    s.add_argument("--method", required=True, help="see `edgetune list methods`")
    s.add_argument("--data", default="digits", choices=["digits", "fashion-mnist"])
    s.add_argument("--corruption", default="all", help="'all' (the 15 test corruptions), 'clean', or a comma list")
    s.add_argument("--severity", type=int, default=5, choices=range(1, 6), metavar="{1..5}")
    s.add_argument("--protocol", default="episodic", choices=["episodic", "continual", "label-shift"])
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--samples-per-corruption", type=int, default=None, metavar="N",
                   help="first N samples of a seeded permutation of the test split (default: all)")
    s.add_argument("--runtime", "--backbone", dest="backbone", default="torch",
                   choices=["torch", "onnx-int8", "compiled"],
                   help="torch: the float torch reference; onnx-int8: the exported int8 frozen.onnx in onnxruntime, "
                        "method step in torch; compiled: the whole sample in the bundle's TVM-compiled C (int8 "
                        "backbone + training step + C runtime) built for this machine")
    s.add_argument("--labelled-fraction", type=float, default=0.0, metavar="P",
                   help="supervised mode: reveal the label of this fraction of samples after scoring them")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a method config field (see `edgetune list methods -v`)")
    s.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    s.set_defaults(func=_cmd_eval)

    s = sub.add_parser("export", help="fit the method's attachments and write a deployable bundle")
    s.add_argument("model", help="model name (must match the checkpoint)")
    s.add_argument("--method", required=True)
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--target", default="host", help="see `edgetune list targets`")
    s.add_argument("-o", "--out", required=True, help="bundle folder to write")
    s.add_argument("--data", default=None, help="source data for fitting and calibration (default: the checkpoint's)")
    s.add_argument("--no-quantize", action="store_true", help="keep the frozen backbone in float32")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a method config field (see `edgetune list methods -v`)")
    s.add_argument("--no-compile", action="store_true",
                   help="host: only the ONNX bundle, without compiling it for this machine")
    s.add_argument("--build", action="store_true",
                   help="device targets: also build the project with the target's toolchain (as `edgetune build`)")
    s.set_defaults(func=_cmd_export)

    s = sub.add_parser("inspect", help="print a bundle's manifest and memory table")
    s.add_argument("bundle")
    s.set_defaults(func=_cmd_inspect)

    from edgetune.deploy.commands import add_commands
    add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except EdgetuneError as exc:
        if args.debug:
            raise
        print(f"edgetune: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("edgetune: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
