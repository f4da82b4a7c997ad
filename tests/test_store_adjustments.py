"""Several adjustments of one symbol side by side (issue 12) and the README's steps composing (issue 15).

Real A-share data: tushare_raw holds unadjusted prices (volume in lots of 100), baostock_qfq the same symbols
forward-adjusted (adjustflag 2, volume in shares). Oracle: the vendors' CSV files themselves.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import fintensor as ft
from fintensor.cli import main
from fintensor.errors import BadInputError, MissingDataError
from fintensor.store import Store

REPO = Path(__file__).resolve().parents[1]
TUSHARE = "cn_daily/tushare_raw"
BAOSTOCK = "cn_daily/baostock_qfq/panel_2018-01_2020-08"
SYMBOLS = ["000001.SZ", "000651.SZ", "600028.SH"]  # in both vendors' files


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(f"{p.relative_to(folder)}:".encode() + p.read_bytes())
    return h.hexdigest()


def _tushare(shared_data: Path, sym: str) -> pd.DataFrame:
    csv = pd.read_csv(shared_data / TUSHARE / f"{sym}.csv", dtype={"trade_date": str})
    return csv.set_index(pd.to_datetime(csv.trade_date, format="%Y%m%d"))


def _baostock(shared_data: Path, sym: str) -> pd.DataFrame:
    csv = pd.read_csv(shared_data / BAOSTOCK / f"{sym}.csv")
    return csv.set_index(pd.to_datetime(csv.date))


@pytest.fixture
def both(tmp_path, shared_data) -> Store:
    """One store holding the three symbols raw (tushare) and forward-adjusted (baostock), plus ticks."""
    store = Store(tmp_path / "store")
    ft.import_csv(shared_data / TUSHARE, store=store)
    ft.import_csv([shared_data / BAOSTOCK / f"{s}.csv" for s in SYMBOLS], store=store)
    ft.import_csv(shared_data / "cn_intraday_tick/hikyuu/trans_tick_2019-02-01_2019-02-11.csv.gz", store=store,
                  kind="ticks")
    return store


def test_raw_and_forward_adjusted_are_both_kept_and_each_builds_to_its_csv(both, shared_data):
    for s in SYMBOLS:
        assert both.adjustments(s) == ["full", "raw"]
        daily = {m["adjustment"]: m["source"] for m in both.info(s) if m["kind"] == "daily"}
        assert set(daily) == {"full", "raw"} and "baostock" in daily["full"] and "tushare" in daily["raw"]
    assert sorted((e["symbol"], e["adjustment"]) for e in both.list() if e["kind"] == "daily") == \
        sorted((s, a) for s in ("000001.SZ", "000651.SZ", "600028.SS") for a in ("full", "raw"))
    raw = ft.build(SYMBOLS, "2019-01-01", "2019-12-31", ["close", "volume"], store=both, adjust="raw")
    full = ft.build(SYMBOLS, "2019-01-01", "2019-12-31", ["close", "volume"], store=both, adjust="full")
    assert raw.meta["adjustment"] == "raw" and full.meta["adjustment"] == "full"
    for i, s in enumerate(SYMBOLS):
        ts, bs = _tushare(shared_data, s), _baostock(shared_data, s)
        days = pd.DatetimeIndex(raw.coords["time"])
        got = raw.values[:, i, :].numpy().astype(np.float64)
        held = days.isin(ts.index)
        assert held.sum() > 200
        np.testing.assert_allclose(got[held, 0], ts.close.reindex(days[held]).to_numpy(), rtol=1e-6)
        np.testing.assert_allclose(got[held, 1], ts.vol.reindex(days[held]).to_numpy() * 100, rtol=1e-6)  # lots
        got = full.values[:, i, :].numpy().astype(np.float64)
        traded = days.isin(bs.index[bs.tradestatus == 1])
        np.testing.assert_allclose(got[traded, 0], bs.close.reindex(days[traded]).to_numpy(), rtol=1e-6)
        np.testing.assert_allclose(got[traded, 1], bs.volume.reindex(days[traded]).to_numpy(), rtol=1e-6)
        assert not np.allclose(got[held & traded, 0], ts.close.reindex(days[held & traded]).to_numpy())
    # the reads and the engines' file lists pick one adjustment, or refuse to guess
    assert both.read("000001.SZ", "2019-01-02", "2019-01-02", adjust="raw", as_pandas=True).close.item() == \
        _tushare(shared_data, "000001.SZ").close.loc["2019-01-02"]
    for call in (lambda: both.read("000001.SZ"), lambda: both.files("000001.SZ"),
                 lambda: ft.build(SYMBOLS, "2019-01-01", "2019-12-31", store=both, adjust="as_stored")):
        with pytest.raises(BadInputError, match=r"several adjustments \(full, raw\).*--adjust full"):
            call()
    assert len(both.files(SYMBOLS, adjust="raw")) == len(both.files(SYMBOLS, adjust="full")) == 3


def test_cache_rm_of_one_adjustment_leaves_the_other_and_the_ticks_byte_identical(both, capsys):
    base = both.root / "bars" / "interval=1d" / "symbol=000001.SZ"
    keep = {"full": _digest(base / "adjust=full"), "ticks": _digest(both.root / "ticks"),
            "other": _digest(both.root / "bars" / "interval=1d" / "symbol=600028.SH")}
    assert main(["cache", "rm", "000001.SZ", "--interval", "1d", "--adjust", "raw", "--store", str(both.root)]) == 0
    assert "removed 1 partition(s) of 000001.SZ (raw-adjusted bars)" in capsys.readouterr().out
    assert not (base / "adjust=raw").exists() and both.adjustments("000001.SZ") == ["full"]
    assert keep == {"full": _digest(base / "adjust=full"), "ticks": _digest(both.root / "ticks"),
                    "other": _digest(both.root / "bars" / "interval=1d" / "symbol=600028.SH")}
    assert both.verify() == []
    with pytest.raises(MissingDataError, match=r"000001.SZ \(1d, raw-adjusted\) is not in the store"):
        both.remove("000001.SZ", "1d", adjust="raw")
    assert main(["cache", "rm", "000001.SZ", "--interval", "tick", "--adjust", "raw",
                 "--store", str(both.root)]) == 2  # ticks have no adjustment: refused, nothing removed
    assert keep["ticks"] == _digest(both.root / "ticks")
    assert main(["cache", "rm", "600028.SH", "--store", str(both.root)]) == 0  # no --interval: everything
    assert "removed 2 partition(s) of 600028.SH" in capsys.readouterr().out
    assert not (both.root / "bars" / "interval=1d" / "symbol=600028.SH").exists()


@pytest.mark.parametrize("recipe, n_symbols", [("story.toml", 2), ("cn_daily_panel.toml", 31)])
def test_readme_recipes_build_after_a_raw_import(recipe, n_symbols, shared_data, tmp_path, monkeypatch, capsys):
    """Issue 15: `fintensor import cn_daily/tushare_raw`, then the README's forward-adjusted recipes."""
    monkeypatch.setenv("FINTENSOR_DATA", str(shared_data))
    store, out = tmp_path / "store", tmp_path / "t.safetensors"
    assert main(["import", str(shared_data / TUSHARE), "--store", str(store)]) == 0
    raw_before = _digest(store / "bars" / "interval=1d" / "symbol=000001.SZ" / "adjust=raw")
    capsys.readouterr()
    assert main(["build", str(REPO / "datasets" / recipe), "--out", str(out), "--store", str(store)]) == 0, \
        capsys.readouterr().err
    st = ft.load(out)
    assert st.values.shape[1] == n_symbols and st.meta["adjustment"] == "full"
    bs = _baostock(shared_data, "000001.SZ")
    stock = [s for s in st.coords["stock"] if str(s).startswith("000001")][0]
    assert st.sel(time="2019-06-03", stock=stock, feature="close").item() == \
        pytest.approx(bs.close.loc["2019-06-03"], rel=1e-6)  # the baostock price, not tushare's raw one
    assert raw_before == _digest(store / "bars" / "interval=1d" / "symbol=000001.SZ" / "adjust=raw")
    assert main(["build", str(REPO / "datasets" / recipe), "--out", str(out), "--store", str(store)]) == 0


