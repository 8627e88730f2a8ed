"""Mask appliers: keeping pruned weights at exactly zero through training (docs/design.md,
"Keeping pruned weights pruned").

An applier enforces a run's masks on its model; the Sparsifier picks it by
``sparsity.granularity``. Element masks use the gradient hooks below; block masks swap
masked layers for block-sparse ones that store only the kept blocks.

The element mechanism is a gradient hook on every masked weight that multiplies the gradient by
the mask *before* it is accumulated. DeepSpeed reads gradients after accumulation (into
its flat, partitioned ZeRO-1/2 buffers), so it only ever sees masked gradients. With a
zero weight and a zero gradient, every optimizer dsparse builds leaves the weight at zero:
Adam's moments stay zero (so its update is 0 / (0 + eps) = 0), L2 weight decay adds
``wd * 0``, AdamW's decoupled decay multiplies 0, SGD momentum stays 0. The fp32 master
copy of ZeRO therefore stays zero too, and no post-step copy into DeepSpeed's private
buffers is needed. ``tests/sparsity/test_sparse_training.py`` proves it for ZeRO 0, 1 and 2.
"""

from __future__ import annotations

import abc
import contextlib

import torch

from dsparse.models import prunable_parameters, unwrap_model
from dsparse.sparsity.block.layers import BlockSparseLayer, block_sparse_from_dense
from dsparse.sparsity.block.geometry import BlockUnits
from dsparse.sparsity.masks import MaskSet


class MaskApplier(abc.ABC):
    """Enforces a MaskSet on a model; built by the Sparsifier in ``prepare``.

    Methods see the model's prunable weights only through an applier, by FQN and in the
    weights' own shapes, whether the layer holds a dense weight or only kept blocks.
    """

    masks: MaskSet

    @abc.abstractmethod
    def weights(self) -> dict[str, torch.Tensor]:
        """FQN -> the weight's current values (detached; zeros where pruned)."""

    @contextlib.contextmanager
    def dense_gradients(self):
        """A context yielding FQN -> a tensor of the weight's shape to differentiate; its
        gradient is the dense one, pruned positions included (growth scores). The same
        targets as a capture, without recording a training backward."""
        targets = self.start_capture()
        try:
            yield targets
        finally:
            self.finish_capture()

    @abc.abstractmethod
    def start_capture(self) -> dict[str, torch.Tensor]:
        """Begin a training step that feeds growth: returns, like ``dense_gradients``, the
        tensors whose dense gradients ``autograd.grad`` may take on the step's graph. Call
        before the step's forward."""

    @abc.abstractmethod
    def arm_capture(self) -> None:
        """Record the dense gradients of the step's own (joint) backward, which comes next."""

    @abc.abstractmethod
    def finish_capture(self) -> dict[str, torch.Tensor]:
        """End the capture: FQN -> the dense gradient the joint backward produced (this rank's)."""

    @abc.abstractmethod
    def update(self, masks: dict[str, torch.Tensor], reset: dict[str, torch.Tensor], optimizer) -> None:
        """Enforce changed masks: ``reset`` positions (dropped and grown) restart at zero
        weight and zero optimizer state (``OptimizerState``), then ``masks`` take effect."""


