"""Triton kernels of the block-sparse GEMM: forward, ``dX`` and ``dW`` on kept blocks only.

The operands are those of ``dsparse.sparsity.block_gemm`` (DESIGN.md section 6): the
input's GEMM view ``X [M, K]`` (any strides, so a row-major activation or a transposed
im2col both work without a copy), the kept blocks ``values [S, B, B]`` (slot ``j`` holds
block ``(slot_rows[j], slot_cols[j])`` of ``W [N, K]``, ``[out, in]`` within the block),
and a ``BlockLayout``'s index tensors, which live on the device and are never read by the
host here:

    forward   Y[m, r]   = sum over the kept blocks (r, c) of  X[m, c] @ W_rc^T   (+ bias)
    dX        dX[m, c]  = sum over the kept blocks (r, c) of  dY[m, r] @ W_rc
    dW        dW_rc     = dY[:, r]^T @ X[:, c]                for the kept blocks only

One program computes a ``BLOCK_M x B`` tile of ``Y`` (of ``dX``) by walking its block
row's slots through the CSR pointers (its block column's through the transposed index,
reading the same weight blocks transposed, with no copy); a block row or column without
kept blocks writes zeros. ``dW`` runs one program per slot and split of ``M``, writing
float32 partial sums that are added in a fixed order, so results are deterministic.
Edges: ``M``, ``N`` and ``K`` need not be multiples of anything; loads past them read zero
and stores past them are masked, so edge blocks' zero padding gets zero gradient.

Precision: every product accumulates in float32. Float32 inputs multiply in IEEE fp32
unless ``torch.backends.cuda.matmul.allow_tf32`` is set (then TF32, as cuBLAS would);
bf16 and fp16 use the tensor cores' native products. Outputs take the input's dtype
(``dW`` the weights').

On CUDA, tile sizes are autotuned per ``(M, N, K, B)`` and dtype and cached by Triton, so
a run tunes each shape once; a mask update changes only the index tensors, which are not
part of the key, so it never re-tunes. Under ``TRITON_INTERPRET=1`` (CPU tests) one small
configuration runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from dsparse.kernels import interpreting

__all__ = ["block_sparse_forward", "block_sparse_input_grad", "block_sparse_weight_grad"]


@triton.jit
def _walk_kernel(a_ptr, values_ptr, bias_ptr, out_ptr, pointers, slots, partners, M, A_COLS, OUT_COLS,
                 stride_am, stride_ak, stride_om, stride_on,
                 HAS_BIAS: tl.constexpr, TRANSPOSE_W: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
                 PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    """``out[m, line] = sum over the slots of block line ``line`` of a[m, partner] @ W_slot^T``
    (``TRANSPOSE_W``: the forward, walking block rows, partners are block columns) or
    ``@ W_slot`` (``dX``, walking block columns through the transposed index, partners are
    block rows)."""
    line = tl.program_id(1)
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_b = tl.arange(0, BLOCK)
    in_m = offs_m < M
    acc = tl.zeros((BLOCK_M, BLOCK), dtype=tl.float32)
    for index in range(tl.load(pointers + line), tl.load(pointers + line + 1)):
        slot = tl.load(slots + index)
        offs_a = tl.load(partners + slot) * BLOCK + offs_b
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_a[None, :] * stride_ak,
                    mask=in_m[:, None] & (offs_a[None, :] < A_COLS), other=0.0)
        w = tl.load(values_ptr + slot * BLOCK * BLOCK + offs_b[:, None] * BLOCK + offs_b[None, :])
        if TRANSPOSE_W:
            w = tl.trans(w)
        if DOT_FP32:
            a, w = a.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    offs_out = line * BLOCK + offs_b
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_out, mask=offs_out < OUT_COLS, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_out[None, :] * stride_on, acc.to(out_ptr.dtype.element_ty),
             mask=in_m[:, None] & (offs_out[None, :] < OUT_COLS))


@triton.jit
def _weight_grad_kernel(dy_ptr, x_ptr, partial_ptr, slot_rows, slot_cols, M, N, K, num_slots, rows_per_split,
                        stride_dym, stride_dyn, stride_xm, stride_xk,
                        BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    slot = tl.program_id(0)
    split = tl.program_id(1)
    offs_b = tl.arange(0, BLOCK)
    offs_n = tl.load(slot_rows + slot) * BLOCK + offs_b
    offs_k = tl.load(slot_cols + slot) * BLOCK + offs_b
    first = split.to(tl.int64) * rows_per_split
    last = tl.minimum(first + rows_per_split, M)
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for start in range(first, last, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M).to(tl.int64)
        in_m = offs_m < last
        dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                     mask=in_m[:, None] & (offs_n[None, :] < N), other=0.0)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=in_m[:, None] & (offs_k[None, :] < K), other=0.0)
        if DOT_FP32:
            dy, x = dy.to(tl.float32), x.to(tl.float32)
        acc = tl.dot(tl.trans(dy), x, acc, input_precision=PRECISION)
    base = (split.to(tl.int64) * num_slots + slot) * BLOCK * BLOCK
    tl.store(partial_ptr + base + offs_b[:, None] * BLOCK + offs_b[None, :], acc)


def _tuned(kernel, key: list[str]):
    """The kernel autotuned over tile sizes (CUDA), keyed by shape."""
    configs = [triton.Config({"BLOCK_M": block_m}, num_warps=warps, num_stages=stages)
               for block_m in (32, 64, 128) for warps in (4, 8) for stages in (2, 3, 4)
               if not (block_m == 32 and warps == 8)]
    return triton.autotune(configs=configs, key=key, cache_results=True)(kernel)


_WALK_TUNED = _tuned(_walk_kernel, ["M", "A_COLS", "OUT_COLS", "BLOCK", "HAS_BIAS", "TRANSPOSE_W"])
_WEIGHT_GRAD_TUNED = _tuned(_weight_grad_kernel, ["M", "N", "K", "BLOCK"])
_INTERPRETED = {"BLOCK_M": 32}
SPLIT_ROWS = 128
"""``dW`` splits ``M`` into chunks of a multiple of this (every tuned ``BLOCK_M`` divides it)."""


def _precision(dtype: torch.dtype) -> dict:
    """How ``tl.dot`` multiplies: IEEE fp32 (or TF32 when torch allows it) for float32,
    native for bf16/fp16. The interpreter's bf16 ``tl.dot`` is wrong, so there bf16
    operands are widened to float32 first: exact products, the same float32 sums."""
    widen = interpreting() and dtype == torch.bfloat16
    ieee = widen or (dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32)
    return {"PRECISION": "ieee" if ieee else "tf32", "DOT_FP32": widen}


def _launch(tuned, kernel, grid, *args, **constants) -> None:
    if interpreting():
        kernel[grid(_INTERPRETED)](*args, **constants, **_INTERPRETED)
    else:
        tuned[grid](*args, **constants)


def block_sparse_forward(x: Tensor, values: Tensor, bias: Tensor | None, row_ptr: Tensor, row_slots: Tensor,
                         slot_cols: Tensor, out_features: int) -> Tensor:
    """``Y [M, out_features] = X W^T + bias`` for ``X [M, K]``; ``Y`` row-major, ``X``'s dtype."""
    rows, in_features = x.shape
    block = values.shape[1]
    y = x.new_empty(rows, out_features)
    num_block_rows = row_ptr.numel() - 1
    if rows == 0:
        return y
    _launch(_WALK_TUNED, _walk_kernel, lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), num_block_rows),
            x, values, bias if bias is not None else values, y, row_ptr, row_slots, slot_cols,
            rows, in_features, out_features, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
            HAS_BIAS=bias is not None, TRANSPOSE_W=True, BLOCK=block, **_precision(x.dtype))
    return y


