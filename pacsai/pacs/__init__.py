"""PACS access: the only code in pacsai that talks to a PACS.

``connect(url)`` → :class:`Pacs` with ``ping``, ``search_studies/series/instances`` (DataFrames),
``retrieve_series/retrieve_study`` (Part-10 files in the local cache) and ``store`` (STOW-RS, idempotent).
``http(s)://`` URLs reach any DICOMweb server; ``file://`` URLs (default ``file://./pacs``) the embedded store.
``start_orthanc`` / ``local_orthanc`` run a local Orthanc (tests, benchmarks, a laptop).

Names other than ``connect`` and ``Pacs`` are imported on first use, so that ``pacsai pacs ping`` starts fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pacsai.pacs.client import Pacs, connect

if TYPE_CHECKING:  # pragma: no cover
    from pacsai.pacs.cache import InstanceCache, SeriesManifest
    from pacsai.pacs.orthanc import OrthancServer, local_orthanc, start_orthanc
    from pacsai.pacs.store import StoreSummary

_LAZY = {
    "InstanceCache": "pacsai.pacs.cache",
    "SeriesManifest": "pacsai.pacs.cache",
    "OrthancServer": "pacsai.pacs.orthanc",
    "local_orthanc": "pacsai.pacs.orthanc",
    "start_orthanc": "pacsai.pacs.orthanc",
    "StoreSummary": "pacsai.pacs.store",
}


def __getattr__(name: str) -> Any:
    try:
        module = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'pacsai.pacs' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "InstanceCache",
    "OrthancServer",
    "Pacs",
    "SeriesManifest",
    "StoreSummary",
    "connect",
    "local_orthanc",
    "start_orthanc",
]
