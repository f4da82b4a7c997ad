"""Yahoo Finance source: ``ft.download`` fetches bars through yfinance into the store, incrementally.

Why per symbol: ``yf.download`` never raises and hides which tickers failed. ``Ticker.history`` with
yfinance's exceptions switched on keeps each symbol's error, so the report can say ok / not found /
rate-limited / failed per symbol, and good symbols are stored whatever happens to the others.

What is stored: Yahoo's OHLC are split-adjusted (adjustment "split"), ``adj_close`` is Yahoo's fully
adjusted close, ``dividend``/``split`` the events on their ex-dates (split 1.0 = none). Daily bars are
keyed by the exchange-local session date; intraday bars by their UTC start instant, with ``date`` the
local session date. Only finished bars are stored: a session still trading or a bar still forming is
left for the next run, so an incremental download never has to revisit what it stored.

Only what the store lacks is requested: the front (start moved earlier) and the tail (end moved later)
around the stored range, skipping spans with no session of the symbol's exchange. A new split or
dividend in the tail changes Yahoo's adjustment of all earlier bars, so the stored daily history is
then re-requested and overwritten (one request), keeping the series consistent.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import random
import re
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa

from .. import calendars
from .. import symbols as _symbols
from ..errors import BadInputError, DownloadError, FintensorError
from ..schema import parse_interval
from ..store import Store, _date_bound
from .report import IngestReport

SOURCE = "yahoo"
OK, NOT_FOUND, RATE_LIMITED, FAILED = "ok", "not_found", "rate_limited", "failed"
UNREACHABLE = "unreachable"  # DNS failure or connection refused: no network, so no retry and no backoff
CANNOT_REACH = "cannot reach Yahoo (no network?)"
#: What a failed DNS lookup or a refused connection says, in curl (yfinance's backend), requests and the OS.
_UNREACHABLE = re.compile(r"(?i)could not resolve (host|proxy)|couldn't connect to server|could not connect to server|"
                          r"connection refused|"
                          r"name or service not known|temporary failure in name resolution|"
                          r"network is unreachable|no route to host|failed to establish a new connection|"
                          r"nameresolutionerror|nodename nor servname")
MARKET_TIME_GRACE = pd.Timedelta(minutes=1)  # Yahoo's last-trade stamp vs the calendar's session close
INTERVALS = ("1d", "1m", "2m", "5m", "15m", "30m", "60m", "1h", "90m")  # 1h = 60m
#: How far back Yahoo serves intraday bars (days before now).
WINDOW_DAYS = {"1m": 30, "2m": 60, "5m": 60, "15m": 60, "30m": 60, "90m": 60, "60m": 730}
#: The first day a user may ask for sits this far inside the window, so the local midnight that starts
#: it is inside Yahoo's limit in every timezone (UTC-12 .. UTC+14).
WINDOW_MARGIN = dt.timedelta(days=2)
#: Yahoo serves at most 8 days of 1m bars per request; 7 local days stay under 8 even across DST.
CHUNK = {"1m": pd.Timedelta(days=7)}
#: The oldest daily bar Yahoo serves (^GSPC): the start of a symbol's full history.
EARLIEST = dt.date(1927, 12, 30)
REQUEST_TIMEOUT = 10  # seconds per request, yfinance's default
UNITS = {"volume": "shares", "price_scale": 1}
#: The store's columns and the yfinance columns they come from (daily bars have all, intraday the first 5).
FIELDS = (("open", "Open"), ("high", "High"), ("low", "Low"), ("close", "Close"), ("volume", "Volume"),
          ("adj_close", "Adj Close"), ("dividend", "Dividends"), ("split", "Stock Splits"))
# Yahoo's words for an empty range of a known symbol. Not its 404 "No data found, symbol may be delisted":
# that is the symbol itself missing, so a chunk answered so fails the symbol instead of leaving a hole.
_NO_BARS = ("doesn't exist", "does not exist")


# -------------------------------------------------------------------------------------------- report
@dataclasses.dataclass
class SymbolResult:
    """What happened to one symbol: ``status`` is ok / not_found / rate_limited / failed."""

    symbol: str                  # canonical (Yahoo) spelling
    requested_as: str            # the caller's spelling, kept in the store as an alias
    status: str = OK
    rows: int = 0                # rows added to the store
    start: str | None = None     # requested range (ISO dates; end None = up to now)
    end: str | None = None
    fetched: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # [period1, period2) asked
    requests: int = 0            # chart requests sent, retries included
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.status == OK

    @property
    def range(self) -> str:
        """The requested range as a user would say it: 'all..now' for the full history."""
        start = "all" if self.start in (None, EARLIEST.isoformat()) else self.start
        return f"{start}..{self.end or 'now'}"


@dataclasses.dataclass
class DownloadReport(IngestReport):
    """Per-symbol outcome of ``download``. Partial failure raises nothing; ask ``ok`` or call
    ``raise_for_status()``."""

    interval: str
    start: str | None
    end: str | None
    results: list[SymbolResult]

    def __iter__(self) -> Iterator[SymbolResult]:
        return iter(self.results)

    def __len__(self) -> int:
        return len(self.results)

    def __getitem__(self, symbol: str) -> SymbolResult:
        """The result for ``symbol`` in any spelling (``report["BRK.B"]`` is BRK-B's)."""
        return _symbols.lookup(self.results, symbol)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    @property
    def failed(self) -> list[SymbolResult]:
        """Results that are not ok (not found, rate-limited or failed)."""
        return [r for r in self.results if not r.ok]

    @property
    def rows(self) -> int:
        return sum(r.rows for r in self.results)

    def raise_for_status(self) -> DownloadReport:
        """Return self when every symbol is ok; else raise DownloadError (BadInputError when Yahoo
        knows none of the symbols: that is a spelling problem, not a network one)."""
        bad = self.failed
        if not bad:
            return self
        if any(r.status == UNREACHABLE for r in bad):
            raise DownloadError(f"{CANNOT_REACH}: {len(bad)} of {len(self.results)} symbols not downloaded; "
                                "check the connection and run the same command again", report=self)
        detail = "; ".join(f"{r.symbol}: {r.status.replace('_', ' ')}" + (f" ({r.message})" if r.message else "")
                           for r in bad)
        if all(r.status == NOT_FOUND for r in self.results):
            raise BadInputError(f"Yahoo knows none of the symbols: {detail}. Check the spelling "
                                "(Yahoo style: BRK-B, 600519.SS, 000001.SZ, ^GSPC)")
        stored = [r.symbol for r in self.results if r.ok]
        raise DownloadError(f"{len(bad)} of {len(self.results)} symbols failed: {detail}. "
                            + (f"Stored the others ({', '.join(stored)}); " if stored else "")
                            + "run the same command again to retry the failed ones", report=self)

    def to_dict(self) -> dict:
        return {"interval": self.interval, "start": self.start, "end": self.end, "ok": self.ok,
                "rows": self.rows, "results": [dataclasses.asdict(r) for r in self.results]}

    def table(self) -> str:
        """A per-symbol text table: symbol, status, rows, range, message."""
        rows = [(r.symbol, r.status, str(r.rows), r.range, _short(r.message)) for r in self.results]
        head = ("symbol", "status", "rows", "range", "message")
        widths = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [head, *rows])

    __str__ = table


