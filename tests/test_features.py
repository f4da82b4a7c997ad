"""fintensor.features: Alpha158 on the real US panel against a pandas implementation of the same
formulas, Alpha360 against its definition, no look-ahead (perturb the future, the past stays put),
labels, specs and bad input."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import fintensor as ft
from fintensor import features
from fintensor.errors import BadInputError
from pandas_alpha158 import alpha158 as pandas_alpha158

FIELDS = ("open", "high", "low", "close", "volume")


@pytest.fixture(scope="module")
def us_csv(shared_data):
    """The 30-stock US panel read straight from the source CSVs: {field: (date, symbol) frame}."""
    files = sorted((shared_data / "us_daily" / "sp500_5yr_yahoo").glob("*_data.csv"))
    assert len(files) == 30
    raw = {f.name.split("_")[0]: pd.read_csv(f, index_col="Date", parse_dates=True) for f in files}
    column = {"open": "Open", "high": "High", "low": "Low", "close": "Close", "volume": "Volume"}
    # the last row (2017-12-06) is a partial intraday snapshot in the source: dropped
    return {k: pd.DataFrame({s: d[c] for s, d in raw.items()}).sort_index().loc[:"2017-12-05"]
            for k, c in column.items()}


@pytest.fixture(scope="module")
def us_tensor(us_daily_store, us_csv):
    symbols = list(us_csv["close"].columns)
    return ft.build(symbols, "2012-12-06", "2017-12-05", fields=FIELDS, adjust="split",
                    dtype=torch.float64, store=us_daily_store)


def test_alpha158_on_the_real_us_panel_equals_pandas(us_tensor, us_csv):
    result = features.compute(us_tensor, "alpha158")
    assert isinstance(result, ft.StockTensor) and result.dims == ("time", "stock", "feature")
    names = list(result.coords["feature"])
    assert len(names) == 157 and "VWAP0" not in names  # no vwap in these files
    assert result.dtype == torch.float64 and torch.equal(result.mask, ~torch.isnan(result.values))
    # the tensor's axes are the CSVs' dates and symbols
    np.testing.assert_array_equal(result.coords["time"], us_csv["close"].index.values.astype("datetime64[D]"))
    np.testing.assert_array_equal(result.coords["stock"], us_csv["close"].columns)
    ref = pandas_alpha158(*(us_csv[f] for f in FIELDS))
    values = result.values.numpy()
    for i, name in enumerate(names):
        expected = ref[name].to_numpy()
        np.testing.assert_array_equal(np.isnan(values[:, :, i]), np.isnan(expected), err_msg=name)
        np.testing.assert_allclose(values[:, :, i], expected, rtol=1e-9, atol=1e-9, err_msg=name)
    # spot check one value by hand: AAPL's 5-day mean close over close on 2013-01-02
    closes = us_csv["close"]["AAPL"].loc[:"2013-01-02"].iloc[-5:]
    t = list(us_csv["close"].index).index(pd.Timestamp("2013-01-02"))
    assert values[t, 0, names.index("MA5")] == pytest.approx(closes.mean() / closes.iloc[-1], rel=1e-12)
    # ABBV lists on 2013-01-02: its 60-day features start 59 sessions later
    abbv = names and list(us_csv["close"].columns).index("ABBV")
    first = int(np.argmax(~np.isnan(values[:, abbv, names.index("MA60")])))
    assert us_csv["close"].index[first] == us_csv["close"]["ABBV"].dropna().index[59]


def test_alpha360_is_lagged_prices_over_the_latest_close(us_csv):
    fields = {f: us_csv[f].to_numpy() for f in FIELDS}
    result = features.compute(fields, "alpha360")
    assert isinstance(result, dict) and len(result) == 300  # 6 x 60 less the VWAP lags
    assert list(result)[:2] == ["CLOSE59", "CLOSE58"] and list(result)[-1] == "VOLUME0"
    c, v, o = us_csv["close"], us_csv["volume"], us_csv["open"]
    for d in (0, 1, 7, 59):
        np.testing.assert_allclose(result[f"CLOSE{d}"], (c.shift(d) / c).to_numpy(), rtol=1e-15)
        np.testing.assert_allclose(result[f"OPEN{d}"], (o.shift(d) / c).to_numpy(), rtol=1e-15)
        np.testing.assert_allclose(result[f"VOLUME{d}"], (v.shift(d) / (v + 1e-12)).to_numpy(), rtol=1e-15)
    assert np.all(result["CLOSE0"][~np.isnan(result["CLOSE0"])] == 1.0)


def _random_walk_panel(T: int = 240, N: int = 6, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    close = 50 * np.exp(np.cumsum(rng.normal(0, 0.02, (T, N)), axis=0))
    open_ = close * np.exp(rng.normal(0, 0.005, (T, N)))
    high = np.maximum(open_, close) * (1 + rng.uniform(0, 0.02, (T, N)))
    low = np.minimum(open_, close) * (1 - rng.uniform(0, 0.02, (T, N)))
    volume = rng.integers(1_000, 100_000, (T, N)).astype(float)
    vwap = (high + low + close) / 3
    panel = dict(open=open_, high=high, low=low, close=close, volume=volume, vwap=vwap)
    gap = rng.random((T, N)) < 0.03  # missing days
    for a in panel.values():
        a[gap] = np.nan
    return panel


@pytest.mark.parametrize("min_periods", [None, 1])
def test_no_feature_reads_the_future(min_periods):
    panel = _random_walk_panel()
    spec = ["alpha158", "alpha360"]
    before = features.compute(panel, spec, min_periods=min_periods)
    assert len(before) == 158 + 360 - 4  # OPEN0, HIGH0, LOW0, VWAP0 are in both
    rng = np.random.default_rng(1)
    for t in (0, 59, 61, 130, 238):
        future = {k: v.copy() for k, v in panel.items()}
        for a in future.values():  # everything after t changes: values, and some become missing
            a[t + 1:] *= rng.uniform(0.5, 2.0, a[t + 1:].shape)
            a[t + 1:][rng.random(a[t + 1:].shape) < 0.1] = np.nan
        after = features.compute(future, spec, min_periods=min_periods)
        for name in before:
            np.testing.assert_array_equal(after[name][:t + 1], before[name][:t + 1], err_msg=f"{name} at t={t}")
        changed = [n for n in before if not np.array_equal(after[n][t + 1:], before[n][t + 1:], equal_nan=True)]
        assert len(changed) > 300  # the perturbation reached the features after t


def test_partial_windows_are_nan_until_min_periods():
    panel = _random_walk_panel(T=80, N=2)
    for a in panel.values():
        a[:] = np.nan_to_num(a, nan=1.0)  # no gaps: the warm-up is the only missing part
    strict = features.compute(panel, ["MA20", "STD5", "CORR10", "IMAX60", "CNTP5"])
    assert np.isnan(strict["MA20"][:19]).all() and not np.isnan(strict["MA20"][19:]).any()
    assert np.isnan(strict["CNTP5"][:5]).all() and not np.isnan(strict["CNTP5"][5:]).any()  # 1 lag + 5
    assert np.isnan(strict["IMAX60"][:59]).all() and not np.isnan(strict["IMAX60"][59:]).any()
    loose = features.compute(panel, ["MA20"], min_periods=5)
    assert np.isnan(loose["MA20"][:4]).all() and not np.isnan(loose["MA20"][4:]).any()
    np.testing.assert_allclose(loose["MA20"][19:], strict["MA20"][19:])


def test_features_of_a_float32_tensor_are_float32(us_tensor):
    small = us_tensor.isel(stock=[0, 1, 2])
    f32 = ft.StockTensor(small.values.to(torch.float32), small.dims, small.coords)
    res = features.compute(f32, {"MA": [5], "KMID": True, "RSV": 10})
    assert res.dtype == torch.float32 and list(res.coords["feature"]) == ["MA5", "KMID", "RSV10"]
    # the same float32 prices in float64: only the output's rounding differs
    f64 = ft.StockTensor(f32.values.to(torch.float64), small.dims, small.coords)
    ref = features.compute(f64, {"MA": [5], "KMID": True, "RSV": 10})
    np.testing.assert_allclose(res.values.numpy(), ref.values.numpy(), rtol=1e-6, atol=1e-9, equal_nan=True)
    assert res.meta["features"] == "custom" and res.meta["min_periods"] == "window"


def test_forward_returns_use_prices_strictly_after_t():
    close = _random_walk_panel(T=30, N=3)["close"]
    label = features.forward_returns(close)  # qlib: Ref($close, -2) / Ref($close, -1) - 1
    np.testing.assert_allclose(label[:-2], close[2:] / close[1:-1] - 1)
    assert np.isnan(label[-2:]).all()
    moved = close.copy()
    moved[:11] *= 3.0  # rows up to t = 10 (and close[t] itself) changed
    np.testing.assert_array_equal(features.forward_returns(moved)[10], label[10])
    five = features.forward_returns(close, horizon=5, lag=0, log=True)
    np.testing.assert_allclose(five[:-5], np.log(close[5:] / close[:-5]))
    # a (time, stock, feature) tensor: its close feature; the result is a (time, stock) tensor
    tensor = ft.StockTensor(torch.from_numpy(np.stack([close, close * 2], axis=-1)), ("time", "stock", "feature"),
                            {"feature": np.array(["close", "open"])})
    res = features.forward_returns(tensor, horizon=2)
    assert res.dims == ("time", "stock")
    np.testing.assert_allclose(res.values.numpy()[:-3], close[3:] / close[1:-2] - 1)
    with pytest.raises(BadInputError, match="horizon must be an integer >= 1"):
        features.forward_returns(close, horizon=0)
    with pytest.raises(BadInputError, match="lag must be an integer >= 0"):
        features.forward_returns(close, lag=-1)


def test_spec_forms_and_names():
    alpha158 = features.names("alpha158")
    assert len(alpha158) == len(set(alpha158)) == 158
    assert alpha158[:9] == list(features.KBAR) and alpha158[9:13] == ["OPEN0", "HIGH0", "LOW0", "VWAP0"]
    assert alpha158[13:18] == ["ROC5", "ROC10", "ROC20", "ROC30", "ROC60"] and alpha158[-1] == "VSUMD60"
    assert len(features.names("alpha360")) == 360 and len(features.names("alpha158", vwap=False)) == 157
    assert features.names({"MA": [5, 20], "KMID2": True, "VOLUME": 3}) == ["MA5", "MA20", "KMID2", "VOLUME3"]
    assert features.names(["KLOW2", "alpha360"])[:2] == ["KLOW2", "CLOSE59"]
    assert features.names(["MA5", "KMID", "MA5"]) == ["MA5", "KMID"]


@pytest.mark.parametrize("call, message", [
    (lambda p: features.compute(p, "alpha999"), "unknown feature 'alpha999'"),
    (lambda p: features.compute(p, ["MA0"]), "needs a window of at least 1"),
    (lambda p: features.compute(p, {"MA": "five"}), r"spec\['MA'\] must be True or a list of windows"),
    (lambda p: features.compute(p, 42), "spec must be a preset name"),
    (lambda p: features.compute({"close": p["close"]}, ["KMID"]), "the panel lacks"),
    (lambda p: features.compute({k: v for k, v in p.items() if k != "vwap"}, ["VWAP5"]), "lacks \\['vwap'\\]"),
    (lambda p: features.compute({**p, "close": p["close"][:-1]}, ["MA5"]), "arrays of one shape"),
    (lambda p: features.compute(p, ["MA5"], min_periods=0), "min_periods must be a positive integer"),
    (lambda p: features.compute([1, 2, 3], ["MA5"]), "StockTensor or a dict"),
    (lambda p: features.compute({"price": p["close"]}, ["MA5"]), "none of the fields"),
])
def test_bad_specs_and_panels_raise_one_clear_error(call, message):
    with pytest.raises(BadInputError, match=message):
        call(_random_walk_panel(T=20, N=2))


def test_a_tensor_without_the_right_dims_is_rejected():
    tensor = ft.StockTensor(torch.zeros(5, 3), ("time", "stock"))
    with pytest.raises(BadInputError, match=r"\(time, stock, feature\) tensor"):
        features.compute(tensor, ["MA5"])
