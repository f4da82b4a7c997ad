"""``fintensor demo``: the whole pipeline, offline, in about a minute, on numbers a user can check.

data -> store -> 0D..4D tensors -> rolling features -> windows -> a small LSTM -> IC / Rank IC /
long-short, with a timing per stage and five figures. The data is a seeded synthetic market with a planted
signal (so the model has something to find, and its ceiling is known), or real CSV files (``--from``).

Every stage calls the public API exactly as a user would; the demo only adds the printing and the plots.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

import fintensor as ft

from .errors import BadInputError, ConflictError, FintensorError

# --- the demo's choices (a user's own run picks its own) ------------------------------------------------
SYNTHETIC = dict(n_stocks=100, n_days=750, start="2018-01-02", calendar="XSHG", signal=1.0)
QUICK_SYNTHETIC = dict(SYNTHETIC, n_stocks=40, n_days=300)
STORY = ("000001.SZ", "600519.SS")      # Ping An Bank and Kweichow Moutai: the README's tensors story
STORY_NAMES = ("Ping An Bank", "Kweichow Moutai")
STORY_DATE = "2019-01-03"
OHLCV = ["open", "high", "low", "close", "volume"]
#: Three kernel families only (shift, mean, std): on a cold numba cache the demo compiles little.
FEATURES = ["ROC1", "ROC5", "ROC20", "MA5", "MA20", "STD20", "VSTD20"]
#: The return from the close of t to the close of t+1, not the library's default lag=1 (traded at the close of
#: t+1): the synthetic market plants its signal in exactly this return, so lag=0 shows it (see the demo's line).
LABEL = dict(horizon=1, lag=0)
BAND_WINDOW = 20
TICK_SECONDS, TICK_DAYS = 3, 5
TICK_FREQ = f"{TICK_SECONDS}s"
MODEL = dict(model="lstm", hidden=32, layers=1, lookback=20, optimizer="adam", lr=3e-3, batch_size=1024,
             cs_norm="zscore", missing="drop")
QUICK_MODEL = dict(MODEL, hidden=16)
EPOCHS = 5
#: Every figure is FIGSIZE inches at DPI, i.e. FIGURE_PIXELS (width, height).
FIGSIZE, DPI = (9.6, 5.4), 100
FIGURE_PIXELS = (round(FIGSIZE[0] * DPI), round(FIGSIZE[1] * DPI))
FIGURES = ("prices", "rolling_band", "ticks_heatmap", "loss", "daily_ic")


@dataclasses.dataclass
class StageResult:
    name: str
    seconds: float
    ok: bool
    error: str | None = None


@dataclasses.dataclass
class DemoResult:
    """What the demo did: per-stage timings, the story's values, the test metrics and the figure paths."""

    ok: bool
    out: Path
    store: Path
    source: str
    stages: list[StageResult]
    story: dict[str, Any]
    metrics: dict[str, float]
    figures: dict[str, Path]
    traceback: str | None = None

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.stages)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "seconds": round(self.seconds, 3), "out": str(self.out), "store": str(self.store),
                "source": self.source, "stages": [dataclasses.asdict(s) for s in self.stages],
                "story": self.story, "metrics": self.metrics,
                "figures": {k: str(v) for k, v in self.figures.items()}}


