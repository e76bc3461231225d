"""A thoracic CT phantom: anatomy drawn from a seed → HU volume and the ground-truth masks it was painted from.

Everything is defined in millimetres in an *anatomical* frame (origin on the body axis at about carina height,
axes along LPS), so the same patient can be rendered on any grid: the planning CT, the prior CT with another
table position and a slight set-up shift, or a coarse test grid. The HU of every voxel is painted from the masks,
so the masks are the ground truth of the image by construction. numpy/scipy only.

Conventions (docs/clinical_definitions.md, :mod:`pacsai.imaging.geometry`):
arrays are ``(z, y, x)``; +x is the patient's left,
+y posterior, +z superior (HFS, ImageOrientationPatient ``[1, 0, 0, 0, 1, 0]``).
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

logger = logging.getLogger(__name__)

#: The structures every synthetic patient carries, in RTSTRUCT order (extras follow).
ROI_NAMES = ("BODY", "GTV", "Lung_L", "Lung_R", "Heart", "SpinalCord", "Esophagus")
#: Optional extra structures written too.

# Tissue HU (non-contrast CT).
HU_AIR = -1000.0
HU_FAT = -95.0
HU_SKIN = 25.0
HU_MUSCLE = 50.0
HU_BLOOD = 42.0
HU_HEART = 40.0
HU_LIVER = 58.0
HU_SPLEEN = 48.0
HU_CSF = 8.0
HU_CORD = 35.0
HU_CANCELLOUS = 240.0
HU_CORTICAL = 750.0
HU_DISC = 85.0
HU_CARTILAGE = 120.0
HU_TUMOUR = 38.0

# Smallest field of view (mm) that holds the largest body this module draws plus the couch.
MIN_FOV_XY_MM = 380.0
MIN_FOV_Z_MM = 120.0


@dataclass(frozen=True)
class Anatomy:
    """The per-patient anatomy parameters (mm, anatomical frame). Drawn by :func:`draw_anatomy`."""

    body_a: float  # half-width (left-right) of the body at mid-thorax
    body_b: float  # half-depth (antero-posterior)
    fat: float  # subcutaneous fat thickness
    apex_z: float  # lung apex height
    dome_r_z: float  # top of the right hemidiaphragm (higher: the liver)
    dome_l_z: float
    heart_centre: tuple[float, float, float]  # x, gap behind the anterior chest wall, z
    heart_axes: tuple[float, float, float]
    heart_angle: float  # long axis rotation in the axial plane (rad)
    spine_y: float  # vertebral body centre (y) at z = 0
    vertebra_period: float  # vertebral height + disc
    vertebra_phase: float
    rib_phase: float
    rib_drop: float  # how far a rib descends from the spine to the front
    carina_z: float
    esophagus_air: float  # radius of an air lumen in the upper oesophagus (0: collapsed)
    mediastinum_half_width: float
    female: bool
    heart_lobes: tuple[float, float, float, float]  # (amplitude, phase) of 2- and 3-lobed outline terms


@dataclass(frozen=True)
class Tumour:
    """A GTV: an irregular blob (zonal spherical harmonics + spicules) in the anatomical frame."""

    site: str  # "lung_left", "lung_right" or "mediastinum"
    centre: tuple[float, float, float]
    radius: float  # mean radius (mm)
    axes: tuple[float, float, float]  # relative elongation per axis (x, y, z)
    harmonics: tuple[
        tuple[float, float, float, int, float, float], ...
    ]  # (vx, vy, vz, order, amplitude, phase)
    spicules: tuple[tuple[float, float, float, float], ...]  # (vx, vy, vz, length mm)
    texture_seed: int


@dataclass(frozen=True)
class Textures:
    """Smooth random fields (anatomical frame, coarse grid) shared by every rendering of one patient."""

    origin: np.ndarray  # (z, y, x) mm of coarse voxel 0
    step: float  # coarse spacing (mm)
    fields: np.ndarray = field(repr=False)  # (2, nz, ny, nx), unit variance


@dataclass(frozen=True)
class Phantom:
    """One rendering: HU (float32, ``(z, y, x)``) and boolean ground-truth masks on the same grid."""

    hu: np.ndarray = field(repr=False)
    masks: dict[str, np.ndarray] = field(repr=False)


def draw_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draw a plausible adult thorax.

    Parameters
    ----------
    rng
        The patient's anatomy stream.

    Returns
    -------
    Anatomy
    """
    u = rng.uniform
    body_a = u(138.0, 172.0)
    body_b = u(96.0, 118.0)
    spine_y = body_b * u(0.36, 0.42)
    return Anatomy(
        body_a=body_a,
        body_b=body_b,
        fat=u(7.0, 22.0),
        apex_z=u(82.0, 98.0),
        dome_r_z=u(-112.0, -95.0),
        dome_l_z=u(-128.0, -112.0),
        heart_centre=(u(18.0, 32.0), u(0.0, 8.0), u(-75.0, -60.0)),  # y: offset behind the sternum
        heart_axes=(u(52.0, 62.0), u(38.0, 45.0), u(44.0, 52.0)),
        heart_angle=math.radians(u(-38.0, -25.0)),
        spine_y=spine_y,
        vertebra_period=u(23.0, 27.0),
        vertebra_phase=u(0.0, 27.0),
        rib_phase=u(0.0, 26.0),
        rib_drop=u(105.0, 130.0),
        carina_z=u(-8.0, 8.0),
        esophagus_air=float(rng.choice([0.0, 0.0, 2.5, 3.5])),
        mediastinum_half_width=u(16.0, 24.0),
        female=bool(rng.random() < 0.5),
        heart_lobes=(u(0.04, 0.09), u(0.0, 2 * np.pi), u(0.02, 0.05), u(0.0, 2 * np.pi)),
    )


