"""Block-sparse layers against dense masked PyTorch: forward, dX and dW (kept blocks only),
the dense probe gradient, layouts, and gradcheck.

Tolerances: fp32 results agree with the dense reference to ``rtol=1e-4, atol=1e-4``
(different summation order); bf16 to ``rtol=atol=5e-2`` relative to the output scale
(both sides round to bf16's 8-bit mantissa); gradcheck runs in float64 at its defaults.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dsparse.sparsity.block.layers import BlockSparseConv2d, BlockSparseLinear, block_sparse_from_dense
from dsparse.sparsity.block.layout import BlockLayout
from dsparse.sparsity.block.geometry import block_grid

FP32 = {"rtol": 1e-4, "atol": 1e-4}


def random_block_mask(grid, kept: float, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(grid, generator=generator) < kept


def check_against_dense(layer: nn.Module, x: torch.Tensor, kept: float, block: int, seed: int = 0, dtype=torch.float32,
                        tolerance=FP32, kernel: str = "auto"):
    if kernel == "triton" and torch.cuda.is_available():  # benchmarks/gpu_check.sh: the kernels on the GPU
        layer, x = layer.cuda(), x.cuda()
    grid = block_grid(layer.weight.shape, block)
    block_mask = random_block_mask(grid.grid, kept, seed)
    element_mask = grid.expand(block_mask).to(x.device)
    sparse = block_sparse_from_dense(layer, block, block_mask, kernel).to(dtype)
    reference_dtype = torch.float64 if dtype == torch.float32 else dtype  # fp32 is checked against float64
    reference = layer.to(reference_dtype)
    x_dense = x.to(reference_dtype).clone().requires_grad_()
    x_sparse = x.to(dtype).clone().requires_grad_()
    weight = reference.weight * element_mask.to(reference_dtype)
    if isinstance(layer, nn.Linear):
        expected = F.linear(x_dense, weight, reference.bias)
    else:
        expected = F.conv2d(x_dense, weight, reference.bias, reference.stride, reference.padding, reference.dilation)
    got = sparse(x_sparse)
    assert got.shape == expected.shape
    scale = max(1.0, float(expected.detach().abs().max()))
    torch.testing.assert_close(got.float() / scale, expected.float() / scale, **tolerance)
    upstream = torch.randn_like(expected)
    expected.backward(upstream)
    got.backward(upstream)
    torch.testing.assert_close(x_sparse.grad.float(), x_dense.grad.float(), **tolerance)
    dense_grad = reference.weight.grad * element_mask.to(reference_dtype)
    kept_grad = sparse.dense_of(sparse.blocks.grad)
    torch.testing.assert_close(kept_grad.float(), dense_grad.float(), **tolerance)
    # the zero padding of edge blocks gets exactly zero gradient, so it stays zero
    saved = sparse.blocks.detach().clone()
    sparse.load_dense(torch.ones(sparse.weight_shape, dtype=dtype, device=x.device))
    padding = sparse.blocks.detach() == 0
    sparse.blocks.data.copy_(saved)
    assert torch.count_nonzero(sparse.blocks.grad[padding]) == 0
    if reference.bias is not None:
        torch.testing.assert_close(sparse.bias.grad.float(), reference.bias.grad.float(), **tolerance)
    return sparse


@pytest.mark.parametrize("block", [16, 32, 64])
@pytest.mark.parametrize("kept", [0.0, 0.1, 0.5, 1.0])
def test_linear_matches_dense_masked(block, kept, compute_path):
    torch.manual_seed(0)
    layer = nn.Linear(96, 80)  # 96 and 80 are not multiples of 64 (and 80 not of 32): partial edge blocks
    check_against_dense(layer, torch.randn(7, 96), kept, block, kernel=compute_path)


def test_linear_with_empty_block_rows_and_columns_and_no_bias():
    torch.manual_seed(1)
    layer = nn.Linear(64, 48, bias=False)
    grid = block_grid(layer.weight.shape, 16)
    block_mask = torch.ones(grid.grid, dtype=torch.bool)
    block_mask[1] = False  # an empty block row
    block_mask[:, 2] = False  # an empty block column
    sparse = block_sparse_from_dense(layer, 16, block_mask)
    x = torch.randn(5, 3, 64)  # extra leading dimensions
    expected = F.linear(x, layer.weight * grid.expand(block_mask))
    torch.testing.assert_close(sparse(x), expected, **FP32)
    assert torch.count_nonzero(sparse(x)[..., 16:32]) == 0


CONVS = [  # the model's shapes: stem, 3x3 at dilation 1/2/4 with matching padding, 1x1 stride-2 shortcut, heads
    dict(in_channels=3, out_channels=20, kernel_size=7, stride=2, padding=3),
    dict(in_channels=24, out_channels=40, kernel_size=3, stride=1, padding=1),
    dict(in_channels=24, out_channels=40, kernel_size=3, stride=2, padding=1),
    dict(in_channels=32, out_channels=32, kernel_size=3, padding=2, dilation=2),
    dict(in_channels=32, out_channels=48, kernel_size=3, padding=4, dilation=4),
    dict(in_channels=24, out_channels=40, kernel_size=1, stride=2),
]


def force_dense_above(monkeypatch, kept_fraction: float) -> None:
    """Make every layer take the dense-scratch branch (0.0) or the block kernels (1.0)."""
    from dsparse.sparsity.block import layers as block_layers

    limits = {"linear": kept_fraction, "conv": kept_fraction}
    monkeypatch.setattr(block_layers, "DENSE_ABOVE", {"torch": limits, "cpu": limits})


@pytest.fixture(params=["dense-scratch", "gathered", "cpu", "triton"])
def compute_path(request, monkeypatch):
    """Run a test through the PyTorch path's dense-scratch branch (every kept fraction) or
    its per-block branch, through the compiled CPU kernels (per-block at every kept
    fraction), or through the Triton kernels (CPU: Triton's interpreter); the value is the
    ``sparsity.kernel`` to build layers with."""
    if request.param == "triton":
        pytest.importorskip("dsparse.kernels.ops", reason="Triton is not installed")
        return "triton"
    if request.param == "cpu":
        from dsparse.kernels import cpu

        if not cpu.available():
            pytest.skip(f"the compiled CPU kernels do not run here: {cpu.unavailable_reason()}")
        force_dense_above(monkeypatch, 1.0)
        return "cpu"
    force_dense_above(monkeypatch, 0.0 if request.param == "dense-scratch" else 1.0)
    return "torch"


@pytest.mark.parametrize("params", CONVS, ids=lambda p: "k{kernel_size}s{stride}d{dilation}".format(
    **{"stride": 1, "dilation": 1, **p}))
@pytest.mark.parametrize("kept", [0.0, 0.1, 0.5, 1.0])
def test_conv_matches_dense_masked(params, kept, compute_path):
    torch.manual_seed(2)
    layer = nn.Conv2d(**params)
    check_against_dense(layer, torch.randn(2, params["in_channels"], 13, 11), kept, 16, kernel=compute_path)


@pytest.mark.parametrize("block", [32, 64])
def test_conv_blocks_32_and_64(block, compute_path):
    torch.manual_seed(3)
    layer = nn.Conv2d(40, 72, 3, padding=1, bias=False)
    check_against_dense(layer, torch.randn(2, 40, 9, 9), 0.5, block, kernel=compute_path)


@pytest.mark.parametrize("make_layer", [lambda: nn.Linear(80, 72), lambda: nn.Conv2d(24, 40, 3, padding=2, dilation=2)],
                         ids=["linear", "conv"])
def test_bf16_matches_dense_masked(make_layer, compute_path):
    torch.manual_seed(4)
    layer = make_layer()  # a fresh layer per case: the check converts it and accumulates its gradients
    shape = (6, 80) if isinstance(layer, nn.Linear) else (2, 24, 9, 9)
    if compute_path == "cpu":  # the compiled kernels are fp32: asked for by name, bf16 is refused, not rerouted
        with pytest.raises(ValueError, match="sparsity.kernel=cpu cannot run here: they take float32"):
            check_against_dense(layer, torch.randn(shape), 0.5, 16, dtype=torch.bfloat16, kernel=compute_path)
        return
    check_against_dense(layer, torch.randn(shape), 0.5, 16, dtype=torch.bfloat16,
                        tolerance={"rtol": 5e-2, "atol": 5e-2}, kernel=compute_path)


@pytest.mark.parametrize("dense_above", [0.0, 1.0], ids=["dense-scratch", "gathered"])
def test_gradcheck_float64(monkeypatch, dense_above):
    force_dense_above(monkeypatch, dense_above)
    torch.manual_seed(5)
    linear = nn.Linear(20, 18).double()
    sparse = block_sparse_from_dense(linear, 16, torch.tensor([[True, False], [True, True]]))
    x = torch.randn(3, 20, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, blocks, bias: _call(sparse, x, blocks, bias),
                                    (x, sparse.blocks, sparse.bias))
    conv = nn.Conv2d(5, 17, 3, stride=2, padding=2, dilation=2).double()
    x = torch.randn(2, 5, 7, 6, dtype=torch.float64, requires_grad=True)
    # every block column used; then column 1 unused (the gathered path's im2col skips it)
    for block_mask in ([[True, False, True], [False, True, True]], [[True, False, False], [False, False, True]]):
        sparse = block_sparse_from_dense(conv, 16, torch.tensor(block_mask))
        assert torch.autograd.gradcheck(lambda x, blocks, bias: _call(sparse, x, blocks, bias),
                                        (x, sparse.blocks, sparse.bias))


def _call(layer, x, blocks, bias):
    saved = layer.blocks, layer.bias
    layer.blocks, layer.bias = blocks, bias
    try:
        return layer(x)
    finally:
        layer.blocks, layer.bias = saved


def test_probe_gets_the_dense_weight_gradient_only_when_set(compute_path):
    torch.manual_seed(6)
    device = "cuda" if compute_path == "triton" and torch.cuda.is_available() else "cpu"
    conv = nn.Conv2d(20, 24, 3, padding=1).to(device)
    block_mask = random_block_mask(block_grid(conv.weight.shape, 16).grid, 0.5)
    sparse = block_sparse_from_dense(conv, 16, block_mask, compute_path)
    x = torch.randn(2, 20, 6, 6, device=device)
    sparse.probe = sparse.new_probe()
    sparse(x).square().sum().backward()
    reference = nn.Conv2d(20, 24, 3, padding=1).to(device)
    with torch.no_grad():
        reference.weight.copy_(sparse.dense_weight())
        reference.bias.copy_(sparse.bias)
    reference(x).square().sum().backward()
    torch.testing.assert_close(sparse.probe.grad, reference.weight.grad, **FP32)
    sparse.probe = None
    sparse.blocks.grad = None
    sparse(x).sum().backward()
    assert sparse.blocks.grad is not None


def test_layout_matches_a_python_reference_and_follows_a_mask_change():
    block_mask = random_block_mask((5, 7), 0.4, seed=7)
    layout = BlockLayout.from_mask(block_mask)
    kept = [(r, c) for r in range(5) for c in range(7) if block_mask[r, c]]
    assert list(zip(layout.slot_rows.tolist(), layout.slot_cols.tolist())) == kept
    for r in range(5):
        slots = layout.row_slots[layout.row_ptr[r]:layout.row_ptr[r + 1]]
        assert [int(layout.slot_cols[s]) for s in slots] == [c for rr, c in kept if rr == r]
    for c in range(7):
        slots = layout.col_slots[layout.col_ptr[c]:layout.col_ptr[c + 1]]
        assert [int(layout.slot_rows[s]) for s in slots] == [r for r, cc in kept if cc == c]
    assert torch.equal(layout.mask(), block_mask)
    new_mask = block_mask.clone()
    first, last = kept[0], kept[-1]
    new_mask[first], new_mask[last] = False, False
    free = (~block_mask).nonzero()[:2]
    new_mask[free[0][0], free[0][1]] = new_mask[free[1][0], free[1][1]] = True
    moved, grown = layout.reassign(new_mask)
    assert torch.equal(moved.mask(), new_mask)
    assert grown.tolist() == [i in (0, len(kept) - 1) for i in range(len(kept))], "surviving blocks keep their slots"
    with pytest.raises(ValueError, match="number of blocks"):
        layout.reassign(torch.ones(5, 7, dtype=torch.bool))


def test_geometry_orders_taps_outer_channels_inner_and_round_trips():
    weight = torch.arange(2 * 3 * 2 * 2).reshape(2, 3, 2, 2).float()
    grid = block_grid(weight.shape, 16)
    gemm = grid.to_gemm(weight)
    assert gemm.shape == (2, 12)
    assert gemm[0, :3].tolist() == weight[0, :, 0, 0].tolist()  # tap (0, 0): all channels first
    assert gemm[0, 3:6].tolist() == weight[0, :, 0, 1].tolist()
    assert torch.equal(grid.from_gemm(gemm), weight)
    block_mask = torch.tensor([[True]])
    assert torch.equal(grid.reduce(grid.expand(block_mask)), block_mask)
    mixed = torch.ones_like(weight, dtype=torch.bool)
    mixed[0, 0, 0, 0] = False
    assert grid.reduce(mixed) is None
    assert int(block_grid((40, 24), 16).block_sizes().sum()) == 40 * 24


def test_linear_layer_swap_keeps_repr_and_rejects_grouped_conv():
    with pytest.raises(ValueError, match="groups=1"):
        block_sparse_from_dense(nn.Conv2d(4, 4, 3, groups=2), 16, torch.ones(1, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="must be one of"):
        block_grid((8, 8), 8)
    sparse = BlockSparseLinear(40, 20, 16, torch.ones(2, 3, dtype=torch.bool))
    assert "kept_blocks=6/6" in repr(sparse)
    assert isinstance(block_sparse_from_dense(nn.Conv2d(3, 8, 3), 16, torch.ones(1, 1, dtype=torch.bool)),
                      BlockSparseConv2d)


@pytest.mark.parametrize("dense_above", [0.0, 1.0], ids=["dense-scratch", "gathered"])
@pytest.mark.parametrize("kept", [0.1, 0.5])
def test_both_compute_paths_match_dense_masked(monkeypatch, dense_above, kept):
    """The dense-scratch path (high kept fractions) and the gathered path give the same results."""
    force_dense_above(monkeypatch, dense_above)
    torch.manual_seed(8)
    check_against_dense(nn.Linear(96, 80), torch.randn(5, 96), kept, 16)
    check_against_dense(nn.Conv2d(24, 40, 3, padding=2, dilation=2), torch.randn(2, 24, 7, 7), kept, 16)


def test_partial_im2col_holds_exactly_the_used_block_columns():
    """The gathered conv path copies only block columns some kept block reads (runs of one
    tap's channels, also where a block column covers parts of two taps), with the edge
    block's rows past ``K`` zero."""
    torch.manual_seed(9)
    conv = nn.Conv2d(24, 8, 3, padding=2, dilation=2)  # K = 216: 14 block columns of 16, the last 8 wide
    block_mask = torch.zeros(1, 14, dtype=torch.bool)
    block_mask[0, [0, 2, 3, 13]] = True  # tap 0 channels 0-15, tap 1 channels 8-23 and tap 2 0-7, tap 8 16-23
    sparse = block_sparse_from_dense(conv, 16, block_mask)
    x = torch.randn(2, 24, 7, 6)
    full = sparse.im2col(x).reshape(14 * 16, -1)
    used, _ = sparse.layout().compact()
    assert used.tolist() == [0, 2, 3, 13]
    partial = sparse.im2col(x, used).reshape(4 * 16, -1)
    expected = full.reshape(14, 16, -1)[used].reshape(4 * 16, -1)
    torch.testing.assert_close(partial, expected, rtol=0, atol=0)
    assert torch.count_nonzero(partial[-8:]) == 0


TAP_ALIGNED_CONVS = [  # in_channels a multiple of the block (16), or 1x1: the Triton kernels' implicit GEMM
    dict(in_channels=32, out_channels=40, kernel_size=3, stride=1, padding=1),
    dict(in_channels=32, out_channels=40, kernel_size=3, stride=2, padding=1),
    dict(in_channels=16, out_channels=24, kernel_size=3, padding=2, dilation=2),
    dict(in_channels=32, out_channels=20, kernel_size=3, padding=4, dilation=4),
    dict(in_channels=24, out_channels=40, kernel_size=1, stride=2),
]


def implicit_gemm_kernel(kernel: str, monkeypatch) -> str:
    """Skip where ``kernel``'s implicit GEMM cannot run; for ``cpu``, make any im2col an error
    (a tap-aligned convolution must not build one)."""
    if kernel == "triton":
        pytest.importorskip("dsparse.kernels.ops", reason="Triton is not installed")
        return kernel
    from dsparse.kernels import cpu

    if not cpu.available():
        pytest.skip(f"the compiled CPU kernels do not run here: {cpu.unavailable_reason()}")
    force_dense_above(monkeypatch, 1.0)

    def no_im2col(self, x, used=None):
        if self.in_channels % self.block == 0:
            raise AssertionError("a tap-aligned convolution built an im2col")
        return original(self, x, used)

    original = BlockSparseConv2d.im2col
    monkeypatch.setattr(BlockSparseConv2d, "im2col", no_im2col)
    return kernel


@pytest.mark.parametrize("params", TAP_ALIGNED_CONVS, ids=lambda p: "c{in_channels}k{kernel_size}s{stride}d{dilation}"
                         .format(**{"stride": 1, "dilation": 1, **p}))
@pytest.mark.parametrize("kept", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("kernel", ["cpu", "triton"])
def test_implicit_gemm_conv_matches_dense_masked(params, kept, kernel, monkeypatch):
    """Forward, dX (implicit dgrad: every input position gathers its taps' output gradients)
    and dW of the implicit-GEMM kernels (compiled CPU and Triton), including stride 2 (input
    positions no tap reaches)."""
    kernel = implicit_gemm_kernel(kernel, monkeypatch)
    torch.manual_seed(12)
    layer = nn.Conv2d(**params)
    check_against_dense(layer, torch.randn(2, params["in_channels"], 9, 7), kept, 16, kernel=kernel)


@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 5e-2), (torch.float16, 1e-2)], ids=["bf16", "fp16"])
def test_triton_conv_half_precision(dtype, tolerance):
    pytest.importorskip("dsparse.kernels.ops", reason="Triton is not installed")
    torch.manual_seed(13)
    layer = nn.Conv2d(32, 40, 3, stride=2, padding=1)
    check_against_dense(layer, torch.randn(2, 32, 9, 9), 0.5, 32, dtype=dtype,
                        tolerance={"rtol": tolerance, "atol": tolerance}, kernel="triton")


