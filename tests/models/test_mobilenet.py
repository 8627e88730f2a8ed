"""The MobileNetV2 trunk: the standard network's layers, output stride by dilation, task
structure, branching, and the pruning it supports (element masks, every method)."""

import pytest
import torch

from dsparse.config import config_from_dict
from dsparse.models import MODELS, build_branched_model, build_model, parameter_users, prunable_parameters
from dsparse.sparsity import MaskInputs, build_sparsifier
from dsparse.sparsity.methods import METHODS
from dsparse.sparsity.prune import prune
from dsparse.tasks import build_tasks

# torchvision's mobilenet_v2().features without its last 1x1 conv to 1280 and that conv's norm:
# 2,223,872 - (320 * 1280 + 2 * 1280)
MOBILENET_V2_TRUNK_PARAMS = 1_811_712
TASKS = {"seg": 13, "normal": 3, "depth": 1}


def test_standard_width_has_the_standard_layers():
    trunk = MODELS["mobilenet_v2"](base_width=32)
    assert sum(p.numel() for p in trunk.parameters()) == MOBILENET_V2_TRUNK_PARAMS
    assert trunk.out_channels == 320
    depthwise = [m for m in trunk.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    assert len(depthwise) == 17 and all(m.groups == m.in_channels == m.out_channels for m in depthwise)


@pytest.mark.parametrize("output_stride", [8, 16])
def test_output_stride_by_dilation(output_stride):
    model = build_model("mobilenet_v2", TASKS, base_width=8, output_stride=output_stride, head_dilations=(1, 2))
    x = torch.randn(1, 3, 64, 64)
    assert model.trunk(x).shape[-1] == 64 // output_stride
    assert all(out.shape[-2:] == (64, 64) for out in model(x).values())
    dilations = {m.dilation[0] for m in model.trunk.layer4.modules() if isinstance(m, torch.nn.Conv2d)
                 and m.kernel_size == (3, 3)}
    assert dilations == ({4} if output_stride == 8 else {2})


def test_task_structure_and_branches():
    model = build_model("mobilenet_v2", TASKS, base_width=8, head_dilations=(1, 2))
    users = parameter_users(model)
    assert all(users[n] == frozenset(TASKS) for n in users if n.startswith("trunk."))
    branched = build_branched_model("mobilenet_v2", TASKS, [{"seg"}, {"normal", "depth"}], base_width=8,
                                    head_dilations=(1, 2), branch_from="layer3")
    users = parameter_users(branched)
    assert {users[n] for n in users if ".layer4." in n} == {frozenset({"seg"}), frozenset({"normal", "depth"})}
    assert branched(torch.randn(1, 3, 32, 32))["depth"].shape == (1, 1, 32, 32)


def test_no_stem_pool_is_refused():
    with pytest.raises(ValueError, match="MobileNetV2 has no stem pool"):
        build_model("mobilenet_v2", TASKS, stem_pool=False)


@pytest.mark.parametrize("method", [name for name, cls in METHODS.items() if not cls.dynamic
                                    and not cls.needs_pretrained])
def test_static_methods_prune_it_to_exactly_the_target(method):
    torch.manual_seed(0)
    tasks = build_tasks(list(TASKS), num_classes=13)
    model = build_model("mobilenet_v2", {n: t.num_channels for n, t in tasks.items()}, base_width=8,
                        head_dilations=(1, 2))
    batch = {"rgb": torch.randn(2, 3, 32, 32), "seg": torch.randint(0, 13, (2, 32, 32)),
             "normal": torch.nn.functional.normalize(torch.randn(2, 3, 32, 32), dim=1),
             "depth": torch.rand(2, 1, 32, 32) + 0.5}
    masks = prune(model, tasks, iter([batch]), method=method, sparsity=0.9, num_batches=1)
    total = sum(w.numel() for w in prunable_parameters(model).values())
    assert masks.num_kept == round(0.1 * total)


@pytest.mark.parametrize("method", [name for name, cls in METHODS.items() if cls.dynamic])
def test_dynamic_methods_start_on_it(method):
    torch.manual_seed(0)
    tasks = build_tasks(list(TASKS), num_classes=13)
    model = build_model("mobilenet_v2", {n: t.num_channels for n, t in tasks.items()}, base_width=8,
                        head_dilations=(1, 2))
    config = config_from_dict({"tasks": list(TASKS), "model": {"arch": "mobilenet_v2", "base_width": 8},
                               "sparsity": {"method": method, "target": 0.9}})
    sparsifier = build_sparsifier(config.sparsity, MaskInputs(tasks, config.sparsity, seed=0, total_steps=10))
    sparsifier.prepare(model)
    total = sum(w.numel() for w in prunable_parameters(model).values())
    expected = total if method == "adapmtl" else round(0.1 * total)  # adapmtl starts dense
    assert abs(sparsifier.masks.num_kept - expected) <= len(sparsifier.masks.masks)  # ERK rounds per layer


@pytest.mark.parametrize("granularity", ["block", "channel"])
def test_granularities_it_cannot_run_are_refused(granularity):
    with pytest.raises(ValueError, match=f"mobilenet_v2 supports sparsity.granularity element only .* not "
                                         f"{granularity}"):
        config_from_dict({"model": {"arch": "mobilenet_v2"}, "sparsity": {"method": "snip",
                                                                           "granularity": granularity}})
