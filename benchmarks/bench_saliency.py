"""Retained-graph per-task saliency vs the plain approach, on the same model and batches.

``compute_saliency`` runs ONE forward per batch and then one ``autograd.grad`` per task
over the retained graph. The plain approach it replaces runs, for every task, a fresh
forward and ``L_t.backward()``. With a forward costing F and one task's backward B = bF,
the plain approach costs ``T(1 + b)`` and the retained one ``1 + Tb``, so the speed-up is
bounded by about ``3T / (1 + 2T) = 1.36`` at T = 5 and b = 2. The benchmark measures both
(plus a stronger plain baseline whose forward runs only the scored task's head), the
forward time alone, and the per-task backward/forward ratio b implied by them.

Usage::

    python benchmarks/bench_saliency.py                 # both models, ~1-2 minutes on 2 cores
    python benchmarks/bench_saliency.py --reps 3 --num-batches 1

Writes ``benchmarks/results/saliency-<host>-<date>.md``. Timings on a shared machine are
noisy: the approaches are interleaved within each repetition and the median is reported.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from results_io import RESULTS_DIR, machine_tag, publish, today

from dsparse.models import build_model, prunable_parameters
from dsparse.sparsity.saliency import compute_saliency, task_weight_users
from dsparse.tasks import build_tasks

TASK_NAMES = ["seg", "normal", "depth", "keypoint", "edge"]
NUM_CLASSES = 13
CASES = {
    "resnet18 w16 (tiny)": dict(arch="resnet18", base_width=16, batch_size=16),
    "resnet34 w64": dict(arch="resnet34", base_width=64, batch_size=4),
}


def random_batches(num: int, batch_size: int, size: int, seed: int = 0) -> list[dict]:
    """Tensors shaped like loader batches for the five tasks."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num):
        batch = {"rgb": torch.randn(batch_size, 3, size, size, generator=g),
                 "seg": torch.randint(0, NUM_CLASSES, (batch_size, size, size), generator=g),
                 "normal": torch.randn(batch_size, 3, size, size, generator=g)}
        for task in ("depth", "keypoint", "edge"):
            batch[task] = torch.rand(batch_size, 1, size, size, generator=g)
        batches.append(batch)
    return batches


def plain_saliency(model, tasks, batches, own_head_only: bool) -> dict:
    """SNIP per task the plain way: a fresh forward and backward into .grad per task."""
    weights = prunable_parameters(model)
    users = task_weight_users(model)
    scores = {}
    for name, task in tasks.items():
        fqns = [f for f, u in users.items() if name in u]
        sums = {f: torch.zeros_like(weights[f]) for f in fqns}
        for batch in batches:
            model.zero_grad(set_to_none=True)
            outputs = model(batch["rgb"], tasks=[name]) if own_head_only else model(batch["rgb"])
            task.loss(outputs[name], batch[name]).backward()
            with torch.no_grad():
                for f in fqns:
                    sums[f] += (weights[f].grad * weights[f]).abs()
        scores[name] = sums
    model.zero_grad(set_to_none=True)
    return scores


def forward_only(model, batches) -> None:
    for batch in batches:
        model(batch["rgb"])  # with autograd recording, as in the scoring forward


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_case(label: str, arch: str, base_width: int, batch_size: int, args) -> dict:
    tasks = build_tasks(TASK_NAMES, num_classes=NUM_CLASSES)
    torch.manual_seed(0)
    model = build_model(arch, {t: k.num_channels for t, k in tasks.items()}, base_width=base_width,
                        head_dilations=(1, 2, 4, 8)).train()
    batches = random_batches(args.num_batches, batch_size, args.size)
    approaches = {
        "retained": lambda: compute_saliency(model, tasks, batches, num_batches=args.num_batches),
        "plain": lambda: plain_saliency(model, tasks, batches, own_head_only=False),
        "plain_own_head": lambda: plain_saliency(model, tasks, batches, own_head_only=True),
        "forward": lambda: forward_only(model, batches),
    }
    check_agreement(approaches["retained"](), approaches["plain"]())
    for fn in approaches.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in approaches}
    for _ in range(args.reps):
        for name, fn in approaches.items():
            times[name].append(timed(fn))
    medians = {name: statistics.median(values) for name, values in times.items()}
    num_params = sum(p.numel() for p in model.parameters())
    print(f"{label}: " + ", ".join(f"{k} {v:.3f}s" for k, v in medians.items()), flush=True)
    return dict(label=label, num_params=num_params, batch_size=batch_size, **medians)


def check_agreement(retained: dict, plain: dict) -> None:
    """Both approaches must give the same scores, or the timing comparison means nothing."""
    for task, per_fqn in plain.items():
        for fqn, ref in per_fqn.items():
            torch.testing.assert_close(retained[task][fqn], ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


def report(rows: list[dict], args) -> str:
    num_tasks = len(TASK_NAMES)
    bound = 3 * num_tasks / (1 + 2 * num_tasks)
    host = machine_tag()
    lines = [
        f"Saliency cost, T={num_tasks} tasks, {host}, {today()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {args.num_batches} batches of {args.size}x{args.size} per call, "
        f"median of {args.reps} reps (load average at start {os.getloadavg()[0]:.1f})",
        "",
        "| model | params | batch | retained (s) | plain (s) | plain / retained | plain, own head (s) "
        "| own head / retained | forward (s) | b = B_task/F | predicted ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        # retained = F + T*B_task  ->  b = (retained - F) / (T * F)
        b = (r["retained"] - r["forward"]) / (num_tasks * r["forward"])
        predicted = num_tasks * (1 + b) / (1 + num_tasks * b)
        lines.append(
            f"| {r['label']} | {r['num_params'] / 1e6:.2f}M | {r['batch_size']} | {r['retained']:.3f} "
            f"| {r['plain']:.3f} | {r['plain'] / r['retained']:.2f}x | {r['plain_own_head']:.3f} "
            f"| {r['plain_own_head'] / r['retained']:.2f}x | {r['forward']:.3f} | {b:.2f} | {predicted:.2f}x |"
        )
    lines += [
        "",
        f"- Bound for b = 2: 3T/(1+2T) = {bound:.2f}x. `predicted ratio` = T(1+b)/(1+Tb) from the measured "
        "forward time F and the per-task backward time implied by the retained run.",
        "- `plain` runs the whole model (all heads) per task; `own head` runs the trunk and the scored "
        "task's head only, the strongest plain baseline.",
        "- Both approaches give identical scores (checked before timing).",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--num-batches", type=int, default=2)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS_DIR))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [run_case(label, args=args, **case) for label, case in CASES.items()]
    text = report(rows, args)
    publish("saliency", text, args.out)


if __name__ == "__main__":
    main()
