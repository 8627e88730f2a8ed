"""Where a block-sparse weight's kept blocks sit: slots, and the row and column indexes
kernels walk (docs/design.md, "Block granularity and kernels").

A block-sparse layer stores its kept blocks in a ``[num_slots, B, B]`` tensor. Slot ``j``
holds block ``(slot_rows[j], slot_cols[j])`` of the ``[R, C]`` block grid. Slots are
stable across mask updates: a block that stays keeps its slot (so its optimizer state
stays put) and a grown block takes a freed slot. For kernels the layout also carries the
CSR view (slots of each block row, by column: what the forward and ``dW`` walk) and its
transpose (slots of each block column, by row: what ``dX = dY W`` walks, reading the same
blocks through the transposed index, with no copy of the weights).

Everything is built with tensor ops on the mask's device in O(number of blocks), with
no Python loop over blocks and no per-block host synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["BlockLayout"]


@dataclass
class BlockLayout:
    grid: tuple[int, int]
    """Block rows R and block columns C."""
    slot_rows: Tensor
    """Block row of every slot, int64 ``[num_slots]``."""
    slot_cols: Tensor
    """Block column of every slot, int64 ``[num_slots]``."""
    row_ptr: Tensor
    """CSR pointers ``[R + 1]``: the kept blocks of row ``r`` are ``row_slots[row_ptr[r]:row_ptr[r + 1]]``."""
    row_slots: Tensor
    """Slots in row-major block order (by row, then column)."""
    col_ptr: Tensor
    """Transposed pointers ``[C + 1]``: the kept blocks of column ``c`` are ``col_slots[col_ptr[c]:col_ptr[c + 1]]``."""
    col_slots: Tensor
    """Slots in column-major block order (by column, then row)."""
    _rows: list | None = field(default=None, repr=False, compare=False)
    _cols: list | None = field(default=None, repr=False, compare=False)
    _compact: tuple | None = field(default=None, repr=False, compare=False)
    _empty_rows: list | None = field(default=None, repr=False, compare=False)
    _empty_cols: list | None = field(default=None, repr=False, compare=False)

    @property
    def num_slots(self) -> int:
        return self.slot_rows.numel()

    @property
    def density(self) -> float:
        """Kept fraction of the grid's blocks."""
        return self.num_slots / (self.grid[0] * self.grid[1])

    def rows(self) -> list[tuple[int, list[int], list[int]]]:
        """Per non-empty block row: (row, its slots by column, their columns) as host ints,
        for kernels that loop over blocks from the host (one read of the indexes per
        layout, cached)."""
        if self._rows is None:
            self._rows = _groups(self.row_ptr, self.row_slots, self.slot_cols)
        return self._rows

    def cols(self) -> list[tuple[int, list[int], list[int]]]:
        """Per non-empty block column: (column, its slots by row, their rows) as host ints."""
        if self._cols is None:
            self._cols = _groups(self.col_ptr, self.col_slots, self.slot_rows)
        return self._cols

    def empty_rows(self) -> list[int]:
        """Block rows with no kept block (their output is zero); cached."""
        if self._empty_rows is None:
            self._empty_rows = _empty(self.rows(), self.grid[0])
        return self._empty_rows

    def empty_cols(self) -> list[int]:
        """Block columns with no kept block (their input gradient is zero); cached."""
        if self._empty_cols is None:
            self._empty_cols = _empty(self.cols(), self.grid[1])
        return self._empty_cols

    def compact(self) -> tuple[Tensor, BlockLayout]:
        """(the block columns that hold a kept block, ascending; the same slots laid out
        over just those columns). A kernel that only reads the input's used columns (a
        conv's im2col restricted to them) walks the compact layout; cached."""
        if self._compact is None:
            used = (self.col_ptr[1:] > self.col_ptr[:-1]).nonzero().squeeze(1)
            position = torch.full((self.grid[1],), -1, dtype=torch.int64, device=used.device)
            position[used] = torch.arange(used.numel(), device=used.device)
            self._compact = used, BlockLayout.from_slots(self.slot_rows, position[self.slot_cols],
                                                         (self.grid[0], used.numel()))
        return self._compact

    @classmethod
    def from_slots(cls, slot_rows: Tensor, slot_cols: Tensor, grid: tuple[int, int]) -> BlockLayout:
        """The layout of blocks at ``(slot_rows[j], slot_cols[j])``; the indexes are sorted
        with stable sorts of the flat block index."""
        num_rows, num_cols = grid
        slot_rows, slot_cols = slot_rows.to(torch.int64), slot_cols.to(torch.int64)
        row_slots = torch.argsort(slot_rows * num_cols + slot_cols, stable=True)
        col_slots = torch.argsort(slot_cols * num_rows + slot_rows, stable=True)
        return cls(grid, slot_rows, slot_cols, _pointers(slot_rows, num_rows), row_slots,
                   _pointers(slot_cols, num_cols), col_slots)

    @classmethod
    def from_mask(cls, block_mask: Tensor) -> BlockLayout:
        """Slots in row-major order of the kept blocks of a ``[R, C]`` bool mask."""
        rows, cols = block_mask.nonzero(as_tuple=True)
        return cls.from_slots(rows, cols, tuple(block_mask.shape))

    def mask(self) -> Tensor:
        """The ``[R, C]`` bool block mask."""
        mask = torch.zeros(self.grid, dtype=torch.bool, device=self.slot_rows.device)
        mask[self.slot_rows, self.slot_cols] = True
        return mask

    def reassign(self, block_mask: Tensor) -> tuple[BlockLayout, Tensor]:
        """The layout of a new mask with as many kept blocks, keeping surviving blocks in
        their slots; grown blocks fill the freed slots in ascending order of both.

        Returns:
            (new layout, bool ``[num_slots]``: the slots that now hold a grown block).

        Raises:
            ValueError: if the new mask keeps another number of blocks or has another grid.
        """
        if tuple(block_mask.shape) != self.grid:
            raise ValueError(f"block mask of grid {tuple(block_mask.shape)} for a layout of grid {self.grid}")
        num_cols = self.grid[1]
        flat = block_mask.to(self.slot_rows.device).reshape(-1)
        old_flat = self.slot_rows * num_cols + self.slot_cols
        stays = flat[old_flat]
        was_kept = torch.zeros_like(flat)
        was_kept[old_flat] = True
        grown = (flat & ~was_kept).nonzero().squeeze(1)
        freed = (~stays).nonzero().squeeze(1)
        if grown.numel() != freed.numel():
            raise ValueError(f"a mask update must keep the number of blocks ({self.num_slots}); the new mask "
                             f"keeps {self.num_slots - freed.numel() + grown.numel()}")
        new_flat = old_flat.clone()
        new_flat[freed] = grown
        return BlockLayout.from_slots(new_flat // num_cols, new_flat % num_cols, self.grid), ~stays


def _groups(pointers: Tensor, slots: Tensor, other: Tensor) -> list[tuple[int, list[int], list[int]]]:
    counts = (pointers[1:] - pointers[:-1]).tolist()
    slot_list, other_list = slots.tolist(), other[slots].tolist()
    groups, start = [], 0
    for index, count in enumerate(counts):
        if count:
            groups.append((index, slot_list[start:start + count], other_list[start:start + count]))
        start += count
    return groups


def _empty(groups: list[tuple[int, list[int], list[int]]], length: int) -> list[int]:
    filled = {index for index, _, _ in groups}
    return [index for index in range(length) if index not in filled]


def _pointers(index: Tensor, length: int) -> Tensor:
    # a scatter of fixed length: no host synchronisation (bincount reads the maximum) and traceable
    counts = torch.zeros(length, dtype=torch.int64, device=index.device).scatter_add_(0, index, torch.ones_like(index))
    return torch.cat([torch.zeros(1, dtype=torch.int64, device=index.device), counts.cumsum(0)])
