"""Does a bundle fit a microcontroller? Flash and SRAM by what takes them, checked before building.

The figures come from the generated model (``ModelMemory`` of ``compilers/emit_model.py``: arena,
workspace, parameters, ... exactly as the C declares them) plus what every firmware carries:
the runtime's own state, newlib + the app's static data, and the stack and heap the board's
linker script reserves. Code size is an estimate until the firmware is linked (the linker script
holds the real limits, so an estimate that is too low still fails the link).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from edgetune.errors import BudgetError
from edgetune.targets import Target, list_targets

# Measured on the cortex-m4 firmware (arm-none-eabi-gcc -O2, newlib + rdimon): runtime + app +
# board + libc code, and the static data of newlib (stdio, semihosting) + runtime + app.
CODE_BASE_BYTES = 48 * 1024
CODE_PER_KERNEL_BYTES = 700
STATIC_DATA_BYTES = 4 * 1024 + 256  # measured 4,048 .. 4,112 B with the generated models of the corpus


@dataclass(frozen=True)
class MemoryRow:
    what: str
    flash: int
    sram: int


@dataclass(frozen=True)
class MemoryBudget:
    """Flash / SRAM of one firmware, row by row, next to the target's budget."""

    target: str
    rows: tuple[MemoryRow, ...]
    flash_budget: int | None
    sram_budget: int | None

    @property
    def flash(self) -> int:
        return sum(r.flash for r in self.rows)

    @property
    def sram(self) -> int:
        return sum(r.sram for r in self.rows)

    def problems(self) -> list[str]:
        out = []
        if self.flash_budget is not None and self.flash > self.flash_budget:
            out.append(f"flash {self.flash:,} B > {self.flash_budget:,} B")
        if self.sram_budget is not None and self.sram > self.sram_budget:
            out.append(f"SRAM {self.sram:,} B > {self.sram_budget:,} B")
        return out

    def table(self) -> str:
        width = max(28, *(len(r.what) for r in self.rows))
        lines = [f"{'memory of the ' + self.target + ' firmware':<{width}} {'flash B':>11} {'SRAM B':>11}"]
        for r in self.rows:
            lines.append(f"{r.what:<{width}} {_n(r.flash):>11} {_n(r.sram):>11}")
        lines.append(f"{'total':<{width}} {self.flash:>11,} {self.sram:>11,}")
        lines.append(f"{'budget':<{width}} {_n(self.flash_budget):>11} {_n(self.sram_budget):>11}")
        return "\n".join(lines)


def _n(v: int | None) -> str:
    return "-" if not v else f"{v:,}"


def firmware_budget(target: Target, model: Mapping[str, int], kernels: int, learner: int = 0) -> MemoryBudget:
    """The memory of a firmware for ``target`` around a generated model (``ModelMemory`` fields);
    ``learner``: the bytes of its learner's workspace (replay buffer, warm-up copy; the manifest's
    ``memory["replay_buffer"]``)."""
    board = target.board
    rows = [
        MemoryRow("frozen weights, constants, initial values", model["flash_constants"], 0),
        MemoryRow(f"code (estimate: runtime + libc + {kernels} kernels)",
                  CODE_BASE_BYTES + CODE_PER_KERNEL_BYTES * kernels, 0),
        MemoryRow("activation arena (frozen + method step)", 0, model["arena"]),
        MemoryRow("kernel workspace", 0, model["workspace"]),
        MemoryRow("taps", 0, model["taps"]),
        MemoryRow("trainable parameters", 0, model["params"]),
        MemoryRow("optimizer state", 0, model["optimizer"]),
        MemoryRow("running statistics", 0, model["state"]),
        MemoryRow("input sample, logits, target", 0, model["io"]),
        MemoryRow("runtime: guard histogram + weight snapshot", 0, model["runtime_work"]),
        MemoryRow("learner: replay buffer + warm-up copy", 0, learner),
        MemoryRow("static data (libc, runtime, app)", 0, STATIC_DATA_BYTES),
    ]
    if board is not None:
        rows += [MemoryRow("stack (reserved)", 0, board.stack_bytes), MemoryRow("heap (reserved, libc stdio)", 0,
                                                                                  board.heap_bytes)]
    return MemoryBudget(target.name, tuple(rows), target.flash_bytes, target.ram_bytes)


def analytic_budget(target: Target, categories: Mapping[str, int]) -> MemoryBudget:
    """A firmware budget from ``edgetune.memory.memory_table`` categories (methods that cannot be
    exported, e.g. tent: what one adaptation step would need on the device)."""
    flash_keys = {"frozen_weights", "float_constants"}
    rows = [MemoryRow(k.replace("_", " "), v if k in flash_keys else 0, 0 if k in flash_keys else v)
            for k, v in categories.items()]
    rows.append(MemoryRow("code (estimate)", CODE_BASE_BYTES, 0))
    if target.board is not None:
        rows += [MemoryRow("stack + heap (reserved)", 0, target.board.stack_bytes + target.board.heap_bytes)]
    return MemoryBudget(target.name, tuple(rows), target.flash_bytes, target.ram_bytes)


