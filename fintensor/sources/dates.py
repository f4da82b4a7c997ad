"""Date and time spellings of market-data files -> datetime64: ISO, compact digits, slashes (D/M vs M/D decided
by the data, a preset or ``date_format``, never guessed), month names, YYYYMM, float YYYYMMDD, epoch s/ms, LEAN's
milliseconds since midnight."""
from __future__ import annotations

import re

import numpy as np
import pandas as pd

from ..errors import BadInputError

_TIME_FORMATS = (  # regex of the first value -> strptime formats to try, in order
    (r"\d{4}-\d{1,2}-\d{1,2}", ("%Y-%m-%d",)),
    (r"\d{4}/\d{1,2}/\d{1,2}", ("%Y/%m/%d",)),
    (r"\d{8}", ("%Y%m%d",)),
    (r"\d{6}", ("%Y%m",)),                       # monthly: the first of the month
    (r"[A-Za-z]{3,9}\.? \d{1,2},? \d{4}", ("%b %d %Y", "%B %d %Y", "%b %d, %Y", "%B %d, %Y")),
    (r"\d{1,2}[ -][A-Za-z]{3}[ -]\d{4}", ("%d %b %Y", "%d-%b-%Y")),
    (r"\d{12}", ("%Y%m%d%H%M",)),
    (r"\d{14}", ("%Y%m%d%H%M%S",)),
    (r"\d{8} \d{1,2}:\d{2}", ("%Y%m%d %H:%M",)),
    (r"\d{8} \d{1,2}:\d{2}:\d{2}", ("%Y%m%d %H:%M:%S",)),
    (r"\d{1,2}/\d{1,2}/\d{4}", ("%m/%d/%Y", "%d/%m/%Y")),
    (r"\d{1,2}-\d{1,2}-\d{4}", ("%m-%d-%Y", "%d-%m-%Y")),
    (r"\d{1,2}/\d{1,2}/\d{4} \d{1,2}:\d{2}", ("%m/%d/%Y %H:%M", "%d/%m/%Y %H:%M")),
    (r"\d{1,2}/\d{1,2}/\d{4} \d{1,2}:\d{2}:\d{2}", ("%m/%d/%Y %H:%M:%S", "%d/%m/%Y %H:%M:%S")),
    (r"\d{4}-\d{2}-\d{2}[ T]\d{1,2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:?\d{2})?", ("ISO8601",)),
)
_OFFSET = r"(?:Z|[+-]\d{2}:?\d{2})$"



def _ms_of_day(raw, ms: np.ndarray, lines, where: str) -> np.ndarray:
    """LEAN: milliseconds since local midnight, the date in the file name."""
    m = re.search(r"(\d{8})", raw.name) or re.search(r"(\d{8})", raw.path.name)
    if m is None:
        raise BadInputError(f"{where}: times are milliseconds since midnight but the file name holds no "
                            "YYYYMMDD date")
    bad = ~((ms >= 0) & (ms < 86_400_000))
    if bad.any():
        i = int(np.argmax(bad))
        raise BadInputError(f"{where} line {lines[i]}: {ms[i]:g} is not milliseconds since midnight")
    return np.datetime64(pd.Timestamp(m.group(1)).date(), "ns") + ms.astype("int64").astype("timedelta64[ms]")


def _with_format(text: pd.Series, fmt: str, aware: bool, lines, where: str) -> pd.Series:
    """Every value in the user's ``date_format``; the first that does not fit is named."""
    parsed = pd.to_datetime(text, format=fmt, errors="coerce", utc=aware)
    bad = parsed.isna().to_numpy()
    if bad.any():
        i = int(np.argmax(bad))
        raise BadInputError(f"{where} line {lines[i]}: cannot read {text.iloc[i]!r} with date_format {fmt!r}")
    return parsed


def _epoch(text: pd.Series) -> pd.Series | None:
    """Epoch seconds (10 digits) or milliseconds (13 digits), as naive UTC; None when not all are."""
    for width, unit in ((10, "s"), (13, "ms")):
        if len(text.iloc[0]) == width and text.str.fullmatch(r"\d{%d}" % width).all():
            return pd.to_datetime(text.astype("int64"), unit=unit)
    return None


def _day_or_month_first(text: pd.Series, formats: tuple, preset_format, lines, where: str) -> tuple:
    """M/D/YYYY or D/M/YYYY: decided by a day above 12 anywhere, else by the preset; else refused."""
    parts = text.str.extract(r"^(\d{1,2})\D(\d{1,2})\D")
    parts = parts.dropna().astype(int)
    if (parts[0] > 12).any():
        return formats[1:]
    if (parts[1] > 12).any() or preset_format == "month_first":
        return formats[:1]
    sep = re.match(r"\d{1,2}(\D)", text.iloc[0]).group(1)
    raise BadInputError(f"{where}: dates such as {text.iloc[0]!r} can be day/month or month/day and no day is "
                        f"above 12; pass date_format= (CLI: --date-format %d{sep}%m{sep}%Y or %m{sep}%d{sep}%Y)")


def _parse_stamps(text: pd.Series, aware: bool, lines, where: str, date_format: str | None = None,
                  preset_format: str | None = None) -> pd.Series:
    """Parse every value in the format of the first one: a value written otherwise is an error."""
    if date_format is not None:
        return _with_format(text, date_format, aware, lines, where)
    if re.fullmatch(r"\d{8}\.0*", text.iloc[0]) and text.str.fullmatch(r"\d{8}\.0*").all():  # 19991110.0
        text = text.str.split(".").str[0]
    first = text.iloc[0]
    epoch = _epoch(text)
    if epoch is not None:
        return epoch
    formats = next((f for rx, f in _TIME_FORMATS if re.fullmatch(rx, first)), None)
    if formats is not None and len(formats) == 2 and formats[1].startswith("%d"):
        formats = _day_or_month_first(text, formats, preset_format, lines, where)
    if formats is None:
        raise BadInputError(f"{where} line {lines[0]}: cannot read {first!r} as a date or time; use "
                            "YYYY-MM-DD (daily) or YYYY-MM-DD HH:MM:SS (intraday)")
    parsed = _compact_digits(text, formats[0])
    if parsed is not None:
        return parsed
    fails = None
    for fmt in formats:
        parsed = pd.to_datetime(text, format=fmt, errors="coerce", utc=aware)
        bad = parsed.isna().to_numpy()
        if not bad.any():
            return parsed
        fails = int(np.argmax(bad)) if fails is None else fails
    raise BadInputError(f"{where} line {lines[fails]}: cannot read {text.iloc[fails]!r} as a date in the format "
                        f"of line {lines[0]} ({first!r}); write every date the same way")


_DIGIT_FIELDS = (("year", 4), ("month", 2), ("day", 2), ("hour", 2), ("minute", 2), ("second", 2))


def _compact_digits(text: pd.Series, fmt: str) -> pd.Series | None:
    """Fast path for YYYYMMDD[hhmm[ss]] stamps (strptime is slow): None when any value does not fit."""
    width = {"%Y%m%d": 8, "%Y%m%d%H%M": 12, "%Y%m%d%H%M%S": 14}.get(fmt)
    if width is None or not text.str.fullmatch(r"\d{%d}" % width).all():
        return None
    n = text.astype("int64").to_numpy()
    parts, shift = {}, width
    for name, w in _DIGIT_FIELDS:
        if shift == 0:
            break
        shift -= w
        parts[name] = n // 10**shift % 10**w
    parsed = pd.to_datetime(pd.DataFrame(parts), errors="coerce")
    return None if parsed.isna().any() else parsed