@pytest.mark.parametrize("block", [32, 64])
@pytest.mark.parametrize("kernel", ["cpu", "triton"])
def test_implicit_gemm_conv_blocks_32_and_64(block, kernel, monkeypatch):
    kernel = implicit_gemm_kernel(kernel, monkeypatch)
    torch.manual_seed(14)
    check_against_dense(nn.Conv2d(64, 72, 3, stride=2, padding=1), torch.randn(2, 64, 7, 6), 0.5, block,
                        kernel=kernel)


@pytest.mark.parametrize("params", [dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2, padding=1),
                                    dict(kernel_size=1), dict(kernel_size=1, stride=2)],
                         ids=["k3", "k3s2", "k1", "k1s2"])
def test_compiled_convs_keep_activations_and_gradients_channels_last(params, monkeypatch):
    """A channels-last input (and gradient) flows through the compiled implicit GEMM without
    a layout copy: output and input gradient are channels-last, the values those of the
    dense masked convolution, and 1x1 convolutions run it too (no im2col)."""
    implicit_gemm_kernel("cpu", monkeypatch)
    torch.manual_seed(15)
    layer = nn.Conv2d(32, 48, **params)
    x = torch.randn(2, 32, 9, 8).to(memory_format=torch.channels_last)
    sparse = check_against_dense(layer, x, 0.5, 16, kernel="cpu")
    x_sparse = x.clone().requires_grad_()
    out = sparse(x_sparse)
    assert out.is_contiguous(memory_format=torch.channels_last)
    out.backward(torch.randn_like(out))
    assert x_sparse.grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("stride", [1, 2])
