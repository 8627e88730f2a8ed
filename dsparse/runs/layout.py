"""Where a run directory keeps each of its files: one owner of the path arithmetic.

Every verb after ``train`` (eval, export, analyze, report, sweep) reads runs through
:class:`RunLayout`, so a file that moves moves here only::

    runs/NAME/
      config.yaml            the resolved config the run trains with
      run.json               identity: run id, absolute path (a copy is told apart)
      config-history.jsonl   one line per start or resume, with the settings it changed
      .lock                  held by the training process on rank 0
      masks.pt               the masks training started from (sparse runs)
      mask_layers.txt        their per-layer table
      checkpoints/           step-NNNNNNNN/ directories and the ``latest`` pointer
      summary.json           written when the run completes
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from dsparse.config import RunConfig, load_config
from dsparse.locks import LOCK_FILE

__all__ = ["RunLayout"]


@dataclass(frozen=True)
class RunLayout:
    """The files of the run directory ``path`` (nothing is read until asked)."""

    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def identity(self) -> Path:
        return self.path / "run.json"

    @property
    def history(self) -> Path:
        return self.path / "config-history.jsonl"

    @property
    def lock(self) -> Path:
        return self.path / LOCK_FILE

    @property
    def masks(self) -> Path:
        return self.path / "masks.pt"

    @property
    def mask_table(self) -> Path:
        return self.path / "mask_layers.txt"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    @classmethod
    def of_checkpoint(cls, checkpoint: str | Path) -> RunLayout | None:
        """The run a ``checkpoints/step-*`` directory belongs to (None for a loose one)."""
        checkpoint = Path(checkpoint)
        return cls(checkpoint.parent.parent) if checkpoint.parent.name == "checkpoints" else None

    def read_config(self) -> RunConfig:
        """The run's resolved config.

        Raises:
            ValueError: no ``config.yaml``, or one that does not validate.
        """
        if not self.config.is_file():
            raise ValueError(f"{self.path} holds no config.yaml; pass a run directory written by dsparse train")
        return load_config(self.config)

    def read_summary(self) -> dict | None:
        """``summary.json`` of a completed run, None before it completes (or if unreadable)."""
        try:
            return json.loads(self.summary.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def read_identity(self) -> dict | None:
        try:
            return json.loads(self.identity.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def run_uid(self) -> str | None:
        """The run's identity (``run.json``), which its MLflow run carries as the
        ``dsparse.run_uid`` tag."""
        return (self.read_identity() or {}).get("run_uid")

    def original(self) -> str | None:
        """The run directory this one was copied from (its ``run.json`` names another path),
        or None for the original itself. Read-only: analysis and training decide copies alike."""
        identity = self.read_identity()
        if identity is None or identity.get("path") == str(self.path.resolve()):
            return None
        return identity.get("path")
