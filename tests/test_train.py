"""ft.train / ft.predict on the synthetic market with a planted signal: learning, no look-ahead, exact
resume, reproducibility, DDP, safe checkpoints and bad input."""
from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import fintensor as ft
from fintensor.cli import main as cli_main
from fintensor.data import Windows
from fintensor.errors import BadInputError, StoreCorruptError
from fintensor.tensor import StockTensor
from fintensor.trainer import (CHECKPOINT, METRICS_CSV, TrainConfig, grouped_pearson, lr_at, make_optimizer,
                               read_checkpoint)

REPO = Path(__file__).resolve().parents[1]


def tensors_from_close(close: np.ndarray, dates, symbols):
    """Features: the daily log return (NaN where not traded on both days); label: the next simple return
    close[t+1] / close[t] - 1 at t (horizon 1, lag 0)."""
    ret = np.full_like(close, np.nan)
    ret[1:] = np.log(close[1:] / close[:-1])
    fwd = np.full_like(close, np.nan)
    fwd[:-1] = close[1:] / close[:-1] - 1
    coords = {"time": dates, "stock": symbols}
    X = StockTensor(torch.tensor(ret[:, :, None], dtype=torch.float32), ("time", "stock", "feature"),
                    {**coords, "feature": ["ret"]})
    Y = StockTensor(torch.tensor(fwd, dtype=torch.float32), ("time", "stock"), coords,
                    meta={"horizon": 1, "lag": 0})
    return X, Y


def closes(market) -> np.ndarray:
    return np.where(market.status == 1, market.close, np.nan)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def segmented_market(n_stocks: int, n_days: int, seed: int, valid_from: int, test_from: int):
    """(market, features, labels, segments) of a planted-signal market split at day indices."""
    m = ft.synthetic.market(n_stocks=n_stocks, n_days=n_days, seed=seed, signal=1.0)
    d = [str(x) for x in m.dates]
    segments = {"train": (d[0], d[valid_from - 1]), "valid": (d[valid_from], d[test_from - 1]),
                "test": (d[test_from], d[-1])}
    return m, *tensors_from_close(closes(m), m.dates, m.symbols), segments


@pytest.fixture(scope="module")
def planted():
    """100 stocks x 700 days, signal 1 (oracle daily IC ~0.15): 400 train, 150 valid, 150 test days."""
    return segmented_market(100, 700, seed=1, valid_from=400, test_from=550)


@pytest.fixture(scope="module")
def small():
    """A small market for the mechanics tests: 30 stocks x 160 days."""
    return segmented_market(30, 160, seed=7, valid_from=100, test_from=130)


SMALL = dict(model="gru", hidden=8, layers=1, lookback=10, epochs=3, batch_size=128, missing="zero",
             device="cpu", progress=False)
PLANTED = dict(hidden=16, layers=1, lookback=20, epochs=8, batch_size=512, optimizer="adam", lr=1e-2,
               missing="zero", clip=None, patience=8, device="cpu", progress=False)


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------ planted signal
@pytest.mark.parametrize("model", ["lstm", "gru"])
def test_recurrent_models_learn_the_planted_signal(planted, model):
    market, X, Y, segments = planted
    result = ft.train(X, Y, model=model, segments=segments, **PLANTED)
    oracle = market.oracle_ic(*segments["test"])
    scores = result.predict(X, device="cpu")
    achieved = market.ic(scores.numpy(), *segments["test"])  # the synthetic market's own IC definition
    assert len(result.history) <= PLANTED["epochs"]
    assert achieved >= 0.8 * oracle, (achieved, oracle)
    assert result.metrics["test"]["ic"] == pytest.approx(achieved, abs=1e-4)  # the trainer's own metric agrees


