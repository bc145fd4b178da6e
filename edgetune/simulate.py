"""``simulate``: run a bundle's device program on simulated hardware over a corrupted stream.

Cortex-M: the firmware under ``qemu-system-arm -semihosting -icount shift=0`` (samples and
results through semihosting files; SysTick ticks are guest instructions). ARM Linux / Android:
``edgetune-run`` under ``qemu-aarch64-static``. Each simulation is two runs over the same
samples: with adaptation, and with adaptation off (the source accuracy, and the inference cost).

Instructions per sample: the adapted run's (whole ``et_runtime_step``); inference: the run
without adaptation; adaptation: the difference. Instructions per MAC: the frozen forward's
instructions over the backbone's multiply-accumulates; left out when samples exit early (the plan
then runs the backbone in stage segments and only the first is timed apart from the method's step).
With early exits there is no "adaptation" figure either: the two runs exit on different samples, so
their difference is not the step's cost. User-mode QEMU
has no instruction counter (and emulated time is not device time), so on Linux targets instruction
figures are counted by ``count_aarch64_instructions`` on a short run, or left out.

The stream is any data source (``edgetune.data.load_data``: a built-in name, an image folder,
a ``.npz``), checked against the bundle's input shape; its sample shape travels in the stream
file's header. The report names the source the bundle was fitted and calibrated on when the
bundle records it (``source.json``, ``edgetune.data.record_source``).
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgetune.deploy.build import Built, build_project, find_projects
from edgetune.deploy.streams import EARLY_EXIT, REJECTED, read_results, read_state, write_stream
from edgetune.errors import ConfigError, DataError, ToolchainError
from edgetune.targets import get_target


@dataclass(frozen=True)
class RunResult:
    """One run of the device program: per-sample records, the summary line, the final state."""

    records: np.ndarray
    summary: dict
    state: dict[str, np.ndarray]
    seconds: float


@dataclass(frozen=True)
class SimulationReport:
    target: str
    method: str
    model: str
    data: str
    corruption: str
    severity: int
    protocol: str
    n: int
    online_accuracy: float
    source_accuracy: float
    flash_bytes: int
    sram_bytes: int | None  # static RAM + measured stack high-water mark (microcontrollers)
    static_ram_bytes: int
    stack_bytes: int | None
    instructions_per_sample: float | None
    inference_instructions_per_sample: float | None
    adaptation_instructions_per_sample: float | None
    frozen_instructions_per_sample: float | None
    instructions_per_mac: float | None
    macs: int
    early_exit_rate: float
    rejected: int
    restores: int
    updates: int
    simulator_seconds: float
    predictions: list[int] = field(repr=False)
    source_predictions: list[int] = field(repr=False)
    final_state: dict[str, np.ndarray] = field(repr=False)
    source_data: dict | None = None  # what the bundle was fitted and calibrated on (SourceInfo), if recorded
    sample_shape: tuple[int, ...] = ()
    task: str = "same"  # "new": the bundle learns the stream's classes from revealed labels (manifest's task)
    labelled_fraction: float = 0.0
    halves: tuple[float, float] | None = None  # accuracy over the stream's first and second half (labels revealed)

    def to_json(self) -> dict:
        d = asdict(self)
        for k in ("predictions", "source_predictions", "final_state"):
            d.pop(k)
        for k in ("online_accuracy", "source_accuracy"):
            d[k] = None if math.isnan(d[k]) else d[k]
        if self.halves is not None:
            d["halves"] = [None if math.isnan(v) else v for v in self.halves]
        return d

    def table(self) -> str:
        def insns(v: float | None) -> str:
            return "-" if v is None else f"{v:,.0f}"

        ipm = "-" if self.instructions_per_mac is None else f"{self.instructions_per_mac:.2f}"
        sram = "-" if self.sram_bytes is None else f"{self.sram_bytes:,} B (static {self.static_ram_bytes:,} + " \
                                                  f"stack high-water {self.stack_bytes:,})"
        src = self.source_data
        fitted = ("not recorded in the bundle" if src is None else
                  f"{src['data']} ({src['split']}, {src['samples']:,} samples, "
                  f"{'labels used' if src['labels_used'] else 'no labels used'})")
        rows = [f"{self.method} on {self.model}, {self.target}: {self.data} {self.corruption} severity "
                f"{self.severity}, {self.protocol}, {self.n} samples of {'x'.join(map(str, self.sample_shape))}",
                f"  source (fit, calibration) {fitted}",
                *([f"  new task                 the classes of {self.data}, learnt on the device from revealed labels "
                   f"({100 * self.labelled_fraction:.0f} % of samples, each after it was scored); the class layers "
                   "started at zero, so 'source' predicts from nothing"] if self.task == "new" else []),
                f"  {'prequential' if self.task == 'new' else 'online'} accuracy".ljust(27)
                + f"{100 * self.online_accuracy:6.1f} %   (source, same samples: {100 * self.source_accuracy:.1f} %)",
                *([f"  learning curve           first half {_pct(self.halves[0])} %, second half "
                   f"{_pct(self.halves[1])} %"] if self.halves is not None else []),
                f"  flash                    {self.flash_bytes:,} B",
                f"  SRAM                     {sram}",
                (f"  instructions / sample    {insns(self.instructions_per_sample)}  (inference "
                 f"{insns(self.inference_instructions_per_sample)} + adaptation "
                 f"{insns(self.adaptation_instructions_per_sample)})"
                 if self.adaptation_instructions_per_sample is not None or self.inference_instructions_per_sample
                 is None else
                 f"  instructions / sample    {insns(self.instructions_per_sample)}  (adaptation off: "
                 f"{insns(self.inference_instructions_per_sample)}; with early exits the two runs take other paths, "
                 "so the difference is not the step's cost)"),
                (f"  backbone                 {insns(self.frozen_instructions_per_sample)} instructions for "
                 f"{self.macs:,} MACs = {ipm} per MAC" if self.frozen_instructions_per_sample is not None else
                 "  backbone                 not timed apart (early exits: the plan runs in stage segments)"),
                f"  early exits {100 * self.early_exit_rate:.1f} %, updates {self.updates}, guard restores "
                f"{self.restores}, rejected {self.rejected}"]
        return "\n".join(rows)


def _pct(v: float) -> str:
    return "-" if math.isnan(v) else f"{100 * v:.1f}"


def bundle_task(bundle_dir: str | Path):
    """The ``TaskSpec`` of the bundle that ``bundle_dir`` is (or holds the project of); a project copied away
    from its bundle reads as the same task (there is no manifest left to say otherwise).

    Raises:
        CheckpointError: the bundle's manifest is damaged (``load_manifest``).
    """
    from edgetune.export.manifest import MANIFEST_FILE, TaskSpec, load_manifest

    for folder in (Path(bundle_dir), Path(bundle_dir).parent):
        if (folder / MANIFEST_FILE).is_file():
            return load_manifest(folder).task
    return TaskSpec()


def check_stream_task(task, stream: str, source: str | None, labelled_fraction: float) -> None:
    """A stream against the classes a bundle predicts (``task``, the manifest's ``TaskSpec``): a new-task bundle
    learns the classes of its own stream data, from revealed labels only; a same-task bundle predicts its source's
    classes, so a stream of another built-in dataset (whose classes mean other things) would be scored silently
    wrong. Folders and ``.npz`` files may be the user's own recordings of the same classes: allowed.

    Raises:
        ConfigError: as described, with the command that makes a bundle for the stream.
    """
    from edgetune.data.datasets import DATASETS

    builtin = set(DATASETS.names())
    if task.kind == "new":
        if not labelled_fraction > 0:
            raise ConfigError(f"simulate: this bundle learns the classes of {task.data} from revealed labels only "
                              f"(labelled fraction {labelled_fraction:g}: it would predict from zero weights); pass "
                              "--labelled-fraction F with F > 0")
        if stream != task.data and stream in builtin:
            raise ConfigError(f"simulate: this bundle learns the classes of {task.data} (exported with --task new "
                              f"--data {task.data}), not those of the stream {stream}; stream {task.data} (--data "
                              f"{task.data}), or export a bundle with --task new --data {stream}")
        return
    if source is not None and stream != source and {stream, source} <= builtin:
        raise ConfigError(f"simulate: the stream {stream} is another dataset than {source}, whose classes this bundle "
                          "predicts (other classes: its accuracy would be silently wrong); stream "
                          f"{source}, or export a bundle for the new task (edgetune export ... --task new --data "
                          f"{stream}) and simulate it with --labelled-fraction F")


def _halves(pred: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    half = len(labels) // 2
    return _accuracy(pred[:half], labels[:half]), _accuracy(pred[half:], labels[half:])


def stream_samples(data, corruptions: tuple[str, ...], severity: int, protocol: str, n: int, seed: int = 0,
                   labelled_fraction: float = 0.0, input_shape: tuple[int, ...] | None = None,
                   resize: tuple[int, int] | None = None,
                   crop: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray, list[bool], list[int]]:
    """(float32 samples N x C x ..., labels (-1: none), reset flags, feedback labels) of ``n``
    samples of the shifted test stream of ``data`` (any ``load_data`` source; as ``edgetune eval``
    builds it; ``n`` split evenly over the corruptions, or over the groups of a ``none`` stream).

    Raises:
        ConfigError: n < 1, n more than the stream has, or a labelled fraction outside [0, 1]; see
            ``build_stream``.
        DataError: samples whose shape is not ``input_shape`` (when given).
    """
    from edgetune.data import build_stream, conform, load_data, to_tensor
    from edgetune.evaluate import revealed

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"simulate: --n must be at least 1 (got {n!r}); pass --n 1 or more")
    reveal = revealed(n, labelled_fraction, seed, "simulate")
    dataset = load_data(data, resize, crop)
    if input_shape is not None:
        dataset = conform(dataset, input_shape, "simulate")
    per = math.ceil(n / len(corruptions))
    if dataset.test_groups is not None and all(c in ("none", "clean") for c in corruptions):
        per = math.ceil(n / len(set(dataset.test_groups.tolist())))
    segments = build_stream(dataset, corruptions, severity, protocol, seed, per)
    available = sum(len(s.labels) for s in segments)
    if available < n:  # never a silent clamp: fewer samples than asked would be reported as the whole run
        raise ConfigError(f"simulate: --n {n} is more than the {available} samples the stream of {dataset.name} has "
                          f"({', '.join(corruptions)}, {protocol}); pass --n {available} or fewer, or more "
                          "corruptions")
    images = np.concatenate([s.images for s in segments])[:n]
    labels = np.concatenate([s.labels for s in segments])[:n]
    resets = []
    for s in segments:
        resets += [s.reset] + [False] * (len(s.labels) - 1)
    resets = resets[:n]
    feedback = [int(y) if shown and y >= 0 else -1 for y, shown in zip(labels, reveal)]
    return to_tensor(images).numpy(), labels, resets, feedback


def run_program(built: Built, stream: Path, workdir: Path, adapt: bool = True, timeout: float = 900,
                extra: tuple[str, ...] = ()) -> RunResult:
    """Run the built program over ``stream`` in the target's simulator, files in ``workdir``.

    Raises:
        ToolchainError: the simulator is missing, fails or times out.
        DataError: the program refused the stream file (sample length or class count).
    """
    t = get_target(built.project.target)
    tag = "adapt" if adapt else "source"
    files = {"results": f"{tag}_results.bin", "state": f"{tag}_state.bin", "summary": f"{tag}_summary.json"}
    workdir.mkdir(parents=True, exist_ok=True)
    local = workdir / stream.name
    if local.resolve() != stream.resolve():
        local.write_bytes(stream.read_bytes())
    args = [f"--stream={local.name}", *(f"--{k}={v}" for k, v in files.items()), *(() if adapt else ("--no-adapt",)),
            *extra]
    cmd = t.simulator_command(built.program.resolve(), args)
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise ToolchainError(f"simulate: {cmd[0]} is not installed; install it (Debian: apt install "
                             "qemu-system-arm qemu-user-static)") from None
    except subprocess.TimeoutExpired:
        raise ToolchainError(f"simulate: {cmd[0]} did not finish within {timeout:.0f} s; simulate fewer samples "
                             "(--n)") from None
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-6:])
        if "stream:" in tail:  # the program refused the stream file: a data problem, not a build problem
            shape = "x".join(map(str, built.project.input_shape[1:]))
            raise DataError(f"simulate: {built.program.name} refused the stream ({tail}); write it with samples of "
                            f"the model's input {shape} (write_stream) and the model's class count")
        raise ToolchainError(f"simulate: {built.program.name} failed under {cmd[0]} (exit {proc.returncode}: "
                             f"{tail}); rebuild with `edgetune build` and check the bundle")
    summary = json.loads((workdir / files["summary"]).read_text())
    return RunResult(read_results(workdir / files["results"]), summary,
                     read_state(workdir / files["state"], built.project.state_layout), seconds)


# The frozen forward's kernels (compilers/emit_model.py prefixes them "f_", a Linux target's plan
# "f_<plan id>_", compilers/model.py): TVM's C kernels are the exported "__tvm_ffi_f_<kernel>" functions;
# its LLVM backend wraps each around "f_<kernel>_compute_".
FROZEN_SYMBOL = "__tvm_ffi_f_"


def _frozen_symbol(name: str) -> bool:
    # the backbone's kernels, and the DSP micro-kernels they call (C-source builds)
    return (name.startswith(FROZEN_SYMBOL) or name.startswith("et_dsp_")
            or (name.startswith("f_") and name.endswith("_compute_")))



def _trace_instructions(path: Path) -> tuple[int, int]:
    """(all, frozen kernels') guest instructions of a QEMU ``-d in_asm,exec,nochain`` log file."""
    with path.open(errors="replace") as f:
        return count_trace(f, _frozen_symbol)


def count_trace(lines: Iterable[str], symbol: Callable[[str], bool] | None = None) -> tuple[int, int]:
    """(all, in ``symbol``'s functions) guest instructions of a QEMU ``-d in_asm,exec,nochain`` log read
    line by line: every executed translation block counted with the instructions it was translated from.
    Without ``symbol`` the second count is 0 (no per-block name lookup: logs can be gigabytes)."""
    sizes: dict[int, int] = {}
    total = matched = 0
    start, n = -1, 0
    for line in lines:
        if line.startswith("Trace "):
            pc = int(line.split("[", 1)[1].split("/", 2)[1], 16)
            c = sizes.get(pc, 0)
            total += c
            if symbol is not None and symbol(line.rsplit("]", 1)[-1].strip()):
                matched += c
        elif line.startswith("IN:"):
            start, n = -1, 0
        elif line.startswith("0x"):
            if start < 0:
                start = int(line.split(":", 1)[0], 16)
            n += 1
            sizes[start] = n
    return total, matched


def count_instructions(built: Built, x: np.ndarray, workdir: Path, adapt: bool, first: int = 1,
                       last: int = 4) -> tuple[float, float]:
    """Guest instructions per sample of a user-mode QEMU target, (whole step, frozen kernels), exact
    for samples ``first``..``last - 1`` of ``x``: runs of ``first`` and ``last`` samples are traced
    block by block and subtracted (start-up and I/O cancel out).

    Raises:
        ToolchainError: the simulator fails.
    """
    t = get_target(built.project.target)
    counts = []
    for k in (first, last):
        stream = write_stream(workdir / f"count{k}.bin", x[:k])
        log = workdir / f"trace{k}.log"
        args = [f"--stream={stream.name}", *(() if adapt else ("--no-adapt",))]
        cmd = t.simulator_command(built.program.resolve(), args)
        cmd = [cmd[0], "-d", "in_asm,exec,nochain", "-D", str(log), *cmd[1:]]
        proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise ToolchainError(f"simulate: instruction count run failed (exit {proc.returncode}: "
                                 f"{proc.stdout[-300:]}); check {cmd[0]}")
        counts.append(_trace_instructions(log))
        log.unlink()
    n = last - first
    return (counts[1][0] - counts[0][0]) / n, (counts[1][1] - counts[0][1]) / n


def _per_sample(ticks: int, samples: int, built: Built) -> float | None:
    t = get_target(built.project.target)
    if t.kind != "mcu" or samples == 0:
        return None
    return t.ticks_to_instructions(ticks) / samples


def simulate(bundle_dir: str | Path, data=None, corruption: str = "gaussian_noise", severity: int = 5,
             n: int = 300, protocol: str = "episodic", seed: int = 0, target: str | None = None,
             labelled_fraction: float = 0.0, workdir: str | Path | None = None,
             progress: bool = False, resize: tuple[int, int] | None = None,
             crop: tuple[int, int] | None = None) -> SimulationReport:
    """Build the bundle's target project if needed, stream ``n`` shifted samples of ``data`` (any
    ``load_data`` source, checked against the bundle's input shape) through it in the simulator
    (with and without adaptation) and measure accuracy, memory and instructions.

    ``data=None``: the test split of the data the bundle was fitted on (its ``source.json``),
    else ``digits``; for a bundle exported for a new task (``--task new``), the data whose classes it learns.
    A stream of other classes than the bundle's is refused (``check_stream_task``).
    ``corruption``: one name, a comma list, ``all`` (sensor shifts for 1-D
    inputs) or ``none`` (as ``edgetune eval``). ``progress``: say on stderr what runs while the
    simulator works.

    Raises:
        CheckpointError: the bundle has no target project (export it with --target).
        ConfigError: the bundle has projects for several targets and ``target`` is not given, bad
            stream options, or a stream of other classes than the bundle's (``check_stream_task``).
        ToolchainError: the toolchain or simulator is missing or fails.
        DataError: the data's samples do not have the bundle's input shape.
    """
    from dataclasses import replace

    from edgetune.data import load_data, parse_corruptions, recorded_source
    from edgetune.data.sources import describe

    if workdir is not None:
        _check_workdir(Path(workdir))
    projects = find_projects(bundle_dir, target)
    if len(projects) > 1:
        raise ConfigError(f"simulate: {bundle_dir} has projects for {', '.join(p.target for p in projects)}; "
                          "pick one with --target")
    info = recorded_source(bundle_dir)
    task = bundle_task(bundle_dir)
    if data is None:
        data = task.data if task.kind == "new" else info.data if info is not None else "digits"
    check_stream_task(task, load_data(data, resize, crop).name, info.data if info is not None else None,
                      labelled_fraction)
    shape = tuple(projects[0].input_shape)[1:]  # the manifest's input is a batch of one
    corruptions = parse_corruptions(corruption, "image" if len(shape) == 3 else "array")
    x, labels, resets, feedback = stream_samples(data, corruptions, severity, protocol, n, seed, labelled_fraction,
                                                 shape, resize, crop)  # data errors before the build
    built = build_project(projects[0])
    work = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="edgetune-sim-"))
    work.mkdir(parents=True, exist_ok=True)
    stream = write_stream(work / "stream.bin", x, resets, feedback, built.project.classes)
    if progress:
        simulator = get_target(built.project.target).simulator_command(built.program, [])[0]
        print(f"edgetune: {len(x)} samples through {built.program.name} in {simulator}, adapting and then with "
              "adaptation off (a few seconds per 100 samples) ...", file=sys.stderr, flush=True)
    adapted = run_program(built, stream, work, adapt=True)
    source = run_program(built, stream, work, adapt=False)
    counted = None
    if get_target(built.project.target).kind != "mcu" and len(x) >= 4:
        step, _ = count_instructions(built, x, work, adapt=True)
        inference, frozen = count_instructions(built, x, work, adapt=False)
        counted = (step, inference, frozen)
    result = report(built, adapted, source, labels, describe(data), corruption, severity, protocol, counted,
                    info.to_json() if info else None)
    halves = _halves(adapted.records["prediction"], labels) if labelled_fraction else None
    return replace(result, task=task.kind, labelled_fraction=labelled_fraction, halves=halves)


