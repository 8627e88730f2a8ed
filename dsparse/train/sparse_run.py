"""The sparsity side of a training run: masks at start, enforcement, dynamic updates,
checkpointed masks, tracking and summary. Keeps the trainer loop free of sparsity details.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dsparse.config import RunConfig
from dsparse.models import parameter_users
from dsparse.sparsity.enforce import MaskEnforcer, count_pruned_nonzeros
from dsparse.sparsity.masks import MaskSet
from dsparse.sparsity.prune import get_method
from dsparse.train.distributed import barrier, is_main
from dsparse.train.dynamic import DynamicMasks, initial_dynamic_masks, schedule_of
from dsparse.train.sparsify import compute_run_masks

MASKS_FILE = "masks.pt"


class SparseRun:
    """Masks of one run. Static masks are saved once in the run directory; dynamic masks
    change, so every checkpoint carries its own copy and resume reads it from there."""

    def __init__(self, config: RunConfig, masks: MaskSet, enforcer: MaskEnforcer):
        self.config, self.masks, self.enforcer = config, masks, enforcer
        self.method = get_method(config.sparsity.method) if config.sparsity.method else None
        self.dynamic: DynamicMasks | None = None

    @classmethod
    def create(cls, config: RunConfig, model: torch.nn.Module, tasks, manifest, rank: int, world_size: int,
               run_dir: Path, checkpoint: Path | None) -> SparseRun | None:
        """Masks for a new run (pruned or ERK-random), or reloaded for a resumed one."""
        if not config.sparsity.enabled:
            return None
        method = get_method(config.sparsity.method) if config.sparsity.method else None
        if checkpoint is not None:  # weights come from the checkpoint; masks from beside them
            dynamic_file = checkpoint / MASKS_FILE
            masks = MaskSet.load(dynamic_file if dynamic_file.is_file() else run_dir / MASKS_FILE)
        elif method is not None and method.dynamic:
            masks = initial_dynamic_masks(config, model, method)
        else:
            masks = compute_run_masks(config, model, tasks, manifest, rank, world_size)
        if is_main() and not (method is not None and method.dynamic):
            masks.save(run_dir / MASKS_FILE)
        barrier()
        return cls(config, masks, MaskEnforcer(model, masks))

    def attach_engine(self, engine, tasks) -> None:
        if self.method is not None and self.method.dynamic:
            self.dynamic = DynamicMasks(engine, tasks, self.masks, self.enforcer, self.method,
                                        schedule_of(self.config), self.config.seed)

    def after_step(self, step: int, batch: dict) -> dict | None:
        """Dynamic mask update when due; returns its statistics for logging."""
        return self.dynamic.maybe_update(step, [batch]) if self.dynamic is not None else None

    def save_into(self, checkpoint_dir: Path) -> None:
        """Called by rank 0 while a checkpoint is written (dynamic masks only)."""
        if self.dynamic is not None:
            self.masks.save(checkpoint_dir / MASKS_FILE)

    def log_start(self, tracker, run_dir: Path, model) -> None:
        meta = self.masks.meta
        tracker.log_params({f"masks.{key}": meta.get(key) for key in  # as derived, beside the config
                            ("method", "criterion", "scope", "keep_ratio", "sparsity_achieved")})
        tracker.log_metrics({"sparsity/achieved": self.masks.sparsity, "sparsity/keep_ratio": meta["keep_ratio"]}, 0)
        table = run_dir / "mask_layers.txt"
        table.write_text(self.masks.format_table(parameter_users(model)) + "\n")
        tracker.log_artifact(table)

    def summary(self, model) -> dict:
        meta = self.masks.meta
        result = {"method": meta.get("method"), "criterion": meta.get("criterion"),
                  "requested": meta.get("sparsity_requested"), "achieved": self.masks.sparsity,
                  "keep_ratio": meta.get("keep_ratio"), "pruned_nonzeros": count_pruned_nonzeros(model, self.masks)}
        if self.dynamic is not None:
            result["num_updates"] = meta.get("num_updates", 0)
            result["layer_density"] = self.dynamic.layer_densities()
        return result
