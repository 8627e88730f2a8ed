"""Block-sparse kernels: the bottom layer of kernel -> op -> layer.

``block_sparse`` holds the Triton kernels, ``ops`` registers them as ``torch.library``
operators; ``dsparse.sparsity.block.gemm`` is the PyTorch-op path beside them, and
``dsparse.sparsity.block.layers`` the layers that pick one (``resolve_kernel``).
Neither is imported here: Triton is imported only when a layer runs the Triton kernel, so
the rest of dsparse works without it.
"""

from __future__ import annotations

import os
from typing import Literal, get_args

import torch

Kernel = Literal["auto", "triton", "torch"]
"""Values of ``sparsity.kernel``: auto (Triton on CUDA, the PyTorch path elsewhere),
triton (always the Triton kernels), torch (always the PyTorch path)."""
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


def resolve_kernel(requested: str, device: torch.device | str) -> str:
    """``"triton"`` or ``"torch"``: which implementation block-sparse layers run on ``device``.

    Raises:
        ValueError: an unknown value, or ``triton`` where the kernels cannot run (no CUDA
            device and no interpreter, or Triton not installed), with what to do instead.
    """
    if requested not in KERNELS:
        raise ValueError(f"sparsity.kernel must be one of {list(KERNELS)}, got {requested!r}")
    device_type = torch.device(device).type
    runnable = triton_available() and (device_type == "cuda" or (device_type == "cpu" and interpreting()))
    if requested == "triton" and not runnable:
        reason = ("Triton is not installed" if not triton_available()
                  else f"the model is on {device_type}, and Triton kernels need a CUDA device")
        raise ValueError(f"sparsity.kernel=triton cannot run here: {reason}; use sparsity.kernel=auto (Triton on "
                         "CUDA, PyTorch elsewhere) or torch, or set TRITON_INTERPRET=1 to run the kernels in "
                         "Triton's CPU interpreter (slow; meant for tests)")
    if requested == "auto":
        return "triton" if runnable and device_type == "cuda" else "torch"
    return requested
