"""Research export (pacsai.export) from a real embedded PACS seeded with synthetic patients.

Checked by the tools the export is for: nnU-Net v2's own ``verify_dataset_integrity``, MONAI's
``load_decathlon_datalist`` + ``LoadImaged``, SimpleITK's DICOM series reader for the geometry; and by grepping
every byte written (gzip members decompressed) for the source's identifiers.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from pacsai.cli import VERBS
from pacsai.cli import main as cli_main
from pacsai.cohort import CohortQuery, select_cohort
from pacsai.export import Deidentifier, ExportError, export_cohort
from pacsai.commands.export import register
from pacsai.pacs import Pacs, connect

SHAPE = (16, 64, 64)
SPACING = (6.0, 6.0, 8.0)
STRUCTURES = ("BODY", "Lung_L", "Lung_R", "Heart", "GTV")
N_PATIENTS = 2


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An embedded PACS with SYN-00300, SYN-00301, each with a planning and a prior study (CT + RTSTRUCT)."""
    from pacsai.synthetic import seed_pacs

    root = tmp_path_factory.mktemp("export-store")
    seed_pacs(connect(f"file://{root / 'pacs'}", cache_dir=root / "cache"), patients=N_PATIENTS, seed=300,
              with_prior=True, progress=False, shape=SHAPE, spacing=SPACING)
    return root


def _pacs(store: Path) -> Pacs:
    return connect(f"file://{store / 'pacs'}", cache_dir=store / "cache")


def _cohort(pacs: Pacs):
    return select_cohort(pacs, CohortQuery(structures=STRUCTURES, study_filters={"PatientID": "SYN-003*"}))


def _source_identifiers(pacs: Pacs) -> set[str]:
    """Every identifier of the source objects: patient IDs, names, birth dates, every UID, study dates."""
    found: set[str] = set()
    for _, study in pacs.search_studies(PatientID="SYN-003*").iterrows():
        for _, series in pacs.search_series(StudyInstanceUID=study["StudyInstanceUID"]).iterrows():
            for path in pacs.retrieve_series(study["StudyInstanceUID"], series["SeriesInstanceUID"], progress=False):
                ds = pydicom.dcmread(path, stop_before_pixels=True)

                def collect(_ds: pydicom.Dataset, elem: pydicom.DataElement) -> None:
                    if elem.VR == "UI" and elem.keyword not in ("SOPClassUID", "ReferencedSOPClassUID",
                                                                "TransferSyntaxUID", "CodingSchemeUID"):
                        found.update(str(v) for v in (elem.value if elem.VM > 1 else [elem.value]) if v)

                ds.walk(collect)
                found.update({str(ds.PatientID), str(ds.PatientBirthDate), str(ds.StudyDate)})
                name = str(ds.PatientName)
                found.update({name, name.replace("^", " ")})
    found.discard("")
    assert any(x.startswith("SYN-") for x in found) and len(found) > 20
    return found


def _pacsai(argv: list[str]) -> int:
    """``pacsai ARGV``; until the coordinator registers the verb in pacsai/cli.py, through its own parser."""
    if "export" in VERBS:
        return cli_main(argv)
    import argparse

    parser = argparse.ArgumentParser(prog="pacsai")
    register(parser.add_subparsers(dest="verb"))
    args = parser.parse_args(argv)
    return int(args.func(args))


def _all_bytes(folder: Path) -> list[tuple[Path, bytes]]:
    out = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        out.append((path, data + (gzip.decompress(data) if path.suffix == ".gz" else b"")))
    return out


@pytest.fixture(scope="module")
def nnunet_export(store: Path, tmp_path_factory: pytest.TempPathFactory):
    pacs = _pacs(store)
    out = tmp_path_factory.mktemp("exp") / "Dataset501_Thorax"
    manifest = tmp_path_factory.mktemp("keep") / "manifest.json"
    result = export_cohort(pacs, _cohort(pacs), out, fmt="nnunet", structures=STRUCTURES,
                           deidentifier=Deidentifier(manifest, export_dir=out), with_dicom=True)
    return result


def test_nnunet_export_passes_nnunets_own_integrity_check(nnunet_export) -> None:
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    out = nnunet_export.out_dir
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["labels"] == {"background": 0, "BODY": 1, "Lung_L": 2, "Lung_R": 3, "Heart": 4, "GTV": 5}
    assert dataset["numTraining"] == 2 * N_PATIENTS and dataset["channel_names"] == {"0": "CT"}
    assert len(list((out / "imagesTr").glob("*_0000.nii.gz"))) == 2 * N_PATIENTS
    verify_dataset_integrity(str(out), num_processes=1)  # raises (AssertionError/RuntimeError) on any fault
    # every label value is present in some case (nnU-Net accepts absent ones; ours are all non-empty by rule)
    import nibabel as nib

    values = set()
    for label in (out / "labelsTr").glob("*.nii.gz"):
        values |= set(np.unique(np.asarray(nib.load(label).dataobj)).tolist())
    assert values == set(range(len(STRUCTURES) + 1))


