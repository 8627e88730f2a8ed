"""Matplotlib without a display, and figures written atomically (never half a PNG)."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(figure, path: str | Path, dpi: int = 120) -> Path:
    """Write ``figure`` to ``path`` as PNG (via a temporary file) and close it."""
    from dsparse.io import atomic_path

    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=dpi, format="png", bbox_inches="tight")
    pyplot().close(figure)
    return Path(path)
