"""The numba moving-window kernels: sums, moments, extremes and co-moments over the van Herk /
Gil-Werman blocks, exponential weights and lags. Each kernel fills columns (or rows) [first, stop) of
a C-ordered (T, M) panel; ``_parallel.run`` hands each thread its range."""
from __future__ import annotations

import builtins
import math
import types

import numpy as np
from numba import njit

# error_model="numpy": float division by zero gives inf/NaN instead of raising. No fastmath: the
# kernels test x == x to find NaN, which fastmath's no-NaN assumption would fold away.
_JIT = dict(cache=True, nogil=True, error_model="numpy")
_NAN = np.nan
_imin, _imax = builtins.min, builtins.max
_SCRATCH_BYTES = 1 << 25  # a strip's suffix scratch at most (32 MiB): bounds memory for long windows
_MIN_STRIP = 512  # columns: shorter row segments make the memory traffic slow (rows are far apart)


@njit(inline="always")
def _rank_value(below, upto, k, method, ascending, pct):
    """The rank (pandas' ``method`` 0 average, 1 min, 2 max) of a value with ``below`` of the ``k`` valid
    values (of a window, or of a cross-section) smaller than it and ``upto`` not larger."""
    if not ascending:
        below, upto = k - upto, k - below
    if method == 1:
        res = below + 1.0
    elif method == 2:
        res = float(upto)
    else:
        res = (below + 1 + upto) / 2.0
    return res / k if pct else res


# kernel modes (small ints, so that one compiled kernel serves a family of statistics)
_SUM, _MEAN, _COUNT, _VAR, _STD, _ZSCORE = range(6)
_COV, _CORR, _BETA, _RESID, _RSQUARE = range(5)
_MAX, _MIN, _ARGMAX, _ARGMIN = range(4)
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
# Every block kernel is one instance of ``_block_template``: the template handles columns [first,
# stop) (``_run`` gives each thread its range) in strips of adjacent columns (``_strip_width``) and
# cuts time into blocks of ``window`` rows. The statistic supplies two steps: ``_forward`` walks a
# block's rows, accumulating prefix statistics and combining them with the previous block's suffix
# statistics, stored by start offset (scratch row ``window`` is the empty suffix); ``_backward``
# walks a finished block backwards and stores its suffix statistics for the next block.
# Inner loops run over the columns of one row (row views, so that they vectorise), load every operand
# unconditionally and pick results with selects, not branches; the statistic (``what``) is chosen
# outside them. Counts of valid values are small integers, exact under add and remove: where a
# kernel needs only the window's count, it keeps a running one (+ the new row, - the row leaving).
def _block_template(y, x, x_step, out, window, min_periods, ddof, what, first, stop):
    """The block scheme's skeleton (bottleneck's move_template, as a function whose globals
    ``_forward``, ``_backward``, ``_STATES`` and ``_EMPTY_IS_NAN`` each kernel binds): per strip, the
    scratch (``_STATES`` suffix statistics per row and column, a prefix, a running count and the
    pivots: prefix y, prefix x, suffix y, suffix x), then the blocks in order."""
    T = y.shape[0]
    w = window
    width = _strip_width(stop - first, w, _STATES)
    for c0 in range(first, stop, width):
        n = _imin(width, stop - c0)
        suffix = np.zeros((w + 2, _STATES, n))  # row w: the empty suffix; row w + 1: a spare
        if _EMPTY_IS_NAN:
            suffix[:, 0] = _NAN
        prefix = np.empty((_STATES, n))
        count = np.zeros(n)
        pivots = np.full((4, n), _NAN)
        for tb in range(0, T, w):
            te = _imin(tb + w, T)
            _forward(y, x, x_step, out, c0, n, tb, te, w, min_periods, ddof, what, suffix, prefix, count, pivots)
            if te - tb == w and te < T:
                _backward(y, x, x_step, c0, n, tb, w, what, suffix, pivots)


