"""``pacsai watch``: rules, state, and the service itself against a real Orthanc and the embedded store.

The service runs as ``python -m pacsai watch`` in a subprocess (as in production, so that it can be killed);
studies are synthetic patients pushed while it runs. Structures come from the PACS (fast, no torch) except in the
champion test, where the model is the point. Short stability windows keep the tests short; they are real waits.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pacsai.errors import ConfigError
from pacsai.watch.rules import StudyFacts, Trigger, WatchRules, is_pacsai_output, load_rules, match, parse_rules
from pacsai.watch.state import open_state, redact

SHAPE = (40, 128, 128)
SPACING = (3.2, 3.2, 4.0)  # the smallest thorax the generator accepts: a report in seconds
PDF_SERIES, SR_SERIES = 903, 902
GAP_S = 20  # between the two halves of a study (as the issue asks)


# ---------------------------------------------------------------------------------------------------- rules


def test_rules_reject_an_unknown_key_by_name(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text("triggers:\n  - modality: CT\n    wiht: [RTDOSE]\npussh: true\n")
    with pytest.raises(ConfigError) as err:
        load_rules(path)
    assert "'triggers.0.wiht'" in str(err.value) and "'pussh'" in str(err.value) and str(path) in str(err.value)
    path.write_text("report:\n  structures_from: model\n")
    with pytest.raises(ConfigError, match="needs model"):
        load_rules(path)
    path.write_text("push: false\npush_anyway: true\n")
    with pytest.raises(ConfigError, match="push_anyway"):
        load_rules(path)
    # the CLI says it in one line and exits 1, before touching any PACS
    path.write_text("stable_secs: 3\n")
    proc = subprocess.run([sys.executable, "-m", "pacsai", "watch", "--rules", str(path), "--pacs",
                           f"file://{tmp_path / 'pacs'}"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 1 and "unknown key 'stable_secs'" in proc.stderr


def test_rules_match_hand_built_studies():
    rules = parse_rules({"triggers": [
        {"name": "dose", "modality": "CT", "with": ["RTDOSE"]},
        {"name": "prior", "modality": "CT", "prior": True},
    ]})
    ct_dose = StudyFacts(frozenset({"CT", "RTSTRUCT", "RTDOSE", "RTPLAN"}), "20240301", "Thorax")
    assert match(rules, ct_dose) == ("dose", "")
    earlier = StudyFacts(frozenset({"CT"}), "20240301", "", others=(("20231201", frozenset({"CT"})),))
    assert match(rules, earlier) == ("prior", "")
    later_only = StudyFacts(frozenset({"CT"}), "20240301", "", others=(("20240601", frozenset({"CT"})),))
    trigger, why = match(rules, later_only)
    assert trigger is None
    assert why == ("dose: no RTDOSE series (modalities: CT); "
                   "prior: no earlier study of the patient with a CT series")
    mr = StudyFacts(frozenset({"MR"}), "20240301", "")
    assert "no CT series (modalities: MR)" in match(rules, mr)[1]
    only_desc = WatchRules(triggers=(Trigger(name="d", modality="CT", study_description="*thorax*"),))
    assert match(only_desc, StudyFacts(frozenset({"CT"}), "", "RT Thorax plan"))[0] == "d"
    assert "does not match" in match(only_desc, StudyFacts(frozenset({"CT"}), "", "Head"))[1]
    assert is_pacsai_output(903, "pacsai planning report (research use only)")
    assert not is_pacsai_output(903, "Planner's dose") and not is_pacsai_output(2, "pacsai x")
    assert is_pacsai_output(902, None, "SR") and not is_pacsai_output(902, None, "CT")  # no description (embedded)
    assert rules.retry.delay(1) == 30 and rules.retry.delay(3) == 120 and rules.retry.delay(20) == 900


_PREWARM_CHECK = """
import os, sys, threading
before = set(os.listdir("/proc/self/fd"))
from pacsai.watch.job import prewarm
prewarm(model=False)
after = set(os.listdir("/proc/self/fd"))
from highdicom import _standard_utils as tables
print({
    "report_code": all(m in sys.modules for m in ("pacsai.report.run", "pacsai.report.outputs", "pacsai.report.sr",
                                                  "papermill", "nbconvert.exporters.html")),
    "tables": tables.get_module_attribute_map.cache_info().currsize,
    "torch": "torch" in sys.modules,
    "rfc3987_grammar": "rfc3987_syntax" in sys.modules,
    "threads": threading.active_count(),
    "new_fds": len(after - before),
})
"""


def test_prewarm_loads_the_report_code_and_tables_and_opens_nothing():
    """What the watch loads before forking reports: code and static tables only (nothing that may not cross fork)."""
    out = subprocess.run([sys.executable, "-c", _PREWARM_CHECK], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    facts = eval(out.strip().splitlines()[-1])  # noqa: S307 - our own dict literal, printed just above
    assert facts == {"report_code": True, "tables": 1, "torch": False, "rfc3987_grammar": False, "threads": 1,
                     "new_fds": 0}


def test_reports_side_by_side_share_the_cpus():
    from pacsai.watch.service import _threads_per_report

    cpus = len(os.sched_getaffinity(0))
    assert _threads_per_report(1) == cpus  # alone: all of them
    assert _threads_per_report(2) == max(1, cpus // 2)
    assert _threads_per_report(cpus * 4) == 1  # never 0
    assert _threads_per_report(0) == cpus


def test_state_waits_for_stability_recovers_and_locks(tmp_path):
    state = open_state(tmp_path / "s.sqlite")
    assert oct(os.stat(tmp_path / "s.sqlite").st_mode & 0o777) == "0o600"
    state.lock()
    state.noticed("1.2.3", key="s-a", patient_id="PAT", patient="p-x", instances=10, now=100.0)
    assert state.ready(now=104.0, stable_seconds=5, limit=5) == []
    assert [r.key for r in state.ready(now=105.0, stable_seconds=5, limit=5)] == ["s-a"]
    state.noticed("1.2.3", key="s-a", patient_id="PAT", patient="p-x", instances=10, now=104.0)  # same count
    assert state.get("1.2.3").last_change == 100.0
    state.noticed("1.2.3", key="s-a", patient_id="PAT", patient="p-x", instances=12, now=104.0)  # more arrived
    assert state.ready(now=105.0, stable_seconds=5, limit=5) == []
    state.update("1.2.3", status="running")
    assert state.recover() == 1 and state.get("1.2.3").status == "waiting"
    with pytest.raises(ConfigError, match="another pacsai watch"):
        open_state(tmp_path / "s.sqlite").lock()
    state.bind_pacs("http://a/dicom-web")
    with pytest.raises(ConfigError, match="belongs to the PACS"):
        state.bind_pacs("http://b/dicom-web")
    assert redact("no studies of patient 'PAT' in 1.2.3", {"PAT": "p-x", "1.2.3": "s-a"}) == \
        "no studies of patient 'p-x' in s-a"
    state.close()


# ---------------------------------------------------------------------------------------------------- helpers


def _patient(seed: int):
    from pacsai.synthetic import make_patient

    return make_patient(seed, shape=SHAPE, spacing=SPACING)


def _wait(what: str, condition: Callable[[], object], timeout: float, proc: subprocess.Popen | None = None,
          log: Path | None = None) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"watch exited with {proc.returncode} while waiting for {what}:\n{_tail(log)}")
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}:\n{_tail(log)}")


def _tail(log: Path | None) -> str:
    return log.read_text(errors="replace")[-4000:] if log is not None and log.is_file() else ""


def _rows(state: Path) -> dict[str, dict]:
    if not state.is_file():
        return {}
    with sqlite3.connect(state) as conn:
        conn.row_factory = sqlite3.Row
        return {r["study_uid"]: dict(r) for r in conn.execute("SELECT * FROM studies")}


def _outputs(pacs, study_uid: str) -> dict[int, int]:
    """{SeriesNumber: instances} of pacsai's output series (900-903) in the study."""
    series = pacs.search_series(StudyInstanceUID=study_uid)
    return {int(r.SeriesNumber): int(r.NumberOfSeriesRelatedInstances) for r in series.itertuples()
            if is_pacsai_output(r.SeriesNumber, getattr(r, "SeriesDescription", None), r.Modality)}


