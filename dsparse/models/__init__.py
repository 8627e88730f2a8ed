"""Multitask vision models: a dilated ResNet trunk, one ASPP head per task, and the
declared task structure that pruning reads (which tasks use each parameter).

Models are plain ``nn.Module``s; masks, DeepSpeed and distribution are applied from
outside. Build one by name::

    model = build_model("resnet18", {"seg": 9, "normal": 3, "depth": 1},
                        base_width=8, head_dilations=(1, 2, 4, 8))
    outputs = model(images)              # {"seg": [B, 9, H, W], ...}
    users = parameter_users(model)       # {"trunk.stem.0.weight": frozenset({...}), ...}
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from torch import nn

from dsparse.models.heads import DEEPLAB_V2_DILATIONS, ASPPHead
from dsparse.models.multitask import (
    BranchedMultiTaskNet,
    MultiTaskNet,
    TaskStructure,
    parameter_users,
    prunable_parameters,
    unwrap_model,
)
from dsparse.models import mobilenet
from dsparse.models.mobilenet import MobileNetV2Trunk
from dsparse.models.resnet import BasicBlock, ResNetTrunk

__all__ = [
    "ASPPHead",
    "BasicBlock",
    "BranchedMultiTaskNet",
    "DEEPLAB_V2_DILATIONS",
    "MODELS",
    "MODEL_GRANULARITIES",
    "MobileNetV2Trunk",
    "MultiTaskNet",
    "ResNetTrunk",
    "TaskStructure",
    "build_branched_model",
    "build_model",
    "parameter_users",
    "prunable_parameters",
    "register_model",
    "unwrap_model",
]

TrunkFactory = Callable[..., nn.Module]

MODELS: dict[str, TrunkFactory] = {}
"""Architecture name -> trunk factory. A factory takes keyword arguments ``base_width``,
``output_stride`` and ``stem_pool`` and returns a trunk with an ``out_channels`` attribute
(and ``stage_names``/``split`` for branched models)."""


MODEL_GRANULARITIES: dict[str, tuple[str, ...]] = {}
"""Architecture name -> the mask granularities (``sparsity.granularity``) its layers support."""


def register_model(name: str, granularities: tuple[str, ...] = ("element", "block", "channel")
                   ) -> Callable[[TrunkFactory], TrunkFactory]:
    """Decorator adding a trunk factory to ``MODELS`` under ``name``, with the mask
    granularities its layers support (block-sparse layers and channel pruning need
    ``groups=1`` convolutions).

    Raises:
        ValueError: if ``name`` is already registered.
    """

    def decorator(factory: TrunkFactory) -> TrunkFactory:
        if name in MODELS:
            raise ValueError(f"model {name!r} is already registered")
        MODELS[name] = factory
        MODEL_GRANULARITIES[name] = tuple(granularities)
        return factory

    return decorator


@register_model("resnet18")
def resnet18(*, base_width: int = 64, output_stride: int = 8, stem_pool: bool = True) -> ResNetTrunk:
    return ResNetTrunk((2, 2, 2, 2), base_width=base_width, output_stride=output_stride, stem_pool=stem_pool)


@register_model("resnet34")
def resnet34(*, base_width: int = 64, output_stride: int = 8, stem_pool: bool = True) -> ResNetTrunk:
    return ResNetTrunk((3, 4, 6, 3), base_width=base_width, output_stride=output_stride, stem_pool=stem_pool)


@register_model("mobilenet_v2", granularities=mobilenet.GRANULARITIES)
def mobilenet_v2(*, base_width: int = 32, output_stride: int = 8, stem_pool: bool = True) -> MobileNetV2Trunk:
    """MobileNetV2 (``base_width`` 32 = width multiplier 1.0); it has no stem pool."""
    if not stem_pool:
        raise ValueError("model.stem_pool applies to ResNet trunks; MobileNetV2 has no stem pool (leave it out)")
    return MobileNetV2Trunk(base_width=base_width, output_stride=output_stride)


def _trunk_factory(arch: str) -> TrunkFactory:
    if arch not in MODELS:
        raise ValueError(f"unknown model {arch!r}; known models: {sorted(MODELS)}")
    return MODELS[arch]


def _check_task_channels(task_channels: dict[str, int]) -> None:
    if not task_channels:
        raise ValueError("task_channels is empty; give at least one task, e.g. {'seg': 9}")
    for task, channels in task_channels.items():
        if isinstance(channels, bool) or int(channels) != channels or channels < 1:
            raise ValueError(f"task {task!r} needs a positive integer channel count, got {channels!r}")


def _heads(in_channels: int, task_channels: dict[str, int], dilations, hidden) -> dict[str, nn.Module]:
    return {t: ASPPHead(in_channels, c, dilations, hidden) for t, c in task_channels.items()}


def build_model(
    arch: str,
    task_channels: dict[str, int],
    *,
    base_width: int = 64,
    output_stride: int = 8,
    head_dilations: Sequence[int] = DEEPLAB_V2_DILATIONS,
    head_hidden: int | None = None,
    stem_pool: bool = True,
) -> MultiTaskNet:
    """Shared trunk plus one ASPP head per task, in the order of ``task_channels``.

    Args:
        arch: a name in ``MODELS`` (``"resnet18"``, ``"resnet34"``).
        task_channels: task -> number of predicted channels.
        base_width: trunk width; 64 is standard, 8 or 16 a tiny CPU model.
        output_stride: 8 or 16.
        head_dilations: one head branch per dilation; use small ones such as
            (1, 2, 4, 8) for inputs around 64x64.
        head_hidden: hidden channels per head branch, or ``None`` for a single conv.
        stem_pool: whether the stem ends with a max-pool.

    Raises:
        ValueError: on an unknown arch (listing the known ones), no tasks, a bad channel
            count or an invalid trunk or head setting.
    """
    factory = _trunk_factory(arch)
    _check_task_channels(task_channels)
    trunk = factory(base_width=base_width, output_stride=output_stride, stem_pool=stem_pool)
    return MultiTaskNet(trunk, _heads(trunk.out_channels, task_channels, head_dilations, head_hidden))


def build_branched_model(
    arch: str,
    task_channels: dict[str, int],
    branches: Sequence[Iterable[str]],
    *,
    branch_from: str = "layer4",
    base_width: int = 64,
    output_stride: int = 8,
    head_dilations: Sequence[int] = DEEPLAB_V2_DILATIONS,
    head_hidden: int | None = None,
    stem_pool: bool = True,
) -> BranchedMultiTaskNet:
    """A trunk shared up to ``branch_from``, then one copy of the remaining stages per
    task group, then one ASPP head per task.

    Each branch gets its own freshly initialised stages, so branches start independent.

    Args:
        branches: task groups that partition ``task_channels``, e.g.
            ``[{"seg", "depth"}, {"normal"}]``.
        branch_from: first trunk part that is branched (``"layer1"`` ... ``"layer4"``).
        Other arguments as in ``build_model``.

    Raises:
        ValueError: as ``build_model``, on an unknown ``branch_from`` or on groups that do
            not partition the tasks.
    """
    factory = _trunk_factory(arch)
    _check_task_channels(task_channels)

    def trunk() -> nn.Module:
        return factory(base_width=base_width, output_stride=output_stride, stem_pool=stem_pool)

    shared_trunk = trunk()
    names = shared_trunk.stage_names()
    if branch_from not in names[1:]:
        raise ValueError(f"unknown branch_from {branch_from!r}; choose one of {list(names[1:])}")
    num_shared = names.index(branch_from)
    shared, _ = shared_trunk.split(num_shared)
    branch_modules = [(frozenset(group), trunk().split(num_shared)[1]) for group in branches]
    heads = _heads(shared_trunk.out_channels, task_channels, head_dilations, head_hidden)
    return BranchedMultiTaskNet(shared, branch_modules, heads)
