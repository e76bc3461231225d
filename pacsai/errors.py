"""Errors a caller can act on. Every message names the UID / URL / file concerned and the fix."""

from __future__ import annotations


class PacsaiError(Exception):
    """Base class of every error pacsai raises on purpose."""


class ConfigError(PacsaiError):
    """Settings or an experiment file are invalid."""


class PacsError(PacsaiError):
    """Anything a PACS did wrong, or that went wrong talking to it."""


class PacsAuthError(PacsError):
    """The PACS refused the credentials (HTTP 401/403)."""


class PacsConnectionError(PacsError):
    """The PACS cannot be reached, or the connection dropped and retries were exhausted."""


class PacsTimeoutError(PacsConnectionError):
    """The PACS accepted the connection but did not answer in time."""


class PacsNotFoundError(PacsError):
    """A study, series or instance is not on the PACS."""


class RetrieveError(PacsError):
    """A retrieval could not complete; the instances that arrived stay in the cache."""


class StoreError(PacsError):
    """A STOW-RS request failed as a whole."""


class CacheError(PacsaiError):
    """The local instance cache is unusable (permissions, corrupt entry that cannot be repaired)."""


class DicomFileError(PacsaiError):
    """A file is DICOM but broken (truncated, wrong lengths, short pixel data)."""


class VolumeError(PacsaiError):
    """An image series is not a regular volume (tilt, gap, duplicate positions, mixed geometry)."""


class StructureError(PacsaiError):
    """A SEG or RTSTRUCT cannot be read or written on the requested grid."""


class DoseError(PacsaiError):
    """An RTDOSE cannot be read or mapped onto a grid."""


class PlanningError(PacsaiError):
    """A planning metric cannot be computed from the given structures/dose."""


class TrackingError(PacsaiError):
    """MLflow tracking or the model registry failed."""


class ReportError(PacsaiError):
    """A report could not be produced."""


class PacsaiWarning(UserWarning):
    """A data quirk that pacsai handled but the user should know about."""
