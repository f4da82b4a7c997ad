"""``ft.train`` and ``ft.predict``: one readable training loop for one CPU, one GPU, or many under torchrun.

The loop follows nanoGPT's train.py: the same code runs single-process and under
``torchrun --nproc_per_node=N`` (it sees RANK/WORLD_SIZE, joins the process group — NCCL on GPUs, gloo
on CPU — and wraps the model in DDP). Every rank draws the same global minibatch from (seed, epoch) and
takes a contiguous share; each local loss is scaled by world / global batch so the all-reduced gradient
equals one process's gradient on the whole global batch. Metrics are all-reduced; rank 0 writes files.

Checkpoints are safetensors files: tensors (model, best model, optimizer state, normaliser) and one
JSON string (config, model config, feature names, epoch, history, optimizer hyper-parameters).
Nothing is pickled, so loading a tampered checkpoint cannot run code.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .data import PANEL_DTYPES, Normaliser, Windows, check_tensor, epoch_seed, resolve_segments
from .errors import BadInputError, StoreCorruptError
from .metrics import row_pearson, row_spearman
from .models import build_model

CHECKPOINT = "checkpoint.safetensors"
METRICS_CSV = "metrics.csv"
FORMAT = "fintensor.checkpoint/1"
DEFAULT_LR = {"sgd": 0.05, "adam": 1e-3, "adamw": 1e-3}
HISTORY_COLUMNS = ("epoch", "lr", "train_loss", "valid_loss", "valid_ic", "valid_rank_ic", "seconds",
                   "samples_per_s")
# settings a resumed run must share with the checkpoint (anything else, e.g. epochs, may change)
RESUME_KEYS = ("model", "hidden", "layers", "dropout", "model_options", "lookback", "missing", "cs_norm",
               "feature_norm", "label_norm", "clip", "panel_dtype", "loss", "batching", "batch_size",
               "days_per_batch", "optimizer", "seed")
# what a run killed while writing leaves in its directory: store.atomic_write_bytes' ".NAME.<uuid hex>.tmp"
LEFTOVER = re.compile(rf"\.({re.escape(CHECKPOINT)}|{re.escape(METRICS_CSV)})\.[0-9a-f]{{32}}\.tmp")


# -------------------------------------------------------------------------------------------- config
@dataclass
class TrainConfig:
    """Everything ``ft.train`` can be told; stored in every checkpoint (see the README for the meaning)."""

    # model
    model: str = "lstm"
    hidden: int = 64
    layers: int = 2
    dropout: float = 0.0
    model_options: dict = field(default_factory=dict)   # alstm: rnn; transformer: heads; tcn: kernel_size
    # samples
    lookback: int = 20
    segments: Any = None              # {"train": (start, end), "valid": ..., "test": ...} or fractions
    horizon: int | None = None        # the label reads `lag + horizon` steps after t (default: labels.meta)
    lag: int | None = None
    missing: str = "drop"             # "drop" incomplete windows, or "zero"-fill missing values
    cs_norm: str | None = None        # per-day feature normalisation: "zscore", "rank" or None
    feature_norm: str | None = "zscore"   # per-feature, fitted on train: "zscore", "robust" or None
    label_norm: str | None = "zscore"     # per-day training-target normalisation
    clip: float | None = 3.0
    panel_dtype: str = "float32"      # "bfloat16" keeps the windowed panel in half the memory
    # optimisation
    epochs: int = 20
    batch_size: int = 800
    batching: str | None = None       # "random" (t, stock) or "day"; None: "day" for loss="ic"
    days_per_batch: int = 1
    optimizer: str = "sgd"            # "sgd" (momentum), "adam", "adamw"
    lr: float | None = None           # None: 0.05 for sgd, 1e-3 for adam(w)
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "cosine"          # "cosine" (to lr * min_lr_ratio) or "constant", after warmup
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    clip_grad: float | None = 1.0
    loss: str = "mse"                 # "mse" or "ic" (minus the mean per-day Pearson correlation)
    metric: str = "ic"                # early stopping on valid "ic", "rank_ic" or "loss"
    patience: int = 5
    # runtime
    device: str = "auto"
    bf16: bool = True                 # bf16 autocast on CUDA
    compile: bool = False
    seed: int = 0
    out: str | None = None            # directory for checkpoint.safetensors and metrics.csv
    resume: bool = False
    progress: bool = True
    eval_batch_size: int = 8192

    def __post_init__(self):
        choices = {"optimizer": ("sgd", "adam", "adamw"), "schedule": ("cosine", "constant"),
                   "loss": ("mse", "ic"), "metric": ("ic", "rank_ic", "loss"),
                   "batching": (None, "random", "day"), "panel_dtype": tuple(PANEL_DTYPES)}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise BadInputError(f"unknown {key} {getattr(self, key)!r}; use one of "
                                    f"{', '.join(repr(a) for a in allowed if a is not None)}")
        positive = ("hidden", "layers", "lookback", "epochs", "batch_size", "days_per_batch", "eval_batch_size")
        for key in positive:
            v = getattr(self, key)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise BadInputError(f"{key} must be a positive integer, got {v!r}")
        for key in ("patience", "warmup_steps", "seed"):
            v = getattr(self, key)
            if not isinstance(v, (int, np.integer)) or v < 0:
                raise BadInputError(f"{key} must be a non-negative integer, got {v!r}")
        if self.lr is not None and not self.lr > 0:
            raise BadInputError(f"lr must be positive, got {self.lr!r}")
        if self.nesterov and (self.optimizer != "sgd" or self.momentum <= 0):
            raise BadInputError("nesterov needs optimizer='sgd' with momentum > 0")
        if self.batching is None:
            self.batching = "day" if self.loss == "ic" else "random"
        if self.loss == "ic" and self.batching != "day":
            raise BadInputError("loss='ic' correlates predictions within a day: use batching='day'")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        if isinstance(d["segments"], Mapping):
            d["segments"] = {k: [None if x is None else str(x) for x in v] for k, v in d["segments"].items()}
        elif d["segments"] is not None:
            d["segments"] = list(d["segments"])
        return d


def _config(config: TrainConfig | None, options: dict) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise BadInputError(f"unknown training option(s) {unknown}; see fintensor.trainer.TrainConfig")
    return dataclasses.replace(config, **options) if config is not None else TrainConfig(**options)


# ---------------------------------------------------------------------------------------- devices
def resolve_device(device: str | torch.device = "auto", local_rank: int = 0) -> torch.device:
    """'auto' -> CUDA when present (falls back to CPU with a warning); 'cuda' without a GPU is an error."""
    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        warnings.warn("no CUDA GPU found: device='auto' runs on the CPU", RuntimeWarning, stacklevel=3)
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


# ------------------------------------------------------------------------------------- checkpoints
@dataclass
class Checkpoint:
    """A loaded checkpoint: ``info`` (the JSON part) and ``tensors`` (by name)."""

    path: Path | None
    info: dict
    tensors: dict[str, torch.Tensor]

    def group(self, prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) + 1:]: v for k, v in self.tensors.items() if k.startswith(prefix + ".")}

    @property
    def normaliser(self) -> Normaliser | None:
        settings = self.info.get("normaliser")
        return Normaliser.from_state(self.group("norm"), settings) if settings else None

    def model(self, prefer_best: bool = True) -> nn.Module:
        """The model rebuilt from its config with the best (else the last) weights, in eval mode."""
        net = build_model(**self.info["model"])
        weights = self.group("best") if prefer_best and self.group("best") else self.group("model")
        try:
            net.load_state_dict(weights)
        except RuntimeError as exc:
            raise StoreCorruptError(f"checkpoint {self.path} does not fit its own model config "
                                    f"({str(exc).splitlines()[0]}); it was damaged or edited") from None
        return net.eval()


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Load a checkpoint file (or a run directory holding one) without unpickling anything."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise BadInputError(f"no checkpoint at {path}; train one with `fintensor train ... --out DIR`")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError("not a fintensor checkpoint")
            info = json.loads(meta["info"])
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, ValueError, KeyError, OSError, UnicodeDecodeError) as exc:
        raise StoreCorruptError(f"{path} is not a readable fintensor checkpoint ({exc}); it was never "
                                "unpickled — retrain or restore the file") from None
    return Checkpoint(path, info, tensors)


def _state_tensors(prefix: str, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v.detach().cpu().clone().contiguous() for k, v in state.items()}


def _optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state as tensors plus JSON (hyper-parameters, scalars)."""
    sd = opt.state_dict()
    tensors, state = {}, {}
    for pid, entries in sd["state"].items():
        state[str(pid)] = {}
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optim.{pid}.{key}"] = value.detach().cpu().clone().contiguous()
                state[str(pid)][key] = "tensor"
            else:
                state[str(pid)][key] = value
    return tensors, {"param_groups": sd["param_groups"], "state": state}


