"""Sparsity: per-task saliency, the unanimous vote, masks and pruning methods.

Applied to a model from outside (models stay pure); everything is keyed by parameter FQN.
"""

from dsparse.sparsity.criteria import CRITERIA, register_criterion
from dsparse.sparsity.saliency import (
    JOINT,
    ScoreSet,
    all_reduce_scores,
    compute_saliency,
    normalize_scores,
    task_weight_users,
)
from dsparse.sparsity.masks import MaskSet
from dsparse.sparsity.vote import SCOPES, VoteResult, solve_vote
from dsparse.sparsity.enforce import MaskEnforcer, count_pruned_nonzeros
from dsparse.sparsity.prune import METHODS, get_method, prune, verify_masks_agree

__all__ = [
    "CRITERIA",
    "JOINT",
    "METHODS",
    "MaskEnforcer",
    "MaskSet",
    "SCOPES",
    "ScoreSet",
    "VoteResult",
    "all_reduce_scores",
    "compute_saliency",
    "count_pruned_nonzeros",
    "get_method",
    "normalize_scores",
    "prune",
    "register_criterion",
    "solve_vote",
    "task_weight_users",
    "verify_masks_agree",
]
