"""The store's vocabulary: schemas, keys, intervals, adjustments and field groups, in one home.

Every stage that names a column or an interval takes it from here. This module imports nothing from
fintensor but ``errors``, so anything may import it.
"""
from __future__ import annotations

import pyarrow as pa

from .errors import BadInputError

#: Version of the on-disk layout. 2: intraday and tick ``time`` stored as ``timestamp[us, UTC]``
#: (Spark refuses nanosecond Parquet timestamps); stores of version 1 (nanoseconds) are still read,
#: and ``fintensor cache migrate`` rewrites them.
#: 3: bars of one symbol and interval partitioned by adjustment (``symbol=X/adjust=raw/``), so several
#: adjustments sit side by side; a format-2 partition directly under ``symbol=X/`` is still read, and
#: ``fintensor cache migrate`` moves it.
FORMAT_VERSION = 3
#: The oldest format whose part files need no rewrite (3 changed only where bars sit, not their content:
#: a format-2 tick partition is current; a format-2 bars partition is moved, not rewritten, by migrate).
CONTENT_FORMAT = 2
F64 = pa.float64()
#: Instants of intraday bars and ticks in memory (what every reader returns and every writer takes).
UTC_NS = pa.timestamp("ns", tz="UTC")
#: Instants on disk since format 2 (format 1 wrote UTC_NS; readers cast either to UTC_NS).
UTC_US = pa.timestamp("us", tz="UTC")

#: Daily (and weekly/monthly) bars: one row per exchange-local session date.
DAILY_SCHEMA = pa.schema([
    ("date", pa.date32()),
    ("open", F64), ("high", F64), ("low", F64), ("close", F64),
    ("adj_close", F64),      # fully adjusted close (splits and dividends), when the source has it
    ("volume", F64),         # shares (lots converted on import)
    ("amount", F64),         # traded value in the quote currency
    ("turnover", F64),       # percent of float traded
    ("pre_close", F64),      # exchange's reference previous close (ex-right adjusted)
    ("dividend", F64),       # cash dividend per share on its ex-date; 0 = none, null = unknown
    ("split", F64),          # split ratio on its ex-date (7.0 for 7:1); 1 = none, null = unknown
    ("trade_status", pa.int8()),  # 1 traded, 0 suspended; null = unknown
])
#: Intraday bars: one row per bar, labelled by the bar's start instant (UTC); ``date`` is the local session.
INTRADAY_SCHEMA = pa.schema([
    ("time", UTC_NS), ("date", pa.date32()),
    ("open", F64), ("high", F64), ("low", F64), ("close", F64),
    ("volume", F64), ("amount", F64),
])
#: Ticks (trades and/or quotes); ``seq`` orders records that share an instant. Partitioned by local date.
TICK_SCHEMA = pa.schema([
    ("time", UTC_NS), ("seq", pa.int32()),
    ("price", F64), ("volume", F64), ("amount", F64),
    ("side", pa.int8()),     # 0 buy, 1 sell, 2 auction/unknown
    ("bid", F64), ("bid_size", F64), ("ask", F64), ("ask_size", F64),
])
SCHEMAS = {"daily": DAILY_SCHEMA, "intraday": INTRADAY_SCHEMA, "ticks": TICK_SCHEMA}
#: The schemas of the Parquet parts on disk: instants in microseconds (Spark refuses nanoseconds).
DISK_SCHEMAS = {kind: pa.schema([pa.field(f.name, UTC_US) if f.type == UTC_NS else f for f in schema])
                for kind, schema in SCHEMAS.items()}
KEYS = {"daily": ("date",), "intraday": ("time",), "ticks": ("time", "seq")}

#: Every value quoted in currency per share: divided by an import's price scale.
PRICE_FIELDS = ("open", "high", "low", "close", "adj_close", "pre_close", "dividend", "price", "bid", "ask")
#: Prices a split/dividend adjustment rescales when a tensor is built in another adjustment (``adj_close``
#: is already fully adjusted; dividends and tick prices are never rescaled).
ADJUSTABLE_PRICE_FIELDS = ("open", "high", "low", "close", "pre_close")
#: Quantities counted in shares: multiplied by an import's lot size.
VOLUME_FIELDS = ("volume", "bid_size", "ask_size")
#: Fields that can never be negative.
NONNEGATIVE = frozenset(PRICE_FIELDS) | frozenset(VOLUME_FIELDS) | {"amount", "turnover"}
ADJUSTMENTS = ("raw", "split", "full")

_INTERVAL_ALIASES = {
    "1d": "1d", "d": "1d", "day": "1d", "daily": "1d", "1day": "1d",
    "1wk": "1wk", "1w": "1wk", "week": "1wk", "weekly": "1wk",
    "1mo": "1mo", "month": "1mo", "monthly": "1mo",
    "1m": "1m", "1min": "1m", "2m": "2m", "5m": "5m", "5min": "5m", "15m": "15m", "15min": "15m",
    "30m": "30m", "30min": "30m", "60m": "60m", "1h": "60m", "60min": "60m", "90m": "90m",
}
DAILY_INTERVALS = ("1d", "1wk", "1mo")


def parse_interval(interval: str) -> str:
    """Canonical interval name ('1d', '1m', '5m', '60m', ...) or a BadInputError listing the valid ones."""
    key = str(interval).strip().lower()
    if key not in _INTERVAL_ALIASES:
        valid = ", ".join(sorted(set(_INTERVAL_ALIASES.values()), key=lambda s: (s[-1], len(s), s)))
        raise BadInputError(f"unknown interval {interval!r}; use one of {valid}")
    return _INTERVAL_ALIASES[key]


def interval_kind(interval: str) -> str:
    """'daily' for 1d/1wk/1mo, else 'intraday'."""
    return "daily" if parse_interval(interval) in DAILY_INTERVALS else "intraday"
