"""The model zoo: small edge backbones defined in code (``edgetune list models``)."""
from __future__ import annotations

import torch
from torch import nn

from edgetune.errors import ModelError
from edgetune.models.backbone import Backbone
from edgetune.models.blocks import ConvNormAct, InvertedResidual


def _image_shape(in_channels: int, image_size: int, input_shape: tuple[int, ...] | None,
                 model: str) -> tuple[int, int, int]:
    """C x H x W from ``input_shape`` when given (any H, W), else a square ``image_size`` image.

    Raises:
        ModelError: ``input_shape`` is not C x H x W (these zoo models are 2-D).
    """
    if input_shape is None:
        return (in_channels, image_size, image_size)
    if len(input_shape) != 3:
        raise ModelError(f"model: {model} takes C x H x W images (got input shape {tuple(input_shape)}); use "
                         "imu-conv1d or your own Backbone for 1-D inputs")
    return (int(input_shape[0]), int(input_shape[1]), int(input_shape[2]))


class TinyCNN(Backbone):
    """Four 3x3 conv stages (16-32-32-48 channels, strides 1-2-2-2), ~28k parameters: for tests."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 32,
                 norm: str = "ws", input_shape: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.input_shape = _image_shape(in_channels, image_size, input_shape, type(self).__name__)
        in_channels = self.input_shape[0]
        self.num_classes = num_classes
        widths, strides = (16, 32, 32, 48), (1, 2, 2, 2)
        cins = (in_channels,) + widths[:-1]
        self.stages = nn.ModuleList(
            ConvNormAct(ci, co, 3, s, norm=norm) for ci, co, s in zip(cins, widths, strides))
        self.classifier = nn.Linear(widths[-1], num_classes)


class McuNetS(Backbone):
    """MobileNetV2-style inverted residuals with depthwise convs, ~130k parameters.

    Stage outputs at 32x32 input: 16x16x16, 8x8x24, 4x4x40, 4x4x96.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 32,
                 norm: str = "ws", input_shape: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.input_shape = _image_shape(in_channels, image_size, input_shape, type(self).__name__)
        in_channels = self.input_shape[0]
        self.num_classes = num_classes

        def ir(ci: int, co: int, s: int, e: int = 4) -> InvertedResidual:
            return InvertedResidual(ci, co, s, e, norm)

        self.stages = nn.ModuleList([
            nn.Sequential(ConvNormAct(in_channels, 16, 3, 2, norm=norm), ir(16, 16, 1, 2)),
            nn.Sequential(ir(16, 24, 2), ir(24, 24, 1)),
            nn.Sequential(ir(24, 40, 2), ir(40, 40, 1)),
            nn.Sequential(ir(40, 64, 1), ir(64, 64, 1), ir(64, 64, 1), ConvNormAct(64, 96, 1, norm=norm)),
        ])
        self.classifier = nn.Linear(96, num_classes)


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def attend(self, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Multi-head attention of ``queries`` over ``context`` (keys/values from context only)."""
        n, tq, d = queries.shape
        tk = context.shape[1]
        h, dh = self.heads, d // self.heads
        w_q, w_k, w_v = self.qkv.weight.chunk(3)
        b_q, b_k, b_v = self.qkv.bias.chunk(3)
        q = nn.functional.linear(queries, w_q, b_q).reshape(n, tq, h, dh).transpose(1, 2)
        k = nn.functional.linear(context, w_k, b_k).reshape(n, tk, h, dh).transpose(1, 2)
        v = nn.functional.linear(context, w_v, b_v).reshape(n, tk, h, dh).transpose(1, 2)
        att = torch.softmax(q @ k.transpose(-1, -2) * dh ** -0.5, dim=-1)
        return self.proj((att @ v).transpose(1, 2).reshape(n, tq, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attend(x, x)


class TransformerLayer(nn.Module):
    """Pre-norm transformer encoder layer; ``forward_queries`` runs extra query tokens through it
    with keys and values taken from the layer's own tokens only (visual query tuning)."""

    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))

    def forward_queries(self, queries: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        q = queries + self.attn.attend(self.norm1(queries), self.norm1(tokens))
        return q + self.mlp(self.norm2(q))


class PatchEmbed(nn.Module):
    def __init__(self, in_channels: int, dim: int, patch: int, tokens: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.proj(x).flatten(2).transpose(1, 2)
        return torch.cat([self.cls.expand(t.shape[0], -1, -1), t], dim=1) + self.pos


class _EmbedThenLayer(nn.Sequential):
    pass


class VitTiny(Backbone):
    """ViT for 32x32 inputs: patch 4 (64 tokens + CLS), width 64, 4 layers, 4 heads, MLP 128.

    Stage k is transformer layer k (the first stage also embeds the patches); the pooled
    feature of a stage is its CLS token (after the final LayerNorm for the last stage).
    """

    kind = "vit"

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 32,
                 dim: int = 64, depth: int = 4, heads: int = 4, mlp: int = 128, patch: int = 4,
                 input_shape: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.input_shape = _image_shape(in_channels, image_size, input_shape, "VitTiny")
        c, h, w = self.input_shape
        self.num_classes = num_classes
        self.embed = PatchEmbed(c, dim, patch, (h // patch) * (w // patch))
        self.layers = nn.ModuleList(TransformerLayer(dim, heads, mlp) for _ in range(depth))
        self.stages = nn.ModuleList(
            [_EmbedThenLayer(self.embed, self.layers[0])] + list(self.layers[1:]))
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, num_classes)

    def pool(self, feature: torch.Tensor, stage: int) -> torch.Tensor:
        if stage == len(self.stages) - 1:
            return self.norm(feature[:, 0])
        return feature[:, 0]
