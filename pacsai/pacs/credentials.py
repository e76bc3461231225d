"""Where PACS credentials come from, in this order: explicit arguments (or ``user:password@`` in the URL) >
environment (``PACSAI_PACS_USER`` / ``PACSAI_PACS_PASSWORD`` / ``PACSAI_PACS_TOKEN``) > ``.env`` > a netrc file.

The netrc file is ``PACSAI_PACS_NETRC`` if set, else what ``requests`` and curl read: ``$NETRC``, else
``~/.netrc`` (``~/_netrc`` on Windows). Its entry for the PACS host (or its ``default`` entry) is used only when
neither a user nor a token is configured, or to supply the password of the configured user when none is set.

Never from the command line: other users can read a process's arguments. Passwords never appear in a
``repr``, a message or a log line; errors name the file and line, not the offending text (a malformed netrc
line may be the password itself).
"""

from __future__ import annotations

import contextlib
import logging
import netrc
import os
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from pacsai.errors import ConfigError
from pacsai.pacs.address import redact_url

if TYPE_CHECKING:  # pragma: no cover
    from pacsai.config import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Credentials:
    """Resolved credentials for one PACS; ``source`` says where the user/token came from (for messages)."""

    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    source: str = "none"


def netrc_path(settings: Settings) -> tuple[Path | None, bool]:
    """The netrc file to read and whether it was asked for explicitly (then a missing file is an error)."""
    if settings.pacs_netrc is not None:
        return Path(settings.pacs_netrc).expanduser(), True
    env = os.environ.get("NETRC")
    if env:
        return Path(env).expanduser(), False
    home = Path("~").expanduser()
    for name in (".netrc", "_netrc"):
        if (home / name).is_file():
            return home / name, False
    return None, False


def netrc_login(host: str, path: Path, *, required: bool = False) -> tuple[str, str] | None:
    """``(login, password)`` of ``host``'s entry (or the ``default`` entry) in the netrc file ``path``."""
    if not path.is_file():
        if required:
            raise ConfigError(
                f"netrc file {path} (PACSAI_PACS_NETRC) does not exist; create it or unset PACSAI_PACS_NETRC"
            )
        return None
    try:
        entry = netrc.netrc(str(path)).authenticators(host)
    except netrc.NetrcParseError as err:
        raise ConfigError(
            f"cannot parse netrc file {path} near line {err.lineno}; fix that entry "
            "('machine HOST login USER password PASSWORD') or point PACSAI_PACS_NETRC elsewhere"
        ) from None  # the parser's message quotes the offending token, which may be a password
    except OSError as err:
        raise ConfigError(f"cannot read netrc file {path}: {err.strerror}; check its permissions") from None
    if entry is None or not entry[0]:
        return None
    mode = path.stat().st_mode
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        logger.warning("netrc file %s is readable by other users; chmod 600 it", path)
    return entry[0], entry[2] or ""


def resolve_credentials(
    url: str,
    *,
    user: str | None,
    password: str | None,
    token: str | None,
    settings: Settings,
) -> Credentials:
    """Credentials for ``url`` by the precedence in the module docstring."""
    parts = urlsplit(url)
    source = "argument" if (user is not None or token is not None) else "none"
    if user is None and parts.username is not None:
        # URLs carry user and password percent-encoded (p%40ss for p@ss)
        user, source = unquote(parts.username), "URL"
        if password is None and parts.password is not None:
            password = unquote(parts.password)
    if token is None and settings.pacs_token is not None and settings.pacs_token.get_secret_value():
        token, source = settings.pacs_token.get_secret_value(), ("environment" if user is None else source)
    if user is None and settings.pacs_user:
        user, source = settings.pacs_user, "environment"
    if password is None and settings.pacs_password is not None:
        password = settings.pacs_password.get_secret_value()
    if token is None and (user is None or password is None):
        path, required = netrc_path(settings)
        found = netrc_login(parts.hostname or "", path, required=required) if path is not None else None
        if found is not None:
            login, secret = found
            if user is None:
                user, password, source = login, secret, f"netrc {path}"
            elif login == user:
                password = secret
    return Credentials(user=user, password=password, token=token, source=source)


_ENVIRON_LOCK = threading.RLock()


@contextlib.contextmanager
def credentials_out_of_url(url: str) -> Iterator[str]:
    """Yield ``url`` without ``user:password@``; meanwhile those credentials are in this process's environment.

    Notebook kernels (reports, validation) reconnect by URL, but the URL goes into the notebook, its HTML,
    metrics.json and MLflow, so it must not carry the password: the kernel inherits it from the environment
    instead, the way it would inherit ``PACSAI_PACS_PASSWORD`` from the user.
    """
    parts = urlsplit(url) if "://" in url else None
    if parts is None or parts.username is None:
        yield url
        return
    values = {"PACSAI_PACS_USER": unquote(parts.username)}
    if parts.password is not None:  # user@host only: the password still comes from the environment or netrc
        values["PACSAI_PACS_PASSWORD"] = unquote(parts.password)
    # The environment is the process's: threads running reports side by side (a threaded Dask worker) take
    # turns here, so that one never starts its kernel with another's login, or with none.
    with _ENVIRON_LOCK:
        saved = {k: os.environ.get(k) for k in values}
        os.environ.update(values)
        try:
            yield redact_url(url)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


__all__ = ["Credentials", "credentials_out_of_url", "netrc_login", "netrc_path", "resolve_credentials"]
