"""A store read through a URI (``Store("file:///...")``, any pyarrow file system): a read-only, lazily filled,
checksum-verified local mirror on which every read path gives exactly what the local store gives.

The "remote" is a real store imported from ../shared/data (3 US daily CSVs and the hikyuu A-share tick
days), opened through ``file://`` (pyarrow's LocalFileSystem, reached the way S3/GCS/HDFS are) and through
an fsspec in-memory file system (a non-local pyarrow FileSystem)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import fintensor as ft
from fintensor.cli import main
from fintensor.errors import BadInputError, StoreCorruptError
from fintensor.store import Store
from fintensor.store_remote import mirror_dir

from conftest import tree_digest

SP500 = "us_daily/sp500_5yr_yahoo/{}_data.csv"
SYMBOLS = ["AAPL", "ABBV", "AMZN"]
TICKS = "cn_intraday_tick/hikyuu/trans_tick_2019-02-01_2019-02-11.csv.gz"
READ_ONLY = "read-only through fintensor"


@pytest.fixture(scope="module")
def origin(tmp_path_factory, shared_data) -> Store:
    """The local store the remote copies are made from (treat as read-only)."""
    store = Store(tmp_path_factory.mktemp("origin") / "store")
    ft.import_csv([shared_data / SP500.format(s) for s in SYMBOLS], store=store)
    ft.import_csv([shared_data / TICKS], store=store)
    return store


@pytest.fixture
def remote(origin, tmp_path) -> Path:
    """A fresh copy of the origin store: the remote folder a test may damage."""
    return Path(shutil.copytree(origin.root, tmp_path / "remote"))


def uri(path: Path) -> str:
    return "file://" + str(path)


def mirror_files(store: Store) -> dict[str, int]:
    return {str(p.relative_to(store.root)): p.stat().st_mtime_ns for p in store.root.rglob("*.parquet")}


# ------------------------------------------------------------------------------------------- reads
def test_every_read_path_gives_what_the_local_store_gives(origin, remote):
    before = tree_digest(remote)
    local, r = Store(remote), Store(uri(remote))
    assert r.uri == uri(remote) and r.remote and not local.remote and local.uri == str(remote)
    assert r.root == mirror_dir(Path(ft.store.default_root()), uri(remote)) and r.root != remote
    tick_syms = sorted({e["symbol"] for e in local.list() if e["kind"] == "ticks"})
    assert len(tick_syms) >= 2
    assert r.list() == local.list() and r.symbols() == local.symbols() == SYMBOLS
    assert r.aliases() == local.aliases()
    assert r.read().equals(local.read())
    assert r.read(["AMZN", "AAPL"], "2014-03-03", "2015-06-30", columns=["close", "volume"]).equals(
        local.read(["AMZN", "AAPL"], "2014-03-03", "2015-06-30", columns=["close", "volume"]))
    assert r.read("ABBV", verify=False).equals(local.read("ABBV", verify=False))
    assert r.read_partition("AAPL", start="2016-01-04").equals(local.read_partition("AAPL", start="2016-01-04"))
    assert r.read_ticks(tick_syms).equals(local.read_ticks(tick_syms))
    assert r.read_ticks(tick_syms[0], "2019-02-11", "2019-02-11").equals(
        local.read_ticks(tick_syms[0], "2019-02-11", "2019-02-11"))
    for s in SYMBOLS:
        assert r.manifest(s) == local.manifest(s) and r.coverage(s) == local.coverage(s)
        assert r.info(s) == local.info(s)
    assert r.fingerprint(SYMBOLS) == local.fingerprint(SYMBOLS)
    assert r.tick_fingerprint(tick_syms) == local.tick_fingerprint(tick_syms)
    for interval in ("1d", "tick"):
        mine, theirs = r.files(None, interval), local.files(None, interval)
        assert [p.relative_to(r.root) for p in mine] == [p.relative_to(remote) for p in theirs]
        assert all(a.read_bytes() == b.read_bytes() for a, b in zip(mine, theirs))  # fetched, real files
    assert r.verify() == [] and local.verify() == []
    assert tree_digest(remote) == before  # reading never writes the remote


def test_parts_are_fetched_once_and_only_those_a_read_needs(remote):
    r = Store(uri(remote))
    r.read("AAPL")
    aapl = len(Store(remote).manifest("AAPL")["parts"])
    assert r._remote.fetched == aapl
    assert {Path(p).parts[2] for p in mirror_files(r)} == {"symbol=AAPL"}  # nothing else was fetched
    first = mirror_files(r)
    r.read("AAPL")
    r.read(["AAPL", "ABBV"])
    assert r._remote.fetched == aapl + len(Store(remote).manifest("ABBV")["parts"])
    again = Store(uri(remote))  # a new instance on the same mirror: verified parts are not fetched again
    assert again.read(["AAPL", "ABBV"]).equals(Store(remote).read(["AAPL", "ABBV"]))
    assert again._remote.fetched == 0
    assert {k: v for k, v in mirror_files(again).items() if k in first} == first  # not rewritten either


def test_a_damaged_mirror_file_is_fetched_again(remote):
    r = Store(uri(remote))
    want = r.read("AMZN")
    part = r.files("AMZN")[0]
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    fresh = Store(uri(remote))
    assert fresh.read("AMZN").equals(want) and fresh._remote.fetched == 1


def test_a_flipped_bit_in_a_remote_part_is_detected_and_nothing_is_returned(remote):
    local = Store(remote)
    path = local.files("AAPL")[0]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    r = Store(uri(remote))
    for read in (lambda: r.read("AAPL"), lambda: r.read(SYMBOLS), lambda: r.read("AAPL", verify=False),
                 lambda: r.files("AAPL"), lambda: ft.build("AAPL", "2013-01-02", "2017-12-05", store=r.uri,
                                                           cache=False)):
        with pytest.raises(StoreCorruptError, match="checksum mismatch.*not read"):
            read()
    assert not (r.partition_dir("AAPL") / path.name).exists()  # the bad bytes never entered the mirror
    problems = r.verify()
    assert [p.path for p in problems] == [str(r.partition_dir("AAPL") / path.name)]
    assert "checksum mismatch" in problems[0].message
    assert r.read("ABBV").equals(local.read("ABBV"))  # the other partitions still read


def test_a_new_store_instance_sees_the_newer_snapshot(remote, shared_data):
    r = Store(uri(remote))
    assert r.symbols() == SYMBOLS
    local = Store(remote)
    ft.import_csv([shared_data / SP500.format("BAC")], store=local)
    local.remove("ABBV")
    assert r.symbols() == SYMBOLS  # one snapshot per instance
    newer = Store(uri(remote))
    assert newer.symbols() == ["AAPL", "AMZN", "BAC"] and newer.read().equals(local.read())
    assert not list((newer.root / "bars").glob("interval=1d/symbol=ABBV/**/*.*"))  # gone remotely: pruned


def test_a_part_superseded_remotely_moves_the_instance_to_the_newer_snapshot(remote):
    r = Store(uri(remote))
    assert r.symbols() == SYMBOLS  # this instance's snapshot: manifests only, no part fetched yet
    local = Store(remote)
    old_parts = set(map(str, local.files("AAPL")))
    bars = local.read_partition("AAPL").to_pandas()
    bars.loc[100, "close"] *= 1.01
    local.write_bars("AAPL", bars, source="csv", adjust=local.manifest("AAPL")["adjustment"],
                     on_conflict="overwrite")  # a rewrite: the parts r's manifest lists are deleted
    assert not old_parts & set(map(str, local.files("AAPL")))
    assert r.read("AAPL").equals(local.read("AAPL"))
    assert r.files("AAPL")[0].read_bytes() == local.files("AAPL")[0].read_bytes()


def test_a_part_missing_from_the_remote_store_is_one_clear_error(remote):
    Store(remote).files("AMZN")[0].unlink()
    r = Store(uri(remote))
    for read in (lambda: r.read("AMZN"), lambda: r.files("AMZN")):
        with pytest.raises(StoreCorruptError, match="listed in the remote manifest but missing from the remote"):
            read()
    assert any("AMZN" in p.path for p in r.verify())


# ------------------------------------------------------------------------------------------ builds
def test_build_on_a_uri_is_the_local_build_bit_for_bit(remote):
    args = dict(symbols=SYMBOLS, start="2012-12-06", end="2017-12-05", fields=["open", "close", "volume"])
    one = ft.build(**args, store=str(remote), cache=False)
    two = ft.build(**args, store=uri(remote), cache=False)
    assert two.meta["store"] == uri(remote) and one.meta["store"] == str(remote)
    assert (~one.mask).any()  # ABBV lists 2013-01-02: the gaps are reproduced too
    assert one.dims == two.dims and one.values.dtype == two.values.dtype
    assert torch.equal(torch.nan_to_num(one.values, nan=-1.0), torch.nan_to_num(two.values, nan=-1.0))
    assert torch.equal(one.mask, two.mask)
    for d in one.dims:
        assert np.array_equal(one.coords[d], two.coords[d])
    strip = lambda meta: {k: v for k, v in meta.items() if k not in ("store", "cache", "cache_hit")}  # noqa: E731
    assert strip(one.meta) == strip(two.meta)
    before = tree_digest(remote)
    cached = ft.build(**args, store=uri(remote))  # the tensor cache lives in the local mirror
    assert Path(cached.meta["cache"]).parent == Store(uri(remote)).root / "tensors"
    assert ft.build(**args, store=uri(remote)).meta["cache_hit"] is True
    assert torch.equal(torch.nan_to_num(cached.values, nan=-1.0), torch.nan_to_num(one.values, nan=-1.0))
    assert tree_digest(remote) == before


def test_the_cluster_hands_workers_the_uri(remote):
    from fintensor import cluster

    _, kwargs = cluster._plan(SYMBOLS, "2013-01-02", "2017-12-05", store=uri(remote), calendar="XNYS")
    assert kwargs["store"] == uri(remote)  # each worker mirrors what its block reads
    _, kwargs = cluster._plan(SYMBOLS, "2013-01-02", "2017-12-05", store=str(remote), calendar="XNYS")
    assert kwargs["store"] == str(remote)


# ------------------------------------------------------------------------------------------ writes
def test_every_write_entry_point_is_refused_and_the_remote_is_unchanged(remote):
    before = tree_digest(remote)
    local, r = Store(remote), Store(uri(remote))
    bars = local.read_partition("AAPL").to_pandas()
    tick_sym = next(e["symbol"] for e in local.list() if e["kind"] == "ticks")
    ticks = local.read_ticks(tick_sym).to_pandas().drop(columns=["symbol", "date"])
    writes = {
        "write_bars": lambda: r.write_bars("AAPL", bars, source="csv", adjust="split"),
        "write_bars new": lambda: r.write_bars("NEW", bars, source="csv"),
        "write_ticks": lambda: r.write_ticks(tick_sym, ticks, source="csv"),
        "remove": lambda: r.remove("AAPL"),
        "migrate": lambda: r.migrate(),
        "verify repair": lambda: r.verify(repair=True),
        "lock": lambda: r.lock(),
    }
    for name, write in writes.items():
        with pytest.raises(BadInputError, match=f"{READ_ONLY}.*`fintensor cache files`") as err:
            write()
        assert uri(remote) in str(err.value) and "\n" not in str(err.value), name
    assert tree_digest(remote) == before
    assert r.read().equals(local.read())  # the instance still reads


def test_an_unknown_scheme_or_a_missing_store_is_one_clear_error(tmp_path):
    with pytest.raises(BadInputError, match=r"cannot open the store at nosuch://x/y \(.*\); give a local path"):
        Store("nosuch://x/y")
    with pytest.raises(BadInputError, match="there is no store at file://.*check the URI"):
        Store(uri(tmp_path / "absent")).list()


# --------------------------------------------------------------------------------------------- CLI
def test_cli_reads_a_uri_and_refuses_to_import_into_one(remote, tmp_path, capsys, shared_data):
    before = tree_digest(remote)
    assert main(["cache", "list", "--json", "--store", uri(remote)]) == 0
    listed = capsys.readouterr().out
    assert all(s in listed for s in SYMBOLS)
    out = tmp_path / "t.safetensors"
    assert main(["build", "--symbols", *SYMBOLS, "--start", "2014-01-02", "--end", "2014-12-31", "--fields", "close",
                 "--out", str(out), "--store", uri(remote), "--quiet"]) == 0
    got = ft.load(out)
    want = ft.build(SYMBOLS, "2014-01-02", "2014-12-31", store=str(remote), cache=False)
    assert torch.equal(got.values, want.values) and torch.equal(got.mask, want.mask)
    capsys.readouterr()
    assert main(["import", str(shared_data / SP500.format("BAC")), "--store", uri(remote)]) == 2
    err = capsys.readouterr().err
    assert READ_ONLY in err and "Traceback" not in err
    assert tree_digest(remote) == before


# ---------------------------------------------------------------------------- a non-local file system
def test_a_pyarrow_filesystem_object_is_read_the_same_way(origin):
    fsspec = pytest.importorskip("fsspec")
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    mem = fsspec.filesystem("memory")
    for path in origin.root.rglob("*"):
        if path.is_file() and path.name != ".lock":
            mem.pipe_file(f"/bucket/store/{path.relative_to(origin.root).as_posix()}", path.read_bytes())
    try:
        r = Store("/bucket/store", filesystem=PyFileSystem(FSSpecHandler(mem)))
        assert r.remote and r.list() == origin.list()
        assert r.read().equals(origin.read())
        with pytest.raises(BadInputError, match=READ_ONLY):
            r.remove("AAPL")
    finally:
        mem.rm("/bucket", recursive=True)
