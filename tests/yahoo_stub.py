"""A fake Yahoo behind yfinance's request seam (``yfinance.data.YfData.get``), so that yfinance's own
parsing runs in tests with no network. Reusable by any suite::

    from yahoo_stub import FakeYahoo, fake_yahoo, session_bars  # noqa: F401 (fake_yahoo is a fixture)

    def test_x(fake_yahoo, store):
        fake_yahoo.add("AAPL", session_bars("XNYS", "2024-01-02", "2024-01-31"), tz="America/New_York")
        fake_yahoo.fail("429", symbol="AAPL", times=2)       # 429 twice, then OK (times=None: forever)
        ft.download("AAPL", "2024-01-02", "2024-01-31", store=store, sleep=..., clock=...)
        fake_yahoo.chart_requests("AAPL")                    # params of every chart request, in order

The fake answers like Yahoo's chart API (the shape recorded in /work/shared/notes/yfinance.md): bars in
[period1, period2), dividends and splits as events, tradingPeriods for intraday, HTTP 404 with Yahoo's
error body for an unknown symbol, HTTP 422 for an intraday range Yahoo refuses, and injected faults
(429 -> YFRateLimitError as the real ``get`` raises it, read timeouts, truncated JSON, "Will be right
back" outages). Every request is recorded with its symbol and params.
"""
from __future__ import annotations

import dataclasses
import json
import threading
import time
from urllib.parse import unquote

import numpy as np
import pandas as pd
import pytest

CHART_PATH = "/v8/finance/chart/"
NOT_FOUND = {"chart": {"result": None, "error": {"code": "Not Found",
                                                 "description": "No data found, symbol may be delisted"}}}
WINDOW_DAYS = {"1m": 30, "2m": 60, "5m": 60, "15m": 60, "30m": 60, "90m": 60, "60m": 730, "1h": 730}
FAULTS = ("429", "timeout", "truncated", "down")


# ------------------------------------------------------------------------------------------- data
def session_bars(calendar: str, start, end, interval: str = "1d", *, seed: int = 0,
                 price: float = 100.0) -> pd.DataFrame:
    """Random-walk bars on the real sessions of ``calendar`` (fintensor.calendars), indexed by UTC bar
    start: daily bars at the session open (as Yahoo stamps them), intraday bars every ``interval`` of
    continuous trading (lunch breaks skipped). Columns open, high, low, close, adj_close, volume."""
    from fintensor import calendars

    cal = calendars.get(calendar)
    days = cal.sessions_in_range(pd.Timestamp(start), pd.Timestamp(end))
    if interval == "1d":
        stamps = pd.DatetimeIndex([cal.session_open(d) for d in days])
    else:
        step = pd.Timedelta(interval.replace("m", "min"))
        stamps = []
        for d in days:
            spans = [(cal.session_open(d), cal.session_close(d))]
            if cal.session_has_break(d):
                spans = [(spans[0][0], cal.session_break_start(d)), (cal.session_break_end(d), spans[0][1])]
            for lo, hi in spans:
                stamps.extend(pd.date_range(lo, hi - step, freq=step))
        stamps = pd.DatetimeIndex(stamps)
    rng = np.random.default_rng(seed)
    n = len(stamps)
    close = np.round(price * np.exp(np.cumsum(rng.normal(0, 0.01, n))), 2)
    open_ = np.round(close * (1 + rng.normal(0, 0.003, n)), 2)
    high = np.round(np.maximum(open_, close) * (1 + rng.uniform(0, 0.01, n)), 2)
    low = np.round(np.minimum(open_, close) * (1 - rng.uniform(0, 0.01, n)), 2)
    volume = rng.integers(1_000, 1_000_000, n).astype(float)
    return pd.DataFrame({"open": open_, "high": high, "low": low, "close": close,
                         "adj_close": np.round(close * 0.98, 4), "volume": volume},
                        index=stamps.tz_convert("UTC"))


