"""Timing shared by the benchmarks (run as scripts: `python benchmarks/bench_x.py`)."""
from __future__ import annotations

import time


def best(fn, repeat: int = 5) -> float:
    """Best wall time of ``repeat`` runs, seconds (the least disturbed by other processes)."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)
