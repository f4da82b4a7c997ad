"""Crash harness: run fintensor writers in child processes, SIGKILL them at exact file-system steps or at
random moments, and read back what they left.

Children fork from a forkserver that has imported this module (fintensor, pyarrow, pandas, yfinance,
torch) and paid for the first uses that cost seconds (exchange calendars, lazy imports), so a trial costs
milliseconds instead of an interpreter start. Exact kill points are injected here, in the child only, by
wrapping the file-system calls every commit goes through (``os.replace``, ``os.rename``, ``os.fsync``,
``os.unlink``, ``os.rmdir``, ``os.mkdir``): the k-th call SIGKILLs the process before it happens.
fintensor itself carries no test hook.

``SCENARIOS`` are the write paths: a ``setup`` (inputs, and the store before) and a ``run`` (the write),
both run in children. ``store_contents`` is what a fintensor reader sees, partition by partition.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import multiprocessing
import multiprocessing.forkserver
import os
import shutil
import signal
import time
import traceback
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from yahoo_stub import FakeYahoo, isolate_yfinance, session_bars

import fintensor as ft
import fintensor.builder  # noqa: F401  (imported here so that the forkserver holds them)
import fintensor.sources.files  # noqa: F401
import fintensor.sources.yahoo  # noqa: F401
import fintensor.trainer
from fintensor.store import Store

STEP_CALLS = ("replace", "rename", "fsync", "unlink", "rmdir", "mkdir")
YAHOO = "us_daily/sp500_5yr_yahoo"
HIKYUU_TICKS = "cn_intraday_tick/hikyuu/trans_tick_2019-02-01_2019-02-11.csv.gz"


# ------------------------------------------------------------------------------------------ children
TESTS = Path(__file__).resolve().parent
_server_started = False


def context():
    """The forkserver context; its server is started once, with this module preloaded."""
    global _server_started
    ctx = multiprocessing.get_context("forkserver")
    if not _server_started:
        ctx.set_forkserver_preload([__name__])
        # Python 3.11's forkserver imports the preload before it applies our sys.path: lend it tests/
        saved = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = os.pathsep.join([str(TESTS), *([saved] if saved else [])])
        try:
            multiprocessing.forkserver.ensure_running()
        finally:
            if saved is None:
                del os.environ["PYTHONPATH"]
            else:
                os.environ["PYTHONPATH"] = saved
        _server_started = True
    return ctx


class _KillSwitch:
    """Counts file-system steps; SIGKILLs this process just before step number ``kill_at`` (1-based)."""

    def __init__(self, kill_at: int | None):
        self.kill_at, self.steps = kill_at, 0
        for name in STEP_CALLS:
            setattr(os, name, self._wrap(getattr(os, name)))

    def _wrap(self, call):
        def step(*args, **kwargs):
            self.steps += 1
            if self.steps == self.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return call(*args, **kwargs)

        return step


def _child(fn, args: tuple, kill_at: int | None, conn) -> None:
    torch.set_num_threads(1)
    switch = _KillSwitch(kill_at)
    conn.send(("started",))
    t0 = time.perf_counter()
    try:
        result = fn(*args)
    except BaseException:  # noqa: BLE001 - the parent reports it
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("done", switch.steps, time.perf_counter() - t0, result))


@dataclasses.dataclass
class Outcome:
    killed: bool
    steps: int = 0         # file-system steps of a run that finished
    seconds: float = 0.0   # its duration (from "started" to "done", in the child)
    result: object = None  # what the function returned


class Child:
    """``fn(*args)`` running in a forked child (``fn`` a module-level function); ``kill_at`` SIGKILLs it
    just before its kill_at-th file-system step."""

    def __init__(self, fn, *args, kill_at: int | None = None, timeout: float = 120):
        ctx = context()
        self.name, self.timeout = fn.__name__, timeout
        self.recv, send = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=_child, args=(fn, args, kill_at, send), daemon=True)
        self.proc.start()
        send.close()
        if not self.recv.poll(timeout):
            self._fail(f"did not start within {timeout} s")
        try:
            self.recv.recv()  # started
        except EOFError:
            self._fail("died before it started")

    def finish(self, kill_after: float | None = None) -> Outcome:
        """Wait for the child (SIGKILLing it ``kill_after`` seconds after it started, if still running).
        Raises AssertionError when it fails, hangs or dies any other way."""
        if kill_after is not None and not self.recv.poll(kill_after):
            self.proc.kill()
        message = None
        if self.recv.poll(self.timeout):
            try:
                message = self.recv.recv()
            except EOFError:
                pass  # killed
        self.proc.join(self.timeout)
        self.recv.close()
        if self.proc.exitcode is None:
            self._fail(f"hung for {self.timeout} s")
        if message is not None and message[0] == "error":
            raise AssertionError(f"{self.name} failed in a child process:\n{message[1]}")
        if self.proc.exitcode == -signal.SIGKILL:
            return Outcome(killed=True)
        if self.proc.exitcode != 0 or message is None:
            raise AssertionError(f"{self.name}: the child exited with {self.proc.exitcode}")
        return Outcome(False, *message[1:])

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join()

    def _fail(self, what: str):
        self.kill()
        raise AssertionError(f"{self.name}: the child {what}")


def run_child(fn, *args, kill_at: int | None = None, kill_after: float | None = None) -> Outcome:
    """Run ``fn(*args)`` in a child, SIGKILLed at step ``kill_at`` or ``kill_after`` seconds after it started."""
    return Child(fn, *args, kill_at=kill_at).finish(kill_after)


# -------------------------------------------------------------------------------------------- reading
def store_contents(root: Path) -> dict[str, object]:
    """What fintensor readers see: each committed partition's rows (Arrow tables), the aliases, and a
    digest of each cached tensor. Uncommitted files are invisible here by design."""
    store = Store(root)
    out: dict[str, object] = {}
    if not root.exists():
        return out
    for symbol in sorted({e["symbol"] for e in store.list()}):
        for m in store.info(symbol):
            if m["kind"] == "ticks":
                out[f"{symbol}/tick/{m['date']}"] = store.read_ticks(symbol, m["date"], m["date"])
            else:
                out[f"{symbol}/{m['interval']}"] = store.read_partition(symbol, m["interval"])
    if store.aliases():
        out["aliases"] = json.dumps(store.aliases(), sort_keys=True)
    for path in sorted((root / "tensors").glob("*.safetensors")):
        out[f"tensors/{path.name}"] = tensor_digest(ft.load(path))
    return out


def tensor_digest(st) -> str:
    h = hashlib.sha256(json.dumps([list(st.dims), {d: np.asarray(c).astype(str).tolist()
                                                   for d, c in st.coords.items()}]).encode())
    h.update(st.values.numpy().tobytes())
    h.update(st.mask.numpy().tobytes())
    return h.hexdigest()


def same(a, b) -> bool:
    if isinstance(a, pa.Table) and isinstance(b, pa.Table):
        return a.schema.equals(b.schema) and a.equals(b)
    return a == b


def expected_files(root: Path) -> set[Path]:
    """Every file a consistent store may hold: its lock, aliases, manifests, listed parts, cached tensors."""
    files = {root / ".lock", root / "aliases.json"}
    for mp in [*root.glob("bars/interval=*/symbol=*/_manifest.json"),
               *root.glob("bars/interval=*/symbol=*/adjust=*/_manifest.json"),
               *root.glob("ticks/symbol=*/date=*/_manifest.json")]:
        files.add(mp)
        files.update(mp.parent / p["file"] for p in json.loads(mp.read_bytes())["parts"])
    files.update(root.glob("tensors/*.safetensors"))
    # a partition without a manifest is moved here by `verify --repair` (and reported), never deleted
    files.update(p for p in root.glob(".quarantine/*/*") if p.is_file())
    return files


# ------------------------------------------------------------------------------------------ scenarios
@dataclasses.dataclass(frozen=True)
class Scenario:
    """A writer to kill: ``setup(root, data)`` builds its inputs and the store before, ``run(root, data)``
    is the write; ``store=False`` for writers whose output is not a store (checkpoints)."""

    name: str
    setup: Callable[[Path, Path], None]
    run: Callable[[Path, Path], None]
    store: bool = True


def _shared(data: Path) -> Path:
    return Path((data / "shared").read_text())


def _yahoo_csv(data: Path, symbol: str, rows: slice, blank_close: slice | None = None) -> Path:
    """Rows of a real sp500_5yr_yahoo file as a CSV of its own (optionally with some closes blanked)."""
    lines = (_shared(data) / YAHOO / f"{symbol}_data.csv").read_text().splitlines()
    body = lines[1:][rows]
    if blank_close is not None:
        for i in range(*blank_close.indices(len(body))):
            cells = body[i].split(",")
            cells[4] = ""
            body[i] = ",".join(cells)
    path = data / f"{symbol}_{rows.start}_{rows.stop}{'_blank' if blank_close else ''}.csv"
    path.write_text("\n".join([lines[0], *body]) + "\n")
    return path


def _setup_import_new(root: Path, data: Path) -> None:
    ft.import_csv(_yahoo_csv(data, "ABBV", slice(0, 30)), store=Store(root))
    for symbol in ("AAPL", "MSFT", "GE"):
        _yahoo_csv(data, symbol, slice(0, 40))


def _run_import_new(root: Path, data: Path) -> None:
    ft.import_csv([data / f"{s}_0_40.csv" for s in ("AAPL", "MSFT", "GE")], store=Store(root))


def _setup_import_merge(root: Path, data: Path) -> None:
    store = Store(root)
    ft.import_csv(_yahoo_csv(data, "AAPL", slice(0, 40), blank_close=slice(10, 13)), store=store)
    ft.import_csv(_yahoo_csv(data, "MSFT", slice(0, 40)), store=store)
    _yahoo_csv(data, "AAPL", slice(5, 60))   # overlaps, fills the blanked closes: a rewrite
    _yahoo_csv(data, "MSFT", slice(40, 60))  # after the stored range: an appended part


def _run_import_merge(root: Path, data: Path) -> None:
    ft.import_csv([data / "AAPL_5_60.csv", data / "MSFT_40_60.csv"], store=Store(root))


def _daily_rows(data: Path, symbol: str) -> pd.DataFrame:
    raw = pd.read_csv(_shared(data) / YAHOO / f"{symbol}_data.csv")
    return pd.DataFrame({"date": pd.to_datetime(raw.Date).dt.date, "close": raw.Close,
                         "volume": raw.Volume.astype(float)})


def _setup_compaction(root: Path, data: Path) -> None:
    rows, store = _daily_rows(data, "AAPL"), Store(root)
    for i in range(ft.store.MAX_PARTS):  # one part per append: the next append compacts all of them
        store.write_bars("AAPL", rows.iloc[i:i + 1], source="file:yahoo")


def _run_compaction(root: Path, data: Path) -> None:
    rows = _daily_rows(data, "AAPL")
    Store(root).write_bars("AAPL", rows.iloc[ft.store.MAX_PARTS:ft.store.MAX_PARTS + 5], source="file:yahoo")


BULK = ["AAPL", "MSFT", "AMZN", "BAC", "CSCO", "JPM"]


def _setup_bulk(root: Path, data: Path) -> None:
    Store(root).write_bars("AAPL", _daily_rows(data, "AAPL").iloc[:100], source="file:yahoo")


def _run_bulk(root: Path, data: Path) -> None:
    """Store.write_bars_many: six real symbols (AAPL appended to), three partitions committing at once."""
    Store(root).write_bars_many(((s, _daily_rows(data, s).iloc[:300]) for s in BULK), source="file:yahoo",
                                threads=3)


def _setup_ticks(root: Path, data: Path) -> None:
    raw = pd.read_csv(_shared(data) / HIKYUU_TICKS, dtype={"datetime": str})
    raw = raw[raw.symbol.isin(["000001.SZ", "600000.SH"])]
    raw = raw.groupby(["symbol", raw.datetime.str[:8]]).head(150)  # 150 ticks per symbol and day
    raw.to_csv(data / "ticks.csv", index=False)
    first_day = raw[(raw.symbol == "000001.SZ") & raw.datetime.str.startswith("20190201")]
    first_day.iloc[:80].to_csv(data / "ticks_base.csv", index=False)
    ft.import_csv(data / "ticks_base.csv", store=Store(root))


def _run_ticks(root: Path, data: Path) -> None:
    ft.import_csv(data / "ticks.csv", store=Store(root))  # merges one day, adds three


def _fake_yahoo() -> FakeYahoo:
    """Yahoo serving three symbols' daily bars (random walks on the real XNYS/XSHG sessions of 2024 Q1)."""
    mp = pytest.MonkeyPatch()  # never undone: the child ends with the download
    isolate_yfinance(mp)
    fake = FakeYahoo().install(mp)
    for symbol, (bars, tz) in _served().items():
        fake.add(symbol, bars, tz=tz)
    return fake


