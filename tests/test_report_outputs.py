"""pacsai.report.outputs (+ .sr, .pdf): the report's DICOM objects back to the PACS.

Sources: a small synthetic planning CT (pacsai.synthetic) and the real GE 3-slice CT of dcmqi with drawn masks.
Gates: dciodvfy -new with zero Error lines, exact read-back, byte-identical re-runs, new UIDs on any change, and
pushing twice to Orthanc and to the embedded store adds nothing the second time.
"""

from __future__ import annotations

import copy
import datetime as dt
import io
import math
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from matplotlib.backends.backend_pdf import PdfPages
from matplotlib.figure import Figure

import pacsai
from pacsai.errors import ReportError
from pacsai.imaging import read_seg, read_series, write_seg
from pacsai.imaging.dicomio import load_datasets
from pacsai.imaging.dicomwrite import save, to_bytes
from pacsai.imaging.geometry import like
from pacsai.report.outputs import build_outputs, output_uid_parts, push_outputs
from pacsai.report.pdf import (
    ENCAPSULATED_PDF_STORAGE,
    encapsulated_pdf,
    pdf_digest,
    read_encapsulated_pdf,
)
from pacsai.report.sr import (
    COMPREHENSIVE_3D_SR_STORAGE,
    PUSHED_DESPITE_FAIL,
    measurement_report,
    read_drawn_by,
    read_measurements,
    read_qa,
)
from pacsai.synthetic import make_patient
from tests.dciodvfy import assert_dciodvfy_clean

STRUCTURES = ("GTV", "Heart", "SpinalCord")
MEASUREMENTS = {
    "GTV": {"volume_cc": 2.56, "mean_dose_gy": 60.12, "max_dose_gy": 63.4, "longest_diameter_mm": 21.5},
    "Heart": {"volume_cc": 321.25, "mean_dose_gy": 4.75, "max_dose_gy": None, "longest_diameter_mm": None},
    "SpinalCord": {"volume_cc": 7.5},
}
MODEL = {"name": "demo-thorax", "version": "3", "run_id": "0123abcd"}
PARAMS = {"patient_id": "SYN-00003", "prescription_gy": 60.0, "fractions": 30, "structures_from": "model"}


def make_pdf(text: str = "Treatment planning report", *, created: dt.datetime | None = None) -> bytes:
    """A small real PDF; matplotlib stamps the clock unless CreationDate is given (None: no date at all)."""
    buffer = io.BytesIO()
    with PdfPages(buffer, metadata={"CreationDate": created}) as pdf:
        fig = Figure(figsize=(3, 2))  # no pyplot: no GUI backend, no global figure registry
        fig.text(0.1, 0.5, text)
        pdf.savefig(fig)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def patient():
    # 384 × 384 × 120 mm on a 96 × 96 × 24 grid: the smallest field of view the generator accepts, fast.
    return make_patient(3, shape=(24, 96, 96), spacing=(4.0, 4.0, 5.0), with_prior=False, with_dose=False)


@pytest.fixture(scope="module")
def masks(patient):
    return {name: patient.masks[name] for name in STRUCTURES}


@pytest.fixture(scope="module")
def seg(patient, masks):
    return write_seg(masks, source=patient.ct, uid_parts=("test",))


@pytest.fixture(scope="module")
def pdf_bytes() -> bytes:
    return make_pdf()


@pytest.fixture(scope="module")
def outputs(patient, masks, pdf_bytes):
    return build_outputs(
        source_images=patient.ct,
        masks=masks,
        measurements=MEASUREMENTS,
        pdf_bytes=pdf_bytes,
        model_info=MODEL,
        params=PARAMS,
    )


