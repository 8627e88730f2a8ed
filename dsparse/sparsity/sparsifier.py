"""The Sparsifier: one object owns a run's sparsity, shaped like ``torch.optim``.

    sparsifier = build_sparsifier(config.sparsity, inputs, masks_out=run.masks)
    sparsifier.load_state_dict(state)          # resuming: the checkpoint's masks
    model = sparsifier.prepare(model)          # masks made/loaded and applied, before DeepSpeed
    engine = deepspeed.initialize(model=model, ...)
    sparsifier.bind(engine.optimizer)          # where optimizer state lives (torch or ZeRO 1/2)
    for step ...:
        ...; engine.step()
        report = sparsifier.step(step + 1, batch)   # dynamic updates when due
    save(sparsifier.state_dict())              # in every checkpoint

A dense run gets the no-op :class:`Sparsifier`, so the training loop has no sparsity
branches. :class:`MaskedSparsifier` holds the masks, the method that makes and changes
them, and the applier that enforces them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dsparse.distributed import barrier, is_main
from dsparse.io import atomic_path, load_tensor_file
from dsparse.kernels import resolve_kernel
from dsparse.models import parameter_users, prunable_parameters, unwrap_model
from dsparse.sparsity.appliers import (BlockApplier, ChannelApplier, ElementApplier, MaskApplier,
                                       count_pruned_nonzeros)
from dsparse.sparsity.block.geometry import BlockUnits, MaskUnits, mask_units
from dsparse.sparsity.block.layers import BlockSparseLayer
from dsparse.sparsity.block.vote import row_floors
from dsparse.sparsity.components import component_sparsity
from dsparse.sparsity.masks import MaskSet
from dsparse.sparsity.methods import MaskInputs, Method, first_conv, get_method, method_class
from dsparse.sparsity.optim_state import OptimizerState, bind_optimizer
from dsparse.sparsity.vote import layer_floors

if TYPE_CHECKING:  # the config imports the methods to validate itself
    from dsparse.config import SparsityConfig

__all__ = ["STATE_FILE", "MaskState", "MaskedSparsifier", "Sparsifier", "build_sparsifier",
           "check_granularity", "check_target_count", "checkpoint_masks", "empty_layers", "plain_weights",
           "read_sparsifier_state",
           "swap_sparse_layers"]

log = logging.getLogger("dsparse.sparsity")

STATE_FILE = "sparsity.pt"
"""The Sparsifier's state in every checkpoint directory."""
STATE_FORMAT = "dsparse-sparsifier"
STATE_VERSION = 1


class Sparsifier:
    """A dense run: nothing is masked. Subclasses keep the same calls."""

    def check(self, model: torch.nn.Module) -> None:
        """Refuse what ``prepare`` would refuse about ``model`` without changing or writing anything."""

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """Make, load or initialise masks and apply them; call before DeepSpeed wraps ``model``."""
        return model

    def param_groups(self) -> list[dict]:
        """Optimizer parameter groups of parameters the method added to the prepared model
        (AdapMTL's thresholds); ``build_engine`` puts the model's other parameters first."""
        return []

    def bind(self, optimizer) -> None:
        """Remember where the optimizer keeps state (``engine.optimizer`` or a torch optimizer)."""

    def begin_step(self, step: int, batch: dict) -> None:
        """Call before the forward of the training step that ``step`` counts (1-based), with
        its batch: a mask update at the end of the step reuses the step's own gradients."""

    def step(self, step: int, batch: dict | list[dict]) -> dict | None:
        """Call after every optimizer step with the finished step count and its batch;
        returns statistics to log when the masks changed."""
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError("the checkpoint holds sparsity masks but the config has no sparsity.method; resume "
                             "with the sparsity settings the run was started with")

    def save(self, checkpoint_dir: Path) -> None:
        """Write ``state_dict()`` into a checkpoint being published (rank 0)."""

    def log_start(self, tracker, table: Path) -> None:
        """Log what the masks are to the run's tracker, with their per-layer table written
        to ``table`` (rank 0)."""

    def summary(self) -> dict | None:
        return None

    def sparsity_metrics(self) -> dict[str, float]:
        """Sparsity metrics for the tracker, overall and per component (at the start and the end of a run)."""
        return {}


