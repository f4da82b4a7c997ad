"""The whole market on one machine: synthetic store -> OHLCV tensor -> Alpha158 out of core -> one epoch.

    python benchmarks/bench_market.py                          # 5000 stocks x 5040 days (20 years)
    python benchmarks/bench_market.py --stocks 1000 --days 2520
    python benchmarks/bench_market.py --quick                  # 100 stocks x 500 days (CI)

Each stage runs in a fresh process and reports its wall time, CPU time (user + system), peak RSS (its
ru_maxrss) and peak heap (RssAnon sampled every 20 ms: its own memory, without the page-cache pages of
the files it maps, which ru_maxrss counts); the files it makes are handed to the next stage in a temp
directory. The last line's "peak RSS" is the largest peak heap of the stages:

  synth     ft.synthetic.market(N, T) written to a store (Store.write_bars_many: the bulk write path)
  build     ft.build(all symbols, OHLCV, float32), saved as a tensor file; its own peak RSS (VmHWM reset
            after the imports) over the output's size (values + mask)
  alpha158  ft.features.compute(t, "alpha158", out=PANEL, memory=...): the memory-mapped panel
  gather    random minibatches (800 x 20 x 158) from Windows on the map vs the same panel in RAM, on one
            thread and on every core (page cache warm; skipped when the panel does not fit in half the RAM)
  epoch     one ft.train epoch (LSTM 2x64, lookback 20) reading batches from the map
  pandas    the baseline: qlib-style per-stock pandas Alpha158 (tests/pandas_alpha158.py on one stock's
            frames) + pd.concat, on --baseline-stocks stocks (the largest it is run at), per stock vs alpha158
  minute    --minute-days (default 21; 0 skips) sessions of 1-minute bars for the market's stocks
            (ft.synthetic.minute_bars of the market regenerated over its first min(days, 252) sessions,
            seed 1) written to a store of their own (Store.write_bars_many)
  mdays     ft.build_days over those sessions one day at a time (OHLCV, 1min slots, float32, read-ahead
            budget --minute-memory): seconds per day block, the first block's latency (it reads the
            first span of days), rows and block shape

``--only minute,mdays`` runs just those stages (each still in its own process).

The last lines are exactly (the first when the alpha158 stages run, the second when the minute ones do):
    market N stocks x T days: build B s, alpha158 A s, panel P MB, peak RSS R MB, epoch E s
    minute N stocks x D days: write W s (ROWS rows), build_days S s per day block (total B s, block
        SHAPE), peak RSS R MB                                              (one line)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ["open", "high", "low", "close", "volume"]
START = "2000-01-03"


def _status_mb(field: str) -> float:
    """A memory line of /proc/self/status (VmRSS: now; VmHWM: the peak since the last reset) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    """Start VmHWM again from the current RSS (Linux >= 4.0), so a peak is the stage's own work's."""
    Path("/proc/self/clear_refs").write_text("5")


_heap_peak = [0.0]


def _sample_heap(every_s: float = 0.02) -> None:
    """Keep the peak of RssAnon (the process's own memory: heap, arrays) in a daemon thread. ru_maxrss
    also counts the pages of files the process maps, i.e. the on-disk panel it reads in page cache,
    which the kernel can drop at any time; at full size that is most of the panel."""
    def loop():
        while True:
            _heap_peak[0] = max(_heap_peak[0], _status_mb("RssAnon"))
            time.sleep(every_s)
    threading.Thread(target=loop, daemon=True).start()


def _report(**numbers) -> None:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    heap = max(_heap_peak[0], _status_mb("RssAnon"))
    print(json.dumps({**numbers, "cpu": ru.ru_utime + ru.ru_stime, "rss_mb": ru.ru_maxrss / 1024, "heap_mb": heap}))


def stage_synth(a) -> None:
    import fintensor as ft

    t0 = time.perf_counter()
    m = ft.synthetic.market(a.stocks, a.days, start=START, seed=1)
    gen = time.perf_counter() - t0
    rows = m.write(ft.Store(a.work / "store"))
    (a.work / "symbols.json").write_text(json.dumps([list(m.symbols), str(m.dates[0]), str(m.dates[-1])]))
    _report(rows=rows, generate_s=gen, write_s=time.perf_counter() - t0 - gen)


