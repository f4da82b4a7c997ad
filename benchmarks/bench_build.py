"""Store -> tensor: ft.build / ft.build_ticks against what users would otherwise write, in one run.

    python benchmarks/bench_build.py            # 500 stocks x 20 years daily; 30 days x 50 stocks of 3 s ticks
    python benchmarks/bench_build.py --quick    # 100 stocks x 5 years; 5 days x 10 stocks

Daily (T, N, F) from the Parquet store:
  fintensor     ft.build(..., cache=False): needed columns per partition, scattered by integer index
  fintensor     ft.build the first time (also writes the tensor cache), then a cache hit (a load)
  pandas        pd.read_parquet(the hive dataset) + DataFrame.pivot -> numpy (T, N, F)
  xarray        the same read, set_index(date, symbol).to_xarray() -> numpy (T, N, F)
4D (day, tick, stock, feature) from 3-second ticks:
  fintensor     ft.build_ticks(freq="3s", fields=price, volume)
  pandas        read_ticks(as_pandas) + groupby(symbol, time floored to 3 s) last/sum + unstack

Each variant runs in a fresh process; its peak memory is the RSS high-water mark above the RSS it started
the work with (the mark is reset first: Linux /proc/self/clear_refs). The synthetic data comes from
ft.synthetic (clearly labelled SYN*).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FIELDS = ["open", "high", "low", "close", "volume"]


def _rss_mb() -> float:
    """Current RSS, after resetting the kernel's high-water mark (Linux: /proc/self/clear_refs) to it."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:  # elsewhere the high-water mark includes whatever came before
        pass
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------- variants
def run_variant(name: str, root: str, spec: dict) -> dict:
    import numpy as np
    import pandas as pd

    import fintensor as ft
    from fintensor.store import Store

    store = Store(root)
    syms, start, end = spec["symbols"], spec["start"], spec["end"]
    if name == "xarray":
        import xarray  # noqa: F401  (import cost is not the benchmark's)
    if name == "calendar":  # paid once per process by the first build on an exchange
        t0 = time.perf_counter()
        ft.calendars.get(ft.symbols.exchange(syms[0]))
        return {"seconds": time.perf_counter() - t0, "peak_mb": 0, "shape": [], "checksum": 0}
    ft.build, ft.calendars.get(ft.symbols.exchange(syms[0]))  # imports and calendar outside the timing
    base = _rss_mb()
    t0 = time.perf_counter()
    if name == "fintensor":
        out = ft.build(syms, start, end, fields=FIELDS, store=store, adjust="raw", cache=False).numpy()
    elif name == "cache-fill":
        out = ft.build(syms, start, end, fields=FIELDS, store=store, adjust="raw").numpy()
    elif name == "cache-hit":
        out = ft.build(syms, start, end, fields=FIELDS, store=store, adjust="raw").numpy()
    elif name == "pandas":
        df = pd.read_parquet(store.root / "bars" / "interval=1d", columns=["symbol", "date", *FIELDS])
        wide = df.pivot(index="date", columns="symbol", values=FIELDS)               # (T, F x N)
        out = wide.to_numpy().reshape(len(wide), len(FIELDS), -1).transpose(0, 2, 1)
    elif name == "xarray":
        df = pd.read_parquet(store.root / "bars" / "interval=1d", columns=["symbol", "date", *FIELDS])
        ds = df.set_index(["date", "symbol"]).to_xarray()
        out = ds[FIELDS].to_array("feature").transpose("date", "symbol", "feature").values
    elif name == "ticks-fintensor":
        out = ft.build_ticks(syms, start, end, freq="3s", fields=["price", "volume"], store=store,
                             cache=False).numpy()
    elif name == "ticks-pandas":
        df = store.read_ticks(syms, start, end, columns=["price", "volume"], as_pandas=True)
        slot = df.time.dt.floor("3s")
        g = df.groupby(["symbol", slot], observed=True).agg(price=("price", "last"), volume=("volume", "sum"))
        out = g.unstack("symbol").to_numpy()
    else:
        raise SystemExit(f"unknown variant {name}")
    seconds, peak = time.perf_counter() - t0, _peak_mb() - base
    checksum = float(np.nansum(out, dtype=np.float64))
    return {"seconds": seconds, "peak_mb": peak, "shape": list(np.shape(out)), "checksum": checksum}


