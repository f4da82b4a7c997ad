"""StockTensor: market data as a labeled tensor in which every lower dimension is a selection of the next.

    4D (day, tick, stock, feature) -> 3D (time, stock, feature) -> 2D -> 1D -> 0D, each step a ``sel``.

Values live in a torch tensor (any dtype, any device); labels in numpy arrays, one per dim; ``mask`` says
which cells were observed. Files are safetensors (values + mask) with dims/coords/meta as JSON in the
header: nothing is ever unpickled, and ``load(path, mmap=True)`` maps the file instead of copying it.
Each file carries one CRC-32 over everything that matters in it (the header as parsed: dims, coords, meta,
tensor shapes and offsets; and every data byte), checked on every load.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import zlib
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from . import fileio
from . import symbols as _symbols
from .errors import BadInputError, FintensorError, StoreCorruptError

TIME_DIMS = ("time", "day")
FORMAT = "fintensor.StockTensor/2"          # /2: the checksum covers the header too
_LEGACY_FORMATS = ("fintensor.StockTensor/1",)  # data-only CRC; still readable


# ------------------------------------------------------------------------------------------ coords
def _coord_array(dim: str, labels) -> np.ndarray:
    """One dim's labels in the contract's dtype: dates/instants, str symbols and features, tick offsets."""
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise BadInputError(f"coords for {dim!r} must be one-dimensional, got shape {arr.shape}")
    if dim in TIME_DIMS:
        if arr.dtype.kind != "M":
            import pandas as pd

            try:
                idx = pd.DatetimeIndex(arr) if len(arr) else pd.DatetimeIndex([], dtype="datetime64[ns]")
            except (ValueError, TypeError) as exc:
                raise BadInputError(f"coords for {dim!r} must be dates or instants ({exc})") from None
            arr = (idx.tz_convert(None) if idx.tz is not None else idx).to_numpy()  # aware -> UTC instants
        dates = arr.astype("datetime64[D]")
        return dates if (dates == arr).all() else arr.astype("datetime64[ns]")  # midnights are dates
    if dim == "tick":
        if arr.dtype.kind != "m":
            import pandas as pd

            arr = pd.to_timedelta(arr).values if len(arr) else arr.astype("timedelta64[s]")
        return arr.astype("timedelta64[s]")
    if arr.dtype.kind in "US" or arr.dtype == object:
        return arr.astype(str)
    return arr


def _label_text(x) -> str:
    if isinstance(x, np.datetime64):
        return str(x.astype("datetime64[D]")) if np.datetime_data(x.dtype)[0] == "D" else str(x)[:19]
    if isinstance(x, np.timedelta64):
        s = int(x.astype("timedelta64[s]").astype(np.int64))
        return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"
    return str(x)


def _range_text(coord: np.ndarray) -> str:
    if len(coord) == 0:
        return "(empty)"
    if coord.dtype.kind in "Mm":
        return f"{_label_text(coord[0])} .. {_label_text(coord[-1])}"
    shown = ", ".join(str(c) for c in coord[:4])
    return shown + (f", ... ({len(coord)})" if len(coord) > 4 else "")


# ------------------------------------------------------------------------------------------ labels
def _to_datetime64(label, coord: np.ndarray, dim: str) -> tuple[np.datetime64, bool]:
    """A user's date/instant label as the coord's datetime64 unit; also whether it named a whole day."""
    import pandas as pd

    whole_day = isinstance(label, dt.date) and not isinstance(label, dt.datetime)
    if isinstance(label, str):
        whole_day = len(label.strip()) <= 10
    if isinstance(label, np.datetime64):
        whole_day = np.datetime_data(label.dtype)[0] in ("D", "M", "Y")
    try:
        ts = pd.Timestamp(label)
    except (ValueError, TypeError):
        raise BadInputError(f"cannot read {label!r} as a {dim} label; write it like '2019-01-03'") from None
    if ts is pd.NaT:
        raise BadInputError(f"{dim} label {label!r} is not a date")
    if ts.tzinfo is not None:
        ts = ts.tz_convert("UTC").tz_localize(None)
    return ts.to_datetime64().astype(coord.dtype), whole_day


def _to_timedelta64(label, dim: str) -> np.timedelta64:
    import pandas as pd

    # (np.timedelta64 subclasses np.integer: the coord's own type is a label, not a position)
    if isinstance(label, (int, np.integer)) and not isinstance(label, (bool, np.timedelta64)):
        raise BadInputError(f"{dim} label {label!r} is a number; label ticks by offset like '00:05:00' "
                            "or use isel(tick=...) for positions")
    try:
        return pd.Timedelta(label).to_timedelta64().astype("timedelta64[s]")
    except (ValueError, TypeError):
        raise BadInputError(f"cannot read {label!r} as a tick offset; write it like '00:05:00'") from None


def _normalize_label(dim: str, label, coord: np.ndarray):
    """A label in the coord's own type (dates parsed, symbols normalized)."""
    if coord.dtype.kind == "M":
        return _to_datetime64(label, coord, dim)[0]
    if coord.dtype.kind == "m":
        return _to_timedelta64(label, dim)
    if dim == "stock":
        try:
            return _symbols.normalize(label)
        except BadInputError:
            return str(label)
    return label if coord.dtype.kind not in "US" else str(label)


