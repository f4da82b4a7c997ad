"""The whole market out of core: the on-disk feature panel (fintensor.ondisk) equals the in-memory one bit
for bit, its build's memory is bounded by ``memory=`` (a child process's peak RSS), a killed build leaves
no panel that claims to be complete, a damaged one is refused, and training from the map is training from
RAM (same batches, same loss sequence, no look-ahead in the streaming normaliser)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

import fintensor as ft
from fintensor import data, features, ondisk
from fintensor.data import Windows
from fintensor.errors import BadInputError, StoreCorruptError

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ["open", "high", "low", "close", "volume"]

# a random-walk OHLCV tensor built in the child processes (no store: the child measures features only)
MAKE_PANEL = """
import numpy as np, torch, fintensor as ft
def make_panel(T, N, seed=0):
    rng = np.random.default_rng(seed)
    close = 20 * np.exp(np.cumsum(rng.normal(0, 0.02, (T, N)), 0))
    open_ = close * np.exp(rng.normal(0, 0.005, (T, N)))
    high = np.maximum(open_, close) * (1 + rng.uniform(0, 0.01, (T, N)))
    low = np.minimum(open_, close) * (1 - rng.uniform(0, 0.01, (T, N)))
    volume = rng.lognormal(12, 0.5, (T, N))
    values = np.stack([open_, high, low, close, volume], -1).astype(np.float32)
    values[: T // 10, : N // 7] = np.nan  # some stocks list late
    dates = np.arange(np.datetime64("2000-01-03"), np.datetime64("2000-01-03") + T)
    return ft.StockTensor(torch.from_numpy(values), ("time", "stock", "feature"),
                          {"time": dates, "stock": [f"S{i:05d}" for i in range(N)],
                           "feature": ["open", "high", "low", "close", "volume"]})
"""


def _child(code: str, *args: str, wait: bool = True) -> subprocess.Popen | subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", textwrap.dedent(MAKE_PANEL) + textwrap.dedent(code), *args]
    if wait:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def market_tensor(tmp_path_factory):
    m = ft.synthetic.market(40, 400, seed=3)
    store = ft.Store(tmp_path_factory.mktemp("market_store"))
    m.write(store)
    return ft.build(m.symbols, m.dates[0], m.dates[-1], fields=FIELDS, store=store)


def _bits(t: ft.StockTensor) -> np.ndarray:
    v = t.values.numpy()
    return v.view(np.int32 if v.dtype == np.float32 else np.int64)


def test_out_of_core_alpha158_equals_the_in_memory_panel_bit_for_bit(market_tensor, tmp_path):
    in_ram = features.compute(market_tensor, "alpha158")
    assert features.block_stocks(400, 157, 2 << 20, 4) < 40 // 3  # memory="2MB" forces several blocks
    mapped = features.compute(market_tensor, "alpha158", out=tmp_path / "alpha", memory="2MB")
    assert ondisk.stock_major(mapped) is not None and mapped.meta["panel"] == str(tmp_path / "alpha")
    assert isinstance(mapped.values.permute(1, 0, 2).numpy(), np.ndarray)
    assert mapped.dims == in_ram.dims and mapped.shape == in_ram.shape
    for d in in_ram.dims:
        assert np.array_equal(mapped.coords[d], in_ram.coords[d])
    assert np.array_equal(_bits(mapped), _bits(in_ram))  # NaN payloads included
    assert torch.equal(mapped.mask, in_ram.mask)
    assert mapped.meta["features"] == "alpha158"
    again = ondisk.load(tmp_path / "alpha")  # verified load of what was written
    assert np.array_equal(_bits(again), _bits(in_ram)) and torch.equal(again.mask, in_ram.mask)


def test_compute_block_is_a_block_of_the_whole(market_tensor):
    whole = features.compute(market_tensor, ["MA5", "RSV10", "KMID"])
    values, mask, names = features.compute_block(market_tensor.isel(stock=slice(7, 19)), ["MA5", "RSV10", "KMID"])
    assert names == ["MA5", "RSV10", "KMID"] and values.shape == (12, 400, 3)
    expect = whole.values[:, 7:19].permute(1, 0, 2).numpy()
    assert np.array_equal(values.view(np.int32), expect.view(np.int32))
    assert np.array_equal(mask, whole.mask[:, 7:19].permute(1, 0, 2).numpy())


def test_a_damaged_or_edited_panel_is_refused(market_tensor, tmp_path):
    path = tmp_path / "p"
    features.compute(market_tensor, ["MA5", "KMID"], out=path)
    data = bytearray((path / "values.npy").read_bytes())
    data[-5] ^= 0xFF
    (path / "values.npy").write_bytes(bytes(data))
    with pytest.raises(StoreCorruptError, match="values.npy fails its checksum"):
        ondisk.load(path)
    features.compute(market_tensor, ["MA5", "KMID"], out=path)  # an earlier panel is replaced
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["shape"][0] += 1
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreCorruptError, match="manifest.json fails its checksum"):
        ondisk.load(path, verify=False)
    (path / "manifest.json").unlink()
    with pytest.raises(StoreCorruptError, match="not a complete fintensor panel"):
        ondisk.load(path)


def test_bad_out_and_memory_are_refused(market_tensor, tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "mine.txt").write_text("keep")
    for bad in (tmp_path / "file", tmp_path / "dir"):
        with pytest.raises(BadInputError, match="not a fintensor panel"):
            features.compute(market_tensor, ["MA5"], out=bad)
    assert (tmp_path / "dir" / "mine.txt").read_text() == "keep"
    for memory in ("lots", "-1GB", 1000, True):
        with pytest.raises(BadInputError, match="memory"):
            features.compute(market_tensor, ["MA5"], out=tmp_path / "p", memory=memory)
    assert features.parse_bytes("512MB", "m") == 512 << 20 and features.parse_bytes("1.5g", "m") == 3 << 29
    with pytest.raises(BadInputError, match="StockTensor"):
        features.compute({"close": np.ones((5, 2))}, ["MA2"], out=tmp_path / "p")


def test_a_killed_feature_build_leaves_no_panel_that_claims_to_be_complete(tmp_path):
    path = tmp_path / "panel"
    child = _child("""
        import sys
        from fintensor import features
        t = make_panel(800, 300)
        features.compute(t, "alpha158", out=sys.argv[1], memory="1MB")  # one stock per block
        print("finished")
    """, str(path), wait=False)
    deadline = time.monotonic() + 120
    partial = None
    while time.monotonic() < deadline and child.poll() is None:
        temps = [p for p in tmp_path.iterdir() if p.name.startswith(".panel.")]
        if temps and (temps[0] / "values.npy").exists() and (temps[0] / "values.npy").stat().st_size > 4 << 20:
            partial = temps[0]
            break
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    out, err = child.communicate()
    assert partial is not None, f"the build never got under way: {err[-2000:]}"
    assert "finished" not in out
    assert not path.exists()  # nothing claims to be the panel
    assert not (partial / "manifest.json").exists()
    with pytest.raises(StoreCorruptError, match="not a complete fintensor panel"):
        ondisk.load(path)
    # the next build of the same panel clears the leftover and completes
    t = ft.StockTensor(torch.rand(30, 3, 5) + 1, ("time", "stock", "feature"), {"feature": FIELDS})
    features.compute(t, ["MA5"], out=path)
    assert not partial.exists() and ondisk.load(path).shape == (30, 3, 1)


def test_peak_rss_of_an_out_of_core_build_stays_within_its_memory_budget(tmp_path):
    """A child computes Alpha158 for 300 stocks x 2,520 days (a 453 MB float32 panel + 113 MB mask: the
    largest that builds in well under a minute on 2 shared cores) with memory="64MB". Its RSS grows by
    less than 2x the budget, while the in-memory path would need the whole panel (7x the budget) twice."""
    child = _child("""
        import json, resource, sys
        from fintensor import features
        t = make_panel(2520, 300)
        features.compute(t.isel(stock=slice(0, 2)), "alpha158")  # compile/load the kernels first
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out = features.compute(t, "alpha158", out=sys.argv[1], memory="64MB")
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps({"before": before, "after": after, "panel": out.values.numel() * 4}))
    """, str(tmp_path / "big"))
    assert child.returncode == 0, child.stderr[-3000:]
    r = json.loads(child.stdout.strip().splitlines()[-1])
    budget = 64 << 20
    assert r["panel"] > 6 * budget
    assert r["after"] - r["before"] < 2 * budget, r
    assert ondisk.read_manifest(tmp_path / "big", verify=True)["shape"] == [2520, 300, 157]


# ------------------------------------------------------------------------------------ training from the map
@pytest.fixture(scope="module")
def feature_pair(market_tensor, tmp_path_factory):
    spec = ["MA5", "STD10", "KMID", "ROC5", "RSV10", "VSTD5"]
    in_ram = features.compute(market_tensor, spec)
    mapped = features.compute(market_tensor, spec, out=tmp_path_factory.mktemp("pair") / "panel", memory="2MB")
    labels = features.forward_returns(market_tensor)
    return in_ram, mapped, labels


@pytest.mark.parametrize("feature_norm, missing, panel_dtype", [
    ("zscore", "drop", "float32"), ("robust", "zero", "float32"), ("zscore", "zero", "bfloat16"),
    (None, "drop", "float32")])
def test_windows_from_the_map_equal_windows_in_ram(feature_pair, feature_norm, missing, panel_dtype):
    in_ram, mapped, labels = feature_pair
    opts = dict(label_reach=2, feature_norm=feature_norm, missing=missing, panel_dtype=panel_dtype)
    a, b = Windows(in_ram, labels, 10, **opts), Windows(mapped, labels, 10, **opts)
    assert not a._mapped and b._mapped and b.panel.data_ptr() == ondisk.stock_major(mapped)[0].data_ptr()
    if feature_norm:
        assert torch.equal(a.normaliser.center, b.normaliser.center)
        assert torch.equal(a.normaliser.scale, b.normaliser.scale)
    for seg in ("train", "valid"):
        assert torch.equal(a.positions[seg], b.positions[seg])
        for mode in ("random", "day"):
            pairs = list(zip(a.batches(seg, batch_size=128, mode=mode), b.batches(seg, batch_size=128, mode=mode)))
            assert pairs
            for x, y in pairs:
                assert torch.equal(x.x, y.x) and torch.equal(x.y, y.y) and torch.equal(x.positions, y.positions)
    with pytest.raises(BadInputError, match="cs_norm"):
        Windows(mapped, labels, 10, label_reach=2, cs_norm="zscore")
    assert Windows(mapped, labels, 10, label_reach=2, cs_norm="zscore", in_memory=True).panel.is_contiguous()
    with pytest.raises(BadInputError, match="on-disk panel"):
        Windows(in_ram, labels, 10, label_reach=2, in_memory=False)


@pytest.mark.parametrize("dtype, missing", [(np.float32, "zero"), (np.float32, "drop"), (np.float64, "zero")])
def test_gather_from_the_map_equals_ram_at_every_window(feature_pair, tmp_path, dtype, missing):
    """Every window of the panel, complete or not -- unobserved values that are finite, NaN, +-inf --
    gathers from the map (memcpy + in-place normalisation, mask read only for incomplete rows) exactly as
    from RAM, for a float32 map and a float64 one (converted while copied)."""
    in_ram, _, labels = feature_pair
    values, mask = in_ram.values.clone(), in_ram.mask.clone()
    g = torch.Generator().manual_seed(3)
    holes = torch.rand(mask.shape, generator=g) < 0.01
    mask[holes] = False  # unobserved but finite values: the mask alone must hide them
    values[torch.rand(values.shape, generator=g) < 0.002] = float("inf")
    values[torch.rand(values.shape, generator=g) < 0.002] = -float("inf")
    panel = in_ram.with_values(values, mask=mask)
    T, N, F = panel.shape
    with ondisk.PanelWriter(tmp_path / "p", panel.coords["time"], panel.coords["stock"], panel.coords["feature"],
                            dtype, {}) as w:
        w.write(values.permute(1, 0, 2).numpy().astype(dtype), mask.permute(1, 0, 2).numpy())
        w.commit()
    mapped = ondisk.load(tmp_path / "p")
    a = Windows(panel, labels, 10, label_reach=2, missing=missing)
    b = Windows(mapped, labels, 10, label_reach=2, missing=missing, normaliser=a.normaliser)
    assert b._mapped and not b._complete.all() and b._complete.any()
    every = torch.arange(9, N * T).reshape(-1)
    every = every[every % T >= 9]  # windows that do not straddle two stocks
    threads = torch.get_num_threads()
    try:  # one thread, and the batch split over two (one share each)
        torch.set_num_threads(1)
        one = b.gather(every)
        torch.set_num_threads(2)
        with mock.patch.object(data, "GATHER_GRAIN", 1):
            assert torch.equal(b.gather(every), one)
    finally:
        torch.set_num_threads(threads)
    if dtype is np.float32:
        assert torch.equal(a.gather(every), one)
    else:  # the map holds float64; RAM rounds the same float64 numbers to float32 first
        c = Windows(panel.with_values(torch.from_numpy(values.numpy().astype(np.float64)), mask=mask), labels, 10,
                    label_reach=2, missing=missing, normaliser=a.normaliser)
        assert torch.equal(c.gather(every), b.gather(every))


def test_the_streaming_normaliser_reads_only_the_train_segment(feature_pair, tmp_path):
    """Perturb everything after the train segment of the on-disk panel: the normaliser and every training
    batch stay bit for bit the same (no look-ahead)."""
    in_ram, _, labels = feature_pair
    segments = {"train": (None, "2015-09-30"), "valid": ("2015-10-20", None)}
    first_after = int(np.searchsorted(in_ram.coords["time"], np.datetime64("2015-10-01")))
    values = in_ram.values.clone()
    values[first_after:] = values[first_after:] * 7 + 3
    future = in_ram.with_values(values, mask=in_ram.mask)
    a = Windows(_write_panel(in_ram, tmp_path / "orig"), labels, 10, label_reach=2, segments=segments)
    b = Windows(_write_panel(future, tmp_path / "perturbed"), labels, 10, label_reach=2, segments=segments)
    assert torch.equal(a.normaliser.center, b.normaliser.center) and torch.equal(a.normaliser.scale, b.normaliser.scale)
    for x, y in zip(a.batches("train", batch_size=256), b.batches("train", batch_size=256)):
        assert torch.equal(x.x, y.x)
    vx, vy = next(a.batches("valid", shuffle=False)), next(b.batches("valid", shuffle=False))
    assert not torch.equal(vx.x, vy.x)  # the perturbation is real


def _write_panel(t: ft.StockTensor, path: Path) -> ft.StockTensor:
    """``t`` as an on-disk panel (one block)."""
    with ondisk.PanelWriter(path, t.coords["time"], t.coords["stock"], t.coords["feature"], np.float32,
                            {}) as w:
        w.write(t.values.permute(1, 0, 2).numpy(), t.mask.permute(1, 0, 2).numpy())
        w.commit()
    return ondisk.load(path)


def test_training_from_the_map_is_training_from_ram(feature_pair, one_torch_thread):
    in_ram, mapped, labels = feature_pair
    opts = dict(model="gru", hidden=8, layers=1, lookback=10, epochs=2, batch_size=256, seed=5,
                device="cpu")
    a, b = ft.train(in_ram, labels, **opts), ft.train(mapped, labels, **opts)
    keys = [k for k in a.history[0] if "loss" in k or k.endswith("ic")]
    assert keys
    assert [[r[k] for k in keys] for r in a.history] == [[r[k] for k in keys] for r in b.history]


def test_gather_from_the_map_refuses_positions_outside_it(feature_pair):
    """The map is read by a compiled kernel without bounds checks: a position outside the panel is one clear
    error (the in-RAM path's index_select raises too), never a read past the mapped file."""
    _, mapped, labels = feature_pair
    w = Windows(mapped, labels, 10, label_reach=2)
    T, N, _ = mapped.shape
    for bad in ([8], [N * T], [0, 10**12], [-5]):
        with pytest.raises(BadInputError, match="positions must lie in"):
            w.gather(torch.tensor(bad))
    assert w.gather(torch.tensor([9, N * T - 1])).shape == (2, 10, mapped.shape[2])


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping of this process that holds ``address`` (Linux /proc/self/smaps)."""
    flags, inside = [], False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == "VmFlags:":
            flags = line.split()[1:]
    return flags


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads Linux's /proc/self/smaps")
def test_windows_advise_the_map_for_random_reads(feature_pair, tmp_path):
    """Training reads windows at random: Windows advises the map MADV_RANDOM (the kernel's "rr" flag), so a
    page fault does not read the device's read-ahead (megabytes) around each window; the values read are
    the same."""
    in_ram, _, labels = feature_pair
    mapped = _write_panel(in_ram, tmp_path / "p")
    values, mask = ondisk.stock_major(mapped)
    assert "rr" not in _vm_flags(values.data_ptr())
    w = Windows(mapped, labels, 10, label_reach=2)
    assert "rr" in _vm_flags(values.data_ptr()) and "rr" in _vm_flags(mask.data_ptr())
    a = Windows(in_ram, labels, 10, label_reach=2)
    pos = w.positions["train"][:500]
    assert torch.equal(w.gather(pos), a.gather(pos))
    with pytest.raises(BadInputError, match="access pattern"):
        ondisk.advise(values, "backwards")
    assert ondisk.advise(values, "normal") and "rr" not in _vm_flags(values.data_ptr())
