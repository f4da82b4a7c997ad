"""The `fintensor` command: a thin layer over the Python API.

Each subcommand is an ``add_<name>(subparsers, common)`` that declares its flags and a ``cmd_<name>(args)``
that calls the API and prints. Exit codes: 0 ok, 1 failure or partial failure, 2 bad input.
User errors print one line (``error: ...``); ``--debug`` adds the traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import sys
import textwrap
from typing import Sequence

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2
COMMANDS: list[tuple] = []  # (add_<name>, cmd_<name>) of each subcommand, appended by its section, in help order


# ------------------------------------------------------------------------------------------ helpers
def _store(args):
    from .store import Store

    return Store(args.store)


HELP_WIDTH = 100  #: no help line is wider, on a terminal or not


def _help_width() -> int:
    """100 columns, or the terminal's width when a terminal is narrower (a pipe is never narrower)."""
    if not sys.stdout.isatty():
        return HELP_WIDTH
    return min(HELP_WIDTH, shutil.get_terminal_size().columns)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Help that fits a screen: options aligned at column 28, text wrapped at 100 columns."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=28, width=_help_width())


def _example_lines(example: str, width: int = HELP_WIDTH - 4) -> list[str]:
    """One example command, broken with shell continuations (`\\`) where it would pass ``width``."""
    lines, line = [], ""
    for word in example.split(" "):
        if line and len(line) + 1 + len(word) > width - 2:
            lines.append(line + " \\")
            line = "    " + word
        else:
            line = f"{line} {word}" if line else word
    return lines + [line]


def _examples(*examples: str) -> str:
    """The epilog every help ends with: 'example(s):' and the commands, indented, each under 100 columns."""
    body = "\n".join(f"  {line}" for e in examples for line in _example_lines(e))
    return "example" + ("s" if len(examples) > 1 else "") + ":\n" + body


def _command(sub, common, name: str, summary: str, description: str, *examples: str, usage: str | None = None):
    """A subcommand parser: the common flags, a wrapped description, and its examples at the end."""
    text = "\n\n".join(textwrap.fill(par, HELP_WIDTH - 4) for par in description.split("\n\n"))
    return sub.add_parser(name, parents=[common], help=summary, description=text, usage=usage,
                          epilog=_examples(*examples), formatter_class=_Formatter)


def _compact(parser, title: str, *flags: tuple[str, dict]):
    """An option group listed in a few lines ("--lookback N (20)   --nesterov ...") instead of one per flag."""
    shown = []
    for flag, kwargs in flags:
        item = kwargs.pop("shown", None)
        if item is None:
            item = flag if kwargs.get("action") == "store_true" else \
                f"{flag} {'|'.join(kwargs['choices']) if 'choices' in kwargs else flag.strip('-').upper()}"
        if kwargs.get("default") not in (None, False):
            item += f" ({kwargs['default']})"
        shown.append(item)
    lines = [""]
    for item in shown:  # wrap between items, never inside one
        if lines[-1] and len(lines[-1]) + 3 + len(item) > 96:
            lines.append("")
        lines[-1] += ("   " if lines[-1] else "") + item
    group = parser.add_argument_group(title, "\n".join(lines))
    for flag, kwargs in flags:
        group.add_argument(flag, help=argparse.SUPPRESS, **kwargs)
    return group


def _emit(args, payload, text: str | None = None) -> None:
    """Print ``payload`` as JSON with --json, else ``text`` (unless --quiet)."""
    if getattr(args, "json", False):
        print(json.dumps(payload, indent=1, default=str))
    elif not getattr(args, "quiet", False) and text is not None:
        print(text)


def _table(rows: list[dict], columns: Sequence[str]) -> str:
    if not rows:
        return "(nothing)"
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


# ==================================================================== section: download, import (sources)
# (owned by the sources work: add_download/cmd_download, add_import/cmd_import)
def add_download(sub, common):
    from .sources.yahoo import INTERVALS

    p = _command(sub, common, "download", "download bars from Yahoo Finance into the store",
                 "Download daily or intraday bars through yfinance. Only what the store lacks is requested; "
                 "the same command twice requests nothing. Each symbol is reported ok, not found, rate-limited "
                 "or failed; good symbols are stored whatever happens to the others (exit 1 if any failed).",
                 "fintensor download AAPL MSFT 600519.SS --start 2024-01-01 --end 2024-06-30",
                 "fintensor download SPY --interval 5m",
                 usage="fintensor download SYMBOL... [--start DATE] [--end DATE] [--interval I] [options]")
    p.add_argument("symbols", nargs="+", metavar="SYMBOL",
                   help="any common spelling: AAPL, BRK.B, 600519.SH, sh.600519, 000001.XSHE")
    p.add_argument("--start", metavar="DATE", help="first session date (default: full history / what is missing)")
    p.add_argument("--end", metavar="DATE", help="last session date, inclusive (default: now)")
    p.add_argument("--interval", default="1d",
                   help=f"{', '.join(INTERVALS)} (default 1d); intraday: 1m the last 30 days, 2m-90m the last "
                        "60 days, 60m the last 730 days")
    _compact(p, "network",
             ("--retries", dict(type=int, default=5, shown="--retries N")),
             ("--max-wait", dict(type=float, default=120.0, shown="--max-wait SECONDS")),
             ("--timeout", dict(type=float, default=10.0, shown="--timeout SECONDS")),
             ("--workers", dict(type=int, default=4, shown="--workers N")))
    p.add_argument("--on-conflict", default="error", metavar="error|keep|overwrite",
                   help="rows that disagree with the store: error (default), keep the stored, or "
                        "overwrite")


