"""Sparsity: per-task saliency, the unanimous vote, masks, pruning methods and the
Sparsifier that owns a run's masks.

Applied to a model from outside (models stay pure); everything is keyed by parameter FQN.
"""

from dsparse.sparsity.appliers import ElementApplier, MaskApplier, count_pruned_nonzeros
from dsparse.sparsity.criteria import CRITERIA, register_criterion
from dsparse.sparsity.masks import MaskSet
from dsparse.sparsity.methods import (
    METHODS,
    DynamicMethod,
    MaskInputs,
    Method,
    StaticMethod,
    get_method,
    register_method,
    verify_masks_agree,
)
from dsparse.sparsity.prune import prune
from dsparse.sparsity.saliency import (
    JOINT,
    ScoreSet,
    all_reduce_scores,
    compute_saliency,
    normalize_scores,
    task_weight_users,
)
from dsparse.sparsity.sparsifier import MaskedSparsifier, Sparsifier, build_sparsifier
from dsparse.sparsity.vote import SCOPES, VoteResult, solve_vote

__all__ = [
    "CRITERIA",
    "DynamicMethod",
    "ElementApplier",
    "JOINT",
    "METHODS",
    "MaskApplier",
    "MaskInputs",
    "MaskSet",
    "MaskedSparsifier",
    "Method",
    "SCOPES",
    "ScoreSet",
    "Sparsifier",
    "StaticMethod",
    "VoteResult",
    "all_reduce_scores",
    "build_sparsifier",
    "compute_saliency",
    "count_pruned_nonzeros",
    "get_method",
    "normalize_scores",
    "prune",
    "register_criterion",
    "register_method",
    "solve_vote",
    "task_weight_users",
    "verify_masks_agree",
]