def test_a_shuffled_label_teaches_nothing(planted):
    market, X, Y, segments = planted
    rng = np.random.default_rng(0)
    y = Y.values.numpy().copy()
    observed = np.isfinite(y)
    y[observed] = rng.permutation(y[observed])  # break every link between features and labels
    shuffled = StockTensor(torch.tensor(y), Y.dims, Y.coords, meta=Y.meta)
    result = ft.train(X, shuffled, model="gru", segments=segments, **{**PLANTED, "epochs": 3})
    test_ic = ft.evaluate(result.predict(X, device="cpu"), shuffled, start=segments["test"][0]).summary["ic"]
    assert abs(test_ic) < 0.02
    assert abs(result.metrics["test"]["ic"]) < 0.02


def test_ic_loss_with_day_batches_learns_the_signal(planted):
    market, X, Y, segments = planted
    result = ft.train(X, Y, model="linear", loss="ic", segments=segments, lookback=20, epochs=3,
                      optimizer="adam", lr=1e-2, clip=None, missing="zero", device="cpu", progress=False)
    assert result.config.batching == "day"
    assert result.metrics["test"]["ic"] >= 0.8 * market.oracle_ic(*segments["test"])


def test_schedule_optimizers_and_ic_loss_pieces():
    cfg = TrainConfig(lr=0.1, warmup_steps=10, min_lr_ratio=0.1)
    assert [lr_at(s, 110, cfg) for s in (0, 9, 10)] == pytest.approx([0.01, 0.1, 0.1])  # linear warmup
    assert lr_at(60, 110, cfg) == pytest.approx(0.055)  # cosine half way: (0.1 + 0.01) / 2
    assert lr_at(110, 110, cfg) == pytest.approx(0.01)
    assert lr_at(70, 100, TrainConfig(lr=0.1, schedule="constant")) == 0.1
    p = [torch.nn.Parameter(torch.zeros(2))]
    sgd = make_optimizer(TrainConfig(nesterov=True), p)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] and sgd.defaults["lr"] == 0.05
    assert isinstance(make_optimizer(TrainConfig(optimizer="adamw", weight_decay=0.01), p), torch.optim.AdamW)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal(30), rng.standard_normal(30)
    group = np.repeat([0, 1, 2], 10)
    ours = grouped_pearson(torch.tensor(x), torch.tensor(y), torch.tensor(group), 3).numpy()
    np.testing.assert_allclose(ours, [np.corrcoef(x[group == g], y[group == g])[0, 1] for g in range(3)], rtol=1e-6)


# ------------------------------------------------------------------------------------- look-ahead
@pytest.mark.parametrize("with_valid", [False, True])
def test_perturbing_the_future_changes_nothing_learned(small, with_valid):
    market, X, Y, segments = small
    segs = dict(segments) if with_valid else {"train": segments["train"], "test": segments["test"]}
    last_used = segs["valid" if with_valid else "train"][1]  # early stopping reads the valid segment
    cut = int(np.searchsorted(market.dates, np.datetime64(last_used))) + 1
    future = closes(market).copy()
    future[cut:] *= np.exp(np.random.default_rng(3).normal(0, 0.2, future[cut:].shape))
    X2, Y2 = tensors_from_close(future, market.dates, market.symbols)
    assert not torch.equal(X.values.nan_to_num(), X2.values.nan_to_num())
    opts = dict(SMALL, segments=segs, cs_norm="zscore", label_norm="rank", dropout=0.0)
    a, b = ft.train(X, Y, **opts), ft.train(X2, Y2, **opts)
    assert_same_weights(weights(a.model), weights(b.model))
    assert torch.equal(a.normaliser.center, b.normaliser.center)
    assert torch.equal(a.normaliser.scale, b.normaliser.scale)
    assert [h["train_loss"] for h in a.history] == [h["train_loss"] for h in b.history]
    wa, wb = (Windows(x, y, 10, segments=segs, label_reach=1, missing="zero", cs_norm="zscore",
                      label_norm="rank") for x, y in ((X, Y), (X2, Y2)))
    for epoch in range(SMALL["epochs"]):
        for ba, bb in zip(wa.batches("train", batch_size=128, epoch=epoch),
                          wb.batches("train", batch_size=128, epoch=epoch), strict=True):
            assert torch.equal(ba.positions, bb.positions)
            assert torch.equal(ba.x, bb.x) and torch.equal(ba.y, bb.y)
    pa, pb = a.predict(X, device="cpu"), b.predict(X2, device="cpu")
    assert torch.equal(pa.values[:cut].nan_to_num(), pb.values[:cut].nan_to_num())  # scores up to the cut too


