"""Quality check of ``dsparse analyze --branch``: a branched model, at the shared model's
parameter count and the same sparsity, against the shared trunk, over seeds.

Analyses one DiSparse run of the shared trunk, writes the branched config (trunk shared up
to the watershed stage, a copy of the later stages per task group, the trunk narrowed until
the branched model is no larger), trains it once per seed of the shared runs given, and
reports both with ``dsparse report``, Delta_T against the dense shared runs of each seed.
Branched runs are resumed or reused when their directory has them, so the script can be
rerun. Usage::

    python benchmarks/compare_branching.py --analyse runs/sweeps/S/trials/seed=0_..._method=disparse \\
        --shared RUN_seed0 RUN_seed1 --dense DENSE_seed0 DENSE_seed1 --groups 2

Writes ``benchmarks/results/branching-g<groups>-<host>-<date>.{md,csv,tex,png}``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import yaml
from results_io import RESULTS_DIR, machine_tag, result_path, today

from dsparse.analysis import analyze
from dsparse.analysis.branching import count_parameters
from dsparse.config import config_from_dict, load_config
from dsparse.report import build_report, load_run, to_markdown, write_report
from dsparse.train.trainer import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--analyse", required=True, help="the shared DiSparse run whose masks pick the branch point")
    parser.add_argument("--shared", nargs="+", required=True, help="shared-trunk sparse runs to compare (one per seed)")
    parser.add_argument("--dense", nargs="+", required=True, help="dense shared-trunk runs (one per seed): baselines")
    parser.add_argument("--groups", type=int, default=None, help="task groups (branches); default one per task")
    parser.add_argument("--runs", default="runs/branching")
    parser.add_argument("--out", default=str(RESULTS_DIR))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    root = Path(args.runs) / f"g{args.groups or 'tasks'}"
    result = analyze(args.analyse, root / "analysis", branch=True, num_groups=args.groups, same_params=True,
                     log_to_mlflow=False, overwrite=True)  # this script's own working directory
    raw = yaml.safe_load(result.branched_config.read_text())
    branched_dirs = []
    for shared in map(load_run, args.shared):
        run = config_from_dict(raw, [f"seed={shared.seed}", f"output_dir={(root / f'seed{shared.seed}').resolve()}",
                                     "tracking.experiment=dsparse-branching"])
        if not (Path(run.output_dir) / "summary.json").is_file():
            train(run, resume="auto")
        branched_dirs.append(Path(run.output_dir))
    report = build_report([*args.shared, *branched_dirs], baselines=args.dense)
    shared_config = load_config(Path(args.shared[0]) / "config.yaml")
    channels = {"seg": len(load_run(args.dense[0]).dataset["classes"]), "normal": 3, "depth": 1, "keypoint": 1,
                "edge": 1}
    channels = {t: channels[t] for t in shared_config.tasks}
    sizes = (count_parameters(shared_config, channels),
             count_parameters(config_from_dict(raw), channels))
    title = (f"Branched at {result.plan.branch_from} (watershed {result.plan.watershed}), groups "
             f"{result.plan.groups}, trunk width {raw['model']['base_width']} vs {shared_config.model.base_width}; "
             f"parameters {sizes[1]:,} vs {sizes[0]:,} shared; {machine_tag()}, {today()}")
    paths = write_report(report, result_path(f"branching-g{args.groups or 'tasks'}", "", args.out), overwrite=True)
    result_path(f"branching-g{args.groups or 'tasks'}", ".md", args.out).write_text(
        f"{title}\n\n{to_markdown(report)}")
    print(f"{title}\n\n{to_markdown(report)}\nwrote " + ", ".join(map(str, paths)))


if __name__ == "__main__":
    main()
