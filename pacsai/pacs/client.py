"""Connect to a PACS: any DICOMweb server over http(s), or the embedded store (``file://``).

``connect()`` returns a :class:`Pacs`, which wraps a dicomweb-client client (``Pacs.client``):
``DICOMwebClient`` with a tuned ``requests`` session for http(s), ``DICOMfileClient`` (SQLite index) for
``file://``. The same methods work on both back ends.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from pacsai.config import DEFAULT_PACS_URL, Settings, load_settings
from pacsai.errors import (
    PacsaiWarning,
    PacsAuthError,
    PacsConnectionError,
    PacsError,
    PacsNotFoundError,
    PacsTimeoutError,
)
from pacsai.pacs.cache import InstanceCache

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    import pydicom

    from pacsai.pacs.store import StoreSummary

logger = logging.getLogger(__name__)

RETRY_STATUSES = (429, 500, 502, 503, 504)


@dataclass(frozen=True)
class HttpOptions:
    """How the http(s) session behaves (from :class:`pacsai.config.Settings` unless given).

    ``retries`` count per request (and, for bodies that break off during a retrieval, per stretch without
    progress: see :mod:`pacsai.pacs.retrieve`). Between retries urllib3 waits ``backoff * 2**(n-1)`` seconds
    (none before the first; at most ``backoff_max``), or what the server's ``Retry-After`` asks (at most
    ``retry_after_max``). A read timeout is retried only ``timeout_retries`` times whatever ``retries`` says:
    a server that accepted and stopped answering rarely recovers within seconds, and ``retries x timeout``
    would turn a dead PACS into minutes of silence (5 x 30 s with the defaults; capped, 2 x 30 s).
    """

    timeout: float
    connect_timeout: float
    retries: int
    backoff: float = 0.5
    backoff_max: float = 30.0
    retry_after_max: float = 60.0
    timeout_retries: int = 1


class _Retry(Retry):
    """urllib3's Retry with two caps (see :class:`HttpOptions`): read timeouts are retried at most
    ``timeout_retries`` times, and a ``Retry-After`` is obeyed up to ``retry_after_max`` seconds (a PACS
    asking for an hour must not freeze a run for an hour)."""

    def __init__(
        self, *args: Any, timeout_retries: int = 1, retry_after_cap: float = 60.0, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.timeout_retries = timeout_retries
        self.retry_after_cap = retry_after_cap

    def new(self, **kw: Any) -> _Retry:
        kw.setdefault("timeout_retries", self.timeout_retries)
        kw.setdefault("retry_after_cap", self.retry_after_cap)
        return super().new(**kw)

    def increment(  # type: ignore[override]
        self,
        method: str | None = None,
        url: str | None = None,
        response: Any = None,
        error: Exception | None = None,
        _pool: Any = None,
        _stacktrace: Any = None,
    ) -> _Retry:
        if isinstance(error, urllib3.exceptions.ReadTimeoutError):
            earlier = sum(isinstance(h.error, urllib3.exceptions.ReadTimeoutError) for h in self.history)
            if earlier >= self.timeout_retries:
                raise urllib3.exceptions.MaxRetryError(_pool, url or "", error) from error
        return super().increment(method, url, response, error, _pool, _stacktrace)

    def get_retry_after(self, response: Any) -> float | None:
        seconds = super().get_retry_after(response)
        return None if seconds is None else min(seconds, self.retry_after_cap)


class _TimeoutAdapter(HTTPAdapter):
    """An HTTPAdapter with a default timeout: ``requests`` has none, and a silent PACS must not hang a run."""

    def __init__(self, *, timeout: tuple[float, float], verify: bool | str, **kwargs: Any) -> None:
        self._timeout = timeout
        self._verify = verify
        super().__init__(**kwargs)

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self._timeout
        # requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE override session.verify (even verify=False);
        # the caller's choice must win, so it is applied here, after requests merged the environment in.
        kwargs["verify"] = self._verify
        return super().send(request, **kwargs)


def redact_url(url: str) -> str:
    """``url`` without any ``user:password@`` part, for messages and logs."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def embedded_path(url: str) -> Path:
    """The folder of a ``file://`` URL; ``file://./pacs`` and ``file://pacs`` are relative to the working dir."""
    rest = url[len("file://") :]
    if not rest:
        raise PacsError(f"{url!r} names no folder; use e.g. file://./pacs or file:///data/pacs")
    return Path(rest).expanduser().absolute()


