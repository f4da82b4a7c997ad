"""fintensor.data: windows by one gather, sample rules, normalisers, splits and batching."""
from __future__ import annotations

from statistics import NormalDist

import numpy as np
import pandas as pd
import pytest
import torch

from fintensor.data import (GATHER_GRAIN, Windows, average_rank, cs_rank_gauss, cs_zscore, resolve_segments,
                            split_dates)
from fintensor.errors import BadInputError
from fintensor.tensor import StockTensor

T, N, F = 60, 9, 3


def make_panel(seed=0, nan_share=0.03, T=T, N=N, F=F):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, N, F)) * np.array([1.0, 10.0, 0.1]) + np.array([0.0, 50.0, -3.0])
    x[rng.random((T, N, F)) < nan_share] = np.nan
    x[:7, 0, :] = np.nan  # stock 0 lists late
    y = rng.standard_normal((T, N))
    y[rng.random((T, N)) < nan_share] = np.nan
    times = pd.bdate_range("2021-01-04", periods=T).values.astype("datetime64[D]")
    stocks = [f"S{i:02d}" for i in range(N)]
    X = StockTensor(torch.tensor(x, dtype=torch.float32), ("time", "stock", "feature"),
                    {"time": times, "stock": stocks, "feature": ["a", "b", "c"]})
    Y = StockTensor(torch.tensor(y, dtype=torch.float32), ("time", "stock"), {"time": times, "stock": stocks})
    return X, Y


SEGMENTS = {"train": (None, "2021-02-12"), "valid": ("2021-02-15", "2021-03-05"), "test": ("2021-03-08", None)}


def raw_windows(**kw):
    X, Y = make_panel()
    opts = dict(segments=SEGMENTS, label_reach=2, feature_norm=None, label_norm=None)
    opts.update(kw)
    return X, Y, Windows(X, Y, 5, **opts)


def test_gather_returns_the_window_up_to_t_and_the_label_at_t():
    X, Y, w = raw_windows()
    x, y = X.values.numpy(), Y.values.numpy()
    for seg in ("train", "valid", "test"):
        pos = w.positions[seg]
        b = w.batch(pos)
        T_ = len(w.times)
        for p, xb, yb in zip(pos.tolist(), b.x.numpy(), b.y.numpy()):
            n, t = divmod(p, T_)
            np.testing.assert_array_equal(xb, x[t - 4:t + 1, n, :])
            assert yb == y[t, n]


def test_windows_share_the_panel_memory():
    _, _, w = raw_windows()
    assert w._windows.untyped_storage().data_ptr() == w.panel.untyped_storage().data_ptr()
    assert w.panel.numel() == N * T * F  # one panel, no window materialised


@pytest.mark.parametrize("missing", ["drop", "zero"])
def test_sample_rules_match_brute_force(missing):
    X, Y, w = raw_windows(missing=missing)
    x, y = X.values.numpy(), Y.values.numpy()
    L, reach = 5, 2
    segs = resolve_segments(w.times, SEGMENTS)
    for name, seg in segs.items():
        expected = []
        for t in range(seg.first, seg.last - reach + 1):
            for n in range(N):
                if t < L - 1 or not np.isfinite(y[t, n]):
                    continue
                window = x[t - L + 1:t + 1, n]
                ok = np.isfinite(window).all() if missing == "drop" else np.isfinite(x[t, n]).any()
                if ok:
                    expected.append(n * T + t)
        assert w.positions[name].tolist() == expected  # ordered by (t, stock)


def test_zero_fill_uses_the_training_mean():
    X, Y = make_panel()
    w = Windows(X, Y, 4, segments=SEGMENTS, label_reach=1, missing="zero", clip=None)
    x = X.values.numpy().astype(np.float64)
    train = resolve_segments(w.times, SEGMENTS)["train"]
    rows = x[train.first:train.last + 1].reshape(-1, F)
    mean, std = np.nanmean(rows, 0), np.nanstd(rows, 0)
    expected = np.nan_to_num((x - mean) / std, nan=0.0)
    pos = w.positions["test"]
    b = w.batch(pos)
    for p, xb in zip(pos.tolist(), b.x.numpy()):
        n, t = divmod(p, T)
        np.testing.assert_allclose(xb, expected[t - 3:t + 1, n], rtol=1e-5, atol=1e-5)


