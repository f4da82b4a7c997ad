"""The training API is the whole surface: checkpoints that record their features and carry a checksum,
``ft.predict(run, raw_panel)``, ``ft.evaluate(..., segment=)``, settings checked before any work, and a
CLI that only parses and prints (no warnings on a CPU run, one error line for bad input or a bad file)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fintensor as ft
from fintensor.checkpoint import CHECKPOINT, checksum, read_checkpoint
from fintensor.cli import main as cli_main
from fintensor.errors import BadInputError, StoreCorruptError
from fintensor.tensor import StockTensor
from fintensor.trainer import TrainConfig

REPO = Path(__file__).resolve().parents[1]
OHLCV = ("open", "high", "low", "close", "volume")
SPEC = ["KMID", "MA5", "ROC10", "STD5"]   # a few Alpha158 features: quick to compute on every run
TINY = dict(model="gru", hidden=4, layers=1, lookback=5, epochs=2, batch_size=256, missing="zero", device="cpu",
            progress=False)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def ohlcv_panel(n_stocks: int = 12, n_days: int = 120, seed: int = 11) -> StockTensor:
    """A raw (time, stock, feature) OHLCV panel of the synthetic market (NaN where a stock did not trade)."""
    m = ft.synthetic.market(n_stocks=n_stocks, n_days=n_days, seed=seed, signal=1.0)
    traded = m.status == 1
    values = np.stack([np.where(traded, getattr(m, f), np.nan) for f in OHLCV], axis=-1)
    return StockTensor(torch.tensor(values, dtype=torch.float32), ("time", "stock", "feature"),
                       {"time": m.dates, "stock": m.symbols, "feature": list(OHLCV)}, meta={"source": "synthetic"})


def segments_of(panel: StockTensor) -> dict:
    d = [str(x) for x in panel.coords["time"]]
    return {"train": (d[0], d[69]), "valid": (d[70], d[94]), "test": (d[95], d[-1])}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run trained through ft.train in Python on features computed from a raw panel."""
    root = tmp_path_factory.mktemp("trained")
    panel = ohlcv_panel()
    features = ft.features.compute(panel, SPEC)
    labels = ft.features.forward_returns(panel, horizon=1, lag=1)
    result = ft.train(features, labels, out=root / "run", segments=segments_of(panel), **TINY)
    return root, panel, features, labels, result


# ----------------------------------------------------------------------- the checkpoint records its features
def test_predict_on_the_raw_panel_computes_the_features_itself(trained):
    root, panel, features, labels, result = trained
    assert read_checkpoint(root / "run").info["feature_spec"]["names"] == SPEC
    on_features = ft.predict(root / "run", features, device="cpu")
    on_panel = ft.predict(root / "run", panel, device="cpu")
    assert on_features.mask.any()
    assert torch.equal(on_features.mask, on_panel.mask)
    assert torch.equal(on_features.values.nan_to_num(), on_panel.values.nan_to_num())
    assert torch.equal(result.predict(panel, device="cpu").values.nan_to_num(), on_panel.values.nan_to_num())


