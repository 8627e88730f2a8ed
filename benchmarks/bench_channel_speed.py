"""Where the time of a channel-pruned model goes, and what rounding channel counts buys.

The tiny five-task model (the demo's) is pruned by the channel vote at a FLOPs budget with
``sparsity.channel_multiple`` 1 (the vote's exact counts), 8 and 16, from per-task random
scores (speed depends on the architecture, not on the weights), and each variant is timed
against the dense model in this process, the sides called in turn:

* the training step (forward, the five losses, backward, Adam) at the demo's batch of 16,
  split by the PyTorch profiler into convolutions (forward and backward) and the rest
  (norms, activations, the heads' upsampling, losses, optimizer), which does not shrink
  with the FLOPs;
* ONNX Runtime inference of its export at batch 1 and 16 (idle threads not spinning, so
  the sessions timed in turn do not take each other's cores).

Usage::

    python benchmarks/bench_channel_speed.py --threads 2

Writes ``benchmarks/results/channel-speed-<host>-<date>.{md,csv}``.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
from pathlib import Path

import torch
from bench_model import adam_step, add_model_args, bench_model, bench_tasks, fake_batch
from results_io import RESULTS_DIR, machine_tag, result_path, today
from timing import interleaved_median_times
from torch.profiler import ProfilerActivity, profile

from dsparse.models import parameter_users, prunable_parameters
from dsparse.onnx_export import OnnxRuntimeModel, write_onnx
from dsparse.sparsity.channel.prune import channel_masks
from dsparse.sparsity.channel.shrink import shrink_model
from dsparse.sparsity.channel.vote import ChannelCost

CONV_OPS = ("aten::mkldnn_convolution", "aten::convolution_backward", "aten::_convolution", "aten::thnn_conv2d")


def random_task_scores(model: torch.nn.Module, seed: int) -> dict[str, dict[str, torch.Tensor]]:
    """Per-task uniform scores on the weights each task uses, normalised per task."""
    generator = torch.Generator().manual_seed(seed)
    weights, users = prunable_parameters(model), parameter_users(model)
    tasks = sorted(set().union(*users.values()))
    scores = {t: {f: torch.rand(w.shape, generator=generator) for f, w in weights.items() if t in users[f]}
              for t in tasks}
    return {t: {f: s / sum(float(v.sum()) for v in per.values()) for f, s in per.items()} for t, per in scores.items()}


def pruned_model(args, tasks, keep: float, multiple: int) -> torch.nn.Module:
    model = bench_model(args, tasks)
    masks = channel_masks(model, random_task_scores(model, seed=1), sparsity=1 - keep, budget="flops",
                          scope="global", input_size=(args.size, args.size), joint_task=None, meta={},
                          multiple=multiple)
    shrink_model(model, masks.meta["channels"])
    return model


def conv_share(step, calls: int = 5) -> tuple[float, float]:
    """Seconds per step in convolutions and in everything else, by the profiler's self CPU time."""
    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    conv = sum(e.self_cpu_time_total for e in events if e.key in CONV_OPS)
    return conv / calls / 1e6, (total - conv) / calls / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(parser)
    parser.add_argument("--keep", default="0.5,0.25", help="fractions of the dense FLOPs kept")
    parser.add_argument("--multiples", default="1,8,16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", default=str(RESULTS_DIR))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tasks = bench_tasks()
    batch = fake_batch(args.batch, args.size)
    example = torch.zeros(1, 3, args.size, args.size)
    variants = {("dense", 1.0, 0): bench_model(args, tasks)}
    for keep in (float(k) for k in args.keep.split(",")):
        for multiple in (int(m) for m in args.multiples.split(",")):
            variants["channel", keep, multiple] = pruned_model(args, tasks, keep, multiple)
    models = list(variants.values())
    steps_of = [adam_step(m, tasks, batch) for m in models]
    steps = interleaved_median_times(steps_of, args.repeats, warmup=2)
    rounds = [[conv_share(step) for step in steps_of] for _ in range(3)]  # the models in turn, 3 rounds
    shares = [tuple(statistics.median(r[i][part] for r in rounds) for part in (0, 1)) for i in range(len(models))]
    latency = {}
    with tempfile.TemporaryDirectory() as directory:
        sessions = []
        for index, model in enumerate(models):
            path = Path(directory) / f"variant{index}.onnx"
            write_onnx(model.eval(), list(tasks), (args.size, args.size), path)
            sessions.append(OnnxRuntimeModel(path, threads=args.threads, spinning=False))
        for size in (1, 16):
            x = torch.randn(size, 3, args.size, args.size)
            latency[size] = interleaved_median_times([lambda s=s: s(x) for s in sessions], args.repeats, warmup=2,
                                                     min_sample_s=0.05)
    dense_flops = ChannelCost.of(models[0], example, "flops").total({}, [])
    rows = []
    for index, ((kind, keep, multiple), model) in enumerate(variants.items()):
        flops = ChannelCost.of(model, example, "flops").total({}, [])
        rows.append({"variant": kind, "flops_kept_target": keep, "channel_multiple": multiple,
                     "params": sum(p.numel() for p in model.parameters()), "flops": flops,
                     "flops_kept": flops / dense_flops, "step_ms": 1e3 * steps[index],
                     "step_speedup": steps[0] / steps[index], "conv_ms": 1e3 * shares[index][0],
                     "other_ms": 1e3 * shares[index][1], "onnx_b1_ms": 1e3 * latency[1][index],
                     "onnx_b1_speedup": latency[1][0] / latency[1][index], "onnx_b16_ms": 1e3 * latency[16][index],
                     "onnx_b16_speedup": latency[16][0] / latency[16][index]})
    title = (f"Channel-pruned tiny model ({args.arch}, width {args.width}, {args.size}x{args.size}, batch {args.batch}) "
             f"vs dense, random per-task scores, {args.threads} threads, {machine_tag()}, {today()}")
    header = ["variant", "channel multiple", "params", "FLOPs kept", "train step ms (vs dense)",
              "convolutions ms", "the rest ms", "ONNX RT b1 ms (vs dense)", "ONNX RT b16 ms (vs dense)"]
    lines = [title, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        multiple = r["channel_multiple"] or "-"
        lines.append(f"| {r['variant']} | {multiple} | {r['params']:,} | {r['flops_kept']:.1%} | "
                     f"{r['step_ms']:.1f} ({r['step_speedup']:.2f}x) | {r['conv_ms']:.1f} | {r['other_ms']:.1f} | "
                     f"{r['onnx_b1_ms']:.2f} ({r['onnx_b1_speedup']:.2f}x) | "
                     f"{r['onnx_b16_ms']:.1f} ({r['onnx_b16_speedup']:.2f}x) |")
    lines += ["", "Convolutions and the rest are the profiler's self CPU time per step (the profiler adds a little "
                  "to each; median of 3 rounds, the models profiled in turn); the step is timed without it."]
    name = f"channel-speed-{args.arch}-w{args.width}"
    result_path(name, ".md", args.out).write_text("\n".join(lines) + "\n")
    with open(result_path(name, ".csv", args.out), "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print("\n".join(lines))
    print(f"wrote {result_path(name, '.md', args.out)} (+ .csv)")


if __name__ == "__main__":
    main()
