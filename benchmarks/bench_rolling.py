"""Rolling kernels and the Alpha158 build against bottleneck and pandas, measured in one run.

    python benchmarks/bench_rolling.py            # (5000, 2000) float64 panel, 1 % NaN; alpha158 500 x 3300
    python benchmarks/bench_rolling.py --quick    # (1000, 500); alpha158 100 x 600
    python benchmarks/bench_rolling.py --kernels median,quantile,rank   # those rows of the table only

Per kernel and window (min_periods = window, output preallocated): fintensor with 1 and 2 threads
(best of 3), bottleneck.move_* along axis 0 and pandas DataFrame.rolling (one run each), the ratios (quantile
against bottleneck's move_median, as bottleneck has no moving quantile),
and the effective bandwidth (bytes read + written / time) next to np.copyto of the same array.
Then the first-call times (a fresh numba cache: compile; the same cache again: load), and the
Alpha158 preset from a (time, stock, feature) float32 tensor of a synthetic market (ft.synthetic)
against the pandas implementation in tests/pandas_alpha158.py.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numba
import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import bottleneck as bn  # noqa: E402

from fintensor import rolling  # noqa: E402


def best_of(fn, repeat: int = 3) -> tuple[float, float]:
    """The best wall-clock and CPU (all threads of this process) seconds of ``repeat`` calls."""
    fn()  # warm: compile/load, page in the output
    wall, cpu = [], []
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return min(wall), min(cpu)


def once(fn) -> tuple[float, float]:
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def kernels(x: np.ndarray, out: np.ndarray, w: int):
    """name -> (fintensor, bottleneck or None, pandas or None), each computing one statistic."""
    frame = pd.DataFrame(x)
    r = frame.rolling(w, min_periods=w)
    market = x[:, 0].copy()
    return {
        "sum": (lambda: rolling.sum(x, w, out=out), lambda: bn.move_sum(x, w, axis=0), r.sum),
        "mean": (lambda: rolling.mean(x, w, out=out), lambda: bn.move_mean(x, w, axis=0), r.mean),
        "count": (lambda: rolling.count(x, w, out=out), None, r.count),
        "var": (lambda: rolling.var(x, w, out=out), lambda: bn.move_var(x, w, axis=0, ddof=1), r.var),
        "std": (lambda: rolling.std(x, w, out=out), lambda: bn.move_std(x, w, axis=0, ddof=1), r.std),
        "zscore": (lambda: rolling.zscore(x, w, out=out),
                   lambda: (x - bn.move_mean(x, w, axis=0)) / bn.move_std(x, w, axis=0, ddof=1),
                   lambda: (frame - r.mean()) / r.std()),
        "min": (lambda: rolling.min(x, w, out=out), lambda: bn.move_min(x, w, axis=0), r.min),
        "max": (lambda: rolling.max(x, w, out=out), lambda: bn.move_max(x, w, axis=0), r.max),
        "argmax": (lambda: rolling.argmax(x, w, out=out), lambda: bn.move_argmax(x, w, axis=0), None),
        "median": (lambda: rolling.median(x, w, out=out), lambda: bn.move_median(x, w, axis=0), r.median),
        "quantile 0.3": (lambda: rolling.quantile(x, w, 0.3, out=out), lambda: bn.move_median(x, w, axis=0),
                         lambda: r.quantile(0.3)),
        "rank": (lambda: rolling.rank(x, w, out=out), lambda: bn.move_rank(x, w, axis=0), r.rank),
        "beta (market)": (lambda: rolling.beta(x, market, w, out=out), None,
                          lambda: r.cov(frame[0]) / frame[0].rolling(w).var()),
        "corr (pairs)": (lambda: rolling.corr(x, x[::-1].copy(), w, out=out), None,
                         lambda: r.corr(pd.DataFrame(x[::-1].copy()))),
        "ewm_mean": (lambda: rolling.ewm_mean(x, span=w, out=out), None, lambda: frame.ewm(span=w).mean()),
        "ewm_std": (lambda: rolling.ewm_std(x, span=w, out=out), None, lambda: frame.ewm(span=w).std()),
    }


def bench_kernels(T: int, N: int, windows: list[int], slow: set[str], only: set[str] | None = None) -> None:
    rng = np.random.default_rng(0)
    x = 100 + rng.standard_normal((T, N)).cumsum(axis=0)
    x[rng.random((T, N)) < 0.01] = np.nan
    out = np.empty_like(x)
    gb = 2 * x.nbytes / 1e9
    copy_time = best_of(lambda: np.copyto(out, x), 5)[0]
    print(f"panel: float64 ({T}, {N}), 1% NaN, min_periods = window, output preallocated")
    print(f"np.copyto of the panel: {copy_time * 1e3:.1f} ms = {gb / copy_time:.1f} GB/s (read + write)\n")
    header = (f"{'kernel':14s} {'w':>4s} {'1 thread':>9s} {'2 threads':>9s} {'GB/s':>6s} {'x copy':>6s} "
              f"{'bottleneck':>10s} {'x bn':>6s} {'pandas':>9s} {'x pd':>6s} {'cpu x bn':>8s} {'cpu x pd':>8s}")
    print(header)
    print("-" * len(header))
    cases = [(w, name) for w in windows for name in kernels(x, out, w)]
    cases += [(1, "returns"), (1, "diff")]
    if only is not None:
        cases = [(w, name) for w, name in cases if name.split()[0] in only]
    for w, name in cases:
        if name == "returns":
            ours, theirs_bn, theirs_pd = (lambda: rolling.returns(x, out=out), None,
                                          lambda: pd.DataFrame(x).pct_change(fill_method=None))
        elif name == "diff":
            ours, theirs_bn, theirs_pd = (lambda: rolling.diff(x, out=out), None, pd.DataFrame(x).diff)
        else:
            ours, theirs_bn, theirs_pd = kernels(x, out, w)[name]
        numba.set_num_threads(1)
        (t1, c1) = best_of(ours)
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        t2 = best_of(ours)[0]
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        b, cb = once(theirs_bn) if theirs_bn else (None, None)
        p, cp = once(theirs_pd) if theirs_pd and not (name in slow and w > 50) else (None, None)
        print(f"{name:14s} {w:4d} {t1 * 1e3:7.1f}ms {t2 * 1e3:7.1f}ms {gb / t2:6.1f} {t2 / copy_time:6.1f} "
              + (f"{b * 1e3:8.0f}ms {b / t2:6.1f} " if b else f"{'-':>10s} {'-':>6s} ")
              + (f"{p * 1e3:7.0f}ms {p / t2:6.1f} " if p else f"{'-':>9s} {'-':>6s} ")
              + (f"{cb / c1:8.1f} " if b else f"{'-':>8s} ")
              + (f"{cp / c1:8.1f}" if p else f"{'-':>8s}"))
    print("(x bn, x pd: the baseline's wall time over fintensor's with 2 threads; cpu x: the baseline's CPU\n"
          " time over fintensor's on 1 thread, which a busy machine distorts less; '-': no baseline, or skipped)\n")


FIRST_CALL = """
import time, numpy as np
from fintensor import rolling
x = np.random.default_rng(0).standard_normal((1000, 50))
t0 = time.perf_counter()
for f in (rolling.mean, rolling.std, rolling.max, rolling.median):
    f(x, 20)
