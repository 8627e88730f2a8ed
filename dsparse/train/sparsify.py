"""A run's Sparsifier, from its config: shared by ``dsparse prune`` and ``dsparse train`` so
both derive exactly the same masks from the same config.

The sparsity package knows nothing of shards or checkpoints; this module hands it the
run's data (this rank's training stream, one epoch at most, opened only by methods that
score on data) and the trained weights of ``sparsity.from_checkpoint``.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import torch

from dsparse.config import RunConfig
from dsparse.data.loader import TrainBatches, stream_spec
from dsparse.data.manifest import load_manifest
from dsparse.distributed import init_distributed, is_main
from dsparse.io import check_output_file
from dsparse.sparsity.masks import MaskSet
from dsparse.sparsity.methods import MaskInputs, require_static
from dsparse.sparsity.sparsifier import Sparsifier, build_sparsifier, plain_weights, read_sparsifier_state
from dsparse.tasks import Task
from dsparse.runs import RunLayout, load_model_weights, resolve_checkpoint
from dsparse.runs.components import build_run_model, build_run_tasks

log = logging.getLogger("dsparse.prune")


def mask_inputs(config: RunConfig, tasks: dict[str, Task], manifest: dict, rank: int, world_size: int) -> MaskInputs:
    """What the run's method may read: tasks, settings, seed, data and pretrained weights."""

    def batches():
        spec = stream_spec(config.data, manifest, "train", config.tasks, seed=config.seed, rank=rank,
                           world_size=world_size, train=True)
        stream = TrainBatches(spec)  # one epoch at most: never score the same batch twice
        return itertools.islice(stream, stream.batches_per_epoch)

    source = config.sparsity.from_checkpoint
    def pretrained():
        checkpoint = resolve_checkpoint(source)
        return plain_weights(load_model_weights(checkpoint), read_sparsifier_state(checkpoint))


    crop = config.data.crop_size
    size = (crop, crop) if crop is not None else tuple(manifest.image_size)
    return MaskInputs(tasks=tasks, settings=config.sparsity, seed=config.seed, task_weights=dict(config.task_weights),
                      total_steps=config.train.iterations, batches=batches,
                      pretrained=None if source is None else pretrained, input_size=size)


def run_sparsifier(config: RunConfig, tasks: dict[str, Task], manifest: dict, rank: int, world_size: int,
                   run_dir: Path | None = None) -> Sparsifier:
    """The Sparsifier of ``config`` (the no-op one for a dense run)."""
    return build_sparsifier(config.sparsity, mask_inputs(config, tasks, manifest, rank, world_size),
                            masks_out=RunLayout(run_dir).masks if run_dir is not None else None)


def prune_run(config: RunConfig, out: str | Path, overwrite: bool = False) -> MaskSet:
    """Library entry point behind ``dsparse prune``: masks for a run config, saved to ``out``
    (an existing ``out`` is refused before any work unless ``overwrite``)."""
    check_output_file(out, overwrite)
    if not config.sparsity.enabled:
        raise ValueError("no pruning method given: pass --method (or set sparsity.method in the config)")
    if config.sparsity.method is not None:
        require_static(config.sparsity.method)
    rank, world_size, device = init_distributed()
    torch.manual_seed(config.seed)
    manifest = load_manifest(config.data.path)
    tasks = build_run_tasks(config, manifest)
    model = build_run_model(config, tasks).to(device)
    sparsifier = run_sparsifier(config, tasks, manifest, rank, world_size)
    sparsifier.prepare(model)
    masks = sparsifier.masks
    meta = masks.meta
    achieved = meta.get("budget_sparsity_achieved", masks.sparsity)  # channel masks: in the budget's unit
    log.info("pruned with %s (%s): requested sparsity %.4f, achieved %.4f%s, per-task keep ratio %.4f",
             meta.get("method"), meta.get("criterion"), config.sparsity.target, achieved,
             f" of the {meta['budget']}" if "budget" in meta else "", meta["keep_ratio"])
    if is_main():
        masks.save(out)
    return masks
