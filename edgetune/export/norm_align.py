"""The norm-align bundle: the frozen int8 graph whose aligned convs' requantisation is state, and its step.

norm-align runs the backbone itself (``partitioned = False``), so the generic export cannot split
it. Its bundle is still the ordinary two graphs:

* frozen.onnx: the backbone to the pooled last stage, int8 QDQ, exactly as feature-align's. The
  manifest's ``norm_align`` section names the aligned convs; the compilers give each one its
  requantisation scale and accumulator offset as inputs and its accumulator statistics as outputs
  (``compilers.int8_rewrite``), which onnxruntime cannot express: ``edgetune.int8ref`` is the
  reference of that graph.
* trainable.onnx: ``NormAlignStep.forward_graph`` (the statistics update and the fold for the
  next sample, the pooled alignment and the classifier), checked against torch in onnxruntime.

The source statistics are measured on the int8 graph itself (``Int8NormAlign.calibrate``), so the
device aligns to what its own integer backbone produces on source data.
"""
from __future__ import annotations

import copy
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx
import torch

from edgetune.adapt import Adaptable
from edgetune.data import Dataset, to_tensor
from edgetune.errors import ExportError
from edgetune.export.manifest import (FROZEN_FILE, MANIFEST_FILE, TRAINABLE_FILE, AlignedConv, FrozenPart, Manifest,
                                      NormAlignSpec, OptimizerSpec, TensorSpec, TrainablePart,
                                      onnx_name, seal, sha256_of)
from edgetune.export.onnx_graphs import export_frozen, export_trainable
from edgetune.export.ops import SUPPORTED_OPS
from edgetune.export.quantize import quantize_frozen
from edgetune.export.validate import _fail, _worst, check_trainable_initialisers, validate_onnx
from edgetune.methods.norm_align import EPS
from edgetune.methods.norm_align_step import ConvConstants, NormAlignStep

CALIBRATION_IMAGES = 5000  # source images the int8 graph's statistics are measured on
STATE_FILE = "initial_state.npz"  # the step's initial state (written here: it is not the torch method's)
CHECK_SAMPLES = 4


def build_norm_align_bundle(adaptable: Adaptable, data: Dataset, directory: Path, target: str,
                            contract_of) -> Manifest:
    """Write and check a norm-align bundle in ``directory`` (``export`` makes it atomic).

    ``contract_of`` is ``bundle.runtime_contract`` (passed in: that module imports this one).

    Raises:
        ExportError: ``layers`` other than ``convs``, ``include_sample`` (DUA's order needs every
            accumulator of a layer before its requantisation: not deployable), or a check of
            trainable.onnx fails.
        ModelError: the int8 graph is not a conv/add chain the integer reference reads (``QDQModel``).
        ConfigError: the int8 graph's convs do not match the method's (``Int8NormAlign``).
    """
    from edgetune.int8ref.norm_align_int8 import Int8NormAlign
    from edgetune.int8ref.qdq_model import QDQModel

    method, backbone = adaptable.method, adaptable.backbone
    config = method.config
    problems = []
    if config.layers != "convs":
        problems.append(f"layers={config.layers!r} (a stage's last requantisation may be an add)")
    if config.include_sample:
        problems.append("include_sample=true (the kernel would need the whole layer's accumulators before "
                        "requantising)")
    if problems:
        raise ExportError(f"export: norm-align cannot run compiled with {'; '.join(problems)}; export with "
                          "--set layers=convs --set include_sample=false")
    float_path, frozen_path = directory / "frozen_float.onnx", directory / FROZEN_FILE
    taps = export_frozen(backbone, _pooled_tap(backbone), float_path)
    x_io = [("x", (1, *backbone.input_shape))]
    tap_io = [(t.name, t.shape) for t in taps]
    validate_onnx(float_path, SUPPORTED_OPS["frozen"], label="frozen.onnx (float)", inputs=x_io, outputs=tap_io)
    quantization = quantize_frozen(float_path, frozen_path, data.train_x, data.name)
    float_path.unlink()
    validate_onnx(frozen_path, SUPPORTED_OPS["frozen"], label="frozen.onnx", inputs=x_io, outputs=tap_io)

    qdq = QDQModel(frozen_path)
    reference = Int8NormAlign(copy.deepcopy(method), qdq)  # the copy's pooled statistics become the int8 graph's
    reference.calibrate(data.train_x[:CALIBRATION_IMAGES])
    nodes = [n.name for n in onnx.load(str(frozen_path)).graph.node if n.op_type == "Conv"]
    positions = _positions(qdq, to_tensor(data.train_x[:1]))
    convs, specs = [], []
    for (k, slot), (mean, sqmean), spread in zip(sorted(reference.slot.items(), key=lambda kv: kv[1]),
                                                 reference.source, reference.spread):
        op = qdq.convs[k]
        c = ConvConstants(op.accum_scale, op.requant, mean.float(), sqmean.float(), positions[k], spread[0].float(),
                          spread[1].float())
        convs.append(c)
        specs.append(AlignedConv(k, nodes[k] if k < len(nodes) else f"conv{k}", len(op.requant), positions[k],
                                 f"state_scale{slot}", f"state_offset{slot}", f"sum{slot}", f"sumsq{slot}",
                                 *(_floats(t) for t in (c.accum_scale, c.requant, c.source_mean, c.source_sqmean))))
    step = NormAlignStep(reference.method, convs)
    contract = contract_of(step)

    trainable_path = directory / TRAINABLE_FILE
    examples = [_step_taps(qdq, reference, to_tensor(data.train_x[i:i + 1])) for i in range(CHECK_SAMPLES)]
    inputs, outputs, parameters = export_trainable(step, examples[0], trainable_path)
    model = validate_onnx(trainable_path, SUPPORTED_OPS["trainable"], label="trainable.onnx",
                          inputs=[(i.name, i.shape) for i in inputs], outputs=[(o.name, o.shape) for o in outputs])
    check_trainable_initialisers(model, step)
    np.savez(directory / STATE_FILE, **{f"state_{onnx_name(n)}": step.get_buffer(n).detach().numpy()
                                        for n in step.state_names()})
    manifest = Manifest(
        model=adaptable.model_name, method=method.name,
        config=json.loads(json.dumps(asdict(config), default=str)), num_classes=method.num_classes, target=target,
        input=TensorSpec("x", (1, *backbone.input_shape), "float32"),
        frozen=FrozenPart(FROZEN_FILE, sha256_of(frozen_path), True, taps),
        trainable=TrainablePart(TRAINABLE_FILE, sha256_of(trainable_path), inputs, outputs, parameters,
                                OptimizerSpec("sgd", config.lr, config.momentum, ())),
        runtime=contract, quantization=quantization, memory=_memory(step),
        edgetune_version=_version(), norm_align=NormAlignSpec(tuple(specs), EPS, False))
    manifest = seal(manifest, directory)
    (directory / MANIFEST_FILE).write_text(manifest.to_json())
    _check_step(directory, manifest, step, examples)
    return manifest