@dataclass
class MaskState:
    """What a method's update works on: the model, its masks, the applier enforcing them,
    the optimizer's state and the run's inputs."""

    model: torch.nn.Module
    masks: MaskSet
    applier: MaskApplier
    optimizer: OptimizerState | None
    inputs: MaskInputs
    users: dict[str, frozenset[str]]
    """Weight FQN -> tasks using it, read from the model before any layer was swapped."""
    units: MaskUnits
    capture: dict | None = None
    """A method's record of the current training step (growth from the step's own gradients)."""


class MaskedSparsifier(Sparsifier):
    """A sparse run: ``method`` makes (and maybe changes) the masks, an applier enforces them.

    Args:
        method: the run's method (see ``dsparse.sparsity.methods.METHODS``); None when the
            masks come only from ``masks``.
        inputs: tasks, settings, seed, data and pretrained weights for the method.
        masks: masks to use instead of making them (``sparsity.masks``).
        masks_out: where the starting masks are written on rank 0 (a run's
            ``RunLayout.masks``), or None.
    """

    def __init__(self, method: Method | None, inputs: MaskInputs, *, masks: MaskSet | None = None,
                 masks_out: Path | None = None):
        self.method, self.inputs, self.masks_out = method, inputs, masks_out
        self._given = masks
        self._resumed = False
        self.state: MaskState | None = None
        self.empty_layers: list[str] = []

    @property
    def masks(self) -> MaskSet:
        return self.state.masks if self.state is not None else self._given

    def check(self, model: torch.nn.Module) -> None:
        if self._given is not None:
            self._given.check_matches(model)
        settings = self.inputs.settings
        if settings.granularity == "block":
            weight = next(unwrap_model(model).parameters())
            resolve_kernel(settings.kernel, weight.device, weight.dtype, settings.block)

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        settings = self.inputs.settings
        if self._given is None:
            check_target_count(settings.target, prunable_parameters(unwrap_model(model)))
        masks = self._given if self._given is not None else self.method.initial_masks(model, self.inputs)
        check_granularity(masks, settings, "the masks")
        weights = prunable_parameters(unwrap_model(model))
        users = parameter_users(model)
        shapes = {n: tuple(w.shape) for n, w in weights.items()}
        if settings.granularity == "channel":  # the model is rebuilt smaller, in place
            masks.check_matches(model)
            units, applier = mask_units("element", settings.block, shapes), ChannelApplier(model, masks)
        else:
            units = mask_units(settings.granularity, settings.block, shapes)
            applier = (BlockApplier(model, masks, units, settings.kernel) if isinstance(units, BlockUnits)
                       else ElementApplier(model, masks))
        if self._given is not None and not self._resumed and settings.granularity != "channel":
            refuse_below_floor(masks, units, settings.floor_density(), {n: users[n] for n in weights})
        self.state = MaskState(model, masks, applier, None, self.inputs, {n: users[n] for n in weights}, units)
        if self.method is not None:
            self.method.attach(self.state)
        self.empty_layers = empty_layers(masks)
        at_floor = masks.meta.get("layers_at_floor") or []
        if at_floor and not self._resumed:
            log.info("floors (sparsity.min_density %s) hold %d layer(s) the vote alone would have pruned further: %s",
                     masks.meta.get("min_density"), len(at_floor), ", ".join(at_floor))
        if self.empty_layers and not self._resumed:
            warn_empty_layers(self.empty_layers, masks, self.state.users, first_conv(unwrap_model(model)))
        if not self._resumed and self.masks_out is not None:
            if is_main():
                masks.save(self.masks_out)
            barrier()
        return model

    def param_groups(self) -> list[dict]:
        return self.method.param_groups() if self.method is not None else []

    def bind(self, optimizer) -> None:
        self.state.optimizer = bind_optimizer(optimizer)

    def begin_step(self, step: int, batch: dict) -> None:
        if self.method is not None:
            self.method.begin_step(step, batch, self.state)

    def step(self, step: int, batch: dict | list[dict]) -> dict | None:
        if self.method is None:
            return None
        return self.method.update(step, batch if isinstance(batch, list) else [batch], self.state)

    def state_dict(self) -> dict:
        state = {"format": STATE_FORMAT, "version": STATE_VERSION, "masks": self.masks.state_dict()}
        if self.method is not None and (method := self.method.state_dict()):
            state["method"] = method
        return state

    def load_state_dict(self, state: dict) -> None:
        """Resume from a checkpoint's state; call before ``prepare``."""
        if not state:
            raise ValueError("the checkpoint has no sparsity state but the config asks for sparsity.method "
                             f"{self.inputs.settings.method!r}; resume with the settings the run was started with")
        if state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
            raise ValueError(f"sparsity state of format {state.get('format')!r} version {state.get('version')!r}; "
                             f"this dsparse reads {STATE_FORMAT!r} version {STATE_VERSION}")
        if self.state is not None:
            raise RuntimeError("load_state_dict must come before prepare")
        self._given = MaskSet.from_state_dict(state["masks"])
        if self.method is not None:
            self.method.load_state_dict(state.get("method", {}))
        self._resumed = True

    def save(self, checkpoint_dir: Path) -> None:
        with atomic_path(Path(checkpoint_dir) / STATE_FILE) as temporary:
            torch.save(self.state_dict(), temporary)

    def log_start(self, tracker, table: Path) -> None:
        meta = self.masks.meta
        tracker.log_params({f"masks.{key}": meta.get(key) for key in  # as derived, beside the config
                            ("method", "criterion", "scope", "keep_ratio", "sparsity_achieved")})
        tracker.log_metrics({"sparsity/keep_ratio": meta["keep_ratio"], "sparsity/empty_layers": len(self.empty_layers),
                             "sparsity/layers_at_floor": len(meta.get("layers_at_floor") or []),
                             **self.sparsity_metrics()}, 0)
        if self.empty_layers:
            tracker.set_tags({"sparsity.empty_layers": ", ".join(self.empty_layers)[:5000],
                              "sparsity.cut_off_tasks": ", ".join(cut_off_tasks(self.empty_layers, self.state.users))})
        table.write_text(self.masks.format_table(self.state.users) + "\n")
        tracker.log_artifact(table)

    def summary(self) -> dict:
        meta = self.masks.meta
        result = {"method": meta.get("method"), "criterion": meta.get("criterion"),
                  "requested": meta.get("sparsity_requested"), "achieved": self.masks.sparsity,
                  "keep_ratio": meta.get("keep_ratio"),
                  "granularity": meta.get("granularity", "element"), "block": meta.get("block"),
                  "pruned_nonzeros": count_pruned_nonzeros(self.state.applier.weights(), self.masks),
                  "empty_layers": empty_layers(self.masks),
                  "min_density": meta.get("min_density"), "layers_at_floor": meta.get("layers_at_floor"),
                  "cut_off_tasks": cut_off_tasks(empty_layers(self.masks), self.state.users),
                  "components": component_sparsity(self.masks.masks, self.state.users)}
        if self.method is not None:
            result.update(self.method.summary(self.state))
        return result


    def sparsity_metrics(self) -> dict[str, float]:
        return {"sparsity/achieved": self.masks.sparsity,
                **{f"sparsity/component/{name}": entry["sparsity"]
                   for name, entry in component_sparsity(self.masks.masks, self.state.users).items()}}