def _is_scalar(label) -> bool:
    return not isinstance(label, (list, tuple, np.ndarray, slice, range, set))


def _position(dim: str, label, coord: np.ndarray) -> int:
    """Index of one label in ``coord``, or a BadInputError naming the label and the range."""
    key = _normalize_label(dim, label, coord)
    if coord.dtype.kind in "Mm":
        i = int(np.searchsorted(coord, key))
        hit = i < len(coord) and coord[i] == key
    else:
        hits = np.nonzero(coord == key)[0]
        hit, i = len(hits) > 0, int(hits[0]) if len(hits) else -1
    if not hit:
        raise BadInputError(f"{dim} {_label_text(key) if coord.dtype.kind in 'Mm' else repr(label)} is not in "
                            f"this tensor; its {dim} axis has {len(coord)} labels: {_range_text(coord)}")
    return i


def _slice_positions(dim: str, sl: slice, coord: np.ndarray) -> slice:
    """Label slice -> position slice, both ends inclusive like pandas .loc (sorted time/tick axes)."""
    if sl.step is not None:
        raise BadInputError(f"{dim} slice step is not supported; use isel({dim}=slice(...)) for strides")
    if coord.dtype.kind not in "Mm":
        lo = 0 if sl.start is None else _position(dim, sl.start, coord)
        hi = len(coord) if sl.stop is None else _position(dim, sl.stop, coord) + 1
        return slice(lo, hi)
    lo, hi = 0, len(coord)
    if sl.start is not None:
        span = _period(sl.start, coord)
        key = span[0] if span is not None else _normalize_label(dim, sl.start, coord)
        lo = int(np.searchsorted(coord, key, "left"))
    if sl.stop is not None:
        span = _period(sl.stop, coord)
        if span is not None:
            key = span[1]
        elif coord.dtype.kind == "M":
            key, whole_day = _to_datetime64(sl.stop, coord, dim)
            if whole_day and np.datetime_data(coord.dtype)[0] != "D":
                key = key + np.timedelta64(1, "D") - np.timedelta64(1, "ns")  # the whole day, like pandas
        else:
            key = _normalize_label(dim, sl.stop, coord)
        hi = int(np.searchsorted(coord, key, "right"))
    return slice(lo, max(lo, hi))


def _period(label, coord: np.ndarray) -> tuple[np.datetime64, np.datetime64] | None:
    """(first, last) instants of the period a time label names, in the coord's unit, when that period is
    coarser than the axis (a month on a daily axis; a day or coarser on an intraday axis); else None."""
    if coord.dtype.kind != "M":
        return None
    import pandas as pd

    unit = np.datetime_data(coord.dtype)[0]
    if isinstance(label, str):
        text = label.strip()
        if not text or "+" in text or text.endswith("Z"):
            return None
        try:
            period = pd.Period(text)
        except (ValueError, TypeError):
            return None
        first, last = period.start_time, period.end_time
    elif isinstance(label, dt.date) and not isinstance(label, dt.datetime) and unit != "D":
        first = pd.Timestamp(label)
        last = first + pd.Timedelta(1, "D") - pd.Timedelta(1, "ns")
    elif isinstance(label, np.datetime64) and np.datetime_data(label.dtype)[0] in ("D", "M", "Y") and unit != "D":
        period = pd.Period(pd.Timestamp(label), freq=np.datetime_data(label.dtype)[0].replace("Y", "Y"))
        first, last = period.start_time, period.end_time
    else:
        return None
    span = last - first                     # (a day's Period ends at 23:59:59.999999)
    coarser = span > pd.Timedelta(1, "D") if unit == "D" else span >= pd.Timedelta(23, "h")
    if not coarser:
        return None
    return first.to_datetime64().astype(coord.dtype), last.to_datetime64().astype(coord.dtype)