def _load_optimizer(opt: torch.optim.Optimizer, ckpt: Checkpoint) -> None:
    """Restore the optimizer state (load_state_dict moves each tensor where its parameter lives)."""
    meta = ckpt.info["optim"]
    state = {}
    for pid, entries in meta["state"].items():
        state[int(pid)] = {k: (ckpt.tensors[f"optim.{pid}.{k}"] if v == "tensor" else v) for k, v in entries.items()}
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})


def _write_checkpoint(path: Path, info: dict, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save

    from .store import atomic_write_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    blob = save(tensors, metadata={"format": FORMAT, "info": json.dumps(info, default=str)})
    atomic_write_bytes(path, blob)


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

    def predict(self, features, **options):
        return predict(self, features, **options)

    def __repr__(self) -> str:
        shown = ", ".join(f"{seg} ic {m['ic']:.4f}" for seg, m in self.metrics.items())
        return (f"TrainResult({self.config.model}, {len(self.history)} epochs, best epoch {self.best_epoch}"
                f"{', ' + shown if shown else ''})")


@dataclass
class _Progress:
    """Rank 0's view: a rich progress bar, metrics.csv, and TensorBoard when installed."""

    out: Path | None
    enabled: bool
    bar: Any = None
    writer: Any = None

    def __post_init__(self):
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TextColumn("{task.fields[info]}"), transient=True)
            self.bar.start()
        if self.out is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed: the CSV is the log
                pass
            else:
                self.writer = SummaryWriter(str(self.out / "tensorboard"))

    def task(self, description: str, total: int):
        return self.bar.add_task(description, total=total, info="") if self.bar else None

    def advance(self, task, info: str = "") -> None:
        if self.bar is not None:
            self.bar.update(task, advance=1, info=info)

    def epoch_done(self, task, row: dict, history: list[dict]) -> None:
        if self.bar is not None:
            self.bar.remove_task(task)
            self.bar.console.print(_epoch_line(row))
        if self.out is not None:
            _write_csv(self.out / METRICS_CSV, history)
        if self.writer is not None:
            for k, v in row.items():
                if k != "epoch" and v is not None:
                    self.writer.add_scalar(k, v, row["epoch"])
            self.writer.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        if self.writer is not None:
            self.writer.close()


