"""`fintensor demo` end to end: the synthetic market and the real A-share panel (with real ticks), through the
CLI as a user runs it. Values are checked against their sources: the generator and the vendors' CSV files."""
from __future__ import annotations

import json
import math
import re
import struct

import pandas as pd
import pytest

import fintensor as ft
from fintensor.cli import main
from fintensor.demo import FIGURE_PIXELS, FIGURES, QUICK_SYNTHETIC

PANEL = "cn_daily/baostock_qfq/panel_2018-01_2020-08"
TICKS = "cn_intraday_tick/hikyuu"


def png_size(path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def assert_figures(out) -> None:
    for name in FIGURES:
        path = out / f"{name}.png"
        assert path.stat().st_size > 10_000, f"{path} is (nearly) empty"
        assert png_size(path) == FIGURE_PIXELS, name


def test_demo_on_the_synthetic_market(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["demo", "--quick", "--epochs", "1", "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert_figures(out)
    for stage in ("store", "tensors", "features", "windows", "train", "evaluate", "figures"):
        assert re.search(rf"^\s+{stage}: \d+\.\d s$", printed, re.M), f"no timing for {stage}"

    # the printed 0D value is the generator's own close, digit for digit
    value, symbol, day = re.search(r"0D .*\.item\(\) = (\S+)\s+<- close of (\S+) on (\S+)", printed).groups()
    market = ft.synthetic.market(seed=0, **QUICK_SYNTHETIC)
    assert float(value) == market.panel("close").loc[day, symbol]
    assert "synthetic market: its own" in printed  # it says the symbols are stand-ins

    table = dict(re.findall(r"^\s+(IC|ICIR|Rank IC|Rank ICIR|long-short|annualised|Sharpe|turnover)\s+(\S+)",
                            printed, re.M))
    assert len(table) == 8 and all(math.isfinite(float(v)) for v in table.values()), table
    # the store went inside --out: the user's cache ($FINTENSOR_HOME) was never touched
    assert ft.Store(out / "store").symbols() == market.symbols
    assert not any(ft.Store().root.rglob("*.parquet"))

    # another seed, the same --out: a different market under the same SYN names replaces the stored one
    assert main(["demo", "--quick", "--epochs", "1", "--out", str(out), "--device", "cpu", "--seed", "1"]) == 0
    assert "replaced the synthetic market" in capsys.readouterr().out
    assert ft.Store(out / "store").read("SYN0001.SS", columns=["close"])["close"].to_pylist() == \
        ft.synthetic.market(seed=1, **QUICK_SYNTHETIC).daily.query("symbol == 'SYN0001.SS'")["close"].tolist()


def test_demo_on_the_a_share_panel_with_real_ticks(shared_data, tmp_path, capsys):
    out, store = tmp_path / "out", tmp_path / "store"
    code = main(["demo", "--from", str(shared_data / PANEL), "--from", str(shared_data / TICKS), "--quick",
                 "--epochs", "1", "--out", str(out), "--store", str(store), "--device", "cpu", "--json"])
    report = json.loads(capsys.readouterr().out)  # --json: nothing else on stdout
    assert code == 0 and report["ok"]
    assert_figures(out)
    assert [s["name"] for s in report["stages"]] == ["store", "tensors", "features", "windows", "train",
                                                    "evaluate", "figures"]
    assert all(s["ok"] and s["seconds"] >= 0 for s in report["stages"])

    story = report["story"]
    assert (story["stock"], story["other"], story["date"]) == ("000001.SZ", "600519.SS", "2019-01-03")
    csv = pd.read_csv(shared_data / PANEL / "000001.SZ.csv", dtype={"date": str})
    assert story["close"] == csv.loc[csv["date"] == story["date"], "close"].item()

    # 4D from the real hikyuu ticks: volume (lots -> shares) and the last price by 10:00:03 (CNY x 1000)
    assert (story["ticks_source"], story["ticks_stock"], story["ticks_day"]) == ("real", "000001.SZ", "2019-02-01")
    ticks = pd.read_csv(shared_data / TICKS / "trans_tick_2019-02-01_2019-02-11.csv.gz", dtype={"datetime": str})
    day = ticks[(ticks["symbol"] == "000001.SZ") & ticks["datetime"].str.startswith("20190201")]
    assert story["tick_volume"] == day["vol"].sum() * 100
    assert story["tick_price"] == pytest.approx(day.loc[day["datetime"] < "20190201100003", "price"].iloc[-1] / 1000)

    assert all(math.isfinite(v) for v in report["metrics"].values()), report["metrics"]
    assert report["metrics"]["days"] > 100
    assert not (out / "store").exists() and ft.Store(store).symbols()  # --store: the store went there


def test_a_failing_stage_says_which_and_exits_1(tmp_path, capsys):
    folder = tmp_path / "one_stock"
    folder.mkdir()
    (folder / "AAPL.csv").write_text("Date,Open,High,Low,Close,Adj Close,Volume\n"
                                     "2017-01-03,115.8,116.33,114.76,116.15,112.36,28781900\n"
                                     "2017-01-04,115.85,116.51,115.75,116.02,112.23,21118100\n")
    assert main(["demo", "--from", str(folder), "--out", str(tmp_path / "out"), "--quiet"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == ("error: the demo failed in stage 'tensors': the data has one symbol on XNYS (AAPL); "
                            "the demo needs at least two\n")


def test_bad_arguments_exit_2_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["demo", "--from", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert main(["demo", "--epochs", "0", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no such file or folder" in err and "epochs must be an integer >= 1" in err and "Traceback" not in err
    assert not out.exists()


def test_a_tick_offset_taken_from_the_coords_selects_its_slot():
    # np.timedelta64 subclasses np.integer: it was refused as "a number" (fixed in tensor._to_timedelta64)
    days = ["2019-02-01", "2019-02-11"]
    store = ft.Store(ft.Store().root / "ticks")
    ft.synthetic.ticks(["600000.SS"], days=days, freq="1min", seed=1).write_ticks(store)
    t4 = ft.build_ticks("600000.SS", *days, freq="1min", store=store)
    label = t4.coords["tick"][30]
    assert t4.sel(tick=label).shape == t4.sel(tick="00:30:00").shape == (2, 1, 2)
    price = t4.sel(tick=label, day=days[1], stock="600000.SS", feature="price").item()
    assert price == t4.isel(tick=30, day=1, stock=0, feature=0).item()
