"""Store -> StockTensor: ``build`` (time, stock, feature) and ``build_ticks`` (day, tick, stock, feature).

The time axis is the exchange's calendar, never the union of whatever rows exist; a cell that was not
traded is NaN with mask False. The hot path reads only the needed Arrow columns of each partition and
scatters them by integer (time, stock) positions into one preallocated array: no pandas, no pivot.
Built tensors are cached under ``<store>/tensors/`` keyed by the request and the store's checksums.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import importlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import torch

from . import calendars as _calendars
from . import checks
from . import symbols as _symbols
from .errors import BadInputError, FintensorError, MissingDataError
from .schema import ADJUSTABLE_PRICE_FIELDS, DAILY_SCHEMA, interval_kind, parse_interval
from .store import Store
from .tensor import StockTensor, load

#: Bumped whenever a build's output for the same inputs changes (old cache entries then miss).
BUILD_VERSION = 2
#: 'as_stored': each symbol's prices as its partition holds them (a Yahoo file and a plain OHLCV file
#: side by side); meta['adjusted_from'] says which is which.
ADJUSTMENTS = ("raw", "split", "full", "as_stored")
#: Period labels of weekly/monthly bars: the period's first day (Yahoo's) or its last.
LABELS = ("start", "end")
#: engines that run a build (or a feature computation) on other machines: name -> the module that does it.
#: Such a module sits above this one (it calls ``build`` in its tasks), so it is imported by name, on demand.
ENGINES = {"ray": "fintensor.cluster"}


class BuildWarning(UserWarning):
    """A build kept less than it was asked for: rows dropped (and why), or nothing observed at all."""
DAILY_FIELDS = tuple(n for n in DAILY_SCHEMA.names if n != "date")
FLOW_FIELDS = ("volume", "amount", "turnover")                 # 0 on a filled (not traded) day
TICK_FIELDS = ("price", "volume", "amount", "open", "high", "low", "close", "trades")
#: Exchanges with call auctions and late-stamped prints: out-of-session records fold into the nearest
#: slot (09:25 auction -> first slot, 11:30:02 -> last morning slot, 15:00:00 close auction -> last slot).
FOLD_CALENDARS = ("XSHG",)
_NS = 10**9


# ------------------------------------------------------------------------------------ validation
def _symbol_list(symbols) -> list[str]:
    raw = [symbols] if isinstance(symbols, str) else list(symbols or [])
    if not raw:
        raise BadInputError("no symbols given; name at least one, e.g. AAPL or 600519.SS")
    out: dict[str, str] = {}
    for s in raw:
        sym = _symbols.normalize(s)
        if sym in out:
            raise BadInputError(f"symbol {s!r} is given twice (as {out[sym]!r} too); each stock once")
        out[sym] = s
    return list(out)


def _field_list(fields, allowed: Sequence[str]) -> list[str]:
    raw = [fields] if isinstance(fields, str) else list(fields or [])
    if not raw:
        raise BadInputError(f"no fields given; choose from {', '.join(allowed)}")
    bad = [f for f in raw if f not in allowed]
    if bad:
        raise BadInputError(f"unknown field(s) {bad}; available: {', '.join(allowed)}")
    if len(set(raw)) != len(raw):
        raise BadInputError(f"fields {raw} repeat a name")
    return raw


def _calendar_for(syms: list[str], calendar: str | None, allow_union: bool = True) -> tuple[str, list[str]]:
    """The calendar name to build on ('union', 'data', '24/7', '24/5' allowed for daily builds) and the
    symbols' own calendars. A daily build may put any symbol on any calendar (an override): rows the
    chosen calendar has no session for are counted and reported, never dropped silently."""
    own = _calendars.for_symbols(syms)
    by_cal = {c: [s for s in syms if _symbols.exchange(s) == c] for c in own}
    listing = "; ".join(f"{c}: {', '.join(v[:3])}{' ...' if len(v) > 3 else ''}" for c, v in by_cal.items())
    if calendar is None:
        if len(own) > 1:
            raise BadInputError(f"the symbols trade on different calendars ({listing}); pass calendar='union' "
                                f"(CLI: --calendar union) or one of {', '.join(own)} to align them explicitly")
        return own[0], own
    if str(calendar).lower() == "union":
        if not allow_union:
            raise BadInputError("calendar='union' is for daily builds; intraday slots need one exchange's "
                                "session, build each exchange separately")
        return "union", own
    name = _calendars.resolve(calendar)
    if not allow_union:
        if name not in own:
            raise BadInputError(f"calendar {calendar!r} does not match the symbols ({listing}); intraday slots "
                                f"use the exchange's own session: {' or '.join(own)}")
        if len(own) > 1:
            raise BadInputError(f"intraday slots need one exchange's session but the symbols trade on "
                                f"{listing}; build each exchange separately")
    return name, own


def _sessions(calendar: str, own: list[str], start: dt.date, end: dt.date) -> np.ndarray:
    if start > end:
        raise BadInputError(f"empty range: start {start} is after end {end}")
    names = own if calendar == "union" else [calendar]
    days = np.unique(np.concatenate([_calendars.sessions(c, start, end) for c in names]))
    if len(days) == 0:
        raise BadInputError(f"empty range: no {'/'.join(names)} sessions between {start} and {end}; "
                            "widen the range")
    return days


#: Which stored adjustment a build converts from when the one it asks for is not stored: the nearest first
#: (split-adjusted prices need only dividends to become fully adjusted; a fully adjusted series cannot be
#: undone, so it comes last).
CONVERT_FROM = {"full": ("split", "raw"), "split": ("raw", "full"), "raw": ("split", "full")}


def stored_adjustment(store: Store, sym: str, interval: str, adjust: str) -> str | None:
    """The stored adjustment of ``sym``'s bars a build with ``adjust`` reads (None: nothing stored).

    The partition in the adjustment asked for when it is stored (raw and forward-adjusted prices of one
    symbol sit side by side), else the nearest one to convert from (``CONVERT_FROM``). ``'as_stored'``
    takes the only one stored, and refuses a choice between several with the option that makes it."""
    stored = store.adjustments(sym, interval)
    if not stored:
        return None
    if adjust == "as_stored":
        if len(stored) > 1:
            raise BadInputError(f"{sym} {interval} bars are stored in several adjustments ({', '.join(stored)}), so "
                                f"adjust='as_stored' cannot choose; pass adjust={stored[0]!r} (CLI: --adjust "
                                f"{stored[0]})")
        return stored[0]
    return next(a for a in (adjust, *CONVERT_FROM[adjust]) if a in stored)


def _stored_dates(store: Store, syms: list[str], interval: str, start: dt.date, end: dt.date,
                  adjusts: dict[str, str]) -> np.ndarray:
    """calendar='data': the union of the symbols' stored dates in [start, end] (in the adjustments read)."""
    dates = [store.read_partition(s, interval, str(start), str(end), ["date"], adjust=adjusts[s]).column("date")
             .cast(pa.int32()).to_numpy() for s in syms]
    days = np.unique(np.concatenate(dates)).astype("datetime64[D]") if dates else np.array([], "datetime64[D]")
    if len(days) == 0:
        raise BadInputError(f"empty range: no stored {interval} rows of {', '.join(syms[:3])} between {start} "
                            f"and {end}; widen the range")
    return days


def _periods(interval: str, start: dt.date, end: dt.date, label: str) -> np.ndarray:
    """Weekly (Monday-Sunday) or monthly periods overlapping [start, end], labelled by first or last day."""
    import pandas as pd

    freq = "W-SUN" if interval == "1wk" else "M"
    idx = pd.period_range(pd.Period(start, freq), pd.Period(end, freq), freq=freq)
    stamps = idx.start_time if label == "start" else idx.end_time
    return stamps.to_numpy().astype("datetime64[D]")


