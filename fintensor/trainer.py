"""``ft.train`` and ``ft.predict``: one readable training loop for one CPU, one GPU, or many under torchrun.

The loop follows nanoGPT's train.py: the same code runs single-process and under
``torchrun --nproc_per_node=N`` (it sees RANK/WORLD_SIZE, joins the process group — NCCL on GPUs, gloo
on CPU — and wraps the model in DDP). Every rank draws the same global minibatch from (seed, epoch) and
takes a contiguous share; each local loss is scaled by world / global batch so the all-reduced gradient
equals one process's gradient on the whole global batch. Metrics are all-reduced; rank 0 writes files.

The settings live in ``config.py`` (TrainConfig), the checkpoint file format in ``checkpoint.py``, the
progress bar and metrics.csv in ``progress.py``; this module is the loop and scoring.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from .checkpoint import (CHECKPOINT, FORMAT, Checkpoint, check_resumable, is_checkpoint, load_optimizer,
                         optimizer_state, read_checkpoint, remove_leftovers, state_tensors, write_checkpoint)
from .config import TrainConfig, make_config
from .data import Normaliser, Windows, check_tensor, epoch_seed
from .errors import BadInputError
from .fileio import check_output_path
from .metrics import row_pearson, row_spearman
from .models import build_model
from .progress import METRICS_CSV, Progress
from .tensor import StockTensor

__all__ = ["CHECKPOINT", "FORMAT", "METRICS_CSV", "Checkpoint", "TrainConfig", "TrainResult", "is_checkpoint",
           "predict", "read_checkpoint", "train"]


# ---------------------------------------------------------------------------------------- devices
def resolve_device(device: str | torch.device = "auto", local_rank: int = 0) -> torch.device:
    """'auto' -> CUDA when present, else the CPU (not a warning: the progress line names the device);
    'cuda' without a GPU is an error."""
    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise BadInputError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BadInputError(f"device {str(device)!r} was requested but this machine has no usable CUDA GPU "
                                f"(torch {torch.__version__}); use device='cpu' or 'auto'")
        if dev.index is None:
            dev = torch.device("cuda", local_rank % torch.cuda.device_count())
    elif dev.type != "cpu":
        raise BadInputError(f"device {str(device)!r} is not supported; use 'auto', 'cpu' or 'cuda'")
    return dev


def _device_words(requested: str, device: torch.device) -> str:
    """How the progress line names the device: ``cpu (no CUDA GPU found)`` for 'auto' on a CPU machine."""
    return f"{device}{' (no CUDA GPU found)' if str(requested) == 'auto' and device.type == 'cpu' else ''}"


@dataclass
class _Dist:
    """This process's place in a torchrun job (rank 0 of 1 when run alone)."""

    rank: int = 0
    local_rank: int = 0
    world: int = 1
    owns_group: bool = False
    device: torch.device = torch.device("cpu")

    @property
    def master(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t)
        return t.tolist()


def _join_distributed(device: str) -> _Dist:
    """Join the torchrun process group when RANK is set (nanoGPT's ``ddp = int(os.environ.get('RANK', -1)) != -1``)."""
    if int(os.environ.get("RANK", -1)) == -1 and not (dist.is_available() and dist.is_initialized()):
        return _Dist()
    owns = False
    if not dist.is_initialized():
        gpu = torch.cuda.is_available() and str(device) != "cpu"
        dist.init_process_group(backend="nccl" if gpu else "gloo")
        owns = True
    rank, world = dist.get_rank(), dist.get_world_size()
    return _Dist(rank, int(os.environ.get("LOCAL_RANK", rank)), world, owns)


