"""Compiled CPU block-sparse kernels (``block_sparse.cpp``: AVX2 + FMA, fp32), built at first use.

Why compiled: the PyTorch path issues one BLAS call per kept block, and a ``[M, 32] x
[32, 32]`` call runs at a fraction of the dense GEMM's FLOP rate, which bounds its speed-up
near 3x however sparse the layer. These kernels keep an output tile in registers while a
block row's (or column's) kept blocks stream past it, so they run near the dense rate on
the kept blocks only; 3x3 convolutions run as implicit GEMM, without an im2col.

Built with the system C++ compiler through ``torch.utils.cpp_extension`` the first time a
layer needs them, into ``$DSPARSE_KERNEL_CACHE`` (default ``~/.cache/dsparse/kernels``)
under a key of the source, the compiler flags, torch's version, the machine and its CPU
capability, so a home directory shared by different machines keeps one build per kind.
Ranks or Ray workers that start together build once and the others wait: each holds an
``flock`` on ``.build.lock`` around the build, which the kernel drops however its holder
ends (unlike ``dsparse.locks``, which refuses a second holder, a build waits for the
first). ``cpp_extension``'s own lock file is removed under it first, because a build
killed mid-way leaves that file behind and every later process would wait for it forever.
Where the CPU lacks AVX2 or the build fails, dsparse logs one warning and the layers run
the PyTorch path (``dsparse.sparsity.block.gemm``), which stays the reference.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import platform
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["available", "block_conv", "block_conv_forward", "block_conv_input_grad", "block_conv_weight_grad", "block_spmm",
           "block_weight_grad", "unavailable_reason"]

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("block_sparse.cpp")
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp"]
BLOCKS = (16, 32, 64)
"""Block sizes the kernels take (multiples of their 16-lane tile; 16, 32 and 64 are tested)."""

_STATE: dict[str, object] = {}


def cache_dir() -> Path:
    """The build directory for this source, flag set, torch and machine kind."""
    root = Path(os.environ.get("DSPARSE_KERNEL_CACHE", Path.home() / ".cache" / "dsparse" / "kernels"))
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode()).hexdigest()[:16]
    kind = f"{platform.machine()}-{torch.backends.cpu.get_cpu_capability().lower()}-torch{torch.__version__}"
    return root / f"{kind}-{digest}".replace("+", "_")


def _build() -> str | None:
    """Build (or load the cached build of) the kernels; ``None``, or why they cannot run."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"they are written for x86-64 and this machine is {platform.machine()}"
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return f"this CPU lacks AVX2 (torch reports {torch.backends.cpu.get_cpu_capability()})"
    from torch.utils import cpp_extension

    directory = cache_dir()
    name = "dsparse_block_cpu_" + directory.name.rsplit("-", 1)[-1]
    fresh = not any(directory.glob("*.so"))
    if fresh:
        log.info("compiling dsparse's CPU block-sparse kernels into %s (once per machine kind, about 20 s)",
                 directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / ".build.lock", "a") as build_lock:
            fcntl.flock(build_lock, fcntl.LOCK_EX)  # waits for a build in another process; dropped at exit
            (directory / "lock").unlink(missing_ok=True)  # cpp_extension's, left by a killed build
            cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"],
                               build_directory=str(directory), is_python_module=False, verbose=False)
    except Exception as error:  # no compiler, no ninja, an unwritable cache, a failed build: fall back, said once
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return f"building them failed ({first_line})"
    _register_fakes()
    return None


def unavailable_reason() -> str | None:
    """``None`` when the kernels run here, else why not (tried once per process)."""
    if "reason" not in _STATE:
        _STATE["reason"] = _build()
        if _STATE["reason"] is not None:
            log.warning("dsparse CPU block-sparse kernels unavailable: %s; block-sparse layers use the PyTorch "
                        "path (slower; the same results up to float rounding)", _STATE["reason"])
    return _STATE["reason"]  # type: ignore[return-value]


def available() -> bool:
    """Whether the compiled kernels run on this machine (builds them on the first call)."""
    return unavailable_reason() is None


def runs(dtype: torch.dtype, block: int) -> bool:
    """Whether the kernels take this dtype and block size (fp32, ``BLOCKS``)."""
    return dtype == torch.float32 and block in BLOCKS


def block_spmm(a: Tensor, values: Tensor, ptr: Tensor, slots: Tensor, index: Tensor, transpose_blocks: bool,
               column_major_out: bool) -> Tensor:
    """``out[:, j] = sum_e a[:, index[slot_e]] @ op(values[slot_e])`` over the entries
    ``ptr[j]:ptr[j + 1]`` of ``slots``, in block slabs; ``op`` transposes when asked.
    The forward pass walks block rows with ``op = transpose``, dX walks block columns."""
    _require()
    return torch.ops.dsparse_cpu.block_spmm(a, values, ptr, slots, index, transpose_blocks, column_major_out)


def block_weight_grad(dy: Tensor, x: Tensor, row_ptr: Tensor, row_slots: Tensor, slot_cols: Tensor,
                      block: int) -> Tensor:
    """``dW_s = dy[:, r]^T @ x[:, slot_cols[s]]`` for every slot ``s`` of block row ``r``
    (the layout's row CSR), ``[S, B, B]``."""
    _require()
    return torch.ops.dsparse_cpu.block_weight_grad(dy, x, row_ptr, row_slots, slot_cols, block)


