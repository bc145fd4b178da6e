"""Emitters for LLVM targets: a native shared library (host, aarch64) and its kernels object.

The library needs no TVM runtime: LLVM compiles the plan's kernels into an object file, the
driver generated from the static plan (``emit_c.write_driver``) calls them in order on one
arena, and the target's C compiler links both (with the workspace pool) into
``<prefix>_<target>.so`` exporting ``<prefix>_run``. The same object and driver sources are
left next to it for a C runtime that links statically (``-static`` on Android, a firmware).

(TVM's Relax VM is the other way to run a lowered module on a machine with TVM installed:
``pipeline.build_vm``. It costs ~10 us of interpreter overhead per kernel call, which for
these small graphs is more than the kernels themselves.)
"""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tvm

from edgetune.compilers.plan import StaticPlan
from edgetune.errors import ConfigError, ToolchainError
from edgetune.registry import Registry


@dataclass(frozen=True)
class EmitTarget:
    """Where compiled code runs: a TVM target (JSON dict) and the C compiler that links for it."""

    name: str
    tvm_target: dict[str, Any] = field(default_factory=dict)
    cc: str | None = None
    cflags: tuple[str, ...] = ("-O2",)

    def target(self) -> tvm.target.Target:
        return tvm.target.Target(self.tvm_target)

    @property
    def kind(self) -> str:
        return str(self.tvm_target.get("kind", "llvm"))


def _host() -> EmitTarget:
    # the host library only ever runs here: let LLVM use every instruction this CPU has
    return EmitTarget("host", {"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()}, "gcc")


TARGETS: Registry = Registry("compile target")
TARGETS.add("host", _host)
TARGETS.add("aarch64", lambda: EmitTarget("aarch64", {"kind": "llvm", "mtriple": "aarch64-linux-gnu",
                                                       "mattr": ["+neon"]}, "aarch64-linux-gnu-gcc"))
TARGETS.add("c", lambda: EmitTarget("c", {"kind": "c"}))


def resolve_target(target: str | EmitTarget) -> EmitTarget:
    """``"host"``, ``"aarch64"``, ``"c"`` or an ``EmitTarget`` (e.g. built from targets/*.json).

    Raises:
        ConfigError: unknown target name (the message lists the known ones).
    """
    if isinstance(target, EmitTarget):
        return target
    if not isinstance(target, str):
        raise ConfigError(f"compile: target must be a name or an EmitTarget (got {type(target).__name__})")
    return TARGETS.get(target)()


def kernel_module(lowered: tvm.IRModule, plan: StaticPlan, prefix: str) -> tvm.IRModule:
    """The plan's kernels as exported functions named ``<prefix>_<kernel>`` (unique across programs)."""
    return tvm.IRModule({f"{prefix}_{k.name}": lowered[k.name].with_attr("global_symbol", f"{prefix}_{k.name}")
                         for k in plan.kernels})


def emit_object(lowered: tvm.IRModule, plan: StaticPlan, target: EmitTarget, path: Path, prefix: str) -> Path:
    """Compile the plan's kernels (no VM, no argument checks) to an object file for ``target``."""
    with tvm.transform.PassContext(opt_level=3, config={"tirx.disable_assert": True}):
        built = tvm.tirx.build(kernel_module(lowered, plan, prefix), target=target.target())
    path.parent.mkdir(parents=True, exist_ok=True)
    built.write_to_file(str(path))
    return path


def link_shared(target: EmitTarget, sources: list[Path], include: Path, out: Path) -> Path:
    """Compile and link C sources and objects into a shared library with ``target.cc``.

    Raises:
        ToolchainError: the compiler is missing or fails (its first error line is shown).
    """
    if target.cc is None or shutil.which(target.cc) is None:
        raise ToolchainError(f"compile: C compiler {target.cc!r} for target {target.name} is not installed; install "
                             "it (Debian: gcc, gcc-aarch64-linux-gnu) or emit C source (target 'c')")
    cmd = [target.cc, *target.cflags, "-fPIC", "-shared", f"-I{include}", *map(str, sources), "-o", str(out), "-lm"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        first = next((ln for ln in done.stderr.splitlines() if "error" in ln), done.stderr.strip()[:200])
        raise ToolchainError(f"compile: {target.cc} failed to build {out.name} ({first}); check the toolchain")
    return out


def aligned_empty(shape: tuple[int, ...], dtype: str, alignment: int) -> np.ndarray:
    """An uninitialised numpy array whose data is ``alignment``-byte aligned (kernels assume it)."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + alignment, np.uint8)
    start = (-raw.ctypes.data) % alignment
    return raw[start:start + nbytes].view(dtype).reshape(shape)
