"""Block-sparse layers vs dense masked compute: forward + backward, and whole training steps.

Both sides run in this process on the same inputs, one after the other, with the thread
count fixed. The baseline is what element masks cost today: the dense op on a masked
weight (``F.linear(x, w * mask)`` / ``F.conv2d``), whose backward computes the full
weight gradient. The block side is ``dsparse.sparsity.block.layers`` (PyTorch path:
gathers, batched matmuls over kept blocks, im2col for convolutions).

1. A 1024x1024 Linear at batch 4096, and every distinct conv shape of the ResNet-34 trunk
   at batch 16 and 64x64 input, at 0/50/75/90/95% block sparsity (random blocks).
2. One optimizer step (forward, 5 task losses, backward, Adam) of the tiny model and of
   ResNet-34 with 5 task heads, dense vs 90% block sparsity, with peak resident memory.

Usage::

    python benchmarks/bench_block_sparse.py [--threads 2 --block 32 --repeats 15]

Writes ``benchmarks/results/block-sparse-<host>-<date>.{md,csv}``.
"""

from __future__ import annotations

import argparse
import csv

import torch
import torch.nn.functional as F
from torch import nn

from bench_model import bench_tasks, fake_batch, random_block_mask, trunk_conv_shapes
from dsparse.config import SparsityConfig
from dsparse.models import build_model
from dsparse.sparsity import MaskInputs, build_sparsifier
from dsparse.sparsity.block.layers import block_sparse_from_dense
from dsparse.sparsity.block.layout import BlockLayout
from dsparse.sparsity.block.geometry import block_grid
from peak_memory import peak_rss_mib, reset_peak_rss
from results_io import RESULTS_DIR, machine_tag, publish, result_path, today
from timing import interleaved_median_times, median_time

SPARSITIES = (0.0, 0.5, 0.75, 0.9, 0.95)


def layer_times(layer: nn.Module, x: torch.Tensor, sparsity: float, block: int, repeats: int) -> tuple[float, float]:
    """(dense masked, block-sparse) median forward+backward seconds."""
    grid = block_grid(layer.weight.shape, block)
    block_mask = random_block_mask(grid.grid, sparsity)
    mask = grid.expand(block_mask).to(layer.weight.dtype)
    sparse = block_sparse_from_dense(layer, block, block_mask)
    x = x.detach().requires_grad_()

    def dense_step():
        weight = layer.weight * mask
        if isinstance(layer, nn.Linear):
            out = F.linear(x, weight, layer.bias)
        else:
            out = F.conv2d(x, weight, layer.bias, layer.stride, layer.padding, layer.dilation)
        out.backward(torch.ones_like(out))

    def sparse_step():
        out = sparse(x)
        out.backward(torch.ones_like(out))

    dense, sparse = interleaved_median_times([dense_step, sparse_step], repeats)
    return dense, sparse


def step_time_and_memory(arch: str, width: int, batch: int, size: int, sparsity: float | None, block: int,
                         repeats: int) -> tuple[float, float]:
    """Median seconds and peak RSS (MiB) of one training step, dense or block-sparse."""
    tasks = bench_tasks()
    torch.manual_seed(0)
    model = build_model(arch, {n: t.num_channels for n, t in tasks.items()}, base_width=width,
                        head_dilations=(1, 2, 4, 8))
    if sparsity is not None:
        settings = SparsityConfig(method="random", target=sparsity, granularity="block", block=block)
        model = build_sparsifier(settings, MaskInputs(tasks, settings)).prepare(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = fake_batch(batch, size)

    def step():
        outputs = model(data["rgb"])
        sum(task.loss(outputs[n], data[n]) for n, task in tasks.items()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    reset_peak_rss()
    seconds = median_time(step, repeats, warmup=1)
    return seconds, peak_rss_mib()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--skip-steps", action="store_true", help="only the layer benchmark")
    parser.add_argument("--out", default=str(RESULTS_DIR))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cases = [("Linear 1024x1024, batch 4096", nn.Linear(1024, 1024), torch.randn(4096, 1024))]
    for conv, shape in trunk_conv_shapes(16, 64):
        name = (f"Conv {conv.in_channels}->{conv.out_channels} k{conv.kernel_size[0]} s{conv.stride[0]} "
                f"d{conv.dilation[0]} @{shape[2]}x{shape[3]}")
        cases.append((name, conv, torch.randn(shape)))
    rows = []
    for name, layer, x in cases:
        for sparsity in SPARSITIES:
            dense, sparse = layer_times(layer, x, sparsity, args.block, args.repeats)
            rows.append({"layer": name, "sparsity": sparsity, "dense_masked_ms": 1000 * dense,
                         "block_sparse_ms": 1000 * sparse, "speedup": dense / sparse})
            print(f"{name:44s} {sparsity:4.2f}  dense {1000 * dense:8.2f} ms  block {1000 * sparse:8.2f} ms  "
                  f"{dense / sparse:5.2f}x", flush=True)
    largest = block_grid((512, 512 * 9), args.block)
    mask = random_block_mask(largest.grid, 0.9)
    rebuild = median_time(lambda: BlockLayout.from_mask(mask), 20)
    host, date = machine_tag(), today()
    lines = [f"Block-sparse vs dense masked forward+backward, block {args.block}, {args.threads} threads, "
             f"torch {torch.__version__}, {host}, {date}", "",
             "| layer | " + " | ".join(f"{int(100 * s)}%" for s in SPARSITIES) + " |",
             "|---|" + "---|" * len(SPARSITIES)]
    for name, *_ in cases:
        cells = [r for r in rows if r["layer"] == name]
        lines.append(f"| {name} | " + " | ".join(f"{r['speedup']:.2f}x" for r in cells) + " |")
    lines += ["", "Speed-up = dense masked time / block-sparse time (both forward + backward, median of "
              f"{args.repeats}, the two sides called in turn).",
              f"Layout rebuild for a 512x4608 weight at 90% ({int(mask.sum())} blocks): "
              f"{1e6 * rebuild:.0f} us."]
    if not args.skip_steps:
        lines += ["", "| training step | dense (ms) | 90% block (ms) | speed-up | dense peak RSS (MiB) | "
                  "block peak RSS (MiB) |", "|---|---|---|---|---|---|"]
        for label, arch, width, batch in (("tiny ResNet-18 w16, batch 16 @64", "resnet18", 16, 16),
                                          ("ResNet-34 w64, 5 tasks, batch 16 @64", "resnet34", 64, 16)):
            dense, dense_mem = step_time_and_memory(arch, width, batch, 64, None, args.block, args.repeats)
            sparse, sparse_mem = step_time_and_memory(arch, width, batch, 64, 0.9, args.block, args.repeats)
            lines.append(f"| {label} | {1000 * dense:.0f} | {1000 * sparse:.0f} | {dense / sparse:.2f}x | "
                         f"{dense_mem:.0f} | {sparse_mem:.0f} |")
            print(lines[-1], flush=True)
    publish(f"block-sparse-b{args.block}", "\n".join(lines), args.out)
    with open(result_path(f"block-sparse-b{args.block}", ".csv", args.out), "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
