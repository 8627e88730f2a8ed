"""Run configs: presets load, overrides apply, bad input is a clear error."""

import json
from pathlib import Path

import pytest
import torch

from dsparse.config import config_from_dict, load_config, preset_names
from dsparse.train.engine import deepspeed_config


@pytest.mark.parametrize("name", ["synthetic_tiny", "nyuv2", "cityscapes", "taskonomy"])
def test_presets_load(name):
    config = load_config(name)
    assert config.tasks and config.train.iterations > 0


def test_presets_carry_the_original_task_weights_and_schedules():
    nyu, city, taskonomy = load_config("nyuv2"), load_config("cityscapes"), load_config("taskonomy")
    assert nyu.task_weights == {"seg": 1.0, "normal": 20.0} and nyu.data.crop_size == 321
    assert (nyu.train.iterations, nyu.optimizer.lr, nyu.schedule.step_size, nyu.schedule.gamma) == (20000, 1e-3, 4000, 0.5)
    assert city.task_weights == {"seg": 1.0, "depth": 20.0} and city.optimizer.lr == 1e-4
    assert taskonomy.task_weights == {"seg": 1.0, "normal": 3.0, "depth": 2.0, "keypoint": 7.0, "edge": 7.0}
    assert (taskonomy.train.iterations, taskonomy.schedule.step_size, taskonomy.schedule.gamma) == (100000, 12000, 0.3)


def test_overrides_are_parsed_as_yaml():
    config = load_config("synthetic_tiny", ["train.iterations=7", "optimizer.lr=1e-4", "tasks=[seg, depth]",
                                            "task_weights={seg: 1, depth: 20}"])
    assert config.train.iterations == 7 and config.optimizer.lr == 1e-4
    assert config.tasks == ["seg", "depth"] and config.weight_of("depth") == 20.0


@pytest.mark.parametrize("raw, message", [
    ({"trian": {}}, r"unknown config key\(s\) \['trian'\]; known keys: \["),
    ({"train": {"iterations": 0}}, "train.iterations must be > 0"),
    ({"train": {"iterations": "many"}}, "train.iterations must be of type int"),
    ({"data": {"batch_sise": 3}}, r"unknown config key\(s\) \['batch_sise'\] in section 'data'"),
    ({"tasks": []}, "at least one task"),
    ({"tasks": ["seg", "depth"], "model": {"branches": [["seg"], ["seg", "edge"]]}},
     r"model.branches must split tasks \['seg', 'depth'\] into groups: \['seg'\] are in two groups; "
     r"\['edge'\] are not in tasks; \['depth'\] are in no group"),
    ({"model": {"branch_from": "layer9"}}, "model.branch_from must be one of layer1, layer2, layer3, layer4"),
    ({"tasks": ["seg", "seg"]}, "lists a task twice"),
    ({"tasks": ["seg", "albedo"]}, r"unknown task\(s\) \['albedo'\]; known tasks: \['depth', 'edge'"),
    ({"tasks": ["seg"], "task_weights": {"sge": 2}}, r"unknown task\(s\) \['sge'\]"),
    ({"deepspeed": {"zero_stage": 3}}, "zero_stage must be one of 0, 1, 2"),
    ({"optimizer": {"name": "lamb"}}, "optimizer.name must be one of"),
    ({"data": {"resampled": True}}, "needs data.epoch_length"),
])
def test_config_errors_name_the_key(raw, message):
    with pytest.raises(ValueError, match=message):
        config_from_dict(raw)


def test_weights_of_tasks_not_in_the_run_warn():
    with pytest.warns(UserWarning, match=r"task_weights for \['depth'\] have no effect"):
        config = config_from_dict({"tasks": ["seg"], "task_weights": {"depth": 2}})
    assert config.weight_of("seg") == 1.0


def test_missing_config_lists_presets():
    with pytest.raises(ValueError, match="neither a file nor a preset") as error:
        load_config("no/such/file.yaml")
    for name in preset_names():
        assert name in str(error.value)


def test_bf16_on_cpu_is_refused():
    config = config_from_dict({"deepspeed": {"bf16": True}})
    with pytest.raises(ValueError, match="bf16: true needs a CUDA GPU"):
        deepspeed_config(config, torch.device("cpu"))


def test_deepspeed_config_file_is_merged_between_modelled_keys_and_extra(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_comm": True}, "gradient_clipping": 1.0}))
    config = config_from_dict({"data": {"batch_size": 7},
                               "deepspeed": {"config_file": str(path), "extra": {"gradient_clipping": 0.5}}})
    ds = deepspeed_config(config, torch.device("cpu"))
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert ds["gradient_clipping"] == 0.5 and ds["train_micro_batch_size_per_gpu"] == 7


@pytest.mark.parametrize("content, message", [
    ({"train_batch_size": 64}, "derives the batch size"),
    ({"zero_optimization": {"stage": 3}}, "ZeRO stage 3 is not supported"),
    ({"bf16": {"enabled": True}}, "needs a CUDA GPU"),
    ("not json", "not a readable JSON file"),
])
def test_bad_deepspeed_config_files_are_refused(tmp_path, content, message):
    path = tmp_path / "ds.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    config = config_from_dict({"deepspeed": {"config_file": str(path)}})
    with pytest.raises(ValueError, match=message):
        deepspeed_config(config, torch.device("cpu"))


def test_dynamic_methods_refuse_mask_files():
    with pytest.raises(ValueError, match="starts from random ERK masks"):
        config_from_dict({"sparsity": {"method": "rigl", "masks": "m.pt"}})


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "cluster" / "deepspeed").glob("*.json")),
                         ids=lambda p: p.name)
def test_cluster_deepspeed_files_merge(path):
    """The shipped files are accepted (bf16 ones only on a GPU) and set the ZeRO stage they name."""
    config = config_from_dict({"deepspeed": {"config_file": str(path)}})
    stage = int(path.stem[len("zero")])
    if "bf16" in path.stem:
        with pytest.raises(ValueError, match="needs a CUDA GPU"):
            deepspeed_config(config, torch.device("cpu"))
        assert deepspeed_config(config, torch.device("cuda"))["zero_optimization"]["stage"] == stage
    else:
        assert deepspeed_config(config, torch.device("cpu"))["zero_optimization"]["stage"] == stage


def test_every_config_field_has_a_docstring():
    """A user reading dsparse/config.py learns what each key does where it is declared."""
    import ast

    import dsparse.config

    tree = ast.parse(Path(dsparse.config.__file__).read_text())
    missing = []
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef) and n.name.endswith("Config")):
        for field, after in zip(cls.body, cls.body[1:] + [None]):
            if isinstance(field, ast.AnnAssign):
                documented = (isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                              and isinstance(after.value.value, str))
                if not documented:
                    missing.append(f"{cls.name}.{field.target.id}")
    assert missing == []


def test_a_choice_outside_its_literal_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match="sparsity.scope must be one of global, layerwise; got 'local'"):
        config_from_dict({"sparsity": {"scope": "local"}})
    with pytest.raises(ValueError, match="deepspeed.zero_stage must be one of 0, 1, 2; got True"):
        config_from_dict({"deepspeed": {"zero_stage": True}})
    assert config_from_dict({"sparsity": {"granularity": "block", "block": 16}}).sparsity.block == 16
