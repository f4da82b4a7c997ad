"""ft.import_csv on every file family in ../shared/data: read-back values equal the source files.

The oracle is always the source file read independently with pandas (plus the unit conversions that
PROVENANCE.md documents), and a few hand-checked numbers from PROVENANCE.md.
"""
from __future__ import annotations

import gzip
import json
import shutil
import zipfile

import numpy as np
import pandas as pd
import pytest

import fintensor as ft
from fintensor.cli import main
from fintensor.errors import ConflictError, BadInputError

NY, SH = "America/New_York", "Asia/Shanghai"


def utc(local: str, tz: str) -> pd.Timestamp:
    return pd.Timestamp(local).tz_localize(tz).tz_convert("UTC")


def dates(col) -> np.ndarray:
    return pd.to_datetime(pd.Series(col).astype(str)).to_numpy()


def assert_columns_equal(got: pd.DataFrame, src: pd.DataFrame, pairs: dict, scale: dict | None = None):
    for ours, theirs in pairs.items():
        expected = src[theirs].to_numpy(dtype=float) * (scale or {}).get(ours, 1)
        np.testing.assert_allclose(got[ours].to_numpy(dtype=float), expected, rtol=1e-12, err_msg=ours)


OHLC = {"open": "open", "high": "high", "low": "low", "close": "close"}


# ------------------------------------------------------------------------------- fixture stores
def test_us_daily_store_equals_the_30_yahoo_files(us_daily_store, shared_data):
    files = sorted((shared_data / "us_daily/sp500_5yr_yahoo").glob("*_data.csv"))
    assert len(files) == 30 and len(us_daily_store.symbols()) == 30
    for f in files:
        src = pd.read_csv(f)
        sym = src["Name"].iloc[0]
        got = us_daily_store.read(sym, as_pandas=True)
        assert len(got) == len(src), sym
        np.testing.assert_array_equal(dates(got["date"]), dates(src["Date"]))
        assert_columns_equal(got, src, {"open": "Open", "high": "High", "low": "Low", "close": "Close",
                                        "adj_close": "Adj Close", "volume": "Volume"})
        man = us_daily_store.manifest(sym)
        assert (man["adjustment"], man["adjusted_as_of"]) == ("split", src["Date"].iloc[-1])
        assert man["timezone"] == NY and man["units"] == {"volume": "shares", "price_scale": 1}
    assert len(us_daily_store.read("ABBV")) == 1243 and len(us_daily_store.read("PYPL")) == 613


def test_cn_daily_store_equals_the_31_baostock_files(cn_daily_store, shared_data):
    files = sorted((shared_data / "cn_daily/baostock_qfq/panel_2018-01_2020-08").glob("*.csv"))
    assert len(files) == 31 and len(cn_daily_store.symbols()) == 31
    for f in files:
        src = pd.read_csv(f)
        sym = ft.symbols.normalize(src["code"].iloc[0])  # sh.600030 -> 600030.SS
        got = cn_daily_store.read(sym, as_pandas=True)
        np.testing.assert_array_equal(dates(got["date"]), dates(src["date"]))
        assert_columns_equal(got, src, OHLC | {"pre_close": "preclose", "volume": "volume", "amount": "amount",
                                              "turnover": "turn", "trade_status": "tradestatus"})
        man = cn_daily_store.manifest(sym)
        assert (man["adjustment"], man["adjusted_as_of"], man["timezone"]) == ("full", src["date"].iloc[-1], SH)
    assert cn_daily_store.aliases()["sh.600030"] == "600030.SS"
    susp = cn_daily_store.read("600030.SS", "2019-01-02", "2019-01-10", as_pandas=True)
    assert susp["trade_status"].tolist() == [0] * 6 + [1]  # suspended 01-02..01-09, stored, not dropped
    assert (susp["volume"].iloc[:6] == 0).all() and susp["turnover"].iloc[:6].isna().all()
    assert cn_daily_store.coverage("000693.SZ") == ("2018-01-02", "2019-07-08")
    assert cn_daily_store.coverage("002948.SZ")[0] == "2019-01-16"


