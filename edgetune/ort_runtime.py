"""Run an exported bundle's graphs in onnxruntime with the torch reference's calling conventions.

``OrtTaps(bundle)`` is a drop-in ``Adaptable.tap_runner`` (the frozen int8 backbone on the host,
``eval --backbone onnx-int8``); ``OrtTrainable(bundle)`` has the signature of
``Method.forward_graph`` (tests compare the two).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnxruntime as ort
import torch

from edgetune.data import to_tensor
from edgetune.export.manifest import Manifest, load_manifest


def session(path: str | Path, threads: int = 1, int8_kernels: bool = False) -> ort.InferenceSession:
    """A CPU onnxruntime session (one thread by default: deterministic, and the host is shared).

    ``int8_kernels``: run every quantised QDQ op as an integer kernel
    (``session.qdqisint8allowed=1``, onnxruntime's default on ARM; on x86 it otherwise keeps some
    requantisations in float). That is the arithmetic the compiled backbone reproduces bit-exactly.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: its per-session warnings are noise to a user
    if int8_kernels:
        options.add_session_config_entry("session.qdqisint8allowed", "1")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OrtTaps:
    """frozen.onnx as a tap runner: image 1 x C x H x W -> taps in the method's ``taps()`` order.

    Raises (on construction):
        CheckpointError: the bundle is missing, corrupt or from another format version.
    """

    def __init__(self, bundle_dir: str | Path, manifest: Manifest | None = None) -> None:
        self.manifest = manifest or load_manifest(bundle_dir)
        self.session = session(Path(bundle_dir) / self.manifest.frozen.file, int8_kernels=True)
        self.names = [o.name for o in self.manifest.frozen.outputs]

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = self.session.run(self.names, {self.manifest.input.name: x.detach().numpy().astype(np.float32)})
        return [torch.from_numpy(o) for o in outs]


def ort_tap_function(bundle_dir: str | Path) -> Callable[[Any, np.ndarray], list[torch.Tensor]]:
    """A tap function for ``edgetune.evaluate``: (adaptable, uint8 images N x H x W) -> taps, each
    N x ..., computed sample by sample by the bundle's frozen.onnx (the graph is batch 1).

    Raises:
        CheckpointError: the bundle is missing, corrupt or from another format version.
    """
    runner = OrtTaps(bundle_dir)

    def taps(adaptable: Any, images: np.ndarray) -> list[torch.Tensor]:
        per_sample = [runner(to_tensor(images[i:i + 1])) for i in range(len(images))]
        return [torch.cat([s[k] for s in per_sample]) for k in range(len(runner.names))]

    return taps


class OrtTrainable:
    """trainable.onnx with ``forward_graph``'s signature: (taps, state, momentum, target) ->
    (logits, loss, new_state), using the parameters exported in the bundle.

    Raises (on construction):
        CheckpointError: the bundle is missing, corrupt or from another format version.
    """

    def __init__(self, bundle_dir: str | Path, manifest: Manifest | None = None) -> None:
        self.manifest = manifest or load_manifest(bundle_dir)
        self.session = session(Path(bundle_dir) / self.manifest.trainable.file)
        self.inputs = [i.name for i in self.manifest.trainable.inputs]
        self.outputs = [o.name for o in self.manifest.trainable.outputs]

    def __call__(self, taps: Sequence[torch.Tensor], state: Sequence[torch.Tensor], momentum: torch.Tensor,
                 target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        values = [*taps, *state, momentum, target]
        feeds = {n: v.detach().numpy().astype(np.float32) for n, v in zip(self.inputs, values)}
        outs = [torch.from_numpy(np.asarray(o)) for o in self.session.run(self.outputs, feeds)]
        return outs[0], outs[1], outs[2:]
