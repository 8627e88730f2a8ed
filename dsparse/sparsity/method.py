"""The pruning-method interface and its registry.

A method decides *which* weights a run keeps: once before training (static methods:
DiSparse, SNIP, random, magnitude, lottery) or again and again during it (dynamic
methods: DiSparse dynamic, RigL, SET). Every method is a class behind :class:`Method`,
registered by name with :func:`register_method`; the :class:`~dsparse.sparsity.sparsifier.Sparsifier`
only calls the interface, so a method's particulars (its criterion, whether it votes per
task, how it regrows) stay inside its class.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from dsparse.config import SparsityConfig
from dsparse.distributed import gather_objects
from dsparse.models import prunable_parameters, unwrap_model
from dsparse.registry import Registry
from dsparse.sparsity.masks import MaskSet
from dsparse.tasks import Task

__all__ = ["METHODS", "MaskInputs", "Method", "first_conv", "get_method", "register_method", "verify_masks_agree"]


@dataclass
class MaskInputs:
    """What a method may read to make or update a run's masks."""

    tasks: dict[str, Task]
    settings: SparsityConfig
    seed: int = 0
    task_weights: dict[str, float] = field(default_factory=dict)
    """Loss weights of the joint loss (entangled baselines)."""
    total_steps: int = 1
    """Optimizer steps of the whole run (the dynamic schedule is a fraction of it)."""
    batches: Callable[[], Iterable[dict]] | None = None
    """This rank's training batches for scoring, opened only by methods that read data."""
    pretrained: Callable[[], dict[str, torch.Tensor]] | None = None
    """The trained weights to prune (``sparsity.from_checkpoint``), or None."""


class Method(abc.ABC):
    """How a run's masks are made and, for dynamic methods, changed during training."""

    name: ClassVar[str] = ""

    def check(self, settings: SparsityConfig) -> None:
        """Refuse settings this method cannot honour (before anything runs).

        Raises:
            ValueError: naming the setting and what to do instead.
        """

    @abc.abstractmethod
    def initial_masks(self, model: torch.nn.Module, inputs: MaskInputs) -> MaskSet:
        """The masks training starts from; may load or rewind ``model``'s weights."""

    def begin_step(self, step: int, batch: dict, state) -> None:
        """Called before the forward of the training step that ends at ``step``, with its batch."""

    def update(self, step: int, batches: list[dict], state) -> dict | None:
        """Change the masks after ``step`` finished optimizer steps, if this method and its
        schedule say so; returns statistics to log, or None. Static methods never change them.

        ``state`` is the :class:`~dsparse.sparsity.sparsifier.MaskState` of the run (model,
        masks, applier, optimizer state, inputs).
        """
        return None

    def summary(self, state) -> dict:
        """Method-specific entries of the run summary."""
        return {}


METHODS: Registry[type[Method]] = Registry("pruning method", "methods")
register_method = METHODS.register
"""Class decorator adding a Method to METHODS under a name."""


def get_method(name: str) -> Method:
    """A new instance of the method registered as ``name``.

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    _load_builtin_methods()
    return METHODS.lookup(name)()


def _load_builtin_methods() -> None:
    """Import the modules whose classes register the built-in methods."""
    import dsparse.sparsity.dynamic_methods  # noqa: F401
    import dsparse.sparsity.prune  # noqa: F401


def first_conv(model: torch.nn.Module) -> str:
    """FQN of the first prunable weight in module order (the stem convolution)."""
    return next(iter(prunable_parameters(unwrap_model(model))))


def verify_masks_agree(masks: MaskSet) -> None:
    """Fail loudly if any rank derived different masks (they must be identical)."""
    digests = gather_objects(masks.digest())
    if len(set(digests)) > 1:
        differing = [rank for rank, digest in enumerate(digests) if digest != digests[0]]
        raise RuntimeError(f"mask digests differ across ranks (ranks {differing} disagree with rank 0); "
                           "saliency must be all-reduced before the vote and every rank must use the same "
                           "model weights and dsparse version")
