"""The `fintensor` command: a thin layer over the Python API.

Each subcommand is an ``add_<name>(subparsers, common)`` that declares its flags and a ``cmd_<name>(args)``
that calls the API and prints. Exit codes: 0 ok, 1 failure or partial failure, 2 bad input.
User errors print one line (``error: ...``); ``--debug`` adds the traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2
COMMANDS: list[str] = []  # each section below appends the subcommands it defines, in help order


# ------------------------------------------------------------------------------------------ helpers
def _store(args):
    from .store import Store

    return Store(args.store)


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

    p = sub.add_parser(
        "download", parents=[common], help="download bars from Yahoo Finance into the store",
        description="Download daily or intraday bars from Yahoo Finance (through yfinance). Only what the "
                    "store lacks is requested; a second run of the same command requests nothing. Each "
                    "symbol is reported ok, not found, rate-limited or failed; good symbols are stored "
                    "whatever happens to the others (exit 1 if any failed).\n\n"
                    "example: fintensor download AAPL MSFT 600519.SS --start 2024-01-01 --end 2024-06-30\n"
                    "example: fintensor download SPY --interval 5m",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("symbols", nargs="+", metavar="SYMBOL",
                   help="tickers in any common spelling: AAPL, BRK.B, 600519.SH, sh.600519, 000001.XSHE")
    p.add_argument("--start", help="first session date, YYYY-MM-DD (default: full history / what is missing)")
    p.add_argument("--end", help="last session date, inclusive (default: now)")
    p.add_argument("--interval", default="1d", help=f"bar size: {', '.join(INTERVALS)} (default 1d)")
    p.add_argument("--retries", type=int, default=5, help="retries per request on rate limits and network "
                                                         "errors, with exponential backoff (default 5)")
    p.add_argument("--max-wait", type=float, default=120.0,
                   help="seconds of backoff waiting allowed in all (default 120)")
    p.add_argument("--workers", type=int, default=4, help="symbols fetched at once (default 4)")
    p.add_argument("--on-conflict", default="error",
                   help="when rows disagree with the store: error (default), keep (stored wins) or overwrite")


def cmd_download(args) -> int:
    from .sources.yahoo import download

    report = download(args.symbols, args.start, args.end, args.interval, store=_store(args),
                      retries=args.retries, max_wait=args.max_wait, workers=args.workers,
                      on_conflict=args.on_conflict, quiet=args.quiet or args.json)
    _emit(args, report.to_dict(), report.table())
    report.raise_for_status()  # exit 1 when any symbol failed, 2 when Yahoo knows none of them
    return EXIT_OK


COMMANDS.append("download")


def add_import(sub, common):
    p = sub.add_parser(
        "import", parents=[common], help="import CSV/zip/gz files of bars or ticks into the store",
        description="Import vendor files (Yahoo, tushare, baostock, hikyuu, LEAN/AlgoSeek, zipline, Quandl, "
                    "mplfinance, backtrader, or any CSV with a date and close/price column). The format, "
                    "symbol, units and timezone are detected from the header and file name; the options "
                    "override them. All files are checked before anything is written.\n\n"
                    "example: fintensor import AAPL.csv data/*.csv.gz --store ./store\n"
                    "example: fintensor import minute/spy/*_trade.zip --format lean_minute",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="PATH", help="files, directories or glob patterns")
    p.add_argument("--symbol", help="the symbol of one-symbol files without a symbol column")
    p.add_argument("--format", help="vendor preset instead of auto-detection: yahoo, yfinance, tushare, baostock, "
                                    "hikyuu_ticks, hikyuu_1min, lean_daily, lean_minute, lean_tick, lean_quote_tick, "
                                    "zipline, quandl, mplfinance_intraday, backtrader, csv")
    p.add_argument("--layout", default="auto",
                   help="auto, long (a symbol column), wide (one column per symbol) or file (one symbol per file)")
    p.add_argument("--field", default="close", help="the field a wide file holds (default close)")
    p.add_argument("--ticks", action="store_true", help="the rows are ticks (trades), not bars")
    p.add_argument("--interval", help="bar interval (1d, 1m, 5m, ...) when it cannot be inferred")
    p.add_argument("--tz", help="timezone of naive intraday times, e.g. America/New_York")
    p.add_argument("--volume-unit", help="shares, lots (100 shares) or shares per unit")
    p.add_argument("--amount-unit", help="currency, thousands or currency units per unit")
    p.add_argument("--price-scale", help="divide prices by this (e.g. 10000 for deci-cents)")
    p.add_argument("--adjustment", help="raw, split or full: the adjustment of the OHLC columns")
    p.add_argument("--adjusted-as-of", help="the date adjusted prices refer to (YYYY-MM-DD)")
    p.add_argument("--source", help="source label recorded in the manifest")
    p.add_argument("--on-conflict", default="error",
                   help="when rows disagree with the store: error (default), keep (stored wins) or overwrite")


def cmd_import(args) -> int:
    from .sources.files import import_csv

    report = import_csv(
        args.paths, store=_store(args), symbol=args.symbol, layout=args.layout, kind="ticks" if args.ticks
        else "auto", interval=args.interval, format=args.format, timezone=args.tz, volume_unit=args.volume_unit,
        price_scale=args.price_scale, amount_unit=args.amount_unit, adjustment=args.adjustment,
        adjusted_as_of=args.adjusted_as_of, source=args.source, field=args.field, on_conflict=args.on_conflict)
    _emit(args, report.to_dict(), f"{report}\nstore: {report.store}")
    return EXIT_OK


COMMANDS.append("import")
# ================================================================= end section: download, import

# -------------------------------------------------------------------------------------------- cache
def add_cache(sub, common):
    p = sub.add_parser("cache", help="inspect and maintain the local store",
                       description="What is cached, checks of every file, removal. Exit 1 when verify finds "
                                   "a problem, 2 on bad input.\n\n"
                                   "example: fintensor cache list --store ./store\n"
                                   "example: fintensor cache verify --repair",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    csub = p.add_subparsers(dest="cache_cmd", metavar="{list,info,verify,rm}", required=True)
    csub.add_parser("list", parents=[common], help="symbols, intervals, ranges, rows, sources")
    q = csub.add_parser("info", parents=[common], help="every manifest stored for a symbol")
    q.add_argument("symbol")
    q = csub.add_parser("verify", parents=[common], help="check sizes, checksums and schemas of every file")
    q.add_argument("--repair", action="store_true", help="remove leftovers of interrupted writes")
    q = csub.add_parser("rm", parents=[common], help="remove a symbol (all intervals unless --interval)")
    q.add_argument("symbol")
    q.add_argument("--interval", default=None, help="only this interval ('tick' for ticks)")


def cmd_cache(args) -> int:
    store = _store(args)
    if args.cache_cmd == "list":
        rows = store.list()
        _emit(args, rows, _table(rows, ["symbol", "interval", "start", "end", "rows", "source", "adjustment"])
              + f"\nstore: {store.root}")
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
            if leftovers < len(bad):
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
    if args.cache_cmd == "rm":
        n = store.remove(args.symbol, args.interval)
        _emit(args, {"removed": n}, f"removed {n} partition(s) of {args.symbol}")
        return EXIT_OK
    raise AssertionError(args.cache_cmd)


COMMANDS.append("cache")


# ========================================================================= section: build, show (tensors)
def add_build(sub, common):
    p = sub.add_parser(
        "build", parents=[common], help="build a tensor from a recipe or flags",
        description="Build a (time, stock, feature) tensor, or (day, tick, stock, feature) with --freq, from\n"
                    "the store; a recipe's [source] (or --yahoo) imports or downloads what the store lacks.\n"
                    "Without --out the tensor stays in the store's tensor cache (its path is printed).\n\n"
                    "examples:\n  fintensor build datasets/story.toml --out story.safetensors\n"
                    "  fintensor build --symbols AAPL MSFT --start 2015-01-01 --end 2016-12-31 "
                    "--fields close volume --out us.safetensors",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", nargs="?", help="a recipe file (datasets/*.toml)")
    p.add_argument("--out", metavar="FILE", help="write the tensor here (safetensors)")
    p.add_argument("--no-cache", action="store_true", help="build afresh; do not read or write the tensor cache")
    g = p.add_argument_group("without a recipe")
    g.add_argument("--symbols", nargs="+", metavar="SYMBOL")
    g.add_argument("--start", metavar="DATE")
    g.add_argument("--end", metavar="DATE")
    g.add_argument("--fields", nargs="+", metavar="FIELD", help="default: close (daily), price volume (ticks)")
    g.add_argument("--interval", help="1d (default), 1m, ...; with --freq: tick or 1m")
    g.add_argument("--freq", help="tick slot length (3s, 1min): builds (day, tick, stock, feature)")
    g.add_argument("--adjust", choices=("raw", "split", "full"))
    g.add_argument("--calendar", help="XNYS, XSHG, ... or union (default: the symbols' own)")
    g.add_argument("--fill", choices=("ffill",), help="carry prices over untraded sessions (mask stays False)")
    g.add_argument("--fill-limit", type=int, metavar="N", help="at most N sessions")
    g.add_argument("--dtype", choices=("float32", "float64"))
    g.add_argument("--yahoo", action="store_true", help="download what the store lacks from Yahoo")


_BUILD_FLAGS = ("symbols", "start", "end", "fields", "interval", "freq", "adjust", "calendar", "fill",
                "fill_limit", "dtype")


def cmd_build(args) -> int:
    from pathlib import Path

    from .errors import BadInputError
    from .recipes import Recipe, load_recipe

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
    if args.no_cache and args.out is None:
        raise BadInputError("--no-cache without --out would keep nothing; pass --out FILE")
    tensor = recipe.build(_store(args), cache=not args.no_cache, quiet=args.quiet or args.json)
    path = str(tensor.save(args.out)) if args.out else tensor.meta.get("cache")
    _emit(args, {**tensor.summary(), "path": path}, f"{tensor!r}\nsaved: {path}")
    return EXIT_OK


def add_show(sub, common):
    p = sub.add_parser("show", parents=[common], help="summary and a small preview of a saved tensor",
                       description="Print dims, shape, coordinate ranges, dtype, observed share, meta and the\n"
                                   "first and last rows (the file is memory-mapped, never read whole).\n\n"
                                   "example: fintensor show story.safetensors",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="a tensor written by fintensor build --out or StockTensor.save")
    p.add_argument("--rows", type=int, default=5, metavar="N", help="rows shown at each end (default 5)")


def cmd_show(args) -> int:
    from .tensor import load

    tensor = load(args.file, mmap=True)
    _emit(args, tensor.summary(), f"{tensor!r}\n\n{tensor.preview(args.rows)}")
    return EXIT_OK


COMMANDS.extend(["build", "show"])
# ====================================================================== end section: build, show

# ================================================================ section: train, predict, evaluate
def _training_inputs(args, spec: str):
    """(features, labels) for the CLI: features computed from DATA with ``spec`` (or DATA itself for
    "none"); labels from --labels, else DATA's close as forward returns (--horizon, --lag)."""
    from . import features as ft_features
    from .errors import BadInputError
    from .tensor import StockTensor, load

    data = load(args.data)
    feats = data if spec == "none" else ft_features.compute(data, spec)
    feats = StockTensor(feats.values, feats.dims, feats.coords, feats.mask, {**feats.meta, "feature_spec": spec})
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
    p = sub.add_parser(
        "train", parents=[common], help="train a sequence model on a tensor",
        description="Train a model on a tensor file (from `fintensor build`): features are computed from it\n"
                    "(--features, default alpha158) and labelled with its forward returns (--horizon, --lag)\n"
                    "unless --labels is given. Writes DIR/checkpoint.safetensors and DIR/metrics.csv.\n"
                    "Several GPUs: torchrun --nproc_per_node=N -m fintensor.cli train ...\n\n"
                    "example: fintensor train us.safetensors --out run --model lstm --lookback 20 "
                    "--train 2013-01-01 2015-12-31 --valid 2016-01-01 2016-06-30 --test 2016-07-01 2017-12-01",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="a tensor file (time, stock, feature)")
    p.add_argument("--out", required=True, metavar="DIR", help="run directory (checkpoint, metrics.csv)")
    p.add_argument("--labels", metavar="FILE", help="a (time, stock) label tensor (default: forward returns)")
    p.add_argument("--features", default="alpha158", metavar="SPEC",
                   help="alpha158 (default), alpha360, or none (DATA already holds the features)")
    p.add_argument("--horizon", type=int, default=1, help="label: return over this many steps (default 1)")
    p.add_argument("--lag", type=int, default=1, help="label: starting this many steps after t (default 1)")
    g = p.add_argument_group("segments (inclusive dates; default --split 0.6 0.2 0.2)")
    for name in ("train", "valid", "test"):
        g.add_argument(f"--{name}", nargs=2, metavar=("START", "END"))
    g.add_argument("--split", nargs="+", type=float, metavar="FRACTION")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="lstm", help="linear, mlp, lstm (default), gru, alstm, transformer, tcn")
    g.add_argument("--lookback", type=int, default=20)
    g.add_argument("--hidden", type=int, default=64)
    g.add_argument("--layers", type=int, default=2)
    g.add_argument("--dropout", type=float, default=0.0)
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=20)
    g.add_argument("--batch-size", type=int, default=800)
    g.add_argument("--batching", choices=("random", "day"))
    g.add_argument("--optimizer", choices=("sgd", "adam", "adamw"), default="sgd")
    g.add_argument("--lr", type=float)
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--nesterov", action="store_true")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--schedule", choices=("cosine", "constant"), default="cosine")
    g.add_argument("--warmup-steps", type=int, default=0)
    g.add_argument("--clip-grad", type=float, default=1.0, help="max gradient norm (0: no clipping)")
    g.add_argument("--loss", choices=("mse", "ic"), default="mse")
    g.add_argument("--metric", choices=("ic", "rank_ic", "loss"), default="ic", help="early stopping metric")
    g.add_argument("--patience", type=int, default=5)
    g = p.add_argument_group("normalisation and missing values")
    g.add_argument("--missing", choices=("drop", "zero"), default="drop")
    g.add_argument("--cs-norm", choices=("zscore", "rank", "none"), default="none")
    g.add_argument("--feature-norm", choices=("zscore", "robust", "none"), default="zscore")
    g.add_argument("--label-norm", choices=("zscore", "rank", "none"), default="zscore")
    g.add_argument("--clip", type=float, default=3.0, help="clip normalised features to +-CLIP (0: no clip)")
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    g.add_argument("--no-bf16", action="store_true", help="no bf16 autocast on GPU")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.safetensors")


