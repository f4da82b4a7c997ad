"""Store integrity (issue #11, store items; #14, the store engines read): self-checksummed manifests and
alias table, checks on every read, repair that never deletes data, verify beside writers, failed writes
(file size limit), whole-file bit flips of every store file type, microsecond instants and migration,
and the committed file list for DuckDB and Polars."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_store import gspc_minutes, hikyuu_ticks, part_files, sp500

from fintensor.cli import main
from fintensor.errors import BadInputError, StoreCorruptError
from fintensor.schema import FORMAT_VERSION, UTC_NS, UTC_US
from fintensor.store import Store, manifest_bytes
from fintensor.store_verify import TEMP_GRACE_S

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def filled(store, shared_data):
    store.write_bars("AAPL", sp500(shared_data, "AAPL", rows=300), source="yahoo", adjust="split", alias="aapl ")
    store.write_bars("MSFT", sp500(shared_data, "MSFT", rows=300), source="yahoo")
    store.write_ticks("000001.SZ", hikyuu_ticks(shared_data), source="hikyuu")
    assert store.verify() == []
    return store


def edit_manifest(store: Store, symbol: str, **changes) -> Path:
    path = store.partition_dir(symbol) / "_manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}, indent=1))
    return path


# ------------------------------------------------------------------------------------ manifests
@pytest.mark.parametrize("field, value", [("adjustment", "full"), ("end", "2030-01-01"), ("end_key", 1),
                                          ("source", "other"), ("timezone", "Asia/Tokyo")])
def test_an_edited_manifest_field_is_refused_by_read_and_verify(filled, field, value):
    path = edit_manifest(filled, "AAPL", **{field: value})
    with pytest.raises(StoreCorruptError, match=f"{path}.*fintensor cache verify"):
        filled.read("AAPL")
    for verify in (True, False):
        with pytest.raises(StoreCorruptError):
            filled.read_partition("AAPL", verify=verify)
    [problem] = filled.verify()
    assert problem.path == str(path) and not problem.leftover
    assert len(filled.read("MSFT")) == 300  # other partitions unaffected


def test_a_manifest_resealed_over_a_different_part_is_caught_by_both_read_paths(filled):
    """A manifest consistent with itself but not with its part (rows, keys): the fast path's checks too."""
    [part] = part_files(filled, "MSFT")
    table = pq.read_table(part)
    fewer = table.slice(0, 250)
    pq.write_table(fewer, part)  # a valid Parquet file with 50 rows fewer
    mpath = filled.partition_dir("MSFT") / "_manifest.json"
    m = json.loads(mpath.read_text())
    data = part.read_bytes()
    import hashlib
    m["parts"][0].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    m["checksum"] = hashlib.sha256(m["parts"][0]["sha256"].encode()).hexdigest()
    mpath.write_bytes(manifest_bytes(m))
    for verify in (True, False):
        with pytest.raises(StoreCorruptError, match=f"{part}: 250 rows where the manifest says 300"):
            filled.read("MSFT", verify=verify)
    # keys out of order, right row count
    pq.write_table(table.take(pa.array(np.r_[1, 0, np.arange(2, 300)])), part)
    data = part.read_bytes()
    m["parts"][0].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    m["checksum"] = hashlib.sha256(m["parts"][0]["sha256"].encode()).hexdigest()
    mpath.write_bytes(manifest_bytes(m))
    for verify in (True, False):
        with pytest.raises(StoreCorruptError, match="not sorted"):
            filled.read("MSFT", columns=["close"], verify=verify)
    assert "not sorted" in filled.verify()[0].message


# ------------------------------------------------------------------------------------ alias table
def test_a_corrupt_alias_table_is_one_error_reported_and_reset_by_repair(filled, capsys):
    path = filled.root / "aliases.json"
    assert filled.aliases() == {"aapl": "AAPL"}
    path.write_text(path.read_text().replace('"AAPL"', '"MSFT"'))  # valid JSON, wrong content
    with pytest.raises(StoreCorruptError, match="alias table fails its checksum"):
        filled.aliases()
    capsys.readouterr()
    assert main(["cache", "verify", "--store", str(filled.root)]) == 1
    out = capsys.readouterr().out
    assert f"{path}: the alias table fails its checksum" in out
    [fixed] = filled.verify(repair=True)
    assert fixed.repaired and "reset" in fixed.message
    assert filled.aliases() == {} and filled.verify() == []
    filled.write_bars("AAPL", filled.read_partition("AAPL"), source="yahoo", adjust="split", alias="aapl")
    assert filled.aliases() == {"aapl": "AAPL"}


