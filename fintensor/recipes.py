"""Dataset recipes: a TOML file that names a tensor (universe, range, interval or tick freq, fields,
calendar, adjustment) and, optionally, where to get data the store lacks.

    symbols = ["000001.XSHE", "600519.XSHG"]
    start = "2019-01-01"
    end = "2019-12-31"
    fields = ["close", "volume"]
    [source]
    files = ["${FINTENSOR_DATA}/cn_daily/baostock_qfq/panel_2018-01_2020-08/000001.SZ.csv"]

Recipes are data (tomllib, never executed). Paths are only ever read: ``~``, ``${FINTENSOR_DATA}`` (default:
``../shared/data`` beside the repository holding the recipe's folder) and paths relative to the recipe.
The only writes are to the store (imports, downloads, the tensor cache) and to an output the caller names.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import glob
import os
import re
import sys
from pathlib import Path
from typing import Any

from . import fileio
from .errors import BadInputError, MissingDataError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DATE = (str, dt.date)
#: key -> (accepted types, what to write)
KEYS: dict[str, tuple[tuple, str]] = {
    "description": ((str,), "a string"),
    "symbols": ((list,), "a list of symbols"),
    "start": (DATE, "a date like 2019-01-01"),
    "end": (DATE, "a date like 2019-12-31"),
    "interval": ((str,), "'1d', '1m', ... (or 'tick' with freq)"),
    "freq": ((str,), "a tick slot length like '3s' or '1min'"),
    "fields": ((list,), "a list of field names"),
    "calendar": ((str,), "an exchange calendar like 'XSHG', 'XNYS' or 'union'"),
    "adjust": ((str,), "'raw', 'split', 'full' or 'as_stored'"),
    "label": ((str,), "'start' or 'end' (weekly/monthly period labels)"),
    "fill": ((str,), "'ffill'"),
    "fill_limit": ((int,), "a whole number of sessions"),
    "dtype": ((str,), "'float32' or 'float64'"),
    "source": ((dict,), "a [source] table"),
}
SOURCE_KEYS: dict[str, tuple[tuple, str]] = {
    "files": ((list,), "a list of paths or globs"),
    "format": ((str,), "an import format name such as 'baostock' or 'hikyuu_ticks'"),
    "yahoo": ((bool,), "true or false"),
}
REQUIRED = ("symbols", "start", "end")
#: Recipes are a few lines of TOML: anything larger is not one (and /dev/zero must not be read forever).
MAX_RECIPE_BYTES = 1 << 20


def _check_keys(table: dict, spec: dict, where: str) -> None:
    for key, value in table.items():
        if key not in spec:
            raise BadInputError(f"{where}: unknown key {key!r}; allowed keys: {', '.join(spec)}")
        types, what = spec[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise BadInputError(f"{where}: key {key!r} must be {what}, got {type(value).__name__} {value!r}")
    for key in ("symbols", "fields", "files"):
        if key in table and not all(isinstance(x, str) for x in table[key]):
            raise BadInputError(f"{where}: every entry of {key!r} must be a string")


def data_root(base: Path | None) -> Path:
    """``$FINTENSOR_DATA``, else ``../shared/data`` beside the repository that holds the recipe's folder."""
    env = os.environ.get("FINTENSOR_DATA")
    if env:
        return Path(env).expanduser()
    return (base or Path.cwd()).resolve().parent.parent / "shared" / "data"


