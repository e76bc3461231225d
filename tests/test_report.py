"""The per-patient planning report: PlanSummary without papermill, then the real template end to end."""

from __future__ import annotations

import copy
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

    return make_patient(7, shape=SHAPE, spacing=SPACING, with_registration=False)  # frames unlinked on purpose


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
    assert all(c["status"] in ("pass", "fail", "not evaluable", "unreliable") for c in s.constraints)
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
    proc = _run_cli(["report", "NOPE", "--pacs", f"file://{tmp_path / 'empty'}", "--push-anyway", "--no-track"],
                    tmp_path)
    assert proc.returncode == 1 and "--push-anyway only makes sense with --push" in proc.stderr


@pytest.mark.slow
def test_report_from_orthanc_with_structures_from_pacs(orthanc, clean_orthanc, patient, tmp_path):
    from pacsai.pacs import connect
    from pacsai.report.run import run_report

    pacs = connect(orthanc.url, user=orthanc.user, password=orthanc.password)
    assert pacs.store(list(patient.datasets()), progress=False).ok
    # pacsai's own earlier model RTSTRUCT (heart left empty) beside the planner's: never read as the planner's
    import numpy as np

    from pacsai.imaging.geometry import like

    ours = {**patient.masks, "Heart": like(patient.masks["Heart"], np.zeros(patient.masks["Heart"].shape, bool),
                                           name="Heart")}
    assert pacs.store([_pacsai_rtstruct(patient, ours)], progress=False).ok
    assert len(pacs.search_series(PatientID=patient.patient_id, Modality="RTSTRUCT")) == 3  # with the prior's
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
    heart = next(r for r in metrics["structures"] if r["name"] == "Heart")
    assert heart["state"] == "present" and heart["drawn_by"]["kind"] == "planner"
    rt_inputs = {i["sop_instance_uids"][0] for i in metrics["provenance"]["inputs"] if i["modality"] == "RTSTRUCT"}
    assert rt_inputs == {str(patient.rtstruct.SOPInstanceUID), str(patient.prior_rtstruct.SOPInstanceUID)}
    assert len(result.pushed["objects"]) == 2  # SEG + SR (no PDF asked for)
    assert orthanc.password not in (tmp_path / "out" / "report.ipynb").read_text()
    assert np.isfinite(metrics["dvh"]["PTV"]["mean_gy"])


def _with_login(url: str, user: str, password: str) -> str:
    from urllib.parse import quote, urlsplit, urlunsplit

    parts = urlsplit(url)
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{parts.netloc}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _report_runs(uri: str) -> list:
    from pacsai import tracking

    client = tracking._mlflow().MlflowClient(tracking_uri=uri)
    experiments = client.search_experiments()
    return client.search_runs([e.experiment_id for e in experiments], "tags.`pacsai.kind` = 'report'")