def stage_build(a) -> None:
    import torch

    import fintensor as ft

    syms, start, end = json.loads((a.work / "symbols.json").read_text())
    store = ft.Store(a.work / "store")
    ft.build(syms[:2], start, end, fields=FIELDS, dtype=torch.float32, store=store, cache=False)  # imports, kernels
    before = _status_mb("VmRSS")
    _reset_peak()
    t0 = time.perf_counter()
    t = ft.build(syms, start, end, fields=FIELDS, dtype=torch.float32, store=store, cache=False)
    seconds = time.perf_counter() - t0
    peak = _status_mb("VmHWM")
    out_mb = (t.values.numel() * t.values.element_size() + t.mask.numel()) / 2**20  # values + mask
    t.save(a.work / "ohlcv.safetensors")
    _report(shape=list(t.shape), seconds=seconds, mb=t.values.numel() * 4 / 2**20, output_mb=out_mb,
            baseline_mb=before, build_peak_mb=peak, added_over_output=(peak - before) / out_mb)


def stage_alpha158(a) -> None:
    import fintensor as ft
    from fintensor import features

    t = ft.load(a.work / "ohlcv.safetensors", mmap=True)
    features.compute(t.isel(stock=slice(0, 2)), "alpha158")  # kernels compiled/loaded outside the timing
    t0 = time.perf_counter()
    panel = features.compute(t, "alpha158", out=a.work / "alpha158", memory=a.memory)
    _report(seconds=time.perf_counter() - t0, panel_mb=panel.values.numel() * 5 / 2**20,
            per_stock_ms=(time.perf_counter() - t0) / t.shape[1] * 1000)


def _labels(a):
    import fintensor as ft
    from fintensor import features

    return features.forward_returns(ft.load(a.work / "ohlcv.safetensors", mmap=True))


def stage_gather(a) -> None:
    import torch

    from fintensor import ondisk
    from fintensor.data import Windows

    mapped = ondisk.load(a.work / "alpha158", verify=False)
    labels = _labels(a)
    windows = {name: Windows(mapped, labels, 20, label_reach=2, in_memory=in_memory)
               for name, in_memory in (("map", None), ("ram", True))}
    pos = windows["map"].positions["train"]
    g = torch.Generator().manual_seed(0)
    batches = [pos[torch.randint(len(pos), (800,), generator=g)] for _ in range(a.batches)]
    result = {}
    for threads in sorted({1, os.cpu_count() or 1}):  # one thread, and the default (every core)
        torch.set_num_threads(threads)
        for name, w in windows.items():
            for b in batches[:10]:
                w.gather(b)  # page cache warm
            t0 = time.perf_counter()
            for b in batches:
                w.gather(b)
            result[f"{name}_ms_{threads}t"] = (time.perf_counter() - t0) / len(batches) * 1000
        result[f"ratio_{threads}t"] = result[f"map_ms_{threads}t"] / result[f"ram_ms_{threads}t"]
    _report(**result)


def stage_epoch(a) -> None:
    import fintensor as ft
    from fintensor import ondisk

    mapped = ondisk.load(a.work / "alpha158", verify=False)
    days = [str(d) for d in mapped.coords["time"]]
    full_train = int(len(days) * 0.6)  # ft.train's default split: 60 % train
    segments, scale = None, 1.0
    if a.epoch_days and a.epoch_days < full_train:  # time a shorter train segment, scale to the full one
        k = a.epoch_days
        segments = {"train": (days[0], days[k - 1]), "valid": (days[k], days[k + 19]),
                    "test": (days[k + 20], days[k + 39])}
        scale = (full_train - 20) / (k - 20)  # windows per stock: train days minus the lookback
    t0 = time.perf_counter()
    result = ft.train(mapped, _labels(a), model="lstm", hidden=64, layers=2, lookback=20, epochs=1,
                      batch_size=800, device=a.device, seed=0, segments=segments)
    seconds = time.perf_counter() - t0
    _report(seconds=seconds * scale, measured_seconds=seconds, train_days=a.epoch_days if segments else full_train,
            history=result.history[-1])


def stage_pandas(a) -> None:
    import numpy as np
    import pandas as pd

    import fintensor as ft

    sys.path.insert(0, str(ROOT / "tests"))
    from pandas_alpha158 import alpha158

    t = ft.load(a.work / "ohlcv.safetensors", mmap=True)
    k = min(a.baseline_stocks, t.shape[1])
    values = t.values[:, :k].numpy()
    index = pd.DatetimeIndex(t.coords["time"])
    t0 = time.perf_counter()
    frames = []
    for n, sym in enumerate(t.coords["stock"][:k]):  # qlib's way: one stock's frame at a time
        cols = [pd.DataFrame({sym: values[:, n, i].astype(np.float64)}, index=index) for i in range(5)]
        feats = alpha158(*cols)
        frames.append(pd.DataFrame({name: f[sym] for name, f in feats.items()}).assign(instrument=sym))
    panel = pd.concat(frames).set_index("instrument", append=True)
    seconds = time.perf_counter() - t0
    _report(stocks=k, seconds=seconds, per_stock_ms=seconds / k * 1000, mb=panel.memory_usage().sum() / 2**20)


