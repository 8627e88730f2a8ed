"""ONNX export: a trained run as a file every runtime reads, checked in ONNX Runtime.

    dsparse export runs/NAME --format onnx --out model.onnx     # library: export_onnx
    dsparse eval model.onnx [--data DIR]                        # ONNX Runtime: load_onnx

A channel run exports its smaller dense model; element and block runs export their dense
weights with zeros (block-sparse layers written back as dense ones), so any runtime runs
them, without the speed of block kernels. The graph takes ``rgb [batch, 3, H, W]`` at the
dataset's image size (what ``dsparse eval`` feeds; the batch is dynamic) and returns one
output per task, named by the task. The run's config and task channels ride along as
metadata, so ``dsparse eval`` finds the dataset and the tasks. After writing, the file is
run in ONNX Runtime on a random batch and every task's output compared with PyTorch's; a
difference above ``TOLERANCE`` is an error and the file is not kept.

Needs ``onnx``, ``onnxscript`` (torch's exporter) and ``onnxruntime``; without them the
export and the evaluation refuse in one line naming the package.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import torch
from torch import nn

from dsparse.config import config_from_dict
from dsparse.extract import extract_tasks
from dsparse.io import atomic_path, check_output_file
from dsparse.runs.restore import restore_run
from dsparse.sparsity.block.layers import BlockSparseLayer

__all__ = ["OPSET", "TOLERANCE", "OnnxRuntimeModel", "export_onnx", "load_onnx", "write_onnx"]

log = logging.getLogger("dsparse.export")

OPSET = 17
TOLERANCE = 1e-4
"""Largest absolute difference allowed between ONNX Runtime's and PyTorch's outputs."""
_PACKAGES = {"onnx": "onnx", "onnxscript": "onnxscript", "onnxruntime": "onnxruntime"}


def require_onnx(*modules: str) -> None:
    """Refuse, naming what to install, where an ONNX package is missing."""
    missing = [_PACKAGES[m] for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"ONNX export and evaluation need the Python package(s) {', '.join(missing)}: "
                         f"pip install {' '.join(missing)}")


class _TaskOutputs(nn.Module):
    """The model with its task dict flattened to a tuple in task order (ONNX outputs are positional)."""

    def __init__(self, model: nn.Module, tasks: list[str]):
        super().__init__()
        self.model, self.tasks = model, tasks

    def forward(self, rgb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.model(rgb)
        return tuple(outputs[task] for task in self.tasks)


def dense_layers(model: nn.Module) -> nn.Module:
    """``model`` with every block-sparse layer replaced, in place, by the standard layer
    holding its dense weight (zeros outside the kept blocks)."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, BlockSparseLayer):
            continue
        weight = module.dense_weight()
        if weight.dim() == 2:
            layer = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        else:
            layer = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
                              padding=module.padding, dilation=module.dilation, bias=module.bias is not None)
        layer = layer.to(weight.device, weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(weight)
            if module.bias is not None:
                layer.bias.copy_(module.bias)
        parent, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attribute, layer)
    return model


def export_onnx(run: str | Path, out: str | Path, overwrite: bool = False, keep_tasks: list[str] | None = None,
                revote: bool = True) -> dict:
    """Write the latest checkpoint of ``run`` (dense, element, block or channel) as ONNX;
    with ``keep_tasks``, only those tasks (``dsparse.extract.extract_tasks``).

    Returns:
        ``{"path", "num_bytes", "max_difference", "tasks", "input_size"}``.

    Raises:
        ValueError: ``out`` exists (without ``overwrite``), a missing ONNX package, no
            checkpoint, or ONNX Runtime's outputs differing from PyTorch's by more than
            ``TOLERANCE`` (then nothing is written).
    """
    require_onnx("onnx", "onnxscript", "onnxruntime")
    if Path(out).suffix != ".onnx":
        raise ValueError(f"--out {out}: an ONNX export's name must end in .onnx (dsparse eval picks ONNX Runtime by it)")
    check_output_file(out, overwrite)
    restored = restore_run(run)
    config, masks, run_tasks = restored.config, restored.masks, restored.tasks
    if keep_tasks is not None:
        extracted = extract_tasks(restored.model, config, masks, run_tasks, keep_tasks, revote=revote)
        config, masks, run_tasks = extracted.config, extracted.masks, extracted.tasks
    model = dense_layers(restored.model).float().cpu().eval()
    tasks = list(run_tasks)
    metadata = {"dsparse.config": json.dumps(config.to_dict()),
                "dsparse.task_channels": json.dumps({n: t.num_channels for n, t in run_tasks.items()}),
                "dsparse.granularity": masks.meta.get("granularity", "element") if masks is not None else "dense"}
    difference = write_onnx(model, tasks, restored.manifest.image_size, out, metadata)
    out = Path(out)
    log.info("wrote %s (%d bytes); ONNX Runtime matches PyTorch within %.2g", out, out.stat().st_size, difference)
    return {"path": str(out), "num_bytes": out.stat().st_size, "max_difference": difference, "tasks": tasks,
            "input_size": list(restored.manifest.image_size), "parameters": sum(p.numel() for p in model.parameters())}


