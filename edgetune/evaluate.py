"""Online evaluation at batch size 1: predict a sample, score it, then let the method adapt on it.

Taps of the frozen backbone do not depend on adaptation, so they are computed per segment
up front (torch, batched; or onnxruntime int8, sample by sample) and the method then walks
the stream one sample at a time. Labels never reach a method in the default protocol; with
``labelled_fraction > 0`` (the supervised mode) a chosen sample's label is revealed only after
its prediction was scored.

Roles are kept apart (``edgetune.data.roles``): the *source* is what ``fit`` and int8
calibration read, the *stream* what is scored; every report says what served as source, how
many samples and whether labels were used. Samples without a label (-1) are predicted but not
scored (a segment of them has no accuracy).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Protocol

import numpy as np
import torch
from tqdm import tqdm

from edgetune.adapt import Adaptable, source_taps
from edgetune.data import WARMUP, Dataset, Segment, SourceInfo
from edgetune.errors import ConfigError

TapFunction = Callable[[Adaptable, np.ndarray], list[torch.Tensor]]


@dataclass(frozen=True)
class StreamResult:
    """Online accuracy per corruption (in stream order) of one method on one stream."""

    method: str
    per_corruption: dict[str, float]
    samples: int
    labelled_fraction: float = 0.0
    early_exit_rate: float | None = None
    restores: int = 0
    predictions: list[int] = field(default_factory=list, repr=False)

    @property
    def mean(self) -> float:
        scored = [v for v in self.per_corruption.values() if not np.isnan(v)]
        return float(np.mean(scored)) if scored else float("nan")

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("predictions")
        d["per_corruption"] = _json_numbers(self.per_corruption)
        d["mean_online_accuracy"] = _json_number(self.mean)
        return d


def _json_number(v: float) -> float | None:
    """NaN (nothing scored: no labels) as JSON null."""
    return None if v is None or np.isnan(v) else float(v)


def _json_numbers(d: dict[str, float]) -> dict[str, float | None]:
    return {k: _json_number(v) for k, v in d.items()}


def _percent(v: float, width: int) -> str:
    return f"{'-':>{width}}" if np.isnan(v) else f"{100 * v:>{width}.1f}"


def torch_taps(adaptable: Adaptable, images: np.ndarray) -> list[torch.Tensor]:
    return source_taps(adaptable, images)


def revealed(n: int, labelled_fraction: float, seed: int = 0, component: str = "eval") -> np.ndarray:
    """Which of a stream's ``n`` samples get their label revealed after being scored (the
    supervised mode): one seeded draw, the same for every runtime and for the simulator.

    Raises:
        ConfigError: ``labelled_fraction`` outside [0, 1].
    """
    if not 0.0 <= labelled_fraction <= 1.0:
        raise ConfigError(f"{component}: --labelled-fraction must be in [0, 1] (got {labelled_fraction})")
    if not labelled_fraction:
        return np.zeros(n, dtype=bool)
    return np.random.RandomState(seed + 7919).rand(n) < labelled_fraction


class StreamRunner(Protocol):
    """One adapting model that ``walk_stream`` drives, a segment at a time and a sample at a time."""

    @property
    def restores(self) -> int: ...  # collapse-guard restores so far

    def reset(self) -> None: ...
    def begin(self, images: np.ndarray) -> None: ...  # a segment's uint8 images, before its first sample
    def step(self, i: int) -> tuple[int, bool | None]: ...  # (prediction, exited early; None: no exits)
    def feedback(self, i: int, label: int) -> None: ...  # supervised: only after sample i was scored


def walk_stream(runner: StreamRunner, segments: list[Segment], name: str, labelled_fraction: float = 0.0,
                seed: int = 0, progress: bool = True, desc: str | None = None) -> StreamResult:
    """Stream every segment through ``runner`` (reset where a segment says so): predict and
    score each sample, then reveal its label if the draw of ``revealed`` says so.

    Raises:
        ConfigError: ``labelled_fraction`` outside [0, 1].
    """
    total = sum(len(s.labels) for s in segments)
    reveal = revealed(total, labelled_fraction, seed)
    per: dict[str, float] = {}
    predictions: list[int] = []
    exits: list[bool] = []
    bar = tqdm(total=total, desc=desc or name, disable=not progress, leave=False, unit="sample")
    for seg in segments:
        if seg.reset:
            runner.reset()
        runner.begin(seg.images)
        correct = scored = 0
        for i, label in enumerate(seg.labels):
            pred, early = runner.step(i)
            predictions.append(pred)
            if label >= 0:
                correct += pred == int(label)
                scored += 1
            if early is not None:
                exits.append(early)
            if reveal[len(predictions) - 1] and label >= 0:
                runner.feedback(i, int(label))  # revealed only now, after the prediction was scored
            bar.update(1)
        per[seg.name] = correct / scored if scored else float("nan")
    bar.close()
    early_rate = float(np.mean(exits)) if exits else None
    return StreamResult(name, per, total, labelled_fraction, early_rate, runner.restores, predictions)


class _TorchRunner:
    """The torch reference: taps of a segment computed up front, the method steps per sample."""

    def __init__(self, adaptable: Adaptable, tap_fn: TapFunction) -> None:
        self.adaptable, self.tap_fn, self.method = adaptable, tap_fn, adaptable.method
        self.last_stage = len(adaptable.backbone.stages) - 1
        self.taps: list[torch.Tensor] = []

    @property
    def restores(self) -> int:
        return self.method.restores

    def reset(self) -> None:
        self.adaptable.reset()

    def begin(self, images: np.ndarray) -> None:
        self.taps = self.tap_fn(self.adaptable, images)

    def _sample(self, i: int) -> list[torch.Tensor]:
        return [t[i:i + 1] for t in self.taps]

    def step(self, i: int) -> tuple[int, bool | None]:
        pred = int(self.method.step(self._sample(i)).argmax())
        exit_k = getattr(self.method, "last_exit", None)
        return pred, None if exit_k is None else int(exit_k) < self.last_stage

    def feedback(self, i: int, label: int) -> None:
        target = torch.zeros(1, self.method.num_classes)
        target[0, label] = 1.0
        self.method.step(self._sample(i), target)


def run_stream(adaptable: Adaptable, segments: list[Segment], tap_fn: TapFunction = torch_taps,
               labelled_fraction: float = 0.0, seed: int = 0, progress: bool = True) -> StreamResult:
    """Stream every segment through ``adaptable`` (reset where a segment says so).

    Raises:
        ConfigError: ``labelled_fraction`` outside [0, 1].
    """
    return walk_stream(_TorchRunner(adaptable, tap_fn), segments, adaptable.method.name, labelled_fraction, seed,
                       progress)


@dataclass(frozen=True)
class EvalReport:
    """What ``edgetune eval`` prints: the method next to ``source`` on the same stream."""

    model: str
    data: str
    severity: int
    protocol: str
    seed: int
    backbone: str
    result: StreamResult
    source: StreamResult  # the no-adaptation floor on the same stream
    memory_bytes: dict[str, int]
    source_data: SourceInfo | None = None  # what fit and calibration read
    task: str = "same"  # "new": the stream's classes are not the source's (``start_new_task``)
    reinitialised: tuple[str, ...] = ()  # what started at zero to learn the new classes

    def to_json(self) -> dict:
        return {"method": self.result.method, "model": self.model, "data": self.data, "severity": self.severity,
                "protocol": self.protocol, "seed": self.seed, "backbone": self.backbone,
                "source_data": self.source_data.to_json() if self.source_data else None,
                "samples": self.result.samples, "labelled_fraction": self.result.labelled_fraction,
                "mean_online_accuracy": _json_number(self.result.mean),
                "source_mean_online_accuracy": _json_number(self.source.mean),
                "per_corruption": _json_numbers(self.result.per_corruption),
                "source_per_corruption": _json_numbers(self.source.per_corruption),
                "early_exit_rate": self.result.early_exit_rate, "collapse_restores": self.result.restores,
                "memory_bytes": self.memory_bytes, "task": self.task, "reinitialised": list(self.reinitialised)}

    def table(self) -> str:
        name = self.result.method + (f" (supervised, {self.result.labelled_fraction:.0%} labelled)"
                                     if self.result.labelled_fraction else "")
        rows = [f"{self.model} on {self.data}, severity {self.severity}, {self.protocol}, seed {self.seed}, "
                f"backbone {self.backbone}, {self.result.samples} samples"]
        if self.source_data is not None:
            rows.append(self.source_data.line())
        if self.task == "new":
            rows.append(f"new task: {', '.join(self.reinitialised)} started at zero and learn the stream's classes "
                        "from revealed labels only; source is the unchanged model (scored on classes it never saw)")
        rows.append(f"{'corruption':<20} {'source':>8} {name:>10}")
        for c, acc in self.result.per_corruption.items():
            rows.append(f"{c:<20} {_percent(self.source.per_corruption[c], 8)} {_percent(acc, 10)}")
        rows.append(f"{'mean':<20} {_percent(self.source.mean, 8)} {_percent(self.result.mean, 10)}")
        if self.result.early_exit_rate is not None:
            rows.append(f"early-exit rate {100 * self.result.early_exit_rate:.1f}%")
        if self.result.restores:
            rows.append(f"collapse guard restored weights {self.result.restores} times")
        return "\n".join(rows)


def tap_function(adaptable: Adaptable, data, backbone: str = "torch") -> tuple[TapFunction, str]:
    """Where the frozen taps come from: torch (float) or the exported int8 frozen.onnx in onnxruntime.

    Returns the function and a label for reports. Methods that adapt the backbone itself
    (not partitioned) always run it in torch.
    """
    if backbone == "torch":
        return torch_taps, "torch"
    if not adaptable.method.partitioned:
        return torch_taps, f"torch ({adaptable.method.name} adapts the backbone itself)"
    import tempfile
    from pathlib import Path

    from edgetune.export import export
    bundle = Path(tempfile.mkdtemp(prefix="edgetune-eval-"))
    export(adaptable, data, bundle, quantize=True, progress=False)
    from edgetune.ort_runtime import ort_tap_function
    return ort_tap_function(bundle), "onnxruntime int8"


BACKBONES = ("torch", "onnx-int8", "compiled")


def check_stream_classes(stream_classes: int, model_classes: int, stream: str, component: str = "eval") -> None:
    """A new task is learnt by the model's own class layers: the stream may have fewer classes (the other
    outputs are never a target), not more.

    Raises:
        ConfigError: the stream has more classes than the model outputs.
    """
    if stream_classes > model_classes:
        raise ConfigError(f"{component}: the stream {stream} has {stream_classes} classes, more than the model's "
                          f"{model_classes} outputs a new task can learn; stream data with at most {model_classes} "
                          "classes, or train a backbone with as many classes (train-source)")


def _compiled(adaptable: Adaptable, data, segments: list[Segment], labelled_fraction: float, seed: int,
              progress: bool) -> tuple[StreamResult, str]:
    """Export ``adaptable`` (int8) and stream the segments through its compiled host runtime.

    Raises:
        ConfigError: the method adapts the backbone itself, so there is no compiled program for it.
    """
    import tempfile
    from pathlib import Path

    from edgetune.deploy import save_initial_state
    from edgetune.deploy.host import run_compiled_stream
    from edgetune.export import export

    method = adaptable.method
    if not method.partitioned and not method.folds_into_int8:  # norm-align's state is the int8 requantisation
        raise ConfigError(f"eval: {method.name} adapts the backbone itself and has no compiled program; use "
                          "--runtime torch, or a partitioned method (feature-align, tinytta, lst, vqt, norm-align)")
    bundle = Path(tempfile.mkdtemp(prefix="edgetune-eval-"))
    export(adaptable, data, bundle, quantize=True, progress=False)
    save_initial_state(bundle, method)
    result = run_compiled_stream(bundle, segments, labelled_fraction, seed, progress, method.name)
    return result, "compiled int8 (TVM C kernels + C runtime, host)"


def evaluate(backbone, model_name: str, method: str, data, corruptions: tuple[str, ...] | str, severity: int,
             protocol: str, seed: int = 0, samples_per_corruption: int | None = None, backbone_kind: str = "torch",
             overrides: dict[str, str] | None = None, labelled_fraction: float = 0.0,
             progress: bool = True, source=None, source_mode: str = "labelled", warmup: int = WARMUP,
             source_origin: str | None = None, resize: tuple[int, int] | None = None,
             crop: tuple[int, int] | None = None, task: str = "same", learner=None) -> EvalReport:
    """Fit ``method`` (and ``source``, the no-adaptation floor) on the *source*, stream the shifted
    test split of ``data`` (the *stream*) through both, and report online accuracy side by side
    with the method's memory table and what served as source.

    ``data`` and ``source``: anything ``edgetune.data.load_data`` takes (``resize`` / ``crop``
    apply to both). ``corruptions``: names, or a spec string for ``parse_corruptions`` (``all``
    means the sensor shifts for 1-D samples). ``source_mode``: ``labelled``, ``unlabelled`` or
    ``none`` (a warm-up on the first ``warmup`` stream samples; see ``edgetune.data.roles``).
    ``source=None`` with a mode other than ``none`` uses the training split of ``data`` itself:
    right only for a model trained on that split (the CLI passes the checkpoint's recorded
    training data instead, see ``checkpoint_source``). ``source_origin`` says in the report
    where the source came from.

    ``task``: ``same`` (the stream has the source's classes) or ``new`` (transfer: the method's
    class layers start at zero and learn the stream's classes from revealed labels, see
    ``start_new_task``; needs ``labelled_fraction > 0``). A stream from another built-in dataset
    than the source is refused with ``same``: its classes mean other things, and the accuracy
    would be silently wrong (``edgetune.data.roles.check_task``).

    ``learner``: how the method learns from revealed labels (``edgetune.methods.base.Learner``: Adam, replay,
    warm-up), given to it after the fit (``Method.use_learner``) on every runtime: the torch step, and the
    bundle's manifest that the compiled runtime builds in; None: the method's default.

    Raises:
        EdgetuneError: bad names or options (see ``prepare``, ``build_stream``, ``run_stream``);
            DataError: data or source samples whose shape is not the model's input, or a
            labelled mode with an unlabelled source.
        ConfigError: a stream of another built-in dataset with ``task='same'``; ``task='new'``
            without labels, with a method that cannot learn new classes or a stream of more classes than the
            model's; a ``learner`` with no label revealed.
    """
    import copy

    from edgetune.adapt import fit, prepare, start_new_task
    from edgetune.data import build_stream, conform, load_data, parse_corruptions
    from edgetune.data.roles import check_mode, check_task, source_info
    from edgetune.memory import memory_table

    if backbone_kind not in BACKBONES:
        raise ConfigError(f"eval: unknown runtime {backbone_kind!r}; pick one of {', '.join(BACKBONES)}")
    check_mode(source_mode)
    check_task(task, labelled_fraction)
    if learner is not None and not labelled_fraction:
        raise ConfigError("eval: --learner says how revealed labels are learnt from, but none is revealed "
                          "(--labelled-fraction 0); pass --labelled-fraction F with F > 0, or drop --learner")
    shape = tuple(backbone.input_shape)
    stream_data = conform(load_data(data, resize, crop), shape, "data")
    if isinstance(corruptions, str):
        corruptions = parse_corruptions(corruptions, "image" if len(shape) == 3 else "array")
    segments = build_stream(stream_data, corruptions, severity, protocol, seed, samples_per_corruption)
    src, origin = _source_role(stream_data, source, source_mode, segments, warmup, shape, resize, crop)
    origin = source_origin or origin
    check_task(task, labelled_fraction, stream_data.name, src.name if source_mode != "none" else None)
    if task == "new":
        check_stream_classes(stream_data.num_classes, backbone.num_classes, stream_data.name)
    reinitialised: list[str] = []
    results: dict[str, StreamResult] = {}
    labels: dict[str, str] = {}
    memory: dict[str, int] = {}
    for name, ovr, frac in ((method, overrides or {}, labelled_fraction), ("source", {}, 0.0)):
        adaptable = prepare(copy.deepcopy(backbone), name, ovr, model_name=model_name, seed=seed)
        fit(adaptable, src, seed=seed, progress=progress, mode=source_mode)
        if task == "new" and name == method:
            reinitialised = start_new_task(adaptable)
        if learner is not None and name == method:
            adaptable.method.use_learner(learner)  # the torch step uses it; export writes it for the C runtime
        if backbone_kind == "compiled":
            results[name], labels[name] = _compiled(adaptable, src, segments, frac, seed, progress)
        else:
            tap_fn, labels[name] = tap_function(adaptable, src, backbone_kind)
            results[name] = run_stream(adaptable, segments, tap_fn, frac, seed, progress)
        if name == method:
            memory = memory_table(adaptable)
    return EvalReport(model_name, stream_data.name, severity, protocol, seed, labels[method], results[method],
                      results["source"], memory, source_info(src, source_mode, origin), task, tuple(reinitialised))


def _source_role(stream_data: Dataset, source, mode: str, segments: list[Segment], warmup: int,
                 shape: tuple[int, ...], resize, crop) -> tuple[Dataset, str]:
    """The source dataset of ``evaluate`` and where it came from (see its docstring)."""
    from edgetune.data import conform, load_data, warmup_source

    if mode == "none":
        if source is not None:
            raise ConfigError("eval: source mode 'none' uses no source data, but a source was given; drop one")
        stream = np.concatenate([s.images for s in segments])
        return warmup_source(stream, stream_data.name, warmup), f"warm-up on the first {warmup} stream samples"
    if source is None:
        return stream_data, "the stream's own dataset (API default; right only if the model was trained on it)"
    return conform(load_data(source, resize, crop), shape, "source"), "given"
