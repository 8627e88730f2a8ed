"""The Triton block-sparse kernels as ``torch.library`` operators, with autograd and fake
(meta) implementations, so block-sparse layers trace under ``torch.compile`` and
``torch.export`` like any ATen op:

- ``dsparse::block_sparse_conv(x, values, bias, <layout>, kernel_size, stride, padding,
  dilation, out_channels) -> y [N * Ho * Wo, C_out]`` (channels-last rows);
- ``dsparse::block_sparse_conv_input_grad(dy, values, <transposed layout>, x_shape, ...) -> dx``;
- ``dsparse::block_sparse_conv_weight_grad(dy, x, values, slot_rows, slot_cols, ...) -> dvalues``.

``<layout>`` is a ``BlockLayout``'s index tensors (on the device). The forward op's
backward calls the two gradient ops, so a compiled graph holds all three. A Linear is the
1x1 convolution of a 1x1 image (``block_sparse_linear``). Importing this module imports
Triton; ``dsparse`` imports it only when a layer runs the Triton kernels
(``sparsity.kernel``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dsparse.kernels.block_sparse import (
    ConvGeometry,
    block_sparse_forward,
    block_sparse_input_grad,
    block_sparse_weight_grad,
)

__all__ = ["DTYPES", "block_sparse_conv", "block_sparse_linear"]

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _geometry(shape, kernel_size, stride, padding, dilation) -> ConvGeometry:
    return ConvGeometry(shape[1], shape[2], shape[3], tuple(kernel_size), tuple(stride), tuple(padding),
                        tuple(dilation))


@torch.library.custom_op("dsparse::block_sparse_conv", mutates_args=())
def block_sparse_conv(x: Tensor, values: Tensor, bias: Tensor | None, row_ptr: Tensor, row_slots: Tensor,
                      slot_cols: Tensor, col_ptr: Tensor, col_slots: Tensor, slot_rows: Tensor,
                      kernel_size: list[int], stride: list[int], padding: list[int], dilation: list[int],
                      out_channels: int) -> Tensor:
    """``Y [N * Ho * Wo, out_channels]`` of the block-sparse convolution of ``x [N, C, H, W]``."""
    _check_operands(x, values, bias)
    geometry = _geometry(x.shape, kernel_size, stride, padding, dilation)
    return block_sparse_forward(x, values, bias, row_ptr, row_slots, slot_cols, geometry, out_channels)


@block_sparse_conv.register_fake
def _(x, values, bias, row_ptr, row_slots, slot_cols, col_ptr, col_slots, slot_rows, kernel_size, stride, padding,
      dilation, out_channels):
    height, width = _geometry(x.shape, kernel_size, stride, padding, dilation).output_size
    return x.new_empty(x.shape[0] * height * width, out_channels)


@torch.library.custom_op("dsparse::block_sparse_conv_input_grad", mutates_args=())
def block_sparse_conv_input_grad(dy: Tensor, values: Tensor, col_ptr: Tensor, col_slots: Tensor, slot_rows: Tensor,
                                 x_shape: list[int], kernel_size: list[int], stride: list[int], padding: list[int],
                                 dilation: list[int]) -> Tensor:
    geometry = _geometry(x_shape, kernel_size, stride, padding, dilation)
    if geometry.tap_aligned(values.shape[1]):
        return block_sparse_input_grad(dy, values, col_ptr, col_slots, slot_rows, geometry, x_shape[0])
    return _input_grad_by_fold(dy, values, col_ptr, col_slots, slot_rows, geometry, x_shape)


def _input_grad_by_fold(dy: Tensor, values: Tensor, col_ptr: Tensor, col_slots: Tensor, slot_rows: Tensor,
                        geometry: ConvGeometry, x_shape: list[int]) -> Tensor:
    """``dX`` where a block column straddles taps (a 3-channel stem): the kernels give the
    im2col gradient ``[M, K]`` (the 1x1 view), which ``F.fold`` sums back onto the input.
    Only such layers' backward pass holds an im2col-sized buffer, and only when their input
    needs a gradient (a stem's input image does not)."""
    batch, channels, _, _ = x_shape
    taps = geometry.kernel[0] * geometry.kernel[1]
    columns = block_sparse_input_grad(dy, values, col_ptr, col_slots, slot_rows,
                                      ConvGeometry.linear(channels * taps), dy.shape[0])
    height_out, width_out = geometry.output_size
    columns = columns.reshape(batch, height_out * width_out, taps, channels).permute(0, 3, 2, 1)
    return torch.nn.functional.fold(columns.reshape(batch, channels * taps, height_out * width_out),
                                    (geometry.height, geometry.width), geometry.kernel, dilation=geometry.dilation,
                                    padding=geometry.padding, stride=geometry.stride)


@block_sparse_conv_input_grad.register_fake
def _(dy, values, col_ptr, col_slots, slot_rows, x_shape, kernel_size, stride, padding, dilation):
    return dy.new_empty(x_shape)


@torch.library.custom_op("dsparse::block_sparse_conv_weight_grad", mutates_args=())
def block_sparse_conv_weight_grad(dy: Tensor, x: Tensor, values: Tensor, slot_rows: Tensor, slot_cols: Tensor,
                                  kernel_size: list[int], stride: list[int], padding: list[int],
                                  dilation: list[int]) -> Tensor:
    geometry = _geometry(x.shape, kernel_size, stride, padding, dilation)
    return block_sparse_weight_grad(dy, x, values, slot_rows, slot_cols, geometry)


@block_sparse_conv_weight_grad.register_fake
def _(dy, x, values, slot_rows, slot_cols, kernel_size, stride, padding, dilation):
    return torch.empty_like(values)


def _setup_context(ctx, inputs, output) -> None:
    (x, values, bias, row_ptr, row_slots, slot_cols, col_ptr, col_slots, slot_rows, kernel_size, stride, padding,
     dilation, out_channels) = inputs
    ctx.save_for_backward(x, values, col_ptr, col_slots, slot_rows, slot_cols)
    ctx.conv = (list(kernel_size), list(stride), list(padding), list(dilation))
    ctx.has_bias = bias is not None


def _backward(ctx, dy: Tensor):
    x, values, col_ptr, col_slots, slot_rows, slot_cols = ctx.saved_tensors
    dx = dvalues = dbias = None
    if ctx.needs_input_grad[0]:
        dx = block_sparse_conv_input_grad(dy, values, col_ptr, col_slots, slot_rows, list(x.shape), *ctx.conv)
    if ctx.needs_input_grad[1]:
        dvalues = block_sparse_conv_weight_grad(dy, x, values, slot_rows, slot_cols, *ctx.conv)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        dbias = dy.sum(dim=0)
    return (dx, dvalues, dbias) + (None,) * 11


block_sparse_conv.register_autograd(_backward, setup_context=_setup_context)


def block_sparse_linear(x: Tensor, values: Tensor, bias: Tensor | None, row_ptr: Tensor, row_slots: Tensor,
                        slot_cols: Tensor, col_ptr: Tensor, col_slots: Tensor, slot_rows: Tensor,
                        out_features: int) -> Tensor:
    """``Y [M, out_features] = X W^T + bias`` for ``X [M, K]``: the 1x1 convolution of a 1x1 image."""
    return block_sparse_conv(x[:, :, None, None], values, bias, row_ptr, row_slots, slot_cols, col_ptr, col_slots,
                             slot_rows, [1, 1], [1, 1], [0, 0], [1, 1], out_features)


def _check_operands(x: Tensor, values: Tensor, bias: Tensor | None) -> None:
    if x.dim() != 4 or values.dim() != 3 or not values.is_contiguous() or not (bias is None or bias.is_contiguous()):
        raise ValueError(f"block_sparse_conv takes x [N, C, H, W] and contiguous values [S, B, B] (and bias), got "
                         f"{tuple(x.shape)} and {tuple(values.shape)}")
    if x.dtype not in DTYPES:
        raise ValueError(f"the Triton block-sparse kernels take {', '.join(map(str, DTYPES))}, got {x.dtype}; "
                         "use sparsity.kernel=torch for other dtypes")
    if x.dtype != values.dtype or (bias is not None and bias.dtype != x.dtype):
        raise ValueError(f"block_sparse_conv needs one dtype for x, values and bias, got {x.dtype}, {values.dtype}"
                         f"{'' if bias is None else ', ' + str(bias.dtype)}; cast the layer or its input")
