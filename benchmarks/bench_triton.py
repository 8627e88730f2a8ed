"""Triton block-sparse kernels vs dense cuBLAS/cuDNN on one CUDA GPU, unchanged on any CUDA machine.

Per kernel (forward, dX, dW): time, useful TFLOP/s (the kept blocks' arithmetic) and the
speed-up over the dense op on the same shapes (``F.linear``/``F.conv2d`` and their
backward), measured in the same run, for

- a 4096x4096 Linear at batch 8192,
- every distinct conv shape of the ResNet-34 trunk at batch 64 and 224x224,

at 0/50/75/90/95% random block sparsity, blocks 16/32/64, bf16 and fp16; then the time to
rebuild a layout after a mask change on the device, and the training step (forward, five
task losses, backward, Adam) of the ResNet-34 five-task model in bf16 at 90% block
sparsity vs dense. Every Triton shape is autotuned once before it is timed (the first
call), and timing uses ``triton.testing.do_bench`` (CUDA events, median).

``--budget`` (seconds) bounds the layer sweep: cases left when it runs out are listed as
skipped, so the script always finishes and writes what it measured. ``--smoke`` runs tiny
shapes on the CPU under ``TRITON_INTERPRET=1`` to check the plumbing (CI does; its
numbers mean nothing).

Usage::

    python benchmarks/bench_triton.py [--dtypes bf16,fp16 --blocks 16,32,64 --budget 240]

Writes ``benchmarks/results/triton-<host>-<date>.{md,csv}``.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from bench_model import bench_tasks, fake_batch, random_block_mask, trunk_conv_shapes
from results_io import RESULTS_DIR, machine_tag, publish, result_path, today
from timing import median_time

SPARSITIES = (0.0, 0.5, 0.75, 0.9, 0.95)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def timer(device: str):
    """Median seconds of a function: CUDA events via Triton on a GPU, wall clock on CPU."""
    if device == "cuda":
        import triton.testing

        return lambda function: triton.testing.do_bench(function, warmup=10, rep=50, return_mode="median") / 1e3

    return lambda function: median_time(function, 3, warmup=1)


def conv_of(layer: nn.Module) -> nn.Conv2d:
    """A Linear as the 1x1 convolution the kernels see (same weights)."""
    if isinstance(layer, nn.Conv2d):
        return layer
    conv = nn.Conv2d(layer.in_features, layer.out_features, 1, bias=layer.bias is not None)
    with torch.no_grad():
        conv.weight.copy_(layer.weight[:, :, None, None])
        if layer.bias is not None:
            conv.bias.copy_(layer.bias)
    return conv


def dense_times(layer: nn.Module, conv: nn.Conv2d, x: torch.Tensor, measure) -> dict[str, float]:
    """Forward, dX and dW of the dense op, each timed alone: cuBLAS matmuls for the Linear,
    cuDNN's convolution and its two backward kernels for convolutions."""
    weight = conv.weight
    if isinstance(layer, nn.Linear):
        rows, matrix = x[:, :, 0, 0], weight[:, :, 0, 0]
        dy = torch.randn(rows.shape[0], matrix.shape[0], device=x.device, dtype=x.dtype)
        return {"forward": measure(lambda: rows @ matrix.t()), "dX": measure(lambda: dy @ matrix),
                "dW": measure(lambda: dy.t() @ rows)}
    dy = torch.randn_like(F.conv2d(x, weight, None, conv.stride, conv.padding, conv.dilation))

    def backward(mask):
        return lambda: torch.ops.aten.convolution_backward(dy, x, weight, None, list(conv.stride), list(conv.padding),
                                                           list(conv.dilation), False, [0, 0], 1, mask)

    return {"forward": measure(lambda: F.conv2d(x, weight, None, conv.stride, conv.padding, conv.dilation)),
            "dX": measure(backward([True, False, False])), "dW": measure(backward([False, True, False]))}


