"""A seeded synthetic market: realistic-looking daily bars and trade ticks with a planted, known signal.

Everything it makes is labelled synthetic: symbols are ``SYN0001``, ``SYN0002``... (``SYN0001.SS`` on the
XSHG calendar, so ``calendars.for_symbols`` finds the right exchange) and the store records
``source="synthetic"``. Use it for benchmarks at any scale and for tests that need a known answer.

Daily model (log returns, per session, vectorised over stocks)::

    r[t, i] = MU + alpha[t-1, i] + beta_i * m[t] + gamma_i * s[t, sector_i] + sqrt(h[t, i]) * z[t, i]

``m`` is a GARCH(1, 1) market factor (about 1 %/day), ``s`` are a few homoskedastic sector factors,
``h`` a per-stock GARCH(1, 1) idiosyncratic variance (volatility clusters), ``z`` iid N(0, 1).

**Planted signal.** ``alpha[t, i] = signal * KAPPA * (0.25 * R20[t, i] - 1.25 * R5[t, i])``, where
``Rk[t, i]`` is the sum of stock i's *observed* log close-to-close returns over the k sessions up to and
including t (returns before listing and on suspended days count as 0). That is a 5-day reversal plus a
days-6-to-20 momentum, a linear function of the last 20 observed closes, so a sequence model fed 20-60
days of returns can learn it. ``.oracle[t, i] = MU + alpha[t, i]`` is then exactly
E[log(close[t+1] / close[t]) | closes up to t]: the best prediction at t of the next close-to-close
return. Its daily IC is about 0.15 at ``signal=1`` (``.expected_ic()`` gives the analytic value) and 0
at ``signal=0``.

Listings, delistings, suspensions: ``listing_fraction`` of the stocks list after the first session and
``delisting_fraction`` stop trading before the last one (no rows outside their listed life). A
suspension is a run of sessions with **rows present, baostock-style**: ``trade_status`` 0, volume and
amount 0, open = high = low = close = the last traded close. On the day trading resumes the price
jumps by the market and sector moves it missed. The oracle is NaN where the stock does not trade on
both t and t+1. No splits or dividends: ``adj_close == close``. Volumes are in shares, whole lots of
100 (so tick volumes can add up to them exactly); ``amount = volume * (open + high + low + close) / 4``.
"""
from __future__ import annotations

import dataclasses
from functools import cached_property
from typing import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa

from .. import calendars
from .. import symbols as _symbols
from ..errors import BadInputError

SOURCE = "synthetic"
MU = 0.0003                       # common daily log drift (the same for every stock: it carries no signal)
KAPPA = 0.070                     # signal scale: oracle IC ~0.15 at signal=1
REVERSAL_DAYS, MOMENTUM_DAYS = 5, 20
MARKET_VOL, SECTOR_VOL = 0.010, 0.006
GARCH_A, GARCH_B = 0.08, 0.89     # persistence 0.97: volatility clusters for weeks
LOT = 100


