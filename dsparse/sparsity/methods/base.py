"""The pruning-method interface and its registry.

A method decides *which* weights a run keeps: once before training (static methods:
DiSparse, SNIP, random, magnitude, lottery) or again and again during it (dynamic
methods: DiSparse dynamic, RigL, SET). Every method is a class behind :class:`Method`,
registered by name with :func:`register_method`; the :class:`~dsparse.sparsity.sparsifier.Sparsifier`
only calls the interface, so a method's particulars (its criterion, whether it votes per
task, how it regrows) stay inside its class.

What a method *is* and may be given is stated once, as class attributes of
:class:`Method` (``dynamic``, ``takes_masks``, ``needs_pretrained``, ``criterion``,
``scores_reinitialised``); config validation, ``dsparse prune``, training and analysis all
read them, and :meth:`Method.check` words every refusal. This module imports no
implementer: ``dsparse.sparsity.methods`` (the package) registers the built-in ones.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch

from dsparse.distributed import gather_objects
from dsparse.models import prunable_parameters, unwrap_model
from dsparse.registry import Registry
from dsparse.sparsity.masks import MaskSet
from dsparse.tasks import Task

if TYPE_CHECKING:  # the config imports the methods to validate itself
    from dsparse.config import SparsityConfig

__all__ = ["METHODS", "MaskInputs", "Method", "first_conv", "get_method", "method_class", "register_method",
           "require_static", "verify_masks_agree"]


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
    input_size: tuple[int, int] = (64, 64)
    """The training crop (height, width): channel granularity traces the model's graph on
    it and counts FLOPs at it."""


class Method(abc.ABC):
    """How a run's masks are made and, for dynamic methods, changed during training."""

    name: ClassVar[str] = ""
    dynamic: ClassVar[bool] = False
    """The masks change during training (drop and regrow); else they are made once (static),
    and ``dsparse prune`` can make them ahead of training."""
    takes_masks: ClassVar[bool] = True
    """May start from given masks (``sparsity.masks``) or from trained weights
    (``sparsity.from_checkpoint``); dynamic methods draw their own starting masks."""
    needs_pretrained: ClassVar[bool] = False
    """Takes its masks from a trained model, so ``sparsity.from_checkpoint`` (or a mask
    file) is required (the lottery ticket)."""
    criterion: ClassVar[str | None] = None
    """The saliency criterion the method always scores by; None = the user's
    ``sparsity.criterion`` (DiSparse)."""
    scores_reinitialised: ClassVar[bool] = False
    """``sparsity.score_init: xavier`` (score a re-initialised copy) applies to it."""
    starts_from: ClassVar[str] = "scores of the model"
    """What the starting masks come from, for messages."""

    def check(self, settings: SparsityConfig) -> None:
        """Refuse settings this method cannot honour (before anything runs); config
        validation calls it, so every refusal is worded here once.

        Raises:
            ValueError: naming the setting and what to do instead.
        """
        if not self.takes_masks and (settings.masks or settings.from_checkpoint):
            raise ValueError(f"sparsity.method {self.name} starts from {self.starts_from}; it cannot take "
                             "sparsity.masks or sparsity.from_checkpoint (use a static method for those)")
        if self.needs_pretrained and settings.from_checkpoint is None and settings.masks is None:
            raise ValueError(f"method {self.name!r} takes its masks from a trained model: set "
                             "sparsity.from_checkpoint (or --from) to a finished dense run")
        if settings.score_init == "xavier" and not self.scores_reinitialised:
            refuse_score_init(self.name)
        if settings.granularity == "channel" and self.dynamic:
            raise ValueError(f"sparsity.method {self.name} prunes and regrows during training, and channel "
                             "granularity rebuilds the model smaller once; use a static method (disparse, snip, "
                             "magnitude, random, lottery) or element/block granularity")

    @abc.abstractmethod
    def initial_masks(self, model: torch.nn.Module, inputs: MaskInputs) -> MaskSet:
        """The masks training starts from; may load or rewind ``model``'s weights."""

    def attach(self, state) -> None:
        """Give ``state.model`` what the method trains besides its weights (AdapMTL: its
        thresholds); called by the Sparsifier's ``prepare`` on a new and a resumed run
        alike, after the masks are applied and before DeepSpeed wraps the model."""

    def param_groups(self) -> list[dict]:
        """Optimizer parameter groups (``torch.optim`` dicts with a ``name``) for the
        parameters ``attach`` added to the model; the model's other parameters form the
        first group."""
        return []

    def state_dict(self) -> dict:
        """What a resumed run needs besides the masks and the model's parameters."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()`` before ``prepare``."""

    @classmethod
    def plain_weights(cls, weights: dict[str, torch.Tensor], state: dict) -> dict[str, torch.Tensor]:
        """The state dict a plain model of the run's architecture computes the same with, from
        a checkpoint's model ``weights`` and the method's saved ``state`` (for evaluation,
        export and analysis); the weights themselves for every method that adds nothing."""
        return weights

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


def method_class(name: str) -> type[Method]:
    """The class registered as ``name`` (its capabilities are class attributes).

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    return METHODS.lookup(name)


def get_method(name: str) -> Method:
    """A new instance of the method registered as ``name``.

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    return method_class(name)()


def require_static(name: str) -> Method:
    """The method ``name`` for making masks ahead of training (``dsparse prune``).

    Raises:
        ValueError: an unknown or a dynamic method.
    """
    method = get_method(name)
    if method.dynamic:
        raise ValueError(f"{name!r} is a dynamic method: its masks evolve during training. Use it in a run "
                         f"config (sparsity.method: {name}) with dsparse train, not dsparse prune")
    return method


def refuse_score_init(name: str | None) -> None:
    """``score_init: xavier`` where it has no effect (a method that does not score the
    model's weights, or a run that only loads a mask file)."""
    applies = " or ".join(sorted(n for n, cls in METHODS.items() if cls.scores_reinitialised))
    raise ValueError(f"sparsity.score_init: xavier scores a re-initialised copy for {applies}; it has "
                     f"no effect with method {name!r} (use score_init: model)")


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
