"""Argument checks shared by every public function and CLI option: one rule, one message per kind.

Each check returns the value (converted where that is unambiguous) or raises ``BadInputError`` naming the
argument, what it got and what it takes. ``bool`` is never an int here (``seed=True`` is refused).
"""
from __future__ import annotations

import math
import numbers
import re
from typing import Any, Iterable

from .errors import BadInputError


def integer(name: str, value: Any, *, lo: int | None = None, hi: int | None = None) -> int:
    """An int (not a bool, not a float) in ``[lo, hi]``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise BadInputError(f"{name} must be a whole number, got {value!r}")
    value = int(value)
    if lo is not None and value < lo or hi is not None and value > hi:
        raise BadInputError(f"{name} must be {_range(lo, hi)}, got {value}")
    return value


def positive_int(name: str, value: Any, *, hi: int | None = None) -> int:
    return integer(name, value, lo=1, hi=hi)


def nonnegative_int(name: str, value: Any, *, hi: int | None = None) -> int:
    return integer(name, value, lo=0, hi=hi)


def number(name: str, value: Any, *, lo: float | None = None, hi: float | None = None,
           lo_open: bool = False, hi_open: bool = False) -> float:
    """A finite real number (not a bool, not NaN or inf) in the range; ``*_open`` excludes the bound."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise BadInputError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise BadInputError(f"{name} must be a finite number, got {value}")
    if (lo is not None and (value < lo or lo_open and value == lo)
            or hi is not None and (value > hi or hi_open and value == hi)):
        raise BadInputError(f"{name} must be {_range(lo, hi, lo_open, hi_open)}, got {value:g}")
    return value


def positive(name: str, value: Any, *, hi: float | None = None) -> float:
    return number(name, value, lo=0.0, lo_open=True, hi=hi)


def optional(check, name: str, value: Any, **bounds):
    """``None`` passes through; anything else goes through ``check``."""
    return None if value is None else check(name, value, **bounds)


def choice(name: str, value: Any, options: Iterable[Any]) -> Any:
    options = tuple(options)
    if isinstance(value, bool) or value not in options:
        raise BadInputError(f"{name} must be one of {', '.join(map(repr, options))}; got {value!r}")
    return value


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise BadInputError(f"{name} must be True or False, got {value!r}")
    return value


def _range(lo, hi, lo_open: bool = False, hi_open: bool = False) -> str:
    fmt = lambda v: f"{v:g}" if isinstance(v, float) else str(v)  # noqa: E731
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{fmt(lo)}, {fmt(hi)}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {fmt(lo)}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {fmt(hi)}"
    return "valid"


def parse_bytes(value: Any, what: str) -> int:
    """A byte count (at least 1MB) from an int or text like "2GB", "512MB", "1.5G" (powers of 1024)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        number, unit = float(value), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)i?b?\s*", str(value), re.IGNORECASE)
        if not m:
            raise BadInputError(f"{what} must be a byte count like 2GB or 512MB, got {value!r}")
        number, unit = float(m.group(1)), m.group(2).lower()
    nbytes = int(number * 1024 ** " kmgt".index(unit or " "))
    if nbytes < 1 << 20:
        raise BadInputError(f"{what} must be at least 1MB, got {value!r}")
    return nbytes
