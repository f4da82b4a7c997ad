"""A store read from an object store (S3, GCS, HDFS, ``file://``...): a lazily filled, checksum-verified local mirror.

``Store("s3://bucket/prefix")`` keeps the URI and reads everything from a local folder,
``<fintensor home>/remote/<sha256(uri)[:16]>/``, laid out exactly like a local store, so every read path of
``Store`` (read, read_ticks, manifest, list, files, fingerprint, verify, ``ft.build``) runs unchanged on it:

- on first use, a ``Store`` instance copies the snapshot's metadata: ``aliases.json`` and every
  ``_manifest.json`` under the remote ``bars/`` and ``ticks/`` (each written into the mirror atomically);
  mirror files the new manifests no longer list (superseded or removed partitions) are deleted;
- part files are fetched when a read needs them, and only kept when their size and SHA-256 match the
  manifest's entry (a damaged remote part is a ``StoreCorruptError``, never returned); a part already in
  the mirror with the right size and SHA-256 is not fetched again.

One snapshot per ``Store`` instance: a new ``Store(uri)`` sees manifests committed remotely since (an instance
moves to the newest snapshot only when a part of its own is gone remotely, superseded by a newer one). Writes
are refused (``Store._ensure_writable``): fintensor's commit protocol needs an atomic rename and a lock,
which object stores do not give; write to a local store and upload its committed files instead.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .errors import BadInputError, StoreCorruptError
from .fileio import atomic_write_bytes, is_temp, sha256

ALIASES = "aliases.json"
MANIFEST = "_manifest.json"


def is_uri(root) -> bool:
    """True for a store root given as a URI string (``scheme://...``), not a local path."""
    return isinstance(root, str) and "://" in root


def mirror_dir(home: Path, uri: str) -> Path:
    """The local mirror folder of the store at ``uri``."""
    return Path(home) / "remote" / hashlib.sha256(uri.encode()).hexdigest()[:16]


class RemoteMirror:
    """The pyarrow FileSystem and base path of a remote store, and the local folder mirroring it."""

    def __init__(self, uri: str, home: Path, filesystem=None):
        import pyarrow as pa
        import pyarrow.fs as pafs

        self.uri = uri
        if filesystem is not None:  # a FileSystem object given: the "URI" is a path in it
            self.fs, self.base = filesystem, uri.split("://", 1)[-1] if "://" in uri else uri
        else:
            try:
                self.fs, self.base = pafs.FileSystem.from_uri(uri)
            except (pa.ArrowException, OSError, ValueError) as exc:
                raise BadInputError(
                    f"cannot open the store at {uri} ({_reason(exc)}); give a local path or a URI pyarrow's file "
                    "systems read (s3://, gs://, hdfs://, file:///abs/path), with pyarrow built with that "
                    "file system's support and its credentials set (e.g. AWS_ACCESS_KEY_ID / AWS_PROFILE for S3)"
                ) from None
        self.base = self.base.rstrip("/")
        self.root = mirror_dir(home, uri)
        self.synced = False
        self.fetched = 0  # part files fetched by this instance (tests count them)
        self._good: set[tuple[str, str]] = set()  # (mirror path, sha256) verified by this instance

    def _remote(self, rel: str) -> str:
        return f"{self.base}/{rel}" if self.base else rel

    def where(self, local: Path) -> str:
        """The remote address of a mirror path (for messages)."""
        return f"{self.uri.rstrip('/')}/{local.relative_to(self.root).as_posix()}"

    # ------------------------------------------------------------------------------------ metadata
    def sync(self) -> None:
        """Copy the snapshot's alias table and manifests into the mirror (once per instance)."""
        if self.synced:
            return
        import pyarrow as pa
        import pyarrow.fs as pafs

        try:
            if self.fs.get_file_info(self.base or "/").type == pafs.FileType.NotFound:
                raise BadInputError(f"there is no store at {self.uri} (nothing at that path); check the URI")
            found = {}
            for top in ("bars", "ticks"):
                sel = pafs.FileSelector(self._remote(top), recursive=True, allow_not_found=True)
                for info in self.fs.get_file_info(sel):
                    if info.type == pafs.FileType.File and info.base_name in (MANIFEST, ALIASES):
                        rel = info.path[len(self.base):].lstrip("/") if self.base else info.path.lstrip("/")
                        found[rel] = self._get(rel)
            aliases = self.fs.get_file_info(self._remote(ALIASES))
            if aliases.type == pafs.FileType.File:
                found[ALIASES] = self._get(ALIASES)
        except BadInputError:
            raise
        except (pa.ArrowException, OSError) as exc:
            raise StoreCorruptError(
                f"cannot read the store at {self.uri} ({_reason(exc)}); check the URI, the network and the "
                "credentials (e.g. AWS_PROFILE / GOOGLE_APPLICATION_CREDENTIALS), then retry") from None
        self.root.mkdir(parents=True, exist_ok=True)
        for rel, data in found.items():
            local = self.root / rel
            if not (local.is_file() and local.read_bytes() == data):
                local.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(local, data)
        if ALIASES not in found:
            (self.root / ALIASES).unlink(missing_ok=True)
        self._prune(found)
        self.synced = True

    def _prune(self, found: dict[str, bytes]) -> None:
        """Delete mirror files of this snapshot's partitions that their manifests do not list, and every file
        of partitions that are gone remotely (temp files of a concurrent fetch are left alone)."""
        keep = set(found)
        for rel, data in found.items():
            if rel.endswith(MANIFEST):
                try:
                    parts = json.loads(data)["parts"]
                    keep.update(f"{rel[:-len(MANIFEST)]}{p['file']}" for p in parts)
                except (ValueError, KeyError, TypeError):  # damaged: readers refuse it; keep its files
                    folder = rel[:-len(MANIFEST)]
                    keep.update(p.relative_to(self.root).as_posix() for p in (self.root / folder).glob("*"))
        for top in ("bars", "ticks"):
            for path in (self.root / top).rglob("*"):
                if path.is_file() and not is_temp(path.name) and path.relative_to(self.root).as_posix() not in keep:
                    path.unlink(missing_ok=True)

    def _get(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self._remote(rel)) as fh:
            return fh.read()

    # --------------------------------------------------------------------------------------- parts
    def ensure_part(self, local: Path, entry: dict) -> None:
        """Make ``local`` (a part file in the mirror) hold the bytes ``entry`` (its manifest entry) lists:
        kept when its size and SHA-256 match, else fetched, checked and written in atomically.

        A remote file of another size or checksum raises StoreCorruptError (nothing is written); a remote
        file that is gone raises FileNotFoundError (a writer replaced the snapshot: readers start again)."""
        key = (str(local), entry["sha256"])
        if key in self._good:
            return
        try:
            data = local.read_bytes()
        except FileNotFoundError:
            data = None
        if data is None or len(data) != entry["bytes"] or sha256(data) != entry["sha256"]:
            data = self._fetch(local)
            where = self.where(local)
            if len(data) != entry["bytes"]:
                raise StoreCorruptError(
                    f"{where}: {len(data)} bytes where the manifest says {entry['bytes']} (truncated or replaced); "
                    "it was not read. Re-upload the partition from a verified local store")
            if sha256(data) != entry["sha256"]:
                raise StoreCorruptError(
                    f"{where}: checksum mismatch (the remote file is corrupted); it was not read. Re-upload the "
                    "partition from a verified local store")
            local.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(local, data)
            self.fetched += 1
        self._good.add(key)

    def _fetch(self, local: Path) -> bytes:
        import pyarrow as pa

        rel = local.relative_to(self.root).as_posix()
        try:
            return self._get(rel)
        except FileNotFoundError:
            pass
        except (pa.ArrowException, OSError) as exc:
            if not ("not found" in str(exc).lower() or "does not exist" in str(exc).lower()):
                raise StoreCorruptError(f"cannot fetch {self.where(local)} ({_reason(exc)}); check the network "
                                        "and the credentials, then retry") from None
        return self._gone(local)

    def _gone(self, local: Path):
        """A part of this snapshot is missing remotely. If a newer snapshot superseded it, move to that one
        (FileNotFoundError: readers start again from the new manifest); if the newest remote manifest still
        lists it, the remote store is damaged (StoreCorruptError)."""
        self.synced = False
        self.sync()
        try:
            listed = local.name in {p["file"] for p in json.loads((local.parent / MANIFEST).read_bytes())["parts"]}
        except (OSError, ValueError, KeyError, TypeError):
            listed = False
        if listed:
            raise StoreCorruptError(f"{self.where(local)}: listed in the remote manifest but missing from the remote "
                                    "store; re-upload the partition from a verified local store")
        raise FileNotFoundError(self.where(local))


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__

