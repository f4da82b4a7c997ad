"""Feature library: qlib's Alpha158 and Alpha360 (and any of their features by name) from an OHLCV
panel, computed with the ``fintensor.rolling`` kernels over the whole panel at once, never reading
past the row it describes.

``compute(tensor, "alpha158")`` -> a (time, stock, feature) StockTensor; a dict of (T, N) arrays in
gives a dict of (T, N) arrays out. ``forward_returns(close, horizon, lag)`` makes the labels.

Definitions follow qlib (``qlib/contrib/data/loader.py``, ``qlib/data/ops.py``), with these
deliberate differences:

* Rolling windows need ``min_periods`` valid values (default: the full window) and are NaN before;
  qlib uses ``min_periods=1``, so its first rows come from partial windows. Pass ``min_periods=1``
  to get qlib's behaviour back.
* NaN is missing everywhere: a comparison with a missing value (``$close > Ref($close, 1)`` on the
  first row or after a gap) is missing, not False, so CNTP/CNTN/CNTD skip it instead of counting it
  as a down day; IdxMax/IdxMin skip NaN (np.argmax would pick the NaN).
* RANK is the percentile of the current close in its window (``rank(pct=True)``, 0..1) as in current
  qlib (``percentileofscore / 100``); old qlib versions divided by the window length instead.
* CORR / CORD / RSQR are NaN only when a side is exactly constant in the window; qlib also blanks
  them when the rolling std is below 2e-5 in absolute terms (a threshold that depends on the
  price level).
* VWAP0 (Alpha158) and VWAP0..59 (Alpha360) are left out when the panel has no ``vwap``.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
from numba import njit

from . import builder, ondisk, rolling
from .checks import parse_bytes  # noqa: F401  (features.parse_bytes: kept importable from here)
from .errors import BadInputError
from .fileio import check_output_path
from .tensor import StockTensor

__all__ = ["compute", "compute_block", "forward_returns", "names", "WINDOWS", "KBAR", "ROLLING"]

FIELDS = ("open", "high", "low", "close", "volume", "vwap")
WINDOWS = (5, 10, 20, 30, 60)
KBAR = ("KMID", "KLEN", "KMID2", "KUP", "KUP2", "KLOW", "KLOW2", "KSFT", "KSFT2")
ROLLING = ("ROC", "MA", "STD", "BETA", "RSQR", "RESI", "MAX", "MIN", "QTLU", "QTLD", "RANK", "RSV",
           "IMAX", "IMIN", "IMXD", "CORR", "CORD", "CNTP", "CNTN", "CNTD", "SUMP", "SUMN", "SUMD",
           "VMA", "VSTD", "WVMA", "VSUMP", "VSUMN", "VSUMD")
LAGGED = ("CLOSE", "OPEN", "HIGH", "LOW", "VWAP", "VOLUME")  # Ref($field, d) / $close (volume: / $volume)
DEFAULT_MEMORY = "2GB"  # working memory of an out-of-core feature build
EPS = 1e-12  # qlib's guard in denominators


def _alpha158() -> list[str]:
    return list(KBAR) + ["OPEN0", "HIGH0", "LOW0", "VWAP0"] + [f"{f}{d}" for f in ROLLING for d in WINDOWS]


def _alpha360() -> list[str]:
    return [f"{f}{d}" for f in LAGGED for d in range(59, -1, -1)]


PRESETS: dict[str, Callable[[], list[str]]] = {"alpha158": _alpha158, "alpha360": _alpha360}


# ================================================================================ the panel
class _Panel:
    """The OHLCV fields as float64 (T, N) arrays, the series derived from them (cached), and the
    rolling statistics of the window being computed (cached per window, shared between features:
    RSV reuses MAX and MIN, SUMP/SUMN/SUMD one sum of |change|, ...)."""

    def __init__(self, fields: Mapping[str, np.ndarray], min_periods: int | None):
        self.fields = dict(fields)
        self.min_periods = min_periods
        self.derived: dict[str, np.ndarray] = {}
        self.stats: dict[tuple, np.ndarray] = {}
        self.T = next(iter(self.fields.values())).shape[0]

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self.fields:
            return self.fields[name]
        if name not in self.derived:
            self.derived[name] = _DERIVED[name](self)
        return self.derived[name]

    def minp(self, d: int) -> int:
        return d if self.min_periods is None else min(self.min_periods, d)

    def stat(self, kind: str, name: str, d: int, **options) -> np.ndarray:
        """``rolling.<kind>(series, d, **options)`` with this panel's min_periods, computed once."""
        key = (kind, name, d, tuple(sorted(options.items())))
        if key not in self.stats:
            self.stats[key] = getattr(rolling, kind)(self[name], d, min_periods=self.minp(d), **options)
        return self.stats[key]

    def pair(self, kind: str, y: str, x: str, d: int) -> np.ndarray:
        """``rolling.<kind>(y, x, d)`` (corr, beta, regression residual or r-squared), computed once."""
        key = (kind, y, x, d)
        if key not in self.stats:
            self.stats[key] = getattr(rolling, kind)(self[y], self[x], d, min_periods=self.minp(d))
        return self.stats[key]

    def order(self, name: str, d: int) -> list[np.ndarray]:
        """The 0.8 and 0.2 quantiles and the percentile rank of the current value in each window,
        from one pass over the sorted windows, computed once."""
        key = ("order", name, d)
        if key not in self.stats:
            self.stats[key] = rolling._order_stats(self[name], d, self.minp(d), quantiles=(0.8, 0.2), pct_rank=True)
        return self.stats[key]

    def lag(self, name: str, d: int) -> np.ndarray:
        return self[name] if d == 0 else rolling.shift(self[name], d)


