"""Shared test fixtures. Real market data lives in ../shared/data (never copied into the project).

Tests that need it fail, never skip, when it is missing: set FINTENSOR_SHARED_DATA to point elsewhere.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    env = os.environ.get("FINTENSOR_SHARED_DATA")
    return Path(env) if env else (REPO.parent / "shared" / "data")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of the real data (see its PROVENANCE.md). Missing data is a failure, not a skip."""
    path = shared_data_dir()
    if not (path / "PROVENANCE.md").exists():
        pytest.fail(f"real market data not found at {path}: clone with ../shared/data beside the project "
                    "or set FINTENSOR_SHARED_DATA", pytrace=False)
    return path


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """No test ever touches the user's real cache: $FINTENSOR_HOME points into a temp dir."""
    monkeypatch.setenv("FINTENSOR_HOME", str(tmp_path_factory.mktemp("fintensor_home")))


@pytest.fixture
def store(tmp_path):
    """An empty store in a fresh temp dir."""
    from fintensor.store import Store

    return Store(tmp_path / "store")


# ======================================================= section: real-data store fixtures (sources)
# ================================================================= end section: real-data fixtures