def cmd_download(args) -> int:
    from .sources.yahoo import download

    report = download(args.symbols, args.start, args.end, args.interval, store=_store(args),
                      retries=args.retries, max_wait=args.max_wait, workers=args.workers,
                      timeout=args.timeout, on_conflict=args.on_conflict, quiet=args.quiet or args.json)
    _emit(args, report.to_dict(), report.table())
    report.raise_for_status()  # exit 1 when any symbol failed, 2 when Yahoo knows none of them
    return EXIT_OK


COMMANDS.extend([(add_download, cmd_download)])


def add_import(sub, common):
    from .sources.files import PRESET_NAMES, PRESETS

    p = _command(sub, common, "import", "import CSV/zip/gz files of bars or ticks into the store",
                 "Import vendor files (Yahoo, tushare, baostock, hikyuu, LEAN/AlgoSeek, zipline, Quandl, "
                 "mplfinance, backtrader, or any CSV with a date and a close or price column). The format, "
                 "symbol, units and timezone are detected from the header and the file name; the options "
                 "override them. Every file is checked before anything is written.",
                 "fintensor import AAPL.csv data/*.csv.gz --store ./store",
                 "fintensor import minute/spy/*_trade.zip --format lean_minute",
                 usage="fintensor import PATH... [--symbol S] [--format F] [--ticks] [options]")
    p.add_argument("paths", nargs="+", metavar="PATH", help="files, directories or glob patterns")
    p.add_argument("--symbol", help="symbol of one-symbol files without a symbol column")
    names = [preset.name for preset in PRESETS]  # the README's table of formats, in its order
    aliases = [a for a in PRESET_NAMES if a not in names]
    p.add_argument("--format", metavar="F", help="a preset instead of detection: " + ", ".join(names)
                   + (f" (also {', '.join(aliases)})" if aliases else ""))
    p.add_argument("--ticks", action="store_true", help="the rows are ticks (trades), not bars")
    p.add_argument("--on-conflict", default="error", metavar="error|keep|overwrite",
                   help="rows that disagree with the store: error (default), keep the stored, or "
                        "overwrite")
    _compact(p, "layout and units (default: detected; see the README's table of formats)",
             ("--layout", dict(default="auto", shown="--layout auto|long|wide|file")),
             ("--field", dict(default="close", shown="--field F")),
             ("--interval", dict(shown="--interval 1d|1m|...")),
             ("--tz", dict(shown="--tz America/New_York")),
             ("--volume-unit", dict(shown="--volume-unit shares|lots|N")),
             ("--amount-unit", dict(shown="--amount-unit currency|thousands|N")),
             ("--price-scale", dict(shown="--price-scale N")),
             ("--adjust", dict(shown="--adjust raw|split|full")),
             ("--adjusted-as-of", dict(shown="--adjusted-as-of DATE")),
             ("--source", dict(shown="--source LABEL")))
    p.add_argument("--date-column", metavar="NAME", help="the column holding the dates (default: detected)")
    p.add_argument("--date-format", metavar="FMT", help="strptime format of the dates, e.g. %%d/%%m/%%Y")
    p.add_argument("--recursive", action=argparse.BooleanOptionalAction, default=True,
                   help="read sub-folders of a directory (default: True)")


def cmd_import(args) -> int:
    from .sources.files import import_csv

    report = import_csv(
        args.paths, store=_store(args), symbol=args.symbol, layout=args.layout, kind="ticks" if args.ticks
        else "auto", interval=args.interval, format=args.format, timezone=args.tz, volume_unit=args.volume_unit,
        price_scale=args.price_scale, amount_unit=args.amount_unit, adjust=args.adjust,
        adjusted_as_of=args.adjusted_as_of, source=args.source, field=args.field, on_conflict=args.on_conflict,
        recursive=args.recursive, date_column=args.date_column, date_format=args.date_format)
    _emit(args, report.to_dict(), f"{report}\nstore: {report.store}")
    report.raise_for_status()  # exit 1 when a file of a folder was skipped
    return EXIT_OK


COMMANDS.extend([(add_import, cmd_import)])
# ================================================================= end section: download, import