def _period_positions(dim: str, label, coord: np.ndarray) -> slice:
    first, last = _period(label, coord)
    lo, hi = int(np.searchsorted(coord, first, "left")), int(np.searchsorted(coord, last, "right"))
    if hi <= lo:
        raise BadInputError(f"{dim} {label!r} matches no label of this tensor; its {dim} axis has {len(coord)} "
                            f"labels: {_range_text(coord)}")
    return slice(lo, hi)


# --------------------------------------------------------------------------------------- the class
class StockTensor:
    """Labeled market data: ``values`` (torch), ``dims``, ``coords`` (one numpy label array per dim),
    ``mask`` (True where observed) and ``meta`` (source, adjustment, calendar, fill, fingerprints)."""

    __slots__ = ("values", "dims", "coords", "mask", "meta")
    __array_ufunc__ = None  # numpy defers to our operators (``np.float64(2) * st`` is a StockTensor)

    def __init__(self, values, dims, coords: Mapping[str, Any] | None = None, mask=None,
                 meta: Mapping[str, Any] | None = None):
        values = _as_tensor(values, "values")
        dims = (dims,) if isinstance(dims, str) else tuple(dims)
        if len(dims) != values.ndim:
            raise BadInputError(f"dims {dims} name {len(dims)} axes but values have {values.ndim} "
                                f"(shape {tuple(values.shape)})")
        if len(set(dims)) != len(dims):
            raise BadInputError(f"dims {dims} repeat a name")
        coords = dict(coords or {})
        extra = set(coords) - set(dims)
        if extra:
            raise BadInputError(f"coords {sorted(extra)} name no dim of {dims}")
        out = {}
        for d, n in zip(dims, values.shape):
            c = _coord_array(d, coords[d]) if d in coords else np.arange(n)
            if len(c) != n:
                raise BadInputError(f"coords for {d!r} have {len(c)} labels but the {d} axis has {n}")
            out[d] = c
        if mask is None:
            mask = _observed(values)
        else:
            mask = _as_tensor(mask, "mask")
            if mask.dtype != torch.bool:
                raise BadInputError(f"mask must be a bool tensor, got {mask.dtype}")
            if tuple(mask.shape) != tuple(values.shape):
                raise BadInputError(f"mask shape {tuple(mask.shape)} differs from values shape "
                                    f"{tuple(values.shape)}")
            if mask.device != values.device:
                mask = mask.to(values.device)
        self.values, self.dims, self.coords, self.mask = values, dims, out, mask
        self.meta = dict(meta or {})

    # ------------------------------------------------------------------------------- properties
    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    @property
    def ndim(self) -> int:
        return self.values.ndim

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def __len__(self) -> int:
        if self.ndim == 0:
            raise TypeError("len() of a 0D StockTensor")
        return self.shape[0]

    def item(self):
        """The number in a 0D tensor (NaN where it was not observed)."""
        if self.ndim != 0:
            raise BadInputError(f"item() needs a 0D tensor; this one has dims {self.dims} — sel() down first")
        return self.values.item()

    # ------------------------------------------------------------------------------- selection
    def sel(self, **labels) -> "StockTensor":
        """Select by label: a scalar drops the dim, a list or slice (inclusive, like .loc) keeps it.

        Time labels coarser than the axis select a range and keep the dim, like pandas' partial-string
        indexing: ``time="2019-01"`` is January on a daily axis, ``time="2019-01-03"`` that day's bars on an
        intraday axis; a slice's ends cover their whole period (``slice("2019-01", "2019-02")`` ends on the
        last session of February).
        """
        positions = {}
        for dim, label in labels.items():
            coord = self._coord(dim)
            if isinstance(label, slice):
                positions[dim] = _slice_positions(dim, label, coord)
            elif _is_scalar(label) and _period(label, coord) is not None:   # '2019-01', a day of bars
                positions[dim] = _period_positions(dim, label, coord)
            elif _is_scalar(label):
                positions[dim] = _position(dim, label, coord)
            else:
                positions[dim] = [_position(dim, x, coord) for x in label]
        return self.isel(**positions)

    def isel(self, **positions) -> "StockTensor":
        """Select by position: an int drops the dim, a list, array or slice keeps it."""
        index: list[Any] = [slice(None)] * self.ndim
        for dim, pos in positions.items():
            coord = self._coord(dim)
            axis = self.dims.index(dim)
            if isinstance(pos, slice):
                index[axis] = pos
            elif _is_scalar(pos):
                try:
                    p = int(pos)
                except (TypeError, ValueError):
                    raise BadInputError(f"isel({dim}={pos!r}) needs an integer position; use sel() for labels") \
                        from None
                if not -len(coord) <= p < len(coord):
                    raise BadInputError(f"{dim} position {p} is out of range for {len(coord)} labels")
                index[axis] = p
            else:
                p = np.asarray(list(pos) if isinstance(pos, (set, range)) else pos)
                if p.dtype == bool:
                    p = np.nonzero(p)[0]
                if p.dtype.kind not in "iu":
                    raise BadInputError(f"isel({dim}=...) needs integer positions; use sel() for labels")
                if len(p) and (p.max() >= len(coord) or p.min() < -len(coord)):
                    raise BadInputError(f"{dim} positions out of range for {len(coord)} labels")
                index[axis] = p
        # apply axis by axis: torch (like numpy) would broadcast several index arrays together
        values, mask, dims, coords = self.values, self.mask, [], {}
        axis = 0
        for d, ix in zip(self.dims, index):
            sub = (slice(None),) * axis
            if isinstance(ix, np.ndarray):
                t = torch.as_tensor(ix, dtype=torch.long, device=values.device)
                values, mask = values.index_select(axis, t % max(len(self.coords[d]), 1)), \
                    mask.index_select(axis, t % max(len(self.coords[d]), 1))
            else:
                values, mask = values[sub + (ix,)], mask[sub + (ix,)]
            if isinstance(ix, int):
                continue
            dims.append(d)
            coords[d] = self.coords[d][ix]
            axis += 1
        return StockTensor(values, dims, coords, mask, self.meta)

    def _coord(self, dim: str) -> np.ndarray:
        if dim not in self.coords:
            raise BadInputError(f"this tensor has no {dim!r} dim; its dims are {self.dims}")
        return self.coords[dim]

    # ----------------------------------------------------------------------------- conversions
    def to(self, device_or_dtype) -> "StockTensor":
        """The same tensor on another device (values and mask; coords stay on the host) or with values
        of another dtype (``st.to(torch.float64)``; the mask stays bool)."""
        if isinstance(device_or_dtype, torch.dtype):
            return StockTensor(self.values.to(device_or_dtype), self.dims, self.coords, self.mask, self.meta)
        try:
            device = torch.device(device_or_dtype)
        except (RuntimeError, TypeError):
            raise BadInputError(f"cannot move a tensor to {device_or_dtype!r}; give a device such as 'cpu' or "
                                "'cuda', or a torch dtype") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise BadInputError(f"cannot move the tensor to {device_or_dtype!r}: this machine has no usable CUDA "
                                f"device (torch {torch.__version__}); keep it on 'cpu'")
        try:
            return StockTensor(self.values.to(device), self.dims, self.coords, self.mask.to(device), self.meta)
        except (RuntimeError, AssertionError) as exc:
            raise BadInputError(f"cannot move the tensor to {device_or_dtype!r}: {str(exc).splitlines()[0]}; "
                                "keep it on 'cpu'") from None

    def observed(self) -> "StockTensor":
        """The values with NaN wherever the cell was not observed (filled or untraded cells included); same
        labels and mask. Integer or bool values become float64 so that they can hold NaN."""
        values = self.values if self.values.is_floating_point() else self.values.to(torch.float64)
        nan = torch.tensor(float("nan"), dtype=values.dtype, device=values.device)
        return StockTensor(torch.where(self.mask, values, nan), self.dims, self.coords, self.mask, self.meta)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        """``np.asarray(tensor)``: the numeric values, NaN where unobserved (always a new array)."""
        arr = self.observed().numpy()
        return arr if dtype is None else arr.astype(dtype, copy=False)

    # ------------------------------------------------------------------------------- arithmetic
    def _binary(self, other, op, reflected: bool = False) -> "StockTensor":
        """``op`` elementwise with a number or a StockTensor of the same dims and labels; a result cell is
        observed where every operand's cell is."""
        if isinstance(other, StockTensor):
            if other.dims != self.dims or any(not np.array_equal(self.coords[d], other.coords[d])
                                              for d in self.dims):
                raise BadInputError(f"arithmetic needs tensors with the same dims and labels; got {self.dims} "
                                    f"{self.shape} and {other.dims} {other.shape} (select or isel one to match)")
            mask = self.mask & other.mask.to(self.mask.device)
            rhs = other.values.to(self.values.device)
        elif isinstance(other, (int, float, np.number)) and not isinstance(other, bool):
            mask, rhs = self.mask, other
        else:
            return NotImplemented
        values = op(rhs, self.values) if reflected else op(self.values, rhs)
        return StockTensor(values, self.dims, self.coords, mask, self.meta)

    def __add__(self, other):
        return self._binary(other, torch.add)

    __radd__ = __add__

    def __sub__(self, other):
        return self._binary(other, torch.sub)

    def __rsub__(self, other):
        return self._binary(other, lambda a, b: torch.sub(torch.as_tensor(a, dtype=b.dtype), b), True)

    def __mul__(self, other):
        return self._binary(other, torch.mul)

    __rmul__ = __mul__

    def __truediv__(self, other):
        return self._binary(other, torch.true_divide)

    def __rtruediv__(self, other):
        return self._binary(other, lambda a, b: torch.true_divide(torch.as_tensor(a, dtype=b.dtype), b), True)

    def __pow__(self, other):
        return self._binary(other, torch.pow)

    def __neg__(self) -> "StockTensor":
        return StockTensor(-self.values, self.dims, self.coords, self.mask, self.meta)

    def __abs__(self) -> "StockTensor":
        return StockTensor(self.values.abs(), self.dims, self.coords, self.mask, self.meta)

    def numpy(self) -> np.ndarray:
        """Values as numpy: shares memory for CPU tensors (bfloat16 is widened to float32)."""
        v = self.values.detach().cpu()
        if v.dtype == torch.bfloat16:
            v = v.float()
        return v.numpy()

    def mask_numpy(self) -> np.ndarray:
        return self.mask.detach().cpu().numpy()

    def to_pandas(self):
        """1D -> Series, 2D -> DataFrame, 3D -> DataFrame with (stock, feature) columns, 4D -> rows (day, tick).

        Unobserved cells are NaN. CPU float tensors are shared, not copied, where pandas allows.
        """
        import pandas as pd

        vals = self.numpy()
        if self.ndim == 0:
            return vals.item()
        index = [self._pandas_index(d) for d in self.dims]
        if self.ndim == 1:
            return pd.Series(vals, index=index[0], name=self.meta.get("name"), copy=False)
        if self.ndim == 2:
            return pd.DataFrame(vals, index=index[0], columns=index[1], copy=False)
        if self.ndim == 3:
            cols = pd.MultiIndex.from_product(index[1:], names=self.dims[1:])
            return pd.DataFrame(vals.reshape(vals.shape[0], -1), index=index[0], columns=cols, copy=False)
        if self.ndim == 4:
            rows = pd.MultiIndex.from_product(index[:2], names=self.dims[:2])
            cols = pd.MultiIndex.from_product(index[2:], names=self.dims[2:])
            return pd.DataFrame(vals.reshape(vals.shape[0] * vals.shape[1], -1), index=rows, columns=cols,
                                copy=False)
        raise BadInputError(f"to_pandas supports 0D-4D tensors, not {self.ndim}D")

    def _pandas_index(self, dim: str):
        import pandas as pd

        c = self.coords[dim]
        if c.dtype.kind == "M":
            return pd.DatetimeIndex(c, name=dim)
        if c.dtype.kind == "m":
            return pd.TimedeltaIndex(c, name=dim)
        return pd.Index(c, name=dim)

    def to_xarray(self):
        """An xarray DataArray sharing the values' memory (CPU), with ``mask`` as a coordinate and meta as attrs."""
        import xarray as xr

        return xr.DataArray(self.numpy(), dims=self.dims,
                            coords={**{d: self.coords[d] for d in self.dims},
                                    "mask": (self.dims, self.mask_numpy())},
                            name="values", attrs=dict(self.meta))

    @classmethod
    def from_xarray(cls, data, mask=None, meta: Mapping[str, Any] | None = None) -> "StockTensor":
        """From a DataArray (mask from ``mask=``, its ``mask`` coordinate, or not-NaN) or a Dataset with
        ``values`` and ``mask`` variables. Shares memory with numpy-backed data."""
        import xarray as xr

        if isinstance(data, xr.Dataset):
            if "values" not in data:
                raise BadInputError(f"Dataset needs a 'values' variable; it has {list(data.data_vars)}")
            if mask is None and "mask" in data:
                mask = data["mask"]
            data = data["values"]
        if not isinstance(data, xr.DataArray):
            raise BadInputError(f"from_xarray needs an xarray DataArray or Dataset, got {type(data).__name__}")
        if mask is None and "mask" in data.coords:
            mask = data.coords["mask"]
        if isinstance(mask, xr.DataArray):
            if tuple(mask.dims) != tuple(data.dims) or mask.shape != data.shape:
                raise BadInputError(f"mask dims {tuple(mask.dims)} shape {mask.shape} do not match values dims "
                                    f"{tuple(data.dims)} shape {data.shape}")
            mask = mask.values
        if mask is not None:
            mask = np.asarray(mask)
            if mask.dtype != bool:
                raise BadInputError(f"mask must be boolean, got {mask.dtype}")
        coords = {d: data.coords[d].values for d in data.dims if d in data.coords}
        values = np.asarray(data.values)
        return cls(values, tuple(data.dims), coords, mask, {**dict(data.attrs), **dict(meta or {})})

    # ---------------------------------------------------------------------------------- results
    def with_values(self, values, mask=None, **coords) -> "StockTensor":
        """A tensor with these dims, these coords (override some, e.g. a new feature axis) and new values.

        ``mask=None``: observed where the new values are not NaN.
        """
        values = _as_tensor(values, "values")
        new = {**self.coords, **coords}
        return StockTensor(values, self.dims, new, mask, self.meta)

    # --------------------------------------------------------------------------------- printing
    def __repr__(self) -> str:
        head = ", ".join(f"{d}: {n}" for d, n in zip(self.dims, self.shape))
        dtype = str(self.dtype).replace("torch.", "")
        n = self.mask.numel()
        share = float(self.mask.sum()) / n if n else 0.0
        lines = [f"StockTensor({head}) {dtype} on {self.device}, {share:.1%} observed"]
        if self.ndim == 0:
            lines = [f"StockTensor({self.values.item():g}) {dtype} on {self.device}, "
                     f"{'observed' if share else 'not observed'}"]
        width = max([len(d) for d in self.dims] + [0])
        for d in self.dims:
            lines.append(f"  {d.ljust(width)}  {_range_text(self.coords[d])}")
        shown = {k: v for k, v in self.meta.items() if k in ("source", "adjustment", "calendar", "fill",
                                                             "interval", "freq")}
        if shown:
            lines.append("  " + ", ".join(f"{k}={v}" for k, v in shown.items()))
        return "\n".join(lines)

    def summary(self) -> dict[str, Any]:
        """A JSON-able description: dims, shape, dtype, device, observed share, coordinate ranges, meta."""
        n = self.mask.numel()
        coords = {d: {"size": len(c), "first": _label_text(c[0]) if len(c) else None,
                      "last": _label_text(c[-1]) if len(c) else None} for d, c in self.coords.items()}
        return {"dims": list(self.dims), "shape": list(self.shape), "dtype": str(self.dtype).replace("torch.", ""),
                "device": str(self.device), "observed": float(self.mask.sum()) / n if n else 0.0,
                "coords": coords, "meta": self.meta}

    def preview(self, rows: int = 5) -> str:
        """The first and last ``rows`` rows of a small slice (up to 4 stocks; the first day of a 4D tensor)."""
        view = self
        if "stock" in self.dims and self.ndim > 1:
            view = view.isel(stock=slice(0, 4))
        if view.ndim == 4:
            view = view.isel(day=[0])
        if view.ndim == 0:
            return f"{view.item():g}"
        frame = view.to_pandas()
        return frame.to_string(max_rows=2 * rows, max_cols=12)

    # ------------------------------------------------------------------------------------- files
    def save(self, path: str | os.PathLike) -> Path:
        """Write a safetensors file (values, mask; dims/coords/meta as JSON) atomically; returns the path.

        An existing target that is not a regular file (a device, FIFO, directory, symlink) is refused.
        """
        path = fileio.check_output_path(path, "tensor file")
        check_tensor_name(path)
        header_meta = {"format": FORMAT, "dims": json.dumps(list(self.dims)),
                       "coords": json.dumps({d: _coord_json(c) for d, c in self.coords.items()}),
                       "meta": json.dumps(self.meta, default=str)}
        arrays = {"values": _tensor_bytes(self.values), "mask": _tensor_bytes(self.mask)}
        try:
            return _write_safetensors(path, arrays, header_meta)
        except OSError as exc:
            raise FintensorError(f"cannot write tensor file {path}: {exc.strerror or exc}; free space or "
                                 "choose another path") from None

