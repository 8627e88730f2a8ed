"""The compiled CPU block-sparse kernels (``dsparse.kernels.cpu``) against float64 dense
references, operator by operator: every block size, kept fractions 0/10/50/100%, empty
block rows and columns, row- and column-major and strided operands, M not a multiple of
the register tile. Layers built on them are checked in ``tests/sparsity/test_block_layers.py``.

Tolerance: ``1e-4`` relative to the reference's largest magnitude (fp32 products summed in
another order; dW sums over up to a few hundred rows).
"""

from __future__ import annotations

import pytest
import torch

from dsparse.kernels import cpu, resolve_kernel
from dsparse.sparsity.block.layout import BlockLayout


def needs_kernels():
    if not cpu.available():
        pytest.skip(f"the compiled CPU kernels do not run here: {cpu.unavailable_reason()}")


def dense_of(values: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    rows, cols = layout.grid
    block = values.shape[1]
    tiles = torch.zeros(rows, cols, block, block, dtype=torch.float64)
    tiles[layout.slot_rows, layout.slot_cols] = values.double()
    return tiles.permute(0, 2, 1, 3).reshape(rows * block, cols * block)


def close(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert got.shape == expected.shape
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(got.double() / scale, expected / scale, rtol=1e-4, atol=1e-4)


def layout_of(grid, kept: float, seed: int) -> BlockLayout:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(grid, generator=generator) < kept
    mask[0] = False  # an empty block row
    mask[:, -1] = False  # and an empty block column
    return BlockLayout.from_mask(mask)


ORIENTATIONS = {
    "row-major": lambda t: t.contiguous(),
    "column-major": lambda t: t.t().contiguous().t(),
    "strided": lambda t: torch.cat([t, torch.zeros_like(t)], 1)[:, :t.shape[1]],  # row stride past the width
}


@pytest.mark.parametrize("block", cpu.BLOCKS)
@pytest.mark.parametrize("kept", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("orientation", list(ORIENTATIONS))
@pytest.mark.parametrize("m", [1, 7, 70])
def test_forward_input_and_weight_gradients_match_float64(block, kept, orientation, m):
    needs_kernels()
    layout = layout_of((4, 3), kept, seed=block + m)
    generator = torch.Generator().manual_seed(m)
    values = torch.randn(layout.num_slots, block, block, generator=generator)
    weight = dense_of(values, layout)
    arrange = ORIENTATIONS[orientation]
    x = arrange(torch.randn(m, 3 * block, generator=generator))
    dy = arrange(torch.randn(m, 4 * block, generator=generator))
    for column_major_out in (False, True):
        y = cpu.block_spmm(x, values, layout.row_ptr, layout.row_slots, layout.slot_cols, True, column_major_out)
        assert y.shape == (m, 4 * block) and (y.stride(0) == 1 if column_major_out else y.stride(1) == 1)
        close(y, x.double() @ weight.t())
        dx = cpu.block_spmm(dy, values, layout.col_ptr, layout.col_slots, layout.slot_rows, False, column_major_out)
        close(dx, dy.double() @ weight)
    dvalues = cpu.block_weight_grad(dy, x, layout.row_ptr, layout.row_slots, layout.slot_cols, block)
    tiles = (dy.double().t() @ x.double()).reshape(4, block, 3, block).permute(0, 2, 1, 3)
    close(dvalues, tiles[layout.slot_rows, layout.slot_cols])


def test_weight_gradient_splits_long_reductions_over_threads():
    """dW over M rows is split over threads into private copies summed at the end: the sum
    must not depend on the thread count beyond rounding."""
    needs_kernels()
    layout = layout_of((3, 3), 0.6, seed=1)
    values = torch.randn(layout.num_slots, 32, 32)
    x, dy = torch.randn(1000, 96), torch.randn(1000, 96)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            results.append(cpu.block_weight_grad(dy, x, layout.row_ptr, layout.row_slots, layout.slot_cols, 32))
    finally:
        torch.set_num_threads(threads)
    tiles = (dy.double().t() @ x.double()).reshape(3, 32, 3, 32).permute(0, 2, 1, 3)[layout.slot_rows, layout.slot_cols]
    for result in results:
        close(result, tiles)


def test_bad_operands_are_refused_with_a_message():
    needs_kernels()
    layout = layout_of((2, 2), 1.0, seed=0)
    values = torch.randn(layout.num_slots, 16, 16)
    with pytest.raises(RuntimeError, match="float32 CPU tensors"):
        cpu.block_spmm(torch.randn(4, 32, dtype=torch.float64), values, layout.row_ptr, layout.row_slots,
                       layout.slot_cols, True, False)
    with pytest.raises(RuntimeError, match="not a whole number of blocks"):
        cpu.block_spmm(torch.randn(4, 30), values, layout.row_ptr, layout.row_slots, layout.slot_cols, True, False)


def test_cpu_kernels_that_cannot_build_fall_back_once_under_auto_and_refuse_by_name(monkeypatch, caplog):
    """No compiler (or no AVX2): ``auto`` logs one warning and runs the PyTorch path; an
    explicit ``cpu`` is a one-line error naming the reason."""
    monkeypatch.setattr(cpu, "_STATE", {})
    monkeypatch.setattr(cpu, "_build", lambda: "building them failed (c++: command not found)")
    with caplog.at_level("WARNING", logger="dsparse.kernels.cpu"):
        assert resolve_kernel("auto", "cpu") == "torch"
        assert resolve_kernel("auto", "cpu") == "torch"
    assert sum("kernels unavailable" in record.message for record in caplog.records) == 1
    with pytest.raises(ValueError, match=r"sparsity.kernel=cpu cannot run here: building them failed \(c\+\+"):
        resolve_kernel("cpu", "cpu")
    with pytest.raises(ValueError, match="they run on the CPU and the model is on cuda"):
        resolve_kernel("cpu", "cuda")
    with pytest.raises(ValueError, match="they take float32"):
        monkeypatch.setattr(cpu, "_STATE", {"reason": None})
        resolve_kernel("cpu", "cpu", torch.bfloat16)


def test_a_build_is_cached_per_source_and_machine_kind(tmp_path, monkeypatch):
    """The cache key names the machine kind and changes with the source."""
    monkeypatch.setenv("DSPARSE_KERNEL_CACHE", str(tmp_path))
    first = cpu.cache_dir()
    assert first.parent == tmp_path and first.name.startswith(f"{__import__('platform').machine()}-")
    source = tmp_path / "block_sparse.cpp"
    source.write_text(cpu.SOURCE.read_text() + "\n// changed\n")
    monkeypatch.setattr(cpu, "SOURCE", source)
    assert cpu.cache_dir() != first


def test_a_build_killed_mid_way_does_not_hang_the_next_process(tmp_path):
    """A killed build leaves cpp_extension's ``lock`` file in the build directory; the next
    process must not wait for it forever (it did, in this session, with DeepSpeed's op)."""
    import shutil
    import subprocess
    import sys

    if not cpu.available():
        pytest.skip(f"the compiled CPU kernels do not run here: {cpu.unavailable_reason()}")
    built = cpu.cache_dir()
    copy = tmp_path / built.name
    shutil.copytree(built, copy)
    (copy / "lock").write_text("")  # as a build killed mid-way leaves it
    code = "from dsparse.kernels import cpu; print(cpu.available(), cpu.unavailable_reason())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180,
                          env={**__import__("os").environ, "DSPARSE_KERNEL_CACHE": str(tmp_path)})
    assert done.stdout.split()[:2] == ["True", "None"], done.stderr[-2000:]
    assert not (copy / "lock").exists()
