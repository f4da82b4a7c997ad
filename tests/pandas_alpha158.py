"""A straightforward pandas implementation of the Alpha158 formulas (qlib's expressions, with
fintensor's documented conventions: windows need ``min_periods`` valid values, comparisons with a
missing value are missing, RANK is the window percentile, IdxMax/IdxMin skip NaN).

The oracle for fintensor.features in the tests, and the baseline in benchmarks/bench_rolling.py.
pandas rolling for the moving statistics; for what pandas lacks (IdxMax, the regression on time)
or computes with cancelling sums (rolling cov / corr lose digits), numpy over sliding windows with
the two-pass formulas. One (time, stock) DataFrame per field in, {name: DataFrame} out.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from numpy.lib.stride_tricks import sliding_window_view

WINDOWS = (5, 10, 20, 30, 60)
EPS = 1e-12


def _windows(a: np.ndarray, d: int, chunk_bytes: int = 1 << 26):
    """Yield (rows, windows) over a (T, N) array: windows[i, n, :] holds rows t-d+1..t of column n
    for t in ``rows`` (NaN before the first row), in time chunks of bounded memory."""
    padded = np.concatenate([np.full((d - 1, a.shape[1]), np.nan), a])
    step = max(1, chunk_bytes // (8 * d * max(1, a.shape[1])))
    for t0 in range(0, len(a), step):
        t1 = min(len(a), t0 + step)
        yield slice(t0, t1), sliding_window_view(padded[t0:t1 + d - 1], d, axis=0)


def _argext(frame: pd.DataFrame, d: int, mp: int, largest: bool) -> pd.DataFrame:
    """1-based position of the window's max/min from its oldest row (qlib's IdxMax/IdxMin), NaN
    skipped, windows cut by the start of the data counted from the first row."""
    a = frame.to_numpy(dtype=float)
    out = np.full(a.shape, np.nan)
    for rows, win in _windows(a, d):
        valid = ~np.isnan(win)
        filled = np.where(valid, win, -np.inf if largest else np.inf)
        pos = (filled.argmax(-1) if largest else filled.argmin(-1)).astype(float)
        cut = np.maximum(d - 1 - np.arange(rows.start, rows.stop), 0)[:, None]
        out[rows] = np.where(valid.sum(-1) >= mp, pos - cut + 1.0, np.nan)
    return pd.DataFrame(out, index=frame.index, columns=frame.columns)


def _regression(y: pd.DataFrame, x: pd.DataFrame, d: int, mp: int) -> dict[str, pd.DataFrame]:
    """Slope, r-squared, residual of the last point, and correlation of y on x in each window, on
    the pairs where both are known, by the two-pass formulas (means first, then deviations)."""
    ya, xa = y.to_numpy(dtype=float), x.to_numpy(dtype=float)
    res = {k: np.full(ya.shape, np.nan) for k in ("slope", "rsq", "resid", "corr")}
    for (rows, wy), (_, wx) in zip(_windows(ya, d), _windows(xa, d)):
        ok = ~(np.isnan(wy) | np.isnan(wx))
        n = ok.sum(-1)
        with np.errstate(all="ignore"):
            my = np.where(ok, wy, 0).sum(-1) / n
            mx = np.where(ok, wx, 0).sum(-1) / n
            ey = np.where(ok, wy - my[..., None], 0)
            ex = np.where(ok, wx - mx[..., None], 0)
            sxx, syy, sxy = (ex * ex).sum(-1), (ey * ey).sum(-1), (ex * ey).sum(-1)
            slope = np.where(sxx > 0, sxy / sxx, np.nan)
            corr = np.where((sxx > 0) & (syy > 0), sxy / np.sqrt(sxx * syy), np.nan)
            resid = (ya[rows] - my) - slope * (xa[rows] - mx)
        enough = n >= mp
        res["slope"][rows] = np.where(enough, slope, np.nan)
        res["corr"][rows] = np.where(enough, corr, np.nan)
        res["rsq"][rows] = np.where(enough, corr ** 2, np.nan)
        res["resid"][rows] = np.where(enough, resid, np.nan)
    return {k: pd.DataFrame(v, index=y.index, columns=y.columns) for k, v in res.items()}


def alpha158(o: pd.DataFrame, h: pd.DataFrame, lo: pd.DataFrame, c: pd.DataFrame, v: pd.DataFrame,
             vwap: pd.DataFrame | None = None, min_periods: int | None = None) -> dict[str, pd.DataFrame]:
    out: dict[str, pd.DataFrame] = {}
    rng = h - lo + EPS
    top, bottom = np.maximum(o, c), np.minimum(o, c)
    out.update(KMID=(c - o) / o, KLEN=(h - lo) / o, KMID2=(c - o) / rng, KUP=(h - top) / o,
               KUP2=(h - top) / rng, KLOW=(bottom - lo) / o, KLOW2=(bottom - lo) / rng,
               KSFT=(2 * c - h - lo) / o, KSFT2=(2 * c - h - lo) / rng)
    out.update(OPEN0=o / c, HIGH0=h / c, LOW0=lo / c)
    if vwap is not None:
        out["VWAP0"] = vwap / c
    prev = c.shift(1)
    change = c - prev
    known = change.notna()
    rose = (change > 0).astype(float).where(known)
    fell = (change < 0).astype(float).where(known)
    vchange = v - v.shift(1)
    log_v1 = np.log(v + 1)
    cord_x, cord_y = c / prev, np.log(v / v.shift(1) + 1)
    moved = (c / prev - 1).abs() * v
    # the regression's x: the row number
    t = pd.DataFrame(np.repeat(np.arange(len(c), dtype=float)[:, None], c.shape[1], 1),
                     index=c.index, columns=c.columns)
    for d in WINDOWS:
        mp = d if min_periods is None else min(min_periods, d)

        def r(frame, d=d, mp=mp):
            return frame.rolling(d, min_periods=mp)

        trend = _regression(c, t, d, mp)
        hi, lw = r(h).max(), r(lo).min()
        imax, imin = _argext(h, d, mp, True), _argext(lo, d, mp, False)
        absum, vabsum = r(change.abs()).sum() + EPS, r(vchange.abs()).sum() + EPS
        up, down = r(change.clip(lower=0)).sum(), r((-change).clip(lower=0)).sum()
        vup, vdown = r(vchange.clip(lower=0)).sum(), r((-vchange).clip(lower=0)).sum()
        feats = {
            "ROC": c.shift(d) / c,
            "MA": r(c).mean() / c,
            "STD": r(c).std() / c,
            "BETA": trend["slope"] / c,
            "RSQR": trend["rsq"],
            "RESI": trend["resid"] / c,
            "MAX": hi / c,
            "MIN": lw / c,
            "QTLU": r(c).quantile(0.8) / c,
            "QTLD": r(c).quantile(0.2) / c,
            "RANK": r(c).rank(pct=True),
            "RSV": (c - lw) / (hi - lw + EPS),
            "IMAX": imax / d,
            "IMIN": imin / d,
            "IMXD": (imax - imin) / d,
            "CORR": _regression(c, log_v1, d, mp)["corr"],
            "CORD": _regression(cord_x, cord_y, d, mp)["corr"],
            "CNTP": r(rose).mean(),
            "CNTN": r(fell).mean(),
            "CNTD": r(rose).mean() - r(fell).mean(),
            "SUMP": up / absum,
            "SUMN": down / absum,
            "SUMD": (up - down) / absum,
            "VMA": r(v).mean() / (v + EPS),
            "VSTD": r(v).std() / (v + EPS),
            "WVMA": r(moved).std() / (r(moved).mean() + EPS),
            "VSUMP": vup / vabsum,
            "VSUMN": vdown / vabsum,
            "VSUMD": (vup - vdown) / vabsum,
        }
        out.update({f"{name}{d}": frame for name, frame in feats.items()})
    return out
