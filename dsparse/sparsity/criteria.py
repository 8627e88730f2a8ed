"""Saliency criteria: how one weight's score is measured from its value and its task's
gradient. Registered by name in :data:`CRITERIA`; ``compute_saliency`` looks them up.

Gradient criteria score ``(w, dL_t/dw)`` batch by batch (summed by the caller); data-free
criteria score the weights alone, once.
"""

from __future__ import annotations

import abc
from typing import ClassVar

import torch
from torch import Tensor

from dsparse.registry import Registry


class Criterion(abc.ABC):
    """How a weight's saliency is measured. Subclasses are registered by name in CRITERIA."""

    name: ClassVar[str] = ""
    needs_data: ClassVar[bool] = True


class GradientCriterion(Criterion):
    """A criterion accumulated from ``dL_t/dw`` over batches."""

    needs_data = True

    @abc.abstractmethod
    def batch_term(self, grad: Tensor, weight: Tensor) -> Tensor:
        """This batch's contribution to the running sum."""

    def finish(self, total: Tensor, weight: Tensor) -> Tensor:
        """Turn the sum over batches into the score (identity unless overridden)."""
        return total


class DataFreeCriterion(Criterion):
    """A criterion computed from the weights alone; it consumes no batches."""

    needs_data = False

    @abc.abstractmethod
    def scores(self, weights: dict[str, Tensor], seed: int) -> dict[str, Tensor]:
        """One float32 score tensor per weight, in the order of ``weights``."""


CRITERIA: Registry[type[Criterion]] = Registry("saliency criterion", "criteria")
register_criterion = CRITERIA.register
"""Class decorator adding a Criterion to CRITERIA under a name."""


def needs_data(name: str) -> bool:
    """Whether criterion ``name`` scores on batches (gradient criteria) or on the weights
    alone (data-free: magnitude, random), which then never open the data.

    Raises:
        ValueError: on an unknown name, listing the registered ones.
    """
    return CRITERIA.lookup(name).needs_data


def get_criterion(name: str) -> Criterion:
    """A fresh criterion object by name.

    Raises:
        ValueError: on an unknown name, listing the registered ones.
    """
    return CRITERIA.lookup(name)()


@register_criterion("snip")
class Snip(GradientCriterion):
    """``sum_batches |dL/dw * w|``: the gradient w.r.t. a multiplicative mask at 1 (pruning at init)."""

    def batch_term(self, grad: Tensor, weight: Tensor) -> Tensor:
        return (grad.float() * weight.float()).abs_()


@register_criterion("grad_w2")
class GradW2(GradientCriterion):
    """``(sum_batches |dL/dw|) * w^2``, the criterion DiSparse uses for pretrained models."""

    def batch_term(self, grad: Tensor, weight: Tensor) -> Tensor:
        return grad.float().abs()

    def finish(self, total: Tensor, weight: Tensor) -> Tensor:
        return total * weight.float().square()


@register_criterion("grad")
class Grad(GradientCriterion):
    """``sum_batches |dL/dw|``: the dense gradient magnitude that dynamic sparse training
    grows by (RigL; per task for DiSparse dynamic). Not meant for pruning at init."""

    def batch_term(self, grad: Tensor, weight: Tensor) -> Tensor:
        return grad.float().abs()


@register_criterion("magnitude")
class Magnitude(DataFreeCriterion):
    """``|w|``, the same for every task."""

    def scores(self, weights: dict[str, Tensor], seed: int) -> dict[str, Tensor]:
        return {fqn: w.detach().float().abs() for fqn, w in weights.items()}


@register_criterion("random")
class RandomScore(DataFreeCriterion):
    """Uniform [0, 1) scores, one per weight and shared by every task that uses it.

    Drawn on the CPU from a generator seeded with ``seed``, in FQN order, then moved to
    the weight's device: identical on every rank and device and independent of the
    global RNG state.
    """

    def scores(self, weights: dict[str, Tensor], seed: int) -> dict[str, Tensor]:
        generator = torch.Generator().manual_seed(seed)
        return {
            fqn: torch.rand(w.shape, generator=generator, dtype=torch.float32).to(w.device)
            for fqn, w in weights.items()
        }
