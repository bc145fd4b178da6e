"""Optimizer update rules emitted as Relax ops, so the update is fused into the training step.

Each optimizer updates one parameter at a time from its gradient and its own state tensors
(``states_of``), with torch.optim's semantics, so a compiled step and a torch step agree:

* ``sgd``: ``buf = momentum * buf + grad; p -= lr * buf`` (dampening 0, no Nesterov, no
  weight decay). torch starts with ``buf = grad``; a zero-initialised buffer gives exactly
  that on the first step, so state zeros are the "fresh optimizer" (also after a restore).
  Without momentum there is no state and ``p -= lr * grad``.
* ``adam``: torch.optim.Adam (no AMSGrad, no weight decay); per parameter the first and
  second moments and a float step counter, all zero-initialised.
"""
from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, fields
from typing import Any, ClassVar, Protocol

from tvm import relax
from tvm.relax import op as R

from edgetune.errors import CompileError
from edgetune.registry import Registry


@dataclass(frozen=True)
class StateSpec:
    """One optimizer state tensor of parameter ``of``; ``shape == ()`` is a scalar."""

    suffix: str
    shape: tuple[int, ...]


class Optimizer(Protocol):
    kind: ClassVar[str]

    def states_of(self, shape: tuple[int, ...]) -> list[StateSpec]:
        """The state tensors this optimizer keeps for a parameter of ``shape``."""
        ...

    def emit(self, bb: relax.BlockBuilder, param: relax.Expr, grad: relax.Expr,
             states: list[relax.Expr]) -> tuple[relax.Expr, list[relax.Expr]]:
        """Emit the update of one parameter; returns (new parameter, new states)."""
        ...


OPTIMIZERS: Registry[type] = Registry("optimizer")


def _const(value: float) -> relax.Expr:
    return relax.const(value, "float32")


@OPTIMIZERS.register("sgd")
@dataclass(frozen=True)
class SGD:
    lr: float
    momentum: float = 0.0
    kind: ClassVar[str] = "sgd"

    def states_of(self, shape: tuple[int, ...]) -> list[StateSpec]:
        return [StateSpec("momentum_buffer", shape)] if self.momentum else []

    def emit(self, bb, param, grad, states):
        step = grad
        new_states = []
        if self.momentum:
            step = bb.emit(R.add(R.multiply(_const(self.momentum), states[0]), grad))
            new_states.append(step)
        return bb.emit(R.subtract(param, R.multiply(_const(self.lr), step))), new_states


@OPTIMIZERS.register("adam")
@dataclass(frozen=True)
class Adam:
    lr: float
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    kind: ClassVar[str] = "adam"

    def states_of(self, shape: tuple[int, ...]) -> list[StateSpec]:
        return [StateSpec("exp_avg", shape), StateSpec("exp_avg_sq", shape), StateSpec("step", ())]

    def emit(self, bb, param, grad, states):
        m, v, step = states
        step = bb.emit(R.add(step, _const(1.0)))
        m = bb.emit(R.add(R.multiply(_const(self.beta1), m), R.multiply(_const(1.0 - self.beta1), grad)))
        v = bb.emit(R.add(R.multiply(_const(self.beta2), v),
                          R.multiply(_const(1.0 - self.beta2), R.multiply(grad, grad))))
        # torch: p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
        correction1 = R.subtract(_const(1.0), R.power(_const(self.beta1), step))
        correction2 = R.sqrt(R.subtract(_const(1.0), R.power(_const(self.beta2), step)))
        denom = R.add(R.divide(R.sqrt(v), correction2), _const(self.eps))
        update = R.multiply(R.divide(_const(self.lr), correction1), R.divide(m, denom))
        return bb.emit(R.subtract(param, update)), [m, v, step]


def optimizer_from_manifest(spec: Any) -> Optimizer:
    """The optimizer a manifest's ``OptimizerSpec`` describes (``kind`` plus hyper-parameters).

    Raises:
        CompileError: unknown kind, or a hyper-parameter that is not a finite number.
    """
    kind = str(getattr(spec, "kind", ""))
    if kind not in OPTIMIZERS:
        raise CompileError(f"train_step: unknown optimizer kind {kind!r} (known: {', '.join(OPTIMIZERS)}); "
                           "re-export the bundle with a supported optimizer")
    cls = OPTIMIZERS.get(kind)
    values: dict[str, float] = {}
    bad = []
    for f in fields(cls):
        if not hasattr(spec, f.name):
            if f.default is MISSING:
                bad.append(f"{f.name} missing")
            continue
        value = getattr(spec, f.name)
        if not isinstance(value, int | float) or not math.isfinite(value):
            bad.append(f"{f.name}={value!r}")
        else:
            values[f.name] = float(value)
    if bad:
        raise CompileError(f"train_step: optimizer {kind!r} has invalid hyper-parameters ({', '.join(bad)}); "
                           "fix the manifest's trainable.optimizer entry")
    return cls(**values)
