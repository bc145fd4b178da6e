"""What every test-time adaptation method is: the contract the runtime, export and compilers rely on.

A method attaches small modules to a frozen backbone. Partitioned methods read only *taps*
(stage outputs, pooled or whole) that the frozen int8 graph computes; their whole per-sample
computation is ``forward_graph`` — a pure function exported as ``trainable.onnx``::

    forward_graph(taps, state, momentum, target) -> (logits, loss, new_state)

* ``taps``: tensors in ``taps()`` order (batch 1).
* ``state``: forward-only running tensors (feature statistics), in ``state_names()`` order.
* ``momentum``: shape [1], the EMA momentum for this sample (the runtime computes it from the
  method's declared ``schedule()``).
* ``target``: shape [1, classes]; all zeros in the unsupervised protocol, a one-hot label in the
  supervised mode. ``loss`` is cross-entropy towards ``target`` when it is non-zero, else the
  method's unsupervised loss; a label therefore never changes a prediction already scored.

Gradients of ``loss`` are taken with respect to exactly ``trainable_names()`` and applied by
SGD with momentum (``lr``, ``momentum`` in every config). A gradient stop inside ``forward_graph``
(e.g. a detached pseudo-label) goes through ``stop_gradient``, never a bare ``detach``, so export
can keep it in the ONNX graph. Methods that adapt the backbone itself
(tent, bn-adapt, alpha-bn) set ``partitioned = False``: their tap is the input image.

What the runtime needs beyond the graph is declared, never inferred from config field names or
buffer names (``contract()`` collects it; export writes it into the manifest as typed fields):

* ``schedule()``: the EMA momentum schedule of the running statistics (``Schedule``), or None;
* ``exits()``: the early exits (``Exits``): how many, after which backbone stage each one is
  decided, and the state buffer holding the one-hot of the exit the last sample took;
* ``guard()``: the collapse guard's settings (``Guard``), or None for no guard;
* ``labels()``: what a revealed label does (``Labels``);
* ``learner()``: how a revealed label is learnt from (``Learner``: the optimizer, an lr warm-up and a
  replay buffer), set per instance with ``use_learner``.
Defaults fit a method with no running statistics, no exits, the standard guard (when
``config.guard``) and cross-entropy updates from labels when it has trainable parameters.
"""
from __future__ import annotations

import collections
import copy
import math
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from edgetune.errors import ConfigError
from edgetune.export.manifest import GUARD_RESTORES  # what a guard trip may restore: the bundle format's
from edgetune.export.manifest import LABEL_USES  # what a revealed label may do: one list, the bundle format's
from edgetune.models import Backbone
from edgetune.registry import Registry

METHODS: Registry[type["Method"]] = Registry("method")


@dataclass(frozen=True)
class TapSpec:
    """A backbone tensor a method reads: stage ``stage``'s output, pooled to N x C or whole.

    ``stage == -1`` is the input image (methods that run the backbone themselves).
    """

    stage: int
    pooled: bool

    @property
    def name(self) -> str:
        return "input" if self.stage < 0 else f"tap{self.stage}_{'pool' if self.pooled else 'map'}"


@dataclass(frozen=True)
class Range:
    """The values a numeric config field accepts (declared once, in the field's metadata)."""

    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, value: float) -> bool:
        above = value > self.lo if self.lo_open else value >= self.lo
        below = value < self.hi if self.hi_open else value <= self.hi
        return math.isfinite(value) and above and below

    def __str__(self) -> str:
        return f"{'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"


def setting(default: Any, valid: Range, help: str) -> Any:  # noqa: A002 - the field's help text
    """A numeric config field: its default, the range it accepts and the help the CLI shows."""
    return field(default=default, metadata={"help": help, "range": valid})


