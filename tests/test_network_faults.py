"""Network faults at yfinance's request seam (tests/yahoo_stub.py), several at once in one batch.

Each test checks the four promises of ``ft.download`` under faults: retries with exponential backoff and
jitter, bounded in total time (a fake clock records every sleep); the good symbols stored exactly as
served; the failures listed (report and CLI); and a re-run that requests only what is still missing.
(test_yahoo.py covers each fault kind on its own.)
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from yahoo_stub import FakeTime, session_bars

import fintensor as ft
from fintensor.cli import main
from fintensor.sources.yahoo import REQUEST_TIMEOUT

NY = "America/New_York"
NOW = pd.Timestamp.now(tz="UTC")


def serve(fake, symbols, interval="1d", start="2024-01-02", end="2024-03-28") -> dict[str, pd.DataFrame]:
    """Give each symbol its own random walk on the real XNYS sessions; returns what is served."""
    served = {}
    for i, symbol in enumerate(symbols):
        served[symbol] = session_bars("XNYS", start, end, interval, seed=i)
        fake.add(symbol, served[symbol], interval, tz=NY)
    return served


def assert_stored_as_served(store, served: dict[str, pd.DataFrame], interval="1d") -> None:
    for symbol, bars in served.items():
        got = store.read(symbol, interval=interval, as_pandas=True)
        assert len(got) == len(bars), symbol
        for column in ("open", "high", "low", "close", "volume"):
            np.testing.assert_array_equal(got[column].to_numpy(), bars[column].to_numpy(), err_msg=symbol)


def chart_symbols(fake, since: int) -> list[str]:
    """Symbols of the price requests sent after request number ``since``."""
    return sorted({r["symbol"] for r in fake.requests[since:] if "period1" in r["params"]})


def test_one_batch_with_every_fault_at_once(fake_yahoo, store):
    clock = FakeTime()
    good = ["OK", "LIMITED", "SLOW", "TRUNC", "DOWN"]
    served = serve(fake_yahoo, good + ["DEAD"])
    fake_yahoo.fail("429", symbol="LIMITED", times=2)       # rate limit that clears after 2 retries
    fake_yahoo.fail("timeout", symbol="SLOW", times=2)      # read timeouts that clear
    fake_yahoo.fail("truncated", symbol="TRUNC", times=1)   # half a JSON body
    fake_yahoo.fail("down", symbol="DOWN", times=1)         # Yahoo's "Will be right back" page
    fake_yahoo.fail("timeout", symbol="DEAD", times=None)   # never answers
    timeouts, real_get = [], fake_yahoo.get

    def get(url, params=None, timeout=None):  # what yfinance asks the network layer for
        timeouts.append(timeout)
        return real_get(url, params, timeout)

    fake_yahoo.get = get

    report = ft.download(good + ["DEAD", "GHOST"], "2024-01-02", "2024-03-28", store=store, retries=3, max_wait=60,
                         workers=3, sleep=clock.sleep, clock=clock.clock, quiet=True)

    assert {r.symbol: r.status for r in report} == {**dict.fromkeys(good, "ok"), "DEAD": "failed",
                                                    "GHOST": "not_found"}
    assert {s: report[s].requests for s in good + ["DEAD"]} == {"OK": 1, "LIMITED": 3, "SLOW": 3, "TRUNC": 2,
                                                               "DOWN": 2, "DEAD": 4}
    assert "ReadTimeout" in report["DEAD"].message and "no such symbol" in report["GHOST"].message
    # backoff: one sleep per retry, each under the cap, all distinct (jitter), in all within max_wait
    assert len(clock.sleeps) == 2 + 2 + 1 + 1 + 3
    assert all(0.5 <= s <= 30 for s in clock.sleeps) and sum(clock.sleeps) <= 60
    assert len(set(clock.sleeps)) == len(clock.sleeps)
    assert timeouts and set(timeouts) == {REQUEST_TIMEOUT}  # no request may wait forever
    # the good ones stored exactly, the failed ones not at all (no partial range to mistake for complete)
    assert store.symbols() == sorted(good)
    assert_stored_as_served(store, {s: served[s] for s in good})
    with pytest.raises(ft.errors.DownloadError, match=r"2 of 7 symbols failed: DEAD: failed .*GHOST: not found"):
        report.raise_for_status()

    # the network heals and GHOST is listed: the re-run asks only for what is missing
    fake_yahoo._faults.clear()
    served.update(serve(fake_yahoo, ["GHOST"]))
    mark = len(fake_yahoo.requests)
    again = ft.download(good + ["DEAD", "GHOST"], "2024-01-02", "2024-03-28", store=store, quiet=True,
                        sleep=clock.sleep, clock=clock.clock)
    assert again.ok and chart_symbols(fake_yahoo, mark) == ["DEAD", "GHOST"]
    assert all(again[s].requests == 0 for s in good)
    assert_stored_as_served(store, served)
    assert store.verify() == []


def test_a_symbol_that_vanishes_between_chunks_stores_nothing(fake_yahoo, store):
    """1m bars come in 7-day chunks; a symbol delisted after its first chunk must not leave a hole that a
    re-run would take for stored data."""
    start, end = (NOW - pd.Timedelta(days=20)).date(), (NOW - pd.Timedelta(days=2)).date()
    served = serve(fake_yahoo, ["STAY", "GONE"], "1m", start, end)
    listing = fake_yahoo.listings["GONE"]
    real_get = fake_yahoo.get

    def get(url, params=None, timeout=None):
        response = real_get(url, params, timeout)
        if "/GONE" in url and "period1" in (params or {}):
            fake_yahoo.listings.pop("GONE", None)  # delisted right after its first chunk was served
        return response

    fake_yahoo.get = get
    clock = FakeTime()
    report = ft.download(["STAY", "GONE"], start, end, "1m", store=store, quiet=True, sleep=clock.sleep,
                         clock=clock.clock)
    assert report["STAY"].ok and not report["GONE"].ok
    assert len(fake_yahoo.periods("GONE")) >= 2 and len(fake_yahoo.periods("STAY")) >= 3  # really chunked
    assert store.manifest("GONE", "1m") is None
    assert_stored_as_served(store, {"STAY": served["STAY"]}, "1m")

    fake_yahoo.get = real_get
    fake_yahoo.listings["GONE"] = listing  # relisted
    mark = len(fake_yahoo.requests)
    again = ft.download(["STAY", "GONE"], start, end, "1m", store=store, quiet=True, sleep=clock.sleep,
                        clock=clock.clock)
    assert again.ok and chart_symbols(fake_yahoo, mark) == ["GONE"]
    assert_stored_as_served(store, served, "1m")


def test_half_the_batch_fails_the_cli_lists_them_and_a_rerun_fetches_only_those(fake_yahoo, store, capsys):
    good, bad = ["AAA", "BBB", "CCC"], ["XDOWN", "XSLOW", "XNONE"]
    served = serve(fake_yahoo, good + ["XDOWN", "XSLOW"])
    fake_yahoo.fail("down", symbol="XDOWN", times=None)
    fake_yahoo.fail("timeout", symbol="XSLOW", times=None)
    argv = ["download", *good, *bad, "--start", "2024-01-02", "--end", "2024-03-28", "--retries", "0",
            "--store", str(store.root)]

    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 1 and "Traceback" not in err
    line = err.strip()
    assert "\n" not in line and line.startswith("error: 3 of 6 symbols failed: ")
    for symbol in bad:
        assert f"{symbol}: " in line
    assert "Stored the others (AAA, BBB, CCC)" in line and "run the same command again" in line
    assert [row.split()[:2] for row in out.splitlines()[1:]] == [[s, "ok"] for s in good] + [
        ["XDOWN", "failed"], ["XSLOW", "failed"], ["XNONE", "not_found"]]
    assert store.symbols() == good
    assert_stored_as_served(store, {s: served[s] for s in good})

    fake_yahoo._faults.clear()
    served.update(serve(fake_yahoo, ["XNONE"]))
    mark = len(fake_yahoo.requests)
    assert main(argv + ["--quiet"]) == 0
    assert chart_symbols(fake_yahoo, mark) == sorted(bad)
    assert_stored_as_served(store, served)


def test_a_rate_limit_that_never_clears_stops_the_batch_in_bounded_time_and_a_rerun_finishes(fake_yahoo, store):
    served = serve(fake_yahoo, ["AAA", "BBB", "CCC"])
    fake_yahoo.fail("429", times=None)
    clock = FakeTime()
    report = ft.download(["AAA", "BBB", "CCC"], "2024-01-02", "2024-03-28", store=store, retries=100, max_wait=45,
                         workers=1, sleep=clock.sleep, clock=clock.clock, quiet=True)
    assert [r.status for r in report] == ["rate_limited"] * 3
    assert sum(clock.sleeps) <= 45 and max(clock.sleeps) <= 30  # the budget, not the 100 retries, ends it
    assert report["AAA"].requests == len(clock.sleeps) + 1
    assert report["BBB"].requests == report["CCC"].requests == 0  # not hammered once Yahoo said stop
    assert not store.root.exists() or store.symbols() == []

    fake_yahoo._faults.clear()
    again = ft.download(["AAA", "BBB", "CCC"], "2024-01-02", "2024-03-28", store=store, workers=1,
                        sleep=clock.sleep, clock=clock.clock, quiet=True)
    assert again.ok and [again[s].requests for s in ("AAA", "BBB", "CCC")] == [1, 1, 1]
    assert_stored_as_served(store, served)
