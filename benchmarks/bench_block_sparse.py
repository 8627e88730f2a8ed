"""Block-sparse layers vs dense masked compute: kernels, layers, training steps, inference.

Every side runs in this process on the same inputs, the sides called in turn (median of
``--repeats`` samples, a kernel's or layer's sample a loop of calls of ``MIN_SAMPLE_S``),
with the thread count fixed. The baseline is what element masks cost: the
dense op on a masked weight (``F.linear(x, w * mask)`` / ``F.conv2d``), whose backward
computes the full weight gradient. The block sides are ``dsparse.sparsity.block.layers``
running the compiled CPU kernels (``sparsity.kernel=cpu``) and the PyTorch path (``torch``).

1. Kernels: ``Y = X W^T``, ``dX`` and ``dW`` of a 1024x1024 weight at batch 4096, 90%
   block sparsity, against the dense GEMM of each (``F.linear``, ``dY @ W``, ``dY^T @ X``):
   time and FLOP rate on the kept blocks (the distance to the dense GEMM's rate).
2. Layers: that Linear and every distinct conv shape of the ResNet-34 trunk at batch 16 and
   64x64 input, forward + backward, at 0/50/75/90/95% block sparsity (random blocks). The
   compiled side gets its input channels-last, as it does inside a network (each compiled
   conv's output is channels-last); the dense op and the PyTorch path get NCHW, their best
   (a channels-last dense ResNet-34 step measured no faster: 823 against 786 ms).
3. Steps: one optimizer step (forward, 5 task losses, backward, Adam) of the tiny model and
   of the 5-task ResNet-34, dense vs 90% block sparsity, and the ResNet-34's inference
   forward (``torch.no_grad``, eval mode: what ``dsparse eval`` runs on an export, whose
   ``load_sparse`` builds the same block-sparse layers), with the size of each model's state
   (peak resident memory is not reported: in one process holding every side it measured
   the same for all).

Each table is measured for every ``--threads`` count, quiet and beside a competing load the
benchmark starts (one process spinning on one core), so the numbers say what a shared
machine does too.

Usage::

    python benchmarks/bench_block_sparse.py [--threads 1,2 --block 32 --repeats 9 --loads quiet,loaded]

Writes ``benchmarks/results/block-sparse-b<B>-<host>-<date>.{md,csv}``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import multiprocessing
import time

import torch
import torch.nn.functional as F
from torch import nn

from bench_model import bench_tasks, fake_batch, random_block_mask, trunk_conv_shapes
from dsparse.config import SparsityConfig
from dsparse.kernels import cpu
from dsparse.models import build_model
from dsparse.sparsity import MaskInputs, build_sparsifier
from dsparse.sparsity.block.geometry import block_grid
from dsparse.sparsity.block.layers import block_sparse_from_dense
from dsparse.sparsity.block.layout import BlockLayout
from results_io import RESULTS_DIR, machine_tag, publish, result_path, today
from timing import interleaved_median_times

SPARSITIES = (0.0, 0.5, 0.75, 0.9, 0.95)
SIDES = ("cpu", "torch")
MIN_SAMPLE_S = 0.05
"""Each timed sample of a kernel or layer loops its calls for about this long (a 0.2 ms
layer is timed over some 250 calls, not one)."""


def _spin(stop) -> None:
    while not stop.is_set():
        pass


@contextlib.contextmanager
def competing_load(loaded: bool):
    """A process spinning on one core while the block runs (the shared-machine case)."""
    if not loaded:
        yield
        return
    stop = multiprocessing.Event()
    process = multiprocessing.Process(target=_spin, args=(stop,), daemon=True)
    process.start()
    time.sleep(0.5)
    try:
        yield
    finally:
        stop.set()
        process.join()


def kernel_rates(block: int, repeats: int) -> list[dict]:
    """Forward, dX and dW of the compiled kernels against the dense GEMMs, 1024x1024 at batch 4096, 90%."""
    m, n, k = 4096, 1024, 1024
    layout = BlockLayout.from_mask(random_block_mask((n // block, k // block), 0.9))
    values = torch.randn(layout.num_slots, block, block)
    x, dy, weight = torch.randn(m, k), torch.randn(m, n), torch.randn(n, k)
    pairs = {"forward": (lambda: F.linear(x, weight),
                         lambda: cpu.block_spmm(x, values, layout.row_ptr, layout.row_slots, layout.slot_cols, True,
                                                False)),
             "dX": (lambda: dy @ weight,
                    lambda: cpu.block_spmm(dy, values, layout.col_ptr, layout.col_slots, layout.slot_rows, False,
                                           False)),
             "dW": (lambda: dy.t() @ x,
                    lambda: cpu.block_weight_grad(dy, x, layout.row_ptr, layout.row_slots, layout.slot_cols, block))}
    rows = []
    for name, (dense, sparse) in pairs.items():
        dense_s, sparse_s = interleaved_median_times([dense, sparse], repeats, min_sample_s=MIN_SAMPLE_S)
        rows.append({"kernel": name, "dense_ms": 1000 * dense_s, "block_ms": 1000 * sparse_s,
                     "speedup": dense_s / sparse_s, "dense_gflops": 2 * m * n * k / dense_s / 1e9,
                     "block_gflops": 2 * m * block * block * layout.num_slots / sparse_s / 1e9})
    return rows


def layer_times(layer: nn.Module, x: torch.Tensor, sparsity: float, block: int, repeats: int) -> dict[str, float]:
    """Median forward+backward seconds: dense masked and each block side."""
    grid = block_grid(layer.weight.shape, block)
    block_mask = random_block_mask(grid.grid, sparsity)
    mask = grid.expand(block_mask).to(layer.weight.dtype)
    sparse = {side: block_sparse_from_dense(layer, block, block_mask, side) for side in SIDES}
    x = x.detach().requires_grad_()
    # In a network the compiled convolutions pass activations on channels-last (no copy),
    # so that side is fed channels-last; dense and the PyTorch path get the plain NCHW input.
    inputs = {"cpu": x.detach().to(memory_format=torch.channels_last).requires_grad_() if x.dim() == 4 else x,
              "torch": x}

    def dense_step():
        weight = layer.weight * mask
        if isinstance(layer, nn.Linear):
            out = F.linear(x, weight, layer.bias)
        else:
            out = F.conv2d(x, weight, layer.bias, layer.stride, layer.padding, layer.dilation)
        out.backward(torch.ones_like(out))

    def step_of(module, x):
        def step():
            out = module(x)
            out.backward(torch.ones_like(out))
        return step

    times = interleaved_median_times([dense_step] + [step_of(sparse[side], inputs[side]) for side in SIDES], repeats,
                                     min_sample_s=MIN_SAMPLE_S)
    return dict(zip(("dense",) + SIDES, times))


def model_of(arch: str, width: int, sparsity: float | None, block: int, kernel: str) -> nn.Module:
    tasks = bench_tasks()
    torch.manual_seed(0)
    model = build_model(arch, {n: t.num_channels for n, t in tasks.items()}, base_width=width,
                        head_dilations=(1, 2, 4, 8))
    if sparsity is not None:
        settings = SparsityConfig(method="random", target=sparsity, granularity="block", block=block, kernel=kernel)
        model = build_sparsifier(settings, MaskInputs(tasks, settings)).prepare(model)
    return model


def state_mib(model: nn.Module) -> float:
    """What the model stores (parameters and buffers, block layers their kept blocks)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20


