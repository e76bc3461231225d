"""Execute the report template (:mod:`pacsai.notebooks`) and export it to HTML (no code) and PDF (headless Chromium)."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pacsai import notebooks
from pacsai.errors import ReportError
from pacsai.notebooks import KERNEL, REPORT_TEMPLATE, NotebookCellError, NotebookError

if TYPE_CHECKING:  # pragma: no cover
    from nbconvert import HTMLExporter

log = logging.getLogger(__name__)


def find_template(name: str = REPORT_TEMPLATE) -> Path:
    """Path of a notebook template shipped in the package (``pacsai/templates/<name>``)."""
    try:
        return notebooks.template(name)
    except NotebookError as err:
        raise ReportError(str(err)) from err


def execute(
    template: Path,
    output: Path,
    parameters: Mapping[str, Any],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    kernel: str = KERNEL,
    timeout_s: int = 600,
) -> Path:
    """Run ``template`` with papermill into ``output`` (an executed .ipynb) in a kernel of its own.

    The kernel's stdout/stderr go to ``output`` with the suffix ``.log``; ``env`` is its whole environment
    (default this process's, see :func:`pacsai.notebooks.kernel_environment`).

    Raises
    ------
    ReportError
        A cell failed, the kernel died or is not installed (the message says which, and names the notebook).
    """
    try:
        # Killed after the last cell rather than asked to exit (about a second of interpreter teardown): the
        # report's cells have written and closed their files by then, and the kernel has nothing to finish.
        notebooks.execute(template, output, parameters, env=env, cwd=cwd, kernel=kernel, timeout_s=timeout_s,
                          shutdown="immediate")
    except NotebookCellError as err:
        raise ReportError(
            f"report notebook failed in cell {err.cell}: {err.ename}: {err.evalue} "
            f"(the partly executed notebook is {output}; the kernel's log {output.with_suffix('.log')})"
        ) from err
    except NotebookError as err:
        raise ReportError(f"report notebook: {err}") from err
    return output


def html_exporter() -> HTMLExporter:
    """The report's HTML exporter (no code cells, no prompts) with its templates loaded.

    Importing nbconvert and loading its Jinja templates costs about half a second; :func:`prepare_html_exporter`
    does it while the kernel runs.
    """
    notebooks.import_jsonschema_without_iri_grammar()
    from nbconvert import HTMLExporter

    # nbconvert warns about images without alt text on every figure; the report's figures have captions.
    logging.getLogger("traitlets").setLevel(logging.ERROR)
    exporter = HTMLExporter(exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True)
    exporter.template  # noqa: B018  (loads and compiles the Jinja templates now, not in to_html)
    return exporter


def prepare_html_exporter() -> Future[HTMLExporter]:
    """Build :func:`html_exporter` in a thread; the report process only waits while the kernel runs its cells."""
    future: Future[HTMLExporter] = Future()

    def build() -> None:
        try:
            future.set_result(html_exporter())
        except BaseException as err:  # handed to whoever waits for the exporter
            future.set_exception(err)

    threading.Thread(target=build, name="pacsai-html-exporter", daemon=True).start()
    return future


def to_html(notebook: Path, html: Path, *, exporter: HTMLExporter | None = None) -> Path:
    """Export an executed notebook to HTML without code cells or prompts (what a clinician reads).

    ``exporter``: one from :func:`html_exporter` (default a new one); it is not shared between threads.
    """
    notebooks.import_jsonschema_without_iri_grammar()
    import nbformat

    nb = nbformat.read(notebook, as_version=4)
    body, _ = (exporter or html_exporter()).from_notebook_node(nb)
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
