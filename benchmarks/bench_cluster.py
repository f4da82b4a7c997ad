"""The Alpha158 feature build of one synthetic market, in one process and on a local Ray cluster, in one run.

    python benchmarks/bench_cluster.py                 # 500 stocks x 3000 days; Ray with 2 (and all) CPUs
    python benchmarks/bench_cluster.py --quick         # 100 stocks x 600 days
    python benchmarks/bench_cluster.py --nodes 16 --cores 32   # the paper estimate's cluster

Both paths do the same work from the same store: ``ft.build`` of OHLCV, then ``ft.features.compute(...,
"alpha158")``; on Ray every task does that for a block of stocks (``fintensor.cluster.features`` with the
build's arguments) and the driver assembles the blocks. Times are the best of ``--repeat`` warm runs (numba
kernels compiled and Ray workers started first). Printed: both walls, their ratio, the task overhead per
block (an empty task's round trip, and the Ray run's CPU-seconds beyond the single process's, per block),
and a paper estimate of the whole-market minute-bar Alpha158 build on an N-node cluster from the measured
cost per stock-row (assumptions printed with it; copied into the README's "Past one machine").
The market is ft.synthetic's (clearly labelled SYN*), written to a temporary store.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import fintensor as ft  # noqa: E402
from fintensor import cluster  # noqa: E402
from _timing import best  # noqa: E402

OHLCV = ["open", "high", "low", "close", "volume"]


def single(args: dict):
    return ft.features.compute(ft.build(**args, cache=False), "alpha158")


def estimate(per_stock_row: float, overhead: float, nodes: int, cores: int, efficiency: float) -> None:
    """Whole-market 1-minute Alpha158 build on ``nodes`` x ``cores``, from the measured cost per stock-row."""
    stocks, years, minutes = 10_000, 10, 390  # US + China A-shares, ~4 h (A) to 6.5 h (US) sessions: 390 max
    rows = years * 252 * minutes              # per stock: 982,800 one-minute bars
    features = 158
    out_bytes = stocks * rows * features * 4
    block_bytes = rows * features * 4          # one stock's whole history is one block (~0.6 GB)
    cpu_s = stocks * rows * per_stock_row + stocks * overhead
    wall = cpu_s / (nodes * cores * efficiency)
    write = out_bytes / (nodes * 1e9)          # each node writing its blocks at 1 GB/s
    print(f"\npaper estimate: whole-market 1-minute Alpha158, {stocks:,} stocks x {years} years x 252 days x "
          f"{minutes} minutes ({rows:,} rows/stock)")
    print(f"  output {out_bytes / 1e12:.1f} TB float32; one stock per task ({block_bytes / 2**30:.2f} GiB, "
          f"inside the 0.5-1 GB target), {stocks:,} tasks")
    print(f"  compute {cpu_s / 3600:,.0f} core-hours at the measured {per_stock_row * 1e9:.0f} CPU-ns per stock-row "
          f"+ {overhead:.2f} s per task")
    print(f"  on {nodes} nodes x {cores} cores at {efficiency:.0%} efficiency: {wall / 60:,.0f} min of compute "
          f"+ {write / 60:,.0f} min writing at 1 GB/s per node = {(wall + write) / 60:,.0f} min")
    print("  assumptions: the per-row cost of daily bars holds for minute bars (same kernels, same windows in "
          "rows); reading the bars is small next to the 158x wider output; blocks are independent (no "
          "cross-sectional step); each node has RAM for cores x 2 blocks (~1.2 GB each with inputs)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="100 stocks x 600 days, one repeat")
    ap.add_argument("--stocks", type=int, default=500)
    ap.add_argument("--days", type=int, default=3000)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--nodes", type=int, default=8, help="paper estimate: nodes")
    ap.add_argument("--cores", type=int, default=32, help="paper estimate: cores per node")
    ap.add_argument("--efficiency", type=float, default=0.7, help="paper estimate: parallel efficiency")
    a = ap.parse_args()
    if a.quick:
        a.stocks, a.days, a.repeat = 100, 600, 1
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        mkt = ft.synthetic.market(n_stocks=a.stocks, n_days=a.days, start="2000-01-03", seed=1)
        store = ft.Store(Path(tmp) / "store")
        t0 = time.perf_counter()
        mkt.write(store)
        print(f"wrote {a.stocks} synthetic stocks x {a.days} sessions in {time.perf_counter() - t0:.1f} s")
        args = dict(symbols=mkt.symbols, start=str(mkt.dates[0]), end=str(mkt.dates[-1]), fields=OHLCV,
                    store=str(store.root))
        single(args)  # compile / load the numba kernels
        c0 = time.process_time()
        one = best(lambda: single(args), a.repeat)
        one_cpu = (time.process_time() - c0) / a.repeat
        print(f"\none process: build + alpha158 {one:.2f} s wall, {one_cpu:.2f} CPU-s "
              f"({one_cpu / (a.stocks * a.days) * 1e9:.0f} CPU-ns per stock-row)")
        cpus = os.cpu_count() or 2
        overheads = []
        for workers in sorted({2, cpus}):
            t0 = time.perf_counter()
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
            start = time.perf_counter() - t0
            noop = ray.remote(lambda: None)
            ray.get([noop.remote() for _ in range(2 * workers)])  # start the workers
            t0 = time.perf_counter()
            ray.get([noop.remote() for _ in range(20)])
            roundtrip = (time.perf_counter() - t0) / 20
            blocks = cluster.plan_blocks(mkt.symbols, a.days, 158 + 5, workers=workers)
            run = lambda: cluster.features(args, "alpha158", progress=False)  # noqa: E731
            run()  # warm: each worker imports fintensor and loads the kernels once
            wall = best(run, a.repeat)
            excess = max(0.0, wall * workers - one_cpu) / len(blocks)
            overheads.append(excess)
            print(f"Ray, {workers} CPUs: {wall:.2f} s ({len(blocks)} blocks of <= {len(blocks[0])} stocks; "
                  f"ray.init {start:.1f} s once)  one process / Ray = {one / wall:.2f}x")
            print(f"  task overhead per block: empty-task round trip {roundtrip * 1e3:.1f} ms; CPU-seconds "
                  f"beyond one process's {excess:.2f} s per block")
            ray.shutdown()
    # core-hours come from CPU seconds: the single process's kernels may use several threads
    estimate(one_cpu / (a.stocks * a.days), min(overheads), a.nodes, a.cores, a.efficiency)


if __name__ == "__main__":
    main()
