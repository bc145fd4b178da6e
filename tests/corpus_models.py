"""The model corpus: architectures written the way users write them, each as an edgetune ``Backbone``.

Small widths so each compiles in seconds. ``CORPUS`` maps a name to a zero-argument builder;
``build`` returns the model in eval mode with seeded weights and non-trivial BatchNorm running
statistics (so folding and unfolded BatchNorm both do real work), and ``calibration_inputs`` /
``sample_inputs`` give float32 samples of the model's input shape. Used by tests/test_corpus.py and
benchmarks/corpus.py.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from onnxruntime.quantization import CalibrationDataReader
from torch import nn

from edgetune.compilers import CompiledGraph, compile_frozen
from edgetune.data import Dataset, to_tensor
from edgetune.errors import EdgetuneError
from edgetune.deploy.project import backbone_macs
from edgetune.export.onnx_graphs import export_frozen
from edgetune.export.ops import SUPPORTED_OPS
from edgetune.export.quantize import quantize_graph
from edgetune.export.validate import validate_onnx
from edgetune.methods.base import TapSpec
from edgetune.models import Backbone, build_model


def _backbone(model: Backbone, input_shape: tuple[int, ...], stages: list[nn.Module], width: int,
              num_classes: int = 10) -> Backbone:
    model.input_shape = input_shape
    model.num_classes = num_classes
    model.stages = nn.ModuleList(stages)
    model.classifier = nn.Linear(width, num_classes)
    return model


class KerasMnistCNN(Backbone):
    """The Keras MNIST example: unpadded ('valid') 3x3 convs with ReLU, 2x2 max-pooling."""

    def __init__(self) -> None:
        super().__init__()
        _backbone(self, (1, 32, 32), [
            nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU()),                      # 30x30
            nn.Sequential(nn.Conv2d(8, 16, 3), nn.ReLU(), nn.MaxPool2d(2)),    # 14x14
            nn.Sequential(nn.Conv2d(16, 16, 3), nn.ReLU(), nn.MaxPool2d(2)),   # 6x6
        ], 16)


class BnAfterReluCNN(Backbone):
    """A CIFAR CNN with BatchNorm after the ReLU (cannot fold into the conv)."""

    def __init__(self) -> None:
        super().__init__()
        _backbone(self, (3, 32, 32), [
            nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(8)),
            nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.BatchNorm2d(16)),
            nn.Sequential(nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU(), nn.BatchNorm2d(16)),
        ], 16)


class _HswishSE(nn.Module):
    """Depthwise conv, hardswish, squeeze-excitation written with F calls (sigmoid gate)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.bn = nn.BatchNorm2d(c)
        self.se1 = nn.Linear(c, c // 2)
        self.se2 = nn.Linear(c // 2, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.hardswish(self.bn(self.dw(x)))
        s = F.adaptive_avg_pool2d(y, 1).flatten(1)
        s = torch.sigmoid(self.se2(F.relu(self.se1(s))))
        return y * s[:, :, None, None]


class HswishSECNN(Backbone):
    """Hardswish activations and squeeze-excitation with Linear layers and a sigmoid gate."""

    def __init__(self) -> None:
        super().__init__()
        _backbone(self, (3, 32, 32), [
            nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.Hardswish()),
            nn.Sequential(_HswishSE(16), nn.Conv2d(16, 24, 1), nn.Hardsigmoid()),
            nn.Sequential(nn.Conv2d(24, 24, 3, stride=2, padding=1), nn.Hardswish(), _HswishSE(24)),
        ], 24)


class _SqueezeExcite(nn.Module):
    """MobileNetV3's squeeze-excitation with 1x1 convs: pool, reduce, ReLU, expand, sigmoid gate, scale."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.down, self.up = nn.Conv2d(c, c // 2, 1), nn.Conv2d(c // 2, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.up(F.relu(self.down(F.adaptive_avg_pool2d(x, 1)))))


class HardswishSEDigits(Backbone):
    """Not a corpus model: a small hardswish + squeeze-excitation net on 1x32x32 digits, whose features
    vary with the input (hswish-se's collapse on structured samples), for the Cortex-M fidelity test of
    the lookup tables and QLinearMul."""

    def __init__(self) -> None:
        super().__init__()
        _backbone(self, (1, 32, 32), [
            nn.Sequential(nn.Conv2d(1, 16, 3, stride=2, padding=1), nn.Hardswish()),
            nn.Sequential(_SqueezeExcite(16), nn.Conv2d(16, 24, 3, stride=2, padding=1), nn.Hardswish()),
            nn.Sequential(nn.Conv2d(24, 24, 1), nn.Hardswish(), _SqueezeExcite(24)),
        ], 24)
        with torch.no_grad():  # torch's default init shrinks activations layer by layer: keep them varied
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    m.weight.mul_(3.0)


class SensorConv1d(Backbone):
    """A Conv1d network for 3x128 accelerometer windows: unpadded and strided 1-D convs, max-pooling."""

    def __init__(self) -> None:
        super().__init__()
        _backbone(self, (3, 128), [
            nn.Sequential(nn.Conv1d(3, 16, 7), nn.BatchNorm1d(16), nn.ReLU()),            # 122
            nn.Sequential(nn.Conv1d(16, 24, 5, stride=2), nn.ReLU(), nn.MaxPool1d(2)),     # 59 -> 29
            nn.Sequential(nn.Conv1d(24, 32, 3, padding=1), nn.ReLU()),
        ], 32, num_classes=6)


class _Block(nn.Module):
    """Pre-norm transformer block: LayerNorm, one-head attention with Softmax, LayerNorm, GELU MLP."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.n1(x)).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1)
        x = x + self.proj(att @ v)
        return x + self.mlp(self.n2(x))


class _Tokens(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, d, 4, 4)
        self.pos = nn.Parameter(torch.randn(1, 16, d) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.patch(x).flatten(2).transpose(1, 2) + self.pos


class TinyTransformer(Backbone):
    """Patch embedding (4x4 patches of a 1x16x16 image: 16 tokens of width 32) and one transformer block;
    pooled by averaging the tokens."""

    kind = "vit"

    def __init__(self) -> None:
        super().__init__()
        _backbone(self, (1, 16, 16), [_Tokens(32), _Block(32)], 32)

    def pool(self, feature: torch.Tensor, stage: int) -> torch.Tensor:
        return feature.mean(dim=1)


class _Shuffle(nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        return x.reshape(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class GroupedShuffleCNN(Backbone):
    """ShuffleNet-style grouped convs (groups 2 and 4) with a channel shuffle (reshape/transpose)."""

    def __init__(self) -> None:
        super().__init__()
        _backbone(self, (1, 32, 32), [
            nn.Sequential(nn.Conv2d(1, 16, 3, stride=2, padding=1), nn.ReLU()),
            nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=2), nn.ReLU(), _Shuffle(2),
                          nn.Conv2d(16, 32, 1, groups=4), nn.ReLU6()),
            nn.Sequential(nn.Conv2d(32, 32, 3, stride=2, padding=1, groups=4), nn.ReLU()),
        ], 32)


class _Inception(nn.Module):
    """Four branches concatenated: 1x1, 1x1->3x3, 1x1->5x5, 3x3 max-pool->1x1."""

    def __init__(self, cin: int, c: int) -> None:
        super().__init__()
        self.b1 = nn.Conv2d(cin, c, 1)
        self.b2 = nn.Sequential(nn.Conv2d(cin, c, 1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1))
        self.b3 = nn.Sequential(nn.Conv2d(cin, c, 1), nn.ReLU(), nn.Conv2d(c, c, 5, padding=2))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.Conv2d(cin, c, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], dim=1))


class InceptionCNN(Backbone):
    """Inception-like concat branches (with a 3x3 stride-1 max-pool branch)."""

    def __init__(self) -> None:
        super().__init__()
        _backbone(self, (1, 32, 32), [
            nn.Sequential(nn.Conv2d(1, 16, 3, stride=2, padding=1), nn.ReLU()),
            _Inception(16, 8),
            nn.Sequential(nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU()),
        ], 32)


class _FPad(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (1, 1, 2, 0))  # asymmetric: 2 rows on top, none below


class ExplicitPadCNN(Backbone):
    """Padding written as layers: nn.ZeroPad2d (asymmetric, TensorFlow's 'same' at stride 2) and F.pad,
    each before an unpadded conv."""

    def __init__(self) -> None:
        super().__init__()
        _backbone(self, (1, 32, 32), [
            nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(1, 8, 3, stride=2), nn.ReLU()),  # 16x16
            nn.Sequential(_FPad(), nn.Conv2d(8, 16, 3), nn.ReLU()),                              # 16x16
            nn.Sequential(nn.ZeroPad2d(1), nn.Conv2d(16, 16, 3, stride=2), nn.ReLU()),           # 8x8
        ], 16)