@dataclasses.dataclass(eq=False)
class _Run:
    """What flows from stage to stage (each stage fills in its part) and where progress lines go."""

    sources: list[Path]
    out: Path
    store_root: Path
    seed: int
    epochs: int
    device: torch.device
    quick: bool
    say: Callable[[str], None]
    store: Any = None                   # ft.Store
    market: Any = None                  # the SyntheticMarket, without --from
    symbols: list[str] = dataclasses.field(default_factory=list)        # daily bars, on one calendar
    tick_symbols: list[str] = dataclasses.field(default_factory=list)   # ticks brought by --from
    pair: tuple[str, str] = ("", "")    # the story's two stocks
    panel: Any = None                   # (time, stock, feature) OHLCV, float64
    ticks: Any = None                   # (day, tick, stock, feature) price and volume
    features: Any = None
    labels: Any = None
    band: tuple = ()                    # (close, rolling mean, rolling std) of the story's first stock
    segments: dict = dataclasses.field(default_factory=dict)
    result: Any = None                  # ft.train's TrainResult
    evaluation: Any = None              # ft.evaluate's Evaluation of the test days
    story: dict[str, Any] = dataclasses.field(default_factory=dict)
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    figures: dict[str, Path] = dataclasses.field(default_factory=dict)

    @property
    def source_name(self) -> str:
        return ", ".join(p.name for p in self.sources) if self.sources else "synthetic market"

    @property
    def model(self) -> dict:
        return QUICK_MODEL if self.quick else MODEL

    def line(self, text: str) -> None:
        self.say("      " + text)


# ============================================================================================ stages
def _stage_store(run: _Run) -> None:
    run.store = ft.Store(run.store_root)
    if run.sources:
        report = ft.import_csv(run.sources, store=run.store)
        daily = [r for r in report.results if r.interval == "1d"]
        run.tick_symbols = [r.symbol for r in report.results if r.interval == "tick"]
        if not daily:
            raise BadInputError(f"no daily bars in {', '.join(map(str, run.sources))}: the demo needs daily CSV "
                                "files (one per symbol, or a long file with a symbol column)")
        run.symbols = [r.symbol for r in daily]
        ticks = f" and ticks of {len(run.tick_symbols)}" if run.tick_symbols else ""
        run.line(f"imported {len(daily)} symbols, {sum(r.rows for r in daily):,} daily rows ({daily[0].format}, "
                 f"{daily[0].adjustment}){ticks}")
    else:
        run.market = ft.synthetic.market(seed=run.seed, **(QUICK_SYNTHETIC if run.quick else SYNTHETIC))
        rows = _write_synthetic(run, run.market.write, run.market.symbols, "1d")
        run.symbols = list(run.market.symbols)
        run.line(f"{run.market}")
        run.line(f"wrote {rows:,} daily bars (source 'synthetic')")
    run.line(f"store: {run.store.root}")


def _stage_tensors(run: _Run) -> None:
    a, b = run.pair = _story_pair(run)
    calendar = _calendar(a)
    run.symbols = [s for s in run.symbols if _calendar(s) == calendar]
    ranges = [run.store.coverage(s) for s in run.symbols]
    adjustments = {run.store.manifest(s)["adjustment"] for s in run.symbols}
    adjust = "raw" if adjustments == {"raw"} else "full"  # raw files (and the synthetic market): as stored
    # float64: the 0D value is the stored number itself, digit for digit
    t3 = run.panel = ft.build(run.symbols, min(r[0] for r in ranges), max(r[1] for r in ranges), fields=OHLCV,
                              store=run.store, adjust=adjust, dtype=torch.float64)
    day = _story_day(t3, a)
    year = slice(day, f"{day[:4]}-12-31")
    t2 = t3.sel(feature="close")
    t1 = t2.sel(stock=a, time=year)
    t0 = t1.sel(time=day)
    times = t3.coords["time"]
    run.line(f"3D {_shape(t3)} (time, stock, feature): {len(run.symbols)} stocks, {times[0]} .. {times[-1]}, "
             f"{calendar}, adjust={adjust}")
    run.line(f"2D {_shape(t2)} t3.sel(feature='close')")
    run.line(f"1D {_shape(t1)} t2.sel(stock='{a}', time=slice('{year.start}', '{year.stop}'))")
    run.line(f"0D t1.sel(time='{day}').item() = {t0.item()!r}  <- close of {a} on {day}")
    if run.market is not None:
        run.line(f"   the generator's own close that day:  {float(run.market.panel('close').loc[day, a])!r}")
    run.story.update(stock=a, other=b, date=day, close=t0.item(), calendar=calendar, adjust=adjust,
                     shape_3d=list(t3.shape), shape_2d=list(t2.shape), shape_1d=list(t1.shape))
    _tick_tensor(run, calendar, np.datetime64(day, "D"))