def step_functions(arch: str, width: int, batch: int, block: int, inference: bool):
    """Dense, block (cpu) and block (torch) training steps or inference forwards of one
    model, and the size of the dense and the block model's state."""
    tasks = bench_tasks()
    data = fake_batch(batch, 64)
    functions, sizes = [], []
    for sparsity, kernel in ((None, "torch"), (0.9, "cpu"), (0.9, "torch")):
        model = model_of(arch, width, sparsity, block, kernel)
        sizes.append(state_mib(model))
        if inference:
            model.eval()

            def function(model=model):
                with torch.no_grad():
                    model(data["rgb"])
        else:
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

            def function(model=model, optimizer=optimizer):
                outputs = model(data["rgb"])
                sum(task.loss(outputs[n], data[n]) for n, task in tasks.items()).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        functions.append(function)
    return functions, sizes[:2]


def measure(threads: int, loaded: bool, args) -> tuple[list[str], list[dict]]:
    torch.set_num_threads(threads)
    label = f"{threads} thread{'s' if threads > 1 else ''}, {'beside a competing load' if loaded else 'quiet'}"
    lines, rows = [f"### {label}", ""], []
    with competing_load(loaded):
        kernels = kernel_rates(args.block, args.repeats)
        lines += ["| kernel (1024x1024, batch 4096, 90%) | dense GEMM (ms) | block (ms) | speed-up | dense GFLOP/s | "
                  "block GFLOP/s (kept blocks) |", "|---|---|---|---|---|---|"]
        for row in kernels:
            lines.append(f"| {row['kernel']} | {row['dense_ms']:.1f} | {row['block_ms']:.1f} | {row['speedup']:.2f}x | "
                         f"{row['dense_gflops']:.0f} | {row['block_gflops']:.0f} |")
        print("\n".join(lines[-5:]), flush=True)
        cases = [("Linear 1024x1024, batch 4096", nn.Linear(1024, 1024), torch.randn(4096, 1024))]
        if not args.only_linear:
            for conv, shape in trunk_conv_shapes(16, 64):
                name = (f"Conv {conv.in_channels}->{conv.out_channels} k{conv.kernel_size[0]} s{conv.stride[0]} "
                        f"d{conv.dilation[0]} @{shape[2]}x{shape[3]}")
                cases.append((name, conv, torch.randn(shape)))
        lines += ["", "| layer | " + " | ".join(f"{int(100 * s)}%" for s in SPARSITIES) + " |",
                  "|---|" + "---|" * len(SPARSITIES)]
        for name, layer, x in cases:
            cells = []
            for sparsity in SPARSITIES:
                times = layer_times(layer, x, sparsity, args.block, args.repeats)
                rows.append({"threads": threads, "load": "loaded" if loaded else "quiet", "layer": name,
                             "sparsity": sparsity, "dense_masked_ms": 1000 * times["dense"],
                             "cpu_ms": 1000 * times["cpu"], "torch_ms": 1000 * times["torch"]})
                cells.append(f"{times['dense'] / times['cpu']:.2f}x ({times['dense'] / times['torch']:.2f}x)")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
        if not args.skip_steps:
            lines += ["", "| step (90% blocks) | dense (ms) | cpu kernels (ms) | speed-up | torch path (ms) | "
                      "speed-up | state dense / block (MiB) |", "|---|---|---|---|---|---|---|"]
            for label, arch, width, inference in (("tiny ResNet-18 w16 training step, batch 16 @64", "resnet18", 16,
                                                   False),
                                                  ("ResNet-34 w64 5-task training step, batch 16 @64", "resnet34", 64,
                                                   False),
                                                  ("ResNet-34 w64 5-task inference forward, batch 16 @64", "resnet34",
                                                   64, True)):
                functions, memory = step_functions(arch, width, 16, args.block, inference)
                dense, compiled, torch_path = interleaved_median_times(functions, args.repeats, warmup=1)
                lines.append(f"| {label} | {1000 * dense:.0f} | {1000 * compiled:.0f} | {dense / compiled:.2f}x | "
                             f"{1000 * torch_path:.0f} | {dense / torch_path:.2f}x | {memory[0]:.0f} / {memory[1]:.0f} |")
                print(lines[-1], flush=True)
    return lines + [""], rows


