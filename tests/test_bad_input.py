"""The bad-input catalogue: malformed input across the CLI and the Python API, one table.

Each case runs against a store that already holds data (real AAPL bars, real A-share ticks, a cached
tensor) and must give ONE clear error naming the problem: for the CLI a single ``error: ...`` line, no
traceback, and the expected non-zero exit code; for the API a FintensorError with that exit code and a
one-line message. Either way the store tree hashes the same before and after. (Per-module suites test
their own corners in depth: test_import_bad_input.py, test_yahoo.py, test_cli_cache.py, ...)

Input files a case needs are listed with it: ``{tmp}``, ``{store}`` and ``{run}`` (a checkpoint
directory) in its arguments are filled in.
"""
from __future__ import annotations

import dataclasses
import gzip
import io
import shutil
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pytest
import torch
from hostile import pickle_payload, torch_payload

import fintensor as ft
from fintensor.cli import main
from fintensor.errors import FintensorError
from fintensor.store import Store
from fintensor.trainer import TrainConfig

AAPL = "us_daily/sp500_5yr_yahoo/AAPL_data.csv"
TICKS = "cn_intraday_tick/hikyuu/trans_tick_2019-02-01_2019-02-11.csv.gz"
RECIPE = 'symbols = ["AAPL"]\nstart = "2012-12-06"\nend = "2012-12-31"\n'


# ------------------------------------------------------------------------------------- file builders
def yahoo(*edits: tuple[int, int, str], add: tuple[str, ...] = (), rows: int = 5) -> Callable:
    """The real AAPL file's header and first ``rows`` rows, cells replaced by (line, column, value) (the
    header is line 1), ``add`` lines appended."""
    def build(world: World) -> bytes:
        out = [line.split(",") for line in world.yahoo_lines[: rows + 1]]
        for line, column, value in edits:
            out[line - 1][column] = value
        return ("\n".join([",".join(cells) for cells in out] + list(add)) + "\n").encode()

    return build


def text(*lines: str) -> Callable:
    return lambda _: ("\n".join(lines) + "\n").encode()


def raw(data: bytes) -> Callable:
    return lambda _: data


def zipped(members: dict[str, bytes]) -> Callable:
    def build(world):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for name, data in members.items():
                zf.writestr(name, data)
        return buf.getvalue()

    return build


def recipe(extra: str) -> Callable:
    return lambda _: (RECIPE + extra).encode()


# ------------------------------------------------------------------------------------------- the cases
@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    run: tuple[str, ...] | Callable  # CLI argv, or a callable(ctx) that must raise
    code: int                        # the exit code (for the API: the exception's exit_code)
    message: str                     # text the error line must contain
    files: dict = dataclasses.field(default_factory=dict)  # name under {tmp} -> builder(world) -> bytes ('x/': a dir)


def cli(*argv: str) -> tuple[str, ...]:
    return argv


def frame(**columns) -> pd.DataFrame:
    return pd.DataFrame({"date": ["2019-01-02"], **columns})


def tensor(*shape, dims=("time", "stock"), **kwargs):
    return ft.StockTensor(torch.zeros(*shape), dims, **kwargs)