@pytest.mark.slow
def test_two_reports_in_threads_keep_their_own_store_login_and_log(orthanc, clean_orthanc, store, patient,
                                                                    tmp_path):
    """Concurrent reports (a threaded Dask worker, a thread pool): one on Orthanc with its login in the URL, one
    on an embedded store, each with its own MLflow store. Neither waits for the other, and nothing crosses:
    the login reaches only its own kernel (this process's environment never holds it), each run lands in its own
    store, each kernel logs to its own file."""
    import os
    import threading
    import time

    from pacsai.pacs import connect
    from pacsai.report.run import run_report

    assert connect(orthanc.url, user=orthanc.user, password=orthanc.password).store(
        list(patient.datasets()), progress=False).ok
    _, root = store
    jobs = {
        "orthanc": _with_login(orthanc.url, orthanc.user, orthanc.password),
        "embedded": f"file://{root / 'pacs'}",
    }
    stores = {name: f"sqlite:///{tmp_path / name / 'mlruns' / 'mlflow.db'}" for name in jobs}
    environ_before = dict(os.environ)
    assert "PACSAI_PACS_USER" not in environ_before and "PACSAI_PACS_PASSWORD" not in environ_before
    results, errors, seen_env = {}, [], []
    done = threading.Event()

    def watch_environment() -> None:  # the login must never pass through this process's environment
        while not done.is_set():
            seen_env.append(os.environ.get("PACSAI_PACS_PASSWORD"))
            time.sleep(0.05)

    def one(name: str) -> None:
        try:
            params = validate_parameters(patient_id=patient.patient_id, pacs_url=jobs[name])
            results[name] = run_report(params, out_dir=tmp_path / name / "out", pdf=False, track=True,
                                       mlflow_uri=stores[name])
        except BaseException as err:  # re-raised below: an assert in a thread would be lost
            errors.append((name, err))

    watcher = threading.Thread(target=watch_environment)
    watcher.start()
    threads = [threading.Thread(target=one, args=(name,)) for name in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    done.set()
    watcher.join()
    assert not errors, errors
    assert set(seen_env) == {None} and dict(os.environ) == environ_before
    for name in jobs:
        result = results[name]
        runs = _report_runs(stores[name])
        assert [r.info.run_id for r in runs] == [result.mlflow_run_id]  # its own run, in its own store only
        log = result.out_dir / "report.log"
        assert log.is_file() and log != results["embedded" if name == "orthanc" else "orthanc"].out_dir / "report.log"
        metrics = json.loads(result.metrics.read_text())
        assert metrics["patient_id"] == patient.patient_id and np.isfinite(metrics["dvh"]["PTV"]["mean_gy"])
        for path in (result.notebook, result.html, result.metrics, log):
            assert orthanc.password not in path.read_text(), path  # the login went by the kernel's environment
    # the Orthanc report read Orthanc (the kernel logged in with the URL's login), the other the embedded store
    sources = {name: json.loads(results[name].metrics.read_text())["provenance"]["parameters"]["pacs_url"]
               for name in jobs}
    assert sources == {"orthanc": orthanc.url, "embedded": jobs["embedded"]}


@pytest.mark.slow
def test_plain_papermill_writes_nothing_into_the_working_folder(store, patient, tmp_path):
    """`papermill <template> out.ipynb -p patient_id ...` run by hand: metrics.json and structures.npz (which
    carry the real PatientID) go to reports/<PatientID>/, never into the working folder (a repository, say)."""
    import os

    from pacsai.notebooks import REPORT_TEMPLATE, template
    from pacsai.report.run import default_out_dir

    _, root = store
    papermill = Path(sys.executable).with_name("papermill")
    proc = subprocess.run(
        [str(papermill), str(template(REPORT_TEMPLATE)), "out.ipynb", "-k", "pacsai", "-p", "patient_id",
         patient.patient_id, "-p", "pacs_url", f"file://{root / 'pacs'}"],
        cwd=tmp_path, env={**os.environ, "PACSAI_CACHE_DIR": str(root / "cache")}, capture_output=True, text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.ipynb", "reports"]
    folder = tmp_path / default_out_dir(patient.patient_id)
    assert sorted(p.name for p in folder.iterdir()) == ["metrics.json", "structures.npz"]
    # and where a by-hand run did write into a repository's root, git ignores what it left
    repo = Path(__file__).resolve().parents[1]
    ignored = subprocess.run(["git", "-C", str(repo), "check-ignore", "metrics.json", "structures.npz",
                              "reports/x/report.html"], capture_output=True, text=True)
    assert ignored.stdout.split() == ["metrics.json", "structures.npz", "reports/x/report.html"]


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
    # "ok" says a report was written; its QA gate says whether to trust it
    metrics = json.loads((tmp_path / "reports" / good.patient_id / "metrics.json").read_text())
    qa = dict(zip(table.patient_id, table.qa_status.fillna("")))
    assert qa == {good.patient_id: metrics["qa"]["status"], ct_only.patient_id: ""}


def test_report_from_pacs_structures_never_imports_torch(store, patient):
    """A report whose structures come from the PACS does not import torch/monai."""
    _, root = store
    code = (
        "import sys; from pacsai.pacs import connect; from pacsai.report.params import validate_parameters; "
        "from pacsai.report.summary import build_summary; import pacsai.report.display, pacsai.viz; "
        f"p = connect('file://{root / 'pacs'}', cache_dir='{root / 'cache'}'); "
        f"s = build_summary(validate_parameters(patient_id='{patient.patient_id}'), pacs=p); "
        "assert s.dvh; bad = [m for m in ('torch', 'monai') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ------------------------------------------------------------------------------------ the QA gate end to end


@pytest.fixture(scope="module")
def ready(tmp_path_factory):
    """SYN-00013 as a planning department holds it: planning CT, planner RTSTRUCT, plan and plan dose, the prior
    study with its RTSTRUCT, and the TPS fusion's Spatial Registration (prior → planning CT)."""
    from pacsai.pacs import connect
    from pacsai.synthetic import make_patient

    root = tmp_path_factory.mktemp("ready-store")
    patient = make_patient(13, shape=SHAPE, spacing=SPACING)
    pacs = connect(f"file://{root / 'pacs'}", cache_dir=root / "cache")
    assert pacs.store(list(patient.datasets()), progress=False).ok
    return pacs, patient


def test_reference_structures_from_the_pacs_pass_the_gate(ready):
    """A gate that flags good contours teaches users to ignore it: the planner's contours of a synthetic patient
    (plan dose over the whole CT, prior with planner contours, registered) give PASS, with every required
    structure present and drawn by the planner, and a final response category."""
    from pacsai.report.summary import build_summary

    pacs, patient = ready
    s = build_summary(validate_parameters(patient_id=patient.patient_id), pacs=pacs)
    assert s.qa["status"] == "PASS", [r for r in s.qa["reasons"] if r["level"] != "note"]
    assert all(r["level"] == "note" for r in s.qa["reasons"])
    date = patient.ct[0].StudyDate
    for name in ("GTV", "Lung_L", "Lung_R", "Heart", "SpinalCord", "Esophagus"):
        assert s.states[name]["state"] == "present" and s.states[name]["required"], name
        assert s.states[name]["drawn_by"] == {
            "kind": "planner",
            "label": f"RTSTRUCT 'Ground-truth structures (synthetic)' {date[:4]}-{date[4:6]}-{date[6:]}",
        }, name
    assert s.states["PTV"]["drawn_by"]["kind"] == "derived"
    assert {c["status"] for c in s.constraints} <= {"pass", "fail"}
    assert s.coverage["state"] == "evaluated" and s.coverage["ptv_v95_pct"] > 95
    assert s.response["source"].startswith("planner contours on both studies")
    assert s.response["category"] == patient.truth["expected_response"] and s.response["final"] is True
    assert s.response["frames"]["registration"] is True
    reg = str(patient.registration.SOPInstanceUID)
    assert s.response["registration"].startswith(f"registration: DICOM REG {reg}")
    assert reg in {i["sop_instance_uids"][0] for i in s.provenance["inputs"] if i["modality"] == "REG"}
    metrics = s.to_dict()
    assert metrics["qa"]["status"] == "PASS" and metrics["headline"]["qa_status"] == "PASS"
    assert all("state" in row and "drawn_by" in row for row in metrics["structures"])


def test_a_prior_in_another_frame_makes_the_response_provisional(store, patient):
    """The generator's prior lies in another frame of reference without a registration: the response category
    is provisional and the gate says REVIEW for that reason alone (never a silent PASS, no error)."""
    from pacsai.report.summary import build_summary

    pacs, _ = store
    s = build_summary(validate_parameters(patient_id=patient.patient_id), pacs=pacs)
    codes = {r["code"] for r in s.qa["reasons"] if r["level"] != "note"}
    assert s.qa["status"] == "REVIEW" and codes == {"FRAME_UNREGISTERED"}
    assert s.response["final"] is False and s.response["category"] == patient.truth["expected_response"]
    assert {c["status"] for c in s.constraints} <= {"pass", "fail"}  # the plan dose covers every structure


def _planner_rtstruct(patient, masks, *, description: str = "Clinical structures"):
    """A structure set as a planning system writes it (not pacsai: another Manufacturer)."""
    from pacsai.imaging import write_rtstruct

    return write_rtstruct(masks, source=patient.ct, label="PLAN", series_description=description,
                          algorithm_name="Eclipse", algorithm_version="16.1", manufacturer="Varian Medical Systems",
                          series_number=3, uid_parts=("test-planner", description, tuple(masks)))


def _pacsai_rtstruct(patient, masks):
    """An RTSTRUCT pacsai wrote back earlier (the report's model contours)."""
    from pacsai.report.outputs import build_outputs

    objects = build_outputs(source_images=patient.ct, masks=masks, measurements={}, pdf_bytes=None,
                            model_info={"name": "pacsai-thorax", "version": "1", "run_id": "r"},
                            params={"patient_id": patient.patient_id}, include_seg=False)
    (rtstruct,) = [ds for ds in objects if ds.Modality == "RTSTRUCT"]
    return rtstruct


@pytest.fixture(scope="module")
def sources_store(tmp_path_factory):
    """SYN-00009: the planner's RTSTRUCT and a later one pacsai wrote (GTV drawn elsewhere, heart empty);
    SYN-00010: only pacsai's own RTSTRUCT; SYN-00011: the planner drew no GTV; SYN-00012: an empty GTV ROI."""
    import numpy as np

    from pacsai.imaging.geometry import like
    from pacsai.pacs import connect
    from pacsai.synthetic import make_patient

    root = tmp_path_factory.mktemp("sources-store")
    pacs = connect(f"file://{root / 'pacs'}", cache_dir=root / "cache")
    patients = {}
    for seed in (9, 10, 11, 12):
        p = make_patient(seed, shape=SHAPE, spacing=SPACING, with_prior=False, with_dose=seed != 10)
        patients[seed] = p
        planner_masks = dict(p.masks)
        if seed == 11:
            del planner_masks["GTV"]
        if seed == 12:
            planner_masks["GTV"] = like(p.masks["GTV"], np.zeros(p.masks["GTV"].shape, bool), name="GTV")
        objects = [*p.ct, *([p.rtdose] if p.rtdose is not None else [])]
        if seed in (9, 10):
            ours = dict(p.masks)
            ours["GTV"] = like(p.masks["GTV"], np.roll(p.masks["GTV"].values, 8, axis=2), name="GTV")
            ours["Heart"] = like(p.masks["Heart"], np.zeros(p.masks["Heart"].shape, bool), name="Heart")
            objects.append(_pacsai_rtstruct(p, ours))
        if seed != 10:
            objects.append(p.rtstruct if seed == 9 else _planner_rtstruct(p, planner_masks))
        assert pacs.store(objects, progress=False).ok
    return pacs, patients


def test_structures_from_the_pacs_are_the_planners_never_pacsais_own(sources_store):
    from pacsai import planning
    from pacsai.report.summary import build_summary

    pacs, patients = sources_store
    p = patients[9]
    series = pacs.search_series(PatientID=p.patient_id, Modality="RTSTRUCT")
    assert len(series) == 2 and "Manufacturer" not in series.columns  # QIDO cannot tell them apart
    s = build_summary(validate_parameters(patient_id=p.patient_id), pacs=pacs)
    rows = {r["name"]: r for r in s.structures}
    assert rows["Heart"]["state"] == "present"  # pacsai's RTSTRUCT has an empty heart
    assert rows["GTV"]["volume_cc"] == pytest.approx(planning.volume_cc(p.masks["GTV"]), rel=0.03)
    assert s.provenance["drawn_by"]["label"].startswith("RTSTRUCT 'Ground-truth structures (synthetic)'")
    rt_inputs = [i for i in s.provenance["inputs"] if i["modality"] == "RTSTRUCT"]
    assert [i["sop_instance_uids"] for i in rt_inputs] == [[str(p.rtstruct.SOPInstanceUID)]]
    with pytest.raises(ReportError, match="no RTSTRUCT drawn by a planner"):
        build_summary(validate_parameters(patient_id=patients[10].patient_id), pacs=pacs)


def test_planner_without_gtv_or_with_an_empty_one_fails_the_gate(sources_store):
    from pacsai.report.summary import build_summary

    pacs, patients = sources_store
    missing = build_summary(validate_parameters(patient_id=patients[11].patient_id), pacs=pacs)
    assert missing.qa["status"] == "FAIL"
    errors = {(r["code"], r["structure"]) for r in missing.qa["reasons"] if r["level"] == "error"}
    assert errors == {("MISSING_STRUCTURE", "GTV")}
    assert missing.states["GTV"]["state"] == "missing" and missing.states["PTV"]["state"] == "missing"
    date = patients[11].ct[0].StudyDate
    assert missing.states["Heart"]["drawn_by"] == {
        "kind": "planner", "label": f"RTSTRUCT 'Clinical structures' {date[:4]}-{date[4:6]}-{date[6:]}"}
    assert missing.coverage["state"] == "not evaluable"
    lungs = [c for c in missing.constraints if c["structure"] == "Lungs-GTV"]
    assert lungs and all(c["status"] == "not evaluable" and c["value"] is None for c in lungs)
    assert lungs[0]["reason"].startswith("not evaluable — ") and "'GTV'" in lungs[0]["reason"]
    heart = [c for c in missing.constraints if c["structure"] == "Heart"]
    # the organs themselves are evaluated (unreliable here only for the generator's short dose grid)
    assert heart and all(c["status"] in ("pass", "fail", "unreliable") for c in heart)
    assert any(r["state"] == "missing" and r["name"] == "GTV" for r in missing.structures)

    empty = build_summary(validate_parameters(patient_id=patients[12].patient_id), pacs=pacs)
    assert empty.qa["status"] == "FAIL"
    (reason,) = [r for r in empty.qa["reasons"] if r["level"] == "error"]
    assert (reason["code"], reason["structure"]) == ("EMPTY_STRUCTURE", "GTV")
    assert "the ROI has no contour" in reason["message"]
    headline = empty.headline()
    assert headline["qa_status"] == "FAIL"
    lungs = [line for line in headline["constraints_not_evaluable"] if line.startswith("Lungs-GTV")]
    assert len(lungs) == 2 and all("GTV is empty" in line for line in lungs)


# ------------------------------------------------------------------------- the model path: gate and push


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The demo experiment trained once per session with --smoke (tests/test_learning_train.py)."""
    from tests.test_learning_train import MODEL_NAME, smoke_model

    info = smoke_model(tmp_path_factory)
    return {**info, "model_uri": f"models:/{MODEL_NAME}/{info['version']}"}


def _without_tumour(patient):
    """The planning study with the tumour painted out of the CT (lung density there) and no GTV in the planner's
    RTSTRUCT: a model can find nothing, and the reference has nothing to compare."""
    masks = {k: v for k, v in patient.masks.items() if k != "GTV"}
    slices = _paint_out(patient.ct, patient.masks["GTV"])
    return [*slices, _planner_rtstruct(patient, masks, description="Plan without GTV"), patient.rtdose]


def _paint_out(ct, mask):
    """CT slices with lung density (−850 HU) where ``mask`` is: the tumour removed from the image."""
    inside = np.asarray(mask.values, bool)
    slices = []
    for k, ds in enumerate(ct):  # CT slices run inferior → superior, as the mask's z
        ds = copy.deepcopy(ds)
        pixels = ds.pixel_array.copy()
        pixels[inside[k]] = int(round((-850.0 - float(ds.RescaleIntercept)) / float(ds.RescaleSlope)))
        ds.PixelData = pixels.tobytes()
        slices.append(ds)
    return slices


def test_model_path_without_tumour_fails_and_pushes_nothing_of_the_model(smoke, tmp_path, monkeypatch):
    """The model finds no GTV: FAIL with EMPTY_STRUCTURE; --push stores only the PDF (it shows the FAIL), and
    --push-anyway stores SEG, RTSTRUCT and an SR that says it was pushed despite the FAIL."""
    from pacsai.imaging.dicomio import load_datasets
    from pacsai.pacs import connect
    from pacsai.report.render import chromium
    from pacsai.report.run import push_results, run_report
    from pacsai.report.sr import PUSHED_DESPITE_FAIL, read_qa
    from pacsai.synthetic import make_patient

    monkeypatch.chdir(smoke["work"])  # the smoke model's MLflow store
    patient = make_patient(14, shape=SHAPE, spacing=SPACING, with_prior=False)
    url = f"file://{tmp_path / 'pacs'}"
    pacs = connect(url, cache_dir=tmp_path / "cache")
    assert pacs.store(_without_tumour(patient), progress=False).ok
    params = validate_parameters(patient_id=patient.patient_id, pacs_url=url, structures_from="model",
                                 model_uri=smoke["model_uri"])
    before = set(pacs.search_instances(PatientID=patient.patient_id).SOPInstanceUID)
    result = run_report(params, out_dir=tmp_path / "out", push=True, track=False, pdf=bool(chromium()))
    metrics = json.loads(result.metrics.read_text())
    assert metrics["qa"]["status"] == "FAIL"
    errors = {(r["code"], r["structure"]) for r in metrics["qa"]["reasons"] if r["level"] == "error"}
    assert ("EMPTY_STRUCTURE", "GTV") in errors
    assert metrics["structure_states"]["GTV"]["drawn_by"]["kind"] == "model"
    gtv = next(r for r in metrics["structures"] if r["name"] == "GTV")
    assert gtv["state"] == "empty" and "uncertainty" in gtv  # an empty mask is never "certain"
    assert gtv["uncertainty"] is None or gtv["uncertainty"] >= 0.05
    assert metrics["headline"]["coverage"]["state"] == "not evaluable"
    html = (tmp_path / "out" / "report.html").read_text()
    assert html.index("QA: FAIL") < html.index("Key images")  # the gate comes first
    added = set(pacs.search_instances(PatientID=patient.patient_id).SOPInstanceUID) - before
    assert result.pushed["withheld"] == ["SEG", "RTSTRUCT", "SR"]
    kept = pacs.search_instances(PatientID=patient.patient_id)
    assert set(kept[kept.SOPInstanceUID.isin(added)].Modality) <= {"DOC"}  # the PDF at most, nothing of the model
    assert len(added) == (1 if chromium() else 0)

    forced = push_results(params, result.out_dir, metrics, result.pdf, push_anyway=True)
    assert forced["withheld"] == [] and not forced["failed"]
    found = pacs.search_instances(PatientID=patient.patient_id)
    new = found[~found.SOPInstanceUID.isin(before | added)]
    assert set(new.Modality) == {"SEG", "RTSTRUCT", "SR"}
    sr_row = new[new.Modality == "SR"].iloc[0]
    (sr,) = load_datasets(pacs.retrieve_series(sr_row.StudyInstanceUID, sr_row.SeriesInstanceUID, progress=False))
    qa = read_qa(sr)
    assert qa["status"] == "FAIL" and qa["statements"][-1] == PUSHED_DESPITE_FAIL
    assert any(line.startswith("ERROR EMPTY_STRUCTURE: GTV is empty") for line in qa["statements"])
    from pacsai.report.sr import read_drawn_by

    assert set(read_drawn_by(sr).values()) == {f"model pacsai-thorax v{smoke['version']}"}


def test_model_path_segments_before_the_kernel_which_never_imports_torch(smoke, store, patient, tmp_path,
                                                                        monkeypatch):
    """`pacsai report` with a model reads and segments in its own process; what the kernel then does with the
    hand-off file (summary, display) imports neither torch nor MONAI, and gives the model's structures."""
    from pacsai.report import handoff

    monkeypatch.chdir(smoke["work"])  # the smoke model's MLflow store
    pacs, root = store
    params = validate_parameters(patient_id=patient.patient_id, pacs_url=f"file://{root / 'pacs'}",
                                 structures_from="model", model_uri=smoke["model_uri"])
    path = handoff.gather_to_file(params, pacs, tmp_path)
    code = (
        "import sys, json; from pathlib import Path; from pacsai.report.params import validate_parameters; "
        "from pacsai.report.handoff import summary_from_file; import pacsai.report.display, pacsai.viz; "
        f"p = validate_parameters(**json.loads({json.dumps(json.dumps(params.model_dump(mode='json')))})); "
        f"s = summary_from_file(Path({str(path)!r}), p); "
        "assert s.states['Lung_L']['drawn_by']['kind'] == 'model', s.states; "
        "assert s.reference, 'no reference'; "  # (the smoke model may draw nothing: no DVH asserted)
        "bad = [m for m in ('torch', 'monai') if m in sys.modules]; assert not bad, bad"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from pacsai.errors import ReportError as Refused

    other = validate_parameters(patient_id="SYN-00008", pacs_url=params.pacs_url, structures_from="model",
                                model_uri=smoke["model_uri"])
    with pytest.raises(Refused, match="holds patient"):
        handoff.summary_from_file(path, other)
    handoff.remove(tmp_path)
    assert not path.exists()


def _seed_real(pacs, data: Path) -> dict[str, str]:
    """The shared real data that is not a thorax CT: the soft-tissue sarcoma MR (+ its RTSTRUCT) and the
    abdominal J2K CT, whose Patient/Study/Series/SOP UIDs are empty strings (new ones are given here)."""
    import pydicom
    from pydicom.uid import generate_uid

    mr = data / "tcia_sts001_mr_t2_rtstruct"
    j2k = data / "totalsegmentator_ct_j2k" / "dicom"
    if not mr.is_dir() or not j2k.is_dir():
        pytest.skip(f"real data not found under {data} (set PACSAI_TEST_DATA)")
    assert pacs.store([*sorted((mr / "mr_t2").iterdir()), *sorted((mr / "rtstruct").iterdir())],
                      progress=False).ok
    study, series = generate_uid(), generate_uid()
    slices = []
    for path in sorted(j2k.iterdir()):
        ds = pydicom.dcmread(path)
        ds.PatientID, ds.PatientName = "TSEG-J2K", "TotalSegmentator^Example"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        slices.append(ds)
    assert pacs.store(slices, progress=False).ok
    return {"MR": str(pydicom.dcmread(sorted((mr / "mr_t2").iterdir())[0]).PatientID), "J2K": "TSEG-J2K"}


def test_model_path_on_real_non_thorax_series_fails_on_its_domain(smoke, test_data, tmp_path, monkeypatch):
    """The thoracic model on an MR and on an abdominal CT: FAIL for the modality / body region (the input is
    unlike anything it was trained on), and --push stores none of its contours and no SR."""
    from pacsai.pacs import connect
    from pacsai.report.run import push_results
    from pacsai.report.summary import build_summary

    monkeypatch.chdir(smoke["work"])
    url = f"file://{tmp_path / 'pacs'}"
    pacs = connect(url, cache_dir=tmp_path / "cache")
    patients = _seed_real(pacs, test_data)
    expected = {"MR": "DOMAIN_MODALITY", "J2K": "DOMAIN_BODY_REGION"}
    for kind, patient_id in patients.items():
        params = validate_parameters(patient_id=patient_id, pacs_url=url, structures_from="model",
                                     model_uri=smoke["model_uri"])
        s = build_summary(params, pacs=pacs)
        codes = {r["code"] for r in s.qa["reasons"] if r["level"] == "error"}
        assert s.qa["status"] == "FAIL" and expected[kind] in codes, (kind, s.qa)
        assert s.provenance["image_modality"] == ("MR" if kind == "MR" else "CT")
        assert s.constraints == [] and s.coverage["state"] == "no dose"  # these studies hold no plan
        folder = tmp_path / kind
        metrics = json.loads(s.save(folder).read_text())
        before = len(pacs.search_instances(PatientID=patient_id))
        pushed = push_results(params, folder, metrics, None)
        assert pushed["objects"] == [] and pushed["withheld"] == ["SEG", "RTSTRUCT", "SR"]
        assert len(pacs.search_instances(PatientID=patient_id)) == before
    # the sarcoma MR's planner contours (GTV_Mass, GTV_Edema) are the reference; its "GTV" is missing
    mr = build_summary(validate_parameters(patient_id=patients["MR"], pacs_url=url, structures_from="model",
                                           model_uri=smoke["model_uri"]), pacs=pacs)
    assert mr.reference["drawn_by"]["kind"] == "planner"
    assert mr.reference["states"]["GTV"]["state"] == "missing"


def test_model_verdicts_that_the_reference_contradicts_are_review_with_both_values(ready):
    """Model contours that move the cord into the beam and shrink the GTV: every verdict that differs from the
    one computed on the planner's contours is REVIEW with both values; the response uses the planner's contours
    of both studies; the model-vs-reference table measures the difference (Dice, HD95, Δdose)."""
    from pacsai.imaging.geometry import like
    from pacsai.report.inputs import DrawnBy, StudyData, gather
    from pacsai.report.summary import summarize

    pacs, patient = ready
    params = validate_parameters(patient_id=patient.patient_id)
    planner = gather(params, pacs=pacs)
    reference = planner.current
    ptv_centre = np.argwhere(patient.masks["GTV"].values).mean(axis=0).round().astype(int)
    cord = np.zeros(patient.masks["SpinalCord"].shape, bool)
    cord[:, ptv_centre[1] - 1 : ptv_centre[1] + 2, ptv_centre[2] - 1 : ptv_centre[2] + 2] = True  # through the PTV
    model_masks = dict(reference.structures)
    model_masks["SpinalCord"] = like(reference.structures["SpinalCord"], cord, name="SpinalCord")
    model_masks["Esophagus"] = like(reference.structures["Esophagus"], np.zeros(cord.shape, bool), name="Esophagus")
    model = DrawnBy("model", "model hand-made v0")
    current = StudyData(study_instance_uid=reference.study_instance_uid, study_date=reference.study_date,
                        image=reference.image, structures=model_masks, structures_source=model.label,
                        inputs=[r for r in reference.inputs if r.modality != "RTSTRUCT"], drawn_by=model,
                        offered=tuple(model_masks))
    data = type(planner)(
        patient_id=planner.patient_id, current=current, dose=planner.dose, dose_note="", prior=planner.prior,
        prior_note="", model={"name": "hand-made", "version": "0"}, reference=reference,
        reference_prior=planner.prior, response_source="planner contours on both studies (reference)",
        model_domain={}, input_stats={}, dose_header=planner.dose_header,
    )
    s = summarize(data, params.model_copy(update={"structures_from": "model", "model_uri": "models:/x/0"}))
    cord_row = next(c for c in s.constraints if c["structure"] == "SpinalCord")
    assert cord_row["status"] == "review" and cord_row["model_status"] == "fail" and cord_row["model_value"] > 50
    assert cord_row["reference_status"] == "pass" and cord_row["reference_value"] < 50
    (disagree,) = [r for r in s.qa["reasons"] if r["code"] == "MODEL_REFERENCE_DISAGREE"]
    assert disagree["level"] == "review" and disagree["values"]["model"] == "fail"
    assert disagree["values"]["reference"] == "pass"
    same = [c for c in s.constraints if c["structure"] == "Heart"]
    assert all(c["status"] == c["reference_status"] and c["value"] == c["reference_value"] for c in same)
    assert s.headline()["constraints_review"][0].startswith("SpinalCord D0.03cc")
    # the model found no oesophagus: not evaluable (FAIL of the gate), with what the planner's contours say
    oesophagus = next(c for c in s.constraints if c["structure"] == "Esophagus")
    assert oesophagus["status"] == "not evaluable" and oesophagus["reference_status"] in ("pass", "fail")
    (line,) = [x for x in s.headline()["constraints_not_evaluable"] if x.startswith("Esophagus")]
    assert f"on the reference contours: {oesophagus['reference_status'].upper()}" in line
    assert s.qa["status"] == "FAIL"
    assert s.response["drawn_by_now"]["kind"] == "planner" and s.response["drawn_by_prior"]["kind"] == "planner"
    rows = {a["structure"]: a for a in s.agreement}
    assert rows["Heart"]["dice"] == pytest.approx(1.0) and rows["SpinalCord"]["dice"] == pytest.approx(0.0)
    assert s.reference["drawn_by"]["kind"] == "planner"


def test_model_path_without_planner_contours_runs_the_model_on_the_prior_too(smoke, tmp_path, monkeypatch):
    """No planner RTSTRUCT in either study: the model segments both (and the report says so); its empty GTV is
    never a complete response but NE with an error."""
    from pacsai.pacs import connect
    from pacsai.report.summary import build_summary
    from pacsai.synthetic import make_patient

    monkeypatch.chdir(smoke["work"])
    patient = make_patient(16, shape=SHAPE, spacing=SPACING, with_dose=False)
    pacs = connect(f"file://{tmp_path / 'pacs'}", cache_dir=tmp_path / "cache")
    images = [*_paint_out(patient.ct, patient.masks["GTV"]), *_paint_out(patient.prior_ct, patient.prior_masks["GTV"])]
    assert pacs.store(images, progress=False).ok
    s = build_summary(validate_parameters(patient_id=patient.patient_id, structures_from="model",
                                          model_uri=smoke["model_uri"]), pacs=pacs)
    label = f"model pacsai-thorax v{smoke['version']}"
    assert s.response["source"] == f"{label} on both studies (the model was run on the prior study too)"
    assert s.response["drawn_by_now"]["label"] == s.response["drawn_by_prior"]["label"] == label
    assert not s.reference and s.agreement == []
    assert s.states["GTV"]["state"] == "empty"  # no tumour in the images
    assert s.response["category"] == "NE" and s.response["final"] is False
    codes = {r["code"] for r in s.qa["reasons"] if r["level"] == "error"}
    assert "EMPTY_MODEL_SEGMENTATION" in codes and "EMPTY_STRUCTURE" in codes and s.qa["status"] == "FAIL"


def test_a_fraction_dose_is_refused_by_name(tmp_path):
    """An RTDOSE of one fraction (DoseSummationType FRACTION) is not the plan: FAIL with DOSE_NOT_PLAN_TOTAL
    naming it, every constraint and the coverage not evaluable — never a PASS on 2 Gy."""
    from pacsai.pacs import connect
    from pacsai.report.summary import build_summary
    from pacsai.synthetic import make_patient
    from pacsai.uids import derive_uid

    patient = make_patient(17, shape=SHAPE, spacing=SPACING, with_prior=False)
    fraction = copy.deepcopy(patient.rtdose)
    fraction.DoseSummationType = "FRACTION"
    fraction.SOPInstanceUID = fraction.file_meta.MediaStorageSOPInstanceUID = derive_uid("fraction", 17)
    pacs = connect(f"file://{tmp_path / 'pacs'}", cache_dir=tmp_path / "cache")
    assert pacs.store([*patient.ct, patient.rtstruct, fraction], progress=False).ok
    s = build_summary(validate_parameters(patient_id=patient.patient_id), pacs=pacs)
    (reason,) = [r for r in s.qa["reasons"] if r["level"] == "error"]
    assert s.qa["status"] == "FAIL" and reason["code"] == "DOSE_NOT_PLAN_TOTAL"
    assert "FRACTION" in reason["message"] and str(fraction.SOPInstanceUID) in reason["message"]
    assert s.constraints and {c["status"] for c in s.constraints} == {"not evaluable"}
    assert s.coverage["state"] == "not evaluable" and s.dvh == {}
    assert all(c["reason"].startswith("not evaluable — ") for c in s.constraints)


def test_report_kernel_blas_is_single_threaded_unless_the_user_chose(monkeypatch):
    from pacsai.report.run import BLAS_THREAD_VARIABLES, report_environment

    for name in BLAS_THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    env = report_environment(mlflow_uri="sqlite:///x.db")
    assert {name: env[name] for name in BLAS_THREAD_VARIABLES} == dict.fromkeys(BLAS_THREAD_VARIABLES, "1")
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "4")
    assert report_environment(mlflow_uri="sqlite:///x.db")["OPENBLAS_NUM_THREADS"] == "4"


def test_model_path_gather_error_is_the_reports_error_even_with_the_kernel_already_started(smoke, store, patient,
                                                                                          tmp_path, monkeypatch):
    """The kernel starts while the inputs are gathered; when gathering fails (here: no such model), the report
    fails with the gatherer's error, not the kernel's echo of it, and leaves no hand-off file or marker behind."""
    from pacsai.errors import PacsaiError
    from pacsai.report.run import run_report

    monkeypatch.chdir(smoke["work"])
    _, root = store
    params = validate_parameters(patient_id=patient.patient_id, pacs_url=f"file://{root / 'pacs'}",
                                 structures_from="model", model_uri="models:/no-such-model@champion")
    out = tmp_path / "out"
    with pytest.raises(PacsaiError, match="no-such-model") as caught:
        run_report(params, out_dir=out, track=False, pdf=False)
    assert "report notebook failed" not in str(caught.value)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".inputs")) == []
