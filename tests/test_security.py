"""Security: symbols and recipes never write outside the store; nothing is ever unpickled; recipes are
data; no shell ever runs.

Two kinds of proof: a static scan of the package's source (AST, so comments and ``net.eval()`` do not
count), and hostile inputs run through the real code paths, each carrying a payload that would create a
marker file if it were ever executed.
"""
from __future__ import annotations

import ast
import hashlib
import json
import pickle
import subprocess
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hostile import extension_type_parquet, pickle_payload, torch_payload

import fintensor as ft
from fintensor import symbols
from fintensor.cli import main
from fintensor.errors import BadInputError, FintensorError
from fintensor.store import Store, manifest_bytes

PACKAGE = Path(ft.__file__).resolve().parent
AAPL = "us_daily/sp500_5yr_yahoo/AAPL_data.csv"

# --------------------------------------------------------------------------------------- static scan
UNPICKLING_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve", "marshal", "joblib", "runpy"}
CODE_RUNNERS = {"eval", "exec", "compile", "__import__"}
FORBIDDEN_CALLS = {"os.system", "os.popen", "os.execv", "os.execvp", "os.execl", "os.spawnl", "os.spawnv",
                   "os.startfile", "pd.read_pickle", "pandas.read_pickle", "yaml.load", "yaml.unsafe_load",
                   "importlib.util.spec_from_file_location"}


def dotted(node: ast.AST) -> str:
    """'torch.load' for the call target ``torch.load``; '' when it is not a plain dotted name."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def keyword(call: ast.Call, name: str):
    """The constant value of keyword ``name`` (missing: the string 'missing'; not a constant: 'dynamic')."""
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else "dynamic"
    return "missing"


def unsafe_spots(source: str, filename: str = "<src>") -> list[str]:
    """Every place in ``source`` that could unpickle, run code or start a shell."""
    found = []
    for node in ast.walk(ast.parse(source)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"{where}: imports {n}" for n in names if n.split(".")[0] in UNPICKLING_MODULES]
        if not isinstance(node, ast.Call):
            continue
        name = dotted(node.func)
        if name in CODE_RUNNERS or name in FORBIDDEN_CALLS:
            found.append(f"{where}: calls {name}")
        if name.endswith("torch.load") and keyword(node, "weights_only") is not True:
            found.append(f"{where}: torch.load without weights_only=True")
        if name in ("np.load", "numpy.load") and keyword(node, "allow_pickle") is not False:
            found.append(f"{where}: np.load without allow_pickle=False")
        if keyword(node, "shell") not in ("missing", False):  # subprocess with an argv list is fine
            found.append(f"{where}: {name}(shell=...)")
    return found


def test_the_scanner_finds_what_it_looks_for():
    bad = """
