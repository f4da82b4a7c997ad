"""Read one market-data file into cells: regular files only, bounded decompression (.gz, one-file .zip),
UTF-8 text with bounded lines, header or headerless, the vendor preset it matches. No unit or row checks:
those belong to the importer and the store.
"""
from __future__ import annotations

import csv
import dataclasses
import glob
import gzip
import io
import os
import re
import stat
import zipfile
import zlib
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from ..errors import BadInputError
from ..fileio import read_regular_file
from .presets import _BY_NAME, ALIASES, PRESETS, Preset

MAX_LINE_BYTES = 1 << 16
_DATA_NAME = re.compile(r"(?i)\.(csv|txt|tsv|dat)(\.gz)?$|\.(gz|zip)$")
#: Vendors' words for a missing value: FRED writes ".", Bloomberg "#N/A N/A", others "-" or "--".
MISSING = {"", "nan", "NaN", "NAN", "null", "NULL", "None", "NA", "N/A", "n/a", "#N/A", "#N/A N/A", ".", "-", "--"}


def _expand(paths, recursive: bool = True) -> list[tuple[Path, bool]]:
    """(file, named) for the files given by ``paths`` (files, directories, glob patterns), each file once
    however it is spelled. ``named``: the user named the file itself (a file found in a folder or by a
    pattern is not named: when it cannot be read it is skipped and reported, not fatal)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: dict[str, tuple[Path, bool]] = {}

    def add(path: Path, named: bool) -> None:
        key = os.path.realpath(path)
        if key not in out:
            out[key] = (path, named)

    def folder(path: Path) -> None:
        walk = path.rglob("*") if recursive else path.iterdir()
        files = sorted(f for f in walk if f.is_file() and not any(
            part.startswith(".") for part in f.relative_to(path).parts))
        if not files:
            deeper = "" if recursive else " (sub-folders are not read without --recursive)"
            raise BadInputError(f"{path}: the directory holds no files{deeper}")
        for f in files:
            add(f, False)

    for p in paths:
        text = os.fspath(p)
        if isinstance(p, str) and any(c in text for c in "*?[") and not Path(text).exists():
            hits = sorted(glob.glob(os.path.expanduser(text)))
            if not hits:
                raise BadInputError(f"{text}: no file matches this pattern")
            for h in map(Path, hits):
                folder(h) if h.is_dir() else add(h, False) if h.is_file() else None
            continue
        path = Path(text).expanduser()
        if path.is_dir():
            folder(path)
        elif path.is_file():
            add(path, True)
        else:
            raise BadInputError(f"{path}: {_not_a_file(path)}")
    if not out:
        raise BadInputError("no files given: pass one or more CSV files, directories or glob patterns")
    return list(out.values())


def _not_a_file(path: Path) -> str:
    """What is at ``path`` when it is not a regular file or folder, and what to do."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "no such file; check the path"
    except OSError as exc:
        return f"cannot read it ({exc.strerror})"
    what = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a character device" if stat.S_ISCHR(mode)
            else "a block device" if stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a file")
    return f"is {what}, not a regular file; import reads regular files (save the data to a file first)"


#: A compressed file may expand to at most this many bytes, and beyond UNPACKED_FREE bytes to at most
#: UNPACKED_RATIO times its own size (CSV compresses 3-20x; a "zip bomb" 1000x and more).
MAX_UNPACKED_BYTES = 4 << 30
UNPACKED_FREE = 64 << 20
UNPACKED_RATIO = 200
_CHUNK = 1 << 20


