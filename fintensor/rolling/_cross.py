"""Cross-sectional kernels: each row of a (R, S) panel is one time step's stocks."""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from ._kernels import _JIT, _NAN, _rank_value

@njit(**_JIT)
def _cs_rank_kernel(x, order, out, method, ascending, pct, first, stop):
    """Rank of each valid value within its row (NaN stays NaN), ties like pandas' ``method``;
    ``order`` is each row's argsort (NaN last, from numpy: sorting compiles slowly in numba)."""
    for i in range(first, stop):
        row = x[i]
        idx = order[i]
        k = 0
        for j in range(row.shape[0]):
            k += row[j] == row[j]
        out[i, :] = _NAN
        g = 0
        while g < k:  # a group of ties occupies sorted positions g..h-1
            h = g + 1
            while h < k and row[idx[h]] == row[idx[g]]:
                h += 1
            rk = _rank_value(g, h, k, method, ascending, pct)
            for m in range(g, h):
                out[i, idx[m]] = rk
            g = h


@njit(**_JIT)
def _cs_zscore_kernel(x, out, ddof, first, stop):
    """(x - mean) / std of each row's valid values, two passes (exact for any offset)."""
    R, S = x.shape
    for i in range(first, stop):
        k = 0.0
        total = 0.0
        for j in range(S):
            v = np.float64(x[i, j])
            if v == v:
                k += 1.0
                total += v
        mu = total / k if k > 0 else _NAN
        ss = 0.0
        for j in range(S):
            v = np.float64(x[i, j])
            if v == v:
                ss += (v - mu) * (v - mu)
        sd = math.sqrt(ss / (k - ddof)) if k > ddof else _NAN
        for j in range(S):
            v = np.float64(x[i, j])
            out[i, j] = (v - mu) / sd if (sd > 0.0 and v == v) else _NAN


