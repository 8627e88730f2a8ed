"""Sparse export: a trained sparse run as a file that stores only what its masks keep.

    dsparse export runs/NAME --out model.dsparse.pt       # library: export_run / load_sparse
    dsparse eval model.dsparse.pt [--data DIR]

The file (``torch.load(weights_only=True)`` reads it) holds the run's config, the model's
task channels, and per masked weight either its kept blocks with their layout (block
masks: ``blocks [S, B, B]`` plus ``slot_rows``/``slot_cols``) or its kept values with a
packed bit mask (element masks); everything else (biases, norms, unmasked layers) is
stored dense. A channel run is its smaller dense model, stored whole, with the channel
record from which ``load_sparse`` rebuilds that architecture. ``load_sparse`` rebuilds the model with block-sparse layers for block
masks, so it computes only the kept blocks; element masks load into dense layers with
zeros (nothing to skip).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dsparse.config import config_from_dict
from dsparse.extract import extract_tasks, rename
from dsparse.io import atomic_path, check_output_file, load_tensor_file
from dsparse.models import prunable_parameters
from dsparse.runs.components import build_configured_model
from dsparse.runs.restore import restore_run
from dsparse.sparsity.block.geometry import block_grid
from dsparse.sparsity.block.layers import BlockSparseConv2d, BlockSparseLayer, BlockSparseLinear
from dsparse.sparsity.block.layout import BlockLayout
from dsparse.sparsity.channel.shrink import shrink_model

__all__ = ["ExportReport", "export_run", "load_sparse"]

FORMAT = "dsparse-sparse-model"
VERSION = 1


@dataclass
class ExportReport:
    path: Path
    num_bytes: int
    dense_bytes: int
    """Bytes of the same model's dense fp32 state dict (what a dense checkpoint holds)."""
    sparsity: float
    granularity: str

    @property
    def ratio(self) -> float:
        return self.num_bytes / self.dense_bytes


def export_run(run: str | Path, out: str | Path, overwrite: bool = False, keep_tasks: list[str] | None = None,
               revote: bool = True) -> ExportReport:
    """Write the latest checkpoint of sparse run ``run`` as a sparse model file ``out``;
    with ``keep_tasks``, only those tasks (``dsparse.extract.extract_tasks``).

    Raises:
        ValueError: ``out`` exists (without ``overwrite``) or is a directory, no checkpoint,
            a dense run, or an unreadable config or data manifest.
    """
    check_output_file(out, overwrite)
    restored = restore_run(run)
    config, masks, layers, model, tasks = (restored.config, restored.masks, restored.sparse_layers, restored.model,
                                           restored.tasks)
    if keep_tasks is not None:
        extracted = extract_tasks(model, config, masks, tasks, keep_tasks, revote=revote)
        config, masks, tasks = extracted.config, extracted.masks, extracted.tasks
        layers = {rename(fqn, extracted.renamed): layer for fqn, layer in layers.items()
                  if rename(fqn, extracted.renamed) is not None}
    if masks is None:
        raise ValueError(f"{run} is a dense run (no sparsity state in {restored.checkpoint}), so there is nothing to "
                         "export sparsely; its checkpoint already holds the dense model")
    if masks.meta.get("granularity") == "channel":  # the unpruned model's size
        from dsparse.runs.components import build_run_model

        dense_bytes = _dense_bytes(build_run_model(config, tasks), {})
    else:
        dense_bytes = _dense_bytes(model, layers)
    payload = {"format": FORMAT, "version": VERSION, "config": config.to_dict(),
               "task_channels": {name: task.num_channels for name, task in tasks.items()},
               "masks_meta": masks.meta, "sparse": {}, "dense": {}}
    skip = set()
    channel = masks.meta.get("granularity") == "channel"  # the model is already the smaller dense one
    for fqn, mask in masks.masks.items() if not channel else ():
        layer = layers.get(fqn)
        module_path = fqn.rsplit(".", 1)[0]
        if layer is not None:
            payload["sparse"][fqn] = {"kind": "block", "shape": list(layer.weight_shape), "block": layer.block,
                                      "slot_rows": layer.slot_rows.to(torch.int32),
                                      "slot_cols": layer.slot_cols.to(torch.int32), "blocks": layer.blocks.detach()}
            skip.update(f"{module_path}.{name}" for name in ("blocks", "slot_rows", "slot_cols"))
        elif not bool(mask.all()):
            weight = prunable_parameters(model)[fqn].detach()
            payload["sparse"][fqn] = {"kind": "element", "shape": list(mask.shape),
                                      "bits": torch.from_numpy(np.packbits(mask.reshape(-1).numpy())),
                                      "values": weight[mask.to(weight.device)].clone()}
            skip.add(fqn)
    payload["dense"] = {k: v.detach() for k, v in model.state_dict().items() if k not in skip}
    out = Path(out)
    with atomic_path(out) as temporary:
        torch.save(payload, temporary)
    return ExportReport(out, out.stat().st_size, dense_bytes, masks.sparsity, masks.meta.get("granularity", "element"))


