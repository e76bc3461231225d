"""Shared fixtures: real data from PACSAI_TEST_DATA, and (via tests/orthanc_fixture.py) a real Orthanc."""

from __future__ import annotations

import os
from pathlib import Path

import pydicom
import pytest

pytest_plugins = ["tests.orthanc_fixture"]

REPO = Path(__file__).resolve().parents[1]


def _data_root() -> Path:
    return Path(os.environ.get("PACSAI_TEST_DATA", REPO.parent / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def test_data() -> Path:
    """The real-DICOM collection (../shared/data). Skips where absent; CI sets PACSAI_REQUIRE_DATA=1 to fail."""
    root = _data_root()
    if not (root / "SOURCES.md").is_file():
        msg = f"real test data not found at {root}; set PACSAI_TEST_DATA to the shared/data folder"
        if os.environ.get("PACSAI_REQUIRE_DATA") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return root


@pytest.fixture(autouse=True)
def _strict_pydicom_writing():
    """Invalid UIDs/values must fail tests: pydicom only warns by default (docs/dicom_notes.md)."""
    config = pydicom.config.settings
    old = config.writing_validation_mode
    config.writing_validation_mode = pydicom.config.RAISE
    yield
    config.writing_validation_mode = old


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory, monkeypatch):
    """No test reads the developer's real cache, .env or MLflow store."""
    base = tmp_path_factory.mktemp("env")
    monkeypatch.setenv("PACSAI_CACHE_DIR", str(base / "cache"))
    monkeypatch.setenv("MLFLOW_ENABLE_TELEMETRY", "false")
    monkeypatch.setenv("DO_NOT_TRACK", "1")
    for var in ("PACSAI_PACS_URL", "PACSAI_PACS_USER", "PACSAI_PACS_PASSWORD", "PACSAI_PACS_TOKEN",
                "MLFLOW_TRACKING_URI", "PACSAI_MLFLOW_URI", "PACSAI_LOG_PHI", "PACSAI_PACS_NETRC",
                "PACSAI_PSEUDONYM_KEY"):
        monkeypatch.delenv(var, raising=False)
    # requests (and pacsai.pacs.credentials) fall back to ~/.netrc: a developer's own logins must not leak in.
    monkeypatch.setenv("NETRC", str(base / "no-netrc"))
