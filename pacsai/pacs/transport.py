"""HTTP for DICOMweb: a ``requests`` session with timeouts, retries and authentication, and the translation of
its failures into :class:`PacsError` subclasses that name the URL and the fix.

A leaf: imports nothing from the rest of :mod:`pacsai.pacs`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from pacsai.errors import (
    PacsAuthError,
    PacsConnectionError,
    PacsError,
    PacsNotFoundError,
    PacsTimeoutError,
)

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

    def increment(
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

    def send(
        self,
        request: requests.PreparedRequest,
        stream: bool = False,
        timeout: float | tuple[float | None, float | None] | None = None,
        verify: bool | str = True,
        cert: str | tuple[str, str] | None = None,
        proxies: dict[str, str] | None = None,
    ) -> requests.Response:
        # requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE override session.verify (even verify=False);
        # the caller's choice must win, so it is applied here (``verify`` is ignored), after requests merged the
        # environment in.
        return super().send(
            request,
            stream=stream,
            timeout=self._timeout if timeout is None else timeout,
            verify=self._verify,
            cert=cert,
            proxies=proxies,
        )


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
def http_errors(url: str, *, what: str, user: str | None = None) -> Iterator[None]:
    """Translate ``requests`` failures into :class:`PacsError` subclasses that name the URL and the fix."""
    try:
        yield
    except requests.HTTPError as err:
        raise http_error(err.response, url, what=what, user=user) from err
    except requests.exceptions.SSLError as err:
        raise PacsConnectionError(
            f"TLS verification failed for {url} while trying to {what}: {failure_reason(err)}; "
            "set PACSAI_PACS_CA_BUNDLE (or --ca-bundle) to your hospital's CA bundle"
        ) from err
    except (requests.exceptions.ConnectTimeout, requests.exceptions.ReadTimeout, TimeoutError) as err:
        raise timeout_error(url, what) from err
    except requests.exceptions.RetryError as err:
        raise PacsConnectionError(
            f"{url} kept failing while trying to {what} ({failure_reason(err)}); retries exhausted, try again later"
        ) from err
    except requests.ConnectionError as err:
        if is_timeout(err):  # requests reports a read timeout after exhausted retries as a ConnectionError
            raise timeout_error(url, what) from err
        raise PacsConnectionError(
            f"cannot reach {url} while trying to {what}: {failure_reason(err)}; "
            "check the URL (PACSAI_PACS_URL / --pacs) and that the server is running"
        ) from err
    except requests.RequestException as err:
        raise PacsError(f"request to {url} failed while trying to {what}: {failure_reason(err)}") from err


def timeout_error(url: str, what: str) -> PacsTimeoutError:
    return PacsTimeoutError(
        f"{url} did not answer in time while trying to {what}; "
        "raise PACSAI_PACS_TIMEOUT or check the server's load"
    )


def is_timeout(err: BaseException) -> bool:
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


def failure_reason(err: BaseException) -> str:
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


@dataclass(frozen=True)
class RetryPolicy:
    """The retry settings of a session (its adapter's urllib3 ``Retry``), for retries that urllib3 cannot make
    (bodies that break off after the headers)."""

    retries: int
    timeout_retries: int
    backoff: float
    backoff_max: float


def retry_policy(session: requests.Session, url: str) -> RetryPolicy:
    """The :class:`RetryPolicy` ``session`` applies to ``url``."""
    retry = getattr(session.get_adapter(url), "max_retries", None)
    if not isinstance(retry, Retry):  # an adapter pacsai did not mount: no retries of its own either
        return RetryPolicy(retries=0, timeout_retries=0, backoff=0.0, backoff_max=0.0)
    return RetryPolicy(
        retries=int(retry.total or 0) if not isinstance(retry.total, bool) else 0,
        timeout_retries=int(getattr(retry, "timeout_retries", 1)),
        backoff=float(retry.backoff_factor),
        backoff_max=float(retry.backoff_max),
    )


__all__ = [
    "RETRY_STATUSES",
    "HttpOptions",
    "RetryPolicy",
    "build_session",
    "http_error",
    "http_errors",
    "is_timeout",
    "failure_reason",
    "retry_policy",
    "timeout_error",
]
