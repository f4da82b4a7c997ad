"""Rolling statistics over time: fast, exact and pandas-compatible.

``ft.rolling.mean(x, 20)`` and friends take a numpy array, a torch tensor or a StockTensor of 1 to 4
dimensions and roll along time (a StockTensor's ``time`` dim -- or ``tick`` -- else axis 0). The
output has the input's type, shape and float dtype; a StockTensor comes back with
``mask = result observed``. Semantics follow pandas exactly: ``window``, ``min_periods`` (default:
the window), NaN skipped and counted as missing, NaN out where fewer than ``min_periods`` values are
valid.

How it is fast and exact (details at each kernel):

* Every input becomes a C-ordered ``(T, M)`` panel (a ``(T, S, F)`` tensor is a ``(T, S*F)`` view).
  Kernels walk time row by row and advance a block of adjacent columns at once (SIMD across
  columns); threads (``numba.set_num_threads``) take disjoint column ranges, so results do not
  depend on their number.
* Windowed sums, moments and extremes use the van Herk / Gil-Werman block scheme: time is cut
  into blocks of ``window`` rows, so every window is a suffix of one block plus a prefix of the
  next. Prefix statistics are accumulated going forward, suffix statistics in one backward pass
  per block. Nothing is ever subtracted out of a running sum, so a spike leaves no residue, and
  sums of squares are taken around a pivot value inside the window, so a price of 1e6 moving by
  1e-3 keeps its digits. It is as exact as recomputing every window, and O(T).
* median / quantile / rank sort each block's values once (numpy's integer sort of keys that carry
  the row) and merge adjacent blocks; a window is a bitset over its pair of blocks' sorted order,
  so a step is a bit flip plus a popcount search, not a shift of a sorted copy.
* Kernels accumulate in float64 and are compiled (and cached on disk) only for 2-D C-contiguous
  float32 and float64 panels.

A CUDA tensor is computed with torch ops on its device (``engine="torch"`` forces that path
anywhere; it agrees with the numba kernels).
"""
from __future__ import annotations

import builtins
import hashlib
import math
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numba
import numpy as np
import torch
from filelock import FileLock
from numba import njit, types
from llvmlite import ir as llvm_ir
from numba.extending import intrinsic

from .errors import BadInputError
from .tensor import StockTensor

__all__ = [
    "sum", "mean", "count", "var", "std", "zscore", "min", "max", "argmin", "argmax", "median",
    "quantile", "rank", "ewm_mean", "ewm_var", "ewm_std", "cov", "corr", "beta", "returns", "diff",
    "shift", "cs_rank", "cs_zscore",
]

# error_model="numpy": float division by zero gives inf/NaN instead of raising. No fastmath: the
# kernels test x == x to find NaN, which fastmath's no-NaN assumption would fold away.
_JIT = dict(cache=True, nogil=True, error_model="numpy")
_NAN = np.nan
_imin, _imax = builtins.min, builtins.max  # the module defines its own min / max
_SCRATCH_BYTES = 1 << 25  # a strip's suffix scratch at most (32 MiB): bounds memory for long windows
_MIN_STRIP = 512  # columns: shorter row segments make the memory traffic slow (rows are far apart)
_ORDER_STRIP = 16  # columns whose sorted windows are kept side by side (16 x window values: L1 / L2)

# kernel modes (small ints, so that one compiled kernel serves a family of statistics)
_SUM, _MEAN, _COUNT, _VAR, _STD, _ZSCORE = range(6)
_COV, _CORR, _BETA, _RESID, _RSQUARE = range(5)
_QUANTILE, _MEDIAN, _RANK = range(3)
_RANK_METHODS = {"average": 0, "min": 1, "max": 2}
_SHIFT, _DIFF, _PCT, _LOGRET = range(4)


@njit(inline="always")
def _valid(v):
    """1.0 for a value, 0.0 for NaN: counts as arithmetic, which keeps loops branch-free."""
    return 1.0 if v == v else 0.0


@njit(inline="always")
def _or_zero(v):
    return v if v == v else 0.0


@njit(inline="always")
def _strip_width(columns, window, arrays):
    """Columns advanced together: all the thread has (whole rows stream from memory fastest; the
    suffix scratch streams along), unless ``arrays`` suffix arrays of ``window + 1`` rows would
    outgrow _SCRATCH_BYTES; never fewer than _MIN_STRIP."""
    fits = _SCRATCH_BYTES // (8 * (window + 1) * arrays)
    return _imax(1, _imin(columns, _imax(_MIN_STRIP, fits)))


# ============================================================================ block-scheme kernels
# Every block kernel has the same layout. It handles columns [first, stop) (``_run`` gives each thread
# its range) in strips of adjacent columns (``_strip_width``). Time is cut into blocks of ``window``
# rows: a forward pass over a time block accumulates prefix statistics and combines them with the
# suffix statistics of the previous block, stored by start offset (scratch row ``window`` is the empty
# suffix); a backward pass over the finished block stores its suffix statistics for the next one.
# Inner loops run over the columns of one row (row views, so that they vectorise), load every operand
# unconditionally and pick results with selects, not branches; the statistic (``what``) is chosen
# outside them. Counts of valid values are small integers, exact under add and remove: where a
# kernel needs only the window's count, it keeps a running one (+ the new row, - the row leaving).
@njit(**_JIT)
def _pivots(y, x, x_step, c0, py, px, first, stop, step):
    """Per column of y (from ``c0``), the first valid (y, x) pair met walking rows first, first +
    step, ... before ``stop``: the pivots of a block's prefix (forward) or suffix (backward) sums.
    A pivot is a value inside every window that uses those sums. NaN where there is none."""
    n = py.shape[0]
    py[:] = _NAN
    px[:] = _NAN
    missing = n
    t = first
    while missing > 0 and t != stop:
        yr = y[t, c0:c0 + n]
        missing = 0
        for j in range(n):
            vy = np.float64(yr[j])
            vx = np.float64(x[t, (c0 + j) * x_step])
            if py[j] != py[j] and vy == vy and vx == vx:
                py[j] = vy
                px[j] = vx
            missing += py[j] != py[j]
        t += step


@njit(inline="always")
def _sum_row(mean, xr, gone, leaving, row, ss, prefix, cnt, lo):
    """One row of ``_sums_kernel``: the block prefix plus the previous block's suffix ``ss``, and the
    running count (+ this row, - the row ``gone`` when ``leaving``); ``mean`` is a constant, so that
    the sum compiles without the division."""
    for j in range(row.shape[0]):
        v = np.float64(xr[j])
        p = prefix[j] + _or_zero(v)
        c = cnt[j] + (_valid(v) - leaving * _valid(gone[j]))
        prefix[j] = p
        cnt[j] = c
        total = p + ss[j]
        row[j] = (total / c if mean else total) if c >= lo else _NAN


@njit(**_JIT)
def _sums_kernel(x, out, window, min_periods, what, first, stop):
    """sum / mean / count over a moving window: block prefix + suffix sums, nothing subtracted,
    and a running count."""
    T = x.shape[0]
    w = window
    lo = float(min_periods) if what == _SUM else float(_imax(min_periods, 1))
    width = _strip_width(stop - first, w, 1)
    for c0 in range(first, stop, width):
        n = _imin(width, stop - c0)
        suffix = np.zeros((w + 1, n))
        prefix = np.empty(n)
        cnt = np.zeros(n)
        for tb in range(0, T, w):
            te = _imin(tb + w, T)
            prefix[:] = 0.0
            for t in range(tb, te):
                xr = x[t, c0:c0 + n]
                gone = x[_imax(t - w, 0), c0:c0 + n]  # the row leaving the window (if t >= w)
                leaving = 1.0 if t >= w else 0.0
                row = out[t, c0:c0 + n]
                ss = suffix[t - tb + 1]  # suffix from t - w + 1 (offset t - tb + 1 in the previous block)
                if what == _COUNT:
                    for j in range(n):
                        c = cnt[j] + (_valid(xr[j]) - leaving * _valid(gone[j]))
                        cnt[j] = c
                        row[j] = c
                    if t + 1 < min_periods:  # pandas: min_periods counts the window's rows here
                        row[:] = _NAN
                elif what == _SUM:
                    _sum_row(False, xr, gone, leaving, row, ss, prefix, cnt, lo)
                else:
                    _sum_row(True, xr, gone, leaving, row, ss, prefix, cnt, lo)
            if what != _COUNT and te - tb == w and te < T:
                for r in range(w - 1, -1, -1):
                    xr = x[tb + r, c0:c0 + n]
                    s0, s1 = suffix[r], suffix[r + 1]
                    for j in range(n):
                        s0[j] = s1[j] + _or_zero(np.float64(xr[j]))


@njit(inline="always")
def _moment_step(v, piv, pc, pd, pq, k, sd, sq, sp):
    """One value of one column: add v to the block prefix (count, sum and sum of squares of the
    deviations from the prefix pivot ``piv``) and combine the prefix with the previous block's
    suffix (k values, deviations from its pivot ``sp``, moved to ``piv``). Returns the new prefix,
    then the window's count, sum of deviations, c^2 x biased variance, and v's deviation."""
    ok = v == v
    dev = v - piv if ok else 0.0
    pc = pc + (1.0 if ok else 0.0)
    pd = pd + dev
    pq = pq + dev * dev
    shift = sp - piv if (k > 0.0) & (pc > 0.0) else 0.0
    c = pc + k
    dsum = pd + sd + k * shift
    qsum = pq + sq + shift * (2.0 * sd + k * shift)
    return pc, pd, pq, c, dsum, qsum * c - dsum * dsum, dev


@njit(inline="always")
def _finish_moment(what, c, dsum, m2, dev, lo, dd):
    """var, std or zscore ((value - mean) / std = (c x deviation - D) / (c x std)) of a window."""
    if what == _VAR:
        return _imax(m2, 0.0) / (c * (c - dd)) if c >= lo else _NAN
    if what == _STD:
        return math.sqrt(_imax(m2, 0.0) / (c * (c - dd))) if c >= lo else _NAN
    z = (dev * c - dsum) / (c * math.sqrt(m2 / (c * (c - dd))))
    return z if (c >= lo) & (m2 > 0.0) & (dev == dev) else _NAN


