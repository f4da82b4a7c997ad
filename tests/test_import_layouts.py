"""Files as people have them (issue #12, #11): each test writes a small file in a real vendor's shape and
checks the stored values against the values written (the oracle), or the one-line refusal.
"""
from __future__ import annotations

import gzip
import os
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import fintensor as ft
from fintensor.cli import main
from fintensor.errors import BadInputError, FintensorError
from fintensor.sources import files

CLOSES = [10.5, 11.25, 12.0]


def stored(store, symbol):
    got = store.read(symbol, interval="1d", as_pandas=True)
    return [str(d)[:10] for d in got["date"]], got["close"].tolist()


def test_to_csv_with_an_unnamed_date_index(tmp_path, store):
    df = pd.DataFrame({"Open": CLOSES, "High": CLOSES, "Low": CLOSES, "Close": CLOSES},
                      index=pd.to_datetime(["2020-01-02", "2020-01-03", "2020-01-06"]))
    df.to_csv(tmp_path / "AAPL.csv")  # header ",Open,High,Low,Close"
    assert (tmp_path / "AAPL.csv").read_text().startswith(",Open")
    ft.import_csv(tmp_path / "AAPL.csv", store=store)
    assert stored(store, "AAPL") == (["2020-01-02", "2020-01-03", "2020-01-06"], CLOSES)


@pytest.mark.parametrize("written", [
    ["Jan 2 2020", "Jan 3 2020", "Jan 6 2020"],
    ['"January 2, 2020"', '"January 3, 2020"', '"January 6, 2020"'],
    ["20200102.0", "20200103.0", "20200106.0"],                       # YYYYMMDD as floats
    [str(int(pd.Timestamp(d).timestamp())) for d in ("2020-01-02", "2020-01-03", "2020-01-06")],   # epoch s
    [str(int(pd.Timestamp(d).timestamp()) * 1000) for d in ("2020-01-02", "2020-01-03", "2020-01-06")],
])
def test_vendor_date_spellings(tmp_path, store, written):
    path = tmp_path / "MSFT.csv"
    path.write_text("date,close\n" + "".join(f"{d},{c}\n" for d, c in zip(written, CLOSES)))
    ft.import_csv(path, store=store)
    assert stored(store, "MSFT") == (["2020-01-02", "2020-01-03", "2020-01-06"], CLOSES)


def test_monthly_yyyymm_and_dot_for_missing(tmp_path, store):
    path = tmp_path / "CPI.csv"  # FRED writes '.' for a missing value
    path.write_text("DATE,close\n202001,1.5\n202002,.\n202003,2.5\n")
    report = ft.import_csv(path, store=store)
    assert stored(store, "CPI") == (["2020-01-01", "2020-03-01"], [1.5, 2.5])
    assert any("dropped 1 row(s) without values" in w for w in report.warnings)


def test_day_month_ambiguity_is_refused_then_resolved(tmp_path, store, store_digest, capsys):
    path = tmp_path / "IBM.csv"
    path.write_text("date,close\n01/02/2020,1\n03/02/2020,2\n04/02/2020,3\n")  # D/M or M/D: no day > 12
    before = store_digest(store)
    with pytest.raises(BadInputError, match=r"day/month or month/day.*--date-format %d/%m/%Y or %m/%d/%Y"):
        ft.import_csv(path, store=store)
    assert store_digest(store) == before
    assert main(["import", str(path), "--store", str(store.root)]) == 2
    assert "--date-format" in capsys.readouterr().err
    ft.import_csv(path, store=store, date_format="%d/%m/%Y")
    assert stored(store, "IBM")[0] == ["2020-02-01", "2020-02-03", "2020-02-04"]


def test_a_day_above_12_decides_the_order(tmp_path, store):
    path = tmp_path / "IBM.csv"
    path.write_text("date,close\n01/02/2020,1\n25/02/2020,2\n")
    ft.import_csv(path, store=store)
    assert stored(store, "IBM")[0] == ["2020-02-01", "2020-02-25"]


def test_date_column_option(tmp_path, store):
    path = tmp_path / "GE.csv"
    path.write_text("as_of,ts_date,close\n2020-01-02,x,1\n2020-01-03,y,2\n")
    ft.import_csv(path, store=store, date_column="as_of")
    assert stored(store, "GE") == (["2020-01-02", "2020-01-03"], [1.0, 2.0])
    with pytest.raises(BadInputError, match=r"no column named 'when'"):
        ft.import_csv(path, store=store, date_column="when")


