"""Pruning masks as one object: keyed by parameter FQN, saved compactly, checked against
the model before use, and summarised per layer.

A ``MaskSet`` is what the vote produces and what training enforces. It travels between
processes and runs (``dsparse prune`` writes it, ``dsparse train --masks`` and resumed runs
read it), so the file format is explicit and versioned, holds only tensors and plain
Python values (``torch.load(weights_only=True)`` reads it, no pickled classes), stores a
mask as packed bits (one bit per weight) and is written atomically. ``digest`` lets ranks
prove they derived identical masks without shipping them.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dsparse.io import atomic_path, load_tensor_file
from dsparse.models import prunable_parameters, unwrap_model
from dsparse.sparsity.vote import VoteResult

__all__ = ["MaskSet"]

FORMAT = "dsparse-masks"
VERSION = 1
_PLAIN = (str, int, float, bool, type(None))
_RESULT_META = ("keep_ratio", "num_kept", "num_total", "sparsity_achieved")


@dataclass
class MaskSet:
    """Keep masks (True = kept) for the prunable weights of one model.

    Attributes:
        masks: FQN -> bool keep mask, in the model's module order.
        meta: how the masks were made (method, criterion, scope, sparsity_requested,
            sparsity_achieved, keep_ratio, dense_layers, num_kept, num_total, ...).
        task_masks: task -> FQN -> per-task mask before the vote, for mask analysis.
    """

    masks: dict[str, torch.Tensor]
    meta: dict
    task_masks: dict[str, dict[str, torch.Tensor]] | None = None

    def __post_init__(self):
        groups = [("masks", self.masks)] + [(f"task_masks[{t!r}]", m) for t, m in (self.task_masks or {}).items()]
        for where, masks in groups:
            for fqn, mask in masks.items():
                if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                    kind = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
                    raise TypeError(f"{where}[{fqn!r}] must be a bool tensor (True = kept), got {kind}")

    @classmethod
    def from_vote(cls, result: VoteResult, **meta) -> MaskSet:
        """Masks of a ``solve_vote`` result; ``meta`` adds how they were made.

        Raises:
            ValueError: if ``meta`` sets a key taken from the result (keep_ratio,
                num_kept, num_total, sparsity_achieved).
        """
        clash = sorted(set(meta).intersection(_RESULT_META))
        if clash:
            raise ValueError(f"meta keys {clash} are taken from the vote result; do not pass them")
        derived = dict(keep_ratio=result.keep_ratio, num_kept=result.num_kept, num_total=result.num_total,
                       sparsity_achieved=result.sparsity)
        return cls(dict(result.masks), {**meta, **derived}, {t: dict(m) for t, m in result.task_masks.items()})

    # --- counts ---------------------------------------------------------------------

    @property
    def num_kept(self) -> int:
        return sum(int(torch.count_nonzero(mask)) for mask in self.masks.values())

    @property
    def num_total(self) -> int:
        return sum(mask.numel() for mask in self.masks.values())

    @property
    def sparsity(self) -> float:
        """Pruned fraction of all masked weights (0.0 for an empty set)."""
        total = self.num_total
        return 1.0 - self.num_kept / total if total else 0.0

    # --- files ----------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The file payload: format tag, version, meta and packed masks (plain values and
        uint8 tensors only, so ``torch.load(weights_only=True)`` reads it).

        Raises:
            ValueError: if ``meta`` holds values other than str/int/float/bool/None and
                lists, tuples or dicts of them.
        """
        _check_plain(self.meta, "meta")
        return {
            "format": FORMAT,
            "version": VERSION,
            "meta": self.meta,
            "masks": {fqn: _pack(mask) for fqn, mask in self.masks.items()},
            "task_masks": None if self.task_masks is None else {
                task: {fqn: _pack(mask) for fqn, mask in masks.items()} for task, masks in self.task_masks.items()
            },
        }

    @classmethod
    def from_state_dict(cls, payload, where: str = "mask state") -> MaskSet:
        """Inverse of ``state_dict``.

        Raises:
            ValueError: not a dsparse mask payload, another version, or corrupt.
        """
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise ValueError(f"{where} is not a dsparse mask file (no {FORMAT!r} format tag)")
        if payload.get("version") != VERSION:
            raise ValueError(f"{where} has format version {payload.get('version')!r}; this dsparse "
                             f"reads version {VERSION}: recreate it with `dsparse prune`")
        try:
            masks = {fqn: _unpack(packed) for fqn, packed in payload["masks"].items()}
            task_masks = payload["task_masks"]
            if task_masks is not None:
                task_masks = {t: {fqn: _unpack(p) for fqn, p in m.items()} for t, m in task_masks.items()}
            return cls(masks, dict(payload["meta"]), task_masks)
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as error:
            raise ValueError(f"{where} is corrupt ({type(error).__name__}: {error}); "
                             "recreate it with `dsparse prune`") from error

    def save(self, path: str | Path) -> None:
        """Write ``state_dict()`` atomically (a temporary file, then ``os.replace``).

        Raises:
            ValueError: as ``state_dict``.
        """
        payload = self.state_dict()
        with atomic_path(path) as temporary, open(temporary, "wb") as file:
            torch.save(payload, file)

    @classmethod
    def load(cls, path: str | Path) -> MaskSet:
        """Read a file written by ``save``.

        Raises:
            ValueError: if the file is missing, unreadable, corrupt, or not a dsparse
                mask file of a supported version.
        """
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"mask file {path} does not exist; write one with `dsparse prune ... --out {path}`")
        payload = load_tensor_file(path, "mask file", "it is corrupt or truncated: recreate it with `dsparse prune`")
        return cls.from_state_dict(payload, f"mask file {path}")

    def digest(self) -> str:
        """sha256 over FQNs (sorted), shapes and packed bits: equal iff the masks are equal."""
        sha = hashlib.sha256()
        for fqn in sorted(self.masks):
            mask = self.masks[fqn]
            sha.update(f"{fqn}\0{tuple(mask.shape)}\0".encode())
            sha.update(np.packbits(mask.detach().cpu().reshape(-1).numpy()).tobytes())
        return sha.hexdigest()

    # --- model ----------------------------------------------------------------------

    def check_matches(self, model: torch.nn.Module) -> None:
        """Fail unless the masks cover exactly the model's prunable weights, shape for shape.

        Raises:
            ValueError: naming every prunable parameter without a mask, every mask whose
                parameter the model lacks, and every shape mismatch (both shapes).
        """
        weights = prunable_parameters(unwrap_model(model))
        problems = [f"prunable parameter {n!r} has no mask" for n in weights if n not in self.masks]
        problems += [f"mask for {n!r}, which is not a prunable parameter of the model" for n in self.masks
                     if n not in weights]
        problems += [f"{n!r}: mask shape {tuple(self.masks[n].shape)} but parameter shape {tuple(w.shape)}"
                     for n, w in weights.items() if n in self.masks and self.masks[n].shape != w.shape]
        if problems:
            shown = problems[:8] + ([f"... and {len(problems) - 8} more"] if len(problems) > 8 else [])
            raise ValueError("masks do not match the model (were they made for another architecture, width or "
                             "task set?): " + "; ".join(shown))

    def apply_(self, model: torch.nn.Module) -> None:
        """Set every pruned weight of ``model`` to exactly zero, in place."""
        self.check_matches(model)
        weights = prunable_parameters(unwrap_model(model))
        with torch.no_grad():
            for fqn, mask in self.masks.items():
                weight = weights[fqn]
                weight.masked_fill_(~mask.to(weight.device), 0)

    # --- summaries ------------------------------------------------------------------

    def layer_table(self, users: dict[str, frozenset[str]] | None = None) -> list[dict]:
        """One row per layer: layer, users (comma-joined, sorted; "" if unknown), size,
        kept, sparsity."""
        rows = []
        for fqn, mask in self.masks.items():
            kept, size = int(torch.count_nonzero(mask)), mask.numel()
            rows.append(dict(layer=fqn, users=",".join(sorted((users or {}).get(fqn, ()))), size=size, kept=kept,
                             sparsity=1.0 - kept / size if size else 0.0))
        return rows

    def format_table(self, users: dict[str, frozenset[str]] | None = None) -> str:
        """``layer_table`` as aligned plain text, with a total row."""
        rows = self.layer_table(users)
        total = dict(layer="total", users="", size=self.num_total, kept=self.num_kept, sparsity=self.sparsity)
        header = ("layer", "users", "size", "kept", "sparsity")
        cells = [header] + [(r["layer"], r["users"], str(r["size"]), str(r["kept"]), f"{r['sparsity']:.4f}")
                            for r in rows + [total]]
        widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

        def line(row) -> str:
            left = [row[i].ljust(widths[i]) for i in range(2)]
            return "  ".join(left + [row[i].rjust(widths[i]) for i in range(2, len(header))])

        rule = "-" * len(line(cells[0]))
        return "\n".join([line(cells[0]), rule] + [line(c) for c in cells[1:-1]] + [rule, line(cells[-1])])

    def task_mask_iou(self) -> dict[str, dict[tuple[str, str], float]]:
        """Per layer, IoU of the before-the-vote masks of every task pair using it.

        Pairs follow the order of ``task_masks``; layers follow ``masks``, and a layer used
        by fewer than two tasks is left out. Two empty masks count as identical (IoU 1).

        Raises:
            ValueError: if the set has no task masks.
        """
        if self.task_masks is None:
            raise ValueError("this MaskSet has no task masks; build it with MaskSet.from_vote")
        result = {}
        for fqn in self.masks:
            pairs = {}
            for a, b in itertools.combinations(self.task_masks, 2):
                mask_a, mask_b = self.task_masks[a].get(fqn), self.task_masks[b].get(fqn)
                if mask_a is not None and mask_b is not None:
                    union = int(torch.count_nonzero(mask_a | mask_b))
                    pairs[a, b] = int(torch.count_nonzero(mask_a & mask_b)) / union if union else 1.0
            if pairs:
                result[fqn] = pairs
        return result


