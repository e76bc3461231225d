"""De-identification for research exports: DICOM PS3.15 Annex E basic profile by dicognito, one key per export line.

Why dicognito: it implements the Basic Application Level Confidentiality Profile as a maintained library
(pydicom/deid, the other candidate, is a recipe engine: the profile would have to be written by hand as a recipe,
which is what the project rules out), it replaces rather than blanks (names, IDs, UIDs, dates, addresses,
equipment), sets PatientIdentityRemoved / DeidentificationMethod, and is deterministic for a given seed.

Consistency: each patient gets its own dicognito :class:`~dicognito.anonymizer.Anonymizer`, seeded with
HMAC-SHA256(key, PatientID). So within one patient every UID maps to the same new UID in every object and study
(references stay intact), every date moves by the same offset (intervals between that patient's studies are
kept; dicognito draws 62 to 730 days back), and the PatientID becomes the same pseudonym. Another patient's offset
differs. The key lives in the manifest (:class:`Deidentifier`): re-using the manifest for a later export gives
the same pseudonyms again; a new manifest, new ones.

The manifest maps pseudonyms ↔ real identifiers. It is the one file with PHI: it is written only where the user
names it, never inside the export folder, with owner-only permissions.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset

from pacsai.export.nifti import ExportError

MANIFEST_VERSION = 1

#: Free-text attributes that PS3.15 Table E.1-1 marks "X" (remove) in the basic profile and dicognito keeps: they
#: are where a name or an ID typed by hand hides. Removed with dicognito's own UnwantedElementsStripper.
FREE_TEXT_REMOVED = (
    "StudyDescription",
    "SeriesDescription",
    "ImageComments",
    "AdditionalPatientHistory",
    "PatientComments",
    "RequestedProcedureDescription",
    "PerformedProcedureStepDescription",
    "AdmittingDiagnosesDescription",
    "DerivationDescription",
    "RequestAttributesSequence",
)


@dataclass
class PatientEntry:
    """What the manifest records for one real patient."""

    patient_id: str
    patient_name: str
    pseudonym: str
    #: how far dicognito moved this patient's date-times (same for every study; dates move by whole days only
    #: where the time of day allows, so intervals between studies stay exact to the second)
    date_shift_hours: float | None = None
    uids: dict[str, str] = field(default_factory=dict)  # real UID → exported UID
    cases: list[str] = field(default_factory=list)


class Deidentifier:
    """Pseudonyms, date shifts and UID remapping for one export line, backed by a manifest file.

    Parameters
    ----------
    manifest
        Where the pseudonym ↔ real-ID manifest is kept. An existing one is read (its key and patients are
        reused: same pseudonyms as before); otherwise a new random key is made.
    export_dir
        The export folder; ``manifest`` must lie outside it.
    """

    def __init__(self, manifest: str | Path, *, export_dir: str | Path) -> None:
        self.path = Path(manifest).expanduser().resolve()
        out = Path(export_dir).expanduser().resolve()
        if self.path == out or out in self.path.parents:
            raise ExportError(f"the manifest {self.path} lies inside the export folder {out}: it holds the real "
                              "patient IDs; give --manifest a path outside --out")
        self.patients: dict[str, PatientEntry] = {}
        self._anonymizers: dict[str, Any] = {}
        if self.path.is_file():
            data = json.loads(self.path.read_text())
            if data.get("version") != MANIFEST_VERSION or "key" not in data:
                raise ExportError(f"{self.path} is not a pacsai export manifest (version {MANIFEST_VERSION}); "
                                  "give a new --manifest path")
            self.key = bytes.fromhex(data["key"])
            for entry in data.get("patients", []):
                self.patients[entry["patient_id"]] = PatientEntry(**entry)
        else:
            self.key = secrets.token_bytes(32)

    def _anonymizer(self, patient_id: str) -> Any:
        from dicognito.anonymizer import Anonymizer
        from dicognito.unwantedelements import UnwantedElementsStripper

        if patient_id not in self._anonymizers:
            seed = hmac.new(self.key, patient_id.encode(), hashlib.sha256).hexdigest()
            anonymizer = Anonymizer(seed=seed)
            anonymizer.add_element_handler(UnwantedElementsStripper(*FREE_TEXT_REMOVED))
            self._anonymizers[patient_id] = anonymizer
        return self._anonymizers[patient_id]

    def patient(self, patient_id: str, patient_name: str = "") -> PatientEntry:
        """The manifest entry of a real patient (made on first use: pseudonym = dicognito's new PatientID)."""
        if patient_id in self.patients:
            return self.patients[patient_id]
        probe = _probe()
        probe.PatientID = patient_id
        probe.PatientName = patient_name
        self._anonymizer(patient_id).anonymize(probe)
        pseudonym = str(probe.PatientID)
        if any(e.pseudonym == pseudonym for e in self.patients.values()):
            raise ExportError(f"pseudonym {pseudonym} drawn twice; start a new --manifest")
        entry = PatientEntry(patient_id=patient_id, patient_name=patient_name, pseudonym=pseudonym)
        self.patients[patient_id] = entry
        return entry

    def study(self, patient_id: str, study: Mapping[str, str]) -> dict[str, str]:
        """Exported values of a study's identifying header fields (UIDs remapped, date shifted).

        ``study`` holds DICOM keywords → values (``StudyInstanceUID``, ``SeriesInstanceUID``, ``StudyDate``,
        ``StudyTime``, ...); the answer has the same keys with the values dicognito gives them in the DICOM.
        """
        probe = _probe()
        for keyword, value in study.items():
            setattr(probe, keyword, value)
        self._anonymizer(patient_id).anonymize(probe)
        out = {k: str(getattr(probe, k, "")) for k in study}
        entry = self.patients[patient_id]
        for keyword, value in study.items():
            if keyword.endswith("UID") and value:
                entry.uids[value] = out[keyword]
        if study.get("StudyDate") and entry.date_shift_hours is None:
            before, after = _when(study), _when(out)
            entry.date_shift_hours = (after - before).total_seconds() / 3600.0
        return out

    def dataset(self, ds: Dataset) -> Dataset:
        """A de-identified copy of ``ds`` (Annex E basic profile by dicognito; its patient's seed)."""
        patient_id = str(ds.get("PatientID", ""))
        entry = self.patient(patient_id, str(ds.get("PatientName", "")))
        out = copy.deepcopy(ds)
        self._anonymizer(patient_id).anonymize(out)
        for keyword in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID"):
            if keyword in ds:
                entry.uids[str(ds.get(keyword))] = str(out.get(keyword))
        if str(out.PatientID) != entry.pseudonym:  # the same seed must give the same pseudonym
            raise ExportError(f"pseudonym mismatch for an object of {entry.pseudonym}; report this as a bug")
        return out

    def save(self) -> Path:
        """Write the manifest (owner-only permissions) and return its path."""
        data = {
            "version": MANIFEST_VERSION,
            "note": "pacsai export manifest: maps pseudonyms to real patients. Contains PHI: keep it apart "
                    "from the export and never share it with the data.",
            "key": self.key.hex(),
            "patients": [vars(e) for e in sorted(self.patients.values(), key=lambda e: e.pseudonym)],
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=1)
        os.chmod(self.path, 0o600)
        return self.path

    def real_id(self, pseudonym: str) -> str:
        """The real PatientID behind a pseudonym (what the manifest is for)."""
        for entry in self.patients.values():
            if entry.pseudonym == pseudonym:
                return entry.patient_id
        raise ExportError(f"pseudonym {pseudonym} is not in {self.path}")


def _probe() -> Dataset:
    """An empty dataset for dicognito to fill in (it walks the file meta too)."""
    probe = Dataset()
    probe.file_meta = FileMetaDataset()
    return probe


def _when(values: Mapping[str, str]) -> datetime:
    """StudyDate + StudyTime (midnight where the time is absent) as a datetime."""
    day = values["StudyDate"]
    time = (values.get("StudyTime") or "000000").split(".")[0].ljust(6, "0")
    return datetime(int(day[:4]), int(day[4:6]), int(day[6:8]), int(time[:2]), int(time[2:4]), int(time[4:6]))
