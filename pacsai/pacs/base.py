"""The PACS protocol: what every back end offers, and what the rest of pacsai may rely on.

Two back ends implement it: :class:`pacsai.pacs.dicomweb.DicomWebPacs` (any DICOMweb server over http(s)) and
:class:`pacsai.pacs.embedded.EmbeddedPacs` (a folder with a SQLite index). :func:`pacsai.pacs.connect` picks one
from the URL; nothing else in pacsai asks which one it holds.

The four verbs are ``search``, ``retrieve_series``, ``store`` and ``ping``; the other methods are defined here
once, on top of them, for every back end (an implementation inherits them by subclassing :class:`Pacs`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from pacsai.errors import PacsNotFoundError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from typing_extensions import Self

    from pacsai.pacs.cache import InstanceCache
    from pacsai.pacs.query import Level
    from pacsai.pacs.store import StoreItems, StoreSummary


@runtime_checkable
class Pacs(Protocol):
    """A connection to one PACS. Create it with :func:`pacsai.pacs.connect`.

    Attributes
    ----------
    url
        The PACS as messages, logs and notebooks name it: DICOMweb base URL without credentials, or
        ``file://FOLDER`` (absolute) for the embedded store. ``connect(pacs.url)`` reaches the same PACS.
    cache
        The local instance cache retrievals go into (shared by every connection with the same folder).
    """

    url: str
    cache: InstanceCache

    # -- the verbs -------------------------------------------------------------------------------------------
    def ping(self) -> float:
        """Check that the PACS answers (and accepts the credentials); the round trip in seconds.

        Raises
        ------
        PacsAuthError, PacsConnectionError, PacsTimeoutError, PacsNotFoundError, PacsError
        """
        ...

    def search(
        self, level: Level, filters: Mapping[str, object] | None = None, *, limit: int | None = None
    ) -> pd.DataFrame:
        """Search ``"studies"``, ``"series"`` or ``"instances"``; see :mod:`pacsai.pacs.query` for the filters
        (DICOM keywords, wildcards, ranges; every filter is applied again on the client) and the columns.

        Raises
        ------
        PacsError
            Unknown keyword, or an attribute the back end cannot return; PACS errors as for every call.
        """
        ...

    def retrieve_series(
        self, study_uid: str, series_uid: str, *, progress: bool = True, refresh: bool = False
    ) -> list[Path]:
        """Part-10 files of one series in the local cache (fetched only where missing).

        Parameters
        ----------
        study_uid, series_uid
            The series.
        progress
            Show a progress bar while fetching (it counts the instances this call fetches).
        refresh
            Ask the PACS for the instance list even where the cache holds the complete series (the series may
            have grown); only new instances are fetched.

        Returns
        -------
        list[pathlib.Path]
            One file per instance, ``<SOPInstanceUID>.dcm``, in the order the PACS listed or sent them (sort by
            geometry when reading a volume). Files are shared by everyone using this cache: read, never modify.

        Raises
        ------
        PacsNotFoundError
            The series has no instances on the PACS.
        PacsConnectionError, PacsTimeoutError
            The PACS cannot be reached, or the link kept dropping or stalling beyond the retries; the message
            names the series and study and how many instances arrived (those stay cached: calling again
            fetches only the rest).
        RetrieveError
            Some instances did not arrive for another reason; same message and caching as above.
        PacsAuthError, PacsError
            As for every PACS call.
        """
        ...

    def store(self, items: StoreItems, *, progress: bool = True) -> StoreSummary:
        """Store files, folders (walked recursively) and datasets; idempotent (instances the PACS holds are
        not sent again). Inputs that are not DICOM are skipped and named, broken ones fail with the reason,
        and neither stops the rest; see :mod:`pacsai.pacs.store`.

        Raises
        ------
        PacsAuthError, PacsConnectionError
            The PACS refused the credentials or cannot be reached: nothing more can be sent.
        """
        ...

    def close(self) -> None:
        """Release what the connection holds (HTTP connections, the embedded index's SQLite connection).

        A later verb opens them again; the watch closes before it forks a report, because an SQLite connection
        must not be carried across ``fork()``.
        """
        ...

    # -- defined once, on top of the verbs ---------------------------------------------------------------------
    def search_studies(self, **filters: object) -> pd.DataFrame:
        """Search studies (``search("studies", filters)``)."""
        return self.search("studies", filters)

    def search_series(self, **filters: object) -> pd.DataFrame:
        """Search series (``search("series", filters)``)."""
        return self.search("series", filters)

    def search_instances(self, **filters: object) -> pd.DataFrame:
        """Search instances (``search("instances", filters)``)."""
        return self.search("instances", filters)

    def retrieve_study(self, study_uid: str, *, progress: bool = True) -> dict[str, list[Path]]:
        """Every series of a study in the local cache: ``{SeriesInstanceUID: paths}``.

        Raises
        ------
        PacsNotFoundError
            The study has no series on the PACS.
        """
        series = self.search_series(StudyInstanceUID=study_uid)
        if series.empty:
            raise PacsNotFoundError(
                f"study {study_uid} has no series on {self.url}; check the UID with `pacsai pacs search`"
            )
        return {
            str(uid): self.retrieve_series(study_uid, str(uid), progress=progress)
            for uid in series["SeriesInstanceUID"]
        }

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Pacs"]
