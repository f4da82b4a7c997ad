"""``Store.verify``: check every file of a store, and repair only what provably holds no committed data.

What verify checks, per partition, against a snapshot (the manifest it read):

- the manifest: valid JSON, its own SHA-256 (``manifest_sha256``, format 2), its fields against its parts'
  entries (rows, start/end, key ranges in order);
- each part it lists: size, SHA-256, Parquet footer (row count, schema), key order, first/last key;
- files it does not list, listed *under the store lock* (writers hold it from the first byte of a new
  part to the removal of the parts it supersedes, so a file seen unlisted under the lock is never a
  write in flight);
- ``.trash-*`` leftovers of interrupted removals, the alias table (its checksum), stray temp files.

Content checks run without the lock; a part that vanishes because a writer committed meanwhile makes
verify re-read the manifest and check the new snapshot, so a verify beside writers reports only what is
wrong.

What ``repair=True`` does (holding the lock throughout):

- removes files a valid manifest does not list (uncommitted or superseded parts, temp files);
- never deletes a partition whose manifest is missing: its files are moved, as they are, to
  ``<root>/.quarantine/<partition>-<time>/`` and reported (a manifest's source, adjustment and time zone
  cannot be recovered from the parts, so rebuilding one would guess);
- never touches a partition whose manifest is damaged, nor a damaged part (data loss is reported, not
  hidden);
- removes ``.trash-*`` folders (a symlink is unlinked, never followed);
- resets a damaged alias table (reported: aliases are recorded again on the next import);
- removes the tensor cache's temp files and writability probes only when older than ``TEMP_GRACE_S``
  (they are written without the store lock, so a young one may be another process's write in flight).
"""
from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import StoreCorruptError
from .fileio import sha256
from .schema import CONTENT_FORMAT, FORMAT_VERSION
from .store_checks import ALIASES_FILE, Problem, _check_part_metadata, _check_part_rows, _in_memory_instants

if TYPE_CHECKING:
    from .store import Store

#: Temp files outside partitions younger than this (seconds) may belong to a live writer: left alone.
TEMP_GRACE_S = 3600
QUARANTINE = ".quarantine"


def verify(store: Store, repair: bool = False) -> list[Problem]:
    problems: list[Problem] = []
    root = store.root
    if not root.exists():
        return problems
    with store.lock() if repair else _no_lock():
        for pdir in _partitions(root):
            problems.extend(_verify_partition(store, pdir, repair))
        with store._lock_if_writable():
            problems.extend(_verify_removals(root, repair))
            problems.extend(_verify_aliases(store, repair))
            problems.extend(_verify_temps(root, repair))
    return problems


def _no_lock():
    import contextlib

    return contextlib.nullcontext()


def _partitions(root: Path) -> list[Path]:
    # a symbol folder is a partition itself only in the format-2 layout (files directly in it)
    legacy = [d for d in root.glob("bars/interval=*/symbol=*")
              if d.is_dir() and not d.is_symlink() and any(f.is_file() for f in d.iterdir())]
    dirs = [*legacy, *root.glob("bars/interval=*/symbol=*/adjust=*"), *root.glob("ticks/symbol=*/date=*")]
    return sorted(d for d in dirs if d.is_dir() and not d.is_symlink())


def _verify_partition(store: Store, pdir: Path, repair: bool) -> list[Problem]:
    for _ in range(50):
        with store._lock_if_writable():  # no writer is mid-commit while we list and read the manifest
            try:
                names = sorted(os.listdir(pdir))
            except FileNotFoundError:  # removed meanwhile
                return []
            try:
                man = store._load_manifest(pdir)
            except StoreCorruptError as exc:
                return [Problem(str(pdir / "_manifest.json"), str(exc).split(": ", 1)[-1])]
            if man is None:
                return _unmanifested(store.root, pdir, names, repair)
            out = _unlisted(pdir, names, man, repair)
        if man["kind"] != "ticks" and pdir.name.startswith("symbol="):
            out.append(Problem(str(pdir / "_manifest.json"), "stored in the layout of store format 2 (one "
                               "adjustment per symbol); run `fintensor cache migrate` to move it under adjust="))
        elif man.get("format", 1) < CONTENT_FORMAT:
            out.append(Problem(str(pdir / "_manifest.json"), f"written in store format {man.get('format', 1)} "
                               f"(current {FORMAT_VERSION}); run `fintensor cache migrate` to rewrite it"))
        try:
            return out + _check_parts(store, pdir, man)
        except _Replaced:
            time.sleep(0.01)
    raise StoreCorruptError(f"{pdir}: its manifest kept changing while it was verified; is a writer looping?")


class _Replaced(Exception):
    """The manifest verify was checking was replaced by a commit: check the new one."""


