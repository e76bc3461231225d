"""Run a notebook template with papermill in a kernel of its own: its environment, its log, its folder.

The one notebook runner of pacsai, used by the report (:mod:`pacsai.report.run`) and the validation
(:mod:`pacsai.learning.validate`). Nothing here touches process-wide state, so reports can run side by side in
threads (a threaded Dask worker, a thread pool) without seeing each other's settings:

- the kernel's environment is a dict handed to its ``Popen`` (:func:`kernel_environment`), never ``os.environ``;
- the kernel's stdout/stderr (start-up chatter, warnings, a crash's last words) go to its own log file, never to a
  redirected file descriptor 2 of this process;
- the kernel starts in its own working folder (``cwd`` of its ``Popen``), not by ``os.chdir``;
- PACS credentials in a ``user:password@`` URL reach the kernel as ``PACSAI_PACS_USER``/``PACSAI_PACS_PASSWORD``
  in its environment (:func:`credentials_to_environment`), so the URL that goes into the notebook, its HTML and
  MLflow carries none, and no lock is needed.

Templates ship inside the package (``pacsai/templates``) and are found with :mod:`importlib.resources`
(:func:`template`), so an installed wheel reports and validates without the source tree.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import IO, Any, Literal
from urllib.parse import unquote, urlsplit

from pacsai.errors import PacsaiError
from pacsai.pacs.address import redact_url

log = logging.getLogger(__name__)

KERNEL = "pacsai"
TEMPLATES = "templates"
#: The report template (``pacsai report``) and the validation template (``pacsai validate``).
REPORT_TEMPLATE = "patient_plan.ipynb"
VALIDATION_TEMPLATE = "03_evaluate.ipynb"


class NotebookError(PacsaiError):
    """A notebook template could not be run; the message names the executed notebook and its log."""


class NotebookCellError(NotebookError):
    """A cell raised: ``cell`` is its execution count, ``ename``/``evalue`` the exception."""

    def __init__(self, message: str, *, cell: int | None, ename: str, evalue: str) -> None:
        super().__init__(message)
        self.cell = cell
        self.ename = ename
        self.evalue = evalue


class KernelDiedError(NotebookError):
    """The kernel process ended while a cell ran (killed, out of memory, a crash in native code)."""

    def __init__(self, message: str, *, cell: int | None) -> None:
        super().__init__(message)
        self.cell = cell


class KernelNotInstalledError(NotebookError):
    """No Jupyter kernel spec of that name is installed."""


@dataclass(frozen=True)
class NotebookRun:
    """An executed notebook: where it is, where its kernel logged, how long it took."""

    notebook: Path
    log: Path
    seconds: float


def template(name: str) -> Path:
    """Path of a notebook template shipped in the package (``pacsai/templates/<name>``).

    Raises
    ------
    NotebookError
        The installed package lacks it (a wheel built without its package data).
    """
    resource = resources.files("pacsai").joinpath(TEMPLATES).joinpath(name)  # one part per call on 3.10
    if not resource.is_file():
        raise NotebookError(
            f"notebook template {name} is missing from the installed package ({resource}); reinstall pacsai "
            "(its wheel ships pacsai/templates/*.ipynb as package data)"
        )
    # A regular install (wheel or editable) keeps package data as files; papermill reads a path.
    return Path(str(resource))


def credentials_to_environment(url: str) -> tuple[str, dict[str, str]]:
    """Split ``user:password@`` out of a PACS URL: ``(url without them, environment variables that carry them)``.

    The kernel reconnects by URL, but the URL goes into the notebook, its HTML, metrics.json and MLflow, so it must
    not carry the password; the kernel reads ``PACSAI_PACS_USER``/``PACSAI_PACS_PASSWORD`` instead (the precedence
    of :mod:`pacsai.pacs.credentials`). ``user@host`` alone gives only the user: the password then comes from the
    environment or netrc, as it would for the user.
    """
    parts = urlsplit(url) if "://" in url else None
    if parts is None or parts.username is None:
        return url, {}
    values = {"PACSAI_PACS_USER": unquote(parts.username)}
    if parts.password is not None:
        values["PACSAI_PACS_PASSWORD"] = unquote(parts.password)
    return redact_url(url), values


def kernel_environment(
    overrides: Mapping[str, str | None] | None = None, *, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment of one kernel: ``base`` (default a snapshot of this process's) with ``overrides``.

    A value of ``None`` removes the variable (e.g. a user's ``PACSAI_PACS_PASSWORD`` that must not reach a
    kernel talking to another PACS).
    """
    env = dict(os.environ if base is None else base)
    for key, value in (overrides or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def import_jsonschema_without_iri_grammar() -> None:
    """Import jsonschema (nbformat's validator) without compiling the IRI grammar of ``rfc3987-syntax``.

    jsonschema registers its ``iri``/``iri-reference`` format checks when ``rfc3987-syntax`` is installed (a
    jupyter-events extra pulls it in), and that package builds an Earley parser from its grammar at import:
    1-2 s of every report's and validation's wall time on a 2-core machine, before papermill can start a kernel.
    nbformat's notebook schema uses no IRI format, and format checks run only with a ``FormatChecker``, so
    nothing pacsai validates changes; the only effect is that this process's jsonschema has no ``iri`` checker.
    Does nothing when jsonschema is already imported (its checkers are then whatever that import made).
    """
    if "jsonschema" in sys.modules or "rfc3987_syntax" in sys.modules:
        return
    # A None entry makes `import rfc3987_syntax` raise ImportError, which jsonschema's _format suppresses.
    sys.modules["rfc3987_syntax"] = None  # type: ignore[assignment]
    try:
        importlib.import_module("jsonschema")  # for its side effect: the format checkers, without IRI
    finally:
        if sys.modules.get("rfc3987_syntax", 0) is None:
            del sys.modules["rfc3987_syntax"]


def _manager_class(env: Mapping[str, str], cwd: Path, sink: IO[bytes]) -> type[Any]:
    """A kernel manager class that starts its kernel with ``env``, in ``cwd``, logging to ``sink``.

    nbclient creates (and, owning it, shuts down) the kernel manager from its class; a class made per run carries
    this run's settings into ``Popen`` without touching the process.
    """
    from jupyter_client.manager import AsyncKernelManager

    launch = {"env": dict(env), "cwd": str(cwd), "stdout": sink, "stderr": sink}

    class _OwnEnvironmentKernelManager(AsyncKernelManager):
        # nbclient awaits start_kernel; the base class's sync-looking annotation is a run_sync alias.
        async def start_kernel(self, **kw: Any) -> None:  # type: ignore[override]
            await super().start_kernel(**{**kw, **launch})

    return _OwnEnvironmentKernelManager


def execute(
    template_path: Path,
    output: Path,
    parameters: Mapping[str, Any],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    log_path: Path | None = None,
    kernel: str = KERNEL,
    timeout_s: int | None = None,
    start_timeout_s: int = 60,
    shutdown: Literal["graceful", "immediate"] = "graceful",
) -> NotebookRun:
    """Run ``template_path`` with ``parameters`` into ``output`` (an executed .ipynb) in a kernel of its own.

    Parameters
    ----------
    template_path
        The notebook to run (e.g. :func:`template`).
    output
        The executed notebook; saved after every cell, so a failure leaves the partly executed one.
    parameters
        papermill parameters (injected after the cell tagged ``parameters``).
    env
        The kernel's whole environment; default :func:`kernel_environment` (this process's). Build it with
        :func:`kernel_environment` and :func:`credentials_to_environment`.
    cwd
        The kernel's working folder; default the output's folder.
    log_path
        The kernel's stdout/stderr; default ``output`` with the suffix ``.log``.
    kernel
        Jupyter kernel name (``make setup`` installs ``pacsai``).
    timeout_s
        Limit per cell in seconds; ``None``: none.
    start_timeout_s
        Limit for the kernel to start.
    shutdown
        How the kernel ends after the last cell: ``"graceful"`` (a shutdown request, then waiting for the
        interpreter to exit: about a second with numpy, xarray and matplotlib loaded) or ``"immediate"`` (killed;
        for notebooks whose cells leave nothing to finish at exit: no atexit hook, no open run or file).

    Raises
    ------
    NotebookCellError
        A cell raised (the message names the cell, the exception, the notebook and the log).
    KernelDiedError
        The kernel died while a cell ran (killed or out of memory).
    KernelNotInstalledError
        No kernel spec ``kernel``.
    NotebookError
        A cell ran past ``timeout_s``, or the kernel did not start.
    """
    import_jsonschema_without_iri_grammar()
    import papermill
    from jupyter_client.kernelspec import NoSuchKernel
    from nbclient.exceptions import CellTimeoutError, DeadKernelError

    output = output.resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    log_path = (log_path or output.with_suffix(".log")).resolve()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    workdir = (cwd or output.parent).resolve()
    start = time.perf_counter()
    with open(log_path, "ab") as sink:
        try:
            # cwd=None: papermill would os.chdir the whole process; the kernel gets its folder from Popen instead.
            papermill.execute_notebook(
                str(Path(template_path).resolve()),
                str(output),
                parameters=dict(parameters),
                kernel_name=kernel,
                cwd=None,
                progress_bar=False,
                log_output=False,
                start_timeout=start_timeout_s,
                execution_timeout=timeout_s,
                shutdown_kernel=shutdown,
                kernel_manager_class=_manager_class(kernel_environment() if env is None else env, workdir, sink),
            )
        except papermill.PapermillExecutionError as err:
            raise NotebookCellError(
                f"notebook cell {err.exec_count} failed: {err.ename}: {err.evalue} "
                f"(executed notebook {output}; kernel log {log_path})",
                cell=err.exec_count, ename=err.ename, evalue=err.evalue,
            ) from err
        except DeadKernelError as err:
            cell = running_cell(output)
            where = f"while running cell {cell}" if cell is not None else "before its first cell"
            raise KernelDiedError(
                f"the kernel died {where}; out of memory? (executed notebook {output}; kernel log {log_path}; "
                "`dmesg` names an out-of-memory kill)",
                cell=cell,
            ) from err
        except CellTimeoutError as err:
            raise NotebookError(
                f"notebook cell {running_cell(output)} ran past {timeout_s} s (executed notebook {output})"
            ) from err
        except NoSuchKernel as err:
            raise KernelNotInstalledError(
                f"Jupyter kernel {kernel!r} is not installed; run `make setup` "
                f"(or `python -m ipykernel install --sys-prefix --name {kernel}`)"
            ) from err
        except RuntimeError as err:
            if "kernel" not in str(err).lower():
                raise
            raise NotebookError(f"the kernel {kernel!r} did not start: {err} (kernel log {log_path})") from err
    return NotebookRun(notebook=output, log=log_path, seconds=time.perf_counter() - start)


def running_cell(notebook: Path) -> int | None:
    """1-based position among the code cells of the cell that was running when the kernel stopped, or None.

    papermill saves the notebook as each cell starts and marks it ``running``; the last cell it started is the one.
    """
    import nbformat

    try:
        nb = nbformat.read(notebook, as_version=4)
    except (OSError, ValueError):
        return None
    started = None
    code = [c for c in nb.cells if c.cell_type == "code"]
    for number, cell in enumerate(code, start=1):
        if (cell.metadata.get("papermill") or {}).get("start_time"):
            started = number
    return started


__all__ = [
    "KERNEL",
    "REPORT_TEMPLATE",
    "VALIDATION_TEMPLATE",
    "KernelDiedError",
    "KernelNotInstalledError",
    "NotebookCellError",
    "NotebookError",
    "NotebookRun",
    "credentials_to_environment",
    "execute",
    "import_jsonschema_without_iri_grammar",
    "kernel_environment",
    "redact_url",
    "running_cell",
    "template",
]