def test_nifti_geometry_equals_the_dicom_geometry(nnunet_export, store: Path) -> None:
    """A voxel's world position read from the NIfTI (SimpleITK, LPS) equals that in the source DICOM series."""
    import nibabel as nib
    import SimpleITK as sitk

    pacs = _pacs(store)
    row = _cohort(pacs).table.iloc[0]
    files = pacs.retrieve_series(row.study_instance_uid, row.series_instance_uid, progress=False)
    reader = sitk.ImageSeriesReader()  # slices ordered along the (axial) normal, as a DICOM viewer would
    def height(f: str) -> float:
        return float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2])

    reader.SetFileNames(sorted((str(f) for f in files), key=height))
    dicom = reader.Execute()
    case = nnunet_export.case_rows[0]
    assert case["SeriesInstanceUID"] != row.series_instance_uid  # remapped...
    image_path = nnunet_export.out_dir / case["image"]
    nifti = sitk.ReadImage(str(image_path))
    assert nifti.GetSize() == dicom.GetSize()
    for index in [(0, 0, 0), (63, 0, 0), (0, 63, 15), (17, 41, 9)]:
        assert np.allclose(nifti.TransformIndexToPhysicalPoint(index),
                           dicom.TransformIndexToPhysicalPoint(index), atol=1e-4)
    # nibabel: the RAS affine is the LPS one with x, y negated, and the voxels hold the DICOM's HU
    img = nib.load(image_path)
    ijk = np.array([17, 41, 9, 1.0])
    lps = np.array(dicom.TransformIndexToPhysicalPoint((17, 41, 9)))
    assert np.allclose((img.affine @ ijk)[:3], lps * [-1, -1, 1], atol=1e-4)
    assert np.array_equal(np.asarray(img.dataobj).transpose(2, 1, 0), sitk.GetArrayFromImage(dicom))
    assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1


def test_no_source_identifier_in_any_exported_byte_and_the_manifest_maps_back(nnunet_export, store: Path) -> None:
    pacs = _pacs(store)
    identifiers = _source_identifiers(pacs)
    files = _all_bytes(nnunet_export.out_dir)
    assert any(p.suffix == ".dcm" for p, _ in files) and len(files) > 10
    for path, data in files:
        for ident in identifiers:
            assert ident.encode() not in data, f"{ident!r} found in {path}"
        if path.suffix == ".dcm":
            ds = pydicom.dcmread(path)
            assert "DICOGNITO" in str(ds.DeidentificationMethod)
            assert "StudyDescription" not in ds and "SeriesDescription" not in ds  # free text: removed
            # dicognito says YES only where the pixels are declared free of burned-in text (it cannot know)
            assert ds.get("PatientIdentityRemoved") == ("YES" if ds.get("BurnedInAnnotation") == "NO" else None)
    manifest = json.loads(nnunet_export.manifest.read_text())
    assert nnunet_export.manifest.stat().st_mode & 0o077 == 0  # owner-only
    real = {e["pseudonym"]: e for e in manifest["patients"]}
    assert {e["patient_id"] for e in real.values()} == {"SYN-00300", "SYN-00301"}
    for case in nnunet_export.case_rows:  # every case's pseudonym and UIDs map back to the source
        entry = real[case["patient"]]
        assert case["case"] in entry["cases"]
        back = {v: k for k, v in entry["uids"].items()}
        study = back[case["StudyInstanceUID"]]
        assert pacs.search_studies(StudyInstanceUID=study)["PatientID"].iloc[0] == entry["patient_id"]
    # dates: one shift per patient, the same for both of its studies (the interval between them is kept exactly)
    def when(date: str, time: str) -> np.datetime64:
        return np.datetime64(f"{date[:4]}-{date[4:6]}-{date[6:8]}T{time[:2]}:{time[2:4]}:{time[4:6]}")

    for entry in real.values():
        shifts = set()
        for case in (c for c in nnunet_export.case_rows if c["patient"] == entry["pseudonym"]):
            study_uid = {v: k for k, v in entry["uids"].items()}[case["StudyInstanceUID"]]
            src = pacs.search_studies(StudyInstanceUID=study_uid).iloc[0]
            delta = when(case["StudyDate"], case["StudyTime"]) - when(src["StudyDate"], src["StudyTime"])
            shifts.add(delta.astype("timedelta64[s]").astype(int) / 3600.0)
        assert len(shifts) == 1 and shifts == {entry["date_shift_hours"]}
        assert entry["date_shift_hours"] <= -62 * 24  # dicognito: 62 to 730 days back
    assert len({e["date_shift_hours"] for e in real.values()}) == N_PATIENTS  # each patient its own shift
    # de-identified DICOM keeps its references: the RTSTRUCT points at the exported CT's series UID
    case = nnunet_export.case_rows[0]
    rt = pydicom.dcmread(next((nnunet_export.out_dir / "dicom" / case["case"] / "rtstruct").glob("*.dcm")))
    refs = {s.SeriesInstanceUID for f in rt.ReferencedFrameOfReferenceSequence
            for st in f.RTReferencedStudySequence for s in st.RTReferencedSeriesSequence}
    assert refs == {case["SeriesInstanceUID"]} and rt.PatientID == case["patient"]