# --------------------------------------------------------------------------- checkpoints and resume
def test_resume_equals_an_uninterrupted_run(small, tmp_path):
    market, X, Y, segments = small
    opts = dict(SMALL, segments=segments, epochs=4, dropout=0.3, layers=2, patience=10)
    whole = ft.train(X, Y, out=tmp_path / "whole", **opts)

    class Interrupted(Exception):
        pass

    def stop_after_two(row):
        if row["epoch"] == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        ft.train(X, Y, out=tmp_path / "cut", on_epoch_end=stop_after_two, **opts)
    assert read_checkpoint(tmp_path / "cut").info["state"]["epoch"] == 2
    resumed = ft.train(X, Y, out=tmp_path / "cut", resume=True, **opts)
    assert_same_weights(weights(whole.model), weights(resumed.model))
    assert [h["train_loss"] for h in whole.history] == [h["train_loss"] for h in resumed.history]
    assert resumed.metrics == whole.metrics
    a, b = read_checkpoint(tmp_path / "whole"), read_checkpoint(tmp_path / "cut")
    for name in a.tensors:
        assert torch.equal(a.tensors[name], b.tensors[name]), name  # best weights, optimizer state, normaliser too
    rows = (tmp_path / "cut" / METRICS_CSV).read_text().splitlines()
    assert len(rows) == 1 + 4 and rows[0].startswith("epoch,lr,train_loss")
    assert float(rows[-1].split(",")[2]) == pytest.approx(whole.history[-1]["train_loss"], rel=1e-12)


def test_seeded_cpu_runs_are_bit_identical(small):
    market, X, Y, segments = small
    opts = dict(SMALL, segments=segments, dropout=0.2, layers=2, epochs=2)
    a, b = ft.train(X, Y, seed=5, **opts), ft.train(X, Y, seed=5, **opts)
    assert_same_weights(weights(a.model), weights(b.model))
    c = ft.train(X, Y, seed=6, **opts)
    assert not torch.equal(weights(a.model)["rnn.weight_hh_l0"], weights(c.model)["rnn.weight_hh_l0"])


def test_predict_from_a_checkpoint_equals_the_trained_model(small, tmp_path):
    market, X, Y, segments = small
    result = ft.train(X, Y, out=tmp_path, segments=segments, **SMALL)
    direct = result.predict(X, device="cpu")
    loaded = ft.predict(tmp_path / CHECKPOINT, X, device="cpu")
    assert torch.equal(direct.values.nan_to_num(), loaded.values.nan_to_num())
    assert torch.equal(direct.mask, loaded.mask) and loaded.dims == ("time", "stock")
    # scored exactly where a window exists: the stock traded on day t (missing="zero")
    traded = torch.tensor(market.status == 1)
    traded[:SMALL["lookback"] - 1] = False
    assert torch.equal(loaded.mask, traded & X.mask[:, :, 0])
    header = (tmp_path / CHECKPOINT).read_bytes()[8:9]
    assert header == b"{"  # a safetensors JSON header, no pickle stream


def test_a_tampered_checkpoint_cannot_run_code(small, tmp_path):
    market, X, Y, segments = small
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / CHECKPOINT
    bad.write_bytes(pickle.dumps({"model": Exploit()}))
    torch.save({"model": Exploit()}, tmp_path / "torch_style.pt")
    for path in (bad, tmp_path / "torch_style.pt"):
        with pytest.raises(StoreCorruptError, match="not a readable fintensor checkpoint"):
            ft.predict(path, X, device="cpu")
    with pytest.raises(StoreCorruptError):
        ft.train(X, Y, out=tmp_path, resume=True, segments=segments, **SMALL)
    assert not marker.exists()