def _period_positions(interval: str, dates: np.ndarray, days: np.ndarray, label: str) -> np.ndarray:
    """Rows' dates (int days) -> the label (int days) of their week/month, so they land on the axis."""
    import pandas as pd

    freq = "W-SUN" if interval == "1wk" else "M"
    idx = pd.PeriodIndex(pd.DatetimeIndex(dates.astype("datetime64[D]")), freq=freq)
    stamps = idx.start_time if label == "start" else idx.end_time
    return stamps.to_numpy().astype("datetime64[D]").astype(np.int64)


def _as_store(store) -> Store:
    return store if isinstance(store, Store) else Store(store)


def _torch_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    names = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
             "bfloat16": torch.bfloat16}
    if str(dtype).replace("torch.", "") in names:
        return names[str(dtype).replace("torch.", "")]
    raise BadInputError(f"dtype {dtype!r} is not a floating dtype; use torch.float32 or torch.float64")


def _np_dtype(tdtype: torch.dtype):
    """The numpy float type a build of torch dtype ``tdtype`` fills (float64 or float32)."""
    return np.float64 if tdtype == torch.float64 else np.float32


def _parse_fill(fill) -> tuple[str, int | None] | None:
    """None, 'ffill' (no limit) or ('ffill', limit)."""
    if fill is None or fill is False:
        return None
    if isinstance(fill, str) and fill == "ffill":
        return ("ffill", None)
    if isinstance(fill, (tuple, list)) and len(fill) == 2 and fill[0] == "ffill":
        limit = fill[1]
        if limit is None:
            return ("ffill", None)
        try:
            return ("ffill", checks.positive_int("fill limit", limit))
        except BadInputError:
            raise BadInputError(f"fill limit must be a positive number of sessions, got {limit!r}") from None
    raise BadInputError(f"fill={fill!r} is not understood; use None, 'ffill' or ('ffill', LIMIT) with a "
                        "positive number of sessions")


def _missing_error(store: Store, missing: list[str], what: str, start, end) -> MissingDataError:
    names = " ".join(missing)
    how = ("`fintensor import FILE --ticks`" if what == "ticks" else
           f"`fintensor download {names} --start {start} --end {end}"
           f"{'' if what == '1d' else f' --interval {what}'}` or `fintensor import FILE`")
    return MissingDataError(f"the store at {store.uri} has no {what if what == 'ticks' else what + ' bars'} "
                            f"for {', '.join(missing)}; get them with {how}")


# ----------------------------------------------------------------------------------------- cache
def _cache_path(store: Store, request: dict) -> Path:
    key = hashlib.sha256(json.dumps(request, sort_keys=True, default=str).encode()).hexdigest()[:32]
    return store.root / "tensors" / f"{key}.safetensors"


def _cached(store: Store, request: dict, cache: bool, make) -> StockTensor:
    """Load the tensor built for ``request`` (which includes the store's checksums), or make and keep it."""
    if not cache:
        return make()
    path = _cache_path(store, request)
    if path.parent.is_symlink() or path.is_symlink():  # never read or write through a link out of the store
        warnings.warn(f"{path.parent if path.parent.is_symlink() else path} is a symbolic link; the tensor cache "
                      "does not follow links: built without it", BuildWarning, stacklevel=3)
        return make()
    if path.exists():
        try:
            st = load(path)
            os.utime(path)  # recently used: pruned last
            st.meta["cache"] = str(path)
            st.meta["cache_hit"] = True
            return st
        except (FintensorError, OSError) as exc:  # a damaged entry is rebuilt, never trusted
            warnings.warn(f"the cached tensor {path} could not be used ({exc}); rebuilt it from the store",
                          BuildWarning, stacklevel=3)
            if path.is_file():
                path.unlink(missing_ok=True)
    st = make()
    try:
        st.save(path)
        st.meta["cache"] = str(path)
        _prune(path.parent, keep=path)
    except (OSError, FintensorError):  # a read-only or full store still builds; it just cannot remember
        pass
    st.meta["cache_hit"] = False
    return st


def _prune(folder: Path, keep: Path) -> None:
    """Drop the least recently used cached tensors beyond $FINTENSOR_TENSOR_CACHE_MB (default 4096)."""
    budget = float(os.environ.get("FINTENSOR_TENSOR_CACHE_MB", 4096)) * 2**20
    entries = []
    for p in folder.glob("*.safetensors"):
        try:
            st = p.stat()
        except FileNotFoundError:  # pruned by another process meanwhile
            continue
        entries.append((st.st_mtime, st.st_size, p))
    total = sum(size for _, size, _ in entries)
    for _, size, p in sorted(entries, key=lambda e: e[0]):
        if total <= budget:
            break
        if p != keep:
            p.unlink(missing_ok=True)
            total -= size


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ----------------------------------------------------------------------------------- daily build
def engine_module(name: str, options: Mapping[str, Any] | None) -> tuple[Any, dict]:
    """The module that implements ``engine=name`` (see ENGINES) and its checked ``engine_options``
    (the module's ``ENGINE_OPTIONS`` name the ones it takes)."""
    checks.choice("engine", name, tuple(ENGINES))
    if options is not None and not isinstance(options, Mapping):
        raise BadInputError("engine_options must be a dict such as {'address': 'auto'}, got "
                            f"{type(options).__name__}")
    module = importlib.import_module(ENGINES[name])
    unknown = sorted(set(options or {}) - set(module.ENGINE_OPTIONS))
    if unknown:
        raise BadInputError(f"engine {name!r} takes engine_options {', '.join(module.ENGINE_OPTIONS)}; "
                            f"not {', '.join(map(str, unknown))}")
    return module, dict(options or {})


def build(symbols: str | Iterable[str], start, end, fields: str | Sequence[str] = ("close",),
          interval: str = "1d", store: Store | str | os.PathLike | None = None, calendar: str | None = None,
          adjust: str = "full", fill=None, dtype: torch.dtype = torch.float32,
          cache: bool = True, label: str = "start", engine: str | None = None,
          engine_options: Mapping[str, Any] | None = None) -> StockTensor:
    """A (time, stock, feature) tensor of ``fields`` for ``symbols`` on the exchange's sessions [start, end].

    ``calendar``: inferred from the symbols (XNYS for US, XSHG for A-shares, '24/7' for ``-USD`` crypto,
    '24/5' for ``=X`` FX); any exchange name overrides it; 'union' aligns several exchanges, 'data' uses
    the stored dates themselves, '24/7'/'24/5' every day / every weekday. Every stored row of every symbol is
    accounted for in ``meta['rows']`` (kept, outside the range, or dropped with a reason); drops are also a
    ``BuildWarning``, as is a build with nothing observed. ``adjust``: 'raw' | 'split' | 'full', derived from
    what each partition holds (its adjustment, adj_close, split and dividend events), or 'as_stored' (each
    symbol as its partition holds it); volume follows in split-adjusted shares. ``interval``: the bars read
    from the store: '1d', '1wk'/'1mo' (an axis of weeks/months labelled by their first day, or last with
    ``label='end'``), or intraday ('1m', '5m', '60m': UTC slot instants over the sessions; see
    ``build_ticks``). ``fill``: None, 'ffill' or ('ffill', LIMIT): carry prices over missing sessions
    inside the stock's listing (flows become 0); filled cells keep mask False.

    ``engine="ray"``: build blocks of stocks as Ray tasks (``fintensor.cluster.build``; bars, not intraday)
    with ``engine_options`` such as {"address": "auto", "num_cpus": 8, "block_size": 100, "retries": 3}:
    the same tensor, bit for bit, and the same cache entry.
    """
    checks.boolean("cache", cache)
    if engine is not None:
        module, options = engine_module(engine, engine_options)
        return module.build(symbols, start, end, fields, interval=interval, store=store, calendar=calendar,
                            adjust=adjust, fill=fill, dtype=dtype, cache=cache, label=label, **options)
    if engine_options is not None:
        raise BadInputError("engine_options go with engine= (e.g. engine='ray')")
    if interval_kind(parse_interval(interval)) == "intraday":
        syms, interval, fill_spec, tdtype, lo, hi = _bar_args(symbols, interval, adjust, label, fill, dtype, start, end)
        if fill_spec is not None:
            raise BadInputError("fill applies to daily builds; intraday 'price' is already carried within "
                                "each day (use fields=['price', ...])")
        return _build_intraday(syms, lo, hi, fields, interval, store, calendar, adjust, tdtype, cache)
    plan = plan_build(symbols, start, end, fields, interval, store, calendar, adjust, fill, dtype, label)
    tensor = _cached(plan.store, plan.request, cache, plan.make)
    _warn_unkept(tensor, plan.syms, *plan.row_range)
    return tensor


