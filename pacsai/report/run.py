"""One patient's report, end to end: papermill → report.ipynb/html/pdf + metrics.json → PACS and MLflow."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pacsai import notebooks
from pacsai.errors import ReportError
from pacsai.notebooks import credentials_to_environment, kernel_environment, redact_url
from pacsai.report import handoff, render
from pacsai.report.params import ReportParameters
from pacsai.report.summary import MASKS_FILE, METRICS_FILE
from pacsai.report.track import track_report

if TYPE_CHECKING:  # pragma: no cover
    from pacsai.pacs import Pacs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReportResult:
    """Where one report went."""

    patient_id: str
    out_dir: Path
    notebook: Path
    html: Path
    pdf: Path | None
    metrics: Path
    pushed: dict[str, Any] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    seconds: float = 0.0


# mlflow's fluent API (mlflow.start_run, used by track_report) keeps ONE tracking URI per process and, while a run
# is logged, also sets MLFLOW_TRACKING_URI: two reports logging at once, or one reading the store while another
# logs, would cross stores. Held only for that second of logging and the read of the URI, never around a kernel.
_MLFLOW_FLUENT = threading.Lock()


#: The report kernel's BLAS runs single-threaded: its matrix products are small (affines, DVH sums), and idle
#: OpenBLAS workers spin-wait on the CPUs, ~1 s of CPU per report for no gain in time (measured on 2 cores:
#: summary 3.7-4.1 → 2.75-3.1 s CPU, same wall time); reports side by side need those CPUs.
BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def report_environment(
    secrets: Mapping[str, str] | None = None, *, mlflow_uri: str | None = None
) -> dict[str, str]:
    """The report kernel's environment: this process's, with its MLflow store and the PACS login of this report.

    The kernel runs in the output folder, so it gets the store as an absolute URI (``mlflow_uri``, default this
    process's) rather than one relative to there; ``secrets`` (:func:`pacsai.notebooks.credentials_to_environment`)
    carry a login taken out of the PACS URL. Its BLAS is single-threaded (:data:`BLAS_THREAD_VARIABLES`) unless the
    user set those variables. Each report builds its own: threads running reports side by side never share one.
    """
    from pacsai.tracking import tracking_uri

    if mlflow_uri is None:
        with _MLFLOW_FLUENT:
            mlflow_uri = tracking_uri()
    env = kernel_environment({"PACSAI_MLFLOW_URI": mlflow_uri, "PACSAI_RUN_SOURCE": "report.ipynb",
                              **(secrets or {})})
    for name in BLAS_THREAD_VARIABLES:  # a user's own setting wins
        env.setdefault(name, "1")
    return env


def default_out_dir(patient_id: str, root: Path = Path("reports")) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in patient_id)
    return root / safe


def run_report(
    params: ReportParameters,
    *,
    out_dir: Path | None = None,
    push: bool = False,
    track: bool = True,
    pdf: bool = True,
    push_anyway: bool = False,
    mlflow_uri: str | None = None,
) -> ReportResult:
    """Execute the report template for one patient and write report.ipynb, report.html, report.pdf, metrics.json.

    Parameters
    ----------
    params
        Validated report parameters (see :class:`ReportParameters`).
    out_dir
        Output folder; default ``reports/<PatientID>/<StudyInstanceUID>/`` (the study is known after the run).
    push
        Store RTSTRUCT/SEG (model contours), the TID1500 SR and the Encapsulated PDF in the patient's study.
        When the report's QA gate is FAIL, only the PDF is stored (it shows the FAIL and its reasons first):
        contours and the SR, which would state numbers the gate refuses, stay out (see :func:`push_results`).
    push_anyway
        With ``push``: store everything even when the QA gate is FAIL; the SR then says "pushed despite QA FAIL
        by user request".
    track
        Log an MLflow run (``pacsai.kind=report``), pseudonymised.
    mlflow_uri
        The MLflow store of this report (the kernel's and the report run's); default the process's
        (``PACSAI_MLFLOW_URI``, else ``mlruns/``). Reports running side by side in threads may each have their own.
    """
    start = time.perf_counter()
    from pacsai.pacs import connect

    # This process connects with the URL as given. The kernel, the notebook, metrics.json and MLflow get it without
    # ``user:password@`` (the kernel gets those in its own environment, see pacsai.notebooks), and absolute: the
    # notebook runs in the output folder, where a relative file:// store would resolve elsewhere.
    url = params.pacs_url or None  # as given: the gathering thread connects with it too
    pacs = connect(url)
    secrets = credentials_to_environment(params.pacs_url)[1]
    params = params.model_copy(update={"pacs_url": redact_url(str(pacs.url))})
    # Fail in a second, not after starting a kernel, when the patient is not there.
    if pacs.search_studies(PatientID=params.patient_id).empty:
        raise ReportError(f"no studies of patient {params.patient_id!r} on {pacs.url}; check the PatientID "
                          "with `pacsai pacs search -f PatientID=...`")
    staging = (out_dir or default_out_dir(params.patient_id)).resolve()
    staging.mkdir(parents=True, exist_ok=True)
    notebook = staging / "report.ipynb"
    values = params.model_dump(mode="json")
    for key in ("alpha_beta_tumour_gy", "alpha_beta_oar_gy"):
        values.pop(key)  # template defaults; not papermill parameters
    # The kernel runs in the output folder, so "." is that folder: the executed notebook (and its provenance)
    # stays right when a cohort run renames its staging folder into place.
    values["out_dir"] = "."
    env = report_environment(secrets, mlflow_uri=mlflow_uri)
    gathering: _Gathering | None = None
    if params.structures_from == "model":
        # Read and segment here, so the kernel never imports torch/MONAI (its start is the PACS path's): in a
        # thread, while the kernel starts and imports (seconds); the kernel waits for the file (handoff.announce).
        values["inputs_file"] = handoff.announce(staging).name
        gathering = _Gathering(params, url, staging, mlflow_uri=mlflow_uri)
    # papermill (and nbformat, jsonschema) first in this thread, so that the exporter's thread imports only
    # nbconvert's own modules while this one waits for the kernel.
    notebooks.import_jsonschema_without_iri_grammar()
    import papermill  # noqa: F401

    exporter = render.prepare_html_exporter()
    try:
        render.execute(render.find_template(), notebook, values, cwd=staging, env=env)
    except Exception:
        if gathering is not None:
            gathering.raise_error()  # the gatherer's own error (PACS, model, input), not the kernel's echo of it
        raise
    finally:
        handoff.remove(staging)
    metrics_path = staging / METRICS_FILE
    if not metrics_path.is_file():
        raise ReportError(f"the report notebook did not write {metrics_path}; see {notebook}")
    html = render.to_html(notebook, staging / "report.html", exporter=exporter.result())
    pdf_path = render.to_pdf(html, staging / "report.pdf") if pdf else None
    metrics = json.loads(metrics_path.read_text())
    pushed: dict[str, Any] = {}
    if push:
        pushed = push_results(params, staging, metrics, pdf_path, push_anyway=push_anyway, pacs=pacs)
    run_id = _track(params, staging, metrics, pdf_path, mlflow_uri=mlflow_uri) if track else None
    return ReportResult(
        patient_id=params.patient_id,
        out_dir=staging,
        notebook=notebook,
        html=html,
        pdf=pdf_path,
        metrics=metrics_path,
        pushed=pushed,
        mlflow_run_id=run_id,
        seconds=time.perf_counter() - start,
    )


class _Gathering:
    """:func:`_gather_for_kernel` in a thread of its own (started at once), and its error, if it failed.

    The thread opens its own connection to the PACS (``url`` as the user gave it): a connection is not shared
    between threads (the embedded store's SQLite index refuses it).
    """

    def __init__(self, params: ReportParameters, url: str | None, folder: Path, *, mlflow_uri: str | None) -> None:
        from pacsai.pacs import connect

        self.error: BaseException | None = None

        def gather() -> None:
            try:
                pacs = connect(url)
                try:
                    _gather_for_kernel(params, pacs, folder, mlflow_uri=mlflow_uri)
                finally:
                    pacs.close()
            except BaseException as err:  # handed to the report's thread; the waiting kernel gets it too
                self.error = err
                handoff.fail(folder, err)

        # A daemon: a report abandoned (Ctrl-C, the watch's SIGTERM) does not wait for its inference to end.
        self._thread = threading.Thread(target=gather, name="pacsai-report-gather", daemon=True)
        self._thread.start()

    def raise_error(self, timeout_s: float = 10.0) -> None:
        """Raise the gatherer's error, if it failed (waiting a little: the kernel may have stopped on it first)."""
        self._thread.join(timeout_s)
        if self.error is not None:
            raise self.error


def _gather_for_kernel(params: ReportParameters, pacs: Pacs, folder: Path, *, mlflow_uri: str | None) -> Path:
    if mlflow_uri is None:
        return handoff.gather_to_file(params, pacs, folder)
    from pacsai import tracking

    # The model comes from this report's store; mlflow resolves models:/ URIs by its one process-wide URI.
    with _MLFLOW_FLUENT, tracking.using_store(mlflow_uri):
        return handoff.gather_to_file(params, pacs, folder)


def _track(params: ReportParameters, folder: Path, metrics: dict[str, Any], pdf_path: Path | None, *,
           mlflow_uri: str | None) -> str | None:
    with _MLFLOW_FLUENT:
        if mlflow_uri is None:
            return track_report(params, folder, metrics, pdf_path)
        from pacsai.config import load_settings

        settings = load_settings(mlflow_uri=mlflow_uri)
        return track_report(params, folder, metrics, pdf_path, settings=settings)


def push_results(
    params: ReportParameters, folder: Path, metrics: dict[str, Any], pdf_path: Path | None, *,
    push_anyway: bool = False, pacs: Pacs | None = None,
) -> dict[str, Any]:
    """Build the DICOM outputs from a finished report folder and store them in the patient's study.

    The QA gate decides what goes (docs/clinical_definitions.md "The QA gate"): PASS or REVIEW → SEG, RTSTRUCT
    (model contours), SR and PDF; FAIL → the PDF only, which shows the FAIL and its reasons at the top, so the
    PACS records that a report was made and why its contours and numbers were withheld. ``push_anyway`` stores
    everything despite a FAIL, and the SR then states "pushed despite QA FAIL by user request".

    Returns
    -------
    dict
        ``objects`` (built), ``stored``, ``already_present``, ``failed``, ``qa_status`` and ``withheld`` (what
        the gate kept out, with the reason).
    """
    from pacsai.imaging import read_series
    from pacsai.imaging.dicomio import load_datasets
    from pacsai.imaging.geometry import like
    from pacsai.pacs import connect
    from pacsai.report.inputs import IMAGE_MODALITIES
    from pacsai.report.outputs import build_outputs, push_outputs

    from_model = params.structures_from == "model"
    qa = metrics.get("qa") or {}
    status = str(qa.get("status", "FAIL"))  # a report without a gate is not trusted
    withhold = status == "FAIL" and not push_anyway
    withheld: list[str] = []
    if withhold:
        withheld = ["SEG", "RTSTRUCT", "SR"] if from_model else ["SEG", "SR"]
        log.warning("QA FAIL: %s not stored (pass --push-anyway to store them); the PDF shows why",
                    ", ".join(withheld))
        if not pdf_path:
            return {"objects": [], "stored": [], "already_present": [], "failed": [], "qa_status": status,
                    "withheld": withheld, "withheld_reason": "QA FAIL (and no PDF rendered)"}
    pacs = pacs or connect(params.pacs_url or None)
    study = metrics.get("study_instance_uid")
    image_ref = next(i for i in metrics["provenance"]["inputs"]
                     if i["modality"] in IMAGE_MODALITIES and i["study_instance_uid"] == study)
    paths = pacs.retrieve_series(image_ref["study_instance_uid"], image_ref["series_instance_uid"], progress=False)
    source = load_datasets(paths)
    image = read_series(source)
    with np.load(folder / MASKS_FILE) as data:
        masks = {name: like(image, data[name].astype(bool), name=name) for name in data.files}
    measurements = {}
    dvh = metrics.get("dvh") or {}
    for row in metrics["structures"]:
        if row.get("state", "present") != "present" or not row.get("volume_cc"):
            continue
        name = row["name"]
        measurements[name] = {
            "volume_cc": row["volume_cc"],
            "longest_diameter_mm": row["longest_diameter_mm"],
            "mean_dose_gy": (dvh.get(name) or {}).get("mean_gy"),
            "max_dose_gy": (dvh.get(name) or {}).get("max_gy"),
        }
    datasets = build_outputs(
        source_images=source,
        masks={} if withhold else {k: v for k, v in masks.items() if k in measurements},
        measurements={} if withhold else measurements,
        pdf_bytes=pdf_path.read_bytes() if pdf_path else None,
        model_info=metrics["provenance"].get("model") or {},
        params=metrics["provenance"]["parameters"],
        include_seg=not withhold,
        include_rtstruct=from_model and not withhold,
        qa=qa or None,
        pushed_despite_fail=status == "FAIL" and push_anyway,
        drawn_by={r["name"]: (r.get("drawn_by") or {}).get("label", "") for r in metrics["structures"]},
    )
    summary = push_outputs(pacs, datasets)
    result = {
        "qa_status": status,
        "withheld": withheld,
        "withheld_reason": "QA FAIL; --push-anyway stores them" if withheld else "",
        "objects": [f"{ds.Modality} {ds.SOPInstanceUID}" for ds in datasets],
        "stored": summary.stored,
        "already_present": summary.already_present,
        "failed": [list(f) for f in summary.failed],
    }
    if summary.failed:
        raise ReportError(f"pushing the report's DICOM objects failed for: {summary.failed}")
    return result
