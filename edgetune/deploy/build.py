"""``build``: make the target projects of a bundle with each target's toolchain, and read the sizes."""
from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from edgetune.deploy.project import PROJECT_FILE, TargetProject
from edgetune.errors import CheckpointError, ToolchainError
from edgetune.targets import get_target

# Sections of a Cortex-M image: what occupies flash, what occupies RAM (reserved stack/heap apart).
FLASH_SECTIONS = (".isr_vector", ".text", ".ARM.extab", ".ARM.exidx", ".preinit_array", ".init_array",
                  ".fini_array", ".data")
RAM_SECTIONS = (".data", ".bss")


@dataclass(frozen=True)
class Built:
    """A built project: the program, and its flash / static RAM bytes (``size -A``)."""

    project: TargetProject
    program: Path
    flash_bytes: int
    static_ram_bytes: int  # .data + .bss (microcontrollers: without the reserved stack and heap)
    sections: dict[str, int]


def find_projects(bundle_dir: str | Path, target: str | None = None) -> list[TargetProject]:
    """The target projects written into a bundle (``bundle/<target>/project.json``), or the one of
    ``target``; ``bundle_dir`` may also be a project folder itself.

    Raises:
        CheckpointError: none found, or the bundle's files do not match its manifest (``load_manifest``).
    """
    from edgetune.export.manifest import MANIFEST_FILE, load_manifest

    d = Path(bundle_dir)
    if not d.is_dir():
        raise CheckpointError(f"build: {d} is not a folder; give the bundle folder written by `edgetune export "
                              "--target T -o DIR`")
    # A bundle edited after export (graphs, initial state, manifest) is refused before anything is built from it.
    for bundle in (d, d.parent):
        if (bundle / MANIFEST_FILE).is_file():
            load_manifest(bundle)
            break
    dirs = [d] if (d / PROJECT_FILE).is_file() else sorted(p.parent for p in d.glob(f"*/{PROJECT_FILE}"))
    projects = [TargetProject.load(p) for p in dirs]
    if target is not None:
        projects = [p for p in projects if p.target == target]
    if not projects:
        which = f"for {target} " if target else ""
        raise CheckpointError(f"build: no target project {which}in {d}; export with --target "
                              f"({'edgetune export ... --target ' + (target or 'cortex-m4')})")
    return projects


def _sections(size_tool: str, program: Path) -> dict[str, int]:
    proc = subprocess.run([size_tool, "-A", str(program)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ToolchainError(f"build: {size_tool} failed on {program.name} ({proc.stderr.strip()[:200]}); "
                             "check the toolchain installation")
    out = {}
    for line in proc.stdout.splitlines():
        m = re.match(r"^(\.\S+)\s+(\d+)\s+(\d+)", line)
        if m:
            out[m.group(1)] = int(m.group(2))
    return out


def build_project(project: TargetProject, jobs: int = 2) -> Built:
    """``make`` one project (incremental) and measure the program.

    Raises:
        ToolchainError: make or the target's C compiler is missing, or the build fails (with its
            output; a firmware over budget fails at the link with "region ... overflowed").
    """
    t = get_target(project.target)
    for tool in ("make", t.toolchain.cc):
        if shutil.which(tool) is None:
            raise ToolchainError(f"build: {tool} is not installed; install it (Debian: apt install make "
                                 "gcc-arm-none-eabi libnewlib-arm-none-eabi gcc-aarch64-linux-gnu)")
    proc = subprocess.run(["make", "-j", str(jobs)], cwd=project.directory, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-12:])
        raise ToolchainError(f"build: make failed in {project.directory} ({tail}); fix the error above")
    program = project.directory / project.program
    size_tool = t.toolchain.size if shutil.which(t.toolchain.size) else "size"
    sections = _sections(size_tool, program)
    if t.kind == "mcu":
        flash = sum(v for k, v in sections.items() if k in FLASH_SECTIONS)
        ram = sum(v for k, v in sections.items() if k in RAM_SECTIONS)
    else:
        flash = program.stat().st_size
        ram = sum(v for k, v in sections.items() if k in (".data", ".bss", ".tbss", ".tdata"))
    return Built(project, program, flash, ram, sections)


def build(bundle_dir: str | Path, target: str | None = None) -> list[Built]:
    """Build every target project of a bundle (or the one of ``target``): ``edgetune build OUT/``.

    Raises:
        CheckpointError: no target project in the bundle.
        ToolchainError: as ``build_project``.
    """
    return [build_project(p) for p in find_projects(bundle_dir, target)]


__all__ = ["Built", "build", "build_project", "find_projects"]
