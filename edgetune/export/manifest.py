"""The bundle's manifest: what ``export`` wrote and how to call it (format ``edgetune-bundle/2``).

A bundle is a folder::

    frozen.onnx     input "x" float32 [1, C, H, W]; outputs = the method's taps in ``taps()``
                    order, named by ``TapSpec.name`` ("tap3_pool" [1, 96], "tap1_map" [1, 24, 8, 8]),
                    float32; opset 17, static shapes, int8 QDQ unless exported with --no-quantize.
    trainable.onnx  inputs, in calling order: the taps (same names and shapes as frozen.onnx's
                    outputs), one per state buffer "state_<buffer>", "momentum" float32 [1],
                    "target" float32 [1, classes]. Outputs: "logits" [1, classes], "loss" [] (a
                    scalar), then "new_state_<buffer>" per state input.
    manifest.json   this file's ``Manifest``.

What a runtime needs beyond the graphs is the method's declared contract (``Manifest.runtime``,
written from ``Method.contract()``): the EMA momentum schedule fed as "momentum", the early exits
(which trainable.onnx state input holds the one-hot of the exit taken, and after which backbone
stage each exit is decided), the collapse guard's settings, and what a revealed label does.
Runtimes read these typed fields only, never config field names or buffer-name suffixes. Format
``edgetune-bundle/1`` (before the contract) is refused with a one-line error: re-export.

Naming rule (compilers must read names from the manifest, never re-derive them): an ONNX name is
the torch name (``Method.named_parameters()`` / ``named_buffers()``) with "." replaced by "_".
Every parameter of the method module (trainable or not) is an initialiser of trainable.onnx under
that name; ``trainable.parameters`` lists the trainable ones first, in the calling order of
``Method.trainable_names()``, then the others. Buffers that are not state (source statistics) are
initialisers too, but constants. The SGD momentum buffer of a trainable parameter ``p`` is called
``sgd_momentum_<p>`` (``trainable.optimizer.states``, same order as the trainable parameters).
Every file's sha256 is recorded; ``load_manifest`` refuses a bundle whose files do not match:
the two graphs (``frozen.sha256``, ``trainable.sha256``), the side files written with them
(``files``: ``initial_state.npz``, the method's running statistics the device starts from, and
``source.json``, what the bundle was fitted on; an ``.npz`` is hashed by its arrays, so saving the
same statistics again keeps the hash) and the manifest itself (``digest``: the sha256 of the
manifest with an empty digest), so a bundle edited after export is refused, not run.
"""
from __future__ import annotations

import hashlib
import json
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

from edgetune.errors import CheckpointError

FORMAT = "edgetune-bundle/2"
OLD_FORMATS = {"edgetune-bundle/1": "written before methods declared their schedule, exits and guard"}
FROZEN_FILE = "frozen.onnx"
TRAINABLE_FILE = "trainable.onnx"
MANIFEST_FILE = "manifest.json"
# Files written next to the graphs whose hashes go into ``Manifest.files`` when present.
SIDE_FILES = ("initial_state.npz", "source.json")
GIVEN = "as given"  # QuantizationSpec.calibration_method of a graph the user quantised

INPUT_ROLES = ("tap", "state", "momentum", "target")
OUTPUT_ROLES = ("logits", "loss", "state")


def onnx_name(torch_name: str) -> str:
    """The ONNX name of a torch parameter or buffer (the bundle's naming rule)."""
    return torch_name.replace(".", "_")


@dataclass(frozen=True)
class TensorSpec:
    """A plain tensor: name, static shape, element type."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"


@dataclass(frozen=True)
class TapOutput:
    """An output of frozen.onnx: stage ``stage``'s output, pooled to [1, C] or whole."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    stage: int
    pooled: bool


@dataclass(frozen=True)
class GraphInput:
    """An input of trainable.onnx; ``role`` is one of ``INPUT_ROLES``."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    role: str


@dataclass(frozen=True)
class GraphOutput:
    """An output of trainable.onnx; a ``state`` output names the state input it ``updates``."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    role: str
    updates: str | None = None


