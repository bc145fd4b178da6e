"""Targets are data: one JSON file per device in this folder, loaded into frozen ``Target``\\ s.

A target tells the compilers and runtimes what they need about a device: its architecture,
the TVM target to generate code for, the C toolchain, the SRAM/flash budget, the board
support (Cortex-M: startup, linker-script template, semihosting glue in ``board/``) and how
CI simulates it. The C runtime every target links with lives in ``runtime/``.

Adding a device is adding a JSON file next to the others (or passing the path of one to
``get_target``); no code changes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from edgetune.errors import ConfigError
from edgetune.registry import Registry

HERE = Path(__file__).resolve().parent
RUNTIME_DIR = HERE / "runtime"
HOST_KERNELS_DIR = HERE / "host"  # x86 micro-kernels of the host library only (never built for a device)
BOARD_DIR = HERE / "board"
# The runtime's contract (DESIGN section 7): strict C99, warnings are errors, and no FMA
# contraction, so float results match between the host, aarch64 and Cortex-M builds.
RUNTIME_CFLAGS = ("-std=c99", "-Wall", "-Wextra", "-Werror", "-ffp-contract=off")
KINDS = ("host", "linux", "mcu")


def runtime_sources() -> list[Path]:
    """The C runtime's sources (one set for every target); headers are in ``RUNTIME_DIR``."""
    return sorted(RUNTIME_DIR.glob("*.c"))


@dataclass(frozen=True)
class Toolchain:
    """The C compiler of a target. ``static``: link a fully static executable (Android)."""

    cc: str
    arch_flags: tuple[str, ...]
    cflags: tuple[str, ...]
    ldflags: tuple[str, ...]
    libs: tuple[str, ...]
    size: str
    static: bool

    @property
    def compile_flags(self) -> list[str]:
        return [*self.arch_flags, *self.cflags]

    @property
    def link_flags(self) -> list[str]:
        return [*self.arch_flags, *self.ldflags, *(["-static"] if self.static else [])]


@dataclass(frozen=True)
class Board:
    """Bare-metal board support for a QEMU machine: ``board/cortex-m/`` + ``board/<machine>/``."""

    machine: str
    stack_bytes: int
    heap_bytes: int  # newlib's heap (stdio buffers); the runtime itself never allocates

    @property
    def include_dirs(self) -> list[Path]:
        return [BOARD_DIR / "cortex-m", RUNTIME_DIR]

    def sources(self) -> list[Path]:
        """Startup (vector table, reset, stack paint) and board glue (SysTick, semihosting)."""
        return [BOARD_DIR / "cortex-m" / "startup.c", BOARD_DIR / "cortex-m" / "et_board.c"]


@dataclass(frozen=True)
class Simulator:
    """How CI runs the target: ``argv`` with ``{program}``, ``{args}`` (one string: QEMU's
    semihosting command line) or ``{*args}`` (spliced). ``clock_hz``: the simulated SysTick
    clock; under ``-icount shift=0`` one instruction is 1 ns, so instructions = ticks * 1e9 / clock_hz."""

    argv: tuple[str, ...]
    clock_hz: int | None