# ------------------------------------------------------------------------------------------ schedule
def lr_at(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Linear warmup, then constant or cosine decay to lr * min_lr_ratio (a pure function of the step)."""
    lr = cfg.learning_rate
    if step < cfg.warmup_steps:
        return lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    low = lr * cfg.min_lr_ratio
    return low + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - low)


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    lr = cfg.learning_rate
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=lr, weight_decay=cfg.weight_decay)


# -------------------------------------------------------------------------------------------- losses
def grouped_pearson(x: torch.Tensor, y: torch.Tensor, group: torch.Tensor, n_groups: int,
                    eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of x and y within each group (differentiable): (n_groups,)."""
    def mean(v):
        return torch.zeros(n_groups, dtype=v.dtype, device=v.device).index_add_(0, group, v) / count

    count = torch.zeros(n_groups, dtype=x.dtype, device=x.device).index_add_(0, group, torch.ones_like(x))
    dx, dy = x - mean(x)[group], y - mean(y)[group]
    return mean(dx * dy) / (mean(dx * dx) * mean(dy * dy) + eps).sqrt()


def _loss_sum(kind: str, pred: torch.Tensor, batch) -> torch.Tensor:
    """The loss summed over this rank's units: squared errors (mse) or minus per-day ICs (ic)."""
    if kind == "mse":
        return (pred - batch.y).square().sum()
    return -grouped_pearson(pred, batch.y, batch.group, batch.n_groups).sum()


# ------------------------------------------------------------------------------------------- results
@dataclass
class TrainResult:
    """A trained model (best weights restored) with what it needs to score new data."""

    model: nn.Module
    config: TrainConfig
    history: list[dict]
    best_epoch: int
    metrics: dict[str, dict[str, float]]
    features: list[str]
    normaliser: Normaliser | None
    info: dict
    checkpoint: Path | None = None

    @property
    def segments(self) -> dict[str, list[str | None]]:
        """The dates each segment used: {"train": [start, end], "valid": ..., "test": ...}."""
        return dict(self.info["segments"])

    def predict(self, data: StockTensor, **options) -> StockTensor:
        return predict(self, data, **options)

    def __repr__(self) -> str:
        shown = ", ".join(f"{seg} ic {m['ic']:.4f}" for seg, m in self.metrics.items())
        return (f"TrainResult({self.config.model}, {len(self.history)} epochs, best epoch {self.best_epoch}"
                f"{', ' + shown if shown else ''})")


# ---------------------------------------------------------------------------------------------- train
def train(features: StockTensor, labels: StockTensor, config: TrainConfig | None = None, *,
          on_epoch_end: Callable[[dict], None] | None = None, **options) -> TrainResult:
    """Train a sequence model on a features StockTensor (time, stock, feature) and labels (time, stock).

    ``options`` are TrainConfig fields (model="gru", lookback=60, epochs=10, segments={...}, out="run/", ...).
    Under torchrun the same call trains with DDP. ``on_epoch_end(row)`` is called after each epoch's
    checkpoint is written. Returns a TrainResult; with ``out`` also writes checkpoint.safetensors and
    metrics.csv there (``resume=True`` continues from that checkpoint exactly; without it a new run replaces it).
    The checkpoint records how ``features`` were computed (when ``ft.features.compute`` made them), so
    ``ft.predict(run, raw_ohlcv_panel)`` recomputes them.
    """
    cfg = make_config(config, options)
    ctx = _join_distributed(cfg.device)
    try:
        return _train(features, labels, cfg, ctx, on_epoch_end)
    finally:
        if ctx.owns_group:
            dist.destroy_process_group()


def _label_reach(labels: StockTensor, cfg: TrainConfig) -> tuple[int, int]:
    """(horizon, lag) of the labels: from the config, else from what forward_returns recorded in meta."""
    meta = labels.meta if isinstance(labels, StockTensor) else {}
    horizon = cfg.horizon if cfg.horizon is not None else meta.get("horizon")
    lag = cfg.lag if cfg.lag is not None else meta.get("lag")
    if horizon is None or lag is None:
        raise BadInputError("the labels do not record their horizon and lag (labels.meta); pass horizon= and "
                            "lag= so that no training label reads into the next segment")
    if int(horizon) < 1 or int(lag) < 0:
        raise BadInputError(f"horizon must be >= 1 and lag >= 0, got horizon={horizon}, lag={lag}")
    return int(horizon), int(lag)


def _feature_spec(features: StockTensor) -> dict | None:
    """How ``features`` were made, when ``ft.features.compute`` made them (its meta says so): the feature
    names are themselves the spec that recomputes them from a raw OHLCV panel."""
    meta = features.meta or {}
    if "features" not in meta or "min_periods" not in meta:
        return None
    return {"names": [str(f) for f in features.coords["feature"]], "preset": meta["features"],
            "min_periods": meta["min_periods"]}


def _train(features: StockTensor, labels: StockTensor, cfg: TrainConfig, ctx: _Dist, on_epoch_end) -> TrainResult:
    device = resolve_device(cfg.device, ctx.local_rank)
    ctx.device = device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    check_tensor(features, ("time", "stock", "feature"), "features")
    horizon, lag = _label_reach(labels, cfg)
    out = Path(cfg.out) if cfg.out else None
    if out is not None and out.exists() and not out.is_dir():
        raise BadInputError(f"out={str(out)!r} is a file; name a directory for the checkpoint and metrics.csv")
    for name in (CHECKPOINT, METRICS_CSV) if out is not None else ():
        check_output_path(out / name, "out")  # a FIFO, device or link there would be replaced by a file
    resumed = read_checkpoint(out / CHECKPOINT) if cfg.resume and out and (out / CHECKPOINT).exists() else None
    if resumed is not None:  # before the windows are built, so a mismatch is reported against the checkpoint
        check_resumable(resumed, cfg, features, {"horizon": horizon, "lag": lag})

    data = Windows(features, labels, cfg.lookback, segments=cfg.segments, label_reach=horizon + lag,
                   missing=cfg.missing, cs_norm=cfg.cs_norm, feature_norm=cfg.feature_norm,
                   label_norm=cfg.label_norm, clip=cfg.clip, panel_dtype=cfg.panel_dtype,
                   normaliser=resumed.normaliser if resumed else None, device=device)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.n_features, cfg.lookback, cfg.hidden, cfg.layers, cfg.dropout,
                        **cfg.model_options).to(device)
    optimizer = make_optimizer(cfg, model.parameters())
    norm_tensors, norm_settings = data.normaliser.state() if data.normaliser else ({}, None)
    info = {"format": FORMAT, "model": model.config, "features": data.feature_names,
            "feature_spec": _feature_spec(features), "features_meta": dict(features.meta or {}),
            "label": {"horizon": horizon, "lag": lag},
            "segments": {s.name: [s.start, s.end] for s in data.segments.values()},
            "config": cfg.to_json(), "normaliser": norm_settings, "world_size": ctx.world,
            "torch": torch.__version__}

    # the run's state: plain locals, saved in every checkpoint and restored from one
    epoch, step, best_metric, best_epoch, bad_epochs, finished = 0, 0, None, -1, 0, False
    history: list[dict] = []
    best_weights: dict[str, torch.Tensor] | None = None
    if resumed is not None:
        if resumed.info["model"] != model.config:
            raise BadInputError(f"checkpoint {resumed.path} was written for the model {resumed.info['model']}; this "
                                f"run builds {model.config}: use the same settings or another --out")
        model.load_state_dict({k: v.to(device) for k, v in resumed.group("model").items()})
        load_optimizer(optimizer, resumed)
        saved = resumed.info["state"]
        epoch, step, best_metric = saved["epoch"], saved["step"], saved["best_metric"]
        best_epoch, bad_epochs, finished = saved["best_epoch"], saved["bad_epochs"], saved["finished"]
        history = list(resumed.info["history"])
        best_weights = {k: v.to(device) for k, v in resumed.group("best").items()} or None

    # the same model, compiled and/or wrapped in DDP for the training steps (its weights are `model`'s)
    stepper = torch.compile(model) if cfg.compile else model
    if ctx.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        stepper = DDP(stepper, device_ids=[device.index] if device.type == "cuda" else None)
    has_valid = "valid" in data.positions
    n_train = len(data.positions["train"])
    steps_per_epoch = math.ceil(n_train / cfg.batch_size) if cfg.batching == "random" else \
        math.ceil(len(data.day_index(data.positions["train"])[1]) / cfg.days_per_batch)
    total_steps = cfg.epochs * steps_per_epoch
    if ctx.master and out is not None:
        remove_leftovers(out, (CHECKPOINT, METRICS_CSV))
    progress = Progress(out if ctx.master else None, cfg.progress and ctx.master)
    progress.say(f"training {cfg.model} on {_device_words(cfg.device, device)}"
                 f"{f' x {ctx.world} processes' if ctx.world > 1 else ''}: {n_train:,} training samples, "
                 f"{data.n_features} features, {steps_per_epoch} steps per epoch")

    def save_checkpoint() -> None:
        if not (ctx.master and out):
            return
        opt_tensors, opt_meta = optimizer_state(optimizer)
        tensors = {**state_tensors("model", model.state_dict()), **state_tensors("norm", norm_tensors), **opt_tensors}
        if best_weights:
            tensors.update(state_tensors("best", best_weights))
        state = {"epoch": epoch, "step": step, "best_metric": best_metric, "best_epoch": best_epoch,
                 "bad_epochs": bad_epochs, "finished": finished}
        write_checkpoint(out / CHECKPOINT, {**info, "optim": opt_meta, "state": state, "history": history}, tensors)

    try:
        while epoch < cfg.epochs and not finished:
            t0 = time.perf_counter()
            task = progress.task(f"epoch {epoch + 1}/{cfg.epochs}", steps_per_epoch)
            train_loss, lr, step = _train_epoch(stepper, model, optimizer, data, cfg, ctx, epoch, step, total_steps,
                                                lambda: progress.advance(task))
            row = {"epoch": epoch + 1, "lr": lr, "train_loss": train_loss}
            if has_valid:
                valid = evaluate_segment(model, data, "valid", ctx, cfg)
                row.update(valid_loss=valid["loss"], valid_ic=valid["ic"], valid_rank_ic=valid["rank_ic"])
            seconds = time.perf_counter() - t0
            row.update(seconds=seconds, samples_per_s=n_train / seconds)
            history.append(row)
            epoch += 1
            score = _stopping_score(row, cfg) if has_valid else None
            if not has_valid or (math.isfinite(score) and (best_metric is None or score > best_metric)):
                best_metric, best_epoch, bad_epochs = score, epoch, 0
                best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:  # early stopping: `patience` epochs without a better validation score
                bad_epochs += 1
                finished = bad_epochs >= cfg.patience
            save_checkpoint()
            progress.epoch_done(task, row, history)
            if on_epoch_end is not None:
                on_epoch_end(row)
    finally:
        progress.close()

    if best_weights:
        model.load_state_dict(best_weights)
    model.eval()
    metrics = {seg: evaluate_segment(model, data, seg, ctx, cfg) for seg in ("valid", "test") if seg in data.positions}
    finished = True
    save_checkpoint()
    return TrainResult(model, cfg, history, best_epoch, metrics, data.feature_names, data.normaliser,
                       info, out / CHECKPOINT if out else None)


