"""The per-patient planning report: PlanSummary without papermill, then the real template end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pacsai.errors import ReportError
from pacsai.report.params import validate_parameters

SHAPE = (40, 128, 128)
SPACING = (3.2, 3.2, 4.0)  # 410 × 410 × 160 mm: the smallest thorax the generator accepts


@pytest.fixture(scope="module")
def patient():
    from pacsai.synthetic import make_patient

    return make_patient(7, shape=SHAPE, spacing=SPACING)


@pytest.fixture(scope="module")
def store(tmp_path_factory, patient):
    """An embedded store with one full patient (dose + prior) and one with neither."""
    from pacsai.pacs import connect
    from pacsai.synthetic import make_patient

    root = tmp_path_factory.mktemp("report-store")
    pacs = connect(f"file://{root / 'pacs'}", cache_dir=root / "cache")
    summary = pacs.store(list(patient.datasets()), progress=False)
    assert summary.ok
    bare = make_patient(8, shape=SHAPE, spacing=SPACING, with_prior=False, with_dose=False)
    assert pacs.store(list(bare.datasets()), progress=False).ok
    return pacs, root


def test_summary_numbers_equal_the_ground_truth(store, patient):
    from pacsai import planning
    from pacsai.report.summary import build_summary

    pacs, _ = store
    s = build_summary(validate_parameters(patient_id=patient.patient_id), pacs=pacs)
    rows = {r["name"]: r for r in s.structures}
    for name in ("BODY", "GTV", "Lung_L", "Lung_R", "Heart", "SpinalCord", "Esophagus"):
        truth = planning.volume_cc(patient.masks[name])
        # read back from the RTSTRUCT polygons: within 3 % of the generator's voxel masks
        assert rows[name]["volume_cc"] == pytest.approx(truth, rel=0.03), name
    assert rows["CTV"]["volume_cc"] > rows["GTV"]["volume_cc"]
    assert rows["PTV"]["volume_cc"] > rows["CTV"]["volume_cc"]
    # DVH of the planned target and the constraint table
    assert s.dvh["PTV"]["d95_gy"] > 0.9 * 60
    assert 55 < s.dvh["GTV"]["mean_gy"] < 66
    assert s.plan_quality["coverage_v95_pct"] > 80
    assert {c["structure"] for c in s.constraints} >= {"SpinalCord", "Heart", "Esophagus"}
    assert all(c["status"] in ("pass", "fail", "not evaluated") for c in s.constraints)
    # response against the prior, in the direction the generator drew
    assert s.response["category"] == patient.truth["expected_response"]
    # provenance names every input series and instance
    inputs = s.provenance["inputs"]
    assert {i["modality"] for i in inputs} == {"CT", "RTSTRUCT", "RTDOSE"}
    ct = next(i for i in inputs if i["modality"] == "CT" and i["study_instance_uid"] == s.study_instance_uid)
    assert sorted(ct["sop_instance_uids"]) == sorted(str(d.SOPInstanceUID) for d in patient.ct)
    assert s.provenance["research_use_only"]
    json.dumps(s.to_dict(), allow_nan=False)  # metrics.json is strict JSON


def test_summary_without_dose_or_prior_says_why(store):
    from pacsai.report.summary import build_summary

    pacs, _ = store
    s = build_summary(validate_parameters(patient_id="SYN-00008"), pacs=pacs)
    assert s.dvh == {} and s.constraints == [] and "RTDOSE" in s.dvh_note
    assert s.response["category"] is None and "earlier study" in s.response["note"]
    assert any(r["name"] == "PTV" for r in s.structures)


def test_unknown_patient_and_bad_parameters(store):
    from pacsai.report.summary import build_summary

    pacs, _ = store
    with pytest.raises(ReportError, match="NOPE"):
        build_summary(validate_parameters(patient_id="NOPE"), pacs=pacs)
    with pytest.raises(ReportError, match="model_uri"):
        validate_parameters(patient_id="x", structures_from="model")
    with pytest.raises(ReportError, match="margin"):
        validate_parameters(patient_id="x", ctv_margin_mm=[1, 2])


def _run_cli(args, cwd: Path, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "pacsai", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_report_cli_end_to_end_and_push_is_idempotent(store, patient, tmp_path):
    pacs, root = store
    url = f"file://{root / 'pacs'}"
    out = tmp_path / "out"
    before = len(pacs.search_instances(PatientID=patient.patient_id))
    proc = _run_cli(["report", patient.patient_id, "--pacs", url, "--out", str(out), "--push"], tmp_path,
                    {"PACSAI_CACHE_DIR": str(root / "cache")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("report.ipynb", "report.html", "metrics.json"):
        assert (out / name).is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= {"structures", "dvh", "constraints", "response", "provenance"}
    assert metrics["response"]["category"] in ("PR", "SD", "PD", "CR")
    html = (out / "report.html").read_text()
    assert "Research use only" in html and "Dose–volume histograms" in html and "<pre" not in html.split("<body")[1][:200]
    assert "PacsaiWarning" not in html  # data notes go to the QA section, not as stderr
    from pacsai.report.render import chromium

    if chromium():
        assert (out / "report.pdf").read_bytes()[:5] == b"%PDF-"
    after_first = len(pacs.search_instances(PatientID=patient.patient_id))
    assert after_first == before + 3  # SEG, SR, PDF (the RTSTRUCT came from the PACS: not written back)
    proc = _run_cli(["report", patient.patient_id, "--pacs", url, "--out", str(out), "--push"], tmp_path,
                    {"PACSAI_CACHE_DIR": str(root / "cache")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(pacs.search_instances(PatientID=patient.patient_id)) == after_first
    # the run is tracked, pseudonymised
    db = tmp_path / "mlruns" / "mlflow.db"
    assert db.is_file()
    for path in (tmp_path / "mlruns").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert patient.patient_id.encode() not in data, path
            assert b"SYNTHETIC^PATIENT" not in data, path


def test_report_cli_errors_are_one_line(tmp_path):
    proc = _run_cli(["report", "NOPE", "--pacs", f"file://{tmp_path / 'empty'}", "--out", str(tmp_path / "o"),
                     "--no-track"], tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "error" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_report_from_orthanc_with_structures_from_pacs(orthanc, clean_orthanc, patient, tmp_path):
    from pacsai.pacs import connect
    from pacsai.report.run import run_report

    pacs = connect(orthanc.url, user=orthanc.user, password=orthanc.password)
    assert pacs.store(list(patient.datasets()), progress=False).ok
    params = validate_parameters(patient_id=patient.patient_id, pacs_url=orthanc.url)
    import os

    os.environ["PACSAI_PACS_USER"], os.environ["PACSAI_PACS_PASSWORD"] = orthanc.user, orthanc.password
    try:
        result = run_report(params, out_dir=tmp_path / "out", push=True, track=False, pdf=False)
    finally:
        del os.environ["PACSAI_PACS_USER"], os.environ["PACSAI_PACS_PASSWORD"]
    metrics = json.loads(result.metrics.read_text())
    gtv = next(r for r in metrics["structures"] if r["name"] == "GTV")
    from pacsai import planning

    assert gtv["volume_cc"] == pytest.approx(planning.volume_cc(patient.masks["GTV"]), rel=0.03)
    assert len(result.pushed["objects"]) == 2  # SEG + SR (no PDF asked for)
    assert orthanc.password not in (tmp_path / "out" / "report.ipynb").read_text()
    assert np.isfinite(metrics["dvh"]["PTV"]["mean_gy"])


@pytest.mark.slow
def test_cohort_reports_one_failure_does_not_stop_the_rest(tmp_path):
    """Two workers; a patient whose study has no RTSTRUCT fails alone, is listed, and the CLI exits 1."""
    from pacsai.pacs import connect
    from pacsai.synthetic import make_patient

    root = tmp_path / "store"
    pacs = connect(f"file://{root / 'pacs'}", cache_dir=root / "cache")
    good = make_patient(11, shape=SHAPE, spacing=SPACING, with_prior=False)
    ct_only = make_patient(12, shape=SHAPE, spacing=SPACING, with_prior=False, with_dose=False)
    assert pacs.store(list(good.datasets()), progress=False).ok
    assert pacs.store(list(ct_only.ct), progress=False).ok
    proc = _run_cli(["report", "--cohort", "-f", "PatientID=SYN*", "--workers", "2", "--pacs",
                     f"file://{root / 'pacs'}", "--out", str(tmp_path / "reports"), "--no-track"], tmp_path,
                    {"PACSAI_CACHE_DIR": str(root / "cache")})
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert ct_only.patient_id in proc.stderr and "re-run" in proc.stderr
    import pandas as pd

    table = pd.read_csv(tmp_path / "reports" / "cohort_summary.csv")
    ok = dict(zip(table.patient_id, table.ok))
    assert ok == {good.patient_id: True, ct_only.patient_id: False}
    assert "RTSTRUCT" in table.set_index("patient_id").loc[ct_only.patient_id, "error"]
    assert (tmp_path / "reports" / good.patient_id / "report.html").is_file()


def test_report_from_pacs_structures_never_imports_torch(store, patient):
    """DESIGN.md: a report whose structures come from the PACS does not import torch/monai."""
    _, root = store
    code = (
        "import sys; from pacsai.pacs import connect; from pacsai.report.params import validate_parameters; "
        "from pacsai.report.summary import build_summary; import pacsai.report.display, pacsai.viz; "
        f"p = connect('file://{root / 'pacs'}', cache_dir='{root / 'cache'}'); "
        f"s = build_summary(validate_parameters(patient_id='{patient.patient_id}'), pacs=p); "
        "assert s.dvh; bad = [m for m in ('torch', 'monai') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
