"""Block-sparse GEMM on CPU (and any device) with PyTorch ops, forward and backward.

torch's BSR tensors have no backward on CPU, so this is dsparse's own autograd function.
It works on a *column-block-major* operand: the input's GEMM view ``X [M, K]`` stored
transposed and cut into block columns, ``xt [C, B, M]`` (``K`` zero-padded to ``C * B``).
For every kept block ``(r, c)`` in slot ``j``:

    forward     yt[r]      += W_j     @ xt[c]        Y  = X W^T over kept blocks only
    dX          dxt[c]     += W_j^T   @ dyt[r]       dX = dY W, through the same slots
    dW          dW_j        = dyt[r]  @ xt[c]^T      dW on kept blocks only

Each line is one batched matmul over the slots (``bmm`` of ``[S, B, B]`` by
``[S, B, M]``) plus a gather of the operand's block rows and an ``index_add`` into the
result; cost is proportional to the kept blocks, and the gathered copies are
``S * B * M`` elements (the kept fraction times the number of block rows times ``X``).

At mask-update steps growth needs the *dense* gradient of the weight, pruned blocks
included. Passing a ``probe`` (a zero tensor of the padded GEMM shape that requires
grad) makes the backward also return ``dyt^T xt``, the full ``[R*B, C*B]`` gradient,
as the probe's gradient; without a probe nothing dense is computed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dsparse.sparsity.block_layout import BlockLayout

__all__ = ["block_sparse_gemm"]


class _BlockSparseGemm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xt: Tensor, values: Tensor, slot_rows: Tensor, slot_cols: Tensor, num_rows: int,
                probe: Tensor | None) -> Tensor:
        ctx.save_for_backward(xt, values, slot_rows, slot_cols)
        ctx.num_rows, ctx.has_probe = num_rows, probe is not None
        _, block, length = xt.shape
        yt = xt.new_zeros(num_rows, block, length)
        if values.shape[0]:
            yt.index_add_(0, slot_rows, torch.bmm(values, xt[slot_cols]))
        return yt

    @staticmethod
    def backward(ctx, dyt: Tensor):
        xt, values, slot_rows, slot_cols = ctx.saved_tensors
        dyt = dyt.contiguous()
        dxt = dvalues = dprobe = None
        rows_of_dy = dyt[slot_rows] if values.shape[0] else None
        if ctx.needs_input_grad[0]:
            dxt = torch.zeros_like(xt)
            if values.shape[0]:
                dxt.index_add_(0, slot_cols, torch.bmm(values.transpose(1, 2), rows_of_dy))
        if ctx.needs_input_grad[1]:
            dvalues = torch.zeros_like(values)
            if values.shape[0]:
                dvalues = torch.bmm(rows_of_dy, xt[slot_cols].transpose(1, 2))
        if ctx.has_probe and ctx.needs_input_grad[5]:
            num_cols, block, length = xt.shape
            dprobe = dyt.reshape(ctx.num_rows * block, length) @ xt.reshape(num_cols * block, length).t()
        return dxt, dvalues, None, None, None, dprobe


def block_sparse_gemm(xt: Tensor, values: Tensor, layout: BlockLayout, probe: Tensor | None = None) -> Tensor:
    """``yt [R, B, M]`` of ``Y = X W^T`` for a block-sparse ``W`` and a column-block-major ``xt [C, B, M]``.

    Args:
        xt: the input's GEMM view, transposed and cut into ``B``-row slabs, ``[C, B, M]``.
        values: the kept blocks, ``[S, B, B]``, slot ``j`` at ``layout.slot_rows/cols[j]``.
        layout: the slots' positions.
        probe: optional zero ``[R * B, C * B]`` tensor requiring grad, whose gradient becomes
            the dense weight gradient (growth scores).
    """
    return _BlockSparseGemm.apply(xt, values, layout.slot_rows, layout.slot_cols, layout.grid[0], probe)