def test_file_name_that_is_not_a_ticker_is_refused(tmp_path, store):
    path = tmp_path / "test.csv"
    path.write_text("date,close\n2020-01-02,1\n")
    with pytest.raises(BadInputError, match=r"does not look like a ticker.*--symbol"):
        ft.import_csv(path, store=store)
    ft.import_csv(path, store=store, symbol="TEST")
    assert stored(store, "TEST") == (["2020-01-02"], [1.0])


def test_folder_recursion_and_one_bad_file_is_skipped(tmp_path, store, capsys):
    root = tmp_path / "data"
    (root / "us" / "tech").mkdir(parents=True)
    (root / "AAPL.csv").write_text("date,close\n2020-01-02,1\n")
    (root / "us" / "tech" / "MSFT.csv").write_text("date,close\n2020-01-02,2\n")
    (root / "us" / "BROKEN.csv").write_text("date,close\n2020-01-02,abc\n")
    (root / "README.md").write_text("# notes\n")
    code = main(["import", str(root), "--store", str(store.root)])
    out, err = capsys.readouterr()
    assert code == 1  # something was skipped
    assert stored(store, "AAPL")[1] == [1.0] and stored(store, "MSFT")[1] == [2.0]
    assert "BROKEN.csv" in out and "cannot read 'abc' as a number" in out and "README.md" in out
    assert "2 file(s) skipped" in err
    (root / "deep" / "er").mkdir(parents=True)
    (root / "deep" / "er" / "IBM.csv").write_text("date,close\n2020-01-02,3\n")
    with pytest.raises(BadInputError, match=r"holds no files.*--recursive"):
        ft.import_csv(root / "deep", store=store, recursive=False)  # only a sub-folder below
    # a glob that matches folders reads them; two spellings of one file are read once
    report = ft.import_csv([str(root / "u*"), str(root / "AAPL.csv"), str(root / "." / "AAPL.csv")], store=store)
    assert sorted(report.symbols) == ["AAPL", "MSFT"]  # u* matched the folder 'us' 
    assert [r.files for r in report.results if r.symbol == "AAPL"] == [[str(root / "AAPL.csv")]]
    assert [f for f, _ in report.skipped] == [str(root / "us" / "BROKEN.csv")]


def test_lean_minute_folder_with_quote_bars(shared_data, store, capsys):
    folder = shared_data / "lean_algoseek_us_equity" / "minute" / "aapl"
    report = ft.import_csv(folder, store=store)
    rows = store.read("AAPL", interval="1m", as_pandas=True)
    assert len(rows) == 686 + 783 + 834  # every trade bar of the three days (PROVENANCE.md)
    assert report.ok and report.skipped == []
    assert sorted((Path(f).name, why.split(" rows")[0]) for f, why in report.not_stored) == [
        ("20140605_quote.zip", "830"), ("20140606_quote.zip", "835"), ("20140609_quote.zip", "847")]
    assert main(["import", str(folder), "--store", str(store.root)]) == 0  # a re-import: nothing fails
    assert "not stored:" in capsys.readouterr().out


def test_fifo_and_devices_say_what_they_are(tmp_path, store):
    fifo = tmp_path / "AAPL.csv"
    os.mkfifo(fifo)
    with pytest.raises(BadInputError, match=r"is a FIFO \(named pipe\), not a regular file"):
        ft.import_csv(fifo, store=store)
    with pytest.raises(BadInputError, match=r"is a character device, not a regular file"):
        ft.import_csv("/dev/zero", store=store)


def test_gzip_bomb_is_refused_in_bounded_memory(tmp_path, store):
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip container
    parts = [packer.compress(b"date,close\n")]
    block = b"2020-01-02,1\n" * (1 << 16)
    parts += [packer.compress(block) for _ in range(1000)]  # ~850 MB of CSV
    path = tmp_path / "AAPL.csv.gz"
    path.write_bytes(b"".join(parts) + packer.flush())
    assert path.stat().st_size < 2 << 20
    tracemalloc.start()
    try:
        with pytest.raises(BadInputError, match=r"decompression bomb"):
            ft.import_csv(path, store=store)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    packed = path.stat().st_size
    limit = max(files.UNPACKED_FREE, files.UNPACKED_RATIO * packed)
    assert limit < 400 << 20
    assert peak < 2.5 * limit  # stopped at the limit (chunks + one join), not at 850 MB


def test_encrypted_zip_is_one_error_line(tmp_path, store):
    path = tmp_path / "AAPL.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("AAPL.csv", "date,close\n2020-01-02,1\n")
    raw = bytearray(path.read_bytes())
    raw[6] |= 1  # the local header's "encrypted" flag
    central = raw.rfind(b"PK\x01\x02")
    raw[central + 8] |= 1  # and the central directory's
    path.write_bytes(bytes(raw))
    with pytest.raises(BadInputError, match=r"encrypted"):
        ft.import_csv(path, store=store)


