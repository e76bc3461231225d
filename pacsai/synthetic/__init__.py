"""Synthetic patients: a thoracic planning CT, its structures, a plan-like dose and a prior study, as real DICOM.

No real patient data ships with pacsai; the demo, the tests and new users get patients from here instead::

    from pacsai.synthetic import make_patient, write_patient, seed_pacs
    patient = make_patient(7)                  # SYN-00007: CT, RTSTRUCT, RTPLAN, RTDOSE + prior CT/RTSTRUCT
    patient.masks["GTV"], patient.image, patient.dose   # ground truth and arrays (pacsai volumes)
    write_patient(patient, "out/")             # Part-10 files
    seed_pacs(pacs, patients=5, seed=100)      # SYN-00100 … SYN-00104 into a PACS (idempotent)

Everything is deterministic from the seed: pixels, UIDs, dates. UIDs come from
:func:`pacsai.uids.derive_uid` over ``("synthetic", generator version, seed, grid, role, index)``, so different
seeds never collide and several seeds can share one PACS; the generator version and the grid enter the UIDs
because they shape the content (a changed object under an old UID would be silently dropped by Orthanc).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr
from pydicom.dataset import Dataset

from pacsai.imaging.geometry import affine_from, make_volume
from pacsai.synthetic import phantom
from pacsai.synthetic.dicom import (
    StudyInfo,
    ct_series,
    dose_grid_scaling,
    quantise_dose,
    rt_dose,
    rt_plan,
    spatial_registration,
)
from pacsai.synthetic.dose import FRACTIONS, PRESCRIPTION_GY, PTV_MARGIN_MM, make_dose, ptv_distance
from pacsai.uids import derive_uid

if TYPE_CHECKING:  # pragma: no cover
    from pacsai.pacs import Pacs
    from pacsai.pacs.store import StoreSummary

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_SHAPE",
    "DEFAULT_SPACING",
    "ROI_NAMES",
    "SeedResult",
    "SyntheticPatient",
    "make_patient",
    "patient_id_for",
    "seed_pacs",
    "write_patient",
]

#: Bump when the generator's output changes: it enters every UID, so new content never reuses an old UID.
GENERATOR_VERSION = "3"
#: (z, y, x) voxels of the default planning CT.
DEFAULT_SHAPE = (96, 256, 256)
#: (x, y, z) mm.
DEFAULT_SPACING = (1.8, 1.8, 3.0)
#: ROI names every synthetic RTSTRUCT holds (PTV and Vertebrae follow on the planning study).
ROI_NAMES = phantom.ROI_NAMES

_ROI_TYPES = {"BODY": "EXTERNAL", "GTV": "GTV", "PTV": "PTV", "Vertebrae": "ORGAN"}
_ROI_COLORS = {
    "BODY": (255, 170, 0),
    "GTV": (255, 0, 0),
    "PTV": (255, 0, 255),
    "Lung_L": (0, 200, 255),
    "Lung_R": (0, 90, 255),
    "Heart": (200, 0, 120),
    "SpinalCord": (255, 255, 0),
    "Esophagus": (0, 200, 0),
    "Vertebrae": (230, 230, 230),
}
# Independent random streams, so that changing one part of the generator does not reshuffle the others.
_STREAMS = {
    "anatomy": 1,
    "textures": 2,
    "tumour": 3,
    "noise": 4,
    "prior": 5,
    "prior_noise": 6,
    "dose": 7,
    "dates": 8,
}


@dataclass(frozen=True)
class SyntheticPatient:
    """One synthetic patient: DICOM datasets plus the ground truth they were made from.

    Attributes
    ----------
    seed, patient_id
        The seed and the PatientID it gives (``SYN-{seed:05d}``).
    ct, rtstruct, rtplan, rtdose
        The planning study: CT slices (inferior → superior), RT Structure Set, RT Plan and RT Dose (the last two
        None without dose).
    prior_ct, prior_rtstruct
        The earlier study (None without prior).
    image, prior_image
        HU volumes (pacsai volumes on the CT grids).
    masks, prior_masks
        Ground-truth boolean volumes by ROI name on the respective CT grid.
    dose
        Dose in Gy on the dose grid (None without dose).
    truth
        What the generator intended: tumour site, centre (LPS mm), radius, the prior's tumour scale and the
        response category it was drawn for, study dates, beam angles.
    """

    seed: int
    patient_id: str
    ct: list[Dataset] = field(repr=False)
    rtstruct: Dataset = field(repr=False)
    rtplan: Dataset | None = field(repr=False)
    rtdose: Dataset | None = field(repr=False)
    prior_ct: list[Dataset] | None = field(repr=False)
    prior_rtstruct: Dataset | None = field(repr=False)
    registration: Dataset | None = field(repr=False)
    image: xr.DataArray = field(repr=False)
    prior_image: xr.DataArray | None = field(repr=False)
    masks: dict[str, xr.DataArray] = field(repr=False)
    prior_masks: dict[str, xr.DataArray] | None = field(repr=False)
    dose: xr.DataArray | None = field(repr=False)
    truth: Mapping[str, Any] = field(default_factory=dict)

    def datasets(self) -> Iterator[Dataset]:
        """Every DICOM object of the patient: planning CT, RTSTRUCT, RTPLAN, RTDOSE, prior CT, prior RTSTRUCT, REG."""
        yield from self.ct
        yield self.rtstruct
        for ds in (self.rtplan, self.rtdose):
            if ds is not None:
                yield ds
        if self.prior_ct is not None:
            yield from self.prior_ct
        if self.prior_rtstruct is not None:
            yield self.prior_rtstruct
        if self.registration is not None:
            yield self.registration


def patient_id_for(seed: int) -> str:
    """The PatientID of seed ``seed``: ``SYN-{seed:05d}`` (clearly synthetic; unique per seed)."""
    return f"SYN-{seed:05d}"


def _rng(seed: int, stream: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, _STREAMS[stream]]))


def _grid_affine(
    shape: tuple[int, int, int], spacing: tuple[float, float, float], z_centre: float
) -> np.ndarray:
    nz, ny, nx = shape
    sx, sy, sz = spacing
    origin = (-(nx - 1) / 2.0 * sx, -(ny - 1) / 2.0 * sy, z_centre - (nz - 1) / 2.0 * sz)
    return affine_from(np.round(origin, 4), np.eye(3), spacing)


def make_patient(
    seed: int,
    *,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    spacing: tuple[float, float, float] = DEFAULT_SPACING,
    with_prior: bool = True,
    with_dose: bool = True,
    with_registration: bool = True,
) -> SyntheticPatient:
    """Generate one synthetic oncology patient, deterministically from ``seed``.

    Parameters
    ----------
    seed
        Non-negative integer; the same seed gives the same patient, byte for byte.
    shape
        CT voxels ``(z, y, x)``; the field of view (shape × spacing) must hold a thorax (≥ 380 mm in-plane,
        ≥ 120 mm along z).
    spacing
        Voxel size ``(x, y, z)`` in mm.
    with_prior
        Also make the prior study (CT + RTSTRUCT, ~3 months earlier, the tumour smaller or larger).
    with_dose
        Also make the RT Plan and RT Dose (60 Gy in 30 fractions to the PTV = GTV + 10 mm).
    with_registration
        With a prior: also make the rigid DICOM Spatial Registration (REG) of the prior CT onto the planning CT,
        in the planning study, as a TPS fusion leaves it (without it the two studies share no frame).

    Returns
    -------
    SyntheticPatient

    Raises
    ------
    ValueError
        A negative seed, or a grid too small for the anatomy.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, not {seed!r}")
    seed = int(seed)
    grid, voxel = tuple(int(v) for v in shape), tuple(float(v) for v in spacing)  # lists, numpy numbers → tuples
    phantom.check_grid(grid, voxel)  # three axes each, or an error
    shape, spacing = (grid[0], grid[1], grid[2]), (voxel[0], voxel[1], voxel[2])
    variant = f"{GENERATOR_VERSION}|{shape}|{spacing}"

    def uid(*parts: object) -> str:
        return derive_uid("synthetic", variant, seed, *parts)

    dates = _rng(seed, "dates")
    study_day = dt.date(2021, 1, 4) + dt.timedelta(days=int(dates.integers(0, 1460)))
    prior_day = study_day - dt.timedelta(days=int(dates.integers(80, 121)))
    birth_day = study_day - dt.timedelta(days=int(dates.integers(45 * 365, 85 * 365)))
    study_time = (
        f"{int(dates.integers(7, 17)):02d}{int(dates.integers(0, 60)):02d}{int(dates.integers(0, 60)):02d}"
    )
    prior_time = (
        f"{int(dates.integers(7, 17)):02d}{int(dates.integers(0, 60)):02d}{int(dates.integers(0, 60)):02d}"
    )
    z_centre = -round(float(dates.uniform(150.0, 450.0)) * 2.0) / 2.0  # table position
    patient_shift = dates.uniform(-6.0, 6.0, size=2)

    anatomy = phantom.draw_anatomy(_rng(seed, "anatomy"))
    textures = phantom.make_textures(_rng(seed, "textures"))
    affine = _grid_affine(shape, spacing, z_centre)
    # anatomical origin: carina region ~20 mm above the middle of the field of view, body below the centre
    origin = np.array([patient_shift[0], -30.0 + patient_shift[1], z_centre + 20.0])
    scene = phantom.render_anatomy(shape, affine, anatomy, textures, anatomy_origin=origin)
    tumour_rng = _rng(seed, "tumour")
    tumour = phantom.choose_tumour(scene, tumour_rng)
    phantom.paint_tumour(scene, tumour, scale=1.0)
    current = phantom.finish(scene, _rng(seed, "noise"))

    pid = patient_id_for(seed)
    common = {
        "patient_id": pid,
        "patient_name": f"SYNTHETIC^PATIENT{seed}",
        "birth_date": birth_day.strftime("%Y%m%d"),
        "sex": "F" if anatomy.female else "M",
    }
    info = StudyInfo(
        **common,
        study_uid=uid("study"),
        study_date=study_day.strftime("%Y%m%d"),
        study_time=study_time,
        study_id="1",
        accession=f"SYN{seed:07d}B"[:16],
        description="Thorax RT planning (synthetic)",
        frame_of_reference_uid=uid("frame"),
    )
    frame = {"frame_of_reference_uid": info.frame_of_reference_uid}
    image = make_volume(current.hu, affine, name="CT", attrs=frame)
    masks = {name: make_volume(current.masks[name], affine, name=name, attrs=frame) for name in ROI_NAMES}

    dose_result = None
    if with_dose:
        dose_result = make_dose(
            gtv=current.masks["GTV"],
            body=current.masks["BODY"],
            ct_affine=affine,
            anatomy=anatomy,
            anatomy_origin=origin,
            site=tumour.site,
            rng=_rng(seed, "dose"),
        )
        ptv = dose_result.ptv
    else:
        box, dist = ptv_distance(current.masks["GTV"], affine, reach_mm=PTV_MARGIN_MM)
        ptv = np.zeros(shape, dtype=bool)
        ptv[box] = dist <= PTV_MARGIN_MM
        ptv &= current.masks["BODY"]
    masks["PTV"] = make_volume(ptv, affine, name="PTV", attrs=frame)
    masks["Vertebrae"] = make_volume(current.masks["Vertebrae"], affine, name="Vertebrae", attrs=frame)

    ct = ct_series(
        current.hu,
        affine,
        info,
        series_uid=uid("ct-series"),
        instance_uids=[uid("ct-instance", k) for k in range(shape[0])],
    )
    rtstruct = _structure_set(masks, ct, seed=seed, variant=variant, label="SYN PLANNING")

    rtplan = rtdose = dose = None
    if dose_result is not None:
        rtplan = rt_plan(
            info,
            series_uid=uid("plan-series"),
            instance_uid=uid("plan-instance"),
            dose_reference_uid=uid("dose-reference"),
            rtstruct=rtstruct,
            beams=dose_result.beams,
            prescription_gy=PRESCRIPTION_GY,
            fractions=FRACTIONS,
        )
        rtdose = rt_dose(
            dose_result.dose,
            dose_result.affine,
            info,
            series_uid=uid("dose-series"),
            instance_uid=uid("dose-instance"),
            plan=rtplan,
        )
        # the array users get is what the RTDOSE holds (quantised to DoseGridScaling)
        scaling = dose_grid_scaling(float(dose_result.dose.max()))
        stored = quantise_dose(dose_result.dose, scaling).astype(np.float32) * np.float32(scaling)
        dose = make_volume(stored, dose_result.affine, name="dose", attrs={**frame, "units": "Gy"})

    truth: dict[str, Any] = {
        "site": tumour.site,
        "tumour_centre_lps": tuple(float(v) for v in np.asarray(tumour.centre) + origin),
        "tumour_radius_mm": tumour.radius,
        "study_date": info.study_date,
        "beam_angles": tuple(b.gantry_angle for b in dose_result.beams) if dose_result else (),
        "prescription_gy": PRESCRIPTION_GY if with_dose else None,
        "fractions": FRACTIONS if with_dose else None,
    }

    prior_ct = prior_rtstruct = prior_image = prior_masks = registration = None
    if with_prior:
        prng = _rng(seed, "prior")
        scale, category = _prior_scale(tumour.radius, prng)
        prior_z = z_centre + round(float(prng.uniform(-30.0, 30.0)) * 2.0) / 2.0  # another table position
        prior_affine = _grid_affine(shape, spacing, prior_z)
        shift = np.array([prng.uniform(-4.0, 4.0), prng.uniform(-4.0, 4.0), prng.uniform(-5.0, 5.0)])
        prior_origin = origin + shift + np.array([0.0, 0.0, prior_z - z_centre])
        pscene = phantom.render_anatomy(
            shape,
            prior_affine,
            anatomy,
            textures,
            anatomy_origin=prior_origin,
            inspiration=float(prng.uniform(0.97, 1.03)),
        )
        phantom.paint_tumour(pscene, tumour, scale=scale)
        prior = phantom.finish(pscene, _rng(seed, "prior_noise"))
        pinfo = StudyInfo(
            **common,
            study_uid=uid("prior-study"),
            study_date=prior_day.strftime("%Y%m%d"),
            study_time=prior_time,
            study_id="0",
            accession=f"SYN{seed:07d}A"[:16],
            description="Thorax CT (synthetic, prior)",
            frame_of_reference_uid=uid("prior-frame"),
        )
        pframe = {"frame_of_reference_uid": pinfo.frame_of_reference_uid}
        prior_image = make_volume(prior.hu, prior_affine, name="CT", attrs=pframe)
        prior_masks = {
            name: make_volume(prior.masks[name], prior_affine, name=name, attrs=pframe)
            for name in (*ROI_NAMES, "Vertebrae")
        }
        prior_ct = ct_series(
            prior.hu,
            prior_affine,
            pinfo,
            series_uid=uid("prior-ct-series"),
            instance_uids=[uid("prior-ct-instance", k) for k in range(shape[0])],
            description="Thorax CT (synthetic)",
        )
        prior_rtstruct = _structure_set(prior_masks, prior_ct, seed=seed, variant=variant, label="SYN PRIOR")
        # The anatomy sits at `origin` in the planning frame and at `prior_origin` in the prior's: a rigid
        # translation maps one onto the other (up to the prior's breathing scale), as a TPS fusion would record.
        prior_to_current = np.eye(4)
        prior_to_current[:3, 3] = origin - prior_origin
        if with_registration:
            registration = spatial_registration(
                prior_to_current,
                info,
                current_ct=ct,
                prior_ct=prior_ct,
                series_uid=uid("registration-series"),
                instance_uid=uid("registration-instance"),
            )
        truth.update(prior_date=pinfo.study_date, prior_tumour_scale=scale, expected_response=category,
                     prior_to_current=prior_to_current.tolist())

    return SyntheticPatient(
        seed=seed,
        patient_id=pid,
        ct=ct,
        rtstruct=rtstruct,
        rtplan=rtplan,
        rtdose=rtdose,
        prior_ct=prior_ct,
        prior_rtstruct=prior_rtstruct,
        registration=registration,
        image=image,
        prior_image=prior_image,
        masks=masks,
        prior_masks=prior_masks,
        dose=dose,
        truth=truth,
    )


