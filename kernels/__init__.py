"""Triton block-sparse kernels, imported as ``dsparse.kernels``.

The directory sits at the top of the repository (``kernels/``) but is installed under the
``dsparse`` namespace, so it never shadows the unrelated PyPI package named ``kernels``.
The block-sparse GEMM kernels themselves arrive with the kernels issue (DESIGN.md
section 6); Triton is imported lazily so the rest of dsparse works without it.
"""

from __future__ import annotations

import functools


@functools.cache
def triton_available() -> bool:
    """Whether Triton can be imported (kernels then run on GPU, or on CPU with TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
