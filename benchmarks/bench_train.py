"""Training data throughput and speed: fintensor's one-gather minibatches vs a per-sample Dataset + DataLoader.

    python benchmarks/bench_train.py            # CPU (and GPU sections when CUDA is present)
    python benchmarks/bench_train.py --quick    # smaller panel, fewer steps

Measured in one run, at qlib's benchmark scale (300 stocks x 1700 days, 20 features, lookback 60,
batch 800): windows/s of batch assembly for fintensor (random and whole-day batches, float32 and bf16
panels), for the ways a gather can be written (index_select on the strided window view with 1 and all
threads, advanced indexing, torch.gather, a time-major panel), for a plain copy of the same bytes (the
bound: a gather cannot move bytes faster than a copy) and for a per-sample Dataset + DataLoader, with
ratios; peak memory of fintensor's windowed panel against the panel's own size (in a child process);
and an LSTM(2x64) training epoch (time, samples/s, share of each step spent assembling data) fed by each.
With CUDA: the same on the GPU, plus an Alpha158-scale epoch (158 features, lookback 20) with bf16 autocast.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from typing import Callable

import numpy as np
import torch

from fintensor.data import Windows, intra_op_threads
from fintensor.models import build_model
from fintensor.tensor import StockTensor

ROUNDS = 5


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


def windows(X, Y, L: int, device, **options) -> Windows:
    return Windows(X, Y, L, segments={"train": (None, None)}, label_reach=0, missing="zero",
                   feature_norm="zscore", label_norm=None, device=device, **options)


# ------------------------------------------------------------------------------------------ memory
def rss_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field))


def memory_child(T: int, N: int, F: int, L: int) -> None:
    """Run in a child process: glibc is told to return every large block on free (fixed mmap threshold),
    so RSS shows live memory only. That setting makes every batch allocation page-fault afresh, so it
    must not touch the process whose speed is measured."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD = 64 KiB
    except (OSError, AttributeError):
        pass
    windows(*panel(100, 10, F), L, "cpu")  # the first use of each kernel pages in library code
    X, Y = panel(T, N, F)
    before = rss_kb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # Linux: reset VmHWM (peak RSS) to the current RSS
        peak_ok = True
    except OSError:
        peak_ok = False
    w = windows(X, Y, L, "cpu")
    print(json.dumps({"peak_mb": (rss_kb("VmHWM") - before) / 1024, "kept_mb": (rss_kb("VmRSS") - before) / 1024,
                      "peak_ok": peak_ok, "samples": len(w.positions["train"])}))


def memory_report(T: int, N: int, F: int, L: int, panel_mb: float) -> str:
    run = subprocess.run([sys.executable, __file__, "--memory-child", str(T), str(N), str(F), str(L)],
                         capture_output=True, text=True, timeout=600)
    if run.returncode:
        return f"memory: child process failed ({run.stderr.strip().splitlines()[-1:]})"
    m = json.loads(run.stdout.splitlines()[-1])
    return (f"memory (separate process): peak while building the windowed panel +{m['peak_mb']:.1f} MB = "
            f"{m['peak_mb'] / panel_mb:.2f}x the panel{'' if m['peak_ok'] else ' (peak reset unavailable)'}; "
            f"kept {m['kept_mb'] / panel_mb:.2f}x")


# ------------------------------------------------------------------------------------------ feeders
class PerSampleDataset(torch.utils.data.Dataset):
    """What users write without fintensor: one window sliced and copied per __getitem__."""

    def __init__(self, x: np.ndarray, y: np.ndarray, index: np.ndarray, lookback: int):
        self.x, self.y, self.index, self.lookback = x, y, index, lookback

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        t, n = self.index[i]
        return torch.from_numpy(self.x[t - self.lookback + 1:t + 1, n]), torch.tensor(self.y[t, n])


def loader(ds, batch: int, workers: int):
    """A per-sample DataLoader's batches, epoch after epoch (worker start-up happens on the first batch)."""
    dl = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers,
                                     persistent_workers=workers > 0)
    while True:
        yield from dl


def endless(w: Windows, batch: int, mode: str = "random"):
    """fintensor's minibatches, epoch after epoch."""
    for epoch in range(10**9):
        yield from w.batches("train", batch_size=batch, mode=mode, seed=0, epoch=epoch)


