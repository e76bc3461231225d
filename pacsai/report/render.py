"""Execute a report template with papermill and export it to HTML (no code) and PDF (headless Chromium)."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pacsai.errors import ReportError

log = logging.getLogger(__name__)

KERNEL = "pacsai"


def project_root() -> Path:
    """The installed project (templates live in its ``notebooks/``), independent of the working directory."""
    env = os.environ.get("PACSAI_PROJECT_ROOT")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2]


def find_template(name: str = "reports/patient_plan") -> Path:
    """Path of a notebook template shipped with the project (``notebooks/<name>.ipynb``)."""
    path = project_root() / "notebooks" / f"{name}.ipynb"
    if not path.is_file():
        raise ReportError(
            f"report template {path} not found; install pacsai from its source tree (pip install -e .) "
            "or set PACSAI_PROJECT_ROOT to the folder that holds notebooks/"
        )
    return path


def execute(
    template: Path,
    output: Path,
    parameters: Mapping[str, Any],
    *,
    cwd: Path | None = None,
    kernel: str = KERNEL,
    timeout_s: int = 600,
) -> Path:
    """Run ``template`` with papermill into ``output`` (an executed .ipynb) with the named kernel."""
    import papermill

    output.parent.mkdir(parents=True, exist_ok=True)
    log_path = output.with_name(output.stem + ".log")
    try:
        with stderr_to(log_path):
            papermill.execute_notebook(
                str(template),
                str(output),
                parameters=dict(parameters),
                kernel_name=kernel,
                cwd=str(cwd or output.parent),
                progress_bar=False,
                execution_timeout=timeout_s,
            )
    except papermill.PapermillExecutionError as err:
        raise ReportError(
            f"report notebook failed in cell {err.exec_count}: {err.ename}: {err.evalue} "
            f"(the partly executed notebook is {output})"
        ) from err
    except Exception as err:
        if "No such kernel" in str(err) or "NoSuchKernel" in type(err).__name__:
            raise ReportError(
                f"Jupyter kernel {kernel!r} is not installed; run `make setup` "
                f"(or `python -m ipykernel install --sys-prefix --name {kernel}`)"
            ) from err
        raise
    return output


@contextlib.contextmanager
def stderr_to(path: Path) -> Iterator[None]:
    """Send file descriptor 2 (the kernel's and papermill's chatter) to ``path`` for the block.

    The kernel is a child process that inherits fd 2, so redirecting ``sys.stderr`` alone would not do.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "ab") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def to_html(notebook: Path, html: Path) -> Path:
    """Export an executed notebook to HTML without code cells or prompts (what a clinician reads)."""
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(notebook, as_version=4)
    # nbconvert warns about images without alt text on every figure; the report's figures have captions.
    logging.getLogger("traitlets").setLevel(logging.ERROR)
    exporter = HTMLExporter(exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True)
    body, _ = exporter.from_notebook_node(nb)
    _atomic_write(html, body.encode("utf-8"))
    return html


def chromium() -> str | None:
    """Path of a headless-capable Chromium, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


_PDF_DATES = re.compile(rb"/(CreationDate|ModDate) ?\(D:[0-9+\-Z']*\)")


def to_pdf(html: Path, pdf: Path, *, timeout_s: int = 120) -> Path | None:
    """Print ``html`` to ``pdf`` with headless Chromium; None (and a log line) when no Chromium is installed.

    The PDF's creation/modification dates are normalised so the same report gives the same bytes (its DICOM UIDs
    derive from its content: a time stamp would make every re-run a new object in the PACS).
    """
    exe = chromium()
    if exe is None:
        log.warning("no Chromium found: PDF not written (install Debian's `chromium` for PDF reports)")
        return None
    with tempfile.TemporaryDirectory(prefix="pacsai-chromium-") as profile:
        tmp = pdf.with_name(f".{pdf.name}.tmp")
        cmd = [
            exe,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--no-pdf-header-footer",
            f"--user-data-dir={profile}",
            f"--print-to-pdf={tmp}",
            html.resolve().as_uri(),
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired as err:
            raise ReportError(f"Chromium did not finish printing {html} within {timeout_s} s") from err
        if proc.returncode != 0 or not tmp.is_file() or tmp.stat().st_size == 0:
            tmp.unlink(missing_ok=True)
            raise ReportError(
                f"Chromium failed to print {html} (exit {proc.returncode}): "
                f"{proc.stderr.decode(errors='replace').strip().splitlines()[-1:]}"
            )
        data = _PDF_DATES.sub(lambda m: b"/" + m.group(1) + b" (D:20000101000000Z)", tmp.read_bytes())
        tmp.unlink()
    _atomic_write(pdf, data)
    return pdf


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