def _prior_scale(radius: float, rng: np.random.Generator) -> tuple[float, str]:
    """How much larger the prior tumour was, chosen so that response categories vary (RECIST 1.1-style).

    Returns the prior/current size ratio and the category the change was drawn for (PR: diameter −30 % or
    more; PD: +20 % or more and ≥ 5 mm; SD otherwise). The prior tumour is capped at 30 mm radius.
    """
    category = str(rng.choice(["PR", "SD", "PD"]))
    if category == "PR":
        growth = float(rng.uniform(0.45, 0.62))  # current / prior diameter
    elif category == "PD":
        growth = float(rng.uniform(1.3, 1.6))
        diameter = 2.0 * radius
        if diameter * (1.0 - 1.0 / growth) < 6.0:  # PD needs ≥ 5 mm absolute growth too
            growth = diameter / (diameter - 6.0)
    else:
        growth = float(rng.uniform(0.92, 1.08))
    scale = min(1.0 / growth, 30.0 / radius)
    growth = 1.0 / scale
    if growth <= 0.7:
        category = "PR"
    elif growth >= 1.2 and 2.0 * radius * (1.0 - scale) >= 5.0:
        category = "PD"
    else:
        category = "SD"
    return scale, category


def _structure_set(
    masks: Mapping[str, xr.DataArray], ct: list[Dataset], *, seed: int, variant: str, label: str
) -> Dataset:
    from pacsai.imaging.rtstruct import write_rtstruct

    return write_rtstruct(
        masks,
        source=ct,
        label=label,
        series_description="Ground-truth structures (synthetic)",
        roi_colors={k: v for k, v in _ROI_COLORS.items() if k in masks},
        roi_types={k: v for k, v in _ROI_TYPES.items() if k in masks},
        algorithm_name="pacsai.synthetic",
        series_number=2,
        uid_parts=("synthetic", variant, seed),
    )