# ------------------------------------------------------------------------------------ repair
def test_repair_quarantines_a_partition_whose_manifest_is_lost_never_deletes_it(filled):
    pdir = filled.partition_dir("MSFT")
    before = {p.name: p.read_bytes() for p in pdir.iterdir() if p.name != "_manifest.json"}
    (pdir / "_manifest.json").unlink()
    [problem] = filled.verify()
    assert problem.path == str(pdir) and problem.leftover and not problem.repaired
    [problem] = filled.verify(repair=True)
    assert problem.repaired and ".quarantine" in problem.message
    [moved] = (filled.root / ".quarantine").iterdir()
    assert {p.name: p.read_bytes() for p in moved.iterdir()} == before  # every byte kept
    assert filled.verify() == [] and len(filled.read("AAPL")) == 300


def test_repair_leaves_a_young_tensor_temp_file_and_removes_an_old_one(filled):
    (filled.root / "tensors").mkdir()
    young = filled.root / "tensors" / f".x.safetensors.{'a' * 32}.tmp"
    old = filled.root / "tensors" / f".y.safetensors.{'b' * 32}.tmp"
    young.write_bytes(b"being written"), old.write_bytes(b"left by a crash")
    os.utime(old, (time.time() - TEMP_GRACE_S - 60,) * 2)
    assert [p.path for p in filled.verify(repair=True)] == [str(old)]
    assert young.exists() and not old.exists()


def test_a_trash_symlink_is_unlinked_not_followed_and_reported_once(filled, tmp_path):
    target = tmp_path / "precious"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    link = filled.root / "bars" / "interval=1d" / ".trash-0123"
    link.symlink_to(target)
    [problem] = filled.verify(repair=True)
    assert problem.path == str(link) and problem.repaired
    assert not os.path.lexists(link) and (target / "keep.txt").read_text() == "mine"
    assert filled.verify() == []


# ------------------------------------------------------------------------------------ locking
def test_a_lock_that_is_a_directory_is_one_error_line(filled, capsys):
    (filled.root / ".lock").unlink(missing_ok=True)
    (filled.root / ".lock").mkdir()
    assert main(["cache", "rm", "AAPL", "--store", str(filled.root)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and ".lock is not a regular file" in err[0]


def test_a_non_numeric_lock_timeout_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FINTENSOR_LOCK_TIMEOUT", "soon")
    with pytest.raises(BadInputError, match="FINTENSOR_LOCK_TIMEOUT='soon' is not a number"):
        Store(tmp_path / "s")
    monkeypatch.setenv("FINTENSOR_LOCK_TIMEOUT", "2.5")
    assert Store(tmp_path / "s").lock_timeout == 2.5


# ------------------------------------------------------------------------------------ verify beside writers
WRITER = """
import sys
import pandas as pd
from fintensor.store import Store
root, n = sys.argv[1], int(sys.argv[2])
days = pd.bdate_range("2020-01-01", periods=n)
for i, d in enumerate(days):  # appends, with a compaction every 16 parts and a rewrite every 7th day
    Store(root).write_bars("AAPL", pd.DataFrame({"date": [d.date()], "close": [float(i)]}), source="w")
    if i % 7 == 6:
        Store(root).write_bars("AAPL", pd.DataFrame({"date": [days[i - 3].date()], "volume": [1.0]}), source="w")
"""


def test_verify_beside_a_writer_reports_nothing_and_never_raises(tmp_path):
    root = tmp_path / "store"
    Store(root).write_bars("AAPL", pd.DataFrame({"date": [pd.Timestamp("2019-12-31").date()], "close": [1.0]}),
                           source="w")
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(root), "120"], cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, stderr=subprocess.PIPE, text=True)
    runs, findings = 0, []
    while writer.poll() is None:
        findings += [str(p) for p in Store(root).verify()]
        runs += 1
    assert writer.returncode == 0, writer.stderr.read()
    print(f"{runs} verify runs beside the writer")
    assert runs >= 3 and findings == []
    assert len(Store(root).read("AAPL")) == 121


