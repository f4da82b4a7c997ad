"""How good is a stock score? Per-day cross-sectional metrics of predictions against realised returns.

Definitions (one row per day t; a stock counts on day t when both its prediction and its label are
finite; ``label`` is the raw forward return the prediction at t aims at):

- ``ic``: Pearson correlation across stocks of prediction and label on day t; ``rank_ic``: Spearman
  (Pearson of average ranks). Summaries: mean, std (ddof=1) over days, ``icir = mean / std`` (not
  annualised), likewise ``rank_icir``. Days with fewer than 2 stocks or no spread are NaN and skipped.
- ``long_short``: with k = floor(quantile x n_t) stocks, the mean label of the k highest predictions
  minus the mean label of the k lowest, **halved** (like qlib's calc_long_short_return: $0.5 long and
  $0.5 short per $1 of capital; double it for the raw top-minus-bottom spread). Ties keep the stock
  order (pandas nlargest/nsmallest keep="first"). ``long_short_ann = mean x periods_per_year``
  (arithmetic), ``long_short_sharpe = mean / std x sqrt(periods_per_year)``. For a label over h periods
  pass periods_per_year / h.
- ``turnover``: share of day t's top-quantile stocks that were not in day t-1's top quantile (t-1 the
  previous evaluated day), averaged over days.
- ``autocorr``: Pearson correlation across stocks of the predictions on day t and on day t-1 (stocks
  predicted on both days), averaged (qlib's pred_autocorr).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from . import checks
from .data import average_rank
from .errors import BadInputError
from .tensor import StockTensor

SUMMARY_KEYS = ("ic", "ic_std", "icir", "rank_ic", "rank_ic_std", "rank_icir", "long_short",
                "long_short_ann", "long_short_sharpe", "turnover", "autocorr", "days")


# -------------------------------------------------------------------------------- row-wise kernels
def row_pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each row of ``a`` and ``b`` (D, N) over the columns where both are finite;
    NaN for rows with < 2 such columns or no spread."""
    ok = torch.isfinite(a) & torch.isfinite(b)
    n = ok.sum(-1, keepdim=True).clamp(min=1)
    da = torch.where(ok, a, 0)
    db = torch.where(ok, b, 0)
    da = torch.where(ok, da - da.sum(-1, keepdim=True) / n, 0)
    db = torch.where(ok, db - db.sum(-1, keepdim=True) / n, 0)
    cov = (da * db).sum(-1)
    var = da.square().sum(-1) * db.square().sum(-1)
    return torch.where(var > 0, cov / var.sqrt(), float("nan"))