def write_onnx(model: nn.Module, tasks: list[str], size: tuple[int, int], out: str | Path,
               metadata: dict[str, str] | None = None) -> float:
    """Export a multitask model (dense layers, on the CPU) taking ``rgb [batch, 3, *size]``
    with one output per task, atomically, after checking it in ONNX Runtime; returns the
    largest difference from PyTorch."""
    require_onnx("onnx", "onnxscript", "onnxruntime")
    wrapper = _TaskOutputs(model, tasks).eval()  # export restores the wrapper's mode onto the model
    example = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    with atomic_path(Path(out)) as temporary:
        program = torch.onnx.export(wrapper, (example,), input_names=["rgb"], output_names=tasks, opset_version=OPSET,
                                    dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), dynamo=True,
                                    verbose=False)
        program.model.metadata_props.update(metadata or {})
        program.save(temporary)
        return _check_against_torch(temporary, wrapper, tasks, tuple(size))


def _check_against_torch(path: Path, wrapper: nn.Module, tasks: list[str], size: tuple[int, int]) -> float:
    """Run the file in ONNX Runtime on a batch of 3 (another size than the traced one) and
    compare every task's output with PyTorch's."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batch = torch.randn(3, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = wrapper(batch)
    got = session.run(tasks, {"rgb": batch.numpy()})
    worst = 0.0
    for task, reference, value in zip(tasks, expected, got):
        difference = float((torch.from_numpy(value) - reference).abs().max())
        worst = max(worst, difference)
        if not difference <= TOLERANCE:
            raise ValueError(f"the ONNX export of task {task} differs from PyTorch by {difference:.3g} in ONNX Runtime "
                             f"(tolerance {TOLERANCE}); nothing was written")
    return worst


class OnnxRuntimeModel(nn.Module):
    """An ONNX export run by ONNX Runtime behind the model interface ``evaluate`` uses:
    ``model(rgb)`` returns task -> prediction (CPU tensors; ``.to`` and ``.eval`` are no-ops)."""

    def __init__(self, path: str | Path, threads: int | None = None, spinning: bool = True):
        """``threads``: ONNX Runtime's intra-op threads (default: one per physical core);
        ``spinning=False`` makes idle threads sleep instead of spinning (sessions timed in
        turn in one process would otherwise take each other's cores)."""
        super().__init__()
        import onnxruntime

        self.path = str(path)
        options = onnxruntime.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        if not spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])
        self.tasks = [output.name for output in self.session.get_outputs()]

    def forward(self, rgb: torch.Tensor) -> dict[str, torch.Tensor]:
        values = self.session.run(self.tasks, {"rgb": rgb.detach().float().cpu().numpy()})
        return {task: torch.from_numpy(value).to(rgb.device) for task, value in zip(self.tasks, values)}


def load_onnx(path: str | Path):
    """``(OnnxRuntimeModel, RunConfig)`` of a file written by ``export_onnx``.

    Raises:
        ValueError: a missing package, or an ONNX file dsparse did not write (no metadata).
    """
    require_onnx("onnx", "onnxruntime")
    import onnx

    try:
        metadata = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    except Exception as error:  # a damaged or non-ONNX file
        raise ValueError(f"{path} is not a readable ONNX file ({type(error).__name__}: {str(error)[:200]})") from None
    if "dsparse.config" not in metadata:
        raise ValueError(f"{path} is an ONNX file without dsparse's metadata; evaluate files written by "
                         "`dsparse export RUN --format onnx`")
    return OnnxRuntimeModel(path), config_from_dict(json.loads(metadata["dsparse.config"]))