_TRAIN_FLAGS = ("horizon", "lag", "model", "lookback", "hidden", "layers", "dropout", "epochs", "batch_size",
                "batching", "optimizer", "lr", "momentum", "nesterov", "weight_decay", "schedule", "warmup_steps",
                "loss", "metric", "patience", "missing", "device", "compile", "seed", "resume")


def cmd_train(args) -> int:
    import os

    from .trainer import train

    def unless_none(value):
        return None if value in ("none", 0) else value

    features, labels = _training_inputs(args, args.features)
    master = int(os.environ.get("RANK", 0)) == 0  # under torchrun only rank 0 prints
    result = train(features, labels, out=args.out, segments=_segments(args),
                   cs_norm=unless_none(args.cs_norm), feature_norm=unless_none(args.feature_norm),
                   label_norm=unless_none(args.label_norm), clip=unless_none(args.clip),
                   clip_grad=unless_none(args.clip_grad), bf16=not args.no_bf16,
                   progress=master and not (args.quiet or args.json), **{k: getattr(args, k) for k in _TRAIN_FLAGS})
    if master:
        payload = {"checkpoint": str(result.checkpoint), "best_epoch": result.best_epoch,
                   "epochs": len(result.history), "metrics": result.metrics}
        lines = [f"{seg}: " + "  ".join(f"{k} {v:.4f}" for k, v in m.items() if k != "days")
                 for seg, m in result.metrics.items()]
        _emit(args, payload, "\n".join([f"best epoch {result.best_epoch} of {len(result.history)}", *lines,
                                        f"checkpoint: {result.checkpoint}"]))
    return EXIT_OK