def check_target_count(target: float, weights: dict[str, torch.Tensor]) -> None:
    """Refuse a target that keeps no weight or prunes none of the model's prunable weights
    (both would train "complete" with nothing meant: an empty network, or a dense one).

    Raises:
        ValueError: naming the counts and the targets that make sense for this model.
    """
    total = sum(w.numel() for w in weights.values())
    keep = round((1.0 - target) * total)
    if keep == 0 or keep == total:
        raise ValueError(f"sparsity.target {target} {'keeps none' if keep == 0 else 'prunes none'} of the model's "
                         f"{total:,} prunable weights (round((1 - target) x {total:,}) = {keep:,}); use a target "
                         f"between {1.5 / total:.2g} and {1 - 1.5 / total:.9g}")


def empty_layers(masks: MaskSet) -> list[str]:
    """The masked layers that keep no weight at all."""
    return [fqn for fqn, mask in masks.masks.items() if not bool(mask.any())]


def layers_below_floor(masks: MaskSet, units: MaskUnits, min_density: float) -> list[str]:
    """The masked layers that keep fewer than their floor: ``layer_floors`` of the layer's
    weights (element masks) or ``row_floors`` blocks in some block row (block masks)."""
    if min_density <= 0:
        return []
    if isinstance(units, BlockUnits):
        floors = row_floors(units, min_density)
        return [fqn for fqn, mask in masks.masks.items()
                if bool((units.unit_mask(fqn, mask).sum(dim=1) < floors[fqn]).any())]
    floors = layer_floors({fqn: mask.numel() for fqn, mask in masks.masks.items()}, min_density)
    return [fqn for fqn, mask in masks.masks.items() if int(mask.sum()) < floors[fqn]]


