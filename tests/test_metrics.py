"""fintensor.metrics against a plain pandas reference (qlib's definitions written out with groupby)."""
from __future__ import annotations


import numpy as np
import pandas as pd
import pytest
import torch

from fintensor.errors import BadInputError
from fintensor.metrics import daily_ic, evaluate, summarize
from fintensor.tensor import StockTensor
from metrics_reference import pandas_reference


def random_frames(seed=0, T=30, N=40):
    rng = np.random.default_rng(seed)
    signal = rng.standard_normal((T, N))
    pred = pd.DataFrame(np.round(signal + rng.standard_normal((T, N)), 1),  # rounded: ties
                        index=pd.bdate_range("2020-01-01", periods=T), columns=[f"S{i:02d}" for i in range(N)])
    label = pd.DataFrame(0.01 * signal + 0.03 * rng.standard_normal((T, N)), index=pred.index, columns=pred.columns)
    pred[rng.random((T, N)) < 0.1] = np.nan
    label[rng.random((T, N)) < 0.1] = np.nan
    pred.iloc[3] = 1.0            # a day with no spread: IC NaN
    label.iloc[5, 2:] = np.nan    # a day with 2 stocks: no quantile
    return pred, label


@pytest.mark.parametrize("quantile", [0.2, 0.1, 0.5])
def test_metrics_equal_the_pandas_reference(quantile):
    pred, label = random_frames()
    ours = evaluate(pred, label, quantile=quantile, periods_per_year=252)
    ref = pandas_reference(pred, label, quantile, 252)
    for key, value in ours.summary.items():
        assert value == pytest.approx(ref[key], rel=1e-6, abs=1e-9), key
    pd.testing.assert_frame_equal(ours.daily, ref["daily"], check_names=False, check_freq=False, rtol=1e-6,
                                  atol=1e-9)
    assert ours.summary["days"] == len(pred) - 1  # all but day 3, which has no spread
    assert np.isnan(ours.daily["long_short"].iloc[5]) == (int(2 * quantile) == 0)  # 2 stocks that day


def test_stock_tensors_are_aligned_and_masks_respected():
    pred, label = random_frames(1)
    times = pred.index.values.astype("datetime64[D]")
    p = StockTensor(torch.tensor(pred.fillna(0).to_numpy()), ("time", "stock"),
                    {"time": times, "stock": list(pred.columns)}, mask=torch.tensor(pred.notna().to_numpy()))
    # labels carry one extra stock and cover a longer range: evaluation uses the common part
    wide = label.assign(EXTRA=1.0).reindex(pd.bdate_range("2019-12-25", periods=40))
    y = StockTensor(torch.tensor(wide.to_numpy()), ("time", "stock"),
                    {"time": wide.index.values.astype("datetime64[D]"), "stock": list(wide.columns)})
    ours = evaluate(p, y, start="2020-01-10")
    ref = pandas_reference(pred.loc["2020-01-10":], label.loc["2020-01-10":])
    assert ours.summary["rank_ic"] == pytest.approx(ref["rank_ic"], rel=1e-6)
    assert ours.summary["turnover"] == pytest.approx(ref["turnover"], rel=1e-6)
    ric = daily_ic(p, y, "spearman").loc["2020-01-10":]
    assert list(ric.index.date) == list(ref["daily"].index.date)
    np.testing.assert_allclose(ric.to_numpy(), ref["daily"]["rank_ic"].to_numpy(), rtol=1e-9)


def test_long_short_is_halved_and_perfect_foresight_ranks_perfectly():
    pred, label = random_frames(2)
    ours = evaluate(label, label, quantile=0.2)
    assert ours.summary["ic"] == pytest.approx(1.0) and ours.summary["rank_ic"] == pytest.approx(1.0)
    day = label.iloc[0].dropna().sort_values()
    k = int(len(day) * 0.2)
    assert ours.daily["long_short"].iloc[0] == pytest.approx((day.iloc[-k:].mean() - day.iloc[:k].mean()) / 2)


def test_several_runs_give_mean_and_std():
    pred, label = random_frames(3)
    runs = [evaluate(pred + s * 0.3 * np.random.default_rng(s).standard_normal(pred.shape), label)
            for s in range(3)]
    table = summarize(runs, ["a", "b", "c"])
    ics = [r.summary["ic"] for r in runs]
    assert table.loc["ic", "mean"] == pytest.approx(np.mean(ics))
    assert table.loc["ic", "std"] == pytest.approx(np.std(ics, ddof=1))


def test_bad_input():
    pred, label = random_frames()
    with pytest.raises(BadInputError, match="share no dates"):
        evaluate(pred, label.shift(100, freq="D"))
    with pytest.raises(BadInputError, match="quantile"):
        evaluate(pred, label, quantile=0.7)
    with pytest.raises(BadInputError, match="StockTensor"):
        evaluate(pred.to_numpy(), label)
