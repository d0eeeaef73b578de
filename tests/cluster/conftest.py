"""The quickstart job resolved in a temporary directory, as the run-state and target tests start from."""
from __future__ import annotations

from pathlib import Path

import pytest

from tunerun.jobs.loader import load_job
from tunerun.jobs.plan import resolve

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "jobs" / "examples" / "quickstart.yaml"


@pytest.fixture
def job(tmp_path, monkeypatch):
    """The quickstart, resolved with its run folder under tmp_path (no model is loaded: config.json is empty)."""
    monkeypatch.chdir(tmp_path)  # the quickstart's relative paths resolve against the user's directory
    (tmp_path / "models" / "tiny-llama").mkdir(parents=True)
    (tmp_path / "models" / "tiny-llama" / "config.json").write_text("{}")
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "data").symlink_to(REPO / "examples" / "data")
    return resolve(load_job(str(QUICKSTART), [f"storage.uri={tmp_path / 'runs'}"]), run_id="t-1")
