"""dsparse: distributed sparse training for multitask vision models (DiSparse).

The package is a library first; the ``dsparse`` CLI is a thin layer over it:

* ``dsparse.config``: typed run configs (YAML in, validated dataclasses out)
* ``dsparse.data``: synthetic scene renderer, WebDataset shards and the streaming loader
* ``dsparse.tasks``: task registry (losses, metrics, Delta_T)
* ``dsparse.models``: dilated ResNet trunk + ASPP heads with declared task structure
* ``dsparse.train``: the DeepSpeed training loop, checkpoints, evaluation
* ``dsparse.tracking``: MLflow tracking
"""

__version__ = "0.1.0"
