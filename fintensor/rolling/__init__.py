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
* median / quantile / rank of a short window (up to 128 float64 or 224 float32 values) keep each
  column's window sorted and update it in one branch-free pass of compares and selects, SIMD across
  columns (a rank counts the window's smaller values the same way). A long window's rows are sorted
  once per block (numpy's integer sort of keys that carry the row), adjacent blocks merged, and a
  window is a bitset over its pair of blocks' sorted order, so a step is a bit flip plus a popcount
  search, not a shift of a sorted copy.
* Kernels accumulate in float64 and are compiled (and cached on disk) only for 2-D C-contiguous
  float32 and float64 panels.

A CUDA tensor is computed with torch ops on its device (``engine="torch"`` forces that path
anywhere; it agrees with the numba kernels).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..errors import BadInputError
from ._args import RANK_METHODS, _apply, _check_out, _deliver, _Input, _panel, checked
from ._args import center_of_mass as _center_of_mass  # noqa: F401  (the name tests use)
from ._cross import _cs_rank_kernel, _cs_zscore_kernel
from ._kernels import (_ARGMAX, _ARGMIN, _BETA, _CORR, _COUNT, _COV, _DIFF, _LOGRET, _MAX, _MEAN, _MIN, _PCT,
                       _RESID, _RSQUARE, _SHIFT, _STD, _SUM, _VAR, _ZSCORE, _comoments_kernel, _ewm_mean_kernel,
                       _ewm_var_kernel, _extremes_kernel, _lag_kernel, _moments_kernel, _sums_kernel)
from ._order import _MEDIAN, _QUANTILE, _RANK, _order_kernel_for
from ._parallel import _run
from ._torch import _torch_cs, _torch_ewm, _torch_lag, _torch_pairwise, _torch_rolling

__all__ = [
    "sum", "mean", "count", "var", "std", "zscore", "min", "max", "argmin", "argmax", "median",
    "quantile", "rank", "ewm_mean", "ewm_var", "ewm_std", "cov", "corr", "beta", "returns", "diff",
    "shift", "cs_rank", "cs_zscore",
]
# statistic -> (kernel, mode): the block kernels take (y, x, x_step, out, window, min_periods, ddof, mode)
_BLOCK = {"sum": (_sums_kernel, _SUM), "mean": (_sums_kernel, _MEAN), "count": (_sums_kernel, _COUNT),
          "var": (_moments_kernel, _VAR), "std": (_moments_kernel, _STD), "zscore": (_moments_kernel, _ZSCORE),
          "max": (_extremes_kernel, _MAX), "min": (_extremes_kernel, _MIN),
          "argmax": (_extremes_kernel, _ARGMAX), "argmin": (_extremes_kernel, _ARGMIN)}
_ORDER = {"median": _MEDIAN, "quantile": _QUANTILE, "rank": _RANK}


def _windowed(kind: str, x, axis, out, engine: str, window, min_periods, ddof=1, q=0.5, method="average",
              ascending=True, pct=False):
    """One moving-window statistic of one input: arguments checked, then the block kernel, the
    order-statistics kernel or the torch ops."""
    if kind in _ORDER:
        a = checked(window=window, min_periods=min_periods, method=method, q=q)
    else:
        a = checked(window=window, min_periods=min_periods, ddof=ddof)
    window, min_periods = a["window"], a["min_periods"]
    ascending, pct = bool(ascending), bool(pct)

    def numba_fn(p, r):
        if kind in _ORDER:
            whats = np.array([_ORDER[kind]])
            _run(_order_kernel_for(window, p.dtype, whats), p.shape[1], p, r[None], window, min_periods, whats,
                 np.array([a["q"]]), RANK_METHODS[method], ascending, pct)
        else:
            kernel, mode = _BLOCK[kind]
            _run(kernel, p.shape[1], p, p, 1, r, window, min_periods, a["ddof"], mode)

    return _apply(x, axis, out, engine, numba_fn, lambda p: _torch_rolling(
        kind, p, window, min_periods, ddof=a.get("ddof"), q=a.get("q"), method=method, ascending=ascending,
        pct=pct))


def sum(x, window: int, *, min_periods: int | None = None, axis=None, out=None, engine: str = "auto"):
    """Moving sum of the valid values (0 when none is valid and min_periods is 0), like
    ``DataFrame.rolling(window, min_periods).sum()``."""
    return _windowed("sum", x, axis, out, engine, window, min_periods)


def mean(x, window: int, *, min_periods: int | None = None, axis=None, out=None, engine: str = "auto"):
    """Moving mean of the valid values, like ``DataFrame.rolling(window, min_periods).mean()``."""
    return _windowed("mean", x, axis, out, engine, window, min_periods)


def count(x, window: int, *, min_periods: int | None = None, axis=None, out=None, engine: str = "auto"):
    """Number of valid values in the window. As in pandas, ``min_periods`` counts the window's
    rows (valid or not): the first ``min_periods - 1`` rows are NaN."""
    return _windowed("count", x, axis, out, engine, window, min_periods)


def var(x, window: int, *, ddof: int = 1, min_periods: int | None = None, axis=None, out=None,
        engine: str = "auto"):
    """Moving variance (``ddof`` 1 like pandas), exact for prices far from zero and after spikes."""
    return _windowed("var", x, axis, out, engine, window, min_periods, ddof)


def std(x, window: int, *, ddof: int = 1, min_periods: int | None = None, axis=None, out=None,
        engine: str = "auto"):
    """Moving standard deviation: the square root of ``var``."""
    return _windowed("std", x, axis, out, engine, window, min_periods, ddof)


def zscore(x, window: int, *, ddof: int = 1, min_periods: int | None = None, axis=None, out=None,
           engine: str = "auto"):
    """``(x - moving mean) / moving std`` of the window ending at each value (NaN where the value is
    missing or the window is constant)."""
    return _windowed("zscore", x, axis, out, engine, window, min_periods, ddof)


def max(x, window: int, *, min_periods: int | None = None, axis=None, out=None, engine: str = "auto"):
    """Moving maximum of the valid values, like ``DataFrame.rolling(window, min_periods).max()``."""
    return _windowed("max", x, axis, out, engine, window, min_periods)


def min(x, window: int, *, min_periods: int | None = None, axis=None, out=None, engine: str = "auto"):
    """Moving minimum of the valid values, like ``DataFrame.rolling(window, min_periods).min()``."""
    return _windowed("min", x, axis, out, engine, window, min_periods)


def argmax(x, window: int, *, min_periods: int | None = None, axis=None, out=None,
           engine: str = "auto"):
    """Position of the window's maximum counted from the window's oldest row (0 .. window-1), the
    oldest winning ties -- ``np.argmax`` of the window, NaN skipped. Windows cut by the start of the
    data count from the first row."""
    return _windowed("argmax", x, axis, out, engine, window, min_periods)


def argmin(x, window: int, *, min_periods: int | None = None, axis=None, out=None,
           engine: str = "auto"):
    """Position of the window's minimum (see ``argmax``)."""
    return _windowed("argmin", x, axis, out, engine, window, min_periods)


def _order_stats(x: np.ndarray, window: int, min_periods: int, quantiles=(), pct_rank: bool = False) -> list:
    """Several order statistics of a (T, N) float64 array's windows from one sorted pass: the
    ``quantiles``, then the percentile rank of the current value if ``pct_rank`` (features use it
    for QTLU, QTLD and RANK)."""
    whats = np.array([_QUANTILE] * len(quantiles) + [_RANK] * pct_rank, dtype=np.int64)
    qs = np.array(list(quantiles) + [0.0] * pct_rank, dtype=np.float64)
    x = np.ascontiguousarray(x, dtype=np.float64)
    out = np.empty((len(whats),) + x.shape)
    if x.size:
        _run(_order_kernel_for(int(window), x.dtype, whats), x.shape[1], x, out, int(window), int(min_periods),
             whats, qs, 0, True, True)
    return list(out)


def median(x, window: int, *, min_periods: int | None = None, axis=None, out=None,
           engine: str = "auto"):
    """Moving median of the valid values, like ``DataFrame.rolling(window, min_periods).median()``."""
    return _windowed("median", x, axis, out, engine, window, min_periods)


def quantile(x, window: int, q: float, *, min_periods: int | None = None, axis=None, out=None,
             engine: str = "auto"):
    """Moving ``q`` quantile with linear interpolation, like ``rolling(...).quantile(q)``."""
    return _windowed("quantile", x, axis, out, engine, window, min_periods, q=q)


def rank(x, window: int, *, method: str = "average", ascending: bool = True, pct: bool = False,
         min_periods: int | None = None, axis=None, out=None, engine: str = "auto"):
    """Rank of each value within its window (1 = smallest; ties by ``method``; ``pct`` divides by
    the valid count), like ``rolling(...).rank(method, ascending, pct)``."""
    return _windowed("rank", x, axis, out, engine, window, min_periods, method=method, ascending=ascending,
                     pct=pct)


# ------------------------------------------------------------------------------- exponential
def _ewm(kind: str, x, com, span, halflife, alpha, adjust, ignore_na, min_periods, bias, axis, out,
         engine):
    a = checked(min_periods=min_periods, com=com, span=span, halflife=halflife, alpha=alpha)
    c, minp = a["com"], a["min_periods"]

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
    a = checked(window=window, min_periods=min_periods, ddof=ddof)
    window, min_periods, ddof = a["window"], a["min_periods"], a["ddof"]
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
        _run(_comoments_kernel, p.shape[1], p, xp, step, r, window, min_periods, ddof, mode)

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
    periods = checked(periods=periods)["periods"]
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
    checked(method=method)
    return _cross_section(
        "rank", x, axis, out, engine,
        lambda p, r: _run(_cs_rank_kernel, p.shape[0], p, np.argsort(p, axis=1, kind="stable"), r,
                          RANK_METHODS[method], bool(ascending), bool(pct)),
        method=method, ascending=bool(ascending), pct=bool(pct))


def cs_zscore(x, *, axis=None, ddof: int = 1, out=None, engine: str = "auto"):
    """Cross-sectional ``(x - mean) / std`` over the stock axis at each time step, NaN-aware."""
    ddof = checked(ddof=ddof)["ddof"]
    return _cross_section("zscore", x, axis, out, engine,
                          lambda p, r: _run(_cs_zscore_kernel, p.shape[0], p, r, ddof), ddof=ddof)