@dataclasses.dataclass
class Listing:
    """One symbol Yahoo knows: bars per interval (UTC-indexed frames), events keyed by UTC instant."""

    symbol: str
    tz: str
    currency: str
    bars: dict[str, pd.DataFrame]
    dividends: dict[pd.Timestamp, float]
    splits: dict[pd.Timestamp, tuple[float, float]]
    market_time: pd.Timestamp | None = None  # Yahoo's regularMarketTime (its last trade); None: see _meta


# ------------------------------------------------------------------------------------------- HTTP
class FakeResponse:
    """What yfinance reads from a response: status_code, text, url, json(), raise_for_status()."""

    def __init__(self, status_code: int, body, url: str):
        self.status_code = status_code
        self.text = body if isinstance(body, str) else json.dumps(body)
        self.content = self.text.encode()
        self.url = url

    def json(self):
        return json.loads(self.text)

    def raise_for_status(self):
        if self.status_code >= 400:
            from yfinance._http import HTTPError

            raise HTTPError(f"HTTP Error {self.status_code} for url: {self.url}", response=self)


class FakeYahoo:
    """Serves given symbols' bars; records every request (``requests``) with its symbol and params."""

    def __init__(self, latency: float = 0.0):
        self.latency = latency  # seconds each answer takes, like a network round trip (benchmarks)
        self.listings: dict[str, Listing] = {}
        self.requests: list[dict] = []
        self._faults: list[dict] = []
        self._lock = threading.Lock()

    # -------------------------------------------------------------------------------- set-up
    def add(self, symbol: str, bars: pd.DataFrame, interval: str = "1d", *, tz: str, currency: str = "USD",
            dividends: dict | None = None, splits: dict | None = None,
            market_time: pd.Timestamp | None = None) -> Listing:
        """Serve ``bars`` (UTC-indexed; columns open, high, low, close, volume[, adj_close]) for ``symbol``.
        ``dividends``/``splits``: {session date: amount / (numerator, denominator)}, stamped like the bar.
        ``market_time``: the instant of Yahoo's last trade (its ``regularMarketTime``), e.g. mid-session
        for a day still trading; default: a day after the last bar served (its session is over)."""
        listing = self.listings.setdefault(symbol, Listing(symbol, tz, currency, {}, {}, {}))
        listing.market_time = market_time
        listing.bars[interval] = bars.sort_index()
        daily = listing.bars.get("1d")
        for target, events in ((listing.dividends, dividends or {}), (listing.splits, splits or {})):
            for day, value in events.items():
                target[_stamp_of(daily, day, tz)] = value
        return listing

    def fail(self, kind: str, *, symbol: str | None = None, times: int | None = 1) -> None:
        """Inject a fault for ``symbol``'s requests (all symbols if None): ``times`` times, None = forever.
        kind: "429" (rate limit), "timeout" (read timeout), "truncated" (half a JSON body),
        "down" (Yahoo's "Will be right back" page)."""
        assert kind in FAULTS, kind
        self._faults.append({"kind": kind, "symbol": symbol, "left": times})

    # ------------------------------------------------------------------------------- queries
    def chart_requests(self, symbol: str | None = None) -> list[dict]:
        """Params of the price requests (period1/period2), tz probes excluded, in arrival order."""
        return [r["params"] for r in self.requests
                if "period1" in r["params"] and (symbol is None or r["symbol"] == symbol)]

    def periods(self, symbol: str | None = None) -> list[tuple[int, int]]:
        return [(int(p["period1"]), int(p["period2"])) for p in self.chart_requests(symbol)]

    # ------------------------------------------------------------------------------ the seam
    def get(self, url: str, params=None, timeout=30) -> FakeResponse:
        """Stands in for ``YfData.get``: what Yahoo would answer, or an injected fault."""
        params = dict(params or {})
        if self.latency:
            time.sleep(self.latency)
        symbol = unquote(url.split(CHART_PATH, 1)[1].split("?")[0]) if CHART_PATH in url else None
        fault = self._take_fault(symbol)
        with self._lock:
            self.requests.append({"url": url, "symbol": symbol, "params": params,
                                  "fault": fault, "at": time.time()})
        if fault == "429":
            from yfinance.exceptions import YFRateLimitError

            raise YFRateLimitError()
        if fault == "timeout":
            from yfinance._http import requests

            raise requests.exceptions.ReadTimeout(f"Read timed out after {timeout} s ({url})")
        if fault == "down":
            return FakeResponse(503, "<html>Will be right back...</html>", url)
        if symbol is None or symbol not in self.listings:
            response = FakeResponse(404, NOT_FOUND, url)
        else:
            status, body = self._chart(self.listings[symbol], params)
            response = FakeResponse(status, body, url)
        if fault == "truncated":
            response = FakeResponse(200, response.text[: len(response.text) // 2], url)
        return response

    def install(self, monkeypatch) -> FakeYahoo:
        from yfinance.data import YfData

        monkeypatch.setattr(YfData, "get", lambda _yfdata, url, params=None, timeout=30: self.get(url, params, timeout))
        return self

    # ----------------------------------------------------------------------------- internals
    def _take_fault(self, symbol):
        with self._lock:
            for f in self._faults:
                if f["symbol"] in (None, symbol) and (f["left"] is None or f["left"] > 0):
                    if f["left"] is not None:
                        f["left"] -= 1
                    return f["kind"]
        return None

    def _chart(self, listing: Listing, params: dict):
        interval = params.get("interval", "1d")
        now = pd.Timestamp.now(tz="UTC")
        if "range" in params:  # the timezone probe: the latest bar
            lo, hi = pd.Timestamp.min.tz_localize("UTC"), now + pd.Timedelta(days=1)
        else:
            lo, hi = (pd.Timestamp(int(params[k]), unit="s", tz="UTC") for k in ("period1", "period2"))
            refusal = _refusal(interval, lo, hi, now)
            if refusal:
                return 422, {"chart": {"result": None, "error": {"code": "Unprocessable Entity",
                                                                 "description": refusal}}}
        bars = listing.bars.get(interval, listing.bars.get("1d") if "range" in params else None)
        bars = bars if bars is not None else pd.DataFrame(columns=["open"], index=pd.DatetimeIndex([], tz="UTC"))
        bars = bars[(bars.index >= lo) & (bars.index < hi)]
        if "range" in params:
            bars = bars.iloc[-1:]
        meta = _meta(listing, interval, bars)
        result: dict = {"meta": meta}
        daily = interval[-1] not in "mh"
        if len(bars):
            result["timestamp"] = [int(t.timestamp()) for t in bars.index]
            result["indicators"] = {"quote": [{c: _json_list(bars[c]) for c in
                                               ("open", "high", "low", "close", "volume")}]}
            if daily:
                adj = bars["adj_close"] if "adj_close" in bars else bars["close"]
                result["indicators"]["adjclose"] = [{"adjclose": _json_list(adj)}]
            events = _events(listing, lo, hi)
            if events:
                result["events"] = events
        else:
            result["indicators"] = {"quote": [{}], **({"adjclose": [{}]} if daily else {})}
        return 200, {"chart": {"result": [result], "error": None}}


def _stamp_of(daily: pd.DataFrame | None, day, tz: str) -> pd.Timestamp:
    """An event is stamped with its ex-date's daily bar (Yahoo's habit), else local 09:30 that day."""
    d = pd.Timestamp(day).date()
    if daily is not None:
        hits = daily.index[daily.index.tz_convert(tz).date == d]
        if len(hits):
            return hits[0]
    return (pd.Timestamp(d) + pd.Timedelta(hours=9, minutes=30)).tz_localize(tz).tz_convert("UTC")


def _refusal(interval: str, lo: pd.Timestamp, hi: pd.Timestamp, now: pd.Timestamp) -> str | None:
    if interval not in WINDOW_DAYS:
        return None
    if interval == "1m" and hi - lo > pd.Timedelta(days=8):
        return "Only 8 days worth of 1m granularity data are allowed to be fetched per request."
    if lo < now - pd.Timedelta(days=WINDOW_DAYS[interval]):
        return (f"{interval} data not available for startTime={int(lo.timestamp())} and "
                f"endTime={int(hi.timestamp())}. The requested range must be within the last "
                f"{WINDOW_DAYS[interval]} days.")
    return None


def _json_list(col: pd.Series) -> list:
    return [None if pd.isna(v) else float(v) for v in col]


def _events(listing: Listing, lo: pd.Timestamp, hi: pd.Timestamp) -> dict:
    out = {}
    divs = {str(int(t.timestamp())): {"amount": a, "date": int(t.timestamp())}
            for t, a in listing.dividends.items() if lo <= t < hi}
    splits = {str(int(t.timestamp())): {"date": int(t.timestamp()), "numerator": n, "denominator": d,
                                        "splitRatio": f"{n:g}:{d:g}"}
              for t, (n, d) in listing.splits.items() if lo <= t < hi}
    if divs:
        out["dividends"] = divs
    if splits:
        out["splits"] = splits
    return out


def _meta(listing: Listing, interval: str, bars: pd.DataFrame) -> dict:
    """The chart meta yfinance reads: exchange timezone, currency, and tradingPeriods for intraday."""
    tz = listing.tz
    ref = bars.index[-1] if len(bars) else pd.Timestamp.now(tz="UTC")
    local = ref.tz_convert(tz)
    offset = int(local.utcoffset().total_seconds())
    abbrev = local.tzname()
    meta = {"currency": listing.currency, "symbol": listing.symbol, "exchangeName": "FAKE",
            "fullExchangeName": "Fake Exchange", "instrumentType": "EQUITY", "firstTradeDate": 345479400,
            "regularMarketTime": int((listing.market_time if listing.market_time is not None
                                      else ref + pd.Timedelta(days=1)).timestamp()), "hasPrePostMarketData": True, "gmtoffset": offset,
            "timezone": abbrev, "exchangeTimezoneName": tz, "priceHint": 2,
            "dataGranularity": interval, "range": "",
            "validRanges": ["1d", "5d", "1mo", "3mo", "6mo", "1y", "2y", "5y", "10y", "ytd", "max"]}
    if interval[-1] in "mh" and len(bars):  # one regular trading period per local day, first to last bar
        step = pd.Timedelta(interval.replace("m", "min").replace("h", "hour"))
        periods = []
        for _, day in bars.groupby(bars.index.tz_convert(tz).date):
            start, end = day.index[0], day.index[-1] + step
            periods.append([{"timezone": abbrev, "start": int(start.timestamp()), "end": int(end.timestamp()),
                             "gmtoffset": offset}])
        meta["tradingPeriods"] = periods
        last = periods[-1][0]
        meta["currentTradingPeriod"] = {k: dict(last) for k in ("pre", "regular", "post")}
    return meta


# ----------------------------------------------------------------------------------------- fixture
def isolate_yfinance(monkeypatch) -> None:
    """Fresh yfinance state per test: no response cache, no singleton session, no on-disk caches,
    and no fallback to three other endpoints when a symbol is unknown."""
    import yfinance.base
    import yfinance.cache as yc
    from yfinance.data import SingletonMeta, YfData

    YfData.cache_get.cache_clear()
    monkeypatch.setattr(SingletonMeta, "_instances", {})
    monkeypatch.setattr(yc._TzCacheManager, "_tz_cache", yc._TzCacheDummy())
    monkeypatch.setattr(yc._CookieCacheManager, "_Cookie_cache", yc._CookieCacheDummy())
    monkeypatch.setattr(yc._ISINCacheManager, "_isin_cache", yc._ISINCacheDummy())
    monkeypatch.setattr(yfinance.base, "_tz_info_fetch_ctr", 2)


@pytest.fixture
def fake_yahoo(monkeypatch):
    """A FakeYahoo installed at yfinance's request seam, with yfinance's caches isolated."""
    from yfinance.data import YfData

    isolate_yfinance(monkeypatch)
    fake = FakeYahoo().install(monkeypatch)
    yield fake
    YfData.cache_get.cache_clear()


class FakeTime:
    """An injectable clock and sleep: sleeping advances the clock at once and is recorded."""

    def __init__(self):
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