def _calendar(symbol: str) -> str:
    return ft.calendars.for_symbols([symbol])[0]


def _story_pair(run: _Run) -> tuple[str, str]:
    """Ping An and Moutai when the data has them, else two stand-ins that trade on the same calendar."""
    if all(s in run.symbols for s in STORY):
        run.line(f"the story: {STORY_NAMES[0]} ({STORY[0]}) and {STORY_NAMES[1]} ({STORY[1]})")
        return STORY
    if run.market is not None:  # two stocks listed over the whole sample
        listed = (run.market.status >= 0).all(0)
        a, b = np.asarray(run.market.symbols)[listed][:2]
        run.line(f"synthetic market: its own {a} and {b} play {STORY_NAMES[0]} and {STORY_NAMES[1]}")
        return str(a), str(b)
    rows = {s: run.store.manifest(s)["rows"] for s in run.symbols}
    a = max(run.symbols, key=rows.get)
    others = [s for s in run.symbols if s != a and _calendar(s) == _calendar(a)]
    if not others:
        raise BadInputError(f"the data has one symbol on {_calendar(a)} ({a}); the demo needs at least two")
    b = max(others, key=rows.get)
    run.line(f"{STORY[0]} / {STORY[1]} are not in this data: {a} and {b} (the longest histories) stand in")
    return a, b


