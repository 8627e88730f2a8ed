"""Wall-clock timing shared by the benchmarks: warm up, then the median of repeats."""

from __future__ import annotations

import statistics
import time


def median_time(function, repeats: int, warmup: int = 2) -> float:
    """Median seconds of ``repeats`` calls of ``function`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