def sparse_times(conv: nn.Conv2d, x: torch.Tensor, block: int, sparsity: float, measure) -> dict[str, float]:
    """Forward, dX and dW of the Triton kernels on a random block mask, each timed alone."""
    from dsparse.kernels.block_sparse import (
        ConvGeometry,
        block_sparse_forward,
        block_sparse_input_grad,
        block_sparse_weight_grad,
    )
    from dsparse.sparsity.block.layers import block_sparse_from_dense
    from dsparse.sparsity.block.geometry import block_grid

    layer = block_sparse_from_dense(conv, block, random_block_mask(block_grid(conv.weight.shape, block).grid,
                                                                   sparsity), "triton")
    layout = layer.layout()
    geometry = ConvGeometry(x.shape[1], x.shape[2], x.shape[3], conv.kernel_size, conv.stride, conv.padding,
                            conv.dilation)
    values = layer.blocks.detach()
    y = block_sparse_forward(x, values, None, layout.row_ptr, layout.row_slots, layout.slot_cols, geometry,
                             conv.out_channels)  # the first call of each kernel autotunes its shape
    dy = torch.randn_like(y)
    block_sparse_input_grad(dy, values, layout.col_ptr, layout.col_slots, layout.slot_rows, geometry, x.shape[0])
    block_sparse_weight_grad(dy, x, values, layout.slot_rows, layout.slot_cols, geometry)
    return {
        "forward": measure(lambda: block_sparse_forward(x, values, None, layout.row_ptr, layout.row_slots,
                                                        layout.slot_cols, geometry, conv.out_channels)),
        "dX": measure(lambda: block_sparse_input_grad(dy, values, layout.col_ptr, layout.col_slots, layout.slot_rows,
                                                      geometry, x.shape[0])),
        "dW": measure(lambda: block_sparse_weight_grad(dy, x, values, layout.slot_rows, layout.slot_cols,
                                                       geometry)),
        "kept": layout.density,
    }


def cases(smoke: bool) -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    if smoke:
        return [("Linear 64x64, batch 64", nn.Linear(64, 64), (64, 64)),
                ("Conv 32->32 k3 s1 d1 @8x8", nn.Conv2d(32, 32, 3, padding=1), (2, 32, 8, 8))]
    found = [("Linear 4096x4096, batch 8192", nn.Linear(4096, 4096), (8192, 4096))]
    for conv, shape in trunk_conv_shapes(64, 224):
        found.append((f"Conv {conv.in_channels}->{conv.out_channels} k{conv.kernel_size[0]} s{conv.stride[0]} "
                      f"d{conv.dilation[0]} @{shape[2]}x{shape[3]}", conv, shape))
    return found


def flops(conv: nn.Conv2d, x: torch.Tensor) -> float:
    """Dense multiply-adds x 2 of one of the three GEMMs."""
    height, width = F.conv2d(x[:1, :, :, :], conv.weight, None, conv.stride, conv.padding, conv.dilation).shape[2:]
    return 2.0 * x.shape[0] * height * width * conv.out_channels * conv.weight[0].numel()


def layout_rebuild_seconds(device: str) -> tuple[float, float]:
    """(build from a mask, reassign after a mask change) for a 512x4608 weight at 90%, block 32."""
    from dsparse.sparsity.block.layout import BlockLayout

    mask = random_block_mask((16, 144), 0.9).to(device)
    changed = random_block_mask((16, 144), 0.9, seed=1).to(device)
    layout = BlockLayout.from_mask(mask)

    def run(function, repeats=50):
        function()
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            function()
        if device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / repeats

    return run(lambda: BlockLayout.from_mask(mask)), run(lambda: layout.reassign(changed))