@dataclass(frozen=True)
class MethodConfig:
    """Fields shared by every method; each field's ``help`` is shown by the CLI, and every numeric
    field declares its ``range`` (checked whenever a config is made, from the CLI or the API)."""

    lr: float = setting(0.0, Range(0.0, 10.0), "SGD learning rate of the test-time update (0: no update)")
    momentum: float = setting(0.9, Range(0.0, 1.0, hi_open=True), "SGD momentum of the test-time update")
    fit_epochs: int = setting(30, Range(0, 100_000), "epochs of the pre-deployment fit on source data")
    fit_lr: float = setting(3e-3, Range(0.0, 10.0, lo_open=True), "AdamW learning rate of the pre-deployment fit")
    guard: bool = field(default=True, metadata={"help": "collapse guard: restore the last good weights "
                                                        "when predictions collapse to one class"})

    def __post_init__(self) -> None:
        for f in fields(self):
            value, valid = getattr(self, f.name), f.metadata.get("range")
            if valid is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)):
                raise ConfigError(f"{type(self).__name__}: {f.name} must be a number (got {value!r}); "
                                  f"give a value in {valid}")
            if valid is not None and value not in valid:
                raise ConfigError(f"{type(self).__name__}: {f.name}={value!r} is outside {valid}; "
                                  f"give a value in that range (default {f.default!r})")

    def replace(self, overrides: dict[str, str]) -> "MethodConfig":
        """A copy with ``key=value`` strings applied (CLI ``--set``), cast to each field's type.

        Raises:
            ConfigError: unknown key or a value of the wrong type.
        """
        known = {f.name: f for f in fields(self)}
        values: dict[str, Any] = {}
        for key, raw in overrides.items():
            if key not in known:
                raise ConfigError(f"--set: {type(self).__name__} has no field {key!r} "
                                  f"(fields: {', '.join(known)})")
            current = getattr(self, key)
            try:
                if isinstance(current, bool):
                    if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                        raise ValueError(raw)
                    values[key] = raw.lower() in ("1", "true", "yes")
                elif isinstance(current, tuple):
                    values[key] = tuple(int(v) for v in raw.split(",") if v)
                else:
                    values[key] = type(current)(raw)
            except ValueError:
                raise ConfigError(f"--set: {key} expects {type(current).__name__} (got {raw!r})") from None
        return type(self)(**{**{f.name: getattr(self, f.name) for f in fields(self)}, **values})


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of softmax(logits) along the last axis."""
    logp = F.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def stop_gradient(x: torch.Tensor) -> torch.Tensor:
    """The one place a method cuts a gradient path inside ``forward_graph`` (a detached pseudo-label).

    ONNX has no stop-gradient op, so a plain ``detach`` would vanish from ``trainable.onnx`` and
    the compiled gradient would differ from torch's; routing every stop through this function
    gives export a single hook to keep it visible.
    """
    return x.detach()


def supervised_or(unsupervised: torch.Tensor, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy towards ``target`` when it holds a label, else the unsupervised loss (graph-safe)."""
    labelled = target.sum()
    ce = -(target * F.log_softmax(logits, dim=-1)).sum()
    return labelled * ce + (1.0 - labelled) * unsupervised


def ema_momentum(step: int, start: float, decay: float, floor: float) -> float:
    """DUA's decaying momentum: ``max(floor, start * decay**step)``."""
    return max(floor, start * decay ** step)


# --- the method -> runtime contract -------------------------------------------------------------
@dataclass(frozen=True)
class Schedule:
    """EMA momentum of the running statistics at sample t: ``max(floor, start * decay**t)``; t counts
    accepted unsupervised samples (feedback steps use momentum 0: statistics stay as they are)."""

    start: float
    decay: float
    floor: float

    def at(self, step: int) -> float:
        return ema_momentum(step, self.start, self.decay, self.floor)


@dataclass(frozen=True)
class Exits:
    """Early exits: exit k is decided once backbone stage ``stages[k]`` has run (the last exit is the
    full network). ``state`` names the state buffer (``state_names()``) holding the one-hot of the exit
    the last unsupervised sample took -- 0/1 values, never a running count, so nothing in float32 has
    to count past 2^24; runtimes count exits in integers."""

    stages: tuple[int, ...]
    state: str

    @property
    def count(self) -> int:
        return len(self.stages)