# -------------------------------------------------------------------------------------------- cache
def add_cache(sub, common):
    p = sub.add_parser("cache", help="inspect and maintain the local store", formatter_class=_Formatter,
                       description=textwrap.fill("What is cached, a check of every file, removal. Exit 1 when "
                                                 "verify finds a problem, 2 on bad input. `fintensor cache "
                                                 "SUBCOMMAND --help` for more.", HELP_WIDTH - 4),
                       epilog=_examples("fintensor cache list --store ./store", "fintensor cache info 600519.SS",
                                        "fintensor cache verify --repair", "fintensor cache rm AAPL --interval 1m",
                                        "fintensor cache rm 000001.SZ --interval 1d --adjust raw",
                                        "fintensor cache files AAPL MSFT --interval 1d", "fintensor cache migrate"))
    csub = p.add_subparsers(dest="cache_cmd", metavar="{list,info,verify,rm,files,migrate}", required=True)

    def cache_command(name: str, summary: str, description: str, *examples: str):
        return csub.add_parser(name, parents=[common], help=summary,
                               description=textwrap.fill(description, HELP_WIDTH - 4),
                               epilog=_examples(*examples), formatter_class=_Formatter)

    cache_command("list", "symbols, intervals, ranges, rows, sources",
                  "One row per stored symbol, interval and adjustment: first and last date, rows, source.",
                  "fintensor cache list", "fintensor cache list --json --store ./store")
    q = cache_command("info", "every manifest stored for a symbol",
                      "Every manifest stored for SYMBOL: rows, range, source, adjustment, timezone, units, "
                      "parts and checksum.", "fintensor cache info AAPL", "fintensor cache info 600519.SS --json")
    q.add_argument("symbol", help="any common spelling (600519.SH = 600519.SS)")
    q = cache_command("verify", "check sizes, checksums and schemas of every file",
                      "Check every file's size, checksum, schema and key order. Exit 1 when a problem is found.",
                      "fintensor cache verify", "fintensor cache verify --repair")
    q.add_argument("--repair", action="store_true",
                   help="remove leftovers of interrupted writes (a partition without a manifest is moved to "
                        ".quarantine, never deleted)")
    q = cache_command("rm", "remove a symbol (all intervals unless --interval)",
                      "Remove a symbol's stored data: every interval, adjustment and its ticks, or only "
                      "--interval, or only the bars in one --adjust (the symbol's other adjustments, intervals "
                      "and ticks stay as they are).",
                      "fintensor cache rm AAPL", "fintensor cache rm 000001.SZ --interval tick",
                      "fintensor cache rm 000001.SZ --interval 1d --adjust raw")
    q.add_argument("symbol", help="any common spelling")
    q.add_argument("--interval", default=None, help="only this interval ('tick' for ticks; default: all)")
    q.add_argument("--adjust", default=None, choices=("raw", "split", "full"),
                   help="only the bars stored in this adjustment (default: every adjustment)")
    q = cache_command("files", "the committed Parquet parts, one path per line",
                      "The committed Parquet parts of SYMBOLs (default: every stored one), one path per line: "
                      "hand these to DuckDB, Polars, Spark or Ray instead of globbing a folder, which would also "
                      "read superseded or orphan parts.",
                      "fintensor cache files AAPL MSFT --interval 1d",
                      "fintensor cache files --interval tick --json > parts.json")
    q.add_argument("symbols", nargs="*", metavar="SYMBOL", help="symbols (default: every stored one)")
    q.add_argument("--interval", default="1d", help="bar interval, or 'tick' (default: 1d)")
    q.add_argument("--adjust", default=None, choices=("raw", "split", "full"),
                   help="bars stored in this adjustment (default: each symbol's only one)")
    cache_command("migrate", "rewrite an older store format in the current one",
                  "Rewrite every partition written by an older fintensor (nanosecond timestamps, one adjustment "
                  "per symbol folder) in the current format (bars under symbol=X/adjust=A/), one partition at a "
                  "time, atomically; old stores stay readable until then.",
                  "fintensor cache migrate", "fintensor cache migrate --store ./store")


def cmd_cache(args) -> int:
    store = _store(args)
    if args.cache_cmd == "list":
        rows = store.list()
        _emit(args, rows, _table(rows, ["symbol", "interval", "start", "end", "rows", "source", "adjustment"])
              + f"\nstore: {store.uri}" + (f" (read-only, mirrored in {store.root})" if store.remote else ""))
        return EXIT_OK
    if args.cache_cmd == "info":
        mans = store.info(args.symbol)
        lines = []
        for m in mans:
            where = m.get("date") or m["interval"]
            lines.append(f"{m['symbol']} {m['kind']} {where}: {m['rows']} rows {m.get('start_date', m['start'])}"
                         f" .. {m.get('end_date', m['end'])}; source {m['source']}, adjustment "
                         f"{m['adjustment']}, tz {m['timezone']}, units "
                         f"{', '.join(f'{k}={v}' for k, v in sorted(m['units'].items()))}, updated {m['updated']}, "
                         f"{len(m['parts'])} part(s), checksum {m['checksum'][:12]}")
        _emit(args, mans, "\n".join(lines))
        return EXIT_OK
    if args.cache_cmd == "verify":
        problems = store.verify(repair=args.repair)
        bad = [p for p in problems if not p.repaired]
        if bad:
            leftovers = sum(p.leftover for p in bad)
            advice = []
            if leftovers:
                advice.append("remove the leftovers of interrupted writes with `fintensor cache verify --repair`")
            if any("cache migrate" in p.message for p in bad):
                advice.append("rewrite partitions of an older format with `fintensor cache migrate`")
            if leftovers + sum("cache migrate" in p.message for p in bad) < len(bad):
                advice.append("re-import the damaged symbols or remove them with `fintensor cache rm`")
            summary = f"{len(bad)} problem(s) in {store.root}: {'; '.join(advice)}"
        elif store.root.exists():
            summary = f"store {store.root} is consistent"
        else:
            summary = f"no store at {store.root} yet (nothing to check)"
        _emit(args, [vars(p) for p in problems], "\n".join([*map(str, problems), summary]))
        if bad and args.quiet and not args.json:  # quiet prints nothing but errors: these are errors
            print("\n".join(map(str, bad)), file=sys.stderr)
        return EXIT_FAILURE if bad else EXIT_OK
    if args.cache_cmd == "files":
        paths = [str(p) for p in store.files(args.symbols or None, args.interval, adjust=args.adjust)]
        _emit(args, paths, "\n".join(paths) if paths else None)
        return EXIT_OK
    if args.cache_cmd == "migrate":
        done = store.migrate()
        _emit(args, {"migrated": done}, "\n".join([*done, f"migrated {len(done)} partition(s) in {store.root}"]))
        return EXIT_OK
    if args.cache_cmd == "rm":
        n = store.remove(args.symbol, args.interval, adjust=args.adjust)
        what = f" ({args.adjust}-adjusted bars)" if args.adjust else ""
        _emit(args, {"removed": n}, f"removed {n} partition(s) of {args.symbol}{what}")
        return EXIT_OK
    raise AssertionError(args.cache_cmd)