def test_cli_predict_scores_a_python_trained_run_on_a_raw_panel(trained, tmp_path, capsys):
    root, panel, features, labels, result = trained
    data, pred = panel.save(tmp_path / "raw.safetensors"), tmp_path / "pred.safetensors"
    assert cli_main(["predict", str(root / "run"), str(data), "--out", str(pred), "--device", "cpu", "--quiet"]) == 0
    expected = ft.predict(root / "run", features, device="cpu")
    scores = ft.load(pred)
    assert torch.equal(scores.values.nan_to_num(), expected.values.nan_to_num())
    assert cli_main(["evaluate", str(pred), "--data", str(data), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    start, end = result.segments["test"]
    assert (report["segment"], report["start"], report["end"]) == ("test", start, end)
    oracle = ft.evaluate(expected, labels, start=start, end=end).summary
    assert report["runs"][str(pred)]["ic"] == pytest.approx(oracle["ic"], rel=1e-9)
    assert report["runs"][str(pred)]["days"] == oracle["days"] and isinstance(report["runs"][str(pred)]["days"], int)


def test_a_panel_without_the_fields_is_refused_naming_both(trained):
    root, panel, features, labels, result = trained
    close_only = panel.isel(feature=[3])
    with pytest.raises(BadInputError, match="trained on 4 features.*cannot be computed from them"):
        ft.predict(root / "run", close_only, device="cpu")


def test_evaluate_selects_the_models_segment(trained):
    root, panel, features, labels, result = trained
    scores = result.predict(panel, device="cpu")
    assert set(result.segments) == {"train", "valid", "test"}
    for name, (start, end) in result.segments.items():
        ours = ft.evaluate(scores, labels, segment=name)
        by_dates = ft.evaluate(scores, labels, start=start, end=end)
        assert ours.meta == {"segment": name, "start": start, "end": end}
        assert ours.summary == pytest.approx(by_dates.summary, nan_ok=True)
    assert ft.evaluate(scores, labels, segment="auto").meta["segment"] == "test"
    everything = ft.evaluate(scores, labels)
    assert everything.meta["segment"] == "all" and everything.summary["days"] > ours.summary["days"]
    bare = StockTensor(scores.values, scores.dims, scores.coords, scores.mask)
    with pytest.raises(BadInputError, match="carry no 'test' segment"):
        ft.evaluate(bare, labels, segment="test")
    assert ft.evaluate(bare, labels, segment="auto").meta["segment"] == "all"


# ------------------------------------------------------------------------------------- checkpoint checksum
def test_bit_flips_anywhere_in_a_checkpoint_are_detected_or_harmless(trained, tmp_path):
    root, panel, features, labels, result = trained
    good = (root / "run" / CHECKPOINT).read_bytes()
    original = read_checkpoint(root / "run")
    header_end = 8 + int.from_bytes(good[:8], "little")
    rng = np.random.default_rng(0)
    # every byte of the length prefix and 200 of the JSON header, 200 of the tensors; one random bit each
    offsets = sorted({*range(8), *rng.choice(np.arange(8, header_end), 200, replace=False).tolist(),
                      *rng.choice(np.arange(header_end, len(good)), 200, replace=False).tolist()})
    damaged = tmp_path / CHECKPOINT
    detected = harmless = 0
    for offset in offsets:
        flipped = bytearray(good)
        flipped[offset] ^= 1 << int(rng.integers(8))
        damaged.write_bytes(bytes(flipped))
        try:
            loaded = read_checkpoint(damaged)
        except StoreCorruptError:
            detected += 1
            continue
        # read without an error: it must be exactly the checkpoint that was written
        assert loaded.info == original.info, offset
        assert loaded.tensors.keys() == original.tensors.keys(), offset
        for name, value in original.tensors.items():
            assert torch.equal(loaded.tensors[name], value), (offset, name)
        harmless += 1
    assert detected + harmless == len(offsets) and detected >= len(offsets) - 10, (detected, harmless)


def test_a_damaged_checkpoint_is_one_error_line_with_exit_1(trained, tmp_path, capsys):
    root, panel, features, labels, result = trained
    run = tmp_path / "run"
    run.mkdir()
    blob = bytearray((root / "run" / CHECKPOINT).read_bytes())
    blob[-5] ^= 0x10  # one bit of the last weights
    (run / CHECKPOINT).write_bytes(bytes(blob))
    data = panel.save(tmp_path / "raw.safetensors")
    capsys.readouterr()
    assert cli_main(["predict", str(run), str(data), "--out", str(tmp_path / "p.safetensors")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "checksum does not match" in err[0]
    assert not (tmp_path / "p.safetensors").exists()


def test_the_checksum_covers_names_dtypes_shapes_and_json():
    a = {"w": torch.zeros(2, 3)}
    base = checksum('{"x": 1}', a)
    assert checksum('{"x": 2}', a) != base
    assert checksum('{"x": 1}', {"v": torch.zeros(2, 3)}) != base
    assert checksum('{"x": 1}', {"w": torch.zeros(3, 2)}) != base
    assert checksum('{"x": 1}', {"w": torch.zeros(2, 3, dtype=torch.int32)}) != base
    assert checksum('{"x": 1}', {"w": torch.zeros(2, 3)}) == base


# ------------------------------------------------------------------------------ settings checked up front
@pytest.mark.parametrize("options, message", [
    ({"lr": float("inf")}, "lr must be a finite number"),
    ({"clip_grad": float("nan")}, "clip_grad must be a finite number"),
    ({"weight_decay": float("nan")}, "weight_decay must be a finite number"),
    ({"momentum": 5}, r"momentum must be in \[0, 1\)"),
    ({"seed": True}, "seed must be a non-negative integer, got True"),
    ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ({"lr": -0.1}, "lr must be > 0"),
    ({"clip": float("nan")}, "clip must be a finite number"),
    ({"min_lr_ratio": 2.0}, r"min_lr_ratio must be in \[0, 1\]"),
    ({"missing": "fill"}, "unknown missing 'fill'"),
])
def test_settings_that_would_make_a_nan_model_are_refused(options, message):
    with pytest.raises(BadInputError, match=message):
        TrainConfig(**options)


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real `fintensor` command in a fresh process (warnings shown as a user would see them)."""
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    return subprocess.run([sys.executable, "-m", "fintensor.cli", *args], capture_output=True, text=True,
                          cwd=REPO, env={**clean, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=300)


@pytest.mark.parametrize("flag, value", [("--lr", "inf"), ("--clip-grad", "nan"), ("--weight-decay", "nan"),
                                         ("--momentum", "5")])
def test_cli_refuses_nan_making_options_with_one_line(trained, tmp_path, capsys, flag, value):
    root, panel, features, labels, result = trained
    data = panel.save(tmp_path / "raw.safetensors")
    capsys.readouterr()
    code = cli_main(["train", str(data), "--out", str(tmp_path / "r"), "--features", "none", "--device", "cpu",
                     "--quiet", flag, value])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"error: {flag} must be {'in [0, 1)' if value == '5' else 'a finite number'}, "
                                 f"got {value}"], err
    assert not (tmp_path / "r").exists()


def test_cli_train_on_a_tensor_without_the_default_fields_suggests_the_option(trained, tmp_path, capsys):
    root, panel, features, labels, result = trained
    data = panel.isel(feature=[3]).save(tmp_path / "close.safetensors")
    capsys.readouterr()
    assert cli_main(["train", str(data), "--out", str(tmp_path / "r"), "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--features none" in err[0] and "open" in err[0], err


def test_cli_out_targets_that_are_not_regular_files_are_refused(trained, tmp_path, capsys):
    root, panel, features, labels, result = trained
    data = panel.save(tmp_path / "raw.safetensors")
    fifo, folder, link = tmp_path / "fifo", tmp_path / "folder", tmp_path / "link"
    os.mkfifo(fifo)
    folder.mkdir()
    (tmp_path / "target").write_text("keep me")
    link.symlink_to(tmp_path / "target")
    for out in (fifo, folder, link):
        capsys.readouterr()
        assert cli_main(["predict", str(root / "run"), str(data), "--out", str(out), "--device", "cpu"]) == 2, out
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: --out"), err
    assert fifo.is_fifo() and folder.is_dir() and link.is_symlink()
    assert (tmp_path / "target").read_text() == "keep me"
    run = tmp_path / "run"
    run.mkdir()
    (run / CHECKPOINT).symlink_to(tmp_path / "target")
    with pytest.raises(BadInputError, match="symbolic link"):
        ft.train(features, labels, out=run, segments=segments_of(panel), **TINY)
    assert (tmp_path / "target").read_text() == "keep me"


@pytest.mark.parametrize("options, message", [(["--periods-per-year", "-252"], "periods_per_year must be > 0"),
                                              (["--quantile", "0.7"], "quantile must be in")])
def test_cli_evaluate_refuses_bad_numbers(trained, tmp_path, capsys, options, message):
    root, panel, features, labels, result = trained
    pred = result.predict(panel, device="cpu").save(tmp_path / "pred.safetensors")
    data = panel.save(tmp_path / "raw.safetensors")
    capsys.readouterr()
    assert cli_main(["evaluate", str(pred), "--data", str(data), *options]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


# ------------------------------------------------------------------------------------------ plain output
def test_a_cpu_train_predict_evaluate_prints_no_warning(tmp_path):
    panel = ohlcv_panel(n_stocks=6, n_days=60)
    data = panel.save(tmp_path / "raw.safetensors")
    run, pred = tmp_path / "run", tmp_path / "pred.safetensors"
    train = cli("train", str(data), "--out", str(run), "--features", "none", "--model", "linear", "--lookback",
                "5", "--epochs", "1", "--device", "auto", env={"CUDA_VISIBLE_DEVICES": ""})
    assert train.returncode == 0 and train.stderr == "", train.stderr
    assert train.stdout.count("cpu (no CUDA GPU found)") == 1, train.stdout  # the device, said once
    predicted = cli("predict", str(run), str(data), "--out", str(pred), env={"CUDA_VISIBLE_DEVICES": ""})
    assert predicted.returncode == 0 and predicted.stderr == "", predicted.stderr
    evaluated = cli("evaluate", str(pred), "--data", str(data), env={"CUDA_VISIBLE_DEVICES": ""})
    assert evaluated.returncode == 0 and evaluated.stderr == "", evaluated.stderr
    # 6 stocks, quantile 0.2: one stock a side; the days row is a count
    days = [line for line in evaluated.stdout.splitlines() if line.startswith("days")]
    assert len(days) == 1 and days[0].split()[1].isdigit(), evaluated.stdout


def test_long_short_with_fewer_than_five_stocks_says_why_it_is_nan(trained, capsys, tmp_path):
    root, panel, features, labels, result = trained
    scores = result.predict(panel, device="cpu").isel(stock=[0, 1, 2, 3])
    report = ft.evaluate(scores, labels)
    assert np.isnan(report.summary["long_short"])
    assert len(report.notes) == 1 and "needs >= 5 stocks a day" in report.notes[0]
    assert report.notes[0] in report.table()
    assert ft.evaluate(scores, labels, quantile=0.5).notes == []  # 4 stocks: 2 a side
    assert ft.evaluate(result.predict(panel, device="cpu"), labels).notes == []
    pred = scores.save(tmp_path / "four.safetensors")
    for more in ([], [str(pred)]):
        assert cli_main(["evaluate", str(pred), *more, "--data", str(panel.save(tmp_path / "raw.safetensors")),
                         "--segment", "all"]) == 0
        out = capsys.readouterr().out
        assert "long_short is NaN" in out
        days = [line for line in out.splitlines() if line.startswith("days")]
        assert len(days) == 1 and ".0" not in days[0], days


# ------------------------------------------------------------------------------------------------ layout
@pytest.mark.parametrize("module, allowed", [
    ("config", {"checks", "errors"}),
    ("progress", {"fileio"}),
    ("checkpoint", {"config", "data", "errors", "fileio", "models", "tensor"}),
    ("metrics", {"checks", "data", "errors", "tensor"}),
    ("trainer", {"checkpoint", "config", "data", "errors", "features", "fileio", "metrics", "models", "progress",
                 "tensor"}),
])
def test_the_training_modules_import_only_below_themselves(module, allowed):
    """The loop sits on config, checkpoint and progress; none of them imports the loop or the CLI."""
    import ast

    tree = ast.parse((REPO / "fintensor" / f"{module}.py").read_text())
    imported = {node.module.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 1
                 and not node.module for alias in node.names}
    assert imported <= allowed, imported - allowed