def block_sparse_input_grad(dy: Tensor, values: Tensor, col_ptr: Tensor, col_slots: Tensor, slot_rows: Tensor,
                            in_features: int) -> Tensor:
    """``dX [M, in_features] = dY W`` through the transposed index; row-major, ``dY``'s dtype."""
    rows, out_features = dy.shape
    block = values.shape[1]
    dx = dy.new_empty(rows, in_features)
    num_block_cols = col_ptr.numel() - 1
    if rows == 0:
        return dx
    _launch(_WALK_TUNED, _walk_kernel, lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), num_block_cols),
            dy, values, values, dx, col_ptr, col_slots, slot_rows, rows, out_features, in_features,
            dy.stride(0), dy.stride(1), dx.stride(0), dx.stride(1),
            HAS_BIAS=False, TRANSPOSE_W=False, BLOCK=block, **_precision(dy.dtype))
    return dx


def block_sparse_weight_grad(dy: Tensor, x: Tensor, slot_rows: Tensor, slot_cols: Tensor, block: int,
                             dtype: torch.dtype) -> Tensor:
    """``dW`` of the kept blocks, ``[S, B, B]`` in ``dtype``: float32 partial sums over
    splits of ``M`` (enough programs to fill the device), added in a fixed order."""
    rows, out_features = dy.shape
    in_features = x.shape[1]
    num_slots = slot_rows.numel()
    if num_slots == 0 or rows == 0:
        return dy.new_zeros(num_slots, block, block, dtype=dtype)
    splits = max(1, min(triton.cdiv(rows, SPLIT_ROWS), triton.cdiv(1024, num_slots)))
    rows_per_split = triton.cdiv(triton.cdiv(rows, splits), SPLIT_ROWS) * SPLIT_ROWS
    splits = triton.cdiv(rows, rows_per_split)
    partial = dy.new_empty(splits, num_slots, block, block, dtype=torch.float32)
    _launch(_WEIGHT_GRAD_TUNED, _weight_grad_kernel, lambda meta: (num_slots, splits),
            dy, x, partial, slot_rows, slot_cols, rows, out_features, in_features, num_slots, rows_per_split,
            dy.stride(0), dy.stride(1), x.stride(0), x.stride(1), BLOCK=block, **_precision(x.dtype))
    return partial.sum(dim=0).to(dtype) if splits > 1 else partial[0].to(dtype)