def build_session(
    *,
    user: str | None,
    password: str | None,
    token: str | None,
    verify: bool,
    ca_bundle: Path | None,
    options: HttpOptions,
) -> requests.Session:
    """A ``requests`` session: default timeouts, retries with backoff on 429/5xx and dropped connections,
    basic or bearer authentication, TLS verification (on by default, or against ``ca_bundle``).
    """
    session = requests.Session()
    retry = _Retry(
        total=options.retries,
        # A refused connection is usually a wrong URL or a stopped server: retry it less than a dropped one.
        connect=min(options.retries, 2),
        read=options.retries,
        status=options.retries,
        backoff_factor=options.backoff,
        backoff_max=options.backoff_max,
        status_forcelist=RETRY_STATUSES,
        # STOW of the same SOP instances is idempotent on a PACS, so POST may be retried too.
        allowed_methods=frozenset({"GET", "HEAD", "OPTIONS", "POST", "DELETE"}),
        raise_on_status=False,
        respect_retry_after_header=True,
        timeout_retries=options.timeout_retries,
        retry_after_cap=options.retry_after_max,
    )
    tls: bool | str = str(ca_bundle) if (verify and ca_bundle) else verify
    adapter = _TimeoutAdapter(
        timeout=(options.connect_timeout, options.timeout), verify=tls, max_retries=retry
    )
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    elif user is not None:
        session.auth = (user, password or "")
    session.verify = tls
    return session


@contextmanager
def pacs_errors(url: str, *, what: str, user: str | None = None) -> Iterator[None]:
    """Translate ``requests`` failures into :class:`PacsError` subclasses that name the URL and the fix."""
    try:
        yield
    except requests.HTTPError as err:
        raise http_error(err.response, url, what=what, user=user) from err
    except requests.exceptions.SSLError as err:
        raise PacsConnectionError(
            f"TLS verification failed for {url} while trying to {what}: {_reason(err)}; "
            "set PACSAI_PACS_CA_BUNDLE (or --ca-bundle) to your hospital's CA bundle"
        ) from err
    except (requests.exceptions.ConnectTimeout, requests.exceptions.ReadTimeout, TimeoutError) as err:
        raise _timeout(url, what) from err
    except requests.exceptions.RetryError as err:
        raise PacsConnectionError(
            f"{url} kept failing while trying to {what} ({_reason(err)}); retries exhausted, try again later"
        ) from err
    except requests.ConnectionError as err:
        if _is_timeout(err):  # requests reports a read timeout after exhausted retries as a ConnectionError
            raise _timeout(url, what) from err
        raise PacsConnectionError(
            f"cannot reach {url} while trying to {what}: {_reason(err)}; "
            "check the URL (PACSAI_PACS_URL / --pacs) and that the server is running"
        ) from err
    except requests.RequestException as err:
        raise PacsError(f"request to {url} failed while trying to {what}: {_reason(err)}") from err


def _timeout(url: str, what: str) -> PacsTimeoutError:
    return PacsTimeoutError(
        f"{url} did not answer in time while trying to {what}; "
        "raise PACSAI_PACS_TIMEOUT or check the server's load"
    )


def _is_timeout(err: BaseException) -> bool:
    seen: set[int] = set()
    todo: list[BaseException | None] = [err]
    while todo:
        inner = todo.pop()
        if inner is None or id(inner) in seen:
            continue
        seen.add(id(inner))
        # urllib3's NewConnectionError (refused) subclasses ConnectTimeoutError for old reasons: not a timeout.
        if isinstance(inner, urllib3.exceptions.NewConnectionError):
            continue
        if isinstance(inner, (TimeoutError, urllib3.exceptions.TimeoutError)):
            return True
        reason = getattr(inner, "reason", None)
        links = (reason, inner.__cause__, inner.__context__, *inner.args)
        todo.extend(a for a in links if isinstance(a, BaseException))
    return False