def test_intraday_slots_read_the_adjustment_asked_for(tmp_path):
    """1-minute bars of one symbol in two adjustments: slots read the one asked for, and refuse to guess."""
    store = Store(tmp_path / "store")
    times = pd.date_range("2019-06-03 13:30", periods=3, freq="1min", tz="UTC")  # 09:30-09:32 New York
    for adjust, scale in (("raw", 1.0), ("split", 0.25)):
        bars = pd.DataFrame({"time": times, "close": np.array([100.0, 101.0, 102.0]) * scale,
                             "volume": [10.0, 20.0, 30.0]})
        store.write_bars("AAPL", bars, interval="1m", source=f"vendor-{adjust}", adjust=adjust)
    assert store.adjustments("AAPL", "1m") == ["raw", "split"]
    for adjust, scale in (("raw", 1.0), ("split", 0.25)):
        st = ft.build_ticks("AAPL", "2019-06-03", "2019-06-03", freq="1min", fields=["close"], interval="1m",
                            store=store, adjust=adjust)
        np.testing.assert_allclose(st.values[0, :3, 0, 0].numpy(), np.array([100.0, 101.0, 102.0]) * scale)
        assert st.meta["adjustment"] == adjust and st.meta["source"] == f"vendor-{adjust}"
    with pytest.raises(BadInputError, match=r"several adjustments \(raw, split\).*--adjust raw"):
        ft.build_ticks("AAPL", "2019-06-03", "2019-06-03", freq="1min", interval="1m", store=store)


def test_an_interrupted_migrate_reads_the_moved_copy_and_the_next_migrate_finishes(tmp_path, shared_data):
    """migrate commits the partition under adjust= before it deletes the old-layout copy: a crash between
    leaves both; readers, list and files take the new one, verify points to migrate, migrate finishes."""
    store = Store(tmp_path / "store")
    ft.import_csv(shared_data / TUSHARE / "000001.SZ.csv", store=store)
    new = store.partition_dir("000001.SZ", adjust="raw")
    want = store.read("000001.SZ")
    for f in new.iterdir():  # the old-layout copy a crash after the commit would leave behind
        (new.parent / f.name).write_bytes(f.read_bytes())
    assert store.read("000001.SZ").equals(want) and len(store.list()) == 1
    assert store.files("000001.SZ") == [new / p["file"] for p in store.manifest("000001.SZ")["parts"]]
    assert [p.message for p in store.verify()] == [
        "stored in the layout of store format 2 (one adjustment per symbol); run `fintensor cache migrate` to "
        "move it under adjust="]
    assert store.migrate() == [] and store.verify() == []
    assert sorted(f.name for f in new.parent.iterdir()) == ["adjust=raw"]
    assert store.read("000001.SZ").equals(want)
