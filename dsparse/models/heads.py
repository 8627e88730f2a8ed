"""ASPP-style task head, as in the DeepLab-v2 classifier used by the DiSparse code.

Several 3x3 convolutions with different dilations look at the same trunk features with
different fields of view; their predictions are *summed* (DeepLab-v2), not concatenated
and fused (DeepLab-v3), so every branch maps straight to the task's output channels and
each head stays small. The sum is then upsampled to the input size, so every task
predicts at full resolution whatever the trunk's output stride.

Dilations should fit the feature map: (6, 12, 18, 24) suits a 321x321 crop at stride 8
(a 41x41 map); for a 64x64 input at stride 8 the map is 8x8, where a dilation of 24 only
sees zero padding around the centre tap, so use something like (1, 2, 4, 8).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

DEEPLAB_V2_DILATIONS = (6, 12, 18, 24)


class ASPPHead(nn.Module):
    """Sum of parallel dilated-convolution branches, upsampled to the requested size.

    Args:
        in_channels: channels of the trunk features.
        num_channels: channels the task predicts (classes for segmentation, 3 for normals,
            1 for depth, keypoints and edges).
        dilations: one branch per dilation.
        hidden_channels: ``None`` makes each branch a single dilated 3x3 convolution to
            ``num_channels``. An integer inserts a hidden layer per branch: dilated 3x3 to
            ``hidden_channels``, ReLU, then 1x1 to ``num_channels`` (DeepLab-v2's
            fc6/fc7/fc8 stack, shortened to one hidden layer and without dropout).

    Raises:
        ValueError: on non-positive channel counts or an empty or non-positive dilation
            list.
    """

    def __init__(
        self,
        in_channels: int,
        num_channels: int,
        dilations: Sequence[int] = DEEPLAB_V2_DILATIONS,
        hidden_channels: int | None = None,
    ):
        super().__init__()
        _check_positive("in_channels", in_channels)
        _check_positive("num_channels", num_channels)
        if hidden_channels is not None:
            _check_positive("hidden_channels", hidden_channels)
        dilations = tuple(dilations)
        if not dilations or any(int(d) != d or d < 1 for d in dilations):
            raise ValueError(f"dilations must be a non-empty list of positive integers, got {dilations}")
        self.num_channels = num_channels
        self.dilations = dilations
        self.branches = nn.ModuleList(
            self._branch(in_channels, num_channels, d, hidden_channels) for d in dilations
        )

    @staticmethod
    def _branch(in_channels: int, num_channels: int, dilation: int, hidden: int | None) -> nn.Module:
        def dilated(out_channels: int) -> nn.Conv2d:
            return nn.Conv2d(in_channels, out_channels, 3, padding=dilation, dilation=dilation)

        if hidden is None:
            predict = dilated(num_channels)
            layers = [predict]
        else:
            predict = nn.Conv2d(hidden, num_channels, 1)
            hidden_conv = dilated(hidden)
            nn.init.kaiming_normal_(hidden_conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(hidden_conv.bias)
            layers = [hidden_conv, nn.ReLU(inplace=True), predict]
        # Small predictions at initialisation (DeepLab-v2 uses std 0.01): the summed
        # branches start near zero, so no task's initial loss is inflated by the head.
        nn.init.normal_(predict.weight, std=0.01)
        nn.init.zeros_(predict.bias)
        return nn.Sequential(*layers)

    def forward(self, features: torch.Tensor, output_size: Sequence[int] | None = None) -> torch.Tensor:
        """Predict from trunk features.

        Args:
            features: [B, in_channels, h, w] trunk output.
            output_size: (H, W) to upsample to (bilinear, ``align_corners=False``);
                ``None`` returns the prediction at feature resolution.

        Returns:
            [B, num_channels, H, W] raw predictions (logits for segmentation).
        """
        out = self.branches[0](features)
        for branch in self.branches[1:]:
            out = out + branch(features)
        if output_size is None:
            return out
        return F.interpolate(out, size=tuple(output_size), mode="bilinear", align_corners=False)


def _check_positive(name: str, value: int) -> None:
    if int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