def _as_tensor(x, what: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray) or np.isscalar(x) or isinstance(x, (list, tuple)):
        arr = np.asarray(x)
        if arr.dtype == object:
            raise BadInputError(f"{what} must be numeric, got an object array")
        if not arr.flags.writeable:  # torch wants writable memory; share where allowed, else copy
            arr = arr.copy()
        return torch.from_numpy(arr) if arr.dtype.kind in "biuf" else torch.as_tensor(arr)
    raise BadInputError(f"{what} must be a torch.Tensor or numpy array, got {type(x).__name__}")


def _observed(values: torch.Tensor) -> torch.Tensor:
    if values.is_floating_point() or values.is_complex():
        return ~torch.isnan(values)
    return torch.ones_like(values, dtype=torch.bool)


# ------------------------------------------------------------------------------- safetensors file
_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
              torch.uint8: "U8", torch.bool: "BOOL"}
_TORCH_DTYPES = {v: k for k, v in _ST_DTYPES.items()}


def _tensor_bytes(t: torch.Tensor) -> tuple[str, list[int], np.ndarray]:
    """(safetensors dtype, shape, contiguous uint8 view) of a tensor, without copying CPU contiguous data."""
    if t.dtype not in _ST_DTYPES:
        raise BadInputError(f"cannot save dtype {t.dtype}; use one of {sorted(map(str, _ST_DTYPES))}")
    c = t.detach().cpu().contiguous()
    flat = c.reshape(-1).view(torch.uint8) if c.numel() else torch.empty(0, dtype=torch.uint8)
    return _ST_DTYPES[t.dtype], list(c.shape), flat.numpy()