@pytest.fixture(scope="module")
def real_ct(test_data: Path):
    """The real GE 3-slice CT (SpecificCharacterSet present but empty) with two drawn masks."""
    sources = load_datasets(test_data / "dcmqi_ct_seg" / "ct_3slice")
    image = read_series(sources)
    z, y, x = np.ogrid[:3, :512, :512]
    organ = np.broadcast_to(((y - 260) ** 2 + (x - 300) ** 2) < 40**2, image.shape).copy()
    lesion = np.broadcast_to((((y - 200) ** 2 + (x - 200) ** 2) < 15**2) & (z == 1), image.shape).copy()
    drawn = {"Organ": like(image, organ, name="Organ"), "Lesion": like(image, lesion, name="Lesion")}
    return sources, image, drawn


def by_modality(datasets):
    return {str(ds.Modality): ds for ds in datasets}


def reread(ds, tmp_path: Path, name: str = "object.dcm") -> pydicom.Dataset:
    return pydicom.dcmread(save(ds, tmp_path / name))


# --------------------------------------------------------------------------------------------- Encapsulated PDF


@pytest.mark.parametrize("odd", [False, True], ids=["even-length", "odd-length"])
def test_encapsulated_pdf_round_trips_byte_exact(patient, pdf_bytes, tmp_path, odd):
    # Bytes after %%EOF are legal in a PDF: they make the two length parities from one document.
    pdf = pdf_bytes if len(pdf_bytes) % 2 == int(odd) else pdf_bytes + b"\n"
    assert len(pdf) % 2 == (1 if odd else 0)
    ds = encapsulated_pdf(pdf, source=patient.ct, title="Planning report SYN-00003")
    back = reread(ds, tmp_path)
    assert read_encapsulated_pdf(back) == pdf
    assert back.EncapsulatedDocumentLength == len(pdf)
    assert len(back.EncapsulatedDocument) == len(pdf) + (1 if odd else 0)
    assert back.SOPClassUID == ENCAPSULATED_PDF_STORAGE
    assert back.MIMETypeOfEncapsulatedDocument == "application/pdf"
    assert_dciodvfy_clean(back.filename)
    del back.EncapsulatedDocumentLength  # as from writers older than the attribute (2019)
    assert read_encapsulated_pdf(back) == pdf


def test_encapsulated_pdf_is_in_the_source_study(patient, pdf_bytes):
    ct = patient.ct[0]
    ds = encapsulated_pdf(pdf_bytes, source=patient.ct, title="Planning report SYN-00003")
    assert (ds.Modality, ds.ConversionType, ds.BurnedInAnnotation) == ("DOC", "WSD", "YES")
    assert ds.DocumentTitle == "Planning report SYN-00003 (research use only)"
    for keyword in (
        "StudyInstanceUID",
        "PatientID",
        "PatientName",
        "PatientBirthDate",
        "PatientSex",
        "AccessionNumber",
        "StudyID",
        "StudyDate",
        "StudyTime",
    ):
        assert ds[keyword].value == ct[keyword].value, keyword
    assert ds.SeriesInstanceUID != ct.SeriesInstanceUID
    # Dates come from the source series, never the clock.
    assert (ds.ContentDate, ds.ContentTime, ds.AcquisitionDateTime) == (
        ct.SeriesDate,
        ct.SeriesTime,
        ct.SeriesDate + ct.SeriesTime,
    )
    assert [item.ReferencedSOPInstanceUID for item in ds.SourceInstanceSequence] == [
        c.SOPInstanceUID for c in patient.ct
    ]
    # A title that says it already is not repeated.
    assert (
        encapsulated_pdf(pdf_bytes, source=ct, title="Report - Research Use Only").DocumentTitle
        == "Report - Research Use Only"
    )


def test_encapsulated_pdf_explicit_content_datetime(patient, pdf_bytes):
    when = dt.datetime(2026, 11, 28, 9, 30, 5)
    a = encapsulated_pdf(pdf_bytes, source=patient.ct, title="r", content_datetime=when)
    b = encapsulated_pdf(pdf_bytes, source=patient.ct, title="r", content_datetime="20261128093005")
    assert (a.ContentDate, a.ContentTime) == ("20261128", "093005")
    assert to_bytes(a) == to_bytes(b)


