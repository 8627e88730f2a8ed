"""Block-sparse ``Linear`` and ``Conv2d``: store and compute only the kept blocks.

The block mask applier swaps every masked layer for one of these (by FQN), so the model
classes stay plain ``nn.Module``s. A layer keeps its kept blocks in the parameter
``blocks`` ``[S, B, B]`` (edge blocks zero-padded to ``B``; the padding receives zero
gradient and stays zero) and their positions in the int64 buffers ``slot_rows`` and
``slot_cols``, so checkpoints carry the layout with the weights.

Below ``DENSE_ABOVE`` kept fraction, ``Conv2d`` runs the compiled CPU kernels' implicit
GEMM where it can (``runs_implicit_gemm``: channels-last in and out, no im2col);
otherwise it is lowered to the block-sparse GEMM by an explicit im2col in the GEMM view's order (taps outer, input channels inner; see
``dsparse.sparsity.block.geometry``) that copies only the block columns some kept block reads:
one strided slice of the padded input per run of one tap's channels, into a
``[U * B, N * Ho * Wo]`` buffer, ``U`` the used block columns. Its memory cost is ``U * B / in_channels`` times the layer's input, at most
``kh * kw`` times (PyTorch's own unfold path), kept for the backward pass. At mask-update
steps, when the dense weight gradient is asked for, every column is copied.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsparse.kernels import resolve_kernel
from dsparse.sparsity.block.gemm import block_sparse_conv_nhwc, block_sparse_gemm
from dsparse.sparsity.block.layout import BlockLayout
from dsparse.sparsity.block.geometry import BlockGrid, block_grid

__all__ = ["DENSE_ABOVE", "BlockSparseConv2d", "BlockSparseLayer", "BlockSparseLinear", "block_sparse_from_dense"]

DENSE_ABOVE = {"torch": {"linear": 0.3, "conv": 0.2}, "cpu": {"linear": 0.7, "conv": 0.5}}
"""Per compute path (``sparsity.kernel`` resolved), the kept-block fraction above which a
layer runs the dense op (``F.linear``/``F.conv2d``, oneDNN on CPU) on a scratch weight
assembled from its kept blocks, because there the block kernels (and, for convolutions,
the im2col) cost more than the skipped blocks save. Crossovers measured forward+backward on
2 cores with 32x32 blocks: PyTorch path, between 65% and 75% sparsity for the 1024x1024
Linear and around 75% for the ResNet-34 3x3 convs; compiled kernels (implicit GEMM for
the 3x3 convs), about 30% for the Linear and 50% for the convs.
The layer still stores only the kept blocks."""


class BlockSparseLayer(nn.Module):
    """What block-sparse Linear and Conv2d share: blocks, layout, dense conversion, probe."""

    def __init__(self, weight_shape, block: int, block_mask: Tensor, bias: Tensor | None, *, kernel: str = "auto",
                 device=None, dtype=None):
        super().__init__()
        self.kernel = kernel
        """``sparsity.kernel`` (``dsparse.kernels.Kernel``), resolved for the input's device and
        dtype at each call."""
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
        if torch.compiler.is_compiling():  # traced: tensor ops in the graph, O(blocks) per call
            return BlockLayout.from_slots(self.slot_rows, self.slot_cols, self.geometry.grid)
        rows, cols = self._buffers["slot_rows"], self._buffers["slot_cols"]  # not __getattr__: called every forward
        key = (rows.data_ptr(), rows._version, cols.data_ptr(), cols._version)
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

    def uses_dense_scratch(self, path: str, layout: BlockLayout | None = None) -> bool:
        """Whether this layer keeps so many blocks that a dense op is faster than ``path``
        (see ``DENSE_ABOVE``); ``layout`` is ``self.layout()``, passed when the caller has it."""
        return (self.layout() if layout is None else layout).density > DENSE_ABOVE[path][self.kind]

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

    def compute_path(self, x: Tensor) -> str:
        """``"triton"``, ``"cpu"`` or ``"torch"``: what this call runs (``dsparse.kernels.resolve_kernel``)."""
        return resolve_kernel(self.kernel, x.device, x.dtype, self.block)

    def _triton_linear(self, x: Tensor, layout: BlockLayout, out_features: int) -> Tensor:
        """``Y [M, out_features] = X W^T + b`` by the Triton kernels (bias fused), row-major."""
        from dsparse.kernels.ops import block_sparse_linear

        return block_sparse_linear(x, self.blocks, self.bias, *_walks(layout), out_features)

    def _gemm(self, x: Tensor, column_major_out: bool, path: str, walk: BlockLayout | None = None) -> Tensor:
        """``Y = X W^T`` on the kept blocks by ``path`` (``"cpu"``: the compiled kernels),
        walking ``walk`` (the layout by default; its compact form when ``x`` holds only the
        used block columns). With a probe set, ``x`` holds every column and the probe gets
        the dense weight gradient."""
        probe = None
        if self.probe is not None:
            probe = self.geometry.padded(self.geometry.to_gemm(self.probe))
        return block_sparse_gemm(x, self.blocks, self.layout() if walk is None else walk, probe, column_major_out,
                                 compiled=path == "cpu")


class BlockSparseLinear(BlockSparseLayer):
    """``y = x W^T + b`` with a block-sparse ``W [out, in]``."""

    def __init__(self, in_features: int, out_features: int, block: int, block_mask: Tensor,
                 bias: Tensor | None = None, *, kernel: str = "auto", device=None, dtype=None):
        super().__init__((out_features, in_features), block, block_mask, bias, kernel=kernel, device=device,
                         dtype=dtype)
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features)
        path = self.compute_path(x)
        if path == "triton":
            out = self._triton_linear(rows, self.layout(), self.out_features).reshape(*lead, self.out_features)
            return out if self.probe is None else out + F.linear(x, self.probe)  # the probe's gradient: dense dW
        layout = self.layout()
        if self.uses_dense_scratch(path, layout):
            return F.linear(x, self.scratch_weight(), self.bias)
        padding = self.geometry.grid[1] * self.block - self.in_features
        out = self._gemm(F.pad(rows, (0, padding)) if padding else rows, column_major_out=False, path=path,
                         walk=layout)
        out = out[:, :self.out_features]
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
                 bias: Tensor | None = None, *, stride=1, padding=0, dilation=1, kernel: str = "auto", device=None,
                 dtype=None):
        kh, kw = _pair(kernel_size)
        super().__init__((out_channels, in_channels, kh, kw), block, block_mask, bias, kernel=kernel, device=device,
                         dtype=dtype)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = (kh, kw), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        self._conv = (self.kernel_size, self.stride, self.padding, self.dilation)
        self._plan: tuple[Tensor | None, _ColumnPlan] | None = None

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        return (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1

    def im2col(self, x: Tensor, used: Tensor | None = None) -> Tensor:
        """``[U * B, N * Ho * Wo]``: the taps-outer im2col of ``x`` for the block columns
        ``used`` (all by default), each zero-padded to ``B`` rows past the end of ``K``."""
        return _Im2Col.apply(x, self._column_plan(used), self.kernel_size, self.stride, self.padding, self.dilation)

    def _column_plan(self, used: Tensor | None) -> _ColumnPlan:
        """Which channels of which tap the im2col of ``used`` copies, cached per layout
        (``used`` is the layout's cached tensor, so a new one marks a mask change)."""
        if self._plan is None or self._plan[0] is not used:
            blocks = list(range(self.geometry.grid[1])) if used is None else used.tolist()
            kh, kw = self.kernel_size
            self._plan = (used, _ColumnPlan.of(blocks, self.block, self.in_channels, kh * kw))
        return self._plan[1]

    def forward(self, x: Tensor) -> Tensor:
        path = self.compute_path(x)
        if path == "triton":
            out = self._triton_forward(x)
            if self.probe is not None:  # the probe's gradient: the dense weight gradient
                out = out + F.conv2d(x, self.probe, None, self.stride, self.padding, self.dilation)
            return out
        layout = self.layout()
        if self.uses_dense_scratch(path, layout):
            if self.kernel_size == (1, 1) and self.padding == (0, 0) and x.is_contiguous(
                    memory_format=torch.channels_last):
                return _pointwise_channels_last(x, self.scratch_weight(), self.bias, self.stride)
            # NCHW for oneDNN: after a compiled conv the input is channels-last, and oneDNN's conv
            # weight gradient has corrupted the heap on channels-last inputs (torch 2.13 CPU,
            # dsparse/data/loader.py's collate); its channels-last dilated convs also ran
            # 1.2-1.6x slower here.
            x = x.contiguous()
            return F.conv2d(x, self.scratch_weight(), self.bias, self.stride, self.padding, self.dilation)
        if path == "cpu" and self.runs_implicit_gemm(x):
            out = block_sparse_conv_nhwc(x, self.blocks, layout, self.out_channels, self._conv)
            return out if self.bias is None else out + self.bias.view(1, -1, 1, 1)
        batch = x.shape[0]
        out_h, out_w = self.output_size(*x.shape[2:])
        used, walk = layout.compact() if self.probe is None else (None, layout)  # a probe needs every column
        y = self._gemm(self.im2col(x, used).t(), column_major_out=True, path=path, walk=walk)
        out = y.t().reshape(-1, batch, out_h, out_w)[: self.out_channels].transpose(0, 1)
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1)
        return out

    def runs_implicit_gemm(self, x: Tensor) -> bool:
        """Whether the compiled CPU kernels run this layer on ``x`` as implicit GEMM (no
        im2col; channels-last output): each block column must be one tap (input channels a
        multiple of the block). A 1x1 convolution of a channels-first input runs the im2col
        path, whose "im2col" is one strided copy and whose output is channels-first like
        its input. At mask-update steps (a probe set) the im2col path gives the dense
        weight gradient."""
        if self.probe is not None or self.in_channels % self.block:
            return False
        return self.kernel_size != (1, 1) or x.is_contiguous(memory_format=torch.channels_last)

    def _triton_forward(self, x: Tensor) -> Tensor:
        """The Triton kernels' implicit-GEMM output, channels-last in memory (no copy)."""
        from dsparse.kernels.ops import block_sparse_conv

        out_h, out_w = self.output_size(*x.shape[2:])
        y = block_sparse_conv(x, self.blocks, self.bias, *_walks(self.layout()), list(self.kernel_size),
                              list(self.stride), list(self.padding), list(self.dilation), self.out_channels)
        return y.view(x.shape[0], out_h, out_w, self.out_channels).permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, block={self.block}, "
                f"kept_blocks={self.blocks.shape[0]}/{self.geometry.grid[0] * self.geometry.grid[1]}")


