"""The Parquet store: exact round trips, merges, no-op re-imports, conflicts, appends, compaction,
corruption checks, direct DuckDB/Polars reads, symbol safety, removal and inter-process locking.

Real rows come from ../shared/data (parsed here with pandas, the oracle); synthetic frames only where
the real data has no such case (an FX symbol, conflicting vendors)."""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fintensor.errors import (BadInputError, ConflictError, MissingDataError, StoreBusyError, StoreCorruptError,
                              StoreWriteError)
from fintensor.schema import DISK_SCHEMAS
from fintensor.store import DAILY_SCHEMA, MAX_PARTS, SCHEMAS, Store

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ helpers
def sp500(shared_data, name: str, rows: int | None = None) -> pd.DataFrame:
    """sp500_5yr_yahoo/<name>_data.csv in the store's daily schema (minus the partial last row)."""
    raw = pd.read_csv(shared_data / "us_daily/sp500_5yr_yahoo" / f"{name}_data.csv").iloc[:-1]
    df = pd.DataFrame({"date": pd.to_datetime(raw.Date).dt.date, "open": raw.Open, "high": raw.High,
                       "low": raw.Low, "close": raw.Close, "adj_close": raw["Adj Close"],
                       "volume": raw.Volume.astype(float)})
    return df.iloc[:rows].reset_index(drop=True) if rows else df


def gspc_minutes(shared_data) -> pd.DataFrame:
    """S&P 500 index 1-minute bars (New York wall time in the file) as UTC instants."""
    raw = pd.read_csv(shared_data / "us_intraday/mplfinance_sp500_1min/SP500_NOV2019_IDay.csv")
    local = pd.to_datetime(raw.Date, format="%m/%d/%Y %H:%M").dt.tz_localize("America/New_York")
    return pd.DataFrame({"time": local.dt.tz_convert("UTC"), "open": raw.Open, "high": raw.High,
                         "low": raw.Low, "close": raw.Close})


def hikyuu_ticks(shared_data, symbol: str = "000001.SZ") -> pd.DataFrame:
    """hikyuu trade ticks in shares and CNY (file: price x 1000, lots of 100, Asia/Shanghai wall time)."""
    raw = pd.read_csv(shared_data / "cn_intraday_tick/hikyuu/trans_tick_2019-02-01_2019-02-11.csv.gz")
    raw = raw[raw.symbol == symbol]
    local = pd.to_datetime(raw.datetime.astype(str), format="%Y%m%d%H%M%S").dt.tz_localize("Asia/Shanghai")
    price, volume = raw.price / 1000, raw.vol * 100.0
    return pd.DataFrame({"time": local.dt.tz_convert("UTC"), "price": price, "volume": volume,
                         "amount": price * volume, "side": raw.buyorsell.astype("int8")}).reset_index(drop=True)


def snapshot(root: Path) -> dict:
    """Every file's bytes and mtime (ns) under the store, except the lock file."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(Path(root).rglob("*")) if p.is_file() and p.name != ".lock"}


def flip_byte(path: Path, where: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0xFF
    path.write_bytes(bytes(data))


def part_files(store: Store, symbol: str, interval: str = "1d") -> list[Path]:
    pdir = store.partition_dir(symbol, interval)
    return [pdir / p["file"] for p in store.manifest(symbol, interval)["parts"]]


def assert_frame_values(got: pd.DataFrame, want: pd.DataFrame) -> None:
    """Same rows and exactly the same values in want's columns."""
    assert len(got) == len(want)
    for col in want.columns:
        g, w = got[col].to_numpy(), want[col].to_numpy()
        if col == "date":
            g, w = g.astype("datetime64[D]"), np.asarray(w, dtype="datetime64[D]")
        elif col == "time":  # UTC instants (DuckDB hands TIMESTAMPTZ_NS to pandas as naive UTC)
            g, w = (pd.DatetimeIndex(x[col]).as_unit("ns") for x in (got, want))
            g, w = ((x.tz_localize("UTC") if x.tz is None else x).asi8 for x in (g, w))
        np.testing.assert_array_equal(g, w, err_msg=col)


# ------------------------------------------------------------------------------------- round trips
def test_daily_round_trip_exact(store, shared_data):
    aapl = sp500(shared_data, "AAPL")
    res = store.write_bars("AAPL", aapl, source="yahoo", adjust="split")
    assert (res.added, res.noop) == (1259, False)
    back = store.read("AAPL", as_pandas=True)
    assert list(back.columns) == ["symbol"] + DAILY_SCHEMA.names
    assert (back.symbol == "AAPL").all()
    assert_frame_values(back, aapl)  # float64 values bit-identical to what pandas parsed
    assert back[["amount", "turnover", "dividend", "split", "trade_status"]].isna().all().all()
    part = store.read_partition("AAPL", columns=["close"])
    assert part.column_names == ["date", "close"] and part.schema.field("date").type == pa.date32()


def test_daily_round_trip_all_columns(store):
    df = pd.DataFrame({
        "date": ["2014-06-05", "2014-06-06", "2014-06-09"], "open": [637.78, 649.9, 92.7],
        "high": [647.89, 651.26, 93.88], "low": [632.95, 644.47, 91.75], "close": [647.35, 645.57, 93.7],
        "adj_close": [87.7, 87.46, 88.9], "volume": [1e7, 1.2e7, 7.5e7], "amount": [6.4e9, 7.8e9, 6.9e9],
        "turnover": [1.2, None, 1.9], "pre_close": [645.0, 647.35, 92.224], "dividend": [0.0, 0.0, 0.0],
        "split": [1.0, 1.0, 7.0], "trade_status": [1, 1, 1]})
    store.write_bars("AAPL", df, source="test")
    back = store.read("AAPL", as_pandas=True)
    assert_frame_values(back, df.drop(columns=["turnover"]))
    assert back.turnover.isna().tolist() == [False, True, False]
    assert back.trade_status.dtype == np.int8


