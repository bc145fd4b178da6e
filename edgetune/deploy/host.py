"""The compiled host runtime: a bundle's generated C (TVM's int8 kernels and training step) plus the
C runtime, built for this machine and driven through ctypes.

It is the same C a device runs, so it is both what ``edgetune eval --runtime compiled`` streams
and the oracle the simulated devices are compared to (per-sample predictions, final state).

    model = HostModel(bundle)            # compiles once, cached by source content
    step = model.step(x)                 # predict, then adapt (unsupervised)
    model.feedback(x, label)             # supervised mode: after the prediction was scored
    model.reset()                        # episodic protocol: back to the exported state
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from edgetune import cruntime as cr
from edgetune.deploy.project import write_model_sources
from edgetune.errors import DataError

MODEL_GETTER = "edgetune_model"


class HostModel:
    """A bundle's model built into the host C runtime; one ``et_runtime`` at a time."""

    def __init__(self, bundle_dir: str | Path, workdir: str | Path | None = None, adapt: bool = True) -> None:
        """Generate the bundle's model C into ``workdir`` (default: a temporary folder), build it with
        the runtime as a host shared library and start a runtime on it.

        Raises:
            CheckpointError, ExportError, CompileError: the bundle cannot be compiled (see
                ``write_target_project``); ToolchainError: no host C compiler.
        """
        work = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="edgetune-host-"))
        model = work / "model"
        self.manifest, self.layout = write_model_sources(bundle_dir, model)
        self.lib = cr.load(extra_sources=[model / "et_model_gen.c", model / "et_kernels.c",
                                          model / "tvm_workspace.c"], include_dirs=[model, model / "include"])
        self.adapt = adapt
        cr.check(self.lib.edgetune_model_reset(), "edgetune_model_reset")  # state <- the exported values
        self.runtime = self._start()

    def _start(self) -> cr.Runtime:
        contract = self.manifest.runtime  # the method's declarations, as export wrote them
        s, g = contract.momentum_schedule, contract.guard
        settings = dict(rate=g.rate, max_share=g.max_share, every=g.every, warmup=g.warmup) if g else {}
        return cr.Runtime(self.lib, MODEL_GETTER, adapt=self.adapt,
                          momentum=(s.start, s.decay, s.floor) if s else (0.0, 0.0, 0.0), guard=g is not None,
                          **settings)

    def reset(self) -> None:
        """Back to the exported parameters, statistics and optimizer state, with a fresh runtime
        (schedule, guard and counters restart)."""
        cr.check(self.lib.edgetune_model_reset(), "edgetune_model_reset")
        self.runtime = self._start()

    def step(self, x: np.ndarray) -> cr.Step:
        return self.runtime.step(x)

    def feedback(self, x: np.ndarray, label: int) -> cr.Step:
        """Supervised feedback: one update of ``x`` towards class ``label`` (already scored).

        Raises:
            DataError: ``label`` is not a class index of the bundle.
        """
        k = self.runtime.classes
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not 0 <= label < k:
            raise DataError(f"HostModel.feedback: label {label!r} is outside 0..{k - 1} (the bundle's {k} classes); "
                            "pass the class index of x")
        return self.runtime.feedback(x, label)

    def state(self) -> dict[str, np.ndarray]:
        """Copies of the adapted state (parameters, optimizer state, statistics) by bundle name."""
        return {e.name: a.reshape(e.shape).copy() for e, a in zip(self.layout, self.runtime.state())}

    def counters(self) -> dict[str, int]:
        return self.runtime.counters()


class _CompiledRunner:
    """``evaluate.walk_stream``'s runner around a ``HostModel``: the whole sample in C."""

    def __init__(self, model: HostModel) -> None:
        self.model = model
        self.has_exits = model.manifest.runtime.exits is not None  # the method declared early exits
        self.finished_restores = 0  # of runtimes already replaced by a reset
        self.x = np.zeros((0,), np.float32)

    @property
    def restores(self) -> int:
        return self.finished_restores + self.model.counters()["restores"]

    def reset(self) -> None:
        self.finished_restores = self.restores
        self.model.reset()

    def begin(self, images: np.ndarray) -> None:
        from edgetune.data import to_tensor

        self.x = to_tensor(images).numpy()

    def step(self, i: int) -> tuple[int, bool | None]:
        r = self.model.step(self.x[i])
        return r.prediction, r.early_exit if self.has_exits else None

    def feedback(self, i: int, label: int) -> None:
        self.model.feedback(self.x[i], label)


def run_compiled_stream(bundle_dir: str | Path, segments, labelled_fraction: float = 0.0, seed: int = 0,
                        progress: bool = True, method_name: str | None = None):
    """``evaluate.run_stream`` on the compiled host runtime: the same segments, resets, label draws
    and result type, with the whole sample (frozen int8 forward + method step) in C.

    Raises:
        ConfigError: ``labelled_fraction`` outside [0, 1]; see ``HostModel``.
    """
    from edgetune.evaluate import revealed, walk_stream

    revealed(0, labelled_fraction)  # bad options fail before the bundle is compiled
    model = HostModel(bundle_dir)
    name = method_name or model.manifest.method
    return walk_stream(_CompiledRunner(model), segments, name, labelled_fraction, seed, progress,
                       desc=f"{name} (compiled)")


__all__ = ["HostModel", "run_compiled_stream"]