def check_budget(budget: MemoryBudget, quantized: bool = True, method: str = "", model: str = "",
                 estimated: bool = False) -> None:
    """Refuse a firmware that does not fit, before anything is built.

    Raises:
        BudgetError: flash or SRAM over the target's budget; the message's first line says by how
            much and what to try, then the table of what takes the memory.
    """
    problems = budget.problems()
    if not problems:
        return
    tries = []
    if not quantized:
        tries.append("int8 on (export without --no-quantize)")
    tries.append("a smaller model (e.g. mcunet-s or tiny-cnn)" if model not in ("tiny-cnn",) else
                 "a smaller input or fewer channels")
    tries.append("a method that keeps less (feature-align: no trainable state; tinytta --set hidden=0; "
                 "lst --set reduction=16)" if method else "a method that keeps less")
    bigger = [t.name for t in list_targets() if t.kind == "mcu" and (t.ram_bytes or 0) >= budget.sram
              and (t.flash_bytes or 0) >= budget.flash and t.name != budget.target]
    if bigger:
        tries.append(f"a target with more memory ({', '.join(bigger)})")
    how = ", estimated from the ONNX graphs before compiling" if estimated else ""
    raise BudgetError(f"budget: {method + ' on ' + model + ' ' if method else ''}does not fit {budget.target} "
                      f"({'; '.join(problems)}{how}); try {', or '.join(tries)}\n{budget.table()}")


def preflight_budget(model, target: str | Target, method: str | None = None, overrides: dict[str, str] | None = None,
                     quantize: bool = True, model_name: str = "", check: bool = True) -> MemoryBudget | None:
    """Refuse, in seconds and before any fit or compile, a model whose firmware cannot fit a
    microcontroller target. ``model`` is an ``Adaptable`` (``method`` None), or a backbone that
    is prepared here for ``method`` (with config ``overrides``, as ``--set`` strings). Both graphs
    are exported in float to a temporary folder and estimated from their shapes
    (``edgetune.deploy.estimate``: no TVM, nothing fitted). Returns the estimated table, or None
    for a target without a memory budget and for a method that cannot be exported (``export``
    refuses those itself). ``check=False`` returns the table without refusing.

    Raises:
        BudgetError: ``check`` and the estimate is over the target's flash or SRAM (the message
            carries the table).
        ConfigError: unknown target or method, or a bad override.
        ExportError: a graph cannot be exported to ONNX.
    """
    import tempfile
    from pathlib import Path

    import onnx
    import torch

    from edgetune.adapt import Adaptable, prepare
    from edgetune.deploy.estimate import MethodState, estimate_budget
    from edgetune.export.onnx_graphs import export_frozen, export_trainable
    from edgetune.targets import get_target

    t = target if isinstance(target, Target) else get_target(target)
    if t.kind != "mcu":
        return None
    if isinstance(model, Adaptable):
        adaptable = model
    else:
        if method is None:
            raise ValueError("preflight_budget: give the method to prepare the backbone for")
        adaptable = prepare(model, method, overrides, model_name=model_name)
    m, backbone = adaptable.method, adaptable.backbone
    if not m.partitioned:
        return None
    with tempfile.TemporaryDirectory(prefix="edgetune-budget-") as tmp:
        if getattr(backbone, "quantized", False):  # an already-quantised ONNX model: its own QDQ graph is frozen.onnx
            frozen = backbone.frozen_graph(m.taps())
        else:
            export_frozen(backbone, m.taps(), Path(tmp) / "frozen.onnx")
            frozen = onnx.load(str(Path(tmp) / "frozen.onnx"))
        with torch.no_grad():
            taps = list(adaptable.frozen(torch.zeros(1, *backbone.input_shape)))
        _, _, parameters = export_trainable(m, taps, Path(tmp) / "trainable.onnx")
        trainable = onnx.load(str(Path(tmp) / "trainable.onnx"))
    config = m.config
    params = sum(_elems(p.shape) for p in parameters if p.trainable)
    learns = config.lr > 0 and params > 0
    state = MethodState(
        params=params, optimizer=params if config.momentum > 0 else 0,
        states=tuple(m.get_buffer(n).numel() for n in m.state_names()), classes=m.num_classes,
        input_elems=_elems(backbone.input_shape), learns=learns,
        trainable=frozenset(p.name for p in parameters if p.trainable))
    budget = estimate_budget(t, frozen, trainable, state, quantize)
    if check:
        check_budget(budget, quantize, m.name, adaptable.model_name, estimated=True)
    return budget


def _elems(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


__all__ = ["MemoryBudget", "MemoryRow", "analytic_budget", "check_budget", "firmware_budget", "preflight_budget"]