@dataclasses.dataclass(eq=False)
class SyntheticMarket:
    """A generated market: (days x stocks) arrays plus the views users want. Make one with ``market()``."""

    symbols: list[str]
    dates: np.ndarray           # datetime64[D] sessions of ``calendar``
    calendar: str
    timezone: str
    seed: int
    signal: float
    open: np.ndarray            # (days, stocks); NaN outside a stock's listed life
    high: np.ndarray
    low: np.ndarray
    close: np.ndarray
    volume: np.ndarray
    status: np.ndarray          # int8 (days, stocks): 1 traded, 0 suspended, -1 not listed
    sector: np.ndarray          # (stocks,) sector index
    beta: np.ndarray            # (stocks,) market loading
    gamma: np.ndarray           # (stocks,) sector loading
    idio_var: np.ndarray        # (days, stocks): conditional idiosyncratic variance of the next return
    market_var: np.ndarray      # (days,): conditional market variance of the next return
    alpha: np.ndarray           # (days, stocks): planted predictable part of the next log return

    def __repr__(self) -> str:
        return (f"SyntheticMarket({len(self.symbols)} stocks x {len(self.dates)} {self.calendar} sessions "
                f"{self.dates[0]}..{self.dates[-1]}, seed={self.seed}, signal={self.signal})")

    # -------------------------------------------------------------------------------- views
    @property
    def amount(self) -> np.ndarray:
        return self.volume * (self.open + self.high + self.low + self.close) / 4

    def panel(self, field: str) -> pd.DataFrame:
        """One field as a (dates x symbols) DataFrame."""
        fields = ("open", "high", "low", "close", "volume", "amount", "status")
        if field not in fields:
            raise BadInputError(f"unknown field {field!r}; use one of {fields}")
        return pd.DataFrame(getattr(self, field), index=pd.DatetimeIndex(self.dates, name="date"),
                            columns=pd.Index(self.symbols, name="symbol"))

    @cached_property
    def daily(self) -> pd.DataFrame:
        """Long table, one row per listed (symbol, session), sorted by symbol then date."""
        listed = (self.status >= 0).T  # (stocks, days): symbol-major order
        n_days = len(self.dates)

        def col(a):
            return a.T[listed]

        frame = pd.DataFrame({
            "symbol": pd.Categorical(np.repeat(self.symbols, listed.sum(1)), categories=self.symbols),
            "date": np.tile(self.dates, len(self.symbols)).reshape(-1, n_days)[listed],
            "open": col(self.open), "high": col(self.high), "low": col(self.low), "close": col(self.close),
            "adj_close": col(self.close), "volume": col(self.volume), "amount": col(self.amount),
            "trade_status": col(self.status).astype(np.int8),
        })
        return frame

    @cached_property
    def oracle(self) -> pd.DataFrame:
        """(dates x symbols): the best prediction at t of log(close[t+1] / close[t]); NaN where not both traded."""
        both = np.zeros_like(self.status, dtype=bool)
        both[:-1] = (self.status[:-1] == 1) & (self.status[1:] == 1)
        values = np.where(both, MU + self.alpha, np.nan)
        return pd.DataFrame(values, index=pd.DatetimeIndex(self.dates, name="date"),
                            columns=pd.Index(self.symbols, name="symbol"))

    @cached_property
    def forward_returns(self) -> pd.DataFrame:
        """(dates x symbols): realised simple return close[t+1] / close[t] - 1, aligned at t (the label)."""
        c = np.where(self.status == 1, self.close, np.nan)
        fwd = np.full_like(c, np.nan)
        fwd[:-1] = c[1:] / c[:-1] - 1
        return pd.DataFrame(fwd, index=pd.DatetimeIndex(self.dates, name="date"),
                            columns=pd.Index(self.symbols, name="symbol"))

    @cached_property
    def listings(self) -> pd.DataFrame:
        """Per symbol: sector, beta, first and last listed session."""
        listed = self.status >= 0
        first = listed.argmax(0)
        last = len(self.dates) - 1 - listed[::-1].argmax(0)
        return pd.DataFrame({"symbol": self.symbols, "sector": self.sector, "beta": self.beta,
                             "first_date": self.dates[first], "last_date": self.dates[last]})

    @cached_property
    def suspensions(self) -> pd.DataFrame:
        """One row per run of suspended sessions: symbol, start, end (inclusive), sessions."""
        rows = []
        susp = self.status == 0
        for i in np.nonzero(susp.any(0))[0]:
            s = np.r_[False, susp[:, i], False].astype(np.int8)
            starts, ends = np.nonzero(np.diff(s) == 1)[0], np.nonzero(np.diff(s) == -1)[0] - 1
            rows += [(self.symbols[i], self.dates[a], self.dates[b], b - a + 1) for a, b in zip(starts, ends)]
        return pd.DataFrame(rows, columns=["symbol", "start", "end", "sessions"])

    # ----------------------------------------------------------------------------- signal
    def _window(self, values, start, end) -> tuple[np.ndarray, np.ndarray]:
        values = values.to_numpy() if isinstance(values, pd.DataFrame) else np.asarray(values, float)
        if values.shape != self.close.shape:
            raise BadInputError(f"predictions have shape {values.shape}; expected (dates, symbols) = "
                                f"{self.close.shape}")
        lo = self._first_index(start)
        hi = len(self.dates) if end is None else int(np.searchsorted(self.dates, _day(end, "end"), side="right"))
        return values[lo:hi], self.forward_returns.to_numpy()[lo:hi]

    def _first_index(self, start) -> int:
        return 0 if start is None else int(np.searchsorted(self.dates, _day(start, "start")))

    def daily_ic(self, predictions, start=None, end=None) -> np.ndarray:
        """Per-day cross-sectional Pearson correlation of ``predictions`` (dates x symbols) with the next
        day's realised return, on dates in [start, end] with at least 3 stocks where both are finite.
        A day whose predictions are all equal scores 0 (they carry no information)."""
        pred, real = self._window(predictions, start, end)
        ok = np.isfinite(pred) & np.isfinite(real)
        n = ok.sum(1)
        p, r = np.where(ok, pred, 0.0), np.where(ok, real, 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            pm, rm = p.sum(1) / n, r.sum(1) / n
            pc, rc = np.where(ok, p - pm[:, None], 0), np.where(ok, r - rm[:, None], 0)
            ic = (pc * rc).sum(1) / np.sqrt((pc ** 2).sum(1) * (rc ** 2).sum(1))
            flat = np.sqrt((pc ** 2).sum(1) / n) <= 1e-12 * np.abs(p).max(1)
        ic[flat] = 0.0  # a constant prediction ranks nothing: no information, IC 0
        return ic[(n >= 3) & np.isfinite(ic)]

    def ic(self, predictions, start=None, end=None) -> float:
        """Mean daily IC of ``predictions`` against realised next-day returns (see ``daily_ic``)."""
        return float(np.mean(self.daily_ic(predictions, start, end)))

    def oracle_ic(self, start=None, end=None) -> float:
        """Realised mean daily IC of the oracle: the ceiling a model can reach on this sample."""
        return self.ic(self.oracle, start, end)

    def expected_ic(self, start=None, end=None) -> float:
        """Analytic daily IC of the oracle, averaged over days (no realised noise involved).

        Per day, with o the oracle and u = r - o the unpredictable part of the next log return (market,
        sector and idiosyncratic shocks with known conditional variances), IC = sd(o) / sqrt(var(o) +
        E[var(u)]) where var is over stocks: E[var(u)] = tr(S)/N - 1'S1/N^2 for u's covariance S.
        Realised ICs scatter around it by about 1/sqrt(stocks) per day.
        """
        oracle, _ = self._window(self.oracle, start, end)
        lo = self._first_index(start)
        out = []
        n_sectors = int(self.sector.max()) + 1
        for k, o in enumerate(oracle):
            ok = np.isfinite(o)
            n = ok.sum()
            if n < 3:
                continue
            t = lo + k
            hm, h = self.market_var[t], self.idio_var[t, ok]
            b, g, sec = self.beta[ok], self.gamma[ok], self.sector[ok]
            trace = (b ** 2 * hm + g ** 2 * SECTOR_VOL ** 2 + h).sum()
            sector_sums = np.bincount(sec, weights=g, minlength=n_sectors)
            total = b.sum() ** 2 * hm + (sector_sums ** 2).sum() * SECTOR_VOL ** 2 + h.sum()
            noise = trace / n - total / n ** 2
            signal = o[ok].var()
            out.append(np.sqrt(signal / (signal + noise)))
        return float(np.mean(out))

    # ------------------------------------------------------------------------------ store
    def write(self, store, symbols: Sequence[str] | None = None) -> int:
        """Write every symbol's daily bars (``Store.write_bars_many``: one partition per symbol, committed
        several at a time under one lock; source="synthetic"); returns rows written."""
        fields = (("open", self.open), ("high", self.high), ("low", self.low), ("close", self.close),
                  ("volume", self.volume), ("amount", self.amount), ("trade_status", self.status))
        dates = pa.array(self.dates.astype(np.int32)).cast(pa.date32())
        wanted = set(self.symbols if symbols is None else symbols)

        def tables():
            for c0 in range(0, len(self.symbols), 256):  # 256 symbols transposed at a time: each one contiguous
                by_stock = {k: np.ascontiguousarray(v[:, c0:c0 + 256].T) for k, v in fields}
                for i, sym in enumerate(self.symbols[c0:c0 + 256]):
                    if sym not in wanted:
                        continue
                    listed = by_stock["trade_status"][i] >= 0
                    lo, hi = int(listed.argmax()), len(listed) - int(listed[::-1].argmax())  # listed life
                    cols = {k: v[i, lo:hi] for k, v in by_stock.items()}
                    yield sym, pa.table({
                        "date": dates[lo:hi], **{k: cols[k] for k in ("open", "high", "low", "close")},
                        "adj_close": cols["close"], "volume": cols["volume"], "amount": cols["amount"],
                        "trade_status": pa.array(cols["trade_status"], pa.int8()),
                        # known to have no corporate actions, so every adjustment (raw/split/full) can be built
                        "dividend": np.zeros(hi - lo), "split": np.ones(hi - lo),
                    })

        results = store.write_bars_many(tables(), interval="1d", source=SOURCE, adjust="raw",
                                        timezone=self.timezone, units={"volume": "shares", "price_scale": 1})
        return sum(r.added + r.updated + r.unchanged for r in results)


# ------------------------------------------------------------------------------------- generation
def _suffix(calendar: str) -> str:
    """Yahoo suffix whose exchange trades on ``calendar`` ('' for XNYS), so symbols map back to it."""
    if calendar == "XNYS":
        return ""
    for suffix, (cal, _tz) in _symbols._SUFFIX.items():
        if cal == calendar:
            return "." + suffix
    return ""


def _day(value, name: str) -> np.datetime64:
    return np.datetime64(calendars.parse_date(value, name), "D")


def _sessions(calendar: str, start, n_days: int) -> np.ndarray:
    cal = calendars.get(calendar)
    all_sessions = cal.sessions
    i = int(all_sessions.searchsorted(pd.Timestamp(_day(start, "start"))))
    if i + n_days > len(all_sessions):
        raise BadInputError(f"{calendar} has only {len(all_sessions) - i} sessions from {start} (its calendar "
                            f"ends {cal.last_session.date()}); ask for fewer days or an earlier start")
    return all_sessions[i:i + n_days].values.astype("datetime64[D]")


def _check(name: str, value, lo, hi, integer: bool = False):
    ok = isinstance(value, (int, np.integer)) if integer else isinstance(value, (int, float, np.number))
    if not ok or isinstance(value, bool) or not (lo <= value <= hi):
        kind = "an integer" if integer else "a number"
        raise BadInputError(f"{name} must be {kind} in [{lo}, {hi}], got {value!r}")
    return value


def market(n_stocks: int = 50, n_days: int = 500, start="2015-01-02", seed: int = 0,
           calendar: str = "XNYS", signal: float = 0.0, *, n_sectors: int = 5,
           listing_fraction: float = 0.2, delisting_fraction: float = 0.1,
           suspension_rate: float = 0.002) -> SyntheticMarket:
    """Generate a seeded synthetic market of ``n_stocks`` over ``n_days`` sessions of ``calendar``.

    ``signal`` scales the planted predictable component (see the module docstring; ~0.15 daily IC at 1).
    ``suspension_rate`` is the chance per traded stock-day that a suspension (1-20 sessions) starts.
    The same arguments always give the same market.
    """
    _check("n_stocks", n_stocks, 1, 100_000, integer=True)
    _check("n_days", n_days, 2, 100_000, integer=True)
    _check("signal", signal, 0.0, 10.0)
    _check("n_sectors", n_sectors, 1, 1000, integer=True)
    for name, v in (("listing_fraction", listing_fraction), ("delisting_fraction", delisting_fraction)):
        _check(name, v, 0.0, 1.0)
    _check("suspension_rate", suspension_rate, 0.0, 0.1)
    cal = calendars.resolve(calendar)
    dates = _sessions(cal, start, n_days)
    timezone = str(calendars.get(cal).tz)
    rng = np.random.default_rng(seed)
    D, N = n_days, n_stocks
    width = max(4, len(str(N)))
    names = [f"SYN{i + 1:0{width}d}{_suffix(cal)}" for i in range(N)]

    # per-stock parameters
    sector = rng.integers(0, n_sectors, N)
    beta = rng.uniform(0.6, 1.4, N)
    gamma = rng.uniform(0.5, 1.2, N)
    idio_vol = rng.uniform(0.010, 0.025, N)
    price0 = np.exp(rng.uniform(np.log(10), np.log(200), N))
    volume_level = np.exp(rng.uniform(np.log(2e5), np.log(2e7), N))
    status = _listing_status(rng, D, N, listing_fraction, delisting_fraction, suspension_rate)

    # shocks, drawn up front so the loop below is only arithmetic
    zm, zs, z = rng.standard_normal(D), rng.standard_normal((D, n_sectors)), rng.standard_normal((D, N))
    zv = rng.standard_normal((D, N))

    omega = idio_vol ** 2 * (1 - GARCH_A - GARCH_B)
    omega_m = MARKET_VOL ** 2 * (1 - GARCH_A - GARCH_B)
    h, hm = idio_vol ** 2, MARKET_VOL ** 2
    log_close = np.log(price0)
    pending = np.zeros(N)             # market + sector moves missed while suspended
    alpha = np.zeros(N)
    window = np.zeros((MOMENTUM_DAYS, N))  # ring buffer of observed returns
    r5, r20 = np.zeros(N), np.zeros(N)
    vnoise = np.zeros(N)
    kappa = signal * KAPPA
    out_logc, out_r = np.empty((D, N)), np.empty((D, N))
    out_sd, out_vn = np.empty((D, N)), np.empty((D, N))
    out_h, out_hm, out_alpha = np.empty((D, N)), np.empty(D), np.empty((D, N))
    prev_status = np.full(N, -1)
    for t in range(D):
        st = status[t]
        trading = st == 1
        listing_day = trading & (prev_status == -1)
        fm = np.sqrt(hm) * zm[t]
        factor = beta * fm + gamma * SECTOR_VOL * zs[t, sector]
        eps = np.sqrt(h) * z[t]
        out_sd[t] = np.sqrt(h + beta ** 2 * hm)
        moves = trading & ~listing_day
        r = np.where(moves, MU + alpha + factor + eps + pending, 0.0)
        pending = np.where(st == 0, pending + factor, 0.0)
        log_close += r
        h = np.where(moves, omega + GARCH_A * eps ** 2 + GARCH_B * h, h)
        hm = omega_m + GARCH_A * fm ** 2 + GARCH_B * hm
        j = t % MOMENTUM_DAYS
        r20 += r - window[j]
        r5 += r - window[(t - REVERSAL_DAYS) % MOMENTUM_DAYS] if t >= REVERSAL_DAYS else r
        window[j] = r
        alpha = kappa * (0.25 * r20 - 1.25 * r5)
        vnoise = 0.7 * vnoise + 0.714 * zv[t]
        out_logc[t], out_r[t], out_vn[t] = log_close, r, vnoise
        out_h[t], out_hm[t], out_alpha[t] = h, hm, alpha
        prev_status = st

    listed, traded = status >= 0, status == 1
    close = np.where(listed, np.exp(out_logc), np.nan)
    prev_close = np.vstack([close[:1], close[:-1]])
    prev_close = np.where(np.isnan(prev_close), close, prev_close)
    sd = out_sd
    # the open sits on the way from the previous close to this close; high/low reach beyond both
    log_open = np.log(prev_close) + rng.uniform(0.1, 0.5, (D, N)) * out_r + 0.2 * sd * rng.standard_normal((D, N))
    opn = np.where(traded, np.exp(log_open), close)
    high = np.where(traded, np.maximum(opn, close) * np.exp(0.5 * sd * np.abs(rng.standard_normal((D, N)))), close)
    low = np.where(traded, np.minimum(opn, close) * np.exp(-0.5 * sd * np.abs(rng.standard_normal((D, N)))), close)
    raw_volume = volume_level * np.exp(0.6 * (np.abs(out_r) / sd - 0.8) + 0.3 * out_vn)
    volume = np.where(traded, np.maximum(np.round(raw_volume / LOT), 1) * LOT, 0.0)
    volume = np.where(listed, volume, np.nan)
    opn, high, low = (np.where(listed, a, np.nan) for a in (opn, high, low))
    return SyntheticMarket(symbols=names, dates=dates, calendar=cal, timezone=timezone, seed=seed,
                           signal=float(signal), open=opn, high=high, low=low, close=close, volume=volume,
                           status=status, sector=sector, beta=beta, gamma=gamma, idio_var=out_h,
                           market_var=out_hm, alpha=out_alpha)


def _listing_status(rng, D: int, N: int, listing_fraction: float, delisting_fraction: float,
                    suspension_rate: float) -> np.ndarray:
    """int8 (days, stocks): -1 before listing / after delisting, 0 suspended, 1 traded."""
    first = np.zeros(N, int)
    last = np.full(N, D - 1)
    late = rng.choice(N, int(round(listing_fraction * N)), replace=False)
    first[late] = rng.integers(1, max(2, D // 2), len(late))
    early = rng.choice(N, int(round(delisting_fraction * N)), replace=False)
    last[early] = np.maximum(rng.integers(D // 2, max(D // 2 + 1, D - 1), len(early)), first[early] + 1)
    last = np.minimum(last, D - 1)
    t = np.arange(D)[:, None]
    status = np.where((t >= first) & (t <= last), 1, -1).astype(np.int8)
    if suspension_rate > 0:
        starts = np.argwhere((rng.random((D, N)) < suspension_rate) & (status == 1))
        lengths = np.minimum(rng.geometric(0.25, len(starts)), 20)
        for (d, i), n in zip(starts, lengths):
            # never the listing or the last listed day: a stock's life starts and ends with a trade
            if first[i] < d < last[i]:
                status[d:min(d + n, last[i]), i] = 0
    return status


# ------------------------------------------------------------------------------------------ ticks
class SyntheticTicks(pd.DataFrame):
    """Trade ticks (symbol, time, price, volume, amount, side) with a ``write_ticks(store)`` method."""

    _metadata = ["timezone"]

    @property
    def _constructor(self):
        return SyntheticTicks

    def write_ticks(self, store) -> int:
        """Write each symbol's ticks (partitioned by local date, source="synthetic"); returns rows written."""
        rows = 0
        tz = getattr(self, "timezone", None)
        with store.lock():
            for sym, part in self.groupby("symbol", observed=True, sort=True):
                table = pa.Table.from_pandas(part.drop(columns="symbol"), preserve_index=False)
                store.write_ticks(str(sym), table, source=SOURCE, timezone=tz,
                                  units={"volume": "shares", "price_scale": 1})
                rows += table.num_rows
        return rows


def _parse_freq(freq: str) -> int:
    try:
        step = pd.Timedelta(freq)
    except (ValueError, TypeError):
        raise BadInputError(f"cannot read tick frequency {freq!r}; write it like '3s' or '1min'") from None
    if step <= pd.Timedelta(0) or step > pd.Timedelta("1h"):
        raise BadInputError(f"tick frequency {freq!r} must be between 1 ns and 1 hour")
    return int(step.value)


def ticks(source: SyntheticMarket | int | Sequence[str] = 50, days: int | Sequence = 30, freq: str = "3s",
          calendar: str | None = None, seed: int = 0, start="2019-01-02",
          trade_prob: float = 0.9) -> SyntheticTicks:
    """Intraday trade ticks on a ``freq`` grid inside the continuous session (XSHG: lunch break skipped).

    ``source`` is a SyntheticMarket (its first ``days`` sessions, or the given dates) or a number of
    stocks / list of symbol names (a fresh market on ``calendar``, default XSHG, from ``start`` with no
    listings or suspensions). Each grid slot holds a trade with probability ``trade_prob`` at a random
    instant inside it (the first and last slots always trade). Per stock and day, the price is a Brownian
    bridge from the day's open to its close, clipped into [low, high], and the day's volume is split
    over the trades in lots of 100, so ticks add up to the daily bar exactly. ``side``: 0 buy (uptick),
    1 sell (downtick), ties at random. ``time`` is a UTC instant.
    """
    _check("trade_prob", trade_prob, 0.01, 1.0)
    step = _parse_freq(freq)
    wanted = np.unique(np.asarray(days, "datetime64[D]")) if _is_seq(days) else None
    if isinstance(source, SyntheticMarket):
        mkt = source
        if calendar is not None and calendars.resolve(calendar) != mkt.calendar:
            raise BadInputError(f"the market trades on {mkt.calendar}, not {calendar}; leave calendar out")
    else:
        names = [_symbols.normalize(s) for s in source] if _is_seq(source) else None
        n = len(names) if names is not None else _check("source", source, 1, 100_000, integer=True)
        cal = calendars.resolve(calendar or "XSHG")
        if wanted is not None:
            start, n_days = wanted[0], len(calendars.sessions(cal, wanted[0], wanted[-1]))
        else:
            n_days = _check("days", days, 1, 10_000, integer=True)
        mkt = market(n, max(n_days, 2), start, seed, cal,  # a market needs 2 sessions; ticks may want 1
                     listing_fraction=0, delisting_fraction=0, suspension_rate=0)
        if names is not None:
            mkt.symbols = names
    if wanted is not None:
        missing = np.setdiff1d(wanted, mkt.dates)
        if len(missing):
            raise BadInputError(f"{missing[0]} is not a session of the market ({mkt.calendar} "
                                f"{mkt.dates[0]}..{mkt.dates[-1]})")
        day_idx = np.searchsorted(mkt.dates, wanted)
    else:
        day_idx = np.arange(_check("days", days, 1, len(mkt.dates), integer=True))
    rng = np.random.default_rng([seed, 7])
    segs = calendars.segments(mkt.calendar, mkt.dates[day_idx])
    frames = []
    for k, d in enumerate(day_idx):
        starts = np.concatenate([np.arange(a, b, step) for a, b in segs[k]])
        ends = np.concatenate([np.minimum(np.arange(a, b, step) + step, b) for a, b in segs[k]])
        frames.append(_day_ticks(rng, mkt, d, starts, ends, trade_prob))
    cols = {k: np.concatenate([f[k] for f in frames]) for k in frames[0]}
    order = np.argsort(cols["symbol"], kind="stable")  # days are in order and times within a day too
    out = SyntheticTicks({
        "symbol": pd.Categorical.from_codes(cols["symbol"][order], categories=mkt.symbols),
        "time": pd.DatetimeIndex(cols["time"][order]).floor("us").tz_localize("UTC"),  # the store keeps microseconds
        **{k: cols[k][order] for k in ("price", "volume", "amount", "side")},
    })
    out.timezone = mkt.timezone
    return out


def _is_seq(x) -> bool:
    return not isinstance(x, (str, bytes, int, np.integer)) and hasattr(x, "__len__")


def _day_ticks(rng, mkt: SyntheticMarket, d: int, starts: np.ndarray, ends: np.ndarray,
               trade_prob: float) -> dict[str, np.ndarray]:
    """All stocks' ticks on session ``d`` (slots [starts, ends)): (stocks, slots) arrays, traded cells kept."""
    stocks = np.nonzero(mkt.status[d] == 1)[0]
    S, M = len(stocks), len(starts)
    o, c = np.log(mkt.open[d, stocks]), np.log(mkt.close[d, stocks])
    lo, hi = np.log(mkt.low[d, stocks]), np.log(mkt.high[d, stocks])
    vol_scale = np.maximum(hi - lo, 1e-4)[:, None] / np.sqrt(M)
    walk = np.cumsum(rng.standard_normal((S, M)), axis=1)
    walk -= walk[:, :1]
    frac = (np.arange(M) / (M - 1))[None, :] if M > 1 else np.ones((1, 1))
    bridge = walk - frac * walk[:, -1:]                       # 0 at both ends
    logp = o[:, None] + frac * (c - o)[:, None] + vol_scale * 0.5 * bridge
    price = np.exp(np.clip(logp, lo[:, None], hi[:, None]))
    trade = rng.random((S, M)) < trade_prob
    trade[:, 0] = trade[:, -1] = True
    # volume: the day's lots over the trades, U-shaped intraday profile; first and last trade >= 1 lot
    lots = (mkt.volume[d, stocks] / LOT).astype(np.int64)
    profile = 1 + 2 * (frac - 0.5) ** 2 * 4
    weights = np.where(trade, profile * rng.exponential(1.0, (S, M)), 0.0)
    weights /= weights.sum(1, keepdims=True)
    forced = np.minimum(lots, 2)
    vol_lots = rng.multinomial(lots - forced, weights)
    vol_lots[:, 0] += np.minimum(forced, 1)
    vol_lots[:, -1] += forced - np.minimum(forced, 1)
    keep = trade & (vol_lots > 0)
    dp = np.diff(price, axis=1, prepend=price[:, :1])
    side = np.where(dp > 0, 0, np.where(dp < 0, 1, rng.integers(0, 2, (S, M)))).astype(np.int8)
    jitter = (rng.random((S, M)) * (ends - starts)).astype(np.int64)
    jitter[:, 0] = 0
    times = starts[None, :] + jitter
    rows, cols = np.nonzero(keep)
    volume = vol_lots[rows, cols].astype(float) * LOT
    p = price[rows, cols]
    return {"symbol": stocks[rows], "time": times[rows, cols], "price": p, "volume": volume,  # symbol: codes
            "amount": p * volume, "side": side[rows, cols]}


# ------------------------------------------------------------------------------------ minute bars
#: Stocks generated together (one seeded random stream per block): the same bars whatever the batch.
MINUTE_BLOCK = 256
MINUTE_FIELDS = ("open", "high", "low", "close", "volume", "amount")


class SyntheticMinuteBars:
    """1-minute OHLCV bars of a SyntheticMarket over some of its sessions, generated block by block.

    Nothing is held: ``blocks()`` makes ``MINUTE_BLOCK`` stocks at a time (a month of 256 stocks is ~100 MB),
    so a whole-market month is written in bounded memory. Make one with ``minute_bars()``.
    """

    def __init__(self, market: SyntheticMarket, day_idx: np.ndarray, seed: int):
        self.market, self.day_idx, self.seed = market, day_idx, seed
        self.dates = market.dates[day_idx]
        segs = calendars.segments(market.calendar, self.dates)                  # (D, S, 2) UTC ns
        starts = [np.concatenate([np.arange(a, b, 60 * 10**9) for a, b in day]) for day in segs]
        self.slots_per_day = np.array([len(s) for s in starts])
        M = int(self.slots_per_day.max())
        # bar start instants (D, M); -1 after an early close (those minutes hold no bar)
        self.times = np.full((len(day_idx), M), -1, dtype=np.int64)
        for k, s in enumerate(starts):
            self.times[k, :len(s)] = s

    def __repr__(self) -> str:
        return (f"SyntheticMinuteBars({len(self.market.symbols)} stocks x {len(self.dates)} {self.market.calendar} "
                f"sessions {self.dates[0]}..{self.dates[-1]}, {self.rows:,} rows, seed={self.seed})")

    @property
    def rows(self) -> int:
        """Bars in all: every traded (stock, session) has one per minute of the session."""
        traded = self.market.status[self.day_idx] == 1                          # (D, N)
        return int((traded * self.slots_per_day[:, None]).sum())

    def blocks(self, symbols: Sequence[str] | None = None):
        """Yield ``(symbol, pa.Table)`` per stock with bars (time UTC, date, OHLCV, amount), in symbol order."""
        mkt = self.market
        wanted = None if symbols is None else {_symbols.normalize(s) for s in symbols}
        dates = pa.array(self.dates.astype(np.int32)).cast(pa.date32())
        for b0 in range(0, len(mkt.symbols), MINUTE_BLOCK):
            idx = np.arange(b0, min(b0 + MINUTE_BLOCK, len(mkt.symbols)))
            if wanted is not None and not wanted & {mkt.symbols[i] for i in idx}:
                continue
            bars = self._block(idx)
            for j, i in enumerate(idx):
                sym = mkt.symbols[i]
                cells = bars["ok"][j]                                          # (D, M) bar exists
                if (wanted is not None and sym not in wanted) or not cells.any():
                    continue
                day_of = np.broadcast_to(np.arange(len(self.dates))[:, None], cells.shape)[cells]
                yield sym, pa.table({
                    "time": pa.array(self.times[cells]).cast(pa.timestamp("ns", tz="UTC")),
                    "date": dates.take(pa.array(day_of)),
                    **{f: bars[f][j][cells] for f in MINUTE_FIELDS}})

    def _block(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """Bars of stocks ``idx`` as (stocks, days, minutes) arrays; its own random stream, so it is the same
        whichever other blocks are made."""
        mkt, d = self.market, self.day_idx
        rng = np.random.default_rng([self.seed, 11, int(idx[0])])
        S, (D, M) = len(idx), self.times.shape
        n = self.slots_per_day[None, :, None]                                  # minutes in each session
        k = np.arange(M)[None, None, :]
        traded = (mkt.status[np.ix_(d, idx)].T == 1)[:, :, None]              # (S, D, 1)
        ok = traded & (k < n)                                                  # (S, D, M) a bar exists
        day = lambda a: np.where(traded, a[np.ix_(d, idx)].T[:, :, None], 1.0)  # noqa: E731  (S, D, 1)
        O, C, L, H = day(mkt.open), day(mkt.close), day(mkt.low), day(mkt.high)
        o, c, lo, hi = np.log(O), np.log(C), np.log(L), np.log(H)
        # the log price after each minute: a Brownian bridge from the day's open to its close, kept in [low, high]
        frac = np.minimum((k + 1) / n, 1.0)
        walk = np.cumsum(rng.standard_normal((S, D, M)), axis=2)
        last = np.take_along_axis(walk, np.broadcast_to(n - 1, (S, D, 1)), axis=2)
        scale = 0.5 * np.maximum(hi - lo, 1e-4) / np.sqrt(n)
        after = np.clip(o + frac * (c - o) + scale * (walk - frac * last), lo, hi)
        after = np.where(k >= n - 1, c, after)                                 # the last minute closes at the close
        before = np.concatenate([o, after[:, :, :-1]], axis=2)                 # each minute opens at the last close
        wick = scale * 0.3 * np.abs(rng.standard_normal((2, S, D, M)))
        # to prices; clipped and pinned in price space so the daily values are met exactly, not to a rounding
        opn, close = np.clip(np.exp(before), L, H), np.clip(np.exp(after), L, H)
        opn[:, :, 0] = O[:, :, 0]                                              # the first minute opens at the open
        close = np.where(k == n - 1, C, close)                                 # the last closes at the close
        high = np.maximum(np.clip(np.exp(np.maximum(before, after) + wick[0]), L, H), np.maximum(opn, close))
        low = np.minimum(np.clip(np.exp(np.minimum(before, after) - wick[1]), L, H), np.minimum(opn, close))
        # the day's high and low are reached in some minute, so the minutes aggregate to the daily bar
        np.put_along_axis(high, np.where(ok, high, -np.inf).argmax(2)[:, :, None], H, axis=2)
        np.put_along_axis(low, np.where(ok, low, np.inf).argmin(2)[:, :, None], L, axis=2)
        # the day's volume in lots over its minutes: U-shaped profile, multinomial, so the minutes add up to it
        lots = np.where(traded, day(mkt.volume), 0)[:, :, 0].astype(np.int64) // LOT
        profile = np.where(ok, (1 + 8 * (frac - 0.5) ** 2) * rng.exponential(1.0, (S, D, M)), 0.0)
        total = profile.sum(2, keepdims=True)
        volume = rng.multinomial(lots, np.divide(profile, total, out=np.full_like(profile, 1.0 / M),
                                                 where=total > 0)) * float(LOT)
        out = {"ok": ok, "open": opn, "high": high, "low": low, "close": close, "volume": volume}
        out["amount"] = volume * (out["open"] + out["high"] + out["low"] + out["close"]) / 4
        return out

    def frame(self, symbols: Sequence[str] | None = None) -> pd.DataFrame:
        """Long table (symbol, time, date, OHLCV, amount) of ``symbols`` (all by default): for small sizes."""
        parts = [t.to_pandas().assign(symbol=s) for s, t in self.blocks(symbols)]
        df = pd.concat(parts, ignore_index=True)
        return df[["symbol", "time", "date", *MINUTE_FIELDS]]

    def write(self, store, symbols: Sequence[str] | None = None) -> int:
        """Write every stock's bars (``interval="1m"``, source="synthetic"; ``Store.write_bars_many``: one
        commit per symbol, several at a time under one store lock); returns rows written."""
        results = store.write_bars_many(self.blocks(symbols), interval="1m", source=SOURCE, adjust="raw",
                                        timezone=self.market.timezone, units={"volume": "shares", "price_scale": 1})
        return sum(r.added + r.updated + r.unchanged for r in results)


def minute_bars(market: SyntheticMarket, days: int | Sequence = 21, seed: int = 0) -> SyntheticMinuteBars:
    """1-minute bars of every stock of ``market`` that trades on its first ``days`` sessions (or on the given
    session dates): one bar per minute of continuous trading (XNYS 390, early closes fewer; XSHG 240, lunch
    skipped), labelled by its UTC start instant (whole minutes, so the store's microseconds lose nothing).

    They agree with the daily bars: the first minute opens at the day's open, the last closes at its close,
    the minutes' highest high and lowest low are the day's high and low, and their volumes (whole lots) add
    up to the day's volume. ``amount`` is volume x the bar's mean OHLC, so it adds up only approximately.
    Suspended and unlisted days have no bars. The same market, days and seed always give the same bars.
    """
    if not isinstance(market, SyntheticMarket):
        raise BadInputError(f"minute_bars needs a SyntheticMarket (from ft.synthetic.market(...)), got "
                            f"{type(market).__name__}")
    if _is_seq(days):
        wanted = np.unique(np.asarray(days, "datetime64[D]"))
        missing = np.setdiff1d(wanted, market.dates)
        if len(missing):
            raise BadInputError(f"{missing[0]} is not a session of the market ({market.calendar} "
                                f"{market.dates[0]}..{market.dates[-1]})")
        day_idx = np.searchsorted(market.dates, wanted)
    else:
        day_idx = np.arange(_check("days", days, 1, len(market.dates), integer=True))
    _check("seed", seed, 0, 2**63 - 1, integer=True)
    return SyntheticMinuteBars(market, day_idx, int(seed))