def _bar_args(symbols, interval, adjust, label, fill, dtype, start, end) -> tuple:
    """``build``'s arguments checked in one order for every interval: (symbols, interval, fill spec, torch
    dtype, start date, end date)."""
    syms = _symbol_list(symbols)
    interval = parse_interval(interval)
    if adjust not in ADJUSTMENTS:
        raise BadInputError(f"adjust={adjust!r} is not one of {', '.join(ADJUSTMENTS)}")
    checks.choice("label", label, LABELS)
    fill_spec = _parse_fill(fill)
    tdtype = _torch_dtype(dtype)
    return syms, interval, fill_spec, tdtype, _calendars.parse_date(start, "start"), _calendars.parse_date(end, "end")


@dataclass
class BuildPlan:
    """What a bar build resolved before reading a row: the store, symbols, axis and cache key (``request``),
    and ``make``, which reads the rows. ``ft.build`` and ``cluster.build`` share it, so both check the same
    input the same way and key the same cache entry."""

    store: Store
    syms: list[str]
    fields: list[str]
    days: np.ndarray
    row_range: tuple[dt.date, dt.date]
    request: dict
    make: Callable[[], StockTensor]
    dtype: torch.dtype


def plan_build(symbols, start, end, fields, interval: str = "1d", store=None, calendar: str | None = None,
               adjust: str = "full", fill=None, dtype=torch.float32, label: str = "start") -> BuildPlan:
    """Check ``ft.build``'s arguments for daily/weekly/monthly bars against the store and resolve them
    (symbols, stored adjustments, calendar, axis, cache key); reads manifests only."""
    syms, interval, fill_spec, tdtype, lo, hi = _bar_args(symbols, interval, adjust, label, fill, dtype, start, end)
    if interval_kind(interval) == "intraday":
        raise BadInputError(f"plan_build plans bar builds of 1d/1wk/1mo, not {interval!r}")
    fields = _field_list(fields, DAILY_FIELDS)
    store = _as_store(store)
    chosen = {s: stored_adjustment(store, s, interval, adjust) for s in syms}
    manifests = {s: None if a is None else store.manifest(s, interval, adjust=a) for s, a in chosen.items()}
    missing = [s for s, m in manifests.items() if m is None]
    if missing:
        raise _missing_error(store, missing, interval, lo, hi)
    if interval == "1d":
        cal, own = _calendar_for(syms, calendar)
        days = _stored_dates(store, syms, "1d", lo, hi, chosen) if cal == _calendars.DATA \
            else _sessions(cal, own, lo, hi)
        range_lo, range_hi = lo, hi
    else:
        if calendar is not None:
            raise BadInputError(f"calendar applies to daily bars; a {interval} axis is calendar "
                                f"{'weeks' if interval == '1wk' else 'months'} (choose label='start' or label='end')")
        if lo > hi:
            raise BadInputError(f"empty range: start {lo} is after end {hi}")
        cal, own = ("weeks (Monday-Sunday)" if interval == "1wk" else "months"), []
        days = _periods(interval, lo, hi, label)
        bounds = _periods(interval, lo, hi, "start"), _periods(interval, lo, hi, "end")
        range_lo, range_hi = bounds[0][0].astype(dt.date), bounds[1][-1].astype(dt.date)
    request = dict(kind="build", version=BUILD_VERSION, symbols=syms, start=str(days[0]), end=str(days[-1]),
                   range=[str(range_lo), str(range_hi)], fields=fields, interval=interval, calendar=cal,
                   adjust=adjust, fill=fill_spec, label=label if interval != "1d" else None,
                   dtype=_dtype_name(tdtype), fingerprint=store.fingerprint(syms, interval, adjust=chosen))
    read_days = days
    if fill_spec is not None:  # a fill may carry a value from before the range: read that far back
        limit = fill_spec[1]
        first = min(m["start"][:10] for m in manifests.values())
        if limit is not None and interval == "1d" and limit < 10_000:
            first = max(_calendars.parse_date(first, "start"), lo - dt.timedelta(days=2 * limit + 14))
        first = min(_calendars.parse_date(first, "start"), lo)
        if interval != "1d":
            read_days = _periods(interval, first, hi, label)
        elif cal == _calendars.DATA:
            read_days = _stored_dates(store, syms, "1d", first, hi, chosen)
        else:
            read_days = _sessions(cal, own, first, hi)
    period = None if interval == "1d" else (interval, label)

    def make() -> StockTensor:
        return _build_daily(store, syms, manifests, read_days, fields, cal, adjust, fill_spec, tdtype,
                            request["fingerprint"], keep_from=len(read_days) - len(days), period=period,
                            row_range=(range_lo, range_hi))

    return BuildPlan(store, syms, fields, days, (range_lo, range_hi), request, make, tdtype)



def _warn_unkept(tensor: StockTensor, syms: list[str], lo, hi) -> None:
    """A BuildWarning for every kind of stored row in the range that did not make it into the tensor,
    and for a tensor with nothing observed."""
    for message in unkept_messages(tensor):
        warnings.warn(message, BuildWarning, stacklevel=3)
    if not bool(tensor.mask.any()):
        warnings.warn(f"nothing observed: the store has no rows of {', '.join(syms[:5])}"
                      f"{' ...' if len(syms) > 5 else ''} between {lo} and {hi} on this axis", BuildWarning,
                      stacklevel=3)


def unkept_messages(tensor: StockTensor) -> list[str]:
    """One line per reason rows were dropped, naming how many rows of which symbols (from meta['rows'])."""
    by_reason: dict[str, dict[str, int]] = {}
    for sym, counts in (tensor.meta.get("rows") or {}).items():
        for reason, n in counts.get("dropped", {}).items():
            by_reason.setdefault(reason, {})[sym] = n
    out = []
    for reason, per_sym in by_reason.items():
        shown = ", ".join(f"{s} {n}" for s, n in list(per_sym.items())[:8])
        more = f" and {len(per_sym) - 8} more symbols" if len(per_sym) > 8 else ""
        out.append(f"dropped {sum(per_sym.values())} stored rows ({shown}{more}): {reason}")
    return out


