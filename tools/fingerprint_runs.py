"""Fixed-seed fingerprints of a few training runs, to prove a refactor changes nothing.

Why: a redesign that "keeps behaviour exactly" must show it. This trains small fixed-seed
runs through the CLI (static DiSparse at ZeRO 0, SNIP at ZeRO 1, DiSparse dynamic, RigL at
ZeRO 2, block DiSparse, a 2-rank run under torchrun) and records, per run, every step's
per-task losses (from its MLflow store) and a SHA-256 of every tensor in its final
checkpoint (weights, optimizer state, masks). Run it before and after a change and compare:

    python tools/fingerprint_runs.py --out /tmp/before.json
    python tools/fingerprint_runs.py --out /tmp/after.json --compare /tmp/before.json

Only the CLI, MLflow's store and checkpoint files are read, so the tool does not depend on
the package's internal layout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

BASE = {"data.batch_size": 4, "data.num_workers": 0, "data.flip": True, "model.base_width": 8,
        "model.head_dilations": [1, 2], "train.iterations": 12, "train.eval_interval": 6,
        "train.checkpoint_interval": 6, "train.log_interval": 1, "train.eval_batches": 2, "train.threads": 1,
        "sparsity.target": 0.8, "sparsity.num_batches": 2, "sparsity.interval": 3}
SCENARIOS = {
    "disparse_zero0": {"sparsity.method": "disparse", "deepspeed.zero_stage": 0},
    "snip_zero1": {"sparsity.method": "snip", "deepspeed.zero_stage": 1},
    "disparse_dynamic": {"sparsity.method": "disparse_dynamic"},
    "rigl_zero2": {"sparsity.method": "rigl", "deepspeed.zero_stage": 2},
    "block_disparse": {"sparsity.method": "disparse", "sparsity.granularity": "block", "sparsity.block": 16},
    "disparse_2rank": {"sparsity.method": "disparse", "deepspeed.zero_stage": 1, "_nproc": 2},
}


def _tensors(value, prefix=""):
    """(key path, tensor) of every tensor inside nested dicts/lists."""
    if isinstance(value, torch.Tensor):
        yield prefix, value
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            yield from _tensors(value[key], f"{prefix}/{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _tensors(item, f"{prefix}/{index}")


def checkpoint_digest(checkpoint: Path) -> dict[str, str]:
    digests = {}
    for file in sorted(checkpoint.rglob("*.pt")):
        state = torch.load(file, map_location="cpu", weights_only=False)  # our own fresh run: trusted
        digest = hashlib.sha256()
        for key, tensor in _tensors(state):
            digest.update(key.encode())
            digest.update(tensor.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy().tobytes()
                          if tensor.numel() else b"")
        digests[str(file.relative_to(checkpoint))] = digest.hexdigest()
    return digests


def step_losses(tracking_uri: str, run_id: str) -> dict[str, list[float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    keys = [k for k in client.get_run(run_id).data.metrics if k.startswith("train/loss")]
    return {k: [m.value for m in sorted(client.get_metric_history(run_id, k), key=lambda m: m.step)]
            for k in sorted(keys)}


def run_scenario(name: str, overrides: dict, data: Path, work: Path) -> dict:
    overrides = dict(overrides)
    nproc = overrides.pop("_nproc", 1)
    run_dir = work / name
    uri = f"sqlite:///{work / name}.db"
    values = {**BASE, **overrides, "data.path": str(data), "output_dir": str(run_dir), "tracking.uri": uri}
    sets = [arg for key, value in values.items() for arg in ("--set", f"{key}={json.dumps(value)}")]
    train = ["-m", "dsparse", "--json", "train", "synthetic_tiny", *sets]
    if nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                   *train]
    else:
        command = [sys.executable, *train]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    checkpoint = Path(summary["checkpoint"])
    return {"losses": step_losses(uri, summary["mlflow_run_id"]), "checkpoint": checkpoint_digest(checkpoint),
            "final_metrics": summary["final_metrics"], "sparsity": summary["sparsity"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--compare", help="a previous --out file; exit 1 if anything differs")
    parser.add_argument("--only", nargs="*", help="scenario names (default: all)")
    args = parser.parse_args()
    names = args.only or list(SCENARIOS)
    with tempfile.TemporaryDirectory() as temp:
        work = Path(temp)
        from dsparse.data.synth.dataset import write_synthetic_dataset

        write_synthetic_dataset(work / "data", num_train=48, num_val=16, size=32, seed=0, shard_size=6,
                                num_procs=1, progress=False)
        results = {}
        for name in names:
            print(f"{name} ...", file=sys.stderr, flush=True)
            results[name] = run_scenario(name, SCENARIOS[name], work / "data", work)
    Path(args.out).write_text(json.dumps(results, indent=1, sort_keys=True))
    if args.compare:
        before = json.loads(Path(args.compare).read_text())
        differ = [n for n in names if before.get(n) != results[n]]
        for name in names:
            print(f"{name}: {'DIFFERS' if name in differ else 'identical'}")
        raise SystemExit(1 if differ else 0)


if __name__ == "__main__":
    main()
