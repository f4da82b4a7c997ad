"""Training end to end on real panels (../shared/data) and through the CLI. No threshold on real IC —
real markets are noisy — but every run completes and its metrics are finite and equal the pandas
reference."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import fintensor as ft
from fintensor.cli import main as cli_main
from fintensor.errors import BadInputError
from fintensor.tensor import StockTensor
from metrics_reference import pandas_reference

OHLCV = ("open", "high", "low", "close", "volume")
TINY = dict(model="gru", hidden=8, layers=1, lookback=5, epochs=2, batch_size=512, optimizer="adam", lr=3e-3,
            device="cpu", progress=False)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def assert_matches_reference(scores, labels, start, end):
    ours = ft.evaluate(scores, labels, start=start, end=end)
    frame = lambda t: t.to_pandas().where(t.mask.numpy()).loc[start:end]  # noqa: E731
    ref = pandas_reference(frame(scores), frame(labels))
    for key, value in ours.summary.items():
        assert math.isfinite(value), key
        assert value == pytest.approx(ref[key], rel=1e-6, abs=1e-9), key
    return ours


def test_a_small_model_trains_on_the_a_share_panel(cn_daily_store):
    symbols = cn_daily_store.symbols()
    panel = ft.build(symbols, "2018-01-02", "2020-08-24", fields=OHLCV, store=cn_daily_store)
    features = ft.features.compute(panel, "alpha158")
    labels = ft.features.forward_returns(panel, horizon=1, lag=1)
    segments = {"train": ("2018-01-02", "2019-06-28"), "valid": ("2019-07-01", "2019-12-31"),
                "test": ("2020-01-02", "2020-08-24")}
    result = ft.train(features, labels, segments=segments, missing="zero", cs_norm="zscore",
                      feature_norm="robust", **TINY)
    assert len(result.history) == TINY["epochs"]
    assert all(math.isfinite(h["train_loss"]) and math.isfinite(h["valid_ic"]) for h in result.history)
    scores = result.predict(features, device="cpu")
    # the delisted 000693.SZ (last row 2019-07-08) and suspended 600030.SS are never scored when not trading
    traded = panel.sel(feature="close").mask
    assert not (scores.mask & ~traded).any()
    ours = assert_matches_reference(scores, labels, *segments["test"])
    assert ours.summary["ic"] == pytest.approx(result.metrics["test"]["ic"], abs=1e-5)


def test_cli_trains_predicts_and_evaluates_the_us_panel(us_daily_store, tmp_path, capsys):
    symbols = us_daily_store.symbols()
    assert len(symbols) == 30
    panel = ft.build(symbols, "2012-12-06", "2017-12-05", fields=OHLCV, store=us_daily_store)
    data = panel.save(tmp_path / "us.safetensors")
    run, pred = tmp_path / "run", tmp_path / "pred.safetensors"
    code = cli_main(["train", str(data), "--out", str(run), "--features", "alpha158", "--model", "gru",
                     "--hidden", "8", "--layers", "1", "--lookback", "5", "--epochs", "2", "--optimizer", "adam",
                     "--lr", "0.003", "--device", "cpu", "--train", "2013-01-01", "2015-12-31",
                     "--valid", "2016-01-01", "2016-12-30", "--test", "2017-01-03", "2017-12-05", "--json"])
    assert code == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["epochs"] == 2 and math.isfinite(trained["metrics"]["test"]["ic"])
    assert (run / "metrics.csv").read_text().count("\n") == 3
    assert cli_main(["predict", str(run), str(data), "--out", str(pred), "--device", "cpu", "--quiet"]) == 0
    assert cli_main(["evaluate", str(pred), "--data", str(data), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["segment"], report["start"], report["end"]) == ("test", "2017-01-03", "2017-12-05")
    scores = ft.load(pred)
    labels = ft.features.forward_returns(panel, horizon=1, lag=1)
    ours = assert_matches_reference(scores, labels, "2017-01-03", "2017-12-05")
    for key, value in report["runs"][str(pred)].items():
        assert value == pytest.approx(ours.summary[key], rel=1e-9), key
    assert ours.summary["ic"] == pytest.approx(trained["metrics"]["test"]["ic"], abs=1e-5)


def synthetic_ohlcv(tmp_path):
    m = ft.synthetic.market(n_stocks=25, n_days=200, seed=11, signal=1.0)
    traded = m.status == 1
    values = np.stack([np.where(traded, getattr(m, f), np.nan) for f in OHLCV], axis=-1)
    t = StockTensor(torch.tensor(values, dtype=torch.float32), ("time", "stock", "feature"),
                    {"time": m.dates, "stock": m.symbols, "feature": list(OHLCV)}, meta={"source": "synthetic"})
    return t, t.save(tmp_path / "syn.safetensors")


def test_evaluate_several_seeds_prints_mean_and_std(tmp_path, capsys):
    panel, data = synthetic_ohlcv(tmp_path)
    runs = []
    for seed in (0, 1):
        run = tmp_path / f"seed{seed}"
        assert cli_main(["train", str(data), "--out", str(run), "--features", "none", "--horizon", "1", "--lag",
                         "0", "--model", "linear", "--lookback", "10", "--epochs", "1", "--cs-norm", "zscore",
                         "--seed", str(seed), "--device", "cpu", "--quiet"]) == 0
        runs.append(str(run))
    assert cli_main(["evaluate", *runs, "--data", str(data), "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    assert "mean +- std" in table and table.count(" +- ") >= 12
    assert cli_main(["evaluate", *runs, "--data", str(data), "--device", "cpu", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["runs"]
    labels = ft.features.forward_returns(panel, horizon=1, lag=0)
    ics = []
    for run in runs:
        scores = ft.predict(run, panel, device="cpu")
        ics.append(ft.evaluate(scores, labels, start=scores.meta["segments"]["test"][0]).summary["ic"])
        assert report[run]["ic"] == pytest.approx(ics[-1], rel=1e-9)
    assert report["mean"]["ic"] == pytest.approx(np.mean(ics)) and report["std"]["ic"] == pytest.approx(
        np.std(ics, ddof=1))


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    panel, data = synthetic_ohlcv(tmp_path)
    common = [str(data), "--features", "none", "--device", "cpu", "--quiet"]
    cases = [
        (["train", *common, "--out", str(tmp_path / "r"), "--lookback", "999"], "lookback 999 is longer"),
        (["train", *common, "--out", str(tmp_path / "r"), "--horizon", "150"], "no usable sample"),
        (["train", *common, "--out", str(tmp_path / "r"), "--train", "2015-01-02", "2015-06-30", "--valid",
          "2015-06-01", "2015-08-31"], "overlap"),
        (["train", *common, "--out", str(tmp_path / "r"), "--device", "cuda:7"], "CUDA"),
        (["predict", str(tmp_path / "nothing"), str(data), "--out", str(tmp_path / "p.safetensors")],
         "no checkpoint at"),
        (["evaluate", str(data)], "pass --data FILE"),
    ]
    for argv, message in cases:
        if "cuda:7" in argv and torch.cuda.is_available():
            continue
        assert cli_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err
        assert err.count("\n") == 1
    assert not (tmp_path / "r").exists()  # a rejected run writes nothing


def test_predict_refuses_features_of_another_shape(tmp_path):
    panel, data = synthetic_ohlcv(tmp_path)
    result = ft.train(panel, ft.features.forward_returns(panel, horizon=1, lag=0), model="linear", lookback=5,
                      epochs=1, device="cpu", progress=False)
    with pytest.raises(BadInputError, match="trained on 5 features"):
        result.predict(panel.isel(feature=[0, 1, 2]), device="cpu")