def test_intraday_round_trip_and_session_dates(store, shared_data):
    bars = gspc_minutes(shared_data)
    store.write_bars("^GSPC", bars, interval="1m", source="mplfinance")
    back = store.read("^GSPC", interval="1m", as_pandas=True)
    assert_frame_values(back, bars)
    want_dates = bars.time.dt.tz_convert("America/New_York").dt.date
    np.testing.assert_array_equal(back.date.to_numpy().astype("datetime64[D]"),
                                  want_dates.to_numpy().astype("datetime64[D]"))
    day = store.read("^GSPC", "2019-11-06", "2019-11-06", interval="1m", as_pandas=True)
    assert len(day) == 391 and day.time.min() == pd.Timestamp("2019-11-06 14:30", tz="UTC")
    man = store.manifest("^GSPC", "1m")
    assert (man["start_date"], man["end_date"]) == ("2019-11-05", "2019-11-08")
    # an evening bar in UTC belongs to the local session of the day before
    late = pd.DataFrame({"time": [pd.Timestamp("2019-11-09 00:30", tz="UTC")], "close": [1.0]})
    store.write_bars("ES=F", late, interval="1m", source="test", timezone="America/New_York")
    assert str(store.read("ES=F", interval="1m").column("date")[0]) == "2019-11-08"


def test_ticks_round_trip_by_local_date(store, shared_data):
    ticks = hikyuu_ticks(shared_data)
    results = store.write_ticks("000001.SZ", ticks, source="hikyuu")
    assert [r.partition.rsplit("=", 1)[1] for r in results] == ["2019-02-01", "2019-02-11"]
    back = store.read_ticks("000001.SZ", as_pandas=True)
    assert_frame_values(back, ticks)
    assert list(back.columns[:2]) == ["symbol", "date"]
    # ticks sharing an instant keep their file order through seq
    t = back.time.astype("int64").to_numpy()
    starts = np.r_[True, t[1:] != t[:-1]]
    run_start = np.maximum.accumulate(np.where(starts, np.arange(len(t)), 0))
    np.testing.assert_array_equal(back.seq.to_numpy(), np.arange(len(t)) - run_start)
    # PROVENANCE: the day's ticks sum to 101,427,000 shares
    day1 = store.read_ticks("000001.SZ", "2019-02-01", "2019-02-01", columns=["volume"], as_pandas=True)
    assert day1.volume.sum() == 101_427_000
    # an instant before midnight UTC on 2019-02-10 is 07:30 on 2019-02-11 in Shanghai
    store.write_ticks("000002.SZ", pd.DataFrame({"time": [pd.Timestamp("2019-02-10 23:30", tz="UTC")],
                                                 "price": [1.0]}), source="test")
    assert store.manifest("000002.SZ", date="2019-02-11") is not None


# --------------------------------------------------------------------------------- merge semantics
def test_merge_dedupes_and_sorts(store, shared_data):
    aapl = sp500(shared_data, "AAPL", rows=30)
    shuffled = pd.concat([aapl.iloc[20:], aapl.iloc[:10], aapl.iloc[5:12]]).reset_index(drop=True)
    res = store.write_bars("AAPL", shuffled, source="yahoo")  # unsorted, with exact duplicates
    assert res.added == 22  # rows 0-11 and 20-29
    res = store.write_bars("AAPL", aapl.iloc[8:25], source="yahoo")  # fills 12-19, overlaps both sides
    assert (res.added, res.unchanged, res.updated) == (8, 9, 0)
    back = store.read("AAPL", as_pandas=True)
    assert_frame_values(back, aapl)
    with pytest.raises(ConflictError, match="duplicate timestamp date=2012-12-06"):
        store.write_bars("AAPL", pd.concat([aapl.iloc[:1], aapl.iloc[:1].assign(close=1.0)]), source="x")


def test_reimport_is_a_noop(store, shared_data):
    store.write_bars("AAPL", sp500(shared_data, "AAPL"), source="yahoo")
    store.write_bars("^GSPC", gspc_minutes(shared_data), interval="1m", source="mplfinance")
    store.write_ticks("000001.SZ", hikyuu_ticks(shared_data), source="hikyuu")
    before = snapshot(store.root)
    time.sleep(0.01)
    assert store.write_bars("AAPL", sp500(shared_data, "AAPL").iloc[::-1], source="yahoo").noop
    assert store.write_bars("^GSPC", gspc_minutes(shared_data), interval="1m", source="mplfinance").noop
    assert all(r.noop for r in store.write_ticks("000001.SZ", hikyuu_ticks(shared_data), source="hikyuu"))
    assert snapshot(store.root) == before


def test_conflict_raises_and_leaves_store_byte_identical(store, shared_data):
    aapl = sp500(shared_data, "AAPL", rows=22)
    store.write_bars("AAPL", aapl.iloc[:20], source="yahoo")
    before = snapshot(store.root)
    other = aapl.iloc[5:20].copy()
    other.loc[7, "close"] += 0.01
    stored, new = float(aapl.close[7]), float(aapl.close[7] + 0.01)
    with pytest.raises(ConflictError, match=r"1 row\(s\) conflict.*" +
                       re.escape(f"date={aapl.date[7]} close: stored {stored!r}, new {new!r}. Nothing was written")):
        store.write_bars("AAPL", other, source="vendor2")
    assert snapshot(store.root) == before

    kept = store.write_bars("AAPL", other, source="vendor2", on_conflict="keep")
    assert (kept.added, kept.conflicts, kept.updated, kept.noop) == (0, 1, 0, True)
    assert snapshot(store.root) == before
    kept = store.write_bars("AAPL", pd.concat([other, aapl.iloc[20:]]), source="vendor2", on_conflict="keep")
    assert (kept.added, kept.conflicts) == (2, 1)
    assert store.read("AAPL", as_pandas=True).close[7] == stored

    over = store.write_bars("AAPL", other, source="vendor2", on_conflict="overwrite")
    assert (over.updated, over.conflicts, over.added) == (1, 1, 0)
    back = store.read("AAPL", as_pandas=True)
    assert_frame_values(back, aapl.assign(close=aapl.close.where(aapl.index != 7, new)))


