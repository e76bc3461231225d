"""A cohort → a research dataset other tools read as it is (nnU-Net v2, MONAI datalist, or NIfTI + label maps).

Layouts (``fmt``):

``nnunet``
    ``dataset.json`` (channel_names, labels with background 0, numTraining, file_ending), ``imagesTr/<case>_0000
    .nii.gz``, ``labelsTr/<case>.nii.gz``: an nnU-Net v2 raw dataset (put it at ``$nnUNet_raw/DatasetNNN_Name``).
``monai``
    ``datalist.json`` (``training``: ``[{image, label}]`` relative to the file, ``labels``), ``images/``,
    ``labels/``: what ``monai.data.load_decathlon_datalist`` and ``LoadImaged`` read.
``nifti``
    ``<case>/image.nii.gz``, ``<case>/label.nii.gz`` and ``labels.json`` (the label map).

Every layout also has ``cases.json`` (case → exported patient, study/series UIDs, study date, files) and, with
``with_dicom``, ``dicom/<case>/{image,rtstruct}/NNNN.dcm``: the source objects, de-identified when the export is.
With a :class:`~pacsai.export.deid.Deidentifier`, case names, JSON and DICOM carry only pseudonyms, shifted dates
and remapped UIDs; the real ones go into its manifest, outside the export.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydicom

from pacsai.export.formats import FORMATS
from pacsai.export.nifti import ExportError, label_map, write_case

if TYPE_CHECKING:  # pragma: no cover
    from pacsai.cohort import Cohort
    from pacsai.export.deid import Deidentifier
    from pacsai.pacs import Pacs

logger = logging.getLogger(__name__)

#: where each layout puts a case's image and label, relative to the export folder
_FILES = {
    "nnunet": ("imagesTr/{case}_0000.nii.gz", "labelsTr/{case}.nii.gz"),
    "monai": ("images/{case}.nii.gz", "labels/{case}.nii.gz"),
    "nifti": ("{case}/image.nii.gz", "{case}/label.nii.gz"),
}
_STUDY_KEYS = ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "StudyDate", "StudyTime")


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_cohort` wrote."""

    out_dir: Path
    fmt: str
    cases: list[str]
    labels: dict[str, int]
    index: Path  # dataset.json / datalist.json / labels.json
    manifest: Path | None
    seconds: float
    dicom_files: int = 0
    case_rows: list[dict[str, Any]] = field(default_factory=list)