def test_lots_and_thousands_are_converted_baostock_equals_tushare(cn_daily_store, shared_data, store):
    report = ft.import_csv(shared_data / "cn_daily/tushare_raw/000001.SZ.csv", store=store)
    assert report["000001.SZ"].units["converted"] == "volume lots x100, amount x1000"
    tushare = store.read("000001.SZ", "2019-01-02", "2019-01-02", as_pandas=True).iloc[0]
    baostock = cn_daily_store.read("000001.SZ", "2019-01-02", "2019-01-02", as_pandas=True).iloc[0]
    assert baostock["volume"] == 53_938_632                      # shares in the baostock file
    assert tushare["volume"] == pytest.approx(539_386.32 * 100, rel=1e-12)  # lots x100
    assert tushare["volume"] == pytest.approx(baostock["volume"], rel=1e-12)
    assert tushare["amount"] == pytest.approx(498_695.109 * 1000, rel=1e-12)  # thousand CNY
    assert tushare["amount"] == pytest.approx(baostock["amount"], rel=1e-5)
    assert tushare["close"] == 9.19 and baostock["close"] == pytest.approx(8.940299)  # raw vs forward-adjusted
    man = store.manifest("000001.SZ")
    assert man["adjustment"] == "raw" and man["adjusted_as_of"] is None
    assert man["units"]["volume_factor"] == 100 and man["units"]["amount_factor"] == 1000


def test_cn_tick_store_ticks_and_minute_bars(cn_tick_store, shared_data):
    hikyuu = shared_data / "cn_intraday_tick/hikyuu"
    src = pd.read_csv(hikyuu / "trans_tick_2019-02-01_2019-02-11.csv.gz", dtype={"datetime": str})
    src["day"] = src["datetime"].str[:8]
    ticks = cn_tick_store.read_ticks("000001.SZ", "2019-02-01", "2019-02-01", as_pandas=True)
    assert ticks["volume"].sum() == 101_427_000  # PROVENANCE: the day's ticks sum to 101,427,000 shares
    one = src[(src.symbol == "000001.SZ") & (src.day == "20190201")]
    assert len(ticks) == len(one)
    np.testing.assert_allclose(ticks["price"], one["price"] / 1000)
    np.testing.assert_allclose(ticks["volume"], one["vol"] * 100)
    np.testing.assert_array_equal(ticks["side"], one["buyorsell"])
    local = pd.to_datetime(one["datetime"], format="%Y%m%d%H%M%S").dt.tz_localize(SH).dt.tz_convert("UTC")
    np.testing.assert_array_equal(pd.DatetimeIndex(ticks["time"]), pd.DatetimeIndex(local))
    assert ticks["time"].iloc[0] == utc("2019-02-01 09:25:02", SH)  # the opening auction
    for (sym, day), group in src.groupby(["symbol", "day"]):
        got = cn_tick_store.read_ticks(sym, day, day)
        assert got.num_rows == len(group), (sym, day)
    man = cn_tick_store.manifest("000001.SZ", date="2019-02-11")
    assert man["units"]["price_scale"] == 1000 and man["timezone"] == SH

    bars_src = pd.read_csv(hikyuu / "time_1min_2018-12-03_2019-02-01.csv.gz")
    assert sorted(cn_tick_store.symbols("1m")) == sorted(ft.symbols.normalize(s) for s in bars_src.symbol.unique())
    bars = cn_tick_store.read("000001.SZ", interval="1m", as_pandas=True)
    assert len(bars) == 43 * 240
    first = bars[bars["time"] == utc("2019-02-01 09:30", SH)].iloc[0]
    assert (first["close"], first["volume"], str(first["date"])) == (11.23, 38_886 * 100, "2019-02-01")
    index = bars_src[bars_src.symbol == "000001.SH"]  # SH000001 is the SSE index, canonically 000001.SS
    np.testing.assert_allclose(cn_tick_store.read("000001.SS", interval="1m", as_pandas=True)["close"],
                               index["price"] / 1000)