def _compare(p: _Panel, sign: float) -> np.ndarray:
    """1.0 where close moved in ``sign``'s direction since the previous row, 0.0 where not, NaN where
    either close is missing."""
    change = p["dclose"]
    return np.where(np.isnan(change), np.nan, (sign * change > 0).astype(np.float64))


_DERIVED: dict[str, Callable[[_Panel], np.ndarray]] = {
    "prev_close": lambda p: rolling.shift(p["close"], 1),
    "prev_volume": lambda p: rolling.shift(p["volume"], 1),
    "dclose": lambda p: p["close"] - p["prev_close"],
    "dvolume": lambda p: p["volume"] - p["prev_volume"],
    "close_up": lambda p: np.maximum(p["dclose"], 0.0),  # Greater($close - Ref($close, 1), 0)
    "close_down": lambda p: np.maximum(-p["dclose"], 0.0),
    "close_abs": lambda p: np.abs(p["dclose"]),
    "volume_up": lambda p: np.maximum(p["dvolume"], 0.0),
    "volume_down": lambda p: np.maximum(-p["dvolume"], 0.0),
    "volume_abs": lambda p: np.abs(p["dvolume"]),
    "rose": lambda p: _compare(p, 1.0),
    "fell": lambda p: _compare(p, -1.0),
    "close_ratio": lambda p: p["close"] / p["prev_close"],
    "log_volume1": lambda p: np.log(p["volume"] + 1.0),
    "volume_change": lambda p: np.log(p["volume"] / p["prev_volume"] + 1.0),
    "weighted_move": lambda p: np.abs(p["close_ratio"] - 1.0) * p["volume"],
    "range": lambda p: p["high"] - p["low"] + EPS,
    "body_top": lambda p: np.maximum(p["open"], p["close"]),
    "body_bottom": lambda p: np.minimum(p["open"], p["close"]),
    "volume_eps": lambda p: p["volume"] + EPS,
    "time": lambda p: np.arange(p.T, dtype=np.float64),  # the regression's x: one series for all
}


def _sum_ratio(p: _Panel, d: int, part: str, whole: str) -> np.ndarray:
    return p.stat("sum", part, d) / (p.stat("sum", whole, d) + EPS)


def _net_ratio(p: _Panel, d: int, kind: str) -> np.ndarray:
    return (p.stat("sum", f"{kind}_up", d) - p.stat("sum", f"{kind}_down", d)) / (p.stat("sum", f"{kind}_abs", d) + EPS)


