"""Label conventions shared by the losses and the metrics.

The data loader encodes "this pixel has no label" inside the label value itself (see
``dsparse.data.codec``). Losses and metrics must agree on those rules exactly, or a model
would be trained on pixels it is never evaluated on (or the reverse), so the rules live
here once.
"""

from __future__ import annotations

from torch import Tensor

from dsparse.data.codec import IGNORE_INDEX


def seg_valid(target: Tensor) -> Tensor:
    """``[B, H, W]`` class indices -> bool ``[B, H, W]``; ``IGNORE_INDEX`` (255) is invalid."""
    return target != IGNORE_INDEX


def normal_valid(target: Tensor) -> Tensor:
    """``[B, 3, H, W]`` vectors -> bool ``[B, H, W]``; the all-zero vector is invalid."""
    return (target != 0).any(dim=1)


def depth_valid(target: Tensor) -> Tensor:
    """``[B, 1, H, W]`` metres -> bool, same shape; depth ``<= 0`` is invalid."""
    return target > 0


def heat_valid(target: Tensor) -> Tensor:
    """``[B, 1, H, W]`` keypoint/edge maps -> bool, same shape; negative is invalid."""
    return target >= 0


def check_shapes(
    task: str, pred: Tensor, target: Tensor, *, pred_channels: int, target_channels: int | None
) -> None:
    """Raise ``ValueError`` unless ``pred`` is ``[B, C, H, W]`` and ``target`` matches it.

    Checked explicitly because broadcasting would otherwise turn a ``[B, H, W]`` depth
    target against a ``[B, 1, H, W]`` prediction into a silent ``[B, B, H, W]`` error map.

    Args:
        task: task name, for the message.
        pred: the prediction.
        target: the label.
        pred_channels: expected ``C`` of the prediction.
        target_channels: expected channels of the target, or ``None`` when the target has
            no channel dimension (segmentation).
    """
    if pred.dim() != 4 or pred.shape[1] != pred_channels:
        raise ValueError(
            f"{task}: prediction must be [B, {pred_channels}, H, W], got {list(pred.shape)}"
        )
    channels = () if target_channels is None else (target_channels,)
    expected = (pred.shape[0], *channels, *pred.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(
            f"{task}: target must have shape {list(expected)} to match the prediction "
            f"{list(pred.shape)}, got {list(target.shape)} (predictions are expected at "
            "label resolution)"
        )