def test_us_minute_store_equals_the_lean_zips(us_minute_store, shared_data):
    for sym in ("spy", "ibm", "aig", "bac"):
        files = sorted((shared_data / f"lean_algoseek_us_equity/minute/{sym}").glob("201310*_trade.zip"))
        assert len(files) == 6
        src = pd.concat([pd.read_csv(f, header=None).assign(day=f.name[:8]) for f in files], ignore_index=True)
        got = us_minute_store.read(sym.upper(), interval="1m", as_pandas=True)
        assert len(got) == len(src)
        expect = (pd.to_datetime(src["day"]) + pd.to_timedelta(src[0], unit="ms")).dt.tz_localize(NY)
        np.testing.assert_array_equal(pd.DatetimeIndex(got["time"]), pd.DatetimeIndex(expect.dt.tz_convert("UTC")))
        for i, name in enumerate(["open", "high", "low", "close"], start=1):
            np.testing.assert_allclose(got[name], src[i] / 10_000, rtol=1e-12)
        np.testing.assert_array_equal(got["volume"], src[5])
    spy = us_minute_store.read("SPY", "2013-10-07", "2013-10-07", interval="1m", as_pandas=True).iloc[0]
    assert (spy["time"], spy["open"], spy["volume"]) == (utc("2013-10-07 04:00", NY), 167.41, 3197)
    assert us_minute_store.manifest("SPY", "1m")["units"]["converted"] == "prices /10000"


# ------------------------------------------------------------------------------ other families
EVERY_FILE = [  # (glob, options, close column in the source, price scale) -- all the files of each family
    ("us_daily/mplfinance/*.csv", {}, "Close", 1),
    ("us_daily/backtrader/*", {}, "Close", 1),
    ("us_daily/zipline_corporate_actions/csvdir_daily_*.csv.gz", {}, "close", 1),
    ("cn_daily/baostock_qfq/full_history/*.csv", {}, "close", 1),
    ("cn_daily/tushare_raw/*.csv", {}, "close", 1),
    ("lean_algoseek_us_equity/daily/*.zip", {}, 4, 10_000),
    ("lean_algoseek_us_equity/minute/*/*_trade.zip", {}, 4, 10_000),
    ("lean_algoseek_us_equity/tick/bac/*_trade.zip", {}, 1, 10_000),
    ("us_intraday/mplfinance_sp500_1min/SP500_NOV2019_Hist.csv", {"symbol": "^GSPC"}, "Close", 1),
    ("futures_intraday/backtrader/2006-day-001.txt", {"symbol": "SX5E"}, "Close", 1),
    ("futures_intraday/backtrader/2006-volume-day-001.txt", {"symbol": "FESX"}, "Close", 1),
]


@pytest.mark.parametrize("pattern, options, close, scale", EVERY_FILE, ids=[c[0] for c in EVERY_FILE])
def test_every_file_of_each_family_imports(shared_data, store, pattern, options, close, scale):
    files = sorted(shared_data.glob(pattern))
    report = ft.import_csv(files, store=store, **options)
    header = None if isinstance(close, int) else "infer"
    src = pd.concat([pd.read_csv(f, header=header) for f in files], ignore_index=True)
    read = [store.read_ticks(r.symbol, columns=["price"]) if r.interval == "tick"
            else store.read(r.symbol, interval=r.interval, columns=["close"]) for r in report.results]
    stored = np.concatenate([t.column(t.num_columns - 1).to_numpy() for t in read])  # price or close
    assert len(stored) == sum(r.rows for r in report.results) == len(src)
    assert stored.sum() == pytest.approx(src[close].sum() / scale, rel=1e-12)


def test_lean_quote_ticks_with_trades(shared_data, store):
    """Quote ticks are bid or ask updates (the other side 0 = absent), stored beside the day's trades."""
    tick = shared_data / "lean_algoseek_us_equity/tick/ibm"
    trades, quotes = tick / "20131007_trade.zip", tick / "20131007_quote.zip"
    ft.import_csv(trades, store=store)
    with pytest.raises(ft.errors.ConflictError, match="import a day's trades and quotes together"):
        ft.import_csv(quotes, store=store)  # would fuse quotes into the stored trades: refused
    store.remove("IBM", "tick")
    report = ft.import_csv([trades, quotes], store=store)
    q = pd.read_csv(quotes, header=None)  # ms, bid, bid_size, ask, ask_size, exchange, condition, suspicious
    t = pd.read_csv(trades, header=None)
    assert report["IBM"].warnings == [f"dropped {(q[7] == 1).sum()} record(s) flagged suspicious"]
    q = q[q[7] == 0]
    assert report["IBM"].rows == len(q) + len(t)
    got = store.read_ticks("IBM", as_pandas=True)
    bids = got[got["bid"].notna()]
    assert len(bids) == (q[1] > 0).sum() and got["ask"].notna().sum() == (q[3] > 0).sum()
    assert bids["bid"].sum() == pytest.approx(q[1].sum() / 10_000, rel=1e-12)
    assert bids["bid_size"].sum() == q.loc[q[1] > 0, 2].sum()
    assert got["price"].notna().sum() == len(t) and not got.duplicated(["time", "seq"]).any()