def _build_daily(store, syms, manifests, days, fields, cal, adjust, fill_spec, tdtype, fingerprint,
                 keep_from: int = 0, period=None, row_range=None):
    T, N, F = len(days), len(syms), len(fields)
    values = np.full((T, N, F), np.nan, dtype=_np_dtype(tdtype))
    day_ints = days.astype(np.int64)
    lo, hi = row_range or (days[0].astype(dt.date), days[-1].astype(dt.date))
    row_bounds = (np.datetime64(lo, "D").astype(np.int64), np.datetime64(hi, "D").astype(np.int64))
    notes: dict[str, str] = {}
    rows: dict[str, dict] = {}
    for j, sym in enumerate(syms):
        cols, how, rows[sym] = _symbol_columns(store, sym, manifests[sym], days, fields, adjust, cal,
                                               period, row_bounds, days[keep_from])
        notes[sym] = how
        pos, ok = cols.pop("_pos"), cols.pop("_ok")
        p = pos[ok]
        block = np.column_stack([cols[name][ok] for name in fields])
        if len(p) and p[-1] - p[0] + 1 == len(p):  # no gaps: a slice writes faster than a scatter
            values[p[0]:p[-1] + 1, j] = block
        else:
            values[p, j] = block
    observed = np.isnan(values)  # in place below: one (T, N, F) bool array, no temporary of its size
    np.logical_not(observed, out=observed)
    if fill_spec is not None:
        spans = np.array([[np.datetime64(manifests[s]["start"][:10], "D").astype(np.int64),
                           np.datetime64(manifests[s]["end"][:10], "D").astype(np.int64)] for s in syms])
        if period is not None:  # a listing's first and last rows, as the labels of their periods
            spans = np.column_stack([_period_positions(period[0], spans[:, k], days, period[1]) for k in (0, 1)])
        _ffill(values, observed, fields, day_ints, spans, fill_spec[1])
    if keep_from:
        values, observed, days = values[keep_from:].copy(), observed[keep_from:].copy(), days[keep_from:]
    sources = sorted({manifests[s]["source"] for s in syms})
    interval = "1d" if period is None else period[0]
    meta: dict[str, Any] = dict(
        source=sources[0] if len(sources) == 1 else sources, interval=interval, calendar=cal, adjustment=adjust,
        adjusted_from=notes if len(set(notes.values())) > 1 else next(iter(notes.values())),
        fill=None if fill_spec is None else {"method": "ffill", "limit": fill_spec[1]},
        store=store.uri, store_fingerprint=fingerprint,
        store_checksums={s: manifests[s]["checksum"] for s in syms},
        rows=rows,
    )
    if period is not None:
        meta["labels"] = f"each {'week' if interval == '1wk' else 'month'} is labelled by its " \
                         f"{'first' if period[1] == 'start' else 'last'} day"
    return StockTensor(torch.from_numpy(values), ("time", "stock", "feature"),
                       {"time": days, "stock": np.array(syms), "feature": np.array(fields)},
                       torch.from_numpy(observed), meta)


def _symbol_columns(store: Store, sym: str, manifest: dict, days: np.ndarray, fields: list[str],
                    adjust: str, cal: str = "", period=None, row_bounds=None, first_kept=None
                    ) -> tuple[dict[str, np.ndarray], str, dict]:
    """One symbol's requested columns (float64, adjusted, NaN where not traded), their positions on the
    time axis, and the account of its stored rows: kept, outside the range, dropped (with the reason)."""
    stored = manifest["adjustment"]
    want = stored if adjust == "as_stored" else adjust
    convert = stored != want and any(f in ADJUSTABLE_PRICE_FIELDS or f == "volume" for f in fields)
    need = set(fields) | {"trade_status"}
    if convert:
        need |= {"close", "adj_close", "split", "dividend"}
    day_ints = days.astype(np.int64)
    if row_bounds is None:
        row_bounds = (day_ints[0], day_ints[-1])
    lo_int, hi_int = min(int(row_bounds[0]), int(day_ints[0])), max(int(row_bounds[1]), int(day_ints[-1]))
    lo, hi = str(np.datetime64(lo_int, "D")), str(np.datetime64(hi_int, "D"))
    # bounds only where the partition extends past them (rows outside are dropped below anyway; filtering
    # costs a copy); adjustment factors run to the partition's end (adjusted "as of" its last row)
    lo = lo if manifest["start"][:10] < lo else None
    hi = hi if manifest["end"][:10] > hi and not convert else None
    interval = "1d" if period is None else period[0]
    table = store.read_partition(sym, interval, lo, hi, [c for c in DAILY_FIELDS if c in need], adjust=stored)
    dates = table.column("date").cast(pa.int32()).to_numpy().astype(np.int64)
    cols = {name: table.column(name).to_numpy().astype(np.float64) for name in need}
    how = f"as stored ({stored})" if adjust == "as_stored" else "stored"
    if convert and table.num_rows:
        price_factor, volume_factor, how = _adjustment(sym, stored, want, cols, fields)
        for f in fields:
            if f in ADJUSTABLE_PRICE_FIELDS and price_factor is not None:
                cols[f] = cols[f] * price_factor
            elif f == "volume" and volume_factor is not None:
                cols[f] = cols[f] * volume_factor
    suspended = cols["trade_status"] == 0
    for f in fields:
        if f != "trade_status":
            cols[f] = np.where(suspended, np.nan, cols[f])
    labels = dates if period is None else _period_positions(period[0], dates, days, period[1])
    in_axis = labels <= day_ints[-1]
    pos = np.minimum(np.searchsorted(day_ints, labels), len(day_ints) - 1)
    ok = in_axis & (day_ints[pos] == labels)
    in_range = (dates >= row_bounds[0]) & (dates <= row_bounds[1])
    dropped = {}
    if period is not None:  # two rows in one week/month: the last one stands for it
        earlier = ok & np.r_[pos[:-1] == pos[1:], False] & np.r_[ok[1:], False]
        ok &= ~earlier
        if (earlier & in_range).any():
            dropped[f"more than one row in a {'week' if period[0] == '1wk' else 'month'} (the last is kept)"] = \
                int((earlier & in_range).sum())
    off = in_range & ~ok & ~(period is not None and earlier)
    if off.any():
        dropped[f"dated on days that are not {cal} sessions (keep them with calendar='data' (CLI: --calendar "
                "data) or calendar='24/7' (CLI: --calendar 24/7), or choose another exchange)"] = int(off.sum())
    kept = int((ok & in_range & (pos >= np.searchsorted(day_ints, np.int64(first_kept)))).sum()) \
        if first_kept is not None else int((ok & in_range).sum())
    account = {"stored": int(manifest["rows"]), "kept": kept,
               "outside_range": int(manifest["rows"]) - int(in_range.sum()), "dropped": dropped}
    out = {f: cols[f] for f in fields}
    out["_pos"], out["_ok"] = pos, ok
    return out, how, account


def _after(x: np.ndarray) -> np.ndarray:
    """prod of x over the rows strictly after each row (the factor that adjusts a row as of the last one)."""
    rev = np.cumprod(x[::-1])[::-1]
    return np.r_[rev[1:], 1.0] if len(x) else x


