"""Static pruning methods: DiSparse and the baselines, all on one pipeline.

    scores -> all-reduce across ranks -> normalise per task -> vote -> exact sparsity
    -> masks -> cross-rank check

DiSparse scores every weight once per task and votes (a shared weight survives if any
of its users keeps it). The entangled baselines are the same pipeline with a single
pseudo-task ``joint`` that uses every weight, so the vote degenerates to a global top-k:
SNIP on the joint loss, random pruning, global magnitude pruning, and the lottery-ticket
rewind (magnitude masks of a trained model, applied to the model's initial weights).
Each is a class registered in ``METHODS`` (``dsparse.sparsity.methods.base``).
"""

from __future__ import annotations

from collections.abc import Iterable
from copy import deepcopy as copy_module
from typing import ClassVar

import torch

from dsparse.models import parameter_users, prunable_parameters, unwrap_model
from dsparse.sparsity.block.geometry import BlockUnits, mask_units
from dsparse.sparsity.block.vote import row_floors, solve_block_vote
from dsparse.sparsity.channel.prune import channel_masks
from dsparse.sparsity.masks import MaskSet
from dsparse.sparsity.criteria import needs_data
from dsparse.sparsity.methods.base import MaskInputs, Method, first_conv, register_method, verify_masks_agree
from dsparse.sparsity.saliency import JOINT, all_reduce_scores, compute_saliency, normalize_scores
from dsparse.sparsity.vote import MIN_DENSITY, layer_floors, solve_vote
from dsparse.tasks import Task


class StaticMethod(Method):
    """Score, vote, prune once; the masks then stay fixed for the whole run."""

    disentangled: ClassVar[bool] = False
    """Score per task and vote (DiSparse) or score the joint loss once (baselines)."""

    def criterion_for(self, requested: str | None, pretrained: bool, pretrained_default: str = "grad_w2") -> str:
        """The criterion to score with: the baseline's own, else the request, else the
        setting's default (``pretrained_default`` for trained weights, ``snip`` at
        initialization)."""
        if self.criterion is not None:
            if requested is not None and requested != self.criterion:
                raise ValueError(f"method {self.name!r} always scores by {self.criterion!r}; "
                                 "--criterion applies to disparse")
            return self.criterion
        return requested or (pretrained_default if pretrained else "snip")

    def vote_users(self, model: torch.nn.Module) -> dict[str, frozenset[str]]:
        weights = prunable_parameters(unwrap_model(model))
        if not self.disentangled:
            return {name: frozenset({JOINT}) for name in weights}
        users = parameter_users(model)
        return {name: users[name] for name in weights}

    def masks(self, model: torch.nn.Module, tasks: dict[str, Task], batches: Iterable[dict] | None, *,
              sparsity: float, criterion: str | None = None, num_batches: int = 50, scope: str = "global",
              keep_first_dense: bool = False, task_weights: dict[str, float] | None = None, seed: int = 0,
              pretrained: bool = False, granularity: str = "element", block: int = 32, budget: str = "params",
              input_size: tuple[int, int] = (64, 64), channel_multiple: int = 8,
              min_density: float | None = None) -> MaskSet:
        """Masks for ``model`` at exactly ``sparsity``, identical on every rank (see ``prune``);
        ``budget``, ``input_size`` (the training crop) and ``channel_multiple`` serve channel
        granularity, ``min_density`` sets the floors (``layer_floors``, ``row_floors``, the channel
        groups' floor; None = ``MIN_DENSITY`` of the granularity)."""
        min_density = MIN_DENSITY.get(granularity, 0.0) if min_density is None else min_density
        criterion = self.criterion_for(criterion, pretrained)
        data = needs_data(criterion)
        weights = prunable_parameters(unwrap_model(model))
        scores = compute_saliency(model, tasks, batches if data else iter(()),
                                  criterion=criterion, num_batches=num_batches, joint=not self.disentangled,
                                  task_weights=task_weights, seed=seed)
        if data:
            scores = all_reduce_scores(scores)
        scores = normalize_scores(scores)
        meta = dict(method=self.name, criterion=criterion, scope=scope, sparsity_requested=sparsity,
                    num_batches=num_batches if data else 0)
        if granularity == "channel":  # the stem's output channels stay by construction
            masks = channel_masks(model, scores, sparsity=sparsity, budget=budget, scope=scope, input_size=input_size,
                                  multiple=channel_multiple, joint_task=None if self.disentangled else JOINT,
                                  min_fraction=min_density, meta={**meta, "dense_layers": [], "min_density": min_density})
            verify_masks_agree(masks)
            return masks
        units = mask_units(granularity, block, {fqn: tuple(w.shape) for fqn, w in weights.items()})
        dense = [first_conv(model)] if keep_first_dense else []
        meta = dict(meta, dense_layers=dense, **units.meta())
        if isinstance(units, BlockUnits):
            vote = solve_block_vote(scores, self.vote_users(model), units, sparsity=sparsity, scope=scope, dense=dense,
                                    floors=row_floors(units, min_density, dense))
            masks = MaskSet(vote.masks, {**meta, "keep_ratio": vote.result.keep_ratio, "num_kept": vote.num_kept,
                                         "num_total": vote.num_total, "sparsity_achieved": vote.sparsity,
                                         "min_density": min_density, "layers_at_floor": vote.result.held_by_floor},
                            vote.task_masks)
        else:
            floors = layer_floors({fqn: w.numel() for fqn, w in weights.items()}, min_density, dense)
            result = solve_vote(scores, self.vote_users(model), sparsity=sparsity, scope=scope, dense=dense,
                                floors=floors)
            masks = MaskSet.from_vote(result, **meta, min_density=min_density, layers_at_floor=result.held_by_floor)
        verify_masks_agree(masks)
        return masks

    def initial_masks(self, model: torch.nn.Module, inputs: MaskInputs) -> MaskSet:
        """Load the trained weights if pruning a trained model, then score and vote; the
        model keeps the weights it will train."""
        settings = inputs.settings
        if inputs.pretrained is not None:
            model.load_state_dict(inputs.pretrained())
        pretrained = inputs.pretrained is not None
        criterion = self.criterion_for(settings.criterion, pretrained, settings.pretrained_criterion)
        batches = None if not needs_data(criterion) or inputs.batches is None else inputs.batches()
        scored = xavier_copy(model, inputs.seed) if settings.score_init == "xavier" else model
        return self.masks(scored, inputs.tasks, batches, sparsity=settings.target, criterion=criterion,
                          num_batches=settings.num_batches, scope=settings.scope,
                          keep_first_dense=settings.first_conv_dense(dynamic=False),
                          task_weights=dict(inputs.task_weights),
                          seed=inputs.seed, pretrained=pretrained, granularity=settings.granularity,
                          block=settings.block, budget=settings.budget, input_size=inputs.input_size,
                          channel_multiple=settings.channel_multiple,
                          min_density=settings.floor_density())


