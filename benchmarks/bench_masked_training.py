"""Overhead of masked (sparse) training vs dense training, per DeepSpeed step.

Same model, same in-memory batches, same engine settings; the masked run adds the
gradient hooks of ``MaskEnforcer`` (90% random masks). Dense is the baseline measured in
the same run. Usage::

    python benchmarks/bench_masked_training.py [--arch resnet18 --width 16 --batch 16]

Writes ``benchmarks/results/masked-training-<host>-<date>.md``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from results_io import RESULTS_DIR, machine_tag, publish, today

from dsparse.config import config_from_dict
from dsparse.models import build_model
from dsparse.sparsity.enforce import MaskEnforcer
from dsparse.sparsity.prune import prune
from dsparse.tasks import build_tasks
from dsparse.train.distributed import init_distributed
from dsparse.train.trainer import _build_engine

TASKS = ["seg", "normal", "depth", "keypoint", "edge"]


def fake_batch(batch: int, size: int, num_classes: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    normal = torch.nn.functional.normalize(torch.randn(batch, 3, size, size, generator=generator), dim=1)
    return {"rgb": torch.randn(batch, 3, size, size, generator=generator),
            "seg": torch.randint(0, num_classes, (batch, size, size), generator=generator),
            "normal": normal, "depth": torch.rand(batch, 1, size, size, generator=generator) * 5 + 0.5,
            "keypoint": torch.rand(batch, 1, size, size, generator=generator),
            "edge": torch.rand(batch, 1, size, size, generator=generator)}


def time_steps(engine, tasks, batch, num_steps: int) -> list[float]:
    times = []
    for step in range(num_steps + 3):
        start = time.perf_counter()
        outputs = engine(batch["rgb"])
        engine.backward(sum(task.loss(outputs[n], batch[n]) for n, task in tasks.items()))
        engine.step()
        if step >= 3:  # warm-up
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--zero-stage", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS_DIR))
    args = parser.parse_args()
    init_distributed()
    tasks = build_tasks(TASKS, num_classes=10)
    config = config_from_dict({"data": {"batch_size": args.batch}, "deepspeed": {"zero_stage": args.zero_stage}})
    batch = fake_batch(args.batch, args.size, 10)
    medians = {}
    for label in ("dense", "masked 90%"):
        torch.manual_seed(0)
        model = build_model(args.arch, {n: t.num_channels for n, t in tasks.items()}, base_width=args.width,
                            head_dilations=(1, 2, 4, 8))
        if label != "dense":
            MaskEnforcer(model, prune(model, tasks, None, method="random", sparsity=0.9))
        engine = _build_engine(config, model, torch.device("cpu"))
        medians[label] = statistics.median(time_steps(engine, tasks, batch, args.steps))
    overhead = medians["masked 90%"] / medians["dense"] - 1
    host, date = machine_tag(), today()
    lines = [f"Masked vs dense training step, {args.arch} width {args.width}, batch {args.batch} at "
             f"{args.size}x{args.size}, 5 tasks, ZeRO-{args.zero_stage}, {host}, {date}", "",
             "| run | median step (ms) |", "|---|---|"]
    lines += [f"| {label} | {1000 * value:.1f} |" for label, value in medians.items()]
    lines += ["", f"- masked / dense: {1 + overhead:.3f}x (overhead {100 * overhead:+.1f}%)"]
    report = "\n".join(lines)
    publish(f"masked-training-{args.arch}-w{args.width}", report, args.out)


if __name__ == "__main__":
    main()
