"""Pruning methods: DiSparse and the baselines, all on one pipeline.

    scores -> all-reduce across ranks -> normalise per task -> vote -> exact sparsity
    -> masks -> cross-rank check

DiSparse scores every weight once per task and votes (a shared weight survives if any
of its users keeps it). The entangled baselines are the same pipeline with a single
pseudo-task ``joint`` that uses every weight, so the vote degenerates to a global top-k:
SNIP on the joint loss, random pruning, global magnitude pruning, and the lottery-ticket
rewind (magnitude masks of a trained model, applied to the initial weights, which the
trainer does by rebuilding the model from the run's seed).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from dsparse.models import parameter_users, prunable_parameters, unwrap_model
from dsparse.sparsity.masks import MaskSet
from dsparse.sparsity.saliency import JOINT, all_reduce_scores, compute_saliency, normalize_scores
from dsparse.sparsity.vote import solve_vote
from dsparse.tasks import Task
from dsparse.train.distributed import gather_objects

DATA_FREE = ("magnitude", "random")


@dataclass(frozen=True)
class Method:
    name: str
    disentangled: bool
    """Score per task and vote (DiSparse) or score the joint loss once (baselines)."""
    criterion: str | None
    """Fixed criterion of a baseline; None = chosen by the user (DiSparse)."""
    rewind: bool = False
    """Train from the initial weights after taking masks from a trained model."""
    needs_trained: bool = False
    grow: str | None = None
    """Dynamic methods only: how dropped weights regrow (votes | gradient | random)."""

    @property
    def dynamic(self) -> bool:
        return self.grow is not None


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"pruning method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


register_method(Method("disparse", disentangled=True, criterion=None))
register_method(Method("snip", disentangled=False, criterion="snip"))
register_method(Method("random", disentangled=False, criterion="random"))
register_method(Method("magnitude", disentangled=False, criterion="magnitude"))
register_method(Method("lottery", disentangled=False, criterion="magnitude", rewind=True, needs_trained=True))
# Dynamic sparse training (DESIGN.md section 4): ERK random start, then drop and regrow.
register_method(Method("disparse_dynamic", disentangled=True, criterion=None, grow="votes"))
register_method(Method("rigl", disentangled=False, criterion=None, grow="gradient"))
register_method(Method("set", disentangled=False, criterion=None, grow="random"))


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown pruning method {name!r}; known methods: {sorted(METHODS)}")
    return METHODS[name]


def default_criterion(method: Method, pretrained: bool) -> str:
    if method.criterion is not None:
        return method.criterion
    return "grad_w2" if pretrained else "snip"


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


def prune(model: torch.nn.Module, tasks: dict[str, Task], batches: Iterable[dict] | None, *, method: str,
          sparsity: float, criterion: str | None = None, num_batches: int = 50, scope: str = "global",
          keep_first_dense: bool = False, task_weights: dict[str, float] | None = None, seed: int = 0,
          pretrained: bool = False) -> MaskSet:
    """Masks for ``model`` at exactly ``sparsity``, identical on every rank.

    Args:
        model: the multitask model (plain or wrapped), with the weights to score.
        tasks: the run's tasks, in the run's order.
        batches: this rank's training batches (ignored by data-free criteria).
        method: a key of ``METHODS``.
        sparsity: fraction of prunable weights to prune, in (0, 1).
        criterion: DiSparse's per-task saliency; baselines fix their own.
        num_batches: batches to accumulate saliency over, per rank.
        scope: ``global`` or ``layerwise`` ranking.
        keep_first_dense: keep the stem convolution dense.
        task_weights: loss weights for the joint loss of the SNIP baseline.
        seed: seed of the random criterion.
        pretrained: the weights are trained (picks ``grad_w2`` as DiSparse's default).

    Raises:
        ValueError: unknown method/criterion, criterion given to a baseline, bad sparsity,
            too few batches.
    """
    spec = get_method(method)
    if spec.dynamic:
        raise ValueError(f"{method!r} is a dynamic method: its masks evolve during training. Use it in a run "
                         f"config (sparsity.method: {method}) with dsparse train, not dsparse prune")
    if criterion is not None and not spec.disentangled and criterion != spec.criterion:
        raise ValueError(f"method {method!r} always scores by {spec.criterion!r}; --criterion applies to disparse")
    criterion = criterion or default_criterion(spec, pretrained)
    scores = compute_saliency(model, tasks, batches if criterion not in DATA_FREE else iter(()),
                              criterion=criterion, num_batches=num_batches, joint=not spec.disentangled,
                              task_weights=task_weights, seed=seed)
    if criterion not in DATA_FREE:
        scores = all_reduce_scores(scores)
    scores = normalize_scores(scores)
    users = _vote_users(model, spec)
    dense = [first_conv(model)] if keep_first_dense else []
    result = solve_vote(scores, users, sparsity=sparsity, scope=scope, dense=dense)
    masks = MaskSet.from_vote(result, method=method, criterion=criterion, scope=scope, sparsity_requested=sparsity,
                              dense_layers=dense, num_batches=num_batches if criterion not in DATA_FREE else 0)
    verify_masks_agree(masks)
    return masks


def _vote_users(model: torch.nn.Module, spec: Method) -> dict[str, frozenset[str]]:
    weights = prunable_parameters(unwrap_model(model))
    if not spec.disentangled:
        return {name: frozenset({JOINT}) for name in weights}
    users = parameter_users(model)
    return {name: users[name] for name in weights}
