"""ft.build / ft.build_ticks on real data (values, masks, calendars, adjustments, slots), the tensor cache,
recipes and the `fintensor build | show` CLI, and one clear error per bad input."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import fintensor as ft
from fintensor import calendars
from fintensor.cli import main
from fintensor.errors import BadInputError, MissingDataError
from fintensor.recipes import Recipe, load_recipe
from fintensor.store import Store
from yahoo_stub import session_bars

REPO = Path(__file__).resolve().parents[1]
BAOSTOCK = "cn_daily/baostock_qfq/panel_2018-01_2020-08/"
TICKS = "cn_intraday_tick/hikyuu/trans_tick_2019-02-01_2019-02-11.csv.gz"
MINUTES = "cn_intraday_tick/hikyuu/time_1min_2018-12-03_2019-02-01.csv.gz"
F64 = dict(dtype=torch.float64, cache=False)


def _tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(Path(root).rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def _baostock_panel(shared_data) -> pd.DataFrame:
    frames = [pd.read_csv(f) for f in sorted((shared_data / BAOSTOCK).glob("*.csv"))]
    df = pd.concat(frames)
    df["symbol"] = [ft.symbols.normalize(c) for c in df.code]
    return df


@pytest.fixture(scope="module")
def cn_panel(cn_daily_store):
    syms = sorted(e["symbol"] for e in cn_daily_store.list())
    return ft.build(syms, "2019-01-01", "2019-12-31", fields=["close", "volume"], store=cn_daily_store, **F64)


# --------------------------------------------------------------------------------------- daily panels
def test_cn_panel_time_axis_is_the_xshg_calendar(cn_panel):
    import warnings

    import exchange_calendars as xc

    with warnings.catch_warnings():  # pandas 3.1 deprecation notices from inside exchange_calendars
        warnings.simplefilter("ignore", DeprecationWarning)
        expected = xc.get_calendar("XSHG").sessions_in_range("2019-01-01", "2019-12-31")
    assert len(cn_panel.coords["time"]) == 244 == len(expected)
    np.testing.assert_array_equal(cn_panel.coords["time"], expected.values.astype("datetime64[D]"))
    assert cn_panel.meta["calendar"] == "XSHG" and cn_panel.shape == (244, 31, 2)


def test_cn_panel_equals_the_csvs_and_masks_untraded_days(cn_panel, shared_data):
    df = _baostock_panel(shared_data)
    df = df[(df.date >= "2019-01-01") & (df.date <= "2019-12-31")]
    traded = df[df.tradestatus == 1]
    for field in ("close", "volume"):
        oracle = traded.pivot(index="date", columns="symbol", values=field)   # the baseline, not the hot path
        got = cn_panel.sel(feature=field).to_pandas()
        got.index = got.index.strftime("%Y-%m-%d")
        oracle = oracle.reindex(index=got.index, columns=got.columns)
        np.testing.assert_array_equal(got.to_numpy(), oracle.to_numpy())
    mask = cn_panel.sel(feature="close").mask.numpy()
    np.testing.assert_array_equal(mask, ~np.isnan(cn_panel.sel(feature="close").numpy()))
    dates = cn_panel.coords["time"].astype(str)
    col = list(cn_panel.coords["stock"]).index
    suspended = df[(df.symbol == "600030.SS") & (df.tradestatus == 0)].date
    january = [d for d in dates if "2019-01-02" <= d <= "2019-01-09"]
    assert len(january) == 6 and set(january) <= set(suspended)
    assert not mask[np.isin(dates, suspended), col("600030.SS")].any()
    assert mask[~np.isin(dates, suspended), col("600030.SS")].all()
    ipo = dates >= "2019-01-16"                                     # 002948.SZ lists on 2019-01-16
    assert mask[ipo, col("002948.SZ")].all() and not mask[~ipo, col("002948.SZ")].any()
    listed = dates <= "2019-07-08"                                  # 000693.SZ delisted after 2019-07-08
    assert mask[listed, col("000693.SZ")].sum() == len(df[(df.symbol == "000693.SZ") & (df.tradestatus == 1)])
    assert not mask[~listed, col("000693.SZ")].any()


def test_us_panel_full_and_split_adjustment_equal_the_yahoo_columns(us_daily_store, shared_data):
    full = ft.build(["AAPL", "ABBV", "PYPL"], "2012-12-06", "2017-12-05", fields=["close", "volume"],
                    store=us_daily_store, adjust="full", **F64)
    split = ft.build(["AAPL", "ABBV", "PYPL"], "2012-12-06", "2017-12-05", fields=["close"],
                     store=us_daily_store, adjust="split", **F64)
    assert full.meta["calendar"] == "XNYS" and full.meta["adjustment"] == "full"
    for sym in ("AAPL", "ABBV", "PYPL"):
        csv = pd.read_csv(shared_data / f"us_daily/sp500_5yr_yahoo/{sym}_data.csv", index_col="Date")
        csv = csv.loc[:"2017-12-05"]
        got_full = full.sel(stock=sym, feature="close").to_pandas().dropna()
        got_split = split.sel(stock=sym, feature="close").to_pandas().dropna()
        assert list(got_full.index.strftime("%Y-%m-%d")) == list(csv.index)    # masked before listing
        np.testing.assert_allclose(got_full.to_numpy(), csv["Adj Close"].to_numpy(), rtol=1e-12)
        np.testing.assert_allclose(got_split.to_numpy(), csv["Close"].to_numpy(), rtol=1e-12)
        np.testing.assert_array_equal(full.sel(stock=sym, feature="volume").to_pandas().dropna().to_numpy(),
                                      csv["Volume"].to_numpy())


def test_us_raw_prices_cannot_come_from_split_prices_without_events(us_daily_store):
    with pytest.raises(BadInputError, match=r"AAPL: the store holds split-adjusted prices with adj_close; "
                                            r"adjust='raw' needs split events"):
        ft.build("AAPL", "2013-01-02", "2013-12-31", store=us_daily_store, adjust="raw", cache=False)


@pytest.fixture(scope="module")
def corporate_actions(tmp_path_factory, shared_data):
    """AAPL 2014 (7:1 split on 2014-06-09) twice: Quandl WIKI raw + events + adj_*, zipline split-adjusted + events."""
    root = tmp_path_factory.mktemp("actions")
    z = shared_data / "us_daily/zipline_corporate_actions"
    quandl, zipline = Store(root / "quandl"), Store(root / "zipline")
    ft.import_csv(z / "QUANDL_ARCHIVE.zip", store=quandl)
    ft.import_csv(z / "csvdir_daily_AAPL.csv.gz", store=zipline)
    raw = pd.read_csv(z / "QUANDL_ARCHIVE.zip")
    return quandl, zipline, raw[raw.ticker == "AAPL"].set_index("date")


def test_adjustments_derived_from_events_match_the_other_vendor(corporate_actions):
    quandl, zipline, csv = corporate_actions
    span = ("2014-01-02", "2014-12-31")
    kw = dict(fields=["open", "close", "volume"], **F64)
    assert quandl.manifest("AAPL")["adjustment"] == "raw" and zipline.manifest("AAPL")["adjustment"] == "split"
    # split-adjusted from raw + split events == zipline's split-adjusted prices (to the vendors' rounding)
    q_split = ft.build("AAPL", *span, adjust="split", store=quandl, **kw)
    z_split = ft.build("AAPL", *span, adjust="split", store=zipline, **kw)
    for f in ("open", "close"):
        np.testing.assert_allclose(q_split.sel(feature=f).numpy(), z_split.sel(feature=f).numpy(), rtol=1e-4)
    # raw from split + split events == Quandl's raw prices
    z_raw = ft.build("AAPL", *span, adjust="raw", store=zipline, **kw)
    np.testing.assert_allclose(z_raw.sel(stock="AAPL", feature="close").numpy(), csv.close.to_numpy(), rtol=1e-4)
    # full from raw x adj_close/close == Quandl's adj_open (an independent column)
    q_full = ft.build("AAPL", *span, adjust="full", store=quandl, **kw)
    np.testing.assert_allclose(q_full.sel(stock="AAPL", feature="open").numpy(), csv.adj_open.to_numpy(),
                               rtol=1e-9)
    # full from split-adjusted prices + dividend events: the same total returns as Quandl's adj_close
    z_full = ft.build("AAPL", *span, adjust="full", store=zipline, **kw)
    assert "dividend" in z_full.meta["adjusted_from"]
    q_ret = np.diff(np.log(q_full.sel(stock="AAPL", feature="close").numpy()))
    z_ret = np.diff(np.log(z_full.sel(stock="AAPL", feature="close").numpy()))
    np.testing.assert_allclose(z_ret, q_ret, atol=2e-4)
    # volume in split-adjusted shares: raw volume x 7 before the split, unchanged after
    before = csv.index < "2014-06-09"
    vol = q_split.sel(stock="AAPL", feature="volume").numpy()
    np.testing.assert_array_equal(vol, np.where(before, csv.volume * 7, csv.volume))


def _bars(store: Store, sym: str, days, close, adjustment="raw", **cols):
    df = pd.DataFrame({"date": pd.to_datetime(list(days)).date, "close": close, "volume": 100.0, **cols})
    store.write_bars(sym, df, source="test", adjust=adjustment)


def test_hand_computed_split_and_dividend_adjustment(store):
    days = calendars.sessions("XNYS", "2019-01-02", "2019-01-08")     # 5 sessions
    # raw prices; 2:1 split on day 3; dividend 1.0 on day 5 (previous close 52 -> factor 1 - 1/52)
    _bars(store, "XYZ", days, [100.0, 104.0, 51.0, 52.0, 50.0], split=[1, 1, 2, 1, 1],
          dividend=[0, 0, 0, 0, 1.0])
    split = ft.build("XYZ", "2019-01-02", "2019-01-08", fields=["close", "volume"], store=store,
                     adjust="split", **F64).sel(stock="XYZ")
    np.testing.assert_allclose(split.sel(feature="close").numpy(), [50, 52, 51, 52, 50])
    np.testing.assert_allclose(split.sel(feature="volume").numpy(), [200, 200, 100, 100, 100])
    full = ft.build("XYZ", "2019-01-02", "2019-01-08", fields=["close"], store=store, adjust="full",
                    **F64).sel(stock="XYZ", feature="close")
    k = 1 - 1 / 52
    np.testing.assert_allclose(full.numpy(), [50 * k, 52 * k, 51 * k, 52 * k, 50])
    # the adjustment is as of the partition's end, whatever the range asked for
    early = ft.build("XYZ", "2019-01-02", "2019-01-03", fields=["close"], store=store, adjust="split", **F64)
    np.testing.assert_allclose(early.numpy().ravel(), [50, 52])


def test_full_adjusted_prices_cannot_be_undone(cn_daily_store):
    with pytest.raises(BadInputError, match=r"000001.SZ: the store holds full-adjusted prices.*Build with "
                                            r"adjust='full'"):
        ft.build("000001.SZ", "2019-01-01", "2019-01-31", store=cn_daily_store, adjust="raw", cache=False)


# ------------------------------------------------------------------------------------------- fill
def test_ffill_carries_prices_inside_the_listing_only(cn_daily_store, shared_data):
    syms = ["600030.SH", "002948.SZ", "000693.SZ"]
    got = ft.build(syms, "2019-01-01", "2019-08-31", fields=["close", "volume"], store=cn_daily_store,
                   fill=("ffill", 5), **F64)
    plain = ft.build(syms, "2019-01-01", "2019-08-31", fields=["close", "volume"], store=cn_daily_store, **F64)
    assert got.meta["fill"] == {"method": "ffill", "limit": 5}
    assert torch.equal(got.mask, plain.mask)                         # filled cells stay unobserved
    dates = got.coords["time"].astype(str)
    csv = pd.read_csv(shared_data / BAOSTOCK / "600030.SH.csv", index_col="date")
    last_trade = csv[(csv.tradestatus == 1) & (csv.index < "2019-01-02")].iloc[-1]   # 2018-12-24
    sessions_since = len(calendars.sessions("XSHG", last_trade.name, "2019-01-09")) - 1
    close = got.sel(stock="600030.SS", feature="close").numpy()
    suspended = ("2019-01-02" <= dates) & (dates <= "2019-01-09")
    gap_pos = np.nonzero(suspended)[0]
    first_gap = len(calendars.sessions("XSHG", last_trade.name, "2018-12-31")) - 1   # sessions already missed
    for i, p in enumerate(gap_pos):
        if first_gap + i + 1 <= 5:
            assert close[p] == last_trade.close
        else:
            assert np.isnan(close[p])
    assert sessions_since > 5
    np.testing.assert_array_equal(got.sel(stock="600030.SS", feature="volume").numpy()[gap_pos][:1], [0.0])
    ipo = got.sel(stock="002948.SZ", feature="close").numpy()
    assert np.isnan(ipo[dates < "2019-01-16"]).all()                  # never before the listing
    gone = got.sel(stock="000693.SZ", feature="close").numpy()
    assert np.isnan(gone[dates > "2019-07-08"]).all()                 # never after the delisting


def test_ffill_never_looks_ahead(store):
    days = calendars.sessions("XNYS", "2019-01-02", "2019-01-31")
    close = np.arange(len(days), dtype=float) + 10
    status = np.ones(len(days), int)
    status[5:9] = 0
    _bars(store, "ABC", days, close, trade_status=status)
    before = ft.build("ABC", days[0], days[-1], store=store, fill="ffill", adjust="raw", **F64).numpy().ravel()
    future = close.copy()
    future[12:] = 99.0                                                # perturb the future only
    store.write_bars("ABC", pd.DataFrame({"date": pd.to_datetime(days[12:]).date, "close": future[12:]}),
                     source="test", on_conflict="overwrite")
    after = ft.build("ABC", days[0], days[-1], store=store, fill="ffill", adjust="raw", **F64).numpy().ravel()
    np.testing.assert_array_equal(before[:12], after[:12])
    np.testing.assert_array_equal(before[5:9], [close[4]] * 4)


# -------------------------------------------------------------------------------------- calendars
def test_mixed_calendars_need_an_explicit_choice(us_daily_store, cn_daily_store, tmp_path):
    both = Store(tmp_path / "both")
    shutil.copytree(us_daily_store.root / "bars", both.root / "bars", dirs_exist_ok=True)
    shutil.copytree(cn_daily_store.root / "bars", both.root / "bars", dirs_exist_ok=True)
    syms = ["AAPL", "600519.SS"]
    with pytest.raises(BadInputError, match=r"different calendars \(XNYS: AAPL; XSHG: 600519.SS\); pass "
                                            r"calendar='union'"):
        ft.build(syms, "2017-01-01", "2017-03-31", store=both, cache=False)
    union = ft.build(syms, "2017-11-01", "2018-02-28", store=both, calendar="union", cache=False)
    ny = calendars.sessions("XNYS", "2017-11-01", "2018-02-28")
    sh = calendars.sessions("XSHG", "2017-11-01", "2018-02-28")
    assert union.meta["calendar"] == "union" and set(union.coords["time"]) == set(ny) | set(sh)
    mask = union.mask[:, :, 0].numpy()
    t = union.coords["time"]
    assert mask[:, 0].sum() == len(ny[ny <= np.datetime64("2017-12-06")])   # AAPL on its own sessions
    assert not mask[~np.isin(t, ny), 0].any() and not mask[~np.isin(t, sh), 1].any()
    with pytest.warns(ft.BuildWarning, match=r"dropped 1 stored rows \(600519.SS 1\): dated on days that are not XNYS"):
        on_ny = ft.build(syms, "2017-11-01", "2018-02-28", store=both, calendar="NYSE", cache=False)
    assert on_ny.meta["calendar"] == "XNYS"
    np.testing.assert_array_equal(on_ny.coords["time"], ny)
    np.testing.assert_array_equal(on_ny.values, union.sel(time=list(ny)).values)


def test_a_calendar_override_keeps_or_reports_every_row(us_daily_store):
    """Any calendar may be chosen for any symbol (#12): rows it has no session for are counted and warned."""
    own = ft.build("AAPL", "2015-01-01", "2015-12-31", store=us_daily_store, **F64)
    with pytest.warns(ft.builder.BuildWarning, match=r"dropped (\d+) stored rows \(AAPL \1\): dated on days "
                                                     r"that are not XSHG sessions"):
        on_sh = ft.build("AAPL", "2015-01-01", "2015-12-31", store=us_daily_store, calendar="XSHG", **F64)
    ny, sh = own.coords["time"], on_sh.coords["time"]
    assert on_sh.meta["calendar"] == "XSHG"
    np.testing.assert_array_equal(sh, calendars.sessions("XSHG", "2015-01-01", "2015-12-31"))
    both = np.intersect1d(ny, sh)
    np.testing.assert_array_equal(on_sh.sel(time=list(both)).values, own.sel(time=list(both)).values)
    rows = on_sh.meta["rows"]["AAPL"]
    assert rows["kept"] == len(both) and sum(rows["dropped"].values()) == len(np.setdiff1d(ny, sh))
    assert rows["kept"] + rows["outside_range"] + sum(rows["dropped"].values()) == rows["stored"]
    assert own.meta["rows"]["AAPL"] == {"stored": rows["stored"], "kept": len(ny), "dropped": {},
                                        "outside_range": rows["stored"] - len(ny)}


# ------------------------------------------------------------------------------------------ ticks
@pytest.fixture(scope="module")
def tick_csv(shared_data) -> pd.DataFrame:
    df = pd.read_csv(shared_data / TICKS, dtype={"datetime": str})
    df["t"] = pd.to_datetime(df.datetime, format="%Y%m%d%H%M%S")
    df["day"] = df.t.dt.strftime("%Y-%m-%d")
    df["symbol"] = [ft.symbols.normalize(s) for s in df.symbol]
    return df


def test_tick_volume_per_day_equals_the_daily_file(cn_tick_store, tick_csv, shared_data):
    syms = sorted(tick_csv.symbol.unique())
    t4 = ft.build_ticks(syms, "2019-02-01", "2019-02-11", freq="3s", fields=["volume", "trades"],
                        store=cn_tick_store, **F64)
    assert t4.dims == ("day", "tick", "stock", "feature") and t4.shape[:2] == (2, 4800)
    per_day = t4.sel(feature="volume").values.sum(dim=1).numpy()           # (day, stock)
    oracle = tick_csv.groupby(["day", "symbol"]).vol.sum().unstack() * 100
    np.testing.assert_array_equal(per_day, oracle.loc[:, syms].to_numpy())  # every tick lands in a slot
    assert t4.sel(feature="trades").values.sum() == len(tick_csv)
    daily = _baostock_panel(shared_data).set_index(["date", "symbol"]).volume
    for day in ("2019-02-01", "2019-02-11"):
        for sym in ("000001.SZ", "000002.SZ", "600000.SS"):
            ticks = t4.sel(day=day, stock=sym, feature="volume").values.sum().item()
            assert abs(ticks - daily[(day, sym)]) < 100                   # to within the rounding of a lot
    assert t4.sel(day="2019-02-01", stock="000001.SZ", feature="volume").values.sum().item() == 101_427_000


def test_tick_slots_equal_a_pandas_resample_and_never_carry_across_days(cn_tick_store, tick_csv):
    got = ft.build_ticks("000001.SZ", "2019-02-01", "2019-02-11", freq="1min", fields=["price", "volume", "close"],
                         store=cn_tick_store, **F64).sel(stock="000001.SZ")
    assert got.shape[:2] == (2, 240) and got.coords["tick"][-1] == np.timedelta64(239 * 60, "s")
    df = tick_csv[tick_csv.symbol == "000001.SZ"]
    clock = df.t.dt.hour * 60 + df.t.dt.minute
    # oracle: minutes of trading since 09:30 (lunch skipped); the 09:25 auction folds into 09:30, prints
    # stamped 11:30:xx into 11:29 and the 15:00:00 closing auction into 14:59
    minute = np.where(clock < 13 * 60, np.clip(clock - 570, 0, 119), np.clip(clock - 780, 0, 119) + 120)
    grouped = df.assign(slot=minute).groupby(["day", "slot"])
    for d, day in enumerate(("2019-02-01", "2019-02-11")):
        vol = np.zeros(240)
        last = np.full(240, np.nan)
        sums, lasts = grouped.vol.sum().loc[day], grouped.price.last().loc[day]
        vol[sums.index] = sums * 100
        last[lasts.index] = lasts / 1000
        np.testing.assert_array_equal(got.sel(day=day, feature="volume").numpy(), vol)
        np.testing.assert_array_equal(got.sel(day=day, feature="close").numpy(), last)
        carried = pd.Series(last).ffill().to_numpy()                      # within the day only
        np.testing.assert_array_equal(got.sel(day=day, feature="price").numpy(), carried)
        np.testing.assert_array_equal(got.sel(day=day, feature="price").mask.numpy(), ~np.isnan(last))


def test_price_is_never_carried_from_the_day_before(store):
    days = calendars.sessions("XSHG", "2019-03-04", "2019-03-05")
    segs = calendars.segments("XSHG", days)
    t = [segs[0, 0, 0] + 60 * 10**9, segs[1, 1, 0] + 30 * 60 * 10**9]     # day 1 09:31, day 2 13:30
    store.write_ticks("600000.SS", pd.DataFrame({"time": pd.to_datetime(t, utc=True), "price": [10.0, 11.0],
                                                 "volume": [100.0, 200.0]}), source="test")
    got = ft.build_ticks("600000.SS", days[0], days[1], freq="1min", store=store, **F64).sel(stock="600000.SS")
    day1, day2 = got.sel(day=days[0], feature="price").numpy(), got.sel(day=days[1], feature="price").numpy()
    assert np.isnan(day1[0]) and (day1[1:] == 10.0).all()
    assert np.isnan(day2[:150]).all() and (day2[150:] == 11.0).all()     # 13:30 is slot 120 + 30
    assert got.mask.sum().item() == 2 * 2                                 # two slots traded, two fields


def test_us_minute_bars_give_390_slots_equal_to_the_bars(us_minute_store, shared_data):
    import zipfile

    got = ft.build_ticks(["SPY", "IBM"], "2013-10-07", "2013-10-11", freq="1min", fields=["close", "volume"],
                         store=us_minute_store, **F64)
    assert got.meta["interval"] == "1m" and got.shape == (5, 390, 2, 2)
    assert got.meta["slots_per_day"] == [390] * 5
    for sym in ("spy", "ibm"):
        path = shared_data / f"lean_algoseek_us_equity/minute/{sym}/20131008_trade.zip"
        with zipfile.ZipFile(path) as z:
            bars = pd.read_csv(z.open(z.namelist()[0]), header=None, names=["ms", "o", "h", "l", "c", "v"])
        slot = bars.ms // 60000 - 570                                    # minutes after 09:30 New York
        regular = bars[(slot >= 0) & (slot < 390)]
        closes = np.full(390, np.nan)
        closes[slot[regular.index]] = regular.c / 10000
        row = got.sel(day="2013-10-08", stock=sym.upper())
        np.testing.assert_allclose(row.sel(feature="close").numpy(), closes, rtol=1e-12)
        vol = np.zeros(390)
        vol[slot[regular.index]] = regular.v
        np.testing.assert_array_equal(row.sel(feature="volume").numpy(), vol)
        assert row.sel(feature="close").mask.sum().item() == len(regular)


def test_early_close_days_end_their_slots_at_the_close(store):
    ny = pd.Timestamp
    bars = pd.DataFrame({"time": [ny("2019-11-27 09:30", tz="America/New_York"),
                                  ny("2019-11-29 12:59", tz="America/New_York"),
                                  ny("2019-11-29 13:05", tz="America/New_York")],      # after the 13:00 close
                         "close": [10.0, 11.0, 12.0], "volume": [100.0, 200.0, 300.0]})
    bars["time"] = bars.time.dt.tz_convert("UTC")
    store.write_bars("SPY", bars, interval="1m", source="test")
    got = ft.build_ticks("SPY", "2019-11-27", "2019-11-29", freq="1min", fields=["price", "volume"], store=store,
                         **F64).sel(stock="SPY")
    assert got.meta["slots_per_day"] == [390, 210] and got.meta["dropped_records"] == {"SPY": 1}
    short = got.sel(day="2019-11-29")
    np.testing.assert_array_equal(short.sel(feature="price").numpy()[208:211], [np.nan, 11.0, np.nan])
    assert np.isnan(short.sel(feature="volume").numpy()[210:]).all()               # no slots after the close
    assert short.sel(feature="volume").numpy()[:210].sum() == 200.0
    assert (got.sel(day="2019-11-27", feature="price").numpy() == 10.0).all()


def test_hikyuu_minute_bars_as_slots(cn_tick_store, shared_data):
    got = ft.build_ticks("000001.SZ", "2019-01-31", "2019-02-01", freq="5min", fields=["close", "volume"],
                         store=cn_tick_store, interval="1m", **F64).sel(stock="000001.SZ")
    bars = pd.read_csv(shared_data / MINUTES, dtype={"datetime": str})
    bars = bars[(bars.symbol == "000001.SZ") & bars.datetime.str.startswith("20190201")]
    assert len(bars) == 240
    np.testing.assert_allclose(got.sel(day="2019-02-01", feature="close").numpy(),
                               bars.price.to_numpy()[4::5] / 1000)        # last bar of each 5 minutes
    np.testing.assert_array_equal(got.sel(day="2019-02-01", feature="volume").numpy(),
                                  bars.vol.to_numpy().reshape(48, 5).sum(axis=1) * 100)


def test_intraday_build_has_utc_instants(us_minute_store):
    got = ft.build(["SPY", "BAC"], "2013-10-07", "2013-10-08", interval="1m", fields=["close"],
                   store=us_minute_store, adjust="raw", cache=False)
    t = got.coords["time"]
    assert got.dims == ("time", "stock", "feature") and len(t) == 780 and t.dtype == np.dtype("datetime64[ns]")
    assert str(t[0]) == "2013-10-07T13:30:00.000000000" and str(t[390]) == "2013-10-08T13:30:00.000000000"
    four = ft.build_ticks(["SPY", "BAC"], "2013-10-07", "2013-10-08", freq="1min", fields=["close"],
                          store=us_minute_store, cache=False)
    torch.testing.assert_close(got.values, four.values.reshape(780, 2, 1), equal_nan=True)


# ------------------------------------------------------------------------------------------ cache
def test_cache_hit_miss_and_invalidation(cn_daily_store, tmp_path, monkeypatch):
    from fintensor import builder

    store = Store(tmp_path / "s")
    shutil.copytree(cn_daily_store.root / "bars", store.root / "bars")
    args = (["000001.SZ", "600519.SS"], "2019-01-01", "2019-12-31")
    first = ft.build(*args, fields=["close", "volume"], store=store)
    path = Path(first.meta["cache"])
    assert path.parent == store.root / "tensors" and path.exists()
    calls = []
    monkeypatch.setattr(builder, "_build_daily", lambda *a, **k: calls.append(1) or pytest.fail("rebuilt"))
    second = ft.build(*args, fields=["close", "volume"], store=store)       # a load, not a build
    assert not calls and second.meta["cache"] == str(path)
    torch.testing.assert_close(second.values, first.values, equal_nan=True)
    monkeypatch.undo()
    other = ft.build(*args, fields=["close"], store=store)                   # another request, another entry
    assert other.meta["cache"] != str(path)
    store.write_bars("600519.SS", pd.DataFrame({"date": [pd.Timestamp("2020-08-25").date()], "close": [1800.0]}),
                     source="test", adjust="full")                       # the store changed
    third = ft.build(*args, fields=["close", "volume"], store=store)
    assert third.meta["cache"] != str(path) and third.meta["store_fingerprint"] != first.meta["store_fingerprint"]
    n = len(list((store.root / "tensors").iterdir()))
    ft.build(*args, fields=["open"], store=store, cache=False)
    assert len(list((store.root / "tensors").iterdir())) == n                # cache=False writes nothing
    assert store.verify() == []
    Path(third.meta["cache"]).write_bytes(b"garbage")                        # a damaged entry is rebuilt
    with pytest.warns(ft.BuildWarning, match="could not be used .* rebuilt it from the store"):
        rebuilt = ft.build(*args, fields=["close", "volume"], store=store)
    torch.testing.assert_close(rebuilt.values, third.values, equal_nan=True)
    assert ft.load(rebuilt.meta["cache"]).shape == third.shape


def test_cache_keeps_within_its_budget(cn_daily_store, tmp_path, monkeypatch):
    store = Store(tmp_path / "s")
    shutil.copytree(cn_daily_store.root / "bars", store.root / "bars")
    build = lambda f: Path(ft.build("000001.SZ", "2019-01-01", "2019-12-31", fields=[f], store=store).meta["cache"])
    first = build("open")
    budget = 2.5 * first.stat().st_size
    monkeypatch.setenv("FINTENSOR_TENSOR_CACHE_MB", str(budget / 2**20))     # room for two entries
    last = [build(f) for f in ("high", "low", "close")][-1]
    left = list((store.root / "tensors").iterdir())
    assert last in left and first not in left and len(left) == 2
    assert sum(p.stat().st_size for p in left) <= budget


def test_tick_cache_is_invalidated_by_new_ticks(cn_tick_store, tmp_path):
    store = Store(tmp_path / "s")
    shutil.copytree(cn_tick_store.root / "ticks", store.root / "ticks")
    first = ft.build_ticks("600004.SH", "2019-02-01", "2019-02-11", store=store)
    assert ft.build_ticks("600004.SH", "2019-02-01", "2019-02-11", store=store).meta["cache"] == first.meta["cache"]
    late = pd.Timestamp("2019-02-11 14:59:58", tz="Asia/Shanghai").tz_convert("UTC")
    store.write_ticks("600004.SS", pd.DataFrame({"time": [late], "seq": [99], "price": [9.99], "volume": [100.0]}),
                      source="test")
    again = ft.build_ticks("600004.SH", "2019-02-01", "2019-02-11", store=store)
    assert again.meta["cache"] != first.meta["cache"]
    added = again.sel(day="2019-02-11", feature="volume").values.sum() - \
        first.sel(day="2019-02-11", feature="volume").values.sum()
    assert added.item() == 100.0


# -------------------------------------------------------------------------------------- bad input
def test_bad_input_one_clear_error_each_and_the_store_unchanged(cn_daily_store, cn_tick_store):
    before = _tree_hash(cn_daily_store.root), _tree_hash(cn_tick_store.root)
    cases = [
        (dict(symbols="000001.SZ", fields=["close", "vwap"]), BadInputError,
         r"unknown field\(s\) \['vwap'\]; available: open, high, low, close, adj_close, volume"),
        (dict(symbols=["000001.SZ", "300999.SZ", "600000.SH"]), MissingDataError,
         r"has no 1d bars for 300999.SZ; get them with `fintensor download 300999.SZ --start"),
        (dict(start="2019-03-01", end="2019-02-01"), BadInputError, r"empty range: start 2019-03-01 is after end"),
        (dict(start="2019-02-09", end="2019-02-10"), BadInputError, r"empty range: no XSHG sessions between"),
        (dict(start="2019-13-01"), BadInputError, r"cannot read start '2019-13-01' as a date"),
        (dict(symbols=["000001.SZ", "000001.XSHE"]), BadInputError, r"given twice"),
        (dict(adjust="total"), BadInputError, r"adjust='total' is not one of raw, split, full"),
        (dict(fill="bfill"), BadInputError, r"fill='bfill' is not understood"),
        (dict(symbols="00/01.SZ"), BadInputError, r"path separator"),
    ]
    for kwargs, error, message in cases:
        args = dict(symbols="000001.SZ", start="2019-01-01", end="2019-01-31", store=cn_daily_store)
        args.update(kwargs)
        with pytest.raises(error, match=message):
            ft.build(args.pop("symbols"), args.pop("start"), args.pop("end"), **args)
    tick_cases = [
        (dict(freq="7s"), r"freq '7s' does not divide the XSHG continuous session segment of 2h00m \(7200 s\); "
                          r"use one that does, e.g. 1s, 3s, 5s"),
        (dict(freq="3s", fields=["price", "bid"]), r"unknown field\(s\) \['bid'\]"),
        (dict(freq="30s", interval="1m"), r"freq 30s is not a multiple of the 1m bars"),
        (dict(freq="3s", calendar="XNYS"), r"calendar 'XNYS' does not match the symbols \(XSHG: 000001.SZ\)"),
    ]
    for kwargs, message in tick_cases:
        with pytest.raises(BadInputError, match=message):
            ft.build_ticks("000001.SZ", "2019-02-01", "2019-02-11", store=cn_tick_store, **kwargs)
    with pytest.raises(MissingDataError, match=r"no ticks for 600519.SS; get them with `fintensor import FILE "
                                               r"--ticks`"):
        ft.build_ticks("600519.SS", "2019-02-01", "2019-02-11", store=cn_tick_store, interval="tick")
    assert (_tree_hash(cn_daily_store.root), _tree_hash(cn_tick_store.root)) == before


# ------------------------------------------------------------------------------------ recipes, CLI
def test_shipped_recipes_validate_and_resolve(shared_data, monkeypatch):
    monkeypatch.delenv("FINTENSOR_DATA", raising=False)        # the default: ../shared/data beside the repo
    recipes = {p.stem: load_recipe(p) for p in sorted((REPO / "datasets").glob("*.toml"))}
    assert {"story", "story_ticks", "us_daily_panel", "cn_daily_panel"} <= set(recipes)
    for name, recipe in recipes.items():
        assert recipe.files and all(f.exists() and shared_data.resolve() in f.resolve().parents
                                    for f in recipe.files), name
    assert len(recipes["us_daily_panel"].symbols) == 30 and len(recipes["us_daily_panel"].files) == 30
    assert recipes["story_ticks"].ticks and not recipes["story"].ticks


def _write_recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, message", [
    ('symbols = ["AAPL"]\nstart = "2019-01-01"\nend = "2019-02-01"\nfeilds = ["close"]\n',
     r"unknown key 'feilds'; allowed keys: description, symbols"),
    ('symbols = "AAPL"\nstart = "2019-01-01"\nend = "2019-02-01"\n', r"key 'symbols' must be a list of symbols"),
    ('symbols = ["AAPL"]\nstart = 2019\nend = "2019-02-01"\n', r"key 'start' must be a date like 2019-01-01"),
    ('symbols = ["AAPL"]\nstart = "2019-01-01"\n', r"missing key\(s\) end"),
    ('symbols = ["AAPL"]\nstart = "2019-01-01"\nend = "2019-02-01"\nfill_limit = "5"\n',
     r"key 'fill_limit' must be a whole number"),
    ('symbols = ["AAPL"]\nstart = "2019-01-01"\nend = "2019-02-01"\n[source]\nyahoo = "yes"\n',
     r"\[source\]: key 'yahoo' must be true or false"),
    ('symbols = ["AAPL"]\nstart = "2019-01-01"\nend = "2019-02-01"\n[source]\nurl = "http://x"\n',
     r"\[source\]: unknown key 'url'"),
    ('symbols = ["AAPL"]\nstart = "2019-01-01"\nend = "2019-02-01"\n[source]\nfiles = ["${HOME}/x.csv"]\n',
     r"uses \$\{HOME\}; only \$\{FINTENSOR_DATA\} and ~ are expanded"),
    ('symbols = ["AAPL"]\nstart = "2019-01-01"\nend = "2019-02-01"\n[source]\nfiles = ["nope/*.csv"]\n',
     r"no file matches 'nope/\*.csv'"),
    ('symbols = ["AAPL"\n', r"is not valid TOML"),
])
def test_bad_recipes_name_the_key(tmp_path, text, message):
    with pytest.raises(BadInputError, match=message):
        load_recipe(_write_recipe(tmp_path, text))


