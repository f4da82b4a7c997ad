"""Builds that keep every stored row or say which were dropped and why (#12), on small files written in
the shapes vendors serve (Yahoo daily/monthly/hourly CSVs, a plain OHLCV file, a crypto file with weekends),
and the build command's handling of bad targets and recipes (#11)."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import fintensor as ft
from fintensor import calendars
from fintensor.builder import BuildWarning
from fintensor.cli import main
from fintensor.errors import BadInputError
from fintensor.recipes import load_recipe

RAW = dict(adjust="raw", cache=False)


def _ohlcv(path: Path, dates, close, date_name="date", extra=None) -> Path:
    frame = pd.DataFrame({date_name: dates, "open": close, "high": close + 1, "low": close - 1, "close": close,
                          "volume": np.arange(len(close)) + 1000.0, **(extra or {})})
    frame.to_csv(path, index=False)
    return path


def _accounted(tensor, sym):
    rows = tensor.meta["rows"][sym]
    assert rows["kept"] + rows["outside_range"] + sum(rows["dropped"].values()) == rows["stored"]
    return rows


@pytest.fixture(scope="module")
def files_store(tmp_path_factory):
    """IBM 1986-1991 (before the calendar library's default 1990 start), bare-ticker BTCUSD and BTC-USD with
    weekend rows, SPY monthly bars stamped on the 1st, SPY hourly bars as Yahoo serves XNYS 60m."""
    root = tmp_path_factory.mktemp("files")
    store = root / "store"
    ibm = calendars.sessions("XNYS", "1986-01-01", "1991-01-31")
    _ohlcv(root / "IBM.csv", pd.DatetimeIndex(ibm).strftime("%Y-%m-%d"), 100 + np.arange(len(ibm)) * 0.01)
    every_day = pd.date_range("2024-01-01", "2024-03-31")
    for name in ("BTCUSD", "BTC-USD"):
        _ohlcv(root / f"{name}.csv", every_day.strftime("%Y-%m-%d"), np.linspace(40000, 50000, len(every_day)))
    months = pd.date_range("2015-01-01", "2019-12-01", freq="MS")
    _ohlcv(root / "spy_monthly.csv", months.strftime("%Y-%m-%d"), np.arange(len(months)) + 10.0)
    hours = [pd.Timestamp(f"{d} {h}:30", tz="America/New_York") for d in calendars.sessions("XNYS", "2024-01-02",
             "2024-01-05") for h in ("09", "10", "11", "12", "13", "14", "15")]
    _ohlcv(root / "spy_60m.csv", [t.isoformat(sep=" ") for t in hours], np.arange(len(hours)) + 100.0,
           date_name="Datetime")
    for f in ("IBM.csv", "BTCUSD.csv"):
        ft.import_csv(root / f, store=store)
    ft.import_csv(root / "BTC-USD.csv", store=store, symbol="BTC-USD")
    ft.import_csv(root / "spy_monthly.csv", store=store, symbol="SPY", interval="1mo")
    ft.import_csv(root / "spy_60m.csv", store=store, symbol="SPY", interval="60m")
    return ft.Store(store), ibm, hours


def test_history_before_1990_is_built_not_cut(files_store):
    store, ibm, _ = files_store
    t = ft.build("IBM", "1986-01-01", "1991-01-31", store=store, **RAW)
    np.testing.assert_array_equal(t.coords["time"], ibm)             # from 1986-01-02, not 1990-12-19
    assert _accounted(t, "IBM") == {"stored": len(ibm), "kept": len(ibm), "outside_range": 0, "dropped": {}}
    np.testing.assert_allclose(t.numpy().ravel(), 100 + np.arange(len(ibm)) * 0.01, rtol=1e-6)
    with pytest.raises(BadInputError, match=r"XSHG calendar cannot reach back to 1986.*calendar='data'"):
        ft.build("IBM", "1986-01-01", "1991-01-31", store=store, calendar="XSHG", **RAW)


def test_rows_off_the_calendar_are_kept_or_reported(files_store):
    store = files_store[0]
    weekends = int((pd.date_range("2024-01-01", "2024-03-31").day_of_week >= 5).sum())
    with pytest.warns(BuildWarning) as caught:
        on_ny = ft.build("BTCUSD", "2024-01-01", "2024-03-31", store=store, **RAW)   # a bare ticker: XNYS
    off = calendars.sessions("XNYS", "2024-01-01", "2024-03-31")
    dropped = 91 - len(off)
    assert dropped >= weekends
    assert [str(w.message) for w in caught] == [
        f"dropped {dropped} stored rows (BTCUSD {dropped}): dated on days that are not XNYS sessions (keep them "
        "with calendar='data' (CLI: --calendar data) or calendar='24/7' (CLI: --calendar 24/7), or choose another "
        "exchange)"]
    assert _accounted(on_ny, "BTCUSD")["kept"] == len(off)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BuildWarning)                      # nothing dropped: no warning
        for sym, calendar in (("BTCUSD", "24/7"), ("BTCUSD", "data"), ("BTC-USD", None)):
            t = ft.build(sym, "2024-01-01", "2024-03-31", store=store, calendar=calendar, **RAW)
            assert len(t) == 91 and _accounted(t, sym)["kept"] == 91 and bool(t.mask.all()), (sym, calendar)
        data = ft.build("BTCUSD", "2024-01-06", "2024-01-07", store=store, calendar="data", **RAW)
    np.testing.assert_array_equal(data.coords["time"], np.array(["2024-01-06", "2024-01-07"], "datetime64[D]"))


def test_cli_says_what_it_dropped_and_in_flags(files_store, tmp_path, capsys):
    store = files_store[0]
    argv = ["build", "--symbols", "BTCUSD", "--start", "2024-01-01", "--end", "2024-03-31", "--adjust", "raw",
            "--store", str(store.root), "--no-cache", "--out", str(tmp_path / "b.safetensors")]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert err == f"warning: dropped {91 - len(calendars.sessions('XNYS', '2024-01-01', '2024-03-31'))} stored " \
        "rows (BTCUSD ...): dated on days that are not XNYS sessions (keep them with --calendar data or " \
        "--calendar 24/7, or choose another exchange)\n".replace("...", str(91 - len(calendars.sessions(
            "XNYS", "2024-01-01", "2024-03-31"))))
    assert main(argv + ["--json"]) == 0
    out = capsys.readouterr().out
    import json

    summary = json.loads(out)
    assert len(summary["warnings"]) == 1 and "--calendar data" in summary["warnings"][0]
    assert summary["meta"]["rows"]["BTCUSD"]["stored"] == 91
    assert main(argv[:-3] + ["--calendar", "24/7", "--no-cache", "--out", str(tmp_path / "c.safetensors")]) == 0
    assert "warning" not in capsys.readouterr().err


def test_weekly_and_monthly_bars_build_with_stated_labels(files_store):
    store = files_store[0]
    t = ft.build("SPY", "2016-01-01", "2016-12-31", interval="1mo", store=store, **RAW)
    np.testing.assert_array_equal(t.coords["time"], pd.date_range("2016-01-01", periods=12, freq="MS")
                                  .to_numpy().astype("datetime64[D]"))
    np.testing.assert_array_equal(t.numpy().ravel(), np.arange(12) + 22.0)          # 2016-01 is month 12
    assert t.meta["labels"] == "each month is labelled by its first day"
    assert _accounted(t, "SPY") == {"stored": 60, "kept": 12, "outside_range": 48, "dropped": {}}
    end = ft.build("SPY", "2016-01-01", "2016-12-31", interval="1mo", label="end", store=store, **RAW)
    assert end.coords["time"][1] == np.datetime64("2016-02-29") and end.meta["labels"].endswith("last day")
    np.testing.assert_array_equal(end.numpy(), t.numpy())
    np.testing.assert_array_equal(t.sel(time="2016-03").numpy().ravel(), [24.0])


def test_weekly_bars_stamped_monday_or_friday_land_on_their_week(tmp_path):
    """Yahoo stamps a week by its Monday, others by its last trading day: both are the same week."""
    mondays = pd.date_range("2024-01-01", "2024-03-25", freq="W-MON")
    store = tmp_path / "s"
    _ohlcv(tmp_path / "mon.csv", mondays.strftime("%Y-%m-%d"), np.arange(len(mondays)) + 1.0)
    _ohlcv(tmp_path / "fri.csv", (mondays + pd.Timedelta(days=4)).strftime("%Y-%m-%d"), np.arange(len(mondays)) + 1.0)
    ft.import_csv(tmp_path / "mon.csv", store=store, symbol="SPY", interval="1wk")
    ft.import_csv(tmp_path / "fri.csv", store=store, symbol="QQQ", interval="1wk")
    with warnings.catch_warnings():
        warnings.simplefilter("error", BuildWarning)
        t = ft.build(["SPY", "QQQ"], "2024-01-01", "2024-03-31", interval="1wk", store=store, **RAW)
    np.testing.assert_array_equal(t.coords["time"], mondays.to_numpy().astype("datetime64[D]"))
    np.testing.assert_array_equal(t.numpy()[:, 0, 0], np.arange(len(mondays)) + 1.0)
    np.testing.assert_array_equal(t.numpy()[:, 1, 0], t.numpy()[:, 0, 0])
    assert _accounted(t, "QQQ")["kept"] == len(mondays)
    ends = ft.build("SPY", "2024-01-01", "2024-03-31", interval="1wk", label="end", store=store, **RAW)
    assert ends.coords["time"][0] == np.datetime64("2024-01-07")                # the Sunday ending the week


def test_hourly_xnys_bars_end_in_a_30_minute_bar(files_store):
    store, _, hours = files_store
    t = ft.build("SPY", "2024-01-02", "2024-01-05", interval="60m", fields=["close", "volume"], store=store,
                 **RAW)
    expected = pd.DatetimeIndex(hours).tz_convert("UTC").tz_localize(None).to_numpy()
    np.testing.assert_array_equal(t.coords["time"], expected)                     # 7 a day, last 15:30 NY
    np.testing.assert_array_equal(t.sel(feature="close").numpy().ravel(), np.arange(len(hours)) + 100.0)
    assert len(t.sel(time="2024-01-03")) == 7                                     # a day selects its bars


def test_a_range_with_no_data_warns_and_the_cli_exits_1(files_store, tmp_path, capsys):
    store = files_store[0]
    with pytest.warns(BuildWarning, match="nothing observed"):
        t = ft.build("IBM", "2005-01-03", "2005-01-31", store=store, **RAW)
    assert not t.mask.any() and _accounted(t, "IBM")["kept"] == 0
    rc = main(["build", "--symbols", "IBM", "--start", "2005-01-03", "--end", "2005-01-31", "--adjust", "raw",
               "--store", str(store.root), "-q"])
    assert rc == 1 and "error: nothing at all is observed" in capsys.readouterr().err


def test_a_yahoo_file_and_a_plain_file_build_together_as_stored(tmp_path, capsys):
    days = pd.DatetimeIndex(calendars.sessions("XNYS", "2024-01-02", "2024-01-31"))
    close = np.linspace(180, 190, len(days))
    yahoo = pd.DataFrame({"Date": days.strftime("%Y-%m-%d"), "Open": close, "High": close, "Low": close,
                          "Close": close, "Adj Close": close * 0.98, "Volume": 1000})
    yahoo.to_csv(tmp_path / "AAPL.csv", index=False)
    _ohlcv(tmp_path / "MSFT.csv", days.strftime("%Y-%m-%d"), close + 200)
    store = tmp_path / "s"
    ft.import_csv([tmp_path / "AAPL.csv", tmp_path / "MSFT.csv"], store=store)
    for adjust in ("full", "split", "raw"):
        with pytest.raises(BadInputError, match=r"adjust='as_stored' \(CLI: --adjust as_stored\)"):
            ft.build(["AAPL", "MSFT"], "2024-01-02", "2024-01-31", store=store, adjust=adjust, cache=False)
    both = ft.build(["AAPL", "MSFT"], "2024-01-02", "2024-01-31", store=store, adjust="as_stored", cache=False)
    np.testing.assert_allclose(both.sel(stock="AAPL", feature="close").numpy(), close, rtol=1e-6)
    np.testing.assert_allclose(both.sel(stock="MSFT", feature="close").numpy(), close + 200, rtol=1e-6)
    assert both.meta["adjusted_from"] == {"AAPL": "as stored (split)", "MSFT": "as stored (raw)"}
    rc = main(["build", "--symbols", "AAPL", "MSFT", "--start", "2024-01-02", "--end", "2024-01-31",
               "--store", str(store)])
    err = capsys.readouterr().err
    assert rc == 2 and "--adjust as_stored" in err and "adjust=" not in err and err.count("\n") == 1


# ----------------------------------------------------------------- build targets and recipes (#11)
@pytest.mark.parametrize("make, message", [
    (lambda p: os.mkfifo(p), "is not a regular file"),
    (lambda p: p.symlink_to(p.parent / "elsewhere.safetensors"), "symbolic link"),
    (lambda p: None, "is 242 bytes long"),
])
def test_build_out_targets_that_are_not_ours_are_refused(cn_daily_store, tmp_path, capsys, make, message):
    out = tmp_path / ("x" * 230 + ".safetensors" if "242" in message else "t.safetensors")
    make(out)
    rc = main(["build", "--symbols", "000001.SZ", "--start", "2019-01-01", "--end", "2019-01-31",
               "--store", str(cn_daily_store.root), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "elsewhere.safetensors").exists()


def test_build_out_dev_null_is_refused(cn_daily_store, capsys):
    before = os.stat("/dev/null")
    rc = main(["build", "--symbols", "000001.SZ", "--start", "2019-01-01", "--end", "2019-01-31",
               "--store", str(cn_daily_store.root), "--out", "/dev/null"])
    assert rc == 2 and "not a regular file" in capsys.readouterr().err
    assert os.stat("/dev/null").st_ino == before.st_ino


def test_recipes_that_are_not_regular_small_files_are_one_error(tmp_path):
    os.mkfifo(tmp_path / "fifo.toml")
    for path in ("/dev/zero", tmp_path / "fifo.toml"):                # neither hangs nor reads forever
        with pytest.raises(BadInputError, match="is not a regular file"):
            load_recipe(path)
    big = tmp_path / "big.toml"
    big.write_text('description = "' + "x" * (1 << 20) + '"\n')
    with pytest.raises(BadInputError, match="more than the 1,048,576 allowed"):
        load_recipe(big)
    deep = tmp_path / "deep.toml"
    deep.write_text("a = " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(BadInputError, match="nests arrays or tables too deeply"):
        load_recipe(deep)


def test_huge_fill_limits_are_handled(cn_daily_store):
    args = ("000001.SZ", "2019-01-01", "2019-03-31")
    unlimited = ft.build(*args, store=cn_daily_store, fill="ffill", cache=False)
    huge = ft.build(*args, store=cn_daily_store, fill=("ffill", 10**12), cache=False)
    np.testing.assert_array_equal(huge.numpy(), unlimited.numpy())
    for bad in (0, -3, 2.5, True):
        with pytest.raises(BadInputError, match="fill limit must be"):
            ft.build(*args, store=cn_daily_store, fill=("ffill", bad), cache=False)


def test_a_damaged_cache_entry_is_rebuilt_and_said(cn_daily_store, tmp_path):
    import shutil

    store = tmp_path / "s"
    shutil.copytree(cn_daily_store.root, store)
    first = ft.build("000001.SZ", "2019-01-01", "2019-01-31", store=store)
    path = Path(first.meta["cache"])
    data = bytearray(path.read_bytes())
    data[40] ^= 0x04                                                     # inside the JSON header
    path.write_bytes(bytes(data))
    with pytest.warns(BuildWarning, match="could not be used .* rebuilt it from the store"):
        again = ft.build("000001.SZ", "2019-01-01", "2019-01-31", store=store)
    np.testing.assert_array_equal(again.numpy(), first.numpy())
    np.testing.assert_array_equal(again.coords["time"], first.coords["time"])


def test_the_tensor_cache_never_follows_a_link_out_of_the_store(cn_daily_store, tmp_path):
    import shutil

    store = tmp_path / "s"
    shutil.copytree(cn_daily_store.root, store)
    args = ("000001.SZ", "2019-01-01", "2019-01-31")
    first = ft.build(*args, store=store)
    entry = Path(first.meta["cache"])
    outside = tmp_path / "outside.safetensors"
    entry.rename(outside)
    entry.symlink_to(outside)                                            # an entry pointing out of the store
    with pytest.warns(BuildWarning, match="is a symbolic link; the tensor cache does not follow links"):
        again = ft.build(*args, store=store)
    assert "cache" not in again.meta and entry.is_symlink()
    np.testing.assert_array_equal(again.numpy(), first.numpy())
    shutil.rmtree(store / "tensors")
    (tmp_path / "elsewhere").mkdir()
    (store / "tensors").symlink_to(tmp_path / "elsewhere")               # the whole cache folder a link
    with pytest.warns(BuildWarning, match="is a symbolic link"):
        ft.build(*args, store=store)
    assert list((tmp_path / "elsewhere").iterdir()) == []
