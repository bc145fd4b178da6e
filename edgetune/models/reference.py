"""Reference models people deploy on microcontrollers, defined in torch (no downloads, random init).

The three MLPerf Tiny inference benchmark models (Banbury et al., "MLPerf Tiny Benchmark",
NeurIPS Datasets and Benchmarks 2021; reference Keras code in github.com/mlcommons/tiny),
a MobileNetV3-small style network (Howard et al., "Searching for MobileNetV3", ICCV 2019)
and a small Conv1d network for IMU windows. Every conv -> BatchNorm pair sits in one
``nn.Sequential`` so ``Backbone.for_export`` folds it (``blocks.fuse_for_export``).

Choices common to all of them, where the Keras references differ from torch:

* Keras ``padding='same'`` becomes a symmetric torch padding of ``kernel // 2``. For odd
  kernels at stride 1 this is the same; at stride 2 TensorFlow pads the extra row/column at
  the bottom/right, torch on both sides, so the windows are shifted by one pixel (shapes are
  equal). Weights trained in TensorFlow would need an explicit ``ZeroPad2d`` to be ported.
* Dropout layers (training-only) and the final softmax are left out: edgetune's classifier
  is a linear layer producing logits.
* Keras' "average pooling over the whole last map" is ``Backbone.pool`` (global average).
"""
from __future__ import annotations

import torch
from torch import nn

from edgetune.models.backbone import Backbone


def conv_bn(cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1, groups: int = 1,
            padding: int | tuple[int, int] | None = None, act: nn.Module | None = None) -> nn.Sequential:
    """conv (no bias) -> BatchNorm2d -> activation (``act``; None: no activation)."""
    pad: int | tuple[int, int]
    if padding is not None:
        pad = padding
    else:
        pad = (kernel[0] // 2, kernel[1] // 2) if isinstance(kernel, tuple) else kernel // 2
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride, pad, groups=groups, bias=False),
                               nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act)
    return nn.Sequential(*layers)


def separable(cin: int, cout: int, stride: int) -> nn.Sequential:
    """Depthwise 3x3 -> BN -> ReLU -> pointwise 1x1 -> BN -> ReLU (MobileNetV1's block, DS-CNN's layer)."""
    return nn.Sequential(conv_bn(cin, cin, 3, stride, groups=cin, act=nn.ReLU()),
                         conv_bn(cin, cout, 1, act=nn.ReLU()))


