"""Quality check: dense vs DiSparse vs SNIP vs random at one sparsity, same steps, over seeds.

Trains one run per method and seed from the same config (the ``synthetic_tiny`` preset by
default), then writes the paper-style table of ``dsparse report`` (every task metric,
sparsity and Delta_T against the dense run of the same seed; seeds as mean ± std, best and
seed-noise marks) as Markdown, CSV, LaTeX and PNG. Usage::

    python benchmarks/compare_methods.py --data data/synthetic --sparsity 0.9 --seeds 0,1

Writes ``benchmarks/results/methods-<methods>-<sparsity>-<host>-<date>.{md,csv,tex,png}``.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from results_io import RESULTS_DIR, machine_tag, result_path, today

from dsparse.config import load_config
from dsparse.report import build_report, to_markdown, write_report
from dsparse.train.trainer import train

METHODS = ["dense", "disparse", "snip", "random"]


def run_overrides(data: str, out: Path, seed: int, experiment: str, run_name: str, iterations: int | None) -> list[str]:
    """The ``--set`` overrides every compared run shares: data, run directory, seed,
    MLflow experiment and run name, and (optionally) a shorter schedule."""
    overrides = [f"data.path={data}", f"output_dir={out}", f"seed={seed}", f"tracking.experiment={experiment}",
                 f"tracking.run_name={run_name}"]
    if iterations:
        overrides += [f"train.iterations={iterations}", f"train.eval_interval={iterations}",
                      f"train.checkpoint_interval={iterations}"]
    return overrides


def run_method(method: str, seed: int, args, root: Path) -> Path:
    """Train one run; returns its directory."""
    if method == "dense" and args.reuse_dense:
        logging.info("reusing the dense baseline of %s", args.reuse_dense)
        return Path(args.reuse_dense)
    out = root / f"{method}-seed{seed}"
    overrides = run_overrides(args.data, out, seed, "dsparse-methods", f"{method}-{args.sparsity}-seed{seed}",
                              args.iterations)
    if method != "dense":
        overrides += [f"sparsity.method={method}", f"sparsity.target={args.sparsity}",
                      f"sparsity.num_batches={args.num_batches}"]
    train(load_config(args.config, overrides))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="synthetic_tiny")
    parser.add_argument("--data", default="data/synthetic")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--num-batches", type=int, default=50)
    parser.add_argument("--seeds", default="0", help="comma list of seeds, e.g. 0,1,2")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma list starting with dense; dynamic methods: disparse_dynamic,rigl,set")
    parser.add_argument("--reuse-dense", default=None, metavar="RUN_DIR",
                        help="take the dense baseline from this finished run (same config and steps; one seed)")
    parser.add_argument("--runs", default="runs/methods")
    parser.add_argument("--out", default=str(RESULTS_DIR))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    methods, seeds = args.methods.split(","), [int(s) for s in args.seeds.split(",")]
    if methods[0] != "dense":
        raise SystemExit("the first method must be dense: it is the Delta_T baseline")
    if args.reuse_dense and len(seeds) > 1:
        raise SystemExit("--reuse-dense holds one seed's dense run; pass one seed, or train the dense runs")
    root = Path(args.runs) / time.strftime("%Y%m%d-%H%M%S")
    run_dirs = [run_method(method, seed, args, root) for seed in seeds for method in methods]
    report = build_report(run_dirs)
    name = f"methods-{'-'.join(methods[1:])}-{args.sparsity}"
    title = (f"Methods at sparsity {args.sparsity}, config {args.config}, seeds {args.seeds}, "
             f"{args.iterations or 'preset'} iterations, {machine_tag()}, {today()}")
    paths = write_report(report, result_path(name, "", args.out), overwrite=True)
    print(f"{title}\n\n{to_markdown(report)}\nwrote " + ", ".join(map(str, paths)))


if __name__ == "__main__":
    main()
