"""PACS access: the only code in pacsai that talks to a PACS.

``connect(url)`` → a :class:`Pacs` (a protocol): ``ping``, ``search`` / ``search_studies|series|instances``
(DataFrames), ``retrieve_series`` / ``retrieve_study`` (Part-10 files in the local cache) and ``store``
(idempotent). ``http(s)://`` URLs reach any DICOMweb server (:class:`DicomWebPacs`); ``file://FOLDER`` or a
plain folder path (default ``file://./pacs``) the embedded store (:class:`EmbeddedPacs`).
``start_orthanc`` / ``local_orthanc`` run a local Orthanc (tests, benchmarks, a laptop).

Modules, in data-flow order (each imports only modules above it; ``tests/test_pacs_layers.py`` checks):

* leaves: ``address`` (URLs, folders, redaction), ``dicomjson`` (DICOM JSON values), ``transport`` (HTTP
  session, retries, error translation), ``credentials`` (where logins come from), ``cache`` (the instance
  cache), ``query`` (filters, QIDO parameters, DICOM JSON → DataFrame), ``store`` (what is storable; the store
  run), ``multipart`` (WADO-RS multipart → cache files), ``storeindex`` (the embedded index's descriptions);
* ``retrieve`` (series retrieval over any :class:`~pacsai.pacs.retrieve.SeriesSource`), ``base`` (the protocol);
* back ends: ``wado`` + ``dicomweb`` (DICOMweb), ``embedded`` (the embedded store);
* ``factory`` (``connect``: the one place that picks a back end); ``orthanc`` (a local server). The verb is
  :mod:`pacsai.commands.pacs`.

Names other than ``connect`` and ``Pacs`` are imported on first use, so that ``pacsai pacs ping`` starts fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pacsai import lazy
from pacsai.pacs.base import Pacs
from pacsai.pacs.factory import connect

if TYPE_CHECKING:  # pragma: no cover
    from pacsai.pacs.cache import InstanceCache, SeriesManifest
    from pacsai.pacs.dicomweb import DicomWebPacs
    from pacsai.pacs.embedded import EmbeddedPacs
    from pacsai.pacs.orthanc import OrthancServer, local_orthanc, start_orthanc
    from pacsai.pacs.store import StoreSummary

_LAZY = {
    "DicomWebPacs": "pacsai.pacs.dicomweb",
    "EmbeddedPacs": "pacsai.pacs.embedded",
    "InstanceCache": "pacsai.pacs.cache",
    "SeriesManifest": "pacsai.pacs.cache",
    "OrthancServer": "pacsai.pacs.orthanc",
    "local_orthanc": "pacsai.pacs.orthanc",
    "start_orthanc": "pacsai.pacs.orthanc",
    "StoreSummary": "pacsai.pacs.store",
}


def __getattr__(name: str) -> object:
    return lazy.attribute(__name__, _LAZY, name, globals())


__all__ = [
    "DicomWebPacs",
    "EmbeddedPacs",
    "InstanceCache",
    "OrthancServer",
    "Pacs",
    "SeriesManifest",
    "StoreSummary",
    "connect",
    "local_orthanc",
    "start_orthanc",
]
