"""Learned soft thresholds (AdapMTL, after STR): a masked layer computes with

    w_eff = sign(w) * relu(|w| - sigmoid(s_c))

where ``s_c`` is one learnable scalar per component (``dsparse.sparsity.components``): the
weights whose magnitude is below the component's threshold are zero, and the threshold
learns, with its own weight decay, how much to prune.

The parametrisation is applied from outside the model, with every FQN unchanged: the
thresholds live in a submodule ``soft_thresholds`` of the model (so DeepSpeed reduces
their gradients, keeps them in its optimizer and saves them with the weights), which
declares its task users like the model's own modules do, and each thresholded
``Conv2d``/``Linear`` gets a subclass whose forward uses ``w_eff`` (its class is swapped in
place: same parameters, same state-dict keys). ``release_layers`` swaps them back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsparse.models import unwrap_model

__all__ = ["THRESHOLDS", "ComponentThreshold", "SoftThresholds", "attach_soft_thresholds", "effective_weights",
           "release_layers", "soft_threshold", "threshold_key", "thresholded_layers"]

THRESHOLDS = "soft_thresholds"
"""The model attribute holding the thresholds (their state-dict keys start with it)."""


def soft_threshold(weight: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """``sign(w) * relu(|w| - threshold)``: zero where ``|w| <= threshold``, shrunk towards
    zero by ``threshold`` elsewhere; differentiable in both."""
    return torch.sign(weight) * torch.relu(weight.abs() - threshold)


class ComponentThreshold(nn.Module):
    """One component's threshold parameter ``s`` (shape (1,): DeepSpeed flattens no 0-d
    parameters); ``forward`` returns ``sigmoid(s)``."""

    def __init__(self, sinit: float):
        super().__init__()
        self.s = nn.Parameter(torch.full((1,), float(sinit)))

    def forward(self) -> torch.Tensor:
        return torch.sigmoid(self.s)


class SoftThresholds(nn.Module):
    """The thresholds of a model, one per component; declares each as used by the tasks of
    its component, so ``parameter_users`` covers them."""

    def __init__(self, users: dict[str, frozenset[str]], sinit: float):
        super().__init__()
        self.components = nn.ModuleDict({name: ComponentThreshold(sinit) for name in users})
        self._users = {name: frozenset(tasks) for name, tasks in users.items()}

    def task_modules(self) -> list[tuple[nn.Module, frozenset[str]]]:
        return [(self.components[name], tasks) for name, tasks in self._users.items()]

    def values(self) -> dict[str, float]:
        """Component -> its current threshold ``sigmoid(s)``."""
        with torch.no_grad():
            return {name: float(module()) for name, module in self.components.items()}


def threshold_key(component: str) -> str:
    """State-dict key of a component's ``s`` in the model."""
    return f"{THRESHOLDS}.components.{component}.s"


class _SoftConv2d(nn.Conv2d):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(input, soft_threshold(self.weight, self.soft_threshold()), self.bias)


class _SoftLinear(nn.Linear):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(input, soft_threshold(self.weight, self.soft_threshold()), self.bias)


_SOFT = {nn.Conv2d: _SoftConv2d, nn.Linear: _SoftLinear}
_PLAIN = {soft: plain for plain, soft in _SOFT.items()}


def _layer(model: nn.Module, fqn: str) -> nn.Module:
    return model.get_submodule(fqn.rsplit(".", 1)[0])


def attach_soft_thresholds(model: nn.Module, layers: dict[str, str], users: dict[str, frozenset[str]],
                           sinit: float) -> SoftThresholds:
    """Threshold the weights ``layers`` (weight FQN -> component) of ``model`` in place.

    Args:
        model: the (unwrapped) model, before DeepSpeed wraps it.
        layers: weight FQN -> component of every layer to threshold.
        users: component -> the tasks using it.
        sinit: the starting ``s`` of every threshold.

    Raises:
        ValueError: the model already has ``soft_thresholds``, or a layer is not a plain
            ``Conv2d``/``Linear`` (a subclass's own forward would be lost).
    """
    model = unwrap_model(model)
    if hasattr(model, THRESHOLDS):
        raise ValueError(f"the model already has {THRESHOLDS!r}; attach the thresholds once")
    modules = {fqn: _layer(model, fqn) for fqn in layers}
    odd = sorted(f"{fqn} ({type(m).__name__})" for fqn, m in modules.items() if type(m) not in _SOFT)
    if odd:
        raise ValueError(f"soft thresholds apply to plain Conv2d and Linear layers only, not {', '.join(odd)}")
    thresholds = SoftThresholds({c: users[c] for c in dict.fromkeys(layers.values())}, sinit)
    weight = next(iter(modules.values())).weight
    model.add_module(THRESHOLDS, thresholds.to(weight.device))
    for fqn, module in modules.items():
        module.__class__ = _SOFT[type(module)]
        module.__dict__["soft_threshold"] = thresholds.components[layers[fqn]]  # a reference, not a child
    return thresholds


def thresholded_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Weight FQN -> every layer of ``model`` computing with a soft threshold now."""
    return {f"{name}.weight": module for name, module in unwrap_model(model).named_modules()
            if type(module) in _PLAIN}


def effective_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Weight FQN -> ``w_eff`` (detached) of every thresholded layer."""
    with torch.no_grad():
        return {fqn: soft_threshold(m.weight, m.soft_threshold()).detach()
                for fqn, m in thresholded_layers(model).items()}


def release_layers(model: nn.Module) -> None:
    """Make every thresholded layer plain again (it computes with its stored weight); the
    thresholds stay in the model, unused."""
    for module in thresholded_layers(model).values():
        module.__class__ = _PLAIN[type(module)]
        del module.__dict__["soft_threshold"]