# feature families of one window d: name -> f(panel, d) (qlib's expression in the comment)
_ROLLING: dict[str, Callable[[_Panel, int], np.ndarray]] = {
    "ROC": lambda p, d: p.lag("close", d) / p["close"],                          # Ref($close,d)/$close
    "MA": lambda p, d: p.stat("mean", "close", d) / p["close"],                  # Mean($close,d)/$close
    "STD": lambda p, d: p.stat("std", "close", d) / p["close"],                  # Std($close,d)/$close
    "BETA": lambda p, d: p.pair("beta", "close", "time", d) / p["close"],     # Slope($close,d)/$close
    "RSQR": lambda p, d: p.pair("_rsquare", "close", "time", d),              # Rsquare($close,d)
    "RESI": lambda p, d: p.pair("_resid", "close", "time", d) / p["close"],   # Resi($close,d)/$close
    "MAX": lambda p, d: p.stat("max", "high", d) / p["close"],                   # Max($high,d)/$close
    "MIN": lambda p, d: p.stat("min", "low", d) / p["close"],                    # Min($low,d)/$close
    "QTLU": lambda p, d: p.order("close", d)[0] / p["close"],                    # Quantile($close,d,.8)/$close
    "QTLD": lambda p, d: p.order("close", d)[1] / p["close"],                    # Quantile($close,d,.2)/$close
    "RANK": lambda p, d: p.order("close", d)[2],                                 # Rank($close,d)
    "RSV": lambda p, d: (p["close"] - p.stat("min", "low", d))                   # ($close-Min($low,d))/
    / (p.stat("max", "high", d) - p.stat("min", "low", d) + EPS),               # (Max($high,d)-Min($low,d)+eps)
    "IMAX": lambda p, d: (p.stat("argmax", "high", d) + 1.0) / d,                # IdxMax($high,d)/d
    "IMIN": lambda p, d: (p.stat("argmin", "low", d) + 1.0) / d,                 # IdxMin($low,d)/d
    "IMXD": lambda p, d: (p.stat("argmax", "high", d) - p.stat("argmin", "low", d)) / d,
    "CORR": lambda p, d: p.pair("corr", "close", "log_volume1", d),           # Corr($close,Log($volume+1),d)
    "CORD": lambda p, d: p.pair("corr", "close_ratio", "volume_change", d),   # Corr($close/Ref($close,1),
    #                                                                            #  Log($volume/Ref($volume,1)+1),d)
    "CNTP": lambda p, d: p.stat("mean", "rose", d),                              # Mean($close>Ref($close,1),d)
    "CNTN": lambda p, d: p.stat("mean", "fell", d),                              # Mean($close<Ref($close,1),d)
    "CNTD": lambda p, d: p.stat("mean", "rose", d) - p.stat("mean", "fell", d),
    "SUMP": lambda p, d: _sum_ratio(p, d, "close_up", "close_abs"),              # Sum(Greater(dclose,0),d)/
    "SUMN": lambda p, d: _sum_ratio(p, d, "close_down", "close_abs"),            # (Sum(Abs(dclose),d)+eps)
    "SUMD": lambda p, d: _net_ratio(p, d, "close"),
    "VMA": lambda p, d: p.stat("mean", "volume", d) / p["volume_eps"],           # Mean($volume,d)/($volume+eps)
    "VSTD": lambda p, d: p.stat("std", "volume", d) / p["volume_eps"],           # Std($volume,d)/($volume+eps)
    "WVMA": lambda p, d: p.stat("std", "weighted_move", d)                       # Std(|$close/Ref($close,1)-1|
    / (p.stat("mean", "weighted_move", d) + EPS),                               #  *$volume,d)/(Mean(...)+eps)
    "VSUMP": lambda p, d: _sum_ratio(p, d, "volume_up", "volume_abs"),
    "VSUMN": lambda p, d: _sum_ratio(p, d, "volume_down", "volume_abs"),
    "VSUMD": lambda p, d: _net_ratio(p, d, "volume"),
}