def test_tick_conflict_on_a_later_day_writes_no_day(store, shared_data):
    ticks = hikyuu_ticks(shared_data)
    day2 = ticks[ticks.time.dt.tz_convert("Asia/Shanghai").dt.day == 11]
    store.write_ticks("000001.SZ", day2, source="hikyuu")
    before = snapshot(store.root)
    bad = ticks.copy()
    bad.loc[bad.index[-1], "price"] += 1  # day 1 is new, day 2 conflicts
    with pytest.raises(ConflictError, match="000001.SZ 2019-02-11"):
        store.write_ticks("000001.SZ", bad, source="other")
    assert snapshot(store.root) == before
    assert store.manifest("000001.SZ", date="2019-02-01") is None


def test_null_filled_by_later_source(store, shared_data):
    aapl = sp500(shared_data, "AAPL", rows=10)
    store.write_bars("AAPL", aapl.drop(columns=["volume", "adj_close"]), source="closes-only")
    res = store.write_bars("AAPL", aapl[["date", "volume"]], source="volumes")
    assert (res.updated, res.added, res.conflicts) == (10, 0, 0)
    back = store.read("AAPL", as_pandas=True)
    assert_frame_values(back, aapl.drop(columns=["adj_close"]))
    assert back.adj_close.isna().all()
    man = store.manifest("AAPL")
    assert man["source"] == "volumes"
    assert [h["source"] for h in man["history"]] == ["closes-only", "volumes"]


def test_append_creates_a_new_part_and_keeps_the_old(store, shared_data):
    aapl = sp500(shared_data, "AAPL", rows=300)
    store.write_bars("AAPL", aapl.iloc[:250], source="yahoo")
    [first] = part_files(store, "AAPL")
    first_state = (first.read_bytes(), first.stat().st_mtime_ns)
    res = store.write_bars("AAPL", aapl.iloc[250:], source="yahoo")
    assert res.added == 50
    parts = part_files(store, "AAPL")
    assert len(parts) == 2 and parts[0] == first
    assert (first.read_bytes(), first.stat().st_mtime_ns) == first_state
    assert_frame_values(store.read("AAPL", as_pandas=True), aapl)
    man = store.manifest("AAPL")
    assert (man["rows"], man["start"], man["end"]) == (300, "2012-12-06", str(aapl.date.iloc[-1]))


def test_compaction_after_many_appends(store, shared_data):
    aapl = sp500(shared_data, "AAPL", rows=40)
    counts = []
    for i in range(40):
        store.write_bars("AAPL", aapl.iloc[i:i + 1], source="yahoo")
        counts.append(len(store.manifest("AAPL")["parts"]))
    assert max(counts) == MAX_PARTS
    assert counts[:MAX_PARTS] == list(range(1, MAX_PARTS + 1)) and counts[MAX_PARTS] == 1
    assert len(list(store.partition_dir("AAPL").glob("*.parquet"))) == counts[-1]  # superseded parts gone
    assert_frame_values(store.read("AAPL", as_pandas=True), aapl)
    assert store.verify() == []


def test_adjustments_side_by_side_and_timezone_mismatch_refused(store, shared_data):
    """Two adjustments of one symbol are two partitions (never a conflict); a timezone mismatch within one
    adjustment is still refused, and overwrite replaces only that adjustment."""
    aapl = sp500(shared_data, "AAPL", rows=20)
    store.write_bars("AAPL", aapl, source="yahoo", adjust="split")
    split_bytes = snapshot(store.partition_dir("AAPL", adjust="split"))
    raw = aapl.iloc[15:].assign(close=aapl.close.iloc[15:] * 7)  # other values: no conflict across adjustments
    res = store.write_bars("AAPL", raw, source="lean", adjust="raw")
    assert res.added == 5 and res.partition.endswith("symbol=AAPL/adjust=raw")
    assert store.adjustments("AAPL") == ["raw", "split"]
    assert snapshot(store.partition_dir("AAPL", adjust="split")) == split_bytes
    assert_frame_values(store.read("AAPL", adjust="split", as_pandas=True), aapl)
    assert_frame_values(store.read("AAPL", adjust="raw", as_pandas=True), raw)
    with pytest.raises(BadInputError, match="several adjustments \\(raw, split\\).*--adjust raw"):
        store.read("AAPL")
    before = snapshot(store.root)
    with pytest.raises(ConflictError, match="timezone 'America/New_York'.*'Europe/London'.*"
                                            "cache rm AAPL --interval 1d --adjust split"):
        store.write_bars("AAPL", aapl.iloc[15:], source="x", adjust="split", timezone="Europe/London")
    assert snapshot(store.root) == before
    res = store.write_bars("AAPL", aapl.iloc[15:], source="x", adjust="split", timezone="Europe/London",
                           on_conflict="overwrite")
    assert res.added == 5 and store.manifest("AAPL", adjust="split")["timezone"] == "Europe/London"
    assert_frame_values(store.read("AAPL", adjust="split", as_pandas=True), aapl.iloc[15:])  # replaced, not mixed
    assert_frame_values(store.read("AAPL", adjust="raw", as_pandas=True), raw)  # the other adjustment untouched