@dataclass(frozen=True)
class Target:
    """One device, as described by ``targets/<name>.json``."""

    name: str
    description: str
    kind: str  # host | linux | mcu
    arch: str
    cpu: str
    tvm_target_json: str  # JSON text, so the dataclass stays immutable; read ``tvm_target``
    tvm_llvm_target_json: str | None
    toolchain: Toolchain
    ram_bytes: int | None  # SRAM on a microcontroller, DRAM on a board; None: not constrained
    flash_bytes: int | None
    board: Board | None
    simulator: Simulator | None

    @property
    def tvm_target(self) -> dict[str, Any]:
        """A fresh dict for ``tvm.target.Target``: the target's primary code generator."""
        return json.loads(self.tvm_target_json)

    @property
    def tvm_llvm_target(self) -> dict[str, Any]:
        """An LLVM target for the same CPU (for a Cortex-M: thumb objects instead of C source)."""
        return json.loads(self.tvm_llvm_target_json or self.tvm_target_json)

    def describe(self) -> str:
        """One line for ``edgetune list targets``: name, kind, CPU, budget, simulator, description."""
        if self.simulator is None:
            sim = "native"
        elif self.board is not None:
            sim = f"{self.simulator.argv[0]} -M {self.board.machine}"
        else:
            sim = self.simulator.argv[0]
        return (f"{self.name:<14} {self.kind:<5} {self.cpu:<11} RAM {_size(self.ram_bytes):>6}  "
                f"flash {_size(self.flash_bytes):>6}  {sim:<31} {self.description}")

    def simulator_command(self, program: str | Path, args: Sequence[str] = ()) -> list[str]:
        """The command that runs ``program`` (an ELF or executable) with ``args`` in CI's simulator
        (natively for the host)."""
        if self.simulator is None:
            return [str(program), *args]
        cmd: list[str] = []
        for a in self.simulator.argv:
            if a == "{*args}":
                cmd.extend(args)
            else:
                cmd.append(a.replace("{program}", str(program)).replace("{args}", " ".join(args)))
        return cmd

    def ticks_to_instructions(self, ticks: int | float) -> float:
        """Guest instructions in ``ticks`` SysTick ticks measured under ``-icount shift=0``.

        Raises:
            ConfigError: the target has no simulated clock (not a microcontroller).
        """
        if self.simulator is None or not self.simulator.clock_hz:
            raise ConfigError(f"target {self.name}: no simulated SysTick clock (kind {self.kind}); "
                              "instruction counts from ticks exist for microcontroller targets only")
        return float(ticks) * 1e9 / self.simulator.clock_hz

    def linker_script(self, stack_bytes: int | None = None, heap_bytes: int | None = None) -> str:
        """The board's linker script with this target's RAM/flash budget as region lengths, so a
        firmware that does not fit fails to link. Stack and heap default to the board's.

        Raises:
            ConfigError: not a microcontroller target, or a stack/heap size that is not a positive
                multiple of 8 or leaves no RAM.
        """
        if self.board is None or self.ram_bytes is None or self.flash_bytes is None:
            raise ConfigError(f"target {self.name}: no board support (kind {self.kind}); "
                              "linker scripts exist for microcontroller targets only")
        stack = self.board.stack_bytes if stack_bytes is None else stack_bytes
        heap = self.board.heap_bytes if heap_bytes is None else heap_bytes
        problems = [f"{what} {v} is not a multiple of 8 >= {low}" for what, v, low in
                    (("stack_bytes", stack, 256), ("heap_bytes", heap, 0)) if v < low or v % 8]
        if stack + heap >= self.ram_bytes:
            problems.append(f"stack + heap ({stack + heap}) leave nothing of the {self.ram_bytes} bytes of RAM")
        if problems:
            raise ConfigError(f"target {self.name}: linker script: {'; '.join(problems)}; pass smaller sizes")
        text = ((BOARD_DIR / self.board.machine / "link.ld.in").read_text()
                + (BOARD_DIR / "cortex-m" / "sections.ld.in").read_text())
        for key, value in (("FLASH_BYTES", self.flash_bytes), ("RAM_BYTES", self.ram_bytes),
                           ("STACK_BYTES", stack), ("HEAP_BYTES", heap)):
            text = text.replace(f"@{key}@", str(value))
        return text


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"


# --- loading ----------------------------------------------------------------------------------
_STR, _INT, _BOOL, _STRS = "a string", "an integer or null", "true or false", "a list of strings"
_SCHEMA: dict[str, dict[str, str]] = {
    "": {"name": _STR, "description": _STR, "kind": _STR, "arch": _STR, "cpu": _STR, "tvm_target": "an object",
         "tvm_llvm_target": "an object or null", "toolchain": "an object", "memory": "an object",
         "board": "an object or null", "simulator": "an object or null"},
    "toolchain": {"cc": _STR, "arch_flags": _STRS, "cflags": _STRS, "ldflags": _STRS, "libs": _STRS, "size": _STR,
                  "static": _BOOL},
    "memory": {"ram_bytes": _INT, "flash_bytes": _INT},
    "board": {"machine": _STR, "stack_bytes": _INT, "heap_bytes": _INT},
    "simulator": {"argv": _STRS, "clock_hz": _INT},
}


def _fits(value: Any, kind: str) -> bool:
    if kind == _STR:
        return isinstance(value, str) and bool(value)
    if kind == _INT:
        return value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 0)
    if kind == _BOOL:
        return isinstance(value, bool)
    if kind == _STRS:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return isinstance(value, dict) or (value is None and kind.endswith("or null"))


def _check(section: str, data: Any, problems: list[str]) -> None:
    where = section or "top level"
    if not isinstance(data, dict):
        problems.append(f"{where} is not an object")
        return
    schema = _SCHEMA[section]
    problems += [f"{where}: unknown key {k!r} (known: {', '.join(schema)})" for k in data if k not in schema]
    problems += [f"{where}: missing key {k!r}" for k in schema if k not in data]
    problems += [f"{where}: {k!r} must be {kind} (got {data[k]!r})" for k, kind in schema.items()
                 if k in data and not _fits(data[k], kind)]