# ------------------------------------------------------------------------------------ failed writes
LIMITED = """
import resource, signal, sys
import numpy as np, pandas as pd
import fintensor.cli
from fintensor.store import Store
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)          # a write past the limit fails with EFBIG
root, limit = sys.argv[1], int(sys.argv[2])
store = Store(root)
small = pd.DataFrame({"date": pd.bdate_range("2020-01-01", periods=5).date, "close": np.arange(5.0)})
store.write_bars("SMALL", small, source="t")          # committed before the limit applies
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
rng = np.random.default_rng(0)
big = pd.DataFrame({"date": pd.bdate_range("1990-01-01", periods=9000).date, "close": rng.random(9000),
                    "open": rng.random(9000), "volume": rng.random(9000)})
ticks = pd.DataFrame({"time": pd.to_datetime(["2019-02-01 02:00", "2019-02-11 02:00"], utc=True).repeat(
    [3, 30000]) + pd.to_timedelta(np.r_[0:3, 0:30000], unit="ms"), "price": rng.random(30003) + 1})
try:
    store.write_ticks("000001.SZ", ticks, source="t")
except Exception as exc:
    print(type(exc).__name__, exc, sep="|")
try:
    store.write_bars("BIG", big, source="t")
except Exception as exc:
    print(type(exc).__name__, exc, sep="|")
"""


def test_a_write_past_the_file_size_limit_is_one_error_and_the_store_stays_consistent(tmp_path):
    root = tmp_path / "store"
    out = subprocess.run([sys.executable, "-c", LIMITED, str(root), "64000"], cwd=REPO, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert out.returncode == 0, out.stderr
    ticks_error, bars_error = out.stdout.strip().splitlines()
    kind, message = ticks_error.split("|")
    assert kind == "StoreWriteError" and "1 of 2 partitions of this write were committed" in message
    assert "date=2019-02-01" in message and "run the same command again" in message
    kind, message = bars_error.split("|")
    assert kind == "StoreWriteError" and "bars/interval=1d/symbol=BIG/adjust=raw was left as it was" in message
    store = Store(root)
    assert store.verify() == []                       # nothing half-written, no leftovers
    assert store.symbols() == ["SMALL"] and len(store.read("SMALL")) == 5
    assert store.coverage("000001.SZ", "tick") == ("2019-02-01", "2019-02-01")
    assert not store.partition_dir("BIG").exists()


# ------------------------------------------------------------------------------------ bit flips
def _flip_bits(path: Path, n: int, rng: random.Random):
    original = path.read_bytes()
    for _ in range(n):
        data = bytearray(original)
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(data))
        yield i
    path.write_bytes(original)


def test_bit_flips_across_whole_files_of_every_store_file_type_are_detected_or_harmless(filled, capsys):
    rng = random.Random(11)
    want = {"AAPL": filled.read("AAPL"), "ticks": filled.read_ticks("000001.SZ")}
    want_aliases = filled.aliases()
    counts = {}

    def outcome(read, expected) -> str:
        try:
            got = read()
        except StoreCorruptError:
            return "detected"
        assert got.equals(expected), "a flipped bit changed what a reader returned"
        return "harmless"

    targets = [("part", part_files(filled, "AAPL")[0], 150),
               ("manifest", filled.partition_dir("AAPL") / "_manifest.json", 120),
               ("tick manifest", next(filled.partition_dir("000001.SZ", kind="ticks").glob("*/_manifest.json")), 60),
               ("alias table", filled.root / "aliases.json", 60)]
    for name, path, n in targets:
        c = counts.setdefault(name, {"detected": 0, "harmless": 0, "verify caught": 0})
        for _ in _flip_bits(path, n, rng):
            if name == "alias table":
                try:
                    got = filled.aliases()
                    assert got == want_aliases
                    c["harmless"] += 1
                except StoreCorruptError:
                    c["detected"] += 1
            else:
                reader = (lambda: filled.read_ticks("000001.SZ")) if name == "tick manifest" else \
                    (lambda: filled.read("AAPL"))
                expected = want["ticks"] if name == "tick manifest" else want["AAPL"]
                for verify in (True, False):
                    c[outcome(lambda: reader() if verify else filled.read("AAPL", verify=False)
                              if name != "tick manifest" else filled.read_ticks("000001.SZ", verify=False),
                              expected)] += 1
            c["verify caught"] += bool(filled.verify())
    with capsys.disabled():
        print(f"\nbit flips: {counts}")
    assert filled.verify() == []
    # every flip of a checksummed file is caught by verify (a flip always changes the bytes it hashes)
    for name, _, n in targets:
        assert counts[name]["verify caught"] == n, name


