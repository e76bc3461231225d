"""A wheel installed outside the source tree reports: its templates ship in the package, nothing looks for the repo.

The wheel is built from a copy of the package (the repository stays untouched), installed into a fresh venv in a
temporary folder whose heavy dependencies come from the project's venv (a ``.pth`` line, so it takes seconds), with
the ``pacsai`` kernel spec of *that* venv. Then, in a working folder outside the repository: seed an embedded store,
``pacsai report`` from it; the HTML and metrics.json are there, and pacsai (in this process and in the kernel)
came from the wheel.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], *, cwd: Path, env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}: {proc.stdout[-1500:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built without network or build isolation from a copy of pacsai/ and pyproject.toml."""
    src = tmp_path_factory.mktemp("wheel-src")
    shutil.copytree(REPO / "pacsai", src / "pacsai", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    dist = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(dist),
          str(src)], cwd=src, env=dict(os.environ))
    (path,) = dist.glob("pacsai-*.whl")
    return path


def test_the_wheel_ships_the_templates(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"pacsai/templates/patient_plan.ipynb", "pacsai/templates/03_evaluate.ipynb",
            "pacsai/templates/demo.yaml"} <= names
    assert not any(n.startswith(("notebooks/", "tests/")) for n in names)


@pytest.mark.slow
def test_a_wheel_installed_outside_the_repo_reports(wheel, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path, env=dict(os.environ))
    python = venv / "bin" / "python"
    site = Path(subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                        text=True).strip())
    # the heavy dependencies from the project's venv, after the new venv's own site-packages; a path in a .pth
    # is not itself scanned for .pth files, so the project's editable install of pacsai stays out
    (site / "project-deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PACSAI_", "MLFLOW_TRACKING", "PYTHONPATH"))}
    # Jupyter data: the new venv's kernel spec first, then the dependencies' data files (nbconvert's templates),
    # which a full install would have put into the new venv
    jupyter_path = f"{venv / 'share' / 'jupyter'}:{Path(sys.prefix) / 'share' / 'jupyter'}"
    env.update({"PATH": f"{venv / 'bin'}:{env.get('PATH', '')}", "JUPYTER_PATH": jupyter_path,
                "PACSAI_CACHE_DIR": str(tmp_path / "cache"), "VIRTUAL_ENV": str(venv)})
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
         cwd=tmp_path, env=env)
    _run([str(python), "-m", "ipykernel", "install", "--sys-prefix", "--name", "pacsai",
          "--display-name", "pacsai (Python 3)"], cwd=tmp_path, env=env)
    work = tmp_path / "work"  # outside the repository
    work.mkdir()
    where = _run([str(python), "-c", "import pacsai; print(pacsai.__file__)"], cwd=work, env=env).stdout.strip()
    assert Path(where).is_relative_to(venv), where
    # the kernel the report will start imports pacsai from the wheel too
    probe = ("from pathlib import Path; from pacsai import notebooks; import nbformat; "
             "nb = nbformat.v4.new_notebook(); nb.metadata['kernelspec'] = {'name': 'pacsai'}; "
             "nb.cells = [nbformat.v4.new_code_cell('import pacsai; print(pacsai.__file__)')]; "
             "nbformat.write(nb, 'probe.ipynb'); notebooks.execute(Path('probe.ipynb'), Path('probe-out.ipynb'), {}); "
             "print(nbformat.read('probe-out.ipynb', 4).cells[0].outputs[0].text)")
    kernel_where = _run([str(python), "-c", probe], cwd=work, env=env).stdout.strip()
    assert Path(kernel_where).is_relative_to(venv), kernel_where
    pacsai = [str(venv / "bin" / "pacsai")]
    _run([*pacsai, "seed", "--patients", "1", "--seed", "3", "--no-prior", "--shape", "40", "128", "128",
          "--spacing", "3.2", "3.2", "4.0", "--pacs", "file://./pacs", "--no-progress"], cwd=work, env=env)
    _run([*pacsai, "report", "SYN-00003", "--pacs", "file://./pacs", "--out", "out"], cwd=work, env=env,
         timeout=600)
    out = work / "out"
    assert (out / "report.html").is_file() and (out / "report.log").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["patient_id"] == "SYN-00003" and metrics["structures"]
    assert (work / "mlruns" / "mlflow.db").is_file()  # tracked in the working folder's store