def _short(message: str, width: int = 70) -> str:
    """One table cell: the first sentence of a message, cut to ``width`` characters."""
    first = message.split(". See ", 1)[0]
    return first if len(first) <= width else first[: width - 1] + "…"


# ---------------------------------------------------------------------------------------------- API
def download(symbols: str | Iterable[str], start=None, end=None, interval: str = "1d", *,
             store: Store | str | None = None, retries: int = 5, max_wait: float = 120.0,
             workers: int = 4, timeout: float = REQUEST_TIMEOUT, on_conflict: str = "error",
             quiet: bool = False, sleep: Callable[[float], None] = time.sleep,
             clock: Callable[[], float] = time.monotonic) -> DownloadReport:
    """Download Yahoo bars for ``symbols`` into the store; only what the store lacks is requested.

    ``symbols``: one or more tickers in any common spelling (``"AAPL MSFT"``, ``["BRK.B", "sh.600519"]``).
    ``start``/``end``: session dates, both inclusive (default: the full history, or what the store lacks
    of it, up to now; intraday: as far back as Yahoo serves). ``interval``: 1d or 1m/2m/5m/15m/30m/60m/90m.
    ``retries``/``max_wait``: per request, retry rate limits and transient errors up to ``retries`` times
    with exponential backoff and jitter, waiting at most ``max_wait`` seconds in all. ``workers``: symbols
    fetched at once. ``timeout``: seconds per request. ``on_conflict``: as in ``Store.write_bars``. ``quiet``: no progress bar (it shows only
    on a terminal). ``sleep``/``clock``: injectable for tests.

    Bad input raises BadInputError before any request; failures of single symbols are only reported:
    check ``report.ok`` or call ``report.raise_for_status()``.
    """
    pairs, request = _check(symbols, start, end, interval, retries, max_wait, workers, on_conflict)
    if not (isinstance(timeout, (int, float)) and timeout > 0):
        raise BadInputError(f"timeout must be a positive number of seconds, not {timeout!r}")
    request = dataclasses.replace(request, timeout=float(timeout))
    store = store if isinstance(store, Store) else Store(store)
    jobs = [_plan(store, sym, alias, request) for sym, alias in pairs]
    backoff = _Backoff(retries, max_wait, sleep, clock)
    _forget_responses()  # a re-run in this process must ask Yahoo again, not replay a cached failure
    todo = [job for job in jobs if job.pieces]
    with _yfinance_raising(), _progress(len(todo), enabled=not quiet and sys.stderr.isatty()) as advance:
        pool = ThreadPoolExecutor(max_workers=min(workers, max(len(todo), 1)), thread_name_prefix="fintensor-yahoo")
        try:
            futures = {pool.submit(_fetch, job, request, backoff): job for job in todo}
            for future in as_completed(futures):
                job = futures[future]
                _write(store, job, future.result(), request, on_conflict)
                advance(job.symbol)
        except BaseException:  # e.g. Ctrl-C: start nothing new, leave running requests behind
            backoff.gave_up = True
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
    return DownloadReport(request.interval, _iso(request.start), _iso(request.end), [j.result for j in jobs])


