"""Run a compiled frozen graph on the host from Python: ``<prefix>_run`` of the native library via ctypes."""
from __future__ import annotations

import ctypes
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from edgetune.compilers.emit import aligned_empty
from edgetune.compilers.frozen import PREFIX, CompiledGraph
from edgetune.errors import CompileError, DataError


class FrozenRunner:
    """``runner(x) -> [tap, ...]``: the compiled int8 backbone of a host ``CompiledGraph``.

    One arena, input and output buffers are allocated once (aligned as the kernels assume)
    and reused; each call copies the input in and the taps out.

    Raises (on construction):
        CompileError: the graph was not compiled for the host (no host library).
        CheckpointError: ``compiled`` is a directory without a compiled frozen graph.
    """

    def __init__(self, compiled: CompiledGraph | str | Path) -> None:
        graph = compiled if isinstance(compiled, CompiledGraph) else CompiledGraph.load(compiled)
        library = graph.artifacts.get("library")
        if graph.target != "host" or library is None or not Path(library).exists():
            raise CompileError(f"runner: {graph.out_dir} holds a {graph.target!r} compile without a host library; "
                               "compile_frozen(..., target='host') to run it from Python")
        plan = graph.plan
        self.graph = graph
        self._lib = _load_private_copy(Path(library))
        self._run = getattr(self._lib, f"{PREFIX}_run")
        self._run.restype = ctypes.c_int32
        self._arena = aligned_empty((max(plan.arena_bytes, 1),), "uint8", plan.alignment)
        self._inputs = [aligned_empty(plan.buffer(n).shape, plan.buffer(n).dtype, plan.alignment) for n in plan.inputs]
        self._outputs = [aligned_empty(plan.buffer(n).shape, plan.buffer(n).dtype, plan.alignment)
                         for n in plan.outputs]
        self._args = [ctypes.c_void_p(a.ctypes.data) for a in [self._arena, *self._inputs, *self._outputs]]
        self.input_shape, self.input_dtype = self._inputs[0].shape, str(self._inputs[0].dtype)

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        """Taps (graph outputs, in order) for one input of the compiled shape.

        Raises:
            DataError: ``x`` has the wrong shape or dtype.
            CompileError: a kernel reported a failure (status code in the message).
        """
        if tuple(x.shape) != self.input_shape or str(x.dtype) != self.input_dtype:
            raise DataError(f"runner: input must be {self.input_dtype} {list(self.input_shape)} "
                            f"(got {x.dtype} {list(x.shape)}); the graph is compiled for batch 1")
        np.copyto(self._inputs[0], x)
        status = self._run(*self._args)
        if status != 0:
            raise CompileError(f"runner: kernel failed with status {status} (workspace exhausted?); recompile")
        return [o.copy() for o in self._outputs]


def _load_private_copy(library: Path) -> ctypes.CDLL:
    """dlopen a private copy: the loader returns an already-loaded library for a path it has
    seen, so recompiling into the same directory would otherwise run the old kernels."""
    fd, copy = tempfile.mkstemp(prefix=f"{library.stem}-", suffix=".so")
    os.close(fd)
    try:
        shutil.copyfile(library, copy)
        return ctypes.CDLL(copy)
    finally:
        os.unlink(copy)  # the mapping stays valid; nothing is left behind