def xavier_copy(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A copy of ``model`` with Xavier-normal Conv2d and Linear weights (biases, norms and
    buffers kept), drawn from ``seed`` so every rank scores the same network.

    The original DiSparse code scores static pruning on such a copy rather than on the
    weights it then trains; ``sparsity.score_init: xavier`` reproduces that.
    """
    copy = copy_module(model)
    with torch.random.fork_rng(devices=[]), torch.no_grad():  # the caller's random state is untouched
        torch.manual_seed(seed)
        for module in copy.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                values = torch.nn.init.xavier_normal_(torch.empty(module.weight.shape))  # on CPU: same on any device
                module.weight.copy_(values.to(module.weight.device, module.weight.dtype))
    return copy


@register_method("disparse")
class DiSparse(StaticMethod):
    """Per-task saliency and the unanimous vote (docs/design.md, "Disentangled saliency" and
    "The unanimous vote")."""

    disentangled = True
    scores_reinitialised = True


@register_method("snip")
class Snip(StaticMethod):
    """SNIP on the weighted joint loss."""

    criterion = "snip"
    scores_reinitialised = True


@register_method("random")
class RandomPruning(StaticMethod):
    """Uniformly random scores, global top-k."""

    criterion = "random"


@register_method("magnitude")
class Magnitude(StaticMethod):
    """One-shot global magnitude pruning (usually of trained weights)."""

    criterion = "magnitude"


@register_method("lottery")
class LotteryTicket(Magnitude):
    """Magnitude masks of a trained model, applied to the initial weights (the rewind)."""

    needs_pretrained = True

    def initial_masks(self, model: torch.nn.Module, inputs: MaskInputs) -> MaskSet:
        self.check(inputs.settings)
        initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
        masks = super().initial_masks(model, inputs)
        model.load_state_dict(initial)
        return masks