# --------------------------------------------------------------------------- reading only what is needed
def test_range_reads_skip_other_parts(store, shared_data):
    aapl = sp500(shared_data, "AAPL", rows=300)
    store.write_bars("AAPL", aapl.iloc[:250], source="yahoo")
    store.write_bars("AAPL", aapl.iloc[250:], source="yahoo")
    old_part, new_part = part_files(store, "AAPL")
    flip_byte(old_part)
    start = aapl.date.iloc[250]
    for verify in (True, False):  # the corrupted old part is never opened for a range after it
        got = store.read("AAPL", start=start, verify=verify, as_pandas=True)
        assert_frame_values(got, aapl.iloc[250:])
    with pytest.raises(StoreCorruptError, match=re.escape(str(old_part))):
        store.read("AAPL", end=aapl.date.iloc[10])
    got = store.read("AAPL", start=aapl.date.iloc[260], end=aapl.date.iloc[270], as_pandas=True)
    assert_frame_values(got, aapl.iloc[260:271])


def test_column_reads_decode_only_those_columns(store, shared_data, monkeypatch):
    store.write_bars("AAPL", sp500(shared_data, "AAPL"), source="yahoo")
    seen = []
    real = pq.ParquetFile.read
    monkeypatch.setattr(pq.ParquetFile, "read", lambda self, columns=None, **kw: seen.append(columns) or
                        real(self, columns=columns, **kw))
    for verify in (True, False):
        t = store.read("AAPL", columns=["close"], verify=verify)
        assert t.column_names == ["symbol", "date", "close"]
    assert seen == [["date", "close"], ["date", "close"]]
    with pytest.raises(BadInputError, match=r"unknown column\(s\) \['Close'\]"):
        store.read("AAPL", columns=["Close"])
    with pytest.raises(BadInputError, match="start 2017-01-02 is after end 2016-01-01"):
        store.read("AAPL", start="2017-01-02", end="2016-01-01")


# ------------------------------------------------------------------------- DuckDB, Polars, README
@pytest.fixture
def mixed_store(store, shared_data):
    """Real US stocks, the S&P 500 index (daily and 1-minute), A-share ticks and an FX pair."""
    for name in ("AAPL", "MSFT"):
        store.write_bars(name, sp500(shared_data, name), source="yahoo", adjust="split")
    hist = pd.read_csv(shared_data / "us_intraday/mplfinance_sp500_1min/SP500_NOV2019_Hist.csv")
    store.write_bars("^GSPC", pd.DataFrame({"date": pd.to_datetime(hist.Date, format="%m/%d/%Y").dt.date,
                                            "open": hist.Open, "high": hist.High, "low": hist.Low,
                                            "close": hist.Close, "volume": hist.Volume.astype(float)}),
                     source="mplfinance")
    store.write_bars("^GSPC", gspc_minutes(shared_data), interval="1m", source="mplfinance")
    store.write_bars("EURUSD=X", pd.DataFrame({"date": ["2019-11-01", "2019-11-04"], "close": [1.1152, 1.1165]}),
                     source="test")
    store.write_ticks("000001.SZ", hikyuu_ticks(shared_data), source="hikyuu")
    store.write_ticks("600000.SS", hikyuu_ticks(shared_data, "600000.SH"), source="hikyuu")
    return store


def _sorted(df: pd.DataFrame, keys) -> pd.DataFrame:
    return df.sort_values(list(keys), kind="stable").reset_index(drop=True)


def test_duckdb_reads_the_store_directly(mixed_store):
    root = mixed_store.root
    got = duckdb.sql(f"SELECT * FROM read_parquet('{root}/bars/interval=1d/*/*/*.parquet', "
                     "hive_partitioning = true)").df()
    want = mixed_store.read(as_pandas=True)
    assert sorted(got.symbol.unique()) == ["AAPL", "EURUSD=X", "MSFT", "^GSPC"]
    assert_frame_values(_sorted(got, ["symbol", "date"]), _sorted(want, ["symbol", "date"]))
    minutes = duckdb.sql(f"SELECT symbol, time, date, close FROM read_parquet('{root}/bars/interval=1m/*/*/*.parquet',"
                         " hive_partitioning = true) ORDER BY time").df()
    assert_frame_values(minutes, mixed_store.read("^GSPC", interval="1m", columns=["close"], as_pandas=True))
    ticks = duckdb.sql(f"SELECT * FROM read_parquet('{root}/ticks/*/*/*.parquet', hive_partitioning = true)"
                       " ORDER BY symbol, time, seq").df()
    want = mixed_store.read_ticks(["000001.SZ", "600000.SS"], as_pandas=True)
    assert_frame_values(ticks, _sorted(want, ["symbol", "time", "seq"]))


def test_polars_reads_the_store_directly(mixed_store):
    root = mixed_store.root
    got = pl.scan_parquet(f"{root}/bars/interval=1d/**/*.parquet", hive_partitioning=True).collect()
    want = mixed_store.read(as_pandas=True)
    assert_frame_values(_sorted(got.to_pandas(), ["symbol", "date"]), _sorted(want, ["symbol", "date"]))
    ticks = pl.scan_parquet(f"{root}/ticks/**/*.parquet", hive_partitioning=True).collect().to_pandas()
    want = mixed_store.read_ticks(["000001.SZ", "600000.SS"], as_pandas=True)
    assert_frame_values(_sorted(ticks, ["symbol", "time", "seq"]), _sorted(want, ["symbol", "time", "seq"]))