def gather_variants(w: Windows, B: int, device) -> dict[str, Callable[[], torch.Tensor]]:
    """The ways to write the windows-only gather, on the same panel and the same random positions."""
    L, F = w.lookback, w.n_features
    pos = w.positions["train"]
    pos = pos[torch.randperm(len(pos), generator=torch.Generator().manual_seed(1)).to(pos.device)]
    starts = [c - (L - 1) for c in pos.split(B) if len(c) == B]
    stream = itertools.cycle(starts)
    flat = w.panel.view(-1)
    window_offsets = torch.arange(L * F, device=flat.device)
    N, T = w.panel.shape[:2]
    time_major = w.panel.permute(1, 0, 2).contiguous()  # (T, N, F): window rows N*F apart
    tm_windows = time_major.view(-1).as_strided(((T - L + 1) * N, L, F), (F, N * F, 1))

    def index_select(limit: int | None):
        def run():
            with intra_op_threads(limit):
                return torch.index_select(w._windows, 0, next(stream))
        return run

    def tm_index_select():
        s = next(stream)
        n, t0 = s // T, s % T  # a window starting at row t0 of stock n
        with intra_op_threads(1):
            return torch.index_select(tm_windows, 0, t0 * N + n)

    def flat_gather():
        with intra_op_threads(1):
            return torch.gather(flat, 0, ((next(stream) * F)[:, None] + window_offsets).view(-1))

    def advanced():
        with intra_op_threads(1):
            return w._windows[next(stream)]

    return {**thread_counts("index_select, strided window view", index_select, device),
            "advanced indexing windows[idx]": advanced, "torch.gather, flat panel + index matrix": flat_gather,
            "index_select, time-major (T, N, F) panel": tm_index_select}


