"""Memory of one adaptation step at batch 1, per category (DESIGN section 10), in bytes.

Categories:

* ``frozen_weights`` — the frozen backbone as the bundle stores it: int8 weights of every conv /
  linear it runs (1 byte each) plus a float32 scale per output channel, int32 biases, float32
  for anything else (norm affines, position embeddings). Methods that adapt the backbone itself
  (tent, bn-adapt, alpha-bn) run it in float32: 4 bytes per weight.
* ``peak_forward_activations`` — the largest sum of live activations while the frozen forward runs
  (eager op order, liveness from the recorded ops: a tensor lives from the op that makes it to
  the last op that reads it; taps live to the end; elementwise ops (activation, residual add)
  reuse an input that dies there, as a static memory planner does). int8 activations (1 byte),
  float32 taps; float32 throughout for methods that run the float backbone.
* ``saved_for_backward`` — unique tensor storages autograd keeps for one ``forward_graph`` + backward
  with only the trainable parameters requiring grad (measured with ``saved_tensors_hooks``).
  Only storages that depend on the sample count: parameters, buffers and tensors computed from
  them alone (a weight-standardised kernel) are weights. For tent this is the whole float backbone.
* ``trainable_params``, ``gradients``, ``optimizer_state`` (SGD momentum buffers; Adam's two moments and
  a step per parameter tensor) — float32.
* ``state`` — forward-only running tensors (feature statistics).
* ``float_constants`` — the float side's other tensors: frozen parameters (e.g. a copied classifier)
  and constant buffers (source statistics).
* ``replay_buffer`` — what the method's ``Learner`` keeps to learn from labels (``replay_bytes``): the replay
  buffer's N + 1 slots of int8 taps (a float32 scale per tap and the label each; one slot stages the revealed
  sample), and with a warm-up a float32 copy of the trainable parameters; 0 without either.

Gradients, optimizer state and saved tensors are counted whenever the method declares trainable
parameters (the bundle's training step exists then), whatever its ``lr``.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from edgetune.adapt import Adaptable, FrozenTaps

CATEGORIES = ("frozen_weights", "peak_forward_activations", "saved_for_backward", "trainable_params", "gradients",
              "optimizer_state", "state", "float_constants", "replay_buffer")
F32 = 4
# Elementwise ops a memory planner runs in place: the output takes over an input that dies there.
_IN_PLACE = {"hardtanh", "relu", "clamp", "add", "sub", "mul", "div", "sigmoid", "tanh", "gelu", "silu", "hardswish"}


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class _OpRecorder(TorchDispatchMode):
    """Records every op's input and output tensors (holding them, so storages are never reused)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, list[torch.Tensor], list[torch.Tensor]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        name = func.overloadpacket.__name__.rstrip("_")
        self.ops.append((name, ins, [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]))
        return out


