"""Privacy and security, end to end: no identifiers or credentials in MLflow, logs or outputs; credential
sources; TLS verification against a real HTTPS endpoint; "research use only" on every output.

One module-scoped ``world``: three synthetic patients whose PatientName / PatientID / PatientBirthDate are
marker strings, in an embedded store (training) and patient 0 also on a real Orthanc whose password is a
marker (the report). A 1-epoch training runs in this process with the ``pacsai`` logger at DEBUG into a file;
a report runs through the CLI at ``-vv`` with ``user:password@`` in its PACS URL and ``--push``. Then every
byte they left behind is searched for the markers.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import ssl
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import pacsai
from pacsai.errors import ConfigError, PacsaiWarning, PacsAuthError, PacsConnectionError
from tests.orthanc_fixture import _unavailable
from tests.test_cohort import SMOKE_SHAPE, SMOKE_SPACING

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "experiments" / "demo.yaml"

USER = "pacsai-priv"
PASSWORD = "Pw-QJV7-marker"  # the Orthanc password: must never be written anywhere
BASIC = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()  # what an Authorization header would show
KEY1 = "k1-6c0f3e91d2b4a7"  # PACSAI_PSEUDONYM_KEY of the report run
KEY2 = "k2-b81d44a09e7c35"
N = 3


def name(i: int) -> str:
    return f"ZQXFAMILY{i}^ZQXGIVEN{i}"


def pid(i: int) -> str:
    return f"ZQXPID-{i:03d}"


def birth(i: int) -> str:
    return f"19{31 + i}0719"


def markers() -> list[str]:
    """Every form a patient's identity could take in text: name parts, ID, birth date (DICOM and ISO)."""
    out = []
    for i in range(N):
        b = birth(i)
        out += [f"ZQXFAMILY{i}", f"ZQXGIVEN{i}", pid(i), b, f"{b[:4]}-{b[4:6]}-{b[6:]}"]
    return out


def readable(path: Path) -> bytes:
    """A file's bytes; for a parquet file also its values and metadata decoded (its pages are compressed, so a UID
    in them need not appear in the bytes)."""
    data = path.read_bytes()
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        arrow = pq.read_table(path)
        meta = b" ".join(k + b"=" + v for k, v in (arrow.schema.metadata or {}).items())
        data += arrow.to_pandas().to_json(orient="records").encode() + meta
    return data


