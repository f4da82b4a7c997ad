"""`fintensor cache list | info | verify [--repair] | rm`: output, --json, exit codes, no tracebacks."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from fintensor.cli import main
from fintensor.sources import synthetic as syn
from fintensor.store import Store

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def cached(tmp_path, shared_data):
    """A store with a real US stock, three synthetic ones and two days of synthetic A-share ticks."""
    store = Store(tmp_path / "store")
    raw = pd.read_csv(shared_data / "us_daily/sp500_5yr_yahoo/MSFT_data.csv").iloc[:-1]
    store.write_bars("MSFT", pd.DataFrame({"date": raw.Date, "close": raw.Close, "volume": raw.Volume}),
                     source="yahoo", adjust="split")
    syn.market(3, 40, seed=1).write(store)
    syn.ticks(1, 2, freq="1min").write_ticks(store)
    return store


def run(capsys, *argv):
    """(exit code, stdout, stderr) of `fintensor ARGV`."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_list(cached, capsys):
    code, out, err = run(capsys, "cache", "list", "--store", str(cached.root))
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split() == ["symbol", "interval", "start", "end", "rows", "source", "adjustment"]
    assert lines[1].split() == ["MSFT", "1d", "2012-12-06", "2017-12-05", "1259", "yahoo", "split"]
    assert [ln.split()[:2] for ln in lines[2:-1]] == [["SYN0001", "1d"], ["SYN0001.SS", "tick"],
                                                      ["SYN0002", "1d"], ["SYN0003", "1d"]]
    assert lines[-1] == f"store: {cached.root}"
    code, out, _ = run(capsys, "cache", "list", "--json", "--store", str(cached.root))
    assert code == 0 and json.loads(out) == json.loads(json.dumps(cached.list()))


def test_info(cached, capsys):
    code, out, _ = run(capsys, "cache", "info", "msft", "--store", str(cached.root))  # any spelling
    assert code == 0
    assert out.startswith("MSFT daily 1d: 1259 rows 2012-12-06 .. 2017-12-05; source yahoo, adjustment split, "
                          "tz America/New_York, units price_scale=1, volume=shares")
    code, out, _ = run(capsys, "cache", "info", "SYN0001.SS", "--json", "--store", str(cached.root))
    mans = json.loads(out)
    assert code == 0 and [m["date"] for m in mans] == ["2019-01-02", "2019-01-03"]
    assert mans == cached.info("SYN0001.SS")


@pytest.mark.parametrize("argv, message", [
    (["cache", "info", "NOPE"], "error: NOPE is not in the store at"),
    (["cache", "info", "../etc"], "error: symbol '../etc' contains '/', a path separator"),
    (["cache", "rm", "NOPE"], "error: NOPE (any interval) is not in the store at"),
    (["cache", "rm", "MSFT", "--interval", "7s"], "error: unknown interval '7s'"),
])
def test_bad_input_exits_2_with_one_line(cached, capsys, store_digest, argv, message):
    before = store_digest(cached)
    code, out, err = run(capsys, *argv, "--store", str(cached.root))
    assert code == 2 and out == ""
    assert err.startswith(message) and err.count("\n") == 1 and "Traceback" not in err
    assert store_digest(cached) == before
    code, _, err = run(capsys, *argv, "--store", str(cached.root), "--debug")
    assert code == 2 and "Traceback" in err


def test_usage_errors_exit_2(capsys, tmp_path):
    assert run(capsys, "cache")[0] == 2
    assert run(capsys, "cache", "info")[0] == 2  # missing SYMBOL
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run(capsys, "cache", "list", "--store", str(blocker))
    assert code == 2 and "exists and is not a directory" in err
    code, _, err = run(capsys, "cache", "rm", "AAPL", "--store", str(blocker / "store"))
    assert code == 2 and "is not writable" in err


def test_verify_clean_corrupt_and_repair(cached, capsys):
    root = str(cached.root)
    assert run(capsys, "cache", "verify", "--store", root)[:2] == (0, f"store {root} is consistent\n")
    pdir = cached.partition_dir("SYN0002")
    part = pdir / cached.manifest("SYN0002")["parts"][0]["file"]
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 1
    part.write_bytes(bytes(data))
    orphan = cached.partition_dir("MSFT") / "part-0000000000000000.parquet"
    orphan.write_bytes(b"leftover")

    code, out, _ = run(capsys, "cache", "verify", "--store", root)
    assert code == 1
    assert f"{part}: checksum mismatch (corrupted)" in out and f"{orphan}: not listed in the manifest" in out
    assert out.splitlines()[-1].startswith(f"2 problem(s) in {root}")
    code, out, _ = run(capsys, "cache", "verify", "--json", "--store", root)
    assert code == 1
    assert sorted((p["path"], p["repaired"]) for p in json.loads(out)) == sorted([(str(part), False),
                                                                                   (str(orphan), False)])
    code, out, err = run(capsys, "cache", "verify", "--quiet", "--store", root)
    assert (code, out) == (1, "") and str(part) in err  # quiet still reports errors

    code, out, _ = run(capsys, "cache", "verify", "--repair", "--store", root)
    assert code == 1 and f"{orphan}: not listed in the manifest" in out and "(repaired)" in out
    assert not orphan.exists() and part.exists()  # corruption is reported, never silently deleted
    assert run(capsys, "cache", "rm", "SYN0002", "--store", root)[:2] == (0, "removed 1 partition(s) of SYN0002\n")
    assert run(capsys, "cache", "verify", "--store", root)[0] == 0


def test_rm(cached, capsys):
    root = str(cached.root)
    code, out, _ = run(capsys, "cache", "rm", "SYN0001.SS", "--interval", "tick", "--json", "--store", root)
    assert code == 0 and json.loads(out) == {"removed": 2}
    assert run(capsys, "cache", "rm", "SYN0003", "--quiet", "--store", root)[:2] == (0, "")
    assert [e["symbol"] for e in cached.list()] == ["MSFT", "SYN0001", "SYN0002"]


def test_console_script_equivalent_in_a_subprocess(cached):
    """`python cli.py` (== the `fintensor` console script) on a damaged store: exit 1 naming the file."""
    part = cached.partition_dir("MSFT") / cached.manifest("MSFT")["parts"][0]["file"]
    part.write_bytes(part.read_bytes()[:-7])
    proc = subprocess.run([sys.executable, "cli.py", "cache", "verify", "--json", "--store", str(cached.root)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    [problem] = json.loads(proc.stdout)
    assert problem["path"] == str(part) and "(truncated?)" in problem["message"]
