"""Sweeps over run configs (sparsity levels, methods, task sets, seeds, hyperparameters).

``spec`` reads and validates sweep specs; the Ray Tune driver that runs them as
multi-worker trials is the next step (see README, "Not yet done").
"""

from dsparse.sweep.spec import Resources, SweepSpec, load_sweep_spec

__all__ = ["Resources", "SweepSpec", "load_sweep_spec"]
