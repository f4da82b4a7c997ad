"""Concurrency: four processes import overlapping symbols and ranges into one store while reading it,
and a lock held by a process that is SIGKILLed does not block the next writer.

Oracle: the same real files imported whole, one after the other, into a store of their own. Every read,
in every process, must show a consistent state: rows equal to the oracle's, in order, no duplicates, and
made of whole imported chunks (a reader never sees part of a write); at the end the shared store equals
the oracle exactly and verifies clean.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from crash_harness import Child, context, expected_files

import fintensor as ft
from fintensor.cli import main
from fintensor.errors import FintensorError, MissingDataError, StoreBusyError, StoreCorruptError
from fintensor.store import Store

SYMBOLS = ("AAPL", "MSFT", "GE", "JPM")
WORKERS = 4
CHUNK, STEP, ROWS = 40, 30, 240  # chunks of 40 rows every 30 rows: neighbours overlap by 10


def chunk_rows(j: int) -> range:
    return range(STEP * j, min(STEP * j + CHUNK, ROWS))


N_CHUNKS = len(range(0, ROWS - CHUNK + STEP, STEP))


def assignments(worker: int) -> list[tuple[str, int]]:
    """(symbol, chunk) pairs a worker imports: each chunk by two workers, every worker on every symbol."""
    return [(s, j) for k, s in enumerate(SYMBOLS) for j in range(N_CHUNKS)
            if worker in ((j + k) % WORKERS, (j + k + 1) % WORKERS)]


def check_read(table: pa.Table, truth: pa.Table) -> str | None:
    """Why a read is not a consistent state of the store (None when it is)."""
    dates = table.column("date").to_numpy()
    truth_dates = truth.column("date").to_numpy()
    if len(dates) > 1 and not (np.diff(dates.astype("int64")) > 0).all():
        return "dates out of order or duplicated"
    pos = np.searchsorted(truth_dates, dates)
    if (pos >= len(truth_dates)).any() or (truth_dates[np.minimum(pos, len(truth_dates) - 1)] != dates).any():
        return "a date the files do not have"
    if not table.equals(truth.take(pa.array(pos))):
        return "values differ from the files'"
    seen = set(pos.tolist())
    whole = set().union(*(set(chunk_rows(j)) for j in range(N_CHUNKS) if set(chunk_rows(j)) <= seen))
    if seen != whole:
        return f"rows {sorted(seen - whole)[:5]}... are not whole imported chunks (a half-written partition)"
    return None


def read_all(store: Store, truth: dict[str, pa.Table], verify: bool = True) -> list[str]:
    """Read every symbol (checksummed reads, or the fast path with ``verify=False``); what is wrong."""
    problems = []
    for symbol in SYMBOLS:
        try:
            got = store.read_partition(symbol, verify=verify)
        except MissingDataError:
            continue  # not imported yet
        except FintensorError as exc:
            problems.append(f"{symbol}: read failed: {exc}")
            continue
        why = check_read(got, truth[symbol])
        if why:
            problems.append(f"{symbol}: {why}")
    return problems


def importer(root: str, data: str, worker: int, barrier) -> dict:
    """One of the four processes: import its chunks one by one, reading every symbol after each import."""
    truth = {s: Store(Path(data) / "oracle").read_partition(s) for s in SYMBOLS}
    store = Store(root)
    barrier.wait(timeout=60)
    started, problems, reads = time.time(), [], 0
    for symbol, j in assignments(worker):
        ft.import_csv(Path(data) / f"{symbol}_{j}.csv", store=store)
        got = store.read_partition(symbol)
        if not set(chunk_rows(j)) <= set(np.searchsorted(truth[symbol].column("date").to_numpy(),
                                                       got.column("date").to_numpy()).tolist()):
            problems.append(f"{symbol} chunk {j}: not visible right after its import")
        problems += [f"worker {worker}: {p}" for p in read_all(store, truth)]
        reads += len(SYMBOLS)
    return {"span": (started, time.time()), "problems": problems, "reads": reads}


def hold_the_lock(root: str, flag: str) -> None:
    with Store(root).lock():
        Path(flag).touch()
        time.sleep(600)


@pytest.fixture
def chunks(tmp_path, shared_data) -> Path:
    """Chunk files of four real Yahoo files, and the oracle: the whole files imported one by one."""
    data = tmp_path / "data"
    data.mkdir()
    whole = []
    for symbol in SYMBOLS:
        lines = (shared_data / "us_daily/sp500_5yr_yahoo" / f"{symbol}_data.csv").read_text().splitlines()
        header, body = lines[0], lines[1:ROWS + 1]
        whole.append(data / f"{symbol}.csv")
        whole[-1].write_text("\n".join([header, *body]) + "\n")
        for j in range(N_CHUNKS):
            rows = chunk_rows(j)
            (data / f"{symbol}_{j}.csv").write_text("\n".join([header, *body[rows.start:rows.stop]]) + "\n")
    for path in whole:
        ft.import_csv(path, store=Store(data / "oracle"))
    return data


def test_four_processes_import_and_read_one_store(tmp_path, chunks):
    root = tmp_path / "store"
    barrier = context().Barrier(WORKERS)
    workers = [Child(importer, str(root), str(chunks), w, barrier, timeout=180) for w in range(WORKERS)]
    oracle = Store(chunks / "oracle")
    truth = {s: oracle.read_partition(s) for s in SYMBOLS}
    parent_reads, problems = 0, []
    while any(w.proc.is_alive() for w in workers):  # a fifth reader: this process, both read paths
        problems += [f"parent: {p}" for p in read_all(Store(root), truth, verify=parent_reads % 2 == 0)]
        parent_reads += 1
    results = [w.finish().result for w in workers]  # every worker finishes: no deadlock

    problems += [p for r in results for p in r["problems"]]
    assert not problems, "\n".join(problems[:20])
    spans = [r["span"] for r in results]
    assert max(s for s, _ in spans) < min(e for _, e in spans), "the four processes did not overlap"
    assert sum(r["reads"] for r in results) >= WORKERS * len(SYMBOLS) * 10 and parent_reads > 0
    store = Store(root)
    for symbol in SYMBOLS:  # nothing lost, nothing duplicated: exactly the whole files
        assert store.read_partition(symbol).equals(truth[symbol]), symbol
    assert store.verify() == []
    assert {p for p in root.rglob("*") if p.is_file()} <= expected_files(root)


def test_a_sigkilled_lock_holder_does_not_block_the_next_writer(tmp_path, chunks, monkeypatch):
    root, flag = tmp_path / "store", tmp_path / "locked"
    holder = Child(hold_the_lock, str(root), str(flag))
    deadline = time.monotonic() + 60
    while not flag.exists():
        assert time.monotonic() < deadline, "the lock holder never took the lock"
        time.sleep(0.01)
    with pytest.raises(StoreBusyError, match="locked by another fintensor process"):
        ft.import_csv(chunks / "AAPL_0.csv", store=Store(root, lock_timeout=0.2))  # the lock is really held
    assert not (root / "bars").exists()

    holder.kill()  # SIGKILL: no chance to release; the OS drops its fcntl lock with the process

    monkeypatch.setenv("FINTENSOR_LOCK_TIMEOUT", "10")  # a lock still held fails in 10 s, not 600
    assert main(["import", str(chunks / "AAPL_0.csv"), "--store", str(root), "--quiet"]) == 0
    got = Store(root).read_partition("AAPL")
    assert got.equals(Store(chunks / "oracle").read_partition("AAPL").slice(0, CHUNK))
    assert Store(root).verify() == []
