"""AdapMTL (Xiang et al., ACM MM 2024): sparsity learned by soft thresholds, one per
component, instead of scored and voted (docs/design.md, "AdapMTL").

Training starts dense. Every thresholded layer computes with
``sign(w) * relu(|w| - sigmoid(s_c))`` (``dsparse.sparsity.soft_threshold``); the ``s_c``
train in their own optimizer group with their own weight decay. After every step the
sparsity of the effective weights is counted over all masked layers (the same count on
every rank: it is all-reduced), and once it reaches the target the thresholds freeze: their
gradient is zeroed and their optimizer state and weight decay cleared, so no optimizer
moves them again, while the weights keep training. After the last step the effective
weights are written into the model and projected to exactly the requested sparsity by
magnitude, and the run ends as an ordinary masked model (evaluation, export and analysis
see nothing else).
"""

from __future__ import annotations

import logging

import torch

from dsparse.distributed import all_reduce_sum
from dsparse.models import prunable_parameters, unwrap_model
from dsparse.sparsity.block.geometry import mask_units
from dsparse.sparsity.components import components
from dsparse.sparsity.masks import MaskSet
from dsparse.sparsity.methods.base import (MaskInputs, Method, first_conv, refuse_score_init, register_method,
                                           verify_masks_agree)
from dsparse.sparsity.soft_threshold import (THRESHOLDS, SoftThresholds, attach_soft_thresholds, effective_weights,
                                             release_layers, soft_threshold, threshold_key, thresholded_layers)
from dsparse.sparsity.vote import layer_floors

__all__ = ["AdapMTL", "project_exact"]

log = logging.getLogger("dsparse.sparsity")

GROUP = THRESHOLDS
"""Name of the thresholds' optimizer parameter group."""


