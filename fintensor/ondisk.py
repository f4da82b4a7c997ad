"""On-disk (time, stock, feature) panels that map without copying: the whole market's features bigger than RAM.

A panel is a directory::

    PATH/values.npy     (stock, time, feature) float32/float64, stock-major: one stock's rows are contiguous
    PATH/mask.npy       (stock, time, feature) bool, True where observed
    PATH/manifest.json  format, dims, shape, dtype, coords, meta, sha256 and size of each .npy, and the
                        sha256 of the manifest itself (over its canonical JSON without that field)

Stock-major order lets a writer append blocks of stocks sequentially (``PanelWriter``) and lets
``Windows`` read a sample's lookback rows as one contiguous run. ``load`` returns a StockTensor whose
values/mask are ``torch.from_numpy`` views of read-only ``np.memmap``s, permuted to (time, stock, feature):
nothing is read until it is used, and pages stay reclaimable file cache.

Crash rule (as the store's): a panel is built in a temp directory beside PATH and renamed into place after
every file and the manifest are fsynced; a killed build leaves at most a ``.NAME.<hex>.tmp`` directory,
never a PATH that claims to be complete. ``load`` verifies every checksum unless ``verify=False``.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from .errors import BadInputError, StoreCorruptError
from .fileio import fsync_dir, is_temp, temp_path
from .tensor import StockTensor, _coord_from_json, _coord_json

FORMAT = "fintensor.Panel/1"
DIMS = ("time", "stock", "feature")
FILES = ("values.npy", "mask.npy")
_HASH_CHUNK = 64 << 20


def _npy_header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    """The .npy header for a C-order array (what np.load / np.memmap expect before the data)."""
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                               "fortran_order": False, "shape": tuple(int(s) for s in shape)})
    return buf.getvalue()


def _manifest_digest(manifest: Mapping[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _check_target(path: Path) -> None:
    """Refuse to replace anything but a missing path or an earlier panel (a directory with our manifest)."""
    if path.is_symlink():
        raise BadInputError(f"panel path {path} is a symbolic link; give its target or another path")
    if path.exists():
        if not path.is_dir() or not (path / "manifest.json").is_file() and any(path.iterdir()):
            raise BadInputError(f"panel path {path} exists and is not a fintensor panel; choose another path "
                                "or remove it")


class PanelWriter:
    """Writes a panel block of stocks by block of stocks, in order; ``commit()`` makes it appear at PATH.

    Blocks go through ordinary file writes (not a writable map), so written pages are page cache, not the
    writer's RSS; both files are hashed as they are written. Use as a context manager: leaving it without
    ``commit()`` (an error) removes the temp directory.
    """

    def __init__(self, path: str | os.PathLike, times: np.ndarray, stocks: np.ndarray, features, dtype,
                 meta: Mapping[str, Any] | None = None):
        self.path = Path(path)
        _check_target(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for old in self.path.parent.iterdir():  # leftovers of killed builds of this panel
            if is_temp(old.name, self.path.name) and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
        self.dtype = np.dtype(dtype)
        self.coords = {"time": np.asarray(times), "stock": np.asarray(stocks), "feature": np.asarray(features)}
        self.shape = (len(stocks), len(times), len(features))  # stored (stock, time, feature)
        self.meta = dict(meta or {})
        self.tmp = temp_path(self.path)
        self.tmp.mkdir()
        self.files, self.hashes = {}, {}
        for name, dt_ in zip(FILES, (self.dtype, np.dtype(bool))):
            f = open(self.tmp / name, "wb")
            header = _npy_header(self.shape, dt_)
            f.write(header)
            self.files[name], self.hashes[name] = f, hashlib.sha256(header)
        self.written = 0  # stocks

    def write(self, values: np.ndarray, mask: np.ndarray) -> None:
        """Append the next block of stocks: ``values`` and ``mask`` of shape (stocks, time, feature)."""
        n = values.shape[0]
        if values.shape[1:] != self.shape[1:] or mask.shape != values.shape or self.written + n > self.shape[0]:
            raise BadInputError(f"block of shape {values.shape} does not fit panel {self.shape} after "
                                f"{self.written} stocks")
        for name, arr in zip(FILES, (np.ascontiguousarray(values, self.dtype), np.ascontiguousarray(mask, bool))):
            view = memoryview(arr).cast("B")
            self.files[name].write(view)
            self.hashes[name].update(view)
        self.written += n

    def commit(self) -> Path:
        """fsync the files, write the manifest, rename the directory into place."""
        if self.written != self.shape[0]:
            raise BadInputError(f"panel has {self.written} of {self.shape[0]} stocks written")
        files = {}
        for name, f in self.files.items():
            f.flush()
            os.fsync(f.fileno())
            files[name] = {"sha256": self.hashes[name].hexdigest(), "bytes": f.tell()}
            f.close()
        manifest = {"format": FORMAT, "dims": list(DIMS), "layout": ["stock", "time", "feature"],
                    "shape": [self.shape[1], self.shape[0], self.shape[2]], "dtype": self.dtype.name,
                    "coords": {d: _coord_json(c) for d, c in self.coords.items()}, "meta": self.meta,
                    "files": files}
        manifest["sha256"] = _manifest_digest(manifest)
        with open(self.tmp / "manifest.json", "w") as f:
            json.dump(manifest, f)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(self.tmp)
        old = None
        if self.path.exists():  # an earlier panel: moved aside, replaced, then removed
            old = temp_path(self.path)
            os.rename(self.path, old)
        os.rename(self.tmp, self.path)
        fsync_dir(self.path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.path

    def abort(self) -> None:
        for f in self.files.values():
            f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "PanelWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None or self.tmp.exists():
            self.abort()


def json_meta(meta: Mapping[str, Any]) -> dict:
    """The entries of ``meta`` a panel manifest can hold (JSON values); the others are not kept."""
    def jsonable(v) -> bool:
        try:
            json.dumps(v)
            return True
        except (TypeError, ValueError):
            return False

    return {k: v for k, v in meta.items() if jsonable(v)}


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(path: str | os.PathLike, verify: bool = True) -> dict:
    """The panel's manifest, checked (and, with ``verify``, every file's sha256)."""
    path = Path(path)
    where = path / "manifest.json"
    if not where.is_file():
        raise StoreCorruptError(f"{path} is not a complete fintensor panel (no manifest.json: a build that did "
                                "not finish?); compute it again")
    try:
        manifest = json.loads(where.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise StoreCorruptError(f"{where} is damaged ({e}); compute the panel again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StoreCorruptError(f"{where} is not a {FORMAT} manifest; compute the panel again")
    if manifest.get("sha256") != _manifest_digest(manifest):
        raise StoreCorruptError(f"{where} fails its checksum (damaged or edited); compute the panel again")
    for name in FILES:
        spec, file = manifest["files"][name], path / name
        if not file.is_file() or file.stat().st_size != spec["bytes"]:
            raise StoreCorruptError(f"{file} is missing or has the wrong size; compute the panel again")
        if verify and _file_sha256(file) != spec["sha256"]:
            raise StoreCorruptError(f"{file} fails its checksum (damaged); compute the panel again")
    return manifest


def load(path: str | os.PathLike, verify: bool = True) -> StockTensor:
    """The panel at ``path`` as a (time, stock, feature) StockTensor backed by read-only memory maps.

    ``verify=False`` skips hashing the data files (sizes and the manifest's own checksum are still checked):
    for a panel this process just wrote, or when a full read is too slow."""
    path = Path(path)
    manifest = read_manifest(path, verify)
    T, N, F = manifest["shape"]
    values = np.load(path / "values.npy", mmap_mode="r", allow_pickle=False)
    mask = np.load(path / "mask.npy", mmap_mode="r", allow_pickle=False)
    if values.shape != (N, T, F) or mask.shape != (N, T, F):
        raise StoreCorruptError(f"{path}: files have shapes {values.shape}/{mask.shape}, manifest says {(N, T, F)}")
    import warnings

    with warnings.catch_warnings():  # torch warns that the map is read-only: it is, on purpose
        warnings.simplefilter("ignore", UserWarning)
        v, m = torch.from_numpy(values), torch.from_numpy(mask)
    coords = {d: _coord_from_json(c) for d, c in manifest["coords"].items()}
    meta = {**manifest["meta"], "panel": str(path)}
    return StockTensor(v.permute(1, 0, 2), DIMS, coords, mask=m.permute(1, 0, 2), meta=meta)


def stock_major(t: StockTensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The (stock, time, feature) values and mask a panel-backed tensor is a view of, or None when ``t`` is
    not laid out stock-major (then its values are ordinary (time, stock, feature) memory)."""
    if not isinstance(t, StockTensor) or tuple(t.dims) != DIMS or "panel" not in t.meta:
        return None
    v, m = t.values.permute(1, 0, 2), t.mask.permute(1, 0, 2)
    return (v, m) if v.is_contiguous() and m.is_contiguous() else None


_MADV = {"normal": 0, "random": 1, "sequential": 2}  # Linux and macOS share these three values


def advise(x: torch.Tensor, pattern: str) -> bool:
    """Tell the kernel how the memory of ``x`` (a view of a map) will be read: ``"random"`` turns off the
    read-around a page fault on a file map triggers (as large as the device's read-ahead, 8 MiB on this
    project's machine: random minibatches then read megabytes per window and, when the page cache is
    bounded, evict the windows they need); ``"sequential"`` or ``"normal"`` restore read-ahead. Returns
    False where the platform has no madvise (nothing changes then)."""
    import ctypes
    import ctypes.util
    import mmap

    if pattern not in _MADV:
        raise BadInputError(f"unknown access pattern {pattern!r}; use one of {sorted(_MADV)}")
    if x.numel() == 0 or os.name != "posix":
        return False
    page = mmap.PAGESIZE
    start = x.data_ptr() // page * page
    length = x.data_ptr() + x.numel() * x.element_size() - start
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    except OSError:
        return False
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), _MADV[pattern]) == 0
