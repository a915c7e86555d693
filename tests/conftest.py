"""Shared test fixtures: an isolated home per test session, quiet environment, one thread budget."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from engramflow import home

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def engramflow_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every test session writes to its own home; built models are cached across sessions in
    `.engramflow/test-models` (content-hashed, so a stale cache is never used)."""
    home.quiet_env()
    os.environ.setdefault("ENGRAMFLOW_MODEL_CACHE", str(REPO / ".engramflow" / "test-models"))
    return home.set_home(tmp_path_factory.mktemp("home"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"public benchmark data not found at {SHARED_DATA} (../shared/data beside the checkout)")
    return SHARED_DATA