# ----------------------------------------------------------------------------------- input checks
@dataclasses.dataclass(frozen=True)
class _Request:
    interval: str
    start: dt.date | None
    end: dt.date | None
    now: pd.Timestamp  # UTC
    floor: dt.date | None = None  # intraday: the first day Yahoo still serves
    timeout: float = REQUEST_TIMEOUT  # seconds per request

    @property
    def daily(self) -> bool:
        return self.interval == "1d"

    @property
    def step(self) -> pd.Timedelta:
        return pd.Timedelta(self.interval.replace("m", "min")) if not self.daily else pd.Timedelta(days=1)


def _check(symbols, start, end, interval, retries, max_wait, workers, on_conflict):
    """Validate everything up front: bad input fails before any request or store access."""
    iv = parse_interval(interval)
    if iv not in INTERVALS:
        raise BadInputError(f"interval {interval!r} is not downloadable from Yahoo; use one of {', '.join(INTERVALS)} "
                            "(resample daily bars for weeks and months)")
    if isinstance(symbols, str):
        symbols = [s for s in re.split(r"[\s,]+", symbols) if s]
    symbols = list(symbols)
    if not symbols:
        raise BadInputError("no symbols given; name at least one, e.g. AAPL or 600519.SS")
    pairs: dict[str, str] = {}
    for s in symbols:
        pairs.setdefault(_symbols.normalize(s), s.strip())
    if not isinstance(retries, int) or retries < 0:
        raise BadInputError(f"retries must be a whole number >= 0, not {retries!r}")
    if not (isinstance(max_wait, (int, float)) and max_wait >= 0):
        raise BadInputError(f"max_wait must be a number of seconds >= 0, not {max_wait!r}")
    if not isinstance(workers, int) or workers < 1:
        raise BadInputError(f"workers must be a whole number >= 1, not {workers!r}")
    if on_conflict not in ("error", "keep", "overwrite"):
        raise BadInputError(f"on_conflict must be 'error', 'keep' or 'overwrite', not {on_conflict!r}")
    lo, hi = _date_bound(start), _date_bound(end)
    now = machine_clock()
    if lo and hi and lo > hi:
        raise BadInputError(f"start {lo} is after end {hi}; swap them")
    if lo and lo > now.date():
        raise BadInputError(f"start {lo} is in the future; Yahoo has nothing to download yet")
    floor = None
    if iv in WINDOW_DAYS:
        floor = (now - pd.Timedelta(days=WINDOW_DAYS[iv])).date() + WINDOW_MARGIN
        for name, day in (("start", lo), ("end", hi)):
            if day is not None and day < floor:
                raise BadInputError(
                    f"Yahoo keeps {iv} bars for the last {WINDOW_DAYS[iv]} days only: {name} {day} is too early; "
                    f"use --start {floor} or later, or --interval 1d for older history")
        lo = lo or floor
    return list(pairs.items()), _Request(iv, lo, hi, now, floor)


