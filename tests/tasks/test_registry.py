"""The task registry: names, construction errors and declared task attributes."""

import warnings

import pytest
import torch

from dsparse.tasks import TASKS, Task, build_task, build_tasks, register_task

KNOWN = ["depth", "edge", "keypoint", "normal", "seg"]


def test_registry_holds_the_five_tasks():
    assert sorted(TASKS) == KNOWN
    assert all(issubclass(cls, Task) and cls.name == name for name, cls in TASKS.items())


def test_unknown_name_lists_known_names():
    for build in (lambda: build_task("segmentation"), lambda: build_tasks(["depth", "dpeth"])):
        with pytest.raises(ValueError) as error:
            build()
        assert all(repr(name) in str(error.value) for name in KNOWN)


def test_empty_duplicate_and_string_names():
    with pytest.raises(ValueError, match="at least one task"):
        build_tasks([])
    with pytest.raises(ValueError, match=r"duplicate task names \['depth'\]"):
        build_tasks(["depth", "edge", "depth"])
    with pytest.raises(TypeError, match="list of task names"):
        build_tasks("depth")


def test_seg_requires_num_classes():
    with pytest.raises(ValueError, match="needs num_classes"):
        build_task("seg")
    with pytest.raises(ValueError, match="needs num_classes"):
        build_tasks(["depth", "seg"])


def test_seg_option_validation():
    with pytest.raises(ValueError, match="3 entries but num_classes is 2"):
        build_task("seg", num_classes=2, class_weights=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="finite and >= 0"):
        build_task("seg", num_classes=2, class_weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="num_classes must be in"):
        build_task("seg", num_classes=256)
    with pytest.raises(TypeError, match="must be an int"):
        build_task("seg", num_classes=2.0)


def test_build_tasks_keeps_order_and_channels():
    tasks = build_tasks(["normal", "seg", "edge", "depth", "keypoint"], num_classes=13)
    assert list(tasks) == ["normal", "seg", "edge", "depth", "keypoint"]
    channels = {name: task.num_channels for name, task in tasks.items()}
    assert channels == {"normal": 3, "seg": 13, "edge": 1, "depth": 1, "keypoint": 1}
    expected_keys = {"seg": "miou", "normal": "mean_angle", "depth": "abs_err"}
    for name, task in tasks.items():
        assert task.key_metric == expected_keys.get(name, "mae")
        assert task.key_metric in task.metric_lower_is_better


def test_class_weights_reach_seg_only():
    tasks = build_tasks(["seg", "depth"], num_classes=2, class_weights=torch.tensor([1.0, 2.0]))
    assert torch.equal(tasks["seg"].class_weights, torch.tensor([1.0, 2.0]))


def test_option_without_effect_warns():
    with pytest.warns(UserWarning, match="num_classes has no effect"):
        build_tasks(["depth", "edge"], num_classes=13)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_tasks(["depth", "seg"], num_classes=13)  # used by seg: no warning


def test_register_rejects_taken_name_and_bad_key_metric():
    with pytest.raises(ValueError, match="already registered"):
        register_task("seg")(type("Other", (Task,), {}))
    bad = type("Bad", (Task,), {"metric_lower_is_better": {"mae": True}, "key_metric": "mse"})
    with pytest.raises(ValueError, match="key_metric 'mse'"):
        register_task("bad-task")(bad)
    assert "bad-task" not in TASKS
