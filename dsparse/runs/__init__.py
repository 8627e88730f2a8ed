"""A run directory and what is read back from it: where its files are (``layout``), its
checkpoints found, verified and read without DeepSpeed (``checkpoints``), and a trained
run restored as a model (``restore``). Training writes runs (``dsparse.train``); every
other verb reads them through this package.
"""

from dsparse.runs.checkpoints import (
    LATEST,
    UnsafeCheckpointError,
    checkpoint_problem,
    checkpoint_step,
    latest_checkpoint,
    latest_intact_checkpoint,
    load_model_weights,
    published_checkpoints,
    read_checkpoint_file,
    resolve_checkpoint,
    run_config_of,
)
from dsparse.runs.layout import RunLayout

__all__ = ["LATEST", "RunLayout", "UnsafeCheckpointError", "checkpoint_problem", "checkpoint_step",
           "latest_checkpoint", "latest_intact_checkpoint", "load_model_weights", "published_checkpoints",
           "read_checkpoint_file", "resolve_checkpoint", "run_config_of"]
