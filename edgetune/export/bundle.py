"""``export``: write a fitted ``Adaptable`` as a bundle (frozen.onnx + trainable.onnx + manifest.json).

Everything is built and checked in a hidden sibling folder, then moved into place: a failed
export leaves no half-written bundle, and an existing bundle is replaced only by a complete one.
"""
from __future__ import annotations

import json
import shutil
import uuid
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx
import torch
from tqdm import tqdm

from edgetune.adapt import Adaptable, check_sample
from edgetune.data import Dataset, to_tensor
from edgetune.errors import ExportError
from edgetune.export.manifest import (FROZEN_FILE, GIVEN, MANIFEST_FILE, TRAINABLE_FILE, ExitSpec, FrozenPart,
                                      GuardSpec, LearnerSpec, Manifest, MomentumSchedule, OptimizerSpec, OptimizerState,
                                      QuantizationSpec, RuntimeContract, TapOutput, TensorSpec, TrainablePart,
                                      onnx_name, seal, sha256_of)
from edgetune.export.onnx_graphs import export_frozen, export_trainable
from edgetune.export.ops import SUPPORTED_OPS
from edgetune.export.quantize import quantize_frozen
from edgetune.export.validate import (check_frozen_numerics, check_partition, check_trainable_initialisers,
                                      check_trainable_numerics, validate_onnx)
from edgetune.memory import memory_table
from edgetune.models.onnx_backbone import OnnxBackbone
from edgetune.methods import METHODS
from edgetune.methods.base import Method
from edgetune.targets import get_target
from edgetune.version import __version__

CHECK_SAMPLES = 8


def exportable_methods() -> list[str]:
    """Registered methods that split into a frozen and a trainable graph."""
    return [n for n in METHODS.names() if METHODS.get(n).partitioned]