@pytest.mark.parametrize("rel, symbol, rows, pairs", [
    ("us_daily/mplfinance/yahoofinance-AAPL-20040819-20180120.csv", "AAPL", 3379, {}),
    ("us_daily/backtrader/daily-KO.csv", "KO", 356, {}),            # Volume before Adj Close
    ("us_daily/backtrader/nvda-1999-2014.txt", "NVDA", 4012, {}),   # a CSV despite .txt
])
def test_yahoo_style_files_symbol_from_file_name(shared_data, store, rel, symbol, rows, pairs):
    report = ft.import_csv(shared_data / rel, store=store)
    assert report.symbols == [symbol] and report[symbol].format == "yahoo"
    src = pd.read_csv(shared_data / rel)
    got = store.read(symbol, as_pandas=True)
    assert len(got) == len(src) == rows
    assert_columns_equal(got, src, {"open": "Open", "close": "Close", "adj_close": "Adj Close", "volume": "Volume"})
    assert store.manifest(symbol)["adjustment"] == "split"


def test_mplfinance_intraday_column_order_and_eastern_time(shared_data, store):
    path = shared_data / "us_intraday/mplfinance_sp500_1min/SP500_NOV2019_IDay.csv"
    report = ft.import_csv(path, store=store, symbol="^GSPC")
    assert report["^GSPC"].interval == "1m"
    src = pd.read_csv(path)
    got = store.read("^GSPC", interval="1m", as_pandas=True)
    assert len(got) == 1563
    assert_columns_equal(got, src, {"open": "Open", "close": "Close", "high": "High", "low": "Low"})
    assert got["time"].iloc[0] == utc("2019-11-05 09:30", NY)
    assert got.groupby("date").size().tolist() == [391, 391, 391, 390]


def test_backtrader_futures_header_one_name_short(shared_data, store):
    path = shared_data / "futures_intraday/backtrader/2006-01-02-volume-min-001.txt"
    with pytest.raises(BadInputError, match="no timezone"):
        ft.import_csv(path, store=store, symbol="FESX")
    ft.import_csv(path, store=store, symbol="FESX", timezone="Europe/Berlin")
    src = pd.read_csv(path, header=None, skiprows=1)  # date,time,open,high,low,close,volume,oi
    got = store.read("FESX", interval="1m", as_pandas=True)
    assert len(got) == len(src) == 30_889
    assert got["time"].iloc[0] == utc("2006-01-02 09:01", "Europe/Berlin")
    np.testing.assert_allclose(got["close"], src[5])
    np.testing.assert_allclose(got["volume"], src[6])
    five = ft.import_csv(path.with_name("2006-min-005.txt"), store=store, symbol="SX5E", timezone="Europe/Berlin")
    assert five["SX5E"].interval == "5m"
    ticks = ft.import_csv(path.with_name("ticksample.csv"), store=store, symbol="FESX", kind="ticks",
                          timezone="Europe/Berlin")
    assert ticks["FESX"].rows == 135
    src = pd.read_csv(path.with_name("ticksample.csv"))
    np.testing.assert_allclose(store.read_ticks("FESX", as_pandas=True)["price"], src["Close"])


