"""Channel masks as element masks, and the model rebuilt with only the kept channels.

A channel vote is stored like every other mask set (``dsparse.sparsity.masks.MaskSet``):
element masks of the dense weights (weight ``[o, i, ...]`` kept iff output channel ``o`` and
input channel ``i`` are kept), so mask analysis, reports and IoU work unchanged, plus the
groups and their kept channel indices in ``meta["channels"]``, which is all ``shrink_model``
needs: a run resumed or exported from the masks rebuilds the same smaller architecture
from the dense model without tracing it again.

The rebuilt model has plain ``Conv2d``/``Linear``/``BatchNorm2d`` layers with fewer
channels (weights, biases, norm affine parameters and running statistics copied for the
kept channels): no masks, no hooks. It computes what the dense model computes with the
pruned weights at zero *and* the pruned channels' biases and norm shifts at zero (a
removed channel contributes nothing, where a masked one would still add its norm's shift).
"""

from __future__ import annotations

import torch
from torch import nn

from dsparse.models import unwrap_model
from dsparse.sparsity.channel.groups import ChannelGroup

__all__ = ["channel_element_masks", "channel_meta", "shrink_model", "zero_pruned_channels"]


def channel_meta(groups: list[ChannelGroup], kept: dict[str, torch.Tensor],
                 order: dict[str, list[int]] | None = None) -> dict:
    """Plain-value record of the groups and their kept channel indices (for ``MaskSet.meta``),
    with each voted group's channels best first (``order``) where given."""
    order = order or {}
    return {g.name: {"channels": g.channels, "kept": torch.nonzero(kept[g.name]).flatten().tolist(),
                     "producers": list(g.producers), "consumers": list(g.consumers), "norms": list(g.norms),
                     "users": sorted(g.users), "fixed": g.fixed, **({"order": order[g.name]} if g.name in order else {})}
            for g in groups}


def _masks_of(meta: dict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per layer FQN, the bool keep vector of its output channels and of its input channels."""
    outs, ins = {}, {}
    for record in meta.values():
        keep = torch.zeros(record["channels"], dtype=torch.bool)
        keep[torch.tensor(record["kept"], dtype=torch.long)] = True
        for layer in record["producers"]:
            outs[layer] = keep
        for layer in record["consumers"]:
            ins[layer] = keep
    return outs, ins


def channel_element_masks(weights: dict[str, torch.Tensor], meta: dict) -> dict[str, torch.Tensor]:
    """Element keep masks of ``weights`` (FQN -> dense weight) under the channel record."""
    outs, ins = _masks_of(meta)
    masks = {}
    for fqn, weight in weights.items():
        layer = fqn.removesuffix(".weight")
        out = outs.get(layer, torch.ones(weight.shape[0], dtype=torch.bool))
        inp = ins.get(layer, torch.ones(weight.shape[1], dtype=torch.bool))
        view = (-1, 1) + (1,) * (weight.dim() - 2)
        masks[fqn] = (out.view(view) & inp.view((1, -1) + (1,) * (weight.dim() - 2))).expand(weight.shape).clone()
    return masks


@torch.no_grad()
def zero_pruned_channels(model: nn.Module, meta: dict) -> None:
    """The masked dense twin of ``shrink_model``: pruned weights, the pruned output channels'
    biases and their norms' affine parameters set to zero, in place (tests compare the two)."""
    model = unwrap_model(model)
    modules = dict(model.named_modules())
    for record in meta.values():
        drop = torch.ones(record["channels"], dtype=torch.bool)
        drop[torch.tensor(record["kept"], dtype=torch.long)] = False
        for layer in record["producers"]:
            modules[layer].weight[drop] = 0
            if modules[layer].bias is not None:
                modules[layer].bias[drop] = 0
        for layer in record["consumers"]:
            modules[layer].weight[:, drop] = 0
        for layer in record["norms"]:
            modules[layer].weight[drop] = 0
            modules[layer].bias[drop] = 0


@torch.no_grad()
def shrink_model(model: nn.Module, meta: dict) -> nn.Module:
    """Rebuild ``model``'s layers in place with only the kept channels of ``meta``
    (``channel_meta``); returns the model. Parameters become new tensors, so build the
    optimizer afterwards.

    Raises:
        ValueError: a layer of the record the model does not have, or of another size.
    """
    model = unwrap_model(model)
    modules = dict(model.named_modules())
    for group, record in meta.items():
        index = torch.tensor(record["kept"], dtype=torch.long)
        for role in ("producers", "consumers", "norms"):
            for layer in record[role]:
                module = modules.get(layer)
                if module is None:
                    raise ValueError(f"the channel masks name layer {layer} (group {group}), which the model does not "
                                     "have: they were made for another architecture")
                _shrink(module, layer, role, index.to(_device(module)), record["channels"])
    return model


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _shrink(module: nn.Module, layer: str, role: str, index: torch.Tensor, channels: int) -> None:
    if role == "norms":
        _check_size(module.num_features, channels, layer)
        module.weight = nn.Parameter(module.weight[index].clone())
        module.bias = nn.Parameter(module.bias[index].clone())
        module.running_mean = module.running_mean[index].clone()
        module.running_var = module.running_var[index].clone()
        module.num_features = index.numel()
        return
    dim = 0 if role == "producers" else 1
    _check_size(module.weight.shape[dim], channels, layer)
    module.weight = nn.Parameter(module.weight.index_select(dim, index).clone())
    if dim == 0 and module.bias is not None:
        module.bias = nn.Parameter(module.bias[index].clone())
    if isinstance(module, nn.Conv2d):
        attribute = "out_channels" if dim == 0 else "in_channels"
    else:
        attribute = "out_features" if dim == 0 else "in_features"
    setattr(module, attribute, index.numel())


def _check_size(size: int, channels: int, layer: str) -> None:
    if size != channels:
        raise ValueError(f"the channel masks give {layer} {channels} channels but the model's has {size}: they were "
                         "made for another model width")