def _write_rules(path: Path, **extra: object) -> Path:
    rules = {"report": {"track": False}, "retry": {"max_attempts": 3, "backoff_seconds": 2}, **extra}
    path.write_text(json.dumps(rules))  # JSON is YAML
    return path


class Watch:
    """``pacsai watch`` in a subprocess, its log in a file."""

    def __init__(self, tmp: Path, url: str, env: dict[str, str], *args: str, name: str = "watch") -> None:
        self.tmp, self.url, self.env = tmp, url, env
        self.state = tmp / "state.sqlite"
        self.log = tmp / f"{name}.log"
        self.args = ["--pacs", url, "--state", str(self.state), "--out", str(tmp / "reports"), "--poll-seconds",
                     "0.5", "--health-seconds", "2", *args]
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen([sys.executable, "-m", "pacsai", "watch", *self.args], cwd=tmp, env=env,
                                         stdout=fh, stderr=subprocess.STDOUT)
        _wait("the watch to start", lambda: "watching" in self.log.read_text(errors="replace"), 60, self.proc,
              self.log)

    def status(self) -> str:
        proc = subprocess.run([sys.executable, "-m", "pacsai", "watch", *self.args, "--status"], cwd=self.tmp,
                              env=self.env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    def wait_done(self, study_uid: str, timeout: float = 150) -> dict:
        return _wait("a report", lambda: (_rows(self.state).get(study_uid) or {}).get("status") == "done"
                     and _rows(self.state)[study_uid], timeout, self.proc, self.log)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)


