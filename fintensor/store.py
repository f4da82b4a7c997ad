"""The Parquet store: a hive-partitioned cache of bars and ticks that DuckDB, Polars and Spark read directly.

Layout (``root`` = ``$FINTENSOR_HOME`` or the platform's user cache dir)::

    bars/interval=1d/symbol=AAPL/adjust=split/part-<id>.parquet   daily bars, keyed by exchange-local session date
    bars/interval=1d/symbol=AAPL/adjust=full/part-<id>.parquet    the same symbol in another adjustment, side by side
    bars/interval=1m/symbol=AAPL/adjust=raw/part-<id>.parquet     intraday bars, keyed by UTC instant
    ticks/symbol=000001.SZ/date=2019-02-01/part-<id>.parquet
    <each partition>/_manifest.json                    source, range, rows, adjustment, tz, checksums

Bars of one symbol and interval in different adjustments (raw prices from one vendor, forward-adjusted
from another) are separate partitions and never conflict; sources of the same adjustment merge into one.
Stores of format <= 2 kept one partition per symbol and interval directly under ``symbol=X/``; such a
partition is still read (as its manifest's adjustment) and ``migrate()`` moves it under ``adjust=``.

A partition is a set of immutable part files plus the manifest that lists them. The manifest is the
commit point: new parts are written aside, fsynced and renamed in, then the manifest is replaced
atomically, then superseded parts are deleted. A crash at any moment leaves the old or the new
manifest, never a mix; files no manifest lists are leftovers that the next write (or
``verify(repair=True)``) removes. Writers hold an inter-process lock; readers need none.

Modules: ``schema`` (columns, keys, intervals), ``store_rows`` (validate, de-duplicate and merge rows),
``store_checks`` (what a manifest, the alias table and a part must pass before they are trusted; every read
runs them), ``store_verify`` (``Store.verify`` and its repair), and this one (layout, commits, reads).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import os
import shutil
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import store_remote, store_verify
from . import symbols as _symbols
from .calendars import parse_date
from .errors import (BadInputError, ConflictError, MissingDataError, StoreBusyError,
                     StoreCorruptError, StoreWriteError)
from .fileio import atomic_write_bytes, fsync_dir, sha256
from .schema import (ADJUSTMENTS, CONTENT_FORMAT, DAILY_INTERVALS, DAILY_SCHEMA, FORMAT_VERSION,
                     INTRADAY_SCHEMA, KEYS, NONNEGATIVE, SCHEMAS, TICK_SCHEMA, UTC_NS, UTC_US, interval_kind,
                     parse_interval)
from .store_checks import (ALIASES_FILE, Problem, _aliases_problem, _canonical, _check_part_metadata,
                           _check_part_rows, _in_memory_instants, _manifest_problem, manifest_bytes)
from .store_rows import _key_array, _key_json, _key_scalar, _merge_tables, conform, conform_counted

# kept importable from here until the other modules import them from fileio/schema (the lead repoints them)
_fsync_dir = fsync_dir
_sha256 = sha256
__all__ = ["Store", "WriteResult", "Problem", "conform", "local_dates", "default_root", "atomic_write_bytes",
           "ADJUSTMENTS", "DAILY_INTERVALS", "DAILY_SCHEMA", "FORMAT_VERSION", "INTRADAY_SCHEMA", "KEYS",
           "NONNEGATIVE", "SCHEMAS", "TICK_SCHEMA", "UTC_NS", "UTC_US", "interval_kind", "parse_interval"]

MAX_PARTS = 16  # an append beyond this many parts compacts the partition into one


def default_root() -> Path:
    """``$FINTENSOR_HOME`` if set, else the platform's user cache dir (platformdirs)."""
    env = os.environ.get("FINTENSOR_HOME")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("fintensor", appauthor=False))


@dataclasses.dataclass
class WriteResult:
    """What one partition write did. ``noop`` means the store was not touched at all."""

    symbol: str
    kind: str
    partition: str
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    conflicts: int = 0
    noop: bool = False
    rounded: int = 0  # instants floored to microseconds (ticks: counted on the first day a call writes)


# --------------------------------------------------------------------------------------------- files
def _table_bytes(table: pa.Table) -> bytes:
    """A part's Parquet bytes; instants are written as microseconds (what Spark and every engine reads)."""
    if "time" in table.column_names and table.schema.field("time").type != UTC_US:
        table = table.set_column(table.schema.get_field_index("time"), "time", table.column("time").cast(UTC_US))
    sink = pa.BufferOutputStream()
    # no dictionary pages: every column is numeric, where they cost time and bytes
    pq.write_table(table, sink, compression="zstd", write_page_checksum=True, row_group_size=1 << 20,
                   use_dictionary=False)
    return sink.getvalue().to_pybytes()


