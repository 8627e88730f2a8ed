"""Block-sparse GEMM, forward and backward: the compiled CPU kernels or PyTorch ops.

torch's BSR tensors have no backward on CPU, so this is dsparse's own autograd function.
With ``compiled=True`` its three products run the compiled CPU kernels
(``dsparse.kernels.cpu``), which hold an output tile in registers while the kept blocks
stream past; otherwise the PyTorch path below, which runs on any device and is the
reference the kernels are tested against.
It computes ``Y = X W^T`` for the input's GEMM view ``X [M, C * B]`` (``K`` zero-padded to
whole blocks) and a block-sparse ``W [R * B, C * B]``. With ``X_c`` the ``c``-th block of
``B`` columns of ``X`` (a strided view, no copy) and ``W_rc`` the kept block ``(r, c)``:

    forward     Y_r    = sum_c X_c  @ W_rc^T      over the kept blocks of block row r
    dX          dX_c   = sum_r dY_r @ W_rc        over the kept blocks of block column c
    dW          dW_rc  = dY_r^T @ X_c             for the kept blocks only

one small matmul per kept block, accumulated in place into its output slab. BLAS reads
and writes the slabs through their strides, so no operand is gathered or transposed:
``X`` may be row-major (a Linear's input) or column-major (a convolution's im2col,
``[K, M]`` transposed), and ``Y`` is allocated in the orientation the caller asks for.
Per-row gathers into one wider matmul, and transposing row-major operands into
contiguous slabs, both measured slower on CPU (``benchmarks/bench_block_sparse.py``).

At mask-update steps growth needs the *dense* gradient of the weight, pruned blocks
included. Passing a ``probe`` (a tensor of the padded GEMM shape that requires grad)
makes the backward also return ``dY^T X``, the full ``[R * B, C * B]`` gradient, as the
probe's gradient; without a probe nothing dense is computed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dsparse.kernels import cpu
from dsparse.sparsity.block.layout import BlockLayout

__all__ = ["block_sparse_conv_nhwc", "block_sparse_gemm"]


def _slab(matrix: Tensor, index: int, block: int) -> Tensor:
    return matrix[:, index * block:(index + 1) * block]


def _accumulate(out: Tensor, operands: list[Tensor], weights: list[Tensor]) -> None:
    """``out = sum_j operands[j] @ weights[j]``, in place."""
    torch.mm(operands[0], weights[0], out=out)
    for operand, weight in zip(operands[1:], weights[1:]):
        out.addmm_(operand, weight)


def _empty(rows: int, cols: int, like: Tensor, column_major: bool) -> Tensor:
    return like.new_empty(cols, rows).t() if column_major else like.new_empty(rows, cols)


def _is_column_major(matrix: Tensor) -> bool:
    return matrix.stride(0) == 1 and matrix.shape[1] > 1


class _BlockSparseGemm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, values: Tensor, layout: BlockLayout, probe: Tensor | None,
                column_major_out: bool, compiled: bool) -> Tensor:
        block = values.shape[1]
        num_rows = layout.grid[0]
        ctx.layout, ctx.has_probe, ctx.compiled = layout, probe is not None, compiled
        ctx.save_for_backward(x, values)
        if compiled:
            return cpu.block_spmm(x, values, layout.row_ptr, layout.row_slots, layout.slot_cols, True,
                                  column_major_out)
        y = _empty(x.shape[0], num_rows * block, x, column_major_out)
        for row in layout.empty_rows():
            _slab(y, row, block).zero_()
        for row, slots, cols in layout.rows():
            _accumulate(_slab(y, row, block), [_slab(x, col, block) for col in cols],
                        [values[slot].t() for slot in slots])
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, values = ctx.saved_tensors
        layout = ctx.layout
        block = values.shape[1]
        num_rows, num_cols = layout.grid
        if not (dy.stride(0) == 1 or dy.stride(1) == 1):
            dy = dy.contiguous()
        dx = dvalues = dprobe = None
        dense_grad = None
        if ctx.has_probe and ctx.needs_input_grad[3]:
            dense_grad = dprobe = dy.t() @ x
        if ctx.compiled:
            if ctx.needs_input_grad[0]:
                dx = cpu.block_spmm(dy, values, layout.col_ptr, layout.col_slots, layout.slot_rows, False,
                                    _is_column_major(x))
            if ctx.needs_input_grad[1] and dense_grad is None:
                dvalues = cpu.block_weight_grad(dy, x, layout.row_ptr, layout.row_slots, layout.slot_cols, block)
        elif ctx.needs_input_grad[0]:
            dx = _empty(x.shape[0], x.shape[1], x, _is_column_major(x))
            for col in layout.empty_cols():  # block columns no kept block reads get zero gradient
                _slab(dx, col, block).zero_()
            for col, slots, rows in layout.cols():
                _accumulate(_slab(dx, col, block), [_slab(dy, row, block) for row in rows],
                            [values[slot] for slot in slots])
        if ctx.needs_input_grad[1] and dvalues is None:
            if dense_grad is not None:  # growth asked for it anyway: read the kept blocks from it
                tiles = dense_grad.reshape(num_rows, block, num_cols, block).permute(0, 2, 1, 3)
                dvalues = tiles[layout.slot_rows, layout.slot_cols]
            else:
                dvalues = torch.empty_like(values)  # every slot lies in one of the rows
                for row, slots, cols in layout.rows():
                    grad_rows = _slab(dy, row, block).t()
                    for slot, col in zip(slots, cols):
                        torch.mm(grad_rows, _slab(x, col, block), out=dvalues[slot])
        return dx, dvalues, None, dprobe, None, None


def block_sparse_gemm(x: Tensor, values: Tensor, layout: BlockLayout, probe: Tensor | None = None,
                      column_major_out: bool = False, compiled: bool = False) -> Tensor:
    """``Y [M, R * B] = X W^T`` for a block-sparse ``W``.

    Args:
        x: the input's GEMM view ``[M, C * B]``, row- or column-major (one unit stride).
        values: the kept blocks, ``[S, B, B]``, slot ``j`` at ``layout.slot_rows/cols[j]``.
        layout: the slots' positions.
        probe: optional ``[R * B, C * B]`` tensor requiring grad, whose gradient becomes
            the dense weight gradient (growth scores).
        column_major_out: return ``Y`` as the transpose of a contiguous ``[R * B, M]``
            (what a convolution's channels-first output wants) instead of row-major.
        compiled: run the compiled CPU kernels (fp32 CPU tensors, ``cpu.BLOCKS``) instead
            of PyTorch ops.
    """
    return _BlockSparseGemm.apply(x, values, layout, probe, column_major_out, compiled)


def block_sparse_conv_nhwc(x: Tensor, values: Tensor, layout: BlockLayout, out_channels: int, conv: tuple) -> Tensor:
    """The block-sparse convolution of ``x [N, C, H, W]`` (no bias) by the compiled CPU
    kernels' implicit GEMM, differentiable (its autograd is C++: ``cpu.block_conv``); ``C``
    must be a multiple of the block (each block column is then one tap and a run of
    channels) and ``conv`` is ``(kernel_size, stride, padding, dilation)``, each a pair.
    The output and the input gradient come back channels-last (``torch.channels_last``,
    logical NCHW), so a network of these layers passes activations and gradients on without
    a copy; a channels-first input is copied once (that copy, kept for dW, replaces an
    im2col of up to ``kh * kw`` times its size)."""
    return cpu.block_conv(x, values, layout.row_ptr, layout.row_slots, layout.slot_cols, layout.col_ptr,
                          layout.col_slots, layout.slot_rows, out_channels, *conv)