def _semantics(d: dict[str, Any], stem: str, problems: list[str]) -> None:
    if d["name"] != stem:
        problems.append(f"name {d['name']!r} differs from the file name {stem!r}")
    if d["kind"] not in KINDS:
        problems.append(f"kind {d['kind']!r} is not one of {', '.join(KINDS)}")
    for key in ("tvm_target", "tvm_llvm_target"):
        if isinstance(d[key], dict) and not isinstance(d[key].get("kind"), str):
            problems.append(f"{key} has no \"kind\" (e.g. \"llvm\" or \"c\")")
    if d["simulator"] is not None and "{program}" not in d["simulator"]["argv"] and \
            not any("{program}" in a for a in d["simulator"]["argv"]):
        problems.append("simulator.argv never mentions {program}")
    if d["kind"] != "mcu":
        return
    if d["board"] is None or d["simulator"] is None or d["simulator"]["clock_hz"] is None:
        problems.append("a microcontroller target needs board and simulator.clock_hz")
    if d["memory"]["ram_bytes"] is None or d["memory"]["flash_bytes"] is None:
        problems.append("a microcontroller target needs memory.ram_bytes and memory.flash_bytes")
    if d["board"] is not None and not (BOARD_DIR / d["board"]["machine"] / "link.ld.in").is_file():
        known = sorted(p.parent.name for p in BOARD_DIR.glob("*/link.ld.in"))
        problems.append(f"board.machine {d['board']['machine']!r} has no board/<machine>/link.ld.in "
                        f"(known: {', '.join(known)})")


def load_target(path: str | Path) -> Target:
    """Read one target description (JSON) and check it completely.

    Raises:
        ConfigError: the file is missing or not JSON, or lists every problem found in it
            (missing/unknown keys, wrong types, a microcontroller without budget or board).
    """
    p = Path(path)
    try:
        d = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"target file {p}: cannot read it as JSON ({e}); fix or remove the file") from None
    problems: list[str] = []
    _check("", d, problems)
    if not problems:
        for section in ("toolchain", "memory", "board", "simulator"):
            if d[section] is not None:
                _check(section, d[section], problems)
    if not problems:
        _semantics(d, p.stem, problems)
    if problems:
        raise ConfigError(f"target file {p}: {'; '.join(problems)}; see targets/cortex-m4.json for a complete example")
    tc, mem, board, sim = d["toolchain"], d["memory"], d["board"], d["simulator"]
    return Target(
        name=d["name"], description=d["description"], kind=d["kind"], arch=d["arch"], cpu=d["cpu"],
        tvm_target_json=json.dumps(d["tvm_target"], sort_keys=True),
        tvm_llvm_target_json=None if d["tvm_llvm_target"] is None else json.dumps(d["tvm_llvm_target"], sort_keys=True),
        toolchain=Toolchain(cc=tc["cc"], arch_flags=tuple(tc["arch_flags"]), cflags=tuple(tc["cflags"]),
                            ldflags=tuple(tc["ldflags"]), libs=tuple(tc["libs"]), size=tc["size"], static=tc["static"]),
        ram_bytes=mem["ram_bytes"], flash_bytes=mem["flash_bytes"],
        board=None if board is None else Board(board["machine"], board["stack_bytes"], board["heap_bytes"]),
        simulator=None if sim is None else Simulator(tuple(sim["argv"]), sim["clock_hz"]),
    )


TARGETS: Registry[Target] = Registry("target")
for _path in sorted(HERE.glob("*.json")):
    TARGETS.add(_path.stem, load_target(_path))


def get_target(name: str) -> Target:
    """The target called ``name`` (or described by the JSON file at path ``name``).

    Raises:
        ConfigError: unknown name (with the known ones and a did-you-mean) or an invalid file.
    """
    if name.endswith(".json") and Path(name).is_file():
        return load_target(name)
    return TARGETS.get(name)


def list_targets() -> list[Target]:
    """Every shipped target: host, then Linux boards, then microcontrollers (smallest first)."""
    targets = [TARGETS.get(n) for n in TARGETS]
    return sorted(targets, key=lambda t: (KINDS.index(t.kind), t.ram_bytes or 0, t.name))


__all__ = ["Board", "BOARD_DIR", "RUNTIME_CFLAGS", "RUNTIME_DIR", "Simulator", "TARGETS", "Target", "Toolchain",
           "get_target", "list_targets", "load_target", "runtime_sources"]