def test_encapsulated_pdf_uids_are_deterministic_and_content_derived(patient, pdf_bytes):
    a = encapsulated_pdf(pdf_bytes, source=patient.ct, title="r", uid_parts=("v1",))
    b = encapsulated_pdf(pdf_bytes, source=patient.ct, title="r", uid_parts=("v1",))
    assert to_bytes(a) == to_bytes(b)
    changed = [
        encapsulated_pdf(pdf_bytes, source=patient.ct, title="r", uid_parts=("v2",)),
        encapsulated_pdf(make_pdf("another report"), source=patient.ct, title="r", uid_parts=("v1",)),
        encapsulated_pdf(pdf_bytes, source=patient.ct[:5], title="r", uid_parts=("v1",)),
    ]
    uids = {a.SOPInstanceUID} | {c.SOPInstanceUID for c in changed}
    series = {a.SeriesInstanceUID} | {c.SeriesInstanceUID for c in changed}
    assert len(uids) == len(series) == 4


def test_pdf_timestamps_do_not_change_the_uids(patient):
    # Headless Chromium stamps /CreationDate and /ModDate on every print (measured here): a re-rendered,
    # otherwise identical report must map to the same SOP instance or each re-run would add a copy.
    first = make_pdf(created=dt.datetime(2026, 1, 1, 10, 0, 0))
    second = make_pdf(created=dt.datetime(2026, 11, 28, 12, 34, 56))
    assert first != second and len(first) == len(second)
    assert pdf_digest(first) == pdf_digest(second)
    a = encapsulated_pdf(first, source=patient.ct, title="r")
    b = encapsulated_pdf(second, source=patient.ct, title="r")
    assert (a.SOPInstanceUID, a.SeriesInstanceUID) == (b.SOPInstanceUID, b.SeriesInstanceUID)
    assert read_encapsulated_pdf(b) == second  # the document itself is kept as rendered
    # Chromium's form, and the trailer ID: content around them still counts.
    chromium = b"%PDF-1.4\n<</CreationDate (D:20261128124251+00'00')\n/ModDate (D:20261128124251+00'00')>>\n"
    later = chromium.replace(b"124251", b"130000")
    assert pdf_digest(chromium) == pdf_digest(later)
    assert pdf_digest(chromium) != pdf_digest(chromium.replace(b"%PDF-1.4", b"%PDF-1.5"))
    ids = b"%PDF-1.7\ntrailer <</ID [<0A1B> <0A1B>]>>\n"
    assert pdf_digest(ids) == pdf_digest(ids.replace(b"0A1B", b"FFEE"))


def test_encapsulated_pdf_refuses_bad_input(patient, pdf_bytes):
    with pytest.raises(ReportError, match="not a PDF"):
        encapsulated_pdf(b"<html></html>", source=patient.ct, title="r")
    with pytest.raises(ReportError, match="no source instance"):
        encapsulated_pdf(pdf_bytes, source=[], title="r")
    other = copy.deepcopy(patient.ct[1])
    other.StudyInstanceUID = "1.2.3.4"
    with pytest.raises(ReportError, match="several studies"):
        encapsulated_pdf(pdf_bytes, source=[patient.ct[0], other], title="r")
    with pytest.raises(ReportError, match="not a DICOM date-time"):
        encapsulated_pdf(pdf_bytes, source=patient.ct, title="r", content_datetime="2026-11-28")
    with pytest.raises(ReportError, match="not an Encapsulated PDF"):
        read_encapsulated_pdf(patient.ct[0])


# ------------------------------------------------------------------------------------------------ TID 1500 SR


