"""Minute bars for the whole market: synthetic 1-minute bars (session slots, agreement with the daily bars,
seeds), and ``ft.build_days``, whose day blocks concatenate to one ``build_ticks`` bit for bit (synthetic and
real 1-minute bars, ticks) while a child process's peak RSS stays at one block whatever the range."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import fintensor as ft
from fintensor import builder
from fintensor.builder import TICK_FIELDS
from fintensor.errors import BadInputError, MissingDataError

ROOT = Path(__file__).resolve().parents[1]
FIELDS = list(TICK_FIELDS)
#: meta keys a block may hold differently from the one-shot build (build_days' docstring)
BLOCK_META = {"slots_per_day", "dropped_records", "block", "cache", "cache_hit"}


@pytest.fixture(scope="module")
def us_market():
    # 2019-11-20 + 21 sessions holds Thanksgiving (no session) and the 13:00 early close of 2019-11-29
    return ft.synthetic.market(60, 30, start="2019-11-20", seed=5, calendar="XNYS", suspension_rate=0.02)


@pytest.fixture(scope="module")
def us_minutes(us_market):
    return ft.synthetic.minute_bars(us_market, 21, seed=1)


@pytest.fixture(scope="module")
def us_minute_frame(us_minutes):
    return us_minutes.frame()


@pytest.fixture(scope="module")
def cn_minutes():
    m = ft.synthetic.market(20, 10, start="2019-03-01", seed=2, calendar="XSHG")
    return ft.synthetic.minute_bars(m, 5)


@pytest.fixture(scope="module")
def synthetic_minute_store(us_minutes, tmp_path_factory):
    store = ft.Store(tmp_path_factory.mktemp("minute_store"))
    assert us_minutes.write(store) == us_minutes.rows
    return store


def bits(t: torch.Tensor) -> np.ndarray:
    a = t.numpy()
    return a.view(np.uint8) if a.dtype == bool else a.view(f"u{a.itemsize}")


def assert_blocks_equal_one_build(blocks: list[ft.StockTensor], one: ft.StockTensor, per: int) -> None:
    assert [b.shape[0] for b in blocks][:-1] == [per] * (len(blocks) - 1) and blocks[-1].shape[0] <= per
    values = torch.cat([b.values for b in blocks])
    mask = torch.cat([b.mask for b in blocks])
    np.testing.assert_array_equal(bits(values), bits(one.values))        # bit for bit, NaNs included
    np.testing.assert_array_equal(mask.numpy(), one.mask.numpy())
    np.testing.assert_array_equal(np.concatenate([b.coords["day"] for b in blocks]), one.coords["day"])
    for b in blocks:
        assert b.dims == one.dims
        for name in ("tick", "stock", "feature"):
            np.testing.assert_array_equal(b.coords[name], one.coords[name])
            assert b.coords[name].dtype == one.coords[name].dtype
        assert {k: v for k, v in b.meta.items() if k not in BLOCK_META} == \
            {k: v for k, v in one.meta.items() if k not in BLOCK_META}
    assert [b.meta["block"] for b in blocks] == [[i, len(blocks)] for i in range(len(blocks))]
    assert sum((b.meta["slots_per_day"] for b in blocks), []) == one.meta["slots_per_day"]
    dropped: dict[str, int] = {}
    for b in blocks:                                                      # every dropped row still counted
        for sym, n in b.meta.get("dropped_records", {}).items():
            dropped[sym] = dropped.get(sym, 0) + n
    assert dropped == one.meta.get("dropped_records", {})


# ------------------------------------------------------------------------------- synthetic minute bars
def test_us_minute_bars_have_390_slots_and_fewer_on_an_early_close(us_minutes, us_minute_frame):
    df = us_minute_frame
    local = df.time.dt.tz_convert("America/New_York")
    per_day = df.groupby(["symbol", "date"]).size()
    days = per_day.index.get_level_values("date").astype("datetime64[s]")
    assert set(per_day[days != np.datetime64("2019-11-29")]) == {390}
    assert set(per_day[days == np.datetime64("2019-11-29")]) == {210}      # 09:30-13:00
    minute = (local.dt.hour * 60 + local.dt.minute - 570).to_numpy()
    assert minute.min() == 0 and minute.max() == 389 and (local.dt.second == 0).all()
    slot = df.groupby(["symbol", "date"]).cumcount().to_numpy()            # the k-th bar starts k minutes in
    np.testing.assert_array_equal(minute, slot)
    assert np.datetime64("2019-11-28") not in df.date.to_numpy().astype("datetime64[D]")   # Thanksgiving
    assert us_minutes.rows == len(df)


def test_xshg_minute_bars_have_240_slots_and_skip_lunch(cn_minutes):
    df = cn_minutes.frame()
    assert set(df.groupby(["symbol", "date"]).size()) == {240}
    local = df.time.dt.tz_convert("Asia/Shanghai")
    hm = (local.dt.hour * 100 + local.dt.minute).to_numpy()
    morning, afternoon = (hm >= 930) & (hm <= 1129), (hm >= 1300) & (hm <= 1459)
    assert (morning | afternoon).all() and morning.sum() == afternoon.sum() == len(df) // 2
    assert df.symbol.str.endswith(".SS").all()


def test_minute_bars_agree_with_the_daily_bars(us_market, us_minute_frame):
    df = us_minute_frame
    assert ((df.low <= df.open) & (df.open <= df.high) & (df.low <= df.close) & (df.close <= df.high)).all()
    assert (df.volume >= 0).all() and (df.volume % 100 == 0).all()
    np.testing.assert_allclose(df.amount, df.volume * (df.open + df.high + df.low + df.close) / 4, rtol=1e-12)
    day = df.groupby(["symbol", "date"]).agg(open=("open", "first"), high=("high", "max"), low=("low", "min"),
                                             close=("close", "last"), volume=("volume", "sum"))
    daily = us_market.daily
    daily = daily[daily.date.isin(np.unique(df.date.to_numpy().astype("datetime64[ns]")))]
    traded = daily[daily.trade_status == 1]
    expected = traded.assign(symbol=traded.symbol.astype(str), date=traded.date.dt.date) \
        .set_index(["symbol", "date"])[["open", "high", "low", "close", "volume"]]
    got = day.reset_index().assign(date=lambda d: pd.to_datetime(d.date).dt.date).set_index(["symbol", "date"])
    assert (daily.trade_status == 0).any()                               # suspended days exist ...
    assert got.index.sort_values().equals(expected.index.sort_values())  # ... and have no minute bars
    pd.testing.assert_frame_equal(got.loc[expected.index], expected, check_exact=True)
    # consecutive minutes join: each minute opens at the last one's close
    same_day = (df.symbol == df.symbol.shift()) & (df.date == df.date.shift())
    np.testing.assert_array_equal(df.open[same_day], df.close.shift()[same_day])


def test_minute_bars_are_seeded_and_the_same_in_any_batch(us_market, us_minutes, us_minute_frame):
    again = ft.synthetic.minute_bars(us_market, 21, seed=1).frame()
    pd.testing.assert_frame_equal(again, us_minute_frame, check_exact=True)
    other = ft.synthetic.minute_bars(us_market, 21, seed=2).frame()
    assert len(other) == len(us_minute_frame) and not np.array_equal(other.close, us_minute_frame.close)
    sym = us_market.symbols[7]
    alone = us_minutes.frame([sym])
    pd.testing.assert_frame_equal(alone, us_minute_frame[us_minute_frame.symbol == sym].reset_index(drop=True),
                                  check_exact=True)
    dates = us_market.dates[[3, 5]]
    picked = ft.synthetic.minute_bars(us_market, dates).frame()
    assert set(picked.date.astype("datetime64[ns]").to_numpy().astype("datetime64[D]")) == set(dates)


def test_minute_bars_refuse_bad_input(us_market):
    for args in [(us_market.daily, 5), (us_market, 0), (us_market, 31), (us_market, 2.5),
                 (us_market, ["2019-11-28"])]:                             # Thanksgiving: not a session
        with pytest.raises(BadInputError):
            ft.synthetic.minute_bars(*args)
    with pytest.raises(BadInputError):
        ft.synthetic.minute_bars(us_market, 3, seed=-1)


def test_written_store_holds_exactly_the_bars(synthetic_minute_store, us_minute_frame):
    sym = us_minute_frame.symbol.iloc[-1]
    got = synthetic_minute_store.read(sym, interval="1m", as_pandas=True)
    want = us_minute_frame[us_minute_frame.symbol == sym].reset_index(drop=True)
    np.testing.assert_array_equal(got.time.dt.tz_convert("UTC").dt.tz_localize(None).to_numpy("datetime64[us]"),
                                  want.time.dt.tz_convert("UTC").dt.tz_localize(None).to_numpy("datetime64[us]"))
    for col in ("open", "high", "low", "close", "volume", "amount"):
        np.testing.assert_array_equal(got[col].to_numpy(), want[col].to_numpy())
    assert synthetic_minute_store.manifest(sym, "1m")["source"] == "synthetic"


# ------------------------------------------------------------------------------------------ day blocks
#: the bytes a day of the synthetic minute store's slots take held sparse (a cell index + 8 float32 fields)
US_DAY = 60 * 390 * (4 + 8 * 4)


@pytest.mark.parametrize("per,memory", [(1, "1GB"), (4, "1GB"), (21, "1GB"), (1, 3 * US_DAY), (4, 3 * US_DAY),
                                        (2, 5 * US_DAY)])
def test_day_blocks_concatenate_to_one_build_on_synthetic_minutes(synthetic_minute_store, us_minutes, per, memory):
    """One read for the whole range (1GB), or several spans of blocks (a span of 3 days: 1 or 4 days per block;
    of 4 days: 2 per block)."""
    syms, lo, hi = us_minutes.market.symbols, us_minutes.dates[0], us_minutes.dates[-1]
    kw = dict(freq="1min", fields=FIELDS, store=synthetic_minute_store)
    one = ft.build_ticks(syms, lo, hi, cache=False, **kw)
    blocks = list(ft.build_days(syms, lo, hi, days_per_block=per, memory=memory, **kw))
    assert one.shape == (21, 390, 60, len(FIELDS)) and len(blocks) == -(-21 // per)
    assert_blocks_equal_one_build(blocks, one, per)
    if per == 1:  # the early close's block is padded to 390 slots: NaN, unobserved
        short = blocks[list(one.coords["day"]).index(np.datetime64("2019-11-29"))]
        assert short.meta["slots_per_day"] == [210]
        assert torch.isnan(short.values[:, 210:]).all() and not short.mask[:, 210:].any()


def test_each_file_is_read_and_verified_once_per_span(synthetic_minute_store, us_minutes, monkeypatch):
    """A month of minutes stored one file per symbol: with room for the month, each file is read (and its
    SHA-256 checked) once for all 21 one-day blocks; with room for 3 days, once per 3-day span (7 at most)."""
    reads: list[str] = []
    real = ft.Store._read_parts

    def counting(self, pdir, parts, *args, **kwargs):
        reads.extend(str(pdir / p["file"]) for p in parts)
        return real(self, pdir, parts, *args, **kwargs)

    monkeypatch.setattr(ft.Store, "_read_parts", counting)
    syms, lo, hi = us_minutes.market.symbols, us_minutes.dates[0], us_minutes.dates[-1]
    stored = [s for s in syms if synthetic_minute_store.adjustments(s, "1m")]
    files = {str(f) for f in synthetic_minute_store.files(stored, "1m")}
    assert len(files) == len(stored) > 50                                 # one part per symbol
    kw = dict(freq="1min", fields=FIELDS, store=synthetic_minute_store, dtype=torch.float32)
    for memory, spans in (("1GB", 1), (3 * US_DAY, 7)):
        reads.clear()
        blocks = sum(1 for _ in ft.build_days(stored, lo, hi, memory=memory, **kw))
        assert blocks == 21
        # once per span it overlaps (a stock listed or suspended at the range's ends overlaps fewer spans)
        assert set(reads) == files and all(1 <= reads.count(f) <= spans for f in files), (memory, len(reads))
        assert spans == 1 or len(reads) > 5 * len(files)
    reads.clear()
    ft.build_ticks(stored, lo, hi, cache=False, **kw)                     # the one-shot build: once too
    assert sorted(reads) == sorted(files)


def test_records_between_sessions_count_once_in_the_block_before(us_minute_frame, us_minutes, tmp_path,
                                                                  monkeypatch):
    """Bars stamped on a day with no session (Thanksgiving, 2019-11-28) are dropped and counted in the block
    of the session before, whichever span reads them: the blocks' counts add up to the one build's."""
    store = ft.Store(tmp_path)
    syms = list(us_minute_frame.symbol.unique()[:3])
    for sym in syms:
        rows = us_minute_frame[us_minute_frame.symbol == sym].drop(columns="symbol")
        if sym == syms[0]:
            extra = rows.iloc[:5].copy()
            extra["time"] = pd.date_range("2019-11-28 15:00", periods=5, freq="1min", tz="UTC")
            extra["date"] = pd.Timestamp("2019-11-28").date()
            rows = pd.concat([rows, extra]).sort_values("time")
        store.write_bars(sym, rows.reset_index(drop=True), interval="1m", source="test")
    lo, hi = us_minutes.dates[0], us_minutes.dates[-1]
    kw = dict(freq="1min", fields=["close", "volume"], store=store)
    one = ft.build_ticks(syms, lo, hi, cache=False, **kw)
    assert one.meta["dropped_records"] == {syms[0]: 5}
    for span in (None, 1):                                                # one span; one day per span
        if span:
            monkeypatch.setattr(builder, "_span_blocks", lambda p, per, budget: span)
        blocks = list(ft.build_days(syms, lo, hi, **kw))
        assert len(blocks) == 21
        assert_blocks_equal_one_build(blocks, one, 1)
        wed = list(one.coords["day"]).index(np.datetime64("2019-11-27"))
        assert blocks[wed].meta["dropped_records"] == {syms[0]: 5}


def test_a_day_block_is_the_pandas_pivot_of_that_day(synthetic_minute_store, us_minutes, us_minute_frame):
    day = us_minutes.dates[2]
    block = next(ft.build_days(us_minutes.market.symbols, day, us_minutes.dates[-1], freq="1min",
                               fields=["close", "volume"], store=synthetic_minute_store, dtype=torch.float64))
    rows = us_minute_frame[us_minute_frame.date.astype("datetime64[ns]") == pd.Timestamp(day)]
    slot = rows.groupby("symbol").cumcount()
    for f, name in enumerate(["close", "volume"]):
        pivot = rows.assign(slot=slot).pivot(index="slot", columns="symbol", values=name) \
            .reindex(index=range(390), columns=us_minutes.market.symbols)
        got = block.values[0, :, :, f].numpy()
        traded = block.mask[0, :, :, f].numpy()
        np.testing.assert_array_equal(traded, pivot.notna().to_numpy())
        np.testing.assert_array_equal(got[traded], pivot.to_numpy()[traded])
        if name == "volume":
            assert (got[~traded] == 0).all()                             # suspended: nothing traded, flows 0


def test_day_blocks_on_real_a_share_minutes_and_ticks(cn_tick_store):
    syms = ["000001.SZ", "000002.SZ", "000004.SZ", "000005.SZ", "600000.SS", "600004.SS"]
    kw = dict(freq="1min", fields=FIELDS, store=cn_tick_store, interval="1m")
    one = ft.build_ticks(syms, "2018-12-03", "2019-02-01", cache=False, **kw)
    assert one.shape[:3] == (43, 240, 6) and one.mask.any()
    for per in (1, 5):
        assert_blocks_equal_one_build(list(ft.build_days(syms, "2018-12-03", "2019-02-01", days_per_block=per,
                                                         **kw)), one, per)
    kw = dict(freq="3s", fields=FIELDS, store=cn_tick_store, interval="tick")     # trade ticks, two sessions
    one = ft.build_ticks(syms, "2019-02-01", "2019-02-11", cache=False, **kw)
    assert one.shape[:3] == (2, 4800, 6) and one.mask.any()
    assert_blocks_equal_one_build(list(ft.build_days(syms, "2019-02-01", "2019-02-11", **kw)), one, 1)


def test_day_blocks_on_real_us_minutes_count_the_dropped_rows(us_minute_store):
    syms = ["SPY", "IBM", "AIG", "BAC"]
    kw = dict(freq="1min", fields=FIELDS, store=us_minute_store)
    one = ft.build_ticks(syms, "2013-10-04", "2013-10-11", cache=False, **kw)
    assert one.meta["dropped_records"]["SPY"] > 0                         # extended hours are outside the session
    blocks = list(ft.build_days(syms, "2013-10-04", "2013-10-11", days_per_block=2, **kw))
    assert len(blocks) == 3
    assert_blocks_equal_one_build(blocks, one, 2)


def test_day_blocks_refuse_bad_input_before_the_first_block(synthetic_minute_store, us_minutes):
    syms, lo, hi = us_minutes.market.symbols[:3], us_minutes.dates[0], us_minutes.dates[-1]
    before = sorted((p.relative_to(synthetic_minute_store.root), p.stat().st_size)
                    for p in synthetic_minute_store.root.rglob("*") if p.is_file())
    bad = [dict(days_per_block=0), dict(days_per_block=True), dict(days_per_block=1.5), dict(memory="1KB"),
           dict(memory="lots"), dict(memory=True), dict(fields=["vwap"]),
           dict(freq="90s"), dict(freq="-1min"), dict(dtype="int32"), dict(adjust="full"), dict(adjust="nope"),
           dict(calendar="XSHG"), dict(interval="1d")]
    for extra in bad:
        kw = dict(dict(freq="1min", store=synthetic_minute_store), **extra)
        with pytest.raises(BadInputError) as days_error:
            ft.build_days(syms, lo, hi, **kw)                              # raised here, not on iteration
        if not {"days_per_block", "memory"} & set(extra):                  # build_ticks' checks, its words
            with pytest.raises(BadInputError) as ticks_error:
                ft.build_ticks(syms, lo, hi, **kw)
            assert str(ticks_error.value) == str(days_error.value)
    with pytest.raises(BadInputError):
        ft.build_days(syms, hi, lo, freq="1min", store=synthetic_minute_store)
    with pytest.raises(BadInputError):
        ft.build_days([syms[0], syms[0]], lo, hi, freq="1min", store=synthetic_minute_store)
    with pytest.raises(MissingDataError):
        ft.build_days(["AAPL"], lo, hi, freq="1min", store=synthetic_minute_store)
    after = sorted((p.relative_to(synthetic_minute_store.root), p.stat().st_size)
                   for p in synthetic_minute_store.root.rglob("*") if p.is_file())
    assert after == before


@pytest.fixture(scope="module")
def wide_minute_store(tmp_path_factory):
    """250 stocks x 21 sessions of 1-minute bars (2 M rows): a day block of 8 float64 fields is 6.6 MB."""
    m = ft.synthetic.market(250, 21, start="2019-01-02", seed=9, calendar="XNYS", listing_fraction=0,
                            delisting_fraction=0, suspension_rate=0)
    store = ft.Store(tmp_path_factory.mktemp("wide_minute_store"))
    ft.synthetic.minute_bars(m, 21).write(store)
    return store, m.dates[0], m.dates[20]


def test_peak_rss_of_many_day_blocks_stays_at_the_budget(wide_minute_store):
    """A child iterates 2 one-day blocks, then 21, then builds the 21 days at once, and reads the peak RSS of
    each phase (Linux: /proc/self/clear_refs resets it) above the RSS the phase started from. With a read-ahead
    budget ``memory`` of 2 days (13 MB), 21 blocks take what 2 do: a few blocks plus the budget; with the
    least budget (1MB: one block per read) a few blocks. The one-shot build takes 15+ blocks (so the
    measurement sees growth)."""
    code = textwrap.dedent("""
        import json, sys
        import fintensor as ft
        from fintensor.builder import TICK_FIELDS
        store, lo, hi = sys.argv[1], sys.argv[2], sys.argv[3]
        syms = sorted(s["symbol"] for s in ft.Store(store).list() if s["interval"] == "1m")
        kw = dict(freq="1min", fields=list(TICK_FIELDS), store=store, dtype="float64")
        budget = 2 * len(syms) * 390 * (4 + 8 * 8)              # 2 days of slots held sparse

        def status(key):
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

        def phase(work):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")                                   # peak RSS := current RSS
            start = status("VmRSS")
            work()
            return status("VmHWM") - start

        def blocks(n, memory=budget):
            for b in ft.build_days(syms, days[0], days[n - 1], memory=memory, **kw):
                pass

        days = ft.calendars.sessions("XNYS", lo, hi)
        blocks(2)                                              # warm up: imports, allocator, first reads
        first = next(ft.build_days(syms, days[0], days[0], **kw))
        block = first.values.numel() * 8 + first.mask.numel()
        del first
        out = {"block": block, "budget": budget, "two": phase(lambda: blocks(2)),
               "many": phase(lambda: blocks(len(days))),
               "least": phase(lambda: blocks(len(days), memory="1MB")),
               "one": phase(lambda: ft.build_ticks(syms, days[0], days[-1], cache=False, **kw)), "days": len(days)}
        print(json.dumps(out))
    """)
    store, lo, hi = wide_minute_store
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    child = subprocess.run([sys.executable, "-c", code, str(store.root), str(lo), str(hi)], env=env,
                           capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    r = json.loads(child.stdout.strip().splitlines()[-1])
    assert r["days"] == 21 and r["block"] > 6_000_000 and 2 * r["block"] > r["budget"] > r["block"]
    # the caller's block, the one being built and its scratch, and the records read ahead: whatever the days
    assert r["two"] < 4 * r["block"] + r["budget"] and r["many"] < 4 * r["block"] + r["budget"], r
    assert r["least"] < 4 * r["block"], r
    assert r["one"] > 15 * r["block"] and r["one"] > 3 * r["many"] and r["one"] > 5 * r["least"], r