@dataclass(frozen=True)
class ParameterSpec:
    """An initialiser of trainable.onnx that is a parameter of the method (``torch_name`` in torch)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    trainable: bool
    torch_name: str


@dataclass(frozen=True)
class OptimizerState:
    """One optimizer buffer (same shape as the parameter it belongs to)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    of: str


@dataclass(frozen=True)
class OptimizerSpec:
    """The test-time update: SGD with momentum on the trainable parameters."""

    kind: str
    lr: float
    momentum: float
    states: tuple[OptimizerState, ...]


@dataclass(frozen=True)
class MomentumSchedule:
    """EMA momentum of sample t: ``max(floor, start * decay**t)`` (fed as trainable.onnx's "momentum")."""

    start: float
    decay: float
    floor: float


@dataclass(frozen=True)
class ExitSpec:
    """Early exits: exit k is decided after backbone stage ``stages[k]`` (the last exit: the full
    network); the trainable.onnx state input ``state`` holds the one-hot of the exit taken."""

    stages: tuple[int, ...]
    state: str

    @property
    def count(self) -> int:
        return len(self.stages)


@dataclass(frozen=True)
class GuardSpec:
    """The collapse guard: histogram rate, collapse share, snapshot period, warm-up (samples), and what a trip
    restores (``GUARD_RESTORES``): ``"weights"``, the last good snapshot of the trainable parameters, or
    ``"source"``, every state buffer back to the bundle's values (the generated model's reset). Bundles written
    before the field read as ``"weights"``, what their runtimes did."""

    rate: float
    max_share: float
    every: int
    warmup: int
    restore: str = "weights"


GUARD_RESTORES = ("weights", "source")  # what a collapse-guard trip restores


LABEL_USES = ("none", "target")  # "target": one update towards the one-hot "target"; "none": no effect


@dataclass(frozen=True)
class LearnerSpec:
    """How a revealed label is learnt from beyond its one optimizer step (``Method.learner()``): a replay
    buffer of the last ``replay`` labelled samples' taps (int8, one scale per tap) and labels, ``replay_steps``
    steps on samples drawn from it (xorshift32 seeded with ``seed``) after each label, and a linear lr warm-up
    over the first ``warmup`` labels (targets/runtime/et_replay.h). Bundles without the field have none."""

    replay: int
    replay_steps: int
    warmup: int
    seed: int


@dataclass(frozen=True)
class RuntimeContract:
    """What the method declared for the runtime (``Method.contract()``); None: the method has none."""

    momentum_schedule: MomentumSchedule | None
    exits: ExitSpec | None
    guard: GuardSpec | None
    labels: str
    learner: LearnerSpec | None = None  # None: one step per label, constant lr (bundles before replay)


TASK_KINDS = ("same", "new")  # the bundle's classes: the source's, or a new task's learnt on the device


@dataclass(frozen=True)
class TaskSpec:
    """Whose classes the bundle predicts. ``"same"``: the source's, as fitted. ``"new"`` (transfer): the class
    layers ``reinitialised`` start at zero and learn the classes of the stream ``data`` from revealed labels
    (``edgetune.adapt.start_new_task``); a stream of another built-in dataset is refused. Bundles written before
    the field read as ``"same"``, what they are."""

    kind: str = "same"
    data: str = ""  # "new": the stream dataset whose classes are learnt (a built-in name, or a file / folder name)
    reinitialised: tuple[str, ...] = ()  # "new": torch names of the parameters that started at zero