def add_predict(sub, common):
    p = sub.add_parser("predict", parents=[common], help="score a tensor with a trained model",
                       description="Score every (time, stock) of DATA that has a full window with the model in\n"
                                   "CHECKPOINT (its features are recomputed from DATA the way it was trained).\n\n"
                                   "example: fintensor predict run/checkpoint.safetensors us.safetensors "
                                   "--out pred.safetensors",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a checkpoint file or run directory")
    p.add_argument("data", help="a tensor file like the one the model was trained on")
    p.add_argument("--out", required=True, metavar="FILE", help="write the (time, stock) scores here")
    p.add_argument("--device", default="auto")


def _features_for(checkpoint: str, data_path: str):
    from . import features as ft_features
    from .tensor import load
    from .trainer import read_checkpoint

    ckpt = read_checkpoint(checkpoint)
    spec = ckpt.info.get("features_meta", {}).get("feature_spec", "none")
    data = load(data_path)
    return ckpt, (data if spec == "none" else ft_features.compute(data, spec))


def cmd_predict(args) -> int:
    from .trainer import predict

    ckpt, features = _features_for(args.checkpoint, args.data)
    scores = predict(ckpt.path, features, device=args.device)
    path = scores.save(args.out)
    share = float(scores.mask.float().mean())
    _emit(args, {"path": str(path), "scored": share}, f"{scores!r}\nsaved: {path}")
    return EXIT_OK


def add_evaluate(sub, common):
    p = sub.add_parser(
        "evaluate", parents=[common], help="IC, Rank IC, long-short, turnover of predictions",
        description="Per-day IC / Rank IC against the raw forward return, ICIR, long-short return of the top\n"
                    "vs bottom quantile (halved, like qlib), its annualised return and Sharpe, top-quantile\n"
                    "turnover and prediction autocorrelation. Several inputs (e.g. seeds): one column each\n"
                    "plus mean and std. Inputs are prediction files or checkpoints (scored on --data).\n\n"
                    "example: fintensor evaluate run_s0 run_s1 run_s2 --data us.safetensors",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="PRED_OR_CHECKPOINT")
    p.add_argument("--data", metavar="FILE", help="tensor with 'close' (labels; scoring checkpoints)")
    p.add_argument("--labels", metavar="FILE", help="a (time, stock) forward-return tensor instead of --data")
    p.add_argument("--segment", choices=("train", "valid", "test", "all"),
                   help="dates to evaluate (default: the model's test segment, else all)")
    p.add_argument("--start", metavar="DATE")
    p.add_argument("--end", metavar="DATE")
    p.add_argument("--quantile", type=float, default=0.2)
    p.add_argument("--periods-per-year", type=float, default=252)
    p.add_argument("--device", default="auto")


def _scores(path: str, args):
    """A prediction tensor from a prediction file, or from a checkpoint scored on --data."""
    from pathlib import Path

    from .errors import BadInputError
    from .tensor import load
    from .trainer import CHECKPOINT, FORMAT, predict

    p = Path(path)
    target = p / CHECKPOINT if p.is_dir() else p
    fmt = None
    if target.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(target), framework="pt") as fh:
                fmt = (fh.metadata() or {}).get("format")
        except Exception:  # not safetensors at all: let load() name the problem
            fmt = None
    if fmt != FORMAT:
        return load(target)
    if not args.data:
        raise BadInputError(f"{path} is a checkpoint: pass --data FILE to score it")
    ckpt, features = _features_for(str(target), args.data)
    return predict(ckpt.path, features, device=args.device)


