"""DICOM objects of a synthetic patient: CT Image Storage slices, an RT Plan and an RT Dose.

Every object carries the full set of modules its IOD requires (type 2 attributes present, even when empty), so
``dciodvfy -new`` finds no error, and nothing reads the clock: UIDs, dates and times all come from the seed,
so the same seed writes byte-identical files. Part-10 helpers come from :mod:`pacsai.imaging.dicomwrite`.
The RT Structure Set is written by :func:`pacsai.imaging.write_rtstruct`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import UID

from pacsai import __version__
from pacsai.imaging.dicomwrite import finalize, format_ds, format_ds_list
from pacsai.synthetic.dose import FRACTIONS, Beam

logger = logging.getLogger(__name__)

CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")
RT_DOSE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.481.2")
RT_PLAN_STORAGE = UID("1.2.840.10008.5.1.4.1.1.481.5")
RT_STRUCTURE_SET_STORAGE = UID("1.2.840.10008.5.1.4.1.1.481.3")

MANUFACTURER = "pacsai"
MODEL = "pacsai synthetic thorax"
INSTITUTION = "pacsai synthetic data (not a patient)"
HU_MIN, HU_MAX = -1024, 3071  # what int16 with RescaleIntercept -1024 holds in 12 bits
# uint16 dose (dciodvfy 2024 asserts on 32-bit OW pixel data, even in TPS-written RTDOSE files), 1 mGy steps
DOSE_STEP_GY = 0.001


@dataclass(frozen=True)
class StudyInfo:
    """Patient and study attributes shared by every object of one study."""

    patient_id: str
    patient_name: str
    birth_date: str
    sex: str
    study_uid: str
    study_date: str
    study_time: str
    study_id: str
    accession: str
    description: str
    frame_of_reference_uid: str


def _common(
    ds: Dataset,
    info: StudyInfo,
    *,
    modality: str,
    series_uid: str,
    series_number: int,
    series_description: str,
) -> None:
    """Patient, General Study, (RT/General) Series, Frame of Reference and General Equipment modules."""
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = info.patient_name
    ds.PatientID = info.patient_id
    ds.PatientBirthDate = info.birth_date
    ds.PatientSex = info.sex
    ds.StudyInstanceUID = info.study_uid
    ds.StudyDate = info.study_date
    ds.StudyTime = info.study_time
    ds.ReferringPhysicianName = ""
    ds.StudyID = info.study_id
    ds.AccessionNumber = info.accession
    ds.StudyDescription = info.description
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description
    ds.SeriesDate = info.study_date
    ds.SeriesTime = info.study_time
    ds.FrameOfReferenceUID = info.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = MANUFACTURER
    ds.InstitutionName = INSTITUTION
    ds.ManufacturerModelName = MODEL
    ds.SoftwareVersions = f"pacsai {__version__}"
    ds.InstanceCreationDate = info.study_date
    ds.InstanceCreationTime = info.study_time


def ct_series(
    hu: np.ndarray,
    affine: np.ndarray,
    info: StudyInfo,
    *,
    series_uid: str,
    instance_uids: Sequence[str],
    series_number: int = 1,
    description: str = "Thorax planning CT (synthetic)",
) -> list[Dataset]:
    """One CT Image Storage dataset per slice of ``hu`` (``(z, y, x)``, HU) on an axis-aligned HFS grid.

    Parameters
    ----------
    hu
        The image in Hounsfield units; rounded and clipped to −1024…3071 (int16, RescaleIntercept −1024).
    affine
        The grid (axis-aligned: IOP ``[1, 0, 0, 0, 1, 0]``, slices along +z).
    info
        Patient/study attributes.
    series_uid, instance_uids
        SeriesInstanceUID and one SOPInstanceUID per slice.
    series_number, description
        SeriesNumber and SeriesDescription.

    Returns
    -------
    list of pydicom.Dataset
        In slice order (inferior → superior), each with file meta (Explicit VR Little Endian).
    """
    nz, ny, nx = hu.shape
    sx, sy, sz = float(affine[0, 0]), float(affine[1, 1]), float(affine[2, 2])
    origin = np.asarray(affine, dtype=float)[:3, 3]
    stored = (np.clip(np.rint(hu), HU_MIN, HU_MAX) - HU_MIN).astype("<i2")
    # Everything but five attributes is the same on every slice: build it once (pydicom's per-attribute
    # validation dominates otherwise) and give each slice its own copy of the element table.
    template = Dataset()
    template.SOPClassUID = CT_IMAGE_STORAGE
    _common(
        template,
        info,
        modality="CT",
        series_uid=series_uid,
        series_number=series_number,
        series_description=description,
    )
    template.PatientPosition = "HFS"
    template.BodyPartExamined = "CHEST"
    template.ProtocolName = "Thorax RT planning (synthetic)"
    template.AcquisitionNumber = 1
    template.AcquisitionDate = info.study_date
    template.AcquisitionTime = info.study_time
    template.ContentDate = info.study_date
    template.ContentTime = info.study_time
    template.KVP = "120"
    template.ExposureTime = 800
    template.XRayTubeCurrent = 250
    template.ConvolutionKernel = "STANDARD"
    template.DataCollectionDiameter = format_ds(max(nx * sx, ny * sy))
    template.ReconstructionDiameter = format_ds(max(nx * sx, ny * sy))
    template.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    template.SamplesPerPixel = 1
    template.PhotometricInterpretation = "MONOCHROME2"
    template.Rows = ny
    template.Columns = nx
    template.BitsAllocated = 16
    template.BitsStored = 16
    template.HighBit = 15
    template.PixelRepresentation = 1
    template.RescaleIntercept = str(HU_MIN)
    template.RescaleSlope = "1"
    template.RescaleType = "HU"
    template.WindowCenter = "40"
    template.WindowWidth = "400"
    template.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    template.PixelSpacing = [format_ds(sy), format_ds(sx)]  # row spacing (Δy), column spacing (Δx)
    template.SliceThickness = format_ds(sz)
    out = []
    for k in range(nz):
        ds = Dataset(dict(template._dict))
        position = origin + np.array([0.0, 0.0, k * sz])
        # add_new replaces the table entry (it never mutates an element the other slices share)
        ds.add_new("SOPInstanceUID", "UI", instance_uids[k])
        ds.add_new("InstanceNumber", "IS", k + 1)
        ds.add_new("ImagePositionPatient", "DS", format_ds_list(position))
        ds.add_new("SliceLocation", "DS", format_ds(position[2]))
        ds.add_new("PixelData", "OW", stored[k].tobytes())
        out.append(finalize(ds))
    return out


def rt_plan(
    info: StudyInfo,
    *,
    series_uid: str,
    instance_uid: str,
    dose_reference_uid: str,
    rtstruct: Dataset,
    beams: Sequence[Beam],
    prescription_gy: float,
    fractions: int = FRACTIONS,
    series_number: int = 3,
) -> Dataset:
    """A minimal but complete RT Plan: prescription (``prescription_gy`` to the PTV in ``fractions``) and the
    static photon fields the synthetic dose was shaped by.

    Parameters
    ----------
    info
        Patient/study attributes (the planning CT's study).
    series_uid, instance_uid, dose_reference_uid
        UIDs of the new plan.
    rtstruct
        The structure set the plan is made on (referenced; RTPlanGeometry PATIENT).
    beams
        Fields (gantry angle, isocentre, jaws, relative weight).
    prescription_gy, fractions
        The prescription.
    series_number
        SeriesNumber.
    """
    ds = Dataset()
    ds.SOPClassUID = RT_PLAN_STORAGE
    ds.SOPInstanceUID = instance_uid
    _common(
        ds,
        info,
        modality="RTPLAN",
        series_uid=series_uid,
        series_number=series_number,
        series_description="Synthetic 3D-CRT plan",
    )
    ds.OperatorsName = ""
    # RT General Plan
    ds.RTPlanLabel = "SYN LUNG"
    ds.RTPlanName = "Synthetic lung 3D-CRT"
    ds.RTPlanDate = info.study_date
    ds.RTPlanTime = info.study_time
    ds.RTPlanGeometry = "PATIENT"
    ds.PlanIntent = "CURATIVE"
    ds.InstanceNumber = 1
    ref_ss = Dataset()
    ref_ss.ReferencedSOPClassUID = RT_STRUCTURE_SET_STORAGE
    ref_ss.ReferencedSOPInstanceUID = rtstruct.SOPInstanceUID
    ds.ReferencedStructureSetSequence = [ref_ss]
    # RT Prescription
    dose_ref = Dataset()
    dose_ref.DoseReferenceNumber = 1
    dose_ref.DoseReferenceUID = dose_reference_uid
    dose_ref.DoseReferenceStructureType = "SITE"
    dose_ref.DoseReferenceDescription = "PTV"
    dose_ref.DoseReferenceType = "TARGET"
    dose_ref.DeliveryMaximumDose = format_ds(prescription_gy * 1.1)
    dose_ref.TargetPrescriptionDose = format_ds(prescription_gy)
    ds.DoseReferenceSequence = [dose_ref]
    # RT Fraction Scheme
    per_fraction = prescription_gy / fractions
    group = Dataset()
    group.FractionGroupNumber = 1
    group.NumberOfFractionsPlanned = int(fractions)
    group.NumberOfBeams = len(beams)
    group.NumberOfBrachyApplicationSetups = 0
    refs = []
    for number, beam in enumerate(beams, start=1):
        ref = Dataset()
        ref.ReferencedBeamNumber = number
        ref.BeamDose = format_ds(per_fraction * beam.weight)
        ref.BeamMeterset = format_ds(round(per_fraction * beam.weight * 100.0 * 1.3, 1))
        refs.append(ref)
    group.ReferencedBeamSequence = refs
    ds.FractionGroupSequence = [group]
    # RT Beams
    ds.BeamSequence = [_beam(number, beam) for number, beam in enumerate(beams, start=1)]
    # Approval
    ds.ApprovalStatus = "UNAPPROVED"
    return finalize(ds)


def _beam(number: int, beam: Beam) -> Dataset:
    item = Dataset()
    item.BeamNumber = number
    item.BeamName = f"G{round(beam.gantry_angle) % 360:03d}"
    item.BeamDescription = "static photon field (synthetic)"
    item.BeamType = "STATIC"
    item.RadiationType = "PHOTON"
    item.TreatmentMachineName = "SYNTHETIC_LINAC"
    item.Manufacturer = MANUFACTURER
    item.PrimaryDosimeterUnit = "MU"
    item.SourceAxisDistance = "1000"
    devices = []
    for kind in ("ASYMX", "ASYMY"):
        device = Dataset()
        device.RTBeamLimitingDeviceType = kind
        device.NumberOfLeafJawPairs = 1
        devices.append(device)
    item.BeamLimitingDeviceSequence = devices
    item.TreatmentDeliveryType = "TREATMENT"
    item.NumberOfWedges = 0
    item.NumberOfCompensators = 0
    item.NumberOfBoli = 0
    item.NumberOfBlocks = 0
    item.FinalCumulativeMetersetWeight = "1"
    item.NumberOfControlPoints = 2
    first = Dataset()
    first.ControlPointIndex = 0
    first.NominalBeamEnergy = "6"
    positions = []
    for kind, jaws in (("ASYMX", beam.x_jaws), ("ASYMY", beam.y_jaws)):
        pos = Dataset()
        pos.RTBeamLimitingDeviceType = kind
        pos.LeafJawPositions = format_ds_list(jaws)
        positions.append(pos)
    first.BeamLimitingDevicePositionSequence = positions
    first.GantryAngle = format_ds(beam.gantry_angle)
    first.GantryRotationDirection = "NONE"
    first.BeamLimitingDeviceAngle = "0"
    first.BeamLimitingDeviceRotationDirection = "NONE"
    first.PatientSupportAngle = "0"
    first.PatientSupportRotationDirection = "NONE"
    first.TableTopEccentricAngle = "0"
    first.TableTopEccentricRotationDirection = "NONE"
    first.TableTopVerticalPosition = ""
    first.TableTopLongitudinalPosition = ""
    first.TableTopLateralPosition = ""
    first.IsocenterPosition = format_ds_list(beam.isocentre)
    first.CumulativeMetersetWeight = "0"
    last = Dataset()
    last.ControlPointIndex = 1
    last.CumulativeMetersetWeight = "1"
    item.ControlPointSequence = [first, last]
    return item


def rt_dose(
    dose_gy: np.ndarray,
    affine: np.ndarray,
    info: StudyInfo,
    *,
    series_uid: str,
    instance_uid: str,
    plan: Dataset | None,
    series_number: int = 4,
) -> Dataset:
    """An RT Dose (Gy, PHYSICAL, PLAN) on its own axis-aligned grid; uint16 with DoseGridScaling from
    :func:`dose_grid_scaling`.

    Parameters
    ----------
    dose_gy
        ``(z, y, x)`` dose in Gy.
    affine
        The dose grid (axis-aligned, HFS); GridFrameOffsetVector is relative to the first frame.
    info
        Patient/study attributes (the planning CT's study and frame of reference).
    series_uid, instance_uid
        UIDs of the new dose.
    plan
        The RT Plan the dose belongs to (referenced); None writes DoseSummationType ``MULTI_PLAN`` without a
        reference.
    series_number
        SeriesNumber.
    """
    nz, ny, nx = dose_gy.shape
    sx, sy, sz = float(affine[0, 0]), float(affine[1, 1]), float(affine[2, 2])
    ds = Dataset()
    ds.SOPClassUID = RT_DOSE_STORAGE
    ds.SOPInstanceUID = instance_uid
    _common(
        ds,
        info,
        modality="RTDOSE",
        series_uid=series_uid,
        series_number=series_number,
        series_description="Synthetic plan dose",
    )
    ds.OperatorsName = ""
    ds.InstanceNumber = 1
    ds.ContentDate = info.study_date
    ds.ContentTime = info.study_time
    ds.ImagePositionPatient = format_ds_list(np.asarray(affine, dtype=float)[:3, 3])
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.PixelSpacing = [format_ds(sy), format_ds(sx)]
    ds.SliceThickness = format_ds(sz)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ny
    ds.Columns = nx
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.NumberOfFrames = nz
    ds.FrameIncrementPointer = Tag(0x3004, 0x000C)
    ds.GridFrameOffsetVector = format_ds_list(np.arange(nz) * sz)
    ds.DoseUnits = "GY"
    ds.DoseType = "PHYSICAL"
    scaling = dose_grid_scaling(float(np.max(dose_gy)))
    ds.DoseGridScaling = format_ds(scaling)
    ds.TissueHeterogeneityCorrection = "IMAGE"
    if plan is not None:
        ds.DoseSummationType = "PLAN"
        ref = Dataset()
        ref.ReferencedSOPClassUID = RT_PLAN_STORAGE
        ref.ReferencedSOPInstanceUID = plan.SOPInstanceUID
        ds.ReferencedRTPlanSequence = [ref]
    else:
        ds.DoseSummationType = "MULTI_PLAN"
    ds.PixelData = quantise_dose(dose_gy, scaling).astype("<u2").tobytes()
    return finalize(ds)


def dose_grid_scaling(max_dose_gy: float) -> float:
    """Gy per stored unit: a whole number of mGy, so that uint16 holds ``max_dose_gy`` and DS writes it exactly."""
    return DOSE_STEP_GY * max(1, int(np.ceil(max_dose_gy / (65535 * DOSE_STEP_GY))))


def quantise_dose(dose_gy: np.ndarray, scaling: float) -> np.ndarray:
    """The stored integers of ``dose_gy`` at ``scaling`` Gy per unit (what the RTDOSE holds)."""
    return np.rint(np.clip(dose_gy, 0.0, None) / scaling).astype(np.uint16)


SPATIAL_REGISTRATION_STORAGE = UID("1.2.840.10008.5.1.4.1.1.66.1")


def _image_refs(images: Sequence[Dataset]) -> list[Dataset]:
    refs = []
    for img in images:
        ref = Dataset()
        ref.ReferencedSOPClassUID = img.SOPClassUID
        ref.ReferencedSOPInstanceUID = img.SOPInstanceUID
        refs.append(ref)
    return refs


def spatial_registration(
    prior_to_current: np.ndarray,
    info: StudyInfo,
    *,
    current_ct: Sequence[Dataset],
    prior_ct: Sequence[Dataset],
    series_uid: str,
    instance_uid: str,
    series_number: int = 5,
) -> Dataset:
    """A rigid DICOM Spatial Registration (REG) in the planning study: the prior CT's frame → the planning CT's.

    The REG lives in the planning CT's frame of reference (its first item: identity). The second item holds the
    prior frame and the 4×4 matrix M with x_current = M · x_prior (PS3.3 C.20.2: a matrix maps its item's frame
    into the registration's own frame), as a TPS writes after a rigid fusion of the prior onto the planning CT.

    Parameters
    ----------
    prior_to_current
        4×4 rigid matrix, LPS mm.
    info
        The planning study (its frame of reference is the registration's).
    current_ct, prior_ct
        The registered image series (referenced per frame and in the Common Instance Reference module).
    series_uid, instance_uid
        UIDs of the new REG.
    """
    matrix = np.asarray(prior_to_current, dtype=float)
    if matrix.shape != (4, 4) or not np.allclose(matrix[3], [0, 0, 0, 1]):
        raise ValueError(f"prior_to_current must be a 4×4 affine matrix, got {matrix.tolist()}")
    ds = Dataset()
    ds.SOPClassUID = SPATIAL_REGISTRATION_STORAGE
    ds.SOPInstanceUID = instance_uid
    _common(ds, info, modality="REG", series_uid=series_uid, series_number=series_number,
            series_description="Prior CT registered to the planning CT (rigid)")
    ds.InstanceNumber = 1
    ds.ContentDate = info.study_date
    ds.ContentTime = info.study_time
    ds.ContentLabel = "PRIOR_TO_PLAN"
    ds.ContentDescription = "Prior CT onto the planning CT, rigid (synthetic)"
    ds.Laterality = ""  # General Series type 2C: dciodvfy asks for it on a REG (no image to carry laterality)
    ds.ContentCreatorName = ""
    items = []
    prior_frame = str(prior_ct[0].FrameOfReferenceUID)
    for frame, images, m in ((info.frame_of_reference_uid, current_ct, np.eye(4)), (prior_frame, prior_ct, matrix)):
        item = Dataset()
        item.FrameOfReferenceUID = frame
        item.ReferencedImageSequence = _image_refs(images)
        values = Dataset()
        values.FrameOfReferenceTransformationMatrix = format_ds_list(m.ravel())
        values.FrameOfReferenceTransformationMatrixType = "RIGID"
        reg = Dataset()
        reg.RegistrationTypeCodeSequence = []
        reg.MatrixSequence = [values]
        item.MatrixRegistrationSequence = [reg]
        items.append(item)
    ds.RegistrationSequence = items
    # Common Instance Reference: the planning CT in this study, the prior CT in the other one.
    current_series = Dataset()
    current_series.SeriesInstanceUID = current_ct[0].SeriesInstanceUID
    current_series.ReferencedInstanceSequence = _image_refs(current_ct)
    ds.ReferencedSeriesSequence = [current_series]
    prior_series = Dataset()
    prior_series.SeriesInstanceUID = prior_ct[0].SeriesInstanceUID
    prior_series.ReferencedInstanceSequence = _image_refs(prior_ct)
    other = Dataset()
    other.StudyInstanceUID = prior_ct[0].StudyInstanceUID
    other.ReferencedSeriesSequence = [prior_series]
    ds.StudiesContainingOtherReferencedInstancesSequence = [other]
    return finalize(ds)