CASES = [
    # --- CSV files (fintensor import) ------------------------------------------------------------------
    Case("csv: renamed columns", cli("import", "{tmp}/AAPL.csv"), 2, "no date column",
         {"AAPL.csv": text("When,Opening,Hi,Lo,Last,Vol", "2019-01-02,1,1,1,1,1")}),
    Case("csv: missing close column", cli("import", "{tmp}/AAPL.csv"), 2, "no close or price column",
         {"AAPL.csv": text("Date,Open,High,Low,Volume", "2019-01-02,1,1,1,1")}),
    Case("csv: a row with extra fields", cli("import", "{tmp}/AAPL.csv"), 2, "header names 8 columns but line 2 has 9",
         {"AAPL.csv": yahoo((2, 7, "AAPL,extra"))}),
    Case("csv: two columns mean close", cli("import", "{tmp}/AAPL.csv"), 2, "both mean 'close'",
         {"AAPL.csv": text("Date,Close,close", "2019-01-02,1,2")}),
    Case("csv: thousands separator", cli("import", "{tmp}/AAPL.csv"), 2, "cannot read '1,234.5' as a number",
         {"AAPL.csv": text("Date,Close", '2019-01-02,"1,234.5"')}),
    Case("csv: decimal commas", cli("import", "{tmp}/AAPL.csv"), 2, "cannot read '1,5' as a number",
         {"AAPL.csv": text("Date;Open;Close", "2019-01-02;1,5;1,6")}),
    Case("csv: booleans for numbers", cli("import", "{tmp}/MSFT.csv"), 2, "column 'volume': cannot read 'True'",
         {"MSFT.csv": text("Date,Close,Volume", "2019-01-02,1,TRUE", "2019-01-03,1,FALSE")}),
    Case("csv: hex number", cli("import", "{tmp}/AAPL.csv"), 2, "cannot read '0x10' as a number",
         {"AAPL.csv": yahoo((2, 4, "0x10"))}),
    Case("csv: 1e999 overflows to inf", cli("import", "{tmp}/AAPL.csv"), 2, "inf is not a finite number",
         {"AAPL.csv": yahoo((5, 2, "1e999"))}),
    Case("csv: negative volume", cli("import", "{tmp}/AAPL.csv"), 2, "column 'volume': negative value -5",
         {"AAPL.csv": yahoo((3, 6, "-5"))}),
    Case("csv: split ratio -2", cli("import", "{tmp}/AAPL.csv"), 2, "'split' must be > 0",
         {"AAPL.csv": text("Date,Close,split", "2019-01-02,1,-2")}),
    Case("csv: trade status 7", cli("import", "{tmp}/AAPL.csv"), 2, "column 'trade_status': value 7",
         {"AAPL.csv": text("Date,Close,tradestatus", "2019-01-02,1,7")}),
    Case("csv: dates in two formats", cli("import", "{tmp}/AAPL.csv"), 2, "in the format of line 2",
         {"AAPL.csv": yahoo((4, 0, "20121211"))}),
    Case("csv: February 30th", cli("import", "{tmp}/AAPL.csv"), 2, "cannot read '2012-02-30' as a date",
         {"AAPL.csv": yahoo((2, 0, "2012-02-30"))}),
    Case("csv: the year 1500", cli("import", "{tmp}/AAPL.csv"), 2, "'1500-01-03' is outside",
         {"AAPL.csv": yahoo((2, 0, "1500-01-03"))}),
    Case("csv: the year 9999", cli("import", "{tmp}/AAPL.csv"), 2, "'9999-12-31' is outside",
         {"AAPL.csv": yahoo((6, 0, "9999-12-31"))}),
    Case("csv: an empty date", cli("import", "{tmp}/AAPL.csv"), 2, "line 3: the date is empty",
         {"AAPL.csv": yahoo((3, 0, ""))}),
    Case("csv: UTC offset on some rows only", cli("import", "{tmp}/X.csv", "--symbol", "000001.SZ"), 2,
         "has no UTC offset but line 2",
         {"X.csv": text("datetime,price,volume", "2019-02-01 09:30:00+08:00,1,1", "2019-02-01 09:31:00,1,1")}),
    Case("csv: intraday times, no timezone", cli("import", "{tmp}/X.csv", "--symbol", "SPY"), 2,
         "no timezone and none can be inferred for SPY",
         {"X.csv": text("datetime,close", "2019-02-01 09:30,1", "2019-02-01 09:31,2")}),
    Case("csv: a local time that does not exist", cli("import", "{tmp}/X.csv", "--symbol", "SPY", "--tz",
                                                      "America/New_York"), 2, "does not exist or is ambiguous",
         {"X.csv": text("datetime,close", "2019-03-10 01:59,1", "2019-03-10 02:30,2")}),
    Case("csv: one date, two closes", cli("import", "{tmp}/AAPL.csv"), 2, "duplicate date 2012-12-07",
         {"AAPL.csv": yahoo((4, 0, "2012-12-07"))}),
    Case("csv: empty", cli("import", "{tmp}/AAPL.csv"), 2, "the file is empty", {"AAPL.csv": raw(b"")}),
    Case("csv: only blank lines", cli("import", "{tmp}/AAPL.csv"), 2, "the file is empty",
         {"AAPL.csv": raw(b"\n\r\n\n")}),
    Case("csv: a header and no rows", cli("import", "{tmp}/AAPL.csv"), 2, "no data rows",
         {"AAPL.csv": raw(b"\xef\xbb\xbfDate,Close\n")}),
    Case("csv: binary garbage", cli("import", "{tmp}/AAPL.csv"), 2, "not UTF-8 text",
         {"AAPL.csv": raw(b"\x89PNG\r\n\x1a\n" + bytes(range(1, 256)) * 8)}),
    Case("csv: UTF-16", cli("import", "{tmp}/AAPL.csv"), 2, "binary content",
         {"AAPL.csv": raw("Date,Close\n2019-01-02,1\n".encode("utf-16"))}),
    Case("csv: a 1 MB line", cli("import", "{tmp}/AAPL.csv"), 2, "line 7 is 1,000,011 bytes long",
         {"AAPL.csv": yahoo(add=("2019-01-02," + "9" * 1_000_000,))}),
    Case("csv: truncated gzip", cli("import", "{tmp}/AAPL.csv.gz"), 2, "damaged gzip file",
         {"AAPL.csv.gz": lambda w: gzip.compress(yahoo()(w))[:40]}),
    Case("csv: a zip of two files", cli("import", "{tmp}/AAPL.zip"), 2, "the zip holds 2 files",
         {"AAPL.zip": zipped({"a.csv": b"Date,Close\n", "b.csv": b"Date,Close\n"})}),
    Case("csv: a damaged zip", cli("import", "{tmp}/AAPL.zip"), 2, "damaged zip file",
         {"AAPL.zip": raw(b"PK\x03\x04" + b"\x00\x01" * 50)}),
    Case("csv: symbol column with a Greek capital alpha", cli("import", "{tmp}/prices.csv"), 2,
         "non-ASCII character 'Α' (U+0391 GREEK CAPITAL LETTER ALPHA)",
         {"prices.csv": text("Date,Close,Symbol", "2019-01-02,1,\u0391APL")}),
    Case("csv: symbol column with a path", cli("import", "{tmp}/prices.csv"), 2, "a path separator",
         {"prices.csv": text("Date,Close,Symbol", "2019-01-02,1,../../etc/x")}),
    Case("csv: no such file", cli("import", "{tmp}/nothing.csv"), 2, "no such file"),
    Case("csv: a pattern that matches nothing", cli("import", "{tmp}/*.parquet"), 2, "no file matches this pattern"),
    Case("csv: an empty directory", cli("import", "{tmp}/empty"), 2, "the directory holds no files",
         {"empty/": None}),
    # --- import options ---------------------------------------------------------------------------------
    Case("option: --symbol of 300 characters", cli("import", "{tmp}/AAPL.csv", "--symbol", "A" * 300), 2,
         "300 characters long", {"AAPL.csv": yahoo()}),
    Case("option: --symbol with an escape sequence", cli("import", "{tmp}/AAPL.csv", "--symbol", "\x1b[31mAAPL"),
         2, "control character U+001B", {"AAPL.csv": yahoo()}),
    Case("option: --symbol in fullwidth letters", cli("import", "{tmp}/AAPL.csv", "--symbol", "ＡＡＰＬ"), 2,
         "did you mean 'A'?", {"AAPL.csv": yahoo()}),
    Case("option: --symbol with a Cyrillic A", cli("import", "{tmp}/AAPL.csv", "--symbol", "\u0410APL"), 2,
         "CYRILLIC CAPITAL LETTER A", {"AAPL.csv": yahoo()}),
    Case("option: --tz on Mars", cli("import", "{tmp}/AAPL.csv", "--tz", "Mars/Olympus_Mons"), 2,
         "unknown timezone 'Mars/Olympus_Mons'", {"AAPL.csv": yahoo()}),
    Case("option: --interval 7m", cli("import", "{tmp}/AAPL.csv", "--interval", "7m"), 2, "unknown interval '7m'",
         {"AAPL.csv": yahoo()}),
    Case("option: --price-scale -1", cli("import", "{tmp}/AAPL.csv", "--price-scale", "-1"), 2,
         "price_scale must be", {"AAPL.csv": yahoo()}),
    Case("option: --layout diagonal", cli("import", "{tmp}/AAPL.csv", "--layout", "diagonal"), 2,
         "layout must be one of", {"AAPL.csv": yahoo()}),
    Case("option: --on-conflict maybe", cli("import", "{tmp}/AAPL.csv", "--on-conflict", "maybe"), 2,
         "on_conflict must be one of", {"AAPL.csv": yahoo()}),
    Case("option: an unknown flag", cli("import", "{tmp}/AAPL.csv", "--frobnicate"), 2,
         "unrecognized arguments: --frobnicate", {"AAPL.csv": yahoo()}),
    Case("conflict: the same dates, other prices", cli("import", "{tmp}/AAPL.csv"), 2,
         "1 row(s) conflict with stored values", {"AAPL.csv": yahoo((3, 4, "1.5"))}),
    # --- symbols, dates, ranges, intervals (download, cache) -------------------------------------------
    Case("symbol: NUL byte", lambda c: c.store.read_partition("AA\x00PL"), 2, "contains a NUL byte"),
    Case("symbol: not a string", lambda c: c.store.write_bars(600519, frame(close=[1.0]), source="x"), 2,
         "symbol must be a string, got int"),
    Case("symbol: a path", cli("cache", "info", "../../etc/passwd"), 2, "a path separator"),
    Case("symbol: a Windows path", cli("cache", "rm", "..\\..\\x"), 2, "a path separator"),
    Case("symbol: dots only", cli("cache", "info", ".."), 2, "a leading or doubled '.'"),
    Case("symbol: a newline", cli("download", "AAPL\nMSFT"), 2, "control character U+000A"),
    Case("symbol: empty", cli("cache", "info", "  "), 2, "empty symbol"),
    Case("symbol: bare A-share code", cli("cache", "info", "600519"), 2, "ambiguous: write 600519.SZ"),
    Case("symbol: not in the store", cli("cache", "info", "MSFT"), 2, "MSFT is not in the store"),
    Case("date: February 30th", cli("download", "AAPL", "--start", "2019-02-30"), 2, "cannot read '2019-02-30'"),
    Case("date: 'yesterday'", cli("download", "AAPL", "--end", "yesterday"), 2, "cannot read 'yesterday'"),
    Case("date: start after end", cli("download", "AAPL", "--start", "2020-01-05", "--end", "2020-01-01"), 2,
         "start 2020-01-05 is after end 2020-01-01"),
    Case("date: start in the future", cli("download", "AAPL", "--start", "2999-01-01"), 2, "is in the future"),
    Case("date: 1m bars from 2010", cli("download", "AAPL", "--interval", "1m", "--start", "2010-01-04"), 2,
         "keeps 1m bars for the last 30 days only"),
    Case("date: read range reversed", lambda c: c.store.read("AAPL", start="2013-01-05", end="2013-01-01"), 2,
         "after end"),
    Case("interval: 1 year", cli("download", "AAPL", "--interval", "1y"), 2, "unknown interval '1y'"),
    Case("interval: weekly from Yahoo", cli("download", "AAPL", "--interval", "1wk"), 2, "not downloadable"),
    Case("interval: cache rm 7m", cli("cache", "rm", "AAPL", "--interval", "7m"), 2, "unknown interval '7m'"),
    Case("download: retries -1", cli("download", "AAPL", "--retries", "-1"), 2, "retries must be"),
    Case("download: no workers", cli("download", "AAPL", "--workers", "0"), 2, "workers must be"),
    Case("download: max wait NaN", cli("download", "AAPL", "--max-wait", "nan"), 2, "max_wait must be"),
    Case("import: /dev/zero", cli("import", "/dev/zero"), 2, "is a character device, not a regular file"),
    Case("import: a file name that is no ticker", cli("import", "{tmp}/test.csv"), 2,
         "does not look like a ticker (AAPL.csv, 600519.SS.csv); pass symbol= (CLI: --symbol)",
         {"test.csv": text("Date,Close", "2019-01-02,1")}),
    Case("import: symbol -1", cli("import", "{tmp}/AAPL.csv", "--symbol=-1"), 2, "symbol '-1' starts with '-'",
         {"AAPL.csv": text("Date,Close", "2019-01-02,1")}),
    Case("import: D/M or M/D", cli("import", "{tmp}/AAPL.csv"), 2, "--date-format %d/%m/%Y or %m/%d/%Y",
         {"AAPL.csv": text("Date,Close", "01/02/2019,1", "03/02/2019,2")}),
    Case("import: bad --date-format", cli("import", "{tmp}/AAPL.csv", "--date-format", "dd/mm"), 2,
         "date_format must be a strptime format", {"AAPL.csv": text("Date,Close", "2019-01-02,1")}),
    # --- tensors (fintensor build / show, StockTensor) ------------------------------------------------
    Case("build: freq 0s", cli("build", "--symbols", "000001.SZ", "--start", "2019-02-01", "--end", "2019-02-01",
                               "--freq", "0s"), 2, "positive whole number of seconds"),
    Case("build: freq 3 parsecs", cli("build", "--symbols", "000001.SZ", "--start", "2019-02-01", "--end",
                                      "2019-02-01", "--freq", "3parsecs"), 2, "cannot read freq '3parsecs'"),
    Case("build: unknown field", cli("build", "--symbols", "AAPL", "--start", "2012-12-06", "--end", "2012-12-31",
                                     "--fields", "close", "alpha"), 2, "unknown field(s) ['alpha']"),
    Case("build: unknown calendar", cli("build", "--symbols", "AAPL", "--start", "2012-12-06", "--end",
                                        "2012-12-31", "--calendar", "XMARS"), 2, "unknown calendar 'XMARS'"),
    Case("build: fill limit 0", cli("build", "--symbols", "AAPL", "--start", "2012-12-06", "--end", "2012-12-31",
                                    "--fill", "ffill", "--fill-limit", "0"), 2, "positive number of sessions"),
    Case("build: reversed range", cli("build", "--symbols", "AAPL", "--start", "2012-12-31", "--end", "2012-12-06"),
         2, "start 2012-12-31 is after end 2012-12-06"),
    Case("build: a symbol the store lacks", cli("build", "--symbols", "MSFT", "--start", "2012-12-06", "--end",
                                                "2012-12-31"), 2, "has no 1d bars for MSFT"),
    Case("build: --out is a directory", cli("build", "--symbols", "AAPL", "--start", "2012-12-06", "--end",
                                            "2012-12-31", "--out", "{tmp}"), 2, "is a directory"),
    Case("build: integer dtype", lambda c: ft.build("AAPL", "2012-12-06", "2012-12-31", store=c.store,
                                                    dtype=torch.int8), 2, "not a floating dtype"),
    Case("tensor: dims do not fit the values", lambda c: tensor(2, 3, dims=("time", "stock", "feature")), 2,
         "name 3 axes but values have 2"),
    Case("tensor: a dim named twice", lambda c: tensor(2, 3, dims=("time", "time")), 2, "repeat a name"),
    Case("tensor: mask of another shape", lambda c: tensor(2, 3, mask=torch.ones(3, 2, dtype=torch.bool)), 2,
         "mask shape (3, 2) differs from values shape (2, 3)"),
    Case("tensor: a float mask", lambda c: tensor(2, 3, mask=torch.ones(2, 3)), 2, "mask must be a bool tensor"),
    Case("tensor: too few labels", lambda c: tensor(2, 3, coords={"stock": ["A", "B"]}), 2,
         "coords for 'stock' have 2 labels but the stock axis has 3"),
    Case("tensor: a date label that is no date", lambda c: tensor(2, 3, coords={"time": ["2019-01-02", "soon"]}),
         2, "coords for 'time' must be dates or instants"),
    Case("tensor: text values", lambda c: ft.StockTensor(np.array([["a"]], dtype=object), ("time", "stock")), 2,
         "must be numeric"),
    Case("show: a CSV file", cli("show", "{tmp}/AAPL.csv"), 2, "is not a fintensor tensor file",
         {"AAPL.csv": yahoo()}),
    Case("show: a truncated tensor", cli("show", "{tmp}/t.safetensors"), 1, "truncated to",
         {"t.safetensors": lambda w: w.tensor_bytes[:-10]}),
    Case("show: a pickle", cli("show", "{tmp}/t.safetensors"), 2, "is not a fintensor tensor file",
         {"t.safetensors": lambda w: pickle_payload(w.tmp / "pwned")}),
    # --- recipes ---------------------------------------------------------------------------------------
    Case("recipe: unknown key", cli("build", "{tmp}/r.toml"), 2, "unknown key 'lookahead'",
         {"r.toml": recipe("lookahead = 5\n")}),
    Case("recipe: symbols as a string", cli("build", "{tmp}/r.toml"), 2, "key 'symbols' must be a list",
         {"r.toml": lambda _: b'symbols = "AAPL"\nstart = "2012-12-06"\nend = "2012-12-31"\n'}),
    Case("recipe: start as a number", cli("build", "{tmp}/r.toml"), 2, "key 'start' must be a date",
         {"r.toml": lambda _: b'symbols = ["AAPL"]\nstart = 2012\nend = "2012-12-31"\n'}),
    Case("recipe: no end", cli("build", "{tmp}/r.toml"), 2, "missing key(s) end",
         {"r.toml": lambda _: b'symbols = ["AAPL"]\nstart = "2012-12-06"\n'}),
    Case("recipe: Python, not TOML", cli("build", "{tmp}/r.toml"), 2, "is not valid TOML",
         {"r.toml": lambda _: b'import os\nos.system("touch pwned")\n'}),
    Case("recipe: a fill that does not exist", cli("build", "{tmp}/r.toml"), 2, "key 'fill' must be 'ffill'",
         {"r.toml": recipe('fill = "bfill"\n')}),
    Case("recipe: a symbol with a path", cli("build", "{tmp}/r.toml"), 2, "a path separator",
         {"r.toml": lambda _: b'symbols = ["../../x"]\nstart = "2012-12-06"\nend = "2012-12-31"\n'}),
    Case("recipe: an environment variable in a path", cli("build", "{tmp}/r.toml"), 2, "uses ${HOME}",
         {"r.toml": recipe('[source]\nfiles = ["${HOME}/.ssh/id_rsa"]\n')}),
    Case("recipe: wrong type in [source]", cli("build", "{tmp}/r.toml"), 2, "key 'yahoo' must be true or false",
         {"r.toml": recipe('[source]\nyahoo = "yes"\n')}),
    Case("recipe: not UTF-8", cli("build", "{tmp}/r.toml"), 2, "is not valid TOML", {"r.toml": raw(b"\xff\xfe\x00")}),
    Case("recipe: a recipe and flags", cli("build", "{tmp}/r.toml", "--symbols", "AAPL"), 2,
         "give a recipe or --symbols flags, not both", {"r.toml": recipe("")}),
    # --- checkpoints (ft.predict, ft.train) -------------------------------------------------------------
    Case("checkpoint: truncated", lambda c: ft.predict(c.file("ckpt.safetensors"), c.features), 1,
         "is not a readable fintensor checkpoint",
         {"ckpt.safetensors": lambda w: w.checkpoint_bytes[: len(w.checkpoint_bytes) // 2]}),
    Case("checkpoint: a torch.save pickle", lambda c: ft.predict(c.file("ckpt.safetensors"), c.features), 1,
         "it was never unpickled",
         {"ckpt.safetensors": lambda w: torch_payload(w.tmp / "pwned")}),
    Case("checkpoint: features of another model", lambda c: ft.predict(c.run, c.other_features), 2,
         "the model was trained on 2 features"),
    Case("checkpoint: resume with another model", lambda c: ft.train(c.features, c.labels, **dict(
        TRAIN, model="gru", out=str(c.run), resume=True)), 2, "changed model 'mlp' -> 'gru'"),
    Case("checkpoint: a directory without one", lambda c: ft.predict(c.tmp, c.features), 2, "no checkpoint at"),
    Case("cli checkpoint: truncated", cli("predict", "{tmp}/ckpt.safetensors", "{tmp}/t.safetensors", "--out",
                                          "{tmp}/p.safetensors"), 1, "is not a readable fintensor checkpoint",
         {"ckpt.safetensors": lambda w: w.checkpoint_bytes[:-100], "t.safetensors": lambda w: w.tensor_bytes}),
    Case("cli checkpoint: a torch.save pickle", cli("predict", "{tmp}/ckpt.safetensors", "{tmp}/t.safetensors",
                                                    "--out", "{tmp}/p.safetensors"), 1, "it was never unpickled",
         {"ckpt.safetensors": lambda w: torch_payload(w.tmp / "pwned"), "t.safetensors": lambda w: w.tensor_bytes}),
    Case("cli checkpoint: data that is no tensor", cli("predict", "{run}", "{tmp}/AAPL.csv", "--out",
                                                       "{tmp}/p.safetensors"), 2, "is not a fintensor tensor file",
         {"AAPL.csv": yahoo()}),
    Case("cli checkpoint: resume on other features", cli(
        "train", "{tmp}/t.safetensors", "--out", "{run}", "--resume", "--features", "none", "--model", "gru",
        "--lookback", "3", "--hidden", "4", "--layers", "1", "--epochs", "1", "--device", "cpu"), 2,
         "features 2 -> 1 (added 'close'; removed 'a', 'b')", {"t.safetensors": lambda w: w.tensor_bytes}),
    Case("cli train: zero epochs", cli("train", "{tmp}/t.safetensors", "--out", "{tmp}/run", "--features", "none",
                                       "--epochs", "0"), 2, "epochs must be a positive integer",
         {"t.safetensors": lambda w: w.tensor_bytes}),
    Case("cli evaluate: a checkpoint without data", cli("evaluate", "{run}"), 2, "pass --data FILE"),
    Case("train: zero epochs", lambda c: TrainConfig(epochs=0), 2, "epochs must be a positive integer"),
    # --- the store's Python API --------------------------------------------------------------------------
    Case("store: a file where the store should be", lambda c: Store(c.file("AAPL.csv")), 2,
         "exists and is not a directory", {"AAPL.csv": yahoo()}),
    Case("store: not a table", lambda c: c.store.write_bars("MSFT", "1,2,3", source="x"), 2,
         "expected a pyarrow Table or pandas DataFrame, got str"),
    Case("store: unknown column", lambda c: c.store.write_bars("MSFT", frame(close=[1.0], alpha=[1]), source="x"),
         2, "unknown column(s) ['alpha']"),
    Case("store: text in a price column", lambda c: c.store.write_bars("MSFT", frame(close=["1.5x"]), source="x"),
         2, "column 'close' cannot be read as double"),
    Case("store: booleans in a price column", lambda c: c.store.write_bars("MSFT", frame(close=[True]),
                                                                            source="x"), 2,
         "column 'close' holds true/false values"),
    Case("store: adjustment 'half'", lambda c: c.store.write_bars("MSFT", frame(close=[1.0]), source="x",
                                                                  adjust="half"), 2, "unknown adjustment"),
    Case("store: an unknown column read", lambda c: c.store.read("AAPL", columns=["alpha"]), 2,
         "unknown column(s) ['alpha']"),
    Case("store: ticks with naive times", lambda c: c.store.write_ticks(
        "000001.SZ", pd.DataFrame({"time": ["2019-02-01 10:00"], "price": [1.0]}), source="x"), 2,
         "column 'time' cannot be read as timestamp"),
]

TRAIN = dict(model="mlp", hidden=4, layers=1, lookback=3, epochs=1, batch_size=32, progress=False, device="cpu")


@dataclasses.dataclass
class World:
    """What cases run against: a seeded store, a checkpoint directory, features, a dir for input files,
    and real bytes to build bad files from (Yahoo CSV lines, a tensor file, a checkpoint file)."""

    store: Store
    tmp: Path
    run: Path
    features: ft.StockTensor
    other_features: ft.StockTensor
    labels: ft.StockTensor
    yahoo_lines: list[str]
    tensor_bytes: bytes
    checkpoint_bytes: bytes

    def file(self, name: str) -> Path:
        return self.tmp / name

    def fill(self, arg: str) -> str:
        return arg.format(tmp=self.tmp, store=self.store.root, run=self.run)


@pytest.fixture(scope="module")
def seeded(tmp_path_factory, shared_data):
    """A store with real AAPL bars, real A-share ticks and a cached tensor; a tensor file; a checkpoint."""
    root = tmp_path_factory.mktemp("seeded")
    store = Store(root / "store")
    lines = (shared_data / AAPL).read_text().splitlines()[:41]
    (root / "AAPL.csv").write_text("\n".join(lines) + "\n")
    ft.import_csv(root / "AAPL.csv", store=store)
    ticks = pd.read_csv(shared_data / TICKS, dtype={"datetime": str})
    ticks[ticks.symbol == "000001.SZ"].head(300).to_csv(root / "ticks.csv", index=False)
    ft.import_csv(root / "ticks.csv", store=store)
    ft.build("AAPL", "2012-12-06", "2013-01-31", store=store).save(root / "t.safetensors")
    x, y, other = training_data()
    ft.train(x, y, out=str(root / "run"), **TRAIN)
    return root


def training_data():
    """Features (a, b), labels, and features of another model (a, b, c): 4 stocks over 60 days."""
    g = torch.Generator().manual_seed(0)
    days = np.arange(np.datetime64("2020-01-01"), np.datetime64("2020-03-01"))
    stocks = ["S0", "S1", "S2", "S3"]
    T, N = len(days), len(stocks)
    x = ft.StockTensor(torch.randn(T, N, 2, generator=g), ("time", "stock", "feature"),
                       {"time": days, "stock": stocks, "feature": ["a", "b"]})
    y = ft.StockTensor(torch.randn(T, N, generator=g), ("time", "stock"), {"time": days, "stock": stocks},
                       meta={"horizon": 1, "lag": 0})
    other = ft.StockTensor(torch.randn(T, N, 3, generator=g), ("time", "stock", "feature"),
                           {"time": days, "stock": stocks, "feature": ["a", "b", "c"]})
    return x, y, other


@pytest.fixture
def world(seeded, tmp_path, shared_data):
    for name in ("store", "run"):
        shutil.copytree(seeded / name, tmp_path / name)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    x, y, other = training_data()
    return World(Store(tmp_path / "store"), inputs, tmp_path / "run", x, other, y,
                 (shared_data / AAPL).read_text().splitlines(), (seeded / "t.safetensors").read_bytes(),
                 (seeded / "run" / "checkpoint.safetensors").read_bytes())


def write_inputs(case: Case, world: World) -> None:
    for name, build in case.files.items():
        path = world.tmp / name
        if name.endswith("/"):
            path.mkdir(parents=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(build(world))


def test_the_catalogue_is_big_and_names_are_unique():
    assert len(CASES) >= 40 and len({c.name for c in CASES}) == len(CASES)
    assert sum(isinstance(c.run, tuple) for c in CASES) >= 40  # through the CLI
    assert sum(callable(c.run) for c in CASES) >= 20           # through the Python API


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_one_clear_error_nonzero_exit_store_unchanged(case, world, capsys, store_digest):
    write_inputs(case, world)
    before, run_before = store_digest(world.store.root), store_digest(world.run)
    if callable(case.run):
        with pytest.raises(FintensorError) as info:
            case.run(world)
        message, code = str(info.value), info.value.exit_code
        assert "\n" not in message, "the message must be one line"
    else:
        code = main([world.fill(a) for a in case.run] + ["--store", str(world.store.root)])
        out, err = capsys.readouterr()
        assert "Traceback" not in out + err
        lines = err.strip().splitlines()
        if case.message.startswith("unrecognized arguments"):  # argparse: usage, then one error line
            lines = lines[-1:]
        assert len(lines) == 1 and lines[0].startswith(("error: ", "fintensor")), err
        message = lines[0]
    assert case.message in message
    assert code == case.code
    assert store_digest(world.store.root) == before and store_digest(world.run) == run_before  # untouched
    assert not (world.tmp / "pwned").exists()  # no payload ran


def test_debug_shows_the_traceback(world, capsys):
    code = main(["cache", "info", "../../etc/passwd", "--store", str(world.store.root), "--debug"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback (most recent call last)" in err and "BadInputError" in err
    assert err.strip().splitlines()[-1].startswith("error: ")


def test_accepted_oddities_are_fixed_not_refused(world):
    """Unsorted rows, exact duplicate rows and a BOM are legal: stored sorted, once, as pandas reads them."""
    header, body = world.yahoo_lines[0], world.yahoo_lines[41:61]  # the 20 AAPL rows after the stored ones
    shuffled = [body[i] for i in np.random.default_rng(0).permutation(len(body))] + body[:3]
    path = world.tmp / "AAPL.csv"
    path.write_bytes(b"\xef\xbb\xbf" + ("\n".join([header, *shuffled]) + "\n").encode())
    report = ft.import_csv(path, store=world.store)
    want = pd.read_csv(io.StringIO("\n".join([header, *body])))
    got = world.store.read("AAPL", start=want["Date"].min(), as_pandas=True)
    assert report["AAPL"].added == len(want) == len(got) == 20
    assert [d.isoformat() for d in got["date"]] == sorted(want["Date"])
    np.testing.assert_array_equal(got["close"].to_numpy(), want.sort_values("Date")["Close"].to_numpy())
