"""Sequence models that score one window: (batch, lookback, features) -> (batch,) predictions.

Every model is built from the small blocks below and takes the same config surface
(``n_features, lookback, hidden, layers, dropout`` plus a few model-specific options), so the trainer,
checkpoints and the CLI treat them alike: ``build_model("lstm", n_features=20, lookback=60)``.

    linear       one weight per (step, feature) of the flattened window
    mlp          flattened window -> ``layers`` x (Linear, GELU, Dropout) -> head
    lstm, gru    stacked RNN; the last step's state -> head
    alstm        Linear+tanh -> RNN -> temporal attention; [last state, attended state] -> head (qlib ALSTM)
    transformer  Linear -> sinusoidal positions -> pre-norm encoder (``heads`` heads) -> last step -> head
    tcn          residual blocks of causal dilated convolutions (dilation 2^i, ``kernel_size``) -> last step
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .errors import BadInputError


# ------------------------------------------------------------------------------------------- blocks
class Head(nn.Sequential):
    """Dropout then one linear unit: the score of each sample."""

    def __init__(self, width: int, dropout: float):
        super().__init__(nn.Dropout(dropout), nn.Linear(width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).squeeze(-1)


class DenseBlock(nn.Sequential):
    """Linear, GELU, Dropout."""

    def __init__(self, n_in: int, n_out: int, dropout: float):
        super().__init__(nn.Linear(n_in, n_out), nn.GELU(), nn.Dropout(dropout))


def recurrent(kind: str, n_in: int, hidden: int, layers: int, dropout: float) -> nn.RNNBase:
    """A batch-first LSTM or GRU (dropout only between stacked layers, as torch defines it)."""
    cls = {"lstm": nn.LSTM, "gru": nn.GRU}.get(kind)
    if cls is None:
        raise BadInputError(f"unknown recurrent cell {kind!r}; use 'lstm' or 'gru'")
    return cls(n_in, hidden, num_layers=layers, batch_first=True, dropout=dropout if layers > 1 else 0.0)


def run_recurrent(rnn: nn.RNNBase, x: torch.Tensor) -> torch.Tensor:
    """All states (B, L, H) of an RNN. cuDNN runs RNNs in bf16 only from version 9.13; under bf16 autocast
    an older cuDNN gets the RNN in float32 instead of an error."""
    if (x.is_cuda and torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.bfloat16
            and (torch.backends.cudnn.version() or 0) < 91300):
        with torch.autocast("cuda", enabled=False):
            return rnn(x.float())[0]
    return rnn(x)[0]


class TemporalAttention(nn.Module):
    """Softmax weights over time from each step's state; returns the weighted sum of the states."""

    def __init__(self, hidden: int, dropout: float):
        super().__init__()
        self.score = nn.Sequential(nn.Linear(hidden, max(hidden // 2, 1)), nn.Dropout(dropout), nn.Tanh(),
                                   nn.Linear(max(hidden // 2, 1), 1, bias=False))

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(self.score(states), dim=1)  # (B, L, 1)
        return (states * weights).sum(dim=1)


class SinusoidalPositions(nn.Module):
    """Adds the fixed sine/cosine position code of Vaswani et al. (not a learned or saved weight)."""

    def __init__(self, width: int, max_len: int):
        super().__init__()
        pos = torch.arange(max_len, dtype=torch.float32)[:, None]
        freq = torch.exp(torch.arange(0, width, 2, dtype=torch.float32) * (-math.log(10000.0) / width))
        table = torch.zeros(max_len, width)
        table[:, 0::2] = torch.sin(pos * freq)
        table[:, 1::2] = torch.cos(pos * freq)[:, : width // 2]
        self.register_buffer("table", table, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.table[: x.shape[1]].to(x.dtype)


class CausalConvBlock(nn.Module):
    """Two causal dilated convolutions with a residual connection: step t only sees steps <= t."""

    def __init__(self, n_in: int, n_out: int, kernel_size: int, dilation: int, dropout: float):
        super().__init__()
        self.pad = (kernel_size - 1) * dilation
        self.conv1 = nn.Conv1d(n_in, n_out, kernel_size, dilation=dilation)
        self.conv2 = nn.Conv1d(n_out, n_out, kernel_size, dilation=dilation)
        self.drop = nn.Dropout(dropout)
        self.skip = nn.Conv1d(n_in, n_out, 1) if n_in != n_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, L)
        y = self.drop(torch.relu(self.conv1(nn.functional.pad(x, (self.pad, 0)))))
        y = self.drop(torch.relu(self.conv2(nn.functional.pad(y, (self.pad, 0)))))
        return torch.relu(y + self.skip(x))


# ------------------------------------------------------------------------------------------- models
class SequenceModel(nn.Module):
    """Base: remembers its config so a checkpoint can rebuild it (``model.config``)."""

    def __init__(self, n_features: int, lookback: int, hidden: int, layers: int, dropout: float, **options):
        super().__init__()
        self.config = {"name": MODEL_NAMES[type(self)], "n_features": n_features, "lookback": lookback,
                       "hidden": hidden, "layers": layers, "dropout": dropout, **options}


class Linear(SequenceModel):
    def __init__(self, n_features, lookback, hidden=64, layers=2, dropout=0.0):
        super().__init__(n_features, lookback, hidden, layers, dropout)
        self.out = Head(n_features * lookback, dropout)

    def forward(self, x):
        return self.out(x.flatten(1))


class MLP(SequenceModel):
    def __init__(self, n_features, lookback, hidden=64, layers=2, dropout=0.0):
        super().__init__(n_features, lookback, hidden, layers, dropout)
        widths = [n_features * lookback] + [hidden] * layers
        self.body = nn.Sequential(*(DenseBlock(a, b, dropout) for a, b in zip(widths, widths[1:])))
        self.out = Head(widths[-1], 0.0)

    def forward(self, x):
        return self.out(self.body(x.flatten(1)))


class RNN(SequenceModel):
    kind = "lstm"

    def __init__(self, n_features, lookback, hidden=64, layers=2, dropout=0.0):
        super().__init__(n_features, lookback, hidden, layers, dropout)
        self.rnn = recurrent(self.kind, n_features, hidden, layers, dropout)
        self.out = Head(hidden, dropout)

    def forward(self, x):
        return self.out(run_recurrent(self.rnn, x)[:, -1])


class LSTM(RNN):
    kind = "lstm"


class GRU(RNN):
    kind = "gru"


class ALSTM(SequenceModel):
    def __init__(self, n_features, lookback, hidden=64, layers=2, dropout=0.0, rnn="lstm"):
        super().__init__(n_features, lookback, hidden, layers, dropout, rnn=rnn)
        self.embed = nn.Sequential(nn.Linear(n_features, hidden), nn.Tanh())
        self.rnn = recurrent(rnn, hidden, hidden, layers, dropout)
        self.attention = TemporalAttention(hidden, dropout)
        self.out = Head(2 * hidden, 0.0)

    def forward(self, x):
        states = run_recurrent(self.rnn, self.embed(x))
        return self.out(torch.cat([states[:, -1], self.attention(states)], dim=-1))


class Transformer(SequenceModel):
    def __init__(self, n_features, lookback, hidden=64, layers=2, dropout=0.0, heads=4):
        if hidden % heads:
            raise BadInputError(f"transformer hidden size {hidden} must be a multiple of heads={heads}")
        super().__init__(n_features, lookback, hidden, layers, dropout, heads=heads)
        self.embed = nn.Linear(n_features, hidden)
        self.positions = SinusoidalPositions(hidden, lookback)
        layer = nn.TransformerEncoderLayer(hidden, heads, dim_feedforward=4 * hidden, dropout=dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(hidden)
        self.out = Head(hidden, 0.0)

    def forward(self, x):
        states = self.encoder(self.positions(self.embed(x)))
        return self.out(self.norm(states[:, -1]))


class TCN(SequenceModel):
    def __init__(self, n_features, lookback, hidden=64, layers=2, dropout=0.0, kernel_size=3):
        super().__init__(n_features, lookback, hidden, layers, dropout, kernel_size=kernel_size)
        widths = [n_features] + [hidden] * layers
        self.blocks = nn.Sequential(*(CausalConvBlock(a, b, kernel_size, 2 ** i, dropout)
                                      for i, (a, b) in enumerate(zip(widths, widths[1:]))))
        self.out = Head(hidden, 0.0)

    def forward(self, x):
        return self.out(self.blocks(x.transpose(1, 2))[:, :, -1])


# ----------------------------------------------------------------------------------------- registry
MODELS: dict[str, type[SequenceModel]] = {"linear": Linear, "mlp": MLP, "lstm": LSTM, "gru": GRU,
                                          "alstm": ALSTM, "transformer": Transformer, "tcn": TCN}
MODEL_NAMES = {cls: name for name, cls in MODELS.items()}


def build_model(name: str, n_features: int, lookback: int, hidden: int = 64, layers: int = 2,
                dropout: float = 0.0, **options: Any) -> SequenceModel:
    """A model from the registry by name; ``options`` are model-specific (alstm: rnn; transformer: heads;
    tcn: kernel_size). Unknown names or options are a BadInputError."""
    cls = MODELS.get(str(name).lower())
    if cls is None:
        raise BadInputError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    for what, value in (("n_features", n_features), ("lookback", lookback), ("hidden", hidden),
                        ("layers", layers)):
        if not isinstance(value, int) or value < 1:
            raise BadInputError(f"{what} must be a positive integer, got {value!r}")
    if not 0.0 <= dropout < 1.0:
        raise BadInputError(f"dropout must be in [0, 1), got {dropout!r}")
    try:
        return cls(n_features, lookback, hidden=hidden, layers=layers, dropout=dropout, **options)
    except TypeError:
        raise BadInputError(f"model {name!r} takes no option(s) {sorted(options)}") from None