def test_checkpoint_for_another_model_or_feature_count(small, tmp_path):
    market, X, Y, segments = small
    ft.train(X, Y, out=tmp_path, segments=segments, **SMALL)
    two = StockTensor(torch.cat([X.values, X.values], dim=2), X.dims, {**X.coords, "feature": ["ret", "ret2"]})
    with pytest.raises(BadInputError, match="trained on 1 features.*these features are 2"):
        ft.predict(tmp_path, two, device="cpu")
    with pytest.raises(BadInputError, match="written for a gru on 1 features; this run changed model 'gru' -> 'lstm'"):
        ft.train(X, Y, out=tmp_path, resume=True, segments=segments, **{**SMALL, "model": "lstm"})
    with pytest.raises(BadInputError, match="this run changed lookback 10 -> 5"):
        ft.train(X, Y, out=tmp_path, resume=True, segments=segments, **{**SMALL, "lookback": 5})


def test_resuming_onto_other_features_names_the_checkpoint_before_building_windows(small, tmp_path, monkeypatch):
    market, X, Y, segments = small
    ft.train(X, Y, out=tmp_path, segments=segments, **SMALL)
    two = StockTensor(torch.cat([X.values, X.values], dim=2), X.dims, {**X.coords, "feature": ["ret", "ret2"]})

    def no_windows(*args, **kw):
        raise AssertionError("the windows were built before the checkpoint was checked")

    monkeypatch.setattr("fintensor.trainer.Windows", no_windows)
    message = (f"checkpoint {tmp_path / CHECKPOINT} was written for a gru on 1 features; "
               "this run changed features 1 -> 2 (added 'ret2')")
    with pytest.raises(BadInputError, match=re.escape(message)):
        ft.train(two, Y, out=tmp_path, resume=True, segments=segments, **SMALL)
    start, end = segments["valid"]
    shorter = {**segments, "valid": (start, start)}
    with pytest.raises(BadInputError, match=re.escape(
            f"changed lookback 10 -> 12, features 1 -> 2 (added 'ret2'), label horizon/lag 1/0 -> 2/0, "
            f"segment valid {start}..{end} -> {start}..{start}: use the same settings or another --out")):
        ft.train(two, Y, out=tmp_path, resume=True, segments=shorter, **{**SMALL, "lookback": 12, "horizon": 2})


def test_a_run_killed_mid_write_leaves_a_tmp_file_that_the_next_run_removes(small, tmp_path, monkeypatch):
    market, X, Y, segments = small
    opts = dict(SMALL, segments=segments, epochs=2, patience=10)
    writes = []
    real_replace = os.replace

    real_unlink = Path.unlink
    killed = []

    def killed_on_second_checkpoint(src, dst):  # what SIGKILL between the write and the rename leaves behind
        writes.append(Path(dst).name)
        if writes.count(CHECKPOINT) == 2:
            killed.append(src)
            raise KeyboardInterrupt
        real_replace(src, dst)

    def no_cleanup_after_the_kill(path, missing_ok=False):  # SIGKILL runs no `finally`: the temp file stays
        if str(path) not in map(str, killed):
            real_unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(os, "replace", killed_on_second_checkpoint)
    monkeypatch.setattr(Path, "unlink", no_cleanup_after_the_kill)
    with pytest.raises(KeyboardInterrupt):
        ft.train(X, Y, out=tmp_path, **opts)
    monkeypatch.setattr(os, "replace", real_replace)
    monkeypatch.setattr(Path, "unlink", real_unlink)
    (leftover,) = tmp_path.glob(f".{CHECKPOINT}.*.tmp")
    assert re.fullmatch(rf"\.{re.escape(CHECKPOINT)}\.[0-9a-f]{{32}}\.tmp", leftover.name)
    keep = [tmp_path / n for n in (".checkpoint.safetensors.mine.tmp", "notes.tmp", f"{leftover.name}.bak")]
    for path in keep:
        path.write_text("not ours to delete")
    assert read_checkpoint(tmp_path).info["state"]["epoch"] == 1
    resumed = ft.train(X, Y, out=tmp_path, resume=True, **opts)
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    assert not leftover.exists() and all(path.exists() for path in keep)
    assert not list(tmp_path.glob(f".{METRICS_CSV}.*.tmp"))


