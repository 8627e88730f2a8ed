"""DeepLab-style dilated ResNet trunk built from BasicBlocks.

Dense prediction needs feature maps finer than a classification ResNet's 1/32. As in
DeepLab, the last stages keep their stride at 1 and dilate their convolutions instead, so
the receptive field still grows while the resolution stays at ``output_stride`` (8 or 16).
Dilation changes no parameter shape: at ``base_width=64`` the trunk has exactly the
convolutions and norms of a standard ResNet-18/34 without the classifier, which keeps
parameter counts and sparsity numbers comparable to the DiSparse paper.

The trunk is a plain ``nn.Module``: no masks, no device placement, no pretrained weights.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

VALID_OUTPUT_STRIDES = (8, 16)
NUM_STAGES = 4


def _conv3x3(in_channels: int, out_channels: int, stride: int, dilation: int) -> nn.Conv2d:
    # padding = dilation keeps the spatial size for stride 1 at any dilation.
    return nn.Conv2d(
        in_channels, out_channels, 3, stride=stride, padding=dilation, dilation=dilation, bias=False
    )


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection.

    The shortcut becomes a strided 1x1 convolution plus norm whenever the block changes
    the resolution or the width, so the sum is always shape-compatible.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride, dilation)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels, 1, dilation)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def stage_strides_and_dilations(
    output_stride: int, stem_pool: bool
) -> list[tuple[int, int]]:
    """(stride, dilation) of each of the four stages for a requested output stride.

    Stages downsample by 2 until the total stride reaches ``output_stride``; after that
    every further stage doubles the dilation instead (DeepLab's atrous conversion). The
    stem contributes a stride of 4 with its max-pool and 2 without it, so the same
    output stride is honoured either way.
    """
    total_stride = 4 if stem_pool else 2
    dilation = 1
    plan = [(1, 1)]  # stage 1 never downsamples, as in the standard ResNet
    for _ in range(1, NUM_STAGES):
        if total_stride < output_stride:
            total_stride *= 2
            plan.append((2, dilation))
        else:
            dilation *= 2
            plan.append((1, dilation))
    return plan


class ResNetTrunk(nn.Module):
    """Dilated ResNet feature extractor: stem, then four stages of BasicBlocks.

    Args:
        depths: number of BasicBlocks in each of the four stages, e.g. ``(2, 2, 2, 2)``.
        base_width: channels of the stem and stage 1; stage ``i`` has
            ``base_width * 2**i``. 64 is the standard ResNet; 8 or 16 gives a model small
            enough to train on a CPU.
        output_stride: input size divided by the feature size, 8 or 16.
        stem_pool: whether the stem ends with a stride-2 max-pool.

    Attributes:
        out_channels: channels of the returned feature map (``8 * base_width``).
        output_stride: as given.

    Raises:
        ValueError: on a depth list that is not four positive integers, a non-positive
            width, or an output stride other than 8 or 16.
    """

    def __init__(
        self,
        depths: Sequence[int],
        *,
        base_width: int = 64,
        output_stride: int = 8,
        stem_pool: bool = True,
    ):
        super().__init__()
        _check_args(depths, base_width, output_stride)
        self.depths = tuple(depths)
        self.output_stride = output_stride
        self.out_channels = base_width * 2 ** (NUM_STAGES - 1)

        stem = [
            nn.Conv2d(3, base_width, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(base_width),
            nn.ReLU(inplace=True),
        ]
        if stem_pool:
            stem.append(nn.MaxPool2d(3, stride=2, padding=1))
        self.stem = nn.Sequential(*stem)

        in_channels = base_width
        plan = stage_strides_and_dilations(output_stride, stem_pool)
        for index, (depth, (stride, dilation)) in enumerate(zip(depths, plan)):
            width = base_width * 2**index
            blocks = [BasicBlock(in_channels, width, stride, dilation)]
            blocks += [BasicBlock(width, width, 1, dilation) for _ in range(depth - 1)]
            self.add_module(f"layer{index + 1}", nn.Sequential(*blocks))
            in_channels = width
        self._init_weights()

    def stage_names(self) -> tuple[str, ...]:
        """Names of the sequential parts in forward order: the stem, then the stages."""
        return ("stem",) + tuple(f"layer{i + 1}" for i in range(NUM_STAGES))

    def split(self, num_shared: int) -> tuple[nn.Sequential, nn.Sequential]:
        """Cut the trunk into its first ``num_shared`` parts and the rest.

        Used to build branched networks: the head part is shared by all tasks and the
        tail is one branch. The parts keep their names (``stem``, ``layer1``...), so
        parameter names stay readable; the modules are shared with this trunk, not copied.

        Raises:
            ValueError: if either side would be empty.
        """
        return split_stages(self, num_shared)

    def _init_weights(self) -> None:
        init_conv_and_norm(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.stage_names():
            x = getattr(self, name)(x)
        return x


def split_stages(trunk: nn.Module, num_shared: int) -> tuple[nn.Sequential, nn.Sequential]:
    """A trunk's first ``num_shared`` parts (``trunk.stage_names()``) and the rest, as two
    Sequentials keeping the parts' names and modules (shared, not copied).

    Raises:
        ValueError: if either side would be empty.
    """
    names = trunk.stage_names()
    if not 1 <= num_shared < len(names):
        raise ValueError(f"num_shared must be in [1, {len(names) - 1}], got {num_shared}")
    parts = [(name, getattr(trunk, name)) for name in names]
    return nn.Sequential(OrderedDict(parts[:num_shared])), nn.Sequential(OrderedDict(parts[num_shared:]))


def init_conv_and_norm(trunk: nn.Module) -> None:
    """Kaiming (fan_out) convolutions, which suit ReLU networks trained from scratch, and
    norms that start as the identity."""
    for module in trunk.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def _check_args(depths: Sequence[int], base_width: int, output_stride: int) -> None:
    if len(depths) != NUM_STAGES or any(int(d) != d or d < 1 for d in depths):
        raise ValueError(f"depths must be {NUM_STAGES} positive integers, got {tuple(depths)}")
    if int(base_width) != base_width or base_width < 1:
        raise ValueError(f"base_width must be a positive integer, got {base_width!r}")
    if output_stride not in VALID_OUTPUT_STRIDES:
        raise ValueError(
            f"output_stride must be one of {VALID_OUTPUT_STRIDES}, got {output_stride!r}"
        )