@njit(inline="always")
def _moment_rows(what, xa, ra, sa, xb, rb, sb, pre, p_piv, s_piv, lo, dd):
    """Two rows (a, b) of ``_moments_kernel``'s forward pass for one statistic (a constant, so
    that only its divisions and roots are compiled in): ``pre`` is the (3, n) prefix, ``sa`` and
    ``sb`` the suffix rows of each window. The prefix is loaded and stored once per pair."""
    for j in range(ra.shape[0]):
        piv, sp = p_piv[j], s_piv[j]
        va, vb = np.float64(xa[j]), np.float64(xb[j])
        pc, pd, pq, c, dsum, m2, dev = _moment_step(va, piv, pre[0, j], pre[1, j], pre[2, j],
                                                    sa[0, j], sa[1, j], sa[2, j], sp)
        res = _finish_moment(what, c, dsum, m2, dev if va == va else _NAN, lo, dd)
        pc, pd, pq, c, dsum, m2, dev = _moment_step(vb, piv, pc, pd, pq, sb[0, j], sb[1, j], sb[2, j], sp)
        pre[0, j], pre[1, j], pre[2, j] = pc, pd, pq
        ra[j] = res
        rb[j] = _finish_moment(what, c, dsum, m2, dev if vb == vb else _NAN, lo, dd)


@njit(**_JIT)
def _moments_kernel(x, out, window, min_periods, ddof, what, first, stop):
    """var / std / zscore over a moving window, from sums of deviations from a pivot.

    Prefix and suffix keep (count, sum of deviations, sum of squared deviations) around their own
    pivot, the first valid value they saw (a value inside every window that uses them); the
    suffix's sums are moved to the prefix's pivot before they are added. With deviations instead
    of raw values nothing large cancels: var = (Q - D^2/n) / (n - ddof) loses no digits to the
    level of the prices. Rows go two at a time (a lone last row is paired with a row of NaN,
    which changes nothing).
    """
    T = x.shape[0]
    w = window
    lo = float(_imax(min_periods, ddof + 1))
    dd = float(ddof)
    width = _strip_width(stop - first, w, 3)
    for c0 in range(first, stop, width):
        n = _imin(width, stop - c0)
        suffix = np.zeros((w + 2, 3, n))  # row w: the empty suffix; row w + 1: a lone row's partner
        s_piv = np.full(n, _NAN)
        pre = np.empty((3, n))
        p_piv = np.empty(n)
        nan_row = np.full(n, _NAN, dtype=x.dtype)
        spare = np.empty(n, dtype=out.dtype)
        for tb in range(0, T, w):
            te = _imin(tb + w, T)
            pre[:] = 0.0
            _pivots(x, x, 1, c0, p_piv, p_piv, tb, te, 1)
            for t in range(tb, te, 2):
                pair = t + 1 < te
                xa, ra = x[t, c0:c0 + n], out[t, c0:c0 + n]
                xb = x[t + 1, c0:c0 + n] if pair else nan_row
                rb = out[t + 1, c0:c0 + n] if pair else spare
                sa, sb = suffix[t - tb + 1], suffix[t - tb + 2]  # suffixes from t - w + 1 and t - w + 2
                if what == _VAR:
                    _moment_rows(_VAR, xa, ra, sa, xb, rb, sb, pre, p_piv, s_piv, lo, dd)
                elif what == _STD:
                    _moment_rows(_STD, xa, ra, sa, xb, rb, sb, pre, p_piv, s_piv, lo, dd)
                else:
                    _moment_rows(_ZSCORE, xa, ra, sa, xb, rb, sb, pre, p_piv, s_piv, lo, dd)
            if te - tb == w and te < T:
                _pivots(x, x, 1, c0, s_piv, s_piv, te - 1, tb - 1, -1)
                for r in range(w - 1, -1, -2):  # rows r and r - 1 of the block
                    pair = r >= 1
                    xa = x[tb + r, c0:c0 + n]
                    xb = x[tb + r - 1, c0:c0 + n] if pair else nan_row
                    s1, sa, sb = suffix[r + 1], suffix[r], suffix[r - 1 if pair else w + 1]
                    for j in range(n):
                        sp = s_piv[j]
                        v = np.float64(xa[j])
                        dev = v - sp if v == v else 0.0
                        k = s1[0, j] + _valid(v)
                        d = s1[1, j] + dev
                        q = s1[2, j] + dev * dev
                        sa[0, j], sa[1, j], sa[2, j] = k, d, q
                        v = np.float64(xb[j])
                        dev = v - sp if v == v else 0.0
                        sb[0, j] = k + _valid(v)
                        sb[1, j] = d + dev
                        sb[2, j] = q + dev * dev


@njit(**_JIT)
def _extremes_kernel(x, out, window, min_periods, sign, want_index, first, stop):
    """Moving max (sign=1) or min (sign=-1) -- or its position in the window, the oldest winning
    ties like np.argmax -- from van Herk / Gil-Werman prefix and suffix extremes. An empty
    extreme is NaN; np.fmax skips NaN; positions move with arithmetic blends (exact for integers),
    which keeps the loops free of masked stores."""
    T = x.shape[0]
    w = window
    lo = float(_imax(min_periods, 1))
    width = _strip_width(stop - first, w, 2 if want_index else 1)
    for c0 in range(first, stop, width):
        n = _imin(width, stop - c0)
        s_top = np.full((w + 1, n), _NAN)
        s_at = np.zeros((w + 1, n))
        p_top = np.empty(n)
        p_at = np.empty(n)
        cnt = np.zeros(n)
        for tb in range(0, T, w):
            te = _imin(tb + w, T)
            p_top[:] = _NAN
            p_at[:] = 0.0
            for t in range(tb, te):
                xr = x[t, c0:c0 + n]
                gone = x[_imax(t - w, 0), c0:c0 + n]
                leaving = 1.0 if t >= w else 0.0
                row = out[t, c0:c0 + n]
                r = t - tb + 1
                st, sa = s_top[r], s_at[r]
                if want_index:
                    start = float(_imax(t - w + 1, 0))
                    now = float(t)
                    for j in range(n):
                        v = sign * np.float64(xr[j])
                        top = p_top[j]
                        at = p_at[j]
                        newer = (v > top) | ((top != top) & (v == v))
                        top = np.fmax(top, v)
                        at = at + (now - at) * newer
                        c = cnt[j] + (_valid(v) - leaving * _valid(gone[j]))
                        p_top[j] = top
                        p_at[j] = at
                        cnt[j] = c
                        s = st[j]
                        older = (s >= top) | (top != top)  # the suffix is the older part
                        res = at + (sa[j] - at) * older - start
                        row[j] = res if c >= lo else _NAN
                else:
                    for j in range(n):
                        v = sign * np.float64(xr[j])
                        top = np.fmax(p_top[j], v)
                        c = cnt[j] + (_valid(v) - leaving * _valid(gone[j]))
                        s = st[j]
                        p_top[j] = top
                        cnt[j] = c
                        res = sign * np.fmax(s, top)
                        row[j] = res if c >= lo else _NAN
            if te - tb == w and te < T:
                for r in range(w - 1, -1, -1):
                    xr = x[tb + r, c0:c0 + n]
                    t0, t1, a0, a1 = s_top[r], s_top[r + 1], s_at[r], s_at[r + 1]
                    if want_index:
                        at = float(tb + r)
                        for j in range(n):
                            v = sign * np.float64(xr[j])
                            top = t1[j]
                            older = (v >= top) | ((top != top) & (v == v))
                            t0[j] = np.fmax(top, v)
                            a0[j] = a1[j] + (at - a1[j]) * older
                    else:
                        for j in range(n):
                            t0[j] = np.fmax(t1[j], sign * np.float64(xr[j]))


@njit(inline="always")
def _co_step(vy, vx, py, px, pc, pdx, pdy, pxx, pyy, pxy, k, sdx, sdy, sxx, syy, sxy, sy, sx):
    """``_moment_step`` for a pair (y, x), counted where both are valid: the new prefix (count,
    sums of deviations, of squared deviations and of their products), then the window's count,
    sums of deviations, sums of squares and products (around the prefix pivots), and the pair's
    deviations."""
    ok = (vy == vy) & (vx == vx)
    ex = vx - px if ok else 0.0
    ey = vy - py if ok else 0.0
    pc = pc + (1.0 if ok else 0.0)
    pdx = pdx + ex
    pdy = pdy + ey
    pxx = pxx + ex * ex
    pyy = pyy + ey * ey
    pxy = pxy + ex * ey
    both = (k > 0.0) & (pc > 0.0)
    hx = sx - px if both else 0.0
    hy = sy - py if both else 0.0
    c = pc + k
    dx = pdx + sdx + k * hx
    dy = pdy + sdy + k * hy
    qxx = pxx + sxx + hx * (2.0 * sdx + k * hx)
    qyy = pyy + syy + hy * (2.0 * sdy + k * hy)
    qxy = pxy + sxy + hx * sdy + hy * sdx + k * hx * hy
    return (pc, pdx, pdy, pxx, pyy, pxy), (c, dx, dy, qxx, qyy, qxy, ex, ey, ok)


@njit(inline="always")
def _finish_co(what, window, ddof, lo):
    """cov / beta / residual / corr / r-squared from ``_co_step``'s window sums."""
    c, dx, dy, qxx, qyy, qxy, ex, ey, ok = window
    cxy = qxy - dx * (dy / c)
    if what == _COV:
        res = cxy / (c - ddof) if c > ddof else _NAN
    else:
        cxx = _imax(qxx - dx * (dx / c), 0.0)
        if what == _BETA:
            res = cxy / cxx if cxx > 0.0 else _NAN
        elif what == _RESID:
            res = (ey - dy / c) - cxy / cxx * (ex - dx / c) if ok & (cxx > 0.0) else _NAN
        else:
            cyy = _imax(qyy - dy * (dy / c), 0.0)
            rho = cxy / math.sqrt(cxx * cyy) if (cxx > 0.0) & (cyy > 0.0) else _NAN
            res = rho if what == _CORR else rho * rho
    return res if c >= lo else _NAN


