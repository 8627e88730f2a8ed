"""Sweeps over run configs (sparsity levels, methods, task sets, seeds, hyperparameters).

``spec`` reads and validates sweep specs; ``runner`` runs them with Ray Tune, one Ray Train
``TorchTrainer`` per trial whose workers (``worker``) run dsparse's training loop;
``results`` turns the trial directories into the results table and plot.
"""

from dsparse.sweep.spec import Resources, SweepSpec, load_sweep_spec

__all__ = ["Resources", "SweepSpec", "load_sweep_spec"]
