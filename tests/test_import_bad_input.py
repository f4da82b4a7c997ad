"""Bad input to ft.import_csv / `fintensor import`: one clear error, exit 2, and an untouched store.

Each case is a small file derived from a real Yahoo file (or raw bytes), imported *after* a good file of
another symbol, so a half-done import would show up in the store's digest.
"""
from __future__ import annotations

import gzip
import zipfile
from pathlib import Path

import pytest

import fintensor as ft
from fintensor.cli import main
from fintensor.errors import BadInputError

YAHOO = "us_daily/sp500_5yr_yahoo/AAPL_data.csv"


def yahoo_lines(shared_data: Path, rows: int = 5) -> list[str]:
    """Header + the first rows of a real Yahoo file: Date,Open,High,Low,Close,Adj Close,Volume,Name."""
    return (shared_data / YAHOO).read_text().splitlines()[: rows + 1]


def edit(lines: list[str], line: int, column: int, value: str) -> list[str]:
    """Replace one cell; ``line`` is the 1-based line number in the file (the header is line 1)."""
    out = list(lines)
    cells = out[line - 1].split(",")
    cells[column] = value
    out[line - 1] = ",".join(cells)
    return out


def drop_column(lines: list[str], column: int) -> list[str]:
    return [",".join(c for i, c in enumerate(l.split(",")) if i != column) for l in lines]


def text(lines: list[str]) -> bytes:
    return ("\n".join(lines) + "\n").encode()


def zipped(members: dict[str, bytes]) -> bytes:
    import io

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


# name -> (file name, content builder(lines) -> bytes, import options, message pattern)
CASES = {
    "missing close column": ("AAPL.csv", lambda l: text(drop_column(l, 4)), {}, r"no close or price column"),
    "missing date column": ("AAPL.csv", lambda l: text(drop_column(l, 0)), {}, r"no date column"),
    "unparseable number": ("AAPL.csv", lambda l: text(edit(l, 4, 6, "12x4")), {},
                           r"line 4, column 'volume': cannot read '12x4' as a number"),
    "unparseable date": ("AAPL.csv", lambda l: text(edit(l, 3, 0, "2012-13-45")), {},
                         r"line 3: cannot read '2012-13-45' as a date"),
    "mixed date formats": ("AAPL.csv", lambda l: text(edit(l, 4, 0, "12/11/2012")), {},
                           r"line 4: cannot read '12/11/2012' as a date in the format of line 2"),
    "mixed timezone": ("X.csv", lambda l: b"datetime,price,volume\n2019-02-01 09:30:00+08:00,1,1\n"
                                          b"2019-02-01 09:31:00,1,1\n", {"symbol": "000001.SZ"},
                       r"line 3: '2019-02-01 09:31:00' has no UTC offset but line 2 .* does"),
    "missing timezone": ("X.csv", lambda l: b"datetime,close\n2019-02-01 09:30,1\n2019-02-01 09:31,2\n",
                         {"symbol": "XYZ"}, r"no timezone and none can be inferred for XYZ; pass timezone="),
    "duplicate timestamp, other values": ("AAPL.csv", lambda l: text(l + [edit(l, 3, 4, "1.5")[2]]), {},
                                          r"lines 3 and 7: duplicate date 2012-12-07"),
    "negative price": ("AAPL.csv", lambda l: text(edit(l, 5, 4, "-3.5")), {},
                       r"line 5, column 'close': negative value -3.5"),
    "negative volume": ("AAPL.csv", lambda l: text(edit(l, 2, 6, "-100")), {},
                        r"line 2, column 'volume': negative value -100"),
    "inf": ("AAPL.csv", lambda l: text(edit(l, 6, 1, "inf")), {}, r"line 6, column 'open': inf is not a finite"),
    "empty file": ("AAPL.csv", lambda l: b"", {}, r"the file is empty"),
    "header only": ("AAPL.csv", lambda l: text(l[:1]), {}, r"no data rows"),
    "binary garbage": ("AAPL.csv", lambda l: bytes(range(256)) * 40, {}, r"binary content"),
    "not UTF-8": ("AAPL.csv", lambda l: text(l) + b"2019-01-02,\xff\xfe\xfa,1,1,1,1,1,AAPL\n", {},
                  r"line 7 is not UTF-8 text"),
    "huge line": ("AAPL.csv", lambda l: text(l) + b"2019-01-02," + b"1" * 200_000 + b"\n", {},
                  r"line 7 is 200,011 bytes long"),
    "symbol with path characters (option)": ("AAPL.csv", text, {"symbol": "../../etc/passwd"},
                                             r"path separator"),
    "symbol with path characters (column)": ("AAPL.csv", lambda l: text(edit(l, 3, 7, "AAPL/../../x")), {},
                                             r"line 3: symbol 'AAPL/../../x' contains '/', a path separator"),
    "unknown format": ("AAPL.csv", text, {"format": "bloomberg"}, r"unknown format 'bloomberg'; use one of"),
    "zip with two files": ("AAPL.zip", lambda l: zipped({"a.csv": text(l), "b.csv": text(l)}), {},
                           r"the zip holds 2 files"),
    "damaged gzip": ("AAPL.csv.gz", lambda l: gzip.compress(text(l))[:60], {}, r"damaged gzip file"),
    "ragged rows": ("AAPL.csv", lambda l: text(l + ["2019-01-02,1,1,1,1,1,1,AAPL,extra,more"]), {},
                    r"cannot parse the CSV"),
    "headerless, unknown layout": ("prices.csv", lambda l: text(l[1:]), {},
                                   r"no header and not a known headerless layout"),
    "bad option value": ("AAPL.csv", text, {"volume_unit": "bushels"}, r"volume_unit must be one of"),
    "ticks without times": ("AAPL.csv", text, {"kind": "ticks"}, r"ticks need a time of day"),
}