def write_patient(patient: SyntheticPatient, folder: str | Path) -> list[Path]:
    """Write every object of ``patient`` as Part-10 files under ``folder/PATIENT_ID/``.

    Layout: ``planning/CT_0001.dcm …, planning/RTSTRUCT.dcm, planning/RTPLAN.dcm, planning/RTDOSE.dcm`` and
    ``prior/CT_0001.dcm …, prior/RTSTRUCT.dcm``.

    Parameters
    ----------
    patient
        From :func:`make_patient`.
    folder
        Created if missing; existing files of the same names are overwritten (same seed → same bytes).

    Returns
    -------
    list of Path
        The files written, in :meth:`SyntheticPatient.datasets` order.
    """
    from pacsai.imaging.dicomwrite import save

    root = Path(folder) / patient.patient_id
    plan: list[tuple[Path, Dataset]] = []
    for study, ct, extras in (
        (
            "planning",
            patient.ct,
            (("RTSTRUCT", patient.rtstruct), ("RTPLAN", patient.rtplan), ("RTDOSE", patient.rtdose)),
        ),
        ("prior", patient.prior_ct, (("RTSTRUCT", patient.prior_rtstruct),)),
    ):
        if ct is None:
            continue
        (root / study).mkdir(parents=True, exist_ok=True)
        plan.extend((root / study / f"CT_{k + 1:04d}.dcm", ds) for k, ds in enumerate(ct))
        plan.extend((root / study / f"{name}.dcm", ds) for name, ds in extras if ds is not None)
    return [save(ds, path) for path, ds in plan]


