"""Where a PACS is: URLs and folders, and the URL as it may be shown (without credentials).

A PACS is named by ``http(s)://host/.../dicom-web`` (a DICOMweb server), ``file://FOLDER`` or a plain folder
path such as ``./pacs`` (the embedded store). Nothing here touches the network or the disk.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from pacsai.errors import PacsError

#: URL schemes of DICOMweb servers.
WEB_SCHEMES = ("http", "https")


def redact_url(url: str) -> str:
    """``url`` without any ``user:password@`` part, for messages and logs."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def is_folder(url: str) -> bool:
    """Whether ``url`` names the embedded store: a ``file://`` URL or a plain path (no ``scheme://``)."""
    return "://" not in url or urlsplit(url).scheme.lower() == "file"


def embedded_path(url: str) -> Path:
    """The folder of the embedded store named by ``url`` (``file://FOLDER`` or a plain path).

    ``file://./pacs``, ``file://pacs`` and ``./pacs`` are relative to the working directory.

    Raises
    ------
    PacsError
        ``url`` names no folder.
    """
    rest = url[len("file://") :] if url.lower().startswith("file://") else url
    if not rest.strip():
        raise PacsError(f"{url!r} names no folder; use e.g. ./pacs, file://./pacs or file:///data/pacs")
    return Path(rest).expanduser().absolute()


def store_url(folder: Path) -> str:
    """The canonical ``file://`` URL of an embedded store folder (absolute; dicomweb-client reads it verbatim)."""
    return f"file://{folder}"


__all__ = ["WEB_SCHEMES", "embedded_path", "is_folder", "redact_url", "store_url"]