def test_cli_build_recipe_then_show(shared_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FINTENSOR_DATA", str(shared_data))
    store, out = tmp_path / "store", tmp_path / "story.safetensors"
    assert main(["build", str(REPO / "datasets/story.toml"), "--out", str(out), "--store", str(store)]) == 0
    printed = capsys.readouterr().out
    assert "StockTensor(time: 244, stock: 2, feature: 2)" in printed and f"saved: {out}" in printed
    st = ft.load(out)
    csv = pd.read_csv(shared_data / BAOSTOCK / "600519.SH.csv", index_col="date")
    assert st.sel(time="2019-06-03", stock="600519.XSHG", feature="close").item() == \
        np.float32(csv.loc["2019-06-03", "close"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store", "story.safetensors"]   # nothing else written
    assert main(["show", str(out), "--rows", "2"]) == 0
    shown = capsys.readouterr().out
    assert "StockTensor(time: 244" in shown and "2019-01-02" in shown and "2019-12-31" in shown
    assert main(["show", str(out), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["dims"] == ["time", "stock", "feature"] and shown["coords"]["time"]["first"] == "2019-01-02"
    assert shown["observed"] == 1.0 and shown["meta"]["calendar"] == "XSHG"
    # a second build of the same recipe is a cache load; imports are not repeated
    assert main(["build", str(REPO / "datasets/story.toml"), "--store", str(store), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["shape"] == [244, 2, 2] and summary["path"].startswith(str(store / "tensors"))


def test_cli_flag_form_and_ticks(cn_tick_store, tmp_path, capsys):
    store = tmp_path / "s"
    shutil.copytree(cn_tick_store.root, store)
    out = tmp_path / "t.safetensors"
    rc = main(["build", "--symbols", "000001.SZ", "000002.SZ", "--start", "2019-02-01", "--end", "2019-02-11",
               "--freq", "3s", "--fields", "price", "volume", "--out", str(out), "--store", str(store), "-q"])
    assert rc == 0 and capsys.readouterr().out == ""
    assert ft.load(out).shape == (2, 4800, 2, 2)


def test_cli_build_downloads_what_the_store_lacks(fake_yahoo, tmp_path, capsys):
    served = {s: session_bars("XNYS", "2024-01-02", "2024-01-31", seed=i) for i, s in enumerate(("AAPL", "MSFT"))}
    for sym, bars in served.items():
        fake_yahoo.add(sym, bars, tz="America/New_York")
    store, out = tmp_path / "s", tmp_path / "y.safetensors"
    argv = ["build", "--symbols", "AAPL", "MSFT", "--start", "2024-01-02", "--end", "2024-01-31", "--fields",
            "close", "volume", "--dtype", "float64", "--store", str(store), "-q"]
    assert main(argv + ["--yahoo", "--out", str(out)]) == 0
    got = ft.load(out)
    assert got.shape == (len(served["AAPL"]), 2, 2) and got.meta["calendar"] == "XNYS"
    for sym, bars in served.items():
        np.testing.assert_allclose(got.sel(stock=sym, feature="close").numpy(), bars.adj_close.to_numpy())
        np.testing.assert_array_equal(got.sel(stock=sym, feature="volume").numpy(), bars.volume.to_numpy())
    requests = len(fake_yahoo.requests)
    assert main(argv + ["--yahoo"]) == 0 and len(fake_yahoo.requests) == requests   # stored: no request


@pytest.mark.parametrize("argv, message", [
    (["build"], "give a RECIPE.toml, or --symbols, --start, --end"),
    (["build", "--symbols", "000001.SZ", "--start", "2019-01-01", "--end", "2019-01-31", "--fields", "vwap"],
     "unknown field(s) ['vwap']"),
    (["build", "--symbols", "000001.SZ", "--start", "2019-02-01", "--end", "2019-02-01", "--freq", "7s"],
     "freq '7s' does not divide"),
    (["build", "--symbols", "AAPL", "--start", "2019-01-01", "--end", "2019-01-31"], "has no 1d bars for AAPL"),
    (["build", "--symbols", "000001.SZ", "--start", "2019-01-01", "--end", "2019-01-31", "--no-cache"],
     "--no-cache without --out would keep nothing"),
    (["show", "missing.safetensors"], "no tensor file at missing.safetensors"),
])
def test_cli_bad_input_exit_2_one_line(cn_daily_store, cn_tick_store, tmp_path, capsys, argv, message):
    store = tmp_path / "s"
    shutil.copytree(cn_daily_store.root, store)
    shutil.copytree(cn_tick_store.root / "ticks", store / "ticks")
    before = _tree_hash(store)
    assert main(argv + ["--store", str(store)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err and err.count("\n") == 1
    assert _tree_hash(store) == before


def test_recipe_from_flags_equals_the_api(cn_daily_store):
    recipe = Recipe.from_dict({"symbols": ["000001.SZ"], "start": "2019-01-01", "end": "2019-03-31",
                               "fields": ["close"], "fill": "ffill", "fill_limit": 3})
    got = recipe.build(cn_daily_store, cache=False)
    want = ft.build("000001.SZ", "2019-01-01", "2019-03-31", store=cn_daily_store, fill=("ffill", 3), cache=False)
    torch.testing.assert_close(got.values, want.values, equal_nan=True)