def load_sparse(path: str | Path, model: torch.nn.Module | None = None):
    """The model of an exported file, with block-sparse layers for block masks.

    Args:
        path: a file written by ``export_run``.
        model: load into this model (same architecture and tasks) instead of building one.

    Returns:
        (model, RunConfig of the exported run).

    Raises:
        ValueError: not an export file, another format version, or a model whose
            parameters do not match the file (naming them).
    """
    path = Path(path)
    payload = load_tensor_file(path, "export", "write it again with `dsparse export RUN --out FILE`")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a sparse model exported by `dsparse export`")
    if payload.get("version") != VERSION:
        raise ValueError(f"{path} has export version {payload.get('version')!r}; this dsparse reads {VERSION}")
    _check_entries(payload, path)
    config = config_from_dict(payload["config"])
    if model is None:
        model = build_configured_model(config.model, payload["task_channels"])
    if payload["masks_meta"].get("granularity") == "channel":
        try:
            shrink_model(model, payload["masks_meta"]["channels"])
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path} does not match the model: {error}") from None
    _check_model_matches(model, payload, path)
    modules = dict(model.named_modules())
    weights = prunable_parameters(model)
    for fqn, entry in payload["sparse"].items():
        if entry["kind"] == "element":
            mask = torch.from_numpy(np.unpackbits(entry["bits"].numpy(), count=weights[fqn].numel()).view(np.bool_))
            with torch.no_grad():
                weights[fqn].zero_()
                weights[fqn].view(-1)[mask.to(weights[fqn].device)] = entry["values"].to(weights[fqn].dtype)
            continue
        module_path = fqn.rsplit(".", 1)[0]
        layer = _block_layer(modules[module_path], entry)
        parent, _, attribute = module_path.rpartition(".")
        setattr(modules[parent] if parent else model, attribute, layer)
    missing, unexpected = model.load_state_dict(payload["dense"], strict=False)
    sparse_keys = {f"{fqn.rsplit('.', 1)[0]}.{name}" for fqn, e in payload["sparse"].items() if e["kind"] == "block"
                   for name in ("blocks", "slot_rows", "slot_cols")} | set(payload["sparse"])
    missing = [key for key in missing if key not in sparse_keys]
    if missing or unexpected:
        raise ValueError(f"{path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model, config


def _dense_bytes(model: torch.nn.Module, layers: dict[str, BlockSparseLayer]) -> int:
    """Bytes of the model's state dict were its block-sparse layers dense (what a dense
    checkpoint of it holds)."""
    stored = {f"{fqn.rsplit('.', 1)[0]}.{name}" for fqn in layers for name in ("blocks", "slot_rows", "slot_cols")}
    total = sum(t.numel() * t.element_size() for key, t in model.state_dict().items() if key not in stored)
    return total + sum(math.prod(layer.weight_shape) * layer.blocks.element_size() for layer in layers.values())


def _block_layer(dense: torch.nn.Module, entry: dict) -> BlockSparseLayer:
    """A block-sparse twin of ``dense`` holding the exported blocks in their slots."""
    rows, cols = entry["slot_rows"].to(torch.int64), entry["slot_cols"].to(torch.int64)
    grid = block_grid(entry["shape"], entry["block"]).grid
    block_mask = torch.zeros(grid, dtype=torch.bool)
    block_mask[rows, cols] = True
    kwargs = {"device": dense.weight.device, "dtype": entry["blocks"].dtype}
    bias = getattr(dense, "bias", None)
    if isinstance(dense, torch.nn.Linear):
        layer = BlockSparseLinear(dense.in_features, dense.out_features, entry["block"], block_mask, bias, **kwargs)
    else:
        layer = BlockSparseConv2d(dense.in_channels, dense.out_channels, dense.kernel_size, entry["block"],
                                  block_mask, bias, stride=dense.stride, padding=dense.padding,
                                  dilation=dense.dilation, **kwargs)
    layer.set_layout(BlockLayout.from_slots(rows, cols, grid))
    with torch.no_grad():
        layer.blocks.copy_(entry["blocks"])
    return layer


def _check_entries(payload: dict, path: Path) -> None:
    """Refuse, in one line naming the layer, a file whose sparse entries do not describe the
    weight they claim (a hand-edited or damaged file): block positions outside the block
    grid or repeated, a block count that differs from the positions, a bit mask or value
    count that does not fit the weight."""
    def damaged(fqn, what):
        return ValueError(f"{path} is damaged or was edited: {fqn}: {what}; write it again with "
                          f"`dsparse export RUN --out FILE`")

    if not isinstance(payload.get("sparse"), dict) or not isinstance(payload.get("dense"), dict):
        raise ValueError(f"{path} is damaged or was edited: it lacks its sparse or dense weights; write it again "
                         f"with `dsparse export RUN --out FILE`")
    for fqn, entry in payload["sparse"].items():
        try:
            shape, kind = tuple(int(n) for n in entry["shape"]), entry["kind"]
            if kind == "block":
                rows, cols, blocks, block = entry["slot_rows"], entry["slot_cols"], entry["blocks"], int(entry["block"])
            else:
                bits, values = entry["bits"], entry["values"]
        except (KeyError, TypeError, ValueError) as error:
            raise damaged(fqn, f"entry lacks or garbles {error}") from None
        if kind == "element":
            numel = math.prod(shape)
            if bits.dtype != torch.uint8 or bits.numel() != (numel + 7) // 8:
                raise damaged(fqn, f"its bit mask holds {bits.numel()} bytes, a weight of {shape} needs "
                                   f"{(numel + 7) // 8}")
            kept = int(np.unpackbits(bits.numpy(), count=numel).sum())
            if values.numel() != kept:
                raise damaged(fqn, f"its bit mask keeps {kept} weights but {values.numel()} values are stored")
            continue
        if kind != "block":
            raise damaged(fqn, f"unknown kind {kind!r}")
        try:
            grid = block_grid(list(shape), block).grid
        except ValueError as error:
            raise damaged(fqn, str(error)) from None
        if rows.dim() != 1 or rows.shape != cols.shape or rows.dtype.is_floating_point or cols.dtype.is_floating_point:
            raise damaged(fqn, "its block positions are not two integer lists of one length")
        if tuple(blocks.shape) != (rows.numel(), block, block):
            raise damaged(fqn, f"{rows.numel()} block positions but blocks of shape {tuple(blocks.shape)} (want "
                               f"{(rows.numel(), block, block)})")
        outside = (rows < 0) | (rows >= grid[0]) | (cols < 0) | (cols >= grid[1])
        if bool(outside.any()):
            index = int(outside.nonzero()[0])
            raise damaged(fqn, f"block position ({int(rows[index])}, {int(cols[index])}) is outside its "
                               f"{grid[0]}x{grid[1]} block grid")
        flat = rows.to(torch.int64) * grid[1] + cols.to(torch.int64)
        if flat.unique().numel() != flat.numel():
            raise damaged(fqn, f"{flat.numel() - flat.unique().numel()} block position(s) are listed twice")


def _check_model_matches(model: torch.nn.Module, payload: dict, path: Path) -> None:
    weights = prunable_parameters(model)
    state = model.state_dict()
    problems = [f"{fqn} (not a prunable weight of the model)" for fqn in payload["sparse"] if fqn not in weights]
    problems += [f"{fqn}: file {tuple(e['shape'])} vs model {tuple(weights[fqn].shape)}"
                 for fqn, e in payload["sparse"].items() if fqn in weights and tuple(e["shape"]) != weights[fqn].shape]
    problems += [f"{key}: file {tuple(v.shape)} vs model {tuple(state[key].shape)}"
                 for key, v in payload["dense"].items() if key in state and state[key].shape != v.shape]
    problems += [f"{key} (not in the model)" for key in payload["dense"] if key not in state
                 and not key.endswith(("blocks", "slot_rows", "slot_cols"))]
    if problems:
        raise ValueError(f"{path} was exported from another model (architecture, width or tasks differ): "
                         + "; ".join(problems[:6]))
