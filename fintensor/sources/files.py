"""Import market data files (CSV, .gz, .zip) into the store: bars or ticks, from any common vendor.

``ft.import_csv("AAPL.csv")`` just works for a Yahoo file. Vendor conventions (column names, lots,
price scales, timezones, adjustment) live in one table of presets, ``PRESETS``; the preset is picked from
the header and the file name, and every explicit option overrides it. Every file is read and checked
before the store is touched, so bad input anywhere leaves the store unchanged.

The pipeline, one module per job: ``csv_reader`` (regular files, bounded decompression, header and preset
detection) -> ``dates`` (date spellings) -> this module (columns, units, symbols, keys; the import driver)
-> the store's dry run (the one check of rows against the store) -> ``report`` (what happened, per symbol).
"""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
import pyarrow as pa

from .. import symbols as _symbols
from ..calendars import parse_date
from .. import checks
from ..errors import BadInputError, FintensorError, StoreWriteError
from ..schema import (DAILY_SCHEMA, NONNEGATIVE, PRICE_FIELDS, SCHEMAS, VOLUME_FIELDS, interval_kind,
                      parse_interval)
from ..store import Store, WriteResult, conform
from .csv_reader import (_DATA_NAME, MISSING, _detect, _expand, _head, _looks_like_time, _Raw, _read_body,
                         MAX_UNPACKED_BYTES, UNPACKED_FREE, UNPACKED_RATIO)
from .dates import _OFFSET, _ms_of_day, _parse_stamps
from .presets import _BY_NAME, ALIASES, IGNORED, PRESET_NAMES, PRESETS, Preset  # noqa: F401 (re-exported)
from .report import IngestReport, ImportReport, SkippedFilesError, SymbolResult  # noqa: F401 (re-exported)

_TEXT_FIELDS = ("date", "time", "datetime", "symbol")  # read as text; every other column as numbers

# --------------------------------------------------------------------------------------------- API
def import_csv(paths: str | os.PathLike | Iterable[str | os.PathLike], *, store: Store | str | None = None,
               symbol: str | None = None, layout: str = "auto", kind: str = "auto", interval: str | None = None,
               format: str | None = None, timezone: str | None = None, volume_unit: str | float | None = None,
               price_scale: float | None = None, amount_unit: str | float | None = None,
               adjust: str | None = None, adjusted_as_of: str | None = None, source: str | None = None,
               field: str = "close", on_conflict: str = "error", recursive: bool = True,
               date_column: str | None = None, date_format: str | None = None) -> ImportReport:
    """Import bar or tick files (CSV, .gz, .zip with one CSV) into the store; returns an ImportReport.

    paths: files, directories or glob patterns. layout: "auto", "long" (a symbol column), "wide" (one
    column per symbol holding ``field``) or "file" (one symbol per file: from a column, the file name or
    ``symbol``). kind: "auto", "bars" or "ticks". format: a preset name (see ``PRESETS``) instead of
    auto-detection. volume_unit: "shares", "lots" (100 shares) or shares per unit. price_scale: prices
    are divided by it. amount_unit: "currency", "thousands" or currency units per unit. adjust:
    "raw", "split" or "full": the adjustment the OHLC columns are in (default: the preset's). on_conflict: "error", "keep" or "overwrite".
    date_column: the header name of the date column when it is not one fintensor knows. date_format: a
    strptime format for every date (e.g. "%d/%m/%Y"): needed when D/M/YYYY vs M/D/YYYY is ambiguous.
    recursive: read sub-folders of a directory. A file found in a folder or by a pattern that cannot be
    read is skipped and listed in ``report.skipped`` (``raise_for_status()`` raises then); a file named
    outright must import.
    """
    recursive = checks.boolean("recursive", recursive)
    opts = _Options.make(symbol=symbol, layout=layout, kind=kind, interval=interval, format=format,
                         timezone=timezone, volume_unit=volume_unit, price_scale=price_scale,
                         amount_unit=amount_unit, adjustment=adjust, adjusted_as_of=adjusted_as_of,
                         source=source, field=field, on_conflict=on_conflict, date_column=date_column,
                         date_format=date_format)
    st = store if isinstance(store, Store) else Store(store)
    files = _expand(paths, recursive)
    pieces, skipped, not_stored = [], [], []
    for path, named in files:
        if not named and not _DATA_NAME.search(path.name):
            skipped.append((str(path), "not a data file (import reads .csv/.txt/.tsv/.dat, .gz and .zip)"))
            continue
        try:
            pieces.extend(_parse_file(path, opts))
        except _NotStored as why:
            not_stored.append((str(path), str(why)))
        except BadInputError as exc:
            if named:  # a file the user named is fatal; one found in a folder or by a pattern is reported
                raise
            skipped.append((str(path), str(exc).removeprefix(f"{path}: ").removeprefix(str(path))))
    if not pieces:
        why = "; ".join(f"{f}: {r}" for f, r in skipped[:3])
        raise BadInputError(f"none of the {len(files)} files could be imported ({why})")
    jobs = _group(pieces, opts)
    planned = [_store_write(st, job, opts.on_conflict, dry_run=True) for job in jobs]  # all checked before any write
    written: list[SymbolResult] = []
    for job, plan in zip(jobs, planned):
        try:
            written.append(_write(st, job, opts.on_conflict, plan))
        except StoreWriteError as exc:  # say exactly what is committed; a re-run completes the rest
            done = [r.symbol for r in written]
            raise StoreWriteError(
                f"{exc} — of this import's {len(jobs)} symbol/interval groups, {len(done)} were committed before "
                f"it ({', '.join(done[:5])}{' ...' if len(done) > 5 else ''}) and are stored; re-run the same "
                "import to complete it", committed=[*exc.committed]) from None
    return ImportReport(written, str(st.root), skipped, not_stored)