def plain_copies(w: Windows, B: int, device) -> dict[str, Callable[[], torch.Tensor]]:
    """The bound: a plain copy of the panel, one batch-sized slice after another into a new tensor (the bytes
    a gather of B random windows moves, read in order)."""
    n = B * w.lookback * w.n_features
    slices = itertools.cycle(w.panel.view(-1)[: w.panel.numel() // n * n].view(-1, n))

    def copy(limit: int | None):
        def run():
            with intra_op_threads(limit):
                return next(slices).clone()
        return run

    return thread_counts("plain copy of batch-sized panel slices", copy, device)


def thread_counts(name: str, make: Callable[[int | None], Callable], device) -> dict[str, Callable]:
    """``make(limit)``'s runner on one intra-op thread and on all of them (CPU), or once (GPU), by name."""
    threads = torch.get_num_threads()
    if device != "cpu" or threads == 1:
        return {name: make(None)}
    return {f"{name}, 1 thread": make(1), f"{name}, {threads} threads": make(None)}


# ------------------------------------------------------------------------------------------ timing
def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def rate_once(make: Callable[[], object], batch: int, n_batches: int, device) -> float:
    """Windows/s of ``n_batches`` calls of ``make``."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n_batches):
        make()
    sync(device)
    return n_batches * batch / (time.perf_counter() - t0)


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


# ----------------------------------------------------------------------------------------- sections
RANDOM = "fintensor batches, random (as ft.train draws them)"


def assembly_rates(w: Windows, half: Windows, ds, B: int, n_batches: int, device) -> dict[str, float]:
    """Best windows/s of every way to assemble batches. The contenders in this process run in interleaved
    rounds and keep their best, so that other processes on the machine (which only ever slow a round down)
    weigh on them alike; DataLoader workers prefetch while idle, so they run alone, round after round."""
    days = endless(w, B, "day")
    day_windows = len(next(days).positions)  # windows per day batch (one day of every stock)
    batches, half_batches, serial = endless(w, B), endless(half, B), loader(ds, B, 0)
    contenders = {  # name: (make one batch, windows per batch, batches per round)
        RANDOM: (lambda: next(batches), B, n_batches),
        "fintensor batches, random, bf16 panel (cast to float32)": (lambda: next(half_batches), B, n_batches),
        "fintensor batches, whole days (views: nothing copied)": (lambda: next(days), day_windows, 4 * n_batches),
        **{f"  gather: {k}": (f, B, n_batches) for k, f in gather_variants(w, B, device).items()},
        **{k: (f, B, n_batches) for k, f in plain_copies(w, B, device).items()},
        "per-sample Dataset + DataLoader (num_workers=0)": (lambda: next(serial), B, 10),
    }
    best = dict.fromkeys(contenders, 0.0)
    for make, _, _ in contenders.values():
        make()  # the first kernels are not timed
    for _ in range(ROUNDS):
        for name, (make, size, calls) in contenders.items():
            best[name] = max(best[name], rate_once(make, size, calls, device))
    workers = loader(ds, B, 2)
    next(workers)  # worker start-up is not timed
    best["per-sample Dataset + DataLoader (num_workers=2)"] = max(rate_once(lambda: next(workers), B, 10, device)
                                                                  for _ in range(ROUNDS))
    return best


def section(device: str, T: int, N: int, F: int, L: int, B: int, n_batches: int, n_steps: int):
    cpu = device == "cpu"
    print(f"\n== {device}: {N} stocks x {T} days x {F} features, lookback {L}, batch {B} "
          f"(torch threads {torch.get_num_threads()}) ==")
    X, Y = panel(T, N, F)
    panel_mb = X.values.numel() * 4 / 2**20
    w = windows(X, Y, L, device)
    n = len(w.positions["train"])
    print(f"panel {panel_mb:.1f} MB; {n:,} samples ({n * L * F * 4 / 2**30:.1f} GB if every window were "
          f"materialised)")
    if cpu:
        print(memory_report(T, N, F, L, panel_mb))
    else:
        print(f"GPU memory: {torch.cuda.max_memory_allocated() / 2**20:.0f} MB peak allocated for a "
              f"{panel_mb:.0f} MB panel")
    t_idx, n_idx = np.nonzero(w.window_ok.T.cpu().numpy())
    ds = PerSampleDataset(np.nan_to_num(X.values.numpy()), Y.values.numpy(), np.stack([t_idx, n_idx], 1), L)
    best = assembly_rates(w, windows(X, Y, L, device, panel_dtype="bfloat16"), ds, B, n_batches, device)
    baseline = max(v for k, v in best.items() if k.startswith("per-sample"))
    bound = max(v for k, v in best.items() if k.startswith("plain copy"))
    print(f"{'':<62}{'M windows/s':>12}{'vs DataLoader':>15}{'of the copy':>12}")
    for name, rate in best.items():
        share = "-" if "views" in name else f"{rate / bound:.0%}"
        print(f"{name:<62}{rate / 1e6:12.3f}{rate / baseline:14.1f}x{share:>12}")
    window_bytes, target = L * F * 4, 5 if cpu else 50
    print(f"random batches: fintensor {best[RANDOM] / baseline:.1f}x the best DataLoader (target >= 20x), "
          f"{best[RANDOM] / 1e6:.2f} M windows/s (target >= {target} M = {target * window_bytes / 1e3:.0f} GB/s read "
          f"and written); bound: a plain copy of the same bytes, {bound / 1e6:.2f} M windows/s = "
          f"{bound * window_bytes / 1e9:.1f} GB/s")

    # training steps, fintensor-fed and DataLoader-fed taking turns (after one untimed warm-up step each)
    runs = [Trainer(((b.x, b.y) for b in endless(w, B)), F, L, device, not cpu),
            Trainer(loader(ds, B, 0), F, L, device, not cpu)]
    for run in runs:
        run.step(timed=False)
    for _ in range(n_steps):
        for run in runs:
            run.step()
    (step, share), (step_b, share_b) = (run.median() for run in runs)
    steps_per_epoch = -(-n // B)
    print(f"LSTM(2x64) fed by fintensor:  {step * 1e3:7.1f} ms/step, {B / step:8,.0f} samples/s, "
          f"epoch ({steps_per_epoch} steps) {step * steps_per_epoch:7.1f} s [median of {n_steps} steps], "
          f"data assembly {share:.1%} of a step" + ("" if cpu else " (target < 10 %)"))
    print(f"LSTM(2x64) fed by DataLoader: {step_b * 1e3:7.1f} ms/step, {B / step_b:8,.0f} samples/s, "
          f"epoch {step_b * steps_per_epoch:7.1f} s, data {share_b:.1%} of a step "
          f"-> fintensor epoch {step_b / step:.2f}x faster")


def alpha158_epoch(T: int, N: int) -> None:
    """An Alpha158-scale LSTM(2x64) epoch on the GPU: 158 features, lookback 20, bf16 autocast."""
    X, Y = panel(T, N, 158)
    w = windows(X, Y, 20, "cuda")
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


def main() -> None:
    if sys.argv[1:2] == ["--memory-child"]:
        return memory_child(*map(int, sys.argv[2:6]))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smaller panel and fewer steps")
    args = parser.parse_args()
    T, N = (600, 100) if args.quick else (1700, 300)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} "
          "(other processes on the cores slow every number below)")
    section("cpu", T, N, 20, 60, 800, 20 if args.quick else 50, 4 if args.quick else 20)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    if not torch.cuda.is_available():
        print("\n== GPU: no GPU (torch.cuda.is_available() is False) — GPU sections skipped ==")
        return
    section("cuda", T, N, 20, 60, 800, 500, 50)
    alpha158_epoch(T, N)


if __name__ == "__main__":
    main()
