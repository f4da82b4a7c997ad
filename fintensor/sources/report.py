"""What an import did: per symbol and interval rows read, added, updated, unchanged; warnings; skipped files."""
from __future__ import annotations

import dataclasses

from .. import symbols as _symbols
from ..errors import FintensorError


@dataclasses.dataclass
class SymbolResult:
    """What the import did for one symbol and interval (ticks: summed over their dates)."""

    symbol: str
    interval: str               # "1d", "1m", ... or "tick"
    rows: int                   # rows sent to the store: read - dropped = added + updated + unchanged
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    partitions: list[str] = dataclasses.field(default_factory=list)
    files: list[str] = dataclasses.field(default_factory=list)
    format: str = ""
    adjustment: str = "raw"
    adjusted_as_of: str | None = None
    units: dict = dataclasses.field(default_factory=dict)
    alias: str | None = None
    warnings: list[str] = dataclasses.field(default_factory=list)
    read: int = 0               # data rows of the files for this symbol
    dropped: dict = dataclasses.field(default_factory=dict)  # why -> rows not stored (duplicates, empty, ...)

    ok = True  # a symbol that could not be imported stops the import (named files) or skips its file

    @property
    def message(self) -> str:
        dropped = ", ".join(f"{n} dropped ({why})" for why, n in self.dropped.items())
        return f"{self.interval}, {self.added} added, {self.updated} updated, {self.unchanged} unchanged" + \
            (f"; {dropped}" if dropped else "")

    @property
    def status(self) -> str:
        """added / updated / unchanged: what the import did to the store for this symbol."""
        return "added" if self.added else "updated" if self.updated else "unchanged"

    @property
    def partition(self) -> str:
        return self.partitions[0] if len(self.partitions) == 1 else f"{len(self.partitions)} partitions"

    def __str__(self) -> str:
        adj = self.adjustment + (f" as of {self.adjusted_as_of}" if self.adjusted_as_of else "")
        files = self.files[0] if len(self.files) == 1 else f"{len(self.files)} files"
        dropped = "".join(f", {n} dropped ({why})" for why, n in self.dropped.items())
        read = f"; {self.read} read{dropped}" if self.dropped else ""
        return (f"{self.symbol} {self.interval}: {self.rows} rows, {self.added} added, {self.updated} updated, "
                f"{self.unchanged} unchanged{read} ({self.format}, {adj}, from {files})")


class IngestReport:
    """What every ingest (``ft.download``, ``ft.import_csv``) returns: per-symbol ``results`` with a
    ``status``, ``ok``, ``failed``, ``raise_for_status()`` (raises when something was not ingested), ``table()``
    and ``to_dict()`` (the CLI's ``--json``). Subclasses: ``yahoo.DownloadReport``, ``ImportReport``."""

    results: list

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def failed(self) -> list:
        return [r for r in self.results if not r.ok]

    def __iter__(self):
        return iter(self.results)

    def __len__(self) -> int:
        return len(self.results)

    def __getitem__(self, symbol: str):
        """The result for ``symbol`` in any spelling."""
        return _symbols.lookup(self.results, symbol)

    def table(self) -> str:
        """symbol, status, rows, message: one short line per symbol."""
        rows = [(r.symbol, r.status, str(r.rows), r.message) for r in self.results]
        return _table(("symbol", "status", "rows", "message"), rows)


def _table(head: tuple, rows: list) -> str:
    widths = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [head, *rows])


class SkippedFilesError(FintensorError):
    """Some files of a folder or pattern were skipped: the rest was imported (exit 1)."""

    exit_code = 1


@dataclasses.dataclass
class ImportReport(IngestReport):
    """Per-symbol results of ``import_csv``; ``str()`` gives one line per symbol, then skipped files."""

    results: list[SymbolResult]
    store: str = ""
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (file, why)
    not_stored: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # recognised, not stored: (file, why)

    @property
    def ok(self) -> bool:
        return not self.skipped

    @property
    def failed(self) -> list:
        return []

    def raise_for_status(self) -> "ImportReport":
        """Return self when every file was imported; else raise (exit 1) naming the skipped files."""
        if self.skipped:
            raise SkippedFilesError(f"{len(self.skipped)} file(s) skipped, the rest imported: "
                               + "; ".join(f"{f} ({why})" for f, why in self.skipped[:5])
                               + ("; ..." if len(self.skipped) > 5 else ""))
        return self

    @property
    def symbols(self) -> list[str]:
        return list(dict.fromkeys(r.symbol for r in self.results))

    @property
    def added(self) -> int:
        return sum(r.added for r in self.results)

    @property
    def updated(self) -> int:
        return sum(r.updated for r in self.results)

    @property
    def warnings(self) -> list[str]:
        return [f"{r.symbol}: {w}" for r in self.results for w in r.warnings]

    def __str__(self) -> str:
        return "\n".join([str(r) for r in self.results] + [f"warning: {w}" for w in self.warnings]
                         + [f"not stored: {f}: {why}" for f, why in self.not_stored]
                         + [f"skipped: {f}: {why}" for f, why in self.skipped])

    def to_dict(self) -> dict:
        return {"store": self.store, "results": [dataclasses.asdict(r) for r in self.results],
                "skipped": [{"file": f, "reason": why} for f, why in self.skipped],
                "not_stored": [{"file": f, "reason": why} for f, why in self.not_stored]}