def _readme_store_section() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("\n## The store\n")
    return text[start:text.index("\n## ", start + 1)]


def test_readme_query_snippets_run(mixed_store, monkeypatch):
    """The README's DuckDB and Polars snippets, executed as written against a real store."""
    monkeypatch.setenv("FINTENSOR_HOME", str(mixed_store.root))
    blocks = [b for b in re.findall(r"```python\n(.*?)```", _readme_store_section(), re.S)
              if "import duckdb" in b or "import polars" in b]
    assert len(blocks) == 2
    ns: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), ns)
    want = mixed_store.read(["AAPL", "^GSPC"], start="2017-11-01", columns=["close", "volume"], as_pandas=True)
    assert set(want.symbol) == {"AAPL", "^GSPC"}
    assert_frame_values(ns["daily"], want)
    assert_frame_values(ns["daily_pl"].to_pandas(), want)


def test_readme_schemas_match_the_code():
    """Each schema table in the README lists exactly the columns and Arrow types of the store's parts."""
    documented: dict[str, list] = {}
    kind = None
    for line in _readme_store_section().splitlines():
        m = re.match(r"\*\*(Daily|Intraday|Tick)", line)
        if m:
            kind = {"Daily": "daily", "Intraday": "intraday", "Tick": "ticks"}[m.group(1)]
            documented[kind] = []
        m = re.match(r"\| `([a-z_]+)` \| `([^`]+)` \|", line)
        if m and kind:
            documented[kind].append((m.group(1), m.group(2)))
    assert documented == {k: [(f.name, str(f.type)) for f in s] for k, s in DISK_SCHEMAS.items()}


# ----------------------------------------------------------------------------- corruption, verify
@pytest.fixture
def two_symbol_store(store, shared_data):
    store.write_bars("AAPL", sp500(shared_data, "AAPL"), source="yahoo")
    store.write_bars("MSFT", sp500(shared_data, "MSFT"), source="yahoo")
    store.write_ticks("000001.SZ", hikyuu_ticks(shared_data), source="hikyuu")
    assert store.verify() == []
    return store


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(p.read_bytes()[:-100]), "bytes, manifest says"),
    (lambda p: flip_byte(p), "checksum mismatch"),
    (lambda p: p.unlink(), "listed in the manifest but missing"),
])
def test_verify_names_a_damaged_part(two_symbol_store, damage, message):
    [part] = part_files(two_symbol_store, "MSFT")
    damage(part)
    problems = two_symbol_store.verify()
    assert [(p.path, message in p.message) for p in problems] == [(str(part), True)]
    assert two_symbol_store.verify(repair=True)[0].repaired is False  # data loss is reported, not hidden


@pytest.mark.parametrize("damage", [
    lambda m: m.write_text(m.read_text()[:40]),                                    # truncated JSON
    lambda m: m.write_text(json.dumps({**json.loads(m.read_text()), "rows": 5})),  # edited row count
    lambda m: m.write_text(json.dumps({**json.loads(m.read_text()), "parts": [  # path outside the partition
        {**json.loads(m.read_text())["parts"][0], "file": "../../../etc/passwd"}]})),
    lambda m: m.write_text("[]"),
    lambda m: m.write_text(json.dumps({**json.loads(m.read_text()), "rows": "many"})),
])
def test_verify_and_read_refuse_a_broken_manifest(two_symbol_store, damage):
    manifest = two_symbol_store.partition_dir("MSFT") / "_manifest.json"
    damage(manifest)
    [problem] = two_symbol_store.verify()
    assert problem.path == str(manifest)
    with pytest.raises(StoreCorruptError, match=re.escape(str(manifest))):
        two_symbol_store.read("MSFT")
    assert len(two_symbol_store.read("AAPL")) == 1259  # other partitions unaffected


def test_verify_repair_removes_orphans_only(two_symbol_store):
    pdir = two_symbol_store.partition_dir("AAPL")
    orphan = pdir / "part-0123456789abcdef.parquet"
    orphan.write_bytes(b"left by a crash")
    tmp = pdir / ".part-x.parquet.0a1b.tmp"
    tmp.write_bytes(b"half written")
    uncommitted = two_symbol_store.partition_dir("IBM")
    uncommitted.mkdir(parents=True)
    (uncommitted / "part-fedcba9876543210.parquet").write_bytes(b"no manifest yet")
    before = {p: p.read_bytes() for p in two_symbol_store.root.rglob("*") if p.is_file() and p.name != ".lock"
              and p not in (orphan, tmp) and uncommitted not in p.parents}
    found = sorted(p.path for p in two_symbol_store.verify())
    assert found == sorted([str(orphan), str(tmp), str(uncommitted)])
    assert all(p.repaired for p in two_symbol_store.verify(repair=True))
    assert not orphan.exists() and not tmp.exists() and not uncommitted.exists()
    assert {p: p.read_bytes() for p in before} == before
    assert two_symbol_store.verify() == []