@functools.lru_cache(maxsize=None)
def _served() -> dict[str, tuple[pd.DataFrame, str]]:
    listings = (("AAPL", "XNYS", "America/New_York"), ("MSFT", "XNYS", "America/New_York"),
                ("600519.SS", "XSHG", "Asia/Shanghai"))
    return {symbol: (session_bars(cal, "2024-01-02", "2024-03-28", seed=i), tz)
            for i, (symbol, cal, tz) in enumerate(listings)}


def _setup_download(root: Path, data: Path) -> None:
    _fake_yahoo()
    ft.download("AAPL", "2024-01-02", "2024-01-31", store=Store(root), quiet=True).raise_for_status()


def _run_download(root: Path, data: Path) -> None:
    _fake_yahoo()
    ft.download(["AAPL", "MSFT", "600519.SS"], "2024-01-02", "2024-03-28", store=Store(root),
                quiet=True, workers=2).raise_for_status()


def _setup_remove(root: Path, data: Path) -> None:
    _setup_ticks(root, data)
    ft.import_csv(data / "ticks.csv", store=Store(root))
    ft.import_csv(_yahoo_csv(data, "AAPL", slice(0, 30)), store=Store(root))


def _run_remove(root: Path, data: Path) -> None:
    store = Store(root)
    for symbol, interval in (("000001.SZ", None), ("AAPL", "1d")):
        try:
            store.remove(symbol, interval)
        except ft.errors.MissingDataError:  # a re-run after the removal was done: nothing left to do
            pass