COMMANDS.extend([(add_cache, cmd_cache)])


# ========================================================================= section: build, show (tensors)
def add_build(sub, common):
    p = _command(sub, common, "build", "build a tensor from a recipe or flags",
                 "Build a (time, stock, feature) tensor, or (day, tick, stock, feature) with --freq, from the "
                 "store; a recipe's [source] (or --yahoo) imports or downloads what the store lacks. Without "
                 "--out the tensor stays in the store's tensor cache (its path is printed).",
                 "fintensor build datasets/story.toml --out story.safetensors",
                 "fintensor build --symbols AAPL MSFT --start 2015-01-01 --end 2016-12-31 --fields close volume "
                 "--out us.safetensors",
                 usage="fintensor build [RECIPE.toml | --symbols S... --start DATE --end DATE ...] [--out FILE]")
    p.add_argument("recipe", nargs="?", help="a recipe file (datasets/*.toml)")
    p.add_argument("--out", metavar="FILE", help="write the tensor here (safetensors)")
    p.add_argument("--no-cache", action="store_true", help="build afresh; do not read or write the tensor cache")
    g = p.add_argument_group("without a recipe")
    g.add_argument("--symbols", nargs="+", metavar="SYMBOL")
    g.add_argument("--start", metavar="DATE")
    g.add_argument("--end", metavar="DATE")
    g.add_argument("--fields", nargs="+", metavar="FIELD", help="default: close (daily), price volume (ticks)")
    g.add_argument("--freq", help="tick slot length (3s, 1min): builds (day, tick, stock, feature)")
    g.add_argument("--yahoo", action="store_true", help="download what the store lacks from Yahoo")
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="build blocks of stocks as Ray tasks (bars, not ticks): a local cluster, or ADDRESS "
                        "('auto': the running one); the same tensor and cache entry")
    _compact(p, "options (default: the symbols' own calendar, full adjustment, no fill, float32)",
             ("--interval", dict(shown="--interval 1d|1wk|1mo|1m|60m|tick")),
             ("--label", dict(choices=("start", "end"), shown="--label start|end (1wk/1mo periods)")),
             ("--adjust", dict(choices=("raw", "split", "full", "as_stored"))),
             ("--calendar", dict(shown="--calendar XNYS|XSHG|union|data|24/7|24/5")),
             ("--fill", dict(choices=("ffill",))),
             ("--fill-limit", dict(type=int, shown="--fill-limit N")),
             ("--dtype", dict(choices=("float32", "float64"))))


_BUILD_FLAGS = ("symbols", "start", "end", "fields", "interval", "freq", "adjust", "calendar", "fill",
                "fill_limit", "dtype", "label")