def export_cohort(
    pacs: Pacs,
    cohort: Cohort,
    out_dir: str | Path,
    *,
    fmt: str,
    structures: Sequence[str],
    deidentifier: Deidentifier | None = None,
    with_dicom: bool = False,
    dataset_name: str = "pacsai",
) -> ExportResult:
    """Write ``cohort`` (its CT series and RTSTRUCT labels) to ``out_dir`` in layout ``fmt``.

    Parameters
    ----------
    pacs
        Where the cohort's series are retrieved from.
    cohort
        From :func:`pacsai.cohort.select_cohort` (one row per image series with its RTSTRUCT).
    out_dir
        A new or empty folder.
    fmt
        ``nnunet``, ``monai`` or ``nifti`` (module docstring).
    structures
        ROI names → labels 1, 2, ... in this order (case-insensitive match; a later one wins where they overlap).
    deidentifier
        Pseudonymise everything written (None: real IDs and UIDs are written as they are).
    with_dicom
        Also copy the source DICOM (de-identified with ``deidentifier``).
    dataset_name
        ``name`` in nnU-Net's dataset.json.

    Raises
    ------
    ExportError
        Unknown format, non-empty ``out_dir``, a missing or empty structure (named with its case and UID).
    """
    from pacsai.learning.dataset import load_reference, pick_rtstruct

    start = time.perf_counter()
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if not structures:
        raise ExportError("give the structures to export as labels (--structures GTV,Lung_L,...)")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"export folder {out} is not empty; give a new --out")
    out.mkdir(parents=True, exist_ok=True)
    labels = {"background": 0, **{name: n for n, name in enumerate(structures, start=1)}}
    image_tpl, label_tpl = _FILES[fmt]
    rows: list[dict[str, Any]] = []
    per_patient: dict[str, int] = {}
    dicom_files = 0
    for row in cohort.table.itertuples():
        patient_id = str(row.patient_id)
        label = patient_id
        if deidentifier is not None:
            label = deidentifier.patient(patient_id, str(row.patient_name)).pseudonym
        n = per_patient.get(label, 0)
        per_patient[label] = n + 1
        case = f"{label}_{n:02d}"
        volume, masks = load_reference(pacs, row, structures)
        try:
            labels_zyx = label_map(masks, structures, case=case)
        except ExportError as err:
            raise ExportError(f"{err} (image series {row.series_instance_uid})") from err
        image_rel, label_rel = image_tpl.format(case=case), label_tpl.format(case=case)
        write_case(volume, labels_zyx, out / image_rel, out / label_rel)
        ct_files = pacs.retrieve_series(row.study_instance_uid, row.series_instance_uid, progress=False)
        header = pydicom.dcmread(ct_files[0], stop_before_pixels=True)
        study = {k: str(header.get(k, "")) for k in _STUDY_KEYS if header.get(k, "")}
        if deidentifier is not None:
            study = deidentifier.study(patient_id, study)
            deidentifier.patients[patient_id].cases.append(case)
        rows.append({"case": case, "patient": label, **study, "image": image_rel, "label": label_rel})
        if with_dicom:
            rt_files = pacs.retrieve_series(row.study_instance_uid, row.rtstruct_series_uid, progress=False)
            rt_file = pick_rtstruct(rt_files, row.rtstruct_sop_instance_uid)
            dicom_files += _copy_dicom(ct_files, out / "dicom" / case / "image", deidentifier)
            dicom_files += _copy_dicom([rt_file], out / "dicom" / case / "rtstruct", deidentifier)
        logger.info("export: %s written", case)
    index = _write_index(out, fmt, rows, labels, dataset_name)
    (out / "cases.json").write_text(json.dumps({"labels": labels, "cases": rows}, indent=1))
    manifest = deidentifier.save() if deidentifier is not None else None
    return ExportResult(
        out_dir=out, fmt=fmt, cases=[r["case"] for r in rows], labels=labels, index=index, manifest=manifest,
        seconds=time.perf_counter() - start, dicom_files=dicom_files, case_rows=rows,
    )


def _copy_dicom(files: Sequence[Path], folder: Path, deidentifier: Deidentifier | None) -> int:
    """Copy Part-10 files as ``NNNN.dcm`` (names never carry UIDs), de-identified where asked."""
    folder.mkdir(parents=True, exist_ok=True)
    for n, path in enumerate(sorted(files)):
        ds: pydicom.Dataset = pydicom.dcmread(path)
        if deidentifier is not None:
            ds = deidentifier.dataset(ds)
        ds.save_as(folder / f"{n:04d}.dcm", enforce_file_format=True)
    return len(files)


def _write_index(out: Path, fmt: str, rows: list[dict[str, Any]], labels: dict[str, int], name: str) -> Path:
    """The layout's own index file: nnU-Net's dataset.json, MONAI's datalist or a label map."""
    if fmt == "nnunet":
        index = out / "dataset.json"
        body: dict[str, Any] = {
            "name": name,
            "description": "exported by pacsai (research use only)",
            "channel_names": {"0": "CT"},  # "CT": nnU-Net normalises with the dataset's HU percentiles
            "labels": labels,
            "numTraining": len(rows),
            "file_ending": ".nii.gz",
        }
    elif fmt == "monai":
        index = out / "datalist.json"
        body = {
            "name": name,
            "labels": {str(v): k for k, v in labels.items()},
            "training": [{"image": r["image"], "label": r["label"]} for r in rows],
        }
    else:
        index = out / "labels.json"
        body = {"labels": labels, "cases": [{"image": r["image"], "label": r["label"]} for r in rows]}
    index.write_text(json.dumps(body, indent=1))
    return index