# -------------------------------------------------------------------------------------------- store
class Store:
    """A local Parquet cache of market data. ``Store()`` uses ``$FINTENSOR_HOME`` or the user cache dir.

    ``Store("s3://bucket/prefix")`` (any URI ``pyarrow.fs.FileSystem.from_uri`` accepts: ``gs://``, ``hdfs://``,
    ``file:///abs/path``; or a path in ``filesystem=``, a ``pyarrow.fs.FileSystem``) reads a store there,
    read-only, through a checksum-verified local mirror under the fintensor home (``root``; ``uri`` keeps the
    URI): the snapshot's manifests are copied on first use and part files when a read needs them. One
    snapshot per instance: a new ``Store(uri)`` sees what was committed remotely since. Writes are refused.
    See ``fintensor.store_remote``.
    """

    def __init__(self, root: str | os.PathLike | None = None, *, lock_timeout: float | None = None,
                 filesystem=None):
        self._remote = None
        if store_remote.is_uri(root) or (filesystem is not None and root is not None):
            self._remote = store_remote.RemoteMirror(str(root), default_root(), filesystem)
            self._root, self.uri = self._remote.root, str(root)
        else:
            self._root = Path(root).expanduser() if root is not None else default_root()
            self.uri = str(self._root)
        if self._root.exists() and not self._root.is_dir():
            raise BadInputError(f"store path {self._root} exists and is not a directory")
        self.lock_timeout = _lock_timeout() if lock_timeout is None else lock_timeout
        self._lock = None
        self._checked_manifests: dict[Path, bytes] = {}  # manifest bytes that passed their checks
        self._checked_parts: set[tuple] = set()  # (kind, sha256, manifest entry) of parts that passed theirs

    def __repr__(self) -> str:
        return f"Store({self.uri!r})"

    @property
    def root(self) -> Path:
        """The store's local folder (for a remote store, its mirror: the snapshot's metadata is fetched into
        it on first use)."""
        if self._remote is not None and not self._remote.synced:
            self._remote.sync()
        return self._root

    @property
    def remote(self) -> bool:
        """True for a store read through a URI (read-only, mirrored locally)."""
        return self._remote is not None

    def _part_file(self, pdir: Path, part: dict) -> Path:
        """The local file of a manifest's part entry (a remote store's is fetched and verified first)."""
        path = pdir / part["file"]
        if self._remote is not None:
            self._remote.ensure_part(path, part)
        return path

    # ----------------------------------------------------------------------------------- locking
    def lock(self):
        """The store's inter-process write lock (reentrant; released by the OS if the holder dies)."""
        if self._lock is None:
            from filelock import FileLock

            self._ensure_writable()
            lock_path = self.root / ".lock"
            if lock_path.is_symlink() or (lock_path.exists() and not lock_path.is_file()):
                raise StoreCorruptError(f"{lock_path} is not a regular file (a directory, link or device), so the "
                                        "store cannot be locked; remove it (it holds no data) and retry")
            self._lock = FileLock(str(lock_path), timeout=self.lock_timeout)
        return _LockContext(self._lock, self.root, self.lock_timeout)

    def _lock_if_writable(self):
        """The lock, or no lock on a store this process cannot write (then no one else of ours writes it)."""
        if self._remote is not None:  # nothing writes a remote store's mirror but this snapshot's reads
            return contextlib.nullcontext()
        return self.lock() if os.access(self.root, os.W_OK) else contextlib.nullcontext()

    def _ensure_writable(self) -> None:
        if self._remote is not None:
            raise BadInputError(
                f"the store at {self.uri} is read-only through fintensor; write to a local store and upload its "
                "committed files (`fintensor cache files` lists them) or sync the folder")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".probe-{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise BadInputError(
                f"store path {self.root} is not writable ({exc.strerror}); choose another with --store "
                "or $FINTENSOR_HOME"
            ) from None

    # ------------------------------------------------------------------------------------- paths
    def partition_dir(self, symbol: str, interval: str = "1d", date: str | dt.date | None = None,
                      kind: str | None = None, adjust: str | None = None) -> Path:
        """The folder of a partition. Bars: ``adjust=`` picks the adjustment; None means the only one
        stored (several: BadInputError naming the option); with none stored, the symbol's folder."""
        seg = _symbols.path_segment(symbol)
        if kind == "ticks":
            if date is None:
                return self.root / "ticks" / f"symbol={seg}"
            return self.root / "ticks" / f"symbol={seg}" / f"date={_iso(date)}"
        base = self.root / "bars" / f"interval={parse_interval(interval)}" / f"symbol={seg}"
        stored = self._bar_dirs(base)
        if adjust is not None:
            _check_adjust(adjust)
            return stored.get(adjust, base / f"adjust={adjust}")
        if len(stored) > 1:
            raise BadInputError(_ambiguous(symbol, interval, stored))
        return next(iter(stored.values()), base)

    def _bar_dirs(self, base: Path) -> dict[str, Path]:
        """A symbol's stored bar partitions at one interval by adjustment: its ``adjust=`` folders, and a
        partition of the format-2 layout (directly in ``base``) under its manifest's adjustment when no
        ``adjust=`` folder holds that one (after an interrupted migrate, the new copy wins)."""
        out: dict[str, Path] = {}
        if not base.is_dir():
            return out
        for d in sorted(base.glob("adjust=*")):
            if (d / "_manifest.json").exists():
                out[d.name[len("adjust="):]] = d
        if (base / "_manifest.json").exists():
            legacy = self._load_manifest(base)
            if legacy is not None:
                out.setdefault(legacy["adjustment"], base)
        return dict(sorted(out.items()))

    def adjustments(self, symbol: str, interval: str = "1d") -> list[str]:
        """The adjustments stored for ``symbol``'s bars at ``interval`` (e.g. ['full', 'raw'])."""
        seg = _symbols.path_segment(_symbols.normalize(symbol))
        return list(self._bar_dirs(self.root / "bars" / f"interval={parse_interval(interval)}" / f"symbol={seg}"))

    # ------------------------------------------------------------------------------------ writing
    def write_bars(self, symbol: str, data, *, interval: str = "1d", source: str,
                   adjust: str = "raw", adjusted_as_of: str | None = None,
                   timezone: str | None = None, units: dict | None = None,
                   on_conflict: str = "error", alias: str | None = None, dry_run: bool = False
                   ) -> WriteResult:
        """Merge bars into ``symbol``'s partition of adjustment ``adjust``: de-duplicate, keep sorted, report
        conflicts. Other adjustments of the symbol are other partitions, left as they are.

        ``dry_run=True`` raises whatever the write would raise and returns what it would do, writing nothing
        (callers that write many partitions check them all first, so bad input anywhere writes nothing).

        ``on_conflict``: "error" (default: raise ConflictError and write nothing), "keep" (stored
        values win) or "overwrite" (new values win; also replaces a partition of another timezone).
        Intraday rows without a ``date`` get the local session date of their ``time``.
        ``adjust`` is the adjustment the prices are in (stored as the manifest's ``adjustment``).
        """
        pdir, table, meta, rounded = self._bars_write(symbol, data, interval, source, adjust, adjusted_as_of,
                                                      timezone, units, on_conflict)
        if dry_run:  # no lock: a writer may commit meanwhile, and the plan starts again from its manifest
            return dataclasses.replace(_lock_free(lambda: self._plan(pdir, table, meta, on_conflict).result, pdir),
                                       rounded=rounded)
        with self.lock():
            result = self._commit(pdir, self._plan(pdir, table, meta, on_conflict))
            if alias:
                self._record_alias(alias, meta["symbol"])
        result.rounded = rounded
        return result

    def write_bars_many(self, tables: Iterable[tuple[str, object]], *, interval: str = "1d", source: str,
                        adjust: str = "raw", timezone: str | None = None, units: dict | None = None,
                        on_conflict: str = "error", threads: int = 8) -> list[WriteResult]:
        """``write_bars`` for many symbols at once: ``tables`` yields (symbol, bars). One store lock for all;
        each symbol's partition commits on its own by the same protocol (part aside, fsynced, then the
        manifest), up to ``threads`` at a time, so that their fsyncs overlap instead of queueing (the bulk
        path for a whole market: thousands of partitions). At most 2 x ``threads`` tables are held at once.

        A failure stops the batch: the partitions committed before it are listed in the error (a
        StoreWriteError's ``committed``, or the message), the failing one is left as it was, and running the
        same call again with ``on_conflict="keep"`` completes the rest.
        """
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise BadInputError(f"threads must be a positive integer, got {threads!r}")
        _check_on_conflict(on_conflict)

        def write_one(symbol, data) -> WriteResult:
            pdir, table, meta, rounded = self._bars_write(symbol, data, interval, source, adjust, None, timezone,
                                                          units, on_conflict)
            result = self._commit(pdir, self._plan(pdir, table, meta, on_conflict))
            result.rounded = rounded
            return result

        results: list[WriteResult] = []
        with self.lock(), ThreadPoolExecutor(threads, thread_name_prefix="fintensor-write") as pool:
            pending: deque = deque()
            latest: dict = {}  # symbol -> its last write submitted: one symbol's writes run one after another
            try:
                for symbol, data in tables:
                    key = _symbols.normalize(symbol) if isinstance(symbol, str) else symbol
                    while key in latest and not latest[key].done() or len(pending) >= 2 * threads:
                        results.append(pending.popleft().result())
                    latest[key] = pool.submit(write_one, symbol, data)
                    pending.append(latest[key])
                    while pending and pending[0].done():
                        results.append(pending.popleft().result())
                while pending:
                    results.append(pending.popleft().result())
            except BaseException as exc:
                for job in pending:  # the writes in flight finish (or fail) before anything is reported
                    if not job.cancel() and job.exception() is None:
                        results.append(job.result())
                if isinstance(exc, StoreWriteError):
                    raise StoreWriteError(str(exc), committed=results + exc.committed) from None
                if type(exc) in (BadInputError, ConflictError, MissingDataError, StoreCorruptError) and results:
                    raise type(exc)(f"{exc} ({len(results)} other partition(s) of this batch were committed "
                                    "before it; mend that and run the batch again with on_conflict='keep' to complete it)") from None
                raise
        return results

    def _bars_write(self, symbol, data, interval, source, adjust, adjusted_as_of, timezone, units, on_conflict
                    ) -> tuple[Path, pa.Table, dict, int]:
        """write_bars' checks: (partition dir, conformed table, manifest meta, rounded count)."""
        sym = _symbols.normalize(symbol)
        interval = parse_interval(interval)
        kind = interval_kind(interval)
        if adjust not in ADJUSTMENTS:
            raise BadInputError(f"unknown adjustment {adjust!r}; use adjust= one of {ADJUSTMENTS}")
        _check_on_conflict(on_conflict)
        tz = timezone or _symbols.timezone(sym)
        table, rounded = conform_counted(data, kind, f"{sym} {interval}")
        if kind == "intraday" and table.column("date").null_count:
            dates = pc.coalesce(table.column("date").combine_chunks(), local_dates(table.column("time"), tz))
            table = table.set_column(table.schema.get_field_index("date"), "date", dates)
        meta = dict(kind=kind, symbol=sym, interval=interval, source=source, adjustment=adjust,
                    adjusted_as_of=adjusted_as_of, timezone=tz,
                    units=units or {"volume": "shares", "price_scale": 1})
        pdir = self.partition_dir(sym, interval, adjust=adjust)
        legacy = pdir.parent / "_manifest.json" if pdir.name.startswith("adjust=") else None
        if legacy is not None and legacy.exists():
            raise BadInputError(f"{sym} {interval}: the store holds it in the layout of an older fintensor (one "
                                f"adjustment per symbol); run `fintensor cache migrate` (Store.migrate()) first, "
                                f"then store {adjust!r} prices beside it; nothing was written")
        return pdir, table, meta, rounded

    def write_ticks(self, symbol: str, data, *, source: str, timezone: str | None = None,
                    units: dict | None = None, on_conflict: str = "error",
                    alias: str | None = None, dry_run: bool = False) -> list[WriteResult]:
        """Merge tick records into per-(symbol, local date) partitions; a conflict on any day writes no day.

        Records are keyed by (time, seq): a new record whose key is stored with other fields filled (quotes
        after trades, say) is a different record and raises ConflictError rather than fusing the two.
        """
        sym = _symbols.normalize(symbol)
        _check_on_conflict(on_conflict)
        tz = timezone or _symbols.timezone(sym)
        table, rounded = conform_counted(data, "ticks", f"{sym} ticks")
        days = _local_dates(table.column("time"), tz)
        meta = dict(kind="ticks", symbol=sym, interval="tick", source=source, adjustment="raw",
                    adjusted_as_of=None, timezone=tz, units=units or {"volume": "shares", "price_scale": 1})
        def plan_every_day():  # check every day before writing any
            for day in np.unique(days):
                d = dt.date(1970, 1, 1) + dt.timedelta(days=int(day))
                pdir = self.partition_dir(sym, date=d, kind="ticks")
                yield pdir, self._plan(pdir, table.filter(pa.array(days == day)), dict(meta, date=d.isoformat()),
                                       on_conflict)

        if dry_run:
            results = _lock_free(lambda: [plan.result for _, plan in plan_every_day()],
                                 self.partition_dir(sym, kind="ticks"))
            results[0].rounded = rounded
            return results
        with self.lock():
            plans = list(plan_every_day())
            results = []
            for pdir, plan in plans:  # each day commits on its own: a failure reports the days before it
                results.append(self._commit(pdir, plan, committed=results, of=len(plans)))
            if alias:
                self._record_alias(alias, sym)
        results[0].rounded = rounded
        return results

    def _plan(self, pdir: Path, table: pa.Table, meta: dict, on_conflict: str) -> _Plan:
        """Decide what a write does, raising on any conflict; touches nothing on disk."""
        kind = meta["kind"]
        label = f"{meta['symbol']} {meta.get('date') or meta['interval']}"
        result = WriteResult(meta["symbol"], kind, str(pdir.relative_to(self.root)))
        old = self._load_manifest(pdir)
        if old is None:
            result.added = table.num_rows
            return _Plan(result, meta, None, [], table)
        differs = [f for f in ("adjustment", "timezone") if old.get(f) != meta.get(f)]
        if differs and on_conflict != "overwrite":
            f = differs[0]
            raise ConflictError(
                f"{label}: the store holds {f} {old.get(f)!r} (source {old.get('source')}), the new rows are "
                f"{meta.get(f)!r}; nothing was written. Remove the stored data first "
                f"(fintensor cache rm {meta['symbol']} --interval {meta['interval']} --adjust "
                f"{old.get('adjustment')}) or pass on_conflict='overwrite' (CLI: --on-conflict "
                "overwrite)")
        if differs:  # overwrite across adjustments/timezones: the new rows replace the partition
            result.added = table.num_rows
            return _Plan(result, meta, old, [], table)
        if kind != "ticks" and _key_array(table, kind)[0] > _key_scalar(old["end_key"]):
            result.added = table.num_rows  # pure append: a new part, nothing rewritten
            return _Plan(result, meta, old, list(old["parts"]), table)
        existing = self._read_parts(pdir, old["parts"], kind=kind)
        merged, stats = _merge_tables(existing, table, kind, on_conflict, label)
        result.added, result.updated, result.unchanged, result.conflicts = stats
        if kind == "ticks" and result.updated > (result.conflicts if on_conflict == "overwrite" else 0):
            raise ConflictError(
                f"{label}: {result.updated} new tick(s) share (time, seq) with stored ticks that have other fields "
                "(e.g. quotes after trades); import a day's trades and quotes together in one call, or remove "
                f"the stored day first (fintensor cache rm {meta['symbol']} --interval tick)")
        if result.added == 0 and result.updated == 0:
            result.noop = True
            return _Plan(result, meta, old, list(old["parts"]), None)
        return _Plan(result, meta, old, [], merged)

    def _commit(self, pdir: Path, plan: _Plan, committed: Sequence[WriteResult] = (), of: int = 1) -> WriteResult:
        """Write the plan's new part aside, then the manifest (the commit point), then drop what it replaced.

        A failed file write (disk full, file size limit, I/O error) leaves the partition's old manifest in
        place and raises StoreWriteError saying which partitions of this call were committed before it.
        """
        if plan.table is None:
            return plan.result
        try:
            return self._commit_files(pdir, plan)
        except OSError as exc:
            done = [r.partition for r in committed if not r.noop]
            raise StoreWriteError(
                f"could not write {exc.filename or pdir}: {exc.strerror or exc}; {plan.result.partition} was left "
                f"as it was" + (f" ({len(done)} of {of} partitions of this write were committed: "
                                f"{', '.join(done)})" if done else "") +
                ". Free space (or raise the file size limit) and run the same command again to complete it",
                committed=list(committed)) from None

    def _commit_files(self, pdir: Path, plan: _Plan) -> WriteResult:
        kind, parts, table = plan.meta["kind"], plan.keep_parts, plan.table
        if len(parts) >= MAX_PARTS:  # compact: keep reads cheap after many appends
            table = pa.concat_tables([self._read_parts(pdir, parts, kind=kind), table])
            parts = []
        new_dir = pdir
        while not new_dir.parent.exists():  # the topmost folder this write creates (removed if it fails)
            new_dir = new_dir.parent
        new_dir = None if pdir.exists() else new_dir
        pdir.mkdir(parents=True, exist_ok=True)
        new_part = None
        try:
            new_part = self._write_part(pdir, table, kind)
            now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
            manifest = self._manifest(plan.meta, parts + [new_part], plan.old, now)
            atomic_write_bytes(pdir / "_manifest.json", manifest_bytes(manifest))
        except OSError:  # not committed: take back what this write added (we hold the lock)
            if new_part is not None:
                (pdir / new_part["file"]).unlink(missing_ok=True)
            if new_dir is not None:
                shutil.rmtree(new_dir, ignore_errors=True)
            raise
        self._cleanup(pdir, manifest)
        return plan.result

    def _write_part(self, pdir: Path, table: pa.Table, kind: str) -> dict:
        data = _table_bytes(table)
        name = f"part-{uuid.uuid4().hex[:16]}.parquet"
        atomic_write_bytes(pdir / name, data)
        keys = table.column(KEYS[kind][0])
        return {"file": name, "rows": table.num_rows, "bytes": len(data), "sha256": sha256(data),
                "start": _jsonable(keys[0].as_py()), "end": _jsonable(keys[-1].as_py()),
                "start_key": _key_json(table, kind, 0), "end_key": _key_json(table, kind, -1)}

    def _manifest(self, meta: dict, parts: list[dict], old: dict | None, now: str) -> dict:
        parts = sorted(parts, key=lambda p: p["start_key"])
        history = list((old or {}).get("history", []))
        history.append({"source": meta["source"], "at": now})
        m = dict(meta)
        m.update(
            format=FORMAT_VERSION,
            created=(old or {}).get("created", now),
            updated=now,
            history=history[-20:],
            parts=parts,
            rows=sum(p["rows"] for p in parts),
            start=parts[0]["start"], end=parts[-1]["end"],
            start_key=parts[0]["start_key"], end_key=parts[-1]["end_key"],
            checksum=sha256("".join(p["sha256"] for p in parts).encode()),
        )
        if meta["kind"] != "daily":
            d0, d1 = (self._read_parts_dates(parts, meta))
            m["start_date"], m["end_date"] = d0, d1
        return m

    def _read_parts_dates(self, parts, meta):
        if meta["kind"] == "ticks":
            return meta["date"], meta["date"]
        tz = meta["timezone"]
        import pandas as pd

        lo = pd.Timestamp(parts[0]["start"]).tz_convert(tz).date().isoformat()
        hi = pd.Timestamp(parts[-1]["end"]).tz_convert(tz).date().isoformat()
        return lo, hi

    def _cleanup(self, pdir: Path, manifest: dict) -> list[str]:
        """Delete files the manifest does not list (leftovers of interrupted or superseded writes)."""
        keep = {p["file"] for p in manifest["parts"]} | {"_manifest.json"}
        removed = []
        for f in pdir.iterdir():
            if f.is_file() and f.name not in keep:
                f.unlink(missing_ok=True)
                removed.append(f.name)
        if removed:
            fsync_dir(pdir)
        return removed

    def _record_alias(self, alias: str, symbol: str) -> None:
        alias = alias.strip()
        if alias == symbol:
            return
        aliases = self.aliases()
        if aliases.get(alias) != symbol:
            aliases[alias] = symbol
            try:
                self._write_aliases(aliases)
            except OSError as exc:
                raise StoreWriteError(f"{symbol} was stored, but the alias {alias!r} could not be recorded "
                                      f"({exc.strerror or exc}); free space and run the same command again") from None

    def _write_aliases(self, aliases: dict[str, str]) -> None:
        body = {"aliases": dict(sorted(aliases.items()))}
        atomic_write_bytes(self.root / ALIASES_FILE, json.dumps(
            {**body, "sha256": sha256(_canonical(body))}, indent=1, sort_keys=True).encode())

    def aliases(self) -> dict[str, str]:
        """User spellings seen on import or download, mapped to canonical symbols.

        The table carries a SHA-256 of its content; a damaged one raises StoreCorruptError (one line) and
        ``verify(repair=True)`` resets it. A table of format 1 (a plain mapping, no checksum) is still read.
        """
        path = self.root / ALIASES_FILE
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise StoreCorruptError(f"{path}: cannot be read ({exc.strerror}); run `fintensor cache verify "
                                    "--repair`") from None
        problem = _aliases_problem(raw)
        if problem:
            raise StoreCorruptError(f"{path}: the alias table {problem}; run `fintensor cache verify --repair` "
                                    "(it resets the table; aliases are recorded again on the next import)")
        table = json.loads(raw)
        return dict(table["aliases"]) if "sha256" in table else dict(table)

    # ------------------------------------------------------------------------------------ reading
    def _load_manifest(self, pdir: Path) -> dict | None:
        """The partition's manifest, None if it has none, StoreCorruptError if it fails its checks."""
        path = pdir / "_manifest.json"
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            manifest = json.loads(raw)
        except ValueError:
            manifest = None
        if manifest is not None and self._checked_manifests.get(path) == raw:  # these exact bytes passed
            return manifest
        try:
            problem = "is not valid JSON" if manifest is None else _manifest_problem(manifest)
        except (TypeError, KeyError, AttributeError, IndexError):
            problem = "is malformed"
        if problem:
            raise StoreCorruptError(f"{path}: manifest {problem}; run `fintensor cache verify`, then re-import "
                                    "the symbol or remove it with `fintensor cache rm`")
        if len(self._checked_manifests) > 4096:
            self._checked_manifests.clear()
        self._checked_manifests[path] = raw
        return manifest

    def manifest(self, symbol: str, interval: str = "1d", date=None, *, adjust: str | None = None) -> dict | None:
        """The partition's manifest (source, range, rows, adjustment, timezone, checksums) or None.
        ``adjust``: which adjustment of the bars (None: the only one stored; several: BadInputError)."""
        if date is not None:
            return self._load_manifest(self.partition_dir(symbol, date=date, kind="ticks"))
        return self._load_manifest(self.partition_dir(symbol, interval, adjust=adjust))

    def _read_parts(self, pdir: Path, parts: Sequence[dict], columns: Sequence[str] | None = None,
                    verify: bool = True, *, kind: str) -> pa.Table:
        """Concatenated rows of ``parts``. verify=True checks each file's size and SHA-256 before parsing
        it; verify=False checks the size and Parquet page checksums and reads only ``columns``."""
        tables = []
        for p in parts:
            path = pdir / p["file"]
            try:
                self._part_file(pdir, p)  # a remote store's part: fetched and verified into the mirror
                if verify:
                    data = path.read_bytes()
                    size, source = len(data), pa.BufferReader(data)
                else:
                    size, source = path.stat().st_size, str(path)
            except FileNotFoundError:
                raise _Vanished(path) from None
            if size != p["bytes"]:
                raise StoreCorruptError(
                    f"{path}: {size} bytes where the manifest says {p['bytes']} (truncated or replaced); "
                    "it was not read. Re-import the data or run `fintensor cache rm` on the symbol")
            if verify and sha256(data) != p["sha256"]:
                raise StoreCorruptError(
                    f"{path}: checksum mismatch (the file is corrupted); it was not read. "
                    "Re-import the data or run `fintensor cache rm` on the symbol")
            # bytes whose SHA-256 was just verified and that passed the checks below against this same
            # manifest entry once need not be checked again (same bytes, same entry: same answer)
            entry = (kind, p["sha256"], p["rows"], str(p["start_key"]), str(p["end_key"]))
            checked = verify and entry in self._checked_parts
            try:  # threads only pay off on big parts; SHA-256 already covers what page checksums would
                with pq.ParquetFile(source, page_checksum_verification=not verify) as pf:
                    if not checked:
                        _check_part_metadata(pf, p, kind, path)
                    table = pf.read(columns=list(columns) if columns else None, use_threads=size > 1 << 23)
            except FileNotFoundError:
                raise _Vanished(path) from None
            except (pa.ArrowException, OSError) as exc:
                raise StoreCorruptError(f"{path}: unreadable Parquet ({exc})") from None
            table = _in_memory_instants(table)
            if not checked:
                _check_part_rows(table, p, kind, path)
                if verify and all(k in table.column_names for k in KEYS[kind]):
                    if len(self._checked_parts) > 65536:
                        self._checked_parts.clear()
                    self._checked_parts.add(entry)
            tables.append(table)
        if not tables:
            empty = SCHEMAS[kind].empty_table()
            return empty.select(list(columns)) if columns else empty
        return pa.concat_tables(tables) if len(tables) > 1 else tables[0]

    def _read_committed(self, pdir: Path, kind: str, select, columns, verify: bool):
        """(manifest, rows of the parts ``select(manifest)`` picks), or (None, None) without a manifest.

        Lock-free: if a writer commits and deletes the parts we were reading, re-read the new manifest.
        """
        def read():
            man = self._load_manifest(pdir)
            if man is None:
                return None, None
            return man, self._read_parts(pdir, select(man), columns, verify, kind=kind)

        return _lock_free(read, pdir)

    def read_partition(self, symbol: str, interval: str = "1d", start=None, end=None,
                       columns: Sequence[str] | None = None, verify: bool = True, *,
                       adjust: str | None = None) -> pa.Table:
        """One symbol's bars in [start, end] (session dates, inclusive) without a symbol column.
        ``adjust``: which stored adjustment (None: the only one stored; several: BadInputError)."""
        interval = parse_interval(interval)
        kind = interval_kind(interval)
        sym = _symbols.normalize(symbol)
        cols = _check_columns(columns, kind)
        lo, hi = _date_range(start, end)
        need = None if cols is None else list(dict.fromkeys(list(KEYS[kind][:1]) + ["date"] + cols))
        man, table = self._read_committed(
            self.partition_dir(sym, interval, adjust=adjust), kind,
            lambda m: [p for p in m["parts"] if _part_overlaps(p, lo, hi, kind)], need, verify)
        if man is None:
            raise MissingDataError(
                f"no {interval} bars for {sym}{'' if adjust is None else f' ({adjust}-adjusted)'} in the store at "
                f"{self.uri}; get them with "
                f"`fintensor download {sym} --interval {interval}` or `fintensor import FILE`")
        if lo is not None or hi is not None:
            d = table.column("date")
            m = pc.and_(pc.greater_equal(d, lo) if lo else pc.is_valid(d),
                        pc.less_equal(d, hi) if hi else pc.is_valid(d))
            table = table.filter(m)
        return table

    def read(self, symbols: str | Iterable[str] | None = None, start=None, end=None,
             interval: str = "1d", columns: Sequence[str] | None = None, *, as_pandas: bool = False,
             verify: bool = True, adjust: str | None = None):
        """Bars of ``symbols`` in [start, end] as one Arrow table (``symbol`` column first).

        Reads only the partitions, part files and columns needed. ``as_pandas=True`` returns a DataFrame.
        ``adjust``: which stored adjustment (None: each symbol's only one; several: BadInputError); with
        ``symbols=None`` and an ``adjust``, the symbols stored in that adjustment.
        """
        if symbols is None:
            syms = list(dict.fromkeys(e["symbol"] for e in self.list() if e["kind"] != "ticks"
                                      and e["interval"] == parse_interval(interval)
                                      and (adjust is None or e["adjustment"] == adjust)))
        else:
            syms = [_symbols.normalize(s) for s in ([symbols] if isinstance(symbols, str) else symbols)]
        out = []
        for s in syms:
            t = self.read_partition(s, interval, start, end, columns, verify, adjust=adjust)
            out.append(t.add_column(0, "symbol", _constant(s, pa.string(), t.num_rows)))
        if out:
            table = pa.concat_tables(out)
        else:
            kind = interval_kind(interval)
            table = SCHEMAS[kind].empty_table()
            table = table.add_column(0, "symbol", pa.array([], pa.string()))
        return table.to_pandas() if as_pandas else table

    def read_ticks(self, symbols: str | Iterable[str], start=None, end=None,
                   columns: Sequence[str] | None = None, *, as_pandas: bool = False,
                   verify: bool = True):
        """Tick records of ``symbols`` on session dates [start, end] with ``symbol`` and ``date`` columns."""
        syms = [_symbols.normalize(s) for s in ([symbols] if isinstance(symbols, str) else symbols)]
        cols = _check_columns(columns, "ticks")
        need = None if cols is None else list(dict.fromkeys(["time", "seq"] + cols))
        lo, hi = _date_range(start, end)
        out = []
        for s in syms:
            base = self.partition_dir(s, kind="ticks")
            days = sorted(p.name[5:] for p in base.glob("date=*")) if base.exists() else []
            days = [d for d in days if (lo is None or d >= lo.isoformat()) and (hi is None or d <= hi.isoformat())]
            if not days:
                raise MissingDataError(
                    f"no ticks for {s} between {start} and {end} in the store at {self.uri}; "
                    f"import them with `fintensor import FILE --ticks`")
            for d in days:
                man, t = self._read_committed(base / f"date={d}", "ticks", lambda m: m["parts"], need, verify)
                if man is None:
                    continue
                t = t.add_column(0, "date", _constant(dt.date.fromisoformat(d), pa.date32(), t.num_rows))
                out.append(t.add_column(0, "symbol", _constant(s, pa.string(), t.num_rows)))
        table = pa.concat_tables(out) if out else TICK_SCHEMA.empty_table()
        return table.to_pandas() if as_pandas else table

    # ---------------------------------------------------------------------------------- inventory
    def _manifests(self, shadowed: bool = False):
        """(partition folder, manifest path) of every partition; an old-layout copy of a partition that an
        interrupted migrate already moved under ``adjust=`` is left out (readers take the new one)."""
        for path in sorted([*self.root.glob("bars/interval=*/symbol=*/_manifest.json"),
                            *self.root.glob("bars/interval=*/symbol=*/adjust=*/_manifest.json")]):
            if not shadowed and path.parent.name.startswith("symbol=") and \
                    any(path.parent.glob("adjust=*/_manifest.json")):
                m = self._load_manifest(path.parent)
                if m is not None and (path.parent / f"adjust={m['adjustment']}" / "_manifest.json").exists():
                    continue
            yield path.parent, path
        for path in sorted(self.root.glob("ticks/symbol=*/date=*/_manifest.json")):
            yield path.parent, path

    def list(self) -> list[dict]:
        """One entry per (symbol, interval, adjustment) — ticks summed over their dates — sorted by symbol."""
        entries: dict[tuple, dict] = {}
        for pdir, path in self._manifests():
            m = self._load_manifest(pdir)
            if m is None:
                continue
            kind = m["kind"]
            key = (m["symbol"], "tick" if kind == "ticks" else m["interval"], m["adjustment"])
            start = m.get("start_date", m["start"])
            end = m.get("end_date", m["end"])
            e = entries.get(key)
            if e is None:
                entries[key] = dict(symbol=m["symbol"], kind=kind, interval=key[1], start=start, end=end,
                                    rows=m["rows"], source=m["source"], adjustment=m["adjustment"],
                                    timezone=m["timezone"], partitions=1, updated=m["updated"])
            else:
                e["start"], e["end"] = min(e["start"], start), max(e["end"], end)
                e["rows"] += m["rows"]
                e["partitions"] += 1
                e["updated"] = max(e["updated"], m["updated"])
        return [entries[k] for k in sorted(entries)]

    def symbols(self, interval: str = "1d") -> list[str]:
        iv = parse_interval(interval)
        return list(dict.fromkeys(e["symbol"] for e in self.list() if e["interval"] == iv))

    def info(self, symbol: str) -> list[dict]:
        """Every manifest stored for ``symbol`` (all intervals and tick dates)."""
        sym = _symbols.normalize(symbol)
        seg = _symbols.path_segment(sym)
        out = []
        for path in sorted(self.root.glob(f"bars/interval=*/symbol={seg}/_manifest.json")) + \
                sorted(self.root.glob(f"bars/interval=*/symbol={seg}/adjust=*/_manifest.json")) + \
                sorted(self.root.glob(f"ticks/symbol={seg}/date=*/_manifest.json")):
            m = self._load_manifest(path.parent)
            if m is not None:
                out.append(m)
        if not out:
            raise MissingDataError(f"{sym} is not in the store at {self.uri}; see `fintensor cache list`")
        return out

    def coverage(self, symbol: str, interval: str = "1d", *, adjust: str | None = None) -> tuple[str, str] | None:
        """(first, last) session date stored for ``symbol`` at ``interval`` ('tick' for ticks), or None."""
        if str(interval).lower() in ("tick", "ticks"):
            base = self.partition_dir(symbol, kind="ticks")
            days = sorted(p.parent.name[5:] for p in base.glob("date=*/_manifest.json")) if base.exists() else []
            return (days[0], days[-1]) if days else None
        m = self.manifest(symbol, interval, adjust=adjust)
        if m is None:
            return None
        return m.get("start_date", m["start"]), m.get("end_date", m["end"])

    def fingerprint(self, symbols: Iterable[str], interval: str = "1d", *,
                    adjust: str | dict[str, str] | None = None) -> str:
        """A hash of the stored content of ``symbols`` at ``interval`` (changes whenever a write lands).
        ``adjust``: one adjustment for all, or {symbol: adjustment}; None: each symbol's only one."""
        h = hashlib.sha256()
        for s in symbols:
            sym = _symbols.normalize(s)
            adj = adjust.get(sym, adjust.get(s)) if isinstance(adjust, dict) else adjust
            m = self.manifest(sym, interval, adjust=adj)
            h.update(f"{sym}:{interval}:{m['checksum'] if m else '-'};".encode())
        return h.hexdigest()

    def tick_fingerprint(self, symbols: Iterable[str], start=None, end=None) -> str:
        h = hashlib.sha256()
        lo, hi = _date_bound(start), _date_bound(end)
        for s in symbols:
            base = self.partition_dir(s, kind="ticks")
            for mp in sorted(base.glob("date=*/_manifest.json")) if base.exists() else []:
                d = mp.parent.name[5:]
                if (lo and d < lo.isoformat()) or (hi and d > hi.isoformat()):
                    continue
                h.update(f"{s}:{d}:{json.loads(mp.read_bytes())['checksum']};".encode())
        return h.hexdigest()

    def remove(self, symbol: str, interval: str | None = None, *, adjust: str | None = None) -> int:
        """Remove ``symbol``'s partitions (one interval, 'tick', or all); returns how many went.

        ``adjust``: only the bars in that adjustment (at ``interval``, or at every interval), leaving the
        symbol's other adjustments, intervals and ticks untouched."""
        sym = _symbols.normalize(symbol)
        seg = _symbols.path_segment(sym)
        if adjust is not None:
            _check_adjust(adjust)
            if interval in ("tick", "ticks"):
                raise BadInputError("ticks have no adjustment; remove them without --adjust (--interval tick)")
        with self.lock():
            targets = []
            if adjust is not None:
                ivs = [parse_interval(interval)] if interval else sorted(
                    p.name[9:] for p in (self.root / "bars").glob("interval=*"))
                for iv in ivs:
                    pdir = self._bar_dirs(self.root / "bars" / f"interval={iv}" / f"symbol={seg}").get(adjust)
                    if pdir is not None and pdir.name.startswith("symbol="):
                        raise BadInputError(f"{sym} {iv} is stored in the layout of an older fintensor; run "
                                            "`fintensor cache migrate` first, then remove one adjustment")
                    if pdir is not None:
                        targets.append(pdir)
            elif interval in (None, "tick", "ticks"):
                tdir = self.root / "ticks" / f"symbol={seg}"
                if tdir.exists():
                    targets.extend(sorted(tdir.glob("date=*")))
                    targets.append(tdir)
            if adjust is None and interval not in ("tick", "ticks"):
                ivs = [parse_interval(interval)] if interval else [
                    p.name[9:] for p in (self.root / "bars").glob("interval=*")]
                for iv in ivs:  # every adjustment of the interval (and a partition of the old layout)
                    base = self.root / "bars" / f"interval={iv}" / f"symbol={seg}"
                    if base.exists():
                        targets.extend(sorted(base.glob("adjust=*")))
                        targets.append(base)
            count = 0
            for t in targets:
                if not t.exists():
                    continue
                count += (t / "_manifest.json").exists()
                count += sum(1 for p in t.glob("adjust=*/_manifest.json"))  # old layout beside new (migrate)
                trash = t.with_name(f".trash-{uuid.uuid4().hex}")
                os.replace(t, trash)  # atomic for readers: the partition is there or gone
                shutil.rmtree(trash, ignore_errors=True)
                if t.name.startswith("adjust="):  # the symbol's last adjustment at this interval: no empty folder
                    with contextlib.suppress(OSError):
                        t.parent.rmdir()
            if count == 0:
                what = (interval or "any interval") + (f", {adjust}-adjusted" if adjust else "")
                raise MissingDataError(f"{sym} ({what}) is not in the store at {self.root}")
        return count

    # ------------------------------------------------------------------------ verify, migrate, files
    def verify(self, repair: bool = False) -> list[Problem]:
        """Check every partition: manifest (its own checksum, and against its parts), part sizes, SHA-256
        checksums, schema, rows, key order; and the alias table. See ``fintensor.store_verify``."""
        return store_verify.verify(self, repair)

    def migrate(self) -> list[str]:
        """Rewrite every partition written by an older format (nanosecond instants, manifests without their
        own checksum) in the current one, each atomically under the lock, and move bars of the format-2
        layout (``symbol=X/``) under ``symbol=X/adjust=<its adjustment>/``. Returns the partitions written.

        A move commits the new partition first, then deletes the old manifest and parts: a crash between
        leaves both, readers take the new one, and the next migrate finishes the job."""
        done = []
        with self.lock():
            for pdir, _ in list(self._manifests(shadowed=True)):
                old = self._load_manifest(pdir)
                legacy = old is not None and old["kind"] != "ticks" and pdir.name.startswith("symbol=")
                if old is None or (old.get("format", 1) >= CONTENT_FORMAT and not legacy):
                    continue
                target = pdir / f"adjust={old['adjustment']}" if legacy else pdir
                if legacy and (target / "_manifest.json").exists():  # moved by an interrupted migrate
                    self._drop_legacy(pdir, old)
                    continue
                table = self._read_parts(pdir, old["parts"], kind=old["kind"])
                meta = {k: old[k] for k in ("kind", "symbol", "interval", "source", "adjustment", "adjusted_as_of",
                                            "timezone", "units", "date") if k in old}
                result = WriteResult(old["symbol"], old["kind"], str(target.relative_to(self.root)), updated=0)
                self._commit(target, _Plan(result, meta, old, [], table))
                if legacy:
                    self._drop_legacy(pdir, old)
                done.append(result.partition)
        return done

    def _drop_legacy(self, pdir: Path, old: dict) -> None:
        """Delete a migrated format-2 partition's manifest (first: it is no longer read), then its parts."""
        (pdir / "_manifest.json").unlink()
        for p in old["parts"]:
            (pdir / p["file"]).unlink(missing_ok=True)
        fsync_dir(pdir)

    def files(self, symbols: str | Iterable[str] | None = None, interval: str = "1d", *,
              adjust: str | None = None) -> list[Path]:
        """The committed part files of ``symbols`` (all stored ones when None) at ``interval`` ('tick' for
        ticks), from their manifests: what an engine (DuckDB, Polars, Spark, Ray) should read instead of
        globbing a partition folder, which may hold leftovers or parts being superseded. For a remote store
        (``Store(uri)``) they are files of the local mirror, fetched and verified by this call.

        ``adjust``: the bars in that adjustment. None: each symbol's only one; a symbol stored in several
        adjustments is refused (its rows would be read twice) with the option that picks one."""
        ticks = str(interval).lower() in ("tick", "ticks")
        iv = None if ticks else parse_interval(interval)
        if symbols is None:
            wanted = None
        else:
            wanted = {_symbols.normalize(s) for s in ([symbols] if isinstance(symbols, str) else symbols)}
        def collect():
            out, found, seen = [], set(), set()
            for pdir, _ in self._manifests():
                m = self._load_manifest(pdir)
                if m is None or (m["kind"] == "ticks") != ticks or (iv is not None and m["interval"] != iv):
                    continue
                if not ticks and adjust is not None and m["adjustment"] != adjust:
                    continue
                if wanted is None or m["symbol"] in wanted:
                    if not ticks and (m["symbol"], m["interval"]) in seen and adjust is None:
                        raise BadInputError(_ambiguous(m["symbol"], interval, self.adjustments(m["symbol"], iv)))
                    seen.add((m["symbol"], m["interval"]))
                    try:  # remote: fetched and verified; a part gone with a newer remote snapshot: list that
                        out.extend(self._part_file(pdir, p) for p in m["parts"])
                    except FileNotFoundError as exc:
                        raise _Vanished(exc) from None
                    found.add(m["symbol"])
            return out, found

        out, found = _lock_free(collect, self.uri)
        missing = sorted((wanted or set()) - found)
        if missing:
            raise MissingDataError(f"{', '.join(missing)}: nothing stored at interval {interval} in {self.uri}; "
                                   "see `fintensor cache list`")
        return out


