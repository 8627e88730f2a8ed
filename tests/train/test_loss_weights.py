"""Adaptive task weighting (AdapMTL's rule) against a hand-computed window, its state in
checkpoints, config refusals, and a resumed run that equals an uninterrupted one."""

import pytest
import torch

from dsparse.config import config_from_dict, load_config
from dsparse.runs import latest_checkpoint, load_model_weights
from dsparse.train.loss_weights import AdaptiveLossWeights, FixedLossWeights, build_loss_weights

LOSSES = [{"a": 4.0, "b": 2.0}, {"a": 2.0, "b": 1.5}, {"a": 1.0, "b": 1.0}, {"a": 0.8, "b": 0.5}]


def test_adaptive_weights_follow_the_hand_computed_window():
    weights = AdaptiveLossWeights({"a": 1.0, "b": 3.0}, start=3, window=2)
    seen = []
    for step, losses in enumerate(LOSSES, start=1):
        seen.append(weights.weights(step))
        weights.observe(step, losses)
    # steps 1-2: before start -> the fixed weights; step 3: window {r(2)}; step 4: window {r(2), r(3)}
    assert seen[0] == seen[1] == {"a": 1.0, "b": 3.0}
    r2 = {"a": abs(4.0 - 2.0) / 2.0, "b": abs(2.0 - 1.5) / 1.5}  # 1.0, 1/3
    r3 = {"a": abs(2.0 - 1.0) / 1.0, "b": abs(1.5 - 1.0) / 1.0}  # 1.0, 0.5
    total = r2["a"] + r2["b"]
    assert seen[2] == pytest.approx({"a": 2 * r2["a"] / total, "b": 2 * r2["b"] / total})
    mean = {t: (r2[t] + r3[t]) / 2 for t in "ab"}
    assert seen[3] == pytest.approx({t: 2 * mean[t] / sum(mean.values()) for t in "ab"})
    assert sum(seen[3].values()) == pytest.approx(2.0)
    # the window drops the oldest change: step 5 sees r(3) and r(4) only
    r4 = {"a": abs(1.0 - 0.8) / 0.8, "b": abs(1.0 - 0.5) / 0.5}
    mean = {t: (r3[t] + r4[t]) / 2 for t in "ab"}
    assert weights.weights(5) == pytest.approx({t: 2 * mean[t] / sum(mean.values()) for t in "ab"})


def test_flat_losses_keep_the_fixed_weights():
    weights = AdaptiveLossWeights({"a": 1.0, "b": 1.0}, start=1, window=3)
    for step in range(1, 5):
        weights.observe(step, {"a": 1.0, "b": 2.0})
    assert weights.weights(5) == {"a": 1.0, "b": 1.0}


def test_the_state_continues_exactly():
    straight = AdaptiveLossWeights({"a": 1.0, "b": 1.0}, start=2, window=2)
    first = AdaptiveLossWeights({"a": 1.0, "b": 1.0}, start=2, window=2)
    for step, losses in enumerate(LOSSES[:2], start=1):
        straight.observe(step, losses)
        first.observe(step, losses)
    resumed = AdaptiveLossWeights({"a": 1.0, "b": 1.0}, start=2, window=2)
    resumed.load_state_dict(first.state_dict())
    for step, losses in enumerate(LOSSES[2:], start=3):
        assert resumed.weights(step) == straight.weights(step)
        straight.observe(step, losses)
        resumed.observe(step, losses)
    with pytest.raises(ValueError, match="no adaptive loss-weighting state"):
        AdaptiveLossWeights({"a": 1.0}, 1, 1).load_state_dict(None)
    with pytest.raises(ValueError, match="train.loss_weighting: fixed; resume with the settings"):
        FixedLossWeights({"a": 1.0}).load_state_dict(first.state_dict())


def test_config_builds_each_weighting_and_refuses_settings_without_effect():
    fixed = build_loss_weights(load_config("synthetic_tiny", ["task_weights.seg=2"]))
    assert isinstance(fixed, FixedLossWeights) and fixed.weights(1)["seg"] == 2.0
    adaptive = build_loss_weights(load_config("synthetic_tiny", ["train.loss_weighting=adaptive",
                                                                 "train.adaptive_start=10"]))
    assert isinstance(adaptive, AdaptiveLossWeights) and adaptive.start == 10
    with pytest.raises(ValueError, match="starts at step 5000 .* has 300 iterations, so it would never adapt"):
        load_config("synthetic_tiny", ["train.loss_weighting=adaptive", "train.iterations=300"])
    with pytest.raises(ValueError, match="set adaptive loss weighting; add train.loss_weighting=adaptive"):
        load_config("synthetic_tiny", ["train.adaptive_window=50"])


@pytest.mark.e2e
def test_an_adaptive_run_resumed_after_a_stop_equals_the_uninterrupted_run(tiny_dataset, tmp_path):
    from mlflow.tracking import MlflowClient

    from dsparse.train.trainer import train

    def config(run_dir):
        return config_from_dict({
            "tasks": ["seg", "depth", "edge"], "output_dir": str(run_dir),
            "data": {"path": str(tiny_dataset), "batch_size": 4, "num_workers": 0, "crop_size": 24},
            "model": {"arch": "resnet18", "base_width": 4, "head_dilations": [1, 2]},
            "schedule": {"name": "constant"},
            "train": {"iterations": 10, "eval_interval": 10, "log_interval": 1, "checkpoint_interval": 3,
                      "loss_weighting": "adaptive", "adaptive_start": 4, "adaptive_window": 3},
            "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "tests"}})

    summary = train(config(tmp_path / "straight"))
    stopped = config(tmp_path / "resumed")
    train(stopped, stop_after=5)
    train(stopped, resume=True)
    a = load_model_weights(latest_checkpoint(tmp_path / "straight" / "checkpoints"))
    b = load_model_weights(latest_checkpoint(tmp_path / "resumed" / "checkpoints"))
    assert all(torch.equal(a[name], b[name]) for name in a)
    history = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_metric_history(summary["mlflow_run_id"],
                                                                                      "train/task_weight/seg")
    weights = {m.step: m.value for m in history}
    assert weights[1] == weights[3] == 1.0 and weights[4] != 1.0