def block_conv_forward(x_nhwc: Tensor, values: Tensor, row_ptr: Tensor, row_slots: Tensor, slot_cols: Tensor,
                       kernel_size, stride, padding, dilation) -> Tensor:
    """``Y [N * Ho * Wo, R * B]`` (channels-last rows) of the block-sparse convolution of a
    channels-last ``x [N, H, W, C]``, ``C`` a multiple of the block: implicit GEMM, no im2col."""
    _require()
    return torch.ops.dsparse_cpu.block_conv_forward(x_nhwc, values, row_ptr, row_slots, slot_cols, list(kernel_size),
                                                    list(stride), list(padding), list(dilation))


def block_conv_input_grad(dy: Tensor, values: Tensor, col_ptr: Tensor, col_slots: Tensor, slot_rows: Tensor,
                          x_shape_nhwc, kernel_size, stride, padding, dilation) -> Tensor:
    """``dX [N, H, W, C]`` (channels last) from ``dy [N * Ho * Wo, R * B]``."""
    _require()
    return torch.ops.dsparse_cpu.block_conv_input_grad(dy, values, col_ptr, col_slots, slot_rows, list(x_shape_nhwc),
                                                       list(kernel_size), list(stride), list(padding), list(dilation))


def block_conv_weight_grad(dy: Tensor, x_nhwc: Tensor, row_ptr: Tensor, row_slots: Tensor, slot_cols: Tensor,
                           block: int, kernel_size, stride, padding, dilation) -> Tensor:
    """``dW [S, B, B]`` of the kept blocks of the block-sparse convolution."""
    _require()
    return torch.ops.dsparse_cpu.block_conv_weight_grad(dy, x_nhwc, row_ptr, row_slots, slot_cols, block,
                                                        list(kernel_size), list(stride), list(padding),
                                                        list(dilation))


def block_conv(x: Tensor, values: Tensor, row_ptr: Tensor, row_slots: Tensor, slot_cols: Tensor, col_ptr: Tensor,
               col_slots: Tensor, slot_rows: Tensor, out_channels: int, kernel_size, stride, padding,
               dilation) -> Tensor:
    """The differentiable block-sparse convolution of ``x [N, C, H, W]`` (any memory format),
    ``[N, out_channels, Ho, Wo]`` in channels-last memory: ``block_conv_forward`` forward,
    ``block_conv_input_grad`` and ``block_conv_weight_grad`` backward, the autograd node in
    C++ (a Python ``autograd.Function`` cost more per call than a small layer's kernels).
    Takes the layout's row walk (forward, dW) and column walk (dX)."""
    _require()
    return torch.ops.dsparse_cpu.block_conv(x, values, row_ptr, row_slots, slot_cols, col_ptr, col_slots, slot_rows,
                                            out_channels, kernel_size, stride, padding, dilation)


def _require() -> None:
    if (reason := unavailable_reason()) is not None:
        raise RuntimeError(f"dsparse's CPU block-sparse kernels cannot run here: {reason}; use sparsity.kernel=torch")


_FAKES: list[bool] = []


def _register_fakes() -> None:
    """Shapes for tracing (``torch.compile``, meta tensors); registered once per process."""
    if _FAKES:
        return
    _FAKES.append(True)

    @torch.library.register_fake("dsparse_cpu::block_spmm")
    def _(a, values, ptr, slots, index, transpose_blocks, column_major_out):
        width = (ptr.shape[0] - 1) * values.shape[1]
        return a.new_empty(width, a.shape[0]).t() if column_major_out else a.new_empty(a.shape[0], width)

    @torch.library.register_fake("dsparse_cpu::block_weight_grad")
    def _(dy, x, row_ptr, row_slots, slot_cols, block):
        return x.new_empty(slot_cols.shape[0], block, block)

    @torch.library.register_fake("dsparse_cpu::block_conv_forward")
    def _(x, values, row_ptr, row_slots, slot_cols, kernel_size, stride, padding, dilation):
        batch, height, width, _ = x.shape
        out_h = (height + 2 * padding[0] - dilation[0] * (kernel_size[0] - 1) - 1) // stride[0] + 1
        out_w = (width + 2 * padding[1] - dilation[1] * (kernel_size[1] - 1) - 1) // stride[1] + 1
        return x.new_empty(batch * out_h * out_w, (row_ptr.shape[0] - 1) * values.shape[1])

    @torch.library.register_fake("dsparse_cpu::block_conv")
    def _(x, values, row_ptr, row_slots, slot_cols, col_ptr, col_slots, slot_rows, out_channels, kernel_size, stride,
          padding, dilation):
        batch, _, height, width = x.shape
        out_h = (height + 2 * padding[0] - dilation[0] * (kernel_size[0] - 1) - 1) // stride[0] + 1
        out_w = (width + 2 * padding[1] - dilation[1] * (kernel_size[1] - 1) - 1) // stride[1] + 1
        return x.new_empty(batch, out_h, out_w, out_channels).permute(0, 3, 1, 2)

    @torch.library.register_fake("dsparse_cpu::block_conv_input_grad")
    def _(dy, values, col_ptr, col_slots, slot_rows, x_shape, kernel_size, stride, padding, dilation):
        return dy.new_empty(x_shape)

    @torch.library.register_fake("dsparse_cpu::block_conv_weight_grad")
    def _(dy, x, row_ptr, row_slots, slot_cols, block, kernel_size, stride, padding, dilation):
        return x.new_empty(slot_cols.shape[0], block, block)
