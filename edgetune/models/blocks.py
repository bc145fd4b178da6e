"""Building blocks of the model zoo: batch-agnostic conv blocks that fold into one conv at export.

Normalisation kinds (``norm=``):

* ``"ws"`` — scaled weight standardisation plus a learnable per-channel affine (scale,
  shift). Nothing depends on the batch or on the sample, so at export the affine folds into
  the conv and the frozen backbone is pure int8 conv/add/clip (TinyTTA's batch-agnostic
  choice; see Qiao et al., 2019 and Brock et al., 2021 for the scaling).
* ``"gn"`` — weight standardisation plus GroupNorm (per-sample statistics: batch-agnostic
  but not foldable; the int8 backbone keeps GroupNorm as float islands).
* ``"bn"`` — plain conv plus BatchNorm (folds at export; the bn-adapt/alpha-bn baselines).
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

NORM_KINDS = ("ws", "gn", "bn")


class WSConv2d(nn.Conv2d):
    """Conv whose weight is standardised over its fan-in (zero mean, variance 1/fan_in).

    The 1/fan_in scaling keeps activation variance roughly constant through the network
    without any activation normalisation.
    """

    def standardized_weight(self) -> torch.Tensor:
        w = self.weight
        fan_in = w[0].numel()
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        return (w - mean) / torch.sqrt(var * fan_in + 1e-4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.standardized_weight(), self.bias, self.stride, self.padding,
                        self.dilation, self.groups)


class ChannelAffine(nn.Module):
    """Per-channel scale and shift: the normalisation layer of ``norm="ws"`` models."""

    def __init__(self, channels: int, gain: float = 1.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels,), gain))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight[None, :, None, None] + self.bias[None, :, None, None]


NORM_LAYERS = (ChannelAffine, nn.GroupNorm, nn.BatchNorm2d, nn.LayerNorm)


def _norm(kind: str, channels: int, gain: float) -> nn.Module:
    if kind == "ws":
        return ChannelAffine(channels, gain)
    if kind == "gn":
        return nn.GroupNorm(math.gcd(8, channels), channels)
    return nn.BatchNorm2d(channels)


class ConvNormAct(nn.Sequential):
    """conv -> norm -> ReLU6 (or no activation); ``fused()`` folds it into one conv + act."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1,
                 norm: str = "ws", act: bool = True) -> None:
        conv_cls = nn.Conv2d if norm == "bn" else WSConv2d
        # ReLU roughly halves the second moment; a gain of sqrt(2) restores it (He init).
        gain = math.sqrt(2.0) if act else 1.0
        layers: list[nn.Module] = [
            conv_cls(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
            _norm(norm, cout, gain),
        ]
        if act:
            layers.append(nn.ReLU6())
        super().__init__(*layers)
        self.norm_kind = norm

    def fused(self) -> nn.Module:
        """An equivalent eval-mode module with the norm folded into the conv where possible."""
        conv, norm = self[0], self[1]
        tail = list(self)[2:]
        if isinstance(norm, nn.GroupNorm):
            w = conv.standardized_weight() if isinstance(conv, WSConv2d) else conv.weight
            plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                              conv.padding, groups=conv.groups, bias=False)
            plain.weight.data.copy_(w.detach())
            return nn.Sequential(plain, norm, *tail)
        w = conv.standardized_weight() if isinstance(conv, WSConv2d) else conv.weight
        if isinstance(norm, ChannelAffine):
            scale, shift = norm.weight, norm.bias
        else:  # BatchNorm in eval mode: running statistics
            scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
            shift = norm.bias - norm.running_mean * scale
        fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                          conv.padding, groups=conv.groups, bias=True)
        fused.weight.data.copy_((w * scale[:, None, None, None]).detach())
        fused.bias.data.copy_(shift.detach())
        return nn.Sequential(fused, *tail)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand -> 3x3 depthwise -> 1x1 project (+ identity when shapes match)."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int, norm: str) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(ConvNormAct(cin, hidden, 1, norm=norm))
        layers += [ConvNormAct(hidden, hidden, 3, stride, groups=hidden, norm=norm),
                   ConvNormAct(hidden, cout, 1, norm=norm, act=False)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


# Only plain convs fold: a subclass (WSConv2d) may transform its weight in forward.
_PLAIN_CONVS = (nn.Conv1d, nn.Conv2d)
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def fold_batchnorm(conv: nn.Module, bn: nn.Module) -> nn.Module | None:
    """``conv`` followed by eval-mode ``bn`` as one conv with a bias, or None when they do not fold
    (not a plain Conv1d/Conv2d then a BatchNorm1d/2d of its output channels with running statistics)."""
    if not (isinstance(conv, _PLAIN_CONVS) and type(conv) in _PLAIN_CONVS and isinstance(bn, _BATCH_NORMS)):
        return None
    mean, var = bn.running_mean, bn.running_var
    if mean is None or var is None or bn.num_features != conv.out_channels:
        return None
    scale = torch.rsqrt(var + bn.eps)
    shift = -mean * scale
    if bn.affine:
        scale = bn.weight * scale
        shift = bn.bias - mean * scale
    fused = copy.deepcopy(conv)  # same class, geometry and padding mode; only weight and bias change
    shape = (-1,) + (1,) * (conv.weight.dim() - 1)
    bias = shift if conv.bias is None else conv.bias * scale + shift
    fused.weight = nn.Parameter((conv.weight * scale.reshape(shape)).detach().clone())
    fused.bias = nn.Parameter(bias.detach().clone())
    return fused


def fuse_for_export(module: nn.Module) -> nn.Module:
    """Fold, in place, every normalisation of ``module`` that can be folded: each ``ConvNormAct``,
    and each plain conv directly followed by a BatchNorm inside an ``nn.Sequential`` (the way most
    user models write conv -> BN; the BN becomes an ``nn.Identity``). Expects eval mode (running
    statistics). A BatchNorm anywhere else (after an activation, say) stays as it is."""
    children = list(module.named_children())
    for k, (name, child) in enumerate(children):
        if isinstance(child, ConvNormAct):
            setattr(module, name, child.fused())
            continue
        if isinstance(module, nn.Sequential) and k + 1 < len(children):
            fused = fold_batchnorm(child, children[k + 1][1])
            if fused is not None:
                setattr(module, name, fused)
                setattr(module, children[k + 1][0], nn.Identity())
                children[k + 1] = (children[k + 1][0], nn.Identity())
                continue
        fuse_for_export(child)
    return module