# ------------------------------------------------------------------------------------- internals
class _Vanished(Exception):
    """A part listed by the manifest just read is gone: a writer committed and removed it meanwhile."""


def _lock_free(read, where):
    """``read()`` without the store's lock: when a writer commits and deletes the parts it was reading,
    start again (from the new manifest)."""
    for attempt in range(50):
        try:
            return read()
        except _Vanished:
            time.sleep(0.01 * (attempt + 1))
    raise StoreCorruptError(f"{where}: parts kept vanishing while reading; is a writer looping?")


@dataclasses.dataclass
class _Plan:
    """A checked write: keep ``keep_parts``, add ``table`` as a new part (None: nothing to do)."""

    result: WriteResult
    meta: dict
    old: dict | None
    keep_parts: list[dict]
    table: pa.Table | None


def _constant(value, type_: pa.DataType, n: int) -> pa.Array:
    """A column of ``n`` copies of ``value``, built in Arrow (no Python list: fast on big reads)."""
    return pa.repeat(pa.scalar(value, type_), n)


def _check_adjust(adjust: str) -> None:
    if adjust not in ADJUSTMENTS:
        raise BadInputError(f"unknown adjustment {adjust!r}; use adjust= one of {', '.join(ADJUSTMENTS)} "
                            "(CLI: --adjust)")


