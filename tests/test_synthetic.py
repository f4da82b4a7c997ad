"""The synthetic market: seeded, calendar-true, OHLC-consistent, with a planted signal whose IC is known."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fintensor import calendars, symbols
from fintensor.errors import BadInputError
from fintensor.sources import synthetic as syn


@pytest.fixture(scope="module")
def mkt():
    return syn.market(n_stocks=50, n_days=500, seed=7, signal=1.0)


@pytest.fixture(scope="module")
def big_pair():
    """Two markets with the same shocks, with and without the planted signal (IC needs many days)."""
    return (syn.market(n_stocks=100, n_days=1000, seed=11, signal=1.0),
            syn.market(n_stocks=100, n_days=1000, seed=11, signal=0.0))


def test_reproducible_by_seed():
    a, b = syn.market(20, 120, seed=3, signal=1.0), syn.market(20, 120, seed=3, signal=1.0)
    pd.testing.assert_frame_equal(a.daily, b.daily)
    pd.testing.assert_frame_equal(a.oracle, b.oracle)
    c = syn.market(20, 120, seed=4, signal=1.0)
    assert not np.allclose(a.panel("close").to_numpy()[-1], c.panel("close").to_numpy()[-1], equal_nan=True)


def test_daily_schema_and_labels(mkt):
    d = mkt.daily
    assert list(d.columns) == ["symbol", "date", "open", "high", "low", "close", "adj_close", "volume",
                               "amount", "trade_status"]
    assert mkt.symbols[0] == "SYN0001" and len(mkt.symbols) == 50
    assert all(symbols.normalize(s) == s for s in mkt.symbols)
    assert len(d) == int((mkt.status >= 0).sum())
    assert d.groupby("symbol", observed=True)["date"].apply(lambda s: s.is_monotonic_increasing).all()
    assert not d[["open", "high", "low", "close", "volume", "amount"]].isna().any().any()


def test_ohlc_volume_invariants(mkt):
    d = mkt.daily
    assert (d.low <= d.open).all() and (d.open <= d.high).all()
    assert (d.low <= d.close).all() and (d.close <= d.high).all()
    assert (d.low > 0).all()
    np.testing.assert_array_equal(d.adj_close, d.close)
    assert (d.volume % syn.LOT == 0).all()
    assert ((d.volume == 0) == (d.trade_status == 0)).all()
    np.testing.assert_allclose(d.amount, d.volume * (d.open + d.high + d.low + d.close) / 4)


def test_sessions_are_the_calendar_sessions(mkt):
    expected = calendars.sessions("XNYS", "2015-01-02", "2017-12-31")[:500]
    np.testing.assert_array_equal(mkt.dates, expected)
    assert set(mkt.daily.date.to_numpy().astype("datetime64[D]")) <= set(expected)
    cn = syn.market(5, 244, start="2019-01-01", calendar="XSHG", seed=1)  # 2019 had 244 XSHG sessions
    np.testing.assert_array_equal(cn.dates, calendars.sessions("XSHG", "2019-01-01", "2019-12-31"))
    assert cn.symbols[0] == "SYN0001.SS" and calendars.for_symbols(cn.symbols) == ["XSHG"]
    assert cn.timezone == "Asia/Shanghai"


def test_listings_and_delistings(mkt):
    lst = mkt.listings
    late = lst[lst.first_date > mkt.dates[0]]
    early = lst[lst.last_date < mkt.dates[-1]]
    assert len(late) == 10 and len(early) == 5  # round(0.2 * 50), round(0.1 * 50)
    d = mkt.daily
    for row in pd.concat([late, early]).itertuples():
        dates = d.loc[d.symbol == row.symbol, "date"]
        assert dates.min() == row.first_date and dates.max() == row.last_date  # no rows outside the life
        assert len(dates) == ((mkt.dates >= row.first_date) & (mkt.dates <= row.last_date)).sum()


def test_suspensions_are_rows_with_status_0_at_the_last_close(mkt):
    sus = mkt.suspensions
    assert len(sus) >= 5 and (sus.sessions >= 1).all()
    d = mkt.daily.set_index(["symbol", "date"]).sort_index()
    assert int((d.trade_status == 0).sum()) == int(sus.sessions.sum())
    for row in sus.itertuples():
        g = d.loc[row.symbol]
        before = g.loc[:row.start].iloc[-2]  # the last traded session before the run
        run = g.loc[row.start:row.end]
        assert before.trade_status == 1 and (run.trade_status == 0).all()
        assert (run.volume == 0).all() and (run.amount == 0).all()
        for col in ("open", "high", "low", "close"):
            assert (run[col] == before.close).all()


def test_stylised_facts(mkt):
    r = np.log(mkt.panel("close")).diff().where(mkt.panel("status") == 1)
    # a common market factor: stocks co-move
    corr = r.corr().to_numpy()
    assert np.nanmean(corr[np.triu_indices_from(corr, 1)]) > 0.15
    # volatility clusters: squared returns are autocorrelated
    sq = r ** 2
    assert np.nanmean([sq[c].autocorr(1) for c in sq]) > 0.05
    # volume rises with |return|
    v = np.log(mkt.panel("volume").where(mkt.panel("status") == 1))
    assert np.nanmean([r[c].abs().rank().corr(v[c].rank()) for c in r]) > 0.2  # Spearman


def _planted_formula(m: syn.SyntheticMarket) -> pd.DataFrame:
    """0.25 * R20 - 1.25 * R5 of observed log returns, recomputed from nothing but the close prices."""
    r = np.log(m.panel("close")).diff().fillna(0.0)  # before listing / on the listing day: no return
    return 0.25 * r.rolling(20, min_periods=1).sum() - 1.25 * r.rolling(5, min_periods=1).sum()


def _oracle_from_closes(m: syn.SyntheticMarket) -> pd.DataFrame:
    traded = m.panel("status") == 1
    both = traded & traded.shift(-1, fill_value=False)
    return (syn.MU + m.signal * syn.KAPPA * _planted_formula(m)).where(both)


def test_oracle_is_the_documented_function_of_past_closes(mkt):
    np.testing.assert_allclose(mkt.oracle.to_numpy(), _oracle_from_closes(mkt).to_numpy(), rtol=0, atol=1e-12)
    assert mkt.oracle.iloc[-1].isna().all()  # nothing to predict after the last day


def test_oracle_ic_matches_the_analytic_value(big_pair):
    with_signal, _ = big_pair
    expected = with_signal.expected_ic()
    assert 0.1 <= expected <= 0.2
    assert with_signal.oracle_ic() == pytest.approx(expected, abs=0.015)
    # also on a sub-range (what a test split would use)
    half = with_signal.dates[500]
    assert with_signal.oracle_ic(start=half) == pytest.approx(with_signal.expected_ic(start=half), abs=0.02)


def test_no_signal_means_no_ic(big_pair):
    with_signal, flat = big_pair
    assert flat.oracle_ic() == 0.0 and flat.expected_ic() == pytest.approx(0, abs=1e-9)  # a constant oracle
    # the formula that predicts the signal market (as well as its oracle does) predicts nothing here
    assert with_signal.ic(_planted_formula(with_signal)) == pytest.approx(with_signal.oracle_ic(), abs=1e-9)
    assert abs(flat.ic(_planted_formula(flat))) < 0.015


def test_ic_helper_matches_pandas(mkt):
    pred = mkt.oracle
    realised = mkt.forward_returns
    both = pred.notna() & realised.notna()
    ref = pred.corrwith(realised, axis=1, drop=False)
    flat = pred.where(both).nunique(axis=1) == 1
    ref = ref.mask(flat, 0.0)[both.sum(axis=1) >= 3].dropna()  # a constant prediction scores 0
    assert flat.iloc[0]  # day 0: no history yet, the oracle is the drift for everyone
    np.testing.assert_allclose(mkt.daily_ic(pred), ref.to_numpy(), rtol=1e-9)
    close = mkt.panel("close").where(mkt.panel("status") == 1)
    np.testing.assert_allclose(realised.to_numpy()[:-1], (close.shift(-1) / close - 1).to_numpy()[:-1])


def test_write_to_store(store, mkt):
    small = syn.market(6, 60, seed=2)
    assert small.write(store) == len(small.daily)
    back = store.read(small.symbols, as_pandas=True)
    ref = small.daily
    np.testing.assert_array_equal(back.symbol.to_numpy(), ref.symbol.astype(str).to_numpy())
    np.testing.assert_array_equal(back.date.to_numpy().astype("datetime64[D]"),
                                  ref.date.to_numpy().astype("datetime64[D]"))
    for col in ("open", "high", "low", "close", "adj_close", "volume", "amount", "trade_status"):
        np.testing.assert_array_equal(back[col].to_numpy(), ref[col].to_numpy(), err_msg=col)
    man = store.manifest("SYN0001")
    assert man["source"] == "synthetic" and man["timezone"] == "America/New_York"
    assert [e["source"] for e in store.list()] == ["synthetic"] * 6


# ------------------------------------------------------------------------------------------ ticks
@pytest.fixture(scope="module")
def cn_market():
    return syn.market(4, 10, start="2019-01-02", calendar="XSHG", seed=5, suspension_rate=0.05,
                      listing_fraction=0.25)


@pytest.fixture(scope="module")
def cn_ticks(cn_market):
    return syn.ticks(cn_market, 6, freq="3s")


def _session_ticks(ticks, market):
    local = ticks.time.dt.tz_convert(market.timezone)
    return ticks.assign(date=local.dt.tz_localize(None).dt.normalize().to_numpy().astype("datetime64[D]"))


def test_ticks_inside_continuous_session(cn_market, cn_ticks):
    assert list(cn_ticks.columns) == ["symbol", "time", "price", "volume", "amount", "side"]
    assert str(cn_ticks.time.dt.tz) == "UTC"
    t = _session_ticks(cn_ticks, cn_market)
    days = np.unique(t.date)
    segs = calendars.segments("XSHG", days)
    assert segs.shape[1] == 2  # a lunch break
    ns = pd.to_datetime(t.time, utc=True).dt.tz_convert(None).to_numpy().astype("datetime64[ns]").astype(np.int64)
    day_i = np.searchsorted(days, t.date.to_numpy())
    inside = np.zeros(len(t), bool)
    for s in range(segs.shape[1]):
        inside |= (ns >= segs[day_i, s, 0]) & (ns < segs[day_i, s, 1])
    assert inside.all()
    local = t.time.dt.tz_convert("Asia/Shanghai").dt.strftime("%H:%M")
    assert not ((local >= "11:30") & (local < "13:00")).any()
    assert local.min() == "09:30" and local.max() == "14:59"


def test_ticks_add_up_to_the_daily_bars(cn_market, cn_ticks):
    t = _session_ticks(cn_ticks, cn_market)
    assert (t.volume > 0).all() and (t.volume % 100 == 0).all()
    np.testing.assert_allclose(t.amount, t.price * t.volume)
    assert set(t.side.unique()) <= {0, 1}
    agg = t.groupby(["symbol", "date"], observed=True).agg(
        volume=("volume", "sum"), first=("price", "first"), last=("price", "last"),
        high=("price", "max"), low=("price", "min"))
    daily = cn_market.daily.assign(date=cn_market.daily.date.to_numpy().astype("datetime64[D]"))
    daily = daily.set_index(["symbol", "date"])
    traded = daily[(daily.trade_status == 1)]
    traded = traded[traded.index.get_level_values("date") <= cn_market.dates[5]]
    assert set(agg.index) == set(traded.index)  # suspended and unlisted days have no ticks
    ref = traded.loc[agg.index]
    np.testing.assert_allclose(agg.volume, ref.volume)
    np.testing.assert_allclose(agg["first"], ref.open)
    np.testing.assert_allclose(agg["last"], ref.close)
    assert (agg.high <= ref.high * (1 + 1e-12)).all() and (agg.low >= ref.low * (1 - 1e-12)).all()
    assert t.groupby("symbol", observed=True).time.apply(lambda s: s.is_monotonic_increasing).all()


def test_ticks_standalone_us_and_write(store):
    tk = syn.ticks(["AAA", "BBB"], ["2019-02-01", "2019-02-04"], freq="1min", calendar="XNYS", seed=1)
    local = tk.time.dt.tz_convert("America/New_York").dt.strftime("%H:%M")
    assert local.min() == "09:30" and local.max() == "15:59"
    assert sorted(tk.time.dt.tz_convert("America/New_York").dt.date.unique().astype(str)) == \
        ["2019-02-01", "2019-02-04"]
    again = syn.ticks(["AAA", "BBB"], ["2019-02-01", "2019-02-04"], freq="1min", calendar="XNYS", seed=1)
    pd.testing.assert_frame_equal(tk, again)
    assert tk.write_ticks(store) == len(tk)
    back = store.read_ticks(["AAA", "BBB"], as_pandas=True)
    np.testing.assert_array_equal(back.symbol.to_numpy(), tk.symbol.astype(str).to_numpy())
    np.testing.assert_array_equal(back.time.to_numpy(), tk.time.to_numpy())
    for col in ("price", "volume", "amount", "side"):
        np.testing.assert_array_equal(back[col].to_numpy(), tk[col].to_numpy(), err_msg=col)
    assert store.manifest("AAA", date="2019-02-01")["source"] == "synthetic"


@pytest.mark.parametrize("call, match", [
    (lambda: syn.market(n_stocks=0), "n_stocks"),
    (lambda: syn.market(signal=-1), "signal"),
    (lambda: syn.market(calendar="MOON"), "unknown calendar"),
    (lambda: syn.market(n_days=5000, start="2025-01-02"), "sessions"),
    (lambda: syn.market(start="someday"), "cannot read start 'someday'"),
    (lambda: syn.market(5, 20).oracle_ic(end="later"), "cannot read end 'later'"),
    (lambda: syn.ticks(2, 2, freq="soon"), "frequency"),
    (lambda: syn.ticks(syn.market(2, 5, calendar="XSHG", start="2019-01-02"), ["2019-06-03"]),
     "not a session"),
    (lambda: syn.ticks(["bad/name"], 1), "path separator"),
])
def test_bad_input(call, match):
    with pytest.raises(BadInputError, match=match):
        call()