def training_step_seconds(sparsity: float | None, batch: int, size: int, device: str, repeats: int) -> float:
    """One bf16 training step of the ResNet-34 five-task model, dense or block-sparse (block 32)."""
    from dsparse.config import SparsityConfig
    from dsparse.models import build_model
    from dsparse.sparsity import MaskInputs, build_sparsifier

    tasks = bench_tasks()
    torch.manual_seed(0)
    model = build_model("resnet34", {n: t.num_channels for n, t in tasks.items()}, base_width=64,
                        head_dilations=(1, 2, 4, 8))
    if sparsity is not None:
        settings = SparsityConfig(method="random", target=sparsity, granularity="block", block=32, kernel="triton")
        model = build_sparsifier(settings, MaskInputs(tasks, settings)).prepare(model.to(device))
    model = model.to(device=device, dtype=torch.bfloat16)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    data = {k: v.to(device) for k, v in fake_batch(batch, size).items()}
    data["rgb"] = data["rgb"].to(torch.bfloat16)

    def step():
        outputs = model(data["rgb"])
        sum(task.loss(outputs[n].float(), data[n]) for n, task in tasks.items()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtypes", default="bf16,fp16")
    parser.add_argument("--blocks", default="16,32,64")
    parser.add_argument("--budget", type=float, default=240.0, help="seconds for the layer sweep")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    parser.add_argument("--out", default=str(RESULTS_DIR))
    args = parser.parse_args()
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        device, dtypes, blocks = "cpu", ["fp32"], [16]
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_triton.py needs a CUDA GPU (or --smoke for a CPU plumbing check)")
        device, dtypes, blocks = "cuda", args.dtypes.split(","), [int(b) for b in args.blocks.split(",")]
    measure = timer(device)
    deadline = time.monotonic() + args.budget
    rows, skipped = [], []
    name = "triton-smoke" if args.smoke else "triton"
    table = open(result_path(name, ".csv", args.out), "w", newline="")  # rows land as they are measured
    writer = csv.DictWriter(table, fieldnames=["layer", "dtype", "block", "sparsity", "kernel", "dense_ms",
                                               "triton_ms", "tflops", "speedup"])
    writer.writeheader()
    for label, layer, shape in cases(args.smoke):
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            conv = conv_of(layer).to(device=device, dtype=dtype)
            x = torch.randn(shape, device=device, dtype=dtype)
            x = x if x.dim() == 4 else x[:, :, None, None]
            if time.monotonic() > deadline:
                skipped.append(f"{label} {dtype_name}")
                continue
            with torch.no_grad():
                dense = dense_times(layer, conv, x, measure)
            work = flops(conv, x)
            for block in blocks:
                for sparsity in (0.5, 0.9) if args.smoke else SPARSITIES:
                    if time.monotonic() > deadline:
                        skipped.append(f"{label} {dtype_name} block {block} {int(100 * sparsity)}%")
                        continue
                    with torch.no_grad():
                        sparse = sparse_times(conv, x, block, sparsity, measure)
                    for kernel in ("forward", "dX", "dW"):
                        rows.append({"layer": label, "dtype": dtype_name, "block": block, "sparsity": sparsity,
                                     "kernel": kernel, "dense_ms": 1e3 * dense[kernel],
                                     "triton_ms": 1e3 * sparse[kernel],
                                     "tflops": work * sparse["kept"] / sparse[kernel] / 1e12,
                                     "speedup": dense[kernel] / sparse[kernel]})
                        writer.writerow(rows[-1])
                    table.flush()
                    print(f"{label:34s} {dtype_name} b{block} {sparsity:4.2f}  " + "  ".join(
                        f"{k} {dense[k] / sparse[k]:5.2f}x" for k in ("forward", "dX", "dW")), flush=True)
    gpu = torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton interpreter: plumbing only)"
    lines = [f"Triton block-sparse kernels vs dense, {gpu}, torch {torch.__version__}, {machine_tag()}, {today()}", "",
             "Speed-up = dense time / Triton time of the same GEMM (forward, dX, dW), random block masks; "
             "TFLOP/s counts the kept blocks' arithmetic.", "",
             "| layer | dtype | block | kernel | " + " | ".join(f"{int(100 * s)}%" for s in SPARSITIES) + " |",
             "|---|---|---|---|" + "---|" * len(SPARSITIES)]
    groups: dict[tuple, dict[float, dict]] = {}
    for row in rows:
        groups.setdefault((row["layer"], row["dtype"], row["block"], row["kernel"]), {})[row["sparsity"]] = row
    for (layer, dtype_name, block, kernel), cells in groups.items():
        lines.append(f"| {layer} | {dtype_name} | {block} | {kernel} | " + " | ".join(
            f"{cells[s]['speedup']:.2f}x ({cells[s]['tflops']:.0f} TF/s)" if s in cells else "-"
            for s in SPARSITIES) + " |")
    if skipped:
        lines += ["", f"Skipped when the {args.budget:.0f} s budget ran out: " + "; ".join(skipped) + "."]
    build, reassign = layout_rebuild_seconds(device)
    lines += ["", f"Layout of a 512x4608 weight at 90% (block 32) on {device}: built from a mask in "
              f"{1e6 * build:.0f} us, reassigned after a mask change in {1e6 * reassign:.0f} us."]
    if not args.smoke:
        dense_step = training_step_seconds(None, 32, 224, device, 5)
        sparse_step = training_step_seconds(0.9, 32, 224, device, 5)
        lines += ["", "| training step, ResNet-34 w64, 5 tasks, bf16, batch 32 @224 | dense (ms) | 90% block 32 (ms) "
                  "| speed-up |", "|---|---|---|---|",
                  f"| forward, 5 losses, backward, Adam | {1e3 * dense_step:.0f} | {1e3 * sparse_step:.0f} | "
                  f"{dense_step / sparse_step:.2f}x |"]
    table.close()
    publish(name, "\n".join(lines), args.out)


if __name__ == "__main__":
    main()
