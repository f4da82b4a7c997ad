"""The CLI's first-hour surface: every --help (width, examples at the end, true defaults, the README's
intervals and formats), output into a pipe that is never wrapped, tick slots shown as clock times, and a
plain message when Python is started in the folder that contains the clone."""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from fintensor import cli

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def every_parser() -> list[tuple[str, argparse.ArgumentParser]]:
    """('fintensor', top), ('download', p), ..., ('cache list', p): walked from the parser itself."""
    found = []

    def walk(name: str, parser: argparse.ArgumentParser) -> None:
        found.append((name, parser))
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    walk(f"{name} {sub_name}".strip(), sub)

    walk("", cli.build_parser())
    return found


def help_text(*words: str) -> str:
    """`fintensor WORDS --help` as printed into a pipe (not a terminal)."""
    run = subprocess.run([sys.executable, "-m", "fintensor.cli", *words, "--help"], capture_output=True,
                         text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert run.returncode == 0, run.stderr
    return run.stdout


def test_every_subcommand_is_walked():
    names = {name for name, _ in every_parser()}
    assert {add.__name__.removeprefix("add_") for add, _ in cli.COMMANDS} <= names
    assert {"cache list", "cache info", "cache verify", "cache rm"} <= names


@pytest.mark.parametrize("name", [name for name, _ in every_parser()])
def test_help_fits_100_columns_and_ends_with_examples(name, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # a wide terminal: still at most 100 columns
    parser = dict(every_parser())[name]
    text = parser.format_help()
    wide = [line for line in text.splitlines() if len(line) > 100]
    assert not wide, f"`fintensor {name} --help` has lines over 100 columns: {wide}"
    tail = text.rstrip().split("\n\n")[-1].splitlines()
    assert re.fullmatch(r"examples?:", tail[0]), f"`fintensor {name} --help` does not end with examples"
    commands = [line.strip() for line in tail[1:] if not line.startswith("      ")]
    assert commands and all(c.startswith(f"fintensor {name}".rstrip()) for c in commands), commands


def test_help_examples_parse():
    """Every example at the end of a help is a command the parser accepts (continuations joined)."""
    parser = cli.build_parser()
    for name, sub in every_parser():
        tail = sub.format_help().rstrip().split("\n\n")[-1]
        joined = tail.replace(" \\\n      ", " ").splitlines()[1:]
        for example in joined:
            words = example.split("#")[0].split()[1:]
            parser.parse_args(words)  # SystemExit (a test error) if argparse refuses it


def test_help_states_the_true_defaults():
    """An option with a default says it, and what it says is the parser's default ("(default X)" or
    "X (default)"); the demo's --epochs (None = demo.EPOCHS) says demo.EPOCHS."""
    from fintensor.demo import EPOCHS

    for name, parser in every_parser():
        for action in parser._actions:
            if action.help in (None, argparse.SUPPRESS) or action.default in (None, False, argparse.SUPPRESS):
                continue
            said = re.search(r"\(default:? ([^;)]*)", action.help)
            if said:
                assert said.group(1) == str(action.default), (name, action.option_strings, action.help)
            else:
                assert re.search(rf"\b{re.escape(str(action.default))} \(default\b", action.help), \
                    (name, action.option_strings, action.help)
    demo = dict(every_parser())["demo"]
    epochs = next(a for a in demo._actions if a.dest == "epochs")
    assert f"(default {EPOCHS})" in epochs.help


def test_demo_help_states_its_own_store_default():
    text = " ".join(help_text("demo").split())
    assert "--store PATH store directory (default: DIR/store inside --out" in text
    assert "$FINTENSOR_HOME" in " ".join(help_text("build").split())  # the other commands' default


def test_download_help_lists_every_interval_the_readme_documents():
    section = README.split("### Downloading from Yahoo", 1)[1].split("\n### ", 1)[0]
    limits = re.search(r"\*\*Intraday limits:\*\*(.*?)\n- ", section, re.S).group(1)
    documented = set(re.findall(r"\b(\d+[mhd])\b", limits)) | {"1d"}
    lo, hi = re.search(r"(\d+)m–(\d+)m", limits).groups()  # "2m–90m": every listed minute step in between
    text = " ".join(help_text("download").split())
    listed = set(re.search(r"--interval \S+ ((?:\w+, )*\w+) \(default 1d\)", text).group(1).split(", "))
    documented |= {i for i in listed if i.endswith("m") and int(lo) <= int(i[:-1]) <= int(hi)}
    assert documented <= listed, f"the README documents {sorted(documented - listed)}; --help lists {listed}"


def test_import_help_formats_match_the_readme_table():
    section = README.split("### Importing files", 1)[1].split("\n## ", 1)[0]
    table = set(re.findall(r"^\| `(\w+)`(?:, `(\w+)`)? \|", section, re.M))
    readme_names = {n for pair in table for n in pair if n}
    text = " ".join(help_text("import").split())
    shown = re.search(r"--format F a preset instead of detection: (.*?) \(also", text).group(1).split(", ")
    assert set(shown) == readme_names, (set(shown) ^ readme_names)


def test_output_into_a_pipe_is_not_wrapped(tmp_path):
    """A line longer than 80 columns printed through rich (as the training progress lines are) stays one
    line in a pipe; so do the help lines, at 100 columns."""
    script = ("from fintensor import cli; from rich.console import Console\n"
              "with cli._no_wrap_unless_terminal(): Console().print('x' * 150)")
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env={
        **env, "PYTHONPATH": str(REPO)}, timeout=60).stdout
    assert out.splitlines() == ["x" * 150]
    widths = [len(line) for line in help_text("train").splitlines()]
    assert max(widths) > 80, "help in a pipe is wrapped at 80 columns"


def test_show_prints_tick_slots_as_clock_times(cn_tick_store, tmp_path, capsys):
    import fintensor as ft

    t4 = ft.build_ticks(["000001.SZ"], "2019-02-01", "2019-02-01", freq="3s", fields=["price"],
                        store=cn_tick_store)
    path = t4.save(tmp_path / "t4.safetensors")
    assert cli.main(["show", str(path), "--rows", "3"]) == 0
    printed = capsys.readouterr().out
    assert "0 days" not in printed
    rows = re.findall(r"^(?:2019-02-01)?\s+(\d\d:\d\d:\d\d)\s+(\S+)\s*$", printed, re.M)
    # A-shares trade 09:30-11:30 and 13:00-15:00 Shanghai time: the first and last 3-second slots
    assert [r[0] for r in rows] == ["09:30:00", "09:30:03", "09:30:06", "14:59:51", "14:59:54", "14:59:57"]
    prices = t4.sel(stock="000001.SZ", feature="price").values[0].numpy()
    assert [float(r[1]) for r in rows] == pytest.approx([*prices[:3], *prices[-3:]], abs=0.005)
    assert "XSHG clock times of 2019-02-01: 09:30:00 .. 14:59:57" in printed
    # the slot after the lunch break is 13:00:00 local time = 05:00:00 UTC
    clock = cli._slot_clock_times(t4)
    slot = clock.index("13:00:00")
    assert pd.Timedelta(t4.coords["tick"][slot]) == pd.Timedelta(hours=2)


def test_python_in_the_folder_that_contains_the_clone_says_what_happened(tmp_path):
    """`cd ..; python -c 'import fintensor'` used to find the clone's root as an empty namespace package
    ("no attribute 'build'"): now the real package is loaded and one line says what happened."""
    clone = tmp_path / "fintensor"
    clone.symlink_to(REPO, target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    script = "import fintensor, fintensor.cli; print(fintensor.__file__); print(fintensor.build.__module__)"
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [str(clone / "fintensor" / "__init__.py"), "fintensor.builder"]
    note = run.stderr.strip().splitlines()
    assert len(note) == 1 and note[0].startswith(f"note: Python was started in {tmp_path}, the folder that "
                                                 f"contains the clone {clone}"), run.stderr


def test_a_repeated_build_says_it_was_a_cache_hit(us_daily_store, tmp_path):
    args = ["build", "--symbols", "AAPL", "MSFT", "--start", "2015-02-03", "--end", "2015-04-28",
            "--store", str(us_daily_store.root)]
    first = cli_run(*args)
    second = cli_run(*args)
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert "cache hit:" not in first.stdout and "cache hit:" in second.stdout
    assert "--no-cache rebuilds" in second.stdout
    import json

    again = json.loads(cli_run(*args, "--json").stdout)
    assert again["cache_hit"] is True


def cli_run(*words: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fintensor", *words], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
