"""Pacs.store on both back ends: classification (stored / already present / skipped / failed), file meta,
idempotence, batching, and the STOW answer."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pydicom
import pytest

from pacsai.errors import PacsAuthError
from pacsai.pacs import DicomWebPacs, Pacs, StoreSummary, connect
from pacsai.pacs import dicomweb as dicomweb_module
from pacsai.pacs import store as store_module

CT3 = "dcmqi_ct_seg/ct_3slice"


def _sop_uids(folder: Path) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in folder.glob("*.dcm")}


def test_store_counts_every_kind_of_input(pacs: Pacs, test_data: Path, tmp_path: Path):
    ct = test_data / CT3
    readme = tmp_path / "README.txt"
    readme.write_text("These are the CT slices of patient JANCT000.\n")
    source = min(ct.glob("*.dcm")).read_bytes()
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(source[: len(source) // 2])
    # Consistent lengths, but half the pixels: pydicom reads it without complaint (the trap).
    short_pixels = tmp_path / "short_pixels.dcm"
    ds = pydicom.dcmread(sorted(ct.glob("*.dcm"))[1])
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    ds.save_as(short_pixels)

    summary = pacs.store([ct, readme, truncated, short_pixels, tmp_path / "absent.dcm"], progress=False)

    assert set(summary.stored) == _sop_uids(ct)
    assert summary.already_present == ()
    assert summary.skipped == (str(readme),)
    failed = dict(summary.failed)
    assert set(failed) == {str(truncated), str(short_pixels), str(tmp_path / "absent.dcm")}
    assert failed[str(short_pixels)] == (
        "pixel data has 262144 bytes but Rows×Columns×SamplesPerPixel×frames×BitsAllocated/8 = "
        "512×512×1×1×16/8 call for 524288 (truncated file?)"
    )
    assert failed[str(truncated)].startswith(
        f"the file ends at byte {len(source) // 2}, inside element (7FE0,0010)"
    )
    assert failed[str(tmp_path / "absent.dcm")] == "no such file or folder"
    assert not summary.ok
    # Nothing broken reached the PACS (the short-pixel file has the UID of a good one, stored intact).
    assert set(pacs.search_instances()["SOPInstanceUID"]) == _sop_uids(ct)


def test_store_is_idempotent(pacs: Pacs, test_data: Path):
    ct = test_data / CT3
    first = pacs.store(ct, progress=False)
    again = pacs.store(ct, progress=False)
    assert len(first.stored) == 3 and first.ok
    assert again == StoreSummary(already_present=again.already_present)
    assert set(again.already_present) == _sop_uids(ct)
    assert len(pacs.search_instances()) == 3


def test_same_instance_twice_in_one_call(pacs: Pacs, test_data: Path):
    one = min((test_data / CT3).glob("*.dcm"))
    summary = pacs.store([one, one], progress=False)
    assert len(summary.stored) == 1 and len(summary.already_present) == 1


def test_file_without_preamble_or_file_meta_gets_them(pacs: Pacs, test_data: Path, tmp_path: Path):
    no_meta = test_data / "pydicom_variants/rt_tiny/rtstruct.dcm"
    assert no_meta.read_bytes()[128:132] != b"DICM"
    summary = pacs.store(no_meta, progress=False)
    assert summary.ok and len(summary.stored) == 1
    row = pacs.search_instances(SOPInstanceUID=summary.stored[0]).iloc[0]
    path = pacs.retrieve_series(row.StudyInstanceUID, row.SeriesInstanceUID, progress=False)[0]
    assert path.read_bytes()[128:132] == b"DICM"
    back = pydicom.dcmread(path)
    source = pydicom.dcmread(no_meta, force=True)
    assert back.SOPInstanceUID == source.SOPInstanceUID
    assert back.file_meta.MediaStorageSOPInstanceUID == source.SOPInstanceUID
    assert len(back.ROIContourSequence) == len(source.ROIContourSequence)


@pytest.mark.parametrize(
    ("source", "cut", "reason"),
    [
        (f"{CT3}/*.dcm", 1500, "the file ends at byte 1500, inside element (0020,0037) that needs 1544"),
        ("pydicom_variants/mr/MR_small_jp2klossless.dcm", 1500, "MR Image Storage without pixel data"),
        ("pydicom_variants/mr/MR_small_jp2klossless.dcm", -3, "inside element (FFFC,FFFC)"),
        ("pydicom_variants/mr/MR_small_RLE.dcm", -100, "inside element (FFFC,FFFC)"),
    ],
)
def test_truncated_files_fail_with_the_reason(test_data: Path, tmp_path: Path, source, cut, reason):
    data = min(test_data.glob(source)).read_bytes()
    path = tmp_path / "cut.dcm"
    path.write_bytes(data[:cut])
    with pytest.raises(store_module._Broken, match=re.escape(reason)):
        store_module.prepare_file(path)


def test_odd_real_files_are_classified(test_data: Path):
    # Every transfer syntax, big endian, deflate, no file meta, multi-frame, plus the collection's licences.
    paths = sorted(p for p in (test_data / "pydicom_variants").rglob("*") if p.is_file())
    paths += sorted((test_data / "totalsegmentator_ct_j2k/dicom").iterdir())[:2]
    verdicts = {"ok": 0, "skip": 0, "broken": []}
    for path in paths:
        try:
            store_module.prepare_file(path)
            verdicts["ok"] += 1
        except store_module._Skip:
            verdicts["skip"] += 1
        except store_module._Broken as err:
            verdicts["broken"].append((path.relative_to(test_data).parts[0], str(err)[:30]))
    # The known traps of the collection (SOURCES.md), and nothing else.
    assert sorted(set(verdicts["broken"])) == [
        ("pydicom_variants", "the file ends at byte 9630, in"),  # MR_truncated.dcm
        ("totalsegmentator_ct_j2k", "DICOM without SOPClassUID, SOP"),  # UIDs only in the file meta
    ]
    assert (verdicts["ok"], verdicts["skip"]) == (36, 3)  # 40 files + 2 CT: 36 good, 3 text, 3 broken


def test_dicom_with_empty_uids_fails_with_the_reason(pacs: Pacs, test_data: Path):
    # The TotalSegmentator CT keeps its UIDs only in the file meta (SOURCES.md): not storable as is.
    one = min((test_data / "totalsegmentator_ct_j2k/dicom").iterdir())
    summary = pacs.store(one, progress=False)
    assert summary.stored == ()
    assert summary.failed == (
        (str(one), "DICOM without SOPClassUID, SOPInstanceUID, StudyInstanceUID, SeriesInstanceUID"),
    )


def test_datasets_are_stored_and_left_unchanged(pacs: Pacs, test_data: Path):
    path = min((test_data / CT3).glob("*.dcm"))
    ds = pydicom.dcmread(path)
    del ds.file_meta
    summary = pacs.store([ds], progress=False)
    assert summary.stored == (str(ds.SOPInstanceUID),)
    assert not hasattr(ds, "file_meta")


def test_stow_batches(pacs: Pacs, test_data: Path, monkeypatch):
    monkeypatch.setattr(store_module, "BATCH_INSTANCES", 2)
    posts: list[int] = []
    if isinstance(pacs, DicomWebPacs):
        pacs.session.hooks["response"].append(
            lambda r, **_: posts.append(1) if r.request.method == "POST" else None
        )
    summary = pacs.store(test_data / CT3, progress=False)
    assert len(summary.stored) == 3
    if isinstance(pacs, DicomWebPacs):
        assert len(posts) == 2  # 2 + 1 instances


def test_batches_respect_the_byte_limit(monkeypatch):
    monkeypatch.setattr(store_module, "BATCH_BYTES", 100)
    items = [
        store_module.Prepared(name=str(i), sop_uid=str(i), study_uid="1", data=b"x" * 60) for i in range(3)
    ]
    assert [len(b) for b in store_module.batches(items)] == [1, 1, 1]


def test_folder_is_walked_recursively_and_dicomdir_skipped(pacs: Pacs, test_data: Path, tmp_path: Path):
    from pydicom.fileset import FileSet

    nested = tmp_path / "a" / "b"
    nested.mkdir(parents=True)
    source = min((test_data / CT3).glob("*.dcm"))
    (nested / "IMG0001").write_bytes(source.read_bytes())
    fs = FileSet()
    fs.add(pydicom.dcmread(source))
    fs.write(tmp_path / "media")
    summary = pacs.store(tmp_path, progress=False)
    assert len(summary.stored) == 1
    assert len(summary.already_present) == 1  # the same instance, inside the file set
    assert str(tmp_path / "media" / "DICOMDIR") in summary.skipped
    assert summary.ok


def test_wrong_password_stops_the_store(orthanc, test_data: Path, tmp_path: Path):
    pacs = connect(orthanc.url, user=orthanc.user, password="nope", cache_dir=tmp_path)
    with pytest.raises(PacsAuthError):
        pacs.store(test_data / CT3, progress=False)


def test_outcome_reports_rejected_and_silently_dropped_instances():
    batch = [
        store_module.Prepared(name=f"f{i}", sop_uid=f"1.{i}", study_uid="1", data=b"") for i in range(3)
    ]
    answer = {
        "00081199": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["1.0"]}}]},
        "00081198": {
            "vr": "SQ",
            "Value": [{"00081155": {"vr": "UI", "Value": ["1.1"]}, "00081197": {"vr": "US", "Value": [272]}}],
        },
    }
    ok, bad = store_module.stow_outcome(batch, answer, source="http://pacs")
    assert ok == ["1.0"]
    assert [name for name, _ in bad] == ["f1", "f2"]
    assert bad[0][1].startswith(
        "http://pacs rejected SOP instance 1.1 (failure reason 0x0110 (processing failure))"
    )
    assert bad[1][1].startswith("http://pacs neither stored nor rejected SOP instance 1.2 ")


def test_summary_text():
    summary = StoreSummary(stored=("1.2",), skipped=("README",), failed=(("bad.dcm", "truncated"),))
    assert str(summary) == (
        "stored 1, already present 0, skipped 1 (not DICOM), failed 1\n"
        "  skipped (not DICOM): README\n"
        "  failed: bad.dcm: truncated"
    )
    buffer = io.StringIO()
    print(summary, file=buffer)
    assert buffer.getvalue().startswith("stored 1")


def test_stored_instances_are_found_across_qido_pages(clean_orthanc, test_data: Path, tmp_path: Path, monkeypatch):
    # PACS cap QIDO answers; with pages of 2 the 3 instances of the study span two pages, and a capped listing
    # would turn stored instances into "refused" ones (after STOW) or send them again (before).
    monkeypatch.setattr(dicomweb_module, "QIDO_PAGE", 2)
    server = clean_orthanc
    with connect(server.url, user=server.user, password=server.password, cache_dir=tmp_path / "c") as pacs:
        first = pacs.store(test_data / CT3, progress=False)
        assert len(first.stored) == 3 and first.ok, first
        again = pacs.store(test_data / CT3, progress=False)
    assert len(again.already_present) == 3 and not again.stored and again.ok, again