# ----------------------------------------------------------------------------------------- planning
@dataclasses.dataclass
class _Job:
    """One symbol's work: the [lo, hi) spans to request (naive = exchange-local wall time, which
    yfinance localizes in Yahoo's timezone; aware = exact instants, used once the store knows the tz)."""

    symbol: str
    result: SymbolResult
    pieces: list[tuple[pd.Timestamp, pd.Timestamp]]
    refresh: tuple[pd.Timestamp, pd.Timestamp] | None = None  # the whole history, re-requested when
    tail_from: dt.date | None = None  # a split or dividend on or after this day (daily) arrives
    market_time: pd.Timestamp | None = None  # Yahoo's own clock: its last trade (regularMarketTime)


def _plan(store: Store, symbol: str, alias: str, req: _Request) -> _Job:
    man = store.manifest(symbol, req.interval, adjust="split")
    result = SymbolResult(symbol, alias)
    if man is None:  # nothing stored: one span; Yahoo's timezone is learnt from the response
        start = req.start or EARLIEST
        hi = _midnight(req.end + dt.timedelta(days=1)) if req.end else \
            _midnight(req.now.date() + dt.timedelta(days=2))  # a future bound is fine; unfinished bars are dropped
        result.start, result.end = _iso(start), _iso(req.end)
        return _Job(symbol, result, [(_midnight(start), hi)])
    tz = man["timezone"]
    if req.daily:
        first, last = dt.date.fromisoformat(man["start"][:10]), dt.date.fromisoformat(man["end"][:10])
        have = (_midnight(first, tz), _midnight(last + dt.timedelta(days=1), tz))
        floor = None
    else:  # intraday: the stored range may reach back further than Yahoo still serves
        first, have = None, (pd.Timestamp(man["start"]), pd.Timestamp(man["end"]) + req.step)
        floor = _midnight(req.floor, tz)
    start = req.start or first
    lo = _midnight(start, tz)
    hi = _midnight(req.end + dt.timedelta(days=1), tz) if req.end else req.now
    # spans reach to the stored range, so that what is stored stays one unbroken range
    pieces = []
    if lo < have[0]:
        pieces.append((lo, have[0]))
    if hi > have[1]:
        pieces.append((max(have[1], floor) if floor is not None else have[1], hi))
    exchange = _symbols.exchange(symbol)
    pieces = [(a, b) for a, b in pieces if a < b and _trades(exchange, a, b, req)]
    result.start, result.end = _iso(start), _iso(req.end)
    if not pieces:
        result.message = "already stored; nothing requested"
    if req.daily and man.get("adjustment") == "split":
        return _Job(symbol, result, pieces, (min(lo, have[0]), max(hi, have[1])), last + dt.timedelta(days=1))
    return _Job(symbol, result, pieces)


