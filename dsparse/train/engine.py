"""The DeepSpeed engine of a run: its config (modelled keys, then a JSON file, then raw
keys), the engine around a model with a torch optimizer and scheduler, and the schedule
re-applied after a resume.

The optimizer and scheduler are plain ``torch.optim`` objects (``dsparse.train.optim``):
DeepSpeed's fused optimizers need CUDA, and this way the same code runs on CPU and GPU.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from dsparse.config import RunConfig
from dsparse.train.optim import build_optimizer, build_scheduler, lr_factor

__all__ = ["BATCH_KEYS", "apply_schedule", "build_engine", "deepspeed_config", "input_dtype"]

BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
"""DeepSpeed keys dsparse derives from ``data.batch_size`` and the world size."""


def deepspeed_config(config: RunConfig, device: torch.device) -> dict:
    """The DeepSpeed config dict: modelled keys, then ``config_file``, then ``extra``.

    Raises:
        ValueError: an unreadable config file, batch-size keys in it, ZeRO stage 3, or
            bf16 without a GPU.
    """
    ds = config.deepspeed
    result = {
        "train_micro_batch_size_per_gpu": config.data.batch_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": ds.zero_stage},
        # The optimizer is a torch.optim one (DeepSpeed's fused optimizers need CUDA).
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "gradient_clipping": ds.gradient_clipping,
        "bf16": {"enabled": ds.bf16},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if ds.config_file is not None:
        result.update(_read_deepspeed_file(Path(ds.config_file)))
    result.update(ds.extra)
    stage = result.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise ValueError(f"DeepSpeed ZeRO stage {stage} is not supported (masks need whole weights); use 0, 1 or 2")
    if result.get("bf16", {}).get("enabled") and device.type != "cuda":
        raise ValueError("deepspeed.bf16: true needs a CUDA GPU; set it to false on CPU "
                         "(or use a DeepSpeed config file without bf16)")
    return result


def _read_deepspeed_file(path: Path) -> dict:
    try:
        values = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"deepspeed.config_file {path} is not a readable JSON file: {error}") from error
    if not isinstance(values, dict):
        raise ValueError(f"deepspeed.config_file {path} must hold a JSON object")
    owned = sorted(set(values) & set(BATCH_KEYS))
    if owned:
        raise ValueError(f"deepspeed.config_file {path} sets {owned}; dsparse derives the batch size from "
                         "data.batch_size and the world size, so remove them from the file")
    return values


def build_engine(config: RunConfig, model: torch.nn.Module, device: torch.device, groups: list[dict] = ()):
    """``deepspeed.initialize`` of ``model`` with the run's optimizer, schedule and config
    (the process group must exist: ``dsparse.distributed.init_distributed``); ``groups``
    are extra optimizer parameter groups (``Sparsifier.param_groups``)."""
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    optimizer = build_optimizer(model.parameters(), config.optimizer, groups)
    scheduler = build_scheduler(optimizer, config.schedule, config.train.iterations)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(config, device))
    return engine


def input_dtype(engine) -> torch.dtype:
    """The dtype images go in as: bf16 when the engine runs bf16 (also set by a config file)."""
    return torch.bfloat16 if engine.bfloat16_enabled() else torch.float32


def apply_schedule(engine, config: RunConfig) -> None:
    """Make the restored optimizer follow this config's learning rate and schedule.

    A checkpoint restores the scheduler's base learning rate; a resume that changes
    ``optimizer.lr`` (allowed, see ``rundir.RESUME_SAFE``) must take effect from the next step.
    """
    scheduler = engine.lr_scheduler
    scheduler.base_lrs = [config.optimizer.lr for _ in scheduler.base_lrs]
    factor = lr_factor(scheduler.last_epoch, config.schedule, config.train.iterations)
    for group in scheduler.optimizer.param_groups:
        group["initial_lr"] = config.optimizer.lr
        group["lr"] = config.optimizer.lr * factor
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