@njit(inline="always")
def _co_row(what, yr, xr, row, sr, pre, p_py, p_px, s_py, s_px, ddof, lo):
    """A row of ``_comoments_kernel``'s forward pass for one statistic (a constant, so that only
    its arithmetic is compiled in): ``pre`` is the (6, n) prefix, ``sr`` the suffix row."""
    for j in range(row.shape[0]):
        state, win = _co_step(np.float64(yr[j]), xr[j], p_py[j], p_px[j], pre[0, j], pre[1, j], pre[2, j],
                              pre[3, j], pre[4, j], pre[5, j], sr[0, j], sr[1, j], sr[2, j], sr[3, j], sr[4, j],
                              sr[5, j], s_py[j], s_px[j])
        pre[0, j], pre[1, j], pre[2, j], pre[3, j], pre[4, j], pre[5, j] = state
        row[j] = _finish_co(what, win, ddof, lo)


@njit(**_JIT)
def _comoments_kernel(y, x, out, window, min_periods, ddof, what, x_step, first, stop):
    """cov / corr / beta / regression residual / r-squared of y on x over a moving window, on the
    pairs where both are valid: ``_moments_kernel`` with two series and their cross products
    (count, dx, dy, xx, yy, xy: six sums per prefix and suffix). ``x`` has one column per column
    of ``y`` (``x_step=1``) or one column for all (a market series, ``x_step=0``)."""
    T = y.shape[0]
    w = window
    lo = float(_imax(min_periods, 1))
    width = _strip_width(stop - first, w, 6)
    for c0 in range(first, stop, width):
        n = _imin(width, stop - c0)
        suffix = np.zeros((w + 1, 6, n))  # row w: the empty suffix
        s_px = np.full(n, _NAN)
        s_py = np.full(n, _NAN)
        pre = np.empty((6, n))
        p_px = np.empty(n)
        p_py = np.empty(n)
        xs = np.empty(n)  # the x values of a row (the market column repeated when x_step=0)
        for tb in range(0, T, w):
            te = _imin(tb + w, T)
            pre[:] = 0.0
            _pivots(y, x, x_step, c0, p_py, p_px, tb, te, 1)
            for t in range(tb, te):
                yr, row = y[t, c0:c0 + n], out[t, c0:c0 + n]
                for j in range(n):
                    xs[j] = x[t, (c0 + j) * x_step]
                sr = suffix[t - tb + 1]
                if what == _COV:
                    _co_row(_COV, yr, xs, row, sr, pre, p_py, p_px, s_py, s_px, ddof, lo)
                elif what == _CORR:
                    _co_row(_CORR, yr, xs, row, sr, pre, p_py, p_px, s_py, s_px, ddof, lo)
                elif what == _BETA:
                    _co_row(_BETA, yr, xs, row, sr, pre, p_py, p_px, s_py, s_px, ddof, lo)
                elif what == _RESID:
                    _co_row(_RESID, yr, xs, row, sr, pre, p_py, p_px, s_py, s_px, ddof, lo)
                else:
                    _co_row(_RSQUARE, yr, xs, row, sr, pre, p_py, p_px, s_py, s_px, ddof, lo)
            if te - tb == w and te < T:
                _pivots(y, x, x_step, c0, s_py, s_px, te - 1, tb - 1, -1)
                for r in range(w - 1, -1, -1):
                    yr = y[tb + r, c0:c0 + n]
                    for j in range(n):
                        xs[j] = x[tb + r, (c0 + j) * x_step]
                    s0, s1 = suffix[r], suffix[r + 1]
                    for j in range(n):
                        vy = np.float64(yr[j])
                        vx = xs[j]
                        ok = (vy == vy) & (vx == vx)
                        ex = vx - s_px[j] if ok else 0.0
                        ey = vy - s_py[j] if ok else 0.0
                        s0[0, j] = s1[0, j] + (1.0 if ok else 0.0)
                        s0[1, j] = s1[1, j] + ex
                        s0[2, j] = s1[2, j] + ey
                        s0[3, j] = s1[3, j] + ex * ex
                        s0[4, j] = s1[4, j] + ey * ey
                        s0[5, j] = s1[5, j] + ex * ey


# =================================================================== order statistics in a window
# A window is the suffix of one block of ``window`` rows plus a prefix of the next (as in the block
# scheme above). Each block's values are sorted once (numpy's integer sort of keys that carry the
# row), and each pair of adjacent blocks is merged once, so every value has a fixed place in its
# pair's order; a window is then a set of places, kept as a bitset of 2 x window bits. Adding or
# removing a value is one bit; the k-th smallest value is found by counting bits (popcount), and the
# set bits below a place are the rank of a value. A step costs O(window / 64) word operations, not
# the O(window) values a sorted copy of the window moves.
_NAN_KEY = np.int64(0x7FFFFFFFFFFFFFFF)  # the sort key of NaN (and of rows past the end): last
_ONE = np.uint64(1)
_ORDER_MIN_BLOCK = 32  # rows: shorter blocks for short windows would cost more per block than per row
_ORDER_KEY_BYTES = 1 << 24  # a column chunk's sort keys at most (16 MiB), but never fewer than a strip


@intrinsic
def _popcount(typingctx, word):
    """Set bits of a uint64 (LLVM's ctpop: one instruction where the CPU has it)."""
    if word != types.uint64:
        return None

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return types.uint64(types.uint64), codegen


@intrinsic
def _trailing_zeros(typingctx, word):
    """Zero bits below the lowest set bit of a nonzero uint64 (LLVM's cttz)."""
    if word != types.uint64:
        return None

    def codegen(context, builder, signature, args):
        return builder.cttz(args[0], llvm_ir.Constant(llvm_ir.IntType(1), 0))

    return types.uint64(types.uint64), codegen


@njit(inline="always")
def _next_set(words, base, place):
    """Place of the first set bit after ``place`` in the bitset ``words[base:]`` (there is one)."""
    i = base + (place >> 6)
    above = words[i] & ~(((_ONE << np.uint64(place & 63)) << _ONE) - _ONE)
    while above == 0:
        i += 1
        above = words[i]
    return (i - base) * 64 + int(_trailing_zeros(above))


@njit(inline="always")
def _select_in_word(word, k):
    """Place (0..63) of the k-th (from 0) set bit of ``word``, which has more than k: halve the
    word six times, counting the set bits of the lower half."""
    place = np.uint64(0)
    for width in (np.uint64(32), np.uint64(16), np.uint64(8), np.uint64(4), np.uint64(2), _ONE):
        low = _popcount(word & ((_ONE << width) - _ONE))
        skip = k >= low
        k = k - low if skip else k
        word = word >> width if skip else word
        place = place + width if skip else place
    return int(place)


@njit(inline="always")
def _select(words, base, k):
    """Place of the k-th (from 0) set bit of the bitset ``words[base:]`` (which has more than k)."""
    kk = np.uint64(k)
    i = base
    c = _popcount(words[i])
    while kk >= c:
        kk -= c
        i += 1
        c = _popcount(words[i])
    return (i - base) * 64 + _select_in_word(words[i], kk)


@njit(inline="always")
def _count_below(words, base, place):
    """Set bits of the bitset ``words[base:]`` at places below ``place``."""
    full = base + (place >> 6)
    total = np.uint64(0)
    for i in range(base, full):
        total += _popcount(words[i])
    rest = np.uint64(place & 63)
    if rest:
        total += _popcount(words[full] & ((_ONE << rest) - _ONE))
    return int(total)


@njit(**_JIT)
def _block_keys(x, bits, window, row_bits):
    """(columns, blocks, window) int64 sort keys of a (T, columns) float64 chunk ``x`` (``bits``
    is the same memory as int64) cut into blocks of ``window`` rows: the value's bits mapped to an
    integer of the same order, its lowest ``row_bits`` bits replaced by the row's offset in the
    block (NaN and rows past the end sort last). Values that differ only in the replaced bits may
    sort in the wrong order; ``_order_kernel`` repairs that."""
    T, n = x.shape
    n_blocks = (T + window - 1) // window
    keys = np.empty((n, n_blocks, window), dtype=np.int64)
    low = np.int64((1 << row_bits) - 1)
    flip = np.int64(0x7FFFFFFFFFFFFFFF)
    for t in range(n_blocks * window):
        b, r = t // window, t % window
        if t < T:
            for j in range(n):
                k = bits[t, j]
                k = k ^ ((k >> 63) & flip)  # negative floats: reverse their order
                k = k if x[t, j] == x[t, j] else _NAN_KEY
                keys[j, b, r] = (k & ~low) | r
        else:
            for j in range(n):
                keys[j, b, r] = _NAN_KEY
    return keys


