"""Training data throughput and speed: fintensor's one-gather minibatches vs a per-sample Dataset + DataLoader.

    python benchmarks/bench_train.py            # CPU (and GPU sections when CUDA is present)
    python benchmarks/bench_train.py --quick    # smaller panel, fewer steps

Measured in one run, at qlib's benchmark scale (300 stocks x 1700 days, 20 features, lookback 60,
batch 800): windows/s of batch assembly for both (and their ratio), peak memory of fintensor's windowed
panel against the panel's own size, and an LSTM(2x64) training epoch (time, samples/s, and the share of
each step spent assembling data) fed by each. With CUDA: the same on the GPU, plus an Alpha158-scale
epoch (158 features, lookback 20) with bf16 autocast.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from fintensor.data import Windows
from fintensor.models import build_model
from fintensor.tensor import StockTensor


def panel(T: int, N: int, F: int, seed: int = 0):
    """A (time, stock, feature) features tensor with a few missing cells, and labels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, N, F, generator=g)
    x[torch.rand(T, N, F, generator=g) < 0.001] = float("nan")
    times = np.datetime64("2010-01-04") + np.arange(T).astype("timedelta64[D]")
    coords = {"time": times, "stock": [f"S{i:04d}" for i in range(N)]}
    X = StockTensor(x, ("time", "stock", "feature"), {**coords, "feature": [f"f{i}" for i in range(F)]})
    Y = StockTensor(torch.randn(T, N, generator=g), ("time", "stock"), coords)
    return X, Y


def rss_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field))


def exact_rss() -> None:
    """Make glibc return every large block on free (fixed mmap threshold), so RSS shows live memory only."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD = 64 KiB
    except (OSError, AttributeError):
        pass


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # Linux: reset VmHWM (peak RSS) to the current RSS
        return True
    except OSError:
        return False


class PerSampleDataset(torch.utils.data.Dataset):
    """What users write without fintensor: one window sliced and copied per __getitem__."""

    def __init__(self, x: np.ndarray, y: np.ndarray, index: np.ndarray, lookback: int):
        self.x, self.y, self.index, self.lookback = x, y, index, lookback

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        t, n = self.index[i]
        return torch.from_numpy(self.x[t - self.lookback + 1:t + 1, n]), torch.tensor(self.y[t, n])


def rate_once(batches, batch: int, n_batches: int) -> float:
    """Windows/s of one run of ``n_batches`` from an iterator of batches."""
    t0 = time.perf_counter()
    for _ in range(n_batches):
        b = next(batches)
    sync(b[0].device if isinstance(b, (list, tuple)) else b.x.device)
    return n_batches * batch / (time.perf_counter() - t0)


def loader(ds, batch: int, workers: int):
    """A per-sample DataLoader's batches, epoch after epoch (worker start-up happens on the first batch)."""
    dl = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers,
                                     persistent_workers=workers > 0)
    while True:
        yield from dl


def endless(w: Windows, batch: int):
    """fintensor's minibatches, epoch after epoch."""
    for epoch in range(10**9):
        yield from w.batches("train", batch_size=batch, seed=0, epoch=epoch)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class Trainer:
    """An LSTM(2x64) trained by SGD on batches from one source, one timed step at a time."""

    def __init__(self, batches, F: int, L: int, device, bf16: bool):
        torch.manual_seed(0)
        self.model = build_model("lstm", F, L, hidden=64, layers=2).to(device)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.batches, self.device, self.bf16 = batches, device, bf16
        self.steps: list[float] = []
        self.shares: list[float] = []

    def step(self, timed: bool = True) -> None:
        sync(self.device)
        t0 = time.perf_counter()
        x, y = next(self.batches)
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        sync(self.device)
        t1 = time.perf_counter()
        with torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = (self.model(x).float() - y).square().mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        sync(self.device)
        t2 = time.perf_counter()
        if timed:
            self.steps.append(t2 - t0)
            self.shares.append((t1 - t0) / (t2 - t0))

    def median(self) -> tuple[float, float]:
        """(median seconds per step, median share of a step spent producing its batch)."""
        return float(np.median(self.steps)), float(np.median(self.shares))


