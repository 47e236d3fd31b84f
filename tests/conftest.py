"""Every test runs offline, with caches, runs and W&B files under its own tmp folder."""

from __future__ import annotations

from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def isolated_environment(tmp_path, tmp_path_factory, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    # one cache per test session: trained tiny models are reused across tests
    monkeypatch.setenv("LIGHTNING_ALPHAEDIT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.setenv("LIGHTNING_ALPHAEDIT_RUNS", str(tmp_path / "runs"))
    (tmp_path / "wandb").mkdir()
    yield
