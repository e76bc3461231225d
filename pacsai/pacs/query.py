"""Search studies, series and instances → pandas DataFrames, one column per DICOM keyword.

Filters are DICOM keywords (``PatientID="STS*"``, ``StudyDate="20240101-20241231"``, ``Modality="CT"``); tags
(``"00100020"``) and snake_case (``patient_id``) are accepted too. Matching follows DICOM PS3.4 C.2.2.2:
``*``/``?`` wildcards on string attributes (PN case-insensitive), ``A-B`` / ``A-`` / ``-B`` ranges on dates
and times, UID lists (``"1.2\\1.3"`` or a Python list), numeric equality for numbers.

No back end is trusted to filter correctly, so every filter is applied again on the client:

* DICOMweb: Orthanc 1.10 does not percent-decode QIDO values (``PatientName=STS%5E001`` and ``STS%2A`` find
  nothing), so the query string is built here with ``*`` and ``?`` literal, and characters that would need
  encoding are sent as ``?`` (a superset the client then narrows). Filters the server cannot take literally are
  applied on the client only; the attribute is requested with ``includefield`` so that it can be checked.
* Embedded store: dicomweb-client's SQLite index filters only a few attributes, skips date ranges with a mere
  log message and matches ``LIKE`` case-insensitively, so it only gets exact UID / ID filters; everything else
  is done here. An attribute it does not index raises :class:`PacsError` rather than returning unfiltered rows.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Literal

import pandas as pd
from pydicom.datadict import dictionary_VM, dictionary_VR, keyword_dict, keyword_for_tag, tag_for_keyword

from pacsai.errors import PacsError

logger = logging.getLogger(__name__)

Level = Literal["studies", "series", "instances"]
LEVELS: tuple[str, ...] = ("studies", "series", "instances")

#: Columns every result has, in this order (others follow alphabetically), even when empty.
COLUMNS: Mapping[str, tuple[str, ...]] = {
    "studies": (
        "PatientID",
        "PatientName",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "StudyDescription",
        "StudyID",
        "AccessionNumber",
        "ModalitiesInStudy",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
    ),
    "series": (
        "PatientID",
        "PatientName",
        "StudyInstanceUID",
        "StudyDate",
        "SeriesInstanceUID",
        "Modality",
        "SeriesNumber",
        "SeriesDescription",
        "NumberOfSeriesRelatedInstances",
    ),
    "instances": (
        "PatientID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "Modality",
        "SOPInstanceUID",
        "SOPClassUID",
        "InstanceNumber",
        "Rows",
        "Columns",
        "NumberOfFrames",
    ),
}

# Attributes a QIDO answer carries that say nothing about the data.
_DROPPED = {
    "SpecificCharacterSet",
    "RetrieveURL",
    "RetrieveURI",
    "InstanceAvailability",
    "TimezoneOffsetFromUTC",
}
_INT_VRS = {"IS", "US", "UL", "SS", "SL", "UV", "SV"}
_FLOAT_VRS = {"DS", "FL", "FD"}
_RANGE_VRS = {"DA", "TM", "DT"}
_WILDCARD_VRS = {"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"}
# What the embedded store's SQLite index may filter on itself: exact matches only (see module docstring).
_EMBEDDED_EXACT = {"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "PatientID", "Modality"}
# Characters a QIDO value may carry literally on every server (others become "?": see module docstring).
_SAFE = re.compile(r"[A-Za-z0-9.\-_*?]")
_DATE = re.compile(r"\d{8}|\d{8}-|-\d{8}|\d{8}-\d{8}")


@dataclass(frozen=True)
class Filter:
    """One search filter, normalised.

    Attributes
    ----------
    keyword
        DICOM keyword.
    vr
        Its value representation.
    value
        The DICOM matching value as text (UID lists joined with ``\\``).
    """

    keyword: str
    vr: str
    value: str

    @property
    def universal(self) -> bool:
        """Matches everything (empty or ``*``)."""
        return self.value in ("", "*")

    @property
    def values(self) -> list[str]:
        """The value split on ``\\`` (value multiplicity)."""
        return self.value.split("\\")

    def server_value(self) -> str | None:
        """The value to send in a QIDO URL, or ``None`` when only the client can apply this filter."""
        if self.universal:
            return None
        if self.vr == "UI":
            ok = all(_SAFE.fullmatch(c) and c not in "*?" for v in self.values for c in v)
            return ",".join(self.values) if ok else None
        if "\\" in self.value:
            return None  # a list of non-UID values: not portable across servers
        if self.vr in _WILDCARD_VRS:
            # A character that would need percent-encoding becomes "?": matches it and more; the client narrows.
            return "".join(c if _SAFE.fullmatch(c) else "?" for c in self.value)
        if all(_SAFE.fullmatch(c) and c not in "*?" for c in self.value):
            return self.value
        return None

    def matches(self, cell: Any) -> bool:
        """Whether a result cell (scalar, list, or missing) satisfies this filter."""
        if self.universal:
            return True
        if isinstance(cell, (list, tuple)):
            return any(self._match_one(c) for c in cell)
        return self._match_one(cell)

    def _match_one(self, cell: Any) -> bool:
        if cell is None or (isinstance(cell, float) and math.isnan(cell)) or cell is pd.NA:
            return False
        return any(self._match_value(str(cell).strip(), want) for want in self.values)

    def _match_value(self, have: str, want: str) -> bool:
        if self.vr in _RANGE_VRS and "-" in want and not (self.vr == "DT" and re.search(r"[+-]\d{4}$", want)):
            low, _, high = want.partition("-")
            return (not low or _norm_time(have, self.vr) >= _norm_time(low, self.vr)) and (
                not high
                or _norm_time(have, self.vr)[: len(_norm_time(high, self.vr))] <= _norm_time(high, self.vr)
            )
        if self.vr in _INT_VRS or self.vr in _FLOAT_VRS:
            try:
                return float(have) == float(want)
            except ValueError:
                return False
        if self.vr in _WILDCARD_VRS and ("*" in want or "?" in want):
            pattern = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in want)
            flags = re.IGNORECASE if self.vr == "PN" else 0
            return re.fullmatch(pattern, have, flags | re.DOTALL) is not None
        if self.vr in _RANGE_VRS:
            return _norm_time(have, self.vr) == _norm_time(want, self.vr)
        if self.vr == "PN":
            return have.casefold() == want.casefold()
        return have == want


def _norm_time(value: str, vr: str) -> str:
    # TM "104607.860000" vs "104607": compare on the digits, fractions after; DA is plain YYYYMMDD.
    return value.replace(":", "").strip() if vr in ("TM", "DT") else value.replace("-", "").strip()


@functools.lru_cache(maxsize=1)
def _folded_keywords() -> dict[str, str]:
    # "patientid" → "PatientID": lets snake_case names (patient_id) find their keyword.
    return {k.lower(): k for k in keyword_dict}


def normalize_keyword(key: str) -> str:
    """The DICOM keyword for a keyword, a tag (``"00100020"``) or a snake_case name (``patient_id``).

    Raises
    ------
    PacsError
        ``key`` is no DICOM attribute.
    """
    if key in keyword_dict:
        return key
    if re.fullmatch(r"[0-9A-Fa-f]{8}", key):
        found = keyword_for_tag(int(key, 16))
        if found:
            return found
    folded = _folded_keywords().get(key.replace("_", "").lower())
    if folded:
        return folded
    raise PacsError(
        f"{key!r} is not a DICOM keyword; filter with keywords such as PatientID, StudyDate, Modality, "
        "SeriesInstanceUID (or 8-digit tags)"
    )


def _format_value(value: Any) -> str:
    if isinstance(value, datetime):
        return value.strftime("%Y%m%d%H%M%S")
    if isinstance(value, date):
        return value.strftime("%Y%m%d")
    if isinstance(value, (list, tuple, set, frozenset)):
        return "\\".join(_format_value(v) for v in value)
    if value is None:
        return ""
    return str(value)


def make_filters(filters: Mapping[str, Any], *, level: str) -> list[Filter]:
    """Normalise ``{key: value}`` search filters for ``level`` (``Modality`` at study level means
    ``ModalitiesInStudy``)."""
    out: list[Filter] = []
    for key, value in filters.items():
        keyword = normalize_keyword(key)
        if level == "studies" and keyword == "Modality":
            keyword = "ModalitiesInStudy"
        tag = tag_for_keyword(keyword)
        vr = dictionary_VR(tag) if tag is not None else "LO"
        if vr == "SQ" or vr.startswith("O") or vr in ("UN", "AT"):
            raise PacsError(
                f"cannot search on {keyword} (VR {vr}); use a text, date, number or UID attribute"
            )
        text = _format_value(value)
        if vr == "DA" and text and not all(_DATE.fullmatch(v) for v in text.split("\\")):
            raise PacsError(
                f"{keyword}={text!r} is not a DICOM date or range; use YYYYMMDD, YYYYMMDD-YYYYMMDD, "
                "YYYYMMDD- or -YYYYMMDD"
            )
        out.append(Filter(keyword=keyword, vr=vr, value=text))
    return out


# -- DICOM JSON → DataFrame ------------------------------------------------------------------------------------
def _cell(element: Mapping[str, Any], keyword: str) -> Any:
    vr = element.get("vr", "")
    values = element.get("Value")
    if vr == "SQ" or "InlineBinary" in element or "BulkDataURI" in element:
        return _SKIP
    if not values:
        return None
    if vr == "PN":
        values = [v.get("Alphabetic", "") if isinstance(v, Mapping) else str(v) for v in values]
    elif vr in _INT_VRS:
        values = [int(float(v)) if v is not None else None for v in values]
    elif vr in _FLOAT_VRS:
        values = [float(v) if v is not None else None for v in values]
    else:
        values = [str(v) if v is not None else None for v in values]
    if _multi_valued(keyword):
        return list(values)
    return values[0] if len(values) == 1 else "\\".join(str(v) for v in values)


_SKIP = object()


@functools.lru_cache(maxsize=4096)
def _multi_valued(keyword: str) -> bool:
    tag = tag_for_keyword(keyword)
    return tag is not None and dictionary_VM(tag) not in ("1", "")


def to_dataframe(items: Sequence[Mapping[str, Any]], *, level: str) -> pd.DataFrame:
    """DICOM JSON objects → a DataFrame with one column per keyword (standard ones first, always present).

    Dates and times stay text (``YYYYMMDD``, ``HHMMSS``); IS/US/UL… are nullable integers; DS/FL/FD floats;
    person names their alphabetic form; multi-valued attributes (``ModalitiesInStudy``) lists.
    """
    rows: list[dict[str, Any]] = []
    vrs: dict[str, str] = {}
    for item in items:
        row: dict[str, Any] = {}
        for tag, element in item.items():
            try:
                keyword = keyword_for_tag(int(tag, 16))
            except ValueError:
                continue
            if not keyword or keyword in _DROPPED:
                continue
            value = _cell(element, keyword)
            if value is _SKIP:
                continue
            row[keyword] = value
            vrs.setdefault(keyword, element.get("vr", ""))
        rows.append(row)
    standard = list(COLUMNS[level])
    extra = sorted({k for r in rows for k in r} - set(standard))
    frame = pd.DataFrame(rows, columns=standard + extra)
    for column in frame.columns:
        vr = vrs.get(column) or _dictionary_vr(column)
        if _multi_valued(column):
            frame[column] = frame[column].astype(object)
        elif vr in _INT_VRS:
            frame[column] = pd.array(frame[column].tolist(), dtype="Int64")
        elif vr in _FLOAT_VRS:
            frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("float64")
        else:
            frame[column] = frame[column].astype(object).where(frame[column].notna(), None)
    return frame


def _dictionary_vr(keyword: str) -> str:
    tag = tag_for_keyword(keyword)
    return dictionary_VR(tag) if tag is not None else ""


def apply_filters(frame: pd.DataFrame, filters: Sequence[Filter], *, source: str) -> pd.DataFrame:
    """Keep the rows matching every filter.

    Raises
    ------
    PacsError
        The answer lacks an attribute that a filter needs, so it cannot be checked.
    """
    active = [f for f in filters if not f.universal]
    if not active or frame.empty:
        return frame
    keep = pd.Series(True, index=frame.index)
    for flt in active:
        if flt.keyword not in frame.columns or frame[flt.keyword].isna().all():
            raise PacsError(
                f"{source} does not return {flt.keyword} at this level, so the filter "
                f"{flt.keyword}={flt.value!r} cannot be applied; filter on an attribute the server returns "
                "(e.g. search series, then filter the DataFrame)"
            )
        keep &= frame[flt.keyword].map(flt.matches).astype(bool)
    return frame[keep].reset_index(drop=True)


# -- one search, any back end ---------------------------------------------------------------------------------
#: A back end's raw search: ``(level, filters) → DICOM JSON objects`` (a superset of the matches is fine).
Fetch = Callable[[str, Sequence[Filter]], list[dict[str, Any]]]


def run_search(
    level: str, filters: Mapping[str, Any], fetch: Fetch, *, source: str, limit: int | None = None
) -> pd.DataFrame:
    """Search ``level`` (``"studies"``, ``"series"`` or ``"instances"``) with DICOM-keyword filters.

    Parameters
    ----------
    level
        Query level.
    filters
        ``{keyword: value}``; see the module docstring for matching rules.
    fetch
        The back end's search; every filter is applied again here whatever it did.
    source
        The PACS as messages name it.
    limit
        At most this many rows (after filtering).

    Returns
    -------
    pandas.DataFrame
        One row per match, one column per DICOM keyword (:data:`COLUMNS` first, always present).

    Raises
    ------
    PacsError
        Unknown keyword, or an attribute the back end cannot return; PACS errors as for every call.
    """
    if level not in LEVELS:
        raise PacsError(f"unknown query level {level!r}; use one of {', '.join(LEVELS)}")
    flts = make_filters(filters, level=level)
    frame = apply_filters(to_dataframe(fetch(level, flts), level=level), flts, source=source)
    if limit is not None:
        frame = frame.head(limit)
    logger.debug("%s search on %s: %d rows", level, source, len(frame))
    return frame


def qido_query(level: str, flts: Sequence[Filter]) -> list[tuple[str, str]]:
    """QIDO-RS query parameters for ``flts``: the values a server can take literally (see the module docstring),
    and ``includefield`` for every attribute the client must check or show."""
    params: list[tuple[str, str]] = []
    for flt in flts:
        value = flt.server_value()
        if value is not None:
            params.append((flt.keyword, value))
    include = {f.keyword for f in flts} | set(COLUMNS[level])
    tags = sorted(f"{tag:08X}" for tag in (tag_for_keyword(k) for k in include) if tag is not None)
    params.append(("includefield", ",".join(tags)))
    return params


def index_filters(level: str, flts: Sequence[Filter]) -> dict[str, str]:
    """The filters the embedded store's SQLite index may apply itself: exact UID / ID / modality matches."""
    return {
        f.keyword: f.value
        for f in flts
        if f.keyword in _EMBEDDED_EXACT
        and not f.universal
        and not any(c in f.value for c in "*?\\")
        and not (level == "studies" and f.keyword == "Modality")
    }


__all__ = [
    "COLUMNS",
    "LEVELS",
    "Fetch",
    "Filter",
    "Level",
    "apply_filters",
    "index_filters",
    "make_filters",
    "normalize_keyword",
    "qido_query",
    "run_search",
    "to_dataframe",
]
