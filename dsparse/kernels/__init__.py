"""Block-sparse kernels: the bottom layer of kernel -> op -> layer.

``block_sparse`` holds the Triton kernels, ``ops`` registers them as ``torch.library``
operators; ``cpu`` builds and loads the compiled CPU kernels; ``dsparse.sparsity.block.gemm``
is the op over the CPU kernels and the PyTorch path beside them, and
``dsparse.sparsity.block.layers`` the layers that pick one (``resolve_kernel``).
Triton is imported only when a layer runs the Triton kernels, and the CPU kernels are
built only when a layer first runs them, so the rest of dsparse works without either.
"""

from __future__ import annotations

import os
from typing import Literal, get_args

import torch

from dsparse.kernels import cpu

Kernel = Literal["auto", "cpu", "triton", "torch"]
"""Values of ``sparsity.kernel``: auto (Triton on CUDA; on the CPU the compiled kernels
for fp32 and blocks of 16, 32 or 64 where they build, else the PyTorch path), cpu (always
the compiled CPU kernels), triton (always the Triton kernels), torch (always the PyTorch
path, the reference)."""
KERNELS: tuple[str, ...] = get_args(Kernel)


_TRITON_IMPORTS: list[bool] = []


def triton_available() -> bool:
    """Whether Triton can be imported (kernels then run on GPU, or on CPU with TRITON_INTERPRET=1);
    tried once (a plain list, not ``functools.cache``, so ``torch.compile`` traces it)."""
    if not _TRITON_IMPORTS:
        try:
            import triton  # noqa: F401
        except ImportError:
            _TRITON_IMPORTS.append(False)
        else:
            _TRITON_IMPORTS.append(True)
    return _TRITON_IMPORTS[0]


def interpreting() -> bool:
    """Whether Triton runs its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on")  # as Triton reads it


def resolve_kernel(requested: str, device: torch.device | str, dtype: torch.dtype = torch.float32,
                   block: int = 32) -> str:
    """``"triton"``, ``"cpu"`` or ``"torch"``: which implementation block-sparse layers of
    ``block`` run on ``device`` for ``dtype``.

    Raises:
        ValueError: an unknown value, or a kernel asked for where it cannot run (``triton``
            with no CUDA device and no interpreter, or no Triton; ``cpu`` off the CPU, for
            another dtype or block size, or where the kernels do not build), with what to do.
    """
    if requested not in KERNELS:
        raise ValueError(f"sparsity.kernel must be one of {', '.join(KERNELS)}; got {requested}")
    device_type = torch.device(device).type
    if requested == "torch":
        return "torch"
    if requested == "cpu":
        _check_cpu_kernels(device_type, dtype, block)
        return "cpu"
    runnable = triton_available() and (device_type == "cuda" or (device_type == "cpu" and interpreting()))
    if requested == "triton" and not runnable:
        reason = ("Triton is not installed" if not triton_available()
                  else f"the model is on {device_type}, and Triton kernels need a CUDA device")
        raise ValueError(f"sparsity.kernel=triton cannot run here: {reason}; use sparsity.kernel=auto (Triton on "
                         "CUDA, compiled or PyTorch kernels on the CPU) or torch, or set TRITON_INTERPRET=1 to run "
                         "the kernels in Triton's CPU interpreter (slow; meant for tests)")
    if requested == "triton":
        return "triton"
    if device_type == "cuda" and runnable:
        return "triton"
    if device_type == "cpu" and cpu.runs(dtype, block) and cpu.available():
        return "cpu"
    return "torch"


def _check_cpu_kernels(device_type: str, dtype: torch.dtype, block: int) -> None:
    problem = None
    if device_type != "cpu":
        problem = f"they run on the CPU and the model is on {device_type}"
    elif not cpu.runs(dtype, block):
        problem = (f"they take float32 and blocks of {', '.join(map(str, cpu.BLOCKS))}; this layer is {dtype} with "
                   f"blocks of {block}")
    elif (reason := cpu.unavailable_reason()) is not None:
        problem = reason
    if problem is not None:
        raise ValueError(f"sparsity.kernel=cpu cannot run here: {problem}; use sparsity.kernel=auto (the compiled "
                         "kernels where they run, else the PyTorch path) or torch")
