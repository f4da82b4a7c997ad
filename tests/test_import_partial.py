"""A multi-symbol import that fails part-way (disk full, file size limit) says exactly what it committed,
exits 1, and a re-run completes it (the chosen contract: not all-or-nothing, but never "nothing was written"
after something was)."""
from __future__ import annotations

import pandas as pd
import pytest

import fintensor as ft
from fintensor import cli
from fintensor.errors import StoreWriteError
from fintensor.store import Store


def test_a_failure_after_some_symbols_names_what_was_committed_and_a_rerun_completes(tmp_path, shared_data,
                                                                                    monkeypatch, capsys):
    files = [str(shared_data / "us_daily/sp500_5yr_yahoo" / f"{s}_data.csv") for s in ("AAPL", "IBM", "MSFT")]
    store = Store(tmp_path / "store")
    real_commit, calls = Store._commit, []

    def full_disk_on_the_second(self, pdir, plan, *args, **kwargs):
        calls.append(pdir)
        if len(calls) == 2:
            raise StoreWriteError(f"could not write {pdir}: No space left on device; the partition is as it was")
        return real_commit(self, pdir, plan, *args, **kwargs)

    monkeypatch.setattr(Store, "_commit", full_disk_on_the_second)
    assert cli.main(["import", *files, "--store", str(store.root)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1 were committed before it (AAPL)" in err[0] and "re-run" in err[0], err
    assert Store(store.root).symbols("1d") == ["AAPL"]  # exactly what the message says
    assert Store(store.root).verify() == []

    monkeypatch.setattr(Store, "_commit", real_commit)
    report = ft.import_csv(files, store=Store(store.root))
    by = {r.symbol: r for r in report}
    assert by["AAPL"].added == 0 and by["AAPL"].unchanged == by["AAPL"].rows  # committed the first time
    for sym, path in (("IBM", files[1]), ("MSFT", files[2])):  # the rest, whole: every CSV row accounted for
        assert by[sym].read == len(pd.read_csv(path))
        assert by[sym].added == by[sym].read - sum(by[sym].dropped.values()) > 1000
    assert Store(store.root).symbols("1d") == ["AAPL", "IBM", "MSFT"]


def test_a_failure_on_the_first_symbol_says_none_was_committed(tmp_path, shared_data, monkeypatch):
    files = [str(shared_data / "us_daily/sp500_5yr_yahoo" / f"{s}_data.csv") for s in ("AAPL", "IBM")]

    def full_disk(self, pdir, plan, *args, **kwargs):
        raise StoreWriteError(f"could not write {pdir}: No space left on device")

    monkeypatch.setattr(Store, "_commit", full_disk)
    with pytest.raises(StoreWriteError, match=r"0 were committed before it \(\)"):
        ft.import_csv(files, store=Store(tmp_path / "store"))
    assert Store(tmp_path / "store").symbols("1d") == []