@njit(**_JIT)
def _order_kernel(x, keys, out, window, block, min_periods, whats, qs, method, ascending, pct, c_out, row_bits):
    """quantile (linear interpolation) / median / rank of the current value, like pandas, for the
    columns of the float64 chunk ``x`` (out's columns from ``c_out``), each block's values already
    ordered by ``keys``. ``out[k]`` gets statistic ``whats[k]`` (quantile ``qs[k]``): several from
    one pass. A strip of a few columns is walked down time at a time, so that its state stays in
    cache. Blocks have ``block`` >= window rows (a window spans at most two)."""
    T, M = x.shape
    w = block
    n_words = (2 * w + 63) // 64
    low = np.int64((1 << row_bits) - 1)
    nan_high = _NAN_KEY & ~low
    want_rank = False
    for s in range(whats.shape[0]):
        want_rank |= whats[s] == _RANK
    for c0 in range(0, M, _ORDER_STRIP):
        n = _imin(_ORDER_STRIP, M - c0)
        prev_v = np.empty((n, w + 1))  # the previous block's valid values, sorted, and their rows
        prev_r = np.zeros((n, w + 1), dtype=np.int64)
        n_prev = np.zeros(n, dtype=np.int64)
        cur_v = np.empty(w + 1)
        cur_r = np.zeros(w + 1, dtype=np.int64)
        pair_v = np.empty((n, 2 * w))  # the pair's valid values, sorted
        place = np.empty((n, 2 * w), dtype=np.int64)  # row of the pair (previous block 0.., this w..)
        tie_lo = np.empty((n, 2 * w), dtype=np.int64)  # place -> first / past-last place of its value
        tie_hi = np.empty((n, 2 * w), dtype=np.int64)
        words = np.zeros(n * n_words, dtype=np.uint64)  # column j's bitset from j * n_words
        cnt = np.zeros(n, dtype=np.int64)
        for tb in range(0, T, w):
            te = _imin(tb + w, T)
            for j in range(n):
                # this block's valid values in order, from the sorted keys (NaN keys come last)
                ks = keys[c0 + j, tb // w]
                m = 0
                while m < w and (ks[m] & ~low) != nan_high:
                    r = ks[m] & low
                    cur_v[m] = x[tb + r, c0 + j]
                    cur_r[m] = r
                    m += 1
                for i in range(1, m):  # repair values that differ only in the key's row bits
                    u = i
                    while u > 0 and cur_v[u - 1] > cur_v[u]:
                        cur_v[u - 1], cur_v[u] = cur_v[u], cur_v[u - 1]
                        cur_r[u - 1], cur_r[u] = cur_r[u], cur_r[u - 1]
                        u -= 1
                # merge the previous block (rows 0..w-1) and this one (rows w..) into the pair order
                pv, pr, k_prev = prev_v[j], prev_r[j], n_prev[j]
                pl = place[j]
                pl[:] = -1
                a, b = 0, 0
                for o in range(k_prev + m):
                    va, vb = pv[a], cur_v[b]
                    ta = np.int64((a < k_prev) & ((b >= m) | (va <= vb)))  # 1: take a (arithmetic, no branch)
                    pair_v[j, o] = va if ta else vb
                    pl[ta * pr[a] + (1 - ta) * (w + cur_r[b])] = o
                    a += ta
                    b += 1 - ta
                o = k_prev + m
                if want_rank:
                    g = 0
                    while g < o:
                        h = g + 1
                        while h < o and pair_v[j, h] == pair_v[j, g]:
                            h += 1
                        for u in range(g, h):
                            tie_lo[j, u] = g
                            tie_hi[j, u] = h
                        g = h
                # the window before this block's first row: its last ``window`` rows' valid values
                wb = j * n_words
                words[wb:wb + n_words] = 0
                k = 0
                for u in range(k_prev):
                    if pr[u] >= w - window:
                        p = pl[pr[u]]
                        words[wb + (p >> 6)] |= _ONE << np.uint64(p & 63)
                        k += 1
                cnt[j] = k
                pv[:m] = cur_v[:m]
                pr[:m] = cur_r[:m]
                n_prev[j] = m
            for t in range(tb, te):
                r = t - tb
                gone = t - window - (tb - w)  # the row leaving the window, counted in the pair
                for j in range(n):
                    wb = j * n_words
                    k = cnt[j]
                    p = place[j, gone] if gone >= 0 else -1
                    if p >= 0:
                        words[wb + (p >> 6)] &= ~(_ONE << np.uint64(p & 63))
                        k -= 1
                    p_now = place[j, w + r]
                    if p_now >= 0:
                        words[wb + (p_now >> 6)] |= _ONE << np.uint64(p_now & 63)
                        k += 1
                    cnt[j] = k
                    for s in range(whats.shape[0]):
                        res = _NAN
                        if k >= min_periods and k > 0:
                            if whats[s] == _MEDIAN:
                                h = k // 2
                                if k % 2:
                                    res = pair_v[j, _select(words, wb, h)]
                                else:
                                    below = _select(words, wb, h - 1)
                                    res = (pair_v[j, below] + pair_v[j, _next_set(words, wb, below)]) / 2.0
                            elif whats[s] == _QUANTILE:
                                pos = qs[s] * (k - 1)
                                lo = int(pos)
                                at = _select(words, wb, lo)
                                res = pair_v[j, at]
                                if pos != lo:
                                    res += (pair_v[j, _next_set(words, wb, at)] - res) * (pos - lo)
                            elif p_now >= 0:  # rank of the current value
                                below = _count_below(words, wb, tie_lo[j, p_now])
                                upto = _count_below(words, wb, tie_hi[j, p_now])
                                if not ascending:
                                    below, upto = k - upto, k - below
                                if method == 1:
                                    res = below + 1.0
                                elif method == 2:
                                    res = float(upto)
                                else:
                                    res = (below + 1 + upto) / 2.0
                                res = res / k if pct else res
                        out[s, t, c_out + c0 + j] = res


def _order_columns(x, out, window, min_periods, whats, qs, method, ascending, pct, first, stop):
    """``_order_kernel`` over columns first..stop-1 of x, in chunks whose sort keys fit
    _ORDER_KEY_BYTES: numba writes the keys, numpy sorts them (its integer sort is several times
    faster than one compiled here), numba does the rest. numpy and the kernels release the GIL."""
    T = x.shape[0]
    block = builtins.max(window, _ORDER_MIN_BLOCK)
    row_bits = builtins.max(1, (block - 1).bit_length())
    padded = -(-T // block) * block
    chunk = builtins.max(_ORDER_STRIP, _ORDER_KEY_BYTES // (8 * padded) // _ORDER_STRIP * _ORDER_STRIP)
    for c0 in range(first, stop, chunk):
        c1 = builtins.min(c0 + chunk, stop)
        part = np.ascontiguousarray(x[:, c0:c1], dtype=np.float64)
        keys = _block_keys(part, part.view(np.int64), block, row_bits)
        keys.sort(axis=-1)
        _order_kernel(part, keys, out, window, block, min_periods, whats, qs, method, ascending, pct, c0, row_bits)


# =========================================================================== exponential weights
# pandas' recurrences (window_aggregations.pyx: ewm, ewmcov), written branch-free so that the column
# loop vectorises. Two rewrites keep them short: before a column's first value its weights may decay
# freely (the first value resets them), and the first value blends into itself ("the mean so far" is
# the value itself there, and pandas skips the blend where mean == value). State is stored as
# ``value + 0.0``: a store of "the new value or the old one" would otherwise become a masked store,
# which is slow on some x86 CPUs (+0.0 only turns -0.0 into 0.0).
@njit(inline="always")
def _ewm_mean_row(count_obs, xr, row, avg, old_wt, nobs, decay, gap_decay, new_wt, adjust, lo):
    """One row of ``_ewm_mean_kernel``; without ``count_obs`` (min_periods <= 1) the mean itself
    says whether a value was seen (NaN before the first one)."""
    for j in range(row.shape[0]):
        v = np.float64(xr[j])
        ok = v == v
        m = avg[j]
        wt = old_wt[j] * (decay if ok else gap_decay)
        mm = m if m == m else v
        blended = mm if mm == v else (wt * mm + new_wt * v) / (wt + new_wt)
        wt = ((wt + new_wt if adjust else 1.0) if m == m else 1.0) if ok else wt
        m = blended if ok else m
        avg[j] = m + 0.0
        old_wt[j] = wt + 0.0
        if count_obs:
            c = nobs[j] + (1.0 if ok else 0.0)
            nobs[j] = c
            row[j] = m if c >= lo else _NAN
        else:
            row[j] = m


@njit(**_JIT)
def _ewm_mean_kernel(x, out, com, adjust, ignore_na, min_periods, first, stop):
    """Exponentially weighted mean (``adjust``: weights (1-alpha)^i normalised over the past)."""
    T = x.shape[0]
    alpha = 1.0 / (1.0 + com)
    decay = 1.0 - alpha
    new_wt = 1.0 if adjust else alpha
    gap_decay = 1.0 if ignore_na else decay  # how the past decays over a missing value
    n = stop - first
    avg = np.full(n, _NAN)
    old_wt = np.ones(n)
    nobs = np.zeros(n)
    lo = float(min_periods)
    for t in range(T):
        xr, row = x[t, first:stop], out[t, first:stop]
        if min_periods > 1:
            _ewm_mean_row(True, xr, row, avg, old_wt, nobs, decay, gap_decay, new_wt, adjust, lo)
        else:
            _ewm_mean_row(False, xr, row, avg, old_wt, nobs, decay, gap_decay, new_wt, adjust, lo)


@njit(inline="always")
def _ewm_var_row(count_obs, xr, row, avg, var, sum_wt2, old_wt, nobs, decay, gap_decay, new_wt, adjust, bias,
                 take_sqrt, lo):
    """One row of ``_ewm_var_kernel`` (``count_obs`` as in ``_ewm_mean_row``)."""
    for j in range(row.shape[0]):
        v = np.float64(xr[j])
        ok = v == v
        m = avg[j]
        started = m == m
        f = decay if ok else gap_decay
        wt = old_wt[j] * f
        sw2 = sum_wt2[j] * (f * f)
        mm = m if started else v
        inv = 1.0 / (wt + new_wt)
        m1 = mm if mm == v else (wt * mm + new_wt * v) * inv
        va1 = (wt * (var[j] + (mm - m1) * (mm - m1)) + new_wt * (v - m1) * (v - m1)) * inv
        wt1 = wt + new_wt
        sw21 = sw2 + new_wt * new_wt
        if not adjust:
            sw21 = sw21 / (wt1 * wt1)
            wt1 = 1.0
        upd = ok & started
        m = m1 if ok else m
        va = va1 if upd else (0.0 if ok else var[j])
        sw2 = sw21 if upd else (1.0 if ok else sw2)
        wt = wt1 if upd else (1.0 if ok else wt)
        avg[j] = m + 0.0
        var[j] = va + 0.0
        sum_wt2[j] = sw2 + 0.0
        old_wt[j] = wt + 0.0
        num = wt * wt
        den = num - sw2
        res = va if bias else (num / den * va if den > 0.0 else _NAN)
        if count_obs:
            c = nobs[j] + (1.0 if ok else 0.0)
            nobs[j] = c
            res = res if (c >= lo) & (m == m) else _NAN
        else:
            res = res if m == m else _NAN
        if take_sqrt:
            res = math.sqrt(res if res > 0.0 else 0.0) if res == res else _NAN
        row[j] = res


@njit(**_JIT)
def _ewm_var_kernel(x, out, com, adjust, ignore_na, min_periods, bias, take_sqrt, first, stop):
    """Exponentially weighted variance (ewmcov with y = x), debiased unless ``bias``. pandas'
    ``sum_wt`` always equals ``old_wt`` (same start, same updates; 1 after each value without
    ``adjust``), so one is kept."""
    T = x.shape[0]
    alpha = 1.0 / (1.0 + com)
    decay = 1.0 - alpha
    new_wt = 1.0 if adjust else alpha
    gap_decay = 1.0 if ignore_na else decay
    n = stop - first
    avg = np.full(n, _NAN)
    var = np.zeros(n)
    sum_wt2 = np.ones(n)
    old_wt = np.ones(n)
    nobs = np.zeros(n)
    lo = float(min_periods)
    for t in range(T):
        xr, row = x[t, first:stop], out[t, first:stop]
        if min_periods > 1:
            _ewm_var_row(True, xr, row, avg, var, sum_wt2, old_wt, nobs, decay, gap_decay, new_wt, adjust, bias,
                         take_sqrt, lo)
        else:
            _ewm_var_row(False, xr, row, avg, var, sum_wt2, old_wt, nobs, decay, gap_decay, new_wt, adjust, bias,
                         take_sqrt, lo)


# ==================================================================== lags and cross-sections
@njit(**_JIT)
def _lag_kernel(x, out, periods, what, first, stop):
    """shift / diff / simple return / log return against the value ``periods`` rows earlier."""
    T, M = x.shape
    for t in range(first, stop):
        s = t - periods
        row = out[t]
        if s < 0 or s >= T:
            row[:] = _NAN
            continue
        now, then = x[t], x[s]
        if what == _SHIFT:
            for j in range(M):
                row[j] = then[j]
        elif what == _DIFF:
            for j in range(M):
                row[j] = np.float64(now[j]) - np.float64(then[j])
        elif what == _PCT:
            for j in range(M):
                row[j] = np.float64(now[j]) / np.float64(then[j]) - 1.0
        else:
            for j in range(M):
                row[j] = np.log(np.float64(now[j]) / np.float64(then[j]))


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
            below, upto = (g, h) if ascending else (k - h, k - g)
            if method == 1:
                rk = below + 1.0
            elif method == 2:
                rk = float(upto)
            else:
                rk = (below + 1 + upto) / 2.0
            for m in range(g, h):
                out[i, idx[m]] = rk / k if pct else rk
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


# ====================================================================== running the kernels
_warm: set = set()


def _cache_lock() -> FileLock:
    """numba writes its on-disk cache without locking (numba#4807): serialise first calls across
    processes (pytest-xdist workers, parallel jobs) on a lock named after this file."""
    tag = hashlib.sha1(os.path.abspath(__file__).encode()).hexdigest()[:12]
    return FileLock(os.path.join(tempfile.gettempdir(), f"fintensor-numba-{tag}.lock"))


_SERIAL_BELOW = 200_000  # elements: below this, waking another thread costs more than it saves
_pool: ThreadPoolExecutor | None = None


def _run(kernel: Callable, units: int, *args) -> None:
    """``kernel(*args, first, stop)`` over ``units`` columns (or rows), split into one contiguous
    range per thread (``numba.get_num_threads()``; the kernels release the GIL). Results do not
    depend on the split. The first call per (kernel, dtype) in this process compiles or loads the
    cached machine code, alone, under an inter-process lock."""
    global _pool
    key = (kernel.__name__, args[0].dtype.char)
    if key not in _warm:
        with _cache_lock():
            kernel(*args, 0, units)
        _warm.add(key)
        return
    threads = _imin(numba.get_num_threads(), units) if args[0].size >= _SERIAL_BELOW else 1
    if threads <= 1:
        kernel(*args, 0, units)
        return
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=_imax(1, (os.cpu_count() or 2) - 1),
                                   thread_name_prefix="fintensor-rolling")
    bounds = [units * i // threads for i in range(threads + 1)]
    pending = [_pool.submit(kernel, *args, lo, hi) for lo, hi in zip(bounds[1:-1], bounds[2:])]
    kernel(*args, bounds[0], bounds[1])
    for job in pending:
        job.result()


# ====================================================================== inputs and outputs
def _time_axis(dims: tuple) -> int:
    for name in ("time", "tick"):
        if name in dims:
            return dims.index(name)
    return 0


def _resolve_axis(axis, ndim: int, dims: tuple | None, default: int) -> int:
    if axis is None:
        return default
    if isinstance(axis, str):
        if dims is None or axis not in dims:
            raise BadInputError(f"axis {axis!r} is not a dimension of the input (dims: {dims}); "
                                "pass an int axis or one of the dims")
        return dims.index(axis)
    if not isinstance(axis, (int, np.integer)) or not -ndim <= axis < ndim:
        raise BadInputError(f"axis {axis!r} is out of range for a {ndim}-D input; pass 0..{ndim - 1}")
    return int(axis) % ndim


class _Input:
    """An input unwrapped to an array (numpy, or torch for the torch path) plus how to wrap a result
    of the same shape back into the input's type."""

    def __init__(self, x, what: str, engine: str):
        self.tensor = x if isinstance(x, StockTensor) else None
        data = x.values if self.tensor is not None else x
        self.dims = tuple(self.tensor.dims) if self.tensor is not None else None
        self.is_torch = isinstance(data, torch.Tensor)
        if engine not in ("auto", "numba", "torch"):
            raise BadInputError(f"engine {engine!r} is unknown; use 'auto', 'numba' or 'torch'")
        self.use_torch = engine == "torch" or (self.is_torch and data.device.type != "cpu")
        if self.use_torch and engine == "numba":
            raise BadInputError("engine='numba' runs on the CPU; move the tensor with .cpu() first")
        if self.is_torch:
            data = data.detach()
            if not (data.is_floating_point() and data.dtype in (torch.float32, torch.float64)):
                data = data.to(torch.float64)
            self.device = data.device
            self.array = data if self.use_torch else data.numpy()
        else:
            array = np.asarray(data)
            if array.dtype not in (np.float32, np.float64):
                if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
                    raise BadInputError(f"{what} must be numeric, got dtype {array.dtype}")
                array = array.astype(np.float64)
            self.array = torch.from_numpy(array) if self.use_torch else array
        if self.array.ndim == 0 or self.array.ndim > 4:
            raise BadInputError(f"{what} must have 1 to 4 dimensions, got {self.array.ndim}")
        self.dtype = self.array.dtype

    @property
    def shape(self) -> tuple:
        return tuple(self.array.shape)

    def axis(self, axis, default: int | None = None) -> int:
        fallback = _time_axis(self.dims) if self.dims is not None else 0
        return _resolve_axis(axis, self.array.ndim, self.dims, fallback if default is None else default)

    def wrap(self, result):
        """Result (numpy or torch, input's shape) -> the input's type."""
        if self.is_torch or self.tensor is not None:
            if isinstance(result, np.ndarray):
                result = torch.from_numpy(result)
            result = result.to(self.device) if self.is_torch else result
        if self.tensor is not None:
            return self.tensor.with_values(result, mask=~torch.isnan(result))
        return result


def _panel(a, axis: int):
    """(T, M) C-contiguous view (or copy) of ``a`` with ``axis`` first."""
    width = math.prod(a.shape[:axis] + a.shape[axis + 1:])
    if isinstance(a, torch.Tensor):
        return torch.movedim(a, axis, 0).reshape(a.shape[axis], width).contiguous()
    return np.ascontiguousarray(np.moveaxis(a, axis, 0)).reshape(a.shape[axis], width)


def _unpanel(p, shape: tuple, axis: int):
    """Inverse of ``_panel`` for a result of the same shape."""
    moved = (shape[axis],) + shape[:axis] + shape[axis + 1:]
    if isinstance(p, torch.Tensor):
        return torch.movedim(p.reshape(moved), 0, axis)
    return np.moveaxis(p.reshape(moved), 0, axis)


def _check_out(out, inp: _Input):
    """The array to write into (numpy, or torch for torch and StockTensor inputs), validated."""
    if out is None:
        return None
    target = out.values if isinstance(out, StockTensor) else out
    wants_torch = inp.is_torch or inp.tensor is not None
    kind = "a torch.Tensor" if wants_torch else "a numpy array"
    if not isinstance(target, torch.Tensor if wants_torch else np.ndarray):
        raise BadInputError(f"out must be {kind} like the input, got {type(out).__name__}")
    dtype = inp.array.dtype
    if wants_torch and isinstance(dtype, np.dtype):
        dtype = torch.from_numpy(np.empty(0, dtype)).dtype
    if tuple(target.shape) != inp.shape or target.dtype != dtype:
        raise BadInputError(f"out has shape {tuple(target.shape)} and dtype {target.dtype}; the result "
                            f"needs shape {inp.shape} and dtype {dtype}")
    return target


def _apply(x, axis, out, engine: str, numba_fn: Callable, torch_fn: Callable, what: str = "x"):
    """Run one statistic along ``axis``: the numba kernel on a (T, M) panel, or the torch ops;
    write into ``out`` when given (directly when its layout allows, else through a copy)."""
    inp = _Input(x, what, engine)
    ax = inp.axis(axis)
    target = _check_out(out, inp)
    if inp.use_torch:
        with torch.no_grad():
            res = _unpanel(torch_fn(_panel(inp.array, ax)), inp.shape, ax)
    else:
        panel = _panel(inp.array, ax)
        dest = target.numpy() if isinstance(target, torch.Tensor) else target
        direct = (dest is not None and ax == 0 and dest.flags.c_contiguous
                  and not np.shares_memory(dest, inp.array))
        res2d = dest.reshape(panel.shape) if direct else np.empty_like(panel)
        if panel.size:
            numba_fn(panel, res2d)
        if direct:
            return inp.wrap(target)
        res = _unpanel(res2d, inp.shape, ax)
    return _deliver(inp, target, res)


def _deliver(inp: _Input, target, res):
    """The result in the input's type, copied into ``out`` (``target``) when one was given."""
    if target is None:
        return inp.wrap(res)
    if isinstance(target, torch.Tensor):
        target.copy_(torch.as_tensor(res))
    else:
        np.copyto(target, res)
    return inp.wrap(target)


def _window_args(window, min_periods) -> tuple[int, int]:
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise BadInputError(f"window must be a positive integer, got {window!r}")
    window = int(window)
    if min_periods is None:
        return window, window
    if isinstance(min_periods, bool) or not isinstance(min_periods, (int, np.integer)) \
            or not 0 <= min_periods <= window:
        raise BadInputError(f"min_periods must be an integer from 0 to the window ({window}), "
                            f"got {min_periods!r}")
    return window, int(min_periods)


def _ddof_arg(ddof) -> int:
    if isinstance(ddof, bool) or not isinstance(ddof, (int, np.integer)) or ddof < 0:
        raise BadInputError(f"ddof must be a non-negative integer, got {ddof!r}")
    return int(ddof)


# ============================================================================== torch path
def _torch_windows(p: torch.Tensor, window: int, f: Callable, chunk_bytes: int = 1 << 26):
    """Apply ``f(win, last, start)`` to time chunks of the windows of a (T, M) float64 panel:
    ``win`` is (t, M, window), NaN-padded before the first row; ``last`` the windows' newest
    values; ``start`` how many padded slots each window has."""
    T, M = p.shape
    pad = torch.full((window - 1, M), float("nan"), dtype=p.dtype, device=p.device)
    padded = torch.cat([pad, p])
    step = _imax(1, chunk_bytes // _imax(1, M * window * 8))
    parts = []
    for t0 in range(0, T, step):
        t1 = _imin(T, t0 + step)
        win = padded[t0:t1 + window - 1].unfold(0, window, 1)
        skipped = (window - 1 - torch.arange(t0, t1, device=p.device)).clamp(min=0)
        parts.append(f(win, p[t0:t1], skipped))
    return torch.cat(parts) if parts else torch.empty_like(p)


def _torch_rolling(kind: str, p: torch.Tensor, window: int, min_periods: int, **kw) -> torch.Tensor:
    """The windowed statistics with plain torch ops (two-pass moments, exact like the kernels)."""
    dtype = p.dtype
    p = p.to(torch.float64)
    nan = float("nan")
    T = p.shape[0]
    size = torch.arange(1, T + 1, device=p.device).clamp(max=window).to(p.dtype)[:, None]

    def f(win, last, skipped):
        valid = ~torch.isnan(win)
        cnt = valid.sum(-1).to(p.dtype)
        enough = (cnt >= min_periods) & (cnt > 0)
        if kind == "count":
            return cnt
        zero = torch.zeros((), dtype=p.dtype, device=p.device)
        total = torch.where(valid, win, zero).sum(-1)
        if kind == "sum":
            return torch.where(cnt >= min_periods, total, nan)
        mu = total / cnt
        if kind == "mean":
            return torch.where(enough, mu, nan)
        if kind in ("var", "std", "zscore"):
            ddof = kw["ddof"]
            m2 = torch.where(valid, (win - mu[..., None]) ** 2, zero).sum(-1)
            var = torch.where(enough & (cnt > ddof), m2 / (cnt - ddof), nan)
            if kind == "var":
                return var
            sd = var.sqrt()
            if kind == "std":
                return sd
            return torch.where(sd > 0, (last - mu) / sd, nan)
        if kind in ("max", "min", "argmax", "argmin"):
            sign = 1.0 if kind in ("max", "argmax") else -1.0
            filled = torch.where(valid, sign * win, -torch.inf)
            if kind in ("max", "min"):
                return torch.where(enough, sign * filled.amax(-1), nan)
            return torch.where(enough, (filled.argmax(-1) - skipped[:, None]).to(p.dtype), nan)
        if kind in ("median", "quantile"):
            q = 0.5 if kind == "median" else kw["q"]
            return torch.where(enough, torch.nanquantile(win, q, dim=-1), nan)
        if kind == "rank":
            v = last[..., None]
            below = (valid & (win < v)).sum(-1).to(p.dtype)
            upto = (valid & (win <= v)).sum(-1).to(p.dtype)
            if not kw["ascending"]:
                below, upto = cnt - upto, cnt - below
            rk = {"min": below + 1, "max": upto}.get(kw["method"], (below + 1 + upto) / 2)
            rk = rk / cnt if kw["pct"] else rk
            return torch.where(enough & ~torch.isnan(last), rk, nan)
        raise AssertionError(kind)

    if kind == "count":  # pandas: min_periods counts the rows in the window, NaN or not
        res = torch.where(size >= min_periods, _torch_windows(p, window, f), nan)
    else:
        res = _torch_windows(p, window, f)
    return res.to(dtype)


def _torch_pairwise(kind: str, py: torch.Tensor, px: torch.Tensor, window: int, min_periods: int,
                    ddof: int) -> torch.Tensor:
    dtype = py.dtype
    py, px = py.to(torch.float64), px.to(torch.float64).expand_as(py)
    both = ~(torch.isnan(py) | torch.isnan(px))
    nan = float("nan")
    py_m = torch.where(both, py, nan)
    px_m = torch.where(both, px, nan)
    zero = torch.zeros((), dtype=torch.float64, device=py.device)
    stacked = torch.cat([py_m, px_m], dim=1)
    M = py.shape[1]

    def f(win, last, skipped):
        wy, wx = win[:, :M], win[:, M:]
        valid = ~torch.isnan(wy)
        cnt = valid.sum(-1).to(torch.float64)
        my = torch.where(valid, wy, zero).sum(-1) / cnt
        mx = torch.where(valid, wx, zero).sum(-1) / cnt
        ey = torch.where(valid, wy - my[..., None], zero)
        ex = torch.where(valid, wx - mx[..., None], zero)
        cxx, cyy, cxy = (ex * ex).sum(-1), (ey * ey).sum(-1), (ex * ey).sum(-1)
        enough = (cnt >= min_periods) & (cnt > 0)
        if kind == "cov":
            res = torch.where(cnt > ddof, cxy / (cnt - ddof), nan)
        elif kind == "beta":
            res = torch.where(cxx > 0, cxy / cxx, nan)
        elif kind == "resid":
            ly, lx = last[:, :M], last[:, M:]
            res = torch.where(cxx > 0, (ly - my) - cxy / cxx * (lx - mx), nan)
        else:
            r = torch.where((cxx > 0) & (cyy > 0), cxy / (cxx * cyy).sqrt(), nan)
            res = r if kind == "corr" else r * r
        return torch.where(enough, res, nan)

    return _torch_windows(stacked, window, f).to(dtype)


def _torch_ewm(p: torch.Tensor, com: float, adjust: bool, ignore_na: bool, min_periods: int,
               kind: str, bias: bool) -> torch.Tensor:
    """pandas' ewma / ewmcov recurrences, vectorised across columns, one time step at a time."""
    dtype = p.dtype
    p = p.to(torch.float64)
    T, M = p.shape
    alpha = 1.0 / (1.0 + com)
    decay, new_wt = 1.0 - alpha, (1.0 if adjust else alpha)
    nan = torch.full((M,), float("nan"), dtype=torch.float64, device=p.device)
    avg, var = nan.clone(), torch.zeros_like(nan)
    old_wt, sum_wt, sum_wt2 = torch.ones_like(nan), torch.ones_like(nan), torch.ones_like(nan)
    nobs = torch.zeros_like(nan)
    out = torch.empty_like(p)
    for t in range(T):
        v = p[t]
        ok = ~torch.isnan(v)
        nobs += ok
        started = ~torch.isnan(avg)
        step = started & (ok | (not ignore_na))
        upd = step & ok
        old_wt = torch.where(step, old_wt * decay, old_wt)
        sum_wt = torch.where(step, sum_wt * decay, sum_wt)
        sum_wt2 = torch.where(step, sum_wt2 * decay * decay, sum_wt2)
        m_new = torch.where(avg != v, (old_wt * avg + new_wt * v) / (old_wt + new_wt), avg)
        var_new = (old_wt * (var + (avg - m_new) ** 2) + new_wt * (v - m_new) ** 2) / (old_wt + new_wt)
        var = torch.where(upd, var_new, var)
        avg = torch.where(upd, m_new, avg)
        sum_wt = torch.where(upd, sum_wt + new_wt, sum_wt)
        sum_wt2 = torch.where(upd, sum_wt2 + new_wt * new_wt, sum_wt2)
        old_wt = torch.where(upd, old_wt + new_wt, old_wt)
        if not adjust:
            sum_wt = torch.where(upd, sum_wt / old_wt, sum_wt)
            sum_wt2 = torch.where(upd, sum_wt2 / old_wt ** 2, sum_wt2)
            old_wt = torch.where(upd, torch.ones_like(old_wt), old_wt)
        first = ~started & ok
        avg = torch.where(first, v, avg)
        var, sum_wt, sum_wt2, old_wt = (torch.where(first, torch.full_like(a, f), a) for a, f in
                                        ((var, 0.0), (sum_wt, 1.0), (sum_wt2, 1.0), (old_wt, 1.0)))
        have = (nobs >= min_periods) & ~torch.isnan(avg)
        if kind == "mean":
            out[t] = torch.where(have, avg, nan)
            continue
        num = sum_wt * sum_wt
        den = num - sum_wt2
        res = var if bias else torch.where(den > 0, num / den * var, nan)
        res = torch.where(have, res, nan)
        out[t] = res.clamp(min=0).sqrt() if kind == "std" else res
    return out.to(dtype)


def _torch_lag(p: torch.Tensor, periods: int, what: int) -> torch.Tensor:
    dtype = p.dtype
    p = p.to(torch.float64)
    T = p.shape[0]
    prev = torch.full_like(p, float("nan"))
    if abs(periods) < T:
        if periods >= 0:
            prev[periods:] = p[:T - periods]
        else:
            prev[:T + periods] = p[-periods:]
    res = {_SHIFT: lambda: prev, _DIFF: lambda: p - prev, _PCT: lambda: p / prev - 1.0,
           _LOGRET: lambda: torch.log(p / prev)}[what]()
    return res.to(dtype)


def _torch_cs(kind: str, p: torch.Tensor, **kw) -> torch.Tensor:
    """Cross-sectional rank / zscore along the last axis of a (R, S) panel."""
    dtype = p.dtype
    p = p.to(torch.float64)
    valid = ~torch.isnan(p)
    cnt = valid.sum(-1, keepdim=True).to(torch.float64)
    nan = float("nan")
    if kind == "zscore":
        mu = torch.where(valid, p, 0.0).sum(-1, keepdim=True) / cnt
        m2 = torch.where(valid, (p - mu) ** 2, 0.0).sum(-1, keepdim=True)
        sd = torch.where(cnt > kw["ddof"], (m2 / (cnt - kw["ddof"])).sqrt(), nan)
        return torch.where(valid & (sd > 0), (p - mu) / sd, nan).to(dtype)
    filled = torch.where(valid, p, torch.inf)
    srt = filled.sort(-1).values
    below = torch.searchsorted(srt, filled.contiguous(), right=False).to(torch.float64)
    upto = torch.searchsorted(srt, filled.contiguous(), right=True).to(torch.float64)
    upto = torch.minimum(upto, cnt)
    if not kw["ascending"]:
        below, upto = cnt - upto, cnt - below
    rk = {"min": below + 1, "max": upto}.get(kw["method"], (below + 1 + upto) / 2)
    rk = rk / cnt if kw["pct"] else rk
    return torch.where(valid, rk, nan).to(dtype)


# ================================================================================ public API
def _moving(kind: str, mode: int, x, window: int, min_periods, axis, out, engine, ddof: int = 1):
    window, min_periods = _window_args(window, min_periods)
    ddof = _ddof_arg(ddof)

    def numba_fn(p, r):
        if kind in ("sum", "mean", "count"):
            _run(_sums_kernel, p.shape[1], p, r, window, min_periods, mode)
        else:
            _run(_moments_kernel, p.shape[1], p, r, window, min_periods, ddof, mode)

    return _apply(x, axis, out, engine, numba_fn,
                  lambda p: _torch_rolling(kind, p, window, min_periods, ddof=ddof))


def sum(x, window: int, *, min_periods: int | None = None, axis=None, out=None, engine: str = "auto"):
    """Moving sum of the valid values (0 when none is valid and min_periods is 0), like
    ``DataFrame.rolling(window, min_periods).sum()``."""
    return _moving("sum", _SUM, x, window, min_periods, axis, out, engine)


def mean(x, window: int, *, min_periods: int | None = None, axis=None, out=None, engine: str = "auto"):
    """Moving mean of the valid values, like ``DataFrame.rolling(window, min_periods).mean()``."""
    return _moving("mean", _MEAN, x, window, min_periods, axis, out, engine)


def count(x, window: int, *, min_periods: int | None = None, axis=None, out=None, engine: str = "auto"):
    """Number of valid values in the window. As in pandas, ``min_periods`` counts the window's
    rows (valid or not): the first ``min_periods - 1`` rows are NaN."""
    return _moving("count", _COUNT, x, window, min_periods, axis, out, engine)


def var(x, window: int, *, ddof: int = 1, min_periods: int | None = None, axis=None, out=None,
        engine: str = "auto"):
    """Moving variance (``ddof`` 1 like pandas), exact for prices far from zero and after spikes."""
    return _moving("var", _VAR, x, window, min_periods, axis, out, engine, ddof)


def std(x, window: int, *, ddof: int = 1, min_periods: int | None = None, axis=None, out=None,
        engine: str = "auto"):
    """Moving standard deviation: the square root of ``var``."""
    return _moving("std", _STD, x, window, min_periods, axis, out, engine, ddof)


def zscore(x, window: int, *, ddof: int = 1, min_periods: int | None = None, axis=None, out=None,
           engine: str = "auto"):
    """``(x - moving mean) / moving std`` of the window ending at each value (NaN where the value is
    missing or the window is constant)."""
    return _moving("zscore", _ZSCORE, x, window, min_periods, axis, out, engine, ddof)


def _extreme(kind: str, x, window, min_periods, axis, out, engine):
    window, min_periods = _window_args(window, min_periods)
    sign = 1.0 if kind in ("max", "argmax") else -1.0
    want_index = kind.startswith("arg")

    def numba_fn(p, r):
        _run(_extremes_kernel, p.shape[1], p, r, window, min_periods, sign, want_index)

    return _apply(x, axis, out, engine, numba_fn, lambda p: _torch_rolling(kind, p, window, min_periods))


def max(x, window: int, *, min_periods: int | None = None, axis=None, out=None, engine: str = "auto"):
    """Moving maximum of the valid values, like ``DataFrame.rolling(window, min_periods).max()``."""
    return _extreme("max", x, window, min_periods, axis, out, engine)


def min(x, window: int, *, min_periods: int | None = None, axis=None, out=None, engine: str = "auto"):
    """Moving minimum of the valid values, like ``DataFrame.rolling(window, min_periods).min()``."""
    return _extreme("min", x, window, min_periods, axis, out, engine)


def argmax(x, window: int, *, min_periods: int | None = None, axis=None, out=None,
           engine: str = "auto"):
    """Position of the window's maximum counted from the window's oldest row (0 .. window-1), the
    oldest winning ties -- ``np.argmax`` of the window, NaN skipped. Windows cut by the start of the
    data count from the first row."""
    return _extreme("argmax", x, window, min_periods, axis, out, engine)


def argmin(x, window: int, *, min_periods: int | None = None, axis=None, out=None,
           engine: str = "auto"):
    """Position of the window's minimum (see ``argmax``)."""
    return _extreme("argmin", x, window, min_periods, axis, out, engine)


def _order(kind: str, mode: int, x, window, min_periods, axis, out, engine, q=0.5, method="average",
           ascending=True, pct=False):
    window, min_periods = _window_args(window, min_periods)
    if method not in _RANK_METHODS:
        raise BadInputError(f"method {method!r} is unknown; use one of {sorted(_RANK_METHODS)}")
    if isinstance(q, bool) or not isinstance(q, (int, float, np.floating)) or not 0.0 <= q <= 1.0:
        raise BadInputError(f"quantile q must be a number from 0 to 1, got {q!r}")

    def numba_fn(p, r):
        _run(_order_columns, p.shape[1], p, r[None], window, min_periods, np.array([mode]), np.array([float(q)]),
             _RANK_METHODS[method], bool(ascending), bool(pct))

    return _apply(x, axis, out, engine, numba_fn, lambda p: _torch_rolling(
        kind, p, window, min_periods, q=float(q), method=method, ascending=bool(ascending), pct=bool(pct)))


def _order_stats(x: np.ndarray, window: int, min_periods: int, quantiles=(), pct_rank: bool = False) -> list:
    """Several order statistics of a (T, N) float64 array's windows from one sorted pass: the
    ``quantiles``, then the percentile rank of the current value if ``pct_rank`` (features use it
    for QTLU, QTLD and RANK)."""
    whats = np.array([_QUANTILE] * len(quantiles) + [_RANK] * pct_rank, dtype=np.int64)
    qs = np.array(list(quantiles) + [0.0] * pct_rank, dtype=np.float64)
    x = np.ascontiguousarray(x, dtype=np.float64)
    out = np.empty((len(whats),) + x.shape)
    if x.size:
        _run(_order_columns, x.shape[1], x, out, int(window), int(min_periods), whats, qs, 0, True, True)
    return list(out)


def median(x, window: int, *, min_periods: int | None = None, axis=None, out=None,
           engine: str = "auto"):
    """Moving median of the valid values, like ``DataFrame.rolling(window, min_periods).median()``."""
    return _order("median", _MEDIAN, x, window, min_periods, axis, out, engine)


def quantile(x, window: int, q: float, *, min_periods: int | None = None, axis=None, out=None,
             engine: str = "auto"):
    """Moving ``q`` quantile with linear interpolation, like ``rolling(...).quantile(q)``."""
    return _order("quantile", _QUANTILE, x, window, min_periods, axis, out, engine, q=q)


def rank(x, window: int, *, method: str = "average", ascending: bool = True, pct: bool = False,
         min_periods: int | None = None, axis=None, out=None, engine: str = "auto"):
    """Rank of each value within its window (1 = smallest; ties by ``method``; ``pct`` divides by
    the valid count), like ``rolling(...).rank(method, ascending, pct)``."""
    return _order("rank", _RANK, x, window, min_periods, axis, out, engine, method=method,
                  ascending=ascending, pct=pct)


# ------------------------------------------------------------------------------- exponential
def _center_of_mass(com, span, halflife, alpha) -> float:
    given = {k: v for k, v in dict(com=com, span=span, halflife=halflife, alpha=alpha).items()
             if v is not None}
    if len(given) != 1:
        raise BadInputError("give exactly one of com, span, halflife, alpha "
                            f"(got {', '.join(given) or 'none'})")
    (name, value), = given.items()
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise BadInputError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if name == "com" and value >= 0:
        return value
    if name == "span" and value >= 1:
        return (value - 1) / 2
    if name == "halflife" and value > 0:
        return 1 / (1 - math.exp(math.log(0.5) / value)) - 1
    if name == "alpha" and 0 < value <= 1:
        return 1 / value - 1
    limits = {"com": ">= 0", "span": ">= 1", "halflife": "> 0", "alpha": "in (0, 1]"}
    raise BadInputError(f"{name} must be {limits[name]}, got {value!r}")


def _ewm(kind: str, x, com, span, halflife, alpha, adjust, ignore_na, min_periods, bias, axis, out,
         engine):
    c = _center_of_mass(com, span, halflife, alpha)
    if isinstance(min_periods, bool) or not isinstance(min_periods, (int, np.integer)) or min_periods < 0:
        raise BadInputError(f"min_periods must be a non-negative integer, got {min_periods!r}")
    minp = _imax(int(min_periods), 1)  # as pandas

    def numba_fn(p, r):
        if kind == "mean":
            _run(_ewm_mean_kernel, p.shape[1], p, r, c, bool(adjust), bool(ignore_na), minp)
        else:
            _run(_ewm_var_kernel, p.shape[1], p, r, c, bool(adjust), bool(ignore_na), minp, bool(bias),
                 kind == "std")

    return _apply(x, axis, out, engine, numba_fn,
                  lambda p: _torch_ewm(p, c, bool(adjust), bool(ignore_na), minp, kind, bool(bias)))


def ewm_mean(x, *, com: float | None = None, span: float | None = None, halflife: float | None = None,
             alpha: float | None = None, adjust: bool = True, ignore_na: bool = False,
             min_periods: int = 0, axis=None, out=None, engine: str = "auto"):
    """Exponentially weighted mean, like ``DataFrame.ewm(com|span|halflife|alpha, adjust=...,
    ignore_na=..., min_periods=...).mean()``."""
    return _ewm("mean", x, com, span, halflife, alpha, adjust, ignore_na, min_periods, False, axis,
                out, engine)


def ewm_var(x, *, com: float | None = None, span: float | None = None, halflife: float | None = None,
            alpha: float | None = None, adjust: bool = True, ignore_na: bool = False,
            min_periods: int = 0, bias: bool = False, axis=None, out=None, engine: str = "auto"):
    """Exponentially weighted variance, like ``DataFrame.ewm(...).var(bias=...)``."""
    return _ewm("var", x, com, span, halflife, alpha, adjust, ignore_na, min_periods, bias, axis,
                out, engine)


def ewm_std(x, *, com: float | None = None, span: float | None = None, halflife: float | None = None,
            alpha: float | None = None, adjust: bool = True, ignore_na: bool = False,
            min_periods: int = 0, bias: bool = False, axis=None, out=None, engine: str = "auto"):
    """Exponentially weighted standard deviation, like ``DataFrame.ewm(...).std(bias=...)``."""
    return _ewm("std", x, com, span, halflife, alpha, adjust, ignore_na, min_periods, bias, axis,
                out, engine)


# ---------------------------------------------------------------------------------- pairwise
def _pairwise(kind: str, mode: int, y, x, window, min_periods, ddof, axis, out, engine):
    """Run the pairwise kernel of ``y`` against ``x``: same shape, or a market series broadcast
    over every other axis (its length along time only)."""
    window, min_periods = _window_args(window, min_periods)
    ddof = _ddof_arg(ddof)
    ref = _Input(y, "y", engine)
    ax = ref.axis(axis)
    other = _Input(x, "x", "torch" if ref.use_torch else engine)  # x follows y to its device
    if other.use_torch != ref.use_torch:
        raise BadInputError("x is a CUDA tensor but y is not: move x to the CPU or y to the GPU")
    xa = other.array
    if other.shape != ref.shape:
        if xa.ndim == 1 and xa.shape[0] == ref.shape[ax]:
            xa = xa.reshape(-1, 1)
        else:
            raise BadInputError(f"x must have y's shape {ref.shape} or be one series of length "
                                f"{ref.shape[ax]} along the time axis; got shape {other.shape}")
    else:
        xa = _panel(xa, ax)

    def numba_fn(p, r):
        xp = np.ascontiguousarray(xa, dtype=p.dtype)
        step = 1 if xp.shape[1] == p.shape[1] else 0
        _run(_comoments_kernel, p.shape[1], p, xp, r, window, min_periods, ddof, mode, step)

    def torch_fn(p):
        return _torch_pairwise(kind, p, torch.as_tensor(xa).to(p.device), window, min_periods, ddof)

    return _apply(y, axis, out, engine, numba_fn, torch_fn, "y")


def cov(y, x, window: int, *, ddof: int = 1, min_periods: int | None = None, axis=None, out=None,
        engine: str = "auto"):
    """Moving covariance of y and x over the pairs where both are valid, like
    ``y.rolling(window, min_periods).cov(x)``; ``x`` may be one (market) series for every column."""
    return _pairwise("cov", _COV, y, x, window, min_periods, ddof, axis, out, engine)


def corr(y, x, window: int, *, min_periods: int | None = None, axis=None, out=None,
         engine: str = "auto"):
    """Moving correlation, like ``y.rolling(window, min_periods).corr(x)`` (NaN where either side
    is constant in the window)."""
    return _pairwise("corr", _CORR, y, x, window, min_periods, 1, axis, out, engine)


def beta(y, x, window: int, *, min_periods: int | None = None, axis=None, out=None,
         engine: str = "auto"):
    """Moving regression slope of y on x, ``cov(y, x) / var(x)`` -- a stock's beta to the market
    when ``x`` is the market's return series."""
    return _pairwise("beta", _BETA, y, x, window, min_periods, 1, axis, out, engine)


def _resid(y, x, window: int, *, min_periods: int | None = None, axis=None, out=None,
           engine: str = "auto"):
    """Residual of the current point from the moving regression of y on x (qlib's Resi)."""
    return _pairwise("resid", _RESID, y, x, window, min_periods, 1, axis, out, engine)


def _rsquare(y, x, window: int, *, min_periods: int | None = None, axis=None, out=None,
             engine: str = "auto"):
    """R-squared of the moving regression of y on x (qlib's Rsquare)."""
    return _pairwise("rsquare", _RSQUARE, y, x, window, min_periods, 1, axis, out, engine)


# ------------------------------------------------------------------------------- transforms
def _lag(what: int, x, periods, axis, out, engine):
    if isinstance(periods, bool) or not isinstance(periods, (int, np.integer)):
        raise BadInputError(f"periods must be an integer, got {periods!r}")
    periods = int(periods)
    return _apply(x, axis, out, engine, lambda p, r: _run(_lag_kernel, p.shape[0], p, r, periods, what),
                  lambda p: _torch_lag(p, periods, what))


def returns(x, periods: int = 1, *, log: bool = False, axis=None, out=None, engine: str = "auto"):
    """``x[t] / x[t-periods] - 1`` (``log``: ``log(x[t] / x[t-periods])``), like
    ``pct_change(periods)``; NaN where either value is missing."""
    return _lag(_LOGRET if log else _PCT, x, periods, axis, out, engine)


def diff(x, periods: int = 1, *, axis=None, out=None, engine: str = "auto"):
    """``x[t] - x[t-periods]``, like ``DataFrame.diff(periods)``."""
    return _lag(_DIFF, x, periods, axis, out, engine)


def shift(x, periods: int = 1, *, axis=None, out=None, engine: str = "auto"):
    """``x[t-periods]`` (NaN where that is outside the data), like ``DataFrame.shift(periods)``.
    A negative ``periods`` reads the future: use it for labels only."""
    return _lag(_SHIFT, x, periods, axis, out, engine)


def _stock_axis(inp: _Input, axis) -> int:
    if axis is None and inp.dims is not None:
        if "stock" not in inp.dims:
            raise BadInputError(f"the tensor has no 'stock' dim (dims: {inp.dims}); pass axis=")
        return inp.dims.index("stock")
    return inp.axis(axis, default=1 if inp.array.ndim > 1 else 0)


def _cross_section(kind: str, x, axis, out, engine, numba_fn: Callable, **kw):
    """Apply a per-row kernel over the stock axis (moved last), at every time step."""
    inp = _Input(x, "x", engine)
    ax = _stock_axis(inp, axis)
    last = inp.array.ndim - 1
    # a cross-section is a row of the panel whose "time" axis is every axis but the stock axis
    moved_ax = 0 if inp.array.ndim == 1 else last
    to_rows = (lambda a: a.reshape(1, -1)) if inp.array.ndim == 1 else (
        lambda a: a.reshape(-1, a.shape[-1]))
    if inp.use_torch:
        a = torch.movedim(inp.array, ax, moved_ax).contiguous()
        res = torch.movedim(_torch_cs(kind, to_rows(a), **kw).reshape(a.shape), moved_ax, ax)
    else:
        a = np.ascontiguousarray(np.moveaxis(inp.array, ax, moved_ax))
        r = np.empty_like(a)
        if a.size:
            numba_fn(to_rows(a), to_rows(r))
        res = np.moveaxis(r, moved_ax, ax)
    return _deliver(inp, _check_out(out, inp), res)


def cs_rank(x, *, axis=None, method: str = "average", ascending: bool = True, pct: bool = False,
            out=None, engine: str = "auto"):
    """Cross-sectional rank over the stock axis at each time step (NaN stays NaN), like
    ``DataFrame.rank(axis=1, method, ascending, pct)`` on a (time, stock) frame."""
    if method not in _RANK_METHODS:
        raise BadInputError(f"method {method!r} is unknown; use one of {sorted(_RANK_METHODS)}")
    return _cross_section(
        "rank", x, axis, out, engine,
        lambda p, r: _run(_cs_rank_kernel, p.shape[0], p, np.argsort(p, axis=1, kind="stable"), r,
                          _RANK_METHODS[method], bool(ascending), bool(pct)),
        method=method, ascending=bool(ascending), pct=bool(pct))


def cs_zscore(x, *, axis=None, ddof: int = 1, out=None, engine: str = "auto"):
    """Cross-sectional ``(x - mean) / std`` over the stock axis at each time step, NaN-aware."""
    ddof = _ddof_arg(ddof)
    return _cross_section("zscore", x, axis, out, engine,
                          lambda p, r: _run(_cs_zscore_kernel, p.shape[0], p, r, ddof), ddof=ddof)
