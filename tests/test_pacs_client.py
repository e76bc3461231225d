"""connect(): back-end choice, settings, session (auth, TLS, retries, timeouts), error mapping, ping."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from dicomweb_client.api import DICOMfileClient, DICOMwebClient

from pacsai.errors import PacsAuthError, PacsConnectionError, PacsError, PacsNotFoundError, PacsTimeoutError
from pacsai.pacs import DicomWebPacs, EmbeddedPacs, Pacs, connect
from pacsai.pacs.address import redact_url

# -- back ends and settings ----------------------------------------------------------------------------------


def test_default_is_the_embedded_store_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pacs = connect()
    assert isinstance(pacs, EmbeddedPacs) and isinstance(pacs, Pacs)
    assert pacs.path == tmp_path / "pacs"
    assert pacs.url == f"file://{tmp_path / 'pacs'}"
    assert not (tmp_path / "pacs").exists()  # only storing creates a store
    pacs.store([], progress=False)
    assert (tmp_path / "pacs").is_dir()
    assert isinstance(pacs.client, DICOMfileClient)


def test_cache_dir_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("PACSAI_CACHE_DIR", str(tmp_path / "my-cache"))
    pacs = connect(f"file://{tmp_path / 'store'}")
    assert pacs.cache.root == tmp_path / "my-cache"
    assert (
        connect(f"file://{tmp_path / 'store'}", cache_dir=tmp_path / "other").cache.root == tmp_path / "other"
    )


def test_http_settings_from_the_environment(monkeypatch):
    monkeypatch.setenv("PACSAI_PACS_URL", "https://pacs.example/dicom-web/")
    monkeypatch.setenv("PACSAI_PACS_USER", "alice")
    monkeypatch.setenv("PACSAI_PACS_PASSWORD", "s3cret-pw")
    monkeypatch.setenv("PACSAI_PACS_TIMEOUT", "12.5")
    monkeypatch.setenv("PACSAI_PACS_RETRIES", "3")
    pacs = connect()
    assert isinstance(pacs, DicomWebPacs) and isinstance(pacs, Pacs)
    assert isinstance(pacs.client, DICOMwebClient)
    assert pacs.url == "https://pacs.example/dicom-web"
    assert pacs.session.auth == ("alice", "s3cret-pw")
    assert pacs.session.verify is True
    adapter = pacs.session.get_adapter("https://pacs.example/")
    assert adapter._timeout == (10.0, 12.5)
    retry = adapter.max_retries
    assert retry.total == 3 and retry.read == 3 and retry.connect == 2
    assert set(retry.status_forcelist) == {429, 500, 502, 503, 504}
    assert retry.backoff_factor > 0
    assert "s3cret-pw" not in repr(pacs)


def test_bearer_token_wins_over_basic_auth():
    pacs = connect("https://pacs.example/dicom-web", user="alice", password="pw", token="tok123")
    assert pacs.session.headers["Authorization"] == "Bearer tok123"
    assert pacs.session.auth is None


def test_tls_options(tmp_path):
    bundle = tmp_path / "ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    with_bundle = connect("https://pacs.example/dicom-web", ca_bundle=bundle)
    assert with_bundle.session.verify == str(bundle)
    assert with_bundle.session.get_adapter("https://pacs.example/")._verify == str(bundle)
    insecure = connect("https://pacs.example/dicom-web", verify=False)
    # Applied in the adapter too, because requests lets REQUESTS_CA_BUNDLE override session.verify.
    assert insecure.session.get_adapter("https://pacs.example/")._verify is False


def test_credentials_in_the_url_are_moved_out_of_it():
    pacs = connect("https://bob:hunter2@pacs.example:8443/dicom-web")
    assert pacs.url == "https://pacs.example:8443/dicom-web"
    assert pacs.session.auth == ("bob", "hunter2")
    assert redact_url("http://u:p@h/x?y=1") == "http://h/x?y=1"


def test_unsupported_scheme():
    with pytest.raises(PacsError, match="unsupported PACS URL 'ftp://host/x'"):
        connect("ftp://user:pw@host/x")


# -- against real servers ------------------------------------------------------------------------------------


def test_ping_both_back_ends(pacs: Pacs):
    pacs.store([], progress=False)  # an embedded store exists once stored into (even nothing)
    assert 0 <= pacs.ping() < 10


def test_wrong_password_is_an_auth_error(orthanc, tmp_path):
    pacs = connect(orthanc.url, user=orthanc.user, password="wrong-password", cache_dir=tmp_path)
    with pytest.raises(PacsAuthError) as info:
        pacs.ping()
    message = str(info.value)
    assert orthanc.url in message and "HTTP 401" in message and "PACSAI_PACS_PASSWORD" in message
    assert "wrong-password" not in message


def test_no_credentials_is_an_auth_error(orthanc, tmp_path):
    with pytest.raises(PacsAuthError, match="no credentials"):
        connect(orthanc.url, cache_dir=tmp_path).search_studies()


def test_stopped_server_is_a_connection_error(stopped_server_url, tmp_path):
    pacs = connect(stopped_server_url, user="x", password="y", retries=1, cache_dir=tmp_path)
    start = time.monotonic()
    with pytest.raises(PacsConnectionError, match="connection refused") as info:
        pacs.ping()
    assert stopped_server_url in str(info.value)
    assert not isinstance(info.value, PacsTimeoutError)
    assert time.monotonic() - start < 10


def test_missing_embedded_store_fails_ping(tmp_path):
    pacs = connect(f"file://{tmp_path / 'store'}")
    with pytest.raises(PacsNotFoundError, match=f"no embedded store at {tmp_path / 'store'}") as info:
        pacs.ping()
    assert "pacsai pacs push" in str(info.value)  # the fix
    assert not (tmp_path / "store").exists()


# -- retries and timeouts against a small real HTTP server -----------------------------------------------------


class _Flaky(BaseHTTPRequestHandler):
    """Answers 503 to the first ``fail`` requests, then 200 with an empty QIDO result; or sleeps."""

    fail = 2
    sleep = 0.0
    seen: list[str]

    def do_GET(self) -> None:
        self.seen.append(self.path)
        if self.sleep:
            time.sleep(self.sleep)
        if len(self.seen) <= self.fail:
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = b"[]"
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except BrokenPipeError:
            pass  # the client gave up (timeout test)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def flaky() -> Iterator[tuple[str, type[_Flaky]]]:
    handler = type("Handler", (_Flaky,), {"seen": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/dicom-web", handler
    finally:
        server.shutdown()
        server.server_close()


def test_retries_with_backoff_on_503(flaky, tmp_path, monkeypatch):
    url, handler = flaky
    pacs = connect(url, retries=3, cache_dir=tmp_path)
    pacs.session.get_adapter(url).max_retries.backoff_factor = 0.01  # keep the test fast
    assert pacs.ping() >= 0
    assert len(handler.seen) == 3  # two 503 answers, then success


def test_retries_exhausted_is_a_clear_error(flaky, tmp_path):
    url, handler = flaky
    handler.fail = 100
    pacs = connect(url, retries=1, cache_dir=tmp_path)
    pacs.session.get_adapter(url).max_retries.backoff_factor = 0.01
    with pytest.raises(PacsError, match="503"):
        pacs.ping()
    assert len(handler.seen) == 2


def test_silent_server_is_a_timeout(flaky, tmp_path):
    url, handler = flaky
    handler.fail, handler.sleep = 0, 1.5
    pacs = connect(url, retries=0, timeout=0.3, cache_dir=tmp_path)
    with pytest.raises(PacsTimeoutError, match="PACSAI_PACS_TIMEOUT"):
        pacs.ping()


# -- the local Orthanc launcher ------------------------------------------------------------------------------


def test_launcher_names_what_is_missing(tmp_path):
    from pacsai.pacs.orthanc import orthanc_available, start_orthanc

    missing = tmp_path / "Orthanc"
    assert orthanc_available(binary=missing) == (
        f"Orthanc binary not found at {missing}; install the Debian packages orthanc orthanc-dicomweb"
    )
    with pytest.raises(PacsError, match="Orthanc binary not found"):
        start_orthanc(tmp_path / "work", binary=missing)


def test_orthanc_fixture_server_is_local_and_authenticated(orthanc):
    import json

    import requests

    config = json.loads((orthanc.workdir / "orthanc.json").read_text())
    assert config["AuthenticationEnabled"] is True and config["RemoteAccessAllowed"] is False
    assert config["DicomServerEnabled"] is False
    assert orthanc.url == f"{orthanc.rest_url}/dicom-web" and orthanc.rest_url.startswith("http://127.0.0.1:")
    assert requests.get(f"{orthanc.rest_url}/system", timeout=10).status_code == 401
    assert (
        requests.get(f"{orthanc.rest_url}/system", auth=orthanc.auth, timeout=10).json()["Version"]
        == "1.10.1"
    )
