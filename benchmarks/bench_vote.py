"""Time and peak memory of the unanimous vote on a full-size multitask ResNet-34.

The case that matters: a DeepLab ResNet-34 trunk (base width 64) with the five
Taskonomy-style heads, about 21.5M prunable weights, random normalised per-task scores,
first convolution dense. Target: under 10 s on a 2-core CPU machine. For each scope,
sparsity and intra-op thread count it measures:
  * wall time of ``solve_vote`` (after a warm-up solve on a tiny model);
  * the peak resident memory the solve adds (Linux ``VmHWM`` after resetting it through
    ``/proc/self/clear_refs``, minus ``VmRSS`` before; torch allocations bypass
    tracemalloc, so RSS is the honest measure);
  * a plain PyTorch baseline in the same run: ``torch.topk`` over one concatenated score
    vector (what single-task global pruning costs, without the exact tie-break).

Usage::

    python benchmarks/bench_vote.py                   # the default grid, about two minutes
    python benchmarks/bench_vote.py --threads 2 --cases global:0.9

Writes ``benchmarks/results/vote-<host>-<date>.md`` and ``.csv``. On a shared machine the
load average (printed) matters: with 2 threads on 2 busy cores every parallel op waits
for a core, so compare the 1-thread rows too.
"""

from __future__ import annotations

import argparse
import ctypes
import csv
import gc
import itertools
import os
import time
from pathlib import Path

import torch

from results_io import RESULTS_DIR, machine_tag, result_path

from dsparse.models import build_model, parameter_users, prunable_parameters
from dsparse.sparsity.vote import solve_vote

TASKS = {"seg": 10, "normal": 3, "depth": 1, "keypoint": 1, "edge": 1}


def memory_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False if not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def release_free_memory() -> None:
    """Return freed heap pages to the OS (glibc), so RSS before a case is live memory only
    and not what an earlier case freed but the allocator kept."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure(run) -> tuple[float, float | None]:
    """(seconds, peak MiB added) of ``run()``; the peak is None if it cannot be reset."""
    release_free_memory()
    resettable = reset_peak()
    before = memory_kib("VmRSS")
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    added = (memory_kib("VmHWM") - before) / 1024 if resettable else None
    return seconds, added


def random_scores(users: dict[str, frozenset[str]], weights: dict, kind: str, seed: int = 0) -> dict:
    """Uniform scores normalised to sum 1 over the weights each task uses. ``independent``:
    a draw per task; ``identical``: one draw per weight shared by its users (like the
    magnitude criterion), the hardest case for the solve since the OR then adds little."""
    generator = torch.Generator().manual_seed(seed)
    shared = {f: torch.rand(w.shape, generator=generator) for f, w in weights.items()} if kind == "identical" else {}
    scores = {t: {f: shared[f].clone() if shared else torch.rand(w.shape, generator=generator)
                  for f, w in weights.items() if t in users[f]} for t in TASKS}
    for per_fqn in scores.values():
        total = sum(float(s.sum(dtype=torch.float64)) for s in per_fqn.values())
        for score in per_fqn.values():
            score.div_(total)
    return scores


def warm_up() -> None:
    model = build_model("resnet18", {"a": 1, "b": 1}, base_width=8, head_dilations=(1,))
    weights = prunable_parameters(model)
    users = {f: parameter_users(model)[f] for f in weights}
    scores = {t: {f: torch.rand(w.shape) for f, w in weights.items() if t in users[f]} for t in ("a", "b")}
    solve_vote(scores, users, sparsity=0.9)


def run_case(scores, users, joint: torch.Tensor, dense: str, scope: str, sparsity: float) -> dict:
    result = {}
    seconds, added = measure(lambda: result.update(
        vote=solve_vote(scores, users, sparsity=sparsity, scope=scope, dense=[dense])))
    vote = result.pop("vote")
    assert vote.num_kept == round((1 - sparsity) * vote.num_total), "the vote must hit the budget exactly"
    baseline, _ = measure(lambda: torch.topk(joint, round((1 - sparsity) * joint.numel())))
    return dict(scope=scope, sparsity=sparsity, seconds=round(seconds, 3),
                peak_mib=None if added is None else round(added), keep_ratio=round(vote.keep_ratio, 6),
                baseline_topk_seconds=round(baseline, 3), ratio=round(seconds / baseline, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--cases", nargs="+", default=["global:0.5", "global:0.9", "global:0.99", "layerwise:0.9"],
                        help="SCOPE:SPARSITY pairs")
    parser.add_argument("--scores", nargs="+", default=["independent", "identical"],
                        choices=["independent", "identical"])
    parser.add_argument("--out", default=str(RESULTS_DIR))
    args = parser.parse_args()

    torch.manual_seed(0)
    model = build_model("resnet34", TASKS, base_width=64)
    weights = prunable_parameters(model)
    users = {f: parameter_users(model)[f] for f in weights}
    del model
    first = next(iter(weights))
    num_total = sum(w.numel() for w in weights.values())
    warm_up()

    rows, scores, loaded = [], None, None
    for kind, threads, case in itertools.product(args.scores, args.threads, args.cases):
        if loaded != kind:
            scores = joint = None  # free the previous set before drawing the next
            scores, loaded = random_scores(users, weights, kind), kind
            joint = torch.cat([s.reshape(-1) for s in scores["seg"].values()])
        torch.set_num_threads(threads)
        scope, sparsity = case.split(":")[0], float(case.split(":")[1])
        rows.append(dict(scores=kind, threads=threads, **run_case(scores, users, joint, first, scope, sparsity)))
        print(rows[-1], flush=True)
    write_report(rows, num_total, Path(args.out))


def write_report(rows: list[dict], num_total: int, out: Path) -> None:
    host = machine_tag()
    date = time.strftime("%Y-%m-%d")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = [
        f"Vote on ResNet-34 (base width 64), tasks {', '.join(TASKS)}: {num_total:,} prunable weights, "
        f"uniform random scores, first conv dense. {host}, {date}, torch {torch.__version__}, load average {load}.",
        "",
        "| scores | threads | scope | sparsity | vote s | peak MiB added | keep ratio | topk baseline s "
        "| vote / topk |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['scores']} | {r['threads']} | {r['scope']} | {r['sparsity']} | {r['seconds']:.2f} "
              f"| {r['peak_mib']} | {r['keep_ratio']} | {r['baseline_topk_seconds']:.2f} | {r['ratio']} |"
              for r in rows]
    lines += ["", "Baseline: one `torch.topk` over a single task's concatenated scores (no vote, no exact "
              "tie-break). Peak = VmHWM after the solve minus VmRSS before it (scores and model excluded)."]
    report = "\n".join(lines)
    print(report)
    name = "vote"
    result_path(name, ".md", out).write_text(report + "\n")
    with result_path(name, ".csv", out).open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {result_path(name, '.md', out)} and .csv")


if __name__ == "__main__":
    main()
