"""The checks a store file must pass before it is trusted: manifests (fields, their own SHA-256, against
their parts' entries), the alias table (its SHA-256), and each part's Parquet footer and keys against its
manifest entry. Used by every reader and by ``verify``."""
from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import StoreCorruptError
from .fileio import sha256
from .schema import DISK_SCHEMAS, FORMAT_VERSION, KEYS, SCHEMAS, UTC_NS, UTC_US
from .store_rows import _key_scalar

@dataclasses.dataclass
class Problem:
    """One finding of ``Store.verify``: the file at fault and what is wrong with it."""

    path: str
    message: str
    repaired: bool = False
    leftover: bool = False  # a file of an interrupted write: harmless to fintensor, removed by repair=True

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" + (" (repaired)" if self.repaired else "")



_PART_NAME = re.compile(r"part-[0-9a-f]{16}\.parquet")
_MANIFEST_FIELDS = ("kind", "symbol", "interval", "source", "adjustment", "timezone", "units", "created",
                    "updated", "parts", "rows", "start", "end", "start_key", "end_key", "checksum")
_PART_FIELDS = ("file", "rows", "bytes", "sha256", "start", "end", "start_key", "end_key")


def _manifest_problem(m) -> str | None:
    """What is wrong with a parsed manifest (missing fields, foreign file names, bad checksum), or None."""
    if not isinstance(m, dict):
        return "is not a JSON object"
    missing = [f for f in _MANIFEST_FIELDS if f not in m]
    if missing:
        return f"lacks field(s) {missing}"
    fmt = m.get("format", 1)
    if not isinstance(fmt, int) or isinstance(fmt, bool) or not 1 <= fmt <= FORMAT_VERSION:
        return f"has format {fmt!r}, not one this fintensor understands (1 to {FORMAT_VERSION}); upgrade"
    if m["kind"] not in SCHEMAS:
        return f"has unknown kind {m['kind']!r}"
    parts = m["parts"]
    if not isinstance(parts, list) or not parts or not all(isinstance(p, dict) for p in parts):
        return "lists no parts"
    for p in parts:
        if any(f not in p for f in _PART_FIELDS) or not _PART_NAME.fullmatch(str(p["file"])) \
                or not all(isinstance(p[f], int) for f in ("rows", "bytes")):
            return f"has a malformed part entry {str(p)[:80]}"
    if m["rows"] != sum(p["rows"] for p in parts):
        return f"says {m['rows']} rows but its parts hold {sum(p['rows'] for p in parts)}"
    if m["checksum"] != sha256("".join(p["sha256"] for p in parts).encode()):
        return "checksum does not match its parts' checksums"
    if fmt >= 2 or "manifest_sha256" in m:  # format 1 had no checksum of its own: `cache migrate` adds one
        body = {k: v for k, v in m.items() if k != "manifest_sha256"}
        if m.get("manifest_sha256") != sha256(_canonical(body)):
            return "fails its own checksum (it was edited or damaged)"
    if (m["start"], m["end"], m["start_key"], m["end_key"]) != (
            parts[0]["start"], parts[-1]["end"], parts[0]["start_key"], parts[-1]["end_key"]):
        return "has a start/end that differs from its parts'"
    for a, b in zip(parts, parts[1:]):
        if not _key_scalar(a["end_key"]) < _key_scalar(b["start_key"]):
            return "lists parts whose key ranges overlap or are out of order"
    return None


ALIASES_FILE = "aliases.json"


def _canonical(obj) -> bytes:
    """The bytes a checksum covers: compact JSON with sorted keys (independent of indentation)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def manifest_bytes(manifest: dict) -> bytes:
    """A manifest as written: its fields plus ``manifest_sha256``, a SHA-256 over all the other fields."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return json.dumps({**body, "manifest_sha256": sha256(_canonical(body))}, indent=1, sort_keys=True).encode()


def _aliases_problem(raw: bytes) -> str | None:
    try:
        table = json.loads(raw)
    except ValueError:
        return "is not valid JSON"
    if not isinstance(table, dict):
        return "is not a JSON object"
    if "sha256" in table or "aliases" in table:
        body = {k: v for k, v in table.items() if k != "sha256"}
        if set(table) != {"aliases", "sha256"} or table["sha256"] != sha256(_canonical(body)):
            return "fails its checksum"
        table = table["aliases"]
    if not isinstance(table, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in table.items()):
        return "is not a mapping of spellings to symbols"
    return None


def _part_damaged(path, what: str) -> StoreCorruptError:
    return StoreCorruptError(f"{path}: {what}; it was not used. Run `fintensor cache verify`, then re-import the "
                             "symbol or remove it with `fintensor cache rm`")


def _check_part_metadata(pf: pq.ParquetFile, part: dict, kind: str, path) -> None:
    """The part's Parquet footer against its manifest entry: row count and schema (cheap: no data read)."""
    metadata = pf.metadata
    if metadata.num_rows != part["rows"]:
        raise _part_damaged(path, f"{metadata.num_rows} rows where the manifest says {part['rows']}")
    if metadata.num_columns != len(SCHEMAS[kind]):
        raise _part_damaged(path, "schema differs from the store's")
    schema = pf.schema_arrow
    if not (schema.equals(DISK_SCHEMAS[kind]) or _in_memory_schema(schema).equals(SCHEMAS[kind])):
        raise _part_damaged(path, "schema differs from the store's")


def _check_part_rows(table: pa.Table, part: dict, kind: str, path) -> pa.Table:
    """Key order and first/last key against the manifest entry, when the key columns were read."""
    if table.num_rows != part["rows"]:
        raise _part_damaged(path, f"{table.num_rows} rows where the manifest says {part['rows']}")
    if not all(k in table.column_names for k in KEYS[kind]) or table.num_rows == 0:
        return table
    if kind == "ticks":
        t = table.column("time").cast(pa.int64()).to_numpy()
        q = table.column("seq").cast(pa.int64()).fill_null(-1).to_numpy()
        ordered = bool(((t[1:] > t[:-1]) | ((t[1:] == t[:-1]) & (q[1:] > q[:-1]))).all())
        first, last = [int(t[0]), int(q[0])], [int(t[-1]), int(q[-1])]
    else:  # the key column has no nulls (conform refuses them): read its values buffer in place
        col = table.column(KEYS[kind][0])
        col = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
        width = 4 if kind == "daily" else 8
        keys = np.frombuffer(col.buffers()[1], np.int32 if width == 4 else np.int64, len(col), col.offset * width)
        ordered = bool((keys[1:] > keys[:-1]).all())
        first, last = int(keys[0]), int(keys[-1])
    if not ordered:
        raise _part_damaged(path, "rows are not sorted by a unique key")
    if first != part["start_key"] or last != part["end_key"]:
        raise _part_damaged(path, "first/last key differs from the manifest's")
    return table


def _in_memory_schema(schema: pa.Schema) -> pa.Schema:
    """A part's schema as readers return it (format 2 stores instants in us, format 1 in ns)."""
    return pa.schema([pa.field(f.name, UTC_NS) if f.type == UTC_US else f for f in schema])


def _in_memory_instants(table: pa.Table) -> pa.Table:
    """Cast a part's microsecond ``time`` to the nanosecond instants every reader returns."""
    if "time" in table.column_names and table.schema.field("time").type == UTC_US:
        i = table.schema.get_field_index("time")
        table = table.set_column(i, "time", table.column("time").cast(UTC_NS))
    return table