def cmd_evaluate(args) -> int:
    from . import features as ft_features
    from .errors import BadInputError
    from .metrics import evaluate, summarize
    from .tensor import load

    if not (args.data or args.labels):
        raise BadInputError("pass --data FILE (labels from its close) or --labels FILE")
    preds = [_scores(path, args) for path in args.inputs]
    meta = preds[0].meta
    if args.labels:
        labels = load(args.labels)
    else:
        label = meta.get("label") or {}
        if not label:
            raise BadInputError(f"{args.inputs[0]} does not say its label horizon; pass --labels FILE")
        labels = ft_features.forward_returns(load(args.data).sel(feature="close"), horizon=label["horizon"],
                                             lag=label["lag"])
    segment = args.segment or ("test" if "test" in (meta.get("segments") or {}) else "all")
    start, end = (None, None) if segment == "all" else (meta.get("segments") or {}).get(segment, (None, None))
    if segment != "all" and start is None:
        raise BadInputError(f"{args.inputs[0]} has no {segment!r} segment; use --segment all or --start/--end")
    start, end = args.start or start, args.end or end
    reports = [evaluate(p, labels, quantile=args.quantile, periods_per_year=args.periods_per_year,
                        start=start, end=end) for p in preds]
    names = [str(x) for x in args.inputs]
    table = summarize(reports, names)
    if len(reports) > 1:
        shown = table[names].map(lambda v: f"{v:.4f}")
        shown["mean +- std"] = [f"{m:.4f} +- {s:.4f}" for m, s in zip(table["mean"], table["std"])]
        text = shown.to_string()
    else:
        text = reports[0].table()
    _emit(args, {"segment": segment, "start": start, "end": end, "runs": table.to_dict()},
          f"{segment} {start or ''} .. {end or ''}\n{text}")
    return EXIT_OK