def test_robust_normaliser_is_fitted_on_the_training_rows_only():
    X, Y = make_panel()
    w = Windows(X, Y, 4, segments=SEGMENTS, label_reach=1, feature_norm="robust", clip=3.0)
    train = resolve_segments(w.times, SEGMENTS)["train"]
    rows = X.values.numpy()[train.first:train.last + 1].reshape(-1, F).astype(np.float64)
    med = np.nanmedian(rows, 0)
    mad = np.nanmedian(np.abs(rows - med), 0) * 1.4826
    np.testing.assert_allclose(w.normaliser.center.numpy(), med, rtol=1e-6)
    np.testing.assert_allclose(w.normaliser.scale.numpy(), mad, rtol=1e-5)
    assert float(w.panel.abs().max()) <= 3.0


def test_cross_sectional_maps_match_pandas():
    rng = np.random.default_rng(3)
    x = np.round(rng.standard_normal((12, 15)), 1)  # ties
    x[rng.random(x.shape) < 0.2] = np.nan
    x[0, 1:] = np.nan  # one value: maps to 0
    df = pd.DataFrame(x)
    ranks = average_rank(torch.tensor(x)).numpy()
    np.testing.assert_array_equal(ranks, df.rank(axis=1).to_numpy())
    z = cs_zscore(torch.tensor(x)).numpy()
    ref = df.sub(df.mean(axis=1), axis=0).div(df.std(axis=1), axis=0).to_numpy(copy=True)
    ref[0, 0] = 0.0
    np.testing.assert_allclose(z, ref, rtol=1e-12, atol=1e-15, equal_nan=True)
    g = cs_rank_gauss(torch.tensor(x)).numpy()
    n = df.notna().sum(axis=1).to_numpy()[:, None]
    inv = np.vectorize(lambda u: NormalDist().inv_cdf(u) if np.isfinite(u) else np.nan)
    np.testing.assert_allclose(g, inv((df.rank(axis=1).to_numpy() - 0.5) / n), atol=1e-9, equal_nan=True)


def test_cs_norm_and_label_norm_are_per_day():
    X, Y = make_panel(nan_share=0.0)
    w = Windows(X, Y, 3, segments=SEGMENTS, label_reach=1, cs_norm="zscore", feature_norm=None,
                label_norm="rank")
    x = X.values.numpy().astype(np.float64)
    for t in (10, 40):
        day = pd.DataFrame(x[t])
        np.testing.assert_allclose(w.panel[:, t].numpy(), ((day - day.mean()) / day.std()).to_numpy(), atol=1e-5)
    y = Y.values.numpy()
    labels = w.labels.reshape(N, T).numpy()
    ranks = pd.DataFrame(y).rank(axis=1).to_numpy()
    inv = np.vectorize(lambda u: NormalDist().inv_cdf(u))
    np.testing.assert_allclose(labels[:, 10], inv((ranks[10] - 0.5) / N), atol=1e-5)
    np.testing.assert_array_equal(w.raw_labels.reshape(N, T).numpy(), y.T)  # evaluation keeps the raw label


def test_segments_leave_a_gap_of_the_label_reach():
    X, Y = make_panel()
    for reach in (1, 2, 5):
        w = Windows(X, Y, 5, segments=SEGMENTS, label_reach=reach, feature_norm=None)
        segs = resolve_segments(w.times, SEGMENTS)
        t_train = w.positions["train"] % T
        t_valid = w.positions["valid"] % T
        assert int(t_train.max()) + reach <= segs["train"].last  # every train label inside train
        assert int(t_valid.min()) >= segs["valid"].first
        assert int(t_valid.min()) - int(t_train.max()) >= reach + 1