import pickle
from shelve import open
import subprocess
x = torch.load(f)
y = torch.load(f, weights_only=False)
z = np.load(f)
w = numpy.load(f, allow_pickle=True)
eval(s); exec(s); __import__(s)
os.system("ls " + s)
subprocess.run(s, shell=True)
pd.read_pickle(f)
yaml.load(s)
importlib.util.spec_from_file_location("m", path)
"""
    found = unsafe_spots(bad)
    assert len(found) == 14, found
    good = "net.eval()\ntorch.load(f, weights_only=True)\nnp.load(f, allow_pickle=False)\nmodel.compile_me()\n"
    assert unsafe_spots(good) == []


def test_the_package_never_unpickles_runs_code_or_starts_a_shell():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) >= 15  # the whole package, not an empty glob
    found = [spot for f in files for spot in unsafe_spots(f.read_text(), str(f.relative_to(PACKAGE.parent)))]
    assert found == []


# ------------------------------------------------------------------------------- symbols and paths
HOSTILE_SYMBOLS = ["../x", "..", ".", "/etc/passwd", "a/../../b", "..\\..\\x", "C:\\temp\\x", "%2e%2e%2fx",
                   "AAPL\x00.csv", "~root", "$(id)", "`id`", "a;rm -rf", "a|b", "*", "?", "A" * 300,
                   "\u2024\u2024/x", "\uff0e\uff0e\uff0fx", "AA\nPL", "\x1b[2J"]


def assert_inside(store: Store, symbol: str) -> None:
    """``symbol`` is refused, or every path fintensor derives from it is one segment inside the store."""
    try:
        canonical = symbols.normalize(symbol)
    except BadInputError:
        return
    segment = symbols.path_segment(canonical)
    assert "/" not in segment and "\\" not in segment and segment not in (".", "..") and "\x00" not in segment
    assert symbols.from_path_segment(segment) == canonical
    root = store.root.resolve()
    for path, parent in ((store.partition_dir(canonical, "1d"), root / "bars" / "interval=1d"),
                         (store.partition_dir(canonical, kind="ticks", date="2019-02-01"),
                          root / "ticks" / f"symbol={segment}")):
        assert path.resolve().parent == parent and path.resolve().is_relative_to(root)


@pytest.mark.parametrize("symbol", HOSTILE_SYMBOLS)
def test_hostile_symbols_are_refused_or_stay_inside(symbol, tmp_path):
    assert_inside(Store(tmp_path / "store"), symbol)


@settings(max_examples=1500, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("AZaz09.-_^=&%/\\~$:;*? \t\n\x00\x7f")) | st.characters(), max_size=40))
def test_no_symbol_names_a_path_outside_the_store(symbol):
    assert_inside(Store("/nonexistent/store"), symbol)


def test_hostile_symbols_through_every_writer_write_nothing_anywhere(tmp_path, shared_data, store_digest):
    """Store writes, removal, import (option, column and file name), download and build: each refuses
    every hostile symbol, and no file appears or changes anywhere under tmp_path."""
    store = Store(tmp_path / "store")
    lines = (shared_data / AAPL).read_text().splitlines()[:6]
    (tmp_path / "AAPL.csv").write_text("\n".join(lines) + "\n")
    ft.import_csv(tmp_path / "AAPL.csv", store=store)
    bars = pd.DataFrame({"date": ["2019-01-02"], "close": [1.0]})
    ticks = pd.DataFrame({"time": pd.to_datetime(["2019-02-01 02:00"], utc=True), "price": [1.0]})
    refused = 0
    for symbol in HOSTILE_SYMBOLS:
        column_file = tmp_path / "in" / "long.csv"
        column_file.parent.mkdir(exist_ok=True)
        column_file.write_text(f'Date,Close,Symbol\n2019-01-02,1,"{symbol}"\n')
        before = store_digest(tmp_path)
        for attempt in (lambda: store.write_bars(symbol, bars, source="x"),
                        lambda: store.write_ticks(symbol, ticks, source="x"),
                        lambda: store.remove(symbol),
                        lambda: ft.import_csv(tmp_path / "AAPL.csv", store=store, symbol=symbol),
                        lambda: ft.import_csv(column_file, store=store),
                        lambda: ft.download([symbol], "2019-01-02", "2019-01-31", store=store),
                        lambda: ft.build([symbol], "2012-12-06", "2012-12-31", store=store)):
            with pytest.raises(BadInputError):
                attempt()
            refused += 1
        assert store_digest(tmp_path) == before, symbol
    assert refused == 7 * len(HOSTILE_SYMBOLS)


def test_a_recipe_reads_its_files_and_writes_only_into_the_store(tmp_path, shared_data, monkeypatch):
    """A recipe's [source] paths are only read; the import and the tensor cache land under the store."""
    data, recipes, store_root = tmp_path / "data", tmp_path / "recipes", tmp_path / "store"
    data.mkdir()
    recipes.mkdir()
    (data / "AAPL.csv").write_text("\n".join((shared_data / AAPL).read_text().splitlines()[:41]) + "\n")
    (recipes / "r.toml").write_text('symbols = ["AAPL"]\nstart = "2012-12-06"\nend = "2013-01-31"\n'
                                    '[source]\nfiles = ["../data/AAPL.csv"]\n')
    outside = {p: p.read_bytes() for p in [data / "AAPL.csv", recipes / "r.toml"]}
    monkeypatch.chdir(tmp_path)
    assert main(["build", str(recipes / "r.toml"), "--store", str(store_root), "--quiet"]) == 0
    written = {p.relative_to(tmp_path).parts[0] for p in tmp_path.rglob("*") if p.is_file() and p not in outside}
    assert written == {"store"}
    assert all(p.read_bytes() == b for p, b in outside.items())
    assert {p.parent.name for p in store_root.rglob("*.safetensors")} == {"tensors"}