def check_tensor_name(path: Path) -> None:
    """A name whose temp sibling (``.NAME.<32 hex>.tmp``) is too long for the file system: one clear error."""
    try:
        name_max = os.pathconf(path.parent if path.parent.exists() else ".", "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    extra = len(fileio.temp_path(path).name.encode()) - len(path.name.encode())
    if len(path.name.encode()) + extra > name_max:
        raise BadInputError(f"tensor file name {path.name[:40]}... is {len(path.name.encode())} bytes long; this file "
                            f"system allows {name_max - extra} (the file is written beside itself first); "
                            "choose a shorter name")


def _write_safetensors(path: Path, arrays: dict, metadata: dict[str, str]) -> Path:
    """Stream a safetensors file (8-byte header length, JSON header, raw data) aside, then rename it in.

    ``__metadata__["checksum"]`` is the CRC-32 of the canonical header (everything but the checksum
    itself) followed by the data bytes, so a damaged name, date, shape or value is caught on load.
    """
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, (dtype, shape, data) in arrays.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + data.nbytes]}
        offset += data.nbytes
    crc = _crc32([_canonical_header(header)] + [data for _, _, data in arrays.values()])
    header["__metadata__"]["checksum"] = f"crc32:{crc:08x}"
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    path.parent.mkdir(parents=True, exist_ok=True)
    with fileio.atomic_writer(path) as fh:
        fh.write(len(raw).to_bytes(8, "little"))
        fh.write(raw)
        for _, _, data in arrays.values():
            fh.write(memoryview(data))
    return path