class ElementApplier(MaskApplier):
    """Zeroes pruned weights once and masks their gradients from then on.

    Attach to the plain model *before* wrapping it in DeepSpeed, or to ``engine.module``.
    """

    def __init__(self, model: torch.nn.Module, masks: MaskSet):
        self.masks = masks
        model = unwrap_model(model)
        masks.check_matches(model)
        masks.apply_(model)
        self._handles = []
        self._keep: dict[str, torch.Tensor] = {}
        self._enabled = True
        self._record: dict[str, torch.Tensor] | None = None
        self._weights = prunable_parameters(model)
        for name, mask in masks.masks.items():
            weight = self._weights[name]
            self._keep[name] = mask.to(device=weight.device, dtype=weight.dtype)
            self._handles.append(weight.register_hook(lambda grad, name=name: self._mask(name, grad)))

    def _mask(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        if self._record is not None:  # the dense gradient, before masking (growth)
            self._record[name] = grad.detach().clone()
        # keep was made in the weight's dtype at attach time; DeepSpeed may cast weights
        # (bf16) afterwards, and a hook must not change the gradient's dtype
        return grad * self._keep[name].to(grad.dtype) if self._enabled else grad

    def weights(self) -> dict[str, torch.Tensor]:
        return {name: self._weights[name].detach() for name in self.masks.masks}

    def start_capture(self) -> dict[str, torch.Tensor]:
        self._enabled = False
        return {name: self._weights[name] for name in self.masks.masks}

    def arm_capture(self) -> None:
        self._enabled, self._record = True, {}

    def finish_capture(self) -> dict[str, torch.Tensor]:
        record, self._record, self._enabled = self._record or {}, None, True
        return record

    def update(self, masks: dict[str, torch.Tensor], reset: dict[str, torch.Tensor], optimizer) -> None:
        for name, positions in reset.items():
            if positions.any():
                optimizer.zero_(self._weights[name], positions)
        self.masks.masks.update(masks)
        self.refresh()

    def refresh(self) -> None:
        """Pick up masks changed in place in ``self.masks`` (dynamic sparsity): no new hooks."""
        for name, mask in self.masks.masks.items():
            self._keep[name].copy_(mask)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def count_pruned_nonzeros(weights: dict[str, torch.Tensor], masks: MaskSet) -> int:
    """Number of pruned positions whose weight is not exactly zero (0 when masks hold).

    Args:
        weights: FQN -> weight values (``applier.weights()`` or ``prunable_parameters``).
    """
    return sum(int(torch.count_nonzero(weights[name].detach()[~mask.to(weights[name].device)]))
               for name, mask in masks.masks.items())


class BlockApplier(MaskApplier):
    """Swaps every masked ``Linear``/``Conv2d`` for a block-sparse layer holding only its
    kept blocks (``dsparse.sparsity.block.layers``), by FQN, in place in ``model``.

    A layer whose mask keeps every block stays the standard layer (nothing to skip);
    dynamic updates never change such layers (dense and ERK-capped layers).
    """

    def __init__(self, model: torch.nn.Module, masks: MaskSet, units: BlockUnits, kernel: str = "auto"):
        self.masks, self.units = masks, units
        model = unwrap_model(model)
        masks.check_matches(model)
        modules = dict(model.named_modules())
        self._dense = prunable_parameters(model)
        self._record: dict[str, torch.Tensor] | None = None
        self._capture_handles: list = []
        self.layers: dict[str, BlockSparseLayer] = {}
        for fqn, mask in masks.masks.items():
            block_mask = units.unit_mask(fqn, mask)
            if bool(block_mask.all()):
                continue
            path = fqn.rsplit(".", 1)[0]
            layer = block_sparse_from_dense(modules[path], units.block, block_mask, kernel)
            parent, _, attribute = path.rpartition(".")
            setattr(modules[parent] if parent else model, attribute, layer)
            self.layers[fqn] = layer
            del self._dense[fqn]

    def weights(self) -> dict[str, torch.Tensor]:
        return {name: self.layers[name].dense_weight() if name in self.layers else self._dense[name].detach()
                for name in self.masks.masks}

    def start_capture(self) -> dict[str, torch.Tensor]:
        """Probes for the block-sparse layers (in the coming forward's graph) and the whole
        weights of the others, each with a hook that records its gradient once armed."""
        self._record, self._capture_handles, targets = None, [], {}
        for name in self.masks.masks:
            if name in self.layers:
                targets[name] = self.layers[name].probe = self.layers[name].new_probe()
            else:
                targets[name] = self._dense[name]
            hook = targets[name].register_hook(lambda grad, name=name: self._keep_grad(name, grad))
            self._capture_handles.append(hook)
        return targets

    def _keep_grad(self, name: str, grad: torch.Tensor) -> None:
        if self._record is not None:
            self._record[name] = grad.detach().clone()

    def arm_capture(self) -> None:
        self._record = {}

    def finish_capture(self) -> dict[str, torch.Tensor]:
        for handle in self._capture_handles:
            handle.remove()
        for layer in self.layers.values():
            layer.probe = None
        record, self._record, self._capture_handles = self._record or {}, None, []
        return record

    def update(self, masks: dict[str, torch.Tensor], reset: dict[str, torch.Tensor], optimizer) -> None:
        for name, mask in masks.items():
            layer = self.layers.get(name)
            if layer is None:
                if not bool(mask.all()):
                    raise ValueError(f"{name!r} was kept whole as a standard layer and cannot be pruned later; "
                                     "block updates only move blocks within block-sparse layers")
                continue
            layout, grown_slots = layer.layout().reassign(self.units.unit_mask(name, mask))
            reset_blocks = (self.units.pool(name, reset[name].to(torch.int64)) > 0).to(layout.slot_rows.device)
            restart = grown_slots | reset_blocks[layout.slot_rows, layout.slot_cols]
            if restart.any():
                optimizer.zero_(layer.blocks, restart[:, None, None].expand_as(layer.blocks))
            layer.set_layout(layout)
        self.masks.masks.update(masks)


class ChannelApplier(MaskApplier):
    """Channel masks: the model is rebuilt with only the kept channels
    (``dsparse.sparsity.channel.shrink_model``), so nothing is left to enforce. ``weights``
    lays the smaller layers' weights back out in the dense shapes, zeros at the removed
    channels, so the checks and reports that read masked weights read these too. Static:
    no capture and no update."""

    def __init__(self, model: torch.nn.Module, masks: MaskSet):
        from dsparse.sparsity.channel.shrink import shrink_model

        self.masks = masks
        self.model = shrink_model(model, masks.meta["channels"])

    def weights(self) -> dict[str, torch.Tensor]:
        small = prunable_parameters(unwrap_model(self.model))
        dense = {}
        for fqn, mask in self.masks.masks.items():
            full = torch.zeros(mask.shape, dtype=small[fqn].dtype, device=small[fqn].device)
            full[mask.to(full.device)] = small[fqn].detach().flatten()
            dense[fqn] = full
        return dense

    def start_capture(self) -> dict[str, torch.Tensor]:
        raise RuntimeError("channel masks are static: a channel-pruned model has no growth to capture")

    def arm_capture(self) -> None:
        raise RuntimeError("channel masks are static")

    def finish_capture(self) -> dict[str, torch.Tensor]:
        raise RuntimeError("channel masks are static")

    def update(self, masks: dict[str, torch.Tensor], reset: dict[str, torch.Tensor], optimizer) -> None:
        raise RuntimeError("channel masks are static: they cannot change during training")