def row_spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman correlation per row: Pearson of the average ranks among the columns where both are finite."""
    ok = torch.isfinite(a) & torch.isfinite(b)
    nan = torch.tensor(float("nan"), dtype=a.dtype, device=a.device)
    return row_pearson(average_rank(torch.where(ok, a, nan)), average_rank(torch.where(ok, b, nan)))


def _extreme_members(pred: torch.Tensor, ok: torch.Tensor, k: torch.Tensor, top: bool) -> torch.Tensor:
    """Bool (D, N): the k[d] highest (top) or lowest predictions of each row among ``ok``; ties by column order."""
    fill = -math.inf if top else math.inf
    keyed = torch.where(ok, pred, fill)
    order = torch.sort(keyed, dim=-1, descending=top, stable=True).indices
    place = torch.empty_like(order)
    place.scatter_(-1, order, torch.arange(pred.shape[-1]).expand_as(order))
    return (place < k[:, None]) & ok


# ------------------------------------------------------------------------------------ evaluation
@dataclass
class Evaluation:
    """Per-day metrics (``daily``: ic, rank_ic, long_short, turnover, autocorr) and their ``summary``."""

    daily: pd.DataFrame
    summary: dict[str, float]
    quantile: float
    periods_per_year: float
    meta: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)   # why a summary value is NaN, in words

    def table(self) -> str:
        return "\n".join([*(f"{k:<18}{_fmt(v)}" for k, v in self.summary.items()), *self.notes])

    def __repr__(self) -> str:
        return f"Evaluation({len(self.daily)} days)\n{self.table()}"


def _fmt(v: float) -> str:
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    return "nan" if v is None or not np.isfinite(v) else f"{v:.6f}"


def _frame(x, what: str) -> pd.DataFrame:
    """A (date x stock) float64 DataFrame from a StockTensor (time, stock) (unobserved -> NaN) or a DataFrame."""
    if isinstance(x, pd.DataFrame):
        return x.astype("float64")
    if isinstance(x, StockTensor):
        if tuple(x.dims) != ("time", "stock"):
            raise BadInputError(f"{what} must have dims ('time', 'stock'), got {tuple(x.dims)}")
        values = np.asarray(x.to("cpu"), dtype="float64")  # NaN where unobserved
        return pd.DataFrame(values, index=pd.DatetimeIndex(x.coords["time"], name="time"),
                            columns=pd.Index(x.coords["stock"], name="stock"))
    raise BadInputError(f"{what} must be a StockTensor (time, stock) or a DataFrame, got {type(x).__name__}")


def _aligned(pred, label, start, end) -> tuple[pd.DataFrame, pd.DataFrame]:
    p, y = _frame(pred, "pred"), _frame(label, "label")
    times = p.index.intersection(y.index)
    if start is not None:
        times = times[times >= pd.Timestamp(start)]
    if end is not None:
        times = times[times <= pd.Timestamp(end)]
    stocks = p.columns.intersection(y.columns, sort=False)
    if len(times) == 0 or len(stocks) == 0:
        raise BadInputError(f"predictions and labels share no {'dates' if len(times) == 0 else 'stocks'} "
                            f"in the evaluated range; score and label the same panel")
    return p.loc[times, stocks], y.loc[times, stocks]


def daily_ic(pred, label, method: str = "pearson") -> pd.Series:
    """Per-day cross-sectional IC (``method="pearson"``) or Rank IC (``"spearman"``)."""
    p, y = _aligned(pred, label, None, None)
    fn = {"pearson": row_pearson, "spearman": row_spearman}.get(method)
    if fn is None:
        raise BadInputError(f"unknown IC method {method!r}; use 'pearson' or 'spearman'")
    return pd.Series(fn(torch.tensor(p.to_numpy()), torch.tensor(y.to_numpy())).numpy(), index=p.index,
                     name="rank_ic" if method == "spearman" else "ic")


def evaluate(pred, label, *, quantile: float = 0.2, periods_per_year: float = 252, start=None, end=None,
             segment: str | None = None) -> Evaluation:
    """All metrics of the module docstring for predictions vs raw forward returns, each a StockTensor
    (time, stock) or a (date x stock) DataFrame, aligned on common dates/stocks, optionally within
    [start, end]. ``segment``: "train", "valid" or "test" evaluates the dates of that segment of the model
    that made ``pred`` (``ft.predict`` records them); "auto" the test segment when there is one, else all
    dates; None (default) all dates. ``start``/``end`` narrow it further."""
    quantile = checks.number("quantile", quantile, lo=0.0, lo_open=True, hi=0.5)
    periods_per_year = checks.positive("periods_per_year", periods_per_year)
    segment, start, end = segment_dates(pred, segment, start, end)
    p_df, y_df = _aligned(pred, label, start, end)
    p, y = torch.tensor(p_df.to_numpy()), torch.tensor(y_df.to_numpy())
    ok = torch.isfinite(p) & torch.isfinite(y)
    k = (ok.sum(-1) * quantile).floor().long()
    top = _extreme_members(p, ok, k, top=True)
    bottom = _extreme_members(p, ok, k, top=False)
    y0 = torch.where(ok, y, 0)
    kf = k.double()
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    long_short = torch.where(k > 0, ((y0 * top).sum(-1) - (y0 * bottom).sum(-1)) / kf.clamp(min=1) / 2, nan)
    turnover = torch.full_like(kf, float("nan"))
    if len(kf) > 1:
        stayed = (top[1:] & top[:-1]).sum(-1).double()
        turnover[1:] = torch.where((k[1:] > 0) & (k[:-1] > 0), 1 - stayed / kf[1:].clamp(min=1), nan)
    autocorr = torch.full_like(kf, float("nan"))
    if len(kf) > 1:
        autocorr[1:] = row_pearson(p[1:], p[:-1])
    daily = pd.DataFrame({"ic": row_pearson(p, y).numpy(), "rank_ic": row_spearman(p, y).numpy(),
                          "long_short": long_short.numpy(), "turnover": turnover.numpy(),
                          "autocorr": autocorr.numpy()}, index=p_df.index)
    with np.errstate(divide="ignore", invalid="ignore"):  # a perfect score has std 0: icir inf, like pandas
        summary = _summary(daily, periods_per_year)
    return Evaluation(daily, summary, quantile, periods_per_year,
                      meta={"segment": segment, "start": None if start is None else str(start),
                            "end": None if end is None else str(end)},
                      notes=_nan_notes(summary, ok.sum(-1), quantile))


def segment_dates(pred, segment: str | None, start=None, end=None) -> tuple[str, object, object]:
    """(segment name, start, end) of the dates to evaluate: a segment's dates come from the predictions'
    meta (``ft.predict`` writes the model's segments there); explicit ``start``/``end`` take precedence."""
    if segment is None or segment == "all":
        return "all", start, end
    checks.choice("segment", segment, ("auto", "all", "train", "valid", "test"))
    segments = (pred.meta or {}).get("segments") or {} if isinstance(pred, StockTensor) else {}
    if segment == "auto":
        if "test" not in segments:
            return "all", start, end
        segment = "test"
    if segment not in segments:
        have = ", ".join(sorted(segments)) or "none"
        raise BadInputError(f"the predictions carry no {segment!r} segment (their model's segments: {have}); "
                            "evaluate all dates (segment='all', CLI --segment all) or give start/end")
    seg_start, seg_end = segments[segment]
    return segment, start if start is not None else seg_start, end if end is not None else seg_end


def _nan_notes(summary: dict, stocks_per_day: torch.Tensor, quantile: float) -> list[str]:
    """Say why long-short (and turnover) is NaN when no day has enough stocks for a quantile of one."""
    if math.isfinite(summary["long_short"]) or not len(stocks_per_day):
        return []
    need = math.ceil(1 / quantile - 1e-9)
    most = int(stocks_per_day.max())
    if most >= need:
        return []
    return [f"long_short is NaN: the top and bottom {quantile:.0%} of at most {most} scored stock(s) a day hold "
            f"no stock (it needs >= {need} stocks a day); use a larger quantile (at most 0.5) or more stocks"]


def _summary(daily: pd.DataFrame, periods_per_year: float) -> dict:
    ic, ric, ls = daily["ic"], daily["rank_ic"], daily["long_short"]
    summary = {
        "ic": ic.mean(), "ic_std": ic.std(), "icir": ic.mean() / ic.std(),
        "rank_ic": ric.mean(), "rank_ic_std": ric.std(), "rank_icir": ric.mean() / ric.std(),
        "long_short": ls.mean(), "long_short_ann": ls.mean() * periods_per_year,
        "long_short_sharpe": ls.mean() / ls.std() * math.sqrt(periods_per_year),
        "turnover": daily["turnover"].mean(), "autocorr": daily["autocorr"].mean(),
        "days": int(ic.notna().sum()),
    }
    return {key: (v if key == "days" else float(v)) for key, v in summary.items()}


def summarize(evaluations: Sequence[Evaluation], names: Sequence[str] | None = None) -> pd.DataFrame:
    """One column per run plus ``mean`` and ``std`` (ddof=1) across runs, one row per summary metric."""
    names = list(names) if names is not None else [f"run{i}" for i in range(len(evaluations))]
    if len(names) != len(evaluations):
        raise BadInputError(f"{len(names)} names for {len(evaluations)} evaluations")
    table = pd.DataFrame({n: e.summary for n, e in zip(names, evaluations)}).loc[list(SUMMARY_KEYS)]
    table = table.astype("float64")
    if len(evaluations) > 1:
        table["mean"] = table[names].mean(axis=1)
        table["std"] = table[names].std(axis=1)
    return table
