"""Every committed notebook opens in JupyterLab unmodified: kernelspec and language_info set, no outputs, and its
jupytext pair (the .py percent source) holds the same code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jupytext
import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]


def committed_notebooks() -> list[Path]:
    out = subprocess.run(["git", "-C", str(REPO), "ls-files", "*.ipynb"], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        pytest.skip(f"not a git checkout: {out.stderr.strip()}")
    return [REPO / line for line in out.stdout.splitlines() if (REPO / line).is_file()]


NOTEBOOKS = committed_notebooks()


def test_the_notebooks_are_found():
    names = {p.name for p in NOTEBOOKS}
    assert {"01_explore_pacs.ipynb", "02_train.ipynb"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[str(p.relative_to(REPO)) for p in NOTEBOOKS])
def test_metadata_complete_and_no_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert (nb.nbformat, nb.nbformat_minor) == (4, 5)  # Lab would upgrade an older minor: a modification
    kernelspec = nb.metadata.get("kernelspec", {})
    assert kernelspec.get("name") == "pacsai" and kernelspec.get("language") == "python", kernelspec
    info = nb.metadata.get("language_info", {})
    # What the pacsai kernel reports in kernel_info: Lab rewrites the metadata (and marks the file changed) where
    # it differs; the patch version depends on the machine, the rest must match.
    assert info.get("name") == "python" and info.get("mimetype") == "text/x-python", info
    assert info.get("codemirror_mode") == {"name": "ipython", "version": 3}
    assert info.get("pygments_lexer") == "ipython3" and info.get("nbconvert_exporter") == "python"
    assert info.get("file_extension") == ".py"
    assert str(info.get("version", "")).startswith(f"{sys.version_info.major}.{sys.version_info.minor}."), info
    for cell in nb.cells:
        assert "id" in cell
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, (path.name, cell.source[:80])
    assert "widgets" not in nb.metadata


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[str(p.relative_to(REPO)) for p in NOTEBOOKS])
def test_paired_source_holds_the_same_code(path):
    paired = path.with_suffix(".py")
    if "py:percent" not in str(nbformat.read(path, as_version=4).metadata.get("jupytext", {}).get("formats", "")):
        pytest.skip(f"{path.name} is not paired with a .py source")
    assert paired.is_file(), f"{paired} missing: run .venv/bin/jupytext --sync {path}"

    def code(nb):
        return [c.source.strip() for c in nb.cells if c.cell_type == "code"]

    assert code(jupytext.read(paired)) == code(nbformat.read(path, as_version=4)), (
        f"{path.name} and {paired.name} differ: run .venv/bin/jupytext --sync {paired}"
    )
