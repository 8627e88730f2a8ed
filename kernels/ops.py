"""The Triton block-sparse GEMM as ``torch.library`` operators, with autograd and fake
(meta) implementations, so block-sparse layers trace under ``torch.compile`` and
``torch.export`` like any ATen op.

- ``dsparse::block_sparse_mm(x, values, bias, <layout>, out_features) -> y``: ``Y = X W^T + b``;
- ``dsparse::block_sparse_mm_input_grad(dy, values, <transposed layout>, in_features) -> dx``;
- ``dsparse::block_sparse_mm_weight_grad(dy, x, values, slot_rows, slot_cols) -> dvalues``.

The layout arguments are a ``BlockLayout``'s index tensors (on the device). The forward
op's backward calls the two gradient ops, so a compiled graph holds all three. Importing
this module imports Triton; ``dsparse`` imports it only when a layer runs the Triton
kernel (``sparsity.kernel``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dsparse.kernels.block_sparse import block_sparse_forward, block_sparse_input_grad, block_sparse_weight_grad

__all__ = ["DTYPES", "block_sparse_mm"]

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@torch.library.custom_op("dsparse::block_sparse_mm", mutates_args=())
def block_sparse_mm(x: Tensor, values: Tensor, bias: Tensor | None, row_ptr: Tensor, row_slots: Tensor,
                    slot_cols: Tensor, col_ptr: Tensor, col_slots: Tensor, slot_rows: Tensor,
                    out_features: int) -> Tensor:
    """``Y [M, out_features] = X W^T + bias`` for ``X [M, K]`` and the kept blocks ``values``."""
    _check_operands(x, values, bias)
    return block_sparse_forward(x, values, bias, row_ptr, row_slots, slot_cols, out_features)


@block_sparse_mm.register_fake
def _(x, values, bias, row_ptr, row_slots, slot_cols, col_ptr, col_slots, slot_rows, out_features):
    return x.new_empty(x.shape[0], out_features)


@torch.library.custom_op("dsparse::block_sparse_mm_input_grad", mutates_args=())
def block_sparse_mm_input_grad(dy: Tensor, values: Tensor, col_ptr: Tensor, col_slots: Tensor, slot_rows: Tensor,
                               in_features: int) -> Tensor:
    return block_sparse_input_grad(dy, values, col_ptr, col_slots, slot_rows, in_features)


@block_sparse_mm_input_grad.register_fake
def _(dy, values, col_ptr, col_slots, slot_rows, in_features):
    return dy.new_empty(dy.shape[0], in_features)


@torch.library.custom_op("dsparse::block_sparse_mm_weight_grad", mutates_args=())
def block_sparse_mm_weight_grad(dy: Tensor, x: Tensor, values: Tensor, slot_rows: Tensor,
                                slot_cols: Tensor) -> Tensor:
    return block_sparse_weight_grad(dy, x, slot_rows, slot_cols, values.shape[1], values.dtype)


@block_sparse_mm_weight_grad.register_fake
def _(dy, x, values, slot_rows, slot_cols):
    return torch.empty_like(values)


def _setup_context(ctx, inputs, output) -> None:
    x, values, bias, row_ptr, row_slots, slot_cols, col_ptr, col_slots, slot_rows, out_features = inputs
    ctx.save_for_backward(x, values, col_ptr, col_slots, slot_rows, slot_cols)
    ctx.has_bias = bias is not None


def _backward(ctx, dy: Tensor):
    x, values, col_ptr, col_slots, slot_rows, slot_cols = ctx.saved_tensors
    dx = dvalues = dbias = None
    if ctx.needs_input_grad[0]:
        dx = block_sparse_mm_input_grad(dy, values, col_ptr, col_slots, slot_rows, x.shape[1])
    if ctx.needs_input_grad[1]:
        dvalues = block_sparse_mm_weight_grad(dy, x, values, slot_rows, slot_cols)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        dbias = dy.sum(dim=0)
    return dx, dvalues, dbias, None, None, None, None, None, None, None


block_sparse_mm.register_autograd(_backward, setup_context=_setup_context)


def _check_operands(x: Tensor, values: Tensor, bias: Tensor | None) -> None:
    if x.dim() != 2 or values.dim() != 3:
        raise ValueError(f"block_sparse_mm takes x [M, K] and values [S, B, B], got {tuple(x.shape)} and "
                         f"{tuple(values.shape)}")
    if x.dtype not in DTYPES:
        raise ValueError(f"the Triton block-sparse kernels take {', '.join(map(str, DTYPES))}, got {x.dtype}; "
                         "use sparsity.kernel=torch for other dtypes")
    if x.dtype != values.dtype or (bias is not None and bias.dtype != x.dtype):
        raise ValueError(f"block_sparse_mm needs one dtype for x, values and bias, got {x.dtype}, {values.dtype}"
                         f"{'' if bias is None else ', ' + str(bias.dtype)}; cast the layer or its input")
