"""Block-sparse ``Linear`` and ``Conv2d``: store and compute only the kept blocks.

The block mask applier swaps every masked layer for one of these (by FQN), so the model
classes stay plain ``nn.Module``s. A layer keeps its kept blocks in the parameter
``blocks`` ``[S, B, B]`` (edge blocks zero-padded to ``B``; the padding receives zero
gradient and stays zero) and their positions in the int64 buffers ``slot_rows`` and
``slot_cols``, so checkpoints carry the layout with the weights.

Below ``DENSE_ABOVE`` kept fraction, ``Conv2d`` is lowered to the block-sparse GEMM by an explicit im2col in the GEMM view's
order (taps outer, input channels inner; see ``dsparse.sparsity.blocks``): one strided
slice of the padded input per tap, copied into a ``[K, N * Ho * Wo]`` buffer. Its
memory cost is ``kh * kw`` times the layer's input (plus the zero padding of ``K`` to a
multiple of ``B``), kept for the backward pass like PyTorch's own unfold path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsparse.sparsity.block_gemm import block_sparse_gemm
from dsparse.sparsity.block_layout import BlockLayout
from dsparse.sparsity.blocks import BlockGrid, block_grid

__all__ = ["DENSE_ABOVE", "BlockSparseConv2d", "BlockSparseLayer", "BlockSparseLinear", "block_sparse_from_dense"]

DENSE_ABOVE = {"linear": 0.2, "conv": 0.07}
"""Kept-block fraction above which a layer runs the dense op (``F.linear``/``F.conv2d``,
oneDNN on CPU) on a scratch weight assembled from its kept blocks, because on CPU the
block path's gathers (and, for convolutions, its im2col) cost more than they save there:
measured crossovers on 2 cores with 32x32 blocks (``benchmarks/bench_block_sparse.py``,
README) are between 75% and 90% sparsity for Linear and above 90% for the ResNet convs.
The layer still stores only the kept blocks."""


class BlockSparseLayer(nn.Module):
    """What block-sparse Linear and Conv2d share: blocks, layout, dense conversion, probe."""

    def __init__(self, weight_shape, block: int, block_mask: Tensor, bias: Tensor | None, *, device=None,
                 dtype=None):
        super().__init__()
        self.geometry: BlockGrid = block_grid(weight_shape, block)
        layout = BlockLayout.from_mask(block_mask.to(device))
        self.blocks = nn.Parameter(torch.zeros(layout.num_slots, block, block, device=device, dtype=dtype))
        self.register_buffer("slot_rows", layout.slot_rows)
        self.register_buffer("slot_cols", layout.slot_cols)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self._layout, self._layout_key = None, None
        self.probe: Tensor | None = None
        """Set (by the applier, at mask-update steps) to ``new_probe()`` to receive the dense gradient."""

    @property
    def block(self) -> int:
        return self.geometry.block

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return self.geometry.shape

    def layout(self) -> BlockLayout:
        """The slots' layout, rebuilt only when the slot buffers changed (a mask update or
        a checkpoint load bumps their version counters)."""
        key = (self.slot_rows.data_ptr(), self.slot_rows._version, self.slot_cols.data_ptr(), self.slot_cols._version)
        if self._layout_key != key:
            self._layout = BlockLayout.from_slots(self.slot_rows, self.slot_cols, self.geometry.grid)
            self._layout_key = key
        return self._layout

    def set_layout(self, layout: BlockLayout) -> None:
        """Move blocks to new positions (same number of slots); values are the caller's."""
        with torch.no_grad():
            self.slot_rows.copy_(layout.slot_rows)
            self.slot_cols.copy_(layout.slot_cols)

    def block_mask(self) -> Tensor:
        return self.layout().mask()

    def load_dense(self, weight: Tensor) -> None:
        """Set the kept blocks from a dense weight (pruned positions are ignored)."""
        num_rows, num_cols = self.geometry.grid
        block = self.block
        padded = self.geometry.padded(self.geometry.to_gemm(weight.detach()))
        tiles = padded.reshape(num_rows, block, num_cols, block).permute(0, 2, 1, 3)
        with torch.no_grad():
            self.blocks.copy_(tiles[self.slot_rows, self.slot_cols])

    def dense_weight(self) -> Tensor:
        """The dense weight (zeros outside kept blocks), detached, in the weight's shape."""
        return self.dense_of(self.blocks)

    def dense_of(self, blocks: Tensor) -> Tensor:
        """Any per-slot tensor of ``blocks``' shape (a gradient, an optimizer state) laid
        out densely in the weight's shape, zeros outside the kept blocks."""
        num_rows, num_cols = self.geometry.grid
        block = self.block
        tiles = blocks.new_zeros(num_rows, num_cols, block, block)
        tiles[self.slot_rows, self.slot_cols] = blocks.detach()
        padded = tiles.permute(0, 2, 1, 3).reshape(num_rows * block, num_cols * block)
        return self.geometry.from_gemm(padded[: self.geometry.rows, : self.geometry.cols])

    def new_probe(self) -> Tensor:
        """A zero tensor of the weight's shape whose gradient will be the dense weight gradient."""
        return self.blocks.new_zeros(self.weight_shape, requires_grad=True)

    kind = "linear"

    def uses_dense_scratch(self) -> bool:
        """Whether this layer keeps so many blocks that a dense op is faster (see ``DENSE_ABOVE``)."""
        return self.layout().density > DENSE_ABOVE[self.kind]

    def scratch_weight(self) -> Tensor:
        """A dense weight assembled from the kept blocks, differentiable (its gradient reaches
        ``blocks`` at the kept blocks only) and, with a probe, also carrying the probe."""
        num_rows, num_cols = self.geometry.grid
        block = self.block
        tiles = self.blocks.new_zeros(num_rows, num_cols, block, block)
        tiles = tiles.index_put((self.slot_rows, self.slot_cols), self.blocks)
        padded = tiles.permute(0, 2, 1, 3).reshape(num_rows * block, num_cols * block)
        weight = self.geometry.from_gemm(padded[: self.geometry.rows, : self.geometry.cols])
        return weight if self.probe is None else weight + self.probe

    def _gemm(self, xt: Tensor) -> Tensor:
        probe = None if self.probe is None else self.geometry.padded(self.geometry.to_gemm(self.probe))
        return block_sparse_gemm(xt, self.blocks, self.layout(), probe)