def _block_kernel(name: str, forward, backward, states: int, empty_is_nan: bool = False):
    """Compile (and cache on disk, under ``name``) an instance of ``_block_template`` with these
    steps. A copy of the template's code with its own globals, not a closure: numba caches it, and
    calls the steps directly, so they inline as in a hand-written kernel."""
    scope = dict(globals(), _forward=forward, _backward=backward, _STATES=states, _EMPTY_IS_NAN=empty_is_nan)
    kernel = types.FunctionType(_block_template.__code__, scope, name)
    kernel.__qualname__ = name
    return njit(**_JIT)(kernel)


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


# ---------------------------------------------------------------- sum / mean / count
@njit(inline="always")
def _sum_row(mean, xr, gone, leaving, row, ss, prefix, cnt, lo):
    """One row of the sums: the block prefix plus the previous block's suffix ``ss``, and the
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


@njit(inline="always")
def _sums_forward(x, _x, _x_step, out, c0, n, tb, te, w, min_periods, _ddof, what, suffix, prefix, cnt, _piv):
    """sum / mean / count: block prefix + suffix sums, nothing subtracted, and a running count."""
    lo = float(min_periods) if what == _SUM else float(_imax(min_periods, 1))
    pre = prefix[0]
    pre[:] = 0.0
    for t in range(tb, te):
        xr = x[t, c0:c0 + n]
        gone = x[_imax(t - w, 0), c0:c0 + n]  # the row leaving the window (if t >= w)
        leaving = 1.0 if t >= w else 0.0
        row = out[t, c0:c0 + n]
        ss = suffix[t - tb + 1, 0]  # suffix from t - w + 1 (offset t - tb + 1 in the previous block)
        if what == _COUNT:
            for j in range(n):
                c = cnt[j] + (_valid(xr[j]) - leaving * _valid(gone[j]))
                cnt[j] = c
                row[j] = c
            if t + 1 < min_periods:  # pandas: min_periods counts the window's rows here
                row[:] = _NAN
        elif what == _SUM:
            _sum_row(False, xr, gone, leaving, row, ss, pre, cnt, lo)
        else:
            _sum_row(True, xr, gone, leaving, row, ss, pre, cnt, lo)


@njit(inline="always")
def _sums_backward(x, _x, _x_step, c0, n, tb, w, what, suffix, _piv):
    if what == _COUNT:  # a running count needs no suffix
        return
    for r in range(w - 1, -1, -1):
        xr = x[tb + r, c0:c0 + n]
        s0, s1 = suffix[r, 0], suffix[r + 1, 0]
        for j in range(n):
            s0[j] = s1[j] + _or_zero(np.float64(xr[j]))


# --------------------------------------------------------------------- var / std / zscore
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
    """Two rows (a, b) of the moments' forward pass for one statistic (a constant, so that only
    its divisions and roots are compiled in): ``pre`` is the (3, n) prefix, ``sa`` and ``sb`` the
    suffix rows of each window. The prefix is loaded and stored once per pair."""
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


@njit(inline="always")
def _moments_forward(x, _x, _x_step, out, c0, n, tb, te, w, min_periods, ddof, what, suffix, pre, _cnt, piv):
    """var / std / zscore over a moving window, from sums of deviations from a pivot.

    Prefix and suffix keep (count, sum of deviations, sum of squared deviations) around their own
    pivot, the first valid value they saw (a value inside every window that uses them); the
    suffix's sums are moved to the prefix's pivot before they are added. With deviations instead
    of raw values nothing large cancels: var = (Q - D^2/n) / (n - ddof) loses no digits to the
    level of the prices. Rows go two at a time (a lone last row is paired with a row of NaN,
    which changes nothing).
    """
    lo = float(_imax(min_periods, ddof + 1))
    dd = float(ddof)
    p_piv, s_piv = piv[0], piv[2]
    nan_row = np.full(n, _NAN, dtype=x.dtype)
    spare = np.empty(n, dtype=out.dtype)
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


@njit(inline="always")
def _moments_backward(x, _x, _x_step, c0, n, tb, w, _what, suffix, piv):
    s_piv = piv[2]
    nan_row = np.full(n, _NAN, dtype=x.dtype)
    _pivots(x, x, 1, c0, s_piv, s_piv, tb + w - 1, tb - 1, -1)
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


# ------------------------------------------------------------- max / min / argmax / argmin
@njit(inline="always")
def _extremes_forward(x, _x, _x_step, out, c0, n, tb, te, w, min_periods, _ddof, what, suffix, prefix, cnt, _piv):
    """Moving max or min -- or its position in the window, the oldest winning ties like np.argmax
    -- from van Herk / Gil-Werman prefix and suffix extremes (state 0: the extreme, 1: its row). An
    empty extreme is NaN; np.fmax skips NaN; positions move with arithmetic blends (exact for
    integers), which keeps the loops free of masked stores."""
    sign = 1.0 if (what == _MAX) | (what == _ARGMAX) else -1.0
    want_index = what >= _ARGMAX
    lo = float(_imax(min_periods, 1))
    p_top, p_at = prefix[0], prefix[1]
    p_top[:] = _NAN
    p_at[:] = 0.0
    for t in range(tb, te):
        xr = x[t, c0:c0 + n]
        gone = x[_imax(t - w, 0), c0:c0 + n]
        leaving = 1.0 if t >= w else 0.0
        row = out[t, c0:c0 + n]
        r = t - tb + 1
        st, sa = suffix[r, 0], suffix[r, 1]
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


@njit(inline="always")
def _extremes_backward(x, _x, _x_step, c0, n, tb, w, what, suffix, _piv):
    sign = 1.0 if (what == _MAX) | (what == _ARGMAX) else -1.0
    want_index = what >= _ARGMAX
    for r in range(w - 1, -1, -1):
        xr = x[tb + r, c0:c0 + n]
        t0, t1, a0, a1 = suffix[r, 0], suffix[r + 1, 0], suffix[r, 1], suffix[r + 1, 1]
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


# ------------------------------------------------------------ cov / corr / beta / resid / rsquare
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
    """A row of the co-moments' forward pass for one statistic (a constant, so that only its
    arithmetic is compiled in): ``pre`` is the (6, n) prefix, ``sr`` the suffix row."""
    for j in range(row.shape[0]):
        state, win = _co_step(np.float64(yr[j]), xr[j], p_py[j], p_px[j], pre[0, j], pre[1, j], pre[2, j],
                              pre[3, j], pre[4, j], pre[5, j], sr[0, j], sr[1, j], sr[2, j], sr[3, j], sr[4, j],
                              sr[5, j], s_py[j], s_px[j])
        pre[0, j], pre[1, j], pre[2, j], pre[3, j], pre[4, j], pre[5, j] = state
        row[j] = _finish_co(what, win, ddof, lo)


@njit(inline="always")
def _comoments_forward(y, x, x_step, out, c0, n, tb, te, w, min_periods, ddof, what, suffix, pre, _cnt, piv):
    """cov / corr / beta / regression residual / r-squared of y on x over a moving window, on the
    pairs where both are valid: the moments with two series and their cross products (count, dx,
    dy, xx, yy, xy: six sums per prefix and suffix). ``x`` has one column per column of ``y``
    (``x_step=1``) or one column for all (a market series, ``x_step=0``)."""
    lo = float(_imax(min_periods, 1))
    p_py, p_px, s_py, s_px = piv[0], piv[1], piv[2], piv[3]
    xs = np.empty(n)  # the x values of a row (the market column repeated when x_step=0)
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


@njit(inline="always")
def _comoments_backward(y, x, x_step, c0, n, tb, w, _what, suffix, piv):
    s_py, s_px = piv[2], piv[3]
    xs = np.empty(n)
    _pivots(y, x, x_step, c0, s_py, s_px, tb + w - 1, tb - 1, -1)
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


_sums_kernel = _block_kernel("_sums_kernel", _sums_forward, _sums_backward, 1)
_moments_kernel = _block_kernel("_moments_kernel", _moments_forward, _moments_backward, 3)
_extremes_kernel = _block_kernel("_extremes_kernel", _extremes_forward, _extremes_backward, 2, empty_is_nan=True)
_comoments_kernel = _block_kernel("_comoments_kernel", _comoments_forward, _comoments_backward, 6)


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


# ============================================================================================ lags
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