_KBAR: dict[str, Callable[[_Panel], np.ndarray]] = {
    "KMID": lambda p: (p["close"] - p["open"]) / p["open"],
    "KLEN": lambda p: (p["high"] - p["low"]) / p["open"],
    "KMID2": lambda p: (p["close"] - p["open"]) / p["range"],
    "KUP": lambda p: (p["high"] - p["body_top"]) / p["open"],
    "KUP2": lambda p: (p["high"] - p["body_top"]) / p["range"],
    "KLOW": lambda p: (p["body_bottom"] - p["low"]) / p["open"],
    "KLOW2": lambda p: (p["body_bottom"] - p["low"]) / p["range"],
    "KSFT": lambda p: (2 * p["close"] - p["high"] - p["low"]) / p["open"],
    "KSFT2": lambda p: (2 * p["close"] - p["high"] - p["low"]) / p["range"],
}


def _lagged(p: _Panel, field: str, d: int) -> np.ndarray:
    """Alpha360 / price features: Ref($field, d) / $close, volume over ($volume + eps)."""
    if field == "volume":
        return p.lag("volume", d) / p["volume_eps"]
    return p.lag(field, d) / p["close"]


# ================================================================================ the spec
_NAME = re.compile(r"^([A-Z]+?)(\d+)$")


def _parse(name: str) -> tuple[str, int | None]:
    """'MA20' -> ('MA', 20), 'KMID2' -> ('KMID2', None), 'CLOSE59' -> ('CLOSE', 59)."""
    if name in _KBAR:
        return name, None
    m = _NAME.match(name)
    if m and (m.group(1) in _ROLLING or m.group(1) in LAGGED):
        d = int(m.group(2))
        if m.group(1) in _ROLLING and d < 1:
            raise BadInputError(f"feature {name!r} needs a window of at least 1")
        return m.group(1), d
    raise BadInputError(f"unknown feature {name!r}: use a preset {sorted(PRESETS)}, a k-bar name "
                        f"{list(KBAR)}, a rolling family {list(ROLLING)} or a lagged field {list(LAGGED)} "
                        "followed by its window, e.g. 'MA20' or 'CLOSE5'")


def names(spec: str | Iterable | Mapping = "alpha158", *, vwap: bool = True) -> list[str]:
    """The feature names a spec produces, in order (``vwap=False``: presets without VWAP features).

    A spec is a preset name ("alpha158", "alpha360"), a list of names (presets or features like
    "MA20", "KMID", "CLOSE5"), or a dict {family: windows} such as {"MA": [5, 20], "KMID": True}.
    """
    if isinstance(spec, str):
        if spec.lower() in PRESETS:
            out = PRESETS[spec.lower()]()
            return out if vwap else [n for n in out if not n.startswith("VWAP")]
        spec = [spec]
    out: list[str] = []
    if isinstance(spec, Mapping):
        for family, windows in spec.items():
            if windows is True or windows is None:
                out.append(str(family))
            elif isinstance(windows, (int, np.integer)) and not isinstance(windows, bool):
                out.append(f"{family}{windows}")
            elif isinstance(windows, Iterable) and not isinstance(windows, str):
                out.extend(f"{family}{int(d)}" for d in windows)
            else:
                raise BadInputError(f"spec[{family!r}] must be True or a list of windows, got {windows!r}")
    elif isinstance(spec, Iterable):
        for item in spec:
            if not isinstance(item, str):
                raise BadInputError(f"feature names must be strings, got {item!r}")
            out.extend(names(item, vwap=vwap) if item.lower() in PRESETS else [item])
    else:
        raise BadInputError(f"spec must be a preset name, a list of feature names or a dict, got {spec!r}")
    for n in out:
        _parse(n)
    return list(dict.fromkeys(out))  # a name is a definition: listed twice (OPEN0 is in both presets), made once