def test_wide_layout_gz_and_zip_and_explicit_units(shared_data, tmp_path, store):
    yahoo = shared_data / "us_daily/sp500_5yr_yahoo"
    frames = {s: pd.read_csv(yahoo / f"{s}_data.csv").set_index("Date")["Close"] for s in ("AAPL", "MSFT")}
    wide = pd.DataFrame(frames).rename_axis("Date").reset_index()
    wide.to_csv(tmp_path / "closes.csv", index=False)
    report = ft.import_csv(tmp_path / "closes.csv", store=store)
    assert report.symbols == ["AAPL", "MSFT"]
    for s in ("AAPL", "MSFT"):
        got = store.read(s, as_pandas=True)
        np.testing.assert_allclose(got["close"], frames[s].to_numpy())
        assert got["open"].isna().all()

    raw = (yahoo / "IBM_data.csv").read_bytes()
    (tmp_path / "IBM.csv.gz").write_bytes(gzip.compress(raw))
    with zipfile.ZipFile(tmp_path / "GE.zip", "w") as zf:
        zf.writestr("GE_data.csv", (yahoo / "GE_data.csv").read_bytes())
    ft.import_csv([tmp_path / "IBM.csv.gz", tmp_path / "GE.zip"], store=store)
    for s in ("IBM", "GE"):
        assert_columns_equal(store.read(s, as_pandas=True), pd.read_csv(yahoo / f"{s}_data.csv"),
                             {"close": "Close", "volume": "Volume"})

    csv = tmp_path / "600519.SH.csv"  # a plain file in lots and fen: the options convert it
    csv.write_text("date,close,volume\n2019-01-02,59860,12345\n2019-01-03,59000,2000\n")
    r = ft.import_csv(csv, store=store, volume_unit="lots", price_scale=100)
    got = store.read("600519.SS", as_pandas=True)
    assert got["close"].tolist() == [598.6, 590.0] and got["volume"].tolist() == [1_234_500, 200_000]
    assert store.aliases()["600519.SH"] == "600519.SS" and r["600519.SS"].units["price_scale"] == 100


def test_yfinance_export_with_offsets_is_fully_adjusted(shared_data, tmp_path, store):
    """yfinance's own CSV export: midnight timestamps with UTC offsets, Dividends, 'Stock Splits' 0 = none."""
    src = pd.read_csv(shared_data / "us_daily/sp500_5yr_yahoo/KO_data.csv").head(40)
    offset = np.where(pd.to_datetime(src["Date"]).dt.month.isin([1, 2]), "-05:00", "-04:00")
    export = pd.DataFrame({"Date": src["Date"] + " 00:00:00" + offset, "Open": src["Open"], "High": src["High"],
                           "Low": src["Low"], "Close": src["Adj Close"], "Volume": src["Volume"],
                           "Dividends": 0.0, "Stock Splits": 0.0})
    export.loc[5, "Dividends"], export.loc[9, "Stock Splits"] = 0.28, 2.0
    export.to_csv(tmp_path / "KO.csv", index=False)
    report = ft.import_csv(tmp_path / "KO.csv", store=store)
    assert (report["KO"].format, report["KO"].adjustment, report["KO"].interval) == ("yfinance", "full", "1d")
    got = store.read("KO", as_pandas=True)
    np.testing.assert_array_equal(dates(got["date"]), dates(src["Date"]))  # the session date as written
    np.testing.assert_allclose(got["close"], src["Adj Close"])
    assert got["split"].tolist() == [1.0] * 9 + [2.0] + [1.0] * 30
    assert got["dividend"].iloc[5] == 0.28 and got["dividend"].drop(index=5).eq(0).all()


def test_explicit_format_and_symbol_override_detection(shared_data, tmp_path, store):
    lean = shared_data / "lean_algoseek_us_equity/minute/ibm/20131008_trade.zip"
    with zipfile.ZipFile(lean) as zf:
        body = zf.read(zf.namelist()[0])
    (tmp_path / "20131008.csv").write_bytes(body)  # no vendor hints left in the name
    with pytest.raises(BadInputError, match="not a known headerless layout"):
        ft.import_csv(tmp_path / "20131008.csv", store=store, symbol="IBM")
    report = ft.import_csv(tmp_path / "20131008.csv", store=store, symbol="IBM", format="lean_minute")
    assert report["IBM"].interval == "1m"
    src = pd.read_csv(lean, header=None)
    got = store.read("IBM", interval="1m", as_pandas=True)
    np.testing.assert_allclose(got["close"], src[4] / 10_000)
    assert got["time"].iloc[0] == utc("2013-10-08", NY) + pd.Timedelta(milliseconds=int(src[0].iloc[0]))