def _pack(mask: torch.Tensor) -> dict:
    bits = np.packbits(mask.detach().cpu().reshape(-1).numpy())
    return {"shape": list(mask.shape), "bits": torch.from_numpy(bits)}


def _unpack(packed: dict) -> torch.Tensor:
    shape, bits = packed["shape"], packed["bits"]
    numel = int(np.prod(shape, dtype=np.int64))
    if not isinstance(bits, torch.Tensor) or bits.dtype != torch.uint8 or bits.numel() != (numel + 7) // 8:
        raise ValueError(f"packed mask of shape {shape} has the wrong number of bits")
    flat = np.unpackbits(bits.numpy(), count=numel).view(np.bool_)  # a fresh array of 0/1 bytes
    return torch.from_numpy(flat).reshape(shape)


def _check_plain(value, where: str) -> None:
    """Exact types only: subclasses (numpy scalars, namedtuples) would not load with weights_only."""
    if type(value) in (list, tuple):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
    elif type(value) is dict:
        for key, item in value.items():
            if type(key) not in (str, int):
                raise ValueError(f"{where} has key {key!r}; keys must be str or int")
            _check_plain(item, f"{where}[{key!r}]")
    elif type(value) not in _PLAIN:
        raise ValueError(f"{where} is a {type(value).__name__}; mask files store only str, int, float, bool, "
                         "None and lists/tuples/dicts of them (convert it, e.g. a set to a sorted list)")