def _canonical_header(header: dict) -> bytes:
    """The header as parsed, minus its checksum, in one spelling (sorted keys, no spaces)."""
    meta = {k: v for k, v in header.get("__metadata__", {}).items() if k != "checksum"}
    return json.dumps({**header, "__metadata__": meta}, sort_keys=True, separators=(",", ":")).encode()


def _crc32(chunks) -> int:
    """CRC-32 of the chunks in order: catches a damaged file (not tampering) at memory speed."""
    crc = 0
    for chunk in chunks:
        crc = zlib.crc32(memoryview(chunk).cast("B"), crc)
    return crc


def _coord_json(c: np.ndarray) -> dict:
    if c.dtype.kind in "Mm":
        return {"dtype": c.dtype.str[1:], "data": c.astype(np.int64).tolist()}
    if c.dtype.kind in "US":
        return {"dtype": "str", "data": c.tolist()}
    return {"dtype": c.dtype.str[1:], "data": c.tolist()}


def _coord_from_json(spec: dict) -> np.ndarray:
    if spec["dtype"] == "str":
        return np.array(spec["data"], dtype=str)
    dtype = np.dtype(spec["dtype"])
    if dtype.kind in "Mm":
        return np.array(spec["data"], dtype=np.int64).view(dtype)
    return np.array(spec["data"], dtype=dtype)