def _ambiguous(symbol: str, interval: str, stored) -> str:
    """The message for a read that must choose between several stored adjustments of a symbol's bars."""
    held = ", ".join(stored)
    return (f"{symbol} {interval} bars are stored in several adjustments ({held}); say which with adjust= "
            f"(CLI: --adjust {next(iter(stored))})")


def _check_on_conflict(on_conflict: str) -> None:
    if on_conflict not in ("error", "keep", "overwrite"):
        raise BadInputError(f"on_conflict must be 'error', 'keep' or 'overwrite', not {on_conflict!r}")


class _LockContext:
    def __init__(self, lock, root, timeout):
        self.lock, self.root, self.timeout = lock, root, timeout

    def __enter__(self):
        from filelock import Timeout

        try:
            self.lock.acquire()
        except Timeout:
            raise StoreBusyError(
                f"the store at {self.root} is locked by another fintensor process; waited {self.timeout:.0f} s "
                f"(lock file {self.root / '.lock'}). Retry when it finishes, or wait longer with "
                "$FINTENSOR_LOCK_TIMEOUT (seconds) or Store(lock_timeout=...)") from None
        return self

    def __exit__(self, *exc):
        self.lock.release()
        return False


def _lock_timeout() -> float:
    """$FINTENSOR_LOCK_TIMEOUT in seconds (default 600), or one clear error when it is not a number >= 0."""
    raw = os.environ.get("FINTENSOR_LOCK_TIMEOUT", "600")
    try:
        seconds = float(raw)
    except ValueError:
        seconds = float("nan")
    if not (seconds >= 0 and seconds != float("inf")):
        raise BadInputError(f"FINTENSOR_LOCK_TIMEOUT={raw!r} is not a number of seconds >= 0; "
                            "set it to e.g. 600, or unset it")
    return seconds