def _spawn(name: str, root: str, spec: dict) -> dict:
    """Run one variant in a fresh interpreter; its JSON result is the last line it prints."""
    proc = subprocess.run([sys.executable, __file__, "--variant", name, root, json.dumps(spec)],
                          capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------- setup
def make_daily(root: Path, n_stocks: int, n_days: int) -> dict:
    import fintensor as ft
    from fintensor.store import Store

    mkt = ft.synthetic.market(n_stocks=n_stocks, n_days=n_days, start="2000-01-03", seed=1)
    t0 = time.perf_counter()
    rows = mkt.write(Store(root))
    print(f"  wrote {rows:,} synthetic daily bars ({n_stocks} stocks x {n_days} sessions) "
          f"in {time.perf_counter() - t0:.1f} s")
    return {"symbols": list(mkt.symbols), "start": str(mkt.dates[0]), "end": str(mkt.dates[-1])}


def make_ticks(root: Path, n_stocks: int, n_days: int) -> dict:
    import fintensor as ft
    from fintensor.store import Store

    t0 = time.perf_counter()
    ticks = ft.synthetic.ticks(n_stocks, days=n_days, freq="3s", calendar="XSHG", seed=2)
    rows = ticks.write_ticks(Store(root))
    days = sorted(ticks.time.dt.tz_convert("Asia/Shanghai").dt.strftime("%Y-%m-%d").unique())
    print(f"  wrote {rows:,} synthetic 3-second ticks ({n_stocks} stocks x {n_days} days) "
          f"in {time.perf_counter() - t0:.1f} s")
    return {"symbols": sorted(ticks.symbol.cat.categories), "start": days[0], "end": days[-1]}


def _line(label: str, r: dict, ref: dict | None) -> str:
    ratio = "" if ref is None else f"   {r['seconds'] / ref['seconds']:6.1f}x the time, " \
                                   f"{r['peak_mb'] / max(ref['peak_mb'], 1):5.1f}x the memory of fintensor"
    return f"  {label:<46} {r['seconds']:8.3f} s   peak +{r['peak_mb']:7.0f} MB{ratio}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small run (seconds) to check the script")
    p.add_argument("--variant", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        name, root, spec = args.variant
        print(json.dumps(run_variant(name, root, json.loads(spec))))
        return
    n_stocks, n_days = (100, 1260) if args.quick else (500, 5040)
    t_stocks, t_days = (10, 5) if args.quick else (50, 30)
    with tempfile.TemporaryDirectory(prefix="fintensor-bench-") as tmp:
        print(f"daily: {n_stocks} stocks x {n_days} sessions (~{n_days / 252:.0f} years) x {len(FIELDS)} fields "
              "from the Parquet store -> (T, N, F)")
        spec = make_daily(Path(tmp) / "daily", n_stocks, n_days)
        root = str(Path(tmp) / "daily")
        res = {n: _spawn(n, root, spec)
               for n in ("calendar", "fintensor", "cache-fill", "cache-hit", "pandas", "xarray")}
        fin = res["fintensor"]
        print(_line("fintensor ft.build (cache=False)", fin, None))
        print(_line("fintensor ft.build, first (writes the cache)", res["cache-fill"], None))
        print(_line("fintensor ft.build, cache hit (a load)", res["cache-hit"], None))
        print(_line("pandas read_parquet + pivot", res["pandas"], fin))
        print(_line("xarray from pandas (set_index.to_xarray)", res["xarray"], fin))
        print(f"  once per process, before the first build: load the exchange calendar "
              f"{res['calendar']['seconds']:.2f} s")
        rel = abs(fin["checksum"] - res["pandas"]["checksum"]) / abs(res["pandas"]["checksum"])
        print(f"  output shapes: fintensor {fin['shape']}, pandas {res['pandas']['shape']}, "
              f"xarray {res['xarray']['shape']}; value sums differ by {rel:.1e} (float32 vs float64)")
        print(f"\n4D: {t_days} days x {t_stocks} stocks of 3-second ticks (XSHG, lunch skipped) -> "
              "(day, tick, stock, feature)")
        spec = make_ticks(Path(tmp) / "ticks", t_stocks, t_days)
        root = str(Path(tmp) / "ticks")
        tick_fin = _spawn("ticks-fintensor", root, spec)
        tick_pd = _spawn("ticks-pandas", root, spec)
        print(_line("fintensor ft.build_ticks(freq='3s')", tick_fin, None))
        print(_line("pandas groupby(symbol, floor 3s) + unstack", tick_pd, tick_fin))
        print(f"  shapes: fintensor {tick_fin['shape']} (a slot grid, price carried within the day); pandas "
              f"{tick_pd['shape']} (only slots that traded, no session grid)")


if __name__ == "__main__":
    main()