class _Damaged(Exception):
    pass


def load(path: str | os.PathLike, mmap: bool = False) -> StockTensor:
    """Read a tensor written by ``StockTensor.save``, checking its checksum; ``mmap=True`` maps the data
    (copy-on-write) instead of copying it into memory: pages are read once for the check, then on use."""
    path = Path(path)
    if path.exists() and not path.is_dir() and not path.is_file():
        raise BadInputError(f"{path} is not a regular file (a device or FIFO); give a tensor file")
    head = b""
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            n = int.from_bytes(fh.read(8), "little")
            if not 0 < n < 100 * 2**20 or 8 + n > size:
                head = fh.read(4096)
                raise ValueError("header size")
            head = fh.read(n)
            header = json.loads(head)
            if not isinstance(header, dict) or not isinstance(header.get("__metadata__"), dict):
                raise ValueError("no __metadata__")
            meta = header["__metadata__"]
            fmt = meta.get("format")
            if fmt != FORMAT and fmt not in _LEGACY_FORMATS:
                raise ValueError(f"format {fmt!r}")
            tensors, chunks = {}, []
            base = 8 + n
            end = base
            for name in ("values", "mask"):
                spec = header[name]
                dtype = _TORCH_DTYPES[spec["dtype"]]
                lo, hi = (int(x) for x in spec["data_offsets"])
                if base + hi > size:
                    raise _Damaged(f"truncated to {size} bytes, the header needs {base + hi}")
                if not 0 <= lo <= hi:
                    raise _Damaged(f"{name} has data offsets {lo}..{hi}")
                if mmap and hi > lo:
                    raw = np.memmap(path, dtype=np.uint8, mode="c", offset=base + lo, shape=(hi - lo,))
                else:
                    fh.seek(base + lo)
                    raw = np.empty(hi - lo, dtype=np.uint8)
                    if fh.readinto(memoryview(raw)) != hi - lo:
                        raise _Damaged(f"truncated: {name} is short of {hi - lo} bytes")
                chunks.append(raw)
                tensors[name] = (raw, dtype, spec["shape"])
                end = max(end, base + hi)
            if fmt == FORMAT:
                if meta.get("checksum") != f"crc32:{_crc32([_canonical_header(header)] + chunks):08x}":
                    raise _Damaged("its header and data fail their CRC-32 check")
                if end != size:
                    raise _Damaged(f"{size - end} bytes follow the data the header describes")
            elif "crc32" in meta and _crc32(chunks) != int(meta["crc32"]):
                raise _Damaged("its data fail their CRC-32 check")
            tensors = {k: torch.from_numpy(raw).view(dtype).reshape(shape) for k, (raw, dtype, shape)
                       in tensors.items()}
            dims = json.loads(meta["dims"])
            coords = {d: _coord_from_json(s) for d, s in json.loads(meta["coords"]).items()}
            tensor_meta = json.loads(meta["meta"])
    except FileNotFoundError:
        raise BadInputError(f"no tensor file at {path}; write one with `fintensor build ... --out FILE`") from None
    except IsADirectoryError:
        raise BadInputError(f"{path} is a directory, not a tensor file") from None
    except _Damaged as exc:
        raise StoreCorruptError(f"{path} is damaged: {exc}; rebuild it with `fintensor build`") from None
    except OSError as exc:
        raise FintensorError(f"cannot read tensor file {path}: {exc.strerror or exc}") from None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, IndexError, RuntimeError, OverflowError,
            AttributeError) as exc:
        if FORMAT.encode() in head:  # ours, but its header no longer reads: damaged, not a wrong file
            raise StoreCorruptError(f"{path} is damaged: its header cannot be read ({type(exc).__name__}: {exc}); "
                                    "rebuild it with `fintensor build`") from None
        raise BadInputError(f"{path} is not a fintensor tensor file, or is damaged ({type(exc).__name__}: "
                            f"{exc}); tensors are written by StockTensor.save or `fintensor build --out`") from None
    try:
        return StockTensor(tensors["values"], dims, coords, tensors["mask"], tensor_meta)
    except BadInputError as exc:
        raise BadInputError(f"{path} is not a fintensor tensor file, or is damaged: {exc}") from None