@pytest.mark.parametrize("verify", [True, False])
def test_read_refuses_a_corrupted_file_naming_it(two_symbol_store, verify):
    [part] = part_files(two_symbol_store, "MSFT")
    # flip a byte inside the close column's first data page (what bit rot would hit)
    meta = pq.ParquetFile(part).metadata.row_group(0).column(DAILY_SCHEMA.names.index("close"))
    data = bytearray(part.read_bytes())
    data[meta.data_page_offset + meta.total_compressed_size // 2] ^= 0x55
    part.write_bytes(bytes(data))
    with pytest.raises(StoreCorruptError, match=re.escape(str(part))):
        two_symbol_store.read("MSFT", verify=verify)
    part.write_bytes(bytes(data[:-10]))
    with pytest.raises(StoreCorruptError, match=re.escape(str(part)) + ".*truncated"):
        two_symbol_store.read("MSFT", columns=["close"], verify=verify)


def test_read_ticks_refuses_a_corrupted_file(two_symbol_store):
    pdir = two_symbol_store.partition_dir("000001.SZ", date="2019-02-11", kind="ticks")
    part = pdir / two_symbol_store.manifest("000001.SZ", date="2019-02-11")["parts"][0]["file"]
    flip_byte(part)
    with pytest.raises(StoreCorruptError, match=re.escape(str(part))):
        two_symbol_store.read_ticks("000001.SZ")
    assert len(two_symbol_store.read_ticks("000001.SZ", end="2019-02-01")) > 0


# -------------------------------------------------------------------------------------- manifest
def test_manifest_fields(store, shared_data):
    aapl = sp500(shared_data, "AAPL", rows=100)
    store.write_bars("AAPL", aapl.iloc[:60], source="yahoo", adjust="split", adjusted_as_of="2017-12-07")
    first = store.manifest("AAPL")
    time.sleep(1.1)  # timestamps have one-second resolution
    store.write_bars("AAPL", aapl.iloc[60:], source="yahoo", adjust="split", adjusted_as_of="2017-12-07")
    m = store.manifest("AAPL")
    assert (m["kind"], m["symbol"], m["interval"], m["source"]) == ("daily", "AAPL", "1d", "yahoo")
    assert (m["adjustment"], m["adjusted_as_of"], m["timezone"]) == ("split", "2017-12-07", "America/New_York")
    assert m["units"] == {"volume": "shares", "price_scale": 1}
    assert m["created"] == first["created"] and m["updated"] > m["created"]
    assert dt.datetime.fromisoformat(m["updated"]).tzinfo is not None
    assert (m["start"], m["end"], m["rows"]) == ("2012-12-06", str(aapl.date.iloc[-1]), 100)
    assert store.coverage("AAPL") == ("2012-12-06", str(aapl.date.iloc[-1]))
    pdir = store.partition_dir("AAPL")
    for p in m["parts"]:
        data = (pdir / p["file"]).read_bytes()
        assert (p["bytes"], p["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
        assert p["rows"] == pq.read_metadata(pdir / p["file"]).num_rows
    assert m["checksum"] == hashlib.sha256("".join(p["sha256"] for p in m["parts"]).encode()).hexdigest()
    assert store.fingerprint(["AAPL"]) != hashlib.sha256(b"").hexdigest()
    [entry] = store.list()
    assert (entry["symbol"], entry["rows"], entry["source"], entry["partitions"]) == ("AAPL", 100, "yahoo", 1)


# ------------------------------------------------------------------------------------- bad input
def test_unwritable_store_path_is_a_clear_error(tmp_path, shared_data):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(BadInputError, match="exists and is not a directory"):
        Store(blocker)
    store = Store(blocker / "store")
    with pytest.raises(BadInputError, match=rf"store path {re.escape(str(blocker / 'store'))} is not writable"):
        store.write_bars("AAPL", sp500(shared_data, "AAPL", rows=3), source="yahoo")
    assert blocker.read_text() == "not a directory"


@pytest.mark.parametrize("symbol, message", [
    ("../../etc", "path separator"), ("AAPL/../../x", "path separator"), ("a\\b", "path separator"),
    ("AA\x00PL", "NUL"), ("A" * 300, "300 characters"), ("\u0391APL", "GREEK CAPITAL LETTER ALPHA"),
    ("\uff21\uff21\uff30\uff2c", "FULLWIDTH"), ("AA\nPL", "control character"), ("..", "leading or doubled"),
    ("", "empty symbol"),
])
def test_bad_symbols_refused_before_touching_disk(tmp_path, symbol, message):
    store = Store(tmp_path / "store")
    frame = pd.DataFrame({"date": ["2020-01-02"], "close": [1.0]})
    with pytest.raises(BadInputError, match=message):
        store.write_bars(symbol, frame, source="test")
    with pytest.raises(BadInputError, match=message):
        store.write_ticks(symbol, pd.DataFrame({"time": [pd.Timestamp("2020-01-02", tz="UTC")], "price": [1.0]}),
                          source="test")
    with pytest.raises(BadInputError, match=message):
        store.read(symbol)
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("frame, kwargs, message", [
    (pd.DataFrame({"date": ["2020-01-02"], "close": [-1.0]}), {}, "negative value -1.0 at row 0"),
    (pd.DataFrame({"date": ["2020-01-02"], "close": [np.inf]}), {}, "infinite value"),
    (pd.DataFrame({"date": ["2020-01-02"], "Close": [1.0]}), {}, r"unknown column\(s\) \['Close'\]"),
    (pd.DataFrame({"close": [1.0]}), {}, r"missing key column\(s\) \['date'\]"),
    (pd.DataFrame({"date": [], "close": []}), {}, "no rows"),
    (pd.DataFrame({"date": ["yesterday"], "close": [1.0]}), {}, "cannot be read as date32"),
    (pd.DataFrame({"date": ["2020-01-02"], "close": [1.0]}), {"on_conflict": "maybe"}, "on_conflict"),
    (pd.DataFrame({"date": ["2020-01-02"], "close": [1.0]}), {"adjust": "half"}, "unknown adjustment"),
    (pd.DataFrame({"date": ["2020-01-02"], "close": [1.0]}), {"interval": "7s"}, "unknown interval"),
])
def test_bad_frames_leave_the_store_unchanged(store, shared_data, frame, kwargs, message):
    store.write_bars("AAPL", sp500(shared_data, "AAPL", rows=5), source="yahoo")
    before = snapshot(store.root)
    with pytest.raises(BadInputError, match=message):
        store.write_bars("AAPL", frame, source="test", **kwargs)
    assert snapshot(store.root) == before


# ---------------------------------------------------------------------------------------- remove
def test_remove(two_symbol_store):
    s = two_symbol_store
    s.write_bars("AAPL", pd.DataFrame({"time": [pd.Timestamp("2017-01-03 14:30", tz="UTC")], "close": [1.0]}),
                 interval="1m", source="test")
    assert s.remove("AAPL", "1d") == 1
    with pytest.raises(MissingDataError, match="no 1d bars for AAPL"):
        s.read("AAPL")
    assert len(s.read("AAPL", interval="1m")) == 1
    assert s.remove("000001.SZ", "tick") == 2
    assert s.remove("AAPL") == 1
    with pytest.raises(MissingDataError, match="AAPL"):
        s.remove("AAPL")
    assert [e["symbol"] for e in s.list()] == ["MSFT"]
    assert not s.partition_dir("AAPL").exists() and not (s.root / "ticks" / "symbol=000001.SZ").exists()
    assert s.verify() == []


# ----------------------------------------------------------------------------------- concurrency
WRITER = """
import os, sys, time
import pandas as pd
from fintensor.store import Store
root, parity, go = sys.argv[1], int(sys.argv[2]), sys.argv[3]
while not os.path.exists(go):
    time.sleep(0.002)
days = pd.bdate_range("2020-01-01", periods=60)[parity::2]
start = time.time()
for d in days:
    Store(root).write_bars("AAPL", pd.DataFrame({"date": [d.date()], "close": [float(d.dayofyear)]}),
                           source=f"writer{parity}")
print(start, time.time())
"""


def test_two_processes_write_the_same_symbol(tmp_path):
    root, go = tmp_path / "store", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(root), str(i), str(go)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    time.sleep(1.0)
    go.touch()
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outputs]
    spans = [tuple(map(float, out.split())) for out, _ in outputs]
    assert max(s for s, _ in spans) < min(e for _, e in spans)  # the two writers really overlapped
    store = Store(root)
    back = store.read("AAPL", as_pandas=True)
    days = pd.bdate_range("2020-01-01", periods=60)
    np.testing.assert_array_equal(back.date.to_numpy().astype("datetime64[D]"), days.to_numpy().astype("datetime64[D]"))
    np.testing.assert_array_equal(back.close.to_numpy(), days.day_of_year.to_numpy().astype(float))
    assert store.verify() == []


def test_readers_need_no_lock_during_appends_and_compaction(store, shared_data):
    aapl = sp500(shared_data, "AAPL", rows=60)
    store.write_bars("AAPL", aapl.iloc[:1], source="yahoo")
    done = threading.Event()

    def writer():
        for i in range(1, 60):
            Store(store.root).write_bars("AAPL", aapl.iloc[i:i + 1], source="yahoo")
        done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    reader, seen = Store(store.root), []
    while not done.is_set():
        got = reader.read("AAPL", columns=["close"], as_pandas=True)
        assert_frame_values(got, aapl.iloc[:len(got)][["date", "close"]])  # always a consistent prefix
        seen.append(len(got))
    thread.join()
    assert len(set(seen)) > 3 and seen == sorted(seen)


@pytest.mark.parametrize("op", ["read", "dry run"])
@pytest.mark.parametrize("kind", ["bars", "ticks"])
def test_lock_free_reads_retry_when_a_writer_deletes_the_parts_they_were_about_to_read(store, shared_data, kind,
                                                                                       op, monkeypatch):
    """Reads and dry runs (import_csv's checks) take no lock; a commit that removes the parts they listed
    sends them back to the new manifest (the four-process import test once hit this in a dry run)."""
    if kind == "bars":
        rows = sp500(shared_data, "AAPL", rows=10)
        write = lambda s, df, **kw: [s.write_bars("AAPL", df, source="yahoo", **kw)]  # noqa: E731
        read = lambda s: s.read("AAPL", as_pandas=True)  # noqa: E731
    else:
        rows = hikyuu_ticks(shared_data).iloc[:10]
        write = lambda s, df, **kw: s.write_ticks("000001.SZ", df, source="hikyuu", **kw)  # noqa: E731
        read = lambda s: s.read_ticks("000001.SZ", as_pandas=True)  # noqa: E731
    write(store, rows.drop(index=5))
    reader, real_load = Store(store.root), Store._load_manifest
    raced = []

    def load_then_lose_the_race(self, pdir):
        manifest = real_load(self, pdir)
        if self is reader and manifest is not None and not raced:
            raced.append(write(Store(store.root), rows.iloc[5:6]))  # fills the gap: a rewrite
        return manifest

    monkeypatch.setattr(Store, "_load_manifest", load_then_lose_the_race)
    if op == "read":
        assert_frame_values(read(reader), rows)  # re-read the new manifest instead of failing
    else:  # planned again against the new manifest, which holds every row already
        plans = write(reader, rows, dry_run=True)
        assert sum(p.added for p in plans) == 0 and sum(p.unchanged for p in plans) == len(rows)
    assert raced


def test_lock_timeout_is_a_clear_error(store, shared_data):
    store.write_bars("AAPL", sp500(shared_data, "AAPL", rows=3), source="yahoo")
    other = Store(store.root, lock_timeout=0.2)
    with store.lock():
        with pytest.raises(StoreBusyError, match="locked by another fintensor process; waited 0 s"):
            other.write_bars("AAPL", sp500(shared_data, "AAPL", rows=5), source="yahoo")
    assert other.write_bars("AAPL", sp500(shared_data, "AAPL", rows=5), source="yahoo").added == 2


# ------------------------------------------------------------------------------ bulk write (many symbols)
def _sp500_names(shared_data) -> list[str]:
    return sorted(p.name[:-len("_data.csv")] for p in (shared_data / "us_daily/sp500_5yr_yahoo").glob("*_data.csv"))


def test_write_bars_many_stores_what_write_bars_stores(shared_data, tmp_path):
    """The 30 real US stocks written in one bulk call (4 at a time) read back exactly as one write_bars per
    symbol stores them, every partition passes verify, and the results account for every row."""
    names = _sp500_names(shared_data)
    frames = {n: sp500(shared_data, n) for n in names}
    one, bulk = Store(tmp_path / "one"), Store(tmp_path / "bulk")
    for n in names:
        one.write_bars(n, frames[n], source="csv")
    results = bulk.write_bars_many(((n, frames[n]) for n in names), source="csv", threads=4)
    assert [r.symbol for r in results] == names  # in the order given
    assert [r.added for r in results] == [len(frames[n]) for n in names]
    for n in names:
        a, b = one.read(n), bulk.read(n)
        assert a.equals(b) and len(b) == len(frames[n])
        assert bulk.manifest(n)["rows"] == one.manifest(n)["rows"]
    assert not bulk.verify()
    again = bulk.write_bars_many(((n, frames[n]) for n in names), source="csv", threads=4)
    assert all(r.noop and r.unchanged == len(frames[n]) for r, n in zip(again, names))


def test_write_bars_many_stops_at_a_conflict_and_says_what_committed(shared_data, tmp_path):
    names = _sp500_names(shared_data)[:6]
    frames = {n: sp500(shared_data, n) for n in names}
    store = Store(tmp_path / "s")
    changed = frames[names[3]].copy()
    store.write_bars(names[3], changed, source="csv")
    before = store.manifest(names[3])
    frames[names[3]] = changed.assign(close=changed.close + 1)  # a conflicting rewrite of one symbol
    with pytest.raises(ConflictError, match=r"partition\(s\) of this batch were committed before it") as err:
        store.write_bars_many(((n, frames[n]) for n in names), source="csv", threads=1)
    assert names[3] in str(err.value) and "on_conflict='keep'" in str(err.value)
    assert store.manifest(names[3]) == before  # the failing partition is left as it was
    committed = [n for n in names if store.manifest(n) is not None and n != names[3]]
    assert committed[:3] == names[:3]  # those before it, and any already in flight, committed; and said so
    assert f"({len(committed)} other partition(s)" in str(err.value)
    assert not store.verify()
    done = store.write_bars_many(((n, frames[n]) for n in names), source="csv", on_conflict="keep")
    assert [n for n in names if store.manifest(n) is not None] == names and not store.verify()
    assert done[3].conflicts == len(changed) and np.array_equal(store.read(names[3], as_pandas=True).close, changed.close)


def test_write_bars_many_disk_full_lists_the_committed_partitions(shared_data, tmp_path, monkeypatch):
    """A write that fails part-way (ENOSPC on the 5th file written) raises StoreWriteError whose
    ``committed`` names exactly the partitions whose manifests exist; nothing half-written remains."""
    import errno

    from fintensor import store as store_module

    names = _sp500_names(shared_data)[:8]
    store = Store(tmp_path / "s")
    store.write_bars("AAPL", sp500(shared_data, "AAPL", 10), source="csv")  # the store exists (lock, format)
    real, calls = store_module.atomic_write_bytes, []

    def failing(path, data):
        calls.append(path)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, data)

    monkeypatch.setattr(store_module, "atomic_write_bytes", failing)
    with pytest.raises(StoreWriteError, match="No space left") as err:
        store.write_bars_many(((n, sp500(shared_data, n)) for n in names if n != "AAPL"), source="csv", threads=2)
    monkeypatch.setattr(store_module, "atomic_write_bytes", real)
    committed = sorted(r.symbol for r in err.value.committed)
    assert committed == sorted(n for n in names if n != "AAPL" and store.manifest(n) is not None)
    assert 1 <= len(committed) < len(names) - 1
    assert not store.verify()
    leftovers = [p for p in (tmp_path / "s").rglob("*") if p.is_file() and p.name.endswith(".tmp")]
    assert not leftovers


@pytest.mark.parametrize("threads", [0, -1, 2.5, True, "4"])
def test_write_bars_many_refuses_bad_threads(tmp_path, threads):
    with pytest.raises(BadInputError, match="threads must be a positive integer"):
        Store(tmp_path / "s").write_bars_many([], source="csv", threads=threads)


def test_write_bars_many_writes_one_symbol_twice_in_order(shared_data, tmp_path):
    """The same symbol many times in one batch (AAPL in 8 pieces, spelled two ways, then a revision of one
    day): its writes run one after the other, never two commits of one partition at once, so nothing is
    lost (8 threads racing on one partition's manifest would keep only some pieces)."""
    aapl = sp500(shared_data, "AAPL")
    pieces = [aapl.iloc[idx] for idx in np.array_split(np.arange(len(aapl)), 8)]
    revised = aapl.iloc[[10]].assign(close=aapl.close.iloc[10] + 1)
    batch = [("AAPL" if i % 2 else "aapl", piece) for i, piece in enumerate(pieces)] + [("AAPL", revised)]
    store = Store(tmp_path / "s")
    results = store.write_bars_many(batch, source="csv", threads=8, on_conflict="overwrite")
    assert [r.added for r in results] == [len(p) for p in pieces] + [0] and results[-1].updated == 1
    back = store.read("AAPL", as_pandas=True)
    expected = aapl.close.to_numpy().copy()
    expected[10] += 1
    assert len(back) == len(aapl) and np.array_equal(back.close.to_numpy(), expected)
    assert not store.verify()