# ================================================================================ inputs
def _fields_from(data) -> tuple[dict[str, np.ndarray], Any]:
    """{field: float64 (T, N) array} from a (time, stock, feature) StockTensor or a dict."""
    if isinstance(data, StockTensor):
        dims = tuple(data.dims)
        if sorted(dims) != ["feature", "stock", "time"]:
            raise BadInputError(f"features need a (time, stock, feature) tensor, got dims {dims}")
        values = torch.movedim(data.values.detach().cpu(), [dims.index(d) for d in ("time", "stock", "feature")],
                               [0, 1, 2])
        labels = [str(f).lower() for f in data.coords["feature"]]
        if not set(FIELDS) & set(labels):
            raise BadInputError(f"the tensor has none of the features {list(FIELDS)}; it has {labels}")
        return {f: np.ascontiguousarray(values[:, :, labels.index(f)].numpy(), dtype=np.float64)
                for f in FIELDS if f in labels}, data
    if isinstance(data, Mapping):
        out = {}
        for key, value in data.items():
            if str(key).lower() in FIELDS:
                value = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
                out[str(key).lower()] = np.ascontiguousarray(value, dtype=np.float64)
        if not out:
            raise BadInputError(f"the dict has none of the fields {list(FIELDS)}; its keys: {list(data)}")
        shapes = {k: v.shape for k, v in out.items()}
        if len(set(shapes.values())) > 1 or any(len(s) != 2 for s in shapes.values()):
            raise BadInputError(f"the fields must be (time, stock) arrays of one shape, got {shapes}")
        return out, None
    raise BadInputError(f"features need a (time, stock, feature) StockTensor or a dict of (time, stock) "
                        f"arrays, got {type(data).__name__}")


def _needs(family: str) -> set[str]:
    if family in _KBAR:
        return {"open", "high", "low", "close"}
    if family in LAGGED:
        return {family.lower(), "close"} if family != "VOLUME" else {"volume"}
    return {"close", "high", "low", "volume"}


# ================================================================================ public API
def compute(data, spec: str | Iterable | Mapping = "alpha158", *, min_periods: int | None = None,
            dtype=None, out: str | os.PathLike | None = None, memory: int | str = DEFAULT_MEMORY,
            engine: str | None = None, engine_options: Mapping[str, Any] | None = None):
    """Features of every (time, stock) of an OHLCV panel.

    ``data``: a (time, stock, feature) StockTensor with features open/high/low/close/volume (vwap
    optional) -> a StockTensor (time, stock, feature=names) of the input's dtype (or ``dtype``),
    mask = feature observed; or a dict of (T, N) arrays -> a dict {name: float64 (T, N) array}.
    ``spec``: see ``names``. ``min_periods``: valid values a window needs (default: all of it).
    The value at row t reads rows <= t only.

    ``out=PATH`` (StockTensor input only): compute out of core, in blocks of stocks sized so the working
    arrays stay within ``memory`` (bytes, or text like "2GB", "512MB"), appending each block to an on-disk
    panel (``fintensor.ondisk``) and returning a StockTensor backed by its memory map. Every feature reads
    one stock's own history only, so the values equal the in-memory path bit for bit.

    ``engine="ray"``: blocks of stocks as Ray tasks (``fintensor.cluster.features``; ``data`` may also be
    ``ft.build``'s arguments as a dict, so each task builds its own block), ``engine_options`` as in
    ``ft.build``; bit for bit the single-process result, in memory or (``out=``) in the on-disk panel.
    """
    if engine is not None:  # out=: the engine's blocks are appended to the panel (memory= sizes local blocks)
        module, options = builder.engine_module(engine, engine_options)
        return module.features(data, spec, min_periods=min_periods, dtype=dtype, out=out, **options)
    if engine_options is not None:
        raise BadInputError("engine_options go with engine= (e.g. engine='ray')")
    if min_periods is not None and (isinstance(min_periods, bool) or not isinstance(min_periods, (int, np.integer))
                                    or min_periods < 1):
        raise BadInputError(f"min_periods must be a positive integer or None, got {min_periods!r}")
    if out is not None:
        return _compute_to_disk(data, spec, min_periods, dtype, Path(out), parse_bytes(memory, "memory"))
    fields, tensor = _fields_from(data)
    wanted, parsed = _wanted(fields, spec)
    T, N = next(iter(fields.values())).shape
    out_dtype = np.float64 if tensor is None else _numpy_dtype(dtype or tensor.values.dtype)
    block = _slabs(fields, parsed, min_periods, out_dtype)
    if tensor is None:
        return dict(zip(wanted, block))
    values = np.empty((T, N, len(wanted)), dtype=out_dtype)
    mask = np.empty(values.shape, dtype=bool)
    rolling._run(_pack_kernel, T, block, values, mask)
    device = tensor.values.device
    result = tensor.with_values(torch.from_numpy(values).to(device), mask=torch.from_numpy(mask).to(device),
                                feature=np.array(wanted))
    result.meta.update(_feature_meta(spec, min_periods))
    return result