def _trace(fn: Callable[[torch.Tensor], object], x: torch.Tensor) -> tuple[_OpRecorder, list[torch.Tensor]]:
    with torch.no_grad(), _OpRecorder() as rec:
        out = fn(x)
    return rec, [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


def _peak_live(rec: _OpRecorder, x: torch.Tensor, outputs: list[torch.Tensor], weights: set[int],
               act_bytes: int) -> int:
    last_use: dict[int, int] = {}
    for i, (_, ins, _) in enumerate(rec.ops):
        for t in ins:
            last_use[_key(t)] = i
    buffer: dict[int, int] = {}  # storage -> the buffer it lives in (itself, or an input reused in place)
    birth: dict[int, int] = {_key(x): -1}
    death: dict[int, int] = {}
    size: dict[int, int] = {}
    for i, (name, ins, outs) in enumerate(rec.ops):
        for t in outs:
            k = _key(t)
            if k in buffer:
                continue
            donor = next((_key(a) for a in ins if name in _IN_PLACE and a.numel() == t.numel()
                          and last_use.get(_key(a)) == i and _key(a) not in weights), None)
            buffer[k] = buffer.get(donor, donor) if donor is not None else k
            birth.setdefault(buffer[k], i)
        for t in ins + outs:
            b = buffer.get(_key(t), _key(t))
            death[b] = max(death.get(b, i), i)
            size[b] = max(size.get(b, 0), t.untyped_storage().nbytes() // t.element_size() * act_bytes)
    for t in outputs:  # taps are handed to the float side as float32 and live to the end
        b = buffer.get(_key(t), _key(t))
        death[b] = len(rec.ops)
        size[b] = max(size.get(b, 0), t.untyped_storage().nbytes() // t.element_size() * F32)
    live = [b for b in size if b not in weights and b in birth]
    return max((sum(size[b] for b in live if birth[b] <= i <= death[b]) for i in range(len(rec.ops))), default=0)


def _int8_weight_bytes(module: nn.Module, used: set[int]) -> int:
    total = 0
    for m in module.modules():
        for name, p in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
            if _key(p) not in used:
                continue
            if isinstance(m, (nn.Conv2d, nn.Linear)) and name == "weight":
                total += p.numel() + F32 * p.shape[0]  # int8 weights + a float32 scale per output channel
            else:
                total += F32 * p.numel()  # int32 bias, float32 norm affine / embeddings
    return total


class _SampleTaint(TorchDispatchMode):
    """Tracks which storages depend on the sample (the graph inputs): those are activations; tensors
    computed from parameters alone (e.g. a weight-standardised kernel) are weights, made once."""

    def __init__(self, inputs: list[torch.Tensor]) -> None:
        super().__init__()
        self.tainted = {_key(t) for t in inputs}
        self._held: list[torch.Tensor] = []  # keeps every storage alive, so no address is reused

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self._held += outs
        if any(_key(t) in self.tainted for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)):
            self.tainted.update(_key(t) for t in outs)
        return out


def saved_for_backward(adaptable: Adaptable, x: torch.Tensor | None = None) -> int:
    """Bytes of unique sample-dependent storages autograd saves for one ``forward_graph`` +
    ``loss.backward()`` with only the method's trainable parameters requiring grad (0 when there
    are none)."""
    method = adaptable.method
    trainable = set(method.trainable_names())
    if not trainable:
        return 0
    x = torch.zeros(1, *adaptable.backbone.input_shape) if x is None else x
    named = dict(method.named_parameters())
    params = {id(p): p for p in list(named.values()) + list(adaptable.backbone.parameters())}
    flags = {k: p.requires_grad for k, p in params.items()}
    wanted = {id(named[n]) for n in trainable}
    saved: dict[int, int] = {}
    try:
        for k, p in params.items():
            p.requires_grad_(k in wanted)
        with torch.no_grad():
            taps = list(adaptable.frozen(x))
        inputs = [*taps, *[method.get_buffer(n).detach().clone() for n in method.state_names()],
                  torch.tensor([method.momentum_now()]), torch.zeros(1, method.num_classes)]
        taint = _SampleTaint(inputs)

        def pack(t: torch.Tensor) -> torch.Tensor:
            if _key(t) in taint.tainted:
                saved[_key(t)] = t.untyped_storage().nbytes()
            return t

        with torch.enable_grad(), saved_tensors_hooks(pack, lambda t: t), taint:
            n_taps, n_state = len(taps), len(method.state_names())
            _, loss, _ = method.forward_graph(inputs[:n_taps], inputs[n_taps:n_taps + n_state], inputs[-2], inputs[-1])
        if loss.requires_grad:
            loss.backward()
    finally:
        for k, p in params.items():
            p.requires_grad_(flags[k])
            p.grad = None
    return sum(saved.values())


def replay_bytes(learner, tap_floats: list[int], trainable_bytes: int) -> int:
    """Bytes ``learner`` (``edgetune.methods.base.Learner``) keeps beside the step: ``ET_LEARNER_WORK_BYTES`` of
    targets/runtime/et_replay.h for taps of ``tap_floats`` floats each."""
    slot = 4 * len(tap_floats) + 4 + (sum(tap_floats) + 3) // 4 * 4
    replay = (learner.replay + 1) * slot if learner.replay else 0
    return replay + ((trainable_bytes + 3) // 4 * 4 if learner.warmup else 0)


def optimizer_bytes(optimizer: str, momentum: float, shapes: list[int]) -> int:
    """float32 optimizer state for parameter tensors of ``shapes`` elements (compilers/optimizers.py's states)."""
    if optimizer == "adam":
        return sum(2 * F32 * n + F32 for n in shapes)
    return sum(F32 * n for n in shapes) if momentum > 0 else 0


def _tap_floats(adaptable: Adaptable, x: torch.Tensor) -> list[int]:
    """Floats of each tap the method's step reads for one sample (the image, for a method that runs the backbone)."""
    with torch.no_grad():
        return [t[:1].numel() for t in adaptable.frozen(x)]


def memory_table(adaptable: Adaptable) -> dict[str, int]:
    """Bytes per category (``CATEGORIES``) for one adaptation step of ``adaptable`` at batch 1."""
    method, backbone = adaptable.method, adaptable.backbone
    x = torch.zeros(1, *backbone.input_shape)
    trainable = dict(method.named_trainable())
    state_names = method.state_names()
    if method.partitioned:
        frozen = FrozenTaps(backbone.for_export(), method.taps()).eval()
        run: Callable[[torch.Tensor], object] = frozen
        tensors, act_bytes = list(frozen.parameters()) + list(frozen.buffers()), 1
    else:  # the method runs the float backbone itself: its whole forward_graph is the forward
        state = [method.get_buffer(n).detach().clone() for n in state_names]
        momentum, target = torch.tensor([method.momentum_now()]), torch.zeros(1, method.num_classes)

        def run(image: torch.Tensor) -> torch.Tensor:
            return method.forward_graph(list(adaptable.frozen(image)), state, momentum, target)[0]

        tensors = [*method.parameters(), *method.buffers(), *backbone.parameters(), *backbone.buffers()]
        act_bytes = F32
    weights = {_key(t): t for t in tensors}
    rec, outputs = _trace(run, x)
    used = {_key(t) for _, ins, _ in rec.ops for t in ins} & set(weights)
    if method.partitioned:
        frozen_weights, counted = _int8_weight_bytes(frozen, used), set()
    else:
        counted = used - {_key(p) for p in trainable.values()} - {_key(method.get_buffer(n)) for n in state_names}
        frozen_weights = sum(F32 * weights[k].numel() for k in counted)
    trainable_bytes = sum(F32 * p.numel() for p in trainable.values())
    others: list[torch.Tensor] = [t for n, t in method.named_parameters() if n not in trainable]
    others += [t for n, t in method.named_buffers() if n not in state_names]
    skip = counted | {_key(t) for t in [*backbone.parameters(), *backbone.buffers()]}
    learner = method.learner()
    return {
        "frozen_weights": frozen_weights,
        "peak_forward_activations": _peak_live(rec, x, outputs, set(weights), act_bytes),
        "saved_for_backward": saved_for_backward(adaptable, x),
        "trainable_params": trainable_bytes,
        "gradients": trainable_bytes,
        "optimizer_state": optimizer_bytes(learner.optimizer, method.config.momentum,
                                           [p.numel() for p in trainable.values()]),
        "state": sum(F32 * method.get_buffer(n).numel() for n in state_names),
        "float_constants": sum(F32 * t.numel() for t in {_key(t): t for t in others if _key(t) not in skip}.values()),
        "replay_buffer": replay_bytes(learner, _tap_floats(adaptable, x), trainable_bytes) if trainable else 0,
    }


def backward_bytes(table: Mapping[str, int]) -> int:
    """What adapting costs beyond inference: saved-for-backward + gradients + optimizer state (+ the learner's
    replay buffer and warm-up copy)."""
    return (table["saved_for_backward"] + table["gradients"] + table["optimizer_state"]
            + table.get("replay_buffer", 0))


def training_bytes(table: Mapping[str, int]) -> int:
    """What must sit in RAM for one adaptation step: every category but the frozen weights (which
    stay in flash on a microcontroller). For a method that trains every weight, the weights are
    trainable parameters and count here."""
    return sum(v for k, v in table.items() if k != "frozen_weights")


def _human(n: int) -> str:
    return f"{n} B" if n < 1024 else f"{n / 1024:.1f} KB"


def format_memory_comparison(tables: Mapping[str, Mapping[str, int]]) -> str:
    """A text table: one row per category, one column per entry of ``tables`` (e.g. per method), plus
    the backward cost (saved + gradients + optimizer) and the total."""
    names = list(tables)
    rows = [("category", *names)]
    rows += [(c, *[_human(tables[n].get(c, 0)) for n in names]) for c in CATEGORIES]
    rows.append(("backward (saved+grad+opt)", *[_human(backward_bytes(tables[n])) for n in names]))
    rows.append(("total", *[_human(sum(tables[n].values())) for n in names]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(r, widths)))
                     for r in rows)


def format_memory_table(table: Mapping[str, int]) -> str:
    """``table`` (from ``memory_table`` or a manifest's ``memory``) as text, one category per row."""
    return format_memory_comparison({"bytes": table})