class BlockSparseLinear(BlockSparseLayer):
    """``y = x W^T + b`` with a block-sparse ``W [out, in]``."""

    def __init__(self, in_features: int, out_features: int, block: int, block_mask: Tensor,
                 bias: Tensor | None = None, *, device=None, dtype=None):
        super().__init__((out_features, in_features), block, block_mask, bias, device=device, dtype=dtype)
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: Tensor) -> Tensor:
        if self.uses_dense_scratch():
            return F.linear(x, self.scratch_weight(), self.bias)
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features)
        num_cols = self.geometry.grid[1]
        padded = F.pad(rows, (0, num_cols * self.block - self.in_features))
        xt = padded.t().contiguous().reshape(num_cols, self.block, -1)  # block column c is the slab xt[c]
        yt = self._gemm(xt)
        out = yt.reshape(-1, rows.shape[0])[: self.out_features].t()
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, block={self.block}, "
                f"kept_blocks={self.blocks.shape[0]}/{self.geometry.grid[0] * self.geometry.grid[1]}")


class BlockSparseConv2d(BlockSparseLayer):
    """A ``Conv2d`` (groups 1) with a block-sparse weight, lowered to the block GEMM."""

    kind = "conv"

    def __init__(self, in_channels: int, out_channels: int, kernel_size, block: int, block_mask: Tensor,
                 bias: Tensor | None = None, *, stride=1, padding=0, dilation=1, device=None, dtype=None):
        kh, kw = _pair(kernel_size)
        super().__init__((out_channels, in_channels, kh, kw), block, block_mask, bias, device=device, dtype=dtype)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = (kh, kw), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        return (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1

    def im2col(self, x: Tensor) -> Tensor:
        """``xt [C, B, N * Ho * Wo]``: the taps-outer im2col of ``x``, K padded to whole blocks."""
        num_cols = self.geometry.grid[1]
        return _Im2Col.apply(x, self.kernel_size, self.stride, self.padding, self.dilation,
                             num_cols * self.block).reshape(num_cols, self.block, -1)

    def forward(self, x: Tensor) -> Tensor:
        if self.uses_dense_scratch():
            return F.conv2d(x, self.scratch_weight(), self.bias, self.stride, self.padding, self.dilation)
        batch = x.shape[0]
        out_h, out_w = self.output_size(*x.shape[2:])
        yt = self._gemm(self.im2col(x))
        out = yt.reshape(-1, batch, out_h, out_w)[: self.out_channels].transpose(0, 1)
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1)
        return out

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, block={self.block}, "
                f"kept_blocks={self.blocks.shape[0]}/{self.geometry.grid[0] * self.geometry.grid[1]}")