def cpu_description() -> str:
    """The CPU model and its widest vector ISA (dense oneDNN uses AVX-512 where present; the
    compiled kernels use AVX2 + FMA), so results from different machines are not mixed up."""
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        return "unknown"
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    isa = "AVX-512" if "avx512f" in flags else "AVX2 + FMA" if "avx2" in flags and "fma" in flags else "no AVX2"
    return f"{model}, {isa}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--loads", default="quiet,loaded", help="quiet, loaded or both")
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--skip-steps", action="store_true", help="no training-step or inference tables")
    parser.add_argument("--only-linear", action="store_true", help="the Linear only, no conv shapes")
    parser.add_argument("--out", default=str(RESULTS_DIR))
    args = parser.parse_args()
    if not cpu.available():
        raise SystemExit(f"the compiled CPU kernels do not run here: {cpu.unavailable_reason()}")
    torch.manual_seed(0)
    host, date = machine_tag(), today()
    lines = [f"Block-sparse vs dense masked compute, block {args.block}, torch {torch.__version__}, {host}, {date}, "
             f"CPU: {cpu_description()}", "",
             "Layer cells: speed-up of the compiled CPU kernels (in brackets: of the PyTorch path) over the dense op "
             f"on a masked weight, forward + backward, median of {args.repeats} samples of at least "
             f"{1000 * MIN_SAMPLE_S:.0f} ms of calls each, the sides called in turn.", ""]
    rows = []
    for loaded in [load == "loaded" for load in args.loads.split(",")]:
        for threads in [int(t) for t in args.threads.split(",")]:
            table, measured = measure(threads, loaded, args)
            lines += table
            rows += measured
    mask = random_block_mask(block_grid((512, 512 * 9), args.block).grid, 0.9)
    start = time.perf_counter()
    for _ in range(20):
        BlockLayout.from_mask(mask)
    lines.append(f"Layout rebuild for a 512x4608 weight at 90% ({int(mask.sum())} blocks): "
                 f"{1e6 * (time.perf_counter() - start) / 20:.0f} us.")
    publish(f"block-sparse-b{args.block}", "\n".join(lines), args.out)
    with open(result_path(f"block-sparse-b{args.block}", ".csv", args.out), "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
