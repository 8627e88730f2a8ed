"""Zeroing weights *and* their optimizer state in place, wherever DeepSpeed keeps them.

When dynamic sparse training drops a weight it must become exactly zero, and when it grows
one its momentum and Adam moments must restart from zero (docs/design.md, "Dynamic sparse training"). Where that
state lives depends on the ZeRO stage:

* stage 0: the module parameter is the master weight; the torch optimizer keeps its state
  in ``optimizer.state[param]``.
* stages 1 and 2 (and bf16): DeepSpeed keeps an fp32 master copy and the optimizer state
  in flat buffers partitioned across ranks; each parameter carries ``_hp_mapping``, the
  address of its fragment in this rank's partition (possibly none). Zeroing the fragment
  in place touches only local memory: no collective, no copy of the model.
"""

from __future__ import annotations

import abc

import torch


class OptimizerState(abc.ABC):
    """Where a run's optimizer keeps each weight's master copy and state; what dynamic
    sparsity needs of it is to zero positions in place. ``bind_optimizer`` picks the
    implementation for a plain torch optimizer or DeepSpeed's."""

    @abc.abstractmethod
    def zero_(self, param: torch.nn.Parameter, positions: torch.Tensor) -> None:
        """Set ``param[positions]`` and its optimizer state at those positions to zero.

        Args:
            param: a parameter of the model being trained.
            positions: bool tensor of ``param``'s shape; True = zero it.
        """

    @abc.abstractmethod
    def write_(self, param: torch.nn.Parameter, values: torch.Tensor) -> None:
        """Set ``param`` to ``values`` (its shape), master copy included; its optimizer state stays."""

    @abc.abstractmethod
    def zero_state_(self, param: torch.nn.Parameter) -> None:
        """Zero all of ``param``'s optimizer state (momenta, moments), not the value: with a zero
        gradient and no weight decay every optimizer dsparse builds then leaves it unchanged."""

    def param_group(self, name: str) -> dict:
        """The optimizer parameter group tagged ``"name": name`` (its hyperparameters may be
        changed in place).

        Raises:
            KeyError: no group of that name.
        """
        for group in _torch_optimizer(self.optimizer).param_groups:
            if group.get("name") == name:
                return group
        raise KeyError(f"the optimizer has no parameter group named {name!r}")


class TorchOptimizerState(OptimizerState):
    """A ``torch.optim.Optimizer`` (also DeepSpeed ZeRO 0 in fp32, which steps the client
    optimizer): the parameter is the master weight, the state is ``optimizer.state[param]``."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def zero_(self, param: torch.nn.Parameter, positions: torch.Tensor) -> None:
        keep = _keep(param, positions)
        with torch.no_grad():
            param.mul_(keep)
            for value in self.optimizer.state.get(param, {}).values():
                if torch.is_tensor(value) and value.shape == param.shape:
                    value.mul_(keep.to(value.dtype))

    def write_(self, param: torch.nn.Parameter, values: torch.Tensor) -> None:
        with torch.no_grad():
            param.copy_(values)

    def zero_state_(self, param: torch.nn.Parameter) -> None:
        for value in self.optimizer.state.get(param, {}).values():
            if torch.is_tensor(value) and value.shape == param.shape:
                value.zero_()


class PartitionedOptimizerState(OptimizerState):
    """DeepSpeed ZeRO 1/2 and bf16 optimizers: the fp32 master and the state live in flat
    partitioned buffers, located through each parameter's ``_hp_mapping``."""

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self._fallback = TorchOptimizerState(_torch_optimizer(optimizer))

    def zero_(self, param: torch.nn.Parameter, positions: torch.Tensor) -> None:
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is None:  # a parameter DeepSpeed left to the client optimizer
            self._fallback.zero_(param, positions)
            return
        keep = _keep(param, positions)
        self._link_states(mapping)
        with torch.no_grad():
            param.mul_(keep)
            _zero_fragments(mapping, keep)

    def _link_states(self, mapping) -> None:
        """Link every parameter group's optimizer state to its parameters' fragments.

        DeepSpeed links them once, after the first group's first step, when the state of
        any later group (e.g. AdapMTL's thresholds) does not exist yet; those fragments
        then stay unlinked and their state could not be reached."""
        if mapping.optim_fragment:
            return
        groups = getattr(self.optimizer, "bit16_groups", None)
        partitions = getattr(self.optimizer, "single_partition_of_fp32_groups", None)
        if groups is None or partitions is None:
            return
        from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

        state = _torch_optimizer(self.optimizer).state
        for params, partition in zip(groups, partitions):
            if partition in state:
                lazy_init_hp_params_optimizer_state(params, partition, state)

    def write_(self, param: torch.nn.Parameter, values: torch.Tensor) -> None:
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is None:
            self._fallback.write_(param, values)
            return
        _keep(param, torch.zeros_like(param, dtype=torch.bool))  # refuses ZeRO 3
        with torch.no_grad():
            param.copy_(values)
            address = mapping.lp_fragment_address
            master = mapping.get_hp_fragment(None)
            master.copy_(values.flatten().narrow(0, address.start, address.numel).to(master.device, master.dtype))

    def zero_state_(self, param: torch.nn.Parameter) -> None:
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is None:
            self._fallback.zero_state_(param)
            return
        self._link_states(mapping)
        with torch.no_grad():
            for key in (mapping.get_optim_state_keys() if mapping.optim_fragment else []):
                mapping.get_hp_fragment(key).zero_()


def bind_optimizer(optimizer) -> OptimizerState:
    """The :class:`OptimizerState` of a plain torch optimizer or of ``engine.optimizer``."""
    if isinstance(optimizer, torch.optim.Optimizer):
        return TorchOptimizerState(optimizer)
    return PartitionedOptimizerState(optimizer)


def _keep(param: torch.nn.Parameter, positions: torch.Tensor) -> torch.Tensor:
    if hasattr(param, "ds_id"):
        raise ValueError("ZeRO stage 3 is not supported by dynamic sparsity; use deepspeed.zero_stage 0, 1 or 2")
    return (~positions).to(device=param.device, dtype=param.dtype)


def _zero_fragments(mapping, keep: torch.Tensor) -> None:
    address = mapping.lp_fragment_address
    local_keep = keep.flatten().narrow(0, address.start, address.numel)
    keys = mapping.get_optim_state_keys() if mapping.optim_fragment else []
    for key in (None, *keys):  # None = the fp32 master weights
        fragment = mapping.get_hp_fragment(key)
        fragment.mul_(local_keep.to(fragment.device, fragment.dtype))  # offload keeps it on the CPU


def _torch_optimizer(optimizer):
    """The torch optimizer under DeepSpeed's wrappers (ZeRO-0 keeps the client optimizer)."""
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def optimizer_state_at(param: torch.nn.Parameter, optimizer, key: str) -> torch.Tensor | None:
    """The full optimizer state ``key`` of ``param`` (collective under ZeRO 1/2), for tests."""
    from deepspeed.utils import safe_get_full_optimizer_state

    if hasattr(param, "_hp_mapping"):  # ZeRO 1/2: every rank must call (all-reduce inside)
        return safe_get_full_optimizer_state(param, key)
    state = _torch_optimizer(optimizer).state.get(param, {})
    return state.get(key)