@dataclass(frozen=True)
class _ColumnPlan:
    """The rows of a (partial) taps-outer im2col as runs: each run is a range of one tap's
    input channels that lands in consecutive rows."""

    runs: tuple[tuple[int, int, int, int], ...]
    """(tap, first channel, end channel, first row)."""
    zero_rows: tuple[tuple[int, int], ...]
    """Row ranges past the end of ``K`` (edge-block padding), zero."""
    rows: int

    @classmethod
    def of(cls, blocks: list[int], block: int, channels: int, taps: int) -> _ColumnPlan:
        """The plan for block columns ``blocks`` (ascending) of a ``[*, taps * channels]`` view."""
        total = taps * channels
        runs, zero_rows = [], []
        for position, column in enumerate(blocks):
            start, stop = column * block, min((column + 1) * block, total)
            index = start
            while index < stop:
                tap, channel = divmod(index, channels)
                run = min(stop, (tap + 1) * channels) - index
                row = position * block + index - start
                last = runs[-1] if runs else None
                if last and last[0] == tap and last[2] == channel and last[3] + last[2] - last[1] == row:
                    runs[-1] = (tap, last[1], channel + run, last[3])  # extends the previous run
                else:
                    runs.append((tap, channel, channel + run, row))
                index += run
            if stop - start < block:
                zero_rows.append((position * block + stop - start, (position + 1) * block))
        return cls(tuple(runs), tuple(zero_rows), len(blocks) * block)