def test_gz_still_imports(tmp_path, store):
    path = tmp_path / "AAPL.csv.gz"
    path.write_bytes(gzip.compress(b"date,close\n2020-01-02,1\n"))
    ft.import_csv(path, store=store)
    assert stored(store, "AAPL") == (["2020-01-02"], [1.0])


def test_wide_file_with_bare_a_share_codes(tmp_path, store):
    path = tmp_path / "closes.csv"
    path.write_text("date,000001,600519\n2020-01-02,16.87,1130.0\n2020-01-03,17.18,.\n")
    ft.import_csv(path, store=store)
    assert stored(store, "000001.SZ") == (["2020-01-02", "2020-01-03"], [16.87, 17.18])
    assert stored(store, "600519.SS") == (["2020-01-02"], [1130.0])


@pytest.mark.parametrize("column", ["vix", "value", "price", "return"])
def test_single_series_value_column(tmp_path, store, column):
    path = tmp_path / "series.csv"
    path.write_text(f"DATE,{column}\n2020-01-02,12.47\n2020-01-03,14.02\n")
    report = ft.import_csv(path, store=store, symbol="^VIX")
    assert stored(store, "^VIX") == (["2020-01-02", "2020-01-03"], [12.47, 14.02])
    assert any(f"single value column {column!r} as 'close'" in w for w in report.warnings)
    ft.import_csv(path, store=store, symbol="^VIX", field="adj_close", on_conflict="overwrite")
    assert store.read("^VIX", interval="1d", as_pandas=True)["adj_close"].tolist() == [12.47, 14.02]


def test_symbol_minus_one_gets_a_correct_message(tmp_path, store, capsys):
    path = tmp_path / "AAPL.csv"
    path.write_text("date,close\n2020-01-02,1\n")
    with pytest.raises(BadInputError, match=r"symbol '-1' starts with '-'"):
        ft.import_csv(path, store=store, symbol="-1")
    assert main(["import", str(path), "--symbol=-1", "--store", str(store.root)]) == 2
    assert "starts with '-'" in capsys.readouterr().err


def test_cli_date_format_option(tmp_path, store):
    path = tmp_path / "IBM.csv"
    path.write_text("date,close\n01/02/2020,1\n03/02/2020,2\n")
    assert main(["import", str(path), "--date-format", "%m/%d/%Y", "--store", str(store.root)]) == 0
    assert stored(store, "IBM")[0] == ["2020-01-02", "2020-03-02"]


def test_every_row_is_accounted_for(tmp_path, store):
    path = tmp_path / "AAPL.csv"  # 6 rows: one empty, one exact duplicate, 4 stored
    path.write_text("date,open,close\n2020-01-02,1,1.5\n2020-01-03,.,.\n2020-01-06,2,2.5\n"
                    "2020-01-06,2,2.5\n2020-01-07,3,3.5\n2020-01-08,4,4.5\n")
    other = tmp_path / "more" / "AAPL.csv"  # the same symbol again: 1 row repeated, 1 new
    other.parent.mkdir()
    other.write_text("date,open,close\n2020-01-08,4,4.5\n2020-01-09,5,5.5\n")
    result = ft.import_csv([path, other], store=store)["AAPL"]
    assert result.read == 8
    assert result.dropped == {"no values": 1, "exact duplicate": 1, "same row in another file": 1}
    assert result.rows == result.added == 5 == result.read - sum(result.dropped.values())
    assert len(store.read("AAPL", interval="1d", as_pandas=True)) == 5
    assert "5 rows, 5 added, 0 updated, 0 unchanged; 8 read, 1 dropped (no values), 1 dropped (exact duplicate)" \
        in str(result)


def test_import_and_download_return_one_report_type(tmp_path, store):
    from fintensor.sources.report import IngestReport
    from fintensor.sources.yahoo import DownloadReport

    path = tmp_path / "AAPL.csv"
    path.write_text("date,close\n2020-01-02,1\n2020-01-03,2\n")
    report = ft.import_csv(path, store=store)
    assert isinstance(report, IngestReport) and issubclass(DownloadReport, IngestReport)
    assert report.ok and report.failed == [] and report.raise_for_status() is report
    assert report.table().splitlines()[1].split()[:3] == ["AAPL", "added", "2"]
    again = ft.import_csv(path, store=store)
    assert again["AAPL"].status == "unchanged" and again["AAPL"].unchanged == 2
