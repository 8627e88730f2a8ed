"""Keeping pruned weights at exactly zero through training (DESIGN.md section 5).

The mechanism is a gradient hook on every masked weight that multiplies the gradient by
the mask *before* it is accumulated. DeepSpeed reads gradients after accumulation (into
its flat, partitioned ZeRO-1/2 buffers), so it only ever sees masked gradients. With a
zero weight and a zero gradient, every optimizer dsparse builds leaves the weight at zero:
Adam's moments stay zero (so its update is 0 / (0 + eps) = 0), L2 weight decay adds
``wd * 0``, AdamW's decoupled decay multiplies 0, SGD momentum stays 0. The fp32 master
copy of ZeRO therefore stays zero too, and no post-step copy into DeepSpeed's private
buffers is needed. ``tests/sparsity/test_enforce.py`` proves it for ZeRO 0, 1 and 2.
"""

from __future__ import annotations

import contextlib

import torch

from dsparse.models import prunable_parameters, unwrap_model
from dsparse.sparsity.masks import MaskSet


class MaskEnforcer:
    """Zeroes pruned weights once and masks their gradients from then on.

    Attach to the plain model *before* wrapping it in DeepSpeed, or to ``engine.module``.
    """

    def __init__(self, model: torch.nn.Module, masks: MaskSet):
        self.masks = masks
        model = unwrap_model(model)
        masks.check_matches(model)
        masks.apply_(model)
        self._handles = []
        self._keep: dict[str, torch.Tensor] = {}
        self._enabled = True
        weights = prunable_parameters(model)
        for name, mask in masks.masks.items():
            keep = self._keep[name] = mask.to(device=weights[name].device, dtype=weights[name].dtype)
            self._handles.append(weights[name].register_hook(lambda grad, keep=keep: self._mask(grad, keep)))

    def _mask(self, grad: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        # keep was made in the weight's dtype at attach time; DeepSpeed may cast weights
        # (bf16) afterwards, and a hook must not change the gradient's dtype
        return grad * keep.to(grad.dtype) if self._enabled else grad

    @contextlib.contextmanager
    def dense_gradients(self):
        """Let unmasked gradients through (growth scores need the dense gradient)."""
        self._enabled = False
        try:
            yield
        finally:
            self._enabled = True

    def refresh(self) -> None:
        """Pick up masks changed in place in ``self.masks`` (dynamic sparsity): no new hooks."""
        for name, mask in self.masks.masks.items():
            self._keep[name].copy_(mask)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def count_pruned_nonzeros(model: torch.nn.Module, masks: MaskSet) -> int:
    """Number of pruned positions whose weight is not exactly zero (0 when masks hold)."""
    weights = prunable_parameters(unwrap_model(model))
    return sum(int(torch.count_nonzero(weights[name].detach()[~mask.to(weights[name].device)]))
               for name, mask in masks.masks.items())
