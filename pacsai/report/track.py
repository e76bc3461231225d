"""The report's MLflow run (``pacsai.kind=report``): parameters, key metrics and a pseudonymised metrics.json.

Unless the user allows identifiers (``PACSAI_LOG_PHI``), the logged metrics.json names the patient by pseudonym,
every DICOM UID by its keyed hash and every date as days since the patient's first study in the report (the
prior's date, else the planning study's): ``day 0`` and ``day 115`` instead of 20240716 and 20241108.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pacsai.errors import PacsaiError
from pacsai.report.params import ReportParameters

if TYPE_CHECKING:  # pragma: no cover
    from pacsai.config import Settings

log = logging.getLogger(__name__)


def first_study_date(metrics: dict[str, Any]) -> str | None:
    """Day 0 of the relative dates: the earliest of the report's study dates (planning study, prior), as
    ``YYYYMMDD``; None when the metrics name neither."""
    response = metrics.get("response") or {}
    dates = [str(d) for d in (metrics.get("study_date"), response.get("prior_study_date"))
             if d and len(str(d)) == 8 and str(d).isdigit()]
    return min(dates) if dates else None


def track_report(
    params: ReportParameters, folder: Path, metrics: dict[str, Any], pdf_path: Path | None, *,
    settings: Settings | None = None,
) -> str | None:
    """Log a ``pacsai.kind=report`` run: parameters, key metrics, a pseudonymised metrics.json.

    The HTML/PDF name the patient, so they are logged only when the user allows identifiers (PACSAI_LOG_PHI).
    ``settings`` (default :func:`pacsai.config.load_settings`) choose the store, e.g. one per report.
    """
    import mlflow

    from pacsai import tracking
    from pacsai.config import load_settings

    settings = settings or load_settings()
    try:
        key = tracking.pseudonym_key(settings=settings)
        label = params.patient_id if settings.log_phi else tracking.pseudonymize(params.patient_id, key)
        logged = json.loads(json.dumps(metrics).replace(json.dumps(params.patient_id)[1:-1], label))
        first_study = first_study_date(metrics)
        run_params = {k: v for k, v in params.model_dump(mode="json").items() if k not in ("patient_id", "pacs_url")}
        run_params["patient"] = label
        model = (metrics.get("provenance") or {}).get("model") or {}
        tags = {"pacsai.patient": label, "pacsai.qa_status": str((metrics.get("qa") or {}).get("status"))}
        if model:
            tags.update({"pacsai.model_name": str(model.get("name")), "pacsai.model_version": str(model.get("version")),
                         "pacsai.model_run_id": str(model.get("run_id"))})
        with tracking.start_run("report", experiment="pacsai-reports", params=run_params, tags=tags,
                                settings=settings) as ctx:
            values = {}
            for name, row in (metrics.get("dvh") or {}).items():
                safe = "".join(c if c.isalnum() else "_" for c in name)
                for k in ("mean_gy", "max_gy", "d95_gy"):
                    if isinstance(row.get(k), (int, float)):
                        values[f"{safe}_{k}"] = float(row[k])
            for row in metrics.get("structures") or []:
                if row.get("volume_cc") is None:
                    continue
                safe = "".join(c if c.isalnum() else "_" for c in row["name"])
                values[f"{safe}_volume_cc"] = float(row["volume_cc"])
            values["qa_fail"] = float((metrics.get("qa") or {}).get("status") == "FAIL")
            values["qa_review"] = float((metrics.get("qa") or {}).get("status") == "REVIEW")
            if values:
                mlflow.log_metrics(values)
            mlflow.log_dict(ctx.scrub(logged, reference_date=first_study), "report/metrics.json")
            if settings.log_phi:
                for path in (folder / "report.html", pdf_path):
                    if path is not None and path.is_file():
                        mlflow.log_artifact(str(path), artifact_path="report")
            return ctx.run_id
    except PacsaiError as err:
        log.warning("report not tracked in MLflow: %s", err)
        return None
