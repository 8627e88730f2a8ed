"""Masks for a run, from its ``sparsity`` config section: shared by ``dsparse prune`` and
``dsparse train`` so both derive exactly the same masks from the same config.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import torch

from dsparse.config import RunConfig
from dsparse.data.loader import TrainBatches, stream_spec
from dsparse.data.shards import load_manifest
from dsparse.sparsity.masks import MaskSet
from dsparse.sparsity.prune import DATA_FREE, default_criterion, get_method, prune
from dsparse.tasks import Task
from dsparse.train.checkpoint import load_model_weights, resolve_checkpoint
from dsparse.train.components import build_run_model, build_run_tasks
from dsparse.train.distributed import init_distributed, is_main

log = logging.getLogger("dsparse.prune")


def compute_run_masks(config: RunConfig, model: torch.nn.Module, tasks: dict[str, Task], manifest: dict,
                      rank: int, world_size: int) -> MaskSet:
    """Score and vote per ``config.sparsity``; leaves ``model`` holding the weights to train.

    For ``from_checkpoint`` the trained weights are loaded first (and kept, except for the
    lottery rewind, which restores the initial weights after taking the masks).
    """
    sparsity = config.sparsity
    if sparsity.masks is not None:
        return MaskSet.load(sparsity.masks)
    method = get_method(sparsity.method)
    pretrained = sparsity.from_checkpoint is not None
    if method.needs_trained and not pretrained:
        raise ValueError(f"method {method.name!r} takes its masks from a trained model: set "
                         "sparsity.from_checkpoint (or --from) to a finished dense run")
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()} if method.rewind else None
    if pretrained:
        model.load_state_dict(load_model_weights(resolve_checkpoint(sparsity.from_checkpoint)))
    criterion = sparsity.criterion or default_criterion(method, pretrained)
    one_epoch = None  # data-free criteria read no data (and need no shard split)
    if criterion not in DATA_FREE:
        spec = stream_spec(config.data, manifest, "train", config.tasks, seed=config.seed, rank=rank,
                           world_size=world_size, train=True)
        batches = TrainBatches(spec)  # one epoch at most: never score the same batch twice
        one_epoch = itertools.islice(batches, batches.batches_per_epoch)
    masks = prune(model, tasks, one_epoch, method=method.name, sparsity=sparsity.target,
                  criterion=sparsity.criterion, num_batches=sparsity.num_batches, scope=sparsity.scope,
                  keep_first_dense=bool(sparsity.keep_first_dense), task_weights=dict(config.task_weights),
                  seed=config.seed, pretrained=pretrained)
    if initial is not None:
        model.load_state_dict(initial)
    log.info("pruned with %s (%s): requested sparsity %.4f, achieved %.4f, per-task keep ratio %.4f",
             method.name, masks.meta["criterion"], sparsity.target, masks.sparsity, masks.meta["keep_ratio"])
    return masks


def prune_run(config: RunConfig, out: str | Path) -> MaskSet:
    """Library entry point behind ``dsparse prune``: masks for a run config, saved to ``out``."""
    if not config.sparsity.enabled:
        raise ValueError("no pruning method given: pass --method (or set sparsity.method in the config)")
    rank, world_size, device = init_distributed()
    torch.manual_seed(config.seed)
    manifest = load_manifest(config.data.path)
    tasks = build_run_tasks(config, manifest)
    model = build_run_model(config, tasks).to(device)
    masks = compute_run_masks(config, model, tasks, manifest, rank, world_size)
    if is_main():
        masks.save(out)
    return masks