class ResidualStack(nn.Module):
    """One ResNet-8 stack: conv3x3(stride)-BN-ReLU-conv3x3-BN, plus the identity (or, when the stride
    or width changes, a 1x1 strided conv without BN, as in the MLPerf Tiny reference), then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn(cin, cout, 3, stride, act=nn.ReLU()), conv_bn(cout, cout, 3))
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Conv2d(cin, cout, 1, stride)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.shortcut(x) + self.body(x))


class ResNet8(Backbone):
    """MLPerf Tiny image classification: ResNet-8 for CIFAR-10 (``resnet_v1_eembc``), 3x32x32.

    Published facts followed: a 3x3 stem conv of 16 filters (BN, ReLU), then three residual
    stacks of 16, 32 and 64 filters (the second and third with stride 2 and a 1x1 strided conv
    without BN on the shortcut), each conv followed by BN, ReLU after the residual add, average
    pooling over the 8x8 map and a dense layer of 10 classes. Convs have biases in Keras; here
    the convs followed by BN have none (BN's shift replaces them), so the parameter count is
    the reference's minus those biases. Stages: stem, stack 1, stack 2, stack 3.
    """

    def __init__(self, num_classes: int = 10, input_shape: tuple[int, ...] = (3, 32, 32)) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        self.stages = nn.ModuleList([conv_bn(input_shape[0], 16, 3, act=nn.ReLU()), ResidualStack(16, 16, 1),
                                     ResidualStack(16, 32, 2), ResidualStack(32, 64, 2)])
        self.classifier = nn.Linear(64, num_classes)


class DSCNN(Backbone):
    """MLPerf Tiny keyword spotting: DS-CNN on 49 x 10 MFCC features (1 x 49 x 10: time x coefficient).

    Published facts followed: a 10x4 conv of 64 filters with stride 2 (BN, ReLU), then four
    depthwise-separable layers (3x3 depthwise, BN, ReLU, 1x1 conv of 64, BN, ReLU) at stride 1,
    average pooling over the whole 25x5 map and a dense layer of 12 classes (10 words,
    silence, unknown). Choice: the first conv's 'same' padding is the symmetric (5, 1) that
    gives TensorFlow's 25x5 output (TensorFlow pads 4 above and 5 below, 1 left and 1 right,
    see the module docstring). Stages: the first conv, then each separable layer.
    """

    def __init__(self, num_classes: int = 12, input_shape: tuple[int, ...] = (1, 49, 10), width: int = 64) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        stem = conv_bn(input_shape[0], width, (10, 4), 2, padding=(5, 1), act=nn.ReLU())
        self.stages = nn.ModuleList([stem] + [separable(width, width, 1) for _ in range(4)])
        self.classifier = nn.Linear(width, num_classes)


class MobileNetV1(Backbone):
    """MLPerf Tiny visual wake words: MobileNetV1 with width multiplier 0.25 on 3 x 96 x 96, 2 classes.

    Published facts followed (Howard et al., "MobileNets", 2017, Table 1, with alpha = 0.25; the
    MLPerf Tiny ``mobilenet_v1_eembc``): a 3x3 stride-2 conv of 8 filters, then 13 depthwise-
    separable blocks with pointwise widths 16, 32, 32, 64, 64, 128 (x6), 256, 256 and strides 1,
    2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1; BN after every conv; ReLU (the MLPerf reference uses ReLU
    where Keras applications use ReLU6); average pooling over the last 3x3 map and a dense
    layer. Stages (one per resolution): 48x48 (stem + block 1), 24x24, 12x12, 6x6, 3x3.
    """

    # pointwise width at alpha = 1 (Howard et al., Table 1), stride of the depthwise conv
    BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1), (512, 1), (512, 1),
              (512, 1), (1024, 2), (1024, 1))

    def __init__(self, num_classes: int = 2, input_shape: tuple[int, ...] = (3, 96, 96), alpha: float = 0.25) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        cin = max(8, int(32 * alpha))
        stages: list[list[nn.Module]] = [[conv_bn(input_shape[0], cin, 3, 2, act=nn.ReLU())]]
        for width, stride in self.BLOCKS:
            cout = max(8, int(width * alpha))
            if stride == 2:
                stages.append([])
            stages[-1].append(separable(cin, cout, stride))
            cin = cout
        self.stages = nn.ModuleList(nn.Sequential(*s) for s in stages)
        self.classifier = nn.Linear(cin, num_classes)


def _divisible(v: float, divisor: int = 8) -> int:
    """Round a width to a multiple of 8, never below 90% of ``v`` (MobileNet's ``_make_divisible``)."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


class SqueezeExcite(nn.Module):
    """Squeeze-excitation: global average pool, 1x1 conv to width/4 (rounded to 8), ReLU, 1x1 conv,
    hard-sigmoid, channel-wise multiply (MobileNetV3's variant)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        squeeze = _divisible(channels / 4)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.act = nn.ReLU()
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(2, 3), keepdim=True)
        return x * self.gate(self.fc2(self.act(self.fc1(s))))


class Bneck(nn.Module):
    """MobileNetV3 bottleneck: 1x1 expand (when wider) -> kxk depthwise -> [SE] -> 1x1 project, BN after
    every conv, residual when stride 1 and widths match."""

    def __init__(self, cin: int, kernel: int, expand: int, cout: int, se: bool, hswish: bool, stride: int) -> None:
        super().__init__()
        act = nn.Hardswish if hswish else nn.ReLU
        layers: list[nn.Module] = []
        if expand != cin:
            layers.append(conv_bn(cin, expand, 1, act=act()))
        layers.append(conv_bn(expand, expand, kernel, stride, groups=expand, act=act()))
        if se:
            layers.append(SqueezeExcite(expand))
        layers.append(conv_bn(expand, cout, 1))
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


class MobileNetV3Small(Backbone):
    """A MobileNetV3-small style network for 3 x 32 x 32 (Howard et al., 2019, Table 2).

    Published facts followed: the 11 bottlenecks of MobileNetV3-Small (kernel, expansion,
    output, SE, activation): (3,16,16,SE,RE) (3,72,24,-,RE) (3,88,24,-,RE) (5,96,40,SE,HS)
    (5,240,40,SE,HS) x2 (5,120,48,SE,HS) (5,144,48,SE,HS) (5,288,96,SE,HS) (5,576,96,SE,HS) x2,
    a 3x3 stem of 16 with hardswish, a final 1x1 conv to 576 with hardswish, BN after every conv,
    squeeze-excitation with a hard-sigmoid gate and a squeeze to a quarter of the width.
    Choices for 32x32 inputs and for edgetune: widths times ``width_mult`` (0.5 by default,
    rounded to multiples of 8: about 260k parameters); the stem has stride 1
    and the first bottleneck stride 1 (224 -> 7 needs five halvings, 32 -> 4 needs three: the
    remaining strides are at blocks 2, 4 and 9); the final SE-free 1x1 conv to 576 is kept but
    the paper's 1024-wide layer after pooling is left out (edgetune's classifier is one linear
    layer on the pooled feature). Stages: 32x32, 16x16, 8x8, 4x4 (with the final 1x1 conv).
    """

    # kernel, expansion, output, SE, hardswish, stride (strides adapted to 32x32)
    BLOCKS = ((3, 16, 16, True, False, 1), (3, 72, 24, False, False, 2), (3, 88, 24, False, False, 1),
              (5, 96, 40, True, True, 2), (5, 240, 40, True, True, 1), (5, 240, 40, True, True, 1),
              (5, 120, 48, True, True, 1), (5, 144, 48, True, True, 1), (5, 288, 96, True, True, 2),
              (5, 576, 96, True, True, 1), (5, 576, 96, True, True, 1))

    def __init__(self, num_classes: int = 10, input_shape: tuple[int, ...] = (3, 32, 32),
                 width_mult: float = 0.5) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        cin = _divisible(16 * width_mult)
        stages: list[list[nn.Module]] = [[conv_bn(input_shape[0], cin, 3, 1, act=nn.Hardswish())]]
        for kernel, expand, out, se, hswish, stride in self.BLOCKS:
            if stride == 2:
                stages.append([])
            cout = _divisible(out * width_mult)
            stages[-1].append(Bneck(cin, kernel, _divisible(expand * width_mult), cout, se, hswish, stride))
            cin = cout
        last = _divisible(576 * width_mult)
        stages[-1].append(conv_bn(cin, last, 1, act=nn.Hardswish()))
        self.stages = nn.ModuleList(nn.Sequential(*s) for s in stages)
        self.classifier = nn.Linear(last, num_classes)


def conv1d_bn(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Sequential:
    """Conv1d (no bias, 'same'-style padding kernel // 2) -> BatchNorm1d -> ReLU."""
    return nn.Sequential(nn.Conv1d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm1d(cout),
                         nn.ReLU())


class IMUConv1d(Backbone):
    """A Conv1d network for inertial-sensor windows: 6 channels (3-axis accelerometer + gyroscope)
    x 100 time steps (2 s at 50 Hz, the UCI-HAR rate), 6 activity classes; input N x C x T.

    Not a published benchmark model: the common small HAR recipe of stacked 1-D convs with BN
    and ReLU, then global average pooling over time. Choices: kernel 5 throughout; widths
    16-32-64-64; the second and third stages halve the time axis (100 -> 50 -> 25), the last
    one keeps it; about 35k parameters. Stages: the four conv blocks (N x C x T each).
    """

    def __init__(self, num_classes: int = 6, input_shape: tuple[int, ...] = (6, 100)) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        self.stages = nn.ModuleList([conv1d_bn(input_shape[0], 16, 5), conv1d_bn(16, 32, 5, 2),
                                     conv1d_bn(32, 64, 5, 2), conv1d_bn(64, 64, 5)])
        self.classifier = nn.Linear(64, num_classes)