def test_utc_offsets_and_unsorted_duplicate_rows(tmp_path, store):
    path = tmp_path / "X.csv"
    path.write_text("datetime,price,volume\n2019-02-01T09:31:00+08:00,11.3,200\n2019-02-01T09:30:00+08:00,11.2,100\n"
                    "2019-02-01T09:30:00+08:00,11.2,100\n")
    ft.import_csv(path, store=store, symbol="000001.SZ", kind="ticks")
    ticks = store.read_ticks("000001.SZ", as_pandas=True)
    assert ticks["time"].tolist() == [utc("2019-02-01 09:30", SH)] * 2 + [utc("2019-02-01 09:31", SH)]
    bars = tmp_path / "Y.csv"
    bars.write_text("Date,Close,Volume\n2019-01-03,2,5\n2019-01-02,1,4\n2019-01-03,2,5\n"  # unsorted, a duplicate
                    "2019-01-04,null,null\n")  # old Yahoo CSVs write 'null' rows for missing days
    report = ft.import_csv(bars, store=store, symbol="Y")
    assert store.read("Y", as_pandas=True)["close"].tolist() == [1, 2]
    assert report["Y"].warnings == ["dropped 1 row(s) without values"]


# ------------------------------------------------------------------------ re-import and conflicts
def test_reimport_is_a_noop(shared_data, store, store_digest):
    files = [shared_data / "cn_daily/tushare_raw/000651.SZ.csv",
             shared_data / "cn_intraday_tick/hikyuu/trans_tick_2019-02-01_2019-02-11.csv.gz"]
    first = ft.import_csv(files, store=store)
    before = store_digest(store)
    again = ft.import_csv(files, store=store)
    assert store_digest(store) == before
    assert again.added == again.updated == 0
    assert [r.unchanged for r in again.results] == [r.added for r in first.results]


def test_conflicting_reimport_raises_then_keep_or_overwrite(shared_data, tmp_path, store, store_digest, capsys):
    src = shared_data / "cn_daily/tushare_raw/000651.SZ.csv"
    ft.import_csv(src, store=store)
    edited = tmp_path / "000651.SZ.csv"
    df = pd.read_csv(src, dtype=str)
    row = df.index[df["trade_date"] == "20190102"][0]
    old_close = float(df.loc[row, "close"])
    df.loc[row, "close"] = "99.99"
    df.to_csv(edited, index=False)
    before = store_digest(store)
    with pytest.raises(ConflictError, match=r"close: stored .*, new 99.99"):
        ft.import_csv(edited, store=store)
    assert main(["import", str(edited), "--store", str(store.root)]) == 2
    assert "error:" in capsys.readouterr().err
    assert store_digest(store) == before
    assert ft.import_csv(edited, store=store, on_conflict="keep").updated == 0
    assert store.read("000651.SZ", "2019-01-02", "2019-01-02")["close"][0].as_py() == old_close
    assert main(["import", str(edited), "--store", str(store.root), "--on-conflict", "overwrite", "-q"]) == 0
    assert store.read("000651.SZ", "2019-01-02", "2019-01-02")["close"][0].as_py() == 99.99
    assert store.read("000651.SZ", "2019-01-03", "2019-01-03")["close"][0].as_py() == float(
        df.loc[row + 1, "close"])


def test_cli_prints_one_line_per_symbol_and_json(shared_data, store, capsys):
    path = shared_data / "cn_daily/tushare_raw"
    assert main(["import", str(path), "--store", str(store.root)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out[:3]] == ["000001.SZ", "000651.SZ", "600028.SS"]
    assert "2006 rows, 2006 added" in out[0]
    assert main(["import", str(path / "600028.SH.csv"), "--store", str(store.root), "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["results"][0]["unchanged"] == 2006 and payload["results"][0]["alias"] == "600028.SH"


def test_copy_of_a_fixture_store_is_independent(us_daily_store, tmp_path):
    """Fixture stores are shared read-only; tests that write copy them first (as this one shows)."""
    copy = ft.Store(shutil.copytree(us_daily_store.root, tmp_path / "s"))
    assert copy.fingerprint(["AAPL"]) == us_daily_store.fingerprint(["AAPL"])


def test_cli_help_lists_every_preset(capsys):
    from fintensor.sources.files import PRESETS

    assert main(["import", "--help"]) == 0
    help_text = capsys.readouterr().out
    assert [p.name for p in PRESETS if p.name not in help_text] == []