def _expand(pattern: str, base: Path | None, where: str) -> list[Path]:
    """One recipe path -> the files it names (``~``, ``${FINTENSOR_DATA}``, globs, relative to the recipe)."""
    text = pattern.replace("${FINTENSOR_DATA}", str(data_root(base))).replace("$FINTENSOR_DATA", str(data_root(base)))
    other = re.search(r"\$\{?\w+\}?", text)
    if other:
        raise BadInputError(f"{where}: path {pattern!r} uses {other.group(0)}; only ${{FINTENSOR_DATA}} and ~ "
                            "are expanded")
    path = Path(text).expanduser()
    if not path.is_absolute():
        path = (base or Path.cwd()) / path
    matches = sorted(Path(p) for p in glob.glob(str(path))) if glob.has_magic(str(path)) else \
        ([path] if path.exists() else [])
    if not matches:
        raise BadInputError(f"{where}: no file matches {pattern!r} (looked for {path}); set FINTENSOR_DATA to "
                            "the data folder or fix the path")
    return matches


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A validated recipe. ``build(store)`` imports or downloads what the store lacks, then builds."""

    symbols: tuple[str, ...]
    start: str
    end: str
    fields: tuple[str, ...] | None = None
    interval: str | None = None
    freq: str | None = None
    calendar: str | None = None
    adjust: str | None = None      # None: build's default ('full'); slots: as stored
    label: str = "start"
    fill: str | None = None
    fill_limit: int | None = None
    dtype: str = "float32"
    description: str = ""
    files: tuple[Path, ...] = ()
    format: str | None = None
    yahoo: bool = False
    path: Path | None = None

    @classmethod
    def from_dict(cls, table: dict[str, Any], base: Path | None = None, where: str = "recipe") -> "Recipe":
        """Validate a recipe table (unknown keys, wrong types, missing keys: one clear error each)."""
        _check_keys(table, KEYS, where)
        missing = [k for k in REQUIRED if k not in table]
        if missing:
            raise BadInputError(f"{where}: missing key(s) {', '.join(missing)}")
        source = dict(table.get("source", {}))
        _check_keys(source, SOURCE_KEYS, f"{where} [source]")
        if source.get("yahoo") and source.get("files"):
            raise BadInputError(f"{where} [source]: give files or yahoo = true, not both")
        if "fill_limit" in table and table.get("fill") != "ffill":
            raise BadInputError(f"{where}: fill_limit needs fill = 'ffill'")
        if table.get("fill") not in (None, "ffill"):
            raise BadInputError(f"{where}: key 'fill' must be 'ffill', got {table['fill']!r}")
        if table.get("dtype", "float32") not in ("float32", "float64"):
            raise BadInputError(f"{where}: key 'dtype' must be 'float32' or 'float64', got {table['dtype']!r}")
        files = tuple(p for f in source.get("files", []) for p in _expand(f, base, f"{where} [source]"))
        return cls(symbols=tuple(table["symbols"]), start=str(table["start"]), end=str(table["end"]),
                   fields=tuple(table["fields"]) if "fields" in table else None,
                   interval=table.get("interval"), freq=table.get("freq"), calendar=table.get("calendar"),
                   adjust=table.get("adjust"), label=table.get("label", "start"), fill=table.get("fill"),
                   fill_limit=table.get("fill_limit"),
                   dtype=table.get("dtype", "float32"), description=table.get("description", ""), files=files,
                   format=source.get("format"), yahoo=bool(source.get("yahoo", False)))

    @property
    def ticks(self) -> bool:
        return self.freq is not None

    def build(self, store=None, cache: bool = True, quiet: bool = True, build_bars=None):
        """The tensor this recipe names; data the store lacks comes from [source] when there is one.
        ``build_bars``: what builds bars in place of ``ft.build`` (same arguments), e.g. ``cluster.build``."""
        if build_bars is not None and self.ticks:
            raise BadInputError("a tick recipe builds in one process; drop the Ray option (it builds bars)")
        if self.files and self._lacks_adjustment(store):  # local files only: never a download per build
            self.fetch(store, quiet=quiet)  # e.g. raw prices stored, the recipe's source is forward-adjusted
            return self._build(store, cache, build_bars)
        try:
            return self._build(store, cache, build_bars)
        except MissingDataError:
            if not (self.files or self.yahoo):
                raise
        self.fetch(store, quiet=quiet)
        return self._build(store, cache, build_bars)

    def _lacks_adjustment(self, store) -> bool:
        """Whether a symbol's bars are stored, but not in the adjustment this recipe asks for (its source
        then is imported beside them rather than converting, or failing to convert, what is stored)."""
        from .builder import _as_store

        want = self.adjust or "full"
        if self.ticks or want == "as_stored":
            return False
        st = _as_store(store)
        interval = self.interval or "1d"
        held = [st.adjustments(s, interval) for s in self.symbols]
        return any(h and want not in h for h in held)

    def _build(self, store, cache: bool, build_bars=None):
        import torch

        from .builder import build, build_ticks

        build = build_bars or build

        dtype = torch.float64 if self.dtype == "float64" else torch.float32
        if self.ticks:
            return build_ticks(self.symbols, self.start, self.end, freq=self.freq,
                               fields=self.fields or ("price", "volume"), store=store, calendar=self.calendar,
                               interval=self.interval, dtype=dtype, cache=cache,
                               adjust=self.adjust)
        fill = None if self.fill is None else (self.fill, self.fill_limit)
        return build(self.symbols, self.start, self.end, fields=self.fields or ("close",),
                     interval=self.interval or "1d", store=store, calendar=self.calendar, adjust=self.adjust or "full",
                     fill=fill, dtype=dtype, cache=cache, label=self.label)

    def fetch(self, store=None, quiet: bool = True):
        """Import the recipe's files (a no-op for rows already stored) or download from Yahoo."""
        if self.files:
            from .sources.files import import_csv

            options = {"format": self.format} if self.format else {}
            return import_csv(list(self.files), store=store, **options)
        if self.yahoo:
            from .sources.yahoo import download

            interval = "1d" if self.ticks else (self.interval or "1d")
            report = download(list(self.symbols), self.start, self.end, interval=interval, store=store,
                              quiet=quiet)
            check = getattr(report, "raise_for_status", None)
            if check:
                check()
            return report
        return None


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read and validate a recipe file."""
    path = Path(path)
    if not path.exists():
        raise BadInputError(f"no recipe at {path}; see datasets/*.toml for examples")
    raw = fileio.read_regular_file(path, "recipe", max_bytes=MAX_RECIPE_BYTES)
    try:
        table = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise BadInputError(f"recipe {path} is not valid TOML: {exc}") from None
    except RecursionError:
        raise BadInputError(f"recipe {path} nests arrays or tables too deeply to be a recipe") from None
    recipe = Recipe.from_dict(table, path.resolve().parent, where=f"recipe {path.name}")
    return dataclasses.replace(recipe, path=path)
