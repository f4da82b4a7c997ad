"""Shared test fixtures. Real market data lives in ../shared/data (never copied into the project).

Tests that need it fail, never skip, when it is missing: set FINTENSOR_SHARED_DATA to point elsewhere.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

REPO = Path(__file__).resolve().parents[1]
pytest_plugins = ["yahoo_stub"]  # its fake_yahoo fixture: Yahoo's chart API answered from recorded shapes

# CI replays the same generated examples every run (a red CI must be reproducible); locally hypothesis
# keeps exploring new ones and replays any failure from its .hypothesis database.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


def shared_data_dir() -> Path:
    env = os.environ.get("FINTENSOR_SHARED_DATA")
    return Path(env) if env else (REPO.parent / "shared" / "data")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of the real data (see its PROVENANCE.md). Missing data is a failure, not a skip."""
    path = shared_data_dir()
    if not (path / "PROVENANCE.md").exists():
        pytest.fail(f"real market data not found at {path}: clone with ../shared/data beside the project "
                    "or set FINTENSOR_SHARED_DATA", pytrace=False)
    return path


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """No test ever touches the user's real cache: $FINTENSOR_HOME points into a temp dir."""
    monkeypatch.setenv("FINTENSOR_HOME", str(tmp_path_factory.mktemp("fintensor_home")))


@pytest.fixture
def store(tmp_path):
    """An empty store in a fresh temp dir."""
    from fintensor.store import Store

    return Store(tmp_path / "store")


# ======================================================= section: real-data store fixtures (sources)
# Session-scoped Stores built once (per xdist worker) by ft.import_csv from ../shared/data. Treat them as
# read-only: copy (shutil.copytree(store.root, tmp_path / "s")) before writing. Symbols are canonical:
# baostock sh.600030 -> 600030.SS, sz.000001 -> 000001.SZ; SH000001 (the SSE index) -> 000001.SS.
def _imported_store(tmp_path_factory, shared_data: Path, name: str, *imports):
    from fintensor.sources.files import import_csv
    from fintensor.store import Store

    store = Store(tmp_path_factory.mktemp(name))
    for pattern, options in imports:
        files = sorted(shared_data.glob(pattern))
        assert files, f"no files match {pattern} under {shared_data}"
        import_csv(files, store=store, **options)
    return store


def tree_digest(root) -> str:
    """SHA-256 over every file's relative path and bytes under ``root``: 'the store is unchanged' checks."""
    import hashlib

    h = hashlib.sha256()
    root = Path(root)
    for path in sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []:
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


@pytest.fixture(scope="session")
def store_digest():
    """``store_digest(store_or_path)`` -> a hash of the whole tree (equal before/after = untouched)."""
    return lambda store: tree_digest(store if isinstance(store, (str, os.PathLike)) else store.root)  # Path.root is "/"


@pytest.fixture(scope="session")
def us_daily_store(tmp_path_factory, shared_data):
    """The 30 sp500_5yr_yahoo stocks, 1d, 2012-12-06..2017-12-06 (adjustment "split" + adj_close).

    ABBV starts 2013-01-02 and PYPL 2015-07-06 (ragged panel). The last row, 2017-12-06, is a partial
    intraday snapshot in the source: end ranges at 2017-12-05 for clean data.
    """
    return _imported_store(tmp_path_factory, shared_data, "us_daily_store",
                           ("us_daily/sp500_5yr_yahoo/*_data.csv", {}))


@pytest.fixture(scope="session")
def cn_daily_store(tmp_path_factory, shared_data):
    """The 31 baostock panel A-shares, 1d, 2018-01-02..2020-08-24, forward-adjusted ("full" as of 2020-08-24).

    Suspended days are rows with trade_status 0 and volume 0 (600030.SS 2019-01-02..01-09); 002948.SZ lists
    on 2019-01-16, 300750.SZ on 2018-06-11; 000693.SZ ends 2019-07-08 (delisted), 000018.SZ 2020-01-06.
    """
    return _imported_store(tmp_path_factory, shared_data, "cn_daily_store",
                           ("cn_daily/baostock_qfq/panel_2018-01_2020-08/*.csv", {}))


@pytest.fixture(scope="session")
def cn_tick_store(tmp_path_factory, shared_data):
    """hikyuu A-share trade ticks (2019-02-01, 2019-02-11; 000001/2/4/5.SZ, 600000/600004.SS) and 1-minute
    bars (1m, 2018-12-03..2019-02-01, the same six plus the SSE index 000001.SS). Shares and CNY; time UTC.
    """
    hikyuu = "cn_intraday_tick/hikyuu/"
    return _imported_store(tmp_path_factory, shared_data, "cn_tick_store",
                           (hikyuu + "trans_tick_*.csv.gz", {}), (hikyuu + "time_1min_*.csv.gz", {}))


@pytest.fixture(scope="session")
def us_minute_store(tmp_path_factory, shared_data):
    """LEAN/AlgoSeek 1-minute trade bars of SPY, IBM, AIG, BAC for 2013-10-04..2013-10-11 (6 sessions),
    extended hours 04:00-20:00 New York (minutes without trades absent); raw dollars; time UTC.
    """
    lean = "lean_algoseek_us_equity/minute/"
    return _imported_store(tmp_path_factory, shared_data, "us_minute_store",
                           *((f"{lean}{sym}/201310*_trade.zip", {}) for sym in ("spy", "ibm", "aig", "bac")))
# ================================================================= end section: real-data fixtures


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread (and do not fight other processes for the cores)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