def _jsonable(v):
    if isinstance(v, (dt.datetime, dt.date)):
        return v.isoformat()
    return v


def _iso(d) -> str:
    if isinstance(d, str):
        return dt.date.fromisoformat(d[:10]).isoformat()
    if isinstance(d, dt.datetime):
        return d.date().isoformat()
    return d.isoformat()


def _date_range(start, end) -> tuple[dt.date | None, dt.date | None]:
    lo, hi = _date_bound(start), _date_bound(end)
    if lo is not None and hi is not None and lo > hi:
        raise BadInputError(f"start {lo} is after end {hi}")
    return lo, hi


def _date_bound(x, what: str = "") -> dt.date | None:
    """A start/end bound as a date (None: unbounded), or BadInputError saying what was wrong with it."""
    return None if x is None else parse_date(x, what)


def _part_overlaps(p: dict, lo: dt.date | None, hi: dt.date | None, kind: str) -> bool:
    start, end = str(p["start"])[:10], str(p["end"])[:10]
    # intraday parts are stamped in UTC; widen by a day so local session dates are never missed
    slack = dt.timedelta(days=1 if kind != "daily" else 0)
    if lo is not None and dt.date.fromisoformat(end) + slack < lo:
        return False
    if hi is not None and dt.date.fromisoformat(start) - slack > hi:
        return False
    return True


def _check_columns(columns, kind: str) -> list[str] | None:
    if columns is None:
        return None
    if isinstance(columns, str):
        columns = [columns]
    names = SCHEMAS[kind].names
    bad = [c for c in columns if c not in names]
    if bad:
        raise BadInputError(f"unknown column(s) {bad} for {kind} data; available: {names}")
    return list(columns)


def _local_dates(times: pa.ChunkedArray, tz: str) -> np.ndarray:
    """Exchange-local calendar day of each UTC instant, as days since the epoch."""
    import pandas as pd

    idx = pd.DatetimeIndex(times.to_numpy()).tz_localize("UTC").tz_convert(tz).tz_localize(None)
    return idx.normalize().asi8 // (86400 * 10**9)


def local_dates(times, tz: str) -> pa.Array:
    """Public helper for sources: UTC instants -> exchange-local session dates (date32)."""
    days = _local_dates(pa.chunked_array([pa.array(times)]) if not isinstance(times, pa.ChunkedArray)
                        else times, tz)
    return pa.array(days.astype(np.int32), pa.int32()).cast(pa.date32())