class _Im2Col(torch.autograd.Function):
    """Taps-outer im2col ``[K_padded, N * Ho * Wo]`` and its adjoint (col2im), one strided
    copy per tap each way (autograd through slice assignment would copy the whole buffer
    once per tap in the backward)."""

    @staticmethod
    def forward(ctx, x: Tensor, kernel, stride, padding, dilation, rows: int) -> Tensor:
        windows = _windows(x.shape, kernel, stride, padding, dilation)
        ctx.shape, ctx.windows, ctx.padding = x.shape, windows, padding
        batch, channels = x.shape[:2]
        (ph, pw), (out_h, out_w) = padding, windows[0][2]
        padded = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
        columns = x.new_empty(rows, batch, out_h, out_w)
        columns[len(windows) * channels:].zero_()
        for tap, (rows_slice, cols_slice, _) in enumerate(windows):
            columns[tap * channels:(tap + 1) * channels].copy_(padded[:, :, rows_slice, cols_slice].transpose(0, 1))
        return columns.reshape(rows, -1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        batch, channels, height, width = ctx.shape
        (ph, pw), windows = ctx.padding, ctx.windows
        out_h, out_w = windows[0][2]
        grad = grad.reshape(-1, batch, out_h, out_w)
        padded = grad.new_zeros(batch, channels, height + 2 * ph, width + 2 * pw)
        for tap, (rows_slice, cols_slice, _) in enumerate(windows):
            padded[:, :, rows_slice, cols_slice].add_(grad[tap * channels:(tap + 1) * channels].transpose(0, 1))
        return padded[:, :, ph:ph + height, pw:pw + width], None, None, None, None, None


def _windows(shape, kernel, stride, padding, dilation) -> list[tuple[slice, slice, tuple[int, int]]]:
    """Per tap (taps outer, row-major), the strided window of the padded input it reads."""
    height, width = shape[2:]
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    out_h = (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    return [(slice(ky * dh, ky * dh + sh * (out_h - 1) + 1, sh), slice(kx * dw, kx * dw + sw * (out_w - 1) + 1, sw),
             (out_h, out_w)) for ky in range(kh) for kx in range(kw)]


def block_sparse_from_dense(layer: nn.Module, block: int, block_mask: Tensor) -> BlockSparseLayer:
    """The block-sparse twin of a ``Linear`` or ``Conv2d`` holding its kept blocks.

    Raises:
        ValueError: a grouped or non-zero-padded convolution, or another layer type.
    """
    weight = layer.weight
    kwargs = {"device": weight.device, "dtype": weight.dtype}
    if isinstance(layer, nn.Linear):
        sparse = BlockSparseLinear(layer.in_features, layer.out_features, block, block_mask, layer.bias, **kwargs)
    elif isinstance(layer, nn.Conv2d):
        if layer.groups != 1 or layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise ValueError(f"block-sparse Conv2d supports groups=1 with numeric zero padding; {layer} is not")
        sparse = BlockSparseConv2d(layer.in_channels, layer.out_channels, layer.kernel_size, block, block_mask,
                                   layer.bias, stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
                                   **kwargs)
    else:
        raise ValueError(f"block-sparse layers replace Linear and Conv2d, not {type(layer).__name__}")
    sparse.load_dense(weight)
    sparse.train(layer.training)
    return sparse


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)