def test_split_fractions_are_consecutive_and_disjoint():
    times = pd.bdate_range("2020-01-01", periods=100).values.astype("datetime64[D]")
    segs = resolve_segments(times, (0.6, 0.2, 0.2))
    assert [(s.first, s.last) for s in segs.values()] == [(0, 59), (60, 79), (80, 99)]
    assert split_dates(times)["train"] == (str(times[0]), str(times[59]))


def test_random_batches_cover_each_sample_once_and_depend_only_on_seed_and_epoch():
    _, _, w = raw_windows()
    pos = w.positions["train"]
    seen = torch.cat([b.positions for b in w.batches("train", batch_size=7, seed=1, epoch=0)])
    assert sorted(seen.tolist()) == sorted(pos.tolist())
    again = torch.cat([b.positions for b in w.batches("train", batch_size=7, seed=1, epoch=0)])
    other = torch.cat([b.positions for b in w.batches("train", batch_size=7, seed=1, epoch=1)])
    assert torch.equal(seen, again) and not torch.equal(seen, other)


def test_day_batches_hold_whole_days():
    _, _, w = raw_windows()
    pos = w.positions["train"]
    by_day = pd.Series(pos.tolist()).groupby(pos.numpy() % T).apply(sorted).to_dict()
    for b in w.batches("train", mode="day", days_per_batch=3, seed=2):
        days = (b.positions % T).numpy()
        assert b.n_groups == len(set(days)) <= 3
        for g in range(b.n_groups):
            members = b.positions[b.group == g].numpy()
            assert len(set(members % T)) == 1
            assert sorted(members.tolist()) == by_day[int(members[0] % T)]


@pytest.mark.parametrize("mode", ["random", "day"])
@pytest.mark.parametrize("world", [2, 3])
def test_ranks_share_out_each_global_batch(mode, world):
    _, _, w = raw_windows()
    opts = dict(batch_size=10, mode=mode, days_per_batch=4, seed=5, epoch=3)
    single = list(w.batches("train", **opts))
    shards = [list(w.batches("train", rank=r, world=world, **opts)) for r in range(world)]
    assert all(len(s) == len(single) for s in shards)
    for i, whole in enumerate(single):
        parts = [s[i] for s in shards]
        assert torch.equal(torch.cat([p.positions for p in parts]), whole.positions)
        assert all(p.global_samples == whole.global_samples for p in parts)


# ------------------------------------------------------------------------------------- bad input
def test_lookback_longer_than_history():
    X, Y = make_panel()
    with pytest.raises(BadInputError, match="lookback 61 is longer than the 60 time steps"):
        Windows(X, Y, 61, segments=SEGMENTS, label_reach=1)


def test_horizon_that_leaves_no_samples():
    X, Y = make_panel()
    with pytest.raises(BadInputError, match="segment 'valid'.*no usable sample.*15 step"):
        Windows(X, Y, 5, segments=SEGMENTS, label_reach=15)


@pytest.mark.parametrize("segments, message", [
    ({"train": ("2021-01-04", "2021-02-20"), "valid": ("2021-02-15", "2021-03-05")}, "overlap"),
    ({"train": ("2021-01-04", "2021-02-12"), "test": ("2022-01-01", "2022-02-01")}, "contains no date"),
    ({"valid": ("2021-01-04", "2021-02-12")}, "need a 'train' segment"),
    ({"train": ("2021-01-04", "yesterday-ish")}, "cannot read"),
    ((0.9, 0.2), "summing to <= 1"),
])
def test_bad_segments(segments, message):
    X, Y = make_panel()
    with pytest.raises(BadInputError, match=message):
        Windows(X, Y, 5, segments=segments, label_reach=1)