def test_measurement_report_reads_back_values_and_units(patient, seg, tmp_path):
    ct = patient.ct[0]
    sr = measurement_report(seg, source_images=patient.ct, measurements=MEASUREMENTS)
    path = save(sr, tmp_path / "sr.dcm")
    assert_dciodvfy_clean(path)
    document = hd.sr.srread(path)
    assert document.SOPClassUID == COMPREHENSIVE_3D_SR_STORAGE
    groups = document.content.get_volumetric_roi_measurement_groups()
    assert [str(g.tracking_identifier) for g in groups] == list(STRUCTURES)
    segment_numbers = {item.SegmentLabel: int(item.SegmentNumber) for item in seg.SegmentSequence}
    for group in groups:
        name = str(group.tracking_identifier)
        ref = group.referenced_segment
        assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert ref.referenced_segment_numbers == [segment_numbers[name]]
        assert ref.source_series_for_segmentation.value == patient.ct[0].SeriesInstanceUID
    volume = groups[0].get_measurements(name=hd.sr.CodedConcept("118565006", "SCT", "Volume"))[0]
    assert (volume.value, volume.unit.value, volume.unit.scheme_designator) == (2.56, "cm3", "UCUM")
    assert read_measurements(path) == {
        "GTV": {
            "volume_cc": (2.56, "cm3"),
            "mean_dose_gy": (60.12, "Gy"),
            "max_dose_gy": (63.4, "Gy"),
            "longest_diameter_mm": (21.5, "mm"),
        },
        "Heart": {"volume_cc": (321.25, "cm3"), "mean_dose_gy": (4.75, "Gy")},
        "SpinalCord": {"volume_cc": (7.5, "cm3")},
    }
    assert read_measurements(sr) == read_measurements(path)
    assert sr.StudyInstanceUID == patient.ct[0].StudyInstanceUID
    assert sr.CurrentRequestedProcedureEvidenceSequence  # the CT and the SEG are listed as evidence
    assert (str(sr.ContentDate), str(sr.InstanceCreationDate)) == (ct.SeriesDate, ct.SeriesDate)


def test_measurement_report_is_byte_identical_on_rerun_and_new_on_change(patient, seg):
    a = measurement_report(seg, source_images=patient.ct, measurements=MEASUREMENTS, uid_parts=("p",))
    b = measurement_report(seg, source_images=patient.ct, measurements=MEASUREMENTS, uid_parts=("p",))
    assert to_bytes(a) == to_bytes(b)
    changed = {k: dict(v) for k, v in MEASUREMENTS.items()}
    changed["GTV"]["volume_cc"] = 2.57
    c = measurement_report(seg, source_images=patient.ct, measurements=changed, uid_parts=("p",))
    d = measurement_report(seg, source_images=patient.ct, measurements=MEASUREMENTS, uid_parts=("q",))
    for other in (c, d):
        assert other.SOPInstanceUID != a.SOPInstanceUID
        assert other.SeriesInstanceUID != a.SeriesInstanceUID


def test_measurement_report_leaves_out_nan_and_refuses_bad_input(patient, masks, seg):
    sr = measurement_report(
        seg, source_images=patient.ct, measurements={"GTV": {"volume_cc": 2.0, "mean_dose_gy": math.nan}}
    )
    assert read_measurements(sr) == {"GTV": {"volume_cc": (2.0, "cm3")}}
    with pytest.raises(ReportError, match="not segments of SEG"):
        measurement_report(seg, source_images=patient.ct, measurements={"Liver": {"volume_cc": 1.0}})
    with pytest.raises(ReportError, match="unknown measurement"):
        measurement_report(seg, source_images=patient.ct, measurements={"GTV": {"volume_cc": 1, "d95": 2}})
    with pytest.raises(ReportError, match="must be finite"):
        measurement_report(seg, source_images=patient.ct, measurements={"GTV": {"volume_cc": math.inf}})
    with pytest.raises(ReportError, match="no volume_cc"):
        measurement_report(seg, source_images=patient.ct, measurements={"GTV": {"mean_dose_gy": 1.0}})
    labelmap = write_seg({"GTV": masks["GTV"]}, source=patient.ct, segment_type="LABELMAP")
    with pytest.raises(ReportError, match="BINARY"):
        measurement_report(labelmap, source_images=patient.ct, measurements={"GTV": {"volume_cc": 1.0}})