class StridedDilatedCNN(Backbone):
    """Strided convs and dilated convs (dilation 2 and 3, padded to keep the size; one unpadded)."""

    def __init__(self) -> None:
        super().__init__()
        _backbone(self, (1, 32, 32), [
            nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU()),              # 16x16
            nn.Sequential(nn.Conv2d(8, 16, 3, padding=2, dilation=2), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=3, dilation=3), nn.ReLU()),        # 16x16
            nn.Sequential(nn.Conv2d(16, 24, 3, stride=2, dilation=2), nn.ReLU()),         # 6x6
        ], 24)


class _NormalizeResidual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(0.45))
        self.register_buffer("std", torch.tensor(0.22))
        self.c1 = nn.Conv2d(1, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.leaky_relu(self.c1((x - self.mean) / self.std), 0.1)
        return a + F.leaky_relu(self.c2(a), 0.1)


class NormalizedInputCNN(Backbone):
    """Input normalisation inside forward ((x - mean) / std with constant buffers), LeakyReLU, a
    residual Add, and a stage ending in average pooling: what a torchvision-trained model often carries."""

    def __init__(self) -> None:
        super().__init__()
        _backbone(self, (1, 32, 32), [_NormalizeResidual(), nn.Sequential(nn.Conv2d(16, 24, 3, padding=1), nn.ReLU(),
                                                                          nn.AvgPool2d(2))], 24)


CORPUS: dict[str, Callable[[], Backbone]] = {
    "keras-mnist": KerasMnistCNN,
    "bn-after-relu": BnAfterReluCNN,
    "hswish-se": HswishSECNN,
    "sensor-conv1d": SensorConv1d,
    "transformer": TinyTransformer,
    "grouped-shuffle": GroupedShuffleCNN,
    "inception": InceptionCNN,
    "explicit-pad": ExplicitPadCNN,
    "strided-dilated": StridedDilatedCNN,
    "normalized-input": NormalizedInputCNN,
    "resnet8": lambda: build_model("resnet8"),
    "ds-cnn": lambda: build_model("ds-cnn"),
    "mobilenet-v1-025": lambda: build_model("mobilenet-v1-025"),
    "mobilenet-v3-s": lambda: build_model("mobilenet-v3-s"),
    "imu-conv1d": lambda: build_model("imu-conv1d"),
}


def build(name: str, seed: int = 0) -> Backbone:
    """Corpus model ``name`` in eval mode: seeded weights, BatchNorm running statistics from a few
    training-mode passes over ``calibration_inputs`` (so folded and unfolded BatchNorms are non-trivial)."""
    torch.manual_seed(seed)
    model = CORPUS[name]()
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        model.train()
        with torch.no_grad():
            for _ in range(3):
                model(torch.from_numpy(calibration_inputs(model.input_shape, 16, seed)))
    return model.eval()


def calibration_inputs(shape: tuple[int, ...], n: int, seed: int = 0) -> np.ndarray:
    """n structured float32 samples of ``shape``: a smooth random field (low-frequency, like an image
    or a sensor trace) in [0, 1] plus a little noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((n, *shape[:1], *[max(2, s // 4) for s in shape[1:]]), dtype=np.float32)
    t = torch.nn.functional.interpolate(torch.from_numpy(coarse), size=shape[1:],
                                        mode="bilinear" if len(shape) == 3 else "linear", align_corners=False)
    noisy = t.numpy() + rng.normal(0, 0.05, (n, *shape)).astype(np.float32)
    return np.clip(noisy, 0.0, 1.0).astype(np.float32)


def labelled_samples(backbone: Backbone, n: int = 512, seed: int = 7) -> Dataset:
    """A labelled ``Dataset`` of structured samples of the model's input shape, with a learnable label
    (the channel with the largest mean; for one channel, the mean's quantile), split 70/10/20: source
    data for export's calibration and checks, and a target for a linear probe."""
    x = calibration_inputs(backbone.input_shape, n, seed)
    means = x.reshape(n, x.shape[1], -1).mean(-1)
    if x.shape[1] > 1:
        y = means.argmax(1) % backbone.num_classes
    else:
        edges = np.quantile(means[:, 0], np.linspace(0, 1, backbone.num_classes + 1)[1:-1])
        y = np.digitize(means[:, 0], edges)
    y = y.astype(np.int64)
    a, b = int(0.7 * n), int(0.8 * n)
    return Dataset("corpus-samples", x[:a], y[:a], x[a:b], y[a:b], x[b:], y[b:], backbone.num_classes)


def fit_linear_probe(backbone: Backbone, data: Dataset) -> None:
    """Least-squares classifier on the pooled last-stage features of ``data``'s training split (the
    corpus models are untrained; a random classifier often predicts one class for every sample)."""
    with torch.no_grad():
        last = len(backbone.stages) - 1
        feats = backbone.pool(backbone.stage_outputs(to_tensor(data.train_x))[-1], last)
        design = torch.cat([feats, torch.ones(len(feats), 1)], 1).double()
        onehot = F.one_hot(torch.from_numpy(data.train_y), backbone.num_classes).double()
        ridge = design.T @ design + 1e-3 * torch.eye(design.shape[1], dtype=torch.float64)
        solution = torch.linalg.solve(ridge, design.T @ onehot).float()
        backbone.classifier.weight.copy_(solution[:-1].T)
        backbone.classifier.bias.copy_(solution[-1])


def sample_inputs(shape: tuple[int, ...], n: int) -> np.ndarray:
    """n held-out samples (another seed than calibration), some pushed outside the calibrated range."""
    x = calibration_inputs(shape, n, seed=1234)
    x[::5] *= 1.3  # a few out-of-range samples exercise int8 saturation
    return x


# --- the export route of the corpus -------------------------------------------------------------------------------

CALIBRATION = 64


class _Samples(CalibrationDataReader):
    """Feeds float32 samples of any input shape one at a time as input "x" (the graph is batch 1)."""

    def __init__(self, x: np.ndarray) -> None:
        self._feeds = iter([{"x": x[i:i + 1]} for i in range(len(x))])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def frozen_taps(backbone: Backbone) -> list[TapSpec]:
    """What the corpus exports: stage 0's whole output (an int8 map) and the pooled last stage."""
    return [TapSpec(0, pooled=False), TapSpec(len(backbone.stages) - 1, pooled=True)]


def export_int8(backbone: Backbone, directory: Path) -> Path:
    """frozen.onnx (int8 QDQ) of ``backbone`` as ``edgetune export`` writes it: ``export_frozen`` (norms
    folded, taps), the export-time op check, ``edgetune.export.quantize.quantize_graph`` (what
    ``quantize_frozen`` runs: onnxruntime's static QDQ with edgetune's settings, the op table's float
    islands left in float) calibrated on ``calibration_inputs`` of the model's input shape, then the op
    check again.

    Raises:
        ExportError: the exporter, the op check or the quantiser refuses the model (one line).
    """
    directory.mkdir(parents=True, exist_ok=True)
    fp32, out = directory / "frozen_float.onnx", directory / "frozen.onnx"
    taps = export_frozen(backbone, frozen_taps(backbone), fp32)
    x_io = [("x", (1, *backbone.input_shape))]
    tap_io = [(t.name, t.shape) for t in taps]
    validate_onnx(fp32, SUPPORTED_OPS["frozen"], label="frozen.onnx (float)", inputs=x_io, outputs=tap_io)
    samples = calibration_inputs(backbone.input_shape, CALIBRATION)
    quantize_graph(fp32, out, lambda: _Samples(samples))
    validate_onnx(out, SUPPORTED_OPS["frozen"], label="frozen.onnx", inputs=x_io, outputs=tap_io)
    return out


@dataclass(frozen=True)
class Outcome:
    """What happened to one corpus model: compiled for the host, or refused with one line."""

    name: str
    compiled: CompiledGraph | None
    onnx: Path | None
    refusal: str = ""
    stage: str = ""  # where a refusal came from: "export" or "compile"
    seconds: float = 0.0
    directory: Path | None = None  # where the ONNX graphs (float and int8) were written
    input_shape: tuple[int, ...] = ()
    params: int = 0

    @property
    def status(self) -> str:
        return "compiled" if self.compiled is not None else f"refused at {self.stage}"


def export_and_compile(name: str, directory: Path, target: str = "host") -> Outcome:
    """Export corpus model ``name`` to int8 and compile it; an ``EdgetuneError`` becomes a refusal.
    Any other exception propagates (it is a bug: users must never see it)."""
    backbone = build(name)
    about = dict(directory=directory, input_shape=tuple(backbone.input_shape), params=parameters(backbone))
    start = time.perf_counter()
    try:
        path = export_int8(backbone, directory)
    except EdgetuneError as exc:
        return Outcome(name, None, None, str(exc), "export", time.perf_counter() - start, **about)
    start = time.perf_counter()
    try:
        graph = compile_frozen(path, target, directory / target)
    except EdgetuneError as exc:
        return Outcome(name, None, path, str(exc), "compile", time.perf_counter() - start, **about)
    return Outcome(name, graph, path, seconds=time.perf_counter() - start, **about)


def parameters(backbone: Backbone) -> int:
    """Parameters of the whole model (stages and classifier)."""
    return sum(p.numel() for p in backbone.parameters())


def graph_macs(path: Path) -> int:
    """Multiply-accumulates of one forward of the ONNX graph at ``path`` (what the firmware reports)."""
    return backbone_macs(path)
