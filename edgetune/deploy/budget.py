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
STATIC_DATA_BYTES = 4 * 1024


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


def firmware_budget(target: Target, model: Mapping[str, int], kernels: int) -> MemoryBudget:
    """The memory of a firmware for ``target`` around a generated model (``ModelMemory`` fields)."""
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


def check_budget(budget: MemoryBudget, quantized: bool = True, method: str = "", model: str = "") -> None:
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
    raise BudgetError(f"budget: {method + ' on ' + model + ' ' if method else ''}does not fit {budget.target} "
                      f"({'; '.join(problems)}); try {', or '.join(tries)}\n{budget.table()}")


__all__ = ["MemoryBudget", "MemoryRow", "analytic_budget", "check_budget", "firmware_budget"]