def _adjustment(sym: str, stored: str, want: str, cols: dict, fields: list[str]):
    """(price factor, volume factor, how) converting ``stored`` to ``want`` adjustment, or a clear error."""
    close, adj_close = cols["close"], cols["adj_close"]
    split, dividend = cols["split"], cols["dividend"]
    has_adj = len(adj_close) > 0 and not np.isnan(adj_close).all()
    has_split = len(split) > 0 and not np.isnan(split).any()
    has_div = len(dividend) > 0 and not np.isnan(dividend).any()
    holds = f"{stored}-adjusted prices" + "".join(
        [" with adj_close" if has_adj else "", " with split events" if has_split else "",
         " with dividend events" if has_div else ""])
    wants_volume = "volume" in fields
    wants_price = any(f in ADJUSTABLE_PRICE_FIELDS for f in fields)

    def impossible(need: str):
        return BadInputError(f"{sym}: the store holds {holds}; adjust={want!r} needs {need}. Build with "
                             f"adjust={stored!r} (CLI: --adjust {stored}), or with adjust='as_stored' (CLI: "
                             "--adjust as_stored) to take every symbol's prices as stored, or import data "
                             "that has it")

    splits_after = _after(split) if has_split else None
    price_factor = volume_factor = None
    how = []
    if stored == "full":
        raise impossible("unadjusted or split-adjusted prices (a fully adjusted series cannot be undone)")
    if want == "split" or want == "raw":  # between raw and split: split events only
        if not has_split:
            raise impossible("split events (the partition's 'split' column)")
        factor = 1 / splits_after if want == "split" else splits_after
        price_factor, volume_factor = factor, 1 / factor
        how.append(f"{want} from {stored} + split events")
    else:  # full from raw or split
        if wants_price:
            if has_adj:
                with np.errstate(divide="ignore", invalid="ignore"):
                    price_factor = np.where(close > 0, adj_close / close, np.nan)
                how.append(f"full from {stored} x adj_close/close")
            elif has_div and (stored == "split" or has_split):
                prev_close = np.r_[np.nan, close[:-1]]
                with np.errstate(divide="ignore", invalid="ignore"):
                    ratio = np.where(dividend > 0, 1 - dividend / prev_close, 1.0)
                price_factor = _after(np.nan_to_num(ratio, nan=1.0))
                if stored == "raw":
                    price_factor = price_factor / splits_after
                how.append(f"full from {stored} + dividend{' and split' if stored == 'raw' else ''} events")
            else:
                raise impossible("adj_close, or dividend (and for raw prices split) events")
        if wants_volume and stored == "raw":
            if not has_split:
                raise impossible("split events to express volume in split-adjusted shares")
            volume_factor = splits_after
            how.append("volume x split events")
    return price_factor, volume_factor, "; ".join(how) or "stored"


def _ffill(values: np.ndarray, observed: np.ndarray, fields: list[str], day_ints: np.ndarray,
           spans: np.ndarray, limit: int | None) -> None:
    """Carry each stock's last traded row over later missing sessions inside its listing, in place.

    Uses only the past (no look-ahead); never before the first stored row or after the last
    (listing/delisting); flows become 0; event fields stay NaN; mask stays False.
    """
    T = values.shape[0]
    traded = observed.any(axis=2)                                   # (T, N) a row was observed
    t = np.arange(T)[:, None]
    last = np.maximum.accumulate(np.where(traded, t, -1), axis=0)   # last traded session so far
    listed = (day_ints[:, None] >= spans[None, :, 0]) & (day_ints[:, None] <= spans[None, :, 1])
    fillable = ~traded & listed & (last >= 0)
    if limit is not None:
        fillable &= (t - last) <= limit
    ti, ni = np.nonzero(fillable)
    src = last[ti, ni]
    for f, name in enumerate(fields):
        if name in FLOW_FIELDS:
            values[ti, ni, f] = 0.0
        elif name in ADJUSTABLE_PRICE_FIELDS or name == "adj_close":
            values[ti, ni, f] = values[src, ni, f]


# ----------------------------------------------------------------------------------- tick build
def build_ticks(symbols: str | Iterable[str], start, end, freq: str = "3s",
                fields: str | Sequence[str] = ("price", "volume"), store: Store | str | os.PathLike | None = None,
                calendar: str | None = None, interval: str | None = None, dtype: torch.dtype = torch.float32,
                cache: bool = True, adjust: str | None = None) -> StockTensor:
    """A (day, tick, stock, feature) tensor: each session cut into ``freq`` slots of continuous trading.

    Slots cover calendars.segments (A-shares 09:30-11:30 and 13:00-15:00, lunch skipped; US 09:30-16:00).
    A-shares: the 09:25 opening call auction folds into the first slot (as the vendors' 09:30 bar does) and
    prints stamped after 11:30 or at 15:00 (closing auction) into the slot before; elsewhere records outside
    the session are dropped. ``price`` is the last trade, carried forward within the day (never from the
    day before); ``volume``/``amount``/``trades`` are sums (0 when nothing traded); open/high/low/close are
    per slot (NaN when nothing traded); mask = the slot had a trade. ``interval``: 'tick' (Store.read_ticks),
    '1m' (bars labelled by their start), or None: ticks when the store has them, else 1-minute bars.
    Built from bars, a session that is not a multiple of ``freq`` ends with a shorter slot (XNYS 60-minute
    bars: the last is 15:30-16:00, as vendors serve it). ``adjust``: as in ``build``; slots always hold
    prices as stored (ticks are raw), so None/'as_stored' or the stored adjustment are accepted.
    """
    checks.boolean("cache", cache)
    p = _tick_plan(symbols, start, end, freq, fields, store, calendar, interval, dtype, adjust, blocks=False)
    request = dict(kind="build_ticks", version=BUILD_VERSION, symbols=p.syms, start=str(p.days[0]),
                   end=str(p.days[-1]), freq=p.freq_s, fields=p.fields, calendar=p.cal, interval=p.source,
                   dtype=_dtype_name(p.tdtype), fingerprint=p.fingerprint)
    return _cached(p.store, request, cache, lambda: _build_slots(p))


def build_days(symbols: str | Iterable[str], start, end, days_per_block: int = 1, freq: str = "3s",
               fields: str | Sequence[str] = ("price", "volume"), store: Store | str | os.PathLike | None = None,
               calendar: str | None = None, interval: str | None = None, dtype: torch.dtype = torch.float32,
               adjust: str | None = None, memory: int | str = "1GB") -> Iterator[StockTensor]:
    """``build_ticks`` over [start, end] as (day, tick, stock, feature) blocks of ``days_per_block`` sessions,
    made one at a time: memory holds one block and the records read ahead, whatever the range (a month of
    the whole market's minutes).

    Reads: the symbols' records are read (every file checksum-verified over all of it) once per *span* of
    blocks, aggregated into their slots and kept, sparse, until the span's blocks are made. A span is as many
    blocks as fit in ``memory`` (bytes, or text like "512MB"; at least one block), counted as if every stock
    traded in every slot; so a month of 1-minute bars stored one file per symbol (``minute_bars().write``)
    is read once, not once per day, while a range larger than ``memory`` is read span by span (a file that
    covers several spans is read in each). Peak memory: about ``memory`` plus two blocks.

    Every check build_ticks makes over the whole range is made before this returns, so bad input never
    fails half-way. Concatenated along "day", the blocks equal ``build_ticks`` of the range bit for bit
    (values, mask, coords): every block has the range's longest tick axis (slots after an early close NaN,
    mask False) and a stock without records in a block is untraded there (flows 0, prices NaN). meta
    differs only in ``slots_per_day`` and ``dropped_records`` (the block's own: a dropped record counts in
    the block of its session, or of the last session before its date, so the blocks' counts add up to the
    range's) and ``block`` ([index, count]). Blocks are not cached: caching a range larger than memory
    would only write it to disk again. A tick store with no ticks at all in some block is refused up front.
    """
    per = checks.positive_int("days_per_block", days_per_block)
    budget = checks.parse_bytes(memory, "memory")
    p = _tick_plan(symbols, start, end, freq, fields, store, calendar, interval, dtype, adjust)
    return _day_blocks(p, per, budget)