def http_error(response: requests.Response | None, url: str, *, what: str, user: str | None) -> PacsError:
    """The :class:`PacsError` for an HTTP error answer."""
    status = response.status_code if response is not None else 0
    if status in (401, 403):
        who = f"user {user!r}" if user else "no credentials"
        return PacsAuthError(
            f"{url} refused access (HTTP {status}) with {who} while trying to {what}; "
            "set PACSAI_PACS_USER and PACSAI_PACS_PASSWORD (or PACSAI_PACS_TOKEN, or a netrc entry for the host) "
            "to valid credentials"
        )
    if status == 404:
        return PacsNotFoundError(
            f"{url} answered 404 Not Found while trying to {what}; check the UIDs and the base URL "
            "(it must end at the DICOMweb root, e.g. .../dicom-web)"
        )
    detail = ""
    if response is not None:
        detail = " ".join(response.text[:200].split())
    return PacsError(f"{url} answered HTTP {status} while trying to {what}: {detail or 'no detail'}")


def _reason(err: BaseException) -> str:
    # requests nests urllib3 errors; the innermost reason is the readable one ("Connection refused").
    inner: BaseException | None = err
    while inner is not None:
        reason = getattr(inner, "reason", None)
        if isinstance(reason, BaseException):
            inner = reason
            continue
        args = getattr(inner, "args", ())
        if args and isinstance(args[0], BaseException) and args[0] is not inner:
            inner = args[0]
            continue
        break
    text = str(inner) if inner is not None else str(err)
    if "Connection refused" in text or "Errno 111" in text:
        return "connection refused"
    return text.split(": ", 1)[-1] if len(text) > 200 else text


