"""Symbols: one canonical (Yahoo-style) spelling for every vendor's, validated before it names a path.

Canonical form is what Yahoo understands: ``AAPL``, ``BRK-B``, ``600519.SS``, ``000001.SZ``, ``^GSPC``.
Vendor spellings map onto it: JoinQuant ``000001.XSHE``/``600519.XSHG``, tushare ``600519.SH``,
baostock ``sh.600519``, TDX/hikyuu ``SH600519``, class shares ``BRK.B``/``BRK_B``.
"""
from __future__ import annotations

import re
import unicodedata

from .errors import BadInputError

MAX_LENGTH = 32
_ALLOWED = re.compile(r"^[A-Z0-9^][A-Z0-9.\-=^&]*$")
_ALLOWED_TEXT = "letters, digits, '.', '-', '^', '=' and '&'"

# Yahoo exchange suffixes -> (exchange_calendars name, timezone). Shenzhen shares Shanghai's calendar.
_SUFFIX = {
    "SS": ("XSHG", "Asia/Shanghai"),
    "SZ": ("XSHG", "Asia/Shanghai"),
    "BJ": ("XSHG", "Asia/Shanghai"),
    "HK": ("XHKG", "Asia/Hong_Kong"),
    "T": ("XTKS", "Asia/Tokyo"),
    "L": ("XLON", "Europe/London"),
    "TO": ("XTSE", "America/Toronto"),
    "V": ("XTSE", "America/Toronto"),
    "AX": ("XASX", "Australia/Sydney"),
    "DE": ("XETR", "Europe/Berlin"),
    "F": ("XFRA", "Europe/Berlin"),
    "PA": ("XPAR", "Europe/Paris"),
    "AS": ("XAMS", "Europe/Amsterdam"),
    "MI": ("XMIL", "Europe/Rome"),
    "MC": ("XMAD", "Europe/Madrid"),
    "SW": ("XSWX", "Europe/Zurich"),
    "KS": ("XKRX", "Asia/Seoul"),
    "KQ": ("XKRX", "Asia/Seoul"),
    "NS": ("XBOM", "Asia/Kolkata"),
    "BO": ("XBOM", "Asia/Kolkata"),
    "TW": ("XTAI", "Asia/Taipei"),
    "SI": ("XSES", "Asia/Singapore"),
    "SA": ("BVMF", "America/Sao_Paulo"),
}
_VENDOR_SUFFIX = {"XSHE": "SZ", "XSHG": "SS", "SH": "SS", "SZ": "SZ", "SS": "SS", "BJ": "BJ"}


def _check_text(symbol: object) -> str:
    """Reject what can never be a symbol, naming the offending character."""
    if not isinstance(symbol, str):
        raise BadInputError(f"symbol must be a string, got {type(symbol).__name__} {symbol!r}")
    s = symbol.strip()
    if not s:
        raise BadInputError("empty symbol: give a ticker such as AAPL or 600519.SS")
    if len(s) > MAX_LENGTH:
        raise BadInputError(
            f"symbol {s[:20]!r}... is {len(s)} characters long; symbols are at most {MAX_LENGTH}"
        )
    for ch in s:
        if ch == "\x00":
            raise BadInputError(f"symbol {s!r} contains a NUL byte; symbols use only {_ALLOWED_TEXT}")
        if ord(ch) < 32 or ord(ch) == 127:
            raise BadInputError(
                f"symbol {s!r} contains control character U+{ord(ch):04X}; symbols use only {_ALLOWED_TEXT}"
            )
        if ord(ch) > 127:
            name = unicodedata.name(ch, "unknown")
            hint = unicodedata.normalize("NFKD", ch).encode("ascii", "ignore").decode()
            guess = f"; did you mean {hint!r}?" if hint else ""
            raise BadInputError(
                f"symbol {s!r} contains non-ASCII character {ch!r} (U+{ord(ch):04X} {name}){guess} "
                f"Symbols use only {_ALLOWED_TEXT}"
            )
        if ch in "/\\":
            raise BadInputError(
                f"symbol {s!r} contains {ch!r}, a path separator; symbols use only {_ALLOWED_TEXT}"
            )
    return s


def normalize(symbol: str) -> str:
    """Return the canonical (Yahoo) spelling of ``symbol``, or raise BadInputError saying why not."""
    s = _check_text(symbol)
    up = s.upper()
    m = re.fullmatch(r"(SH|SZ|BJ)[._]?(\d{6})", up)  # baostock sh.600519, TDX SH600519
    if m:
        return f"{m.group(2)}.{_VENDOR_SUFFIX[m.group(1)]}"
    m = re.fullmatch(r"(\d{6})\.(XSHE|XSHG|SH|SZ|SS|BJ)", up)  # JoinQuant, tushare, Yahoo
    if m:
        return f"{m.group(1)}.{_VENDOR_SUFFIX[m.group(2)]}"
    if re.fullmatch(r"\d{6}", up):
        raise BadInputError(
            f"bare A-share code {s!r} is ambiguous: write {up}.SZ (Shenzhen) or {up}.SS (Shanghai)"
        )
    m = re.fullmatch(r"([A-Z]{1,6})[._]([A-Z])", up)  # class shares: BRK.B, BRK_A -> BRK-B, BRK-A
    if m and m.group(2) not in _SUFFIX:
        return f"{m.group(1)}-{m.group(2)}"
    if up.startswith("-"):
        raise BadInputError(f"symbol {s!r} starts with '-'; a symbol starts with a letter, digit or '^' "
                            "(e.g. AAPL, 600519.SS, ^GSPC)")
    if up.startswith(".") or ".." in up or not _ALLOWED.match(up):
        bad = sorted({c for c in up if not re.match(r"[A-Z0-9.\-=^&]", c)})
        what = f"characters {''.join(bad)!r}" if bad else "a leading or doubled '.'"
        raise BadInputError(f"symbol {s!r} has {what}; symbols use only {_ALLOWED_TEXT}")
    return up


def _venue(symbol: str) -> tuple[str, str]:
    """(exchange_calendars name, IANA timezone) of a symbol: its Yahoo suffix, else FX/crypto, else US."""
    sym = normalize(symbol)
    suffix = sym.rsplit(".", 1)[1] if "." in sym else ""
    if suffix in _SUFFIX:
        return _SUFFIX[suffix]
    if sym.endswith("=X"):
        return "24/5", "UTC"
    if sym.endswith("-USD"):
        return "24/7", "UTC"
    return "XNYS", "America/New_York"


def exchange(symbol: str) -> str:
    """The exchange_calendars name whose sessions this symbol trades on (US listings: XNYS)."""
    return _venue(symbol)[0]


def timezone(symbol: str) -> str:
    """The exchange's IANA timezone, in which daily session dates are local."""
    return _venue(symbol)[1]


def path_segment(symbol: str) -> str:
    """The symbol as a hive partition value: URI-escaped so '=' and '^' cannot confuse readers."""
    from urllib.parse import quote

    return quote(normalize(symbol), safe="-.&")


def from_path_segment(segment: str) -> str:
    from urllib.parse import unquote

    return unquote(segment)


def lookup(items, symbol: str):
    """The item of ``items`` (anything with a ``.symbol``) for ``symbol`` in any spelling: a report's
    ``report["BRK.B"]`` is BRK-B's result. KeyError when none is."""
    sym = normalize(symbol)
    for item in items:
        if item.symbol == sym:
            return item
    raise KeyError(symbol)
