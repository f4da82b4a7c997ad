"""Trading calendars (exchange_calendars): the time axis is the exchange's sessions, not whatever rows exist."""
from __future__ import annotations

import datetime as dt
import warnings
from functools import lru_cache
from typing import Iterable

import numpy as np
import pandas as pd

from .errors import BadInputError
from . import symbols as _symbols

# Names users write -> exchange_calendars names. Shenzhen trades on Shanghai's calendar.
ALIASES = {
    "XSHE": "XSHG", "SSE": "XSHG", "SZSE": "XSHG", "SHSE": "XSHG", "CN": "XSHG",
    "NYSE": "XNYS", "NASDAQ": "XNYS", "XNAS": "XNYS", "US": "XNYS",
}
_EARLIEST = "1990-12-19"
#: Calendars that are not an exchange's: every day (crypto), Monday to Friday (FX), the stored dates.
ROUND_THE_CLOCK = ("24/7", "24/5")
DATA = "data"


def resolve(name: str) -> str:
    """Canonical exchange_calendars name for ``name`` (alias-aware), or BadInputError."""
    import exchange_calendars as xc

    up = str(name).upper()
    if up in ROUND_THE_CLOCK or up == DATA.upper():
        return up.lower()
    key = ALIASES.get(up, up)
    if key not in xc.get_calendar_names():
        raise BadInputError(
            f"unknown calendar {name!r}; use an exchange_calendars name such as XNYS or XSHG "
            f"(aliases: {', '.join(sorted(ALIASES))}), '24/7', '24/5', or 'data' (the stored dates)"
        )
    return key


def get(name: str, start=None):
    """The exchange_calendars calendar, covering history back to 1990 (or to ``start``, when earlier)
    where the library allows; where it does not, a BadInputError saying so."""
    first = pd.Timestamp(_EARLIEST)
    if start is not None and pd.Timestamp(start) < first:
        first = pd.Timestamp(year=pd.Timestamp(start).year, month=1, day=1)   # one calendar per year asked
    return _get(resolve(name), first.strftime("%Y-%m-%d"))


@lru_cache(maxsize=None)
def _get(key: str, first: str):
    import exchange_calendars as xc

    if key in ROUND_THE_CLOCK or key == DATA:
        raise BadInputError(f"calendar {key!r} has no exchange sessions (open/close times); intraday builds "
                            "need an exchange calendar such as XNYS")
    with warnings.catch_warnings():  # pandas deprecation notices raised inside exchange_calendars itself
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return xc.get_calendar(key, start=first)
        except ValueError as exc:
            if first < _EARLIEST:
                raise BadInputError(f"the {key} calendar cannot reach back to {first} ({exc}); build on the "
                                    "stored dates with calendar='data' (CLI: --calendar data) or start later"
                                    ) from None
            return xc.get_calendar(key)  # some calendars refuse 1990; their default range still works
        except Exception:
            return xc.get_calendar(key)


def parse_date(value, what: str = "") -> dt.date:
    """A session date from a string, date, datetime, numpy or pandas timestamp; BadInputError if it is none."""
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    try:
        ts = pd.Timestamp(value if isinstance(value, (np.datetime64, pd.Timestamp)) else str(value))
    except (ValueError, TypeError, OverflowError):
        ts = pd.NaT
    if ts is pd.NaT:
        raise BadInputError(f"cannot read {what + ' ' if what else ''}{value!r} as a date; write it as YYYY-MM-DD")
    return ts.date()


def for_symbols(symbols: Iterable[str]) -> list[str]:
    """Distinct calendars the symbols trade on, in first-seen order."""
    out: list[str] = []
    for s in symbols:
        name = _symbols.exchange(s)
        if name not in out:
            out.append(name)
    return out


def sessions(name: str, start, end) -> np.ndarray:
    """Session dates (datetime64[D]) of calendar ``name`` within [start, end], both inclusive.

    '24/7' is every day and '24/5' Monday to Friday. A range reaching past what the calendar covers is
    an error naming the coverage, never silently cut.
    """
    lo, hi = pd.Timestamp(start), pd.Timestamp(end)
    if lo > hi:
        raise BadInputError(f"start {lo.date()} is after end {hi.date()}")
    key = resolve(name)
    if key in ROUND_THE_CLOCK:
        days = np.arange(np.datetime64(lo.date(), "D"), np.datetime64(hi.date(), "D") + 1)
        if key == "24/5":
            days = days[pd.DatetimeIndex(days).day_of_week < 5]
        return days
    cal = get(key, lo)
    first, last = cal.first_session, cal.last_session
    if hi < first or lo > last:
        raise BadInputError(
            f"range {lo.date()}..{hi.date()} is outside calendar {cal.name}'s coverage "
            f"{first.date()}..{last.date()}"
        )
    if lo < first - pd.Timedelta(days=7):  # (a week of slack: a range may start on a holiday or weekend)
        raise BadInputError(
            f"range {lo.date()}..{hi.date()} starts before calendar {cal.name}'s first session {first.date()} "
            "(as far back as exchange_calendars reaches); start on or after it, or build on the stored dates "
            "with calendar='data' (CLI: --calendar data)")
    idx = cal.sessions_in_range(max(lo, first), min(hi, last))
    return idx.values.astype("datetime64[D]")


def _utc_ns(times: pd.Series) -> np.ndarray:
    """tz-aware timestamps -> int64 UTC nanoseconds (without numpy's timezone warning)."""
    return pd.DatetimeIndex(times).as_unit("ns").asi8


def segments(name: str, days: np.ndarray) -> np.ndarray:
    """Continuous-trading segments per session, UTC nanoseconds, shape (D, S, 2).

    S is 2 where the exchange has a lunch break (XSHG: 09:30-11:30, 13:00-15:00) and 1 otherwise.
    """
    idx = pd.DatetimeIndex(np.asarray(days, dtype="datetime64[ns]"))
    cal = get(name, idx[0] if len(idx) else None)
    opens = cal.opens.reindex(idx)
    closes = cal.closes.reindex(idx)
    if opens.isna().any():
        bad = idx[opens.isna().to_numpy()][0].date()
        raise BadInputError(f"{bad} is not a {cal.name} session")
    o = _utc_ns(opens)
    c = _utc_ns(closes)
    bs = cal.break_starts.reindex(idx)
    if bs.notna().any():
        be = cal.break_ends.reindex(idx)
        bsv = _utc_ns(bs)
        bev = _utc_ns(be)
        return np.stack([np.stack([o, bsv], -1), np.stack([bev, c], -1)], axis=1)
    return np.stack([o, c], -1)[:, None, :]