def _story_day(t3, symbol: str) -> str:
    """2019-01-03 when the stock traded that day (the README's story), else a day a third into its life."""
    times = t3.coords["time"]
    traded = t3.sel(feature="close", stock=symbol).mask.numpy()
    day = np.datetime64(STORY_DATE, "D")
    i = int(np.searchsorted(times, day))
    return str(day if i < len(times) and times[i] == day and traded[i] else times[traded][traded.sum() // 3])


def _tick_tensor(run: _Run, calendar: str, day: np.datetime64) -> None:
    """The 4D (day, tick, stock, feature) tensor: real ticks when --from brought them, else synthetic."""
    real = [s for s in run.pair if s in run.tick_symbols] + [s for s in run.tick_symbols if s not in run.pair]
    if len(real) >= 2:
        pair = (real[0], real[1])
        lo, hi = next((e["start"], e["end"]) for e in run.store.list()
                      if (e["symbol"], e["interval"]) == (pair[0], "tick"))
        run.line(f"4D from the real ticks in --from: {pair[0]} and {pair[1]}, {lo} .. {hi}")
    else:
        pair, (lo, hi) = _synthetic_ticks(run, calendar, day)
    t4 = run.ticks = ft.build_ticks(list(pair), lo, hi, freq=TICK_FREQ, fields=["price", "volume"],
                                    store=run.store, dtype=torch.float64)
    first = str(t4.coords["day"][0])
    price = t4.sel(day=first, tick="00:30:00", stock=pair[0], feature="price").item()
    volume = float(np.nansum(t4.sel(day=first, stock=pair[0], feature="volume").numpy()))
    daily = _daily_volume(run.panel, pair[0], first)
    run.line(f"4D {_shape(t4)} (day, tick, stock, feature): {TICK_FREQ} slots of the continuous session")
    run.line(f"   t4.sel(day='{first}', tick='00:30:00', stock='{pair[0]}', feature='price').item() = {price!r}"
             "  <- the last trade 30 minutes into the session")
    if daily is not None:
        run.line(f"   its {len(t4.coords['tick']):,} slots of volume add up to {volume:,.0f} shares; "
                 f"the daily bar says {daily:,.0f}")
    run.story.update(ticks_source="real" if len(real) >= 2 else "synthetic", ticks_stock=pair[0],
                     ticks_day=first, tick_price=price, tick_volume=volume, daily_volume=daily,
                     shape_4d=list(t4.shape))


def _synthetic_ticks(run: _Run, calendar: str, day: np.datetime64) -> tuple[tuple[str, str], tuple[str, str]]:
    n_days = 2 if run.quick else TICK_DAYS
    if run.market is not None:  # ticks of the same market: they add up to its daily bars
        days = run.market.dates[np.searchsorted(run.market.dates, day):][:n_days]
        ticks = ft.synthetic.ticks(run.market, days=days, freq=TICK_FREQ, seed=run.seed)
        pair = run.pair
        ticks = ticks[ticks["symbol"].isin(pair)]
        run.line(f"4D from synthetic ticks of {pair[0]} and {pair[1]} that add up to their daily bars")
    else:
        days = ft.calendars.sessions(calendar, day, day + np.timedelta64(3 * n_days, "D"))[:n_days]
        ticks = ft.synthetic.ticks(2, days=days, freq=TICK_FREQ, calendar=calendar, seed=run.seed)
        a, b = ticks["symbol"].cat.categories[:2]
        pair = (str(a), str(b))
        hint = " (add --from .../cn_intraday_tick/hikyuu for real A-share ticks)" if calendar == "XSHG" else ""
        run.line(f"4D from synthetic ticks of {a} and {b}: no tick files in --from{hint}")
    _write_synthetic(run, ticks.write_ticks, pair, "tick")
    return pair, (str(days[0]), str(days[-1]))


def _write_synthetic(run: _Run, write: Callable, symbols, interval: str) -> int:
    """Write synthetic bars or ticks. Another seed or size makes another market under the same SYN names:
    what an earlier demo stored for them is replaced, not reported as a conflict."""
    try:
        return write(run.store)
    except ConflictError:
        stale = [e for e in run.store.list() if e["symbol"] in set(symbols) and e["interval"] == interval]
        if any(e["source"] != "synthetic" for e in stale):
            raise
        for e in stale:
            run.store.remove(e["symbol"], interval)
        run.line(f"replaced the synthetic {'ticks' if interval == 'tick' else 'market'} an earlier run stored "
                 "(another seed or size)")
        return write(run.store)


def _daily_volume(t3, symbol: str, day: str) -> float | None:
    if symbol not in t3.coords["stock"] or np.datetime64(day, "D") not in t3.coords["time"]:
        return None
    cell = t3.sel(stock=symbol, time=day, feature="volume")
    return cell.item() if bool(cell.mask) else None


def _stage_features(run: _Run) -> None:
    a, day = run.pair[0], run.story["date"]
    run.features = ft.features.compute(run.panel, FEATURES)
    run.labels = ft.features.forward_returns(run.panel, **LABEL)
    close = run.panel.sel(feature="close", stock=a)
    run.band = (close, ft.rolling.mean(close, BAND_WINDOW), ft.rolling.std(close, BAND_WINDOW))
    t = int(np.searchsorted(close.coords["time"], np.datetime64(day, "D")))
    ours = run.band[1].isel(time=t).item()
    theirs = float(close.to_pandas().where(close.mask.numpy()).rolling(BAND_WINDOW).mean().iloc[t])
    exact = math.fsum(close.numpy()[t - BAND_WINDOW + 1:t + 1]) / BAND_WINDOW
    run.line(f"{_shape(run.features)} features {', '.join(FEATURES)} (qlib's Alpha158 definitions)")
    run.line(f"labels: forward_returns(horizon={LABEL['horizon']}, lag={LABEL['lag']}) = close[t+1] / close[t] - 1"
             " (only the loss reads them; no feature reads past t)")
    run.line("  lag 0, not the library's default lag=1 (trade at the next close): the synthetic market plants "
             "its signal in this return; for a trading backtest use forward_returns(close) with lag=1")
    run.line(f"rolling mean ({BAND_WINDOW}) of {a} on {day}: ft.rolling.mean {ours!r}, pandas {theirs!r}, "
             f"math.fsum / {BAND_WINDOW} {exact!r}")
    run.story.update(rolling_mean=ours, pandas_rolling_mean=theirs, exact_rolling_mean=exact)


def _stage_windows(run: _Run) -> None:
    cfg = run.model
    run.segments = ft.data.split_dates(run.features.coords["time"])  # 60 / 20 / 20 % of the sessions
    windows = ft.data.Windows(run.features, run.labels, cfg["lookback"], segments=run.segments,
                              label_reach=LABEL["horizon"] + LABEL["lag"], missing=cfg["missing"],
                              cs_norm=cfg["cs_norm"])
    for name, (lo, hi) in run.segments.items():
        run.line(f"{name:<5} {lo} .. {hi}: {len(windows.positions[name]):>7,} samples")
    run.line(f"a sample = {cfg['lookback']} sessions x {windows.n_features} features of one stock: a strided view "
             "of the panel (no window is copied)")
    run.story["samples"] = {k: len(v) for k, v in windows.positions.items()}


def _stage_train(run: _Run) -> None:
    cfg = run.model
    run.line(f"{cfg['model'].upper()} hidden {cfg['hidden']}, lookback {cfg['lookback']}, {run.epochs} epochs, "
             f"{cfg['optimizer']} lr {cfg['lr']}, on {run.device}")

    def epoch_line(row: dict) -> None:
        run.line(f"epoch {row['epoch']}/{run.epochs}  train loss {row['train_loss']:.4f}  valid loss "
                 f"{row['valid_loss']:.4f}  valid IC {row['valid_ic']:+.4f}  Rank IC {row['valid_rank_ic']:+.4f}  "
                 f"{row['seconds']:.1f}s")

    run.result = ft.train(run.features, run.labels, epochs=run.epochs, segments=run.segments,
                          device=str(run.device), seed=run.seed, out=str(run.out / "run"), progress=False,
                          on_epoch_end=epoch_line, **cfg)
    run.line(f"best epoch {run.result.best_epoch}; checkpoint {run.result.checkpoint}")


def _stage_evaluate(run: _Run) -> None:
    predictions = run.result.predict(run.features, device=str(run.device))
    lo, hi = run.segments["test"]
    run.evaluation = ft.evaluate(predictions, run.labels, start=lo, end=hi)
    s = run.evaluation.summary
    rows = [("IC", "ic", "mean daily Pearson correlation of score and next return"),
            ("ICIR", "icir", "IC mean / std over days"),
            ("Rank IC", "rank_ic", "mean daily Spearman correlation"),
            ("Rank ICIR", "rank_icir", ""),
            ("long-short", "long_short", "daily: top 20% minus bottom 20%, halved"),
            ("  annualised", "long_short_ann", "x 252"),
            ("  Sharpe", "long_short_sharpe", "annualised"),
            ("turnover", "turnover", "of the top 20%, per day")]
    run.metrics = {key: s[key] for _, key, _ in rows} | {"days": s["days"]}
    run.line(f"test {lo} .. {hi}: {s['days']} days, {len(predictions.coords['stock'])} stocks")
    run.line(f"{'metric':<14}{'value':>10}")
    for name, key, note in rows:
        run.line(f"{name:<14}{s[key]:>10.4f}  {note}")
    if run.market is not None:
        run.metrics["oracle_ic"] = run.market.oracle_ic(lo, hi)
        run.line(f"the planted signal's own IC on these days (the ceiling): {run.metrics['oracle_ic']:.4f}")
        run.line(f"note: the Sharpe is this high because the synthetic market plants a predictable signal (its "
                 f"IC ceiling {run.metrics['oracle_ic']:.2f}); on real stocks a daily IC of 0.02-0.05 is good and "
                 "the Sharpe far lower")


def _stage_figures(run: _Run) -> None:
    from matplotlib.figure import Figure  # no pyplot: the user's matplotlib backend is never touched

    for name, draw in (("prices", _figure_prices), ("rolling_band", _figure_band),
                       ("ticks_heatmap", _figure_ticks), ("loss", _figure_loss), ("daily_ic", _figure_ic)):
        fig = Figure(figsize=FIGSIZE)
        draw(fig, run)
        fig.tight_layout()
        run.figures[name] = run.out / f"{name}.png"
        fig.savefig(run.figures[name], dpi=DPI)
        run.line(f"{name:<14} {run.figures[name]}")


STAGES: tuple[tuple[str, str, Callable[[_Run], None]], ...] = (
    ("store", "data -> store", _stage_store),
    ("tensors", "0D .. 4D tensors", _stage_tensors),
    ("features", "rolling features and labels", _stage_features),
    ("windows", "windows and splits", _stage_windows),
    ("train", "train a small LSTM", _stage_train),
    ("evaluate", "IC / Rank IC / long-short on the test days", _stage_evaluate),
    ("figures", "figures", _stage_figures),
)


# =========================================================================================== figures
def _currency(symbol: str) -> str:
    """The quote currency a symbol's suffix names (A-shares: CNY), for axis labels."""
    suffix = symbol.rsplit(".", 1)[-1] if "." in symbol else ""
    return {"SS": "CNY", "SZ": "CNY", "HK": "HKD", "T": "JPY", "L": "GBp"}.get(suffix, "USD" if not suffix else
                                                                                 "local currency")


def _adjustment(run: _Run) -> str:
    """How the panel's prices are adjusted, in words for a y label."""
    kind = run.panel.meta.get("adjustment") or "raw"
    return {"full": "adjusted for splits and dividends", "split": "split-adjusted",
            "raw": "unadjusted"}.get(kind, kind)


def _gaps(values: np.ndarray) -> int:
    """Sessions of the calendar with no value (suspensions, before listing, after delisting)."""
    return int(np.isnan(values).sum())


def _figure_prices(fig, run: _Run) -> None:
    ax_p, ax_v = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    missing = []
    for symbol in run.pair:  # rebased: Moutai trades near 1,000 CNY, Ping An near 10
        s = run.panel.sel(stock=symbol)
        close, dates = np.asarray(s.sel(feature="close")), s.coords["time"]
        ax_p.plot(dates, close / close[np.isfinite(close)][0] * 100, lw=1, label=symbol)
        ax_v.plot(dates, np.asarray(s.sel(feature="volume")), lw=0.7, label=symbol)
        missing.append(f"{symbol} {_gaps(close)}")
    calendar = run.panel.meta.get("calendar", "exchange")
    ax_p.set(ylabel=f"close ({_adjustment(run)}),\nfirst day = 100",
             title=f"Daily close and volume of {' and '.join(run.pair)} ({run.source_name})")
    ax_p.legend(loc="upper left")
    ax_v.set(ylabel="volume (shares, log)", yscale="log",
             xlabel=f"{calendar} session date (holidays are not sessions)\na break in a line = no trade that "
                    f"session (suspended or not listed): {', '.join(missing)} sessions")


def _figure_band(fig, run: _Run) -> None:
    close, mean, std = (np.asarray(t) for t in run.band)
    dates = run.band[0].coords["time"]
    symbol = run.pair[0]
    ax = fig.subplots()
    ax.plot(dates, close, lw=0.8, color="black", label="close")
    ax.plot(dates, mean, lw=1.2, color="tab:blue", label=f"rolling mean ({BAND_WINDOW} sessions)")
    ax.fill_between(dates, mean - 2 * std, mean + 2 * std, color="tab:blue", alpha=0.2, label="mean +- 2 std")
    ax.set(title=f"{symbol}: ft.rolling.mean and ft.rolling.std over {BAND_WINDOW} sessions ({run.source_name})",
           ylabel=f"close ({_currency(symbol)}, {_adjustment(run)})",
           xlabel=f"{run.panel.meta.get('calendar', 'exchange')} session date\nthe band starts after "
                  f"{BAND_WINDOW} sessions; gaps = suspended sessions ({_gaps(close)})")
    ax.legend(loc="upper left")


def _figure_ticks(fig, run: _Run) -> None:
    from matplotlib import colormaps

    symbol = run.story["ticks_stock"]
    price = run.ticks.sel(stock=symbol, feature="price").numpy()  # (day, tick)
    first = np.array([row[np.isfinite(row)][0] if np.isfinite(row).any() else np.nan for row in price])
    minutes = len(run.ticks.coords["tick"]) * TICK_SECONDS / 60
    change = (price / first[:, None] - 1) * 100
    limit = np.nanmax(np.abs(change))  # symmetric: yellow is 'unchanged'
    cmap = colormaps["RdYlGn"].with_extremes(bad="lightgrey")
    ax = fig.subplots()
    image = ax.imshow(change, aspect="auto", cmap=cmap, vmin=-limit, vmax=limit, interpolation="nearest",
                      extent=(0, minutes, len(price) - 0.5, -0.5))
    ax.set_yticks(range(len(price)), [str(d) for d in run.ticks.coords["day"]])
    source = run.ticks.meta.get("source", "synthetic ticks")
    traded = run.ticks.sel(stock=symbol, feature="price").mask.numpy()
    ax.set(xlabel="minutes of continuous trading since the open (the lunch break is skipped)\n"
                  f"a slot without a trade ({1 - traded.mean():.0%} of them) shows the last trade's price; "
                  "grey = no trade yet that day",
           ylabel="session date",
           title=f"{symbol}: last trade price per {TICK_FREQ} slot vs the day's first trade ({source})")
    fig.colorbar(image, ax=ax, label="change from the day's first trade (%)")


def _figure_loss(fig, run: _Run) -> None:
    history = run.result.history
    epochs = [h["epoch"] for h in history]
    best = run.result.best_epoch
    ax = fig.subplots()
    for key, colour in (("train_loss", "tab:blue"), ("valid_loss", "tab:orange")):
        ax.plot(epochs, [h[key] for h in history], marker="o", color=colour, label=key.replace("_", " "))
    ax.set(xlabel="epoch", ylabel="loss: MSE of the per-day z-scored forward return", xticks=epochs,
           title=f"{run.model['model'].upper()} training on {run.source_name}: loss and validation IC")
    ic = ax.twinx()
    ic.plot(epochs, [h["valid_ic"] for h in history], marker="s", color="tab:green", label="valid IC")
    ic.set_ylabel("validation IC (mean daily Pearson correlation)")
    ax.axvline(best, color="grey", ls="--", lw=1, label=f"best epoch {best} (kept)")
    lines = ax.get_legend_handles_labels()[0] + ic.get_legend_handles_labels()[0]
    ax.legend(lines, [line.get_label() for line in lines], loc="best")


def _figure_ic(fig, run: _Run) -> None:
    daily = run.evaluation.daily["ic"]
    shown = daily.dropna()
    values = shown.to_numpy()
    ax = fig.subplots()
    ax.bar(shown.index, values, width=1.0, color=np.where(values >= 0, "tab:green", "tab:red"), label="daily IC")
    ax.axhline(values.mean(), color="black", lw=1, label=f"mean IC {values.mean():.3f}")
    ax.set(xlabel=f"test session date ({len(shown)} sessions; weekends and holidays are not sessions)\n"
                  f"days without a bar: {len(daily) - len(shown)} (fewer than 2 stocks with a score and a known "
                  "next return, e.g. the last day)",
           ylabel="IC (Pearson correlation across stocks)",
           title=f"Daily IC of the {run.model['model'].upper()}'s scores vs the next return, test days "
                 f"({run.source_name})")
    total = ax.twinx()
    total.plot(shown.index, np.cumsum(values), color="tab:blue", lw=1.5, label="cumulative IC")
    total.set_ylabel("cumulative IC (sum of daily ICs)")
    lines = ax.get_legend_handles_labels()[0] + total.get_legend_handles_labels()[0]
    ax.legend(lines, [line.get_label() for line in lines], loc="upper left")


def _shape(t) -> str:
    return "x".join(str(n) for n in t.shape)


# =============================================================================================== run
def _check(sources: list, epochs, seed) -> list[Path]:
    paths = [Path(p).expanduser() for p in sources]
    for p in paths:
        if not p.exists():
            raise BadInputError(f"--from {p}: no such file or folder; give a folder of CSV files, e.g. "
                                "../shared/data/cn_daily/baostock_qfq/panel_2018-01_2020-08")
    for name, value, low in (("epochs", epochs, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise BadInputError(f"{name} must be an integer >= {low}, got {value!r}")
    return paths


def _device(device: str) -> torch.device:
    from .trainer import resolve_device

    return resolve_device(device)


def run(sources: str | os.PathLike | Iterable[str | os.PathLike] | None = None, *,
        out: str | os.PathLike = "demo_out", store: str | os.PathLike | None = None, seed: int = 0,
        epochs: int = EPOCHS, device: str = "auto", quick: bool = False,
        say: Callable[[str], None] | None = print) -> DemoResult:
    """Run the whole pipeline and write its figures into ``out``; returns a DemoResult (``.ok``).

    ``sources``: None for the synthetic market, else folders/files of CSVs (daily bars, and optionally
    ticks for the 4D stage). ``store``: default ``out/store``, so the demo never touches the user's cache
    unless asked. ``quick``: a smaller market and model (for tests). ``say``: where progress lines go
    (None: silent). Bad arguments raise BadInputError before anything is written; a failing stage
    stops the run with ``ok=False`` and its message in ``stages[-1].error``.
    """
    sources = [] if sources is None else [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    paths = _check(sources, epochs, seed)
    dev = _device(device)
    out = Path(out).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInputError(f"cannot create the output folder {out} ({exc.strerror}); pass --out DIR") from None
    state = _Run(paths, out, Path(store).expanduser() if store is not None else out / "store", seed, epochs, dev,
                 quick, say or (lambda text: None))
    stages: list[StageResult] = []
    trace = None
    state.say(f"fintensor demo: {state.source_name} -> {out} (device {dev})")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors and a small LSTM: one thread is as fast as two, and many
    try:                      # times faster than two on a machine busy with something else
        for number, (name, title, step) in enumerate(STAGES, 1):
            state.say(f"[{number}/{len(STAGES)}] {title}")
            t0 = time.perf_counter()
            try:
                step(state)
            except Exception as exc:  # a failing stage: say which and why, and stop
                message = str(exc) if isinstance(exc, FintensorError) else f"{type(exc).__name__}: {exc}"
                stages.append(StageResult(name, time.perf_counter() - t0, False, message))
                trace = traceback.format_exc()
                state.say(f"      FAILED after {stages[-1].seconds:.1f} s: {message}")
                break
            stages.append(StageResult(name, time.perf_counter() - t0, True))
            state.say(f"      {name}: {stages[-1].seconds:.1f} s")
    finally:
        torch.set_num_threads(threads)
    ok = len(stages) == len(STAGES) and stages[-1].ok
    result = DemoResult(ok, out, state.store_root, state.source_name, stages, state.story, state.metrics,
                        state.figures, trace)
    if ok:
        timings = ", ".join(f"{s.name} {s.seconds:.1f}" for s in stages)
        state.say(f"done in {result.seconds:.1f} s ({timings}); figures in {out}")
        state.say("your own data: `fintensor demo --from my_csv_folder/`, or `fintensor download AAPL MSFT` / "
                  "`fintensor import my_csv_folder/` and then `ft.build(...)` (see the README)")
    return result
