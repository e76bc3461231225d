"""Searches on both back ends: columns and types, wildcards, date ranges, UID lists, client-side filtering."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date
from pathlib import Path

import pandas as pd
import pydicom
import pytest

from pacsai.errors import PacsError
from pacsai.pacs import Pacs, connect
from pacsai.pacs.query import COLUMNS, Filter, apply_filters, make_filters, normalize_keyword, to_dataframe
from tests.orthanc_fixture import BACKENDS

CT_STUDY = "1.2.392.200103.20080913.113635.0.2009.6.22.21.43.10.22941.1"
MR_STUDY = "1.3.6.1.4.1.14519.5.2.1.5168.1900.288970202012734437880691548623"
MR_SERIES = "1.3.6.1.4.1.14519.5.2.1.5168.1900.267475167888884755506702762438"


def _sources(test_data: Path) -> list[Path]:
    mr = sorted((test_data / "tcia_sts001_mr_t2_rtstruct/mr_t2").glob("*.dcm"))[:3]
    return [test_data / "dcmqi_ct_seg/ct_3slice", *mr]


@pytest.fixture(scope="module", params=BACKENDS)
def _store(request, test_data: Path, tmp_path_factory) -> Iterator[Pacs]:
    """One loaded PACS per back end for the whole module: loading it for each of ~40 tests costs ~0.5 s each."""
    tmp = tmp_path_factory.mktemp("query")
    if request.param == "orthanc":
        server = request.getfixturevalue("orthanc")
        server.clear()
        conn = connect(server.url, user=server.user, password=server.password, cache_dir=tmp / "cache")
    else:
        conn = connect(f"file://{tmp / 'embedded'}", cache_dir=tmp / "cache")
    summary = conn.store(_sources(test_data), progress=False)
    assert summary.ok and len(summary.stored) == 6
    yield conn
    conn.close()


@pytest.fixture
def loaded(_store: Pacs, test_data: Path) -> Pacs:
    """The 3-slice CT (JANCT000, 2003-04-17) and 3 slices of the STS_001 MR (2000-09-03), on each back end."""
    if len(_store.search_instances()) != 6:  # another test emptied the shared Orthanc: load it again
        assert _store.store(_sources(test_data), progress=False).ok
    return _store


def test_study_columns_and_types(loaded: Pacs):
    studies = loaded.search_studies()
    assert list(studies.columns[: len(COLUMNS["studies"])]) == list(COLUMNS["studies"])
    studies = studies.sort_values("StudyDate").reset_index(drop=True)
    assert list(studies.StudyInstanceUID) == [MR_STUDY, CT_STUDY]
    assert list(studies.PatientID) == ["STS_001", "99000"]
    assert list(studies.PatientName) == ["STS_001", "JANCT000"]
    assert list(studies.StudyDate) == ["20000903", "20030417"]
    assert list(studies.ModalitiesInStudy) == [["MR"], ["CT"]]
    assert studies.NumberOfStudyRelatedInstances.dtype == "Int64"
    assert list(studies.NumberOfStudyRelatedInstances) == [3, 3]


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({"PatientID": "STS*"}, {MR_STUDY}),
        ({"PatientID": "STS?001"}, {MR_STUDY}),
        ({"PatientID": "*0*"}, {MR_STUDY, CT_STUDY}),
        ({"PatientID": "99000"}, {CT_STUDY}),
        ({"PatientID": "9900"}, set()),
        ({"PatientName": "janct*"}, {CT_STUDY}),  # person names match case-insensitively
        ({"StudyDate": "20030101-20031231"}, {CT_STUDY}),
        ({"StudyDate": "-20001231"}, {MR_STUDY}),
        ({"StudyDate": "20000903-"}, {MR_STUDY, CT_STUDY}),
        ({"StudyDate": "20000903"}, {MR_STUDY}),
        ({"StudyDate": date(2003, 4, 17)}, {CT_STUDY}),
        ({"StudyDate": "20100101-"}, set()),
        ({"Modality": "MR"}, {MR_STUDY}),  # ModalitiesInStudy at study level
        ({"StudyInstanceUID": [CT_STUDY, MR_STUDY]}, {MR_STUDY, CT_STUDY}),
        ({"StudyInstanceUID": f"{CT_STUDY}\\1.2.3"}, {CT_STUDY}),
        ({"patient_id": "STS_001", "StudyDate": "19990101-20011231"}, {MR_STUDY}),
        ({"PatientID": "STS*", "StudyDate": "20030417"}, set()),
        ({"00100020": "99*"}, {CT_STUDY}),
    ],
)
def test_study_filters_on_both_back_ends(loaded: Pacs, filters, expected):
    found = loaded.search_studies(**filters)
    assert set(found.StudyInstanceUID) == expected
    assert list(found.columns[: len(COLUMNS["studies"])]) == list(COLUMNS["studies"])


def test_series_search(loaded: Pacs):
    series = loaded.search_series(Modality="MR")
    assert list(series.SeriesInstanceUID) == [MR_SERIES]
    row = series.iloc[0]
    assert (row.StudyInstanceUID, row.PatientID, row.SeriesNumber) == (MR_STUDY, "STS_001", 10)
    assert row.NumberOfSeriesRelatedInstances == 3
    assert series.SeriesNumber.dtype == "Int64"
    assert set(loaded.search_series(StudyInstanceUID=CT_STUDY).Modality) == {"CT"}
    assert loaded.search_series(Modality="CT", PatientID="STS*").empty


def test_instance_search(loaded: Pacs, test_data: Path):
    mr = sorted((test_data / "tcia_sts001_mr_t2_rtstruct/mr_t2").glob("*.dcm"))[:3]
    expected = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in mr}
    found = loaded.search_instances(StudyInstanceUID=MR_STUDY, SeriesInstanceUID=MR_SERIES)
    assert set(found.SOPInstanceUID) == expected
    assert set(found.Rows) == {384} and found.Rows.dtype == "Int64"
    assert set(found.SOPClassUID) == {"1.2.840.10008.5.1.4.1.1.4"}
    two = sorted(expected)[:2]
    assert set(loaded.search_instances(SOPInstanceUID=two).SOPInstanceUID) == set(two)


def test_attribute_outside_the_embedded_index(loaded: Pacs):
    # dicomweb-client's index has no SeriesDescription; pacsai's index beside it has (pacsai.pacs.storeindex).
    found = loaded.search_series(SeriesDescription="AXIAL*")
    assert list(found.SeriesInstanceUID) == [MR_SERIES]
    assert list(found.SeriesDescription) == ["AXIAL SE T2 FAT SAT - RESEARCH"]
    # A space and a hyphen: sent as "?" to Orthanc (which does not percent-decode), narrowed here.
    exact = loaded.search_series(SeriesDescription="AXIAL SE T2 FAT SAT - RESEARCH")
    assert list(exact.SeriesInstanceUID) == [MR_SERIES]
    assert loaded.search_series(SeriesDescription="AXIAL SE T2 FAT SAT ? RESEARCHX").empty


def test_empty_store_gives_empty_frames_with_columns(pacs: Pacs):
    pacs.store([], progress=False)  # storing (even nothing) creates an embedded store; searching does not
    for level in ("studies", "series", "instances"):
        frame = getattr(pacs, f"search_{level}")()
        assert frame.empty and list(frame.columns) == list(COLUMNS[level])


def test_unknown_keyword_and_bad_date_are_errors(pacs: Pacs):
    with pytest.raises(PacsError, match="'PatientFoo' is not a DICOM keyword"):
        pacs.search_studies(PatientFoo="x")
    with pytest.raises(PacsError, match="not a DICOM date or range"):
        pacs.search_studies(StudyDate="2024-01-01")


# -- matching rules, without a PACS --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("vr", "value", "cell", "match"),
    [
        ("LO", "AB*", "ABC", True),
        ("LO", "ab*", "ABC", False),  # case-sensitive outside PN
        ("PN", "doe^j*", "DOE^JOHN", True),
        ("LO", "A?C", "ABC", True),
        ("LO", "A?C", "ABBC", False),
        ("LO", "A[1]*", "A[1]x", True),  # regex characters are literal
        ("LO", "A.C", "ABC", False),
        ("DA", "20240101-20241231", "20240615", True),
        ("DA", "20240101-20241231", "20250101", False),
        ("TM", "1000-1200", "104607.860000", True),
        ("TM", "1000-1200", "120100", False),
        ("TM", "1000-1200", "120059.5", True),  # an upper bound of minute precision covers its minute
        ("IS", "10", 10, True),
        ("IS", "10", 11, False),
        ("CS", "MR", ["CT", "MR"], True),
        ("CS", "MR", None, False),
        ("LO", "*", None, True),
        ("UI", "1.2\\1.3", "1.3", True),
    ],
)
def test_matching_rules(vr, value, cell, match):
    assert Filter(keyword="X", vr=vr, value=value).matches(cell) is match


def test_server_values_keep_wildcards_and_avoid_percent_encoding():
    assert Filter("PatientName", "PN", "Doe^John*").server_value() == "Doe?John*"
    assert Filter("PatientID", "LO", "STS*").server_value() == "STS*"
    assert Filter("StudyInstanceUID", "UI", "1.2\\1.3").server_value() == "1.2,1.3"
    assert Filter("StudyDate", "DA", "20240101-20241231").server_value() == "20240101-20241231"
    assert Filter("PatientID", "LO", "*").server_value() is None
    assert Filter("SeriesNumber", "IS", "1 2").server_value() is None


def test_keyword_normalisation():
    assert normalize_keyword("series_instance_uid") == "SeriesInstanceUID"
    assert normalize_keyword("0020000E") == "SeriesInstanceUID"
    assert [f.keyword for f in make_filters({"Modality": "CT"}, level="studies")] == ["ModalitiesInStudy"]


def test_filter_on_missing_attribute_is_an_error_not_unfiltered_rows():
    frame = to_dataframe([{"0020000D": {"vr": "UI", "Value": ["1.2"]}}], level="studies")
    with pytest.raises(PacsError, match="does not return BodyPartExamined"):
        apply_filters(frame, [Filter("BodyPartExamined", "CS", "CHEST")], source="a PACS")
    assert apply_filters(frame, [Filter("BodyPartExamined", "CS", "*")], source="a PACS").equals(frame)


def test_dicom_json_conversion():
    frame = to_dataframe(
        [
            {
                "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Doe^Jane"}]},
                "00200011": {"vr": "IS", "Value": [4]},
                "00280030": {"vr": "DS", "Value": [0.5, 0.5]},
                "00180050": {"vr": "DS", "Value": ["1.25"]},
                "00081190": {"vr": "UR", "Value": ["http://x"]},
                "00081199": {"vr": "SQ", "Value": []},
            },
            {"00200011": {"vr": "IS"}},
        ],
        level="series",
    )
    assert frame.PatientName.tolist() == ["Doe^Jane", None]
    assert frame.SeriesNumber.tolist() == [4, pd.NA]
    assert frame.PixelSpacing.tolist()[0] == [0.5, 0.5]
    assert frame.SliceThickness.dtype == "float64" and frame.SliceThickness[0] == 1.25
    assert "RetrieveURL" not in frame.columns and "ReferencedSOPSequence" not in frame.columns