QA_FAIL = {
    "status": "FAIL",
    "reasons": [
        {"code": "EMPTY_STRUCTURE", "level": "error", "message": "GTV is empty (the model found nothing)",
         "structure": "GTV", "values": {}},
        {"code": "DOMAIN_HU", "level": "review", "message": "HU p50 44 HU (training −107…−107) — σ ≥ 0.1",
         "structure": None, "values": {}},
        {"code": "DATA_NOTE", "level": "note", "message": "a note", "structure": None, "values": {}},
    ],
}


def test_measurement_report_carries_the_qa_gate(patient, seg, tmp_path):
    """The gate is a TID 1501 group of its own: the coded status and each error/review reason as text (notes
    left out), in the source's character set (Latin-1 here: typography made plain); dciodvfy-clean."""
    sr = measurement_report(seg, source_images=patient.ct, measurements=MEASUREMENTS, qa=QA_FAIL)
    path = save(sr, tmp_path / "sr.dcm")
    assert_dciodvfy_clean(path)
    assert read_qa(path) == {
        "status": "FAIL",
        "statements": ["ERROR EMPTY_STRUCTURE: GTV is empty (the model found nothing)",
                       "REVIEW DOMAIN_HU: HU p50 44 HU (training -107...-107) - sigma >= 0.1"],
    }
    assert read_measurements(path) == read_measurements(
        measurement_report(seg, source_images=patient.ct, measurements=MEASUREMENTS))  # measurements unchanged
    forced = measurement_report(seg, source_images=patient.ct, measurements=MEASUREMENTS, qa=QA_FAIL,
                                pushed_despite_fail=True)
    assert read_qa(forced)["statements"][-1] == PUSHED_DESPITE_FAIL == "pushed despite QA FAIL by user request"
    assert len({sr.SOPInstanceUID, forced.SOPInstanceUID,
                measurement_report(seg, source_images=patient.ct, measurements=MEASUREMENTS).SOPInstanceUID}) == 3
    authors = {"GTV": "model pacsai-thorax v3", "Heart": "RTSTRUCT 'Clinical plan' 2024-08-08"}
    passed = measurement_report(seg, source_images=patient.ct, measurements=MEASUREMENTS,
                                qa={"status": "PASS", "reasons": []}, drawn_by=authors)
    assert read_drawn_by(passed) == authors
    assert_dciodvfy_clean(save(passed, tmp_path / "sr-authors.dcm"))
    assert read_measurements(passed) == read_measurements(sr)
    assert read_qa(passed) == {"status": "PASS", "statements": []}
    assert read_qa(measurement_report(seg, source_images=patient.ct, measurements=MEASUREMENTS))["status"] is None
    with pytest.raises(ReportError, match="only a FAIL"):
        measurement_report(seg, source_images=patient.ct, measurements=MEASUREMENTS,
                           qa={"status": "REVIEW", "reasons": []}, pushed_despite_fail=True)
    with pytest.raises(ReportError, match="QA status"):
        measurement_report(seg, source_images=patient.ct, measurements=MEASUREMENTS, qa={"status": "OK"})


# -------------------------------------------------------------------------------------------------- build_outputs