def test_a_kept_manifest_gives_the_same_pseudonyms_again(nnunet_export, store: Path, tmp_path: Path) -> None:
    pacs = _pacs(store)
    out = tmp_path / "again"
    again = export_cohort(pacs, _cohort(pacs), out, fmt="nifti", structures=STRUCTURES,
                          deidentifier=Deidentifier(nnunet_export.manifest, export_dir=out))
    assert again.cases == nnunet_export.cases
    assert [r["StudyInstanceUID"] for r in again.case_rows] == [r["StudyInstanceUID"] for r in nnunet_export.case_rows]
    assert (out / nnunet_export.cases[0] / "label.nii.gz").is_file()
    labels = json.loads((out / "labels.json").read_text())["labels"]
    assert labels["GTV"] == 5


def test_monai_datalist_loads_with_loadimaged(store: Path, tmp_path: Path) -> None:
    from monai.data import load_decathlon_datalist
    from monai.transforms import LoadImaged

    out, manifest = tmp_path / "monai", tmp_path / "keep" / "m.json"
    argv = ["export", "--cohort", "-f", "PatientID=SYN-00300", "--structures", ",".join(STRUCTURES),
            "--format", "monai", "--out", str(out), "--deidentify", "--manifest", str(manifest),
            "--pacs", f"file://{store / 'pacs'}"]
    assert _pacsai(argv) == 0
    datalist = load_decathlon_datalist(str(out / "datalist.json"), data_list_key="training", base_dir=str(out))
    assert len(datalist) == 2
    loaded = LoadImaged(keys=["image", "label"], image_only=True)(datalist[0])
    image, label = loaded["image"], loaded["label"]
    assert tuple(image.shape) == (64, 64, 16) and image.shape == label.shape
    assert set(np.unique(np.asarray(label)).tolist()) == set(range(len(STRUCTURES) + 1))
    assert float(image.min()) <= -900  # HU, air outside the body
    assert "SYN-00300" not in (out / "datalist.json").read_text() + (out / "cases.json").read_text()
    assert json.loads(manifest.read_text())["patients"][0]["patient_id"] == "SYN-00300"


def test_refusals(store: Path, tmp_path: Path) -> None:
    pacs = _pacs(store)
    cohort = _cohort(pacs)
    with pytest.raises(ExportError, match="inside the export folder"):
        Deidentifier(tmp_path / "out" / "manifest.json", export_dir=tmp_path / "out")
    with pytest.raises(ExportError, match="unknown export format"):
        export_cohort(pacs, cohort, tmp_path / "x", fmt="nrrd", structures=STRUCTURES)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "a").write_text("a")
    with pytest.raises(ExportError, match="not empty"):
        export_cohort(pacs, cohort, tmp_path / "full", fmt="nifti", structures=STRUCTURES)


def test_export_from_a_real_orthanc(clean_orthanc, tmp_path: Path) -> None:
    """The same export over DICOMweb from a real Orthanc (one patient, no prior)."""
    from pacsai.synthetic import seed_pacs

    pacs = connect(clean_orthanc.url, user=clean_orthanc.user, password=clean_orthanc.password,
                   cache_dir=tmp_path / "cache")
    seed_pacs(pacs, patients=1, seed=310, with_prior=False, progress=False, shape=SHAPE, spacing=SPACING)
    cohort = select_cohort(pacs, CohortQuery(structures=STRUCTURES, study_filters={"PatientID": "SYN-00310"}))
    out = tmp_path / "Dataset502_Orthanc"
    result = export_cohort(pacs, cohort, out, fmt="nnunet", structures=STRUCTURES, with_dicom=True,
                           deidentifier=Deidentifier(tmp_path / "keep.json", export_dir=out))
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    verify_dataset_integrity(str(out), num_processes=1)
    for path, data in _all_bytes(out):
        for ident in ("SYN-00310", "SYNTHETIC^PATIENT310", cohort.table.iloc[0].study_instance_uid):
            assert ident.encode() not in data, f"{ident!r} found in {path}"
    assert Deidentifier(result.manifest, export_dir=out).real_id(result.case_rows[0]["patient"]) == "SYN-00310"
