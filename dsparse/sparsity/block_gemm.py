"""Block-sparse GEMM on CPU (and any device) with PyTorch ops, forward and backward.

torch's BSR tensors have no backward on CPU, so this is dsparse's own autograd function.
It works on *transposed, block-sliced* operands: the input's GEMM view ``X [M, K]`` is
held as ``xt [C, B, M]`` (``K`` zero-padded to ``C * B``), so block column ``c`` of ``X``
is the contiguous slab ``xt[c]``; the output is ``yt [R, B, M]`` in the same way. Then,
with ``W_r`` the kept blocks of block row ``r`` side by side (``[B, n_r * B]``):

    forward     yt[r]   = W_r     @ xt[cols of row r]      Y  = X W^T on kept blocks only
    dX          dxt[c]  = W^c^T   @ dyt[rows of col c]     dX = dY W, through the transposed index
    dW          dW_r    = dyt[r]  @ xt[cols of row r]^T    dW on kept blocks only

one dense matmul per non-empty block row (or column) over gathered contiguous slabs, so
the work and the gathered bytes are proportional to the kept blocks.

At mask-update steps growth needs the *dense* gradient of the weight, pruned blocks
included. Passing a ``probe`` (a tensor of the padded GEMM shape that requires grad)
makes the backward also return ``dyt xt^T``, the full ``[R*B, C*B]`` gradient, as the
probe's gradient; without a probe nothing dense is computed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dsparse.sparsity.block_layout import BlockLayout

__all__ = ["block_sparse_gemm"]


def _row_weights(values: Tensor, slots: Tensor) -> Tensor:
    """The blocks of ``slots`` side by side: ``[B, n * B]`` (output rows x reduction)."""
    block = values.shape[1]
    return values.index_select(0, slots).transpose(0, 1).reshape(block, -1)


def _col_weights(values: Tensor, slots: Tensor) -> Tensor:
    """The transposed blocks of ``slots`` side by side: ``[B, n * B]`` (input rows x outputs)."""
    block = values.shape[1]
    return values.index_select(0, slots).permute(2, 0, 1).reshape(block, -1)


class _BlockSparseGemm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xt: Tensor, values: Tensor, layout: BlockLayout, probe: Tensor | None) -> Tensor:
        num_cols, block, length = xt.shape
        num_rows = layout.grid[0]
        ctx.layout, ctx.has_probe = layout, probe is not None
        ctx.save_for_backward(xt, values)
        yt = xt.new_zeros(num_rows, block, length)  # a memset: cheaper than zeroing only empty rows
        for row, slots, cols in layout.rows():
            torch.mm(_row_weights(values, slots), xt.index_select(0, cols).reshape(-1, length), out=yt[row])
        return yt

    @staticmethod
    def backward(ctx, dyt: Tensor):
        xt, values = ctx.saved_tensors
        layout = ctx.layout
        num_cols, block, length = xt.shape
        num_rows = layout.grid[0]
        dyt = dyt.contiguous()
        dxt = dvalues = dprobe = None
        dense_grad = None
        if ctx.has_probe and ctx.needs_input_grad[3]:
            dense_grad = dprobe = dyt.reshape(num_rows * block, length) @ xt.reshape(num_cols * block, length).t()
        if ctx.needs_input_grad[0]:
            dxt = torch.zeros_like(xt)
            for col, slots, rows in layout.cols():
                torch.mm(_col_weights(values, slots), dyt.index_select(0, rows).reshape(-1, length), out=dxt[col])
        if ctx.needs_input_grad[1]:
            if dense_grad is not None:  # growth asked for it anyway: read the kept blocks from it
                tiles = dense_grad.reshape(num_rows, block, num_cols, block).permute(0, 2, 1, 3)
                dvalues = tiles[layout.slot_rows, layout.slot_cols]
            else:
                dvalues = torch.zeros_like(values)
                for row, slots, cols in layout.rows():
                    grad = dyt[row] @ xt.index_select(0, cols).reshape(-1, length).t()  # [B, n * B]
                    dvalues[slots] = grad.reshape(block, -1, block).transpose(0, 1)
        return dxt, dvalues, None, dprobe


def block_sparse_gemm(xt: Tensor, values: Tensor, layout: BlockLayout, probe: Tensor | None = None) -> Tensor:
    """``yt [R, B, M]`` of ``Y = X W^T`` for a block-sparse ``W`` and ``xt [C, B, M]``.

    Args:
        xt: the input's GEMM view, transposed and cut into ``B``-row slabs, ``[C, B, M]``.
        values: the kept blocks, ``[S, B, B]``, slot ``j`` at ``layout.slot_rows/cols[j]``.
        layout: the slots' positions.
        probe: optional ``[R * B, C * B]`` tensor requiring grad, whose gradient becomes
            the dense weight gradient (growth scores).
    """
    return _BlockSparseGemm.apply(xt, values, layout, probe)
