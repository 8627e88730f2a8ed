"""Channel groups: the output channels that must be removed together, from the model graph.

Removing output channel ``c`` of a convolution removes row ``c`` of its weight, entry ``c``
of its bias and of the batch norm after it, and input slice ``c`` of every layer that reads
it. A residual addition ties channels together: in a ResNet stage the last convolution of
every block, the shortcut and the inputs of every layer that reads the stage's output all
share one channel index, so they form one *group* and lose a channel together.

The coupling is read from the model's real autograd graph by Torch-Pruning's
``DependencyGraph`` (one traced forward), so a model registered by a user is grouped the
same way as dsparse's own; dsparse keeps only what it can rebuild smaller (``Conv2d`` with
``groups=1``, ``Linear``, ``BatchNorm2d``) and refuses a graph with anything else in a
group, naming the layer. The users of a group (``dsparse.models.parameter_users``) are the
tasks using any of its weights. The stem's output and every group no prunable layer reads
(a head's prediction) keep their size: ``fixed``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dsparse.models import parameter_users, unwrap_model

__all__ = ["ChannelGroup", "channel_groups"]


@dataclass(frozen=True)
class ChannelGroup:
    """One set of coupled channels; ``channels`` indices, the same index in every member."""

    name: str
    """The module FQN of its first producer (in module order)."""
    channels: int
    producers: tuple[str, ...]
    """``Conv2d``/``Linear`` modules whose output channels these are."""
    consumers: tuple[str, ...]
    """``Conv2d``/``Linear`` modules whose input channels these are."""
    norms: tuple[str, ...]
    """``BatchNorm2d`` modules over these channels."""
    users: frozenset[str]
    fixed: bool
    """Kept whole: the first convolution's output, or an output no prunable layer reads."""


def channel_groups(model: nn.Module, example_input: torch.Tensor) -> list[ChannelGroup]:
    """The channel groups of ``model`` (or a wrapper of it), traced on ``example_input``.

    The trace runs one forward in eval mode (batch-norm statistics untouched) and restores
    the training flag.

    Raises:
        ValueError: a layer dsparse cannot shrink inside a group, or a prunable layer the
            graph does not reach, naming it.
    """
    import torch_pruning as tp

    model = unwrap_model(model)
    names = {module: name for name, module in model.named_modules()}
    users = parameter_users(model)
    was_training = model.training
    model.eval()
    try:
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_input, verbose=False)
        raw_groups = list(graph.get_all_groups(root_module_types=(nn.Conv2d, nn.Linear)))
    finally:
        model.train(was_training)
    order = {name: index for index, name in enumerate(names.values())}
    first = _first_layer(model)
    groups, producers_seen = [], {}
    for raw in raw_groups:
        group = _group_of(raw, names, users, first, order)
        if group is None:
            continue
        for producer in group.producers:
            producers_seen.setdefault(producer, group.name)
        groups.append(group)
    layers = [name for name, module in model.named_modules() if isinstance(module, (nn.Conv2d, nn.Linear))]
    missing = [name for name in layers if name not in producers_seen]
    if missing:
        raise ValueError(f"cannot group the channels of {missing[0]}: the traced graph does not reach it; "
                         "channel granularity needs every Conv2d/Linear on the path to some task's output")
    return sorted(groups, key=lambda g: order[g.name])


def _group_of(raw, names: dict, users: dict[str, frozenset[str]], first: str,
              order: dict[str, int]) -> ChannelGroup | None:
    producers, consumers, norms, channels = [], [], [], None
    for dependency, indices in raw:
        module = dependency.target.module
        if module not in names:  # an operation (add, relu, interpolate...), not a layer
            continue
        name = names[module]
        output_side = dependency.handler.__name__ == "prune_out_channels"
        size = _size(module, name, output_side)
        if size is None:  # a layer without weights (pooling, activation)
            continue
        wanted = list(range(size))
        if sorted(int(i) for i in indices) != wanted:
            raise ValueError(f"cannot group the channels of {name}: its channels map onto another layer's with "
                             "an offset (a concatenation?), which dsparse's channel pruning does not rebuild")
        if channels is None:
            channels = size
        elif size != channels:
            raise ValueError(f"cannot group the channels of {name}: {size} channels coupled with {channels}")
        if isinstance(module, nn.BatchNorm2d):
            norms.append(name)
        elif output_side:
            producers.append(name)
        else:
            consumers.append(name)
    if not producers:
        return None
    producers, consumers, norms = (tuple(sorted(set(x), key=order.__getitem__)) for x in (producers, consumers, norms))
    tasks = frozenset().union(*(users[f"{layer}.weight"] for layer in producers + consumers))
    fixed = first in producers or not consumers
    return ChannelGroup(producers[0], channels, producers, consumers, norms, tasks, fixed)


def _size(module: nn.Module, name: str, output_side: bool) -> int | None:
    """The layer's channel count on the pruned side, or None for a layer with no parameters."""
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise ValueError(f"cannot shrink {name}: a grouped or depthwise Conv2d (groups={module.groups}); "
                             "channel granularity supports groups=1")
        return module.out_channels if output_side else module.in_channels
    if isinstance(module, nn.Linear):
        return module.out_features if output_side else module.in_features
    if isinstance(module, nn.BatchNorm2d):
        return module.num_features
    if next(module.parameters(recurse=False), None) is None and not list(module.buffers(recurse=False)):
        return None
    raise ValueError(f"cannot shrink {name}: a {type(module).__name__} inside a channel group; channel granularity "
                     "rebuilds Conv2d, Linear and BatchNorm2d")


def _first_layer(model: nn.Module) -> str:
    return next(name for name, module in model.named_modules() if isinstance(module, (nn.Conv2d, nn.Linear)))