def _midnight(day: dt.date, tz: str | None = None) -> pd.Timestamp:
    """Local midnight starting ``day``: naive (yfinance localizes it in Yahoo's tz) or in ``tz``."""
    ts = pd.Timestamp(day)
    return ts.tz_localize(tz) if tz else ts


def _trades(exchange: str, lo: pd.Timestamp, hi: pd.Timestamp, req: _Request) -> bool:
    """Whether [lo, hi) holds a finished session (daily) or trading time up to now (intraday).

    True where the calendar cannot tell (unknown exchange, dates outside its coverage): asking is safe.
    """
    try:
        cal = calendars.get(exchange)
    except (FintensorError, KeyError, ValueError):
        return True
    first_day, last_day = lo.tz_convert(cal.tz).date(), (hi - pd.Timedelta(1)).tz_convert(cal.tz).date()
    if pd.Timestamp(first_day) < cal.first_session or pd.Timestamp(last_day) > cal.last_session:
        return True
    days = cal.sessions_in_range(pd.Timestamp(first_day), pd.Timestamp(last_day))
    if not len(days):
        return False
    opens, closes = cal.opens.reindex(days), cal.closes.reindex(days)
    if req.daily:  # a session counts when its date lies in [lo, hi) and it has closed
        return bool((closes <= req.now).any())
    return bool(((opens < min(hi, req.now)) & (closes > lo)).any())


# ------------------------------------------------------------------------------------------ fetching
@dataclasses.dataclass
class _Fetched:
    bars: pa.Table | None = None  # in the store's schema
    timezone: str | None = None
    refreshed: str | None = None      # why the whole history was re-requested


class _Failure(Exception):
    def __init__(self, status: str, message: str, retry: bool = False):
        super().__init__(message)
        self.status, self.message, self.retry = status, message, retry


class _Backoff:
    """Exponential backoff with jitter under one time budget shared by all requests of a download."""

    def __init__(self, retries: int, max_wait: float, sleep, clock, base: float = 1.0, cap: float = 30.0):
        self.retries, self.sleep, self.clock, self.base, self.cap = retries, sleep, clock, base, cap
        self.deadline = clock() + max_wait
        self.gave_up = False  # a rate limit outlasted the retries: later symbols are not attempted
        self.unreachable = False  # the host could not be reached: later symbols are not attempted

    def call(self, request: Callable[[], pd.DataFrame | None]) -> pd.DataFrame | None:
        """``request()``, retried while its error is transient and the retries and budget allow."""
        attempt = 0
        while True:
            try:
                return request()
            except Exception as exc:  # noqa: BLE001 - every error is classified, unknown ones fail the symbol
                failure = _classify(exc)
                if failure.retry and self._wait(attempt):
                    attempt += 1
                    _forget_responses()
                    continue
                if failure.status == RATE_LIMITED:
                    self.gave_up = True
                if failure.status == UNREACHABLE:
                    self.unreachable = True
                raise failure from exc

    def _wait(self, attempt: int) -> bool:
        delay = min(self.cap, self.base * 2 ** attempt) * random.uniform(0.5, 1.0)
        if attempt >= self.retries or self.clock() + delay > self.deadline:
            return False
        self.sleep(delay)
        return True


