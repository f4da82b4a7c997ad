"""ft.import_csv vs the pandas script users would otherwise write, on the real files in ../shared/data.

The baseline reads each file with pandas, parses its dates, converts the vendor units and writes one
Parquet file per symbol; it checks nothing. fintensor also validates every cell, detects the format,
records units/adjustment, merges into the store atomically (fsync, checksums). A second import of the
same files is a checked no-op for fintensor; the baseline rewrites everything.

    .venv/bin/python benchmarks/bench_import.py [--repeat 3]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import pandas as pd

import fintensor as ft
from _timing import best

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def baseline_baostock(files, out: Path) -> None:
    for f in files:
        df = pd.read_csv(f, parse_dates=["date"])
        df.to_parquet(out / f"{f.stem}.parquet", index=False)


def baseline_hikyuu_ticks(files, out: Path) -> None:
    for f in files:
        df = pd.read_csv(f, dtype={"datetime": str})
        local = pd.to_datetime(df["datetime"], format="%Y%m%d%H%M%S").dt.tz_localize("Asia/Shanghai")
        df = df.assign(time=local.dt.tz_convert("UTC"), price=df["price"] / 1000, volume=df["vol"] * 100)
        for sym, g in df.groupby("symbol"):
            g[["time", "price", "volume", "buyorsell"]].to_parquet(out / f"{sym}.parquet", index=False)


def baseline_lean_minute(files, out: Path) -> None:
    frames = []
    for f in files:
        df = pd.read_csv(f, header=None, names=["ms", "open", "high", "low", "close", "volume"])
        local = pd.Timestamp(f.name[:8]) + pd.to_timedelta(df.pop("ms"), unit="ms")
        df.insert(0, "time", local.dt.tz_localize("America/New_York").dt.tz_convert("UTC"))
        df[["open", "high", "low", "close"]] /= 10_000
        frames.append(df.assign(symbol=f.parent.name.upper()))
    for sym, g in pd.concat(frames).groupby("symbol"):
        g.drop(columns="symbol").to_parquet(out / f"{sym}.parquet", index=False)


CASES = [
    ("baostock daily, 31 files", "cn_daily/baostock_qfq/panel_2018-01_2020-08/*.csv", baseline_baostock),
    ("hikyuu ticks, 34k rows gz", "cn_intraday_tick/hikyuu/trans_tick_*.csv.gz", baseline_hikyuu_ticks),
    ("LEAN minute, 24 zips", "lean_algoseek_us_equity/minute/*/201310*_trade.zip", baseline_lean_minute),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if not (DATA / "PROVENANCE.md").exists():
        sys.exit(f"real data not found at {DATA}")
    ft.import_csv(DATA / "cn_daily/tushare_raw/000001.SZ.csv", store=tempfile.mkdtemp())  # warm imports
    print(f"{'case':28s} {'pandas+parquet':>15s} {'fintensor':>10s} {'ratio':>6s} {'re-import':>10s} {'ratio':>6s}")
    for label, pattern, baseline in CASES:
        files = sorted(DATA.glob(pattern))
        fresh = lambda: ft.import_csv(files, store=tempfile.mkdtemp())  # noqa: E731
        base = best(lambda: baseline(files, Path(tempfile.mkdtemp())), args.repeat)
        ours = best(fresh, args.repeat)
        store = ft.Store(tempfile.mkdtemp())
        ft.import_csv(files, store=store)
        again = best(lambda: ft.import_csv(files, store=store), args.repeat)
        print(f"{label:28s} {base:14.3f}s {ours:9.3f}s {ours / base:5.2f}x {again:9.3f}s {again / base:5.2f}x")
    print("ratio = fintensor time / baseline time (lower is better; the baseline validates nothing)")


if __name__ == "__main__":
    main()
