"""The torch path: every statistic with plain torch ops on the input's device (CUDA tensors, or
``engine="torch"``); it agrees with the numba kernels."""
from __future__ import annotations

from typing import Callable

import torch

from ._kernels import _DIFF, _LOGRET, _PCT, _SHIFT, _imax, _imin

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