def _unmanifested(root: Path, pdir: Path, names: list[str], repair: bool) -> list[Problem]:
    files = [n for n in names if (pdir / n).is_file()]
    if pdir.name.startswith("symbol="):  # a symbol folder: its adjust= partitions are checked on their own
        names = files
    if not names:
        return []
    parts = [n for n in files if n.endswith(".parquet")]
    if not parts:  # only temp files of a first write that never got as far as a part: nothing to keep
        if repair:
            for n in names:
                (pdir / n).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                pdir.rmdir()
        return [Problem(str(pdir), f"no manifest; {len(names)} temp file(s) of an interrupted first write",
                        repair and not any((pdir / n).exists() for n in names), True)]
    if not repair:
        return [Problem(str(pdir), f"no manifest; {len(files)} uncommitted file(s) from an interrupted write "
                        "(`fintensor cache verify --repair` moves them to the store's .quarantine folder)",
                        False, True)]
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%f")
    target = root / QUARANTINE / f"{str(pdir.relative_to(root)).replace(os.sep, '__')}-{stamp}"
    target.parent.mkdir(parents=True, exist_ok=True)
    if any((pdir / n).is_dir() for n in os.listdir(pdir)):  # a symbol folder that also holds adjust= partitions
        target.mkdir()
        for n in files:
            os.replace(pdir / n, target / n)
    else:
        os.replace(pdir, target)
    return [Problem(str(pdir), f"no manifest; its {len(files)} file(s) were moved to {target} (never deleted: "
                    "re-import the symbol, or delete that folder once you have checked it)", True, True)]


def _unlisted(pdir: Path, names: list[str], man: dict, repair: bool) -> list[Problem]:
    listed = {p["file"] for p in man["parts"]} | {"_manifest.json"}
    out = []
    for name in names:
        path = pdir / name
        if name in listed or not (path.is_file() or path.is_symlink()):
            continue
        if repair:
            path.unlink(missing_ok=True)
        out.append(Problem(str(path), "not listed in the manifest (leftover of an interrupted write)",
                           repair, True))
    return out


def _check_parts(store: Store, pdir: Path, man: dict) -> list[Problem]:
    kind = man["kind"]
    out = []
    for p in man["parts"]:
        path = pdir / p["file"]
        try:
            store._part_file(pdir, p)  # a remote store's part: fetched and verified into its mirror
        except StoreCorruptError as exc:
            out.append(Problem(str(path), str(exc).split(": ", 1)[-1].split("; it was not read")[0]))
            continue
        except FileNotFoundError:
            pass
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            if _manifest_changed(store, pdir, man):
                raise _Replaced from None
            out.append(Problem(str(path), "listed in the manifest but missing"))
            continue
        if len(data) != p["bytes"]:
            out.append(Problem(str(path), f"{len(data)} bytes, manifest says {p['bytes']} (truncated?)"))
            continue
        if sha256(data) != p["sha256"]:
            out.append(Problem(str(path), "checksum mismatch (corrupted)"))
            continue
        try:
            with pq.ParquetFile(pa.BufferReader(data)) as pf:
                _check_part_metadata(pf, p, kind, path)
                table = pf.read()
            _check_part_rows(_in_memory_instants(table), p, kind, path)
        except StoreCorruptError as exc:
            out.append(Problem(str(path), str(exc).split(": ", 1)[-1].split("; it was not used")[0]))
        except (pa.ArrowException, OSError) as exc:
            out.append(Problem(str(path), f"unreadable Parquet: {exc}"))
    return out


def _manifest_changed(store: Store, pdir: Path, man: dict) -> bool:
    try:
        return store._load_manifest(pdir) != man
    except StoreCorruptError:
        return True


def _verify_removals(root: Path, repair: bool) -> list[Problem]:
    out = []
    trash = ("bars/*/.trash-*", "bars/*/*/.trash-*", "ticks/.trash-*", "ticks/*/.trash-*")
    for junk in sorted({p for pattern in trash for p in root.glob(pattern)}):
        if repair:
            if junk.is_symlink() or not junk.is_dir():
                junk.unlink(missing_ok=True)  # a link is removed, never followed
            else:
                shutil.rmtree(junk, ignore_errors=True)
        out.append(Problem(str(junk), "leftover of an interrupted removal", repair and not os.path.lexists(junk),
                           True))
    return out


def _verify_aliases(store: Store, repair: bool) -> list[Problem]:
    path = store.root / ALIASES_FILE
    try:
        store.aliases()
        return []
    except StoreCorruptError as exc:
        message = str(exc).split(": ", 1)[-1].split(";")[0]
    if repair:
        store._write_aliases({})
        message += "; reset to an empty table (each symbol's alias is recorded again on its next import)"
    return [Problem(str(path), message, repair)]


def _verify_temps(root: Path, repair: bool) -> list[Problem]:
    """Temp files outside partitions: the alias table's (written under the lock we hold, so any we see is a
    leftover), the writability probe's and the tensor cache's (written without it: only old ones count)."""
    now = time.time()
    out = []
    locked = list(root.glob(".*.tmp"))
    unlocked = [p for p in [*root.glob(".probe-*"), *root.glob("tensors/.*.tmp")] if _age(p, now) > TEMP_GRACE_S]
    for junk in sorted(locked) + sorted(unlocked):
        if repair:
            junk.unlink(missing_ok=True)
        out.append(Problem(str(junk), "leftover of an interrupted write", repair, True))
    return out


def _age(path: Path, now: float) -> float:
    try:
        return now - path.lstat().st_mtime
    except FileNotFoundError:
        return 0.0