@dataclass(frozen=True)
class Guard:
    """The collapse guard (``CollapseGuard``): histogram rate, collapse share, snapshot period, warm-up, and what
    a trip restores: ``"weights"`` (the last good snapshot of the trainable parameters) or ``"source"`` (every
    state buffer back to its value after fit: a method whose adapted state is statistics, with no weights)."""

    rate: float = 0.02
    max_share: float = 0.8
    every: int = 50
    warmup: int = 100
    restore: str = "weights"

    def __post_init__(self) -> None:
        if self.restore not in GUARD_RESTORES:
            raise ConfigError(f"Guard: restore={self.restore!r} is unknown; use one of {', '.join(GUARD_RESTORES)}")




@dataclass(frozen=True)
class Labels:
    """What a revealed label does. ``"target"``: one SGD step of the trainable parameters on the loss
    towards the one-hot ``target`` input (statistics, schedule and guard untouched); ``"none"``: it
    changes nothing (no trainable parameters)."""

    use: str = "target"


OPTIMIZERS = ("sgd", "adam")  # the test-time optimizers a method can learn with (compilers/optimizers.py)


@dataclass(frozen=True)
class Learner:
    """How revealed labels are learnt from (the same on every runtime: targets/runtime/et_replay.h).

    * ``optimizer``: ``"sgd"`` (SGD with the config's momentum) or ``"adam"`` (torch.optim.Adam at the
      config's lr; on a device two float32 moments and a step per trainable parameter instead of one).
    * ``warmup``: the update of every supervised step is scaled by ``min(1, labels / warmup)`` during the
      first ``warmup`` labels (a linear lr warm-up, Goyal et al. 2017), applied as a blend of the weights
      ``p_before + w * (p_after - p_before)`` -- the optimizer's step at lr * w, for SGD and Adam alike.
    * ``replay``: a buffer of the last ``replay`` labelled samples' taps, int8 with one scale per tap
      (``quantise_tap``), and labels; after each label's own step, ``replay_steps`` steps on samples drawn
      from the buffer (index ``xorshift32 % count``, oldest first, seeded with ``seed``), then the label's
      sample joins the buffer (experience replay of features, e.g. Pellegrini et al. 2020 "Latent replay").
      Only samples already scored are replayed: the stream stays single-pass.
    """

    optimizer: str = "sgd"
    warmup: int = 0
    replay: int = 0
    replay_steps: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        problems = ([f"optimizer {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}"]
                    if self.optimizer not in OPTIMIZERS else [])
        problems += [f"{n}={getattr(self, n)!r} is not an integer >= {lo}" for n, lo in
                     (("warmup", 0), ("replay", 0), ("replay_steps", 1), ("seed", 0))
                     if isinstance(getattr(self, n), bool) or not isinstance(getattr(self, n), int)
                     or getattr(self, n) < lo]
        if self.seed >= 2 ** 32:
            problems.append(f"seed={self.seed} does not fit 32 bits")
        if problems:
            raise ConfigError(f"learner: {'; '.join(problems)}; give valid learner settings")


def xorshift32(state: int) -> int:
    """The next xorshift32 value (Marsaglia 2003) of a non-zero 32-bit state: the replay's draws, as in C."""
    state ^= (state << 13) & 0xFFFFFFFF
    state ^= state >> 17
    state ^= (state << 5) & 0xFFFFFFFF
    return state