def test_build_outputs_synthetic_all_clean_and_in_the_study(patient, masks, outputs, tmp_path):
    assert [ds.Modality for ds in outputs] == ["SEG", "RTSTRUCT", "SR", "DOC"]
    assert [int(ds.SeriesNumber) for ds in outputs] == [900, 901, 902, 903]
    ct = patient.ct[0]
    assert {ds.StudyInstanceUID for ds in outputs} == {ct.StudyInstanceUID}
    assert len({ds.SeriesInstanceUID for ds in outputs} | {ct.SeriesInstanceUID}) == 5
    for ds in outputs:
        assert_dciodvfy_clean(save(ds, tmp_path / f"{ds.Modality}.dcm"))
    found = by_modality(outputs)
    sr = found["SR"]
    evidence = {
        ref.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert found["SEG"].SOPInstanceUID in evidence
    # The SEG and RTSTRUCT carry the model; the masks come back exactly.
    algorithm = found["SEG"].SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("demo-thorax", "3")
    back = read_seg(found["SEG"], like=patient.image)
    for name in STRUCTURES:
        assert np.array_equal(back[name].values, masks[name].values), name


def test_build_outputs_same_inputs_same_bytes_any_change_new_uids(patient, masks, pdf_bytes, outputs):
    def build(**changes):
        kwargs = {
            "source_images": patient.ct,
            "masks": masks,
            "measurements": MEASUREMENTS,
            "pdf_bytes": pdf_bytes,
            "model_info": MODEL,
            "params": PARAMS,
        }
        kwargs.update(changes)
        return by_modality(build_outputs(**kwargs))

    again = build()
    before = by_modality(outputs)
    assert {m: to_bytes(ds) for m, ds in again.items()} == {m: to_bytes(ds) for m, ds in before.items()}

    for changed in (build(params={**PARAMS, "fractions": 20}), build(model_info={**MODEL, "version": "4"})):
        for modality, ds in changed.items():
            assert ds.SOPInstanceUID != before[modality].SOPInstanceUID, modality
            assert ds.SeriesInstanceUID != before[modality].SeriesInstanceUID, modality

    # A changed measurement changes only the SR; the same masks keep their SEG and RTSTRUCT.
    measurements = {k: dict(v) for k, v in MEASUREMENTS.items()}
    measurements["Heart"]["mean_dose_gy"] = 4.8
    changed = build(measurements=measurements)
    same = {m for m in changed if changed[m].SOPInstanceUID == before[m].SOPInstanceUID}
    assert same == {"SEG", "RTSTRUCT", "DOC"}


def test_build_outputs_options(patient, masks, pdf_bytes):
    common = {
        "source_images": patient.ct,
        "masks": masks,
        "measurements": MEASUREMENTS,
        "model_info": {},
        "params": PARAMS,
    }
    assert [ds.Modality for ds in build_outputs(**common, pdf_bytes=None, include_rtstruct=False)] == [
        "SEG",
        "SR",
    ]
    # The SR references the SEG: no SEG, no SR.
    assert [ds.Modality for ds in build_outputs(**common, pdf_bytes=pdf_bytes, include_seg=False)] == [
        "RTSTRUCT",
        "DOC",
    ]
    from_pacs = build_outputs(**common, pdf_bytes=None, include_rtstruct=False)[0]
    algorithm = from_pacs.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "pacsai"
    assert algorithm.AlgorithmVersion == f"pacsai {pacsai.__version__}"
    with pytest.raises(ReportError, match="no masks of those structures"):
        build_outputs(**{**common, "masks": {"GTV": masks["GTV"]}}, pdf_bytes=None)
    with pytest.raises(ReportError, match="nothing to send"):
        build_outputs(**{**common, "masks": {}, "measurements": {}}, pdf_bytes=None)


def test_build_outputs_with_an_empty_structure(patient, masks, tmp_path):
    # A structure the model did not find (0 voxels): an empty segment / an ROI without contours, still clean.
    empty = like(patient.image, np.zeros(patient.image.shape, dtype=bool), name="Esophagus")
    datasets = build_outputs(
        source_images=patient.ct,
        masks={"GTV": masks["GTV"], "Esophagus": empty},
        measurements={"GTV": {"volume_cc": 2.56}, "Esophagus": {"volume_cc": 0.0}},
        pdf_bytes=None,
        model_info=MODEL,
        params=PARAMS,
    )
    assert [ds.Modality for ds in datasets] == ["SEG", "RTSTRUCT", "SR"]
    for ds in datasets:
        assert_dciodvfy_clean(save(ds, tmp_path / f"{ds.Modality}.dcm"))
    assert read_measurements(datasets[2])["Esophagus"] == {"volume_cc": (0.0, "cm3")}
    rtstruct = datasets[1]
    assert [item.ROIName for item in rtstruct.StructureSetROISequence] == ["GTV", "Esophagus"]
    assert "ContourSequence" not in rtstruct.ROIContourSequence[1]


def test_output_uid_parts_canonical():
    a = output_uid_parts({"name": "m", "version": "1"}, {"b": 2, "a": 1})
    b = output_uid_parts({"version": "1", "name": "m"}, {"a": 1, "b": 2})
    assert a == b
    assert a[1:] == ('model={"name":"m","version":"1"}', 'params={"a":1,"b":2}')
    assert output_uid_parts({}, {"a": 1.0}) != output_uid_parts({}, {"a": 1.5})


def test_build_outputs_real_ct(real_ct, pdf_bytes, tmp_path):
    sources, image, drawn = real_ct
    measurements = {"Organ": {"volume_cc": 12.2, "longest_diameter_mm": 64.0}, "Lesion": {"volume_cc": 0.57}}
    datasets = build_outputs(
        source_images=sources,
        masks=drawn,
        measurements=measurements,
        pdf_bytes=pdf_bytes,
        model_info=MODEL,
        params={"patient_id": "JANCT000"},
    )
    assert [ds.Modality for ds in datasets] == ["SEG", "RTSTRUCT", "SR", "DOC"]
    assert {ds.StudyInstanceUID for ds in datasets} == {sources[0].StudyInstanceUID}
    for ds in datasets:
        assert_dciodvfy_clean(save(ds, tmp_path / f"{ds.Modality}.dcm"))
    found = by_modality(datasets)
    back = read_seg(found["SEG"], like=image)
    assert all(np.array_equal(back[n].values, drawn[n].values) for n in drawn)
    assert read_measurements(found["SR"])["Lesion"] == {"volume_cc": (0.57, "cm3")}
    assert read_encapsulated_pdf(found["DOC"]) == pdf_bytes


# ---------------------------------------------------------------------------------------------------- push


def test_push_twice_adds_nothing_the_second_time(pacs, patient, masks, pdf_bytes, outputs):
    study = patient.ct[0].StudyInstanceUID
    assert pacs.store(patient.ct, progress=False).ok
    first = push_outputs(pacs, outputs)
    assert first.ok and sorted(first.stored) == sorted(ds.SOPInstanceUID for ds in outputs)
    count = len(pacs.search_instances(StudyInstanceUID=study))
    assert count == len(patient.ct) + 4

    rebuilt = build_outputs(
        source_images=patient.ct,
        masks=masks,
        measurements=MEASUREMENTS,
        pdf_bytes=pdf_bytes,
        model_info=MODEL,
        params=PARAMS,
    )
    second = push_outputs(pacs, rebuilt)
    assert second.ok and second.stored == ()
    assert sorted(second.already_present) == sorted(ds.SOPInstanceUID for ds in outputs)
    assert len(pacs.search_instances(StudyInstanceUID=study)) == count

    # Changed content: a new SR instance, in a new series; nothing replaced.
    measurements = {k: dict(v) for k, v in MEASUREMENTS.items()}
    measurements["GTV"]["volume_cc"] = 2.6
    changed = build_outputs(
        source_images=patient.ct,
        masks=masks,
        measurements=measurements,
        pdf_bytes=pdf_bytes,
        model_info=MODEL,
        params=PARAMS,
    )
    third = push_outputs(pacs, changed)
    assert [by_modality(changed)["SR"].SOPInstanceUID] == list(third.stored)
    assert len(pacs.search_instances(StudyInstanceUID=study)) == count + 1
    modalities = pacs.search_series(StudyInstanceUID=study).Modality
    assert sorted(modalities) == ["CT", "DOC", "RTSTRUCT", "SEG", "SR", "SR"]


def test_push_outputs_refuses_objects_without_uids():
    with pytest.raises(ReportError, match="no StudyInstanceUID"):
        push_outputs(None, [pydicom.Dataset()])  # refused before any PACS is contacted
