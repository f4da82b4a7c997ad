"""fintensor.cluster: builds and features as Ray tasks over blocks of stocks equal the single-process
results bit for bit; a worker killed mid-block is retried; a block that always fails names its symbols
and caches nothing; the Ray Train launcher equals one process at the same global batch.

One local Ray cluster serves the whole file (start-up 4-9 s). Ray is required: CI installs the extra.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

import fintensor as ft
from fintensor import cluster
from fintensor.errors import BadInputError
from fintensor.tensor import StockTensor
from fintensor.trainer import read_checkpoint

OHLCV = ["open", "high", "low", "close", "volume"]
pytestmark = pytest.mark.xdist_group("ray")  # with --dist loadgroup: one xdist worker, one Ray cluster


@pytest.fixture(scope="session")
def ray_cluster():
    """ONE local cluster for the session (Ray's testing guide: share it across tests)."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def market_store(tmp_path_factory):
    """A synthetic market (listings, delistings, suspensions) of 14 stocks x 260 sessions in a store."""
    m = ft.synthetic.market(n_stocks=14, n_days=260, seed=5, listing_fraction=0.2, delisting_fraction=0.2)
    store = ft.Store(tmp_path_factory.mktemp("cluster") / "store")
    m.write(store)
    return m, store


def build_args(m, default_store, **extra):
    return {**dict(symbols=m.symbols, start=str(m.dates[0]), end=str(m.dates[-1]), fields=OHLCV,
                   store=str(default_store.root)), **extra}


def assert_identical(a: StockTensor, b: StockTensor, ignore=("cache",)):
    """Bit for bit: values (NaN where NaN), mask, dims, coords and meta."""
    assert a.dims == b.dims and a.values.dtype == b.values.dtype and a.shape == b.shape
    assert torch.equal(torch.isnan(a.values), torch.isnan(b.values))
    assert torch.equal(torch.nan_to_num(a.values, nan=0.0), torch.nan_to_num(b.values, nan=0.0))
    assert torch.equal(a.mask, b.mask)
    for d in a.dims:
        assert np.array_equal(a.coords[d], b.coords[d]), d
    strip = lambda meta: {k: v for k, v in meta.items() if k not in ignore}  # noqa: E731
    assert strip(a.meta) == strip(b.meta)


def test_ray_build_equals_the_single_process_build(ray_cluster, market_store):
    m, store = market_store
    args = build_args(m, store, cache=False)
    one = ft.build(**args)
    assert (~one.mask).any() and one.mask.any()  # the ragged panel really has gaps to reproduce
    for block_size in (1, 4, None):  # one symbol per task, uneven blocks, the automatic plan
        assert_identical(one, cluster.build(**args, block_size=block_size, progress=False), ignore=())
    filled = build_args(m, store, cache=False, fill=("ffill", 3), dtype=torch.float64)
    assert_identical(ft.build(**filled), cluster.build(**filled, block_size=5), ignore=())
    via_build = ft.build(**args, engine="ray", engine_options={"block_size": 3, "progress": False})
    assert_identical(one, via_build, ignore=())  # ft.build(engine="ray") is cluster.build



def test_ray_build_of_weekly_bars_equals_the_single_process_build(ray_cluster, market_store, tmp_path):
    import pandas as pd

    m, _ = market_store
    store = ft.Store(tmp_path / "weekly")
    for j, sym in enumerate(m.symbols[:7]):  # weekly bars: each week's last close, dated by its first session
        daily = pd.DataFrame({"date": pd.to_datetime(m.dates), "close": np.where(m.status[:, j] == 1, m.close[:, j],
                                                                                    np.nan)}).dropna()
        weeks = daily.groupby(daily["date"].dt.to_period("W")).agg(date=("date", "first"), close=("close", "last"))
        store.write_bars(sym, weeks.assign(date=weeks["date"].dt.date), interval="1wk", source="test")
    for options in (dict(), dict(label="end", fill="ffill")):
        args = build_args(m, store, cache=False, symbols=m.symbols[:7], fields=["close"], interval="1wk", adjust="raw",
                          **options)
        one = ft.build(**args)
        assert one.mask.any() and (~one.mask).any()
        assert_identical(one, cluster.build(**args, block_size=3), ignore=())


def test_ray_build_warns_what_ft_build_warns(ray_cluster, market_store):
    """Rows off the calendar are dropped the same way and reported once, by the driver."""
    m, store = market_store
    other = "XSHG" if m.calendar == "XNYS" else "XNYS"  # the market's rows on the other exchange's holidays
    args = build_args(m, store, cache=False, calendar=other)
    with pytest.warns(ft.BuildWarning) as one:
        want = ft.build(**args)
    with pytest.warns(ft.BuildWarning) as ray:
        got = cluster.build(**args, block_size=4)
    assert [str(w.message) for w in one] == [str(w.message) for w in ray] and "dropped" in str(one[0].message)
    assert_identical(want, got, ignore=())


def test_ray_features_equal_the_single_process_features(ray_cluster, market_store):
    m, store = market_store
    panel = ft.build(**build_args(m, store, cache=False))
    one = ft.features.compute(panel, "alpha158")
    assert one.shape[-1] == 157 and one.mask.any()  # no vwap in the store: VWAP0 is left out
    from_store = cluster.features(build_args(m, store), "alpha158", block_size=4, progress=False)
    assert_identical(one, from_store, ignore=())
    from_tensor = cluster.features(panel, ["MA5", "CORR20", "KMID"], min_periods=3, block_size=6)
    assert_identical(ft.features.compute(panel, ["MA5", "CORR20", "KMID"], min_periods=3), from_tensor, ignore=())
    via_compute = ft.features.compute(panel, ["MA5", "KMID"], engine="ray", engine_options={"block_size": 5})
    assert_identical(ft.features.compute(panel, ["MA5", "KMID"]), via_compute, ignore=())


def test_the_assembled_build_is_cached_under_ft_builds_key(ray_cluster, market_store, tmp_path):
    m, store = market_store
    import shutil

    shutil.copytree(store.root, tmp_path / "s")
    args = build_args(m, store, store=str(tmp_path / "s"))
    ray_built = cluster.build(**args, block_size=5)
    entries = list((tmp_path / "s" / "tensors").glob("*.safetensors"))
    assert [str(p) for p in entries] == [ray_built.meta["cache"]]
    loaded = ft.build(**args)  # ft.build loads the Ray build's entry
    assert loaded.meta["cache_hit"] and not ray_built.meta["cache_hit"]
    assert_identical(ray_built, loaded, ignore=("cache_hit",))
    assert ft.build(**args).meta["cache"] == ray_built.meta["cache"]


def test_a_worker_killed_mid_block_is_retried_and_the_result_is_identical(ray_cluster, market_store, tmp_path,
                                                                          monkeypatch):
    m, store = market_store
    marker = tmp_path / "crashed-once"
    monkeypatch.setenv(cluster.FAULT_ENV, f"crash-once:{marker}:{m.symbols[5]}")
    args = build_args(m, store, cache=False)
    retried = cluster.build(**args, block_size=4, retries=2)
    assert marker.exists()  # the block's first attempt really died (os._exit) before returning
    monkeypatch.delenv(cluster.FAULT_ENV)
    assert_identical(ft.build(**args), retried, ignore=())


@pytest.mark.parametrize("fault, cause", [("crash", "WorkerCrashedError"), ("raise", "injected failure")])
def test_a_block_that_always_fails_names_its_symbols_and_caches_nothing(ray_cluster, market_store, tmp_path,
                                                                        monkeypatch, store_digest, fault, cause):
    m, store = market_store
    import shutil

    shutil.copytree(store.root, tmp_path / "s")
    before = store_digest(tmp_path / "s")
    bad = m.symbols[9]
    monkeypatch.setenv(cluster.FAULT_ENV, f"{fault}:{bad}")
    with pytest.raises(cluster.ClusterError) as err:
        cluster.build(**build_args(m, store, store=str(tmp_path / "s")), block_size=4, retries=1)
    message = str(err.value)
    assert "block 3/4" in message and ", ".join(m.symbols[8:12]) in message and cause in message
    assert ("after 1 retries" in message) == (fault == "crash")  # a dead worker is retried, a bug is not
    assert "\n" not in message and err.value.exit_code == 1
    assert store_digest(tmp_path / "s") == before  # no tensor cache entry, nothing else written


def test_without_ray_engine_ray_says_how_to_install_it(market_store, monkeypatch):
    m, store = market_store
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    for call in (lambda: cluster.build(**build_args(m, store)), lambda: cluster.features(build_args(m, store)),
                 lambda: cluster.connect()):
        with pytest.raises(BadInputError, match=r"pip install 'fintensor\[ray\]'"):
            call()


@pytest.mark.parametrize("options, message", [
    (dict(block_size=0), "block_size"), (dict(retries=-1), "retries"), (dict(block_size=True), "block_size"),
    (dict(interval="1m"), "monthly bars"), (dict(fields=["close", "nope"]), "unknown field"),
    (dict(symbols=["NOPE"]), "no 1d bars"), (dict(calendar="data"), "name the exchange"),
    (dict(label="middle"), "label")])
def test_bad_input_is_refused_before_any_task_runs(market_store, monkeypatch, options, message):
    m, store = market_store
    monkeypatch.setitem(sys.modules, "ray", None)  # would fail differently if a cluster were reached
    with pytest.raises(BadInputError, match=message):
        cluster.build(**{**build_args(m, store), **options})


@pytest.mark.parametrize("call, message", [
    (lambda a: ft.build(**a, engine="spark"), "engine must be one of"),
    (lambda a: ft.build(**a, engine="ray", engine_options={"workers": 2}), "takes engine_options address"),
    (lambda a: ft.build(**a, engine_options={"address": "auto"}), "go with engine="),
    (lambda a: ft.build(**a, engine="ray", engine_options=["auto"]), "must be a dict"),
    (lambda a: ft.features.compute(a, "alpha158", engine="ray", out="/dev/null"), "feature panel"),
    (lambda a: ft.build(**a, engine="ray", interval="1m"), "daily, weekly or monthly")])
def test_bad_engine_arguments_are_refused_before_any_task_runs(market_store, monkeypatch, call, message):
    m, store = market_store
    monkeypatch.setitem(sys.modules, "ray", None)  # would fail differently if a cluster were reached
    with pytest.raises(BadInputError, match=message):
        call(build_args(m, store))


def test_blocks_are_sized_by_bytes_and_by_workers():
    syms = [f"S{i}" for i in range(10)]
    assert cluster.plan_blocks(syms, 100, 10, workers=2) == [syms[0:3], syms[3:6], syms[6:9], syms[9:]]
    assert cluster.plan_blocks(syms, 100, 10, block_size=4) == [syms[0:4], syms[4:8], syms[8:]]
    huge = cluster.TARGET_BLOCK_BYTES // (1000 * 4 * 2)  # two stocks' worth of (1000 x F) float32 per block
    assert [len(b) for b in cluster.plan_blocks(syms, 1000, huge, workers=1)] == [2] * 5


# ------------------------------------------------------------------------------------------ training
def test_ray_train_launcher_equals_one_process_with_the_same_global_batch(ray_cluster, tmp_path, monkeypatch):
    """Mirrors test_train's two-gloo-process torchrun test, with TorchTrainer(num_workers=2) instead."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    m = ft.synthetic.market(n_stocks=30, n_days=160, seed=7, signal=1.0)
    close = np.where(m.status == 1, m.close, np.nan)
    ret = np.full_like(close, np.nan)
    ret[1:] = np.log(close[1:] / close[:-1])
    fwd = np.full_like(close, np.nan)
    fwd[:-1] = close[1:] / close[:-1] - 1
    coords = {"time": m.dates, "stock": m.symbols}
    X = StockTensor(torch.tensor(ret[:, :, None], dtype=torch.float32), ("time", "stock", "feature"),
                    {**coords, "feature": ["ret"]})
    Y = StockTensor(torch.tensor(fwd, dtype=torch.float32), ("time", "stock"), coords, meta={"horizon": 1, "lag": 0})
    d = [str(x) for x in m.dates]
    options = dict(model="gru", hidden=8, layers=1, lookback=10, epochs=2, batch_size=64, missing="zero", lr=0.05,
                   device="cpu", progress=False,
                   segments={"train": (d[0], d[99]), "valid": (d[100], d[129]), "test": (d[130], d[-1])})
    ft.train(X, Y, **options, out=str(tmp_path / "one"))
    ray_ckpt = cluster.train(X, Y, num_workers=2, **options, out=str(tmp_path / "ray"))
    a = read_checkpoint(tmp_path / "one")
    assert (a.info["world_size"], ray_ckpt.info["world_size"]) == (1, 2)
    for name, value in a.group("model").items():
        torch.testing.assert_close(ray_ckpt.group("model")[name], value, rtol=1e-5, atol=1e-6)
    for x, y in zip(a.info["history"], ray_ckpt.info["history"], strict=True):
        assert y["train_loss"] == pytest.approx(x["train_loss"], rel=1e-5)
        assert y["valid_ic"] == pytest.approx(x["valid_ic"], abs=1e-5)


def test_cli_train_ray_runs_the_same_training_under_ray_train(ray_cluster, tmp_path, monkeypatch, capsys):
    """`fintensor train DATA --ray` (in-process: it joins this session's cluster) writes the same checkpoint
    as `fintensor train DATA` at the same global batch."""
    from fintensor import cli

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    m = ft.synthetic.market(n_stocks=20, n_days=120, seed=3, signal=1.0)
    close = np.where(m.status == 1, m.close, np.nan)
    X = StockTensor(torch.tensor(close[:, :, None], dtype=torch.float32), ("time", "stock", "feature"),
                    {"time": m.dates, "stock": m.symbols, "feature": ["close"]})
    data = X.save(tmp_path / "panel.safetensors")
    common = [str(data), "--features", "none", "--model", "linear", "--epochs", "2", "--batch-size", "64",
              "--lookback", "5", "--device", "cpu", "--quiet"]
    assert cli.main(["train", *common, "--out", str(tmp_path / "one")]) == 0
    assert cli.main(["train", *common, "--out", str(tmp_path / "ray"), "--ray", "--ray-workers", "2"]) == 0
    a, b = read_checkpoint(tmp_path / "one"), read_checkpoint(tmp_path / "ray")
    assert (a.info["world_size"], b.info["world_size"]) == (1, 2)
    for name, value in a.group("model").items():
        torch.testing.assert_close(b.group("model")[name], value, rtol=1e-5, atol=1e-6)
    assert cli.main(["train", *common, "--out", str(tmp_path / "bad"), "--ray", "--ray-workers", "0"]) == 2
    assert "--ray-workers must be" in capsys.readouterr().err


def test_cli_build_ray_writes_the_tensor_ft_build_writes(ray_cluster, market_store, tmp_path, capsys):
    """`fintensor build ... --ray` (joins this session's cluster) == `fintensor build ...`; ticks refused."""
    from fintensor import cli

    m, store = market_store
    flags = ["build", "--symbols", *m.symbols, "--start", str(m.dates[0]), "--end", str(m.dates[-1]),
             "--fields", *OHLCV, "--store", str(store.root), "--no-cache", "--quiet"]
    assert cli.main([*flags, "--out", str(tmp_path / "one.safetensors")]) == 0
    assert cli.main([*flags, "--out", str(tmp_path / "ray.safetensors"), "--ray"]) == 0
    assert_identical(ft.load(tmp_path / "one.safetensors"), ft.load(tmp_path / "ray.safetensors"), ignore=())
    capsys.readouterr()
    assert cli.main([*flags, "--out", str(tmp_path / "m.safetensors"), "--interval", "1m", "--ray"]) == 2
    assert "the CLI without --ray" in capsys.readouterr().err and not (tmp_path / "m.safetensors").exists()


def test_joining_a_cluster_that_is_not_there_is_one_line_and_writes_nothing(market_store, tmp_path, capsys,
                                                                           monkeypatch):
    """`--ray auto` with no running cluster: exit 1, one `error:` line naming the fix, no file. Ray finds this
    session's own cluster from any process, so "nothing running" is Ray's own error, raised by ray.init."""
    import ray

    from fintensor import cli

    def no_cluster(*args, **kwargs):
        raise ConnectionError("Could not find any running Ray instance. Please specify the one to connect to by "
                              "setting `--address` flag or `RAY_ADDRESS` environment variable.")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", no_cluster)
    m, store = market_store
    out = tmp_path / "t.safetensors"
    code = cli.main(["build", "--symbols", *m.symbols[:3], "--start", str(m.dates[0]), "--end", str(m.dates[-1]),
                     "--store", str(store.root), "--no-cache", "--out", str(out), "--ray", "auto"])
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: cannot join a Ray cluster at 'auto'")
    assert "ray start --head" in lines[0] and not out.exists()


def test_ray_data_reads_exactly_the_committed_rows_through_files(ray_cluster, shared_data, tmp_path):
    """Ray Data given Store.files() reads the committed rows; a glob of the folder would also read an orphan."""
    import pandas as pd

    store = ft.Store(tmp_path / "s")
    ft.import_csv([shared_data / "us_daily/sp500_5yr_yahoo" / f"{s}_data.csv" for s in ("AAPL", "MSFT")], store=store)
    part = next(store.partition_dir("MSFT").glob("part-*.parquet"))
    (part.parent / "part-0123456789abcdef.parquet").write_bytes(part.read_bytes())  # an interrupted write's leftover
    want = store.read(["AAPL", "MSFT"], as_pandas=True).sort_values(["symbol", "date"]).reset_index(drop=True)
    files = [str(p) for p in store.files(["AAPL", "MSFT"])]
    got = ray_cluster.data.read_parquet(files).to_pandas()  # hive partitioning by default
    got = got.sort_values(["symbol", "date"]).reset_index(drop=True)
    msft = int((want.symbol == "MSFT").sum())
    assert len(got) == len(want) and msft > 1000
    np.testing.assert_array_equal(got.symbol.astype(str), want.symbol)
    np.testing.assert_array_equal(pd.to_datetime(got.date).to_numpy(), pd.to_datetime(want.date).to_numpy())
    np.testing.assert_array_equal(got.close.to_numpy(), want.close.to_numpy())
    globbed = ray_cluster.data.read_parquet(str(store.partition_dir("MSFT"))).count()
    assert globbed == 2 * msft  # the folder alone: MSFT's rows twice, which is why files() exists


def test_ray_build_from_a_store_uri_equals_the_local_build(ray_cluster, market_store):
    """Workers get the URI (not the driver's mirror path) and each mirrors, verified, what its block reads."""
    m, store = market_store
    args = build_args(m, store, cache=False)
    remote = {**args, "store": store.root.resolve().as_uri()}  # file:///...: read through pyarrow's file system
    assert_identical(ft.build(**args), cluster.build(**remote, block_size=5), ignore=("store",))


def test_ray_features_into_the_on_disk_panel_equal_compute_out(ray_cluster, market_store, tmp_path):
    """engine="ray" with out=: blocks appended in stock order to the same panel files compute(out=) writes."""
    from fintensor import ondisk

    m, store = market_store
    panel = ft.build(**build_args(m, store, cache=False))
    want = ft.features.compute(panel, "alpha158", out=tmp_path / "one", memory="8MB")
    got = ft.features.compute(build_args(m, store), "alpha158", out=tmp_path / "ray", engine="ray",
                              engine_options={"block_size": 3})
    assert_identical(want, got, ignore=("panel",))  # meta["panel"]: each map's own path
    a, b = ondisk.read_manifest(tmp_path / "one"), ondisk.read_manifest(tmp_path / "ray")
    assert a["files"] == b["files"]  # the same bytes on disk (sha256 of values and mask)
    assert not [p for p in tmp_path.iterdir() if p.name not in ("one", "ray")]  # no temp directory left


def test_a_failed_block_leaves_no_on_disk_panel(ray_cluster, market_store, tmp_path, monkeypatch):
    m, store = market_store
    monkeypatch.setenv(cluster.FAULT_ENV, f"raise:{tmp_path / 'unused'}:{m.symbols[9]}")
    with pytest.raises(cluster.ClusterError, match="injected failure"):
        cluster.features(build_args(m, store), ["MA5"], out=tmp_path / "panel", block_size=4, retries=0)
    assert list(tmp_path.iterdir()) == []  # neither the panel nor its temp directory
