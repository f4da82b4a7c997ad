"""ft.download vs yf.download, through the same fake Yahoo with a simulated network round trip.

Both run yfinance's real parsing against tests/yahoo_stub.py (no network), so the difference is what
each does around it: fintensor stores the bars and then asks only for what the store lacks; a plain
``yf.download`` asks for everything every time (users would otherwise cache by hand).

    .venv/bin/python benchmarks/bench_download.py [--symbols 40] [--latency 0.05]
"""
from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from yahoo_stub import FakeYahoo, isolate_yfinance, session_bars  # noqa: E402

import fintensor as ft  # noqa: E402

START, END, LATER = "2019-01-02", "2023-12-29", "2024-01-31"


def timed(fn):
    from yfinance.data import YfData

    YfData.cache_get.cache_clear()  # no response replayed from the other contestant's run
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--symbols", type=int, default=40)
    ap.add_argument("--latency", type=float, default=0.05, help="seconds per request (network round trip)")
    args = ap.parse_args()
    import warnings

    import yfinance as yf

    warnings.simplefilter("ignore")  # yfinance's pandas-3 deprecation noise

    symbols = [f"S{i:03d}" for i in range(args.symbols)]
    with pytest.MonkeyPatch.context() as mp, tempfile.TemporaryDirectory() as tmp:
        isolate_yfinance(mp)
        fake = FakeYahoo(latency=args.latency).install(mp)
        for i, s in enumerate(symbols):
            fake.add(s, session_bars("XNYS", START, LATER, seed=i), tz="America/New_York")
        store = ft.Store(Path(tmp) / "store")

        def ours(end):
            return lambda: ft.download(symbols, START, end, store=store, quiet=True)

        def theirs(end):  # yfinance's end is exclusive
            last = (dt.date.fromisoformat(end) + dt.timedelta(days=1)).isoformat()
            return lambda: yf.download(symbols, START, last, auto_adjust=False, actions=True, progress=False,
                                       threads=True)

        print(f"{args.symbols} symbols x 5 years of daily bars, {args.latency * 1000:.0f} ms per request")
        print(f"{'case':<34}{'fintensor':>11}{'yf.download':>13}{'ratio':>8}{'requests':>14}")
        for case, end in (("cold (empty store)", END), ("same range again", END), ("one more month", LATER)):
            n0 = len(fake.requests)
            t_ours, report = timed(ours(end))
            n1 = len(fake.requests)
            t_theirs, frame = timed(theirs(end))
            n2 = len(fake.requests)
            assert report.ok and len(frame), "both must succeed"
            print(f"{case:<34}{t_ours:>10.2f}s{t_theirs:>12.2f}s{t_theirs / t_ours:>7.1f}x"
                  f"{n1 - n0:>7} vs {n2 - n1:<4}")
        rows = sum(len(store.read(s)) for s in symbols)
        print(f"stored rows: {rows}; ratio = yf.download time / fintensor time (higher is better for fintensor)")


if __name__ == "__main__":
    main()