def project_exact(effective: dict[str, torch.Tensor], raw: dict[str, torch.Tensor], keep: int,
                  floors: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    """Keep masks holding exactly ``keep`` of the weights: the largest ``|effective|``, ties
    (the many zeros above all) broken by the larger ``|raw|``, then by the smaller position
    in the concatenation of the FQNs in ``effective``'s order; so the same weights give the
    same masks on every rank and device. ``floors[fqn]`` (``layer_floors``): the layer
    first keeps its best that many in the same order, the rest of ``keep`` follows the order.

    Raises:
        ValueError: ``keep`` outside [0, number of weights], or below what the floors keep.
    """
    names = list(effective)
    sizes = [effective[n].numel() for n in names]
    total = sum(sizes)
    if not 0 <= keep <= total:
        raise ValueError(f"cannot keep {keep:,} of {total:,} weights")
    primary = torch.cat([effective[n].detach().abs().flatten().float().cpu() for n in names])
    secondary = torch.cat([raw[n].detach().abs().flatten().float().cpu() for n in names])
    order = torch.sort(secondary, descending=True, stable=True).indices
    order = order[torch.sort(primary[order], descending=True, stable=True).indices]
    flat = torch.zeros(total, dtype=torch.bool)
    if floors:
        counts = torch.tensor([min(floors.get(n, 0), size) for n, size in zip(names, sizes)])
        if int(counts.sum()) > keep:
            raise ValueError(f"the layer floors keep {int(counts.sum()):,} weights, more than the {keep:,} the target "
                             "keeps; lower sparsity.target or sparsity.min_density")
        layer = torch.repeat_interleave(torch.arange(len(names)), torch.tensor(sizes))[order]
        by_layer = torch.sort(layer, stable=True)  # each layer's weights in the order, layer by layer
        starts = torch.cumsum(torch.tensor(sizes), 0) - torch.tensor(sizes)
        within = torch.arange(total) - starts[by_layer.values]
        flat[order[by_layer.indices[within < counts[by_layer.values]]]] = True
        order = order[~flat[order]]
        keep -= int(counts.sum())
    flat[order[:keep]] = True
    return {n: part.view(effective[n].shape).to(effective[n].device)
            for n, part in zip(names, torch.split(flat, sizes))}


@register_method("adapmtl")
class AdapMTL(Method):
    """Learned per-component soft thresholds, frozen at the target, projected at the end."""

    dynamic = True
    takes_masks = False
    starts_from = "the dense model (its learned thresholds make the masks)"

    def __init__(self):
        self.reached_at: int | None = None
        """The step whose sparsity reached the target (the thresholds froze after it)."""
        self.projected_at: int | None = None
        self.trained: dict | None = None
        """Sparsity of the effective weights at the projection: overall and per component."""
        self.layers: dict[str, str] = {}
        """Weight FQN -> component, of every thresholded layer."""
        self.thresholds: SoftThresholds | None = None
        self._modules: dict[str, torch.nn.Module] = {}
        self._component: dict[str, str] = {}
        """Masked weight FQN -> component (every masked layer, the dense ones included)."""
        self._names: list[str] = []
        self._settings = None

    def check(self, settings) -> None:
        if settings.granularity != "element":
            raise ValueError(f"sparsity.method adapmtl thresholds single weights by magnitude; it supports "
                             f"sparsity.granularity=element only, not {settings.granularity} (for block or channel "
                             "sparsity use disparse, snip, random, magnitude or lottery)")
        if settings.masks is not None:
            raise ValueError("sparsity.method adapmtl learns its masks from the dense model; it cannot take "
                             "sparsity.masks (use a static method for a mask file)")
        if settings.criterion is not None:
            raise ValueError("sparsity.method adapmtl scores no weights: sparsity.criterion has no effect with it "
                             "(leave it out)")
        if settings.score_init == "xavier":
            refuse_score_init(self.name)

    def initial_masks(self, model: torch.nn.Module, inputs: MaskInputs) -> MaskSet:
        """All weights kept (the thresholds prune during training); the trained weights of
        ``sparsity.from_checkpoint`` are loaded first when given."""
        self.check(inputs.settings)
        if inputs.pretrained is not None:
            model.load_state_dict(inputs.pretrained())
        settings = inputs.settings
        weights = prunable_parameters(unwrap_model(model))
        dense = [first_conv(model)] if settings.first_conv_dense(dynamic=True) else []
        masks = {n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()}
        total = sum(w.numel() for w in weights.values())
        units = mask_units("element", settings.block, {n: tuple(w.shape) for n, w in weights.items()})
        meta = {"method": self.name, "criterion": None, "scope": "learned", "sparsity_requested": settings.target,
                "sparsity_achieved": 0.0, "keep_ratio": 1.0, "dense_layers": dense, "num_kept": total,
                "num_total": total, "projected": False, **units.meta()}
        return MaskSet(masks=masks, meta=meta)

    def attach(self, state) -> None:
        """Threshold every masked layer but the dense ones, one threshold per component; a
        run resumed after its projection gets the thresholds (its checkpoint holds them)
        but plain layers."""
        self._settings = state.inputs.settings
        dense = set(state.masks.meta.get("dense_layers", []))
        self._component = component = components(state.users)
        self._names = list(dict.fromkeys(component[fqn] for fqn in state.masks.masks))
        self.layers = {fqn: component[fqn] for fqn in state.masks.masks if fqn not in dense}
        users = {component[fqn]: state.users[fqn] for fqn in self.layers}
        model = unwrap_model(state.model)
        self.thresholds = attach_soft_thresholds(model, self.layers, users, self._settings.adapmtl.sinit)
        self._modules = thresholded_layers(model)
        if self.projected_at is not None:
            release_layers(model)
        for parameter in self.thresholds.parameters():
            parameter.register_hook(self._threshold_gradient)

    @property
    def frozen(self) -> bool:
        """The thresholds no longer train: the target was reached, or the run was projected."""
        return self.reached_at is not None or self.projected_at is not None

    def _threshold_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(grad) if self.frozen else grad

    def param_groups(self) -> list[dict]:
        decay = 0.0 if self.frozen else self._settings.adapmtl.threshold_weight_decay
        return [{"params": list(self.thresholds.parameters()), "weight_decay": decay, "name": GROUP}]

    # --- training ---------------------------------------------------------------------

    def measure(self, state) -> dict:
        """Sparsity of the effective weights over all masked layers (dense ones count as
        kept), overall and per component; the rank mean, so every rank decides alike."""
        component, names = self._component, self._names
        device = next(self.thresholds.parameters()).device
        counts = torch.zeros(2, len(names), dtype=torch.float64, device=device)
        with torch.no_grad():
            thresholds = {c: m() for c, m in self.thresholds.components.items()}
            for fqn, mask in state.masks.masks.items():
                index = names.index(component[fqn])
                counts[1, index] += mask.numel()
                if fqn in self.layers:
                    counts[0, index] += (self._modules[fqn].weight.abs() <= thresholds[self.layers[fqn]]).sum()
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        zeros, totals = (all_reduce_sum(counts) / world).tolist()
        return {"sparsity": sum(zeros) / sum(totals),
                "components": {c: z / t for c, z, t in zip(names, zeros, totals)},
                "thresholds": {c: float(t) for c, t in thresholds.items()}}

    def update(self, step: int, batches: list[dict], state) -> dict | None:
        """Count the sparsity after every step, freeze the thresholds at the target, and
        project after the last step; returns statistics every ``sparsity.interval`` steps,
        at the freeze and at the projection."""
        if self.projected_at is not None:
            return None  # an ordinary masked model now (a run resumed with more iterations)
        settings = state.inputs.settings
        if self.frozen:
            state.optimizer.param_group(GROUP)["weight_decay"] = 0.0  # whatever a restored optimizer says
        measured = self.measure(state)
        froze = not self.frozen and measured["sparsity"] >= settings.target
        if froze:
            self.reached_at = step
            self._freeze(state)
            log.info("AdapMTL: sparsity %.4f reached the target %.4f at step %d; thresholds frozen at %s",
                     measured["sparsity"], settings.target, step,
                     ", ".join(f"{c} {t:.4g}" for c, t in measured["thresholds"].items()))
        if step >= state.inputs.total_steps:
            return self._project(state, step, measured)
        if froze or step % settings.interval == 0:
            if not froze:
                log.info("AdapMTL: step %d sparsity %.4f of target %.4f (%s)", step, measured["sparsity"],
                         settings.target, ", ".join(f"{c} {s:.3f}" for c, s in measured["components"].items()))
            return self._metrics(measured)
        return None

    def _freeze(self, state) -> None:
        """Stop the thresholds: zero gradient (the hook), no weight decay, no optimizer state."""
        state.optimizer.param_group(GROUP)["weight_decay"] = 0.0
        for parameter in self.thresholds.parameters():
            state.optimizer.zero_state_(parameter)

    def _project(self, state, step: int, measured: dict) -> dict:
        """Write the effective weights into the model, prune them to exactly the target by
        magnitude, and make the layers plain masked ones."""
        settings = state.inputs.settings
        if self.reached_at is None:
            log.warning("WARNING: AdapMTL's thresholds reached sparsity %.4f of the target %.4f by the last step "
                        "(%d); the projection pruned the rest by magnitude, without training after it. Raise "
                        "sparsity.adapmtl.threshold_weight_decay or sparsity.adapmtl.sinit, or train longer "
                        "(sweeps/adapmtl_thresholds.yaml sweeps both)", measured["sparsity"], settings.target, step)
            self._freeze(state)  # constant from here, were the run continued
        model = unwrap_model(state.model)
        effective = effective_weights(model)
        weights = prunable_parameters(model)
        masks = state.masks
        num_dense = sum(masks.masks[fqn].numel() for fqn in masks.masks if fqn not in self.layers)
        keep = round((1.0 - settings.target) * masks.num_total) - num_dense
        floors = layer_floors({fqn: w.numel() for fqn, w in effective.items()}, settings.floor_density())
        kept = project_exact(effective, {fqn: weights[fqn] for fqn in effective}, keep, floors)
        for fqn, values in effective.items():
            state.optimizer.write_(weights[fqn], values)
        release_layers(model)
        state.applier.update(kept, {fqn: ~mask for fqn, mask in kept.items()}, state.optimizer)
        num_kept = masks.num_kept
        masks.meta.update(num_kept=num_kept, sparsity_achieved=1.0 - num_kept / masks.num_total,
                          keep_ratio=num_kept / masks.num_total, projected=True, min_density=settings.floor_density(),
                          layers_at_floor=[fqn for fqn, count in floors.items() if int(kept[fqn].sum()) <= count])
        verify_masks_agree(masks)
        self.projected_at = step
        self.trained = {"sparsity": measured["sparsity"], "components": measured["components"]}
        log.info("AdapMTL: projected at step %d from trained sparsity %.4f to %.4f", step, measured["sparsity"],
                 masks.sparsity)
        return {**self._metrics(measured), "sparsity/achieved": masks.sparsity}

    @staticmethod
    def _metrics(measured: dict) -> dict:
        return {"sparsity/trained": measured["sparsity"],
                **{f"sparsity/trained/{c}": s for c, s in measured["components"].items()},
                **{f"adapmtl/threshold/{c}": t for c, t in measured["thresholds"].items()}}

    # --- state --------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"reached_at": self.reached_at, "projected_at": self.projected_at, "trained": self.trained,
                "layers": dict(self.layers)}

    def load_state_dict(self, state: dict) -> None:
        if "layers" not in state:
            raise ValueError("the checkpoint's sparsity state has no AdapMTL state; resume with the method the run "
                             "was started with")
        self.reached_at, self.projected_at, self.trained = state["reached_at"], state["projected_at"], state["trained"]

    @classmethod
    def plain_weights(cls, weights: dict[str, torch.Tensor], state: dict) -> dict[str, torch.Tensor]:
        """Without the thresholds; before the projection (a checkpoint mid-run) each
        thresholded weight becomes the effective weight the run computed with."""
        plain = {key: value for key, value in weights.items() if not key.startswith(THRESHOLDS + ".")}
        if state.get("projected_at") is None:
            for fqn, component in state["layers"].items():
                threshold = torch.sigmoid(weights[threshold_key(component)].float())
                plain[fqn] = soft_threshold(weights[fqn].float(), threshold).to(weights[fqn].dtype)
        return plain

    def summary(self, state) -> dict:
        settings = state.inputs.settings
        trained = self.trained or {}
        return {"adapmtl": {"sinit": settings.adapmtl.sinit,
                            "threshold_weight_decay": settings.adapmtl.threshold_weight_decay,
                            "target_reached": self.reached_at is not None, "reached_at": self.reached_at,
                            "projected_at": self.projected_at,
                            "trained_sparsity": trained.get("sparsity"),
                            "trained_components": trained.get("components"),
                            "thresholds": self.thresholds.values()}}