def test_nan_only_feature_is_named():
    X, Y = make_panel()
    X.values[:, :, 1] = float("nan")
    with pytest.raises(BadInputError, match="feature 'b' has no observed value in the training segment"):
        Windows(X, Y, 5, segments=SEGMENTS, label_reach=1)


def test_mismatched_inputs():
    X, Y = make_panel()
    with pytest.raises(BadInputError, match="dims"):
        Windows(Y, Y, 5, label_reach=1)
    other = StockTensor(Y.values, Y.dims, {"time": Y.coords["time"], "stock": [f"X{i}" for i in range(N)]})
    with pytest.raises(BadInputError, match="different time or stock"):
        Windows(X, other, 5, label_reach=1)
    with pytest.raises(BadInputError, match="unknown missing 'fill'"):
        Windows(X, Y, 5, missing="fill")


# ------------------------------------------------------------------------------------- fast paths
def test_whole_day_batches_are_views_of_the_panel_and_equal_the_windows():
    X, Y = make_panel(nan_share=0.0)
    Y.values[20, 4] = float("nan")  # day 20 lacks stock 4: its samples are not consecutive stocks
    w = Windows(X, Y, 5, segments=SEGMENTS, label_reach=1, missing="zero", feature_norm=None, label_norm=None)
    x, y = X.values.nan_to_num().numpy(), Y.values.numpy()
    views = copies = 0
    for world, days_per_batch in ((1, 1), (1, 3), (2, 2)):
        for rank in range(world):
            for b in w.batches("train", mode="day", days_per_batch=days_per_batch, seed=4, rank=rank, world=world):
                if not len(b.positions):  # the last global batch left this rank without a day
                    continue
                n, t = (b.positions // T).numpy(), (b.positions % T).numpy()
                np.testing.assert_array_equal(b.x.numpy(), np.stack([x[s - 4:s + 1, k] for k, s in zip(n, t)]))
                np.testing.assert_array_equal(b.raw.numpy(), y[t, n])
                shared = b.x.untyped_storage().data_ptr() == w.panel.untyped_storage().data_ptr()
                assert shared == (len(set(t)) == 1 and t[0] != 20)  # one whole day: nothing copied
                views, copies = views + shared, copies + (not shared)
    assert views > 20 and copies > 5


def test_bfloat16_panel_holds_the_float32_windows_rounded():
    X, Y = make_panel()
    opts = dict(segments=SEGMENTS, label_reach=1, missing="zero")
    full, half = Windows(X, Y, 5, **opts), Windows(X, Y, 5, panel_dtype="bfloat16", **opts)
    assert half.panel.element_size() == 2 and torch.equal(half.normaliser.center, full.normaliser.center)
    for mode in ("random", "day"):
        for a, b in zip(full.batches("train", mode=mode), half.batches("train", mode=mode), strict=True):
            assert b.x.dtype == torch.float32 and torch.equal(a.positions, b.positions)
            assert torch.equal(b.x, a.x.bfloat16().float())
    with pytest.raises(BadInputError, match="unknown panel_dtype 'float16'"):
        Windows(X, Y, 5, panel_dtype="float16", **opts)


def test_a_cpu_gather_takes_one_thread_per_grain_and_restores_the_count(monkeypatch):
    _, _, w = raw_windows()
    seen = []
    real = torch.index_select

    def spy(*args, **kw):
        seen.append(torch.get_num_threads())
        return real(*args, **kw)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(torch, "index_select", spy)
        small = w.positions["train"][:20]
        large = small.repeat(GATHER_GRAIN // (5 * F * 4) + 1)  # a little over one grain of windows
        for pos in (small, large):
            np.testing.assert_array_equal(w.gather(pos).numpy(), real(w._windows, 0, pos - 4).view(-1, 5, F).numpy())
        assert seen == [1, 2] and torch.get_num_threads() == 2
        monkeypatch.setattr(torch, "index_select", lambda *a, **k: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            w.gather(small)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