def _pooled_tap(backbone):
    from edgetune.methods import TapSpec
    return (TapSpec(len(backbone.stages) - 1, pooled=True),)


def _floats(t: torch.Tensor) -> tuple[float, ...]:
    return tuple(float(v) for v in t.detach().float().reshape(-1))


def _positions(qdq, x: torch.Tensor) -> dict[int, int]:
    """Output positions per channel of every conv of the int8 graph."""
    seen: dict[int, int] = {}

    def record(k: int, acc: torch.Tensor):
        seen[k] = int(acc[0, 0].numel())
        return None

    qdq.run(x, record)
    return seen


@torch.no_grad()
def _step_taps(qdq, reference, x: torch.Tensor) -> list[torch.Tensor]:
    """The step's tap inputs for one sample on the source-aligned int8 graph (identity fold): the pooled
    features, then sum and sum of squares of each aligned conv's accumulator."""
    moments: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(k: int, acc: torch.Tensor):
        if k in reference.slot:
            moments[reference.slot[k]] = (acc.sum((2, 3)).float(), (acc * acc).sum((2, 3)).float())
        return None

    pooled, _ = qdq.run(x, record)
    return [pooled.float(), *[t for k in sorted(moments) for t in moments[k]]]


def _check_step(directory: Path, manifest: Manifest, step: NormAlignStep, examples) -> None:
    """trainable.onnx in onnxruntime = the step in torch (unsupervised and with a label).

    Raises:
        ExportError: an output differs by more than the export's numeric tolerance.
    """
    from edgetune.ort_runtime import OrtTrainable

    runner = OrtTrainable(directory, manifest)
    state = [step.get_buffer(n).detach().clone() for n in step.state_names()]
    momentum = torch.tensor([step.momentum_now()])
    names = [o.name for o in manifest.trainable.outputs]
    problems: list[str] = []
    for k, taps in enumerate(examples):
        target = torch.zeros(1, step.num_classes)
        if k % 2:
            target[0, k % step.num_classes] = 1.0
        with torch.no_grad():
            logits, loss, new_state = step.forward_graph(taps, state, momentum, target)
        got = runner(taps, state, momentum, target)
        pairs = list(zip(names, [got[0], got[1], *got[2]], [logits, loss, *new_state]))
        # an offset is rne() of a float32 quotient: where onnxruntime's and torch's last bits differ next to
        # a .5 tie the integer moves by one (one accumulator unit, a 1e-4-sized nudge of the fold)
        problems += [f"{n} (sample {k}) differs from torch by {float((g - w).abs().max()):g} accumulator units"
                     for n, g, w in pairs if n.startswith("new_state_offset") and not (g - w).abs().max() <= 1]
        problems += _worst([(f"{n} (sample {k})", g.numpy(), w.numpy()) for n, g, w in pairs
                            if not n.startswith("new_state_offset")])
    _fail("trainable.onnx", problems[:5], "norm-align's step was exported wrongly; report it")


def _memory(step: NormAlignStep) -> dict[str, int]:
    """What the step keeps (bytes): its state and its constants; the backbone's share is the frozen graph's."""
    state = sum(4 * step.get_buffer(n).numel() for n in step.state_names())
    constants = sum(4 * b.numel() for n, b in step.named_buffers() if n not in step.state_names())
    return {"frozen_weights": 0, "peak_forward_activations": 0, "saved_for_backward": 0, "trainable_params": 0,
            "gradients": 0, "optimizer_state": 0, "state": int(state), "float_constants": int(constants)}


def _version() -> str:
    from edgetune.version import __version__
    return __version__


__all__ = ["build_norm_align_bundle"]