def _epoch_line(row: dict) -> str:
    """One short line per epoch: losses (train, valid), valid IC and Rank IC, lr, time."""
    parts = [f"epoch {row['epoch']}", f"loss {row['train_loss']:.4f}"]
    if "valid_ic" in row:
        parts += [f"valid {row['valid_loss']:.4f}", f"ic {row['valid_ic']:+.4f}", f"rank_ic {row['valid_rank_ic']:+.4f}"]
    return "  ".join(parts + [f"lr {row['lr']:.3g}", f"{row['seconds']:.1f}s"])


def _write_csv(path: Path, history: list[dict]) -> None:
    import io

    from .store import atomic_write_bytes

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=HISTORY_COLUMNS, extrasaction="ignore")
    w.writeheader()
    w.writerows(history)
    atomic_write_bytes(path, buf.getvalue().encode())


# ---------------------------------------------------------------------------------------------- train
def train(features, labels, config: TrainConfig | None = None, *,
          on_epoch_end: Callable[[dict], None] | None = None, **options) -> TrainResult:
    """Train a sequence model on a features StockTensor (time, stock, feature) and labels (time, stock).

    ``options`` are TrainConfig fields (model="gru", lookback=60, epochs=10, segments={...}, out="run/", ...).
    Under torchrun the same call trains with DDP. ``on_epoch_end(row)`` is called after each epoch's
    checkpoint is written. Returns a TrainResult; with ``out`` also writes checkpoint.safetensors and
    metrics.csv there (``resume=True`` continues from that checkpoint exactly; without it a new run replaces it).
    """
    cfg = _config(config, options)
    ctx = _join_distributed(cfg.device)
    try:
        return _train(features, labels, cfg, ctx, on_epoch_end)
    finally:
        if ctx.owns_group:
            dist.destroy_process_group()


