"""Tests for dsparse.models: shapes, trunk geometry, and the declared task structure.

The structure tests check ``parameter_users`` against autograd: a task's loss must reach
exactly the parameters the model declares that task uses.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from dsparse.models import (
    MODELS,
    ASPPHead,
    BranchedMultiTaskNet,
    MultiTaskNet,
    build_branched_model,
    build_model,
    parameter_users,
    prunable_parameters,
    register_model,
)

TASKS = {"seg": 9, "normal": 3, "depth": 1, "keypoint": 1, "edge": 1}
SUBSETS = [c for r in range(1, len(TASKS) + 1) for c in itertools.combinations(TASKS, r)]
TINY = dict(base_width=8, head_dilations=(1, 2, 4, 8))
# torchvision-style ResNet-18/34 parameter counts (11,689,512 and 21,797,672) minus the
# 512x1000 classifier and its bias: dilation and stride change no parameter shape.
RESNET18_TRUNK_PARAMS = 11_689_512 - 513_000
RESNET34_TRUNK_PARAMS = 21_797_672 - 513_000


@pytest.fixture(scope="module")
def tiny_model() -> MultiTaskNet:
    torch.manual_seed(0)
    return build_model("resnet18", TASKS, **TINY)


class Wrapper(nn.Module):
    """Stands in for a DeepSpeed engine: holds the model as ``.module`` and, like the
    engine, forwards unknown attributes (including ``task_modules``) to it."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("module"), name)


# ---------------------------------------------------------------- shapes


def test_subset_count():
    assert len(SUBSETS) == 31


@pytest.mark.parametrize("size", [(64, 64), (48, 40)])
def test_every_task_subset_of_a_built_model(size):
    x = torch.randn(2, 3, *size)
    for subset in SUBSETS:
        model = build_model("resnet18", {t: TASKS[t] for t in subset}, **TINY)
        with torch.no_grad():
            out = model(x)
        assert list(out) == list(subset)
        for task, y in out.items():
            assert y.shape == (2, TASKS[task], *size)


@pytest.mark.parametrize("size", [(64, 64), (48, 40), (37, 50)])
def test_every_task_subset_of_heads(tiny_model, size):
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        full = tiny_model(x)
        features = tiny_model.forward_features(x)
        for subset in SUBSETS:
            # Requested in reverse: outputs still follow the model's task order.
            out = tiny_model(x, tasks=reversed(subset))
            assert list(out) == list(subset)
            for task, y in out.items():
                assert y.shape == (2, TASKS[task], *size)
                torch.testing.assert_close(y, full[task])
        from_features = tiny_model.forward_heads(features, size, tasks=["depth"])
    torch.testing.assert_close(from_features["depth"], full["depth"])


def test_task_selection_errors(tiny_model):
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="unknown tasks.*'sky'"):
        tiny_model(x, tasks=["seg", "sky"])
    with pytest.raises(ValueError, match="empty"):
        tiny_model(x, tasks=[])
    with pytest.raises(TypeError, match="not a string"):
        tiny_model(x, tasks="seg")


def test_head_with_hidden_layer():
    model = build_model("resnet18", {"seg": 4, "depth": 1}, head_hidden=16, **TINY)
    out = model(torch.randn(2, 3, 40, 48))
    assert out["seg"].shape == (2, 4, 40, 48)
    branch = model.heads["seg"].branches[1]
    assert [type(m) for m in branch] == [nn.Conv2d, nn.ReLU, nn.Conv2d]
    assert branch[0].dilation == (2, 2) and branch[0].out_channels == 16
    assert branch[2].kernel_size == (1, 1) and branch[2].out_channels == 4


def test_head_dilations_and_default():
    assert build_model("resnet18", {"seg": 2}, base_width=8).heads["seg"].dilations == (6, 12, 18, 24)
    head = ASPPHead(16, 3, dilations=(1, 2, 4, 8))
    assert [b[0].dilation for b in head.branches] == [(1, 1), (2, 2), (4, 4), (8, 8)]
    assert head(torch.randn(1, 16, 5, 7)).shape == (1, 3, 5, 7)
    assert head(torch.randn(1, 16, 5, 7), (20, 28)).shape == (1, 3, 20, 28)


# ---------------------------------------------------------------- trunk


@pytest.mark.parametrize(
    "output_stride, stem_pool, feature_size",
    [(8, True, (8, 8)), (16, True, (4, 4)), (8, False, (8, 8)), (16, False, (4, 4))],
)
def test_output_stride(output_stride, stem_pool, feature_size):
    model = build_model(
        "resnet18", {"seg": 2}, output_stride=output_stride, stem_pool=stem_pool, **TINY
    )
    features = model.forward_features(torch.randn(1, 3, 64, 64))
    assert features.shape == (1, 64, *feature_size)
    assert model.trunk.out_channels == 64
    assert model(torch.randn(1, 3, 64, 64))["seg"].shape == (1, 2, 64, 64)


