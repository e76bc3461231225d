"""A plan-like dose for a synthetic patient: conformal to the PTV, with beam entrance/exit dose, on its own grid.

Not a dose calculation: a smooth model with the features that make DVHs meaningful. The dose is
``prescription × [C · H + (1 − C) · B]`` where

* ``C`` is the conformal part, an error-function shoulder of the signed distance to the PTV surface (50 % at
  :data:`EDGE_50_MM` outside the PTV, σ = :data:`PENUMBRA_SIGMA_MM`, so the 80 → 20 % fall-off is ≈ 7 mm);
* ``H`` adds a smooth hot spot near the isocentre (plans are never perfectly flat);
* ``B`` is the low-dose bath of 3–5 coplanar fields: each field's aperture (the PTV's beam's-eye-view extent
  plus a margin, with penumbra) times a 6 MV-like depth dose from the body surface (build-up, then ≈ 0.5 %/mm
  attenuation), normalised so that the fields add up to 1 at the isocentre, and capped at 97 % where they
  overlap next to the target (as a planner's weights and wedges would).

The result is scaled so that PTV D95 is :data:`D95_FRACTION` of the prescription (on the dose grid).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.special import erf, erfc

from pacsai.synthetic.phantom import Anatomy, body_half_axes

logger = logging.getLogger(__name__)

PRESCRIPTION_GY = 60.0
FRACTIONS = 30
PTV_MARGIN_MM = 10.0
DOSE_SPACING_MM = 3.0
EDGE_50_MM = 6.5
PENUMBRA_SIGMA_MM = 4.2
APERTURE_MARGIN_MM = 6.0
APERTURE_SIGMA_MM = 3.5
D95_FRACTION = 0.98
MU_PER_MM = 0.0048  # effective attenuation of a 6 MV beam beyond the build-up


@dataclass(frozen=True)
class Beam:
    """One coplanar field: IEC gantry angle, isocentre (LPS mm) and jaw positions (mm at the isocentre)."""

    gantry_angle: float
    isocentre: tuple[float, float, float]
    x_jaws: tuple[float, float]  # across the beam in the axial plane
    y_jaws: tuple[float, float]  # along z (cranio-caudal)
    weight: float


@dataclass(frozen=True)
class DoseResult:
    """The dose grid (Gy, ``(z, y, x)``) with its affine, the PTV on the CT grid, and the fields."""

    dose: np.ndarray
    affine: np.ndarray
    ptv: np.ndarray
    beams: tuple[Beam, ...]


def ptv_distance(
    gtv: np.ndarray, ct_affine: np.ndarray, *, reach_mm: float
) -> tuple[tuple[slice, ...], np.ndarray]:
    """Distance (mm) from the GTV, by an exact Euclidean distance transform, in a box around it.

    Returns
    -------
    (box, distance)
        ``box`` indexes the CT grid ``(z, y, x)``; ``distance`` is 0 inside the GTV.
    """
    spacing = (abs(ct_affine[2, 2]), abs(ct_affine[1, 1]), abs(ct_affine[0, 0]))  # z, y, x
    idx = np.nonzero(gtv)
    pads = [math.ceil(reach_mm / s) + 1 for s in spacing]
    box = tuple(
        slice(max(int(v.min()) - pad, 0), min(int(v.max()) + pad + 1, n))
        for v, pad, n in zip(idx, pads, gtv.shape, strict=True)
    )
    distance = ndimage.distance_transform_edt(~gtv[box], sampling=spacing)
    return box, distance.astype(np.float32)


def choose_beams(site: str, rng: np.random.Generator) -> list[float]:
    """3–5 coplanar gantry angles (IEC, degrees) that avoid crossing the contralateral lung where they can."""
    n = int(rng.integers(3, 6))
    if site == "lung_right":  # the patient's right is at gantry 270 (HFS)
        pool = [0.0, 180.0, 210.0, 240.0, 300.0, 330.0]
    elif site == "lung_left":
        pool = [0.0, 180.0, 30.0, 60.0, 120.0, 150.0]
    else:
        pool = [0.0, 180.0, 135.0, 225.0, 45.0, 315.0]
    angles = [pool[0], pool[1], *rng.choice(pool[2:], size=n - 2, replace=False).tolist()]
    jitter = rng.uniform(-8.0, 8.0, size=n)
    return sorted(float((a + j) % 360.0) for a, j in zip(angles, jitter, strict=True))


def make_dose(
    *,
    gtv: np.ndarray,
    body: np.ndarray,
    ct_affine: np.ndarray,
    anatomy: Anatomy,
    anatomy_origin: np.ndarray,
    site: str,
    rng: np.random.Generator,
    prescription_gy: float = PRESCRIPTION_GY,
) -> DoseResult:
    """The plan-like dose of one patient, on a 3 mm grid that covers the body and is offset from the CT grid.

    Parameters
    ----------
    gtv, body
        Ground-truth masks on the CT grid.
    ct_affine
        The CT grid (axis-aligned, HFS).
    anatomy, anatomy_origin
        The patient (for the body outline that sets beam entry depths).
    site
        Tumour site (chooses the beam arrangement).
    rng
        The patient's dose stream.
    prescription_gy
        Dose prescribed to the PTV (D95 is scaled to :data:`D95_FRACTION` of it).
    """
    ct_affine = np.asarray(ct_affine, dtype=float)
    reach = PTV_MARGIN_MM + 45.0
    box, dist = ptv_distance(gtv, ct_affine, reach_mm=reach)
    ptv = np.zeros(gtv.shape, dtype=bool)
    ptv[box] = (dist <= PTV_MARGIN_MM) & body[box]

    # --- the dose grid: body bounding box + 6 mm, 3 mm voxels, half a voxel off the CT lattice -----------
    ct_spacing = np.array([ct_affine[0, 0], ct_affine[1, 1], ct_affine[2, 2]])
    ct_origin = ct_affine[:3, 3]
    bidx = np.nonzero(body.any(axis=0))
    zidx = np.nonzero(body.any(axis=(1, 2)))[0]
    lo_idx = np.array([bidx[1].min(), bidx[0].min(), zidx.min()], dtype=float)
    hi_idx = np.array([bidx[1].max(), bidx[0].max(), zidx.max()], dtype=float)
    lo = ct_origin + lo_idx * ct_spacing - np.array([6.0, 6.0, 0.0])
    hi = ct_origin + hi_idx * ct_spacing + np.array([6.0, 6.0, 0.0])
    step = DOSE_SPACING_MM
    origin = ct_origin + np.ceil((lo - ct_origin) / step) * step + np.array([0.5, 0.5, 0.5]) * ct_spacing
    # Along z a TPS calculates over the whole CT: from the outer face of the first body slice to beyond the last
    # one, so every slice centre of every structure lies inside the grid (a DVH never meets uncovered volume).
    origin[2] = lo[2] - 0.5 * ct_spacing[2]
    shape_xyz = np.floor((hi - origin) / step).astype(int) + 1
    shape_xyz[2] = int(np.ceil((hi[2] + 0.5 * ct_spacing[2] - origin[2]) / step)) + 1
    nx, ny, nz = (int(v) for v in shape_xyz)
    affine = np.diag([step, step, step, 1.0])
    affine[:3, 3] = origin
    xs = origin[0] + np.arange(nx) * step
    ys = origin[1] + np.arange(ny) * step
    zs = origin[2] + np.arange(nz) * step

    # --- signed distance to the PTV surface at dose voxels (sampled from the CT-grid transform) ------------
    ct_i = (xs - ct_origin[0]) / ct_spacing[0]
    ct_j = (ys - ct_origin[1]) / ct_spacing[1]
    ct_k = (zs - ct_origin[2]) / ct_spacing[2]
    sd = np.full((nz, ny, nx), reach - PTV_MARGIN_MM, dtype=np.float32)
    inz = np.nonzero((ct_k >= box[0].start) & (ct_k <= box[0].stop - 1))[0]
    iny = np.nonzero((ct_j >= box[1].start) & (ct_j <= box[1].stop - 1))[0]
    inx = np.nonzero((ct_i >= box[2].start) & (ct_i <= box[2].stop - 1))[0]
    if inz.size and iny.size and inx.size:
        kk, jj, ii = np.meshgrid(
            ct_k[inz] - box[0].start, ct_j[iny] - box[1].start, ct_i[inx] - box[2].start, indexing="ij"
        )
        sampled = ndimage.map_coordinates(dist, np.stack([kk, jj, ii]), order=1, mode="nearest")
        sd[np.ix_(inz, iny, inx)] = sampled - PTV_MARGIN_MM

    # body on the dose grid (nearest CT voxel)
    body_d = body[
        np.ix_(_nearest(ct_k, body.shape[0]), _nearest(ct_j, body.shape[1]), _nearest(ct_i, body.shape[2]))
    ]

    # --- fields --------------------------------------------------------------------------------------------
    ptv_pts = np.argwhere(ptv)[:: max(int(ptv.sum()) // 4000, 1)]
    ptv_world = ct_origin + ptv_pts[:, ::-1] * ct_spacing  # (x, y, z)
    iso = ptv_world.mean(axis=0)
    X = (xs - iso[0]).astype(np.float32)[None, None, :]
    Y = (ys - iso[1]).astype(np.float32)[None, :, None]
    Z = (zs - iso[2]).astype(np.float32)[:, None, None]
    # body outline per slice (anatomical frame) for analytic entry depths
    anat = np.asarray(anatomy_origin, dtype=float)
    a_z, b_z = body_half_axes(anatomy, zs - anat[2])
    a_z = a_z.astype(np.float32)[:, None, None]
    b_z = b_z.astype(np.float32)[:, None, None]
    PX = X + np.float32(iso[0] - anat[0])
    PY = Y + np.float32(iso[1] - anat[1])
    z_lo, z_hi = float(ptv_world[:, 2].min() - iso[2]), float(ptv_world[:, 2].max() - iso[2])
    angles = choose_beams(site, rng)
    bath = np.zeros((nz, ny, nx), dtype=np.float32)
    beams = []
    iso_anat = iso - anat
    for angle in angles:
        t = math.radians(angle)
        dx, dy = -math.sin(t), math.cos(t)  # direction of travel (source at (sin t, -cos t) for HFS)
        nxv, nyv = math.cos(t), math.sin(t)  # across the field
        s_ptv = (ptv_world[:, 0] - iso[0]) * nxv + (ptv_world[:, 1] - iso[1]) * nyv
        s_lo, s_hi = float(s_ptv.min()), float(s_ptv.max())
        s = X * np.float32(nxv) + Y * np.float32(nyv)
        aperture = _window(s, s_lo - APERTURE_MARGIN_MM, s_hi + APERTURE_MARGIN_MM) * _window(
            Z, z_lo - APERTURE_MARGIN_MM, z_hi + APERTURE_MARGIN_MM
        )
        depth = _entry_depth(PX, PY, dx, dy, a_z, b_z)
        iso_depth = float(
            _entry_depth(
                np.float32(iso_anat[0]),
                np.float32(iso_anat[1]),
                dx,
                dy,
                np.float32(body_half_axes(anatomy, iso_anat[2])[0]),
                np.float32(body_half_axes(anatomy, iso_anat[2])[1]),
            )
        )
        bath += aperture * (_pdd(depth) / _pdd(np.float32(iso_depth)))
        beams.append(
            Beam(
                angle,
                (float(iso[0]), float(iso[1]), float(iso[2])),
                (s_lo - APERTURE_MARGIN_MM, s_hi + APERTURE_MARGIN_MM),
                (z_lo - APERTURE_MARGIN_MM, z_hi + APERTURE_MARGIN_MM),
                1.0 / len(angles),
            )
        )
    bath /= np.float32(len(angles))

    conformal = (0.5 * erfc((sd - EDGE_50_MM) / (PENUMBRA_SIGMA_MM * math.sqrt(2.0)))).astype(np.float32)
    ptv_radius = max(float(np.ptp(ptv_world, axis=0).max()) / 2.0, 10.0)
    hot_centre = iso + rng.uniform(-0.25, 0.25, size=3) * ptv_radius
    r2 = (
        ((xs - hot_centre[0]) ** 2)[None, None, :]
        + ((ys - hot_centre[1]) ** 2)[None, :, None]
        + ((zs - hot_centre[2]) ** 2)[:, None, None]
    )
    hot = 1.0 + float(rng.uniform(0.06, 0.075)) * np.exp(-r2 / (2.0 * (0.45 * ptv_radius) ** 2)).astype(
        np.float32
    )
    # where the fields overlap next to the target their sum can exceed 1 (entrance side of a deep target); a
    # real plan's weights and wedges keep that region below the prescription: cap it there
    rel = conformal * hot + (1.0 - conformal) * np.minimum(bath, np.float32(0.97))
    rel *= body_d

    in_ptv = sd <= 0.0
    d95 = float(np.percentile(rel[in_ptv], 5.0)) if in_ptv.any() else float(rel.max())
    dose = rel * np.float32(prescription_gy * D95_FRACTION / max(d95, 1e-6))
    logger.debug(
        "dose grid %s, %d fields at %s, max %.1f Gy", dose.shape, len(angles), angles, float(dose.max())
    )
    return DoseResult(dose=dose.astype(np.float32), affine=affine, ptv=ptv, beams=tuple(beams))


def _nearest(index: np.ndarray, n: int) -> np.ndarray:
    return np.clip(np.rint(index), 0, n - 1).astype(int)


def _window(s: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """1 inside [lo, hi], 0 outside, with Gaussian penumbra."""
    k = np.float32(1.0 / (APERTURE_SIGMA_MM * math.sqrt(2.0)))
    return (0.25 * (1.0 + erf((s - lo) * k)) * (1.0 + erf((hi - s) * k))).astype(np.float32)


def _entry_depth(
    px: np.ndarray, py: np.ndarray, dx: float, dy: float, a: np.ndarray, b: np.ndarray
) -> np.ndarray:
    """Distance from the body surface (an ellipse) to (px, py), back along the beam direction (dx, dy)."""
    ia2, ib2 = 1.0 / (a * a), 1.0 / (b * b)
    qa = dx * dx * ia2 + dy * dy * ib2
    qb = px * dx * ia2 + py * dy * ib2
    qc = px * px * ia2 + py * py * ib2 - 1.0
    disc = np.maximum(qb * qb - qa * qc, 0.0)
    return np.maximum((qb + np.sqrt(disc)) / qa, 0.0)


def _pdd(depth: np.ndarray) -> np.ndarray:
    """6 MV-like depth dose: build-up over ~15 mm, then exponential attenuation."""
    return (1.0 - 0.75 * np.exp(-depth / 5.0)) * np.exp(-MU_PER_MM * np.maximum(depth - 15.0, 0.0))