def _setup_repair(root: Path, data: Path) -> None:
    """A store with the leftovers of every kind of interrupted write."""
    _setup_import_merge(root, data)
    store = Store(root)
    aapl = store.partition_dir("AAPL")
    part = next(aapl.glob("part-*.parquet"))
    shutil.copy(part, aapl / "part-0123456789abcdef.parquet")            # an uncommitted part
    (store.partition_dir("MSFT") / "._manifest.json.0a1b.tmp").write_bytes(b"{")  # a half-written manifest
    orphan = store.partition_dir("GE")                                    # a first write, never committed
    orphan.mkdir(parents=True)
    shutil.copy(part, orphan / "part-fedcba9876543210.parquet")
    trash = root / "bars" / "interval=1d" / ".trash-0123"                 # an interrupted removal
    shutil.copytree(aapl, trash)
    (root / ".probe-0123").write_bytes(b"")                               # an interrupted writability probe
    os.utime(root / ".probe-0123", (time.time() - 7200, time.time() - 7200))
    (root / ".aliases.json.0a1b.tmp").write_bytes(b"{")                   # a half-written alias table
    (root / "tensors").mkdir()
    tensor_tmp = root / "tensors" / ".0123.safetensors.0a1b.tmp"  # a half-written cached tensor, from a crash
    tensor_tmp.write_bytes(b"\0" * 64)                             # two hours ago (a younger one may be a
    os.utime(tensor_tmp, (time.time() - 7200, time.time() - 7200))  # build in flight: repair leaves it)