@dataclass(frozen=True)
class AlignedConv:
    """One convolution of frozen.onnx that norm-align re-standardises through its requantisation.

    ``conv``: its position among frozen.onnx's Conv nodes in graph order (``node``: the node's
    name). The compiled frozen graph takes two more inputs per aligned conv, after the image: the
    requantisation scale ``scale`` and the int32 accumulator offset ``offset`` (float32 [C] holding
    integers), both trainable.onnx state inputs of the same names; and it returns two more outputs
    after the taps: ``sum`` and ``sumsq`` (float32 [1, C]), the per-channel sum and sum of squares
    of the unaligned int32 accumulator over the layer's ``positions`` output positions, which
    trainable.onnx takes as tap inputs of the same names. ``accum_scale`` (float value of one
    accumulator unit, ``fl32(sx * sw)``), ``requant`` (the exported scale ``S``), ``source_mean`` and
    ``source_sqmean`` (the int8 graph's pre-activation statistics on the source) are the constants
    trainable.onnx folds with; they are recorded here so the bundle states them.
    """

    conv: int
    node: str
    channels: int
    positions: int
    scale: str
    offset: str
    sum: str
    sumsq: str
    accum_scale: tuple[float, ...]
    requant: tuple[float, ...]
    source_mean: tuple[float, ...]
    source_sqmean: tuple[float, ...]


@dataclass(frozen=True)
class NormAlignSpec:
    """norm-align's convolutions (``AlignedConv``) and how its state is folded (``eps`` of the
    standardisation; ``include_sample`` false: a sample is requantised with the statistics up to the
    previous one, so the fold for the next sample is computed at the end of this one)."""

    convs: tuple[AlignedConv, ...]
    eps: float
    include_sample: bool


@dataclass(frozen=True)
class FrozenPart:
    file: str
    sha256: str
    quantized: bool
    outputs: tuple[TapOutput, ...]


@dataclass(frozen=True)
class TrainablePart:
    file: str
    sha256: str
    inputs: tuple[GraphInput, ...]
    outputs: tuple[GraphOutput, ...]
    parameters: tuple[ParameterSpec, ...]
    optimizer: OptimizerSpec

    def trainable_parameters(self) -> tuple[ParameterSpec, ...]:
        """The parameters the compiler differentiates ``loss`` by, in calling order."""
        return tuple(p for p in self.parameters if p.trainable)


@dataclass(frozen=True)
class QuantizationSpec:
    """How frozen.onnx was quantised (onnxruntime static QDQ)."""

    format: str
    per_channel: bool
    weight_type: str
    activation_type: str
    weight_symmetric: bool
    activation_symmetric: bool
    calibration_method: str
    calibration_samples: int
    calibration_data: str


