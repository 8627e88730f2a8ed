"""Wall-clock timing shared by the benchmarks: warm up, then the median of repeats."""

from __future__ import annotations

import math
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


def interleaved_median_times(functions, repeats: int, warmup: int = 2, min_sample_s: float = 0.0) -> list[float]:
    """Median seconds per call of each function, calling them in turn ``repeats`` times, so
    that a shared machine's drifting speed affects every side of a comparison alike.

    With ``min_sample_s``, each sample of a function is a loop of as many calls as take
    about that long (counted from its warm-up), so sub-millisecond functions are not timed
    one call at a time, where the timer and one page fault are a large part of a call.
    """
    loops = [1] * len(functions)
    for _ in range(warmup):
        for index, function in enumerate(functions):
            start = time.perf_counter()
            function()
            elapsed = time.perf_counter() - start
            if min_sample_s > 0:
                loops[index] = max(1, math.ceil(min_sample_s / max(elapsed, 1e-9)))
    times = [[] for _ in functions]
    for _ in range(repeats):
        for function, count, samples in zip(functions, loops, times):
            start = time.perf_counter()
            for _ in range(count):
                function()
            samples.append((time.perf_counter() - start) / count)
    return [statistics.median(samples) for samples in times]