def _run_repair(root: Path, data: Path) -> None:
    Store(root).verify(repair=True)


def _setup_tensor_cache(root: Path, data: Path) -> None:
    ft.import_csv([_yahoo_csv(data, s, slice(0, 60)) for s in ("AAPL", "MSFT", "GE")], store=Store(root))


def _run_tensor_cache(root: Path, data: Path) -> None:
    ft.build(["AAPL", "MSFT", "GE"], "2012-12-06", "2013-03-01", fields=["close", "volume"], store=Store(root))


EPOCHS = 3


def _training_data():
    """A small deterministic panel: 4 stocks, 60 days, 2 features, next-day labels."""
    g = torch.Generator().manual_seed(0)
    T, N = 60, 4
    days = np.arange(np.datetime64("2020-01-01"), np.datetime64("2020-01-01") + T)
    stocks = [f"S{i}" for i in range(N)]
    x = ft.StockTensor(torch.randn(T, N, 2, generator=g), ("time", "stock", "feature"),
                       {"time": days, "stock": stocks, "feature": ["a", "b"]})
    y = ft.StockTensor(torch.randn(T, N, generator=g), ("time", "stock"), {"time": days, "stock": stocks},
                       meta={"horizon": 1, "lag": 0})
    return x, y


def checkpoint_digest(run_dir: Path) -> str | None:
    """The checkpoint's epoch, state and every tensor (not its wall-clock timings), or None without one."""
    path = run_dir / fintensor.trainer.CHECKPOINT
    if not path.exists():
        return None
    ckpt = fintensor.trainer.read_checkpoint(path)
    h = hashlib.sha256(json.dumps(ckpt.info["state"], sort_keys=True).encode())
    for name in sorted(ckpt.tensors):
        h.update(name.encode() + ckpt.tensors[name].numpy().tobytes())
    return h.hexdigest()


