"""Files fintensor writes and later trusts: atomic writes, temp names, leftovers, output targets.

Every writer in the package goes through here, so a crash anywhere leaves either the old file or the new
one (never a mix), and every temp file has one recognisable name: ``.NAME.<32 hex>.tmp`` next to its
target, with no data suffix, so globs such as ``*.parquet`` never see it.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
import uuid
from pathlib import Path
from typing import BinaryIO, Iterator

from .errors import BadInputError

TEMP_NAME = re.compile(r"\.(?P<target>.+)\.(?P<token>[0-9a-f]{32})\.tmp")


def temp_path(path: Path) -> Path:
    """A unique temp file beside ``path`` (same file system, so the final rename is atomic)."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


def is_temp(name: str, target: str | None = None) -> bool:
    """True for a name :func:`temp_path` makes (for ``target``, when given)."""
    m = TEMP_NAME.fullmatch(name)
    return bool(m) and (target is None or m["target"] == target)


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (best effort: some file systems cannot fsync a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_output_path(path: str | os.PathLike, what: str = "output") -> Path:
    """Refuse an existing target that is not a regular file (a device, FIFO, directory or symlink):
    an atomic replace would swap it for a plain file (as root, ``--out /dev/null`` would replace it)."""
    path = Path(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return path
    except OSError as e:
        raise BadInputError(f"{what} {path}: cannot be written ({e.strerror}); choose another path") from None
    if stat.S_ISLNK(st.st_mode):
        raise BadInputError(f"{what} {path} is a symbolic link; fintensor does not write through links: "
                            "give the link's target or another path")
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise BadInputError(f"{what} {path} exists and is {kind}; give the path of a (new or existing) file")
    return path


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Write aside, fsync, rename over ``path``, fsync the directory: all of it or none of it.

    The temp file is removed on any error (a full disk, a killed write: nothing half-written stays).
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """:func:`atomic_writer` for bytes already in memory."""
    with atomic_writer(path) as fh:
        fh.write(data)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_regular_file(path: str | os.PathLike, what: str = "file", max_bytes: int | None = None) -> bytes:
    """Read a regular file whole, refusing a FIFO, device or directory (which would hang or never end) and
    anything larger than ``max_bytes``."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise BadInputError(f"{what} {path} does not exist") from None
    except OSError as e:
        raise BadInputError(f"{what} {path}: cannot be read ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise BadInputError(f"{what} {path} is not a regular file (a device, FIFO or directory); give a file")
    if max_bytes is not None and st.st_size > max_bytes:
        raise BadInputError(f"{what} {path} is {st.st_size:,} bytes, more than the {max_bytes:,} allowed")
    with open(path, "rb") as fh:
        data = fh.read(max_bytes + 1 if max_bytes is not None else -1)
    if max_bytes is not None and len(data) > max_bytes:
        raise BadInputError(f"{what} {path} is more than the {max_bytes:,} bytes allowed")
    return data