def _label_reach(labels, cfg: TrainConfig) -> tuple[int, int]:
    meta = getattr(labels, "meta", {}) or {}
    horizon = cfg.horizon if cfg.horizon is not None else meta.get("horizon")
    lag = cfg.lag if cfg.lag is not None else meta.get("lag")
    if horizon is None or lag is None:
        raise BadInputError("the labels do not record their horizon and lag (labels.meta); pass horizon= and "
                            "lag= so that no training label reads into the next segment")
    if int(horizon) < 1 or int(lag) < 0:
        raise BadInputError(f"horizon must be >= 1 and lag >= 0, got horizon={horizon}, lag={lag}")
    return int(horizon), int(lag)


def _train(features, labels, cfg: TrainConfig, ctx: _Dist, on_epoch_end) -> TrainResult:
    device = resolve_device(cfg.device, ctx.local_rank)
    ctx.device = device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    horizon, lag = _label_reach(labels, cfg)
    out = Path(cfg.out) if cfg.out else None
    if out is not None and out.exists() and not out.is_dir():
        raise BadInputError(f"out={str(out)!r} is a file; name a directory for the checkpoint and metrics.csv")
    resumed = read_checkpoint(out / CHECKPOINT) if cfg.resume and out and (out / CHECKPOINT).exists() else None
    if resumed is not None:  # before the windows are built, so a mismatch is reported against the checkpoint
        _check_resumable(resumed, cfg, features, {"horizon": horizon, "lag": lag})

    data = Windows(features, labels, cfg.lookback, segments=cfg.segments, label_reach=horizon + lag,
                   missing=cfg.missing, cs_norm=cfg.cs_norm, feature_norm=cfg.feature_norm,
                   label_norm=cfg.label_norm, clip=cfg.clip, panel_dtype=cfg.panel_dtype,
                   normaliser=resumed.normaliser if resumed else None, device=device)
    torch.manual_seed(cfg.seed)
    net = build_model(cfg.model, data.n_features, cfg.lookback, cfg.hidden, cfg.layers, cfg.dropout,
                      **cfg.model_options).to(device)
    optimizer = make_optimizer(cfg, net.parameters())
    norm_tensors, norm_settings = data.normaliser.state() if data.normaliser else ({}, None)
    info = {"format": FORMAT, "model": net.config, "features": data.feature_names,
            "features_meta": dict(getattr(features, "meta", {}) or {}),
            "label": {"horizon": horizon, "lag": lag},
            "segments": {s.name: [s.start, s.end] for s in data.segments.values()},
            "config": cfg.to_json(), "normaliser": norm_settings, "world_size": ctx.world,
            "torch": torch.__version__}
    state = {"epoch": 0, "step": 0, "best_metric": None, "best_epoch": -1, "bad_epochs": 0, "finished": False}
    history: list[dict] = []
    best_weights: dict[str, torch.Tensor] | None = None
    if resumed is not None:
        if resumed.info["model"] != net.config:
            raise BadInputError(f"checkpoint {resumed.path} was written for the model {resumed.info['model']}; this "
                                f"run builds {net.config}: use the same settings or another --out")
        net.load_state_dict({k: v.to(device) for k, v in resumed.group("model").items()})
        _load_optimizer(optimizer, resumed)
        state.update(resumed.info["state"])
        history = list(resumed.info["history"])
        best_weights = {k: v.to(device) for k, v in resumed.group("best").items()} or None

    model = torch.compile(net) if cfg.compile else net
    if ctx.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    has_valid = "valid" in data.positions
    n_train = len(data.positions["train"])
    steps_per_epoch = math.ceil(n_train / cfg.batch_size) if cfg.batching == "random" else \
        math.ceil(len(data.day_index(data.positions["train"])[1]) / cfg.days_per_batch)
    total_steps = cfg.epochs * steps_per_epoch
    if ctx.master and out is not None:
        remove_leftovers(out)
    progress = _Progress(out if ctx.master else None, cfg.progress and ctx.master)

    def checkpoint() -> None:
        if not (ctx.master and out):
            return
        opt_tensors, opt_meta = _optimizer_state(optimizer)
        tensors = {**_state_tensors("model", net.state_dict()), **_state_tensors("norm", norm_tensors),
                   **opt_tensors}
        if best_weights:
            tensors.update(_state_tensors("best", best_weights))
        _write_checkpoint(out / CHECKPOINT, {**info, "optim": opt_meta, "state": state, "history": history},
                          tensors)

    try:
        for epoch in range(state["epoch"], cfg.epochs):
            if state["finished"]:
                break
            t0 = time.perf_counter()
            task = progress.task(f"epoch {epoch + 1}/{cfg.epochs}", steps_per_epoch)
            train_loss, lr = _train_epoch(model, net, optimizer, data, cfg, ctx, state, epoch, total_steps,
                                          lambda: progress.advance(task))
            row = {"epoch": epoch + 1, "lr": lr, "train_loss": train_loss}
            if has_valid:
                valid = evaluate_segment(net, data, "valid", ctx, cfg)
                row.update(valid_loss=valid["loss"], valid_ic=valid["ic"], valid_rank_ic=valid["rank_ic"])
            seconds = time.perf_counter() - t0
            row.update(seconds=seconds, samples_per_s=n_train / seconds)
            history.append(row)
            state["epoch"] = epoch + 1
            score = _stopping_score(row, cfg) if has_valid else None
            if not has_valid or (math.isfinite(score) and (state["best_metric"] is None
                                                           or score > state["best_metric"])):
                state.update(best_metric=score, best_epoch=epoch + 1, bad_epochs=0)
                best_weights = {k: v.detach().clone() for k, v in net.state_dict().items()}
            else:  # early stopping: `patience` epochs without a better validation score
                state["bad_epochs"] += 1
                state["finished"] = state["bad_epochs"] >= cfg.patience
            checkpoint()
            progress.epoch_done(task, row, history)
            if on_epoch_end is not None:
                on_epoch_end(row)
    finally:
        progress.close()

    if best_weights:
        net.load_state_dict(best_weights)
    net.eval()
    metrics = {seg: evaluate_segment(net, data, seg, ctx, cfg) for seg in ("valid", "test") if seg in data.positions}
    state["finished"] = True
    checkpoint()
    return TrainResult(net, cfg, history, state["best_epoch"], metrics, data.feature_names, data.normaliser,
                       info, out / CHECKPOINT if out else None)