def _minute_market(a):
    import fintensor as ft

    return ft.synthetic.market(a.stocks, max(min(a.days, 252), a.minute_days, 2), start=START, seed=1)


def stage_minute(a) -> None:
    import fintensor as ft

    t0 = time.perf_counter()
    bars = ft.synthetic.minute_bars(_minute_market(a), a.minute_days, seed=1)
    store = ft.Store(a.work / "minute_store")
    t1 = time.perf_counter()
    rows = bars.write(store)
    write = time.perf_counter() - t1
    symbols = sorted({s["symbol"] for s in store.list() if s["interval"] == "1m"})
    (a.work / "minute.json").write_text(json.dumps([symbols, str(bars.dates[0]), str(bars.dates[-1])]))
    _report(rows=rows, stocks=len(symbols), days=len(bars.dates), market_s=t1 - t0, write_s=write,
            rows_per_s=rows / write)


def stage_mdays(a) -> None:
    import torch

    import fintensor as ft

    syms, start, end = json.loads((a.work / "minute.json").read_text())
    store = ft.Store(a.work / "minute_store")
    t0 = time.perf_counter()
    blocks = ft.build_days(syms, start, end, freq="1min", interval="1m", fields=FIELDS, store=store,
                           dtype=torch.float32, memory=a.minute_memory)
    times, shape, traded = [], None, 0
    t = time.perf_counter()
    plan = t - t0
    for block in blocks:
        traded += int(block.mask[..., 0].sum())        # cells with a bar: the rows the blocks hold
        shape = list(block.shape)
        times.append(time.perf_counter() - t)
        del block
        t = time.perf_counter()
    total = time.perf_counter() - t0
    _report(blocks=len(times), rows=traded, block_shape=shape, plan_s=plan, first_block_s=times[0],
            per_block_s=sum(times) / len(times), max_block_s=max(times), total_s=total)


STAGES = {"synth": stage_synth, "build": stage_build, "alpha158": stage_alpha158, "gather": stage_gather,
          "epoch": stage_epoch, "pandas": stage_pandas, "minute": stage_minute, "mdays": stage_mdays}