def refuse_below_floor(masks: MaskSet, units: MaskUnits, min_density: float,
                       users: dict[str, frozenset[str]]) -> None:
    """Given masks (``sparsity.masks``) must meet the run's floors, or the run says so and stops.

    Raises:
        ValueError: naming the layers below their floor, the tasks cut off, and the way out.
    """
    below = layers_below_floor(masks, units, min_density)
    if below:
        tasks = cut_off_tasks(empty_layers(masks), users)
        raise ValueError(f"the given masks keep less than the floor (sparsity.min_density {min_density}) in "
                         f"{len(below)} layer(s): {', '.join(below[:8])}{' ...' if len(below) > 8 else ''}"
                         + (f"; task(s) {', '.join(tasks)} lose a layer of their own" if tasks else "") +
                         "; make the masks with the floors (dsparse prune), or set sparsity.min_density=0 to "
                         "train them as they are")


def cut_off_tasks(empty: list[str], users: dict[str, frozenset[str]]) -> list[str]:
    """Tasks some of whose own layers (used by that task alone, e.g. its head) keep no
    weight: everything after such a layer is a constant, so the task predicts from biases."""
    return sorted({task for fqn in empty if len(users.get(fqn, ())) == 1 for task in users[fqn]})


def warn_empty_layers(layers: list[str], masks: MaskSet, users: dict[str, frozenset[str]], stem: str) -> None:
    """Say loudly that whole layers are gone: a layer on the only path to a head (the stem
    above all, or a task's own head) makes what follows it a constant."""
    tasks = cut_off_tasks(layers, users)
    log.warning("WARNING: %d of %d masked layers keep no weight: %s.%s%s Recorded as sparsity.empty_layers in "
                "summary.json and MLflow. Lower sparsity.target, or use smaller blocks or element masks%s",
                len(layers), len(masks.masks), ", ".join(layers),
                " The stem is empty: the network never sees its input." if stem in layers else "",
                f" Task(s) {', '.join(tasks)} lose a layer of their own: they predict constants." if tasks else "",
                ", or keep the stem dense (sparsity.keep_first_dense=true)" if stem in layers else "")