# ------------------------------------------------------------------------------------ microseconds, migrate
def test_intraday_and_tick_parts_store_microsecond_instants(filled, shared_data):
    filled.write_bars("^GSPC", gspc_minutes(shared_data), interval="1m", source="yahoo")
    for path in [*filled.files("^GSPC", "1m"), *filled.files("000001.SZ", "tick")]:
        assert pq.read_schema(path).field("time").type == UTC_US, path
    minutes = filled.read("^GSPC", interval="1m")
    assert minutes.schema.field("time").type == UTC_NS  # readers return what they always did
    assert minutes.column("time").to_pylist()[:3] == pd.to_datetime(
        gspc_minutes(shared_data).time[:3], utc=True).to_list()


def test_sub_microsecond_instants_are_floored_and_counted(store):
    t = pd.to_datetime(["2024-01-02 15:00:00.000001500", "2024-01-02 15:00:00.000003"], utc=True)
    result = store.write_bars("AAPL", pd.DataFrame({"time": t, "close": [1.0, 2.0]}), interval="1m", source="t")
    assert result.rounded == 1
    got = store.read("AAPL", interval="1m").column("time").cast(pa.int64()).to_numpy()
    np.testing.assert_array_equal(got % 1000, [0, 0])
    np.testing.assert_array_equal(got, t.asi8 // 1000 * 1000)


def _downgrade_to_format_1(store: Store) -> None:
    """Rewrite every partition as fintensor format 1 wrote it: ns instants, no manifest_sha256, bars directly
    in their symbol folder (one adjustment per symbol and interval)."""
    import hashlib
    for mpath in store.root.glob("bars/*/*/adjust=*/_manifest.json"):
        for f in mpath.parent.iterdir():
            f.rename(mpath.parent.parent / f.name)
        mpath.parent.rmdir()
    for mpath in [*store.root.glob("bars/*/*/_manifest.json"), *store.root.glob("ticks/*/*/_manifest.json")]:
        m = json.loads(mpath.read_text())
        for p in m["parts"]:
            path = mpath.parent / p["file"]
            table = pq.read_table(path)
            if "time" in table.column_names:
                table = table.set_column(0, "time", table.column("time").cast(UTC_NS))
            pq.write_table(table, path, compression="zstd")
            p.update(bytes=path.stat().st_size, sha256=hashlib.sha256(path.read_bytes()).hexdigest())
        m["checksum"] = hashlib.sha256("".join(p["sha256"] for p in m["parts"]).encode()).hexdigest()
        m["format"] = 1
        m.pop("manifest_sha256")
        mpath.write_text(json.dumps(m, indent=1, sort_keys=True))


def test_an_old_nanosecond_store_reads_the_same_and_migrates_atomically(filled, shared_data, capsys):
    filled.write_bars("^GSPC", gspc_minutes(shared_data), interval="1m", source="yahoo")
    want = {"1d": filled.read(["AAPL", "MSFT"]), "1m": filled.read("^GSPC", interval="1m"),
            "tick": filled.read_ticks("000001.SZ")}
    _downgrade_to_format_1(filled)
    assert pq.read_schema(filled.files("^GSPC", "1m")[0]).field("time").type == UTC_NS
    assert filled.manifest("AAPL", adjust="split")["format"] == 1 and filled.adjustments("AAPL") == ["split"]
    before = {p: p.read_bytes() for p in filled.root.rglob("*") if p.is_file() and p.name != ".lock"}
    with pytest.raises(BadInputError, match="older fintensor.*cache migrate"):  # no mixed layouts
        filled.write_bars("AAPL", sp500(shared_data, "AAPL").iloc[:5], source="lean", adjust="raw")
    assert {p: p.read_bytes() for p in filled.root.rglob("*") if p.is_file() and p.name != ".lock"} == before
    got = {"1d": filled.read(["AAPL", "MSFT"]), "1m": filled.read("^GSPC", interval="1m"),
           "tick": filled.read_ticks("000001.SZ")}
    assert all(got[k].equals(want[k]) for k in want)
    assert all("cache migrate" in p.message for p in filled.verify()) and filled.verify()
    capsys.readouterr()
    assert main(["cache", "migrate", "--store", str(filled.root)]) == 0
    assert "migrated 5 partition(s)" in capsys.readouterr().out
    assert filled.verify() == [] and filled.migrate() == []
    assert pq.read_schema(filled.files("^GSPC", "1m")[0]).field("time").type == UTC_US
    assert all(json.loads(p.read_text())["format"] == FORMAT_VERSION
               for p in filled.root.glob("**/_manifest.json"))
    assert not list(filled.root.glob("bars/*/*/_manifest.json")) and not list(filled.root.glob("bars/*/*/*.parquet"))
    assert len(list(filled.root.glob("bars/*/*/adjust=*/_manifest.json"))) == 3
    got = {"1d": filled.read(["AAPL", "MSFT"]), "1m": filled.read("^GSPC", interval="1m"),
           "tick": filled.read_ticks("000001.SZ")}
    assert all(got[k].equals(want[k]) for k in want)


# ------------------------------------------------------------------------------------ committed files
def test_duckdb_and_polars_read_exactly_the_committed_rows_through_files(filled, shared_data, capsys):
    filled.write_bars("AAPL", sp500(shared_data, "AAPL").iloc[300:310], source="yahoo", adjust="split")  # 2 parts
    orphan = filled.partition_dir("MSFT") / "part-0123456789abcdef.parquet"
    orphan.write_bytes(part_files(filled, "MSFT")[0].read_bytes())  # a leftover an engine's glob would see
    want = filled.read(["AAPL", "MSFT"], as_pandas=True).sort_values(["symbol", "date"]).reset_index(drop=True)
    files = [str(p) for p in filled.files(["AAPL", "MSFT"])]
    assert len(files) == 3 and str(orphan) not in files
    capsys.readouterr()
    assert main(["cache", "files", "AAPL", "MSFT", "--store", str(filled.root)]) == 0
    assert capsys.readouterr().out.split() == files
    assert main(["cache", "files", "--json", "--store", str(filled.root)]) == 0
    assert json.loads(capsys.readouterr().out) == files
    glob = duckdb.sql(f"SELECT count(*) FROM read_parquet('{filled.root}/bars/*/*/*/*.parquet')").fetchall()[0][0]
    assert glob == len(want) + 300  # what a glob would have read: the orphan's rows twice

    duck = duckdb.sql(f"SELECT * FROM read_parquet({files!r}, hive_partitioning=true)").df()
    polar = pl.read_parquet(files, hive_partitioning=True).to_pandas()
    for got in (duck, polar):
        got = got.sort_values(["symbol", "date"]).reset_index(drop=True)
        assert len(got) == len(want) == 610
        np.testing.assert_array_equal(got.symbol.astype(str), want.symbol)
        np.testing.assert_array_equal(pd.to_datetime(got.date).to_numpy(), pd.to_datetime(want.date).to_numpy())
        np.testing.assert_array_equal(got.close.to_numpy(), want.close.to_numpy())
    ticks = pl.read_parquet([str(p) for p in filled.files("000001.SZ", "tick")])
    assert ticks.height == len(filled.read_ticks("000001.SZ")) and ticks.schema["time"] == pl.Datetime("us", "UTC")


CLI_LIMITED = """
import resource, signal, sys
from fintensor.cli import main
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
sys.exit(main(["import", *sys.argv[2:], "--store", sys.argv[1]]))
"""


def test_an_import_past_the_file_size_limit_is_one_error_line_exit_1(tmp_path, shared_data):
    files = [str(shared_data / "us_daily/sp500_5yr_yahoo" / f"{s}_data.csv") for s in ("AAPL", "MSFT")]
    root = tmp_path / "store"
    out = subprocess.run([sys.executable, "-c", CLI_LIMITED, str(root), *files], cwd=REPO, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: could not write"), out.stderr
    assert "Traceback" not in out.stderr and Store(root).verify() == []


def test_cache_files_of_a_symbol_not_stored_is_one_error_line(filled, capsys):
    assert main(["cache", "files", "NOPE", "--store", str(filled.root)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: NOPE: nothing stored at interval 1d")
