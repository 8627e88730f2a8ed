"""Block geometry: how a weight is tiled into ``B x B`` blocks (docs/design.md, "Block granularity and kernels").

Blocks tile the *GEMM view* of a weight, the matrix a block-sparse kernel multiplies:

* ``Linear`` ``[out, in]``: the weight itself.
* ``Conv2d`` ``[out, in, kh, kw]``: ``[out, kh * kw * in]``, taps outer and input channels
  inner, i.e. column ``(ky * kw + kx) * in + c`` holds ``weight[:, c, ky, kx]``. This is the
  order an implicit-GEMM kernel walks the reduction (one tap, then all channels), so one
  block column covers up to ``B`` channels of a single tap when ``in`` is a multiple of ``B``.

A dimension that is not a multiple of ``B`` ends in a *partial edge block*: the last block
row (column) is ``out % B`` (``K % B``) wide. Partial blocks are ordinary blocks for every
decision; their scores are sums over their fewer elements, and sparsity always counts
elements, so the achieved sparsity is exact to the block. Block-sparse layers pad them to
``B`` with zeros internally; the padding is never stored in a mask and never counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["BLOCK_SIZES", "BlockGrid", "BlockUnits", "MaskUnits", "block_grid", "check_block_size", "mask_units"]

BLOCK_SIZES = (16, 32, 64)


def check_block_size(block: int) -> None:
    if isinstance(block, bool) or block not in BLOCK_SIZES:
        raise ValueError(f"sparsity.block must be one of {list(BLOCK_SIZES)}, got {block!r}")


@dataclass(frozen=True)
class BlockGrid:
    """The block tiling of one weight's GEMM view."""

    shape: tuple[int, ...]
    """The weight's shape: ``(out, in)`` or ``(out, in, kh, kw)``."""
    block: int

    @property
    def rows(self) -> int:
        """Length of the GEMM view's output dimension (``out``)."""
        return self.shape[0]

    @property
    def cols(self) -> int:
        """Length of the GEMM view's reduction dimension (``in * kh * kw``)."""
        return math.prod(self.shape[1:])

    @property
    def grid(self) -> tuple[int, int]:
        """Number of block rows and block columns (partial edge blocks included)."""
        return -(-self.rows // self.block), -(-self.cols // self.block)

    def to_gemm(self, weight: Tensor) -> Tensor:
        """The ``[out, K]`` GEMM view (a copy for convolutions, taps outer)."""
        if weight.dim() == 4:
            return weight.permute(0, 2, 3, 1).reshape(self.rows, self.cols)
        return weight.reshape(self.rows, self.cols)

    def from_gemm(self, matrix: Tensor) -> Tensor:
        """Inverse of ``to_gemm``: a tensor of the weight's shape."""
        if len(self.shape) == 4:
            out, cin, kh, kw = self.shape
            return matrix.reshape(out, kh, kw, cin).permute(0, 3, 1, 2).contiguous()
        return matrix.reshape(self.shape)

    def padded(self, matrix: Tensor) -> Tensor:
        """The GEMM view zero-padded to whole blocks, ``[R * B, C * B]``."""
        num_rows, num_cols = self.grid
        pad_rows, pad_cols = num_rows * self.block - self.rows, num_cols * self.block - self.cols
        if pad_rows or pad_cols:
            matrix = torch.nn.functional.pad(matrix, (0, pad_cols, 0, pad_rows))
        return matrix

    def block_sums(self, values: Tensor) -> Tensor:
        """Per-block sums of an element tensor of the weight's shape: ``[R, C]``."""
        num_rows, num_cols = self.grid
        padded = self.padded(self.to_gemm(values))
        return padded.reshape(num_rows, self.block, num_cols, self.block).sum(dim=(1, 3))

    def block_sizes(self, device=None) -> Tensor:
        """Number of real (unpadded) elements of every block, ``[R, C]`` int64."""
        num_rows, num_cols = self.grid
        row_sizes = torch.full((num_rows,), self.block, dtype=torch.int64, device=device)
        col_sizes = torch.full((num_cols,), self.block, dtype=torch.int64, device=device)
        row_sizes[-1] = self.rows - (num_rows - 1) * self.block
        col_sizes[-1] = self.cols - (num_cols - 1) * self.block
        return row_sizes[:, None] * col_sizes[None, :]

    def expand(self, block_mask: Tensor) -> Tensor:
        """The element mask (weight's shape) of a ``[R, C]`` block mask."""
        if tuple(block_mask.shape) != self.grid:
            raise ValueError(f"block mask of shape {tuple(block_mask.shape)} does not tile a weight of shape "
                             f"{self.shape} in {self.block}x{self.block} blocks (expected {self.grid})")
        full = block_mask.repeat_interleave(self.block, 0).repeat_interleave(self.block, 1)
        return self.from_gemm(full[: self.rows, : self.cols])

    def reduce(self, element_mask: Tensor) -> Tensor | None:
        """The ``[R, C]`` block mask of an element mask, or None if some block is mixed."""
        kept = self.block_sums(element_mask.to(torch.int64))
        block_mask = kept > 0
        if not torch.equal(kept, block_mask.to(torch.int64) * self.block_sizes(kept.device)):
            return None
        return block_mask


def block_grid(shape, block: int) -> BlockGrid:
    """The tiling of a Linear (2-D) or Conv2d (4-D) weight of ``shape``.

    Raises:
        ValueError: a block size outside ``BLOCK_SIZES`` or a weight of another rank.
    """
    check_block_size(block)
    shape = tuple(int(d) for d in shape)
    if len(shape) not in (2, 4):
        raise ValueError(f"block masks tile Linear (2-D) and Conv2d (4-D) weights; got a weight of shape {shape}")
    return BlockGrid(shape, block)


class MaskUnits:
    """What a mask decision is about: single weights (``element``) or whole blocks.

    Methods score, vote, apportion ERK and drop/grow in *units*; masks are always stored
    and counted in elements. For elements every conversion is the identity.
    """

    granularity = "element"
    block: int | None = None

    def pool(self, fqn: str, values: Tensor) -> Tensor:
        """Per-unit sums of an element tensor (scores, magnitudes)."""
        return values

    def unit_mask(self, fqn: str, mask: Tensor) -> Tensor:
        return mask

    def expand(self, fqn: str, unit_mask: Tensor) -> Tensor:
        return unit_mask

    def unit_shape(self, fqn: str, shape) -> tuple[int, ...]:
        return tuple(shape)

    def meta(self) -> dict:
        return {"granularity": self.granularity, "block": self.block}


class BlockUnits(MaskUnits):
    """``block x block`` tiles of every weight's GEMM view (partial edge blocks included)."""

    granularity = "block"

    def __init__(self, shapes: dict[str, tuple[int, ...]], block: int):
        self.block = block
        self.grids = {fqn: block_grid(shape, block) for fqn, shape in shapes.items()}

    def pool(self, fqn: str, values: Tensor) -> Tensor:
        return self.grids[fqn].block_sums(values)

    def unit_mask(self, fqn: str, mask: Tensor) -> Tensor:
        block_mask = self.grids[fqn].reduce(mask)
        if block_mask is None:
            raise ValueError(f"the mask of {fqn!r} prunes part of a {self.block}x{self.block} block; it is not a "
                             f"block mask of block size {self.block}")
        return block_mask

    def expand(self, fqn: str, unit_mask: Tensor) -> Tensor:
        return self.grids[fqn].expand(unit_mask)

    def unit_shape(self, fqn: str, shape) -> tuple[int, ...]:
        return self.grids[fqn].grid

    def sizes(self, fqn: str) -> Tensor:
        return self.grids[fqn].block_sizes()


def mask_units(granularity: str, block: int, shapes: dict[str, tuple[int, ...]]) -> MaskUnits:
    """The units of ``sparsity.granularity`` for weights of ``shapes``.

    Raises:
        ValueError: an unknown granularity or an unsupported block size.
    """
    if granularity == "element":
        return MaskUnits()
    if granularity == "block":
        return BlockUnits(shapes, block)
    raise ValueError(f"unknown mask granularity {granularity!r}; use element or block")