def cmd_build(args) -> int:
    from pathlib import Path

    import sys
    import warnings

    from .builder import BuildWarning
    from .errors import BadInputError, FintensorError
    from .fileio import check_output_path
    from .recipes import Recipe, load_recipe
    from .tensor import check_tensor_name

    flags = {k: getattr(args, k) for k in _BUILD_FLAGS if getattr(args, k) is not None}
    if args.recipe:
        if flags or args.yahoo:
            raise BadInputError(f"give a recipe or --{'/--'.join(k.replace('_', '-') for k in flags) or 'yahoo'} "
                                "flags, not both")
        recipe = load_recipe(args.recipe)
    else:
        lacking = [f"--{k}" for k in ("symbols", "start", "end") if k not in flags]
        if lacking:
            raise BadInputError(f"give a RECIPE.toml, or {', '.join(lacking)} (see fintensor build --help)")
        recipe = Recipe.from_dict({**flags, **({"source": {"yahoo": True}} if args.yahoo else {})},
                                  Path.cwd(), where="fintensor build")
    if args.out is not None and Path(args.out).is_dir():
        raise BadInputError(f"--out {args.out} is a directory; name a file such as {Path(args.out) / 'x.safetensors'}")
    if args.out is not None:
        check_output_path(args.out, "--out")
        check_tensor_name(Path(args.out))
    if args.no_cache and args.out is None:
        raise BadInputError("--no-cache without --out would keep nothing; pass --out FILE")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", BuildWarning)
        try:
            tensor = recipe.build(_store(args), cache=not args.no_cache, quiet=args.quiet or args.json,
                                  build_bars=_ray_build(args.ray))
        except FintensorError as exc:  # the API's advice, in flags
            exc.args = (_cli_words(str(exc)),) + exc.args[1:]
            raise
    said = [str(w.message) for w in caught if issubclass(w.category, BuildWarning)]
    for w in caught:
        if not issubclass(w.category, BuildWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    for line in said:
        print(f"warning: {_cli_words(line)}", file=sys.stderr)
    path = str(tensor.save(args.out)) if args.out else tensor.meta.get("cache")
    hit = bool(tensor.meta.get("cache_hit")) and not args.out
    where = (f"cache hit: {path} (built earlier from the same store contents; --no-cache rebuilds)" if hit
             else f"saved: {path}")
    _emit(args, {**tensor.summary(), "path": path, "cache_hit": hit, "warnings": [_cli_words(x) for x in said]},
          f"{tensor!r}\n{where}")
    if not bool(tensor.mask.any()):
        print("error: nothing at all is observed in this tensor (no stored rows in the range); widen the range "
              "or get the data with `fintensor import` / `fintensor download`", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def _ray_build(address: str | None):
    """`build --ray [ADDRESS]`: fintensor.cluster.build in place of ft.build (None: ft.build)."""
    if address is None:
        return None
    import functools

    from .cluster import build

    return functools.partial(build, address=None if address == "local" else address)


def _cli_words(message: str) -> str:
    """The builder's advice in CLI flags: "calendar='data' (CLI: --calendar data)" -> "--calendar data"."""
    import re

    message = re.sub(r"\w+='[^']*' \(CLI: (--[^)]*)\)", r"\1", message)
    return re.sub(r"\b(adjust|calendar|label|interval)='([^']*)'", r"--\1 \2", message)


def add_show(sub, common):
    p = _command(sub, common, "show", "summary and a small preview of a saved tensor",
                 "Print dims, shape, coordinate ranges, dtype, observed share, meta and the first and last rows "
                 "(the file is memory-mapped, never read whole).",
                 "fintensor show story.safetensors")
    p.add_argument("file", help="a tensor written by fintensor build --out or StockTensor.save")
    p.add_argument("--rows", type=int, default=5, metavar="N", help="rows shown at each end (default 5)")


def _slot_clock_times(tensor, day_index: int = 0) -> list[str] | None:
    """The local clock time at which each tick slot of one day starts ('09:30:03'), or None when the
    tensor does not say its calendar and slot length (the slot labels are offsets into the session)."""
    import numpy as np
    import pandas as pd

    from . import calendars

    meta = tensor.meta
    if "tick" not in tensor.dims or not meta.get("calendar") or not meta.get("freq"):
        return None
    try:
        freq_ns = pd.Timedelta(meta["freq"]).value
        days = tensor.coords["day"][day_index:day_index + 1]
        segments = calendars.segments(meta["calendar"], days)[0]  # (S, 2) UTC ns of continuous trading
        tz = calendars.get(meta["calendar"]).tz
    except Exception:  # an unknown calendar or freq in a foreign file: keep the offsets
        return None
    starts = [t for lo, hi in segments for t in range(int(lo), int(hi), freq_ns)]
    times = pd.to_datetime(starts, utc=True).tz_convert(tz).strftime("%H:%M:%S")
    offsets = np.asarray(tensor.coords["tick"]).astype("timedelta64[ns]").astype(np.int64)
    if len(times) < len(offsets) or not (offsets == offsets[0] + freq_ns * np.arange(len(offsets))).all():
        return None
    first = int(offsets[0] // freq_ns)
    return list(times[first:first + len(offsets)])


def cmd_show(args) -> int:
    from .tensor import load

    tensor = load(args.file, mmap=True)
    text = f"{tensor!r}\n\n{tensor.preview(args.rows)}"
    clock = _slot_clock_times(tensor)
    if clock is not None:  # the preview's slot offsets ('0 days 00:00:03') as the clock times they are
        import pandas as pd

        by_offset = {str(pd.Timedelta(offset)): time for offset, time in zip(tensor.coords["tick"], clock)}
        text = re.sub(r"\b\d+ days \d\d:\d\d:\d\d(?:\.\d+)?",
                      lambda m: by_offset.get(m.group(0), m.group(0)).ljust(len(m.group(0))), text)
        day = str(tensor.coords["day"][0])[:10]
        text += (f"\n(tick slots shown as {tensor.meta['calendar']} clock times of {day}: "
                 f"{clock[0]} .. {clock[-1]}, {tensor.meta['freq']} each)")
    _emit(args, tensor.summary(), text)
    return EXIT_OK


COMMANDS.extend([(add_build, cmd_build), (add_show, cmd_show)])
# ====================================================================== end section: build, show

# ================================================================ section: train, predict, evaluate
def _training_inputs(args, spec: str):
    """(features, labels) for the CLI: features computed from DATA with ``spec`` (or DATA itself for
    "none"); labels from --labels, else DATA's close as forward returns (--horizon, --lag)."""
    from . import features as ft_features
    from .errors import BadInputError
    from .tensor import load

    data = load(args.data)
    try:
        feats = data if spec == "none" else ft_features.compute(data, spec)
    except BadInputError as exc:
        raise BadInputError(f"{args.data} cannot give --features {spec} ({exc}); train on its own features "
                            "with --features none, or build it with --fields open high low close volume") from None
    if getattr(args, "labels", None):
        return feats, load(args.labels)
    if "feature" not in data.dims or "close" not in set(map(str, data.coords["feature"])):
        raise BadInputError(f"{args.data} has no 'close' feature to make labels from; pass --labels FILE")
    labels = ft_features.forward_returns(data.sel(feature="close"), horizon=args.horizon, lag=args.lag)
    return feats, labels


def _segments(args):
    named = {k: v for k in ("train", "valid", "test") if (v := getattr(args, k)) is not None}
    if named and args.split:
        from .errors import BadInputError

        raise BadInputError("give --train/--valid/--test dates or --split fractions, not both")
    return named or (tuple(args.split) if args.split else None)


def add_train(sub, common):
    p = _command(sub, common, "train", "train a sequence model on a tensor",
                 "Train a model on a tensor file (from `fintensor build`): features are computed from it "
                 "(--features, default alpha158) and labelled with its forward returns (--horizon, --lag) "
                 "unless --labels is given. Writes DIR/checkpoint.safetensors and DIR/metrics.csv. Several "
                 "GPUs: torchrun --nproc_per_node=N -m fintensor.cli train ...",
                 "fintensor train us.safetensors --out run --model gru --epochs 10 --split 0.6 0.2 0.2",
                 "fintensor train us.safetensors --out run --train 2013-01-01 2015-12-31 "
                 "--valid 2016-01-01 2016-06-30 --test 2016-07-01 2017-12-01",
                 usage="fintensor train DATA --out DIR [--model M] [--epochs N] [segments] [options]")
    p.add_argument("data", help="a tensor file (time, stock, feature)")
    p.add_argument("--out", required=True, metavar="DIR", help="run directory (checkpoint, metrics.csv)")
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.safetensors")
    p.add_argument("--model", default="lstm", help="linear, mlp, lstm (default), gru, alstm, transformer, tcn")
    p.add_argument("--epochs", type=int, default=20, help="(default 20)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--seed", type=int, default=0, help="(default 0; a CPU run is bit-reproducible)")
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="train under Ray Train (DDP): a local cluster, or ADDRESS ('auto': the running one)")
    p.add_argument("--ray-workers", type=int, default=2, metavar="N", help="Ray Train worker processes (default 2)")
    g = p.add_argument_group("segments (inclusive dates; default --split 0.6 0.2 0.2)")
    for name in ("train", "valid", "test"):
        g.add_argument(f"--{name}", nargs=2, metavar=("START", "END"))
    g.add_argument("--split", nargs="+", type=float, metavar="FRACTION")
    _compact(p, "data",
             ("--labels", dict(shown="--labels FILE")),
             ("--features", dict(default="alpha158", shown="--features alpha158|alpha360|none")),
             ("--horizon", dict(type=int, default=1, shown="--horizon N")),
             ("--lag", dict(type=int, default=1, shown="--lag N")),
             ("--missing", dict(choices=("drop", "zero"), default="drop")),
             ("--cs-norm", dict(choices=("zscore", "rank", "none"), default="none")),
             ("--feature-norm", dict(choices=("zscore", "robust", "none"), default="zscore")),
             ("--label-norm", dict(choices=("zscore", "rank", "none"), default="zscore")),
             ("--clip", dict(type=float, default=3.0, shown="--clip C")),
             ("--panel-dtype", dict(choices=("float32", "bfloat16"), default="float32")))
    _compact(p, "model",
             ("--lookback", dict(type=int, default=20, shown="--lookback N")),
             ("--hidden", dict(type=int, default=64, shown="--hidden N")),
             ("--layers", dict(type=int, default=2, shown="--layers N")),
             ("--dropout", dict(type=float, default=0.0, shown="--dropout P")))
    _compact(p, "optimisation (0 turns --clip/--clip-grad off; --lr defaults by optimizer)",
             ("--batch-size", dict(type=int, default=800, shown="--batch-size B")),
             ("--batching", dict(choices=("random", "day"))),
             ("--optimizer", dict(choices=("sgd", "adam", "adamw"), default="sgd")),
             ("--lr", dict(type=float, shown="--lr LR")),
             ("--momentum", dict(type=float, default=0.9, shown="--momentum M")),
             ("--nesterov", dict(action="store_true")),
             ("--weight-decay", dict(type=float, default=0.0, shown="--weight-decay W")),
             ("--schedule", dict(choices=("cosine", "constant"), default="cosine")),
             ("--warmup-steps", dict(type=int, default=0, shown="--warmup-steps N")),
             ("--clip-grad", dict(type=float, default=1.0, shown="--clip-grad G")),
             ("--loss", dict(choices=("mse", "ic"), default="mse")),
             ("--metric", dict(choices=("ic", "rank_ic", "loss"), default="ic")),
             ("--patience", dict(type=int, default=5, shown="--patience N")),
             ("--no-bf16", dict(action="store_true")),
             ("--compile", dict(action="store_true")))


_TRAIN_FLAGS = ("horizon", "lag", "model", "lookback", "hidden", "layers", "dropout", "epochs", "batch_size",
                "batching", "optimizer", "lr", "momentum", "nesterov", "weight_decay", "schedule", "warmup_steps",
                "loss", "metric", "patience", "missing", "device", "compile", "seed", "resume", "panel_dtype")


def cmd_train(args) -> int:
    import os
    import re

    from .config import TrainConfig
    from .errors import BadInputError
    from .trainer import train

    def unless_none(value):
        return None if value in ("none", 0) else value

    master = int(os.environ.get("RANK", 0)) == 0  # under torchrun only rank 0 prints
    options = dict(out=args.out, segments=_segments(args), cs_norm=unless_none(args.cs_norm),
                   feature_norm=unless_none(args.feature_norm), label_norm=unless_none(args.label_norm),
                   clip=unless_none(args.clip), clip_grad=unless_none(args.clip_grad), bf16=not args.no_bf16,
                   progress=master and not (args.quiet or args.json), **{k: getattr(args, k) for k in _TRAIN_FLAGS})
    try:  # every setting is checked before DATA is read; a message names the flag, not the Python keyword
        config = TrainConfig(**options)
    except BadInputError as exc:
        flag = re.match(r"(?:unknown )?(\w+)", str(exc))[1]
        raise BadInputError(str(exc).replace(flag, "--" + flag.replace("_", "-"), 1)
                            if flag in options else str(exc)) from None
    features, labels = _training_inputs(args, args.features)
    if args.ray is not None:
        return _train_on_ray(args, features, labels, config)
    result = train(features, labels, config)
    if master:
        payload = {"checkpoint": str(result.checkpoint), "best_epoch": result.best_epoch,
                   "epochs": len(result.history), "metrics": result.metrics}
        lines = [f"{seg}: " + "  ".join(f"{k} {v:.4f}" for k, v in m.items() if k != "days")
                 for seg, m in result.metrics.items()]
        _emit(args, payload, "\n".join([f"best epoch {result.best_epoch} of {len(result.history)}", *lines,
                                        f"checkpoint: {result.checkpoint}"]))
    return EXIT_OK


def _train_on_ray(args, features, labels, config) -> int:
    """`train --ray`: the same training function in Ray Train's TorchTrainer (fintensor.cluster.train)."""
    from . import checks
    from .cluster import train as train_on_ray

    workers = checks.positive_int("--ray-workers", args.ray_workers)
    checkpoint = train_on_ray(features, labels, config, num_workers=workers,
                              use_gpu=str(args.device).startswith("cuda"),
                              address=None if args.ray == "local" else args.ray)
    info = checkpoint.info
    state, history = info.get("state") or {}, info.get("history") or []
    payload = {"checkpoint": str(checkpoint.path), "best_epoch": state.get("best_epoch"), "epochs": len(history),
               "world_size": info.get("world_size"), "history": history}
    _emit(args, payload, f"Ray Train, {info.get('world_size')} workers: best epoch {state.get('best_epoch')} of "
                         f"{len(history)}\ncheckpoint: {checkpoint.path}")
    return EXIT_OK


def add_predict(sub, common):
    p = _command(sub, common, "predict", "score a tensor with a trained model",
                 "Score every (time, stock) of DATA that has a full window with the model in CHECKPOINT (its "
                 "features are recomputed from DATA the way it was trained).",
                 "fintensor predict run/checkpoint.safetensors us.safetensors --out pred.safetensors")
    p.add_argument("checkpoint", help="a checkpoint file or run directory")
    p.add_argument("data", help="a tensor file like the one the model was trained on")
    p.add_argument("--out", required=True, metavar="FILE", help="write the (time, stock) scores here")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")


def cmd_predict(args) -> int:
    from .fileio import check_output_path
    from .tensor import load
    from .trainer import predict

    check_output_path(args.out, "--out")
    scores = predict(args.checkpoint, load(args.data), device=args.device)
    path = scores.save(args.out)
    share = float(scores.mask.float().mean())
    _emit(args, {"path": str(path), "scored": share}, f"{scores!r}\nsaved: {path}")
    return EXIT_OK


def add_evaluate(sub, common):
    p = _command(sub, common, "evaluate", "IC, Rank IC, long-short, turnover of predictions",
                 "Per-day IC / Rank IC against the raw forward return, ICIR, long-short return of the top vs "
                 "bottom quantile (halved, like qlib), its annualised return and Sharpe, top-quantile turnover "
                 "and prediction autocorrelation. Several inputs (e.g. seeds): one column each plus mean and "
                 "std. Inputs are prediction files, or checkpoints scored on --data.",
                 "fintensor evaluate run_s0 run_s1 run_s2 --data us.safetensors",
                 usage="fintensor evaluate PRED_OR_CHECKPOINT... (--data FILE | --labels FILE) [options]")
    p.add_argument("inputs", nargs="+", metavar="PRED_OR_CHECKPOINT")
    p.add_argument("--data", metavar="FILE", help="tensor with 'close' (labels; scoring checkpoints)")
    p.add_argument("--labels", metavar="FILE", help="a (time, stock) forward-return tensor instead of --data")
    p.add_argument("--segment", choices=("train", "valid", "test", "all"),
                   help="dates to evaluate (default: the model's test segment, else all)")
    _compact(p, "options",
             ("--start", dict(shown="--start DATE")), ("--end", dict(shown="--end DATE")),
             ("--quantile", dict(type=float, default=0.2, shown="--quantile Q")),
             ("--periods-per-year", dict(type=float, default=252, shown="--periods-per-year N")),
             ("--device", dict(default="auto", shown="--device D")))


def _scores(path: str, args):
    """A prediction tensor from a prediction file, or from a checkpoint (or run directory) scored on --data."""
    from .errors import BadInputError
    from .tensor import load
    from .trainer import is_checkpoint, predict

    if not is_checkpoint(path):
        return load(path)
    if not args.data:
        raise BadInputError(f"{path} is a checkpoint: pass --data FILE to score it")
    return predict(path, load(args.data), device=args.device)


def cmd_evaluate(args) -> int:
    from . import features as ft_features
    from .errors import BadInputError
    from .metrics import evaluate, summarize
    from .tensor import load

    if not (args.data or args.labels):
        raise BadInputError("pass --data FILE (labels from its close) or --labels FILE")
    preds = [_scores(path, args) for path in args.inputs]
    if args.labels:
        labels = load(args.labels)
    else:
        label = preds[0].meta.get("label") or {}
        if not label:
            raise BadInputError(f"{args.inputs[0]} does not say its label horizon; pass --labels FILE")
        labels = ft_features.forward_returns(load(args.data).sel(feature="close"), horizon=label["horizon"],
                                             lag=label["lag"])
    reports = [evaluate(p, labels, quantile=args.quantile, periods_per_year=args.periods_per_year,
                        start=args.start, end=args.end, segment=args.segment or "auto") for p in preds]
    segment, start, end = (reports[0].meta[k] for k in ("segment", "start", "end"))
    names = [str(x) for x in args.inputs]
    table = summarize(reports, names)
    if len(reports) > 1:
        shown = table[names].apply(lambda col: [_number(k, v) for k, v in col.items()])
        shown["mean +- std"] = [f"{_number(k, m)} +- {_number(k, s)}"
                                for k, m, s in zip(table.index, table["mean"], table["std"])]
        text = "\n".join([shown.to_string(), *dict.fromkeys(n for r in reports for n in r.notes)])
    else:
        text = reports[0].table()
    runs = {name: {k: (int(v) if k == "days" and v == v else v) for k, v in column.items()}
            for name, column in table.to_dict().items()}
    _emit(args, {"segment": segment, "start": start, "end": end, "runs": runs,
                 "notes": list(dict.fromkeys(n for r in reports for n in r.notes))},
          f"{segment} {start or ''} .. {end or ''}\n{text}")
    return EXIT_OK


def _number(key: str, value: float) -> str:
    """A metric as the table shows it: ``days`` (a count) as an integer, the rest with 4 decimals."""
    if key == "days" and value == value and float(value).is_integer():
        return str(int(value))
    return f"{value:.4f}"


COMMANDS.extend([(add_train, cmd_train), (add_predict, cmd_predict), (add_evaluate, cmd_evaluate)])
# ============================================================== end section: train, predict, evaluate

# ================================================================================= section: demo
def add_demo(sub, common):
    import copy

    common = copy.deepcopy(common)  # the same common flags; only --store's default differs
    next(a for a in common._actions if a.dest == "store").help = \
        "store directory (default: DIR/store inside --out; your own store only when you name it)"
    p = _command(sub, common, "demo", "run the whole pipeline offline: store, tensors, features, LSTM, IC",
                 "The whole pipeline in about a minute, offline: a synthetic market with a planted signal (or "
                 "your CSV files) -> store -> 0D..4D tensors -> rolling features -> windows -> a small LSTM -> "
                 "IC / Rank IC / long-short, with a timing per stage and five PNG figures in --out. Exit 0 only "
                 "when every stage succeeded.",
                 "fintensor demo",
                 "fintensor demo --from ../shared/data/cn_daily/baostock_qfq/panel_2018-01_2020-08 "
                 "--from ../shared/data/cn_intraday_tick/hikyuu --out demo_cn")
    p.add_argument("--from", dest="sources", action="append", metavar="PATH",
                   help="a folder (or file) of daily CSV bars instead of the synthetic market; repeat it to "
                        "add tick files for the 4D stage (default: synthetic ticks)")
    p.add_argument("--out", default="demo_out", metavar="DIR",
                   help="figures, the model run and (unless --store) the store (default demo_out)")
    p.add_argument("--seed", type=int, default=0, help="of the synthetic market and of training (default 0)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default 5)")
    p.add_argument("--device", default="auto", help="auto (default; a GPU when there is one), cpu, cuda or cuda:N")
    p.add_argument("--quick", action="store_true", help="a smaller market and model (for tests)")


def cmd_demo(args) -> int:
    from .demo import EPOCHS, run

    silent = args.quiet or args.json
    result = run(args.sources, out=args.out, store=args.store, seed=args.seed,
                 epochs=EPOCHS if args.epochs is None else args.epochs, device=args.device, quick=args.quick,
                 say=None if silent else (lambda text: print(text, flush=True)))
    _emit(args, result.to_dict())
    if not result.ok:
        failed = result.stages[-1]
        if args.debug and result.traceback:
            print(result.traceback, file=sys.stderr, end="")
        print(f"error: the demo failed in stage '{failed.name}': {failed.error}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


COMMANDS.extend([(add_demo, cmd_demo)])
# ============================================================================= end section: demo


# ------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("common options")
    g.add_argument("--store", metavar="PATH", default=None,
                   help="store directory (default: $FINTENSOR_HOME or the user cache dir)")
    g.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors")
    g.add_argument("--json", action="store_true", help="machine-readable output")
    g.add_argument("--debug", action="store_true", help="show tracebacks")
    parser = argparse.ArgumentParser(
        prog="fintensor", formatter_class=_Formatter,
        description="Market data as labeled 0D-4D tensors: download or import into a Parquet store, build tensors,\n"
                    "compute rolling features, train sequence models. `fintensor COMMAND --help` for more.\n\n"
                    "exit codes: 0 ok, 1 failure or partial failure, 2 bad input",
        epilog="examples:\n"
               "  fintensor demo                                      # the whole pipeline, offline\n"
               "  fintensor import ../shared/data/us_daily/sp500_5yr_yahoo --store ./store\n"
               "  fintensor build datasets/us_daily_panel.toml --store ./store --out us.safetensors\n"
               "  fintensor train us.safetensors --out run --model lstm --epochs 5\n"
               "  fintensor evaluate run --data us.safetensors",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"fintensor {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add, run in COMMANDS:
        add(sub, common)
        sub.choices[add.__name__.removeprefix("add_")].set_defaults(func=run)
    return parser


@contextlib.contextmanager
def _no_wrap_unless_terminal():
    """Output to a pipe or file is never wrapped: rich (progress lines, tables) and shutil size a non-terminal
    as 80 columns and would break longer lines there. COLUMNS is what both read; a user's value is kept,
    and the environment is restored afterwards (main() may be called in-process, e.g. by tests)."""
    import os

    if sys.stdout.isatty() or "COLUMNS" in os.environ:
        yield
        return
    os.environ["COLUMNS"] = "10000"
    try:
        yield
    finally:
        os.environ.pop("COLUMNS", None)


def main(argv: Sequence[str] | None = None) -> int:
    """The console script: parse, run the command, map errors to one line and an exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    with _no_wrap_unless_terminal():
        return _run(argv)


def _run(argv: list[str]) -> int:
    from .errors import FintensorError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed usage; bad usage is bad input
        return EXIT_OK if exc.code in (0, None) else EXIT_BAD_INPUT
    try:
        return int(args.func(args) or 0)
    except FintensorError as exc:
        if getattr(args, "debug", False):
            import traceback

            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