def export(adaptable: Adaptable, data: Dataset, out_dir: str | Path, quantize: bool = True, target: str = "host",
           progress: bool = True) -> Manifest:
    """Export a fitted ``adaptable`` to the bundle folder ``out_dir`` (replacing a bundle already there).

    ``data``'s training images calibrate the int8 quantisation and feed the numerical checks.

    Raises:
        ExportError: the method cannot be partitioned (tent, bn-adapt, alpha-bn), ``out_dir`` holds
            something that is not a bundle, or a check fails (partition, ops, static shapes,
            dtypes, ONNX vs torch numerics).
        ConfigError: unknown target (see ``edgetune list targets``).
        DataError: the dataset's images do not fit the model's input.
    """
    target = get_target(target).name
    method = adaptable.method
    if not method.partitioned and not method.folds_into_int8:
        raise ExportError(f"export: method {method.name!r} adapts the backbone itself, so it cannot be split into "
                          "a frozen int8 graph and a trainable graph; export one of "
                          f"{', '.join(exportable_methods())} (or evaluate {method.name} in torch)")
    if method.folds_into_int8 and not quantize:
        raise ExportError(f"export: {method.name} folds its state into the int8 backbone's requantisation, so it "
                          "has no float bundle; drop --no-quantize")
    out = Path(out_dir).resolve()
    if out.exists() and not out.is_dir():
        raise ExportError(f"export: {out} is a file; give a directory for the bundle")
    under = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if under is not None:
        raise ExportError(f"export: {out} is under the file {under}; give a directory path in a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_FILE).exists():
        raise ExportError(f"export: {out} is a non-empty directory without {MANIFEST_FILE} (not a bundle); "
                          "give a new or empty directory so nothing else is overwritten")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        manifest = build_bundle(adaptable, data, staging, quantize, target, progress)
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            out.rename(old)
            staging.rename(out)
            shutil.rmtree(old)
        else:
            staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def build_bundle(adaptable: Adaptable, data: Dataset, directory: Path, quantize: bool = True, target: str = "host",
                 progress: bool = False) -> Manifest:
    """Write and check the bundle's files in ``directory`` (no atomicity: ``export`` provides it).

    Raises:
        ExportError, DataError: as ``export``.
        ConfigError: the method's runtime declarations contradict each other.
    """
    method, backbone = adaptable.method, adaptable.backbone
    if method.folds_into_int8:  # norm-align: its state is the int8 graph's requantisation (own builder)
        from edgetune.export.norm_align import build_norm_align_bundle
        return build_norm_align_bundle(adaptable, data, directory, target, runtime_contract)
    contract = runtime_contract(method)  # contradictory declarations fail before any file is written
    images = to_tensor(data.train_x[:CHECK_SAMPLES])
    check_sample(images[:1], backbone.input_shape)
    bar = tqdm(total=5, desc="export", disable=not progress, leave=False)

    bar.set_postfix_str("partition")
    check_partition(adaptable, images[:1])
    bar.update()

    bar.set_postfix_str("frozen.onnx")
    frozen_path = directory / FROZEN_FILE
    x_io = [("x", (1, *backbone.input_shape))]
    quantization = None
    if isinstance(backbone, OnnxBackbone) and backbone.quantized:
        # An already-quantised graph (e.g. onnxruntime's QDQ) is the int8 backbone as its owner made
        # it: written as given, cut at the taps, never quantised again.
        taps, quantization = _given_qdq(adaptable, backbone, frozen_path, images, quantize)
        tap_io = [(t.name, t.shape) for t in taps]
        validate_onnx(frozen_path, SUPPORTED_OPS["frozen"], label="frozen.onnx (as given)", inputs=x_io,
                      outputs=tap_io)
        bar.update(2)
    else:
        float_path = directory / "frozen_float.onnx" if quantize else frozen_path
        taps = export_frozen(backbone, method.taps(), float_path)
        tap_io = [(t.name, t.shape) for t in taps]
        validate_onnx(float_path, SUPPORTED_OPS["frozen"], label="frozen.onnx (float)", inputs=x_io,
                      outputs=tap_io)
        check_frozen_numerics(float_path, adaptable, images)
        bar.update()

    if quantize and quantization is None:
        bar.set_postfix_str("int8 quantisation")
        quantization = quantize_frozen(float_path, frozen_path, data.train_x, data.name)
        float_path.unlink()
        validate_onnx(frozen_path, SUPPORTED_OPS["frozen"], label="frozen.onnx", inputs=x_io, outputs=tap_io)
        bar.update()

    bar.set_postfix_str("trainable.onnx")
    trainable_path = directory / TRAINABLE_FILE
    with torch.no_grad():
        example_taps = list(adaptable.frozen(images[:1]))
    inputs, outputs, parameters = export_trainable(method, example_taps, trainable_path)
    model = validate_onnx(trainable_path, SUPPORTED_OPS["trainable"], label="trainable.onnx",
                          inputs=[(i.name, i.shape) for i in inputs], outputs=[(o.name, o.shape) for o in outputs])
    check_trainable_initialisers(model, method)
    bar.update()

    bar.set_postfix_str("manifest + checks")
    config = method.config
    trainable = [p for p in parameters if p.trainable]
    optimizer = method.learner().optimizer
    if optimizer == "adam":  # compilers/optimizers.py's Adam: two moments and a step counter per parameter
        states = tuple(OptimizerState(f"adam_{kind}_{p.name}", shape, "float32", p.name) for p in trainable
                       for kind, shape in (("exp_avg", p.shape), ("exp_avg_sq", p.shape), ("step", ())))
    else:
        states = tuple(OptimizerState(f"sgd_momentum_{p.name}", p.shape, "float32", p.name) for p in trainable
                       if config.momentum > 0)
    manifest = Manifest(
        model=adaptable.model_name, method=method.name,
        config=json.loads(json.dumps(asdict(config), default=str)), num_classes=method.num_classes, target=target,
        input=TensorSpec("x", (1, *backbone.input_shape), "float32"),
        frozen=FrozenPart(FROZEN_FILE, sha256_of(frozen_path), quantize, taps),
        trainable=TrainablePart(TRAINABLE_FILE, sha256_of(trainable_path), inputs, outputs, parameters,
                                OptimizerSpec(optimizer, config.lr, config.momentum if optimizer == "sgd" else 0.0,
                                              states)),
        runtime=contract, quantization=quantization, memory=memory_table(adaptable),
        edgetune_version=__version__)
    # Sealed (digest; side files written later are added by ``seal_bundle``), so an edit is refused.
    manifest = seal(manifest, directory)
    (directory / MANIFEST_FILE).write_text(manifest.to_json())
    check_trainable_numerics(directory, manifest, adaptable, images)
    bar.update()
    bar.close()
    return manifest


def runtime_contract(method: Method) -> RuntimeContract:
    """The manifest's form of ``method.contract()`` (state names as trainable.onnx calls them).

    Raises:
        ConfigError: the method's declarations contradict each other (see ``Method.contract``).
    """
    c = method.contract()
    s, e, g = c.schedule, c.exits, c.guard
    return RuntimeContract(
        momentum_schedule=MomentumSchedule(float(s.start), float(s.decay), float(s.floor)) if s else None,
        exits=ExitSpec(tuple(e.stages), f"state_{onnx_name(e.state)}") if e else None,
        guard=GuardSpec(float(g.rate), float(g.max_share), int(g.every), int(g.warmup), g.restore) if g else None,
        labels=c.labels.use,
        learner=(LearnerSpec(c.learner.replay, c.learner.replay_steps, c.learner.warmup, c.learner.seed)
                 if c.learner.replay or c.learner.warmup else None))


# A QDQ graph run in onnxruntime and as fake quantisation in torch may round a tie differently
# (one step of one activation), which then spreads a little: the taps must agree to this
# relative L2 error, which a wrong cut or pooling exceeds by far.
GIVEN_QDQ_RTOL = 0.05


def _given_qdq(adaptable: Adaptable, backbone: OnnxBackbone, path: Path, images: torch.Tensor,
               quantize: bool) -> tuple[tuple[TapOutput, ...], QuantizationSpec]:
    """Write the backbone's own QDQ graph cut at the method's taps to ``path`` and check it against the
    torch interpreter (fake quantisation) on ``images``.

    Raises:
        ExportError: ``--no-quantize`` was asked for an int8 graph, or the taps disagree with torch.
    """
    from edgetune.ort_runtime import session

    method = adaptable.method
    if not quantize:
        raise ExportError("export: the model is already quantised (QuantizeLinear/DequantizeLinear nodes), so "
                          "there is no float backbone to keep; drop --no-quantize, or export the float model")
    onnx.save(backbone.frozen_graph(method.taps()), str(path))
    names = [t.name for t in method.taps()]
    sess = session(path)
    problems = []
    with torch.no_grad():
        want = [t.numpy() for t in adaptable.frozen(images)]
    got = [np.concatenate(parts) for parts in
           zip(*[sess.run(names, {"x": images[k:k + 1].numpy()}) for k in range(len(images))])]
    for name, g, w in zip(names, got, want):
        err = float(np.linalg.norm(g - w) / max(float(np.linalg.norm(w)), 1e-12))
        if g.shape != w.shape or not err <= GIVEN_QDQ_RTOL:
            problems.append(f"{name} differs from the torch interpreter (relative error {err:.3g}, shape "
                            f"{g.shape} vs {w.shape})")
    if problems:
        raise ExportError(f"frozen.onnx (as given): {'; '.join(problems)}; the QDQ graph and edgetune's reading of "
                          "it disagree: report it with the model file")
    taps = tuple(TapOutput(t.name, (1, *w.shape[1:]), "float32", t.stage, t.pooled)
                 for t, w in zip(method.taps(), want))
    source = str(backbone.source["onnx"])
    per_channel, symmetric = _weight_format(path)
    spec = QuantizationSpec(format="QDQ", per_channel=per_channel, weight_type="int8",
                            activation_type="int8", weight_symmetric=symmetric, activation_symmetric=False,
                            calibration_method=GIVEN, calibration_samples=0, calibration_data=source)
    return taps, spec


def _weight_format(path: Path) -> tuple[bool, bool]:
    """(per-channel, symmetric) of the int8 weights of a QDQ graph: DequantizeLinear of constant weights
    with a scale vector, and zero points that are all zero."""
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    weights = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
               and inits[n.input[0]].data_type == onnx.TensorProto.INT8]
    per_channel = any(len(inits[n.input[1]].dims) == 1 and inits[n.input[1]].dims[0] > 1 for n in weights
                      if n.input[1] in inits)
    symmetric = all(len(n.input) < 3 or n.input[2] not in inits or not numpy_helper.to_array(inits[n.input[2]]).any()
                    for n in weights)
    return per_channel, symmetric
