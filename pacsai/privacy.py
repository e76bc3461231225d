"""Keep patient identifiers and credentials out of log output unless the user opts in (``PACSAI_LOG_PHI``).

pacsai's own log lines name patients only by UID or pseudonym. Some libraries it drives log more at DEBUG:
urllib3 and dicomweb-client log every request line with its query string (``/studies?PatientID=...``),
papermill logs every cell it runs with the report's parameters. :class:`NoIdentifyingDebug` drops those
records from a handler; the ``pacsai`` CLI installs it on its handlers when ``-vv`` turns DEBUG on.

Credentials never reach these records: the URL is stripped of ``user:password@`` before any request
(:func:`pacsai.pacs.address.redact_url`), and neither library logs request headers.

What pacsai records in MLflow holds no DICOM UID and no calendar date by default either: anyone with access to
the PACS could link a Study/Series/SOP Instance UID back to the patient, and dates are identifiers under HIPAA.
:func:`scrub` replaces every UID (in keys, values and inside text) with a keyed hash (:func:`hash_uid`, the same
HMAC key as the patient pseudonyms, so a UID maps to the same ``u-...`` everywhere in one store) and every date
with its day relative to a reference date, the patient's first study (``day 0``; ``day 114`` is 114 days later).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import logging
import re
from collections.abc import Mapping
from typing import Any

# Loggers whose DEBUG records carry request URLs (query strings) or executed notebook content.
IDENTIFYING_DEBUG_LOGGERS = ("urllib3", "requests", "dicomweb_client", "papermill", "nbclient")


class NoIdentifyingDebug(logging.Filter):
    """Drop DEBUG records of :data:`IDENTIFYING_DEBUG_LOGGERS` (and their children)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.DEBUG:
            return True
        return not any(
            record.name == name or record.name.startswith(name + ".") for name in IDENTIFYING_DEBUG_LOGGERS
        )


def protect_handlers(handlers: list[logging.Handler], *, log_phi: bool) -> None:
    """Install :class:`NoIdentifyingDebug` on ``handlers`` unless identifiers may be logged (``log_phi``)."""
    if log_phi:
        return
    for handler in handlers:
        if not any(isinstance(f, NoIdentifyingDebug) for f in handler.filters):
            handler.addFilter(NoIdentifyingDebug())


# A DICOM UID: numeric components joined by dots (PS3.5 9.1). Four or more components, or three in a long string
# (``2.25.<uuid>``): versions (``0.1.0``) and decimals stay untouched.
_UID = re.compile(r"(?<![\w.])[0-2](?:\.(?:0|[1-9]\d*)){2,}(?![\w.])")
# A calendar date: DICOM DA (YYYYMMDD) or ISO (YYYY-MM-DD), optionally with a time (DICOM TM or ISO).
_DATE = re.compile(
    r"(?<!\d)((?:19|20)\d\d)(-?)(0[1-9]|1[0-2])\2(0[1-9]|[12]\d|3[01])"
    r"(?:(?:T|\s)?\d\d:?\d\d(?::?\d\d(?:\.\d+)?)?(?:Z|[+-]\d\d:?\d\d)?)?(?!\d)"
)


def _is_uid(text: str) -> bool:
    return text.count(".") >= 3 or len(text) >= 16


def hash_uid(uid: str, key: str | bytes) -> str:
    """A keyed hash of a DICOM UID: ``"u-"`` + 16 hex digits of HMAC-SHA256(key, uid).

    Parameters
    ----------
    uid
        The UID to hide.
    key
        The store's pseudonym key (:func:`pacsai.tracking.pseudonym_key`): stable within a store, not
        reversible without the key.
    """
    raw = key.encode() if isinstance(key, str) else key
    if not raw:
        raise ValueError("the key of the UID hash is empty; set PACSAI_PSEUDONYM_KEY")
    return "u-" + hmac.new(raw, uid.encode(), hashlib.sha256).hexdigest()[:16]


def find_dates(obj: Any) -> list[dt.date]:
    """Every calendar date written anywhere in ``obj`` (keys, values, text; nested dicts and lists)."""
    found: list[dt.date] = []
    for text in _strings(obj):
        for match in _DATE.finditer(text):
            day = _as_date(match)
            if day is not None:
                found.append(day)
    return found


def _strings(obj: Any) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, Mapping):
        return [s for k, v in obj.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(obj, (list, tuple)):
        return [s for v in obj for s in _strings(v)]
    return []


def _as_date(match: re.Match[str]) -> dt.date | None:
    try:
        return dt.date(int(match.group(1)), int(match.group(3)), int(match.group(4)))
    except ValueError:  # 20240231: digits that look like a date but are none
        return None


def scrub(obj: Any, *, key: str | bytes, reference_date: dt.date | str | None = None) -> Any:
    """A copy of ``obj`` without DICOM UIDs and calendar dates, for what goes into MLflow.

    Parameters
    ----------
    obj
        JSON-like data (dicts, lists, strings, numbers); dict keys are scrubbed too.
    key
        Key of :func:`hash_uid` (the store's pseudonym key).
    reference_date
        Day 0 of the relative days: the patient's first study (a date, or ``YYYYMMDD``/``YYYY-MM-DD``).
        Default: the earliest date found in ``obj``, i.e. the first study that the record mentions.

    Returns
    -------
    Any
        UIDs replaced with :func:`hash_uid`, dates (with any time of day) with ``"day N"``.
    """
    if isinstance(reference_date, str):
        match = _DATE.fullmatch(reference_date.strip())
        parsed = _as_date(match) if match else None
        if parsed is None:
            raise ValueError(f"reference date {reference_date!r} is not YYYYMMDD or YYYY-MM-DD")
        reference_date = parsed
    if reference_date is None:
        dates = find_dates(obj)
        reference_date = min(dates) if dates else None
    return _scrub(obj, key, reference_date)


def _scrub(obj: Any, key: str | bytes, reference: dt.date | None) -> Any:
    if isinstance(obj, str):
        return _scrub_text(obj, key, reference)
    if isinstance(obj, Mapping):
        return {_scrub(k, key, reference): _scrub(v, key, reference) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_scrub(v, key, reference) for v in obj]
    return obj


def _scrub_text(text: str, key: str | bytes, reference: dt.date | None) -> str:
    text = _UID.sub(lambda m: hash_uid(m.group(0), key) if _is_uid(m.group(0)) else m.group(0), text)

    def relative(match: re.Match[str]) -> str:
        day = _as_date(match)
        if day is None:
            return match.group(0)
        return "day ?" if reference is None else f"day {(day - reference).days}"

    return _DATE.sub(relative, text)


__all__ = [
    "IDENTIFYING_DEBUG_LOGGERS",
    "NoIdentifyingDebug",
    "find_dates",
    "hash_uid",
    "protect_handlers",
    "scrub",
]