def quantise_tap(tap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, float32 scale) of one tap as the replay buffer stores it: symmetric, scale = max|x| / 127,
    round half to even -- the float32 operations of et_replay.c."""
    scale = tap.detach().abs().max() / 127.0
    if float(scale) == 0.0:
        return torch.zeros_like(tap, dtype=torch.int8), scale
    return torch.round(tap.detach() / scale).clamp(-127, 127).to(torch.int8), scale


@dataclass(frozen=True)
class Contract:
    """Everything a runtime needs of a method beyond its graph (``Method.contract()``)."""

    schedule: Schedule | None
    exits: Exits | None
    guard: Guard | None
    labels: Labels
    learner: Learner = Learner()


class CollapseGuard:
    """Detects collapse of a stream's predictions and says when to restore good weights.

    Keeps an exponential histogram of predicted classes (window ~``1/rate`` samples). The
    stream counts as collapsed when one class takes more than ``max_share`` of the recent
    predictions; while healthy, a snapshot is due every ``every`` samples.
    """

    def __init__(self, classes: int, rate: float = 0.02, max_share: float = 0.8, every: int = 50,
                 warmup: int = 100) -> None:
        self.rate, self.max_share, self.every, self.warmup = rate, max_share, every, warmup
        self.hist = torch.full((classes,), 1.0 / classes)
        self.seen = 0

    def observe(self, prediction: int) -> str:
        """Record one prediction; returns ``"restore"``, ``"snapshot"`` or ``"ok"``."""
        self.hist *= 1.0 - self.rate
        self.hist[prediction] += self.rate
        self.seen += 1
        if self.seen >= self.warmup and float(self.hist.max()) > self.max_share:
            self.hist.fill_(1.0 / len(self.hist))
            self.seen = 0
            return "restore"
        return "snapshot" if self.seen % self.every == 0 else "ok"


class Method(nn.Module):
    """Base class: subclasses set ``name``, ``Config``, ``paper`` and implement ``taps`` and
    ``forward_graph`` (and ``fit_loss`` / ``state_names`` when they attach or track anything)."""

    name: ClassVar[str]
    paper: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    partitioned: ClassVar[bool] = True
    # Not partitioned, yet exportable: the method's state lives in the frozen int8 graph's
    # requantisation (norm-align), and export writes that graph with state inputs plus the update step.
    folds_into_int8: ClassVar[bool] = False

    def __init__(self, backbone: Backbone, config: MethodConfig) -> None:
        super().__init__()
        self.config = config
        # The backbone is never a submodule of a partitioned method: it is frozen, and it lives
        # on the other side of the partition. Its classifier is copied to the float side.
        object.__setattr__(self, "backbone", backbone)
        self.classifier = copy.deepcopy(backbone.classifier)
        self.num_classes = backbone.num_classes
        self.steps = 0
        self._initial: dict[str, torch.Tensor] | None = None
        self._good: dict[str, torch.Tensor] | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._guard: CollapseGuard | None = None
        self.restores = 0  # collapse-guard restores since construction (reported by evaluation)
        self._learner = Learner()
        self._replay: collections.deque = collections.deque(maxlen=1)
        self._draws = 0  # xorshift32 state of the replay's draws
        self._labels = 0  # revealed labels since reset (the warm-up's clock)

    # --- what the method declares -------------------------------------------------------
    def taps(self) -> tuple[TapSpec, ...]:
        raise NotImplementedError

    def tap_inputs(self) -> list[str]:
        """Names of trainable.onnx's tap inputs, in calling order: the taps' names (norm-align's step
        appends the statistics its compiled frozen graph returns besides the taps)."""
        return [t.name for t in self.taps()]

    def trainable_names(self) -> list[str]:
        """Names (in ``named_parameters()``) of the parameters updated at test time."""
        return []

    def state_names(self) -> list[str]:
        """Names of the forward-only state buffers, in ``forward_graph`` order."""
        return []

    def forward_graph(self, taps: list[torch.Tensor], state: list[torch.Tensor], momentum: torch.Tensor,
                      target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        raise NotImplementedError

    # --- pre-deployment -----------------------------------------------------------------
    def fit_parameters(self) -> list[nn.Parameter]:
        """Parameters trained by the pre-deployment fit (default: the test-time trainable ones)."""
        named = dict(self.named_parameters())
        return [named[n] for n in self.trainable_names()]

    def fit_loss(self, taps: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """Supervised loss of the attachments on a batch of source taps (used by ``fit``)."""
        raise NotImplementedError

    def calibrate(self, batches: Iterable[list[torch.Tensor]]) -> None:
        """Measure source statistics from batches of source taps (before ``fit``)."""

    # --- what the runtime needs (the contract) -----------------------------------------
    def schedule(self) -> Schedule | None:
        """The EMA momentum schedule of the running statistics (None: none; momentum is then 0)."""
        return None

    def exits(self) -> Exits | None:
        """The early exits, or None for a method with one exit."""
        return None

    def guard(self) -> Guard | None:
        """The collapse guard's settings, or None for no guard (``config.guard`` false)."""
        return Guard() if self.config.guard else None

    def labels(self) -> Labels:
        """What a revealed label does (default: an update when there is something to train)."""
        return Labels("target" if self.trainable_names() else "none")

    def learner(self) -> Learner:
        """How revealed labels are learnt from (default: one SGD step each; ``use_learner`` changes it)."""
        return self._learner

    def use_learner(self, learner: Learner) -> None:
        """Learn from labels with ``learner`` from now on (the optimizer is rebuilt: a ``reset``)."""
        self._learner = learner
        self.reset()

    def contract(self) -> Contract:
        """The declarations above, checked against each other.

        Raises:
            ConfigError: an exits state that is not a state buffer, exits on stages the method does
                not tap, fewer than two exits, or an unknown label use.
        """
        exits, labels = self.exits(), self.labels()
        problems = []
        if exits is not None:
            if exits.state not in self.state_names():
                problems.append(f"exits state {exits.state!r} is not one of state_names() {self.state_names()}")
            tapped = {t.stage for t in self.taps()}
            if exits.count < 2 or not set(exits.stages) <= tapped or list(exits.stages) != sorted(set(exits.stages)):
                problems.append(f"exit stages {list(exits.stages)} must be >= 2 increasing stages among the taps "
                                f"{sorted(tapped)}")
        if labels.use not in LABEL_USES:
            problems.append(f"labels use {labels.use!r} is not one of {', '.join(LABEL_USES)}")
        if problems:
            raise ConfigError(f"method {self.name}: {'; '.join(problems)}; fix the method's declarations")
        return Contract(self.schedule(), exits, self.guard(), labels, self.learner())

    # --- test time ----------------------------------------------------------------------
    def momentum_now(self) -> float:
        """The EMA momentum of the current sample (from ``schedule()``; 0 without one)."""
        schedule = self.schedule()
        return schedule.at(self.steps) if schedule is not None else 0.0

    def reset(self) -> None:
        """Back to the state right after ``fit`` (weights, optimizer state, statistics)."""
        if self._initial is None:
            self._initial = self._snapshot()
        self.load_state_dict(self._initial, strict=True)
        self._good = self._snapshot()
        self.steps = 0
        params = self._trainable()
        learner = self.learner()
        self._optimizer = None
        if params and self.config.lr > 0:
            self._optimizer = (torch.optim.Adam(params, lr=self.config.lr) if learner.optimizer == "adam" else
                               torch.optim.SGD(params, lr=self.config.lr, momentum=self.config.momentum))
        self._replay = collections.deque(maxlen=max(1, learner.replay))
        self._draws = learner.seed or 0x9E3779B9  # as et_replay.c: seed 0 stands for this constant
        self._labels = 0
        g = self.guard()
        self._guard = (CollapseGuard(self.num_classes, g.rate, g.max_share, g.every, g.warmup)
                       if g is not None and self._optimizer else None)

    def step(self, taps: list[torch.Tensor], target: torch.Tensor | None = None) -> torch.Tensor:
        """Predict one sample, then adapt on it; returns the logits of the prediction (1 x classes).

        ``target`` (one-hot) is given only by the supervised mode, after the prediction was
        scored: then the statistics are left alone and only the supervised update happens.
        """
        if self._optimizer is None and self._initial is None:
            self.reset()
        supervised = target is not None
        if target is None:
            target = torch.zeros(1, self.num_classes)
        if supervised and self._optimizer is not None:
            self._labels += 1
        state = [self.get_buffer(n) for n in self.state_names()]
        # Feedback on an already-scored sample reads the statistics as they are (the C runtime does the same).
        momentum = torch.tensor([0.0 if supervised else self.momentum_now()])
        with torch.enable_grad() if self._optimizer else torch.no_grad():
            logits, loss, new_state = self.forward_graph(taps, state, momentum, target)
            if self._optimizer is not None:
                self._update(loss, supervised)
        if supervised and self._optimizer is not None and self.learner().replay:
            self._replay_after(taps, target, state)
        if not supervised:
            for n, v in zip(self.state_names(), new_state):
                self.get_buffer(n).copy_(v.detach())
            self.steps += 1
            self._guard_step(int(logits.argmax()))
        return logits.detach()

    def _update(self, loss: torch.Tensor, supervised: bool) -> None:
        """One optimizer step on ``loss``; during the warm-up a supervised step is scaled by the blend of
        ``Learner`` (float32, as et_runtime.c)."""
        if self._optimizer is None:
            return
        warmup = self.learner().warmup
        w = (torch.tensor(self._labels, dtype=torch.float32) / torch.tensor(warmup, dtype=torch.float32)
             if supervised and warmup and self._labels < warmup else None)
        before = [p.detach().clone() for p in self._trainable()] if w is not None else []
        self._optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self._optimizer.step()
        if w is not None:
            with torch.no_grad():
                for p, old in zip(self._trainable(), before):
                    p.copy_(old + w * (p - old))

    def _replay_after(self, taps: list[torch.Tensor], target: torch.Tensor, state: list[torch.Tensor]) -> None:
        """The replay of ``Learner``: ``replay_steps`` supervised steps on stored samples, then this one joins."""
        staged = ([quantise_tap(t) for t in taps], int(target.argmax()))
        for _ in range(self.learner().replay_steps if self._replay else 0):
            self._draws = xorshift32(self._draws)
            stored, label = self._replay[self._draws % len(self._replay)]
            old_target = torch.zeros(1, self.num_classes)
            old_target[0, label] = 1.0
            with torch.enable_grad():
                _, loss, _ = self.forward_graph([q.to(torch.float32) * s for q, s in stored], state,
                                                torch.zeros(1), old_target)
                self._update(loss, True)
        self._replay.append(staged)

    def _guard_step(self, prediction: int) -> None:
        if self._guard is None:
            return
        verdict = self._guard.observe(prediction)
        if verdict == "restore" and self._good is not None:
            self._restore_trainable(self._good)
            self.restores += 1
        elif verdict == "snapshot":
            self._good = self._snapshot()

    # --- helpers ------------------------------------------------------------------------
    def _trainable(self) -> list[nn.Parameter]:
        named = dict(self.named_parameters())
        return [named[n] for n in self.trainable_names()]

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.state_dict().items()}

    def _restore_trainable(self, snap: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, p in zip(self.trainable_names(), self._trainable()):
                p.copy_(snap[n])
        if self._optimizer is not None:
            self._optimizer.state.clear()

    def named_trainable(self) -> Iterator[tuple[str, nn.Parameter]]:
        named = dict(self.named_parameters())
        for n in self.trainable_names():
            yield n, named[n]


def declare(cls: type[Method]) -> type[Method]:
    """Class decorator: register a method under its ``name`` (one line per method)."""
    return METHODS.register(cls.name)(cls)


__all__ = ["LABEL_USES", "METHODS", "OPTIMIZERS", "CollapseGuard", "Contract", "Exits", "Guard", "Labels", "Learner",
           "Method", "MethodConfig", "Schedule", "TapSpec", "declare", "entropy", "ema_momentum", "quantise_tap",
           "stop_gradient", "supervised_or", "xorshift32"]
