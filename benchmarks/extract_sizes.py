"""What task extraction leaves: parameters and FLOPs of a run cut down to each task subset.

For every non-empty subset of the run's tasks, the run is restored and extracted
(``dsparse.extract.extract_tasks``, as ``dsparse export RUN --tasks ...`` does), once
keeping the channels as trained (``revote=False``: the kept tasks' outputs unchanged) and,
for a channel run, once re-voting without the dropped tasks; with ``--dense``, the same
subset of a dense run of the same model for reference. FLOPs are counted at the dataset's
image size. Usage::

    python benchmarks/extract_sizes.py runs/structured/<time>/seed0/disparse-flops0.5 \\
        --dense runs/structured/<time>/seed0/dense

Writes ``benchmarks/results/extract-sizes-<host>-<date>.md``.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch
from results_io import RESULTS_DIR, publish

from dsparse.extract import extract_tasks
from dsparse.runs.restore import restore_run
from dsparse.sparsity.channel.vote import ChannelCost


def size_of(run: Path, keep: list[str], revote: bool) -> tuple[int, int]:
    restored = restore_run(run)
    extracted = extract_tasks(restored.model, restored.config, restored.masks, restored.tasks, keep, revote=revote)
    model = extracted.model
    example = torch.zeros(1, 3, *restored.manifest.image_size)
    return sum(p.numel() for p in model.parameters()), ChannelCost.of(model, example, "flops").total({}, [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", help="a trained run directory (channel, element or block masks)")
    parser.add_argument("--dense", default=None, help="a dense run of the same model, for reference")
    parser.add_argument("--out", default=str(RESULTS_DIR))
    args = parser.parse_args()
    restored = restore_run(args.run)
    tasks = list(restored.tasks)
    channel = restored.masks is not None and restored.masks.meta.get("granularity") == "channel"
    header = ["tasks kept", "params (kept channels)", "FLOPs (kept channels)"]
    header += ["params (re-voted)", "FLOPs (re-voted)"] if channel else []
    header += ["params (dense)", "FLOPs (dense)"] if args.dense else []
    lines = [f"Task extraction of {args.run} ({restored.masks.meta.get('granularity') if restored.masks else 'dense'}), "
             f"FLOPs at {restored.manifest.image_size[0]}x{restored.manifest.image_size[1]}", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    subsets = [list(c) for size in range(len(tasks), 0, -1) for c in itertools.combinations(tasks, size)]
    for index, keep in enumerate(subsets):
        cells = [",".join(keep)]
        sizes = [size_of(Path(args.run), keep, revote=False)]
        if channel:
            sizes.append(size_of(Path(args.run), keep, revote=True))
        if args.dense:
            sizes.append(size_of(Path(args.dense), keep, revote=False))
        for params, flops in sizes:
            cells += [f"{params:,}", f"{flops / 1e6:.1f} M"]
        lines.append("| " + " | ".join(cells) + " |")
        print(f"{index + 1}/{len(subsets)} subsets", flush=True)
    publish("extract-sizes", "\n".join(lines), args.out)


if __name__ == "__main__":
    main()
