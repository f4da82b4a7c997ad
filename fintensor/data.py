"""Windowed samples from a (time, stock, feature) panel, without materialising a single window.

A sample is a pair (t, stock): the ``lookback`` rows of features up to and including t, and the label at
t. The panel is kept once, stock-major (stock, time, feature) and flat, so the window of sample (t, n)
is the contiguous run of ``lookback * n_features`` numbers starting at row ``n*T + t - lookback + 1``. A
strided view makes that a (rows, lookback, features) array of every window at no cost, and a minibatch
is one ``index_select`` of it at precomputed sample positions ``n*T + t`` — on the CPU or the GPU, with
no per-sample Python and no DataLoader workers. Memory stays about one panel.

On the CPU a gather uses one intra-op thread per GATHER_GRAIN bytes it writes: a minibatch (800 windows
of 60 x 20 floats: 3.8 MB, about 1 ms) runs on one thread. torch would spread it over every core, and
an OpenMP team must wait for its slowest thread: when another process holds a core, a few-millisecond
copy stalls for a scheduler slice (measured on 2 cores: 2 threads 1.5x faster than 1 when idle, 1.3x
slower with one core busy, 7x slower with both busy). Large gathers (scoring) still use the threads.
A whole-day batch whose samples are consecutive stocks needs no copy at all: in the stock-major panel,
``panel[n0:n1, t-lookback+1:t+1]`` already is its (stocks, lookback, F) windows.

Rules (all without look-ahead):
- missing="drop": a sample needs every feature of every row of its window observed (mask True and
  finite) and its label observed. missing="zero": a sample needs its stock observed at t (any feature)
  and its label; every missing value is filled with 0 after normalisation, i.e. with the training mean
  (feature_norm) or the day's cross-sectional mean (cs_norm).
- cs_norm ("zscore" | "rank"): per day, across stocks, per feature; "rank" maps average ranks to
  standard-normal quantiles ndtri((rank - 0.5) / n). A day with < 2 values or no spread maps to 0.
- feature_norm ("zscore" | "robust"): per feature, fitted on the rows of the training segment only
  (robust = median and 1.4826 x MAD, like qlib's RobustZScoreNorm), then clipped to +-clip.
- label_norm: the training target is the label normalised per day (cross-sectional); evaluation
  always uses the raw label.
- Segments are date ranges that must not overlap; a sample at t belongs to a segment when t and every
  date its label reads (t + label_reach) fall inside it, so between the last sample of one segment and
  the first of the next there is a gap of at least the label reach (lag + horizon).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from . import ondisk
from .errors import BadInputError
from .rolling._parallel import in_ranges
from .tensor import StockTensor, _to_datetime64

MISSING = ("drop", "zero")
CS_NORMS = ("zscore", "rank")
FEATURE_NORMS = ("zscore", "robust")
PANEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
GATHER_GRAIN = 8 << 20  # bytes a CPU gather writes per intra-op thread (so each thread copies for milliseconds)
DEFAULT_SPLIT = (0.6, 0.2, 0.2)
SEGMENT_NAMES = ("train", "valid", "test")


# ---------------------------------------------------------------------------- cross-sectional maps
def average_rank(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks along the last dim with ties averaged (pandas ``method="average"``); NaN stays NaN."""
    ordered, order = torch.sort(x, dim=-1, stable=True)  # NaN sort last
    n = x.shape[-1]
    idx = torch.arange(n, device=x.device).expand_as(ordered)
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[..., 1:] = ordered[..., 1:] != ordered[..., :-1]
    ends = torch.ones_like(starts)
    ends[..., :-1] = starts[..., 1:]
    first = torch.where(starts, idx, 0).cummax(-1).values
    last = torch.where(ends, idx, n).flip(-1).cummin(-1).values.flip(-1)
    ranks = torch.empty_like(x, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    ranks.scatter_(-1, order, ((first + last).to(ranks.dtype) / 2 + 1))
    return ranks.masked_fill_(torch.isnan(x), float("nan"))


def cs_zscore(x: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std (ddof=1) along the last dim, NaN-aware; rows with < 2 values or no spread -> 0."""
    ok = ~torch.isnan(x)
    n = ok.sum(-1, keepdim=True)
    mean = torch.where(ok, x, 0).sum(-1, keepdim=True) / n.clamp(min=1)
    dev = torch.where(ok, x - mean, 0)
    std = (dev.square().sum(-1, keepdim=True) / (n - 1).clamp(min=1)).sqrt()
    out = torch.where(std > 0, dev / torch.where(std > 0, std, 1), 0)
    return out.masked_fill_(~ok, float("nan"))


def cs_rank_gauss(x: torch.Tensor) -> torch.Tensor:
    """Average ranks along the last dim mapped to normal quantiles ndtri((rank - 0.5) / n); NaN-aware."""
    n = (~torch.isnan(x)).sum(-1, keepdim=True).clamp(min=1)
    return torch.special.ndtri((average_rank(x) - 0.5) / n)


def _cs_map(name: str):
    return {"zscore": cs_zscore, "rank": cs_rank_gauss}[name]


# --------------------------------------------------------------------------------- normaliser
@dataclass
class Normaliser:
    """Per-feature (x - center) / scale, then clipped to +-clip; fitted on the training segment only."""

    kind: str
    center: torch.Tensor
    scale: torch.Tensor
    clip: float | None = None

    @classmethod
    def fit(cls, kind: str, rows: torch.Tensor, names: Sequence[str], clip: float | None) -> "Normaliser":
        """Fit on ``rows`` (..., F) with NaN where unobserved. A feature with no observed value is an error;
        a constant feature gets scale 1."""
        if kind not in FEATURE_NORMS:
            raise BadInputError(f"unknown feature_norm {kind!r}; use one of {FEATURE_NORMS} or None")
        center = torch.empty(rows.shape[-1], dtype=torch.float64)
        scale = torch.empty_like(center)
        for f in range(rows.shape[-1]):
            col = rows[..., f].reshape(-1)
            col = col[~torch.isnan(col)].double()
            if col.numel() == 0:
                raise BadInputError(f"feature {names[f]!r} has no observed value in the training segment; "
                                    "drop it or choose another training range")
            if kind == "zscore":
                center[f], scale[f] = col.mean(), col.std(correction=0)
            else:
                med = _median(col)
                center[f], scale[f] = med, _median((col - med).abs()) * 1.4826
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return cls(kind, center.float(), scale.float(), clip)

    def apply_(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` (..., F) in place."""
        x.sub_(self.center.to(x.device)).div_(self.scale.to(x.device))
        if self.clip is not None:
            x.clamp_(-self.clip, self.clip)
        return x

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, JSON-able settings) for a checkpoint."""
        return {"center": self.center, "scale": self.scale}, {"kind": self.kind, "clip": self.clip}

    @classmethod
    def from_state(cls, tensors: Mapping[str, torch.Tensor], settings: Mapping[str, Any]) -> "Normaliser":
        return cls(settings["kind"], tensors["center"].float(), tensors["scale"].float(), settings["clip"])


def _median(v: torch.Tensor) -> torch.Tensor:
    """The median with the two middle values averaged for an even count (like numpy)."""
    n = v.numel()
    hi = v.kthvalue(n // 2 + 1).values
    return hi if n % 2 else (v.kthvalue(n // 2).values + hi) / 2


# ------------------------------------------------------------------------------------------ segments
@dataclass(frozen=True)
class Segment:
    """A date range [start, end] of the time axis (positions first..last, inclusive)."""

    name: str
    start: str
    end: str
    first: int
    last: int


def _text(d: np.datetime64) -> str:
    return str(d.astype("datetime64[D]")) if np.datetime_data(d.dtype)[0] == "D" else str(d)[:19]


def split_dates(times: np.ndarray, fractions: Sequence[float] = DEFAULT_SPLIT) -> dict[str, tuple[str, str]]:
    """Consecutive train/valid/test date ranges covering ``fractions`` of the time axis."""
    if len(fractions) not in (1, 2, 3) or any(f <= 0 for f in fractions) or sum(fractions) > 1 + 1e-9:
        raise BadInputError(f"split fractions {tuple(fractions)} must be 1-3 positive numbers summing to <= 1")
    bounds = np.round(np.cumsum([0.0, *fractions]) * len(times)).astype(int)
    out = {}
    for name, a, b in zip(SEGMENT_NAMES, bounds[:-1], bounds[1:]):
        if b <= a:
            raise BadInputError(f"split {tuple(fractions)} leaves segment {name!r} without dates "
                                f"({len(times)} time steps)")
        out[name] = (_text(times[a]), _text(times[b - 1]))
    return out


def resolve_segments(times: np.ndarray, segments) -> dict[str, Segment]:
    """Segments as positions on ``times``: a mapping name -> (start, end) (inclusive dates, None = open) or
    a sequence of fractions for train/valid/test (default 0.6/0.2/0.2). Overlaps and empty ranges are errors."""
    if segments is None:
        segments = DEFAULT_SPLIT
    if not isinstance(segments, Mapping):
        segments = split_dates(times, tuple(segments))
    if "train" not in segments:
        raise BadInputError(f"segments {sorted(segments)} need a 'train' segment")
    out = {}
    for name, rng in segments.items():
        if not isinstance(rng, (tuple, list)) or len(rng) != 2:
            raise BadInputError(f"segment {name!r} must be a (start, end) pair of dates, got {rng!r}")
        what = f"segment {name!r}"
        lo = 0 if rng[0] is None else int(np.searchsorted(times, _to_datetime64(rng[0], times, what)[0], "left"))
        if rng[1] is None:
            hi = len(times) - 1
        else:
            end, whole_day = _to_datetime64(rng[1], times, what)
            if np.datetime_data(times.dtype)[0] != "D" and whole_day:
                end = end + np.timedelta64(1, "D") - np.timedelta64(1, "ns")  # a date names its whole day
            hi = int(np.searchsorted(times, end, "right")) - 1
        if hi < lo:
            raise BadInputError(f"segment {name!r} {tuple(rng)} contains no date of the tensor "
                                f"({_text(times[0])} .. {_text(times[-1])})")
        out[name] = Segment(name, _text(times[lo]), _text(times[hi]), lo, hi)
    ordered = sorted(out.values(), key=lambda s: s.first)
    for a, b in zip(ordered, ordered[1:]):
        if b.first <= a.last:
            raise BadInputError(f"segments {a.name!r} ({a.start} .. {a.end}) and {b.name!r} ({b.start} .. "
                                f"{b.end}) overlap; give disjoint date ranges")
    return out


# --------------------------------------------------------------------------------------------- batch
@dataclass
class Batch:
    """One rank's share of a global minibatch.

    ``x`` (B, lookback, F), ``y`` training target, ``raw`` raw label, ``positions`` (n*T + t),
    ``group`` day number of each sample inside the batch (day batches, else None), ``n_groups``, and the
    global batch's sample and day counts, so losses can be scaled to equal a single process's.
    In a whole-day batch ``x``, ``y``, ``raw`` and ``group`` may be views of the Windows' tensors: read
    them, do not modify them in place (``x.clone()`` first).
    """

    x: torch.Tensor
    y: torch.Tensor
    raw: torch.Tensor
    positions: torch.Tensor
    group: torch.Tensor | None
    n_groups: int
    global_samples: int
    global_days: int


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The seed of everything random in one epoch (batch order; dropout on each rank): runs repeat and
    resume exactly without carrying RNG state."""
    return (int(seed) * 1_000_003 + int(epoch) * 1_009 + int(rank)) % (2**63)


# ------------------------------------------------------------------------------------------- windows
class Windows:
    """Samples (t, stock) of a features panel and labels, with normalisers, segments and batching.

    ``features``: StockTensor (time, stock, feature); ``labels``: StockTensor (time, stock) or None (for
    scoring). ``normaliser``: a fitted Normaliser to reuse (scoring with a trained model); otherwise one is
    fitted on the 'train' segment when ``feature_norm`` is set. ``device``: where the panel lives (a CUDA
    device when it fits in half its free memory, else pinned host memory with batches copied over).
    ``panel_dtype="bfloat16"`` stores the normalised panel in half the memory (values rounded to bf16, as
    bf16 autocast rounds a model's inputs anyway); batches are float32 either way.

    A features tensor backed by an on-disk panel (``ft.features.compute(..., out=PATH)``) is read in place
    (``in_memory=None``, the default, or False): minibatches are gathered straight from the memory map and
    normalised as they are gathered (the same float32 operations as the in-memory path, so the same
    numbers), the normaliser is fitted on the train segment in a streaming pass over blocks of stocks, and
    no window or normalised copy of the panel is made. The map is then advised for random access
    (``ondisk.advise``: no read-around of megabytes per page fault). ``in_memory=True`` loads it into RAM.
    """

    def __init__(self, features, labels=None, lookback: int = 20, *, segments=None, label_reach: int = 0,
                 missing: str = "drop", cs_norm: str | None = None, feature_norm: str | None = "zscore",
                 label_norm: str | None = "zscore", clip: float | None = 3.0,
                 normaliser: Normaliser | None = None, device: str | torch.device = "cpu",
                 panel_dtype: str = "float32", in_memory: bool | None = None):
        check_tensor(features, ("time", "stock", "feature"), "features")
        _choice("in_memory", in_memory, (None, True, False))
        mapped = None if in_memory else ondisk.stock_major(features)
        if in_memory is False and mapped is None:
            raise BadInputError("in_memory=False needs features backed by an on-disk panel "
                                "(ft.features.compute(..., out=PATH) or fintensor.ondisk.load(PATH))")
        T, N, F = features.shape
        _choice("missing", missing, MISSING)
        _choice("cs_norm", cs_norm, (None, *CS_NORMS))
        _choice("label_norm", label_norm, (None, *CS_NORMS))
        _choice("feature_norm", feature_norm, (None, *FEATURE_NORMS))
        _choice("panel_dtype", panel_dtype, tuple(PANEL_DTYPES))
        if isinstance(lookback, bool) or not isinstance(lookback, (int, np.integer)) or lookback < 1:
            raise BadInputError(f"lookback must be a positive integer, got {lookback!r}")
        lookback = int(lookback)
        if normaliser is not None and normaliser.center.numel() != F:
            raise BadInputError(f"the normaliser was fitted on {normaliser.center.numel()} features; "
                                f"these features have {F}")
        if lookback > T:
            raise BadInputError(f"lookback {lookback} is longer than the {T} time steps of the tensor "
                                f"({_text(features.coords['time'][0])} .. {_text(features.coords['time'][-1])}); "
                                "use a shorter lookback or a longer range")
        self.times = features.coords["time"]
        self.stocks = features.coords["stock"]
        self.feature_names = [str(f) for f in features.coords["feature"]]
        self.lookback, self.n_features, self.missing = lookback, F, missing
        self.label_reach = int(label_reach)
        self.device = torch.device(device)
        dtype = PANEL_DTYPES[panel_dtype]
        panel_device = self.device if self.device.type == "cpu" or _fits(T * N * F * dtype.itemsize, self.device) \
            else torch.device("cpu")

        self.segments: dict[str, Segment] = {} if labels is None and segments is None else \
            resolve_segments(self.times, segments)
        self._mapped = mapped is not None
        if self._mapped:
            if cs_norm:
                raise BadInputError("cs_norm normalises whole days across stocks, which a panel read in place "
                                    "cannot do per batch; normalise the features before writing the panel, or "
                                    "pass in_memory=True to load it into RAM")
            values, observed = mapped
            self._complete, row_ok = _mapped_rows_ok(values, observed, missing)
            if normaliser is None and feature_norm:
                if "train" not in self.segments:
                    raise BadInputError("feature_norm needs a 'train' segment to fit on")
                normaliser = _fit_mapped(feature_norm, values, observed, self.segments["train"], self.feature_names,
                                         clip)
            self.normaliser, self._panel_dtype = normaliser, dtype
            for x in (values, observed):  # the passes above read in order; training reads at random
                ondisk.advise(x, "random")
            self.panel = values  # (N, T, F) memory map, raw (not normalised)
            self._windows = values.reshape(-1).as_strided((N * T - lookback + 1, lookback, F), (F, F, 1))
            self._mask_panel = observed
            self._float_on_device = False
        else:
            panel, row_ok = _load_panel(features, panel_device, missing)
            if cs_norm:
                cs = _cs_map(cs_norm)
                for f in range(F):  # one feature at a time keeps the temporaries small
                    panel[:, :, f] = cs(panel[:, :, f].T.contiguous()).T
            if normaliser is None and feature_norm:
                if "train" not in self.segments:
                    raise BadInputError("feature_norm needs a 'train' segment to fit on")
                seg = self.segments["train"]
                normaliser = Normaliser.fit(feature_norm, panel[:, seg.first:seg.last + 1], self.feature_names, clip)
            if normaliser is not None:
                for rows in panel.split(max(1, 2**24 // max(T * F, 1))):  # in place, a few stocks at a time
                    normaliser.apply_(rows)
            self.normaliser = normaliser
            panel = panel.nan_to_num_(nan=0.0).to(dtype)
            self.panel = panel.pin_memory() if panel.device != self.device else panel  # (N, T, F)
            self._windows = self.panel.view(-1).as_strided((N * T - lookback + 1, lookback, F), (F, F, 1))
            self._float_on_device = self.panel.device == self.device and self.panel.dtype == torch.float32
        self._one_day = torch.zeros(N, dtype=torch.long, device=self.device)  # group ids of a one-day batch

        # usable windows: rows t-lookback+1 .. t all complete ("drop"), or row t observed at all ("zero")
        if missing == "drop":
            incomplete = (~row_ok).to(torch.int32).cumsum(1)
            window_ok = incomplete.clone()
            window_ok[:, lookback:] -= incomplete[:, :-lookback]
            window_ok = window_ok == 0
        else:
            window_ok = row_ok
        window_ok[:, : lookback - 1] = False
        self.window_ok = window_ok  # (N, T)

        if labels is None:
            self.targets = None
            self.sample_ok = window_ok
        else:
            self._set_labels(labels, label_norm)
        self.positions = {name: self._segment_positions(seg) for name, seg in self.segments.items()}

    # --------------------------------------------------------------------------------- setup
    def _set_labels(self, labels, label_norm: str | None) -> None:
        check_tensor(labels, ("time", "stock"), "labels")
        if labels.shape != (len(self.times), len(self.stocks)):
            raise BadInputError(f"labels have shape {labels.shape} but features have (time, stock) = "
                                f"({len(self.times)}, {len(self.stocks)}); build both from the same tensor")
        if not (np.array_equal(labels.coords["time"], self.times)
                and np.array_equal(labels.coords["stock"], self.stocks)):
            raise BadInputError("labels and features have different time or stock coordinates; "
                                "build both from the same tensor")
        raw = labels.values.to(self.panel.device).to(torch.float32, copy=True)
        ok = labels.mask.to(raw.device) & torch.isfinite(raw)
        raw.masked_fill_(~ok, float("nan"))
        target = _cs_map(label_norm)(raw) if label_norm else raw.clone()
        # (N*T, 2): training target and raw label of position n*T + t, side by side so one gather fetches both
        self.targets = torch.stack([target.T.reshape(-1), raw.T.reshape(-1)], dim=1)
        self.sample_ok = self.window_ok & ok.T

    @property
    def labels(self) -> torch.Tensor:
        """The training target of each position n*T + t (label normalised per day)."""
        return self.targets[:, 0]

    @property
    def raw_labels(self) -> torch.Tensor:
        """The raw label of each position n*T + t (what evaluation compares with)."""
        return self.targets[:, 1]

    def _segment_positions(self, seg: Segment) -> torch.Tensor:
        """Positions n*T + t of the segment's samples, ordered by (t, stock)."""
        T = len(self.times)
        last = seg.last - self.label_reach
        ok = self.sample_ok[:, seg.first: max(seg.first, last + 1)]  # (N, days)
        t, n = ok.T.nonzero(as_tuple=True)
        if t.numel() == 0:
            days = seg.last - seg.first + 1
            raise BadInputError(
                f"segment {seg.name!r} ({seg.start} .. {seg.end}, {days} time steps) has no usable sample: "
                f"labels read {self.label_reach} step(s) ahead and windows need {self.lookback} observed "
                f"step(s) (missing={self.missing!r}); lengthen the segment or shorten lookback/horizon")
        return (n * T + t + seg.first).to(torch.long)

    # ------------------------------------------------------------------------------- samples
    def gather(self, positions: torch.Tensor) -> torch.Tensor:
        """Windows of the samples at ``positions`` (n*T + t): (B, lookback, F), one index_select."""
        starts = positions.to(self.panel.device) - (self.lookback - 1)
        if self._mapped and len(starts) and (int(starts.min()) < 0 or int(starts.max()) >= len(self._windows)):
            raise BadInputError(f"positions must lie in [{self.lookback - 1}, {len(self._windows) + self.lookback - 2}]"
                                " (n*T + t of a window inside the panel), got "
                                f"{int(positions.min())} .. {int(positions.max())}")
        with self._copy_threads(len(starts) * self.lookback * self.n_features * self.panel.element_size()):
            x = self._gather_mapped(starts) if self._mapped else torch.index_select(self._windows, 0, starts)
        return self._on_device(x)

    def _gather_mapped(self, starts: torch.Tensor) -> torch.Tensor:
        """Windows read from the map as the in-memory panel holds them: float32, normalised and clipped, 0
        where unobserved (mask False or not finite), rounded through the panel dtype: each window copied
        whole and normalised in place (the same float32 subtract, divide and clamp as ``Normaliser.apply_``)."""
        F = self.n_features
        if self.normaliser is None:
            center, scale, clip = np.zeros(F, np.float32), np.ones(F, np.float32), np.inf
        else:
            center, scale = self.normaliser.center.numpy(), self.normaliser.scale.numpy()
            clip = np.inf if self.normaliser.clip is None else float(self.normaliser.clip)
        center, scale = np.tile(center, self.lookback), np.tile(scale, self.lookback)
        x = np.empty((len(starts), self.lookback, F), dtype=np.float32)
        panel = (self.panel.numpy().reshape(-1), self._mask_panel.numpy().reshape(-1),
                 self._complete.numpy().reshape(-1), center, scale, np.float32(clip))
        s = starts.numpy()
        in_ranges(lambda a, b: _gather_normalised(*panel, s[a:b], x[a:b]), len(s),
                  torch.get_num_threads())  # as many threads as the copy policy allows
        out = torch.from_numpy(x)
        return out if self._panel_dtype == torch.float32 else out.to(self._panel_dtype).float()

    def _on_device(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` moved to the training device (the copy overlaps from pinned memory) as float32."""
        if self._float_on_device:  # the common case: not even a no-op call
            return x
        x = x.to(self.device, non_blocking=True)
        with self._copy_threads(x.numel() * 4):
            return x.float()

    def _copy_threads(self, nbytes: int) -> intra_op_threads:
        """A CPU copy writing ``nbytes`` runs on one intra-op thread per GATHER_GRAIN bytes (see the top)."""
        return intra_op_threads(nbytes // GATHER_GRAIN + 1 if self.panel.is_cpu else None)

    def score_positions(self) -> torch.Tensor:
        """Every position with a usable window (labels not needed), ordered by (t, stock)."""
        t, n = self.window_ok.T.nonzero(as_tuple=True)
        return (n * len(self.times) + t).to(torch.long)

    def batch(self, positions: torch.Tensor, group=None, n_groups=0, global_samples=None, global_days=0) -> Batch:
        """Windows and labels of ``positions``: two gathers in all."""
        pos = positions.to(self.panel.device)
        y = torch.index_select(self.targets, 0, pos).to(self.device, non_blocking=True)
        return Batch(self.gather(pos), y[:, 0], y[:, 1], pos, group, n_groups,
                     len(pos) if global_samples is None else global_samples, global_days)

    def _day_view(self, positions: torch.Tensor, first: int, global_samples: int, global_days: int) -> Batch:
        """The batch of one day whose samples are consecutive stocks n0.. from position ``first`` = n0*T + t:
        windows and labels are views (the stock-major ``panel[n0:n0+count, t-L+1:t+1]`` is (count, L, F)),
        so nothing is copied when the panel is float32 on the training device."""
        T, count = len(self.times), len(positions)
        if self._mapped:  # the map holds raw values: gathered and normalised like any batch
            return self.batch(positions, self._one_day[:count], 1, global_samples, global_days)
        n0, t = divmod(first, T)
        x = self.panel[n0:n0 + count, t - self.lookback + 1:t + 1]
        y = self.targets.view(-1, T, 2)[n0:n0 + count, t].to(self.device, non_blocking=True)
        return Batch(self._on_device(x), y[:, 0], y[:, 1], positions, self._one_day[:count], 1, global_samples,
                     global_days)

    def day_index(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For positions ordered by (t, stock): (offset of each day's first sample, samples per day)."""
        t = positions % len(self.times)
        _, counts = torch.unique_consecutive(t, return_counts=True)
        return torch.cumsum(counts, 0) - counts, counts

    def batches(self, segment: str, *, batch_size: int = 800, mode: str = "random", days_per_batch: int = 1,
                shuffle: bool = True, seed: int = 0, epoch: int = 0, rank: int = 0, world: int = 1
                ) -> Iterator[Batch]:
        """Minibatches of a segment for one epoch: ``mode="random"`` (t, stock) samples, ``"day"`` whole
        days. The order is a function of (seed, epoch) only; each global batch is split into ``world``
        contiguous shares and this rank gets share ``rank``."""
        pos = self.positions[segment]
        g = torch.Generator().manual_seed(epoch_seed(seed, epoch))
        if mode == "random":
            if shuffle:  # one permutation per epoch; each batch is then a slice (no kernel)
                pos = pos[torch.randperm(len(pos), generator=g).to(pos.device)]
            for chunk in pos.split(batch_size):
                yield self.batch(chunk.tensor_split(world)[rank] if world > 1 else chunk, global_samples=len(chunk))
        elif mode == "day":
            starts, counts = self.day_index(pos)
            first = pos[starts]
            # a day whose samples are consecutive stocks (typically all of them) is served as a view
            consecutive = (pos[starts + counts - 1] - first == (counts - 1) * len(self.times)).tolist()
            order = (torch.randperm(len(counts), generator=g) if shuffle else torch.arange(len(counts))).tolist()
            start_of, count_of, first_of = starts.tolist(), counts.tolist(), first.tolist()
            for i in range(0, len(order), days_per_batch):
                chunk = order[i:i + days_per_batch]
                days = chunk[_share(len(chunk), world, rank)]
                global_samples = sum(count_of[d] for d in chunk)
                if len(days) == 1 and consecutive[days[0]]:
                    d = days[0]
                    yield self._day_view(pos[start_of[d]:start_of[d] + count_of[d]], first_of[d], global_samples,
                                         len(chunk))
                    continue
                days = torch.tensor(days, dtype=torch.long, device=pos.device)
                c = counts[days]
                # positions of the chosen days, concatenated: each day's start + 0..count-1
                offsets = torch.repeat_interleave(starts[days] - (torch.cumsum(c, 0) - c), c)
                idx = offsets + torch.arange(int(c.sum()), device=pos.device)
                group = torch.repeat_interleave(torch.arange(len(days), device=pos.device), c)
                yield self.batch(pos[idx], group.to(self.device), len(days), global_samples, len(chunk))
        else:
            raise BadInputError(f"unknown batching mode {mode!r}; use 'random' or 'day'")

    def __repr__(self) -> str:
        segs = ", ".join(f"{s.name} {s.start}..{s.end}: {len(self.positions[s.name])} samples"
                         for s in self.segments.values())
        return (f"Windows({len(self.stocks)} stocks x {len(self.times)} steps x {self.n_features} features, "
                f"lookback {self.lookback}, missing={self.missing!r}; {segs or 'no segments'})")


def _load_panel(features, device: torch.device, missing: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 panel (stock, time, feature), NaN where unobserved (mask False or not finite), and
    which (stock, t) rows are complete ("drop") or observed at all ("zero"). Built a few stocks at a
    time, so the only large allocation is the panel itself."""
    T, N, F = features.shape
    panel = torch.empty((N, T, F), dtype=torch.float32, device=device)
    row_ok = torch.empty((N, T), dtype=torch.bool, device=device)
    step = max(1, 2**20 // max(T * F, 1))
    for a in range(0, N, step):
        part = panel[a:a + step]
        part.copy_(features.values[:, a:a + step].permute(1, 0, 2))  # transposed, converted, moved
        unobserved = ~torch.isfinite(part) | ~features.mask[:, a:a + step].to(device).permute(1, 0, 2)
        part.masked_fill_(unobserved, float("nan"))
        row_ok[a:a + step] = ~unobserved.any(-1) if missing == "drop" else ~unobserved.all(-1)
    return panel, row_ok


@intrinsic
def _memcpy(typingctx, dst, src, nbytes):
    """Copy ``nbytes`` from the data of array ``src`` to that of ``dst`` with LLVM's memcpy (libc's: on a
    window of kilobytes it runs at about 2.5x the speed of a copy loop, as it skips reading ``dst`` first)."""
    def codegen(context, builder, signature, args):
        d = context.make_array(signature.args[0])(context, builder, args[0])
        s = context.make_array(signature.args[1])(context, builder, args[1])
        cgutils.raw_memcpy(builder, builder.bitcast(d.data, cgutils.voidptr_t),
                           builder.bitcast(s.data, cgutils.voidptr_t), args[2], 1)
        return context.get_dummy_value()

    return types.void(dst, src, nbytes), codegen


def _copy(dst, src):
    """dst[:] = src for 1-D arrays of the same length (compiled below)."""


@overload(_copy, jit_options=dict(nogil=True))
def _copy_overload(dst, src):
    if dst.dtype == src.dtype:  # the common case: a float32 panel; one memcpy
        return lambda dst, src: _memcpy(dst, src, np.int64(dst.size * dst.itemsize))

    def convert(dst, src):
        for i in range(dst.size):
            dst[i] = src[i]
    return convert


@njit(cache=True, nogil=True, error_model="numpy")
def _gather_normalised(values, observed, complete, center, scale, clip, starts, out):
    """out[b] = the (lookback, F) rows from flat row ``starts[b]`` of the (stock*time, F) panel, each value
    (v - center) / scale clipped to +-clip in float32, 0 where unobserved or not finite. ``center`` and
    ``scale`` are tiled to lookback * F, so a window is one flat run. Each window is copied whole (one
    memcpy) and normalised in place while it is in the L1 cache; a window whose rows are all ``complete``
    (every value observed and finite: every missing="drop" sample) is one branch-free loop that
    vectorises, and only the rows of other windows that are not complete read the mask."""
    B, L, F = out.shape
    n = L * F
    for b in range(B):
        x = out[b].reshape(-1)
        base = starts[b] * F
        _copy(x, values[base:base + n])
        whole = True
        for r in range(L):
            whole &= complete[starts[b] + r]
        if whole:
            for i in range(n):
                x[i] = min(max((x[i] - center[i]) / scale[i], -clip), clip)
            continue
        for r in range(L):
            a = r * F
            if complete[starts[b] + r]:
                for i in range(a, a + F):
                    x[i] = min(max((x[i] - center[i]) / scale[i], -clip), clip)
            else:
                for i in range(a, a + F):  # v - v is 0 only for a finite v
                    v = x[i]
                    z = min(max((v - center[i]) / scale[i], -clip), clip)
                    x[i] = z if observed[base + i] and v - v == 0 else np.float32(0.0)


def _stock_blocks(values: torch.Tensor, nbytes: int = 64 << 20) -> range:
    """Starts of blocks of stocks of a (stock, time, feature) panel of about ``nbytes`` each."""
    N, T, F = values.shape
    return range(0, N, max(1, nbytes // max(T * F * values.element_size(), 1)))


def _mapped_rows_ok(values: torch.Tensor, observed: torch.Tensor, missing: str
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``_load_panel``'s row_ok for a (stock, time, feature) map, and which rows are complete (every value
    observed and finite; the gather skips their mask), read a block of stocks at a time."""
    N, T, F = values.shape
    complete = torch.empty((N, T), dtype=torch.bool)
    row_ok = complete if missing == "drop" else torch.empty((N, T), dtype=torch.bool)
    step = _stock_blocks(values).step
    for a in _stock_blocks(values):
        unobserved = ~torch.isfinite(values[a:a + step]) | ~observed[a:a + step]
        complete[a:a + step] = ~unobserved.any(-1)
        if missing != "drop":
            row_ok[a:a + step] = ~unobserved.all(-1)
    return complete, row_ok


def _fit_mapped(kind: str, values: torch.Tensor, observed: torch.Tensor, seg: Segment, names: Sequence[str],
                clip: float | None) -> Normaliser:
    """``Normaliser.fit`` on the train rows of a (stock, time, feature) map without loading it: zscore in two
    streaming float64 passes over blocks of stocks (sums, then squared deviations); robust one feature at a
    time (a median needs all of a feature's values: 1/F of the train rows)."""
    if kind not in FEATURE_NORMS:
        raise BadInputError(f"unknown feature_norm {kind!r}; use one of {FEATURE_NORMS} or None")
    F = values.shape[2]
    rows = slice(seg.first, seg.last + 1)
    step = _stock_blocks(values).step

    def blocks():
        for a in _stock_blocks(values):
            x = values[a:a + step, rows].to(torch.float32)
            ok = observed[a:a + step, rows] & torch.isfinite(x)
            yield x.double().reshape(-1, F), ok.reshape(-1, F)

    if kind == "zscore":
        total = torch.zeros(F, dtype=torch.float64)
        count = torch.zeros(F, dtype=torch.float64)
        for x, ok in blocks():
            total += torch.where(ok, x, 0).sum(0)
            count += ok.sum(0)
        empty = (count == 0).nonzero().flatten().tolist()
        if empty:
            raise BadInputError(f"feature {names[empty[0]]!r} has no observed value in the training segment; "
                                "drop it or choose another training range")
        center = total / count
        squares = torch.zeros(F, dtype=torch.float64)
        for x, ok in blocks():
            squares += torch.where(ok, x - center, 0).square().sum(0)
        scale = (squares / count).sqrt()
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return Normaliser(kind, center.float(), scale.float(), clip)
    fitted = [Normaliser.fit(kind, _mapped_column(values, observed, rows, f), [names[f]], clip) for f in range(F)]
    return Normaliser(kind, torch.cat([n.center for n in fitted]), torch.cat([n.scale for n in fitted]), clip)


def _mapped_column(values: torch.Tensor, observed: torch.Tensor, rows: slice, f: int) -> torch.Tensor:
    """Feature ``f`` of the train rows as a (stock*time, 1) float32 column, NaN where unobserved."""
    col = values[:, rows, f].to(torch.float32)
    col = col.masked_fill(~(observed[:, rows, f] & torch.isfinite(col)), float("nan"))
    return col.reshape(-1, 1)


def _share(n: int, world: int, rank: int) -> slice:
    """Rank ``rank``'s contiguous share of ``n`` items split ``world`` ways (like ``tensor_split``)."""
    size, extra = divmod(n, world)
    lo = rank * size + min(rank, extra)
    return slice(lo, lo + size + (rank < extra))


def _choice(what: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise BadInputError(f"unknown {what} {value!r}; use one of {', '.join(map(repr, allowed))}")


def check_tensor(t, dims: tuple[str, ...], what: str) -> None:
    """Bad input unless ``t`` is a floating-point StockTensor with exactly ``dims``."""
    if not isinstance(t, StockTensor):
        raise BadInputError(f"{what} must be a StockTensor with dims {dims}, got {type(t).__name__}")
    if tuple(t.dims) != dims:
        raise BadInputError(f"{what} must have dims {dims}, got {tuple(t.dims)}")
    if not (t.values.is_floating_point()):
        raise BadInputError(f"{what} must hold floating-point values, got {t.values.dtype}")


class intra_op_threads:  # noqa: N801 (a context manager, named like torch.no_grad)
    """``with intra_op_threads(n):`` runs torch's CPU kernels inside on at most ``n`` intra-op threads (None:
    no limit), then restores the count. torch's thread count is per process: meant for short copies."""

    def __init__(self, limit: int | None):
        self.limit, self.threads = limit, 0

    def __enter__(self) -> None:
        self.threads = torch.get_num_threads()
        if self.limit is not None and self.limit < self.threads:
            torch.set_num_threads(max(1, self.limit))

    def __exit__(self, *exc) -> None:
        if self.limit is not None and self.limit < self.threads:
            torch.set_num_threads(self.threads)


def _fits(nbytes: int, device: torch.device) -> bool:
    """Whether ``nbytes`` fit in half the free memory of a CUDA device."""
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes < free // 2
