"""One exception family, so the CLI can turn any of them into one clear line and an exit code.

Exit codes (documented in the README): 0 ok, 1 failure or partial failure, 2 bad input.
"""
from __future__ import annotations


class FintensorError(Exception):
    """Base class: a message meant for the user, and the CLI exit code that goes with it."""

    exit_code = 1


class BadInputError(FintensorError, ValueError):
    """The caller asked for something invalid (symbol, date, interval, file, recipe...)."""

    exit_code = 2


class MissingDataError(BadInputError):
    """The store lacks what was asked for; the message says how to get it."""


class ConflictError(BadInputError):
    """New rows disagree with stored rows for the same timestamp; nothing was written."""


class StoreCorruptError(FintensorError):
    """A store file failed its checksum, size or schema check; it is named and never read."""


class StoreBusyError(FintensorError):
    """Another process held the store's write lock for longer than the lock timeout."""


class StoreWriteError(FintensorError):
    """A store write failed part-way (disk full, file size limit, I/O error).

    ``committed`` lists the WriteResults of partitions committed before the failure (a re-run completes
    the rest); the failed partition itself was left as it was.
    """

    def __init__(self, message: str, committed: list | None = None):
        super().__init__(message)
        self.committed = list(committed or [])


class DownloadError(FintensorError):
    """Some or all symbols could not be downloaded (the good ones were stored)."""

    def __init__(self, message: str, report: object = None):
        super().__init__(message)
        self.report = report