def _classify(exc: BaseException) -> _Failure:
    """Map whatever yfinance or the network raised to a status, and whether retrying may help."""
    from yfinance import exceptions as yfe

    if isinstance(exc, yfe.YFRateLimitError):
        return _Failure(RATE_LIMITED, "Yahoo is rate-limiting requests (HTTP 429); try again later", retry=True)
    if isinstance(exc, yfe.YFTzMissingError):
        return _Failure(NOT_FOUND, "Yahoo has no such symbol (no exchange timezone); check the spelling")
    if isinstance(exc, yfe.YFPricesMissingError):
        return _Failure(FAILED, f"Yahoo refused the request: {exc.yahoo_reason or exc}")
    code = getattr(getattr(exc, "response", None), "status_code", None)
    if code == 404:
        return _Failure(NOT_FOUND, "Yahoo has no such symbol (HTTP 404); check the spelling")
    if code == 429:
        return _Failure(RATE_LIMITED, "Yahoo is rate-limiting requests (HTTP 429); try again later", retry=True)
    if _is_unreachable(exc):
        return _Failure(UNREACHABLE, "DNS lookup failed or connection refused")
    if isinstance(exc, json.JSONDecodeError):
        return _Failure(FAILED, "Yahoo sent a truncated or invalid response", retry=True)
    transient = (code or 0) >= 500 or isinstance(exc, (OSError, TimeoutError, ConnectionError)) \
        or "CURRENTLY DOWN" in str(exc)
    text = str(exc).strip() or "no details"
    return _Failure(FAILED, f"{type(exc).__name__}: {text}"[:300], retry=transient)


def _is_unreachable(exc: BaseException) -> bool:
    """A DNS failure or a refused connection (not a timeout, not a rate limit): the network is down,
    so retrying with backoff would only make an offline user wait."""
    chain = [exc]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        nxt = chain[-1].__cause__ or chain[-1].__context__
        if nxt in chain or len(chain) > 8:
            break
        chain.append(nxt)
    for e in chain:
        if type(e).__name__ in ("DNSError", "NameResolutionError", "gaierror") or isinstance(e, ConnectionRefusedError):
            return True
        if "timed out" not in str(e).lower() and _UNREACHABLE.search(str(e)):
            return True
    return False


def _fetch(job: _Job, req: _Request, backoff: _Backoff) -> _Fetched | _Failure:
    """Runs in a worker thread: every span of one symbol, all or nothing (a hole would never be refetched)."""
    import yfinance as yf

    if backoff.unreachable:
        return _Failure(UNREACHABLE, "not attempted: no network")
    if backoff.gave_up:
        return _Failure(RATE_LIMITED, "not attempted: Yahoo kept rate-limiting earlier symbols; try again later")
    try:
        ticker = yf.Ticker(job.symbol)
        frames = [_request(ticker, job, lo, hi, req, backoff) for lo, hi in _chunks(job.pieces, req.interval)]
        bars, tz = _bars(frames, req, job.symbol, job.market_time)
        fetched = _Fetched(bars, tz)
        if job.refresh and bars is not None:
            day, kind = _first_action(bars, job.tail_from)
            if day:
                whole = _request(ticker, job, *job.refresh, req, backoff)
                fetched = _Fetched(*_bars([whole], req, job.symbol, job.market_time),
                                   refreshed=f"history re-requested: a {kind} on {day} "
                                             "changes Yahoo's adjustment of earlier bars")
        return fetched
    except _Failure as failure:
        return failure
    except Exception as exc:  # noqa: BLE001 - e.g. Ticker() rejecting the name
        return _classify(exc)


def _first_action(bars: pa.Table, since: dt.date) -> tuple[dt.date | None, str]:
    """The first split or dividend on or after ``since``, and which it is."""
    days = bars["date"].to_numpy()
    split, dividend = bars["split"].to_numpy(), bars["dividend"].to_numpy()
    hits = np.flatnonzero((days >= np.datetime64(since, "D")) & ((split != 1.0) | (dividend > 0)))
    if not len(hits):
        return None, ""
    i = hits[0]
    return days[i].astype(object), "split" if split[i] != 1.0 else "dividend"