@dataclass(frozen=True)
class SeedResult:
    """What :func:`seed_pacs` did for one patient."""

    seed: int
    patient_id: str
    objects: int
    summary: StoreSummary


def seed_pacs(
    pacs: Pacs,
    *,
    patients: int,
    seed: int = 0,
    with_prior: bool = True,
    progress: bool = True,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    spacing: tuple[float, float, float] = DEFAULT_SPACING,
) -> list[SeedResult]:
    """Store ``patients`` synthetic patients (seeds ``seed`` … ``seed + patients − 1``) in a PACS.

    Idempotent: the same seeds give the same SOP instances, which a PACS keeps once.

    Parameters
    ----------
    pacs
        From :func:`pacsai.pacs.connect` (a DICOMweb server or the embedded store).
    patients
        How many patients (≥ 1).
    seed
        Seed of the first patient; patient ``k`` uses ``seed + k``.
    with_prior
        Include each patient's prior study.
    progress
        Show a progress bar over patients.
    shape, spacing
        The CT grid (see :func:`make_patient`).

    Returns
    -------
    list of SeedResult
        One per patient, with the store summary (stored / already present / failed).
    """
    if patients < 1:
        raise ValueError(f"patients must be at least 1, not {patients}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, not {seed}")
    from tqdm.auto import tqdm

    results = []
    for k in tqdm(range(patients), desc="synthetic patients", unit="patient", disable=not progress):
        patient = make_patient(seed + k, shape=shape, spacing=spacing, with_prior=with_prior)
        objects = list(patient.datasets())
        summary = pacs.store(objects, progress=False)
        logger.info("%s: %d objects sent", patient.patient_id, len(objects))
        results.append(
            SeedResult(seed=seed + k, patient_id=patient.patient_id, objects=len(objects), summary=summary)
        )
    return results