def _env(server=None) -> dict[str, str]:
    env = dict(os.environ)
    if server is not None:
        env.update(PACSAI_PACS_USER=server.user, PACSAI_PACS_PASSWORD=server.password)
    return env


def _no_identifiers(text: str, patients) -> None:
    for p in patients:
        for value in (p.patient_id, str(p.ct[0].PatientName), str(p.ct[0].StudyInstanceUID)):
            assert value not in text, f"{value!r} in the watch's output"


# ---------------------------------------------------------------------------------------------------- Orthanc


def test_orthanc_study_in_two_halves_and_non_matching(clean_orthanc, tmp_path):
    """A study pushed in two halves GAP_S apart while watch runs gets its outputs, from one report started after
    the second half (stable_seconds just above the gap: a real wait, kept short); its own outputs arriving start
    no other report; the prior study (no RTDOSE) is ignored and --status says why."""
    from pacsai.pacs import connect

    server = clean_orthanc
    pacs = connect(server.url, user=server.user, password=server.password, cache_dir=tmp_path / "c", retries=1)
    patient = _patient(32)
    watch = Watch(tmp_path, server.url, _env(server), "--rules", str(_write_rules(tmp_path / "r.yaml")),
                  "--workers", "2", "--stable-seconds", str(GAP_S + 3))
    try:
        assert "mode orthanc-changes" in watch.log.read_text()
        first, second = patient.ct[: len(patient.ct) // 2], patient.ct[len(patient.ct) // 2:]
        assert pacs.store(first, progress=False).ok
        time.sleep(GAP_S)
        assert "health: mode orthanc-changes, PACS ok" in watch.log.read_text()  # every --health-seconds
        rest = [*second, patient.rtstruct, patient.rtplan, patient.rtdose, *patient.prior_ct, patient.prior_rtstruct]
        assert pacs.store(rest, progress=False).ok
        second_half_at = time.time()
        uid = str(patient.ct[0].StudyInstanceUID)
        row = watch.wait_done(uid)
        # one report, started after the second half arrived, on the whole study
        assert row["runs"] == 1 and row["attempts"] == 1 and row["started"] > second_half_at
        assert row["n_instances"] == len(patient.ct) + 3 and row["qa_status"] in ("PASS", "REVIEW", "FAIL")
        time.sleep(GAP_S + 5)  # its own outputs arrive as changes and become stable: no other report
        rows = _rows(watch.state)
        assert rows[uid]["runs"] == 1 and rows[uid]["status"] == "done"
        outputs = _outputs(pacs, uid)
        assert outputs.get(PDF_SERIES) == 1 and all(n == 1 for n in outputs.values())
        prior_uid = str(patient.prior_ct[0].StudyInstanceUID)
        assert rows[prior_uid]["status"] == "ignored" and rows[prior_uid]["runs"] == 0
        status = watch.status()
        assert f"{rows[prior_uid]['key']}  patient {rows[prior_uid]['patient']}  ignored: no trigger matched: " \
            "planning-ct-with-dose: no RTDOSE series (modalities: CT, RTSTRUCT)" in status
        assert f"{rows[uid]['key']}  patient {rows[uid]['patient']}  done" in status
        assert "latency (last change seen → outputs stored) over 1 report(s)" in status
        _no_identifiers(status + watch.log.read_text(), [patient])
    finally:
        assert watch.stop() == 0
    assert not list((tmp_path / "reports").rglob("*.partial"))


def test_orthanc_outage_watch_keeps_running_and_catches_up(tmp_path):
    """Orthanc stops with a study still inside its stable window, and comes back: the watch stays up, reports
    that study once, and the study it had already handled (ignored) is not looked at again."""
    from pacsai.pacs import connect
    from pacsai.pacs.orthanc import free_port, orthanc_available, start_orthanc

    reason = orthanc_available()
    if reason:
        pytest.skip(reason)
    port = free_port()
    server = start_orthanc(tmp_path / "orthanc", port=port, user="pacsai", password="outage-pw")
    pacs = connect(server.url, user=server.user, password=server.password, cache_dir=tmp_path / "c", retries=0)
    patient = _patient(33)
    prior_uid, uid = str(patient.prior_ct[0].StudyInstanceUID), str(patient.ct[0].StudyInstanceUID)
    watch = Watch(tmp_path, server.url, _env(server), "--rules", str(_write_rules(tmp_path / "r.yaml")),
                  "--stable-seconds", "4")
    try:
        assert pacs.store([*patient.prior_ct, patient.prior_rtstruct], progress=False).ok
        _wait("the prior study to be ignored", lambda: (_rows(watch.state).get(prior_uid) or {}).get("status")
              == "ignored", 60, watch.proc, watch.log)
        handled = _rows(watch.state)[prior_uid]
        assert pacs.store([*patient.ct, patient.rtstruct, patient.rtplan, patient.rtdose], progress=False).ok
        server.stop()
        time.sleep(30)  # a 30 s outage, as the issue asks
        assert watch.proc.poll() is None
        assert "the PACS is unreachable" in watch.log.read_text()
        server = start_orthanc(tmp_path / "orthanc", port=port, user="pacsai", password="outage-pw")
        watch.wait_done(uid)
        time.sleep(5)
        rows = _rows(watch.state)
        assert "the PACS answers again" in watch.log.read_text()
        assert rows[uid]["runs"] == 1 and rows[uid]["status"] == "done"
        assert rows[prior_uid] == handled  # its changes were not read again after the restart
        outputs = _outputs(pacs, uid)
        assert outputs.get(PDF_SERIES) == 1 and all(n == 1 for n in outputs.values())
    finally:
        assert watch.stop() == 0
        server.stop()


def test_sigkill_mid_report_then_restart_reports_exactly_once(clean_orthanc, tmp_path):
    from pacsai.pacs import connect

    server = clean_orthanc
    pacs = connect(server.url, user=server.user, password=server.password, cache_dir=tmp_path / "c", retries=1)
    patient = _patient(35)
    uid = str(patient.ct[0].StudyInstanceUID)
    rules = str(_write_rules(tmp_path / "r.yaml"))
    watch = Watch(tmp_path, server.url, _env(server), "--rules", rules, "--stable-seconds", "2")
    assert pacs.store(list(patient.datasets()), progress=False).ok
    _wait("the report to start", lambda: (_rows(watch.state).get(uid) or {}).get("status") == "running", 60,
          watch.proc, watch.log)
    time.sleep(4)  # inside the report: the kernel is running
    import psutil

    jobs = psutil.Process(watch.proc.pid).children()
    assert jobs, "no report process under the watch"
    watch.proc.send_signal(signal.SIGKILL)
    watch.proc.wait()
    # the report process dies with the watch (no orphan pushing behind the next watch's back)
    _wait("the orphaned report to end", lambda: not any(
        j.is_running() and j.status() != psutil.STATUS_ZOMBIE for j in jobs), 60)
    assert _rows(watch.state)[uid]["status"] == "running"
    again = Watch(tmp_path, server.url, _env(server), "--rules", rules, "--stable-seconds", "2", name="again")
    try:
        assert "interrupted by an earlier stop or crash will run again" in again.log.read_text()
        _wait("the report to run again", lambda: _rows(again.state)[uid]["status"] == "running", 60, again.proc,
              again.log)
        # one SIGTERM: the running report finishes, then the watch exits 0
        again.proc.send_signal(signal.SIGTERM)
        assert again.proc.wait(timeout=150) == 0
        row = _rows(again.state)[uid]
        assert row["runs"] == 1 and row["attempts"] == 2 and row["status"] in ("done", "waiting")
        outputs = _outputs(pacs, uid)
        assert outputs.get(PDF_SERIES) == 1 and all(n == 1 for n in outputs.values())
        reports = list((tmp_path / "reports").glob("*/*/metrics.json"))
        assert len(reports) == 1
    finally:
        assert again.stop() == 0
    assert not list((tmp_path / "reports").rglob("*.partial"))


def test_sigterm_abandons_cleanly(clean_orthanc, tmp_path):
    """Two SIGTERMs: the running report is abandoned, no staging folder is left, the study waits for next time."""
    from pacsai.pacs import connect

    server = clean_orthanc
    pacs = connect(server.url, user=server.user, password=server.password, cache_dir=tmp_path / "c", retries=1)
    patient = _patient(36)
    uid = str(patient.ct[0].StudyInstanceUID)
    watch = Watch(tmp_path, server.url, _env(server), "--rules", str(_write_rules(tmp_path / "r.yaml")),
                  "--stable-seconds", "1")
    assert pacs.store(list(patient.datasets()), progress=False).ok
    _wait("the report to start", lambda: (_rows(watch.state).get(uid) or {}).get("status") == "running", 60,
          watch.proc, watch.log)
    time.sleep(2)
    watch.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    watch.proc.send_signal(signal.SIGTERM)
    assert watch.proc.wait(timeout=60) == 0
    row = _rows(watch.state)[uid]
    assert row["status"] == "waiting" and row["runs"] == 0 and "abandoned" in row["reason"]
    assert not (tmp_path / "reports" / ".watch-staging").exists()
    assert not list((tmp_path / "reports").rglob("metrics.json"))


# ---------------------------------------------------------------------------------------------------- embedded


def test_embedded_store_study_gets_its_outputs(tmp_path):
    from pacsai.pacs import connect

    url = f"file://{tmp_path / 'pacs'}"
    pacs = connect(url, cache_dir=tmp_path / "c")
    patient = _patient(37)
    watch = Watch(tmp_path, url, _env(), "--rules", str(_write_rules(tmp_path / "r.yaml")), "--stable-seconds", "2")
    try:
        assert "mode embedded-index" in watch.log.read_text()
        assert pacs.store(list(patient.datasets()), progress=False).ok
        uid = str(patient.ct[0].StudyInstanceUID)
        row = watch.wait_done(uid)
        time.sleep(3)
        assert _rows(watch.state)[uid]["runs"] == 1 and row["latency_s"] > 0
        assert _outputs(pacs, uid).get(PDF_SERIES) == 1
    finally:
        assert watch.stop() == 0


# ---------------------------------------------------------------------------------------------------- the model


def test_promoting_a_new_champion_takes_effect_for_the_next_study(clean_orthanc, tmp_path, tmp_path_factory):
    """Structures from models:/...@champion: the alias is resolved at each report, so the study after a promotion
    is reported with the new version, and its SR says which (the provenance of every model-drawn structure)."""
    import shutil

    import pydicom

    from pacsai import tracking
    from pacsai.config import load_settings
    from pacsai.pacs import connect
    from pacsai.report.sr import read_drawn_by
    from tests.test_learning_train import MODEL_NAME, smoke_model

    info = smoke_model(tmp_path_factory)
    # A private copy of the session's registry (artifacts stay where they are): promoting here changes no other test.
    shutil.copy(Path(info["work"]) / "mlruns" / "mlflow.db", tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    settings = load_settings(mlflow_uri=uri)
    first = tracking.resolve_model(f"models:/{MODEL_NAME}/{info['version']}", settings=settings)
    second = tracking.register_model(first.source, MODEL_NAME, settings=settings)
    tracking.set_alias(MODEL_NAME, first.version, settings=settings)
    server = clean_orthanc
    env = {**_env(server), "PACSAI_MLFLOW_URI": uri}
    rules = _write_rules(tmp_path / "r.yaml", push_anyway=True,
                         report={"track": False, "structures_from": "model",
                                 "model": f"models:/{MODEL_NAME}@champion", "smoke": True})
    pacs = connect(server.url, user=server.user, password=server.password, cache_dir=tmp_path / "c", retries=1)
    watch = Watch(tmp_path, server.url, env, "--rules", str(rules), "--stable-seconds", "1")

    def sr_labels(study_uid: str) -> set[str]:
        series = pacs.search_series(StudyInstanceUID=study_uid, Modality="SR")
        (sr_series,) = [s for s in series.itertuples() if int(s.SeriesNumber) == SR_SERIES]
        (path,) = pacs.retrieve_series(study_uid, sr_series.SeriesInstanceUID, progress=False)
        return set(read_drawn_by(pydicom.dcmread(path)).values())

    try:
        before, after = _patient(38), _patient(39)
        assert pacs.store(list(before.datasets()), progress=False).ok
        row = watch.wait_done(str(before.ct[0].StudyInstanceUID), timeout=240)
        assert row["model"] == f"{MODEL_NAME} v{first.version}"
        assert f"model {MODEL_NAME} v{first.version}" in sr_labels(str(before.ct[0].StudyInstanceUID))
        tracking.set_alias(MODEL_NAME, second.version, settings=settings)  # promoted while the watch runs
        assert pacs.store(list(after.datasets()), progress=False).ok
        row = watch.wait_done(str(after.ct[0].StudyInstanceUID), timeout=240)
        assert row["model"] == f"{MODEL_NAME} v{second.version}"
        assert f"model {MODEL_NAME} v{second.version}" in sr_labels(str(after.ct[0].StudyInstanceUID))
    finally:
        assert watch.stop() == 0


def test_failing_report_is_retried_with_backoff_then_given_up_with_its_reason(tmp_path):
    """A model that cannot be resolved: each attempt fails fast; after max_attempts the study is given up, the
    reason kept (without identifiers) and shown by --status; the watch keeps running."""
    from pacsai.pacs import connect

    url = f"file://{tmp_path / 'pacs'}"
    pacs = connect(url, cache_dir=tmp_path / "c")
    patient = _patient(40)
    uid = str(patient.ct[0].StudyInstanceUID)
    rules = _write_rules(tmp_path / "r.yaml", retry={"max_attempts": 2, "backoff_seconds": 3},
                         report={"track": False, "structures_from": "model", "model": "models:/no-such-model@champion"})
    env = {**_env(), "PACSAI_MLFLOW_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    watch = Watch(tmp_path, url, env, "--rules", str(rules), "--stable-seconds", "1")
    try:
        # The store does not exist yet: an empty baseline, so the study stored now is new (CI once saw it ignored).
        assert "does not exist yet; its first study will be reported" in watch.log.read_text()
        assert pacs.store([*patient.ct, patient.rtstruct, patient.rtplan, patient.rtdose], progress=False).ok
        _wait("the first failure", lambda: (_rows(watch.state).get(uid) or {}).get("status") == "retry", 120,
              watch.proc, watch.log)
        failed_at = _rows(watch.state)[uid]
        assert failed_at["attempts"] == 1 and failed_at["next_attempt"] >= failed_at["started"] + 3
        row = _wait("giving up", lambda: (_rows(watch.state).get(uid) or {}).get("status") == "gave_up"
                    and _rows(watch.state)[uid], 120, watch.proc, watch.log)
        assert row["attempts"] == 2 and row["runs"] == 0 and row["started"] >= failed_at["next_attempt"] - 0.5
        assert "no-such-model" in row["reason"] and patient.patient_id not in row["reason"]
        status = watch.status()
        assert f"{row['key']}  patient {row['patient']}  GAVE UP after 2 attempt(s): " in status
        assert "no-such-model" in status
        assert watch.proc.poll() is None
        assert _outputs(pacs, uid) == {}
    finally:
        assert watch.stop() == 0


def test_qido_polling_with_a_baseline(clean_orthanc, tmp_path):
    """QIDO polling (any DICOMweb PACS; here Orthanc with qido_filters, which selects that mode): a study in the
    PACS before the first start is recorded, not reported; a study pushed while watch runs is reported."""
    from pacsai.pacs import connect

    server = clean_orthanc
    pacs = connect(server.url, user=server.user, password=server.password, cache_dir=tmp_path / "c", retries=1)
    patient = _patient(41)
    assert pacs.store([*patient.prior_ct, patient.prior_rtstruct], progress=False).ok
    rules = _write_rules(tmp_path / "r.yaml", qido_filters={"PatientID": patient.patient_id})
    watch = Watch(tmp_path, server.url, _env(server), "--rules", str(rules), "--stable-seconds", "2")
    try:
        assert "mode qido-poll" in watch.log.read_text()
        assert pacs.store([*patient.ct, patient.rtstruct, patient.rtplan, patient.rtdose], progress=False).ok
        uid = str(patient.ct[0].StudyInstanceUID)
        row = watch.wait_done(uid)
        assert row["runs"] == 1 and row["n_instances"] == len(patient.ct) + 3
        time.sleep(4)  # its own outputs raise the study's instance count: seen, fingerprinted, not reported again
        rows = _rows(watch.state)
        assert rows[uid]["runs"] == 1 and rows[uid]["status"] == "done"
        prior = rows[str(patient.prior_ct[0].StudyInstanceUID)]
        assert prior["status"] == "ignored" and "before the first start" in prior["reason"]
        assert _outputs(pacs, uid).get(PDF_SERIES) == 1
    finally:
        assert watch.stop() == 0


def test_once_with_backfill_reports_what_is_there_and_exits(tmp_path):
    """``--once`` with ``backfill: true`` (cron): the studies already in the store are reported, then it exits 0;
    a second ``--once`` finds nothing new and reports nothing again."""
    from pacsai.pacs import connect

    url = f"file://{tmp_path / 'pacs'}"
    pacs = connect(url, cache_dir=tmp_path / "c")
    patient = _patient(42)
    assert pacs.store(list(patient.datasets()), progress=False).ok
    rules = _write_rules(tmp_path / "r.yaml", backfill=True)
    args = ["-m", "pacsai", "watch", "--pacs", url, "--rules", str(rules), "--once", "--stable-seconds", "0",
            "--state", str(tmp_path / "state.sqlite"), "--out", str(tmp_path / "reports")]
    for _ in range(2):
        proc = subprocess.run([sys.executable, *args], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                              timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows(tmp_path / "state.sqlite")
    uid = str(patient.ct[0].StudyInstanceUID)
    assert rows[uid]["status"] == "done" and rows[uid]["runs"] == 1
    assert rows[str(patient.prior_ct[0].StudyInstanceUID)]["status"] == "ignored"
    assert _outputs(pacs, uid).get(PDF_SERIES) == 1
