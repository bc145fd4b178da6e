"""``write_target_project``: a bundle -> ``OUT/<target>/``, a self-contained C project for one device.

    OUT/<target>/  Makefile  README.md  project.json
                   model/    generated: et_model_gen.c/.h (weights, plan, entry points),
                             et_port_gen.c (for the app), et_kernels.c (TVM's C kernels),
                             tvm_workspace.c, include/ (tvm-ffi / dlpack headers)
                   runtime/  the C runtime (targets/runtime)
                   app/      the streaming program (targets/app) and its main for this kind of device
                   board/ + link.ld   microcontrollers: startup, SysTick, semihosting; the linker
                                      script's RAM/flash lengths are the target's budget
                   portable/ microcontrollers: runtime + model only, for STM32Cube / Zephyr projects

Microcontroller bundles are checked against the target's budget twice before anything is written
(``BudgetError`` with the table): estimated from the ONNX graphs before any TVM work
(``edgetune.deploy.estimate``), then with the generated model's exact figures. The model C is
the same on every microcontroller (TVM's C kernels), so the host build of it is an exact oracle of
the device build. A Linux target's model is lowered for its CPU (``compile_model(..., tvm_target)``):
its driver, its LLVM kernels object and its C kernels (``make KERNELS=c``) all come from that one
plan, whose kernel symbols carry the plan's id, so no driver links with kernels of another plan.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgetune.deploy.budget import MemoryBudget, check_budget, firmware_budget
from edgetune.deploy.estimate import estimate_bundle
from edgetune.deploy.streams import StateEntry
from edgetune.deploy.templates import linux_makefile, linux_readme, mcu_makefile, mcu_readme, portable_readme
from edgetune.errors import CheckpointError, ConfigError, ExportError
from edgetune.targets import BOARD_DIR, HERE, RUNTIME_DIR, Target, get_target

APP_DIR = HERE / "app"
STATE_FILE = "initial_state.npz"
PROJECT_FILE = "project.json"
FORMAT = "edgetune-target-project/1"
# the last bundle's GeneratedModels (compilers/model.py), one per lowering (the C target, each Linux
# target's CPU), kept while its targets are written
_GENERATED: dict[tuple, Any] = {}


@dataclass(frozen=True)
class TargetProject:
    """What ``write_target_project`` wrote: where, for which target, and what it will take."""

    directory: Path
    target: str
    kind: str
    method: str
    model: str
    classes: int
    input_shape: tuple[int, ...]
    inference_only: bool
    learns: bool
    state_layout: tuple[StateEntry, ...]
    memory: dict[str, int]  # ModelMemory fields
    budget_rows: tuple[tuple[str, int, int], ...]  # (what, flash, SRAM) estimated before building
    macs: int  # multiply-accumulates of the frozen backbone per sample
    kernels: int
    program: str  # what ``make`` produces and the simulator runs, relative to ``directory``
    compile_seconds: dict[str, float]

    def to_json(self) -> str:
        d = asdict(self)
        d["directory"] = "."
        return json.dumps({"format": FORMAT, **d}, indent=1) + "\n"

    @staticmethod
    def load(directory: str | Path) -> "TargetProject":
        """Read ``project.json`` of a written project.

        Raises:
            CheckpointError: not a target project of this format.
        """
        d = Path(directory)
        try:
            raw = json.loads((d / PROJECT_FILE).read_text())
            if raw.pop("format") != FORMAT:
                raise ValueError("format")
            raw["directory"] = d
            raw["input_shape"] = tuple(raw["input_shape"])
            raw["state_layout"] = tuple(StateEntry(e["name"], e["kind"], tuple(e["shape"]))
                                        for e in raw["state_layout"])
            raw["budget_rows"] = tuple(tuple(r) for r in raw["budget_rows"])
            return TargetProject(**raw)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"project: {d} has no readable {PROJECT_FILE} ({exc}); write it with "
                                  "edgetune.deploy.write_target_project (edgetune export --target)") from None


def save_initial_state(bundle_dir: str | Path, method) -> Path:
    """Write the method's running statistics as they are now (right after ``fit``) into the bundle,
    keyed by their trainable.onnx input names: the firmware starts from them. The bundle's manifest
    then records the file's hash (``seal_bundle``), so an edited initial state is refused later.

    Raises:
        CheckpointError: the bundle's graphs do not match its manifest (see ``seal_bundle``).
    """
    from edgetune.export.manifest import MANIFEST_FILE, load_manifest, onnx_name, seal_bundle

    path = Path(bundle_dir) / STATE_FILE
    sealed = (Path(bundle_dir) / MANIFEST_FILE).is_file()
    if sealed and load_manifest(bundle_dir, side_files=False).norm_align:
        # norm-align's state is its step's (int8 source statistics and folds), written by export; the torch
        # method's buffers are the float reference's. Side files written since (source.json) are sealed.
        seal_bundle(bundle_dir)
        return path
    arrays = {f"state_{onnx_name(n)}": method.get_buffer(n).detach().cpu().numpy().astype(np.float32)
              for n in method.state_names()}
    np.savez(path, **arrays)
    if sealed:
        seal_bundle(bundle_dir)
    return path


def load_initial_state(bundle_dir: str | Path) -> dict[str, np.ndarray]:
    """The bundle's initial running statistics, by trainable.onnx input name ({} when there are none)."""
    path = Path(bundle_dir) / STATE_FILE
    if not path.is_file():
        return {}
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def backbone_macs(onnx_path: str | Path) -> int:
    """Multiply-accumulates of one forward of an ONNX graph, from inferred shapes: Conv of any rank
    (output elements x input channels per group x kernel elements), Gemm and MatMul (output elements
    x inner size); norms, activations and pools count as free."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(onnx_path)))
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*model.graph.value_info, *model.graph.input, *model.graph.output]}
    shapes.update({t.name: list(t.dims) for t in model.graph.initializer})
    macs = 0
    for node in model.graph.node:
        out = shapes.get(node.output[0])
        if not out:
            continue
        if node.op_type == "Conv":
            w = shapes.get(node.input[1], [])
            if len(w) >= 3:  # 1-D and 2-D convs alike
                macs += int(np.prod(out)) * int(np.prod(w[1:]))
        elif node.op_type in ("Gemm", "MatMul"):
            a = shapes.get(node.input[0], [])
            if a:
                macs += int(np.prod(out)) * a[-1]
    return macs


def write_target_project(bundle_dir: str | Path, target: str | Target, inference_only: bool = False,
                         out_dir: str | Path | None = None) -> TargetProject:
    """Compile the bundle for ``target`` and write its C project into ``bundle_dir/<target>/``
    (or ``out_dir``), replacing what was there.

    ``inference_only``: no training step (parameters in flash); the baseline the adaptation's
    memory is compared to.

    Raises:
        BudgetError: a microcontroller firmware would not fit the target's flash or SRAM (the
            message carries the table); nothing is written then.
        ConfigError: the target cannot run bundles (the host) or is unknown.
        CheckpointError: the bundle is missing or corrupt.
        ExportError: the bundle has running statistics but no initial values for them, or the
            output directory holds something that is not a target project.
        CompileError: a graph cannot be compiled.
    """
    t = target if isinstance(target, Target) else get_target(target)
    if t.kind == "host":
        raise ConfigError("project: the host runs bundles through edgetune itself (edgetune eval --runtime "
                          "compiled); pick a device target (edgetune list targets)")
    bundle = Path(bundle_dir)
    if t.kind == "mcu":  # from the graphs alone: an oversized model is refused in seconds, not after TVM's minutes
        _check_estimate(bundle, t, inference_only)
    manifest, generated = _generate(bundle, inference_only, t.tvm_target if t.kind == "linux" else None)
    memory = asdict(generated.sources.memory)
    learner = manifest.memory.get("replay_buffer", 0) if generated.sources.memory.params > 0 else 0
    budget = firmware_budget(t, memory, generated.kernels, learner)
    if t.kind == "mcu":
        check_budget(budget, manifest.frozen.quantized, manifest.method, manifest.model)

    out = Path(out_dir) if out_dir is not None else bundle / t.name
    if out.exists() and any(out.iterdir()) and not (out / PROJECT_FILE).is_file():
        raise ExportError(f"project: {out} exists and is not a target project (no {PROJECT_FILE}); give a new or "
                          "empty directory so nothing else is overwritten")
    if out.exists():
        shutil.rmtree(out)
    _write_model(generated, out / "model")
    _copy(RUNTIME_DIR, out / "runtime", ("*.c", "*.h"))
    _copy(APP_DIR, out / "app", ("et_app.c", "et_app.h", "et_app_mcu.c" if t.kind == "mcu" else "et_app_linux.c"))
    name = f"{manifest.method} on {manifest.model}"
    if t.kind == "mcu":
        _copy(BOARD_DIR / "cortex-m", out / "board", ("*.c", "*.h"))
        (out / "link.ld").write_text(t.linker_script())
        (out / "Makefile").write_text(mcu_makefile(t, name))
        (out / "README.md").write_text(mcu_readme(t, name, budget.table()))
        _portable(out, t, name)
        program = "build/fw.elf"
    else:
        from edgetune.compilers.model import emit_kernels_object

        emit_kernels_object(generated, t.tvm_target, out / "model" / "et_kernels_llvm.o")
        (out / "Makefile").write_text(linux_makefile(t, name))
        (out / "README.md").write_text(linux_readme(t, name))
        program = "build/edgetune-run"
    project = TargetProject(
        out, t.name, t.kind, manifest.method, manifest.model, manifest.num_classes, tuple(manifest.input.shape),
        inference_only, generated.sources.memory.params > 0,
        tuple(StateEntry(n, k, s) for n, k, s in generated.sources.state_layout), memory,
        tuple((r.what, r.flash, r.sram) for r in budget.rows), backbone_macs(bundle / manifest.frozen.file),
        generated.kernels, program, generated.seconds)
    (out / PROJECT_FILE).write_text(project.to_json())
    return project


def _check_estimate(bundle: Path, t: Target, inference_only: bool) -> None:
    from edgetune.export import load_manifest

    manifest = load_manifest(bundle)
    check_budget(estimate_bundle(bundle, t, inference_only), manifest.frozen.quantized, manifest.method,
                 manifest.model, estimated=True)


def _generate(bundle: Path, inference_only: bool = False, tvm_target: dict | None = None):
    """(manifest, GeneratedModel) of a bundle: both graphs compiled once per bundle content and
    lowering (``tvm_target``: None, the C target; a Linux target's LLVM target)."""
    from edgetune.compilers.model import compile_model  # compilers import tvm: only here
    from edgetune.export import load_manifest

    manifest = load_manifest(bundle)
    states = [i.name for i in manifest.trainable.inputs if i.role == "state"]
    initial = load_initial_state(bundle)
    if states and not set(states) <= set(initial):
        raise ExportError(f"project: {bundle} has running statistics ({', '.join(states)}) but no {STATE_FILE} "
                          "with their initial values; re-export the bundle with this edgetune version")
    content = (str(bundle.resolve()), manifest.frozen.sha256, manifest.trainable.sha256,
               tuple(sorted((k, v.tobytes()) for k, v in initial.items())), inference_only)
    lowering = json.dumps(tvm_target, sort_keys=True) if tvm_target is not None else "c"
    if any(k[0] != content for k in _GENERATED):  # another bundle: its compiles are not needed any more
        _GENERATED.clear()
    if (content, lowering) not in _GENERATED:  # one compile per lowering serves every target of that kind
        _GENERATED[(content, lowering)] = compile_model(bundle, manifest, initial, inference_only, tvm_target)
    return manifest, _GENERATED[(content, lowering)]


def _write_model(generated, model_dir: Path) -> None:
    from edgetune.compilers.emit_c import copy_headers, write_workspace

    model_dir.mkdir(parents=True, exist_ok=True)
    for name, text in generated.sources.files.items():
        (model_dir / name).write_text(text)
    (model_dir / "et_kernels.c").write_text(generated.kernels_c)
    (model_dir / "edgetune.h").write_text(EMBED_HEADER)
    write_workspace(model_dir / "tvm_workspace.c", generated.workspace_bytes)
    copy_headers(model_dir / "include")


def write_model_sources(bundle_dir: str | Path, model_dir: str | Path) -> tuple[Any, tuple[StateEntry, ...]]:
    """Write only a bundle's generated model C (no runtime, app or board) into ``model_dir``, for
    building it into something else, e.g. the host library of ``edgetune.deploy.host``.
    Returns (manifest, state layout).

    Raises:
        CheckpointError, ExportError, CompileError: as ``write_target_project``.
    """
    manifest, generated = _generate(Path(bundle_dir))
    _write_model(generated, Path(model_dir))
    return manifest, tuple(StateEntry(n, k, s) for n, k, s in generated.sources.state_layout)


def _copy(src: Path, dst: Path, patterns: tuple[str, ...]) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for pattern in patterns:
        for f in sorted(src.glob(pattern)):
            shutil.copyfile(f, dst / f.name)


def _portable(out: Path, t: Target, name: str) -> None:
    """runtime + model without startup, app or build files, for an existing board project."""
    port = out / "portable"
    _copy(out / "runtime", port / "runtime", ("*.c", "*.h"))
    _copy(out / "model", port / "model", ("et_model_gen.c", "et_model_gen.h", "et_kernels.c", "tvm_workspace.c",
                                          "edgetune.h"))
    shutil.copytree(out / "model" / "include", port / "model" / "include")
    (port / "README.md").write_text(portable_readme(t, name))


def budget_of(project: TargetProject) -> MemoryBudget:
    """The pre-build memory estimate of a written project."""
    from edgetune.deploy.budget import MemoryRow

    t = get_target(project.target)
    return MemoryBudget(t.name, tuple(MemoryRow(*r) for r in project.budget_rows), t.flash_bytes, t.ram_bytes)


EMBED_HEADER = """/* edgetune: the one header an application includes (runtime API + this bundle's model).
 *
 *   const et_model *model;  et_runtime_config cfg;  static et_runtime rt;
 *   static uint32_t work[(EDGETUNE_MODEL_WORK_BYTES + 3) / 4];
 *   edgetune_model_reset();  edgetune_model(&model);  edgetune_model_config(&cfg);
 *   et_runtime_init(&rt, model, &cfg, work, sizeof work);
 *   for each sample: et_runtime_step(&rt, x, &result);   (result.prediction)
 */
#ifndef EDGETUNE_H
#define EDGETUNE_H

#include "edgetune_runtime.h"
#include "et_model_gen.h"

#endif /* EDGETUNE_H */
"""

__all__ = ["STATE_FILE", "TargetProject", "backbone_macs", "budget_of", "load_initial_state", "save_initial_state",
           "write_model_sources", "write_target_project"]
