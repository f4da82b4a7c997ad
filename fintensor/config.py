"""``TrainConfig``: everything ``ft.train`` can be told, each field checked once when the config is made.

Every numeric field goes through ``fintensor.checks`` (finite, in range, bool is not a number), so a
setting that would train a NaN model (``lr=inf``, ``clip_grad=nan``, ``momentum=5``) is refused with one
line before any data is touched. The config is stored in every checkpoint (``to_json``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from . import checks
from .errors import BadInputError

DEFAULT_LR = {"sgd": 0.05, "adam": 1e-3, "adamw": 1e-3}
PANEL_DTYPES = ("float32", "bfloat16")
# settings a resumed run must share with the checkpoint (anything else, e.g. epochs, may change)
RESUME_KEYS = ("model", "hidden", "layers", "dropout", "model_options", "lookback", "missing", "cs_norm",
               "feature_norm", "label_norm", "clip", "panel_dtype", "loss", "batching", "batch_size",
               "days_per_batch", "optimizer", "seed")


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
        for key, allowed in {"optimizer": ("sgd", "adam", "adamw"), "schedule": ("cosine", "constant"),
                             "loss": ("mse", "ic"), "metric": ("ic", "rank_ic", "loss"),
                             "batching": (None, "random", "day"), "panel_dtype": PANEL_DTYPES,
                             "missing": ("drop", "zero")}.items():
            if getattr(self, key) not in allowed or isinstance(getattr(self, key), bool):
                raise BadInputError(f"unknown {key} {getattr(self, key)!r}; use one of "
                                    f"{', '.join(repr(a) for a in allowed if a is not None)}")
        for key in ("hidden", "layers", "lookback", "epochs", "batch_size", "days_per_batch", "eval_batch_size"):
            setattr(self, key, _whole(checks.positive_int, key, getattr(self, key), "a positive integer"))
        for key in ("patience", "warmup_steps", "seed"):
            setattr(self, key, _whole(checks.nonnegative_int, key, getattr(self, key), "a non-negative integer"))
        for key in ("horizon", "lag"):
            setattr(self, key, checks.optional(checks.integer, key, getattr(self, key), lo=1 if key == "horizon" else 0))
        self.dropout = checks.number("dropout", self.dropout, lo=0.0, hi=1.0, hi_open=True)
        self.lr = checks.optional(checks.positive, "lr", self.lr)
        self.momentum = checks.number("momentum", self.momentum, lo=0.0, hi=1.0, hi_open=True)
        self.weight_decay = checks.number("weight_decay", self.weight_decay, lo=0.0)
        self.min_lr_ratio = checks.number("min_lr_ratio", self.min_lr_ratio, lo=0.0, hi=1.0)
        self.clip = checks.optional(checks.positive, "clip", self.clip)
        self.clip_grad = checks.optional(checks.positive, "clip_grad", self.clip_grad)
        for key in ("nesterov", "bf16", "compile", "resume", "progress"):
            checks.boolean(key, getattr(self, key))
        if not isinstance(self.model_options, Mapping):
            raise BadInputError(f"model_options must be a dict, got {self.model_options!r}")
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


def _whole(check, key: str, value: Any, kind: str) -> int:
    """``check`` with the message these settings have always had (``epochs must be a positive integer``)."""
    try:
        return check(key, value)
    except BadInputError:
        raise BadInputError(f"{key} must be {kind}, got {value!r}") from None


def make_config(config: TrainConfig | None, options: dict) -> TrainConfig:
    """``config`` (or the defaults) with ``options`` (TrainConfig fields) replaced; unknown names refused."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise BadInputError(f"unknown training option(s) {unknown}; see fintensor.trainer.TrainConfig")
    return dataclasses.replace(config, **options) if config is not None else TrainConfig(**options)
