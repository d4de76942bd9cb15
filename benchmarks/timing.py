"""Timing helper shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import time


def timed_pairs(fn_a, fn_b, iters: int) -> tuple[float, float, float]:
    """Median seconds of ``fn_a`` and ``fn_b`` and the median of the per-pair ratios a / b, timed alternately after
    one warm-up call each, so a slow spell of the machine weighs on both sides alike."""
    fn_a(), fn_b()
    times_a, times_b = [], []
    for _ in range(iters):
        for fn, times in ((fn_a, times_a), (fn_b, times_b)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    ratios = [ta / tb for ta, tb in zip(times_a, times_b)]
    return statistics.median(times_a), statistics.median(times_b), statistics.median(ratios)