@dataclass
class _TickPlan:
    """What build_ticks decides before reading any record, for the whole range."""
    store: Store
    syms: list[str]
    fields: list[str]
    freq_s: int
    tdtype: torch.dtype
    cal: str
    days: np.ndarray
    segs: np.ndarray
    n_slots: np.ndarray
    source: str
    adjusts: dict[str, str] | None
    fingerprint: Any
    sources: list[str]
    tick_days: dict[str, set[str]] | None


def _tick_plan(symbols, start, end, freq, fields, store, calendar, interval, dtype, adjust,
               blocks: bool = True) -> _TickPlan:
    """build_ticks' checks and resolved arguments (build_ticks and build_days share them); ``blocks`` adds
    what day blocks need: each symbol's source name and, for ticks, which days hold any."""
    syms = _symbol_list(symbols)
    fields = _field_list(fields, TICK_FIELDS)
    if adjust is not None and adjust not in ADJUSTMENTS:
        raise BadInputError(f"adjust={adjust!r} is not one of {', '.join(ADJUSTMENTS)}")
    freq_s = _freq_seconds(freq)
    tdtype = _torch_dtype(dtype)
    lo, hi = _calendars.parse_date(start, "start"), _calendars.parse_date(end, "end")
    cal, own = _calendar_for(syms, calendar, allow_union=False)
    days = _sessions(cal, own, lo, hi)
    segs = _calendars.segments(cal, days)
    store = _as_store(store)
    source = _tick_source(store, syms, days, interval, freq_s)
    n_slots = _check_freq(segs, freq_s, freq, cal, partial_last=source != "tick")
    adjusts = None if source == "tick" else {s: _slot_adjustment(store, s, source, adjust) for s in syms}
    if adjust not in (None, "as_stored"):
        stored = {"raw"} if source == "tick" else set(adjusts.values())
        if stored and adjust not in stored:
            raise BadInputError(f"the {source} {'records' if source == 'tick' else 'bars'} are stored "
                                f"{'/'.join(sorted(stored))}-adjusted and intraday slots use them as stored: pass "
                                f"adjust={sorted(stored)[0]!r} (CLI: --adjust {sorted(stored)[0]}) or "
                                "adjust='as_stored' (CLI: --adjust as_stored)")
    fingerprint = (store.tick_fingerprint(syms, days[0], days[-1]) if source == "tick"
                   else store.fingerprint(syms, source, adjust=adjusts))
    sources, tick_days = [], None
    if blocks:
        sources = sorted({_source_name(store, s, source, None if adjusts is None else adjusts[s]) for s in syms})
    if blocks and source == "tick":   # read_ticks refuses a symbol with no ticks in a block: know which have them
        tick_days = {s: {q.name[5:] for q in store.partition_dir(s, kind="ticks").glob("date=*")} for s in syms}
        for i in range(len(days)):
            if not any(str(days[i]) in d for d in tick_days.values()):
                raise MissingDataError(f"the store at {store.root} has no ticks of any of the symbols on "
                                       f"{days[i]}; build the days before and after it separately")
    return _TickPlan(store, syms, fields, freq_s, tdtype, cal, days, segs, n_slots, source, adjusts, fingerprint,
                     sources, tick_days)