def _run(stage: str, a) -> dict:
    cmd = [sys.executable, __file__, "--stage", stage, "--work", str(a.work), "--stocks", str(a.stocks),
           "--days", str(a.days), "--memory", a.memory, "--baseline-stocks", str(a.baseline_stocks),
           "--batches", str(a.batches), "--device", a.device, "--epoch-days", str(a.epoch_days),
           "--minute-days", str(a.minute_days), "--minute-memory", a.minute_memory]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        sys.exit(f"stage {stage} failed:\n{out.stderr[-3000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["wall"] = wall
    extra = {k: v for k, v in r.items() if k not in ("cpu", "rss_mb", "heap_mb", "wall", "history")}
    print(f"{stage:9s} wall {wall:8.1f} s  cpu {r['cpu']:8.1f} s  peak RSS {r['rss_mb']:8.0f} MB  "
          f"heap {r['heap_mb']:8.0f} MB  "
          + "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in extra.items()), flush=True)
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stocks", type=int, default=5000)
    p.add_argument("--days", type=int, default=5040)
    p.add_argument("--quick", action="store_true", help="100 stocks x 500 days")
    p.add_argument("--memory", default="2GB", help="the alpha158 stage's working-memory budget")
    p.add_argument("--baseline-stocks", type=int, default=100, help="stocks the pandas baseline runs on")
    p.add_argument("--batches", type=int, default=200, help="minibatches timed in the gather stage")
    p.add_argument("--device", default="cpu")
    p.add_argument("--epoch-days", type=int, default=0, metavar="K",
                   help="time the epoch on a train segment of K days and scale it to the full 60%% segment "
                        "(default: the full epoch)")
    p.add_argument("--minute-days", type=int, default=21, metavar="D",
                   help="sessions of 1-minute bars the minute/mdays stages write and build (0 skips them)")
    p.add_argument("--minute-memory", default="1GB",
                   help="build_days' read-ahead budget in the mdays stage (its memory=; default 1GB)")
    p.add_argument("--only", metavar="STAGES", help="comma-separated stages to run (e.g. minute,mdays)")
    p.add_argument("--work", type=Path, help="keep the files here (default: a temp dir, removed)")
    p.add_argument("--stage", choices=sorted(STAGES), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.epoch_days and not 60 < a.epoch_days < a.days - 40:
        p.error("--epoch-days must leave 40 days after it for the valid and test segments, and exceed 60")
    for name in ("stocks", "days", "baseline_stocks", "batches"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive integer")
    if not 0 <= a.minute_days <= 252:
        p.error("--minute-days must be 0 (skip) to 252")
    if a.quick:
        a.stocks, a.days, a.baseline_stocks, a.batches, a.minute_days = 100, 500, 20, 50, min(a.minute_days, 5)
    only = None if a.only is None else [s.strip() for s in a.only.split(",") if s.strip()]
    if only is not None and (not only or set(only) - set(STAGES)):
        p.error(f"--only takes stages among {', '.join(STAGES)}")
    if only and "mdays" in only and "minute" not in only and not a.work:
        p.error("--only mdays reads the store a minute stage wrote: add minute, or pass its --work")
    if a.stage:
        _sample_heap()
        STAGES[a.stage](a)
        return
    keep = a.work is not None
    a.work = Path(a.work or tempfile.mkdtemp(prefix="bench_market_"))
    a.work.mkdir(parents=True, exist_ok=True)
    try:
        print(f"market {a.stocks} stocks x {a.days} days, alpha158 memory={a.memory}, {os.cpu_count()} cores")
        if only is None or set(only) & {"synth", "build", "alpha158", "gather", "epoch", "pandas"}:
            _market_stages(a, only)
        if a.minute_days and (only is None or set(only) & {"minute", "mdays"}):
            _minute_stages(a, only)
    finally:
        if not keep:
            shutil.rmtree(a.work, ignore_errors=True)


def _minute_stages(a, only) -> None:
    w = _run("minute", a) if only is None or "minute" in only else None
    d = _run("mdays", a) if only is None or "mdays" in only else None
    if w and d:
        print(f"minute {w['stocks']} stocks x {w['days']} days: write {w['write_s']:.1f} s ({w['rows']} rows), "
              f"build_days {d['per_block_s']:.2f} s per day block (total {d['total_s']:.1f} s, block "
              f"{'x'.join(map(str, d['block_shape']))}), peak RSS {max(w['rss_mb'], d['rss_mb']):.0f} MB")


def _market_stages(a, only) -> None:
    if only is not None:
        for s in only:
            if s not in ("minute", "mdays"):
                _run(s, a)
        return
    r = {s: _run(s, a) for s in ("synth", "build", "alpha158")}
    b = r["build"]
    print(f"build: ft.build {b['seconds']:.1f} s, output {b['output_mb']:.0f} MB (values + mask), peak RSS "
          f"{b['build_peak_mb']:.0f} MB = {b['baseline_mb']:.0f} MB interpreter and imports + "
          f"{b['build_peak_mb'] - b['baseline_mb']:.0f} MB ({b['added_over_output']:.2f}x the output)")
    panel_mb = r["alpha158"]["panel_mb"]
    total_kb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    if panel_mb * 4 / 5 < total_kb / 2:
        g = _run("gather", a)
        for key in sorted(k for k in g if k.startswith("ratio_")):
            t = key[len("ratio_"):]
            print(f"gather ({t[:-1]} thread(s)): map {g['map_ms_' + t]:.2f} ms vs RAM {g['ram_ms_' + t]:.2f} ms "
                  f"per 800-window batch ({g[key]:.2f}x)")
    r["epoch"] = _run("epoch", a)
    base = _run("pandas", a)
    print(f"pandas per-stock Alpha158 + pd.concat: {base['per_stock_ms']:.0f} ms/stock on {base['stocks']} "
          f"stocks (peak RSS {base['rss_mb']:.0f} MB) vs fintensor out of core "
          f"{r['alpha158']['per_stock_ms']:.1f} ms/stock: {base['per_stock_ms'] / r['alpha158']['per_stock_ms']:.1f}x")
    peak = max(x["heap_mb"] for x in r.values())
    print(f"peak RSS per stage (ru_maxrss, counting the mapped panel's file pages) vs its own memory (peak "
          f"RssAnon): " + ", ".join(f"{k} {x['rss_mb']:.0f}/{x['heap_mb']:.0f} MB" for k, x in r.items()))
    print(f"market {a.stocks} stocks x {a.days} days: build {r['build']['seconds']:.1f} s, alpha158 "
          f"{r['alpha158']['seconds']:.1f} s, panel {panel_mb:.0f} MB, peak RSS {peak:.0f} MB, epoch "
          f"{r['epoch']['seconds']:.1f} s" + (f" (scaled from {r['epoch']['measured_seconds']:.1f} s on "
                                               f"{r['epoch']['train_days']} train days)"
                                               if r['epoch']['train_days'] != int(a.days * 0.6) else ""))


if __name__ == "__main__":
    main()