@dataclass(frozen=True)
class Manifest:
    """Everything a compiler or runtime needs to call a bundle's two graphs."""

    model: str
    method: str
    config: dict[str, Any]
    num_classes: int
    target: str
    input: TensorSpec
    frozen: FrozenPart
    trainable: TrainablePart
    runtime: RuntimeContract
    quantization: QuantizationSpec | None
    memory: dict[str, int]
    edgetune_version: str
    format: str = FORMAT
    files: dict[str, str] = field(default_factory=dict)  # side file -> sha256 (``file_sha256``)
    digest: str = ""  # sha256 of this manifest with digest "" (``manifest_digest``)
    # norm-align only: the compiled frozen graph's extra inputs (state) and outputs (statistics)
    norm_align: NormAlignSpec | None = None
    task: TaskSpec = TaskSpec()  # the source's classes unless exported for a new task (``seal_bundle``)

    def to_json(self) -> str:
        fields_ = asdict(self)
        if fields_["norm_align"] is None:  # only norm-align bundles carry the section
            del fields_["norm_align"]
        return json.dumps({"format": fields_.pop("format"), **fields_}, indent=2) + "\n"

    def describe(self) -> str:
        """A human-readable summary (``edgetune inspect``)."""
        q = self.quantization
        if q is None:
            kind = "float32"
        else:
            how = (f"quantised as given ({q.calibration_data})" if q.calibration_method == GIVEN
                   else f"calibrated on {q.calibration_samples} {q.calibration_data} images")
            kind = (f"int8 {q.format}, {'per-channel ' if q.per_channel else ''}"
                    f"{'symmetric' if q.weight_symmetric else 'asymmetric'} weights, {how}")
        t = self.trainable
        trained = t.trainable_parameters()
        r = self.runtime
        schedule, exits, guard = r.momentum_schedule, r.exits, r.guard
        lines = [
            f"{self.method} on {self.model} ({self.num_classes} classes), target {self.target}; {self.format}, "
            f"edgetune {self.edgetune_version}",
            f"{self.frozen.file} ({kind}): {_tensor(self.input)} -> "
            + ", ".join(_tensor(o) for o in self.frozen.outputs),
            f"{t.file} inputs: " + ", ".join(f"{_tensor(i)} {i.role}" for i in t.inputs),
            f"{t.file} outputs: " + ", ".join(_tensor(o) for o in t.outputs),
            f"trainable parameters ({sum(_numel(p.shape) for p in trained)} floats, calling order): "
            + (", ".join(_tensor(p) for p in trained) or "none"),
            "frozen float parameters: " + (", ".join(_tensor(p) for p in t.parameters if not p.trainable) or "none"),
            f"optimizer: {t.optimizer.kind} lr={t.optimizer.lr:g} momentum={t.optimizer.momentum:g} "
            f"({len(t.optimizer.states)} state buffers)",
            "EMA momentum: " + (f"max({schedule.floor:g}, {schedule.start:g} * {schedule.decay:g}^t)" if schedule
                                else "none"),
            "early exits: " + (f"{exits.count}, after stages {list(exits.stages)} (state {exits.state})" if exits
                               else "none"),
            "collapse guard: " + (f"rate {guard.rate:g}, max share {guard.max_share:g}, snapshot every {guard.every}, "
                                  f"warm-up {guard.warmup}, a trip restores {guard.restore}" if guard else "off"),
            f"labels: {r.labels}" + (f"; replay {r.learner.replay} samples x {r.learner.replay_steps} steps "
                                     f"(seed {r.learner.seed}), lr warm-up over {r.learner.warmup} labels"
                                     if r.learner else ""),
            ("task: same (the source's classes)" if self.task.kind == "same" else
             f"task: new (the classes of {self.task.data}, learnt on the device from revealed labels; started at zero: "
             f"{', '.join(self.task.reinitialised)})"),
            *([f"norm-align: {len(self.norm_align.convs)} aligned convs (graph positions "
               f"{[a.conv for a in self.norm_align.convs]}, {sum(a.channels for a in self.norm_align.convs)} channels)"
               "; their requantisation scale and offset are frozen inputs from the state"]
              if self.norm_align else []),
            "config: " + ", ".join(f"{k}={v}" for k, v in self.config.items()),
            "verified files: " + ", ".join([self.frozen.file, self.trainable.file, *self.files, MANIFEST_FILE]),
        ]
        return "\n".join(lines)

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        """Parse a manifest.

        Raises:
            CheckpointError: not JSON, another format version, or a missing / mistyped field.
        """
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"manifest: not valid JSON ({exc}); re-export the bundle") from None
        if not isinstance(raw, dict) or "format" not in raw:
            raise CheckpointError("manifest: no 'format' field (not an edgetune bundle manifest); "
                                  "re-export the bundle with `edgetune export`")
        if raw["format"] in OLD_FORMATS:
            raise CheckpointError(f"manifest: format {raw['format']!r} was {OLD_FORMATS[raw['format']]} (this "
                                  f"edgetune reads {FORMAT}); re-export the bundle with this edgetune version")
        if raw["format"] != FORMAT:
            raise CheckpointError(f"manifest: unknown format {raw['format']!r} (this edgetune reads {FORMAT}); "
                                  "re-export the bundle with this edgetune version")
        manifest = _build(cls, raw, "manifest")
        r = manifest.runtime
        states = {i.name for i in manifest.trainable.inputs if i.role == "state"}
        if r.labels not in LABEL_USES:
            raise CheckpointError(f"manifest: runtime.labels is {r.labels!r}, not one of {', '.join(LABEL_USES)}; "
                                  "re-export the bundle")
        if r.guard is not None and r.guard.restore not in GUARD_RESTORES:
            raise CheckpointError(f"manifest: runtime.guard.restore is {r.guard.restore!r}, not one of "
                                  f"{', '.join(GUARD_RESTORES)}; re-export the bundle")
        learner = r.learner
        if learner is not None and (min(learner.replay, learner.replay_steps, learner.warmup, learner.seed) < 0
                                    or learner.seed >= 2 ** 32 or (learner.replay > 0 and learner.replay_steps == 0)):
            raise CheckpointError(f"manifest: runtime.learner {learner} is invalid (counts >= 0, replay needs steps, "
                                  "seed < 2^32); re-export the bundle")
        task = manifest.task
        if task.kind not in TASK_KINDS or (task.kind == "new") != bool(task.data and task.reinitialised):
            raise CheckpointError(f"manifest: task {task} is invalid (kind one of {', '.join(TASK_KINDS)}; a new task "
                                  "names its data and the layers it restarted, the same task neither); re-export the "
                                  "bundle")
        if r.exits is not None and (r.exits.state not in states or r.exits.count < 2):
            raise CheckpointError(f"manifest: runtime.exits names state {r.exits.state!r} with {r.exits.count} "
                                  "exits (needs a state input and >= 2 exits); re-export the bundle")
        return manifest


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _tensor(spec: Any) -> str:
    return f"{spec.name} {list(spec.shape)}"


