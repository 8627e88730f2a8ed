"""``train.threads``: the trainer's intra-op threads (the budget itself: ``test_cpus``)."""

from __future__ import annotations

import pytest
import torch

from dsparse import cpus
from dsparse.config import config_from_dict
from dsparse.distributed import trainer_threads


def test_auto_threads_come_from_the_cpu_budget_and_a_number_or_torch_win(monkeypatch):
    monkeypatch.setattr(cpus, "probe_busy_cores", lambda seconds=0.25: 1.0)
    monkeypatch.setattr(cpus, "_affinity", lambda: 2)
    monkeypatch.setattr(cpus, "cgroup_quota", lambda: None)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    threads, budget = trainer_threads("auto")
    assert threads == 1 and budget["busy"] == 1.0 and budget["affinity"] == 2  # one of two cores taken
    assert trainer_threads(None)[0] == 1, "null is auto"
    monkeypatch.setattr(cpus, "_affinity", lambda: 8)
    assert trainer_threads("auto", loader_workers=2) == (5, trainer_threads("auto", 2)[1])  # 8 - 1 busy - 2
    assert trainer_threads(3) == (3, None), "an explicit setting wins"
    assert trainer_threads("torch") == (torch.get_num_threads(), None), "torch's own setting"


def test_threads_setting_is_validated():
    with pytest.raises(ValueError, match="train.threads must be > 0"):
        config_from_dict({"train": {"threads": 0}})
    with pytest.raises(ValueError, match="train.threads must be a number of threads, auto or torch"):
        config_from_dict({"train": {"threads": "all"}})
    assert config_from_dict({}).train.threads == "auto"
    assert config_from_dict({"train": {"threads": "torch"}}).train.threads == "torch"
    assert config_from_dict({"train": {"threads": 2}}).train.threads == 2
