"""ft.download / `fintensor download` against a fake Yahoo behind yfinance's request seam.

yfinance's own parsing runs on every response (see yahoo_stub.py); served bars are real (the shared
sp500_5yr_yahoo and tushare files) or random walks on real exchange sessions.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from yahoo_stub import FakeTime, session_bars

import fintensor as ft
from fintensor import calendars
from fintensor.cli import main
from fintensor.errors import BadInputError, DownloadError

NY, SH = "America/New_York", "Asia/Shanghai"
NOW = pd.Timestamp.now(tz="UTC")


@pytest.fixture
def fake_time():
    return FakeTime()


def fetch(fake_time, symbols, start=None, end=None, interval="1d", **kw):
    return ft.download(symbols, start, end, interval, sleep=fake_time.sleep, clock=fake_time.clock, **kw)


def midnight(day, tz) -> int:
    return int(pd.Timestamp(day).tz_localize(tz).timestamp())


def served_daily(bars: pd.DataFrame, tz: str) -> pd.DataFrame:
    """The served bars as the store should hold them: keyed by local session date."""
    out = bars.reset_index(drop=True)
    out.insert(0, "date", bars.index.tz_convert(tz).date)
    return out


def snapshot(root: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()} if root.exists() else {}


def csv_bars(path: Path, calendar: str, start: str, end: str, **columns) -> pd.DataFrame:
    """Real daily rows of a shared CSV, stamped at the session open as Yahoo stamps daily bars."""
    raw = pd.read_csv(path)
    dates = pd.to_datetime(raw[columns.pop("date")].astype(str))
    raw = raw[(dates >= start) & (dates <= end)]
    dates = dates[raw.index]
    cal = calendars.get(calendar)
    frame = pd.DataFrame({ours: raw[theirs].to_numpy(float) for ours, theirs in columns.items()})
    frame.index = pd.DatetimeIndex([cal.session_open(d) for d in dates]).tz_convert("UTC")
    return frame


# ------------------------------------------------------------------------------------- daily bars
def test_daily_real_bars_us_and_ashare(fake_yahoo, store, fake_time, shared_data):
    aapl = csv_bars(shared_data / "us_daily/sp500_5yr_yahoo/AAPL_data.csv", "XNYS", "2016-01-01", "2016-12-31",
                    date="Date", open="Open", high="High", low="Low", close="Close", adj_close="Adj Close",
                    volume="Volume")
    sino = csv_bars(shared_data / "cn_daily/tushare_raw/600028.SH.csv", "XSHG", "2016-01-01", "2016-12-31",
                    date="trade_date", open="open", high="high", low="low", close="close", volume="vol")
    sino["volume"] = (sino["volume"] * 100).round()  # tushare counts lots; Yahoo serves whole shares
    dividends = {"2016-02-04": 0.52, "2016-05-05": 0.57, "2016-08-04": 0.57, "2016-11-03": 0.57}
    fake_yahoo.add("AAPL", aapl, tz=NY, dividends=dividends)
    fake_yahoo.add("600028.SS", sino, tz=SH, currency="CNY")

    report = fetch(fake_time, ["aapl", "600028.SH"], "2016-01-01", "2016-12-31", store=store)

    assert report.ok and [r.status for r in report] == ["ok", "ok"]
    assert report["AAPL"].rows == len(aapl) and report["600028.SH"].rows == len(sino)
    for symbol, bars, tz in (("AAPL", aapl, NY), ("600028.SS", sino, SH)):
        got = store.read(symbol, as_pandas=True)
        want = served_daily(bars, tz)
        assert list(got["date"]) == list(want["date"])
        for col in ("open", "high", "low", "close", "volume"):
            np.testing.assert_allclose(got[col], want[col], rtol=1e-9, err_msg=f"{symbol} {col}")
        assert (got["split"] == 1.0).all()  # Yahoo's 'Stock Splits' 0 means none
        man = store.manifest(symbol)
        assert (man["source"], man["adjustment"], man["timezone"]) == ("yahoo", "split", tz)
        # one request for exactly the asked sessions, in the exchange's local time
        assert fake_yahoo.periods(symbol) == [(midnight("2016-01-01", tz), midnight("2017-01-01", tz))]
    got = store.read("AAPL", as_pandas=True).set_index("date")
    np.testing.assert_allclose(got["adj_close"], aapl["adj_close"].to_numpy(), rtol=1e-9)
    paid = got["dividend"][got["dividend"] > 0]
    assert {d.isoformat(): v for d, v in paid.items()} == dividends
    assert store.aliases() == {"aapl": "AAPL", "600028.SH": "600028.SS"}


def test_incremental_download_requests_only_the_missing_range(fake_yahoo, store, fake_time):
    bars = session_bars("XNYS", "2024-01-02", "2024-06-28", seed=1)
    fake_yahoo.add("AAPL", bars, tz=NY)
    first = fetch(fake_time, "AAPL", "2024-02-01", "2024-03-29", store=store)
    assert fake_yahoo.periods() == [(midnight("2024-02-01", NY), midnight("2024-03-30", NY))]
    stored_last = store.read("AAPL", as_pandas=True)["date"].iloc[-1]
    assert stored_last.isoformat() == "2024-03-28"  # 2024-03-29 was Good Friday

    again = fetch(fake_time, "AAPL", "2024-02-01", "2024-03-29", store=store)
    assert len(fake_yahoo.periods()) == 1 and again.ok and again["AAPL"].requests == 0
    assert again["AAPL"].rows == 0 and "nothing requested" in again["AAPL"].message

    later = fetch(fake_time, "AAPL", "2024-02-01", "2024-04-30", store=store)  # only the tail
    assert fake_yahoo.periods()[1:] == [(midnight("2024-03-29", NY), midnight("2024-05-01", NY))]
    earlier = fetch(fake_time, "AAPL", "2024-01-16", "2024-04-30", store=store)  # only the front
    assert fake_yahoo.periods()[2:] == [(midnight("2024-01-16", NY), midnight("2024-02-01", NY))]

    beyond = fetch(fake_time, "AAPL", "2024-06-03", "2024-06-28", store=store)  # May too: no hole
    assert fake_yahoo.periods()[3:] == [(midnight("2024-05-01", NY), midnight("2024-06-29", NY))]

    want = served_daily(bars, NY)
    want = want[want["date"] >= pd.Timestamp("2024-01-16").date()]
    got = store.read("AAPL", as_pandas=True)
    assert list(got["date"]) == list(want["date"])
    np.testing.assert_allclose(got["close"], want["close"])
    assert sum(r["AAPL"].rows for r in (first, later, earlier, beyond)) == len(want)


def test_a_split_in_the_tail_refreshes_the_stored_history(fake_yahoo, store, fake_time):
    before = session_bars("XNYS", "2024-01-02", "2024-02-29", seed=2)
    fake_yahoo.add("NVDA", before, tz=NY)
    fetch(fake_time, "NVDA", "2024-01-02", "2024-01-31", store=store)
    # a 2:1 split on 2024-02-15: Yahoo now serves every earlier price halved (split-adjusted)
    after = before.copy()
    early = after.index < pd.Timestamp("2024-02-15 14:30", tz="UTC")
    after.loc[early, ["open", "high", "low", "close", "adj_close"]] /= 2
    after.loc[early, "volume"] *= 2
    fake_yahoo.add("NVDA", after, tz=NY, splits={"2024-02-15": (2.0, 1.0)})

    report = fetch(fake_time, "NVDA", "2024-01-02", "2024-02-29", store=store)

    assert report.ok and "split on 2024-02-15" in report["NVDA"].message
    assert fake_yahoo.periods()[1:] == [(midnight("2024-02-01", NY), midnight("2024-03-01", NY)),
                                        (midnight("2024-01-02", NY), midnight("2024-03-01", NY))]
    got = store.read("NVDA", as_pandas=True)
    want = served_daily(after, NY)
    np.testing.assert_allclose(got["close"], want["close"])
    np.testing.assert_allclose(got["volume"], want["volume"])
    assert got.set_index("date")["split"].loc[pd.Timestamp("2024-02-15").date()] == 2.0
    assert (got["split"] != 1.0).sum() == 1


# ---------------------------------------------------------------------------------------- intraday
@pytest.mark.parametrize("symbol, calendar, tz", [("AAPL", "XNYS", NY), ("600519.SS", "XSHG", SH),
                                                  ("BBCA.JK", "XIDX", "Asia/Jakarta")])
def test_intraday_bars_are_utc_instants_with_local_session_dates(fake_yahoo, store, fake_time, symbol,
                                                                 calendar, tz):
    bars = session_bars(calendar, (NOW - pd.Timedelta(days=12)).date(), (NOW - pd.Timedelta(days=2)).date(),
                        "5m", seed=3)
    fake_yahoo.add(symbol, bars, "5m", tz=tz, currency="XXX")
    report = fetch(fake_time, symbol, (NOW - pd.Timedelta(days=14)).date(), interval="5m", store=store)

    assert report.ok and report[symbol].rows == len(bars) > 0
    got = store.read(symbol, interval="5m", as_pandas=True)
    assert str(got["time"].dtype) == "datetime64[ns, UTC]"
    assert (pd.DatetimeIndex(got["time"]) == bars.index).all()
    assert list(got["date"]) == list(bars.index.tz_convert(tz).date)
    np.testing.assert_allclose(got[["open", "high", "low", "close", "volume"]],
                               bars[["open", "high", "low", "close", "volume"]])
    # the timezone comes from Yahoo's chart meta (BBCA.JK's suffix is not in fintensor's own table)
    assert store.manifest(symbol, "5m")["timezone"] == tz
    local = got["time"].dt.tz_convert(tz)
    if calendar == "XSHG":  # lunch break: no bar starts in 11:30-13:00
        minutes = local.dt.hour * 60 + local.dt.minute
        assert not ((minutes >= 11 * 60 + 30) & (minutes < 13 * 60)).any()


def test_intraday_incremental_download_starts_after_the_last_stored_bar(fake_yahoo, store, fake_time):
    days = calendars.sessions("XNYS", (NOW - pd.Timedelta(days=20)).date(), (NOW - pd.Timedelta(days=2)).date())
    d1, d2 = (pd.Timestamp(d).date() for d in days[[-4, -2]])
    bars = session_bars("XNYS", days[0], days[-1], "5m", seed=4)
    fake_yahoo.add("AAPL", bars, "5m", tz=NY)
    # bars older than Yahoo's 60-day window, stored earlier: the next request must not reach back to them
    old = session_bars("XNYS", (NOW - pd.Timedelta(days=90)).date(), (NOW - pd.Timedelta(days=88)).date(), "5m")
    store.write_bars("AAPL", pd.DataFrame({"time": old.index, **{c: old[c] for c in ("open", "close", "volume")}}),
                     interval="5m", source="yahoo", adjust="split", timezone=NY)
    floor = (NOW - pd.Timedelta(days=60)).date() + pd.Timedelta(days=2)

    fetch(fake_time, "AAPL", end=d1, interval="5m", store=store)
    assert fake_yahoo.periods()[0][0] == midnight(floor, NY)
    last = store.read("AAPL", interval="5m", as_pandas=True)["time"].iloc[-1]
    fetch(fake_time, "AAPL", end=d2, interval="5m", store=store)
    assert fake_yahoo.periods()[1:] == [(int((last + pd.Timedelta(minutes=5)).timestamp()),
                                         midnight(d2 + pd.Timedelta(days=1), NY))]
    got = store.read("AAPL", interval="5m", start=floor, as_pandas=True)
    want = bars[bars.index.tz_convert(NY).date <= d2]
    assert (pd.DatetimeIndex(got["time"]) == want.index).all()


def test_1m_range_is_chunked_into_requests_of_at_most_8_days(fake_yahoo, store, fake_time):
    bars = session_bars("XNYS", (NOW - pd.Timedelta(days=27)).date(), (NOW + pd.Timedelta(days=1)).date(), "1m")
    fake_yahoo.add("SPY", bars, "1m", tz=NY)
    start = (NOW - pd.Timedelta(days=26)).date()
    before = pd.Timestamp.now(tz="UTC")
    report = fetch(fake_time, "SPY", start, interval="1m", store=store)
    after = pd.Timestamp.now(tz="UTC")

    assert report.ok
    periods = fake_yahoo.periods("SPY")
    assert len(periods) >= 4
    assert all(0 < b - a <= 8 * 86400 for a, b in periods)
    assert all(b == a2 for (_, b), (a2, _) in zip(periods, periods[1:]))  # contiguous, no gap, no overlap
    assert periods[0][0] == midnight(start, NY) and periods[-1][1] > after.timestamp()
    # every finished bar is stored, no bar still forming is
    got = store.read("SPY", interval="1m", as_pandas=True)["time"]
    step = pd.Timedelta(minutes=1)
    assert (got + step <= after).all()
    finished = bars.index[(bars.index >= pd.Timestamp(start).tz_localize(NY)) & (bars.index + step <= before)]
    assert set(finished.tz_convert(None)) <= set(got.dt.tz_convert(None))


def test_refused_intraday_range_fails_before_any_request(fake_yahoo, store, fake_time):
    for interval, days, limit in (("1m", 35, "30 days"), ("5m", 70, "60 days"), ("60m", 800, "730 days")):
        with pytest.raises(BadInputError, match=limit):
            fetch(fake_time, "AAPL", (NOW - pd.Timedelta(days=days)).date(), interval=interval, store=store)
    assert fake_yahoo.requests == [] and not store.root.exists()


# ------------------------------------------------------------------------------ failures, retries
def test_unknown_symbol_is_reported_and_the_others_stored(fake_yahoo, store, fake_time, capsys):
    fake_yahoo.add("AAPL", session_bars("XNYS", "2024-01-02", "2024-01-31"), tz=NY)
    report = fetch(fake_time, ["AAPL", "NOSUCH"], "2024-01-02", "2024-01-31", store=store)

    assert not report.ok and [r.symbol for r in report.failed] == ["NOSUCH"]
    assert report["NOSUCH"].status == "not_found" and "no such symbol" in report["NOSUCH"].message
    assert report["AAPL"].ok and len(store.read("AAPL")) == report["AAPL"].rows > 0
    assert store.symbols() == ["AAPL"]
    with pytest.raises(DownloadError, match="NOSUCH: not found") as err:
        report.raise_for_status()
    assert err.value.exit_code == 1 and err.value.report is report

    code = main(["download", "AAPL", "NOSUCH", "--start", "2024-01-02", "--end", "2024-01-31",
                 "--store", str(store.root), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 1
    assert [(r["symbol"], r["status"]) for r in out["results"]] == [("AAPL", "ok"), ("NOSUCH", "not_found")]


def test_partial_batch_reports_each_symbol(fake_yahoo, store, fake_time):
    for i, sym in enumerate(["AAPL", "MSFT", "IBM"]):
        fake_yahoo.add(sym, session_bars("XNYS", "2024-01-02", "2024-01-31", seed=i), tz=NY)
    fake_yahoo.fail("timeout", symbol="MSFT", times=None)
    report = fetch(fake_time, ["AAPL", "MSFT", "IBM", "NOSUCH"], "2024-01-02", "2024-01-31", store=store,
                   retries=2)

    assert [r.status for r in report] == ["ok", "failed", "ok", "not_found"]
    assert "ReadTimeout" in report["MSFT"].message and report["MSFT"].requests == 3
    assert store.symbols() == ["AAPL", "IBM"]
    assert report.rows == len(store.read(["AAPL", "IBM"]))


def test_rate_limit_that_clears_on_retry(fake_yahoo, store, fake_time):
    bars = session_bars("XNYS", "2024-01-02", "2024-01-31")
    fake_yahoo.add("AAPL", bars, tz=NY)
    fake_yahoo.fail("429", symbol="AAPL", times=3)
    report = fetch(fake_time, "AAPL", "2024-01-02", "2024-01-31", store=store)

    assert report.ok and report["AAPL"].rows == len(bars)
    assert len(fake_time.sleeps) == 3  # exponential backoff with jitter: [0.5, 1] x 1, 2, 4 s
    for k, s in enumerate(fake_time.sleeps):
        assert 0.5 * 2 ** k <= s <= 2 ** k
    np.testing.assert_allclose(store.read("AAPL", as_pandas=True)["close"], bars["close"])


def test_rate_limit_that_never_clears_is_bounded_in_time(fake_yahoo, store, fake_time):
    for sym in ("AAPL", "MSFT"):
        fake_yahoo.add(sym, session_bars("XNYS", "2024-01-02", "2024-01-31"), tz=NY)
    fake_yahoo.fail("429", times=None)
    report = fetch(fake_time, ["AAPL", "MSFT"], "2024-01-02", "2024-01-31", store=store, retries=50,
                   max_wait=20, workers=1)

    assert [r.status for r in report] == ["rate_limited", "rate_limited"]
    assert sum(fake_time.sleeps) <= 20 and len(fake_time.sleeps) < 50
    assert report["AAPL"].requests == len(fake_time.sleeps) + 1
    assert report["MSFT"].requests == 0 and "not attempted" in report["MSFT"].message
    assert not store.root.exists()
    with pytest.raises(DownloadError, match="rate limited"):
        report.raise_for_status()


def test_transient_errors_are_retried_and_truncated_responses_not_replayed(fake_yahoo, store, fake_time):
    bars = session_bars("XNYS", "2024-01-02", "2024-01-31")
    fake_yahoo.add("AAPL", bars, tz=NY)
    for kind in ("timeout", "truncated", "down"):
        fake_yahoo.fail(kind, symbol="AAPL")
    report = fetch(fake_time, "AAPL", "2024-01-02", "2024-01-31", store=store)

    assert report.ok and len(fake_time.sleeps) == 3
    assert [r["fault"] for r in fake_yahoo.requests[:3]] == ["timeout", "truncated", "down"]
    np.testing.assert_allclose(store.read("AAPL", as_pandas=True)["close"], bars["close"])


# ------------------------------------------------------------------------------------------ symbols
def test_symbols_are_normalised_and_the_spelling_kept_as_alias(fake_yahoo, store, fake_time):
    for i, sym in enumerate(["000001.SZ", "600519.SS", "BRK-B"]):
        cal, tz = ("XNYS", NY) if sym == "BRK-B" else ("XSHG", SH)
        fake_yahoo.add(sym, session_bars(cal, "2024-01-02", "2024-01-31", seed=i), tz=tz)
    report = fetch(fake_time, ["000001.XSHE", "600519.XSHG", "600519.SH", "sh.600519", "BRK.B"],
                   "2024-01-02", "2024-01-31", store=store)

    assert [r.symbol for r in report] == ["000001.SZ", "600519.SS", "BRK-B"]
    assert report.ok and report["sh.600519"] is report["600519.SS"]
    assert {r["symbol"] for r in fake_yahoo.requests} == {"000001.SZ", "600519.SS", "BRK-B"}
    assert store.aliases() == {"000001.XSHE": "000001.SZ", "600519.XSHG": "600519.SS", "BRK.B": "BRK-B"}
    assert store.symbols() == ["000001.SZ", "600519.SS", "BRK-B"]


# ---------------------------------------------------------------------------------------- bad input
BAD = {
    "path characters": (["../AAPL"], [], "path separator"),
    "start after end": (["AAPL"], ["--start", "2024-03-01", "--end", "2024-02-01"], "after end"),
    "unparseable date": (["AAPL"], ["--start", "2024-13-45"], "as a date"),
    "unknown interval": (["AAPL"], ["--interval", "7m"], "unknown interval"),
    "weekly interval": (["AAPL"], ["--interval", "1wk"], "not downloadable"),
    "refused intraday range": (["AAPL"], ["--interval", "1m", "--start", str((NOW - pd.Timedelta(days=60)).date())],
                               "30 days"),
    "unknown symbol": (["NOSUCH", "ZZZZZ"], [], "knows none of the symbols"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_clear_error_exit_2_and_an_unchanged_store(fake_yahoo, store, fake_time, capsys, case):
    fake_yahoo.add("AAPL", session_bars("XNYS", "2024-01-02", "2024-01-31"), tz=NY)
    fetch(fake_time, "AAPL", "2024-01-02", "2024-01-31", store=store)
    before, requests = snapshot(store.root), len(fake_yahoo.requests)
    symbols, flags, words = BAD[case]

    code = main(["download", *symbols, *flags, "--store", str(store.root)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and words in err and "Traceback" not in err
    assert snapshot(store.root) == before
    if case != "unknown symbol":  # rejected before any request
        assert len(fake_yahoo.requests) == requests


# ------------------------------------------------------------------------- a bar still forming
def test_a_clock_running_ahead_never_stores_a_session_still_trading(fake_yahoo, store, fake_time, monkeypatch):
    """The machine's clock says the 2024-03-08 session is over (it runs a day ahead), but Yahoo's own clock
    (its last trade, regularMarketTime) is 14:00 New York time that day: the 03-08 bar is still forming and
    is not stored; a later download, once Yahoo's clock is past the close, stores it."""
    from fintensor.sources import yahoo

    bars = session_bars("XNYS", "2024-03-01", "2024-03-08")
    trading = pd.Timestamp("2024-03-08 14:00", tz=NY).tz_convert("UTC")
    fake_yahoo.add("AAPL", bars, tz=NY, market_time=trading)
    monkeypatch.setattr(yahoo, "machine_clock", lambda: pd.Timestamp("2024-03-09 15:00", tz="UTC"))
    assert fetch(fake_time, "AAPL", "2024-03-01", store=store).ok
    stored = store.read("AAPL", as_pandas=True)["date"].astype(str).tolist()
    assert stored == ["2024-03-01", "2024-03-04", "2024-03-05", "2024-03-06", "2024-03-07"]

    closed = pd.Timestamp("2024-03-08 16:00:00", tz=NY).tz_convert("UTC")  # the closing print
    fake_yahoo.add("AAPL", bars, tz=NY, market_time=closed)
    assert fetch(fake_time, "AAPL", "2024-03-01", store=store).ok
    assert store.read("AAPL", as_pandas=True)["date"].astype(str).tolist()[-1] == "2024-03-08"


def test_the_local_clock_alone_still_decides_when_it_is_behind(fake_yahoo, store, fake_time, monkeypatch):
    """Yahoo's clock past the close does not make a day final that this machine has not seen close: the
    earlier of the two clocks wins."""
    from fintensor.sources import yahoo

    bars = session_bars("XNYS", "2024-03-01", "2024-03-08")
    fake_yahoo.add("AAPL", bars, tz=NY, market_time=pd.Timestamp("2024-03-08 16:00:05", tz=NY).tz_convert("UTC"))
    monkeypatch.setattr(yahoo, "machine_clock", lambda: pd.Timestamp("2024-03-08 15:30", tz=NY).tz_convert("UTC"))
    assert fetch(fake_time, "AAPL", "2024-03-01", store=store).ok
    assert store.read("AAPL", as_pandas=True)["date"].astype(str).tolist()[-1] == "2024-03-07"
