"""Optimizer and learning-rate schedule from the run config.

Plain ``torch.optim`` objects handed to DeepSpeed as client optimizer and scheduler, so the
same code runs on CPU (where DeepSpeed's fused optimizers do not exist) and GPU, and their
state is saved in DeepSpeed checkpoints.
"""

from __future__ import annotations

import math

import torch

from dsparse.config import OptimizerConfig, ScheduleConfig


def build_optimizer(parameters, config: OptimizerConfig, groups: list[dict] = ()) -> torch.optim.Optimizer:
    """The run's optimizer over ``parameters``: one group with the config's settings, then
    ``groups`` (dicts of ``params`` and the settings they override, e.g. AdapMTL's
    thresholds with their own weight decay); a parameter in ``groups`` leaves the first."""
    grouped = {id(p) for group in groups for p in group["params"]}
    params = [{"params": [p for p in parameters if p.requires_grad and id(p) not in grouped]}, *groups]
    if config.name == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.name == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def lr_factor(step: int, config: ScheduleConfig, total_steps: int) -> float:
    """Multiplier of the base learning rate before optimizer step ``step`` (0-based)."""
    if config.warmup and step < config.warmup:
        return (step + 1) / config.warmup
    if config.name == "step":
        return config.gamma ** (step // config.step_size)
    if config.name == "cosine":
        progress = min(1.0, (step - config.warmup) / max(1, total_steps - config.warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def build_scheduler(optimizer, config: ScheduleConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config, total_steps))