class _Im2Col(torch.autograd.Function):
    """Partial taps-outer im2col ``[plan.rows, N * Ho * Wo]`` and its adjoint (col2im), one
    strided copy per run each way (autograd through slice assignment would copy the
    whole buffer once per run in the backward)."""

    @staticmethod
    def forward(ctx, x: Tensor, plan: _ColumnPlan, kernel, stride, padding, dilation) -> Tensor:
        windows = _windows(x.shape, kernel, stride, padding, dilation)
        ctx.shape, ctx.windows, ctx.padding, ctx.plan = x.shape, windows, padding, plan
        batch = x.shape[0]
        (ph, pw), (out_h, out_w) = padding, windows[0][2]
        padded = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
        columns = x.new_empty(plan.rows, batch, out_h, out_w)
        for start, stop in plan.zero_rows:
            columns[start:stop].zero_()
        for tap, first, end, row in plan.runs:
            rows_slice, cols_slice, _ = windows[tap]
            columns[row:row + end - first].copy_(padded[:, first:end, rows_slice, cols_slice].transpose(0, 1))
        return columns.reshape(plan.rows, batch * out_h * out_w)

    @staticmethod
    def backward(ctx, grad: Tensor):
        batch, channels, height, width = ctx.shape
        (ph, pw), windows, plan = ctx.padding, ctx.windows, ctx.plan
        out_h, out_w = windows[0][2]
        grad = grad.reshape(-1, batch, out_h, out_w)
        padded = grad.new_zeros(batch, channels, height + 2 * ph, width + 2 * pw)
        for tap, first, end, row in plan.runs:
            rows_slice, cols_slice, _ = windows[tap]
            padded[:, first:end, rows_slice, cols_slice].add_(grad[row:row + end - first].transpose(0, 1))
        return padded[:, :, ph:ph + height, pw:pw + width], None, None, None, None, None


