"""Trainer threads share the cores with the data loader workers (``train.threads``)."""

from __future__ import annotations

import os

import pytest
import torch

from dsparse.config import config_from_dict
from dsparse.distributed import trainer_threads


def test_threads_are_the_cores_left_after_the_loader_workers(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert trainer_threads("auto", 2) == 6
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two training processes on the node: 4 cores each
    assert trainer_threads("auto", 2) == 2
    assert trainer_threads("auto", 7) == 1, "never fewer than one thread"
    assert trainer_threads(3, 2) == 3, "an explicit setting wins"
    assert trainer_threads(None, 2) == torch.get_num_threads(), "unset: torch's own setting"


def test_threads_setting_is_validated():
    with pytest.raises(ValueError, match="train.threads must be > 0"):
        config_from_dict({"train": {"threads": 0}})
    with pytest.raises(ValueError, match="train.threads must be a number of threads, auto or null"):
        config_from_dict({"train": {"threads": "all"}})
    assert config_from_dict({"train": {"threads": "auto"}}).train.threads == "auto"
    assert config_from_dict({"train": {"threads": 2}}).train.threads == 2