# ------------------------------------------------------------------------------------- unpickling
def test_the_payloads_are_live(tmp_path):
    """The hostile files below really run code when unpickled: the tests that they never run mean something."""
    marker = tmp_path / "pwned"
    pickle.loads(pickle_payload(marker))
    assert marker.exists()
    marker.unlink()
    path = tmp_path / "t.pt"
    path.write_bytes(torch_payload(marker))
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_a_pickled_checkpoint_or_tensor_is_refused_never_loaded(tmp_path):
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.safetensors").write_bytes(torch_payload(marker))
    (tmp_path / "t.safetensors").write_bytes(pickle_payload(marker))
    features = ft.StockTensor(torch.zeros(30, 2, 2), ("time", "stock", "feature"),
                              {"time": np.arange("2020-01-01", "2020-01-31", dtype="datetime64[D]"),
                               "stock": ["A", "B"], "feature": ["a", "b"]})
    with pytest.raises(FintensorError, match="never unpickled"):
        ft.predict(run, features)
    with pytest.raises(FintensorError, match="not a fintensor tensor file"):
        ft.load(tmp_path / "t.safetensors")
    assert main(["show", str(tmp_path / "t.safetensors")]) == 2
    assert not marker.exists()


def test_a_store_part_with_a_pickled_extension_type_is_never_unpickled(tmp_path, shared_data):
    """A part file rewritten to carry pyarrow's legacy pickled extension type (CVE-2023-47248), with a
    manifest that vouches for it, read by every reader fintensor offers or documents."""
    marker = tmp_path / "pwned"
    store = Store(tmp_path / "store")
    lines = (shared_data / AAPL).read_text().splitlines()[:41]
    (tmp_path / "AAPL.csv").write_text("\n".join(lines) + "\n")
    ft.import_csv(tmp_path / "AAPL.csv", store=store)
    pdir = store.partition_dir("AAPL")
    manifest = json.loads((pdir / "_manifest.json").read_text())
    part = manifest["parts"][0]
    data = extension_type_parquet(store.read_partition("AAPL"), "close", marker)
    (pdir / part["file"]).write_bytes(data)
    part.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    manifest["checksum"] = hashlib.sha256(part["sha256"].encode()).hexdigest()
    (pdir / "_manifest.json").write_bytes(manifest_bytes(manifest))  # re-sealed: the manifest vouches for it

    got = store.read("AAPL", as_pandas=True)
    assert len(got) == 40 and got["close"].dtype == np.float64
    store.verify()
    ft.build("AAPL", "2012-12-06", "2013-01-31", store=store)
    duckdb.sql(f"SELECT * FROM read_parquet('{store.root}/bars/*/*/*/*.parquet', hive_partitioning=true)").df()
    assert main(["cache", "verify", "--store", str(store.root), "--quiet"]) in (0, 1)
    assert not marker.exists()


def test_the_whole_pipeline_runs_without_unpickling_or_a_shell(tmp_path, shared_data, monkeypatch):
    """Import, build, save, load, train, checkpoint, predict with every unpickler and process starter
    booby-trapped: none may be touched."""
    calls = []

    def trap(name):
        def trapped(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} was called")
        return trapped

    for module, names in ((pickle, ("load", "loads")), (torch, ("load",)),
                          (subprocess, ("Popen", "run", "call", "check_output")), (np, ("load",))):
        for name in names:
            monkeypatch.setattr(module, name, trap(f"{module.__name__}.{name}"))
    monkeypatch.setattr("os.system", trap("os.system"))
    monkeypatch.setattr("os.popen", trap("os.popen"))

    store = Store(tmp_path / "store")
    (tmp_path / "AAPL.csv").write_text("\n".join((shared_data / AAPL).read_text().splitlines()[:121]) + "\n")
    assert main(["import", str(tmp_path / "AAPL.csv"), "--store", str(store.root), "--quiet"]) == 0
    close = ft.build("AAPL", "2012-12-06", "2013-05-31", fields=["close", "volume"], store=store)
    close = ft.load(close.save(tmp_path / "x.safetensors"))
    features = close.with_values(torch.log(close.values))
    labels = ft.StockTensor(torch.randn(close.shape[:2]), ("time", "stock"),
                            {"time": close.coords["time"], "stock": close.coords["stock"]},
                            meta={"horizon": 1, "lag": 0})
    ft.train(features, labels, model="mlp", hidden=4, layers=1, lookback=3, epochs=1, batch_size=32,
             out=str(tmp_path / "run"), progress=False, device="cpu")
    scores = ft.predict(tmp_path / "run", features, device="cpu")
    assert scores.shape == labels.shape and calls == []