def _feature_meta(spec, min_periods) -> dict:
    return {"features": spec if isinstance(spec, str) else "custom",
            "min_periods": "window" if min_periods is None else int(min_periods)}


def _wanted(fields: Mapping[str, np.ndarray], spec) -> tuple[list[str], list[tuple[str, int | None]]]:
    """The feature names of ``spec`` for these fields, parsed; an error if a needed field is missing."""
    wanted = names(spec, vwap="vwap" in fields)
    parsed = [_parse(n) for n in wanted]
    missing = sorted(set().union(*(_needs(f) for f, _ in parsed)) - set(fields)) if parsed else []
    if missing:
        raise BadInputError(f"the panel lacks {missing} needed by {spec!r}; it has {sorted(fields)}")
    return wanted, parsed


def _slabs(fields: Mapping[str, np.ndarray], parsed, min_periods: int | None, out_dtype) -> np.ndarray:
    """The features as one contiguous (feature, time, stock) array."""
    panel = _Panel(fields, None if min_periods is None else int(min_periods))
    T, N = next(iter(fields.values())).shape
    block = np.empty((len(parsed), T, N), dtype=out_dtype)  # one contiguous (T, N) slab per feature
    with np.errstate(divide="ignore", invalid="ignore"):
        # group by window so that statistics shared by several families are computed once
        for d in sorted({d for _, d in parsed if d is not None}):
            panel.stats.clear()
            for i, (family, w) in enumerate(parsed):
                if w == d:
                    block[i] = _ROLLING[family](panel, d) if family in _ROLLING else _lagged(panel, family.lower(), d)
        for i, (family, w) in enumerate(parsed):
            if w is None:
                block[i] = _KBAR[family](panel)
    return block