COMMANDS.extend(["train", "predict", "evaluate"])
# ============================================================== end section: train, predict, evaluate

# ================================================================================= section: demo
def add_demo(sub, common):
    p = sub.add_parser(
        "demo", parents=[common], help="run the whole pipeline offline: store, tensors, features, LSTM, IC",
        description="The whole pipeline in about a minute, offline: a synthetic market with a planted signal "
                    "(or your CSV files) -> store -> 0D..4D tensors -> rolling features -> windows -> a small "
                    "LSTM -> IC / Rank IC / long-short, with a timing per stage and five PNG figures in --out. "
                    "Exit 0 only when every stage succeeded.\n\n"
                    "example: fintensor demo\n"
                    "example: fintensor demo --from ../shared/data/cn_daily/baostock_qfq/panel_2018-01_2020-08 "
                    "--from ../shared/data/cn_intraday_tick/hikyuu --out demo_cn",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="sources", action="append", metavar="PATH",
                   help="a folder (or file) of daily CSV bars instead of the synthetic market; repeat it to add "
                        "tick files for the 4D stage (default: synthetic ticks)")
    p.add_argument("--out", default="demo_out", metavar="DIR", help="where the figures, the model run and "
                                                                    "(unless --store) the store go (default demo_out)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic market and of training (default 0)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default 5)")
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N")
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


COMMANDS.append("demo")
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
        prog="fintensor",
        description="Market data as labeled 0D-4D tensors: download or import into a Parquet store, build "
                    "tensors, compute rolling features, train sequence models.\n\n"
                    "exit codes: 0 ok, 1 failure or partial failure, 2 bad input",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: fintensor demo --out demo_out",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"fintensor {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        globals()[f"add_{name}"](sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .errors import FintensorError

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed usage; bad usage is bad input
        return EXIT_OK if exc.code in (0, None) else EXIT_BAD_INPUT
    name = args.command
    try:
        return int(globals()[f"cmd_{name}"](args) or 0)
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
