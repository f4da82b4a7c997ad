"""Running a kernel over column (or row) ranges, one per thread, and compiling it once per process."""
from __future__ import annotations

import hashlib
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numba
import torch
from filelock import FileLock

from ._kernels import _imax, _imin

_warm: set = set()


def _cache_lock() -> FileLock:
    """numba writes its on-disk cache without locking (numba#4807): serialise first calls across
    processes (pytest-xdist workers, parallel jobs) on a lock named after this file."""
    tag = hashlib.sha1(os.path.abspath(__file__).encode()).hexdigest()[:12]
    return FileLock(os.path.join(tempfile.gettempdir(), f"fintensor-numba-{tag}.lock"))


_SERIAL_BELOW = 200_000  # elements: below this, waking another thread costs more than it saves
_pool: ThreadPoolExecutor | None = None


def _numba_threads() -> int:
    """``numba.get_num_threads()``, without its side effect on torch: its first call starts numba's
    threading layer, and the OpenMP one resets the process's OpenMP thread count -- torch's intra-op
    threads -- to every core, undoing a user's ``torch.set_num_threads``."""
    before = torch.get_num_threads()
    n = numba.get_num_threads()
    if torch.get_num_threads() != before:
        torch.set_num_threads(before)
    return n


def _run(kernel: Callable, units: int, *args) -> None:
    """``kernel(*args, first, stop)`` over ``units`` columns (or rows), split into one contiguous
    range per thread (``numba.get_num_threads()``; the kernels release the GIL). Results do not
    depend on the split. The first call per (kernel, dtype) in this process compiles or loads the
    cached machine code, alone, under an inter-process lock."""
    key = (kernel.__name__, args[0].dtype.char)
    if key not in _warm:
        with _cache_lock():
            kernel(*args, 0, units)
        _warm.add(key)
        return
    threads = _imin(_numba_threads(), units) if args[0].size >= _SERIAL_BELOW else 1
    in_ranges(lambda first, stop: kernel(*args, first, stop), units, threads)


def in_ranges(call: Callable[[int, int], None], units: int, threads: int) -> None:
    """``call(first, stop)`` over ``units`` split into up to ``threads`` contiguous ranges: the first in
    this thread, the others on one pool shared by every caller (the calls must release the GIL)."""
    global _pool
    threads = _imax(1, _imin(threads, units))
    if threads == 1:
        call(0, units)
        return
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=_imax(1, (os.cpu_count() or 2) - 1), thread_name_prefix="fintensor")
    bounds = [units * i // threads for i in range(threads + 1)]
    pending = [_pool.submit(call, lo, hi) for lo, hi in zip(bounds[1:-1], bounds[2:])]
    call(bounds[0], bounds[1])
    for job in pending:
        job.result()