def compute_block(block: StockTensor, spec: str | Iterable | Mapping = "alpha158", *,
                  min_periods: int | None = None, dtype=None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Features of one block of stocks, stock-major: (values (stock, time, feature), mask, names).

    The unit of out-of-core work: ``block`` is the (time, stock, feature) OHLCV tensor of some stocks over
    the whole time range (``t.isel(stock=slice(a, b))``); the result is what ``compute`` would give for
    those stocks, transposed. Pure and picklable in and out, so a cluster task can run it."""
    fields, tensor = _fields_from(block)
    wanted, parsed = _wanted(fields, spec)
    out_dtype = _numpy_dtype(dtype or tensor.values.dtype)
    slabs = _slabs(fields, parsed, min_periods, out_dtype)
    F, T, N = slabs.shape
    values = np.empty((N, T, F), dtype=out_dtype)
    mask = np.empty(values.shape, dtype=bool)
    rolling._run(_pack_kernel, T, slabs, values.transpose(1, 0, 2), mask.transpose(1, 0, 2))  # stock-major
    return values, mask, wanted


# bytes of working memory per (time, stock) cell of a block: the float64 fields, derived series and cached
# rolling statistics of one window (under 60 arrays), plus per feature the slab, the packed values and the
# mask (measured with tracemalloc: 1,463 bytes per cell for Alpha158 in float32; this gives 1,902)
_CELL_BYTES = 60 * 8


def block_stocks(T: int, n_features: int, memory: int, itemsize: int = 8) -> int:
    """How many stocks a block may hold so its working arrays fit in ``memory`` bytes (at least 1)."""
    per_stock = T * (_CELL_BYTES + n_features * (2 * itemsize + 1))
    return max(1, int(memory // per_stock))


def _compute_to_disk(data, spec, min_periods, dtype, path: Path, memory: int) -> StockTensor:
    if not isinstance(data, StockTensor):
        raise BadInputError("out= needs a (time, stock, feature) StockTensor (a dict of arrays is already in memory)")
    check_output_path(path, "feature panel") if not path.is_dir() else None
    fields_probe, _ = _fields_from(data.isel(stock=slice(0, 1)))
    wanted, _ = _wanted(fields_probe, spec)
    T, N = data.shape[data.dims.index("time")], data.shape[data.dims.index("stock")]
    out_dtype = _numpy_dtype(dtype or data.values.dtype)
    step = block_stocks(T, len(wanted), memory, np.dtype(out_dtype).itemsize)
    meta = {**ondisk.json_meta(data.meta), **_feature_meta(spec, min_periods)}
    with ondisk.PanelWriter(path, data.coords["time"], data.coords["stock"], np.array(wanted), out_dtype,
                            meta) as writer:
        for a in range(0, N, step):
            values, mask, _ = compute_block(data.isel(stock=slice(a, a + step)), spec, min_periods=min_periods,
                                            dtype=out_dtype)
            writer.write(values, mask)
            del values, mask
        writer.commit()
    return ondisk.load(path, verify=False)


@njit(cache=True, nogil=True)
def _pack_kernel(block, out, mask, first, stop):
    """(feature, time, stock) slabs -> (time, stock, feature) values and observed-mask, rows
    [first, stop): written in order; the F source lines of a few stocks stay in cache meanwhile.
    ``out``/``mask`` may be transposed views (a stock-major block is written through its (1, 0, 2) view)."""
    F = block.shape[0]
    N = block.shape[2]
    for t in range(first, stop):
        for n in range(N):
            for f in range(F):
                v = block[f, t, n]
                out[t, n, f] = v
                mask[t, n, f] = v == v


def _numpy_dtype(dtype) -> type:
    if isinstance(dtype, torch.dtype):
        dtype = torch.empty(0, dtype=dtype).numpy().dtype
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise BadInputError(f"features are float32 or float64, not {dtype}")
    return dtype.type


def forward_returns(close, horizon: int = 1, lag: int = 1, *, log: bool = False):
    """Labels: the return from ``t + lag`` to ``t + lag + horizon``,
    ``close[t+lag+horizon] / close[t+lag] - 1`` (``log``: its log).

    The default (lag=1, horizon=1) is qlib's ``Ref($close, -2) / Ref($close, -1) - 1``: a signal at
    the close of t is traded at the close of t+1, so the label at t uses prices strictly after t.
    ``lag=0`` trades at the close of t itself. The last ``lag + horizon`` rows are NaN. ``close``: a
    numpy array or torch tensor with time first, a (time, stock) StockTensor, or a (time, stock,
    feature) StockTensor with a ``close`` feature.
    """
    for name, value, low in (("horizon", horizon, 1), ("lag", lag, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise BadInputError(f"{name} must be an integer >= {low}, got {value!r}")
    if isinstance(close, StockTensor) and "feature" in close.dims:
        labels = [str(f).lower() for f in close.coords["feature"]]
        if "close" not in labels:
            raise BadInputError(f"the tensor has no 'close' feature (features: {labels})")
        close = close.isel(feature=labels.index("close"))
    with np.errstate(divide="ignore", invalid="ignore"):
        moved = rolling.returns(close, int(horizon), log=bool(log))
        labels = rolling.shift(moved, -(int(lag) + int(horizon)))
    if hasattr(labels, "meta"):  # ft.train reads how far ahead the label looks (its split gaps)
        labels.meta = {**labels.meta, "label": "forward_return", "horizon": int(horizon), "lag": int(lag)}
    return labels
