"""The evaluation metrics as a pandas user writes them (qlib's definitions, long format + groupby):
the oracle that fintensor.metrics must equal to 1e-6."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd


def pandas_reference(pred: pd.DataFrame, label: pd.DataFrame, quantile=0.2, periods_per_year=252) -> dict:
    """The metrics as a pandas user would write them: long format, groupby date, nlargest/nsmallest."""
    long = pd.DataFrame({"pred": pred.stack(future_stack=True), "label": label.stack(future_stack=True)}).dropna()
    by_day = long.groupby(level=0)

    def k(d):
        return int(len(d) * quantile)

    ic = by_day.apply(lambda d: d["pred"].corr(d["label"])).reindex(pred.index)
    ric = by_day.apply(lambda d: d["pred"].rank().corr(d["label"].rank())).reindex(pred.index)  # Spearman
    top = by_day.apply(lambda d: d.nlargest(k(d), "pred")).droplevel(0)
    r_long = by_day.apply(lambda d: d.nlargest(k(d), "pred")["label"].mean()).reindex(pred.index)
    r_short = by_day.apply(lambda d: d.nsmallest(k(d), "pred")["label"].mean()).reindex(pred.index)
    long_short = (r_long - r_short) / 2
    members = {day: set(top.loc[[day]].index.get_level_values(1)) if day in top.index else set()
               for day in pred.index}
    turnover, autocorr = [np.nan], [np.nan]
    for prev, day in zip(pred.index[:-1], pred.index[1:]):
        a, b = members[prev], members[day]
        turnover.append(1 - len(a & b) / len(b) if a and b else np.nan)
        autocorr.append(pred.loc[day].corr(pred.loc[prev]))
    turnover, autocorr = pd.Series(turnover, index=pred.index), pd.Series(autocorr, index=pred.index)
    return {"daily": pd.DataFrame({"ic": ic, "rank_ic": ric, "long_short": long_short,
                                   "turnover": turnover, "autocorr": autocorr}),
            "ic": ic.mean(), "ic_std": ic.std(), "icir": ic.mean() / ic.std(),
            "rank_ic": ric.mean(), "rank_ic_std": ric.std(), "rank_icir": ric.mean() / ric.std(),
            "long_short": long_short.mean(), "long_short_ann": long_short.mean() * periods_per_year,
            "long_short_sharpe": long_short.mean() / long_short.std() * math.sqrt(periods_per_year),
            "turnover": turnover.mean(), "autocorr": autocorr.mean(), "days": int(ic.notna().sum())}