def _train_epoch(model, net, optimizer, data: Windows, cfg: TrainConfig, ctx: _Dist, state: dict, epoch: int,
                 total_steps: int, advance: Callable[[], None]) -> tuple[float, float]:
    """One pass over the training samples; returns (mean loss per unit over all ranks, last learning rate)."""
    device = ctx.device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16 and device.type == "cuda")
    model.train()
    torch.manual_seed(epoch_seed(cfg.seed, epoch, ctx.rank))  # dropout: a function of (seed, epoch, rank)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    lr = cfg.learning_rate
    for batch in data.batches("train", batch_size=cfg.batch_size, mode=cfg.batching, days_per_batch=cfg.days_per_batch,
                              seed=cfg.seed, epoch=epoch, rank=ctx.rank, world=ctx.world):
        lr = lr_at(state["step"], total_steps, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast:
            if len(batch.positions):
                loss = _loss_sum(cfg.loss, model(batch.x).float(), batch)
            else:  # this rank's share is empty: take part in the gradient all-reduce with zeros
                loss = model(torch.zeros(1, cfg.lookback, data.n_features, device=device)).float().sum() * 0
        # scaled so that the gradient averaged over ranks is that of the mean over the global batch
        units = batch.global_samples if cfg.loss == "mse" else batch.global_days
        optimizer.zero_grad(set_to_none=True)
        (loss * (ctx.world / units)).backward()
        if cfg.clip_grad:
            nn.utils.clip_grad_norm_(net.parameters(), cfg.clip_grad)
        optimizer.step()
        state["step"] += 1
        loss_sum += loss.detach()
        advance()
    pos = data.positions["train"]
    total_units = len(pos) if cfg.loss == "mse" else len(data.day_index(pos)[1])
    (total_loss,) = ctx.all_sum([loss_sum.item()])
    return total_loss / total_units, lr


def _stopping_score(row: dict, cfg: TrainConfig) -> float:
    """The early-stopping score of an epoch (higher is better)."""
    value = row[{"ic": "valid_ic", "rank_ic": "valid_rank_ic", "loss": "valid_loss"}[cfg.metric]]
    return -value if cfg.metric == "loss" else value


def _check_resumable(ckpt: Checkpoint, cfg: TrainConfig, features, label: dict) -> None:
    """A run resumes exactly only with the settings, features, label and segments that wrote the checkpoint
    (epochs and the like may change); anything else is refused naming the checkpoint and what differs."""
    check_tensor(features, ("time", "stock", "feature"), "features")
    old, new, default = ckpt.info["config"], cfg.to_json(), TrainConfig().to_json()
    changed = [f"{k} {old.get(k, default[k])!r} -> {new[k]!r}" for k in RESUME_KEYS
               if json.dumps(old.get(k, default[k])) != json.dumps(new[k])]
    names = [str(f) for f in features.coords["feature"]]
    if ckpt.info["features"] != names:
        changed.append(_feature_change(ckpt.info["features"], names))
    if ckpt.info["label"] != label:
        changed.append(f"label horizon/lag {ckpt.info['label']['horizon']}/{ckpt.info['label']['lag']} -> "
                       f"{label['horizon']}/{label['lag']}")
    segments = {s.name: [s.start, s.end] for s in resolve_segments(features.coords["time"], cfg.segments).values()}
    changed += [f"segment {name} {'..'.join(ckpt.info['segments'].get(name, ['none']))} -> "
                f"{'..'.join(segments.get(name, ['none']))}"
                for name in sorted({*segments, *ckpt.info["segments"]})
                if ckpt.info["segments"].get(name) != segments.get(name)]
    if changed:
        m = ckpt.info["model"]
        raise BadInputError(f"checkpoint {ckpt.path} was written for a {m['name']} on {m['n_features']} features; "
                            f"this run changed {', '.join(changed)}: use the same settings or another --out")


def _feature_change(old: list[str], new: list[str]) -> str:
    """``features 1 -> 2 (added 'b')``: how a feature list differs from the checkpoint's."""
    added, removed = [f for f in new if f not in old], [f for f in old if f not in new]
    parts = [f"{what} {', '.join(map(repr, names[:3]))}{' ...' if len(names) > 3 else ''}"
             for what, names in (("added", added), ("removed", removed)) if names]
    return f"features {len(old)} -> {len(new)} ({'; '.join(parts) or 'reordered'})"


def remove_leftovers(out: Path) -> list[Path]:
    """Delete the half-written ``.checkpoint.safetensors.<hex>.tmp`` (and metrics.csv) files that a run killed
    mid-write left in ``out``; nothing else. Returns what was removed."""
    removed = []
    for path in out.glob(".*.tmp") if out.is_dir() else ():
        if LEFTOVER.fullmatch(path.name) and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


# ------------------------------------------------------------------------------------------- scoring
def _predict_positions(net: nn.Module, data: Windows, positions: torch.Tensor, batch_size: int, bf16: bool
                       ) -> torch.Tensor:
    """The model's scores of the samples at ``positions``, in chunks, without gradients."""
    device = next(net.parameters()).device
    out = []
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda"):
        for chunk in positions.split(batch_size):
            out.append(net(data.gather(chunk)).float())
    return torch.cat(out) if out else torch.zeros(0, device=device)


def evaluate_segment(net: nn.Module, data: Windows, segment: str, ctx: _Dist, cfg: TrainConfig) -> dict:
    """Mean per-day IC and Rank IC (vs the raw label) and MSE (vs the training target) of a segment;
    days are shared out across ranks and the sums all-reduced."""
    was_training = net.training
    net.eval()
    pos = data.positions[segment]
    starts, counts = data.day_index(pos)
    days = torch.arange(len(counts), device=counts.device).tensor_split(ctx.world)[ctx.rank]
    ic_sum = ric_sum = sse = 0.0
    n_ic = n_ric = n_samples = 0
    if len(days):
        lo, hi = int(starts[days[0]]), int(starts[days[-1]] + counts[days[-1]])
        mine = pos[lo:hi]
        pred = _predict_positions(net, data, mine, cfg.eval_batch_size, cfg.bf16).to(mine.device)
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
    net.train(was_training)
    nan = float("nan")
    return {"ic": ic_sum / n_ic if n_ic else nan, "rank_ic": ric_sum / n_ric if n_ric else nan,
            "loss": sse / n_samples if n_samples else nan, "days": int(n_ic)}


def predict(model, features, *, device: str = "auto", batch_size: int = 8192):
    """Score every (time, stock) of ``features`` that has a full window, with a TrainResult, a checkpoint
    file or a run directory. Returns a StockTensor (time, stock): NaN (mask False) where not scored."""
    from .tensor import StockTensor

    if isinstance(model, TrainResult):
        info, normaliser, net = model.info, model.normaliser, model.model
    else:
        ckpt = read_checkpoint(model)
        info, normaliser, net = ckpt.info, ckpt.normaliser, ckpt.model()
    cfg = info["config"]
    names = [str(f) for f in features.coords["feature"]] if hasattr(features, "coords") and \
        "feature" in features.coords else None
    if names != info["features"]:
        have = "?" if names is None else len(names)
        raise BadInputError(f"the model was trained on {len(info['features'])} features "
                            f"({', '.join(info['features'][:4])}...); these features are {have} "
                            f"({', '.join((names or [])[:4])}...): compute the same features")
    dev = resolve_device(device)
    net = net.to(dev).eval()
    data = Windows(features, None, info["model"]["lookback"], missing=cfg["missing"], cs_norm=cfg["cs_norm"],
                   feature_norm=None, normaliser=normaliser, device=dev,
                   panel_dtype=cfg.get("panel_dtype", "float32"))
    pos = data.score_positions()
    scores = _predict_positions(net, data, pos, batch_size, cfg["bf16"]).to(pos.device)
    T, N = len(data.times), len(data.stocks)
    out = torch.full((T, N), float("nan"), dtype=torch.float32, device=pos.device)
    out[pos % T, pos // T] = scores
    meta = {"kind": "prediction", "model": info["model"]["name"], "label": info["label"],
            "segments": info["segments"], "source": (getattr(features, "meta", {}) or {}).get("source")}
    out = out.cpu()
    return StockTensor(out, ("time", "stock"), {"time": data.times, "stock": data.stocks},
                       mask=torch.isfinite(out), meta=meta)