def _span_blocks(p: _TickPlan, per: int, budget: int) -> int:
    """How many blocks of ``per`` days one read may cover: their slots, held sparse (a cell index and the
    fields), fit in ``budget`` bytes even if every stock traded in every slot (at least one block)."""
    cell = 4 + len(p.fields) * np.dtype(_np_dtype(p.tdtype)).itemsize
    per_block = per * int(p.n_slots.max()) * len(p.syms) * cell
    return max(1, budget // max(per_block, 1))


def _day_blocks(p: _TickPlan, per: int, budget: int) -> Iterator[StockTensor]:
    K, N, D = int(p.n_slots.max()), len(p.syms), len(p.days)
    count = -(-D // per)
    span = per * _span_blocks(p, per, budget)
    source = p.sources[0] if len(p.sources) == 1 else p.sources
    for s0 in range(0, D, span):
        s1 = min(s0 + span, D)
        # read up to the day before the next span's first session: records dated between sessions (a weekend)
        # are read by exactly one span, and counted as dropped in the block of the session before them
        hi = str(p.days[s1 - 1]) if s1 == D else str(p.days[s1] - np.timedelta64(1, "D"))
        slots = _span_slots(p, s0, s1, hi, K)
        for b0 in range(s0, s1, per):
            b1 = min(b0 + per, s1)
            values = np.full(((b1 - b0) * K, N, len(p.fields)), np.nan, dtype=_np_dtype(p.tdtype))
            traded = np.zeros(((b1 - b0) * K, N), dtype=bool)
            lo_cell, hi_cell = (b0 - s0) * K, (b1 - s0) * K
            dropped = {}
            for j, got in enumerate(slots):
                if got is None:
                    continue
                cells, vals, dropped_by_day = got
                a, b = np.searchsorted(cells, (lo_cell, hi_cell))
                _scatter(values, traded, j, cells[a:b] - lo_cell, vals[a:b])
                if dropped_by_day is not None and dropped_by_day[b0 - s0:b1 - s0].any():
                    dropped[p.syms[j]] = int(dropped_by_day[b0 - s0:b1 - s0].sum())
            values, mask = _finish_slots(values, traded, p.fields, p.n_slots[b0:b1], K)
            meta = _slot_meta(p, source, p.n_slots[b0:b1], dropped)
            meta["block"] = [b0 // per, count]
            days = p.days[b0:b1]
            yield StockTensor(values, ("day", "tick", "stock", "feature"),
                              {"day": days, "tick": (np.arange(K) * p.freq_s).astype("timedelta64[s]"),
                               "stock": np.array(p.syms), "feature": np.array(p.fields)}, mask, meta)
            del values, mask, traded   # nothing of this block is held while the next one is built
        del slots


def _span_slots(p: _TickPlan, s0: int, s1: int, hi: str, K: int) -> list:
    """Per symbol, its records dated [days[s0], hi] in their slots of days[s0:s1] (``_symbol_slots``), or None
    for a tick symbol without a tick day there (read_ticks would refuse it)."""
    lo = str(p.days[s0])
    out = []
    for sym in p.syms:
        if p.tick_days is not None and not any(lo <= d <= hi for d in p.tick_days[sym]):
            out.append(None)
            continue
        out.append(_symbol_slots(p, sym, p.days[s0:s1], p.segs[s0:s1], lo, hi, K))
    return out


def _symbol_slots(p: _TickPlan, sym: str, days: np.ndarray, segs: np.ndarray, lo: str, hi: str, K: int):
    """``sym``'s records dated [lo, hi] aggregated into the slots of ``days``: (cells, values, dropped), cells
    the ascending flat slot numbers (day * K + slot, int32) of the traded slots, values (cells, fields) in
    the build's dtype, dropped the records outside every slot per day (a record dated between sessions
    counts on the session before it), or None when none was."""
    D = len(days)
    fields = p.fields
    needs = {_TICK_INPUTS[f] for f in fields} - {None}
    rec = _records(p.store, sym, lo, hi, p.source, needs, None if p.adjusts is None else p.adjusts[sym])
    day_ints = days.astype(np.int64)
    d = np.searchsorted(day_ints, rec["date"])
    ok = (d < D) & (day_ints[np.minimum(d, D - 1)] == rec["date"])
    slot = np.full(len(d), -1, dtype=np.int64)
    slot[ok] = _slot_of(rec["time"][ok], d[ok], segs, p.freq_s * _NS, p.cal in FOLD_CALENDARS)
    keep = slot >= 0
    dropped = None
    if not keep.all():
        at = np.searchsorted(day_ints, rec["date"][~keep], side="right") - 1
        dropped = np.bincount(np.clip(at, 0, D - 1), minlength=D)
    flat = (d * K + slot)[keep]
    if not len(flat):
        return flat.astype(np.int32), np.empty((0, len(fields)), dtype=_np_dtype(p.tdtype)), dropped
    rec = {n: v[keep] for n, v in rec.items() if n in needs}
    if (np.diff(flat) < 0).any():                                     # records come time-sorted; be sure
        order = np.argsort(flat, kind="stable")
        flat, rec = flat[order], {n: v[order] for n, v in rec.items()}
    starts = np.r_[0, np.nonzero(np.diff(flat))[0] + 1]
    vals = np.empty((len(starts), len(fields)), dtype=_np_dtype(p.tdtype))
    for f, name in enumerate(fields):
        vals[:, f] = _aggregate(rec, starts, len(flat), name)
    return flat[starts].astype(np.int32), vals, dropped


def _scatter(values: np.ndarray, traded: np.ndarray, j: int, cells: np.ndarray, vals: np.ndarray) -> None:
    """Stock ``j``'s traded slots (flat cell numbers of the block) into the block's (cells, stock, field) arrays."""
    if len(cells):
        values[cells, j] = vals
        traded[cells, j] = True


def _finish_slots(values: np.ndarray, traded: np.ndarray, fields: list[str], n_slots: np.ndarray, K: int):
    """Scattered slots -> (day, tick, stock, field) values and mask: price carried within the day, flows 0
    where nothing traded, NaN after an early close."""
    D = len(n_slots)
    values = values.reshape(D, K, values.shape[1], len(fields))
    traded = traded.reshape(D, K, traded.shape[1])
    for f, name in enumerate(fields):
        v = values[..., f]
        if name == "price":  # the last trade so far today: carried within the day, never from the day before
            last = np.where(traded, np.arange(K, dtype=np.int32)[None, :, None], np.int32(-1))
            np.maximum.accumulate(last, axis=1, out=last)
            carried = np.take_along_axis(v, np.maximum(last, 0), axis=1)
            carried[last < 0] = np.nan
            v[...] = carried
        elif name in ("volume", "amount", "trades"):
            v[~traded] = 0.0
    closed = np.arange(K)[None, :] >= n_slots[:, None]               # slots after an early close
    if closed.any():
        values[closed] = np.nan
    mask = np.broadcast_to(traded[..., None], values.shape).copy()
    return torch.from_numpy(values), torch.from_numpy(mask)


def _slot_meta(p: _TickPlan, source, n_slots: np.ndarray, dropped: dict) -> dict:
    fold = p.cal in FOLD_CALENDARS
    meta: dict[str, Any] = dict(
        source=source, interval=p.source, freq=f"{p.freq_s}s", calendar=p.cal,
        adjustment="raw" if p.source == "tick" else p.adjusts[p.syms[0]],
        auction="folded into the first slot; late prints into the slot before" if fold
        else "records outside the regular session dropped",
        store=p.store.uri, store_fingerprint=p.fingerprint, slots_per_day=n_slots.tolist(),
    )
    if dropped:
        meta["dropped_records"] = dropped
    return meta


def _freq_seconds(freq) -> int:
    import pandas as pd

    try:
        td = pd.Timedelta(freq)
    except (ValueError, TypeError):
        raise BadInputError(f"cannot read freq {freq!r}; write it like '3s', '1min' or '5min'") from None
    secs = td.total_seconds()
    if secs <= 0 or secs != int(secs):
        raise BadInputError(f"freq {freq!r} must be a positive whole number of seconds")
    return int(secs)


def _check_freq(segs: np.ndarray, freq_s: int, freq, cal: str, partial_last: bool = False) -> np.ndarray:
    """Slots per day; a freq that does not divide every continuous segment is an error, except that
    with ``partial_last`` the day's last segment may end in a shorter slot (bars: XNYS 60m ends at 16:00)."""
    lengths = (segs[:, :, 1] - segs[:, :, 0]) // _NS
    bad = lengths % freq_s != 0
    if partial_last:
        bad[:, -1] = False
    if bad.any():
        n = int(lengths[bad][0])
        divisors = [d for d in (1, 3, 5, 10, 15, 30, 60, 180, 300, 600, 900, 1800) if all(lengths.ravel() % d == 0)]
        raise BadInputError(
            f"freq {freq!r} does not divide the {cal} continuous session segment of {n // 3600}h{n % 3600 // 60:02d}m "
            f"({n} s); use one that does, e.g. " + ", ".join(f"{d}s" if d < 60 else f"{d // 60}min"
                                                           for d in divisors[:8]))
    return lengths[:, :-1].sum(axis=1) // freq_s + -(-lengths[:, -1] // freq_s)


def _slot_adjustment(store: Store, sym: str, interval: str, adjust: str | None) -> str:
    """The stored adjustment of ``sym``'s intraday bars that slots read: the one asked for when stored, the
    only one stored otherwise (slots never convert; the caller names what is held), or a refusal to guess."""
    stored = store.adjustments(sym, interval)
    if adjust in stored:
        return adjust
    if len(stored) > 1:
        raise BadInputError(f"{sym} {interval} bars are stored in several adjustments ({', '.join(stored)}); "
                            f"say which with adjust={stored[0]!r} (CLI: --adjust {stored[0]})")
    return stored[0]


def _tick_source(store: Store, syms: list[str], days: np.ndarray, interval: str | None, freq_s: int) -> str:
    """'tick' or a bar interval, checked against what the store holds."""
    lo, hi = str(days[0]), str(days[-1])

    def has_ticks(s: str) -> bool:
        base = store.partition_dir(s, kind="ticks")
        return base.exists() and any(lo <= p.name[5:] <= hi for p in base.glob("date=*"))

    if interval is None:
        if all(has_ticks(s) for s in syms):
            return "tick"
        if all(store.adjustments(s, "1m") for s in syms):
            interval = "1m"
        else:
            lacking = [s for s in syms if not has_ticks(s)]
            raise MissingDataError(
                f"the store at {store.uri} has neither ticks ({lo}..{hi}) nor 1m bars for "
                f"{', '.join(lacking)}; import them with `fintensor import FILE --ticks` (or 1-minute bars "
                f"with `fintensor import FILE --interval 1m`)")
    if interval in ("tick", "ticks"):
        lacking = [s for s in syms if not has_ticks(s)]
        if lacking:
            raise _missing_error(store, lacking, "ticks", lo, hi)
        return "tick"
    iv = parse_interval(interval)
    if interval_kind(iv) != "intraday":
        raise BadInputError(f"interval {interval!r} is not intraday; use 'tick', '1m', '5m', ...")
    bar_s = _freq_seconds(iv.replace("m", "min"))
    if freq_s % bar_s:
        raise BadInputError(f"freq {freq_s}s is not a multiple of the {iv} bars it is built from; use a "
                            f"multiple of {bar_s}s, or ticks for finer slots")
    lacking = [s for s in syms if not store.adjustments(s, iv)]
    if lacking:
        raise _missing_error(store, lacking, iv, lo, hi)
    return iv


def _slot_of(times: np.ndarray, day_idx: np.ndarray, segs: np.ndarray, freq_ns: int, fold: bool) -> np.ndarray:
    """Slot number of each record (-1 = outside the session and dropped). Slots count trading time.

    One binary search over every segment edge of every day: an even hit is inside a segment, an odd one
    in the gap after it (lunch, after the close) and -1 before the first.
    """
    S = segs.shape[1]
    edges = segs.reshape(-1)                                          # lo, hi, lo, hi, ... ascending
    lengths = (segs[:, :, 1] - segs[:, :, 0]).reshape(-1)
    before = np.cumsum(lengths.reshape(-1, S), axis=1).reshape(-1) - lengths   # trading time before, same day
    k = np.searchsorted(edges, times, side="right") - 1
    g = np.maximum(k, 0) // 2                                         # the segment at or before the record
    own = (k >= 0) & (g // S == day_idx)                              # ... and it is in the record's session
    offset = np.where(own & (k % 2 == 0), before[g] + times - edges[2 * g], -1)
    if fold:
        offset = np.where(own & (k % 2 == 1), before[g] + lengths[g] - 1, offset)   # late prints: last instant
        offset = np.where((k < 0) | (g // S < day_idx), 0, offset)                   # opening call auction
    return np.where(offset >= 0, offset // freq_ns, -1)


#: per output field, the record columns it aggregates
_TICK_INPUTS = {"price": "close", "close": "close", "open": "open", "high": "high", "low": "low",
                "volume": "volume", "amount": "amount", "trades": None}


def _records(store: Store, sym: str, lo: str, hi: str, source: str, needs: set[str],
             adjust: str | None = None) -> dict[str, np.ndarray]:
    """time (ns), local date (days) and the ``needs`` among open/high/low/close/volume/amount of the records
    dated [lo, hi], time-sorted.

    Ticks: each trade's price is its open, high, low and close; amount falls back to price x volume.
    Bars: a missing open/high/low (vendors with one price per minute) falls back to the close.
    """
    num = lambda t, c: t.column(c).to_numpy().astype(np.float64)  # noqa: E731 (nulls become NaN)
    if source == "tick":
        cols = (["price"] if needs - {"volume"} else []) + (["volume"] if needs & {"volume", "amount"} else []) \
            + (["amount"] if "amount" in needs else [])
        t = store.read_ticks(sym, lo, hi, columns=cols or ["price"])
        rec = {n: num(t, "price") for n in needs & {"open", "high", "low", "close"}}
        if needs & {"volume", "amount"}:
            rec["volume"] = np.nan_to_num(num(t, "volume"))
        if "amount" in needs:
            amount = num(t, "amount")
            rec["amount"] = np.where(np.isnan(amount), num(t, "price") * rec["volume"], amount)
    else:
        prices = needs & {"open", "high", "low", "close"}
        cols = sorted(prices | ({"close"} if prices else set()) | (needs & {"volume", "amount"}))
        t = store.read_partition(sym, source, lo, hi, cols or ["close"], adjust=adjust)
        rec = {n: num(t, n) for n in cols}
        for n in prices - {"close"}:
            rec[n] = np.where(np.isnan(rec[n]), rec["close"], rec[n])
        if "volume" in rec:
            rec["volume"] = np.nan_to_num(rec["volume"])
    rec["time"] = t.column("time").cast(pa.int64()).to_numpy()
    rec["date"] = t.column("date").cast(pa.int32()).to_numpy().astype(np.int64)
    return rec


def _aggregate(rec: dict[str, np.ndarray], starts: np.ndarray, n: int, field: str) -> np.ndarray:
    """One field per slot from time-sorted records whose slots begin at ``starts``."""
    if field == "trades":
        return np.diff(np.r_[starts, n]).astype(np.float64)
    x = rec[_TICK_INPUTS[field]]
    if field in ("price", "close"):
        return x[np.r_[starts[1:], n] - 1]                            # the last record of each slot
    if field == "open":
        return x[starts]
    ufunc = {"high": np.maximum, "low": np.minimum}.get(field, np.add)
    return ufunc.reduceat(x, starts)


def _source_name(store: Store, sym: str, source: str, adjust: str | None = None) -> str:
    """The vendor recorded in a partition's manifest (any one tick day's for ticks)."""
    if source != "tick":
        return (store.manifest(sym, source, adjust=adjust) or {}).get("source", "?")
    first = next(iter(sorted(store.partition_dir(sym, kind="ticks").glob("date=*/_manifest.json"))), None)
    return json.loads(first.read_bytes()).get("source", "?") if first else "?"


def _build_slots(p: _TickPlan) -> StockTensor:
    """build_ticks' tensor: each symbol's records of the whole range read, slotted and scattered in turn."""
    K, N = int(p.n_slots.max()), len(p.syms)
    values = np.full((len(p.days) * K, N, len(p.fields)), np.nan, dtype=_np_dtype(p.tdtype))
    traded = np.zeros((len(p.days) * K, N), dtype=bool)
    lo, hi = str(p.days[0]), str(p.days[-1])
    dropped = {}
    for j, sym in enumerate(p.syms):
        cells, vals, dropped_by_day = _symbol_slots(p, sym, p.days, p.segs, lo, hi, K)
        _scatter(values, traded, j, cells, vals)
        if dropped_by_day is not None:
            dropped[sym] = int(dropped_by_day.sum())
        del cells, vals
    values, mask = _finish_slots(values, traded, p.fields, p.n_slots, K)
    sources = sorted({_source_name(p.store, s, p.source, None if p.adjusts is None else p.adjusts[s])
                      for s in p.syms})
    meta = _slot_meta(p, sources[0] if len(sources) == 1 else sources, p.n_slots, dropped)
    return StockTensor(values, ("day", "tick", "stock", "feature"),
                       {"day": p.days, "tick": (np.arange(K) * p.freq_s).astype("timedelta64[s]"),
                        "stock": np.array(p.syms), "feature": np.array(p.fields)}, mask, meta)


# ------------------------------------------------------------------------------- intraday build
def _build_intraday(syms, lo, hi, fields, interval, store, calendar, adjust, tdtype, cache) -> StockTensor:
    """Intraday bars on a (time, stock, feature) axis of UTC slot instants: the 4D slots, flattened."""
    fields = _field_list(fields, TICK_FIELDS)
    store_ = _as_store(store)
    freq = interval.replace("m", "min")
    t4 = build_ticks(syms, lo, hi, freq=freq, fields=fields, store=store_, calendar=calendar,
                     interval=interval, dtype=tdtype, cache=cache, adjust=adjust)
    D, K, N, F = t4.shape
    segs = _calendars.segments(t4.meta["calendar"], t4.coords["day"])
    freq_ns = _freq_seconds(freq) * _NS
    instants = _slot_instants(segs, K, freq_ns)                      # (D, K), -1 beyond an early close
    keep = instants.ravel() >= 0
    values = t4.values.reshape(D * K, N, F)[torch.from_numpy(keep)]
    mask = t4.mask.reshape(D * K, N, F)[torch.from_numpy(keep)]
    meta = dict(t4.meta, interval=interval)
    return StockTensor(values, ("time", "stock", "feature"),
                       {"time": instants.ravel()[keep].astype("datetime64[ns]"), "stock": t4.coords["stock"],
                        "feature": t4.coords["feature"]}, mask, meta)


def _slot_instants(segs: np.ndarray, K: int, freq_ns: int) -> np.ndarray:
    """UTC ns of each slot's start, (D, K); -1 for slots after the day's close."""
    lengths = segs[:, :, 1] - segs[:, :, 0]
    before = np.cumsum(lengths, axis=1) - lengths
    offset = np.arange(K)[None, :] * freq_ns
    out = np.full((segs.shape[0], K), -1, dtype=np.int64)
    for s in range(segs.shape[1]):
        inside = (offset >= before[:, s:s + 1]) & (offset < before[:, s:s + 1] + lengths[:, s:s + 1])
        out = np.where(inside, segs[:, s:s + 1, 0] + offset - before[:, s:s + 1], out)
    return out
