"""The model, batch and training step the step-level benchmarks share: the demo's tiny
multitask network (or any registered arch) on five tasks, with in-memory batches so the
loader never enters the timing."""

from __future__ import annotations

import argparse

import torch
from torch import nn

from dsparse.models import build_model
from dsparse.tasks import build_tasks

TASKS = ["seg", "normal", "depth", "keypoint", "edge"]
NUM_CLASSES = 10


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)


def bench_tasks() -> dict:
    return build_tasks(TASKS, num_classes=NUM_CLASSES)


def bench_model(args: argparse.Namespace, tasks: dict) -> torch.nn.Module:
    """A freshly initialised model (seed 0), so every variant in a run starts equal."""
    torch.manual_seed(0)
    return build_model(args.arch, {name: task.num_channels for name, task in tasks.items()},
                       base_width=args.width, head_dilations=(1, 2, 4, 8))


def fake_batch(batch: int, size: int, num_classes: int = NUM_CLASSES) -> dict:
    generator = torch.Generator().manual_seed(0)
    normal = torch.nn.functional.normalize(torch.randn(batch, 3, size, size, generator=generator), dim=1)
    return {"rgb": torch.randn(batch, 3, size, size, generator=generator),
            "seg": torch.randint(0, num_classes, (batch, size, size), generator=generator),
            "normal": normal, "depth": torch.rand(batch, 1, size, size, generator=generator) * 5 + 0.5,
            "keypoint": torch.rand(batch, 1, size, size, generator=generator),
            "edge": torch.rand(batch, 1, size, size, generator=generator)}


def adam_step(model: nn.Module, tasks: dict, batch: dict):
    """A plain-PyTorch training step of ``model`` (forward, the unweighted task losses,
    backward, Adam), as a function to time; no DeepSpeed, so two models compare directly."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()

    def step():
        outputs = model(batch["rgb"])
        sum(task.loss(outputs[name], batch[name]) for name, task in tasks.items()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def train_step(engine, tasks: dict, batch: dict) -> None:
    """One DeepSpeed step on the unweighted sum of the task losses."""
    outputs = engine(batch["rgb"])
    engine.backward(sum(task.loss(outputs[name], batch[name]) for name, task in tasks.items()))
    engine.step()


def trunk_conv_shapes(batch: int, size: int) -> list[tuple[nn.Conv2d, tuple[int, ...]]]:
    """Every distinct (conv parameters, input shape) of the ResNet-34 trunk at ``size``."""
    model = build_model("resnet34", {"seg": 10}, base_width=64)
    seen, shapes = set(), []

    def record(module, inputs, _):
        key = (module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
               module.dilation, tuple(inputs[0].shape[1:]))
        if key not in seen:
            seen.add(key)
            shapes.append((module, (batch, *inputs[0].shape[1:])))

    handles = [m.register_forward_hook(record) for m in model.trunk.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model.trunk(torch.zeros(1, 3, size, size))
    for handle in handles:
        handle.remove()
    return shapes


def random_block_mask(grid: tuple[int, int], sparsity: float, seed: int = 0) -> torch.Tensor:
    """Exactly ``round((1 - sparsity) * blocks)`` kept blocks, uniformly at random."""
    count = round((1 - sparsity) * grid[0] * grid[1])
    flat = torch.zeros(grid[0] * grid[1], dtype=torch.bool)
    flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(seed))[:count]] = True
    return flat.reshape(grid)