def test_dilation_replaces_stride():
    os8 = build_model("resnet18", {"seg": 2}, output_stride=8, **TINY).trunk
    os16 = build_model("resnet18", {"seg": 2}, output_stride=16, **TINY).trunk

    def geometry(trunk):
        stages = [getattr(trunk, f"layer{i}") for i in range(1, 5)]
        return [(stage[0].conv1.stride[0], stage[-1].conv2.dilation[0]) for stage in stages]

    assert geometry(os8) == [(1, 1), (2, 1), (1, 2), (1, 4)]
    assert geometry(os16) == [(1, 1), (2, 1), (2, 1), (1, 2)]


@pytest.mark.parametrize("arch, depths", [("resnet18", [2, 2, 2, 2]), ("resnet34", [3, 4, 6, 3])])
def test_block_counts(arch, depths):
    trunk = build_model(arch, {"seg": 2}, **TINY).trunk
    assert [len(getattr(trunk, f"layer{i}")) for i in range(1, 5)] == depths


@pytest.mark.parametrize(
    "arch, expected", [("resnet18", RESNET18_TRUNK_PARAMS), ("resnet34", RESNET34_TRUNK_PARAMS)]
)
def test_standard_width_parameter_count(arch, expected):
    trunk = MODELS[arch](base_width=64)
    assert sum(p.numel() for p in trunk.parameters()) == expected


# ---------------------------------------------------------------- declared structure


def test_parameter_users_trunk_and_heads(tiny_model):
    users = parameter_users(tiny_model)
    assert list(users) == [name for name, _ in tiny_model.named_parameters()]
    everyone = frozenset(TASKS)
    for name, tasks in users.items():
        if name.startswith("trunk."):
            assert tasks == everyone, name
        else:
            assert tasks == frozenset({name.split(".")[1]}), name


def test_parameter_users_through_wrapper(tiny_model):
    for wrapped in (Wrapper(Wrapper(tiny_model)), torch.compile(tiny_model)):
        assert parameter_users(wrapped) == parameter_users(tiny_model)
        assert list(prunable_parameters(wrapped)) == list(prunable_parameters(tiny_model))


def _toy_branched() -> BranchedMultiTaskNet:
    class Head(nn.Module):
        def __init__(self, channels):
            super().__init__()
            self.conv = nn.Conv2d(4, channels, 1)

        def forward(self, features, output_size):
            return nn.functional.interpolate(self.conv(features), size=tuple(output_size))

    shared = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    branches = [
        ({"a", "b"}, nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())),
        ({"c"}, nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())),
    ]
    return BranchedMultiTaskNet(shared, branches, {"a": Head(2), "b": Head(1), "c": Head(3)})


def test_branched_users_toy():
    users = parameter_users(_toy_branched())
    assert users["shared.0.weight"] == {"a", "b", "c"}
    assert users["shared.1.bias"] == {"a", "b", "c"}
    assert users["branches.0.0.weight"] == {"a", "b"}
    assert users["branches.1.0.bias"] == {"c"}
    assert users["heads.b.conv.weight"] == {"b"}
    assert len(users) == len(list(_toy_branched().parameters()))


def test_branched_resnet():
    groups = [{"seg", "depth"}, {"normal"}, {"keypoint", "edge"}]
    model = build_branched_model("resnet18", TASKS, groups, **TINY)
    users = parameter_users(model)
    for name, tasks in users.items():
        if name.startswith("shared."):
            assert tasks == frozenset(TASKS)
            assert not name.startswith("shared.layer4")
        elif name.startswith("branches."):
            assert name.split(".")[2] == "layer4"
            assert tasks == frozenset(groups[int(name.split(".")[1])])
        else:
            assert tasks == frozenset({name.split(".")[1]})
    out = model(torch.randn(2, 3, 48, 40), tasks=["edge", "seg"])
    assert list(out) == ["seg", "edge"]
    assert out["seg"].shape == (2, 9, 48, 40) and out["edge"].shape == (2, 1, 48, 40)


def test_undeclared_parameter_is_named():
    class Extra(MultiTaskNet):
        def __init__(self):
            base = build_model("resnet18", {"seg": 2, "depth": 1}, **TINY)
            super().__init__(base.trunk, dict(base.heads))
            self.extra = nn.Linear(2, 2)

    with pytest.raises(ValueError, match=r"not covered.*extra\.weight.*extra\.bias"):
        parameter_users(Extra())


