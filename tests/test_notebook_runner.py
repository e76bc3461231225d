"""pacsai.notebooks: each kernel its own environment, log and folder; a dead kernel is reported as dead."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import nbformat
import pytest

from pacsai import notebooks
from pacsai.notebooks import (
    KernelDiedError,
    KernelNotInstalledError,
    NotebookCellError,
    credentials_to_environment,
    kernel_environment,
)


def _notebook(path: Path, *cells: str) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "pacsai", "display_name": "pacsai (Python 3)", "language": "python"}
    params = nbformat.v4.new_code_cell('tag = ""')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, *(nbformat.v4.new_code_cell(c) for c in cells)]
    nbformat.write(nb, path)
    return path


_REPORT_ENV = """
import json, os, sys, pathlib
os.write(2, f"to stderr from {tag}\\n".encode())  # the process's fd 2, as a C library writes
keys = ("PACSAI_MLFLOW_URI", "PACSAI_PACS_USER", "PACSAI_PACS_PASSWORD", "PACSAI_TEST_ONLY_IN_PARENT")
pathlib.Path(f"env-{tag}.json").write_text(json.dumps({k: os.environ.get(k) for k in keys} | {"cwd": os.getcwd()}))
"""


def test_each_kernel_gets_its_own_environment_log_and_folder_without_touching_the_process(tmp_path):
    template = _notebook(tmp_path / "t.ipynb", _REPORT_ENV)
    environ_before, cwd_before = dict(os.environ), os.getcwd()
    stderr_fd_before = os.fstat(2)
    errors: list[BaseException] = []

    def one(tag: str) -> None:
        folder = tmp_path / tag
        url, secrets = credentials_to_environment(f"http://user-{tag}:pw%40{tag}@pacs.example:8042/dicom-web")
        assert url == "http://pacs.example:8042/dicom-web"
        env = kernel_environment({"PACSAI_MLFLOW_URI": f"file://{folder}/mlruns", **secrets,
                                  "PACSAI_TEST_ONLY_IN_PARENT": None},
                                 base={**os.environ, "PACSAI_TEST_ONLY_IN_PARENT": "leak"})
        try:
            notebooks.execute(template, folder / "out.ipynb", {"tag": tag}, env=env, timeout_s=120)
        except BaseException as err:  # reported below: an assert in a thread would be lost
            errors.append(err)

    threads = [threading.Thread(target=one, args=(t,)) for t in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for tag in ("a", "b"):
        seen = json.loads((tmp_path / tag / f"env-{tag}.json").read_text())
        assert seen == {"PACSAI_MLFLOW_URI": f"file://{tmp_path / tag}/mlruns", "PACSAI_PACS_USER": f"user-{tag}",
                        "PACSAI_PACS_PASSWORD": f"pw@{tag}", "PACSAI_TEST_ONLY_IN_PARENT": None,
                        "cwd": str(tmp_path / tag)}
        logged = (tmp_path / tag / "out.log").read_text()
        assert f"to stderr from {tag}" in logged
        assert f"to stderr from {'b' if tag == 'a' else 'a'}" not in logged
        nb = nbformat.read(tmp_path / tag / "out.ipynb", as_version=4)
        assert f"pw@{tag}" not in json.dumps(nb)  # the password went by environment, not into the notebook
    assert dict(os.environ) == environ_before and os.getcwd() == cwd_before
    assert os.fstat(2) == stderr_fd_before  # fd 2 never redirected


def test_a_killed_kernel_is_reported_dead_with_its_cell(tmp_path):
    template = _notebook(tmp_path / "t.ipynb", "x = 1", "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
    with pytest.raises(KernelDiedError, match=r"the kernel died while running cell 3; out of memory\?") as info:
        notebooks.execute(template, tmp_path / "out.ipynb", {}, timeout_s=120)
    assert info.value.cell == 3 and "make setup" not in str(info.value)
    assert str(tmp_path / "out.log") in str(info.value)


def test_a_failing_cell_names_the_cell_and_the_exception(tmp_path):
    template = _notebook(tmp_path / "t.ipynb", "raise ValueError('bad input ' + tag)")
    with pytest.raises(NotebookCellError, match="cell 3 failed: ValueError: bad input x") as info:
        notebooks.execute(template, tmp_path / "out.ipynb", {"tag": "x"}, timeout_s=120)
    # the injected parameters are cell 2
    assert info.value.cell == 3 and info.value.ename == "ValueError" and (tmp_path / "out.ipynb").is_file()


def test_a_missing_kernel_says_how_to_install_it(tmp_path):
    template = _notebook(tmp_path / "t.ipynb", "x = 1")
    with pytest.raises(KernelNotInstalledError, match="make setup"):
        notebooks.execute(template, tmp_path / "out.ipynb", {}, kernel="no-such-kernel-pacsai")


def test_credentials_to_environment():
    assert credentials_to_environment("file:///data/pacs") == ("file:///data/pacs", {})
    assert credentials_to_environment("http://h:8042/dicom-web") == ("http://h:8042/dicom-web", {})
    assert credentials_to_environment("http://alice@h/dw") == ("http://h/dw", {"PACSAI_PACS_USER": "alice"})
    assert credentials_to_environment("https://a%3Ab:p%2Fw@h:1/x?q=1") == (
        "https://h:1/x?q=1", {"PACSAI_PACS_USER": "a:b", "PACSAI_PACS_PASSWORD": "p/w"})


@pytest.mark.parametrize("name", [notebooks.REPORT_TEMPLATE, notebooks.VALIDATION_TEMPLATE])
def test_templates_ship_in_the_package_clean(name):
    path = notebooks.template(name)
    assert Path(notebooks.__file__).parent / "templates" in path.parents
    nb = nbformat.read(path, as_version=4)
    assert nb.metadata["kernelspec"]["name"] == "pacsai"
    assert nb.metadata["language_info"]["name"] == "python"  # Lab opens it without marking it modified
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code")
    assert any("parameters" in c.metadata.get("tags", []) for c in nb.cells)


def test_a_missing_template_names_the_fix():
    with pytest.raises(notebooks.NotebookError, match="reinstall pacsai"):
        notebooks.template("nope.ipynb")