def hits(paths: list[Path], needles: list[str]) -> list[tuple[str, str]]:
    """(file, needle) for every needle found in the files (:func:`readable`)."""
    found = []
    for path in paths:
        data = readable(path)
        found += [(str(path), n) for n in needles if n.encode() in data]
    return found


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def cli(args: list[str], cwd: Path, env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pacsai", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any PACS/MLflow/privacy setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PACSAI_", "MLFLOW_TRACKING", "REQUESTS_CA", "CURL_CA")) and k != "NETRC"}
    env.update({"MLFLOW_ENABLE_TELEMETRY": "false", "DO_NOT_TRACK": "1", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


# ---------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real Orthanc whose password is a marker string."""
    from pacsai.pacs.orthanc import orthanc_available, start_orthanc

    reason = orthanc_available()
    if reason:
        _unavailable(reason)
    s = start_orthanc(tmp_path_factory.mktemp("orthanc-privacy"), user=USER, password=PASSWORD)
    try:
        yield s
    finally:
        s.stop()


def marked_patient(i: int) -> list:
    from pacsai.synthetic import make_patient

    datasets = list(make_patient(i, shape=SMOKE_SHAPE, spacing=SMOKE_SPACING, with_prior=False).datasets())
    for ds in datasets:
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = name(i), pid(i), birth(i)
    return datasets


@dataclass(frozen=True)
class World:
    root: Path
    work: Path  # working directory of training and report: work/mlruns is the MLflow store
    embedded_url: str
    log_file: Path  # the `pacsai` logger at DEBUG during training
    report_dir: Path
    report_proc: subprocess.CompletedProcess
    train_run_id: str
    ct0: list  # patient 0's CT datasets


@pytest.fixture(scope="module")
def world(tmp_path_factory, server) -> World:
    from pacsai.config import load_settings
    from pacsai.learning.train import parse_set, train
    from pacsai.pacs import connect

    root = tmp_path_factory.mktemp("privacy")
    work = root / "work"
    work.mkdir()
    embedded_url = f"file://{root / 'pacs'}"
    embedded = connect(embedded_url, cache_dir=root / "cache")
    patients = [marked_patient(i) for i in range(N)]
    for datasets in patients:
        assert embedded.store(datasets, progress=False).ok
    with connect(server.url, user=USER, password=PASSWORD, cache_dir=root / "cache-o") as orthanc:
        assert orthanc.store(patients[0], progress=False).ok

    log_file = root / "pacsai-debug.log"
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("pacsai")
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        with pytest.MonkeyPatch.context() as mp:
            for var in [k for k in os.environ if k.startswith("PACSAI_") or k == "MLFLOW_TRACKING_URI"]:
                mp.delenv(var)
            mp.setenv("PACSAI_CACHE_DIR", str(root / "cache"))
            mp.chdir(work)  # no PACSAI_PSEUDONYM_KEY: the store's own key file is used
            result = train(DEMO, pacs=embedded_url, smoke=True, overrides=parse_set(["train.epochs=1"]),
                           progress=False, settings=load_settings())
    finally:
        logger.removeHandler(handler)
        handler.close()
        logger.setLevel(old_level)

    report_dir = work / "report"
    cred_url = server.url.replace("http://", f"http://{USER}:{PASSWORD}@")
    proc = cli(["-vv", "report", pid(0), "--pacs", cred_url, "--out", str(report_dir), "--push"], work,
               clean_env(PACSAI_CACHE_DIR=str(root / "cache-r"), PACSAI_PSEUDONYM_KEY=KEY1))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return World(root=root, work=work, embedded_url=embedded_url, log_file=log_file, report_dir=report_dir,
                 report_proc=proc, train_run_id=result.run_id, ct0=patients[0][:SMOKE_SHAPE[0]])


def mlflow_client(work: Path):
    from pacsai import tracking

    mlflow = tracking._mlflow()
    uri = f"sqlite:///{work / 'mlruns' / 'mlflow.db'}"
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def report_run(world: World):
    c = mlflow_client(world.work)
    exp = c.get_experiment_by_name("pacsai-reports")
    (run,) = c.search_runs([exp.experiment_id])
    return c, run


# ---------------------------------------------------------------------------------------------------- 1. PHI


def test_no_identifier_in_mlflow_logs_or_output_by_default(world):
    (world.root / "report.out").write_text(world.report_proc.stdout)
    (world.root / "report.err").write_text(world.report_proc.stderr)
    mlruns = files_under(world.work / "mlruns")
    logs = [world.log_file, world.root / "report.out", world.root / "report.err", world.report_dir / "report.log"]
    # the search is meaningful: the runs logged their artifacts, debug logging was on, and the markers are
    # in the data (the report itself, which is for the clinician, names the patient)
    names = {p.name for p in mlruns}
    assert {"mlflow.db", "split.json", "manifest.json", "cohort.parquet", "metrics.json"} <= names
    assert "DEBUG pacsai." in world.log_file.read_text()
    assert "DEBUG pacsai." in world.report_proc.stderr
    assert pid(0) in (world.report_dir / "report.html").read_text()
    assert hits(mlruns + logs, markers()) == []


def uid_and_date_markers(world: World) -> list[str]:
    """Patient 0's Study/Series/SOP Instance UIDs and study date (DICOM and ISO): what links back to the PACS."""
    first = world.ct0[0]
    date = str(first.StudyDate)
    return [str(first.StudyInstanceUID), str(first.SeriesInstanceUID), *(str(d.SOPInstanceUID) for d in world.ct0),
            date, f"{date[:4]}-{date[4:6]}-{date[6:]}"]


def test_no_dicom_uid_or_calendar_date_in_mlflow_by_default(world, tmp_path):
    import pandas as pd

    from pacsai import privacy, tracking
    from pacsai.cohort import Cohort

    mlruns = files_under(world.work / "mlruns")
    names = {p.name for p in mlruns}
    # both runs' records are searched, the training inputs with their contents (the cohort table, its dataset)
    assert {"mlflow.db", "manifest.json", "metrics.json", "cohort.parquet", "split.json", "instances.json"} <= names
    # the search reads what a parquet holds: the real cohort table, written as it was logged before, is a hit
    plain = tmp_path / "cohort.parquet"
    pd.DataFrame({"study_instance_uid": [str(world.ct0[0].StudyInstanceUID)] * 200}).to_parquet(plain)
    assert hits([plain], uid_and_date_markers(world)) == [(str(plain), str(world.ct0[0].StudyInstanceUID))]
    assert hits(mlruns, uid_and_date_markers(world)) == []

    # what stands in their place: keyed hashes (the report's key) and days since the first study
    c, run = report_run(world)
    logged = json.loads(Path(c.download_artifacts(run.info.run_id, "report/metrics.json")).read_text())
    assert logged["study_date"] == "day 0"
    uids = [i["series_instance_uid"] for i in logged["provenance"]["inputs"]]
    assert str(world.ct0[0].SeriesInstanceUID) not in uids
    assert privacy.hash_uid(str(world.ct0[0].SeriesInstanceUID), KEY1) in uids
    assert run.data.params["study_uid"] in ("", privacy.hash_uid(str(world.ct0[0].StudyInstanceUID), KEY1))
    assert run.info.run_name == f"report {tracking.pseudonymize(pid(0), KEY1)}"
    training = c.get_run(world.train_run_id)
    assert training.info.run_name.startswith("train ") and training.inputs.dataset_inputs
    # the training cohort under the store's key (training had none configured), as in split.json: the same series
    # is the same u-... in both, and the validation notebook finds it again in the PACS by it
    store_key = tracking.pseudonym_key(root=world.work)
    (parquet,) = [p for p in mlruns if p.name == "cohort.parquet"]
    cohort = Cohort.from_parquet(parquet)
    series = privacy.hash_uid(str(world.ct0[0].SeriesInstanceUID), store_key)
    assert cohort.uids_hashed and series in set(cohort.table.series_instance_uid)
    split = json.loads(next(p for p in mlruns if p.name == "split.json").read_text())
    assert series in {u for part in split["series"].values() for u in part}
    assert cohort.content_hash == training.data.tags["pacsai.cohort_hash"]


def test_pseudonyms_are_hmacs_under_the_configured_key(world):
    from pacsai import tracking

    _, run = report_run(world)
    expected = "p-" + hmac.new(KEY1.encode(), pid(0).encode(), hashlib.sha256).hexdigest()[:16]
    assert run.data.tags["pacsai.patient"] == run.data.params["patient"] == expected
    assert tracking.pseudonymize(pid(0), KEY2) != expected
    # training had no key configured: a random one kept beside the store, mode 0600, stable for that store
    key_file = world.work / "mlruns" / ".pseudonym_key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    store_key = key_file.read_text().strip()
    assert tracking.pseudonym_key(root=world.work) == store_key
    mlflow = tracking._mlflow()
    with tracking.using_store(f"sqlite:///{world.work / 'mlruns' / 'mlflow.db'}"):
        split = mlflow.artifacts.load_dict(f"runs:/{world.train_run_id}/split.json")
    logged = sorted(p for part in split["patients"].values() for p in part)
    assert logged == sorted(tracking.pseudonymize(pid(i), store_key) for i in range(N))
    # the configured key itself is stored nowhere
    assert hits(files_under(world.work / "mlruns"), [KEY1, KEY2]) == []


@pytest.fixture(scope="module")
def side_store(tmp_path_factory) -> Path:
    """A second MLflow store (folder holding mlruns/) for re-tracking the report under other settings."""
    return tmp_path_factory.mktemp("side-store")


def _track_again(world: World, tmp_path: Path, monkeypatch, **env: str):
    """The report's MLflow logging (report.track.track_report) once more, into ``tmp_path``/mlruns, with ``env``."""
    from pacsai.report.params import validate_parameters
    from pacsai.report.track import track_report as _track

    for k, v in {"PACSAI_MLFLOW_URI": f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}", **env}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path)
    metrics = json.loads((world.report_dir / "metrics.json").read_text())
    run_id = _track(validate_parameters(patient_id=pid(0)), world.report_dir, metrics,
                    world.report_dir / "report.pdf")
    c = mlflow_client(tmp_path)
    return c, c.get_run(run_id)


def test_another_key_gives_another_pseudonym(world, side_store, monkeypatch):
    _, first = report_run(world)
    _, run = _track_again(world, side_store, monkeypatch, PACSAI_PSEUDONYM_KEY=KEY2)
    from pacsai.tracking import pseudonymize

    assert run.data.tags["pacsai.patient"] == pseudonymize(pid(0), KEY2) != first.data.tags["pacsai.patient"]


def test_phi_opt_in_logs_the_report_and_the_real_id(world, server, side_store, tmp_path, monkeypatch):
    c, run = _track_again(world, side_store, monkeypatch, PACSAI_LOG_PHI="1")
    assert run.data.tags["pacsai.patient"] == pid(0) and run.data.tags["pacsai.log_phi"] == "true"
    logged = {a.path for a in c.list_artifacts(run.info.run_id, "report")}
    assert {"report/report.html", "report/metrics.json"} <= logged
    assert hits(files_under(side_store / "mlruns" / "artifacts"), [pid(0)])  # now it is there, as asked
    # -vv: third-party request lines (query strings name the patient) only with the opt-in
    args = ["-vv", "pacs", "search", "-f", f"PatientID={pid(0)}", "--pacs", server.url, "--json"]
    base = {"PACSAI_PACS_USER": USER, "PACSAI_PACS_PASSWORD": PASSWORD}
    quiet = cli(args, tmp_path, clean_env(**base))
    loud = cli(args, tmp_path, clean_env(**base, PACSAI_LOG_PHI="1"))
    assert quiet.returncode == loud.returncode == 0, quiet.stderr + loud.stderr
    assert pid(0) in quiet.stdout  # what the user asked for
    assert pid(0) not in quiet.stderr and "DEBUG pacsai." in quiet.stderr
    assert f"PatientID={pid(0)}" in loud.stderr and "urllib3" in loud.stderr


# ---------------------------------------------------------------------------------------------------- 2. credentials


def test_report_never_writes_the_password(world, server):
    out = world.report_dir
    written = files_under(out) + files_under(world.work / "mlruns") + [world.log_file]
    texts = [world.report_proc.stdout, world.report_proc.stderr]
    pdf = subprocess.run(["pdftotext", str(out / "report.pdf"), "-"], capture_output=True, text=True,
                         check=True).stdout
    needles = [PASSWORD, BASIC, f"{USER}:"]
    assert hits(written, needles) == []
    assert not [n for n in needles for t in [*texts, pdf] if n in t]
    # the URL is there, without its credentials, in the notebook parameters and the provenance
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["provenance"]["pacs_url"] == server.url
    assert metrics["provenance"]["parameters"]["pacs_url"] == server.url
    notebook = json.loads((out / "report.ipynb").read_text())
    assert notebook["metadata"]["papermill"]["parameters"]["pacs_url"] == server.url


def test_env_dotenv_and_netrc_each_authenticate(server, tmp_path):
    ping = ["pacs", "ping", "--pacs", server.url]
    by_env = cli(ping, tmp_path, clean_env(PACSAI_PACS_USER=USER, PACSAI_PACS_PASSWORD=PASSWORD))
    dotenv = tmp_path / "dotenv"
    dotenv.mkdir()
    (dotenv / ".env").write_text(f"PACSAI_PACS_USER={USER}\nPACSAI_PACS_PASSWORD={PASSWORD}\n")
    by_dotenv = cli(ping, dotenv, clean_env())
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine 127.0.0.1\n  login {USER}\n  password {PASSWORD}\n")
    netrc.chmod(0o600)
    by_netrc = cli(ping, tmp_path, clean_env(PACSAI_PACS_NETRC=str(netrc)))
    nothing = cli(ping, tmp_path, clean_env(HOME=str(tmp_path)))
    for proc in (by_env, by_dotenv, by_netrc):
        assert proc.returncode == 0 and proc.stdout.startswith("ok:"), proc.stderr
    assert nothing.returncode == 1 and "no credentials" in nothing.stderr


def test_precedence_argument_env_dotenv_netrc(tmp_path, monkeypatch):
    from pacsai.pacs import connect

    url = "https://pacs.example/dicom-web"
    monkeypatch.chdir(tmp_path)
    netrc = tmp_path / "netrc"
    netrc.write_text("machine pacs.example login netuser password netpw\ndefault login anon password x\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))  # what requests and curl read when PACSAI_PACS_NETRC is not set
    assert connect(url).session.auth == ("netuser", "netpw")
    (tmp_path / ".env").write_text("PACSAI_PACS_USER=dotuser\nPACSAI_PACS_PASSWORD=dotpw\n")
    assert connect(url).session.auth == ("dotuser", "dotpw")
    monkeypatch.setenv("PACSAI_PACS_USER", "envuser")
    monkeypatch.setenv("PACSAI_PACS_PASSWORD", "envpw")
    assert connect(url).session.auth == ("envuser", "envpw")
    assert connect(url, user="arg", password="argpw").session.auth == ("arg", "argpw")
    # a configured user without a password takes it from that user's netrc entry
    (tmp_path / ".env").unlink()
    monkeypatch.setenv("PACSAI_PACS_USER", "netuser")
    monkeypatch.delenv("PACSAI_PACS_PASSWORD")
    assert connect(url).session.auth == ("netuser", "netpw")
    # a token wins, and then netrc is not read
    monkeypatch.setenv("PACSAI_PACS_TOKEN", "tok")
    session = connect(url).session
    assert session.headers["Authorization"] == "Bearer tok" and session.auth is None


def test_netrc_errors_name_the_file_not_the_secret(tmp_path, monkeypatch):
    from pacsai.pacs import connect

    missing = tmp_path / "nope"
    monkeypatch.setenv("PACSAI_PACS_NETRC", str(missing))
    with pytest.raises(ConfigError, match=f"{missing}.*PACSAI_PACS_NETRC"):
        connect("https://pacs.example/dicom-web")
    broken = tmp_path / "broken"
    # the word "password" forgotten: the parser's own message would quote the secret as a "bad token"
    broken.write_text("machine pacs.example login u S3cr3t-QJV\n")
    monkeypatch.setenv("PACSAI_PACS_NETRC", str(broken))
    with pytest.raises(ConfigError) as info:
        connect("https://pacs.example/dicom-web")
    assert str(broken) in str(info.value) and "S3cr3t" not in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_wrong_password_names_the_user_not_the_password(server, tmp_path):
    from pacsai.pacs import connect

    wrong = "Wrong-QJV-pw"
    with pytest.raises(PacsAuthError) as info:
        connect(server.url, user=USER, password=wrong, retries=0, cache_dir=tmp_path).ping()
    assert repr(USER) in str(info.value) and wrong not in str(info.value)
    proc = cli(["pacs", "ping", "--pacs", server.url], tmp_path,
               clean_env(PACSAI_PACS_USER=USER, PACSAI_PACS_PASSWORD=wrong))
    assert proc.returncode == 1 and USER in proc.stderr and wrong not in proc.stderr + proc.stdout
    assert proc.stderr.strip().count("\n") == 0


def test_pacs_cli_at_debug_never_prints_credentials(world, server, tmp_path):
    study = connect_orthanc(server, tmp_path).search_studies(PatientID=pid(0)).iloc[0]["StudyInstanceUID"]
    # PACSAI_LOG_PHI=1: the most output there is, urllib3's request lines included
    env = clean_env(PACSAI_PACS_USER=USER, PACSAI_PACS_PASSWORD=PASSWORD, PACSAI_LOG_PHI="1",
                    PACSAI_CACHE_DIR=str(tmp_path / "cache"))
    cred_url = server.url.replace("http://", f"http://{USER}:{PASSWORD}@")
    runs = [
        cli(["-vv", "pacs", "ping", "--pacs", server.url], tmp_path, env),
        cli(["-vv", "pacs", "ping", "--pacs", cred_url], tmp_path, clean_env()),
        cli(["-vv", "pacs", "search", "--pacs", server.url, "--level", "series"], tmp_path, env),
        cli(["-vv", "pacs", "pull", "--pacs", server.url, "--study", study, "--out", str(tmp_path / "o")],
            tmp_path, env),
    ]
    for proc in runs:
        assert proc.returncode == 0, proc.stderr[-2000:]
        for needle in (PASSWORD, BASIC, "Authorization"):
            assert needle not in proc.stdout + proc.stderr, (proc.args, needle)
    assert "urllib3.connectionpool" in runs[2].stderr  # debug logging really was on
    assert "instance(s)" in runs[3].stdout


def connect_orthanc(server, tmp_path):
    from pacsai.pacs import connect

    return connect(server.url, user=USER, password=PASSWORD, cache_dir=tmp_path / "c")


# ---------------------------------------------------------------------------------------------------- 3. TLS


@pytest.fixture(scope="module")
def tls(server, tmp_path_factory):
    """``https://127.0.0.1:PORT/dicom-web``: a TLS proxy with a trustme certificate in front of ``server``."""
    trustme = pytest.importorskip("trustme")
    from urllib.parse import urlsplit

    from tests.tlsproxy import TlsProxy

    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    bundle = tmp_path_factory.mktemp("tls") / "hospital-ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    backend = urlsplit(server.url)
    with TlsProxy((backend.hostname, backend.port), context) as proxy:
        yield f"https://127.0.0.1:{proxy.port}{backend.path}", bundle


def test_tls_verification_is_on_by_default_with_a_clear_error(tls, tmp_path, monkeypatch):
    from pacsai.pacs import connect

    url, _ = tls
    # requests reads these; an empty CURL_CA_BUNDLE once switched verification off: it must not here
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "")
    monkeypatch.setenv("CURL_CA_BUNDLE", "")
    with pytest.raises(PacsConnectionError) as info:
        connect(url, user=USER, password=PASSWORD, retries=0, cache_dir=tmp_path).ping()
    message = str(info.value)
    assert "TLS verification failed" in message and url in message
    assert "PACSAI_PACS_CA_BUNDLE" in message and "--ca-bundle" in message
    proc = cli(["pacs", "ping", "--pacs", url], tmp_path,
               clean_env(PACSAI_PACS_USER=USER, PACSAI_PACS_PASSWORD=PASSWORD, PACSAI_PACS_RETRIES="0"))
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "TLS verification failed" in proc.stderr and "--ca-bundle" in proc.stderr


def test_tls_with_the_hospital_ca_bundle(tls, tmp_path):
    from pacsai.pacs import connect

    url, bundle = tls
    with connect(url, user=USER, password=PASSWORD, ca_bundle=bundle, cache_dir=tmp_path) as pacs:
        assert pacs.ping() > 0
    creds = {"PACSAI_PACS_USER": USER, "PACSAI_PACS_PASSWORD": PASSWORD}
    by_flag = cli(["pacs", "ping", "--pacs", url, "--ca-bundle", str(bundle)], tmp_path, clean_env(**creds))
    by_env = cli(["pacs", "ping", "--pacs", url], tmp_path, clean_env(**creds, PACSAI_PACS_CA_BUNDLE=str(bundle)))
    for proc in (by_flag, by_env):
        assert proc.returncode == 0 and proc.stdout.startswith("ok:"), proc.stderr


def test_tls_verification_off_only_when_asked_and_it_warns(tls, tmp_path):
    from pacsai.pacs import connect

    url, _ = tls
    with pytest.warns(PacsaiWarning, match="verification is off"):
        pacs = connect(url, user=USER, password=PASSWORD, verify=False, cache_dir=tmp_path)
    with pytest.warns(Warning):  # urllib3's InsecureRequestWarning on every request, too
        assert pacs.ping() > 0
    proc = cli(["pacs", "ping", "--pacs", url, "--insecure"], tmp_path,
               clean_env(PACSAI_PACS_USER=USER, PACSAI_PACS_PASSWORD=PASSWORD))
    assert proc.returncode == 0 and "verification is off" in proc.stderr, proc.stderr


# ---------------------------------------------------------------------------------------------------- 4. research use


def test_research_use_only_on_every_output(world, server, tmp_path):
    import numpy as np

    from pacsai.imaging import read_series
    from pacsai.imaging.geometry import like
    from pacsai.report.outputs import build_outputs
    from pacsai.report.summary import MASKS_FILE

    out = world.report_dir
    notice = pacsai.RESEARCH_USE_ONLY
    assert notice in (out / "report.html").read_text()
    pdf = subprocess.run(["pdftotext", str(out / "report.pdf"), "-"], capture_output=True, text=True,
                         check=True).stdout
    assert "Research use only" in " ".join(pdf.split())
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["research_use_only"] == metrics["provenance"]["research_use_only"] == notice
    # what the report pushed to the PACS: SEG, SR, Encapsulated PDF
    pacs = connect_orthanc(server, tmp_path)
    series = pacs.search_series(PatientID=pid(0))
    pushed = series[series["Modality"].isin(["SEG", "SR", "DOC"])]
    assert sorted(pushed["Modality"]) == ["DOC", "SEG", "SR"]
    assert all("research use only" in d.lower() for d in pushed["SeriesDescription"]), pushed["SeriesDescription"]
    # and the RTSTRUCT written when a model made the contours
    image = read_series(world.ct0)
    with np.load(out / MASKS_FILE) as data:
        masks = {n: like(image, data[n].astype(bool), name=n) for n in ("GTV", "Heart")}
    (rtstruct,) = build_outputs(source_images=world.ct0, masks=masks, measurements={}, pdf_bytes=None,
                                model_info={}, params=metrics["provenance"]["parameters"], include_seg=False,
                                include_rtstruct=True)
    assert rtstruct.Modality == "RTSTRUCT" and "research use only" in rtstruct.SeriesDescription.lower()
    # the command line says it too
    for args in (["--help"], ["report", "--help"], ["train", "--help"]):
        proc = cli(args, tmp_path, clean_env())
        assert proc.returncode == 0 and "research use only" in " ".join(proc.stdout.split()).lower(), args


def test_credentials_out_of_url_moves_them_to_the_environment_for_the_block(monkeypatch):
    # Used by the report and validation runners: their notebooks (and so MLflow) get the URL without the
    # password, and the kernel, a child process, inherits the login from the environment.
    from pacsai.pacs.credentials import credentials_out_of_url

    monkeypatch.setenv("PACSAI_PACS_USER", "someone-else")
    with credentials_out_of_url("https://alice:s%40cret@pacs.example/dicom-web") as url:
        assert url == "https://pacs.example/dicom-web"
        assert os.environ["PACSAI_PACS_USER"] == "alice" and os.environ["PACSAI_PACS_PASSWORD"] == "s@cret"
    assert os.environ["PACSAI_PACS_USER"] == "someone-else" and "PACSAI_PACS_PASSWORD" not in os.environ
    with credentials_out_of_url("file://./pacs") as url:
        assert url == "file://./pacs" and "PACSAI_PACS_PASSWORD" not in os.environ
