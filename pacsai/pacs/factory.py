"""``connect(url)``: the one place that picks a back end (DICOMweb or embedded) from a URL and the settings."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from urllib.parse import urlsplit

from pacsai.config import DEFAULT_PACS_URL, Settings, load_settings
from pacsai.errors import PacsaiWarning, PacsError
from pacsai.pacs.address import WEB_SCHEMES, embedded_path, is_folder, redact_url
from pacsai.pacs.base import Pacs
from pacsai.pacs.cache import InstanceCache

logger = logging.getLogger(__name__)


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
        ``http(s)://host/.../dicom-web`` for a DICOMweb server; ``file://FOLDER`` or a plain folder path
        (``./pacs``, ``/data/pacs``) for the embedded store, relative paths against the working directory.
        Default: ``PACSAI_PACS_URL``, else ``file://./pacs``.
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
        A :class:`pacsai.pacs.dicomweb.DicomWebPacs` or :class:`pacsai.pacs.embedded.EmbeddedPacs`. Nothing is
        sent or created yet: an embedded store that does not exist is created by the first ``store`` and is an
        error for every other verb.

    Raises
    ------
    PacsError
        The URL scheme is not supported.
    """
    settings = settings or load_settings()
    url = (url or settings.pacs_url or DEFAULT_PACS_URL).strip()
    cache = InstanceCache(cache_dir if cache_dir is not None else settings.cache_dir)
    if is_folder(url):
        from pacsai.pacs.embedded import EmbeddedPacs

        return EmbeddedPacs(embedded_path(url), cache=cache, given_as=url)
    if urlsplit(url).scheme.lower() not in WEB_SCHEMES:
        raise PacsError(
            f"unsupported PACS URL {redact_url(url)!r}; use http(s)://.../dicom-web, file://FOLDER or a folder path"
        )
    return _connect_web(
        url, user=user, password=password, token=token, verify=verify, ca_bundle=ca_bundle, timeout=timeout,
        retries=retries, settings=settings, cache=cache,
    )


def _connect_web(
    url: str,
    *,
    user: str | None,
    password: str | None,
    token: str | None,
    verify: bool | None,
    ca_bundle: str | Path | None,
    timeout: float | None,
    retries: int | None,
    settings: Settings,
    cache: InstanceCache,
) -> Pacs:
    from pacsai.pacs.credentials import resolve_credentials
    from pacsai.pacs.dicomweb import DicomWebPacs
    from pacsai.pacs.transport import HttpOptions, build_session

    # Credentials in the URL are accepted but moved out of it, so that no message or log shows them.
    # Precedence: arguments (or the URL) > environment > .env > netrc (see pacsai.pacs.credentials).
    creds = resolve_credentials(url, user=user, password=password, token=token, settings=settings)
    url = redact_url(url).rstrip("/")
    verify = settings.pacs_verify if verify is None else verify
    if not verify and urlsplit(url).scheme.lower() == "https":
        warnings.warn(
            f"TLS certificate verification is off for {url}: anyone on the network path can read the "
            "images and credentials; give the hospital CA with PACSAI_PACS_CA_BUNDLE / --ca-bundle instead",
            PacsaiWarning,
            stacklevel=3,
        )
    options = HttpOptions(
        timeout=float(timeout if timeout is not None else settings.pacs_timeout),
        connect_timeout=float(min(settings.pacs_connect_timeout, timeout or settings.pacs_connect_timeout)),
        retries=int(retries if retries is not None else settings.pacs_retries),
    )
    session = build_session(
        user=creds.user,
        password=creds.password,
        token=creds.token,
        verify=verify,
        ca_bundle=Path(ca_bundle) if ca_bundle is not None else settings.pacs_ca_bundle,
        options=options,
    )
    logger.debug("connected to DICOMweb server %s (credentials: %s)", url, creds.source)
    return DicomWebPacs(
        url, session=session, cache=cache, user=creds.user, timeout=(options.connect_timeout, options.timeout)
    )


__all__ = ["connect"]