def section(device: str, T: int, N: int, F: int, L: int, B: int, n_batches: int, n_steps: int, baseline: bool):
    print(f"\n== {device}: {N} stocks x {T} days x {F} features, lookback {L}, batch {B} "
          f"(torch threads {torch.get_num_threads()}) ==")
    small = panel(100, 10, F)  # warm-up: the first use of each kernel pages in library code (RSS)
    Windows(*small, L, segments={"train": (None, None)}, label_reach=0, missing="zero", device=device)
    X, Y = panel(T, N, F)
    panel_mb = X.values.numel() * 4 / 2**20
    sync(device)
    before = rss_kb("VmRSS")
    peak_ok = reset_peak()
    w = Windows(X, Y, L, segments={"train": (None, None)}, label_reach=0, missing="zero", feature_norm="zscore",
                label_norm=None, device=device)
    extra_mb = (rss_kb("VmHWM") - before) / 1024
    n = len(w.positions["train"])
    print(f"panel {panel_mb:.1f} MB; {n:,} samples ({n * L * F * 4 / 2**30:.1f} GB if every window were "
          f"materialised)")
    if device == "cpu":
        print(f"memory: peak while building the windowed panel +{extra_mb:.1f} MB = "
              f"{extra_mb / panel_mb:.2f}x the panel{'' if peak_ok else ' (peak reset unavailable)'}; "
              f"kept {(rss_kb('VmRSS') - before) / 1024 / panel_mb:.2f}x")
    else:
        print(f"GPU memory: {torch.cuda.max_memory_allocated() / 2**20:.0f} MB peak allocated for a "
              f"{panel_mb:.0f} MB panel")

    # the contenders in this process run in 5 interleaved rounds and keep their best round, so that other
    # processes on the machine (which only ever slow a round down) weigh on them alike
    threads = torch.get_num_threads()
    contenders = {f"fintensor gather, one index_select per batch ({k} thread(s))": (endless(w, B), k, n_batches)
                  for k in (sorted({1, threads}) if device == "cpu" else [threads])}
    if baseline:
        t_idx, n_idx = np.nonzero(w.window_ok.T.cpu().numpy())
        ds = PerSampleDataset(np.nan_to_num(X.values.numpy()), Y.values.numpy(), np.stack([t_idx, n_idx], 1), L)
        contenders["per-sample Dataset + DataLoader (num_workers=0)"] = (loader(ds, B, 0), threads, 20)
    best = dict.fromkeys(contenders, 0.0)
    for it, _, _ in contenders.values():
        next(it)  # the first kernels are not timed
    for _ in range(5):
        for name, (it, n_threads, batches) in contenders.items():
            torch.set_num_threads(n_threads)
            best[name] = max(best[name], rate_once(it, B, batches))
    torch.set_num_threads(threads)
    if baseline:  # worker processes prefetch while idle, so they run alone, round after round
        workers = loader(ds, B, 2)
        next(workers)  # worker start-up is not timed
        best["per-sample Dataset + DataLoader (num_workers=2)"] = max(rate_once(workers, B, 20) for _ in range(5))
    ours = max(v for k, v in best.items() if k.startswith("fintensor"))
    for name, rate in best.items():
        target = f"  (target >= {5 if device == 'cpu' else 50} M)" if name.startswith("fintensor") else \
            f"  -> fintensor {ours / rate:5.1f}x"
        print(f"{name:<62}{rate / 1e6:7.3f} M windows/s{target}")

    # training steps, fintensor-fed and DataLoader-fed taking turns (after one untimed warm-up step each)
    bf16 = device != "cpu"
    ours_run = Trainer(((b.x, b.y) for b in endless(w, B)), F, L, device, bf16)
    runs = [ours_run] + ([Trainer(loader(ds, B, 0), F, L, device, bf16)] if baseline else [])
    for run in runs:
        run.step(timed=False)
    for _ in range(n_steps):
        for run in runs:
            run.step()
    step, share = ours_run.median()
    steps_per_epoch = -(-n // B)
    print(f"LSTM(2x64) fed by fintensor:  {step * 1e3:7.1f} ms/step, {B / step:8,.0f} samples/s, "
          f"epoch ({steps_per_epoch} steps) {step * steps_per_epoch:7.1f} s [median of {n_steps} steps], "
          f"data assembly {share:.1%} of a step" + ("" if device == "cpu" else " (target < 10 %)"))
    if baseline:
        step_b, share_b = runs[1].median()
        print(f"LSTM(2x64) fed by DataLoader: {step_b * 1e3:7.1f} ms/step, {B / step_b:8,.0f} samples/s, "
              f"epoch {step_b * steps_per_epoch:7.1f} s, data {share_b:.1%} of a step "
              f"-> fintensor epoch {step_b / step:.2f}x faster")
    return w


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smaller panel and fewer steps")
    args = parser.parse_args()
    exact_rss()
    T, N = (600, 100) if args.quick else (1700, 300)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} "
          "(other processes on the cores slow every number below)")
    section("cpu", T, N, 20, 60, 800, 20 if args.quick else 100, 4 if args.quick else 20, baseline=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    if not torch.cuda.is_available():
        print("\n== GPU: no GPU (torch.cuda.is_available() is False) — GPU sections skipped ==")
        return
    section("cuda", T, N, 20, 60, 800, 500, 50, baseline=True)
    # Alpha158 scale: 158 features, lookback 20, a whole epoch with bf16 autocast
    X, Y = panel(T, N, 158)
    w = Windows(X, Y, 20, segments={"train": (None, None)}, label_reach=0, missing="zero", label_norm=None,
                device="cuda")
    torch.manual_seed(0)
    model = build_model("lstm", 158, 20, hidden=64, layers=2).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for timed in (False, True):  # the first epoch warms up cuDNN
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for b in w.batches("train", batch_size=800, seed=0, epoch=int(timed)):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = (model(b.x).float() - b.y).square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    n = len(w.positions["train"])
    print(f"\nAlpha158-scale LSTM(2x64) epoch on {torch.cuda.get_device_name()}: {n:,} samples in "
          f"{seconds:.2f} s ({n / seconds:,.0f} samples/s; target <= 3 s on an H100)")


if __name__ == "__main__":
    main()