def _chunks(pieces, interval: str):
    step = CHUNK.get(interval)
    for lo, hi in pieces:
        while step is not None and hi - lo > step:
            yield lo, lo + step
            lo = lo + step
        yield lo, hi


def _request(ticker, job: _Job, lo: pd.Timestamp, hi: pd.Timestamp, req: _Request, backoff: _Backoff):
    """One chart request for [lo, hi) with retries; None when Yahoo has no bars there."""
    job.result.fetched.append((lo.isoformat(), hi.isoformat()))

    def once():
        job.result.requests += 1
        try:
            frame = ticker.history(start=lo.to_pydatetime(), end=hi.to_pydatetime(), interval=req.interval,
                                  auto_adjust=False, actions=True, prepost=False, repair=False, keepna=False,
                                  timeout=req.timeout)
            _note_market_time(job, ticker)
            return frame
        except Exception as exc:
            from yfinance.exceptions import YFPricesMissingError

            reason = getattr(exc, "yahoo_reason", None)
            if isinstance(exc, YFPricesMissingError) and (reason is None or any(
                    w in reason.lower() for w in _NO_BARS)):
                return None  # the symbol exists (its timezone was found) but has no bars in [lo, hi)
            raise

    return backoff.call(once)


def machine_clock() -> pd.Timestamp:
    """This machine's time (UTC): one place, so a test can set it ahead."""
    return pd.Timestamp.now(tz="UTC")


def _note_market_time(job: _Job, ticker) -> None:
    """Remember Yahoo's own clock (the chart meta's regularMarketTime: its last trade), the latest seen."""
    try:  # the meta of the response just parsed: no request is made
        stamp = ticker.get_history_metadata().get("regularMarketTime")
        if stamp is None:
            return
        stamp = pd.Timestamp(stamp, unit="s", tz="UTC") if isinstance(stamp, (int, float)) else \
            pd.Timestamp(stamp).tz_convert("UTC")
    except Exception:  # noqa: BLE001 - no meta (an old yfinance, an odd response): the local clock alone
        return
    if job.market_time is None or stamp > job.market_time:
        job.market_time = stamp


def _bars(frames, req: _Request, symbol: str, market_time: pd.Timestamp | None = None
          ) -> tuple[pa.Table | None, str | None]:
    """yfinance frames -> an Arrow table in the store's schema: finished bars only, all-NaN rows
    dropped, times as UTC nanoseconds, days as local dates, everything else float64.

    A daily bar is "finished" once its session closed by two clocks, the earlier of which wins: this
    machine's and the data's own (Yahoo's last trade, ``market_time``, plus a minute for the closing print's
    stamp). A machine clock running ahead can then never make a session still trading look closed (its bar
    would be stored as final and never refreshed). Intraday bars are judged by the machine's clock."""
    now = req.now if market_time is None else min(req.now, market_time + MARKET_TIME_GRACE)
    frames = [f for f in frames if f is not None and len(f)]
    if not frames:
        return None, None
    df = pd.concat(frames)
    df = df[~df.index.duplicated(keep="last")].sort_index()
    tz = str(df.index.tz)  # yfinance sets the index to the chart meta's exchangeTimezoneName
    df = df[df[["Open", "High", "Low", "Close"]].notna().any(axis=1)]
    days = df.index.tz_convert(tz).tz_localize(None).normalize().to_numpy().astype("datetime64[D]")
    columns = {"date": pa.array(days, pa.date32())}
    if req.daily:
        keep = _finished_days(days, tz, symbol, now)
    else:
        utc = df.index.tz_convert("UTC").as_unit("ns")
        keep = np.asarray(utc + req.step <= req.now)
        columns = {"time": pa.array(utc.tz_localize(None).to_numpy(), pa.timestamp("ns", tz="UTC")), **columns}
    for ours, theirs in FIELDS[:None if req.daily else 5]:
        values = df[theirs].to_numpy(dtype="float64")
        if ours == "split":
            values = np.where(values == 0.0, 1.0, values)  # Yahoo's 'Stock Splits' 0 means none
        columns[ours] = pa.array(values, pa.float64())
    table = pa.table(columns).filter(pa.array(keep))
    return (table if table.num_rows else None), tz


