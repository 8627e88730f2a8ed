"""Dilated MobileNetV2 trunk (Sandler et al., 2018), the light backbone multitask pruning
papers also report on.

The inverted-residual stages of the standard network (no classifier, no final 1x1
expansion to 1280, as in DeepLabV3's MobileNetV2 backbone), grouped into a stem and four
stages by resolution so that ``output_stride``, ``stage_names`` and ``split`` (branched
models) mean what they mean for the ResNet trunk:

    stem   conv 3x3/2 (32) + inverted residual t1 c16          stride 2
    layer1 t6 c24 n2 /2                                         stride 4
    layer2 t6 c32 n3 /2                                         stride 8
    layer3 t6 c64 n4 /2, t6 c96 n3                              stride 16
    layer4 t6 c160 n3 /2, t6 c320 n1                            stride 32

Stages past ``output_stride`` keep stride 1 and dilate their depthwise convolutions
instead (DeepLab's atrous conversion). ``base_width`` is the stem's width: 32 is the
standard network (width multiplier ``base_width / 32``; every width rounded to a multiple
of 8, as in the original).

Its depthwise convolutions (``groups = channels``) are prunable weights like any other for
element masks; block-sparse layers and channel pruning handle ``groups=1`` convolutions only,
so this trunk supports ``sparsity.granularity: element`` (``GRANULARITIES``).
"""

from __future__ import annotations

import torch
from torch import nn

from dsparse.models.resnet import init_conv_and_norm, split_stages

VALID_OUTPUT_STRIDES = (8, 16)
GRANULARITIES = ("element",)
"""The mask granularities this trunk supports."""

# (expansion t, channels c, blocks n, first stride s) per stage, after the stem
_STAGES = (
    ((6, 24, 2, 2),),
    ((6, 32, 3, 2),),
    ((6, 64, 4, 2), (6, 96, 3, 1)),
    ((6, 160, 3, 2), (6, 320, 1, 1)),
)


def _divisible(channels: float, divisor: int = 8) -> int:
    """Round to the nearest multiple of ``divisor`` without losing more than 10% (MobileNetV2's rule)."""
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * channels else rounded


def _conv_bn(in_channels: int, out_channels: int, kernel: int, stride: int = 1, dilation: int = 1,
             groups: int = 1, activation: bool = True) -> list[nn.Module]:
    padding = dilation * (kernel - 1) // 2
    layers = [nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=padding, dilation=dilation,
                        groups=groups, bias=False), nn.BatchNorm2d(out_channels)]
    return layers + [nn.ReLU6(inplace=True)] if activation else layers


class InvertedResidual(nn.Module):
    """1x1 expansion, 3x3 depthwise (strided or dilated), linear 1x1 projection; a residual
    connection when the block keeps the shape."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, dilation: int, expansion: int):
        super().__init__()
        hidden = in_channels * expansion
        layers = _conv_bn(in_channels, hidden, 1) if expansion != 1 else []
        layers += _conv_bn(hidden, hidden, 3, stride, dilation, groups=hidden)
        layers += _conv_bn(hidden, out_channels, 1, activation=False)
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2Trunk(nn.Module):
    """Dilated MobileNetV2 feature extractor: stem, then four stages.

    Args:
        base_width: channels of the stem convolution; 32 is the standard network.
        output_stride: input size divided by the feature size, 8 or 16.

    Attributes:
        out_channels: channels of the returned feature map (320 at base_width 32).

    Raises:
        ValueError: a non-positive width or an output stride other than 8 or 16.
    """

    def __init__(self, *, base_width: int = 32, output_stride: int = 8):
        super().__init__()
        if base_width < 1:
            raise ValueError(f"base_width must be >= 1, got {base_width}")
        if output_stride not in VALID_OUTPUT_STRIDES:
            raise ValueError(f"output_stride must be one of {VALID_OUTPUT_STRIDES}, got {output_stride}")
        self.output_stride = output_stride
        scale = base_width / 32
        stem_width, first = _divisible(32 * scale), _divisible(16 * scale)
        self.stem = nn.Sequential(*_conv_bn(3, stem_width, 3, stride=2),
                                  InvertedResidual(stem_width, first, 1, 1, expansion=1))
        in_channels, total_stride, dilation = first, 2, 1
        for index, stage in enumerate(_STAGES):
            blocks = []
            for expansion, channels, count, stride in stage:
                out_channels = _divisible(channels * scale)
                if stride > 1 and total_stride >= output_stride:
                    stride, dilation = 1, dilation * stride  # atrous: keep the resolution, widen the field
                total_stride *= stride
                for block in range(count):
                    blocks.append(InvertedResidual(in_channels, out_channels, stride if block == 0 else 1, dilation,
                                                   expansion))
                    in_channels = out_channels
            self.add_module(f"layer{index + 1}", nn.Sequential(*blocks))
        self.out_channels = in_channels
        init_conv_and_norm(self)

    def stage_names(self) -> tuple[str, ...]:
        """Names of the sequential parts in forward order: the stem, then the stages."""
        return ("stem",) + tuple(f"layer{i + 1}" for i in range(len(_STAGES)))

    def split(self, num_shared: int) -> tuple[nn.Sequential, nn.Sequential]:
        """Cut the trunk into its first ``num_shared`` parts and the rest (``split_stages``)."""
        return split_stages(self, num_shared)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.stage_names():
            x = getattr(self, name)(x)
        return x