def _build(tp: Any, value: Any, where: str) -> Any:
    """Rebuild a value of type ``tp`` from parsed JSON, checking types as it goes."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _build(next(a for a in args if a is not type(None)), value, where)
    if isinstance(tp, type) and is_dataclass(tp):
        if not isinstance(value, dict):
            raise CheckpointError(f"manifest: {where} should be an object (got {type(value).__name__}); "
                                  "re-export the bundle")
        hints = typing.get_type_hints(tp)
        kwargs = {}
        for f in fields(tp):
            if f.name not in value:
                if f.default is not MISSING or f.default_factory is not MISSING:
                    continue
                raise CheckpointError(f"manifest: {where} lacks field {f.name!r} (corrupt or edited); "
                                      "re-export the bundle")
            kwargs[f.name] = _build(hints[f.name], value[f.name], f"{where}.{f.name}")
        return tp(**kwargs)
    if origin is tuple:
        if not isinstance(value, list):
            raise CheckpointError(f"manifest: {where} should be a list (got {value!r}); re-export the bundle")
        return tuple(_build(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise CheckpointError(f"manifest: {where} should be an object (got {value!r}); re-export the bundle")
        return {k: _build(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    ok = isinstance(value, tp) and not (tp is int and isinstance(value, bool))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise CheckpointError(f"manifest: {where} should be {tp.__name__} (got {value!r}); re-export the bundle")
    return value


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def file_sha256(path: Path) -> str:
    """The sha256 of a side file: of its bytes, or for an ``.npz`` of its arrays (name, dtype, shape,
    values, in name order), since ``np.savez`` of the same arrays is not byte-identical.

    Raises:
        CheckpointError: an ``.npz`` that cannot be read.
    """
    if path.suffix != ".npz":
        return sha256_of(path)
    import numpy as np

    h = hashlib.sha256()
    try:
        with np.load(path, allow_pickle=False) as data:
            for name in sorted(data.files):
                a = np.ascontiguousarray(data[name])
                h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
                h.update(a.tobytes())
    except Exception as exc:  # zipfile, pickle or format errors: the file is damaged
        raise CheckpointError(f"bundle: {path} cannot be read ({type(exc).__name__}: {exc}); re-export the "
                              "bundle") from None
    return h.hexdigest()


def manifest_digest(manifest: Manifest) -> str:
    """The sha256 of ``manifest`` with an empty digest field (canonical JSON, sorted keys; an absent
    ``norm_align``, the default ``task`` and a guard's default ``restore`` are left out, so bundles sealed before
    those fields existed keep their digest)."""
    fields_ = asdict(replace(manifest, digest=""))
    if fields_["norm_align"] is None:
        del fields_["norm_align"]
    if fields_["runtime"]["learner"] is None:  # bundles sealed before learners keep their digest
        del fields_["runtime"]["learner"]
    if manifest.task == TaskSpec():  # bundles sealed before the task field (all of the same task) keep theirs
        del fields_["task"]
    guard = fields_["runtime"]["guard"]
    if guard is not None and guard["restore"] == "weights":
        del guard["restore"]
    text = json.dumps(fields_, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def seal(manifest: Manifest, directory: str | Path) -> Manifest:
    """``manifest`` with the hashes of the side files present in ``directory`` and its own digest."""
    d = Path(directory)
    files = {name: file_sha256(d / name) for name in SIDE_FILES if (d / name).is_file()}
    sealed = replace(manifest, files=files, digest="")
    return replace(sealed, digest=manifest_digest(sealed))


def seal_bundle(bundle_dir: str | Path, task: TaskSpec | None = None) -> Manifest:
    """Record the side files written after ``export`` (``source.json``, a re-saved initial state) in
    the bundle's manifest and rewrite it; the graphs are checked first. ``task``: also record whose classes the
    bundle predicts (a bundle exported for a new task says so before anything is built from it); None keeps it.

    Raises:
        CheckpointError: as ``load_manifest`` (graphs only: side files are what this records), or ``task`` is
            not a valid task (refused before anything is written).
    """
    d = Path(bundle_dir)
    manifest = load_manifest(d, side_files=False)
    manifest = seal(manifest if task is None else replace(manifest, task=task), d)
    text = manifest.to_json()
    if task is not None:
        Manifest.from_json(text)  # checks the task
    (d / MANIFEST_FILE).write_text(text)
    return manifest


def load_manifest(bundle_dir: str | Path, side_files: bool = True) -> Manifest:
    """Read ``bundle_dir/manifest.json`` and check that every file it records is the one it describes:
    the two graphs, the side files (``files``) and the manifest itself (``digest``).

    Raises:
        CheckpointError: missing or corrupt manifest, unknown format version, a manifest edited after
            export, or a recorded file that is missing or does not match its sha256.
    """
    d = Path(bundle_dir)
    path = d / MANIFEST_FILE
    if not d.is_dir():
        raise CheckpointError(f"bundle: {d} is not a folder; give a bundle folder written by `edgetune export "
                              f"... -o {d}`")
    if not path.is_file():
        raise CheckpointError(f"bundle: {path} not found; create a bundle with `edgetune export ... -o {d}`")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"bundle: {path} cannot be read ({type(exc).__name__}); re-export the bundle") from None
    manifest = Manifest.from_json(text)
    if manifest.digest != manifest_digest(manifest):
        why = "has no digest (written before bundles were sealed)" if not manifest.digest else \
            "does not match its digest (edited after export)"
        raise CheckpointError(f"bundle: {path} {why}; re-export the bundle with `edgetune export`, or restore "
                              "the manifest")
    for part in (manifest.frozen, manifest.trainable):
        graph = d / part.file
        if not graph.is_file():
            raise CheckpointError(f"bundle: {graph} is missing; re-export the bundle")
        if sha256_of(graph) != part.sha256:
            raise CheckpointError(f"bundle: {graph} does not match the sha256 in {MANIFEST_FILE} (corrupt or "
                                  "edited); re-export the bundle")
    if side_files:
        for name, digest in manifest.files.items():
            f = d / name
            if not f.is_file():
                raise CheckpointError(f"bundle: {f} is missing (listed in {MANIFEST_FILE}); restore it or "
                                      "re-export the bundle")
            if file_sha256(f) != digest:
                raise CheckpointError(f"bundle: {f} does not match the sha256 in {MANIFEST_FILE} (corrupt or "
                                      "edited after export); restore it or re-export the bundle")
    return manifest