def _load_bytes(path: Path) -> tuple[bytes, str]:
    """The file's decompressed bytes and the name that describes its content (zip member, .gz stripped).

    Decompression is streamed and stops at the size/ratio limit, so a small bomb is refused in bounded memory.
    """
    try:
        data = read_regular_file(path, "file")
    except BadInputError:
        raise BadInputError(f"{path}: {_not_a_file(path)}") from None
    except OSError as exc:
        raise BadInputError(f"{path}: cannot read it ({exc.strerror})") from None
    name = path.name
    if data[:2] == b"\x1f\x8b":
        try:
            data = _bounded(gzip.GzipFile(fileobj=io.BytesIO(data)), len(data), path)
        except (OSError, EOFError, zlib.error) as exc:
            raise BadInputError(f"{path}: damaged gzip file ({exc})") from None
        name = name[:-3] if name.lower().endswith(".gz") else name
    elif data[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                members = [i for i in zf.infolist() if not i.is_dir() and not i.filename.startswith("__MACOSX")]
                if len(members) != 1:
                    raise BadInputError(f"{path}: the zip holds {len(members)} files; import_csv reads zips with "
                                        "exactly one CSV inside (unzip it and pass the files)")
                member = members[0]
                if member.flag_bits & 0x1:
                    raise BadInputError(f"{path}: the zip is encrypted (password-protected); unzip it with its "
                                        "password and import the CSV")
                with zf.open(member) as fh:
                    data, name = _bounded(fh, len(data), path), Path(member.filename).name
        except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
            raise BadInputError(f"{path}: damaged zip file ({exc})") from None
        except (NotImplementedError, RuntimeError) as exc:  # compression method zipfile lacks; encryption
            raise BadInputError(f"{path}: unsupported zip ({exc}); re-pack it with plain deflate (zip -r) "
                                "or unzip it and import the CSV") from None
    return data, name


def _bounded(stream, packed: int, path: Path) -> bytes:
    """Read a decompressing stream in chunks, refusing output past the size/ratio limit."""
    limit = min(MAX_UNPACKED_BYTES, max(UNPACKED_FREE, UNPACKED_RATIO * packed))
    chunks, size = [], 0
    while chunk := stream.read(_CHUNK):
        size += len(chunk)
        if size > limit:
            raise BadInputError(f"{path}: expands to more than {limit:,} bytes from {packed:,} "
                                f"(over {size // max(packed, 1):,}x); refused as a likely decompression bomb "
                                "(decompress it yourself if it is real data)")
        chunks.append(chunk)
    return b"".join(chunks)


def _read_text(path: Path, data: bytes) -> str:
    """Decoded text, or one clear error for empty, binary or non-CSV content."""
    if not data.strip():
        raise BadInputError(f"{path}: the file is empty; nothing to import")
    if b"\x00" in data:
        raise BadInputError(f"{path}: binary content (NUL bytes), not a CSV file")
    newlines = np.flatnonzero(np.frombuffer(data, np.uint8) == 10)
    bounds = np.r_[-1, newlines, len(data)]
    lengths = np.diff(bounds) - 1
    if lengths.max() > MAX_LINE_BYTES:
        line = int(np.argmax(lengths)) + 1
        raise BadInputError(f"{path}: line {line} is {int(lengths.max()):,} bytes long; a CSV line is at most "
                            f"{MAX_LINE_BYTES:,} (is this really a CSV file?)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise BadInputError(f"{path}: line {line} is not UTF-8 text (a binary file, or another encoding: "
                            "convert it to UTF-8)") from None


@dataclasses.dataclass
class _Raw:
    """A file: its header (None when headerless), first data row, and, once read, cells and line numbers."""

    path: Path
    name: str                 # content name: the zip member, or the file name without .gz
    text: str
    sep: str
    header: list[str] | None
    first: list[str]          # the first data row's fields
    cells: pd.DataFrame | None = None   # columns 0..n-1: str for text columns, numbers for value columns
    lines: np.ndarray | None = None     # each row's line number in the file

    @property
    def names(self) -> list[str]:
        return [h.lower() for h in self.header] if self.header else []


def _head(path: Path) -> _Raw:
    """Decode the file and read its first lines: enough to pick a preset and map columns."""
    data, name = _load_bytes(path)
    text = _read_text(path, data)
    rows = [r for r in text.split("\n", 3)[:3] if r.strip()]
    first_line = rows[0].rstrip("\r")
    sep = max(",\t;|", key=first_line.count)
    first = next(csv.reader([first_line], delimiter=sep))
    head = first[0].strip().lower()
    named = head in ALIASES or head == "" or head.startswith("unnamed:")  # 'date,000001,600519' is a header
    if not named and any(_is_number(f) for f in first):
        return _Raw(path, name, text, sep, None, first)
    if len(rows) < 2:
        raise BadInputError(f"{path}: no data rows (only a header); nothing to import")
    header = [h.strip() for h in first]
    if header[0] == "" or header[0].lower().startswith("unnamed:"):  # DataFrame.to_csv(): the index column
        dated = any(ALIASES.get(h.lower()) in ("date", "datetime") for h in header[1:])
        header[0] = "index" if dated else "date"  # a RangeIndex beside a date column, else the date index
    first = next(csv.reader([rows[1].rstrip("\r")], delimiter=sep))
    if len(first) == len(header) + 1 and header[0].lower() in ("date", "day") and _looks_like_time(first[1]):
        header.insert(1, "time")  # backtrader futures: 7 names over 8 fields "date,time,..."
    elif len(first) != len(header):
        raise BadInputError(f"{path}: the header names {len(header)} columns but line 2 has {len(first)} fields")
    return _Raw(path, name, text, sep, header, first)


def _read_body(raw: _Raw, text_columns: Iterable[int]) -> None:
    """Parse every row: text columns as str, the rest by pandas' C parser (a bad cell leaves a str column)."""
    try:
        cells = pd.read_csv(io.StringIO(raw.text), sep=raw.sep, header=None, skiprows=1 if raw.header else 0,
                            dtype={i: str for i in text_columns}, keep_default_na=False, na_values=sorted(MISSING),
                            skip_blank_lines=False, engine="c")
    except pd.errors.ParserError as exc:
        raise BadInputError(f"{raw.path}: cannot parse the CSV ({str(exc).strip()})") from None
    lines = np.arange(len(cells)) + (2 if raw.header else 1)
    filled = cells.notna().any(axis=1).to_numpy()
    if not filled.all():
        cells, lines = cells[filled].reset_index(drop=True), lines[filled]
    for i in text_columns:
        cells[i] = cells[i].fillna("")
    raw.cells, raw.lines = cells, lines


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _looks_like_time(text: str) -> bool:
    return bool(re.fullmatch(r"\d{1,2}:\d{2}(:\d{2}(\.\d+)?)?", str(text).strip()))


# ------------------------------------------------------------------------------------ preset choice
def _detect(raw: _Raw, preset: Preset | None) -> Preset:
    """The preset the user chose, else the first that matches the file, else plain 'csv'."""
    if preset is not None:
        return preset
    found = next((p for p in PRESETS if _matches(p, raw)), None)
    if found is None and raw.header is None:
        raise BadInputError(f"{raw.path}: no header and not a known headerless layout (LEAN/AlgoSeek); "
                            "add a header line or pass format= (CLI: --format)")
    return found or _BY_NAME["csv"]


def _matches(p: Preset, raw: _Raw) -> bool:
    if raw.header is None:
        names = p.columns or ()
        if len(names) != len(raw.first) or not re.search(p.file_pattern or "^$", raw.name):
            return False
    else:
        names = raw.names
        if p.columns or not ((p.signature and p.signature <= set(names)) or p.header == tuple(names)):
            return False
    if p.first_row is None:
        return True
    field, pattern = p.first_row
    return re.fullmatch(pattern, raw.first[list(names).index(field)].strip()) is not None

