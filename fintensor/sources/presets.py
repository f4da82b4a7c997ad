"""Vendor file conventions: header aliases and the preset table that auto-detection picks from.

One row per vendor layout (Yahoo, tushare, baostock, hikyuu, LEAN/AlgoSeek, zipline, Quandl, ...): how to
recognise it from the header, first row and file name, and its units, timezone and adjustment.
"""
from __future__ import annotations

import dataclasses

#: Header names (lower case) -> store field. Time columns map to "date", "time" or "datetime".
ALIASES = {
    "date": "date", "trade_date": "date", "day": "date", "datetime": "datetime", "timestamp": "datetime",
    "date_time": "datetime", "time": "time",
    "symbol": "symbol", "ticker": "symbol", "code": "symbol", "ts_code": "symbol", "name": "symbol",
    "open": "open", "high": "high", "low": "low", "close": "close",
    "adj close": "adj_close", "adj_close": "adj_close", "adjclose": "adj_close", "adjusted_close": "adj_close",
    "adjusted close": "adj_close",
    "volume": "volume", "vol": "volume", "size": "volume", "amount": "amount",
    "turn": "turnover", "turnover": "turnover",
    "pre_close": "pre_close", "preclose": "pre_close", "prev_close": "pre_close",
    "dividend": "dividend", "dividends": "dividend", "ex-dividend": "dividend", "ex_dividend": "dividend",
    "split": "split", "splits": "split", "split_ratio": "split", "stock splits": "split",
    "tradestatus": "trade_status", "trade_status": "trade_status",
    "price": "price", "buyorsell": "side", "side": "side",
    "bid": "bid", "bid_size": "bid_size", "ask": "ask", "ask_size": "ask_size",
    "suspicious": "suspicious",
}
#: Known vendor columns the store has no field for: dropped without a warning.
IGNORED = {"index", "openinterest", "open_interest", "oi", "change", "pct_chg", "pctchg", "isst", "adjustflag",
           "adj_open", "adj_high", "adj_low", "adj_volume", "ts_date", "exchange", "sale_condition", "condition"}


@dataclasses.dataclass(frozen=True)
class Preset:
    """One vendor's file convention, and how to recognise it from the header, first row and file name."""

    name: str
    signature: frozenset = frozenset()  # lower-case header names that identify it
    header: tuple | None = None         # or the exact header, when only the column order tells it apart
    columns: tuple | None = None        # or, for a headerless file, the fields of its columns
    file_pattern: str | None = None     # regex the (zip member) file name must match, for headerless files
    first_row: tuple | None = None      # (field, regex) the first data row must match
    rename: tuple = ()                  # (header, field) pairs that differ from ALIASES
    kind: str | None = None             # "bars" or "ticks"; None = from the data
    interval: str | None = None
    timezone: str | None = None         # timezone of naive timestamps
    volume_unit: float = 1              # shares per volume unit (lots: 100)
    price_scale: float = 1              # divide prices by this
    amount_unit: float = 1              # currency units per amount unit (thousands: 1000)
    adjustment: str = "raw"             # of the OHLC columns
    not_stored: str | None = None       # a layout recognised but not stored: why (reported per file)
    day_order: str | None = None        # "month_first": the vendor writes M/D/YYYY


_OHLC = frozenset({"date", "open", "high", "low", "close"})
_HIKYUU = dict(timezone="Asia/Shanghai", volume_unit=100, price_scale=1000)
_LEAN = dict(timezone="America/New_York", price_scale=10_000)

#: The vendor presets, most specific first: auto-detection takes the first that matches, else "csv".
PRESETS: tuple[Preset, ...] = (
    Preset("quandl", frozenset({"ticker", "ex-dividend", "split_ratio", "adj_close"})),
    Preset("tushare", frozenset({"ts_code", "trade_date", "vol", "amount"}), volume_unit=100, amount_unit=1000),
    Preset("baostock", frozenset({"code", "adjustflag", "tradestatus"})),  # adjustment from adjustflag
    Preset("hikyuu_ticks", frozenset({"symbol", "datetime", "price", "vol", "buyorsell"}), kind="ticks", **_HIKYUU),
    Preset("hikyuu_1min", frozenset({"symbol", "datetime", "price", "vol"}), first_row=("datetime", r"\d{12}"),
           rename=(("price", "close"),), kind="bars", interval="1m", **_HIKYUU),
    Preset("zipline", _OHLC | {"volume", "dividend", "split"}, adjustment="split"),
    Preset("yahoo", _OHLC | {"adj close", "volume"}, adjustment="split"),
    # yfinance's own history()/download() export: auto_adjust=True (its default) drops Adj Close and
    # adjusts OHLC for splits and dividends
    Preset("yfinance", _OHLC | {"volume", "dividends", "stock splits"}, adjustment="full"),
    Preset("mplfinance_intraday", header=("date", "open", "close", "high", "low", "volume"),
           first_row=("date", r".*\d:\d\d"), timezone="America/New_York", day_order="month_first"),
    Preset("backtrader", _OHLC | {"volume", "openinterest"}),
    Preset("lean_daily", columns=("date", "open", "high", "low", "close", "volume"), file_pattern=r"^[a-z0-9.]+\.csv$",
           first_row=("date", r"\d{8} 00:00"), kind="bars", interval="1d", **_LEAN),
    Preset("lean_minute", columns=("ms", "open", "high", "low", "close", "volume"),
           file_pattern=r"(?i)\d{8}_.*minute_trade", kind="bars", interval="1m", **_LEAN),
    Preset("lean_tick", columns=("ms", "price", "volume", "exchange", "sale_condition", "suspicious"),
           file_pattern=r"(?i)\d{8}_.*trade_tick", kind="ticks", **_LEAN),
    # LEAN minute quote bars: bid and ask OHLC + sizes. The store's bar schema has no bid/ask bars, so they are
    # recognised and reported as not stored (never mistaken for trade bars, never failing the folder)
    Preset("lean_minute_quote", columns=("ms", "bid_open", "bid_high", "bid_low", "bid_close", "bid_size", "ask_open",
                                         "ask_high", "ask_low", "ask_close", "ask_size"),
           file_pattern=r"(?i)\d{8}_.*minute_quote", kind="bars", interval="1m",
           not_stored="minute quote bars (bid/ask OHLC): the store has no bid/ask bar fields; the trade bars "
                      "(*_trade.zip) of the same minutes are imported", **_LEAN),
    Preset("lean_quote_tick", columns=("ms", "bid", "bid_size", "ask", "ask_size", "exchange", "condition",
                                       "suspicious"), file_pattern=r"(?i)\d{8}_.*quote_tick", kind="ticks", **_LEAN),
    Preset("csv"),  # any other file with a header: ALIASES only
)
_BY_NAME = {p.name: p for p in PRESETS}
_BY_NAME.update(hikyuu_1m=_BY_NAME["hikyuu_1min"], mplfinance=_BY_NAME["mplfinance_intraday"])
PRESET_NAMES = sorted(_BY_NAME)


BY_NAME = _BY_NAME