def _check_workdir(work: Path) -> None:
    """Refuse a --workdir that is a file or lies under one, before any data is loaded or built.

    Raises:
        ConfigError: as described.
    """
    for p in [work, *work.parents]:
        if p.exists() and not p.is_dir():
            where = "is a file" if p == work else f"is under the file {p}"
            raise ConfigError(f"simulate: --workdir {work} {where}; give a folder path (it is created if missing)")


def _accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    scored = labels >= 0
    return float(np.mean(pred[scored] == labels[scored])) if scored.any() else float("nan")


def report(built: Built, adapted: RunResult, source: RunResult, labels: np.ndarray, data: str, corruption: str,
           severity: int, protocol: str, counted: tuple[float, float, float] | None = None,
           source_data: dict | None = None) -> SimulationReport:
    """The figures of a simulation from its two runs (see the module docstring); ``counted``:
    (step, inference, frozen) instructions per sample counted by ``count_instructions`` where
    the simulator has no instruction counter."""
    p = built.project
    pred, pred_src = adapted.records["prediction"], source.records["prediction"]
    ok = (adapted.records["flags"] & REJECTED) == 0
    accepted = int(ok.sum())
    sa, ss = adapted.summary, source.summary
    total = _per_sample(sa["ticks"]["step"], sa["accepted"], built)
    inference = _per_sample(ss["ticks"]["step"], ss["accepted"], built)
    frozen = _per_sample(ss["ticks"]["frozen"], ss["accepted"], built)
    if counted is not None:
        total, inference, frozen = counted
    # with early exits the plan runs in stage segments: the runtime times only the first apart from the step
    exits = any(bool(np.any((r.records["flags"] & EARLY_EXIT) != 0)) for r in (adapted, source))
    if exits:  # nor is adapted - source the step's cost: the two runs exit on different samples
        frozen = None
    mcu = get_target(p.target).kind == "mcu"
    stack = max(sa["stack_used_bytes"], ss["stack_used_bytes"]) if mcu else None
    return SimulationReport(
        target=p.target, method=p.method, model=p.model, data=data, corruption=corruption, severity=severity,
        protocol=protocol, n=len(labels), online_accuracy=_accuracy(pred, labels),
        source_accuracy=_accuracy(pred_src, labels), flash_bytes=built.flash_bytes,
        sram_bytes=built.static_ram_bytes + stack if stack is not None else None,
        static_ram_bytes=built.static_ram_bytes, stack_bytes=stack, instructions_per_sample=total,
        inference_instructions_per_sample=inference,
        adaptation_instructions_per_sample=None if total is None or inference is None or exits else total - inference,
        frozen_instructions_per_sample=frozen,
        instructions_per_mac=None if frozen is None or not p.macs else frozen / p.macs, macs=p.macs,
        early_exit_rate=float(np.mean((adapted.records["flags"][ok] & EARLY_EXIT) != 0)) if accepted else 0.0,
        rejected=int(sa["rejected"]), restores=int(sa["restores"]), updates=int(sa["updates"]),
        simulator_seconds=adapted.seconds + source.seconds, predictions=[int(v) for v in pred],
        source_predictions=[int(v) for v in pred_src], final_state=adapted.state, source_data=source_data,
        sample_shape=tuple(p.input_shape)[1:])


__all__ = ["RunResult", "SimulationReport", "bundle_task", "check_stream_task", "report", "run_program", "simulate",
           "stream_samples"]