def _windows(shape, kernel, stride, padding, dilation) -> list[tuple[slice, slice, tuple[int, int]]]:
    """Per tap (taps outer, row-major), the strided window of the padded input it reads."""
    height, width = shape[2:]
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    out_h = (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    return [(slice(ky * dh, ky * dh + sh * (out_h - 1) + 1, sh), slice(kx * dw, kx * dw + sw * (out_w - 1) + 1, sw),
             (out_h, out_w)) for ky in range(kh) for kx in range(kw)]


def block_sparse_from_dense(layer: nn.Module, block: int, block_mask: Tensor, kernel: str = "auto") -> BlockSparseLayer:
    """The block-sparse twin of a ``Linear`` or ``Conv2d`` holding its kept blocks, running
    ``kernel`` (``sparsity.kernel``).

    Raises:
        ValueError: a grouped or non-zero-padded convolution, or another layer type.
    """
    weight = layer.weight
    kwargs = {"kernel": kernel, "device": weight.device, "dtype": weight.dtype}
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


def _pointwise_channels_last(x: Tensor, weight: Tensor, bias: Tensor | None, stride: tuple[int, int]) -> Tensor:
    """A 1x1 convolution of a channels-last ``x`` as one GEMM over its pixels, channels-last
    out: no NCHW copy of the input (which cost a 1x1 layer kept dense after a compiled one
    as much as its convolution) and no oneDNN channels-last convolution (see ``forward``)."""
    pixels = x.permute(0, 2, 3, 1)[:, ::stride[0], ::stride[1]]
    return F.linear(pixels, weight.flatten(1), bias).permute(0, 3, 1, 2)


def _walks(layout: BlockLayout) -> tuple[Tensor, ...]:
    """A layout's index tensors in the order the Triton ops take them (rows, then columns)."""
    return layout.row_ptr, layout.row_slots, layout.slot_cols, layout.col_ptr, layout.col_slots, layout.slot_rows


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)
