"""Triton kernels of block-sparse convolutions and linear layers: forward, ``dX`` and ``dW``
on kept blocks only, by implicit GEMM (no im2col buffer).

The GEMM view is that of ``dsparse.sparsity.block.geometry`` (docs/design.md, "Block
granularity and kernels"): ``W [N, K]`` with ``K = kh * kw * C_in``, taps outer and input channels inner; the kept blocks are
``values [S, B, B]`` (slot ``j`` holds block ``(slot_rows[j], slot_cols[j])``, ``[out, in]``
within the block) and a ``BlockLayout``'s index tensors, which stay on the device and
are never read by the host here. A ``Linear`` is the 1x1 convolution of a 1x1 image
(``N = batch``), so one set of kernels serves both. Rows of the GEMM are output
positions ``m = (n, oh, ow)``; the input is read through its four strides (NCHW,
channels-last, or a transposed matrix all work without a copy).

    forward   Y[m, r]   = sum over the kept blocks (r, c) of  X_col[m, c] @ W_rc^T (+ bias)
    dX        dX[p, q]  = sum over taps t and the kept blocks (r, c(t, q)) of dY[m(p, t), r] @ W_rc
    dW        dW_rc     = dY[:, r]^T @ X_col[:, c]                 for the kept blocks only

``X_col[m, c]`` is block column ``c`` of the implicit im2col: one tap, ``B`` channels, so a
block column must not straddle two taps (``C_in`` a multiple of ``B``, or a 1x1 kernel;
``tap_aligned``). Each forward program computes a ``BLOCK_M x B`` tile of ``Y`` by
walking its block row's slots through the CSR pointers; each ``dX`` program computes a
tile of input positions ``p`` for one channel block ``q``, walking for every tap the
block column ``c(t, q)`` through the transposed index (the same weight blocks, no copy)
and reading ``dY`` at the output position ``m(p, t)`` that tap maps ``p`` to (none when
the stride skips it), so every input gradient is written once, without atomics. ``dW``
runs one program per slot and split of ``M``, writing float32 partial sums that are
added in a fixed order. Results are deterministic. Loads past the edges (``M``, ``N``,
``C_in``, padding) read zero and stores past them are masked, so edge blocks' zero
padding gets zero gradient.

Precision: every product accumulates in float32. Float32 inputs multiply in IEEE fp32
unless ``torch.backends.cuda.matmul.allow_tf32`` is set (then TF32, as cuBLAS would);
bf16 and fp16 use the tensor cores' native products. Outputs take the input's dtype.

On CUDA, tile sizes are autotuned per shape and cached by Triton (also on disk), so a run
tunes each shape once; a mask update changes only the index tensors, which are not part
of the key, so it never re-tunes. Under ``TRITON_INTERPRET=1`` (CPU tests) one small
configuration runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from dsparse.kernels import interpreting

__all__ = ["ConvGeometry", "block_sparse_forward", "block_sparse_input_grad", "block_sparse_weight_grad"]


@dataclass(frozen=True)
class ConvGeometry:
    """A convolution's shape parameters (a Linear: ``ConvGeometry.linear(in_features)``)."""

    in_channels: int
    height: int
    width: int
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)

    @classmethod
    def linear(cls, in_features: int) -> ConvGeometry:
        return cls(in_features, 1, 1)

    @property
    def output_size(self) -> tuple[int, int]:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel, self.stride, self.padding, self.dilation
        return ((self.height + 2 * ph - dh * (kh - 1) - 1) // sh + 1,
                (self.width + 2 * pw - dw * (kw - 1) - 1) // sw + 1)

    def tap_aligned(self, block: int) -> bool:
        """Whether every block column lies within one tap (what the kernels require)."""
        return self.in_channels % block == 0 or self.kernel == (1, 1)

    def args(self) -> tuple[int, ...]:
        """The scalar arguments every kernel takes, in their order."""
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel, self.stride, self.padding, self.dilation
        return (self.in_channels, self.height, self.width, *self.output_size, kh, kw, sh, sw, ph, pw, dh, dw)


@triton.jit
def _input_tile(x_ptr, n, oh, ow, in_m, col, C_IN, H, W, KH, KW, SH, SW, PH, PW, DH, DW, sxn, sxc, sxh, sxw,
                BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    """``X_col[m, col]``: the ``B`` GEMM columns of block column ``col`` at output positions
    ``(n, oh, ow)``, zero outside the image. ``ALIGNED``: the block lies within one tap, so
    the tap is one scalar; otherwise (a 3-channel stem) every column decodes its own."""
    first = col * BLOCK
    if ALIGNED:
        tap = first // C_IN
        channels = first % C_IN + tl.arange(0, BLOCK)
        ih = oh * SH - PH + (tap // KW) * DH
        iw = ow * SW - PW + (tap % KW) * DW
        inside = in_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        return tl.load(x_ptr + (n * sxn + ih * sxh + iw * sxw)[:, None] + channels[None, :] * sxc,
                       mask=inside[:, None] & (channels[None, :] < C_IN), other=0.0)
    k = first + tl.arange(0, BLOCK)
    tap = k // C_IN
    ih = oh[:, None] * SH - PH + (tap // KW)[None, :] * DH
    iw = ow[:, None] * SW - PW + (tap % KW)[None, :] * DW
    inside = in_m[:, None] & (k < C_IN * KH * KW)[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    return tl.load(x_ptr + n[:, None] * sxn + (k % C_IN)[None, :] * sxc + ih * sxh + iw * sxw, mask=inside, other=0.0)


_SHAPE_ARGS = ["M", "P", "C_OUT", "C_IN", "H", "W", "HO", "WO", "KH", "KW", "SH", "SW", "PH", "PW", "DH", "DW",
               "num_slots", "rows_per_split"]
"""Scalar arguments Triton must not specialise on (each value would compile anew); strides
stay specialised, so unit strides get vectorised loads."""


def _jit(function):
    names = set(function.__code__.co_varnames[:function.__code__.co_argcount])
    return triton.jit(function, do_not_specialize=[name for name in _SHAPE_ARGS if name in names])


@_jit
def _forward_kernel(x_ptr, values_ptr, bias_ptr, y_ptr, row_ptr, row_slots, slot_cols, M, C_OUT,
                    C_IN, H, W, HO, WO, KH, KW, SH, SW, PH, PW, DH, DW, sxn, sxc, sxh, sxw, sym, syn,
                    HAS_BIAS: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
                    PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    row = tl.program_id(1)
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_b = tl.arange(0, BLOCK)
    in_m = offs_m < M
    n, oh, ow = offs_m // (HO * WO), (offs_m % (HO * WO)) // WO, offs_m % WO
    acc = tl.zeros((BLOCK_M, BLOCK), dtype=tl.float32)
    for index in range(tl.load(row_ptr + row), tl.load(row_ptr + row + 1)):
        slot = tl.load(row_slots + index)
        a = _input_tile(x_ptr, n, oh, ow, in_m, tl.load(slot_cols + slot), C_IN, H, W, KH, KW, SH, SW, PH, PW, DH,
                        DW, sxn, sxc, sxh, sxw, BLOCK, ALIGNED)
        w = tl.load(values_ptr + slot * BLOCK * BLOCK + offs_b[None, :] * BLOCK + offs_b[:, None])  # W_rc^T
        if DOT_FP32:
            a, w = a.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    offs_n = row * BLOCK + offs_b
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < C_OUT, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * sym + offs_n[None, :] * syn, acc.to(y_ptr.dtype.element_ty),
             mask=in_m[:, None] & (offs_n[None, :] < C_OUT))


@_jit
def _input_grad_kernel(dy_ptr, values_ptr, dx_ptr, col_ptr, col_slots, slot_rows, P, C_OUT,
                       C_IN, H, W, HO, WO, KH, KW, SH, SW, PH, PW, DH, DW, sdym, sdyn, sxn, sxc, sxh, sxw,
                       BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    group = tl.program_id(1)  # channel block q
    offs_p = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_b = tl.arange(0, BLOCK)
    in_p = offs_p < P
    n, ih, iw = offs_p // (H * W), (offs_p % (H * W)) // W, offs_p % W
    acc = tl.zeros((BLOCK_M, BLOCK), dtype=tl.float32)
    for tap in range(KH * KW):
        th = ih + PH - (tap // KW) * DH
        tw = iw + PW - (tap % KW) * DW
        oh, ow = th // SH, tw // SW
        reached = in_p & (th >= 0) & (tw >= 0) & (th % SH == 0) & (tw % SW == 0) & (oh < HO) & (ow < WO)
        m = n * HO * WO + oh * WO + ow
        col = tap * tl.cdiv(C_IN, BLOCK) + group
        for index in range(tl.load(col_ptr + col), tl.load(col_ptr + col + 1)):
            slot = tl.load(col_slots + index)
            offs_n = tl.load(slot_rows + slot) * BLOCK + offs_b
            dy = tl.load(dy_ptr + m[:, None] * sdym + offs_n[None, :] * sdyn,
                         mask=reached[:, None] & (offs_n[None, :] < C_OUT), other=0.0)
            w = tl.load(values_ptr + slot * BLOCK * BLOCK + offs_b[:, None] * BLOCK + offs_b[None, :])
            if DOT_FP32:
                dy, w = dy.to(tl.float32), w.to(tl.float32)
            acc = tl.dot(dy, w, acc, input_precision=PRECISION)
    channels = group * BLOCK + offs_b
    tl.store(dx_ptr + (n * sxn + ih * sxh + iw * sxw)[:, None] + channels[None, :] * sxc,
             acc.to(dx_ptr.dtype.element_ty), mask=in_p[:, None] & (channels[None, :] < C_IN))


@_jit
def _weight_grad_kernel(dy_ptr, x_ptr, partial_ptr, slot_rows, slot_cols, M, C_OUT, num_slots, rows_per_split,
                        C_IN, H, W, HO, WO, KH, KW, SH, SW, PH, PW, DH, DW, sdym, sdyn, sxn, sxc, sxh, sxw,
                        ALIGNED: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, PRECISION: tl.constexpr,
                        DOT_FP32: tl.constexpr):
    slot = tl.program_id(0)
    split = tl.program_id(1)
    offs_b = tl.arange(0, BLOCK)
    offs_n = tl.load(slot_rows + slot) * BLOCK + offs_b
    col = tl.load(slot_cols + slot)
    first = split.to(tl.int64) * rows_per_split
    last = tl.minimum(first + rows_per_split, M)
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for start in range(first, last, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M).to(tl.int64)
        in_m = offs_m < last
        n, oh, ow = offs_m // (HO * WO), (offs_m % (HO * WO)) // WO, offs_m % WO
        dy = tl.load(dy_ptr + offs_m[:, None] * sdym + offs_n[None, :] * sdyn,
                     mask=in_m[:, None] & (offs_n[None, :] < C_OUT), other=0.0)
        a = _input_tile(x_ptr, n, oh, ow, in_m, col, C_IN, H, W, KH, KW, SH, SW, PH, PW, DH, DW, sxn, sxc, sxh, sxw,
                        BLOCK, ALIGNED)
        if DOT_FP32:
            dy, a = dy.to(tl.float32), a.to(tl.float32)
        acc = tl.dot(tl.trans(dy), a, acc, input_precision=PRECISION)
    base = (split.to(tl.int64) * num_slots + slot) * BLOCK * BLOCK
    tl.store(partial_ptr + base + offs_b[:, None] * BLOCK + offs_b[None, :], acc)


def _tuned(kernel, key: list[str]):
    """The kernel autotuned over tile sizes (CUDA), keyed by shape."""
    configs = [triton.Config({"BLOCK_M": block_m}, num_warps=warps, num_stages=stages)
               for block_m, warps, stages in ((32, 4, 2), (64, 4, 3), (64, 8, 3), (128, 4, 3), (128, 8, 3))]
    return triton.autotune(configs=configs, key=key, cache_results=True, do_bench=_short_bench)(kernel)


def _short_bench(function, quantiles=None):
    import triton.testing

    return triton.testing.do_bench(function, warmup=5, rep=20, quantiles=quantiles)


_SHAPE_KEY = ["C_OUT", "C_IN", "H", "W", "KH", "KW", "SH", "DH", "BLOCK"]
_FORWARD_TUNED = _tuned(_forward_kernel, ["M", *_SHAPE_KEY, "HAS_BIAS", "ALIGNED"])
_INPUT_GRAD_TUNED = _tuned(_input_grad_kernel, ["P", *_SHAPE_KEY])
_WEIGHT_GRAD_TUNED = _tuned(_weight_grad_kernel, ["M", *_SHAPE_KEY, "ALIGNED"])
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
        return
    with torch.cuda.device(args[0].device):  # Triton launches on the current device
        tuned[grid](*args, **constants)


def block_sparse_forward(x: Tensor, values: Tensor, bias: Tensor | None, row_ptr: Tensor, row_slots: Tensor,
                         slot_cols: Tensor, geometry: ConvGeometry, out_channels: int) -> Tensor:
    """``Y [N * Ho * Wo, out_channels]``, row-major (channels-last), for ``x [N, C_in, H, W]``."""
    block = values.shape[1]
    height_out, width_out = geometry.output_size
    rows = x.shape[0] * height_out * width_out
    y = x.new_empty(rows, out_channels)
    if rows == 0:
        return y
    _launch(_FORWARD_TUNED, _forward_kernel, lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), row_ptr.numel() - 1),
            x, values, bias if bias is not None else values, y, row_ptr, row_slots, slot_cols, rows, out_channels,
            *geometry.args(), *x.stride(), *y.stride(), HAS_BIAS=bias is not None, ALIGNED=geometry.tap_aligned(block),
            BLOCK=block, **_precision(x.dtype))
    return y


def block_sparse_input_grad(dy: Tensor, values: Tensor, col_ptr: Tensor, col_slots: Tensor, slot_rows: Tensor,
                            geometry: ConvGeometry, batch: int) -> Tensor:
    """``dX [batch, C_in, H, W]`` (contiguous) from ``dY [N * Ho * Wo, C_out]``."""
    block = values.shape[1]
    dx = dy.new_empty(batch, geometry.in_channels, geometry.height, geometry.width)
    positions = batch * geometry.height * geometry.width
    if positions == 0:
        return dx
    groups = triton.cdiv(geometry.in_channels, block)
    _launch(_INPUT_GRAD_TUNED, _input_grad_kernel, lambda meta: (triton.cdiv(positions, meta["BLOCK_M"]), groups),
            dy, values, dx, col_ptr, col_slots, slot_rows, positions, dy.shape[1], *geometry.args(),
            *dy.stride(), *dx.stride(), BLOCK=block, **_precision(dy.dtype))
    return dx


def block_sparse_weight_grad(dy: Tensor, x: Tensor, values: Tensor, slot_rows: Tensor, slot_cols: Tensor,
                             geometry: ConvGeometry) -> Tensor:
    """``dW`` of the kept blocks, ``[S, B, B]`` in ``values``' dtype: float32 partial sums
    over splits of ``M`` (enough programs to fill the device), added in a fixed order."""
    block, num_slots = values.shape[1], values.shape[0]
    rows = dy.shape[0]
    if num_slots == 0 or rows == 0:
        return torch.zeros_like(values)
    splits = max(1, min(triton.cdiv(rows, SPLIT_ROWS), triton.cdiv(1024, num_slots)))
    rows_per_split = triton.cdiv(triton.cdiv(rows, splits), SPLIT_ROWS) * SPLIT_ROWS
    splits = triton.cdiv(rows, rows_per_split)
    partial = dy.new_empty(splits, num_slots, block, block, dtype=torch.float32)
    _launch(_WEIGHT_GRAD_TUNED, _weight_grad_kernel, lambda meta: (num_slots, splits),
            dy, x, partial, slot_rows, slot_cols, rows, dy.shape[1], num_slots, rows_per_split, *geometry.args(),
            *dy.stride(), *x.stride(), ALIGNED=geometry.tap_aligned(block), BLOCK=block, **_precision(x.dtype))
    return (partial.sum(dim=0) if splits > 1 else partial[0]).to(values.dtype)
