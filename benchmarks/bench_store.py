"""Store speed, measured in one run against what users would otherwise do.

1. Read the 30-stock US daily panel (sp500_5yr_yahoo): Store.read vs pandas parsing the 30 source CSVs.
2./3. Add one new day to a cached symbol (14 years of daily AAPL; 250 sessions of synthetic 1-minute
   bars): Store.write_bars (appends a part) vs rewriting the symbol's Parquet file with pandas (read,
   concat, write); and a store write that must rewrite (a day inserted inside the stored range).
4. Write the synthetic market of 500 stocks x 20 years: Store writes (validated, checksummed, fsynced,
   one per symbol) vs pandas.DataFrame.to_parquet per symbol (no checks, no commit protocol).

    python benchmarks/bench_store.py [--data ../shared/data]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

import fintensor as ft
from _timing import best
from fintensor.store import Store

REPO = Path(__file__).resolve().parents[1]


def row(label: str, seconds: float, baseline: float | None = None) -> None:
    ratio = ""
    if baseline:
        r = baseline / seconds
        ratio = f"{r:6.1f}x faster than the baseline" if r >= 1 else f"{1 / r:6.1f}x slower than the baseline"
    print(f"  {label:<52} {seconds * 1000:10.1f} ms {ratio}")


def bench_panel_read(data: Path, tmp: Path) -> None:
    files = sorted((data / "us_daily/sp500_5yr_yahoo").glob("*_data.csv"))
    store = Store(tmp / "panel")
    ft.import_csv(files, store=store)
    symbols = store.symbols()

    def pandas_csv():
        return pd.concat([pd.read_csv(f, parse_dates=["Date"]) for f in files], ignore_index=True)

    rows = len(pandas_csv())
    print(f"\n1. read the 30-stock US daily panel ({len(files)} files, {rows:,} rows)")
    base = best(pandas_csv)
    row("pandas.read_csv x 30 + concat (baseline)", base)
    row("Store.read -> Arrow table (checksums verified)", best(lambda: store.read(symbols)), base)
    row("Store.read -> pandas DataFrame", best(lambda: store.read(symbols, as_pandas=True)), base)
    row("Store.read(columns=['close']) -> Arrow", best(lambda: store.read(symbols, columns=["close"])), base)


def mean_per_write(fn, batches: list[pd.DataFrame]) -> float:
    t0 = time.perf_counter()
    for batch in batches:
        fn(batch)
    return (time.perf_counter() - t0) / len(batches)


def bench_append(title: str, history: pd.DataFrame, new_days: list[pd.DataFrame], interval: str,
                 tmp: Path) -> None:
    """Add each of ``new_days`` to a cached ``history``: Store append vs a pandas rewrite of the file."""
    store = Store(tmp / f"append-{interval}")
    store.write_bars("SYM", history, interval=interval, source="bench")
    parquet = tmp / f"SYM-{interval}.parquet"
    history.to_parquet(parquet)
    print(f"\n{title} ({len(history):,} rows cached, mean of {len(new_days)} writes of one day)")

    def pandas_rewrite(day):
        pd.concat([pd.read_parquet(parquet), day]).to_parquet(parquet)

    base = mean_per_write(pandas_rewrite, new_days)
    row("pandas read_parquet + concat + to_parquet (baseline)", base)
    row("Store.write_bars, appended as a new part", mean_per_write(
        lambda day: store.write_bars("SYM", day, interval=interval, source="bench"), new_days), base)
    assert store.read("SYM", interval=interval).num_rows == len(history) + sum(map(len, new_days))


def bench_daily_append(data: Path, tmp: Path) -> None:
    raw = pd.read_csv(data / "us_daily/mplfinance/yahoofinance-AAPL-20040819-20180120.csv", parse_dates=["Date"])
    bars = pd.DataFrame({"date": raw.Date.dt.date, "open": raw.Open, "high": raw.High, "low": raw.Low,
                         "close": raw.Close, "adj_close": raw["Adj Close"], "volume": raw.Volume.astype(float)})
    days = [bars.iloc[i:i + 1] for i in range(len(bars) - 10, len(bars))]
    bench_append("2. add one day to a cached daily symbol, AAPL 2004-2018", bars.iloc[:-10], days, "1d", tmp)
    holes = bars.iloc[-20:-10]  # stored without these days: each write lands inside the range
    gap = Store(tmp / "gap")
    gap.write_bars("AAPL", bars.drop(index=holes.index), source="yahoo")
    row("Store.write_bars, a day inside the range (rewrite)", mean_per_write(
        lambda day: gap.write_bars("AAPL", day, source="yahoo"), [holes.iloc[i:i + 1] for i in range(10)]))


def bench_minute_append(tmp: Path) -> None:
    """Synthetic 1-minute bars (a random walk on XNYS sessions): where rewriting a symbol really costs."""
    sessions = ft.calendars.sessions("XNYS", "2019-01-02", "2020-12-31")[:260]
    segments = ft.calendars.segments("XNYS", sessions)[:, 0, :]
    times = np.concatenate([np.arange(o, c, 60 * 10**9) for o, c in segments])
    day = np.repeat(np.arange(len(sessions)), [(c - o) // (60 * 10**9) for o, c in segments])
    rng = np.random.default_rng(0)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 5e-4, len(times))))
    bars = pd.DataFrame({"time": pd.DatetimeIndex(times).tz_localize("UTC"), "close": close,
                         "volume": rng.integers(1, 100, len(times)) * 100.0})
    new_days = [bars[day == d] for d in range(250, 260)]
    bench_append("3. add one day of 1-minute bars to a cached symbol (synthetic)",
                 bars[day < 250], new_days, "1m", tmp)


def bench_synthetic_write(tmp: Path) -> None:
    t0 = time.perf_counter()
    market = ft.synthetic.market(n_stocks=500, n_days=5040, start="2005-01-03", seed=0)
    generate = time.perf_counter() - t0
    rows = int((market.status >= 0).sum())
    print(f"\n4. write the synthetic market (500 stocks x 5040 sessions, {rows:,} rows)")
    row("ft.synthetic.market(...) generation", generate)
    daily = market.daily
    out = tmp / "pandas_parquet"
    out.mkdir()

    def pandas_write():
        for sym, frame in daily.groupby("symbol", observed=True, sort=False):
            frame.drop(columns="symbol").to_parquet(out / f"{sym}.parquet")

    t0 = time.perf_counter()
    pandas_write()
    base = time.perf_counter() - t0
    row("DataFrame.to_parquet per symbol (baseline, no checks)", base)
    t0 = time.perf_counter()
    market.write(Store(tmp / "synthetic"))
    seconds = time.perf_counter() - t0
    row("SyntheticMarket.write -> Store.write_bars_many (500)", seconds, base)
    print(f"  {'':<52} {rows / seconds / 1e6:10.2f} M rows/s into the store")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data",
                        help="the real data folder (default: ../shared/data)")
    args = parser.parse_args(argv)
    if not (args.data / "PROVENANCE.md").exists():
        print(f"error: real market data not found at {args.data}; pass --data", file=sys.stderr)
        return 2
    print(f"fintensor {ft.__version__} store benchmark; pandas {pd.__version__}; times are best of 5 "
          "unless stated; ratio = baseline time / fintensor time")
    with tempfile.TemporaryDirectory() as tmp:
        bench_panel_read(args.data, Path(tmp))
        bench_daily_append(args.data, Path(tmp))
        bench_minute_append(Path(tmp))
        bench_synthetic_write(Path(tmp))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