def _train_epoch(stepper: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer, data: Windows,
                 cfg: TrainConfig, ctx: _Dist, epoch: int, step: int, total_steps: int,
                 advance: Callable[[], None]) -> tuple[float, float, int]:
    """One pass over the training samples; returns (mean loss per unit over all ranks, last learning rate,
    the global step after it). ``stepper`` runs the steps (compiled / DDP); ``model`` owns the weights."""
    device = ctx.device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16 and device.type == "cuda")
    stepper.train()
    torch.manual_seed(epoch_seed(cfg.seed, epoch, ctx.rank))  # dropout: a function of (seed, epoch, rank)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    lr = cfg.learning_rate
    for batch in data.batches("train", batch_size=cfg.batch_size, mode=cfg.batching, days_per_batch=cfg.days_per_batch,
                              seed=cfg.seed, epoch=epoch, rank=ctx.rank, world=ctx.world):
        lr = lr_at(step, total_steps, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast:
            if len(batch.positions):
                loss = _loss_sum(cfg.loss, stepper(batch.x).float(), batch)
            else:  # this rank's share is empty: take part in the gradient all-reduce with zeros
                loss = stepper(torch.zeros(1, cfg.lookback, data.n_features, device=device)).float().sum() * 0
        # scaled so that the gradient averaged over ranks is that of the mean over the global batch
        units = batch.global_samples if cfg.loss == "mse" else batch.global_days
        optimizer.zero_grad(set_to_none=True)
        (loss * (ctx.world / units)).backward()
        if cfg.clip_grad:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        optimizer.step()
        step += 1
        loss_sum += loss.detach()
        advance()
    pos = data.positions["train"]
    total_units = len(pos) if cfg.loss == "mse" else len(data.day_index(pos)[1])
    (total_loss,) = ctx.all_sum([loss_sum.item()])
    return total_loss / total_units, lr, step


def _stopping_score(row: dict, cfg: TrainConfig) -> float:
    """The early-stopping score of an epoch (higher is better)."""
    value = row[{"ic": "valid_ic", "rank_ic": "valid_rank_ic", "loss": "valid_loss"}[cfg.metric]]
    return -value if cfg.metric == "loss" else value


# ------------------------------------------------------------------------------------------- scoring
def _predict_positions(model: nn.Module, data: Windows, positions: torch.Tensor, batch_size: int, bf16: bool
                       ) -> torch.Tensor:
    """The model's scores of the samples at ``positions``, in chunks, without gradients."""
    device = next(model.parameters()).device
    out = []
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda"):
        for chunk in positions.split(batch_size):
            out.append(model(data.gather(chunk)).float())
    return torch.cat(out) if out else torch.zeros(0, device=device)


def evaluate_segment(model: nn.Module, data: Windows, segment: str, ctx: _Dist, cfg: TrainConfig) -> dict:
    """Mean per-day IC and Rank IC (vs the raw label) and MSE (vs the training target) of a segment;
    days are shared out across ranks and the sums all-reduced."""
    was_training = model.training
    model.eval()
    pos = data.positions[segment]
    starts, counts = data.day_index(pos)
    days = torch.arange(len(counts), device=counts.device).tensor_split(ctx.world)[ctx.rank]
    ic_sum = ric_sum = sse = 0.0
    n_ic = n_ric = n_samples = 0
    if len(days):
        lo, hi = int(starts[days[0]]), int(starts[days[-1]] + counts[days[-1]])
        mine = pos[lo:hi]
        pred = _predict_positions(model, data, mine, cfg.eval_batch_size, cfg.bf16).to(mine.device)
        T = len(data.times)
        day = torch.repeat_interleave(torch.arange(len(days), device=mine.device), counts[days])
        P = torch.full((len(days), len(data.stocks)), float("nan"), dtype=torch.float64, device=mine.device)
        Y = P.clone()
        P[day, mine // T] = pred.double()
        Y[day, mine // T] = data.raw_labels[mine].double()
        ic, ric = row_pearson(P, Y), row_spearman(P, Y)
        ic_sum, n_ic = float(ic.nansum()), int(ic.isfinite().sum())
        ric_sum, n_ric = float(ric.nansum()), int(ric.isfinite().sum())
        sse, n_samples = float((pred - data.labels[mine]).double().square().sum()), len(mine)
    ic_sum, n_ic, ric_sum, n_ric, sse, n_samples = ctx.all_sum([ic_sum, n_ic, ric_sum, n_ric, sse, n_samples])
    model.train(was_training)
    nan = float("nan")
    return {"ic": ic_sum / n_ic if n_ic else nan, "rank_ic": ric_sum / n_ric if n_ric else nan,
            "loss": sse / n_samples if n_samples else nan, "days": int(n_ic)}


def _model_inputs(data: StockTensor, info: dict) -> StockTensor:
    """The model's features from ``data``: ``data`` itself when it holds exactly the features the model was
    trained on, else computed from it when ``data`` is a raw OHLCV panel and the checkpoint records its spec."""
    if not isinstance(data, StockTensor) or "feature" not in data.dims:
        raise BadInputError(f"predict needs a (time, stock, feature) StockTensor, got "
                            f"{tuple(data.dims) if isinstance(data, StockTensor) else type(data).__name__}")
    names = [str(f) for f in data.coords["feature"]]
    if names == info["features"]:
        return data
    spec = info.get("feature_spec")
    trained = (f"the model was trained on {len(info['features'])} features ({', '.join(info['features'][:4])}...); "
               f"these features are {len(names)} ({', '.join(names[:4])}...)")
    if spec is None:
        raise BadInputError(f"{trained}: compute the same features")
    from . import features as ft_features

    min_periods = None if spec["min_periods"] == "window" else int(spec["min_periods"])
    try:
        return ft_features.compute(data, spec["names"], min_periods=min_periods)
    except BadInputError as exc:
        raise BadInputError(f"{trained}, and its {spec['preset']} features cannot be computed from them ({exc}); "
                            "pass the raw OHLCV panel the model was trained from") from None


def predict(model: TrainResult | str | os.PathLike, data: StockTensor, *, device: str = "auto",
            batch_size: int = 8192) -> StockTensor:
    """Score every (time, stock) of ``data`` that has a full window, with a TrainResult, a checkpoint file
    or a run directory. ``data`` holds the model's features, or is the raw OHLCV panel they were computed
    from (the checkpoint records how). Returns a StockTensor (time, stock): NaN (mask False) where not
    scored; its meta carries the model's label and segments (``ft.evaluate(..., segment="test")``)."""
    if isinstance(model, TrainResult):
        info, normaliser, trained = model.info, model.normaliser, model.model
    else:
        ckpt = read_checkpoint(model)
        info, normaliser, trained = ckpt.info, ckpt.normaliser, ckpt.model()
    cfg = info["config"]
    features = _model_inputs(data, info)
    dev = resolve_device(device)
    trained = trained.to(dev).eval()
    windows = Windows(features, None, info["model"]["lookback"], missing=cfg["missing"], cs_norm=cfg["cs_norm"],
                      feature_norm=None, normaliser=normaliser, device=dev,
                      panel_dtype=cfg.get("panel_dtype", "float32"))
    pos = windows.score_positions()
    scores = _predict_positions(trained, windows, pos, batch_size, cfg["bf16"]).to(pos.device)
    T, N = len(windows.times), len(windows.stocks)
    out = torch.full((T, N), float("nan"), dtype=torch.float32, device=pos.device)
    out[pos % T, pos // T] = scores
    meta = {"kind": "prediction", "model": info["model"]["name"], "label": info["label"],
            "segments": info["segments"], "source": (data.meta or {}).get("source")}
    out = out.cpu()
    return StockTensor(out, ("time", "stock"), {"time": windows.times, "stock": windows.stocks},
                       mask=torch.isfinite(out), meta=meta)
