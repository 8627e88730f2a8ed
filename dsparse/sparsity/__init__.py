"""Sparsity: per-task saliency, the unanimous vote, masks and pruning methods.

Applied to a model from outside (models stay pure); everything is keyed by parameter FQN.
"""

from dsparse.sparsity.saliency import (
    CRITERIA,
    JOINT,
    ScoreSet,
    all_reduce_scores,
    compute_saliency,
    normalize_scores,
    register_criterion,
    task_weight_users,
)
from dsparse.sparsity.masks import MaskSet
from dsparse.sparsity.vote import SCOPES, VoteResult, solve_vote

__all__ = [
    "CRITERIA",
    "JOINT",
    "MaskSet",
    "SCOPES",
    "ScoreSet",
    "VoteResult",
    "all_reduce_scores",
    "compute_saliency",
    "normalize_scores",
    "register_criterion",
    "solve_vote",
    "task_weight_users",
]