def _finished_days(days: np.ndarray, tz: str, symbol: str, now: pd.Timestamp) -> np.ndarray:
    """Days before today (local), and today once the exchange's calendar says its session closed."""
    today = np.datetime64(now.tz_convert(tz).date(), "D")
    keep = days < today
    if (days == today).any():
        try:
            cal = calendars.get(_symbols.exchange(symbol))
            day = pd.Timestamp(today)
            closed = cal.is_session(day) and cal.session_close(day) <= now
        except (FintensorError, KeyError, ValueError):
            closed = False
        keep = keep | ((days == today) & closed)
    return keep


# ------------------------------------------------------------------------------------------- writing
def _write(store: Store, job: _Job, fetched: _Fetched | _Failure, req: _Request, on_conflict: str) -> None:
    """Runs in the calling thread, one symbol at a time: the store's writes are serialised anyway."""
    res = job.result
    if isinstance(fetched, _Failure):
        res.status, res.message = fetched.status, fetched.message
        return
    if fetched.bars is None:
        res.message = "no bars in the requested range"
        return
    if fetched.refreshed:
        on_conflict = "overwrite"  # same source and adjustment, newer adjustment: Yahoo's new values win
    try:
        written = store.write_bars(job.symbol, fetched.bars, interval=req.interval, source=SOURCE,
                                   adjust="split", adjusted_as_of=req.now.date().isoformat(),
                                   timezone=fetched.timezone, units=UNITS, on_conflict=on_conflict,
                                   alias=res.requested_as)
    except FintensorError as exc:
        res.status, res.message = FAILED, f"not stored: {exc}"
        return
    res.rows = written.added
    days = fetched.bars["date"]
    span = f"{days[0]}..{days[-1]}"
    res.message = f"{fetched.refreshed}; {written.updated} rows updated" if fetched.refreshed else \
        f"stored {span}"


# ------------------------------------------------------------------------------------------ plumbing
@contextmanager
def _yfinance_raising():
    """Let yfinance raise its errors (so each symbol's failure is known) and keep its warnings quiet.

    Both settings are process-wide, so they are made once here, around all worker threads.
    """
    import yfinance as yf

    previous = yf.config.debug.hide_exceptions
    yf.config.debug.hide_exceptions = False
    logger = logging.getLogger("yfinance")  # its "Cookie/crumb fetch failed" lines: the report says it all
    was_disabled, logger.disabled = logger.disabled, True
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)  # its child loggers too
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # pandas 3's Pandas4Warning from yfinance
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        yf.config.debug.hide_exceptions = previous
        logger.disabled = was_disabled
        logger.setLevel(level)


def _forget_responses() -> None:
    """Drop yfinance's in-memory response cache so a retry really asks Yahoo again (it would replay
    a truncated response otherwise)."""
    from yfinance.data import YfData

    YfData.cache_get.cache_clear()


@contextmanager
def _progress(total: int, enabled: bool):
    """A rich progress bar on stderr advancing per symbol, or a no-op."""
    if not enabled or total == 0:
        yield lambda symbol: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    lock = threading.Lock()
    with Progress(TextColumn("download {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("", total=total)

        def advance(symbol: str) -> None:
            with lock:
                bar.update(task, advance=1, description=symbol)

        yield advance


def _iso(day) -> str | None:
    return day.isoformat() if day is not None else None