class Pacs:
    """A connection to one PACS. Create it with :func:`connect`.

    Attributes
    ----------
    url
        The base URL (credentials removed).
    client
        The dicomweb-client client: ``DICOMwebClient`` (http/https) or ``DICOMfileClient`` (``file://``).
    cache
        The local instance cache retrievals go into.
    session
        The ``requests`` session (http/https only; ``None`` for the embedded store).
    """

    def __init__(
        self,
        *,
        url: str,
        client: Any = None,
        client_factory: Callable[[], Any] | None = None,
        cache: InstanceCache,
        session: requests.Session | None = None,
        user: str | None = None,
    ) -> None:
        self.url = url
        # A DICOMwebClient is built on first use (client_factory): importing dicomweb-client and pydicom costs
        # about a second, which `pacsai pacs ping` does not need.
        self._client = client
        self._client_factory = client_factory
        self.cache = cache
        self.session = session
        self._user = user

    def __repr__(self) -> str:
        return f"Pacs({self.url!r}, cache={str(self.cache.root)!r})"

    @property
    def client(self) -> Any:
        """The dicomweb-client client (``DICOMwebClient`` or ``DICOMfileClient``)."""
        if self._client is None and self._client_factory is not None:
            self._client = self._client_factory()
        if self.session is None and self._client is not None:
            # The embedded store's SQLite index may be written by other processes (a report subprocess, a
            # seeding CLI). A connection kept open across their writes was seen to read a "malformed" image
            # (mmap + WAL), so every operation starts from a fresh connection; opening one costs ~0.1 ms.
            _reset_sqlite(self._client)
        return self._client

    @client.setter
    def client(self, value: Any) -> None:
        self._client = value

    @property
    def is_embedded(self) -> bool:
        """Whether this is the embedded ``file://`` store."""
        return self.session is None

    @property
    def path(self) -> Path | None:
        """The folder of the embedded store (``None`` for a DICOMweb server)."""
        return embedded_path(self.url) if self.is_embedded else None

    @contextmanager
    def errors(self, what: str) -> Iterator[None]:
        """Context in which ``requests`` failures become :class:`PacsError` subclasses naming this PACS."""
        with pacs_errors(self.url, what=what, user=self._user):
            yield

    def close(self) -> None:
        """Release the HTTP connections."""
        if self.session is not None:
            self.session.close()

    def __enter__(self) -> Pacs:  # noqa: PYI034 (Pacs is not meant to be subclassed)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- verbs ---------------------------------------------------------------------------------------------
    def ping(self) -> float:
        """Check that the PACS answers and accepts the credentials.

        Returns
        -------
        float
            Round-trip time in seconds.

        Raises
        ------
        PacsAuthError, PacsConnectionError, PacsTimeoutError, PacsError
        """
        start = time.perf_counter()
        if self.session is None:
            folder = embedded_path(self.url)
            if not folder.is_dir():
                raise PacsConnectionError(
                    f"embedded store {self.url} does not exist ({folder}); push data first"
                )
            self.client.search_for_studies(limit=1)
        else:
            with self.errors("ping (QIDO search for one study)"):
                answer = self.session.get(
                    f"{self.url}/studies", params={"limit": "1"}, headers={"Accept": "application/dicom+json"}
                )
                answer.raise_for_status()
        return time.perf_counter() - start

    def search_studies(self, **filters: Any) -> pd.DataFrame:
        """Search studies; see :func:`pacsai.pacs.query.search` for filters and columns."""
        from pacsai.pacs.query import search

        return search(self, "studies", filters)

    def search_series(self, **filters: Any) -> pd.DataFrame:
        """Search series; see :func:`pacsai.pacs.query.search` for filters and columns."""
        from pacsai.pacs.query import search

        return search(self, "series", filters)

    def search_instances(self, **filters: Any) -> pd.DataFrame:
        """Search instances; see :func:`pacsai.pacs.query.search` for filters and columns."""
        from pacsai.pacs.query import search

        return search(self, "instances", filters)

    def retrieve_series(
        self, study_uid: str, series_uid: str, *, progress: bool = True, refresh: bool = False
    ) -> list[Path]:
        """Part-10 files of one series in the local cache; see :func:`pacsai.pacs.retrieve.retrieve_series`."""
        from pacsai.pacs.retrieve import retrieve_series

        return retrieve_series(self, study_uid, series_uid, progress=progress, refresh=refresh)

    def retrieve_study(self, study_uid: str, *, progress: bool = True) -> dict[str, list[Path]]:
        """Every series of a study in the local cache: ``{SeriesInstanceUID: [paths]}``."""
        from pacsai.pacs.retrieve import retrieve_study

        return retrieve_study(self, study_uid, progress=progress)

    def store(
        self,
        items: str | Path | pydicom.Dataset | Iterable[str | Path | pydicom.Dataset],
        *,
        progress: bool = True,
    ) -> StoreSummary:
        """Send files, folders (walked recursively) or datasets; see :func:`pacsai.pacs.store.store`."""
        from pacsai.pacs.store import store

        return store(self, items, progress=progress)