def test_a_dense_scratch_1x1_conv_of_a_channels_last_input_is_one_gemm(stride, monkeypatch):
    """A 1x1 layer keeping most blocks after a compiled conv runs as a GEMM over the
    channels-last pixels: the dense masked convolution's values and gradients, no
    F.conv2d, channels-last out."""
    force_dense_above(monkeypatch, 0.0)
    torch.manual_seed(17)
    layer = nn.Conv2d(32, 48, 1, stride=stride, bias=True)
    x = torch.randn(2, 32, 7, 6).to(memory_format=torch.channels_last)
    sparse = check_against_dense(layer, x, 0.75, 16, kernel="cpu")
    monkeypatch.setattr(F, "conv2d", lambda *args, **kwargs: pytest.fail("F.conv2d ran"))
    out = sparse(x.clone().requires_grad_())
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_a_dense_scratch_conv_hands_onednn_nchw_after_a_channels_last_layer(monkeypatch):
    """A layer keeping most blocks runs F.conv2d: a channels-last input (the output of a
    compiled conv before it) is made NCHW first, the layout whose weight gradient oneDNN
    computes without the heap corruption seen on channels-last inputs."""
    force_dense_above(monkeypatch, 0.0)
    torch.manual_seed(16)
    layer = nn.Conv2d(32, 32, 3, padding=1)
    x = torch.randn(2, 32, 6, 6).to(memory_format=torch.channels_last)
    sparse = check_against_dense(layer, x, 1.0, 16, kernel="cpu")
    seen = []
    original = F.conv2d

    def recording_conv2d(x, *args, **kwargs):
        seen.append(x.is_contiguous())
        return original(x, *args, **kwargs)

    monkeypatch.setattr(F, "conv2d", recording_conv2d)
    sparse(x.clone().requires_grad_()).sum().backward()
    assert seen == [True]
