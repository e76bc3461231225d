"""The embedded store: created only by storing, plain folder paths, and the descriptions its index keeps
(including an index written before pacsai kept them)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pacsai.errors import PacsNotFoundError
from pacsai.pacs import EmbeddedPacs, connect


def _ct(study: str, series: str, *, study_description: str | None, series_description: str | None) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), study, series
    ds.PatientID, ds.Modality = "EMB-1", "CT"
    if study_description is not None:
        ds.StudyDescription = study_description
    if series_description is not None:
        ds.SeriesDescription = series_description
    ds.Rows = ds.Columns = 2
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = b"\0" * 8
    return ds


@pytest.fixture
def seeded(tmp_path: Path) -> tuple[EmbeddedPacs, str, list[str]]:
    study, series = generate_uid(), [generate_uid(), generate_uid()]
    pacs = connect(str(tmp_path / "store"), cache_dir=tmp_path / "cache")
    assert isinstance(pacs, EmbeddedPacs)
    items = [
        _ct(study, series[0], study_description="CT THORAX", series_description="AXIAL 1MM"),
        _ct(study, series[0], study_description="CT THORAX", series_description="AXIAL 1MM"),
        _ct(study, series[1], study_description=None, series_description=None),  # none carried: stays None
    ]
    assert len(pacs.store(items, progress=False).stored) == 3
    return pacs, study, series


def test_descriptions_are_answered(seeded):
    pacs, study, series = seeded
    assert list(pacs.search_studies().StudyDescription) == ["CT THORAX"]
    found = pacs.search_series().set_index("SeriesInstanceUID").SeriesDescription.to_dict()
    assert found == {series[0]: "AXIAL 1MM", series[1]: None}
    # ... and can be filtered on, with DICOM wildcards applied by pacsai.
    assert list(pacs.search_series(SeriesDescription="AXIAL*").SeriesInstanceUID) == [series[0]]
    assert list(pacs.search_studies(StudyDescription="*THORAX").StudyInstanceUID) == [study]


def test_an_index_from_before_descriptions_is_filled_once(seeded, tmp_path: Path):
    pacs, study, series = seeded
    index = pacs.path / ".dicom-file-client.db"
    with sqlite3.connect(index) as conn:  # what an older pacsai left: dicomweb-client's tables only
        conn.execute("DROP TABLE pacsai_descriptions")
        conn.execute("DROP TABLE pacsai_meta")
    again = connect(pacs.url, cache_dir=tmp_path / "cache")
    assert list(again.search_studies().StudyDescription) == ["CT THORAX"]
    assert set(again.search_series().SeriesDescription) == {"AXIAL 1MM", None}
    with sqlite3.connect(index) as conn:
        assert conn.execute("SELECT value FROM pacsai_meta WHERE key = 'descriptions'").fetchone() == ("1",)


def test_reading_never_creates_a_store(tmp_path: Path):
    pacs = connect(f"file://{tmp_path / 'typo'}", cache_dir=tmp_path / "cache")
    for read in (pacs.ping, pacs.search_studies, lambda: pacs.retrieve_series("1.2", "1.2.3", progress=False)):
        with pytest.raises(PacsNotFoundError, match=f"no embedded store at {tmp_path / 'typo'}"):
            read()
    assert not (tmp_path / "typo").exists()


def test_plain_paths_name_the_same_store(seeded, tmp_path: Path, monkeypatch):
    pacs, study, _ = seeded
    monkeypatch.chdir(tmp_path)
    for url in ("store", "./store", str(tmp_path / "store"), "file://./store", f"file://{tmp_path / 'store'}"):
        other = connect(url, cache_dir=tmp_path / "cache")
        assert other.url == pacs.url, url
        assert list(other.search_studies().StudyInstanceUID) == [study]


def test_a_folder_of_files_without_an_index_is_indexed(seeded, tmp_path: Path):
    """A fresh store's index is created empty (no folder scan: it would read the index's own SQLite files and drop
    this process's locks on them); a folder of DICOM files without an index is still indexed, once, under the lock."""
    import shutil

    pacs, study, series = seeded
    copy = tmp_path / "copied"
    shutil.copytree(pacs.path, copy, ignore=shutil.ignore_patterns(".*"))  # the files, not the index
    assert not (copy / ".dicom-file-client.db").exists()
    again = connect(str(copy), cache_dir=tmp_path / "cache2")
    found = again.search_series(StudyInstanceUID=study)
    assert sorted(found["SeriesInstanceUID"]) == sorted(series)
    assert (copy / ".pacsai-index.lock").is_file() and (copy / ".dicom-file-client.db").is_file()