def connect(
    url: str | None = None,
    *,
    user: str | None = None,
    password: str | None = None,
    token: str | None = None,
    verify: bool | None = None,
    ca_bundle: str | Path | None = None,
    timeout: float | None = None,
    cache_dir: str | Path | None = None,
    retries: int | None = None,
    settings: Settings | None = None,
) -> Pacs:
    """Connect to a PACS.

    Parameters
    ----------
    url
        ``http(s)://host/.../dicom-web`` for a DICOMweb server, ``file://FOLDER`` for the embedded store
        (``file://./pacs`` is relative to the working directory). Default: ``PACSAI_PACS_URL``, else
        ``file://./pacs``.
    user, password
        HTTP basic authentication. Default ``PACSAI_PACS_USER`` / ``PACSAI_PACS_PASSWORD``.
    token
        Bearer token (wins over user/password). Default ``PACSAI_PACS_TOKEN``.
    verify
        Verify TLS certificates (default on).
    ca_bundle
        CA bundle file for the server's certificate. Default ``PACSAI_PACS_CA_BUNDLE``.
    timeout
        Seconds to wait for an answer. Default ``PACSAI_PACS_TIMEOUT``.
    cache_dir
        Instance cache folder. Default ``PACSAI_CACHE_DIR``.
    retries
        Retries on 429/5xx and dropped connections. Default ``PACSAI_PACS_RETRIES``.
    settings
        Settings to take the defaults from (default :func:`pacsai.config.load_settings`).

    Returns
    -------
    Pacs

    Raises
    ------
    PacsError
        The URL scheme is not supported or the embedded store cannot be opened.
    """
    settings = settings or load_settings()
    url = (url or settings.pacs_url or DEFAULT_PACS_URL).strip()
    cache = InstanceCache(cache_dir if cache_dir is not None else settings.cache_dir)
    scheme = urlsplit(url).scheme.lower()
    if scheme == "file":
        return _connect_embedded(url, cache)
    if scheme not in ("http", "https"):
        raise PacsError(
            f"unsupported PACS URL {redact_url(url)!r}; use http(s)://.../dicom-web or file://FOLDER"
        )

    from pacsai.pacs.credentials import resolve_credentials

    # Credentials in the URL are accepted but moved out of it, so that no message or log shows them.
    # Precedence: arguments (or the URL) > environment > .env > netrc (see pacsai.pacs.credentials).
    creds = resolve_credentials(url, user=user, password=password, token=token, settings=settings)
    user, password, token = creds.user, creds.password, creds.token
    url = redact_url(url).rstrip("/")
    verify = settings.pacs_verify if verify is None else verify
    if not verify and scheme == "https":
        warnings.warn(
            f"TLS certificate verification is off for {url}: anyone on the network path can read the "
            "images and credentials; give the hospital CA with PACSAI_PACS_CA_BUNDLE / --ca-bundle instead",
            PacsaiWarning,
            stacklevel=2,
        )
    options = HttpOptions(
        timeout=float(timeout if timeout is not None else settings.pacs_timeout),
        connect_timeout=float(min(settings.pacs_connect_timeout, timeout or settings.pacs_connect_timeout)),
        retries=int(retries if retries is not None else settings.pacs_retries),
    )
    session = build_session(
        user=user,
        password=password,
        token=token,
        verify=verify,
        ca_bundle=Path(ca_bundle) if ca_bundle is not None else settings.pacs_ca_bundle,
        options=options,
    )

    def make_client() -> Any:
        from dicomweb_client.api import DICOMwebClient

        return DICOMwebClient(url=url, session=session, timeout=(options.connect_timeout, options.timeout))

    logger.debug("connected to DICOMweb server %s (credentials: %s)", url, creds.source)
    return Pacs(url=url, client_factory=make_client, cache=cache, session=session, user=user)


def _connect_embedded(url: str, cache: InstanceCache) -> Pacs:
    folder = embedded_path(url)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PacsError(
            f"cannot create the embedded store {folder}: {err}; pick a writable file:// folder"
        ) from err
    from dicomweb_client.api import DICOMfileClient

    # dicomweb-client reads the folder from the URL path verbatim (no percent-decoding), so pass it raw.
    normalized = f"file://{folder}"
    try:
        client = DICOMfileClient(url=normalized)
    except Exception as err:  # sqlite3 / OS errors from dicomweb-client's index
        raise PacsError(f"cannot open the embedded store {folder}: {err}") from err
    return Pacs(url=normalized, client=client, cache=cache)


def _reset_sqlite(client: Any) -> None:
    client = getattr(client, "_db_manager", client)  # dicomweb-client ≥ 0.60 keeps the handles there
    conn = getattr(client, "_db_connection_handle", None)
    if conn is None:
        return
    cursor = getattr(client, "_db_cursor_handle", None)
    try:
        if cursor is not None:
            cursor.close()
        conn.commit()
        conn.close()
    finally:
        client._db_cursor_handle = None
        client._db_connection_handle = None


def dicom_json_value(item: Mapping[str, Any], tag: str) -> Any:
    """First value of ``tag`` (8 hex digits) in a DICOM JSON object, or ``None``."""
    values = (item.get(tag) or {}).get("Value") or []
    return values[0] if values else None
