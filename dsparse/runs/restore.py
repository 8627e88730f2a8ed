"""Restoring a trained run as a plain model: the one copy of "build the model, give it the
layers its weights were saved from, load the weights" that evaluation, export and
analysis use (training restores through DeepSpeed instead, see ``dsparse.train``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dsparse.config import RunConfig
from dsparse.data.manifest import Manifest, load_manifest
from dsparse.runs.checkpoints import load_model_weights, resolve_checkpoint, run_config_of
from dsparse.sparsity.block.layers import BlockSparseLayer
from dsparse.sparsity.masks import MaskSet
from dsparse.sparsity.sparsifier import checkpoint_masks, plain_weights, read_sparsifier_state, swap_sparse_layers
from dsparse.tasks import Task
from dsparse.runs.components import build_run_model, build_run_tasks

__all__ = ["RestoredRun", "masks_of", "restore_run"]


@dataclass
class RestoredRun:
    """A run's checkpoint as objects.

    Attributes:
        checkpoint: the ``step-*`` directory the weights came from.
        config: the run's resolved config (``data.path`` replaced when asked).
        manifest: the dataset the tasks were built against.
        tasks: the run's tasks, in its order.
        model: the network with the checkpoint's weights, on the CPU, block-sparse layers
            where the run had block masks.
        masks: the checkpoint's masks (None for a dense run).
        sparse_layers: FQN -> the block-sparse layer in its place ({} unless block masks).
    """

    checkpoint: Path
    config: RunConfig
    manifest: Manifest
    tasks: dict[str, Task]
    model: torch.nn.Module
    masks: MaskSet | None
    sparse_layers: dict[str, BlockSparseLayer]


def restore_run(checkpoint: str | Path, *, data_path: str | Path | None = None) -> RestoredRun:
    """The model of a run directory, its checkpoints directory or one ``step-*`` directory.

    Args:
        checkpoint: where the run is (its newest intact checkpoint is taken).
        data_path: build the tasks against this dataset instead of the run's own.

    Raises:
        ValueError: no (intact) checkpoint, no config, an unreadable manifest, or a
            checkpoint file that is damaged or holds anything but tensors and plain values.
    """
    path = resolve_checkpoint(checkpoint)
    config = run_config_of(path)
    if data_path is not None:
        config.data.path = str(data_path)
    manifest = load_manifest(config.data.path)
    tasks = build_run_tasks(config, manifest)
    state = read_sparsifier_state(path)
    masks = checkpoint_masks(state)
    model = build_run_model(config, tasks)
    layers = swap_sparse_layers(model, masks)  # block runs store only their kept blocks
    model.load_state_dict(plain_weights(load_model_weights(path), state))  # AdapMTL: thresholds folded in
    return RestoredRun(path, config, manifest, tasks, model, masks, layers)


def masks_of(checkpoint: str | Path) -> MaskSet | None:
    """The masks saved in one ``step-*`` checkpoint directory (None for a dense run's)."""
    return checkpoint_masks(read_sparsifier_state(Path(checkpoint)))
