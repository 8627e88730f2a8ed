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


def interleaved_median_times(functions, repeats: int, warmup: int = 2) -> list[float]:
    """Median seconds of each function, calling them in turn ``repeats`` times, so that a
    shared machine's drifting speed affects every side of a comparison alike."""
    for _ in range(warmup):
        for function in functions:
            function()
    times = [[] for _ in functions]
    for _ in range(repeats):
        for function, samples in zip(functions, times):
            start = time.perf_counter()
            function()
            samples.append(time.perf_counter() - start)
    return [statistics.median(samples) for samples in times]