def make_textures(rng: np.random.Generator) -> Textures:
    """Two smooth unit-variance random fields on a 4 mm grid; their common near-zero set makes vessel-like tubes.

    The zero set of one smooth field is a surface; where two such surfaces meet is a curve. Thickening the curve
    (``|f1| < e and |f2| < e``) gives branching tubes that look like pulmonary vessels in every cut.
    """
    step = 4.0
    origin = np.array([-230.0, -170.0, -215.0])  # z, y, x
    shape = (112, 86, 108)
    fields = rng.standard_normal((2, *shape), dtype=np.float32)
    for n in range(2):
        fields[n] = ndimage.gaussian_filter(fields[n], sigma=1.7, mode="wrap")
        fields[n] /= fields[n].std()
    return Textures(origin=origin, step=step, fields=fields)


class _Coords:
    """Anatomical coordinates of a grid's voxels, as broadcastable float32 vectors (Z: (nz,1,1), ...)."""

    def __init__(
        self, x: np.ndarray, y: np.ndarray, z: np.ndarray, spacing: tuple[float, float, float]
    ) -> None:
        self.x, self.y, self.z = (np.asarray(v, dtype=np.float32) for v in (x, y, z))
        self.shape = (len(self.z), len(self.y), len(self.x))
        self.spacing = spacing
        self.X = self.x[None, None, :]
        self.Y = self.y[None, :, None]
        self.Z = self.z[:, None, None]

    @classmethod
    def of_grid(cls, shape: tuple[int, int, int], affine: np.ndarray, anatomy_origin: np.ndarray) -> _Coords:
        nz, ny, nx = shape
        origin = np.asarray(affine, dtype=float)[:3, 3] - anatomy_origin
        sx, sy, sz = float(affine[0, 0]), float(affine[1, 1]), float(affine[2, 2])
        return cls(
            origin[0] + np.arange(nx) * sx,
            origin[1] + np.arange(ny) * sy,
            origin[2] + np.arange(nz) * sz,
            (sx, sy, sz),
        )

    def crop(self, box: tuple[slice, slice, slice]) -> _Coords:
        return _Coords(self.x[box[2]], self.y[box[1]], self.z[box[0]], self.spacing)

    def box(self, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice]:
        """Index slices (z, y, x) of the voxels whose anatomical coordinates (x, y, z) lie in [lo, hi]."""
        out = []
        for vec, a, b in ((self.z, lo[2], hi[2]), (self.y, lo[1], hi[1]), (self.x, lo[0], hi[0])):
            idx = np.nonzero((vec >= a) & (vec <= b))[0]
            out.append(slice(int(idx[0]), int(idx[-1]) + 1) if idx.size else slice(0, 0))
        return out[0], out[1], out[2]

    def sub(self, box: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        zs, ys, xs = box
        return self.X[:, :, xs], self.Y[:, ys, :], self.Z[zs, :, :]


def check_grid(shape: tuple[int, ...], spacing: tuple[float, ...]) -> None:
    """Refuse grids too small for the anatomy (a cut-off body would be a silently wrong patient).

    Parameters
    ----------
    shape
        ``(z, y, x)`` voxels.
    spacing
        ``(x, y, z)`` mm.

    Raises
    ------
    ValueError
        Naming the field of view and the fix.
    """
    if len(shape) != 3 or len(spacing) != 3 or min(shape) < 8 or min(spacing) <= 0:
        raise ValueError(
            f"shape {shape} (z, y, x) / spacing {spacing} (x, y, z) mm: need 3 axes of at least 8 voxels and "
            "positive spacing"
        )
    nz, ny, nx = shape
    sx, sy, sz = spacing
    fov = (nx * sx, ny * sy, nz * sz)
    if fov[0] < MIN_FOV_XY_MM or fov[1] < MIN_FOV_XY_MM or fov[2] < MIN_FOV_Z_MM:
        raise ValueError(
            f"field of view {fov[0]:.0f}×{fov[1]:.0f}×{fov[2]:.0f} mm (shape {shape}, spacing {spacing} mm) is too "
            f"small for a thorax: need ≥ {MIN_FOV_XY_MM:.0f} mm in-plane and ≥ {MIN_FOV_Z_MM:.0f} mm along z; "
            "increase the shape or the spacing"
        )


def _ellipse_q(
    c: _Coords, a: np.ndarray, b: np.ndarray, yc: np.ndarray | float, p_back: float, xc: float = 0.0
) -> np.ndarray:
    """``((x-xc)/a)² + |(y-yc)/b|^p`` (p = 2 in front, ``p_back`` behind: a flattened back), separably.

    ``a``, ``b`` and ``yc`` vary per slice (shape ``(nz, 1, 1)``); the sum is the only full-size operation.
    """
    xt = ((c.X - xc) ** 2) / (a * a)  # (nz, 1, nx)
    dy = c.Y - yc  # (nz, ny, 1)
    p = np.where(dy > 0, np.float32(p_back), np.float32(2.0))
    yt = np.abs(dy / b) ** p
    return xt + yt


def _tube(
    c: _Coords, p0: tuple[float, float, float], p1: tuple[float, float, float], radius: float
) -> tuple[tuple[slice, slice, slice], np.ndarray]:
    """A capsule (segment p0–p1, given radius) rasterised in its bounding box: (box, bool array)."""
    a, b = np.asarray(p0, dtype=np.float32), np.asarray(p1, dtype=np.float32)
    lo, hi = np.minimum(a, b) - radius, np.maximum(a, b) + radius
    box = c.box(lo, hi)
    X, Y, Z = c.sub(box)
    d = b - a
    length2 = float(d @ d) or 1.0
    t = ((X - a[0]) * d[0] + (Y - a[1]) * d[1] + (Z - a[2]) * d[2]) / length2
    t = np.clip(t, 0.0, 1.0)
    dist2 = (X - a[0] - t * d[0]) ** 2 + (Y - a[1] - t * d[1]) ** 2 + (Z - a[2] - t * d[2]) ** 2
    return box, dist2 <= radius**2


def _paint_tube(
    c: _Coords,
    hu: np.ndarray,
    p0: tuple[float, float, float],
    p1: tuple[float, float, float],
    radius: float,
    value: float,
    *,
    mask: np.ndarray | None = None,
) -> None:
    box, inside = _tube(c, p0, p1, radius)
    hu[box][inside] = value
    if mask is not None:
        mask[box] |= inside


@dataclass
class _Scene:
    """The anatomy rendered on one grid (cropped to the body), before the tumour and the noise."""

    full: _Coords  # the whole grid
    crop: tuple[slice, slice, slice]  # where the body lies in it
    c: _Coords  # the crop
    hu: np.ndarray
    masks: dict[str, np.ndarray]
    free: np.ndarray  # where a tumour may grow: lung parenchyma and mediastinal fat
    couch_y: float  # top of the couch (anatomical y)
    trachea_y: float  # landmark for mediastinal tumour sites


def render_anatomy(
    shape: tuple[int, int, int],
    affine: np.ndarray,
    anatomy: Anatomy,
    textures: Textures,
    *,
    anatomy_origin: np.ndarray,
    inspiration: float = 1.0,
) -> _Scene:
    """Paint the anatomy (no tumour, no noise) on the grid ``(shape, affine)``.

    Parameters
    ----------
    shape, affine
        The grid (axis-aligned, HFS).
    anatomy, textures
        The patient.
    anatomy_origin
        World (LPS mm) position of the anatomical origin: moving it moves the patient on the table.
    inspiration
        Scales the lungs slightly (breath-hold differences between studies).
    """
    A = anatomy
    full = _Coords.of_grid(shape, affine, np.asarray(anatomy_origin, dtype=float))
    reach_x = A.body_a * 1.07 + 8.0
    crop = full.box(
        np.array([-reach_x, -A.body_b * 1.04 - 48.0, -1e5]), np.array([reach_x, A.body_b + 6.0, 1e5])
    )
    c = full.crop(crop)
    X, Y, Z = c.X, c.Y, c.Z
    cshape = c.shape
    f32 = np.float32

    # --- body outline, skin, subcutaneous fat, muscle -----------------------------------------------------
    a, b = (v.astype(f32) for v in body_half_axes(A, Z))
    q_body = _ellipse_q(c, a, b, 0.0, 2.8)
    body = q_body <= 1.0
    if A.female:  # breasts on the anterior chest wall, blended in (a smooth union: no notch where they meet)
        bbox = c.box(
            np.array([-A.body_a * 1.1, -A.body_b - 45.0, -150.0]), np.array([A.body_a * 1.1, 0.0, 40.0])
        )
        bX, bY, bZ = c.sub(bbox)
        sharpness = 5.0
        blend = np.exp(-sharpness * q_body[bbox])
        for side in (-1.0, 1.0):
            q_breast = (
                ((bX - side * A.body_a * 0.42) / 70.0) ** 2
                + ((bY + A.body_b * 0.78) / 34.0) ** 2
                + ((bZ + 60.0) / 62.0) ** 2
            )
            blend = blend + np.exp(-sharpness * q_breast)
        body[bbox] |= (-np.log(blend) / sharpness <= 1.0) & (bY < 0)
    hu = np.full(cshape, HU_AIR, dtype=f32)
    hu[body] = HU_FAT
    skin = 2.0
    hu[(q_body <= 1.0) & (_ellipse_q(c, a - skin, b - skin, 0.0, 2.8) > 1.0)] = HU_SKIN
    muscle_a, muscle_b = a - A.fat * 1.3, b - A.fat
    hu[_ellipse_q(c, muscle_a, muscle_b, 0.0, 2.6) <= 1.0] = HU_MUSCLE

    # --- thoracic cavity (inside ribs and muscle; paraspinal muscles behind) --------------------------------
    y_front = -b + A.fat + 14.0
    y_back = b - A.fat - 24.0
    yc = (y_front + y_back) / 2.0
    bc = (y_back - y_front) / 2.0
    # the rib cage widens from the apex to the bases (the shoulder girdle fills the upper chest wall)
    taper = (0.80 + 0.20 * np.clip((A.apex_z - Z) / 150.0, 0.0, 1.0)).astype(f32)
    ac = (a - A.fat * 1.3 - 14.0) * taper
    q_cav = _ellipse_q(c, ac, bc, yc, 3.2)
    cavity = q_cav <= 1.0

    # spine (thoracic kyphosis: a little more posterior at mid-thorax)
    ys = (y_back - 24.0 + 6.0 * (1.0 - np.clip(Z / 160.0, -1, 1) ** 2)).astype(f32)
    vb_rx, vb_ry = 17.0, 14.5
    canal_y = ys + vb_ry + 7.5
    # the vertebral body and the rib heads bulge into the cavity; the lungs wrap around them
    sbox = c.box(np.array([-40.0, float(ys.min()) - 30.0, -1e5]), np.array([40.0, 1e5, 1e5]))
    sX, sY, _ = c.sub(sbox)
    spine_bulge = np.zeros(cshape, dtype=bool)
    spine_bulge[sbox] = ((sX / 23.0) ** 2 + ((sY - ys[sbox[0]] - 4.0) / 20.0) ** 2 <= 1.0) | (
        (np.abs(sX) < 21.0) & (sY > ys[sbox[0]])
    )
    cavity &= ~spine_bulge

    # diaphragm domes: lungs above, abdomen below (right higher, over the liver; recesses lower at the rim)
    above = np.ones(cshape, dtype=bool)
    low = np.nonzero(c.z < max(A.dome_r_z, A.dome_l_z) + 1.0)[0]
    if low.size:
        lo_sl = slice(int(low[0]), int(low[-1]) + 1)
        zl, acl, bcl, ycl = Z[lo_sl], ac[lo_sl], bc[lo_sl], yc[lo_sl]
        ry = ((Y - ycl + 10.0) / (bcl * 0.9)) ** 2
        for side, top, xsel in ((-1.0, A.dome_r_z, c.x <= 0), (1.0, A.dome_l_z, c.x > 0)):
            xs_idx = np.nonzero(xsel)[0]
            if not xs_idx.size:
                continue
            xsl = slice(int(xs_idx[0]), int(xs_idx[-1]) + 1)
            rx = ((X[:, :, xsl] - side * acl * 0.45) / (acl * 0.65)) ** 2
            above[lo_sl, :, xsl] = zl > top - 55.0 * np.minimum(rx + ry, 1.3)
    abdomen = cavity & ~above

    hu[cavity] = HU_FAT  # mediastinal fat, replaced below by lungs and organs
    masks: dict[str, np.ndarray] = {}

    # --- mediastinum -----------------------------------------------------------------------------------
    tr_y = float(np.median(ys)) - vb_ry - 22.0  # trachea centre (in front of the oesophagus)
    depth = np.clip((Y - y_front) / np.maximum(ys - y_front, 1.0), 0.0, 1.0)
    upper = np.clip((Z - A.carina_z - 30.0) / 60.0, 0.0, 1.0)  # narrower above the aortic arch
    med_hw = A.mediastinum_half_width * (0.5 + 0.6 * np.sin(np.pi * depth)) * (1.0 - 0.3 * upper)
    mediastinum = (np.abs(X - 5.0) <= med_hw) & cavity

    # heart (ellipsoid; long axis pointing anterior-left-inferior) in pericardial fat
    ha, hb, hc = A.heart_axes
    hx, hz = A.heart_centre[0], A.heart_centre[2]
    hy = float(-A.body_b + A.fat + 14.0) + hb * 0.9 + A.heart_centre[1]  # just behind the sternum
    reach = max(ha, hb, hc) * 1.2 + 6.0
    hbox = c.box(
        np.array([hx - reach, hy - reach, hz - reach]), np.array([hx + reach, hy + reach, hz + reach])
    )
    hX, hY, hZ = c.sub(hbox)
    cos_t, sin_t = math.cos(A.heart_angle), math.sin(A.heart_angle)
    u_ = (hX - hx) * cos_t - (hY - hy) * sin_t
    v_ = (hX - hx) * sin_t + (hY - hy) * cos_t
    w_ = (hZ - hz) + 0.35 * u_  # tilt: the apex points down as well
    # not an ellipsoid: a lobed outline (ventricles, atria) from two low-order angular terms
    angle = np.arctan2(v_ / hb, u_ / ha)
    a2, p2, a3, p3 = A.heart_lobes
    lobes = 1.0 + a2 * np.cos(2.0 * angle + p2) + a3 * np.cos(3.0 * angle + p3)
    q_heart = ((u_ / ha) ** 2 + (v_ / hb) ** 2) / lobes**2 + (w_ / hc) ** 2
    heart = np.zeros(cshape, dtype=bool)
    heart[hbox] = q_heart <= 1.0
    peri = np.zeros(cshape, dtype=bool)
    peri[hbox] = q_heart <= 1.25
    heart &= cavity & above
    peri &= cavity & ~heart
    mediastinum |= heart | peri

    # lungs = rest of the cavity above the diaphragm, narrowing to cones at the apices
    apex = A.apex_z * inspiration
    lungs = cavity & above & ~mediastinum
    apex_rows = np.nonzero(c.z > apex - 75.0)[0]
    if apex_rows.size:
        tsl = slice(int(apex_rows[0]), int(apex_rows[-1]) + 1)
        cone = np.clip((apex - Z[tsl]) / 75.0, 0.0, 1.0) ** 0.55
        # at the start of the cone the ellipse covers the whole half-cavity, so the lung narrows smoothly
        q_apex = ((np.abs(X) - ac[tsl] * 0.5) / (ac[tsl] * 0.8 * cone + 1e-3)) ** 2 + (
            (Y - yc[tsl] - 10.0) / (bc[tsl] * 1.3 * cone + 1e-3)
        ) ** 2
        lungs[tsl] &= q_apex <= 1.0
    if inspiration != 1.0:
        lungs &= q_cav <= inspiration**2
    lungs &= ~((np.abs(X - 3.0) < 2.5) & (Y < yc))  # anterior junction line

    # lung parenchyma with a gravity gradient (posterior lung is denser) and vessel-like texture
    lung_hu = (-880.0 + 110.0 * np.clip((Y - y_front) / (y_back - y_front), 0.0, 1.0)).astype(f32)
    np.copyto(hu, np.broadcast_to(lung_hu, cshape), where=lungs)
    _paint_lung_texture(c, lungs, hu, textures, hilum_y=tr_y + 18.0, hilum_z=A.carina_z - 22.0)

    # diaphragm muscle, liver (right), stomach with an air-fluid level and spleen (left)
    if low.size:
        ab = abdomen[lo_sl]
        sub = hu[lo_sl]
        sub[ab] = HU_LIVER
        left_abd = ab & (X > 15.0 + 0.3 * (Y - ycl))
        sub[left_abd] = HU_MUSCLE - 12.0  # stomach wall and contents
        sub[left_abd & (zl > A.dome_l_z - 50.0) & (Y < ycl - 5.0) & (X < acl * 0.75)] = HU_AIR  # gastric air
        sub[left_abd & (Y > ycl + 12.0) & (X > acl * 0.4)] = HU_SPLEEN
        # the diaphragm: a 5 mm muscle sheet under the lungs
        diaphragm = ab & ~ndimage.binary_erosion(ab, structure=np.ones((3, 1, 1), dtype=bool), border_value=1)
        sub[diaphragm] = HU_MUSCLE
    hu[peri] = HU_FAT - 5.0
    hu[heart] = HU_HEART
    masks["Heart"] = heart

    # --- great vessels, airways, oesophagus ---------------------------------------------------------------
    organs = heart.copy()
    arch_z = A.carina_z + 28.0
    z_top = float(c.z[-1]) + 50.0
    z_bottom = float(c.z[0]) - 50.0
    desc = (23.0, float(np.median(ys)) - 8.0)
    asc = (-6.0, tr_y - 32.0)
    heart_top = hz + hc * 0.45
    blood = HU_BLOOD
    _paint_tube(c, hu, (desc[0], desc[1], z_bottom), (desc[0], desc[1], arch_z), 11.5, blood, mask=organs)
    _paint_tube(c, hu, (asc[0], asc[1], heart_top), (asc[0], asc[1], arch_z), 14.0, blood, mask=organs)
    _paint_tube(
        c, hu, (asc[0], asc[1], arch_z), (desc[0] - 3.0, desc[1], arch_z + 3.0), 12.0, blood, mask=organs
    )
    svc = (-28.0, tr_y - 18.0)
    _paint_tube(
        c, hu, (svc[0], svc[1], heart_top - 10.0), (svc[0], svc[1], arch_z + 45.0), 10.0, blood, mask=organs
    )
    hilum_z = A.carina_z - 16.0
    _paint_tube(
        c,
        hu,
        (12.0, tr_y - 36.0, heart_top - 8.0),
        (22.0, tr_y - 12.0, hilum_z + 4.0),
        13.0,
        blood,
        mask=organs,
    )  # pulmonary trunk
    _paint_tube(
        c, hu, (22.0, tr_y - 12.0, hilum_z + 4.0), (58.0, tr_y + 8.0, hilum_z - 8.0), 9.0, blood, mask=organs
    )  # left pulmonary artery
    _paint_tube(
        c,
        hu,
        (18.0, tr_y - 14.0, hilum_z + 2.0),
        (-58.0, tr_y + 6.0, hilum_z - 10.0),
        9.0,
        blood,
        mask=organs,
    )  # right pulmonary artery
    for x0 in (-12.0, 5.0, 17.0):  # brachiocephalic vessels above the arch
        _paint_tube(c, hu, (x0, tr_y - 14.0, arch_z), (x0 * 2.0, tr_y - 6.0, z_top), 5.5, blood, mask=organs)

    # trachea and main bronchi: soft-tissue wall, air lumen
    car = (-2.0, tr_y, A.carina_z)
    airway_paths = (
        ((-2.0, tr_y, z_top), car, 9.5),
        (car, (-44.0, tr_y + 12.0, A.carina_z - 26.0), 7.0),
        (car, (48.0, tr_y + 14.0, A.carina_z - 38.0), 6.5),
    )
    for p0, p1, r in airway_paths:
        _paint_tube(c, hu, p0, p1, r + 1.8, HU_MUSCLE - 10.0, mask=organs)
    for p0, p1, r in airway_paths:
        _paint_tube(c, hu, p0, p1, r, HU_AIR)

    # oesophagus: between trachea and spine, drifting left towards the hiatus
    eso = np.zeros(cshape, dtype=bool)
    eso_y = float(np.median(ys)) - vb_ry - 6.5
    eso_path = (
        (1.0, eso_y, z_top),
        (4.0, eso_y, A.carina_z - 20.0),
        (14.0, eso_y - 6.0, A.dome_l_z - 10.0),
        (32.0, eso_y - 22.0, A.dome_l_z - 45.0),
    )
    for p0, p1 in itertools.pairwise(eso_path):
        _paint_tube(c, hu, p0, p1, 7.5, HU_MUSCLE - 8.0, mask=eso)
    if A.esophagus_air > 0:  # some air in the upper oesophagus
        _paint_tube(
            c, hu, (1.0, eso_y, A.carina_z + 70.0), (2.0, eso_y, A.carina_z + 10.0), A.esophagus_air, HU_AIR
        )
    organs |= eso

    # --- sternum, ribs, scapulae, spine ------------------------------------------------------------------
    stbox = c.box(np.array([-20.0, -1e5, hz - hc]), np.array([20.0, 0.0, apex - 25.0]))
    stX, stY, _ = c.sub(stbox)
    yf = y_front[stbox[0]]
    st_q = (stX / 15.0) ** 2 + ((stY - yf + 7.0) / 6.5) ** 2
    sub = hu[stbox]
    sub[st_q <= 1.0] = HU_CORTICAL
    sub[st_q <= 0.45] = HU_CANCELLOUS
    _ribs(c, A, hu, ac, yc, bc, q_cav, apex)
    vert = _spine(c, A, ys, canal_y, vb_rx, vb_ry, hu)

    free = (lungs | ((hu == np.float32(HU_FAT)) & cavity & above)) & ~organs
    masks["Lung_L"] = lungs & (X > 0) & ~organs & ~vert["Vertebrae"]
    masks["Lung_R"] = lungs & (X <= 0) & ~organs & ~vert["Vertebrae"]
    masks["Esophagus"] = eso & body
    masks["BODY"] = body
    masks.update(vert)
    return _Scene(
        full=full, crop=crop, c=c, hu=hu, masks=masks, free=free, couch_y=float(b.max()) + 1.5, trachea_y=tr_y
    )


def _paint_lung_texture(
    c: _Coords, lungs: np.ndarray, hu: np.ndarray, tex: Textures, *, hilum_y: float, hilum_z: float
) -> None:
    """Vessel-like tubes inside the lungs (thicker and denser towards the hila) and a mottled parenchyma.

    Paints ``hu``; the vessels count as lung (lung contours include the intrapulmonary vessels).
    """
    idx = np.nonzero(lungs)
    zs, ys, xs = c.z[idx[0]], c.y[idx[1]], c.x[idx[2]]
    coords = np.stack(
        [(zs - tex.origin[0]) / tex.step, (ys - tex.origin[1]) / tex.step, (xs - tex.origin[2]) / tex.step]
    )
    f1 = ndimage.map_coordinates(tex.fields[0], coords, order=1, mode="nearest")
    hilar = np.exp(-(((np.abs(xs) - 45.0) ** 2 + (ys - hilum_y) ** 2 + (zs - hilum_z) ** 2) / (2 * 65.0**2)))
    eps = 0.11 + 0.26 * hilar
    near = np.nonzero(np.abs(f1) < eps)[0]  # the second field only matters where the first is near zero
    f2 = ndimage.map_coordinates(tex.fields[1], coords[:, near], order=1, mode="nearest")
    hit = near[np.abs(f2) < eps[near]]
    hu[idx] += 12.0 * f1  # mottled parenchyma
    hu[idx[0][hit], idx[1][hit], idx[2][hit]] = HU_BLOOD


def _ribs(
    c: _Coords,
    A: Anatomy,
    hu: np.ndarray,
    ac: np.ndarray,
    yc: np.ndarray,
    bc: np.ndarray,
    q_cav: np.ndarray,
    apex: float,
) -> None:
    """Ribs sloping down from the spine to the front (cut obliquely by each axial slice), costal cartilage and
    the scapulae behind them. Paints ``hu``; evaluated only in a band around the cavity wall."""
    mean_axis = np.sqrt(ac * bc)
    q_lo = (1.0 - 1.0 / mean_axis) ** 2
    q_hi = (1.0 + 26.0 / mean_axis) ** 2
    zok = (c.Z < apex + 8.0) & (c.Z > min(A.dome_l_z, A.dome_r_z) - 95.0)
    k, j, i = np.nonzero((q_cav > q_lo) & (q_cav < q_hi) & zok)
    x, y, z = c.x[i], c.y[j], c.z[k]
    ycv = yc.ravel()[k]
    radial = (np.sqrt(q_cav[k, j, i]) - 1.0) * mean_axis.ravel()[k]
    frac = np.abs(np.arctan2(x, y - ycv)) / np.pi  # 0 at the back, 1 at the front
    slope = (
        frac * frac * (3.0 - 2.0 * frac)
    )  # ribs run level near the spine and the sternum, steep at the side
    along = np.mod(z + A.rib_drop * slope - A.rib_phase, 26.0)
    q = ((along - 5.0) / 4.5) ** 2 + ((radial - 4.0) / 3.5) ** 2  # 9 mm high, 7 mm thick
    rib = (q <= 1.0) & (frac > 0.08)
    cartilage = rib & (frac > 0.80) & (frac < 0.93)
    bone = rib & (frac <= 0.80)
    cortex = bone & (q > 0.45)
    hu[k[cartilage], j[cartilage], i[cartilage]] = HU_CARTILAGE
    hu[k[bone], j[bone], i[bone]] = HU_CANCELLOUS + 60.0
    hu[k[cortex], j[cortex], i[cortex]] = HU_CORTICAL
    # scapulae: curved bony plates outside the posterior-lateral ribs, upper thorax only
    zs = (z > apex - 120.0) & (z < apex + 10.0)
    blade = zs & (frac > 0.13) & (frac < 0.33) & (radial > 15.0) & (radial < 19.0 + 6.0 * (frac < 0.17))
    hu[k[blade], j[blade], i[blade]] = HU_CORTICAL - 200.0


def _spine(
    c: _Coords, A: Anatomy, ys: np.ndarray, canal_y: np.ndarray, vb_rx: float, vb_ry: float, hu: np.ndarray
) -> dict[str, np.ndarray]:
    """Vertebral bodies (cortical shell, discs), posterior arches, canal with CSF and cord. Paints ``hu``."""
    box = c.box(
        np.array([-60.0, float(ys.min()) - vb_ry - 2.0, -1e5]),
        np.array([60.0, float(canal_y.max()) + 55.0, 1e5]),
    )
    X, Y, Z = c.sub(box)
    ys_b, canal_b = ys[box[0]], canal_y[box[0]]
    level = np.mod(Z - A.vertebra_phase, A.vertebra_period)
    disc = level > A.vertebra_period - 5.0
    vb = (X / vb_rx) ** 2 + ((Y - ys_b) / vb_ry) ** 2 <= 1.0
    vb_core = (X / (vb_rx - 2.2)) ** 2 + ((Y - ys_b) / (vb_ry - 2.2)) ** 2 <= 1.0
    r_canal = np.sqrt((X / 9.0) ** 2 + ((Y - canal_b) / 7.5) ** 2)
    canal = r_canal <= 1.0
    cord = (X / 5.0) ** 2 + ((Y - canal_b) / 4.0) ** 2 <= 1.0
    arch = (r_canal > 1.0) & (r_canal <= 1.7) & (Y > canal_b - 5.0)
    # spinous process points back (and down: shorter towards the next disc); transverse processes sideways
    spinous = (np.abs(X) < 3.5) & (Y > canal_b + 8.0) & (Y < canal_b + 34.0 - 0.5 * level)
    # transverse processes point back and out (about 35° from the coronal plane)
    transverse = (
        (np.abs(Y - canal_b + 1.0 - 0.7 * (np.abs(X) - 8.0)) < 4.0) & (np.abs(X) > 8.0) & (np.abs(X) < 28.0)
    )
    posterior = arch | spinous | (transverse & ~disc)  # laminae and facets show at disc levels too
    bone = (vb & ~disc) | posterior

    sub = hu[box]
    sub[vb & disc] = HU_DISC
    sub[vb & ~disc] = HU_CORTICAL
    sub[vb_core & ~disc] = HU_CANCELLOUS + 60.0
    sub[posterior] = HU_CORTICAL - 150.0
    sub[canal] = HU_CSF
    sub[cord] = HU_CORD
    out = {"SpinalCord": np.zeros(hu.shape, dtype=bool), "Vertebrae": np.zeros(hu.shape, dtype=bool)}
    out["SpinalCord"][box] = cord
    out["Vertebrae"][box] = bone
    return out


def body_half_axes(anatomy: Anatomy, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Half axes (a: left-right, b: antero-posterior; mm) of the body outline at anatomical heights ``z``.

    The dose model uses them for analytic beam entry depths; :func:`render_anatomy` paints the same outline.
    """
    shoulder = np.tanh((np.asarray(z, dtype=np.float32) - 40.0) / 60.0)
    return anatomy.body_a * (1.0 + 0.06 * shoulder), anatomy.body_b * (1.0 - 0.02 * shoulder)


def choose_tumour(scene: _Scene, rng: np.random.Generator) -> Tumour:
    """Draw a GTV at an anatomically plausible place of this anatomy (lung or mediastinum).

    Parameters
    ----------
    scene
        The rendered anatomy (planning CT grid).
    rng
        The patient's tumour stream.
    """
    c = scene.c
    radius = float(rng.uniform(7.5, 25.0))  # 1.5–5 cm diameter
    ax, ay, az = (float(v) for v in rng.uniform(0.85, 1.18, size=3))
    axes = (ax, ay, az)
    harmonics = []
    for order, amp in ((2, 0.10), (3, 0.07), (3, 0.06), (4, 0.05), (5, 0.035), (6, 0.03), (7, 0.02)):
        v = rng.standard_normal(3)
        v /= np.linalg.norm(v)
        harmonics.append(
            (
                float(v[0]),
                float(v[1]),
                float(v[2]),
                order,
                float(rng.normal(0, amp)),
                float(rng.uniform(0, 2 * np.pi)),
            )
        )
    n_spic = int(rng.integers(0, 5))
    spicules = []
    for _ in range(n_spic):
        v = rng.standard_normal(3)
        v /= np.linalg.norm(v)
        spicules.append((float(v[0]), float(v[1]), float(v[2]), float(rng.uniform(6.0, 14.0))))
    texture_seed = int(rng.integers(0, 2**31))
    site = str(rng.choice(["lung_right", "lung_left", "lung_right", "lung_left", "mediastinum"]))
    margin = radius + 25.0  # room for the PTV and the dose fall-off inside the field of view
    zmin, zmax = float(c.z[0]) + margin, float(c.z[-1]) - margin

    def fraction_free(centre: np.ndarray, r: float) -> float:
        box = c.box(centre - r, centre + r)
        X, Y, Z = c.sub(box)
        ball = (X - centre[0]) ** 2 + (Y - centre[1]) ** 2 + (Z - centre[2]) ** 2 <= r * r
        n = int(ball.sum())
        return float((ball & scene.free[box]).sum()) / n if n else 0.0

    if site.startswith("lung"):
        lung = scene.masks["Lung_L" if site == "lung_left" else "Lung_R"]
        zs = np.nonzero((c.z >= zmin) & (c.z <= zmax))[0]
        candidates = np.argwhere(lung[zs[0] : zs[-1] + 1]) if zs.size else np.empty((0, 3), dtype=int)
        if len(candidates):
            candidates[:, 0] += zs[0]
            picks = rng.permutation(len(candidates))[:400]
            for n in picks:
                k, j, i = candidates[n]
                centre = np.array([c.x[i], c.y[j], c.z[k]], dtype=float)
                if fraction_free(centre, radius) >= 0.8:
                    return Tumour(
                        site, tuple(centre), radius, axes, tuple(harmonics), tuple(spicules), texture_seed
                    )
        logger.debug("no lung position fits a %.1f mm tumour; trying the mediastinum", radius)
    # mediastinal: near the carina, the hila or the aorto-pulmonary window
    radius = min(radius, 17.0)
    cav_y = scene.trachea_y
    for spot in (
        (-4.0, cav_y + 14.0, -22.0),  # subcarinal
        (-22.0, cav_y - 6.0, 22.0),  # right paratracheal
        (20.0, cav_y - 14.0, 10.0),  # aorto-pulmonary window
        (-48.0, cav_y + 8.0, -20.0),  # right hilum
        (50.0, cav_y + 10.0, -30.0),  # left hilum
    ):
        centre_a = np.array(spot, dtype=float)
        if zmin <= centre_a[2] <= zmax and fraction_free(centre_a, radius) >= 0.35:
            return Tumour(
                "mediastinum", tuple(centre_a), radius, axes, tuple(harmonics), tuple(spicules), texture_seed
            )
    # last resort: the freest place in the lungs, with a small tumour (a tiny field of view)
    radius = 7.5
    lungs = scene.masks["Lung_L"] | scene.masks["Lung_R"]
    dist = ndimage.distance_transform_edt(lungs, sampling=(c.spacing[2], c.spacing[1], c.spacing[0]))
    k, j, i = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return Tumour(
        "lung_left" if c.x[i] > 0 else "lung_right",
        (float(c.x[i]), float(c.y[j]), float(c.z[k])),
        radius,
        axes,
        tuple(harmonics),
        tuple(spicules),
        texture_seed,
    )


def tumour_mask(
    c: _Coords, tumour: Tumour, scale: float
) -> tuple[tuple[slice, slice, slice], np.ndarray, np.ndarray]:
    """Rasterise the tumour scaled by ``scale`` in its bounding box: (box, mask, normalised radius)."""
    r = tumour.radius * scale
    centre = np.asarray(tumour.centre, dtype=np.float32)
    reach = r * 1.6 + max([s[3] for s in tumour.spicules], default=0.0) * scale + 2.0
    box = c.box(centre - reach, centre + reach)
    X, Y, Z = c.sub(box)
    dx = (X - centre[0]) / tumour.axes[0]
    dy = (Y - centre[1]) / tumour.axes[1]
    dz = (Z - centre[2]) / tumour.axes[2]
    dist = np.sqrt(dx * dx + dy * dy + dz * dz) + 1e-6
    modulation = np.ones_like(dist)
    for vx, vy, vz, order, amp, phase in tumour.harmonics:
        cosang = np.clip((dx * vx + dy * vy + dz * vz) / dist, -1.0, 1.0)
        modulation = modulation + amp * np.cos(order * np.arccos(cosang) + phase)
    rho = dist / (r * np.maximum(modulation, 0.4))
    blob = rho <= 1.0
    for vx, vy, vz, length in tumour.spicules:
        end = (
            centre[0] + vx * (r + length * scale),
            centre[1] + vy * (r + length * scale),
            centre[2] + vz * (r + length * scale),
        )
        sbox, spic = _tube(c, (float(centre[0]), float(centre[1]), float(centre[2])), end, 1.6)
        # translate the spicule's box into the tumour box
        sl = tuple(slice(max(s.start, b.start), min(s.stop, b.stop)) for s, b in zip(sbox, box, strict=True))
        if all(s.stop > s.start for s in sl):
            src = tuple(slice(s2.start - s1.start, s2.stop - s1.start) for s1, s2 in zip(sbox, sl, strict=True))
            dst = tuple(slice(s2.start - b.start, s2.stop - b.start) for b, s2 in zip(box, sl, strict=True))
            blob[dst] |= spic[src]
    return box, blob, rho


def paint_tumour(scene: _Scene, tumour: Tumour, *, scale: float) -> None:
    """Paint the GTV (soft tissue with mild heterogeneity) where the anatomy leaves room; update the masks."""
    c = scene.c
    box, blob, rho = tumour_mask(c, tumour, scale)
    gtv_box = blob & scene.free[box]
    gtv = np.zeros(c.shape, dtype=bool)
    gtv[box] = gtv_box
    rng = np.random.default_rng(tumour.texture_seed)
    texture = ndimage.gaussian_filter(rng.standard_normal(gtv_box.shape).astype(np.float32), 1.2)
    texture /= max(float(texture.std()), 1e-6)
    values = HU_TUMOUR + 7.0 * texture
    if tumour.radius * scale > 18.0:  # large tumours: a hypodense (necrotic) core
        values = np.where(rho < 0.45, values - 22.0, values)
    sub = scene.hu[box]
    sub[gtv_box] = values[gtv_box]
    scene.masks["GTV"] = gtv
    for name in ("Lung_L", "Lung_R"):
        scene.masks[name] &= ~gtv


def finish(scene: _Scene, rng: np.random.Generator, *, noise_sd: float = 21.0) -> Phantom:
    """Put the body on the couch in the whole field of view, add noise and a slight in-plane blur.

    The blur stands in for the reconstruction kernel: white noise of ``noise_sd`` becomes ≈ 15 HU of correlated
    noise, and edges get a sub-voxel partial-volume softening. The masks are not blurred (they are the truth).
    """
    full = scene.full
    hu = np.full(full.shape, HU_AIR, dtype=np.float32)
    # carbon-fibre couch: two thin shells around a foam core, under the patient
    yy = full.y
    couch = np.full(yy.shape, np.nan, dtype=np.float32)
    top = scene.couch_y
    couch[(yy >= top) & (yy < top + 2.5)] = 180.0
    couch[(yy >= top + 2.5) & (yy < top + 38.0)] = -870.0
    couch[(yy >= top + 38.0) & (yy < top + 41.0)] = 180.0
    in_couch = ~np.isnan(couch)
    edge = np.abs(full.x) < 250.0
    hu[:, np.nonzero(in_couch)[0][:, None], np.nonzero(edge)[0][None, :]] = couch[in_couch][:, None]
    crop = scene.crop
    region = hu[crop]
    np.copyto(region, scene.hu, where=scene.hu > HU_AIR + 1.0)
    hu += rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(noise_sd)
    ndimage.gaussian_filter(hu, sigma=(0.0, 0.45, 0.45), output=hu, truncate=3.0)
    masks = {}
    for name in (*ROI_NAMES, "Vertebrae"):
        m = np.zeros(full.shape, dtype=bool)
        m[crop] = scene.masks[name]
        masks[name] = m
    return Phantom(hu=hu, masks=masks)