# ------------------------------------------------------------------------------------------ options
def _unit(value, names: dict, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lower() in names:
        return names[value.strip().lower()]
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not np.isfinite(number) or number <= 0:
        raise BadInputError(f"{what} must be one of {sorted(names)} or a positive number, not {value!r}")
    return number


@dataclasses.dataclass(frozen=True)
class _Options:
    symbol: str | None
    alias: str | None
    layout: str
    kind: str
    interval: str | None
    preset: Preset | None
    timezone: str | None
    volume_unit: float | None
    price_scale: float | None
    amount_unit: float | None
    adjustment: str | None
    adjusted_as_of: str | None
    source: str | None
    field: str
    on_conflict: str
    date_column: str | None = None
    date_format: str | None = None

    @classmethod
    def make(cls, *, symbol, layout, kind, interval, format, timezone, volume_unit, price_scale, amount_unit,
             adjustment, adjusted_as_of, source, field, on_conflict, date_column=None,
             date_format=None) -> "_Options":
        def choice(name, value, allowed):
            if value not in allowed:
                raise BadInputError(f"{name} must be one of {', '.join(map(repr, allowed))}, not {value!r}")
            return value

        preset = None
        if format is not None:
            preset = _BY_NAME.get(str(format).strip().lower())
            if preset is None:
                raise BadInputError(f"unknown format {format!r}; use one of {', '.join(PRESET_NAMES)}")
        if timezone is not None:
            try:
                pd.Timestamp("2020-01-01").tz_localize(timezone)
            except Exception:
                raise BadInputError(f"unknown timezone {timezone!r}; use an IANA name such as "
                                    "America/New_York or Asia/Shanghai") from None
        if field not in DAILY_SCHEMA.names or field in ("date", "trade_status"):
            raise BadInputError(f"field {field!r} is not a bar field; use one of {DAILY_SCHEMA.names[1:-1]}")
        if adjusted_as_of is not None:
            adjusted_as_of = _iso_date(adjusted_as_of, "adjusted_as_of")
        if date_format is not None and (not isinstance(date_format, str) or "%" not in date_format):
            raise BadInputError(f"date_format must be a strptime format such as '%d/%m/%Y', not {date_format!r}")
        if date_column is not None and (not isinstance(date_column, str) or not date_column.strip()):
            raise BadInputError(f"date_column must be a column name, not {date_column!r}")
        return cls(
            symbol=_symbols.normalize(symbol) if symbol is not None else None,
            alias=symbol.strip() if symbol is not None else None,
            layout=choice("layout", layout, ("auto", "long", "wide", "file")),
            kind=choice("kind", kind, ("auto", "bars", "ticks")),
            interval=parse_interval(interval) if interval is not None else None,
            preset=preset, timezone=timezone,
            volume_unit=_unit(volume_unit, {"shares": 1.0, "lots": 100.0, "lot": 100.0}, "volume_unit"),
            price_scale=_unit(price_scale, {}, "price_scale"),
            amount_unit=_unit(amount_unit, {"currency": 1.0, "thousands": 1000.0}, "amount_unit"),
            adjustment=choice("adjust", adjustment, (None, "raw", "split", "full")),
            adjusted_as_of=adjusted_as_of, source=source, field=field,
            on_conflict=choice("on_conflict", on_conflict, ("error", "keep", "overwrite")),
            date_column=date_column.strip().lower() if date_column else None, date_format=date_format,
        )


def _iso_date(value, what: str) -> str:
    return parse_date(value, what).isoformat()


# ---------------------------------------------------------------------------------------- parsing
@dataclasses.dataclass
class _Piece:
    """One symbol's rows from one file, in store units, checked; ready to be grouped and written."""

    symbol: str
    alias: str | None
    kind: str                 # "daily", "intraday", "ticks"
    interval: str             # "1d", "1m", ... "tick"
    frame: dict               # store field -> numpy column (time, date, values in store units)
    lines: np.ndarray
    path: Path
    preset: Preset
    adjustment: str
    adjusted_as_of: str | None
    timezone: str | None
    units: dict
    warnings: list[str]
    read: int = 0             # rows of the file for this symbol
    dropped: dict = dataclasses.field(default_factory=dict)  # why -> rows not kept


class _NotStored(Exception):
    """A file in a layout fintensor recognises but does not store (reported, not an error)."""


def _parse_file(path: Path, opts: _Options) -> list[_Piece]:
    """Read, convert and check one file; one piece per symbol in it."""
    raw = _head(path)
    preset = _detect(raw, opts.preset)
    if preset.not_stored:
        raise _NotStored(f"{sum(1 for line in raw.text.splitlines() if line.strip())} rows of {preset.not_stored}")
    cols, wide, warnings = _columns(raw, preset, opts)
    _read_body(raw, [i for f, i in cols.items() if f in _TEXT_FIELDS])
    where = str(path)
    cells, lines, spellings = _symbol_spellings(raw, cols, wide, opts, where, preset)
    stamps, has_time, aware = _timestamps(raw, cells, lines, cols, where, opts.date_format, preset)
    kind = _kind(opts, preset, has_time, cols, where)
    units, factors = _units(preset, opts)
    values = _store_units({f: _numbers(cells[i], f, lines, where) for f, i in cols.items()
                           if f not in _TEXT_FIELDS + ("ms",)}, factors)
    suspicious = np.nan_to_num(values.pop("suspicious", np.zeros(len(lines)))) != 0
    empty = np.all([np.isnan(v) for v in values.values()], axis=0)
    for drop, why in ((suspicious, "record(s) flagged suspicious"), (empty & ~suspicious, "row(s) without values")):
        if drop.any():  # LEAN leaves suspicious ticks out of its own bars too; Yahoo writes 'null' rows
            warnings.append(f"dropped {int(drop.sum())} {why}")
    read_spellings = spellings
    drop_reasons = {"flagged suspicious": suspicious, "no values": empty & ~suspicious}
    if (suspicious | empty).any():
        keep = ~(suspicious | empty)
        lines, spellings, stamps = lines[keep], spellings[keep], stamps[keep]
        values = {k: v[keep] for k, v in values.items()}
        if not keep.any():
            raise BadInputError(f"{where}: no row has any value; nothing to import")
    adjustment, as_of_last = _adjustment(preset, opts, values.pop("adjustflag", None), where)

    pieces = []
    for spelling in pd.unique(spellings):
        sel = spellings == spelling
        sym = _checked_symbol(spelling, where, lines[sel][0])
        tz = opts.timezone or preset.timezone or (None if kind == "daily" else _known_timezone(sym))
        frame = {k: v[sel] for k, v in values.items()}
        tz = _add_keys(frame, stamps[sel], has_time, aware, kind, tz, where, sym)
        interval = _interval(opts, preset, kind, frame, where)
        last = str(frame["date"].max())
        frame = _schema_columns(frame, kind, warnings)
        _check_values(frame, lines[sel], where)
        frame, frame_lines = _dedupe(frame, kind, lines[sel], where)
        mine = read_spellings == spelling
        dropped = {why: int((drop & mine).sum()) for why, drop in drop_reasons.items() if (drop & mine).any()}
        if len(frame_lines) < int(sel.sum()):
            dropped["exact duplicate"] = int(sel.sum()) - len(frame_lines)
        as_of = opts.adjusted_as_of or (last if as_of_last else None)
        alias = None if str(spelling).upper() == sym else str(spelling)
        pieces.append(_Piece(sym, alias, kind, interval, frame, frame_lines, path, preset, adjustment, as_of, tz,
                             units, list(warnings), int(mine.sum()), dropped))
    return pieces


def _store_units(values: dict, factors: dict) -> dict:
    """Vendor units -> shares and currency units; vendor codes for 'none' -> the store's."""
    for field, factor in factors.items():
        if field in values and factor != 1:
            values[field] = values[field] / factor if field in PRICE_FIELDS else values[field] * factor
    if "split" in values:  # Yahoo's "Stock Splits" writes 0 for none
        values["split"] = np.where(values["split"] == 0, 1.0, values["split"])
    for side in ("bid", "ask"):  # a quote update of one side writes 0 for the other: absent, not free
        if side in values:
            absent = values[side] == 0
            for name in (side, f"{side}_size"):
                values[name] = np.where(absent, np.nan, values.get(name, np.nan))
    return values


def _symbol_spellings(raw: _Raw, cols: dict, wide: list[int] | None, opts: _Options, where: str,
                      preset: Preset):
    """(cells, lines, each row's symbol as written): from a column, the wide header, the option or file name."""
    cells, lines = raw.cells, raw.lines
    col = cols.pop("symbol", None)
    if wide:
        return _melt(raw, wide, cols, opts.field)
    if col is not None and opts.symbol is None:
        spellings = cells[col].str.strip().to_numpy()
        if (spellings == "").any():
            raise BadInputError(f"{where} line {lines[int(np.argmax(spellings == ''))]}: the symbol column is empty")
        return cells, lines, spellings
    if opts.symbol is not None:
        found = pd.unique(cells[col].str.strip()) if col is not None else []
        if len(found) > 1:
            raise BadInputError(f"{where}: the file holds {len(found)} symbols ({', '.join(found[:5])}); "
                                "symbol= is for one-symbol files: leave it out")
        return cells, lines, np.full(len(cells), opts.alias, dtype=object)
    lower_ok = preset.name.startswith("lean")  # LEAN names its files in lower case: aapl.csv
    guess = _symbol_from_name(raw.name, lower_ok) or _symbol_from_name(raw.path.name, lower_ok)
    if guess is None:
        raise BadInputError(f"{where}: no symbol column, and the file name does not look like a ticker (AAPL.csv, "
                            "600519.SS.csv); pass symbol= (CLI: --symbol)")
    return cells, lines, np.full(len(cells), guess, dtype=object)


def _columns(raw: _Raw, preset: Preset, opts: _Options) -> tuple[dict, list[int] | None, list[str]]:
    """(store field -> column index, the symbol columns of a wide file or None, warnings)."""
    warnings: list[str] = []
    if raw.header is None:
        if not preset.columns:
            raise BadInputError(f"{raw.path}: the file has no header; format {preset.name!r} needs one")
        if len(preset.columns) != len(raw.first):
            raise BadInputError(f"{raw.path}: format {preset.name!r} has {len(preset.columns)} columns, the file "
                                f"has {len(raw.first)}")
        names = list(preset.columns)
    else:
        names = raw.names
    rename = dict(preset.rename)
    cols: dict[str, int] = {}
    unknown = []
    if opts.date_column is not None and opts.date_column not in names:
        raise BadInputError(f"{raw.path}: no column named {opts.date_column!r} (date_column=); the header has "
                            f"{raw.header}")
    for i, name in enumerate(names):
        field = rename.get(name) or ALIASES.get(name) or (name if name in ("ms", "adjustflag") else None)
        if opts.date_column is not None:
            if name == opts.date_column:
                field = "date"
            elif field in ("date", "datetime", "time"):
                warnings.append(f"ignored column {raw.header[i]!r}: date_column={opts.date_column!r} holds the dates")
                continue
        if field is None:
            if name not in IGNORED:
                unknown.append(i)
            continue
        if field in cols:
            raise BadInputError(f"{raw.path}: columns {raw.header[cols[field]]!r} and {raw.header[i]!r} both "
                                f"mean {field!r}; drop one of them")
        cols[field] = i
    if "time" in cols and not {"date", "datetime"} & set(cols):  # a lone "time" column holds the timestamp
        cols["datetime"] = cols.pop("time")
    if not {"date", "datetime", "ms"} & set(cols):
        raise BadInputError(f"{raw.path}: no date column (looked for {', '.join(k for k, v in ALIASES.items() if v in ('date', 'datetime'))}); "
                            "rename it or pass format=")
    values = set(cols) - {"date", "time", "datetime", "ms", "symbol", "adjustflag"}
    series = _single_series(raw, names, cols, values, unknown, opts)
    if series is not None:  # 'date,vix', 'date,value', 'date,price' (daily): one value column
        for f in values:
            cols.pop(f)
        cols[opts.field] = series
        warnings.append(f"read the single value column {raw.header[series]!r} as {opts.field!r} "
                        "(pass field= / --field to store it as another field)")
        return cols, None, warnings
    wide = opts.layout == "wide" or (opts.layout == "auto" and not values and unknown)
    if wide:
        if values or not unknown:
            raise BadInputError(f"{raw.path}: a wide file has a date column and one column per symbol; this one "
                                f"has field columns {sorted(values)}")
        return cols, unknown, warnings
    if opts.layout == "long" and "symbol" not in cols:
        raise BadInputError(f"{raw.path}: layout='long' needs a symbol column (symbol, ticker, code, ts_code)")
    if unknown:
        warnings.append(f"ignored column(s) {[raw.header[i] for i in unknown]}")
    if not values & {"close", "price", "bid", "ask"}:
        raise BadInputError(f"{raw.path}: no close or price column (found {raw.header or list(names)}); "
                            "rename the columns or pass format=")
    return cols, None, warnings


#: Names of the one value column of a single-series file (FRED, index levels, returns).
SERIES_NAMES = {"value", "values", "price", "vix", "return", "returns", "ret", "rate", "level", "yield", "px_last",
                "last", "nav"}


def _single_series(raw: _Raw, names, cols, values, unknown, opts) -> int | None:
    """The column index of a single-series file's value column, or None for any other layout."""
    if opts.layout == "wide" or raw.header is None or "symbol" in cols:
        return None
    candidates = [i for i in unknown if names[i] in SERIES_NAMES] + [cols[f] for f in values if f == "price"]
    if len(unknown) + len(values) != 1 or len(candidates) != 1 and not (opts.symbol and len(unknown) == 1):
        return None
    date = raw.first[cols.get("date", cols.get("datetime", 0))]
    if "price" in values and (re.search(r"\d:\d\d", date) or "time" in cols):
        return None  # a time-stamped price: ticks
    return candidates[0] if candidates else unknown[0]


def _melt(raw: _Raw, wide_cols: list[int], cols: dict, field: str):
    """Wide -> long: one row per (row, symbol column), the value in a new column mapped to ``field``."""
    n, k = len(raw.cells), len(wide_cols)
    cells = pd.DataFrame({i: np.tile(raw.cells[i].to_numpy(), k) for i in cols.values()})
    value_col = raw.cells.shape[1]
    cells[value_col] = np.concatenate([raw.cells[i].to_numpy() for i in wide_cols])
    cols[field] = value_col
    syms = np.repeat(np.array([_a_share(raw.header[i]) for i in wide_cols], dtype=object), n)
    keep = cells[value_col].notna().to_numpy()
    return cells[keep].reset_index(drop=True), np.tile(raw.lines, k)[keep], syms[keep]


def _a_share(name: str) -> str:
    """A bare A-share code as a wide file's column name -> its Yahoo symbol by the exchange's code ranges
    (6xxxxx Shanghai .SS; 0xxxxx, 3xxxxx Shenzhen .SZ); any other name unchanged."""
    name = name.strip()
    if re.fullmatch(r"6\d{5}", name):
        return name + ".SS"
    if re.fullmatch(r"[03]\d{5}", name):
        return name + ".SZ"
    return name


def _symbol_from_name(name: str, lower_ok: bool = False) -> str | None:
    """The one token of a file name that can be a ticker: 'AAPL_data.csv', 'yahoofinance-AAPL-2004.csv'."""
    stem = re.sub(r"(?i)(\.(csv|txt|tsv|gz|zip))+$", "", name)
    noise = {"data", "daily", "day", "minute", "min", "tick", "ticks", "trade", "quote", "csvdir", "yahoo",
             "yahoofinance", "hist", "history", "intraday", "volume", "bars", "prices", "ohlc", "ohlcv", "1d",
             "1m", "5m", "1min", "5min"}
    tokens = [t for t in re.split(r"[\s_\-]+", stem) if t and not t.isdigit() and t.lower() not in noise]
    if len(tokens) != 1:
        return None
    # a lower-case ticker only beside a date or year ('nvda-1999-2014.txt') or in LEAN's own names
    lower_ok = lower_ok or re.search(r"\d{4}", stem) is not None
    if re.fullmatch(r"[A-Z][a-z]+", tokens[0]) or not lower_ok and not re.search(r"[A-Z0-9^=]", tokens[0]):
        return None  # 'test', 'prices', 'Apple': words, not tickers
    try:
        _symbols.normalize(tokens[0])
    except BadInputError:
        return None
    return tokens[0]


def _checked_symbol(spelling, where: str, line: int) -> str:
    try:
        return _symbols.normalize(str(spelling))
    except BadInputError as exc:
        raise BadInputError(f"{where} line {line}: {exc}") from None


def _known_timezone(sym: str) -> str | None:
    """The exchange timezone when the symbol names its exchange (600519.SS, 7203.T); bare tickers: None."""
    tz = _symbols.timezone(sym)
    return tz if tz != _symbols.timezone("AAPL") else None


# --------------------------------------------------------------------------------------- timestamps
def _timestamps(raw: _Raw, cells, lines, cols, where: str, date_format: str | None = None,
                preset: "Preset | None" = None) -> tuple[np.ndarray, bool, bool]:
    """(datetime64[ns] stamps, any time of day, aware) from the time columns; aware stamps are in UTC."""
    if "ms" in cols:
        return _ms_of_day(raw, _numbers(cells[cols["ms"]], "ms", lines, where), lines, where), True, False
    text = cells[cols["datetime" if "datetime" in cols else "date"]].str.strip()
    if "time" in cols:
        text = text + " " + cells[cols["time"]].str.strip()
    values = text.to_numpy(dtype=object)
    if (values == "").any():
        raise BadInputError(f"{where} line {lines[int(np.argmax(values == ''))]}: the date is empty")
    has_offset = text.str.contains(_OFFSET, regex=True).to_numpy()
    if has_offset.any() and not has_offset.all():
        i = int(np.argmax(has_offset != has_offset[0]))
        has = "has a UTC offset but" if has_offset[i] else "has no UTC offset but"
        raise BadInputError(f"{where} line {lines[i]}: {values[i]!r} {has} line {lines[0]} ({values[0]!r}) "
                            f"{'does not' if has_offset[i] else 'does'}; write all times one way")
    aware = bool(has_offset[0])
    if aware and text.str.contains(r"[ T]00:00(?::00(?:\.0+)?)?" + _OFFSET, regex=True).all():
        text, aware = text.str[:10], False  # daily bars stamped at local midnight: the date is the session
    parsed = _parse_stamps(text, aware, lines, where, date_format, getattr(preset, "day_order", None))
    stamps = (parsed.dt.tz_convert("UTC").dt.tz_localize(None) if aware else parsed).to_numpy()
    outside = (stamps < np.datetime64("1678-01-01")) | (stamps >= np.datetime64("2262-01-01"))  # int64 ns range
    if outside.any():
        i = int(np.argmax(outside))
        raise BadInputError(f"{where} line {lines[i]}: {values[i]!r} is outside the dates fintensor stores "
                            "(1678-01-01 .. 2261-12-31)")
    stamps = stamps.astype("datetime64[ns]")
    has_time = bool((stamps != stamps.astype("datetime64[D]")).any()) or "time" in cols or aware
    return stamps, has_time, aware


def _kind(opts: _Options, preset: Preset, has_time: bool, cols: dict, where: str) -> str:
    """'daily', 'intraday' or 'ticks': the option, else the preset, else the data (price or quotes, no OHLC: ticks)."""
    want = opts.kind if opts.kind != "auto" else preset.kind
    if want is None:
        want = "ticks" if {"price", "bid", "ask"} & set(cols) and not {"open", "close"} & set(cols) else "bars"
    if want == "ticks":
        if not has_time:
            raise BadInputError(f"{where}: ticks need a time of day, the file has dates only")
        return "ticks"
    interval = opts.interval or preset.interval
    return interval_kind(interval) if interval else ("intraday" if has_time else "daily")


def _add_keys(frame: dict, stamps, has_time, aware, kind, tz, where, sym) -> str | None:
    """Add date (daily) or time + local date (intraday, ticks) to ``frame``; returns the timezone."""
    if kind == "daily":
        if aware:  # an instant: its session date is the local date in the exchange's timezone
            local = pd.DatetimeIndex(stamps).tz_localize("UTC").tz_convert(tz or _symbols.timezone(sym))
            stamps = local.tz_localize(None).to_numpy()
        elif has_time and (stamps != stamps.astype("datetime64[D]")).any():
            raise BadInputError(f"{where}: daily bars with times of day; pass interval= for intraday bars")
        frame["date"] = stamps.astype("datetime64[D]")
        return tz
    if aware:
        utc = pd.DatetimeIndex(stamps).tz_localize("UTC")
        tz = tz or _symbols.timezone(sym)
    else:
        if tz is None:
            raise BadInputError(f"{where}: the times have no timezone and none can be inferred for {sym}; pass "
                                "timezone= (CLI: --tz), e.g. America/New_York, or write UTC offsets")
        try:
            utc = pd.DatetimeIndex(stamps).tz_localize(tz, ambiguous="raise", nonexistent="raise").tz_convert("UTC")
        except Exception as exc:  # pytz/zoneinfo raise several types for DST gaps and overlaps
            raise BadInputError(f"{where}: a local time does not exist or is ambiguous in {tz} ({exc}); write "
                                "UTC offsets") from None
    frame["time"] = utc.tz_localize(None).to_numpy().astype("datetime64[ns]")
    frame["date"] = utc.tz_convert(tz).tz_localize(None).to_numpy().astype("datetime64[D]")
    return tz


_STEPS = {60: "1m", 120: "2m", 300: "5m", 900: "15m", 1800: "30m", 3600: "60m", 5400: "90m"}


def _interval(opts: _Options, preset: Preset, kind: str, frame: dict, where: str) -> str:
    if kind == "ticks":
        return "tick"
    iv = opts.interval or preset.interval
    if iv is not None:
        if interval_kind(iv) != kind:
            raise BadInputError(f"{where}: interval {iv} does not fit {kind} data")
        return iv
    if kind == "daily":
        return "1d"
    t = np.sort(frame["time"].astype("int64"))
    d = np.diff(t) // 10**9
    d = d[(d > 0) & (d < 6 * 3600)]
    step = int(np.min(d)) if len(d) else 0
    if step not in _STEPS:
        raise BadInputError(f"{where}: cannot infer the bar interval (smallest step {step} s); pass interval= "
                            "(CLI: --interval) or kind='ticks'")
    return _STEPS[step]


# ------------------------------------------------------------------------------------------- values
def _numbers(col: pd.Series, field: str, lines: np.ndarray, where: str) -> np.ndarray:
    """A column as float64 (missing -> NaN); one clear error naming the cell that is not a finite number."""
    if not pd.api.types.is_numeric_dtype(col.dtype) or pd.api.types.is_bool_dtype(col.dtype):  # text or TRUE/FALSE
        text = col.astype(str).str.strip()
        if field == "side":
            text = text.str.lower().replace({"b": "0", "buy": "0", "s": "1", "sell": "1"})
        missing = text.isin(MISSING).to_numpy()
        col = pd.to_numeric(text.where(~missing, None), errors="coerce")
        bad = col.isna().to_numpy() & ~missing
        if bad.any():
            i = int(np.argmax(bad))
            raise BadInputError(f"{where} line {lines[i]}, column {field!r}: cannot read {text.iloc[i]!r} as a "
                                "number")
    out = col.to_numpy(dtype="float64")
    inf = np.isinf(out)
    if inf.any():
        i = int(np.argmax(inf))
        raise BadInputError(f"{where} line {lines[i]}, column {field!r}: {out[i]} is not a finite number")
    return out


def _units(preset: Preset, opts: _Options) -> tuple[dict, dict]:
    """The manifest's ``units`` record and the factor applied to each field group."""
    vol = opts.volume_unit or preset.volume_unit
    scale = opts.price_scale or preset.price_scale
    amount = opts.amount_unit or preset.amount_unit
    units = {"volume": "shares", "price_scale": scale}
    done = []
    if vol != 1:
        units["volume_factor"] = vol
        done.append("volume lots x100" if vol == 100 else f"volume x{vol:g}")
    if scale != 1:
        done.append(f"prices /{scale:g}")
    if amount != 1:
        units["amount_factor"] = amount
        done.append(f"amount x{amount:g}")
    if done:
        units["converted"] = ", ".join(done)
    factors = {f: scale for f in PRICE_FIELDS} | {f: vol for f in VOLUME_FIELDS} | {"amount": amount}
    return units, factors


def _adjustment(preset: Preset, opts: _Options, adjustflag: np.ndarray | None, where: str) -> tuple[str, bool]:
    """(adjustment of the OHLC columns, whether it is as of the file's last date)."""
    adjustment = opts.adjustment or preset.adjustment
    if adjustflag is not None and opts.adjustment is None:  # baostock: 1 backward, 2 forward (qfq), 3 raw
        flags = np.unique(adjustflag[~np.isnan(adjustflag)])
        if len(flags) > 1:
            raise BadInputError(f"{where}: the adjustflag column mixes {sorted(flags)}; import one adjustment "
                                "per file")
        flag = int(flags[0]) if len(flags) else 3
        return ("raw", False) if flag == 3 else ("full", flag == 2)
    return adjustment, adjustment != "raw"


def _schema_columns(frame: dict, kind: str, warnings: list[str]) -> dict:
    """Keep the store schema's columns; 'price' bars (hikyuu 1-minute) become close, 'close' ticks price."""
    names = SCHEMAS[kind].names
    if kind == "ticks" and "price" not in frame and "close" in frame:
        frame["price"] = frame.pop("close")
    if kind != "ticks" and "price" in frame and "close" not in frame:
        frame["close"] = frame.pop("price")
    extra = [c for c in frame if c not in names and c != "date"]
    if extra and f"dropped column(s) {extra}: not part of {kind} data" not in warnings:
        warnings.append(f"dropped column(s) {extra}: not part of {kind} data")
    return {k: v for k, v in frame.items() if k in names}


_CODES = {"side": (0, 1, 2), "trade_status": (0, 1)}


def _check_values(frame: dict, lines: np.ndarray, where: str) -> None:
    """Negative prices or volumes, and codes out of range, named by line and column."""
    for name, col in frame.items():
        bad = col < 0 if name in NONNEGATIVE else None
        if name in _CODES:
            bad = ~np.isin(col, _CODES[name]) & ~np.isnan(col)
        if bad is not None and bad.any():
            i = int(np.argmax(bad))
            rule = f"must be one of {_CODES[name]}" if name in _CODES else "prices and volumes must be >= 0"
            what = "negative value" if name in NONNEGATIVE else "value"
            raise BadInputError(f"{where} line {lines[i]}, column {name!r}: {what} {col[i]:g}; {rule}")


def _dedupe(frame: dict, kind: str, lines: np.ndarray, where: str) -> tuple[dict, np.ndarray]:
    """Sort by key; drop exact duplicate rows; a key repeated with other values is an error (not for ticks)."""
    key = "date" if kind == "daily" else "time"
    order = np.argsort(frame[key], kind="stable")
    frame, lines = {k: v[order] for k, v in frame.items()}, lines[order]
    k = frame[key]
    same_key = np.r_[False, k[1:] == k[:-1]]
    if kind == "ticks" or not same_key.any():
        return frame, lines
    values = np.column_stack([v for name, v in frame.items() if name not in ("time", "date")])
    a, b = values[1:], values[:-1]
    same_row = np.r_[False, ((a == b) | (np.isnan(a) & np.isnan(b))).all(axis=1)]
    clash = same_key & ~same_row
    if clash.any():
        i = int(np.argmax(clash))
        stamp = k[i] if key == "date" else pd.Timestamp(k[i], tz="UTC")
        raise BadInputError(f"{where} lines {lines[i - 1]} and {lines[i]}: duplicate {key} {stamp} with different "
                            "values; keep one row per timestamp")
    return {name: v[~same_key] for name, v in frame.items()}, lines[~same_key]


# --------------------------------------------------------------------------------- grouping, writing
@dataclasses.dataclass
class _Job:
    """One store write: a symbol's rows at one interval, from one or more files, checked and conformed."""

    symbol: str
    kind: str
    interval: str
    table: pa.Table
    pieces: list[_Piece]
    source: str
    adjusted_as_of: str | None


def _group(pieces: list[_Piece], opts: _Options) -> list[_Job]:
    """One store write per (symbol, interval): files of the same symbol are merged and checked together."""
    groups: dict[tuple, list[_Piece]] = {}
    for p in pieces:
        groups.setdefault((p.symbol, p.interval), []).append(p)
    jobs = []
    for (sym, interval), group in groups.items():
        first = group[0]
        for p in group[1:]:
            for what in ("adjustment", "timezone", "units"):
                if getattr(p, what) != getattr(first, what):
                    raise BadInputError(f"{sym}: {first.path} and {p.path} disagree on {what} "
                                        f"({getattr(first, what)} vs {getattr(p, what)}); import them separately")
        frame = first.frame
        if len(group) > 1:
            names = list(dict.fromkeys(n for p in group for n in p.frame))
            frame = {n: np.concatenate([p.frame.get(n, np.full(len(p.lines), np.nan)) for p in group]) for n in names}
            frame, _ = _dedupe(frame, first.kind, np.concatenate([p.lines for p in group]),
                               f"{sym} ({len(group)} files)")
            across = sum(len(p.lines) for p in group) - len(frame[next(iter(frame))])
            if across:
                group[0].dropped["same row in another file"] = across
        label = f"{first.path}" if len(group) == 1 else f"{sym} from {len(group)} files"
        table = conform(_to_arrow(frame, first.kind), first.kind, label)
        presets = list(dict.fromkeys(p.preset.name for p in group))
        source = opts.source or "file:" + "+".join(presets)  # e.g. file:yahoo
        as_of = max((p.adjusted_as_of for p in group if p.adjusted_as_of), default=None)
        jobs.append(_Job(sym, first.kind, interval, table, group, source, as_of))
    return jobs


def _to_arrow(frame: dict, kind: str) -> pa.Table:
    fields = [f for f in SCHEMAS[kind] if f.name in frame]
    arrays = []
    for field in fields:
        col = frame[field.name]
        if field.name == "time":
            arrays.append(pa.array(col.astype("datetime64[ns]"), pa.timestamp("ns")).cast(field.type))
        elif field.name == "date":
            arrays.append(pa.array(col.astype("datetime64[D]"), pa.date32()))
        else:
            arrays.append(pa.array(col, from_pandas=True).cast(field.type))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def _store_write(store: Store, job: _Job, on_conflict: str, dry_run: bool) -> list[WriteResult]:
    """One job through the store: ``dry_run`` raises what the write would raise and writes nothing."""
    first = job.pieces[0]
    common = dict(source=job.source, units=first.units, on_conflict=on_conflict, alias=_alias(job),
                  dry_run=dry_run)
    if job.kind == "ticks":
        return store.write_ticks(job.symbol, job.table, timezone=first.timezone, **common)
    return [store.write_bars(job.symbol, job.table, interval=job.interval, adjust=first.adjustment,
                             adjusted_as_of=job.adjusted_as_of, timezone=first.timezone, **common)]


def _alias(job: _Job) -> str | None:
    return next((p.alias for p in job.pieces if p.alias), None)


def _write(store: Store, job: _Job, on_conflict: str, planned: list[WriteResult]) -> SymbolResult:
    """Write one job (skipped when its dry run changes nothing) and report what happened."""
    first, alias = job.pieces[0], _alias(job)
    if all(r.noop for r in planned) and (alias is None or store.aliases().get(alias) == job.symbol):
        results = planned  # a re-import: nothing to write
    else:
        results = _store_write(store, job, on_conflict, dry_run=False)
    warnings = list(dict.fromkeys(w for p in job.pieces for w in p.warnings))
    return SymbolResult(
        symbol=job.symbol, interval=job.interval, rows=job.table.num_rows, read=sum(p.read for p in job.pieces),
        dropped=_sum_counts(p.dropped for p in job.pieces),
        added=sum(r.added for r in results), updated=sum(r.updated for r in results),
        unchanged=sum(r.unchanged for r in results),
        partitions=[r.partition for r in results], files=[str(p.path) for p in job.pieces],
        format="+".join(dict.fromkeys(p.preset.name for p in job.pieces)), adjustment=first.adjustment,
        adjusted_as_of=job.adjusted_as_of, units=first.units, alias=alias, warnings=warnings)


def _sum_counts(counts) -> dict:
    total: dict[str, int] = {}
    for c in counts:
        for why, n in c.items():
            total[why] = total.get(why, 0) + n
    return total