def test_conflicting_and_nested_declarations():
    model = build_model("resnet18", {"seg": 2, "depth": 1}, **TINY)
    # A weight tied between two heads: neither declaration is more specific.
    model.heads["depth"].branches[0][0].weight = model.heads["seg"].branches[0][0].weight
    with pytest.raises(ValueError, match=r"different users.*heads\.seg\.branches\.0\.0\.weight"):
        parameter_users(model)

    class Nested(MultiTaskNet):
        def task_modules(self):
            # The whole model for both tasks, overridden by the heads (innermost wins).
            return [(self, frozenset(self.tasks))] + super().task_modules()[1:]

    base = build_model("resnet18", {"seg": 2, "depth": 1}, **TINY)
    nested = Nested(base.trunk, dict(base.heads))
    assert parameter_users(nested) == parameter_users(base)


def test_malformed_declarations():
    model = build_model("resnet18", {"seg": 2}, **TINY)
    with pytest.raises(TypeError, match="task_modules"):
        parameter_users(model.trunk)

    class Outside(MultiTaskNet):
        def task_modules(self):
            return super().task_modules() + [(nn.Linear(1, 1), frozenset({"seg"}))]

    with pytest.raises(ValueError, match="not a submodule"):
        parameter_users(Outside(model.trunk, dict(model.heads)))


def test_prunable_parameters_are_conv_and_linear_weights(tiny_model):
    prunable = prunable_parameters(tiny_model)
    layers = [m for m in tiny_model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert [id(p) for p in prunable.values()] == [id(m.weight) for m in layers]
    named = dict(tiny_model.named_parameters())
    for name, weight in prunable.items():
        assert name.endswith(".weight") and named[name] is weight and weight.dim() == 4
    # 20 trunk convs (incl. stem and 3 shortcuts) + 4 branches x 5 heads.
    assert len(prunable) == 20 + 4 * len(TASKS)

    class WithLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)
            self.norm = nn.LayerNorm(2)

    assert list(prunable_parameters(WithLinear())) == ["fc.weight"]


# ---------------------------------------------------------------- declaration vs autograd


def _assert_grads_follow_users(model: nn.Module, tasks) -> None:
    users = parameter_users(model)
    x = torch.randn(2, 3, 32, 40)
    for task in tasks:
        model.zero_grad(set_to_none=True)
        out = model(x)
        loss = (out[task] - torch.randn_like(out[task])).square().mean()
        loss.backward()
        for name, param in model.named_parameters():
            reached = param.grad is not None and bool(param.grad.abs().sum() > 0)
            assert reached == (task in users[name]), f"{task}: {name}"


def test_gradients_reach_exactly_the_declared_users():
    torch.manual_seed(0)
    _assert_grads_follow_users(build_model("resnet18", TASKS, **TINY), TASKS)


def test_gradients_follow_users_in_branched_model():
    torch.manual_seed(0)
    groups = [{"seg", "depth"}, {"normal", "keypoint", "edge"}]
    model = build_branched_model("resnet18", TASKS, groups, **TINY)
    _assert_grads_follow_users(model, TASKS)
    _assert_grads_follow_users(_toy_branched(), ["a", "b", "c"])


# ---------------------------------------------------------------- builder errors


def test_builder_errors():
    with pytest.raises(ValueError, match=r"unknown model 'resnet50'.*resnet18.*resnet34"):
        build_model("resnet50", TASKS)
    with pytest.raises(ValueError, match="task_channels is empty"):
        build_model("resnet18", {})
    with pytest.raises(ValueError, match="output_stride must be one of"):
        build_model("resnet18", TASKS, output_stride=32)
    with pytest.raises(ValueError, match="positive integer channel count"):
        build_model("resnet18", {"seg": 0})
    with pytest.raises(ValueError, match="dilations"):
        build_model("resnet18", TASKS, base_width=8, head_dilations=())
    with pytest.raises(ValueError, match="base_width"):
        build_model("resnet18", TASKS, base_width=0)
    with pytest.raises(ValueError, match="already registered"):
        register_model("resnet18")(lambda **kwargs: None)


def test_branched_builder_errors():
    with pytest.raises(ValueError, match=r"in no branch"):
        build_branched_model("resnet18", TASKS, [{"seg", "depth"}], **TINY)
    with pytest.raises(ValueError, match=r"two branches"):
        build_branched_model("resnet18", {"seg": 2, "depth": 1}, [{"seg", "depth"}, {"seg"}], **TINY)
    with pytest.raises(ValueError, match=r"no head"):
        build_branched_model("resnet18", {"seg": 2}, [{"seg", "sky"}], **TINY)
    with pytest.raises(ValueError, match=r"branch_from.*layer1"):
        build_branched_model("resnet18", {"seg": 2}, [{"seg"}], branch_from="stem", **TINY)
