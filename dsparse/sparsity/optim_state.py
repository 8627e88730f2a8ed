"""Zeroing weights *and* their optimizer state in place, wherever DeepSpeed keeps them.

When dynamic sparse training drops a weight it must become exactly zero, and when it grows
one its momentum and Adam moments must restart from zero (DESIGN.md section 4). Where that
state lives depends on the ZeRO stage:

* stage 0: the module parameter is the master weight; the torch optimizer keeps its state
  in ``optimizer.state[param]``.
* stages 1 and 2 (and bf16): DeepSpeed keeps an fp32 master copy and the optimizer state
  in flat buffers partitioned across ranks; each parameter carries ``_hp_mapping``, the
  address of its fragment in this rank's partition (possibly none). Zeroing the fragment
  in place touches only local memory: no collective, no copy of the model.
"""

from __future__ import annotations

import torch


def zero_positions_(param: torch.nn.Parameter, positions: torch.Tensor, optimizer) -> None:
    """Set ``param[positions]`` and its optimizer state at those positions to zero.

    Args:
        param: a parameter of the model wrapped by the DeepSpeed engine.
        positions: bool tensor of ``param``'s shape; True = zero it.
        optimizer: ``engine.optimizer`` (a ZeRO optimizer or the client torch optimizer).

    Raises:
        ValueError: for a ZeRO-3 partitioned parameter (not supported: masks need whole weights).
    """
    if hasattr(param, "ds_id"):
        raise ValueError("ZeRO stage 3 is not supported by dynamic sparsity; use deepspeed.zero_stage 0, 1 or 2")
    keep = (~positions).to(device=param.device, dtype=param.dtype)
    with torch.no_grad():
        param.mul_(keep)
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is not None:
            _zero_fragments(mapping, keep)
        else:
            _zero_torch_state(_torch_optimizer(optimizer), param, keep)


def _zero_fragments(mapping, keep: torch.Tensor) -> None:
    address = mapping.lp_fragment_address
    local_keep = keep.flatten().narrow(0, address.start, address.numel)
    keys = mapping.get_optim_state_keys() if mapping.optim_fragment else []
    for key in (None, *keys):  # None = the fp32 master weights
        fragment = mapping.get_hp_fragment(key)
        fragment.mul_(local_keep.to(fragment.dtype))


def _zero_torch_state(optimizer: torch.optim.Optimizer, param: torch.nn.Parameter, keep: torch.Tensor) -> None:
    for value in optimizer.state.get(param, {}).values():
        if torch.is_tensor(value) and value.shape == param.shape:
            value.mul_(keep.to(value.dtype))


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
