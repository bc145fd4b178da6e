"""The CLI verbs of deployment: ``edgetune build OUT/`` and ``edgetune simulate OUT/ ...``.

``add_commands(sub)`` adds both to ``edgetune.cli``'s sub-parsers; ``deploy_after_export``
is what ``edgetune export --target T`` runs after writing the bundle.
"""
from __future__ import annotations

import argparse
import json


def _cmd_build(args: argparse.Namespace) -> None:
    from edgetune.deploy.build import build

    for built in build(args.bundle, args.target):
        ram = "static RAM" if built.project.kind == "mcu" else "static data"
        print(f"built {built.program} ({built.project.target}): flash {built.flash_bytes:,} B, "
              f"{ram} {built.static_ram_bytes:,} B")


def _cmd_simulate(args: argparse.Namespace) -> None:
    from edgetune.simulate import simulate

    report = simulate(args.bundle, args.data, args.corruption, args.severity, args.n, args.protocol, args.seed,
                      args.target, args.labelled_fraction, args.workdir, progress=True, resize=args.resize,
                      crop=args.crop)
    print(json.dumps(report.to_json(), indent=2) if args.json else report.table())


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``build`` and ``simulate`` to the CLI's sub-parsers."""
    s = sub.add_parser("build", help="build a bundle's device projects with each target's toolchain (make)")
    s.add_argument("bundle", help="bundle folder written by `edgetune export --target T`")
    s.add_argument("--target", default=None, help="only this target's project")
    s.set_defaults(func=_cmd_build)

    s = sub.add_parser("simulate", help="run a bundle's device program in QEMU on a corrupted stream")
    s.add_argument("bundle", help="bundle folder written by `edgetune export --target T`")
    s.add_argument("--target", default=None, help="which project when the bundle has several")
    from edgetune.data.options import add_data_options
    add_data_options(s, None, "the stream (its test split; default: the data the bundle was fitted on, or the data "
                              "whose classes a bundle exported with --task new learns):")
    s.add_argument("--corruption", default="gaussian_noise",
                   help="a name, a comma list, 'all', or 'none' (the data as it is: a real shift)")
    s.add_argument("--severity", type=int, default=5, choices=range(1, 6), metavar="{1..5}")
    from edgetune.cli import _fraction, _seed  # the CLI's checked number types (the CLI is loaded)
    s.add_argument("--n", type=int, default=300,  # n < 1: simulate's ConfigError (exit 1)
                   help="samples in the stream (split over the corruptions; more than the stream has is an error)")
    s.add_argument("--protocol", default="episodic", choices=["episodic", "continual", "label-shift"])
    s.add_argument("--seed", type=_seed, default=0)
    s.add_argument("--labelled-fraction", type=_fraction, default=0.0, metavar="P",
                   help="supervised mode: reveal this fraction of labels after scoring (a bundle exported with "
                        "--task new learns its classes from them only: P > 0)")
    s.add_argument("--workdir", default=None, help="keep the stream, results and state files here")
    s.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    s.set_defaults(func=_cmd_simulate)


def deploy_after_export(bundle_dir: str, method, target: str, build_it: bool = False, compile_host: bool = True) -> str:
    """After ``export(..., target=T)``: keep the method's initial statistics in the bundle (hashed in its
    manifest, ``seal_bundle``) and write
    (and optionally build) ``bundle/<T>/``. For the host (``compile_host``): the model's C (one TVM
    compile) and the host library built from it, in ``bundle/host/``. Returns a one-line summary.

    Raises:
        BudgetError, CompileError, ToolchainError: see ``write_target_project`` and ``build``.
    """
    from pathlib import Path

    from edgetune.deploy.build import build_project
    from edgetune.deploy.project import save_initial_state, write_model_sources, write_target_project
    from edgetune.export import load_manifest

    save_initial_state(bundle_dir, method)  # sealed: part of the bundle's hashed files from here on
    if target == "host":
        if not compile_host:
            return ""
        if not load_manifest(bundle_dir).frozen.quantized:
            return "host: a float bundle; nothing compiled (the compiler lowers int8 backbones)"
        import shutil

        from edgetune.cruntime import build_shared

        # one TVM compile: the model's C (backbone kernels + training step) is generated once, and the
        # host library is that C built by the host compiler (the library `eval --runtime compiled` loads,
        # found again in the build cache), not a second lowering of the backbone by TVM's LLVM backend
        host = Path(bundle_dir) / "host"
        model = host / "model"
        write_model_sources(bundle_dir, model)
        library = build_shared([model / "et_model_gen.c", model / "et_kernels.c", model / "tvm_workspace.c"],
                               [model, model / "include"])
        shutil.copyfile(library, host / "libedgetune.so")
        return (f"wrote {host} (the int8 backbone compiled for this machine, once: the model's C in model/ and "
                "libedgetune.so built from it, what `edgetune eval --runtime compiled` runs)")
    project = write_target_project(bundle_dir, target)
    line = f"wrote {project.directory} (model C + runtime + Makefile)"
    if build_it:
        built = build_project(project)
        line += f"; built {built.program.name}: flash {built.flash_bytes:,} B"
    return line


__all__ = ["add_commands", "deploy_after_export"]
