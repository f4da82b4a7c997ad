"""Crash safety: every write path SIGKILLed at each file-system step of its commit and at random moments.

The documented contract (fintensor/store.py): a crash leaves each partition's old or new manifest, never a
mix; files no manifest lists are leftovers, invisible to fintensor readers, that plain ``verify`` reports
and ``verify --repair`` (or the next write) removes. So after each kill:

1. plain ``Store.verify()`` reports nothing but such leftovers (never a damaged, truncated or missing file),
   and names every one of them;
2. every partition, alias table and cached tensor holds its old or its new content (readers never see a
   mix or a truncation), before and after the repair;
3. ``fintensor cache verify --repair`` exits 0, then ``fintensor cache verify`` exits 0 with no finding,
   and the store holds no file its manifests do not list;
4. running the writer again completes the work: the store equals an uninterrupted run's.

Checkpoints (not a store) must be absent or one of the complete checkpoints an uninterrupted run writes,
and resuming must end exactly where the uninterrupted run ended.

CI kills at a sample of each writer's steps; ``FINTENSOR_CRASH_EVERY_STEP=1`` kills at every one of them.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from crash_harness import (SCENARIOS, Scenario, checkpoint_digest, expected_files, run_child,
                           same, store_contents)

from fintensor.cli import main
from fintensor.errors import FintensorError
from fintensor.store import Store
from fintensor.store_verify import TEMP_GRACE_S

#: scenario -> (kills at file-system steps, at most; kills at random moments). 100+ trials in all.
EVERY_STEP = bool(os.environ.get("FINTENSOR_CRASH_EVERY_STEP"))
TRIALS = {
    "import-new": (14, 4),
    "import-merge": (12, 4),
    "compaction": (10, 3),
    "bulk-write": (10, 3),
    "ticks": (12, 4),
    "download": (12, 4),
    "remove": (8, 3),
    "repair": (6, 3),
    "tensor-cache": (6, 3),
    "checkpoint": (5, 3),
}


def kill_points(steps: int, cap: int) -> list[int]:
    """Steps 1..steps to kill at (all of them, or ``cap`` spread evenly, first and last included)."""
    return sorted({int(round(x)) for x in np.linspace(1, steps, min(cap, steps))})


def differences(seen: dict, *allowed: dict) -> list[str]:
    """Keys whose content is none of the allowed versions (each a {key: content} snapshot)."""
    keys = sorted(set(seen).union(*allowed))
    return [f"{key}: neither its old nor its new content" for key in keys
            if not any(same(seen.get(key), version.get(key)) for version in allowed)]


def judge_store(scenario: Scenario, root: Path, data: Path, old: dict, new: dict) -> list[str]:
    """Everything a kill may not break, checked on a store a writer was killed in; returns the failures."""
    for tmp in [*root.glob("tensors/.*.tmp"), *root.glob(".probe-*")]:  # the writer is dead: let repair's grace period for tensor-cache
        os.utime(tmp, (time.time() - 2 * TEMP_GRACE_S,) * 2)  # temps (written without the lock) pass
    problems = Store(root).verify()
    failures = [f"verify found damage: {p}" for p in problems if not p.leftover]
    stray = {p for p in root.rglob("*") if p.is_file()} - expected_files(root)
    failures += [f"verify did not report leftover {f}" for f in stray if not any(str(f).startswith(p.path)
                                                                               for p in problems)]
    try:
        seen = store_contents(root)
    except FintensorError as exc:
        return [*failures, f"readers fail: {exc}"]
    failures += differences(seen, old, new)
    if main(["cache", "verify", "--repair", "--store", str(root), "--quiet"]) != 0:
        failures.append("`cache verify --repair` did not exit 0")
    if main(["cache", "verify", "--store", str(root), "--quiet"]) != 0 or Store(root).verify():
        failures.append("`cache verify` after the repair did not pass")
    stray = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p not in expected_files(root))
    if stray:
        failures.append(f"files no manifest lists survived the repair: {stray}")
    if differences(store_contents(root), seen):
        failures.append("the repair changed what readers see")
    run_child(scenario.run, root, data)
    failures += [f"after a re-run, {d}" for d in differences(store_contents(root), new)]
    if Store(root).verify():
        failures.append("verify failed after the re-run")
    return failures


def judge_checkpoint(scenario: Scenario, root: Path, data: Path, digests: list) -> list[str]:
    """The checkpoint is absent or one an uninterrupted run wrote; resuming ends where that run ended."""
    try:
        now = checkpoint_digest(root)
    except FintensorError as exc:
        return [f"the checkpoint is unreadable: {exc}"]
    failures = [] if now in [None, *digests] else ["the checkpoint is none of an uninterrupted run's"]
    run_child(scenario.run, root, data)
    if checkpoint_digest(root) != digests[-1]:
        failures.append("resuming did not end where the uninterrupted run ended")
    return failures


@pytest.mark.parametrize("name", list(TRIALS))
def test_sigkill_at_every_step_and_at_random_moments(name, tmp_path, shared_data):
    scenario = SCENARIOS[name]
    data, base, ref = tmp_path / "data", tmp_path / "base", tmp_path / "ref"
    data.mkdir()
    (data / "shared").write_text(str(shared_data))
    run_child(scenario.setup, base, data)
    copy(base, ref)
    reference = run_child(scenario.run, ref, data)  # uninterrupted: its steps, duration and result
    assert not reference.killed and reference.steps > 0
    if scenario.store:
        old, new = store_contents(base), store_contents(ref)
        assert name == "repair" or differences(new, old), "the writer changed nothing"
        judge = lambda root: judge_store(scenario, root, data, old, new)  # noqa: E731
    else:
        digests = json.loads(Path(f"{ref}.digests.json").read_text())  # after each epoch, and the last
        judge = lambda root: judge_checkpoint(scenario, root, data, digests)  # noqa: E731

    at_steps, at_random = TRIALS[name]
    rng = random.Random(name)
    kills = [{"kill_at": k} for k in kill_points(reference.steps, reference.steps if EVERY_STEP else at_steps)]
    kills += [{"kill_after": rng.uniform(0, reference.seconds)} for _ in range(at_random)]
    failures, killed = [], 0
    for i, kill in enumerate(kills):
        root = copy(base, tmp_path / f"trial{i}")
        outcome = run_child(scenario.run, root, data, **kill)
        killed += outcome.killed
        failures += [f"{kill}: {f}" for f in judge(root)]
        shutil.rmtree(root, ignore_errors=True)
    print(f"\n{name}: {len(kills)} trials ({reference.steps} file-system steps; {killed} killed mid-write), "
          f"{len(failures)} failures")
    assert killed >= len(kills) // 2  # most kills must land inside the write, or the suite proves little
    assert not failures, "\n".join(failures)


def copy(src: Path, dst: Path) -> Path:
    if src.exists():
        shutil.copytree(src, dst, symlinks=True)
    return dst


def test_plain_verify_names_every_leftover_and_points_to_repair(tmp_path, shared_data, capsys):
    """Leftovers are invisible to fintensor but not to DuckDB/Polars globs, so plain verify reports each one
    (exit 1) as a leftover, and its advice is --repair, not re-importing or removing good data."""
    data, root = tmp_path / "data", tmp_path / "store"
    data.mkdir()
    (data / "shared").write_text(str(shared_data))
    run_child(SCENARIOS["repair"].setup, root, data)  # one leftover of each kind
    stray = {p for p in root.rglob("*") if p.is_file()} - expected_files(root)

    problems = Store(root).verify()
    assert problems and all(p.leftover for p in problems)
    assert all(any(str(f).startswith(p.path) for p in problems) for f in stray)
    assert main(["cache", "verify", "--store", str(root)]) == 1
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert "fintensor cache verify --repair" in summary and "cache rm" not in summary
