"""Where benchmark results go: ``benchmarks/results/<name>-<host>-<cpus>cpu-<date>.*``.

Results are named by machine and date so numbers from different hardware never overwrite
each other and the README can cite the file a number came from.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

RESULTS_DIR = Path(__file__).parent / "results"


def machine_tag() -> str:
    return f"{platform.node()}-{os.cpu_count()}cpu"


def today() -> str:
    return time.strftime("%Y-%m-%d")


def result_path(name: str, suffix: str, out_dir: str | Path = RESULTS_DIR) -> Path:
    """Path of benchmark ``name``'s result file with ``suffix`` (".md", ".csv"...); the
    directory is created. (Not Path.with_suffix: names like "methods-0.9" contain dots.)"""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out / f"{name}-{machine_tag()}-{today()}{suffix}"


def publish(name: str, report: str, out_dir: str | Path = RESULTS_DIR) -> Path:
    """Print a Markdown report and save it as ``<name>-<host>-<date>.md``."""
    print(report)
    path = result_path(name, ".md", out_dir)
    path.write_text(report + "\n")
    print(f"wrote {path}")
    return path
