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
# ================================================================= end section: download, import

# -------------------------------------------------------------------------------------------- cache
def add_cache(sub, common):
    p = sub.add_parser("cache", help="inspect and maintain the local store",
                       description="What is cached, checks of every file, removal.\n\n"
                                   "example: fintensor cache list --store ./store",
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
                         f"{m['adjustment']}, tz {m['timezone']}, units {m['units']}, updated {m['updated']}, "
                         f"{len(m['parts'])} part(s), checksum {m['checksum'][:12]}")
        _emit(args, mans, "\n".join(lines))
        return EXIT_OK
    if args.cache_cmd == "verify":
        problems = store.verify(repair=args.repair)
        bad = [p for p in problems if not p.repaired]
        _emit(args, [vars(p) for p in problems],
              "\n".join(str(p) for p in problems) + ("\n" if problems else "")
              + (f"{len(bad)} problem(s) in {store.root}" if bad else f"store {store.root} is consistent"))
        if bad and not getattr(args, "quiet", False) and not args.json:
            print(f"{len(bad)} problem(s) found", file=sys.stderr)
        return EXIT_FAILURE if bad else EXIT_OK
    if args.cache_cmd == "rm":
        n = store.remove(args.symbol, args.interval)
        _emit(args, {"removed": n}, f"removed {n} partition(s) of {args.symbol}")
        return EXIT_OK
    raise AssertionError(args.cache_cmd)


COMMANDS.append("cache")


# ========================================================================= section: build, show (tensors)
# ====================================================================== end section: build, show

# ================================================================ section: train, predict, evaluate
# ============================================================== end section: train, predict, evaluate

# ================================================================================= section: demo
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
