"""Triton block-sparse kernels against dense masked PyTorch.

On CPU they run in Triton's interpreter (``tests/conftest.py`` sets ``TRITON_INTERPRET=1``
when there is no CUDA device); ``benchmarks/gpu_check.sh`` runs this file on a GPU with
the interpreter off. Shapes are small and deliberately not multiples of the block.

Tolerances (relative to the reference's largest magnitude): fp32 ``1e-4`` (IEEE fp32
products, another summation order); bf16 ``3e-2`` and fp16 ``5e-3`` (inputs rounded to
the type on both sides, fp32 accumulation, output rounded once).
"""

from __future__ import annotations

import pytest
import torch

from dsparse.kernels import resolve_kernel
from dsparse.sparsity.block.layout import BlockLayout

ops = pytest.importorskip("dsparse.kernels.ops", reason="Triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def random_problem(m: int, n: int, k: int, block: int, kept: float, dtype=torch.float32, seed: int = 0,
                   block_mask: torch.Tensor | None = None):
    """A block-sparse weight (edge-block padding zero), its dense twin, input and upstream gradient."""
    generator = torch.Generator().manual_seed(seed)
    grid = (-(-n // block), -(-k // block))
    if block_mask is None:
        block_mask = torch.rand(grid, generator=generator) < kept
    layout = BlockLayout.from_mask(block_mask.to(DEVICE))
    dense = torch.randn(grid[0] * block, grid[1] * block, generator=generator)
    dense[n:], dense[:, k:] = 0, 0
    dense *= block_mask.repeat_interleave(block, 0).repeat_interleave(block, 1)
    tiles = dense.reshape(grid[0], block, grid[1], block).permute(0, 2, 1, 3)
    values = tiles[layout.slot_rows.cpu(), layout.slot_cols.cpu()].contiguous()
    x = torch.randn(m, k, generator=generator)
    dy = torch.randn(m, n, generator=generator)
    bias = torch.randn(n, generator=generator)
    move = {"device": DEVICE, "dtype": dtype}
    return layout, values.to(**move), dense[:n, :k].to(**move), x.to(**move), dy.to(**move), bias.to(**move)


def run_op(x, values, bias, layout, out_features, dy):
    x = x.detach().clone().requires_grad_()
    values = values.detach().clone().requires_grad_()
    bias = None if bias is None else bias.detach().clone().requires_grad_()
    y = ops.block_sparse_linear(x, values, bias, layout.row_ptr, layout.row_slots, layout.slot_cols,
                                layout.col_ptr, layout.col_slots, layout.slot_rows, out_features)
    y.backward(dy)
    return y, x.grad, values.grad, None if bias is None else bias.grad


def reference(x, dense, bias, dy, layout, block):
    """Forward, dX, dW on the kept blocks and dbias of the dense masked product, in float64."""
    x64, w64, dy64 = x.double(), dense.double(), dy.double()
    y = x64 @ w64.t() + (0 if bias is None else bias.double())
    n, k = dense.shape
    grid = layout.grid
    full = torch.zeros(grid[0] * block, grid[1] * block, dtype=torch.float64, device=x.device)
    full[:n, :k] = dy64.t() @ x64
    tiles = full.reshape(grid[0], block, grid[1], block).permute(0, 2, 1, 3)
    return y, dy64 @ w64, tiles[layout.slot_rows, layout.slot_cols], dy64.sum(0)


def assert_close(got, expected, dtype):
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(got.double() / scale, expected / scale, rtol=0, atol=TOLERANCE[dtype])


def check(m, n, k, block, kept, dtype=torch.float32, bias=True, block_mask=None, x_column_major=False):
    layout, values, dense, x, dy, b = random_problem(m, n, k, block, kept, dtype, block_mask=block_mask)
    if x_column_major:
        x = x.t().contiguous().t()
    y, dx, dvalues, dbias = run_op(x, values, b if bias else None, layout, n, dy)
    ref_y, ref_dx, ref_dvalues, ref_dbias = reference(x, dense, b if bias else None, dy, layout, block)
    assert y.shape == (m, n) and y.dtype == dtype
    assert_close(y, ref_y, dtype)
    assert_close(dx, ref_dx, dtype)
    assert_close(dvalues, ref_dvalues, dtype)
    if bias:
        assert_close(dbias, ref_dbias, dtype)
    # the edge blocks' zero padding gets exactly zero gradient
    padding = values == 0
    assert torch.count_nonzero(dvalues[padding & (ref_dvalues == 0)]) == 0


@pytest.mark.parametrize("block", [16, 32, 64])
@pytest.mark.parametrize("kept", [0.0, 0.1, 0.5, 1.0])
def test_kernels_match_dense_masked(block, kept):
    check(37, 2 * block + 5, 3 * block - 3, block, kept)


def test_empty_block_rows_and_columns_and_no_bias():
    block_mask = torch.tensor([[True, False, False, True], [False, False, False, False], [False, True, False, True]])
    check(21, 40, 60, 16, 0.0, bias=False, block_mask=block_mask)


def test_strided_input_and_large_m_split_weight_gradient():
    """A column-major input (a transposed im2col) is read through its strides, and ``M``
    above one ``dW`` split gives the same sums."""
    check(300, 48, 40, 16, 0.5, x_column_major=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_accumulate_in_float32(dtype):
    check(33, 40, 56, 16, 0.5, dtype=dtype)


@pytest.mark.filterwarnings("ignore:Input #")  # gradcheck prefers float64, which the kernels refuse
def test_gradcheck_float32():
    """Finite differences in float32 (the kernels take no float64): step 1e-2, and
    tolerances ``atol = rtol = 1e-2`` for its truncation and rounding error."""
    layout, values, dense, x, dy, bias = random_problem(3, 20, 18, 16, 0.0,
                                                        block_mask=torch.tensor([[True, False], [True, True]]))
    inputs = (x.requires_grad_(), values.requires_grad_(), bias.requires_grad_())

    def function(x, values, bias):
        return ops.block_sparse_linear(x, values, bias, layout.row_ptr, layout.row_slots, layout.slot_cols,
                                       layout.col_ptr, layout.col_slots, layout.slot_rows, 20)

    assert torch.autograd.gradcheck(function, inputs, eps=1e-2, atol=1e-2, rtol=1e-2, fast_mode=True)


def test_float64_is_refused_with_the_fix():
    layout, values, dense, x, dy, bias = random_problem(3, 20, 18, 16, 0.5, torch.float64)
    with pytest.raises(ValueError, match="sparsity.kernel=torch"):
        ops.block_sparse_linear(x, values, bias, layout.row_ptr, layout.row_slots, layout.slot_cols,
                                layout.col_ptr, layout.col_slots, layout.slot_rows, 20)


def test_layout_change_reuses_the_kernels():
    """A mask update changes only index tensors: same shapes, no new compilation key."""
    first = torch.tensor([[True, False], [False, True]])
    second = torch.tensor([[False, True], [True, False]])
    for block_mask in (first, second):
        check(17, 32, 32, 16, 0.0, block_mask=block_mask)


def test_resolve_kernel_auto_and_clear_error(monkeypatch):
    from dsparse.kernels import cpu

    assert resolve_kernel("torch", "cuda") == "torch"
    assert resolve_kernel("auto", "cpu") == ("cpu" if cpu.available() else "torch")
    assert resolve_kernel("auto", "cpu", torch.bfloat16) == "torch"  # the compiled kernels are fp32
    assert resolve_kernel("auto", "cpu", torch.float32, block=8) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_kernel("triton", "cpu") == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="sparsity.kernel=triton cannot run here.*TRITON_INTERPRET=1"):
        resolve_kernel("triton", "cpu")
    with pytest.raises(ValueError, match="must be one of"):
        resolve_kernel("cuda", "cpu")


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_layers_trace_under_torch_compile(kind):
    """The ops' fake implementations let ``torch.compile`` trace a block-sparse layer in one
    graph (fullgraph), and the compiled forward and backward equal eager ones."""
    from torch import nn

    from dsparse.sparsity.block.layers import block_sparse_from_dense

    torch.manual_seed(11)
    block_mask = torch.tensor([[True, False, True], [False, True, False]])
    if kind == "linear":
        dense, x = nn.Linear(40, 24), torch.randn(5, 40, device=DEVICE)
    else:  # 16 channels x 3 taps (1x3 kernel) = 3 block columns of 16
        dense, x = nn.Conv2d(16, 24, (1, 3), padding=(0, 1)), torch.randn(2, 16, 5, 4, device=DEVICE)
    layer = block_sparse_from_dense(dense, 16, block_mask, "triton").to(DEVICE)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    results = []
    for module in (layer, compiled):
        layer.zero_grad(set_to_none=True)
        x_grad = x.clone().requires_grad_()
        out = module(x_grad)
        out.square().sum().backward()
        results.append((out.detach(), x_grad.grad, layer.blocks.grad.clone(), layer.bias.grad.clone()))
    for eager, traced in zip(*results):
        torch.testing.assert_close(traced, eager, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (benchmarks/gpu_check.sh runs it)")
def test_cuda_training_step_and_layout_rebuild_never_wait_for_the_host():
    """On a GPU, once each shape is tuned, a block-sparse layer's forward and backward and a
    layout rebuild from slots launch work without a single host synchronisation."""
    from torch import nn

    from dsparse.sparsity.block.layers import block_sparse_from_dense

    torch.manual_seed(15)
    layer = block_sparse_from_dense(nn.Conv2d(32, 64, 3, padding=1).cuda(), 16, torch.rand(4, 18) < 0.3, "triton")
    x = torch.randn(4, 32, 16, 16, device="cuda", requires_grad=True)
    layer(x).sum().backward()  # the first call autotunes (benchmarking synchronises)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        layer(x).sum().backward()
        BlockLayout.from_slots(layer.slot_rows, layer.slot_cols, layer.geometry.grid)
    finally:
        torch.cuda.set_sync_debug_mode(0)