rolling.ewm_mean(x, span=20); rolling.cov(x, x[:, 0], 20); rolling.returns(x); rolling.cs_rank(x)
print(time.perf_counter() - t0)
"""


def bench_first_call() -> None:
    """The whole float64 kernel set's first call in a fresh process: cold cache, then warm."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        times = [float(subprocess.run([sys.executable, "-c", FIRST_CALL], env=env, check=True,
                                      capture_output=True, text=True).stdout) for _ in range(2)]
    print(f"first call of every float64 kernel in a new process: {times[0]:.1f} s with an empty numba cache "
          f"(compile), {times[1]:.2f} s with the cache filled (load)\n")


def bench_features(n_stocks: int, n_days: int) -> None:
    import torch

    import fintensor as ft
    from fintensor import features
    from pandas_alpha158 import alpha158 as pandas_alpha158

    market = ft.synthetic.market(n_stocks, n_days, start="2005-01-03", seed=0)
    fields = ("open", "high", "low", "close", "volume")
    values = np.stack([getattr(market, f) for f in fields], axis=-1).astype(np.float32)
    tensor = ft.StockTensor(torch.from_numpy(values), ("time", "stock", "feature"),
                            {"time": market.dates, "stock": np.array(market.symbols), "feature": np.array(fields)})
    features.compute(tensor.isel(time=slice(0, 100)), "alpha158")  # load the kernels
    t_ours, c_ours = once(lambda: features.compute(tensor, "alpha158"))
    frames = [pd.DataFrame(values[:, :, i].astype(np.float64)) for i in range(len(fields))]
    t_pd, c_pd = once(lambda: pandas_alpha158(*frames))
    print(f"alpha158 (157 features without vwap) for {n_stocks} stocks x {n_days} days, float32 tensor in:")
    print(f"  fintensor {t_ours:6.1f} s ({numba.get_num_threads()} threads; {c_ours:.1f} s CPU)   "
          f"pandas {t_pd:6.1f} s ({c_pd:.1f} s CPU)   ratio {t_pd / t_ours:5.1f}x   "
          f"(qlib: 147-168 s cold at this scale)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    ap.add_argument("--kernels", help="comma-separated kernel names: only their rows, no first-call or "
                                      "alpha158 timings")
    args = ap.parse_args()
    only = set(args.kernels.split(",")) if args.kernels else None
    print(f"numba {numba.__version__}, bottleneck {bn.__version__}, pandas {pd.__version__}, "
          f"{os.cpu_count()} CPUs, NUMBA_NUM_THREADS={numba.config.NUMBA_NUM_THREADS}, "
          f"load average {os.getloadavg()[0]:.1f} (timings assume an otherwise idle machine)\n")
    if args.quick:
        bench_kernels(1000, 500, [20, 250], slow=set(), only=only)
    else:  # pandas' rank, median and quantile at window 250 take minutes on this panel: skipped
        bench_kernels(5000, 2000, [20, 250], slow={"rank", "median", "quantile 0.3"}, only=only)
    if only is not None:
        return
    bench_first_call()
    bench_features(*((100, 600) if args.quick else (500, 3300)))


if __name__ == "__main__":
    main()
