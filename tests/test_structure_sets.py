"""One RTSTRUCT selection rule (pacsai.structure_sets) for the report and notebook 01: two planner structure sets on
one study, plus one pacsai wrote back and one drawn on another image, all real DICOM files."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from pacsai import structure_sets
from tests.test_cohort import SMOKE_SHAPE, SMOKE_SPACING

REVISION_ROIS = ("BODY", "GTV", "Heart", "Lung_L", "Lung_R")


def _with_date(ds, date: str, time: str):
    ds.StructureSetDate, ds.StructureSetTime = date, time
    return ds


def revision(patient, *, date: str = "20300101", time: str = "143000"):
    """A planner's later revision of the structure set: fewer ROIs, another vendor, a later StructureSetDate/Time."""
    from pacsai.imaging import read_rtstruct, read_series, write_rtstruct

    image = read_series(patient.ct)
    masks = read_rtstruct(patient.rtstruct, like=image)
    return _with_date(
        write_rtstruct({n: masks[n] for n in REVISION_ROIS}, source=patient.ct, label="PLAN v2",
                       series_description="Physician revision", manufacturer="Varian Medical Systems",
                       algorithm_name="Eclipse", series_number=4, uid_parts=("revision", date, time)),
        date, time)


def _pacsai_copy(ds, date: str):
    """The same contours as written back by a pacsai report (Manufacturer pacsai), dated even later."""
    out = copy.deepcopy(ds)
    out.Manufacturer, out.ManufacturerModelName = "pacsai", "pacsai-thorax"
    out.SOPInstanceUID = out.SeriesInstanceUID = "2.25.1" + date
    return _with_date(out, date, "235959")


def _other_image(ds, date: str):
    """A structure set drawn on another image series of the study (e.g. a 4D-CT phase)."""
    out = copy.deepcopy(ds)
    for ref in out.ReferencedFrameOfReferenceSequence:
        for study in ref.RTReferencedStudySequence:
            for series in study.RTReferencedSeriesSequence:
                series.SeriesInstanceUID = "1.2.826.0.1.3680043.99.1"
    out.SOPInstanceUID = out.SeriesInstanceUID = "2.25.2" + date
    return _with_date(out, date, "235959")


@pytest.fixture(scope="module")
def patient():
    from pacsai.synthetic import make_patient

    p = make_patient(31, shape=SMOKE_SHAPE, spacing=SMOKE_SPACING, with_prior=False)
    _with_date(p.rtstruct, "20300101", "090000")
    return p


def _headers(tmp_path: Path, datasets) -> list[structure_sets.StructureSet]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = []
    for n, ds in enumerate(datasets):
        path = tmp_path / f"rt{n}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(structure_sets.read_header(path))
    return out


def test_rule_referenced_then_latest_then_most_rois(patient, tmp_path):
    image_series = str(patient.ct[0].SeriesInstanceUID)
    first, later = patient.rtstruct, revision(patient)
    theirs, elsewhere = _pacsai_copy(later, "20300102"), _other_image(first, "20300103")
    headers = _headers(tmp_path, [first, later, theirs, elsewhere])
    assert [h.written_by_pacsai for h in headers] == [False, False, True, False]
    assert headers[1].date_time == "20300101143000" and headers[1].label == "Physician revision"

    chosen = structure_sets.choose(headers, image_series_uid=image_series)
    assert chosen is headers[1]  # the later revision, although it has fewer ROIs than the first set
    assert len(headers[0].roi_names) > len(chosen.roi_names) == len(REVISION_ROIS)
    # without pacsai's own and the other image's, in any order: the same choice
    assert structure_sets.choose(headers[::-1], image_series_uid=image_series) is headers[1]
    # drawn on another image: never, even when it is all there is
    assert structure_sets.choose([headers[3]], image_series_uid=image_series) is None
    assert structure_sets.choose([headers[2]]) is None  # pacsai's own never count

    # same date and time: most ROIs
    tie = _headers(tmp_path / "tie", [first, revision(patient, date="20300101", time="090000")])
    assert structure_sets.choose(tie, image_series_uid=image_series) is tie[0]
    # undated sets lose against dated ones
    undated = copy.deepcopy(later)
    del undated.StructureSetDate
    dated_vs_undated = _headers(tmp_path / "undated", [first, undated])
    assert dated_vs_undated[1].date_time == ""
    assert structure_sets.choose(dated_vs_undated, image_series_uid=image_series) is dated_vs_undated[0]


def test_report_takes_the_rules_choice_on_a_study_with_two_planner_sets(patient, tmp_path):
    from pacsai.pacs import connect
    from pacsai.report.inputs import gather
    from pacsai.report.params import validate_parameters

    pacs = connect(f"file://{tmp_path / 'pacs'}", cache_dir=tmp_path / "cache")
    later = revision(patient)
    objects = [*patient.datasets(), later, _pacsai_copy(later, "20300102")]
    assert pacs.store(objects, progress=False).ok
    data = gather(validate_parameters(patient_id=patient.patient_id), pacs=pacs)
    assert tuple(data.current.structures) == REVISION_ROIS
    assert data.current.drawn_by.label == "RTSTRUCT 'Physician revision' 2030-01-01"


def test_reading_something_else_is_an_error_naming_the_file(patient, tmp_path):
    from pacsai.errors import StructureError

    path = tmp_path / "ct.dcm"
    patient.ct[0].save_as(path, enforce_file_format=True)
    with pytest.raises(StructureError, match=r"ct\.dcm is a CT object, not an RTSTRUCT"):
        structure_sets.read_header(path)
