"""The compiled host runtime with the bundle's learner (replay buffer, lr warm-up) built in.

``HostModel`` builds a bundle's generated model; a bundle that declares ``runtime.learner`` also needs
``edgetune_model_learner`` (compilers/emit_learner.py) in that build, which this adds, so label feedback
in C replays and warms up as the torch method does.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from edgetune.compilers.emit_learner import append_learner
from edgetune import cruntime as cr
from edgetune.deploy.host import HostModel, _CompiledRunner
from edgetune.deploy.project import write_model_sources


class LearnerHostModel(HostModel):
    """``HostModel`` whose build includes the bundle's learner (when its manifest declares one)."""

    def __init__(self, bundle_dir: str | Path, workdir: str | Path | None = None, adapt: bool = True) -> None:
        """As ``HostModel``.

        Raises:
            CheckpointError, ExportError, CompileError, ToolchainError: as ``HostModel``.
        """
        work = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="edgetune-host-"))
        model = work / "model"
        self.manifest, self.layout = write_model_sources(bundle_dir, model)
        self.learns_with_replay = append_learner(model, self.manifest)
        self.lib = cr.load(extra_sources=[model / "et_model_gen.c", model / "et_kernels.c",
                                          model / "tvm_workspace.c"], include_dirs=[model, model / "include"])
        self.adapt = adapt
        cr.check(self.lib.edgetune_model_reset(), "edgetune_model_reset")
        self.runtime = self._start()


def run_learner_stream(bundle_dir: str | Path, segments, labelled_fraction: float = 0.0, seed: int = 0,
                       progress: bool = True, method_name: str | None = None):
    """``edgetune.deploy.host.run_compiled_stream`` with the bundle's learner built in.

    Raises:
        ConfigError: ``labelled_fraction`` outside [0, 1]; see ``HostModel``.
    """
    from edgetune.evaluate import revealed, walk_stream

    revealed(0, labelled_fraction)
    model = LearnerHostModel(bundle_dir)
    name = method_name or model.manifest.method
    return walk_stream(_CompiledRunner(model), segments, name, labelled_fraction, seed, progress,
                       desc=f"{name} (compiled)")


__all__ = ["LearnerHostModel", "run_learner_stream"]