def _setup_checkpoint(root: Path, data: Path) -> None:
    pass


def _run_checkpoint(root: Path, data: Path) -> None:
    """Train (resuming from the checkpoint when there is one); record each epoch's checkpoint digest."""
    seen = []
    x, y = _training_data()
    ft.train(x, y, model="mlp", hidden=4, layers=1, lookback=3, epochs=EPOCHS, batch_size=32, patience=100,
             out=str(root), resume=True, progress=False, device="cpu",
             on_epoch_end=lambda row: seen.append(checkpoint_digest(root)))
    seen.append(checkpoint_digest(root))
    Path(f"{root}.digests.json").write_text(json.dumps(seen))


SCENARIOS = {s.name: s for s in (
    Scenario("import-new", _setup_import_new, _run_import_new),
    Scenario("import-merge", _setup_import_merge, _run_import_merge),
    Scenario("compaction", _setup_compaction, _run_compaction),
    Scenario("bulk-write", _setup_bulk, _run_bulk),
    Scenario("ticks", _setup_ticks, _run_ticks),
    Scenario("download", _setup_download, _run_download),
    Scenario("remove", _setup_remove, _run_remove),
    Scenario("repair", _setup_repair, _run_repair),
    Scenario("tensor-cache", _setup_tensor_cache, _run_tensor_cache),
    Scenario("checkpoint", _setup_checkpoint, _run_checkpoint, store=False),
)}


def _warm_up() -> None:
    """Pay, once and before any fork, for the first uses that cost seconds in every child otherwise."""
    _served()  # builds the XNYS and XSHG calendars too
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)  # imports torch._dynamo


_warm_up()