def check_granularity(masks: MaskSet, settings: SparsityConfig, where: str) -> None:
    """Refuse masks whose granularity or block size differs from the run's settings.

    Raises:
        ValueError: naming both and how to make them agree.
    """
    granularity = masks.meta.get("granularity", "element")
    block = masks.meta.get("block") if granularity == "block" else None
    wanted = settings.block if settings.granularity == "block" else None
    if granularity != settings.granularity or block != wanted:
        def name(kind, size):
            return f"block masks (block {size})" if kind == "block" else f"{kind} masks"

        have, want = name(granularity, block), name(settings.granularity, wanted)
        fix = (f"sparsity.granularity=block sparsity.block={block}" if granularity == "block"
               else f"sparsity.granularity={granularity}")
        raise ValueError(f"{where} hold {have} but the config asks for {want}; set {fix} to use them, or make "
                         f"new masks with the config's settings")


def swap_sparse_layers(model: torch.nn.Module, masks: MaskSet | None,
                       kernel: str = "auto") -> dict[str, BlockSparseLayer]:
    """Give ``model`` the layer structure a checkpoint's weights were saved from, in place:
    block-sparse layers (running ``kernel``, see ``sparsity.kernel``) where ``masks`` (a
    checkpoint's) are block masks, the rebuilt smaller layers where they are channel masks.

    Returns:
        FQN -> the block-sparse layer now in its place ({} for element masks or None).
    """
    if masks is not None and masks.meta.get("granularity") == "channel":
        ChannelApplier(model, masks)  # the smaller dense layers the checkpoint holds
        return {}
    if masks is None or masks.meta.get("granularity", "element") != "block":
        return {}
    shapes = {n: tuple(w.shape) for n, w in prunable_parameters(unwrap_model(model)).items()}
    return BlockApplier(model, masks, mask_units("block", masks.meta["block"], shapes), kernel).layers


def plain_weights(weights: dict[str, torch.Tensor], state: dict) -> dict[str, torch.Tensor]:
    """The weights a plain model of the run's architecture computes the same with, from a
    checkpoint's model ``weights`` and its Sparsifier ``state`` (AdapMTL's thresholds are
    folded into the weights, see ``Method.plain_weights``)."""
    if not state or "method" not in state:
        return weights
    return method_class(state["masks"]["meta"]["method"]).plain_weights(weights, state["method"])


def checkpoint_masks(state: dict) -> MaskSet | None:
    """The masks of a saved Sparsifier state (``read_sparsifier_state``), None for a dense run's."""
    return MaskSet.from_state_dict(state["masks"], "the checkpoint's sparsity state") if state else None


def read_sparsifier_state(checkpoint_dir: Path) -> dict:
    """The Sparsifier state saved in a checkpoint directory ({} for a dense run's).

    Checkpoints written before the Sparsifier kept their masks in ``masks.pt`` beside the
    checkpoint (dynamic runs) or in the run directory (static runs); those are read too.
    """
    checkpoint_dir = Path(checkpoint_dir)
    path = checkpoint_dir / STATE_FILE
    if not path.is_file():
        # where older versions kept them: in the checkpoint (dynamic runs), in the run (static ones)
        for legacy in (checkpoint_dir / "masks.pt", checkpoint_dir.parent.parent / "masks.pt"):
            if legacy.is_file():
                return {"format": STATE_FORMAT, "version": STATE_VERSION, "masks": MaskSet.load(legacy).state_dict()}
        return {}
    return load_tensor_file(path, "sparsity state", "the checkpoint is damaged: resume from an earlier one")


def build_sparsifier(settings: SparsityConfig, inputs: MaskInputs, *, masks_out: Path | None = None) -> Sparsifier:
    """The Sparsifier of a run's ``sparsity`` section: no-op when dense.

    Raises:
        ValueError: an unknown method, settings the method refuses, or an unreadable mask file.
    """
    if not settings.enabled:
        return Sparsifier()
    method = get_method(settings.method) if settings.method else None
    if method is not None:
        method.check(settings)
    masks = MaskSet.load(settings.masks) if settings.masks is not None else None
    if masks is not None:
        check_granularity(masks, settings, f"mask file {settings.masks}")
    return MaskedSparsifier(method, inputs, masks=masks, masks_out=masks_out)