# ----------------------------------------------------------------------------------------------- DDP
def test_two_gloo_processes_equal_one_process_with_the_same_global_batch(small, tmp_path):
    market, X, Y, segments = small
    X.save(tmp_path / "x.safetensors")
    Y.save(tmp_path / "y.safetensors")
    args = ["train", str(tmp_path / "x.safetensors"), "--labels", str(tmp_path / "y.safetensors"),
            "--features", "none", "--horizon", "1", "--lag", "0", "--model", "gru", "--hidden", "8",
            "--layers", "1", "--lookback", "10", "--epochs", "2", "--batch-size", "64", "--missing", "zero",
            "--lr", "0.05", "--device", "cpu", "--quiet",
            "--train", *segments["train"], "--valid", *segments["valid"], "--test", *segments["test"]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "fintensor.cli", *args, "--out", str(tmp_path / "ddp")],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert cli_main([*args, "--out", str(tmp_path / "one")]) == 0
    a, b = read_checkpoint(tmp_path / "one"), read_checkpoint(tmp_path / "ddp")
    assert (a.info["world_size"], b.info["world_size"]) == (1, 2)
    for name, value in a.group("model").items():
        torch.testing.assert_close(b.group("model")[name], value, rtol=1e-5, atol=1e-6)
    for x, y in zip(a.info["history"], b.info["history"], strict=True):
        assert y["train_loss"] == pytest.approx(x["train_loss"], rel=1e-5)
        assert y["valid_ic"] == pytest.approx(x["valid_ic"], abs=1e-5)  # all-reduced over the ranks' days


# --------------------------------------------------------------------------------------- bad input
def test_cuda_request_without_a_gpu(small, monkeypatch):
    market, X, Y, segments = small
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BadInputError, match="'cuda' was requested but this machine has no usable CUDA GPU"):
        ft.train(X, Y, segments=segments, **{**SMALL, "device": "cuda"})
    with warnings.catch_warnings():  # device="auto" on a CPU machine is not a warning (the progress line says it)
        warnings.simplefilter("error")
        result = ft.train(X, Y, segments=segments, **{**SMALL, "device": "auto", "epochs": 1})
    assert next(result.model.parameters()).device.type == "cpu"


@pytest.mark.parametrize("options, message", [
    ({"lookback": 500}, "lookback 500 is longer than the 160 time steps"),
    ({"horizon": 40}, "segment 'valid' .* no usable sample: labels read 40 step"),
    ({"segments": {"train": ("2015-01-02", "2015-06-30"), "test": ("2015-06-01", None)}}, "overlap"),
    ({"segments": {"train": ("2015-01-02", "2015-03-31"), "valid": ("2030-01-01", None)}}, "contains no date"),
    ({"optimizer": "lbfgs"}, "unknown optimizer 'lbfgs'"),
    ({"loss": "ic", "batching": "random"}, "use batching='day'"),
    ({"model": "resnet"}, "unknown model 'resnet'"),
    ({"learning_rate": 0.1}, r"unknown training option\(s\) \['learning_rate'\]"),
])
def test_bad_training_input(small, options, message):
    market, X, Y, segments = small
    with pytest.raises(BadInputError, match=message):
        ft.train(X, Y, **{**SMALL, "segments": segments, **options})


def test_nan_only_feature_and_labels_without_horizon(small):
    market, X, Y, segments = small
    nan = StockTensor(torch.full_like(X.values, float("nan")), X.dims, X.coords)
    with pytest.raises(BadInputError, match="feature 'ret' has no observed value in the training segment"):
        ft.train(nan, Y, segments=segments, **SMALL)
    bare = StockTensor(Y.values, Y.dims, Y.coords)
    with pytest.raises(BadInputError, match="do not record their horizon and lag"):
        ft.train(X, bare, segments=segments, **SMALL)