CLI_FLAGS = {"symbol": "--symbol", "format": "--format", "volume_unit": "--volume-unit"}


def cli_args(options: dict) -> list[str]:
    out = []
    for key, value in options.items():
        out += ["--ticks"] if key == "kind" else [CLI_FLAGS[key], value]
    return out


@pytest.fixture
def seeded(shared_data, store):
    """A store that already holds data, so 'unchanged' means something."""
    ft.import_csv(shared_data / "cn_daily/tushare_raw/000651.SZ.csv", store=store)
    return store


@pytest.mark.parametrize("case", list(CASES))
def test_bad_file_one_clear_error_exit_2_store_unchanged(case, shared_data, seeded, tmp_path, store_digest, capsys):
    name, build, options, pattern = CASES[case]
    good = tmp_path / "good" / "MSFT_data.csv"  # a valid file of a new symbol, listed first
    good.parent.mkdir()
    good.write_text((shared_data / "us_daily/sp500_5yr_yahoo/MSFT_data.csv").read_text())
    bad = tmp_path / name
    bad.write_bytes(build(yahoo_lines(shared_data)))
    before = store_digest(seeded)

    with pytest.raises(BadInputError, match=pattern) as info:
        ft.import_csv([good, bad], store=seeded, **options)
    if not options:
        assert str(bad) in str(info.value)  # the message names the file
    assert store_digest(seeded) == before

    code = main(["import", str(good), str(bad), "--store", str(seeded.root)] + cli_args(options))
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert store_digest(seeded) == before
    assert "MSFT" not in seeded.symbols()


def test_path_that_does_not_exist(seeded, tmp_path, store_digest, capsys):
    before = store_digest(seeded)
    with pytest.raises(BadInputError, match=r"no_such\.csv: no such file"):
        ft.import_csv(tmp_path / "no_such.csv", store=seeded)
    with pytest.raises(BadInputError, match=r"no file matches this pattern"):
        ft.import_csv(str(tmp_path / "*.csv"), store=seeded)
    assert main(["import", str(tmp_path / "no_such.csv"), "--store", str(seeded.root)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert store_digest(seeded) == before


def test_conflict_in_the_second_file_writes_nothing(shared_data, seeded, tmp_path, store_digest):
    """A conflict with the store found in any file stops the whole import before the first write."""
    src = (shared_data / "cn_daily/tushare_raw/000651.SZ.csv").read_text().splitlines()
    src[1] = src[1].replace(",", ",", 1)
    cells = src[1].split(",")
    cells[6] = str(float(cells[6]) + 1)  # close
    (tmp_path / "000651.SZ.csv").write_text("\n".join(src[:1] + [",".join(cells)] + src[2:]) + "\n")
    before = store_digest(seeded)
    with pytest.raises(ft.errors.ConflictError, match="000651.SZ 1d: 1 row"):
        ft.import_csv([shared_data / "cn_daily/tushare_raw/600028.SH.csv", tmp_path / "000651.SZ.csv"],
                      store=seeded)
    assert store_digest(seeded) == before and "600028.SS" not in seeded.symbols()
