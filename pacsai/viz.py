"""Pictures of volumes, structures and dose: matplotlib overlays, DVH plots and an offline notebook viewer.

Every plane is drawn in patient millimetres (DICOM LPS), in the radiological convention: axial and coronal views
show the patient's right on the viewer's left, anterior is up in axial views, superior is up in coronal and
sagittal views, anterior is left in sagittal views. Structures and dose on another grid than the image are
resampled onto the image grid first (:func:`pacsai.imaging.dose.resample`), so a contour can never be drawn on the
wrong voxels.

:func:`view` is the interactive viewer. It renders offline in JupyterLab 4 with ipyniivue (its JavaScript ships
in the wheel; the volumes travel as in-memory NIfTI bytes, never a URL) and always carries a static PNG of the
three planes in the same output. Executed without a widget frontend (papermill, ``nbconvert --execute``) it builds
no widget at all: the notebook stores no widget state and its HTML export shows the PNG offline.
"""

from __future__ import annotations

import base64
import gzip
import io
import logging
import os
import re
import warnings
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, cast

import numpy as np
import xarray as xr
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from pacsai.errors import PacsaiError, PacsaiWarning, VolumeError
from pacsai.imaging.geometry import DIMS, affine_of, decompose, is_axis_aligned, same_grid, world_to_index

logger = logging.getLogger(__name__)

__all__ = [
    "STRUCTURE_COLORS",
    "PlotFigure",
    "Viewer",
    "figure_png",
    "legend_html",
    "plot_comparison",
    "plot_dvh",
    "plot_histograms",
    "plot_planes",
    "structure_color",
    "to_nifti_bytes",
    "view",
]

#: Fixed colours (RGB 0–1) of the usual structure names, looked up case- and punctuation-insensitively, so that a
#: structure has the same colour in every figure, report and viewer.
STRUCTURE_COLORS: Mapping[str, tuple[float, float, float]] = MappingProxyType({
    "body": (1.0, 0.67, 0.0),
    "external": (1.0, 0.67, 0.0),
    "gtv": (1.0, 0.0, 0.0),
    "ctv": (1.0, 0.55, 0.75),
    "ptv": (1.0, 0.0, 1.0),
    "lungl": (0.0, 0.78, 1.0),
    "lungr": (0.0, 0.35, 1.0),
    "lungs": (0.0, 0.6, 1.0),
    "lung": (0.0, 0.6, 1.0),
    "heart": (0.78, 0.0, 0.47),
    "spinalcord": (1.0, 1.0, 0.0),
    "cord": (1.0, 1.0, 0.0),
    "esophagus": (0.0, 0.78, 0.0),
    "oesophagus": (0.0, 0.78, 0.0),
    "vertebrae": (0.9, 0.9, 0.9),
    "trachea": (0.55, 0.85, 0.55),
    "liver": (0.6, 0.3, 0.1),
    "kidneyl": (0.55, 0.27, 0.07),
    "kidneyr": (0.8, 0.5, 0.2),
    "brainstem": (0.5, 0.0, 1.0),
    "parotidl": (0.3, 0.7, 0.5),
    "parotidr": (0.2, 0.5, 0.35),
})

# Structures whose outline is drawn thinner: they enclose everything else and would dominate the picture.
_OUTER = frozenset({"body", "external"})
# Default isodose levels (percent) and their fixed colours; other levels take colours from a colormap.
_ISODOSE_COLORS: Mapping[float, str] = MappingProxyType({
    107.0: "#900000", 95.0: "#ff2020", 80.0: "#ffa000", 50.0: "#30d030", 30.0: "#3080ff",
})
_ISODOSE_PERCENT = tuple(_ISODOSE_COLORS)
_VIEWER_ENV = "PACSAI_VIEWER"
Backend = Literal["auto", "niivue", "matplotlib", "static"]


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def structure_color(name: str) -> tuple[float, float, float]:
    """The fixed colour (RGB, 0–1) of a structure name.

    Parameters
    ----------
    name
        ROI name; ``"Lung_L"``, ``"lung l"`` and ``"LUNG-L"`` are the same structure.

    Returns
    -------
    tuple of float
        The colour from :data:`STRUCTURE_COLORS`, else one of matplotlib's ``tab20`` colours chosen by a CRC-32 of
        the name (stable across runs and machines, unlike Python's ``hash``).
    """
    key = _key(name)
    if key in STRUCTURE_COLORS:
        return STRUCTURE_COLORS[key]
    from matplotlib import colormaps

    rgba = colormaps["tab20"](zlib.crc32(key.encode()) % 20)
    return (float(rgba[0]), float(rgba[1]), float(rgba[2]))


# --------------------------------------------------------------------------------------------------- grid helpers
@dataclass(frozen=True)
class _Canonical:
    """A volume reordered to patient axes: ``data[z, y, x]`` with every coordinate increasing (mm, LPS)."""

    data: np.ndarray
    x: np.ndarray
    y: np.ndarray
    z: np.ndarray


@dataclass(frozen=True)
class _Layout:
    """How to turn a grid's (k, j, i) array into patient (z, y, x) order: axis permutation and flips."""

    perm: tuple[int, int, int]
    flip: tuple[bool, bool, bool]
    coords: tuple[np.ndarray, np.ndarray, np.ndarray]  # z, y, x in mm, increasing


def _layout(volume: xr.DataArray) -> _Layout:
    affine = affine_of(volume)
    origin, direction, _ = decompose(affine)
    # World axis (0 x, 1 y, 2 z) that each grid axis (0 i, 1 j, 2 k) runs along.
    world_of = [int(np.argmax(np.abs(direction[:, c]))) for c in range(3)]
    if sorted(world_of) != [0, 1, 2]:
        raise VolumeError(
            f"volume {volume.name!r}: grid axes do not map onto distinct patient axes (direction "
            f"{np.round(direction, 3).tolist()}); resample it onto an axis-aligned grid first"
        )
    if not is_axis_aligned(_aligned(direction)):
        warnings.warn(
            f"volume {volume.name!r} is oblique (direction {np.round(direction, 3).tolist()}): the planes shown are "
            "the grid's planes, labelled with the nearest patient axes; resample onto an axis-aligned grid for "
            "true axial/coronal/sagittal planes",
            PacsaiWarning,
            stacklevel=3,
        )
    shape_kji = volume.shape  # (k, j, i)
    grid_axis_of_world = {w: c for c, w in enumerate(world_of)}  # world axis → grid axis (0 i, 1 j, 2 k)
    perm: list[int] = []
    flips: list[bool] = []
    coords: list[np.ndarray] = []
    for world in (2, 1, 0):  # z, y, x
        c = grid_axis_of_world[world]
        array_axis = 2 - c  # array dims are (k, j, i)
        step = float(affine[world, c])
        n = shape_kji[array_axis]
        values = origin[world] + np.arange(n) * step
        flip = step < 0
        perm.append(array_axis)
        flips.append(flip)
        coords.append(values[::-1] if flip else values)
    return _Layout(perm=(perm[0], perm[1], perm[2]), flip=(flips[0], flips[1], flips[2]),
                   coords=(coords[0], coords[1], coords[2]))


def _aligned(direction: np.ndarray) -> np.ndarray:
    """The direction with its columns permuted back to (x, y, z) order, so that is_axis_aligned tests obliquity."""
    order = np.argsort([int(np.argmax(np.abs(direction[:, c]))) for c in range(3)])
    return np.abs(direction[:, order])


def _canonical(array: np.ndarray, layout: _Layout) -> np.ndarray:
    out = np.transpose(array, layout.perm)
    for axis, flip in enumerate(layout.flip):
        if flip:
            out = np.flip(out, axis=axis)
    return out


def _on_grid(item: xr.DataArray, image: xr.DataArray, *, order: int, what: str) -> xr.DataArray:
    """``item`` on the image grid: as is when the grids agree, else resampled in patient coordinates."""
    if same_grid(item, image):
        return item
    for_a, for_b = item.attrs.get("frame_of_reference_uid"), image.attrs.get("frame_of_reference_uid")
    if for_a and for_b and for_a != for_b:
        raise VolumeError(
            f"{what} is on frame of reference {for_a}, the image on {for_b}: register them before overlaying"
        )
    from pacsai.imaging.dose import resample

    logger.debug("resampling %s onto the image grid (order %d)", what, order)
    return resample(item, like=image, order=order)


def _centroid_mm(mask: xr.DataArray) -> np.ndarray:
    k, j, i = np.nonzero(np.asarray(mask.values))
    ijk = np.stack([i, j, k], axis=1).mean(axis=0)
    affine = affine_of(mask)
    return affine[:3, :3] @ ijk + affine[:3, 3]


def _find(structures: Mapping[str, xr.DataArray], name: str) -> str | None:
    for key in structures:
        if _key(key) == _key(name):
            return key
    return None


def _center_index(
    image: xr.DataArray,
    structures: Mapping[str, xr.DataArray],
    center: Any,
) -> np.ndarray:
    """Fractional (i, j, k) of the point the planes go through."""
    if center is None:
        gtv = _find(structures, "GTV")
        if gtv is not None and bool(np.asarray(structures[gtv].values).any()):
            center = structures[gtv]
    if center is None:
        return (np.asarray(image.shape[::-1], dtype=float) - 1.0) / 2.0
    if isinstance(center, xr.DataArray):
        if not bool(np.asarray(center.values).any()):
            raise PacsaiError(f"cannot centre the planes on the empty structure {center.name!r}; pass another one")
        point = _centroid_mm(center)
    else:
        point = np.asarray(center, dtype=float).reshape(-1)
        if point.shape != (3,):
            raise ValueError(f"center must be an (x, y, z) point in LPS mm or a mask, not {center!r}")
    ijk = world_to_index(affine_of(image), point[None, :])[0]
    size = np.asarray(image.shape[::-1], dtype=float)
    if np.any(ijk < -0.5) or np.any(ijk > size - 0.5):
        raise VolumeError(
            f"centre {np.round(point, 1).tolist()} mm (LPS) lies outside the image {image.name!r} "
            f"(voxel index {np.round(ijk, 1).tolist()} of {image.shape[::-1]}); pick a point inside it"
        )
    return ijk


class PlotFigure(Figure):
    """A matplotlib figure that shows itself as a PNG wherever IPython displays it (notebooks, papermill, HTML
    exports), without pyplot: figures made here never enter pyplot's global figure list, so loops do not leak."""

    def _repr_png_(self) -> bytes:
        return figure_png(self)

    def _ipython_display_(self) -> None:
        # Published as one PNG drawn once: IPython prefers a PNG printer registered for matplotlib figures (the
        # inline backend's, once anything imports pyplot: bbox "tight", so two draws) to _repr_png_, and even to
        # _repr_mimebundle_; an object that displays itself is asked nothing else.
        from IPython.display import display

        display({"image/png": base64.b64encode(figure_png(self)).decode("ascii"), "text/plain": repr(self)},
                raw=True)


# ---------------------------------------------------------------------------------------------------- plot_planes
@dataclass
class _Prepared:
    image: _Canonical
    structures: dict[str, np.ndarray] = field(default_factory=dict)
    # The dose on the image grid in the axial, coronal and sagittal planes only (see _dose_planes), and the
    # highest dose of the plan (its grid's maximum: the isodose reference without a prescription).
    dose_planes: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    dose_max: float = 0.0
    index_zyx: tuple[int, int, int] = (0, 0, 0)
    point_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)


def _prepare(
    volume: xr.DataArray,
    structures: Mapping[str, xr.DataArray] | None,
    dose: xr.DataArray | None,
    center: Any,
) -> _Prepared:
    layout = _layout(volume)
    structures = dict(structures or {})
    on_grid = {name: _on_grid(m, volume, order=0, what=f"structure {name!r}") for name, m in structures.items()}
    ijk = _center_index(volume, on_grid, center)
    # Grid index (k, j, i) → canonical (z, y, x) index: permute, then mirror the flipped axes.
    kji = np.rint(ijk[::-1]).astype(int).clip(0, np.asarray(volume.shape) - 1)
    idx = [int(kji[a]) for a in layout.perm]
    shape = [volume.shape[a] for a in layout.perm]
    idx = [shape[n] - 1 - idx[n] if layout.flip[n] else idx[n] for n in range(3)]
    z, y, x = layout.coords
    prepared = _Prepared(
        image=_Canonical(_canonical(np.asarray(volume.values), layout), x=x, y=y, z=z),
        index_zyx=(idx[0], idx[1], idx[2]),
        point_mm=(float(x[idx[2]]), float(y[idx[1]]), float(z[idx[0]])),
    )
    for name, mask in on_grid.items():
        prepared.structures[name] = _canonical(np.asarray(mask.values, dtype=bool), layout)
    if dose is not None:
        prepared.dose_planes = _dose_planes(dose, volume, layout, (int(kji[0]), int(kji[1]), int(kji[2])))
        prepared.dose_max = float(np.nanmax(np.asarray(dose.values)))
    return prepared


def _dose_planes(
    dose: xr.DataArray, volume: xr.DataArray, layout: _Layout, kji: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The dose on the image grid in the three planes through grid voxel ``kji``, in canonical orientation.

    Each plane is a one-voxel slab of the image grid onto which the dose is resampled (linear), exactly as the
    whole volume would be, at the cost of three slices instead of all of them (a third of a second on a
    256 × 256 × 96 CT, on every report).
    """
    planes = []
    for n in range(3):  # canonical z, y, x: the axial, coronal and sagittal planes
        axis = layout.perm[n]
        slab = volume.isel({DIMS[axis]: slice(kji[axis], kji[axis] + 1)})
        on_slab = _on_grid(dose, slab, order=1, what="dose")
        planes.append(np.take(_canonical(np.asarray(on_slab.values, dtype=float), layout), 0, axis=n))
    return planes[0], planes[1], planes[2]


def _isodose_levels(
    dose_max: float, prescription_gy: float | None, levels: Sequence[float] | None
) -> list[tuple[float, str, Any]]:
    """(level in Gy, legend label, colour) triples, highest first."""
    reference = prescription_gy if prescription_gy else dose_max
    if reference <= 0:
        return []
    percents = list(levels) if levels is not None else list(_ISODOSE_PERCENT)
    if not prescription_gy:  # nothing exceeds 100 % of the maximum
        percents = [p for p in percents if p <= 100.0]
    what = "Rx" if prescription_gy else "max"
    from matplotlib import colormaps

    out = []
    for pct in sorted(percents, reverse=True):
        gy = reference * pct / 100.0
        color = _ISODOSE_COLORS.get(float(pct)) or colormaps["jet"](min(pct, 110.0) / 110.0)
        out.append((gy, f"{gy:.1f} Gy ({pct:g}% {what})", color))
    return out


def _planes(p: _Prepared) -> list[tuple[str, Any, np.ndarray, np.ndarray, str, str, bool]]:
    """(title, slicer, horizontal mm, vertical mm, horizontal label, vertical label, invert vertical) per plane."""
    kz, jy, ix = p.index_zyx
    c = p.image
    return [
        (f"Axial  z = {c.z[kz]:.1f} mm", (kz, slice(None), slice(None)), c.x, c.y, "x (mm)  R → L", "y (mm)  A → P",
         True),
        (f"Coronal  y = {c.y[jy]:.1f} mm", (slice(None), jy, slice(None)), c.x, c.z, "x (mm)  R → L",
         "z (mm)  I → S", False),
        (f"Sagittal  x = {c.x[ix]:.1f} mm", (slice(None), slice(None), ix), c.y, c.z, "y (mm)  A → P",
         "z (mm)  I → S", False),
    ]


def _outline(
    ax: Any, h: np.ndarray, v: np.ndarray, plane: np.ndarray, level: float, *, color: Any, linewidth: float,
    gid: str, linestyle: str = "solid",
) -> None:
    """The iso-line of ``plane`` at ``level`` as one line collection with ``gid``, in axes units (h, v mm).

    The lines are those ``ax.contour(h, v, plane, levels=[level])`` draws (contourpy, matplotlib's algorithm),
    computed on the box around the values at or above ``level`` with a margin of one pixel, which holds every
    line; a plain LineCollection instead of a ContourSet costs a tenth of it, on every structure of every plane.
    """
    from contourpy import LineType, contour_generator
    from matplotlib import rcParams
    from matplotlib.collections import LineCollection

    above = plane if plane.dtype == bool else plane >= level
    rows, cols = np.flatnonzero(above.any(axis=1)), np.flatnonzero(above.any(axis=0))
    if rows.size == 0:
        return
    r0, r1 = max(int(rows[0]) - 1, 0), min(int(rows[-1]) + 2, plane.shape[0])
    c0, c1 = max(int(cols[0]) - 1, 0), min(int(cols[-1]) + 2, plane.shape[1])
    if r1 - r0 < 2 or c1 - c0 < 2:  # contouring needs 2 × 2 points, like Axes.contour
        return
    box = np.asarray(plane[r0:r1, c0:c1], dtype=np.float64)
    generator = contour_generator(h[c0:c1], v[r0:r1], box, name=rcParams["contour.algorithm"],
                                  corner_mask=True, line_type=LineType.SeparateCode)
    # SeparateCode gives (points, codes) per line; a closed line ends on its first point, so as a polyline it closes.
    lines = cast(list[np.ndarray], generator.lines(level)[0])
    if lines:
        ax.add_collection(LineCollection(lines, colors=[color], linewidths=linewidth, linestyles=linestyle, gid=gid),
                          autolim=False)


def _outline_structures(ax: Any, h: np.ndarray, v: np.ndarray, planes: Mapping[str, np.ndarray]) -> None:
    """Each structure's outline in one plane, in its colour, thinner for the body (gid ``structure:<name>``)."""
    for sname, plane in planes.items():
        if plane.any() and not plane.all():
            _outline(ax, h, v, plane, 0.5, color=structure_color(sname),
                     linewidth=0.8 if _key(sname) in _OUTER else 1.4, gid=f"structure:{sname}")


def _title(ax: Any, text: str, *, fontsize: float = 10) -> None:
    # An explicit height: matplotlib otherwise measures every artist above the axes on each draw to lift the
    # title over them, and nothing is drawn there.
    ax.set_title(text, fontsize=fontsize, y=1.0)


def _extent(h: np.ndarray, v: np.ndarray) -> tuple[float, float, float, float]:
    dh = float(h[1] - h[0]) if h.size > 1 else 1.0
    dv = float(v[1] - v[0]) if v.size > 1 else 1.0
    return (float(h[0]) - dh / 2, float(h[-1]) + dh / 2, float(v[0]) - dv / 2, float(v[-1]) + dv / 2)


def plot_planes(
    volume: xr.DataArray,
    structures: Mapping[str, xr.DataArray] | None = None,
    dose: xr.DataArray | None = None,
    *,
    center: Any = None,
    window: tuple[float, float] = (-1000.0, 400.0),
    prescription_gy: float | None = None,
    isodose_percent: Sequence[float] | None = None,
    dose_wash: bool = True,
    title: str | None = None,
    figsize: tuple[float, float] = (13.0, 5.0),
) -> PlotFigure:
    """Axial, coronal and sagittal planes through one point, with structure contours and isodose lines.

    Parameters
    ----------
    volume
        The image (a pacsai volume, e.g. CT in HU).
    structures
        ``{name: bool mask}``; masks on another grid are resampled onto the image grid (nearest neighbour).
        Each is outlined in its fixed colour (:func:`structure_color`).
    dose
        Dose in Gy on any grid of the same frame of reference; resampled (linear) onto the image grid.
    center
        The point the planes go through: ``(x, y, z)`` LPS mm, or a mask (its centroid). Default: the centroid
        of the ``GTV`` structure when present and non-empty, else the centre of the volume.
    window
        ``(lowest, highest)`` image value shown black and white (HU).
    prescription_gy
        Isodose levels are percentages of this dose; of the maximum dose where None.
    isodose_percent
        Isodose levels in percent (default 107, 95, 80, 50, 30).
    dose_wash
        Also show the dose as a translucent colour wash above the lowest isodose level.
    title
        Figure title.
    figsize
        Figure size in inches.

    Returns
    -------
    PlotFigure
        Three image axes (axial, coronal, sagittal) in patient mm. Each structure contour is a collection with
        ``gid="structure:<name>"``, each isodose line ``gid="isodose:<Gy>"``, the dose wash an image with
        ``gid="dose-wash"``; the figure legend names every structure and isodose level, and the wash's colour
        scale in Gy is an axis with ``gid="dose-colorbar"``.

    Raises
    ------
    VolumeError
        ``center`` outside the image; structures or dose on another frame of reference; a grid whose axes do not
        map onto distinct patient axes.
    """
    p = _prepare(volume, structures, dose, center)
    # A fixed layout: constrained layout costs as much as the drawing itself and the geometry never changes.
    fig = PlotFigure(figsize=figsize)
    fig.subplots_adjust(left=0.05, right=0.86, bottom=0.1, top=0.86, wspace=0.28)
    axes = fig.subplots(1, 3)
    levels = _isodose_levels(p.dose_max, prescription_gy, isodose_percent) if p.dose_planes is not None else []
    lo, hi = window
    wash_image = None
    for n, (ax, (name, slicer, h, v, hlabel, vlabel, invert)) in enumerate(zip(axes, _planes(p), strict=True)):
        extent = _extent(h, v)
        ax.imshow(p.image.data[slicer], cmap="gray", vmin=lo, vmax=hi, origin="lower", extent=extent,
                  interpolation="nearest", aspect="equal")
        if p.dose_planes is not None and levels:
            plane = p.dose_planes[n]
            if dose_wash:
                floor = levels[-1][0]
                wash = np.ma.masked_less(plane, floor)
                wash_image = ax.imshow(wash, cmap="jet", vmin=floor, vmax=max(levels[0][0], p.dose_max), alpha=0.3,
                                       origin="lower", extent=extent, interpolation="bilinear", aspect="equal",
                                       gid="dose-wash")
            for gy, _, color in levels:
                if np.nanmax(plane) >= gy > np.nanmin(plane):
                    _outline(ax, h, v, plane, gy, color=color, linewidth=1.0, linestyle="--", gid=f"isodose:{gy:.2f}")
        _outline_structures(ax, h, v, {sname: mask[slicer] for sname, mask in p.structures.items()})
        ax.set_xlim(extent[0], extent[1])
        ax.set_ylim((extent[3], extent[2]) if invert else (extent[2], extent[3]))
        _title(ax, name)
        ax.set_xlabel(hlabel, fontsize=8)
        ax.set_ylabel(vlabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_facecolor("black")
    handles = [Line2D([], [], color=structure_color(n), lw=2, label=n) for n in p.structures]
    handles += [Line2D([], [], color=c, lw=1.2, ls="--", label=label)
                for _, label, c in levels]
    if handles:
        fig.legend(handles=handles, loc="upper right", bbox_to_anchor=(1.0, 0.88), fontsize=8, frameon=False)
    if wash_image is not None:
        # The wash's colour scale in Gy (the legend names the isodose lines; this reads the colours between them).
        cax = fig.add_axes((0.885, 0.1, 0.015, 0.28), gid="dose-colorbar")
        bar = fig.colorbar(wash_image, cax=cax)
        if bar.solids is not None:
            bar.solids.set_alpha(0.6)
        bar.set_label("dose (Gy)", fontsize=8)
        cax.tick_params(labelsize=7)
    x, y, z = p.point_mm
    fig.suptitle(title or f"{volume.name or 'image'} through ({x:.1f}, {y:.1f}, {z:.1f}) mm LPS", fontsize=11)
    return fig


# ------------------------------------------------------------------------------------------------------ DVH, HU
def _curve(value: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    if hasattr(value, "curve") and callable(value.curve):
        value = value.curve()
    if hasattr(value, "columns"):  # a DataFrame with dose and volume columns
        cols = list(value.columns)
        value = (value[cols[0]].to_numpy(), value[cols[1]].to_numpy())
    try:
        dose_gy, volume_pct = (np.asarray(v, dtype=float).reshape(-1) for v in value)
    except (TypeError, ValueError) as err:
        raise PacsaiError(
            f"DVH of {name!r} is not a (dose_gy, volume_percent) pair of arrays nor an object with .curve()"
        ) from err
    if dose_gy.shape != volume_pct.shape:
        raise PacsaiError(f"DVH of {name!r}: {dose_gy.size} dose values but {volume_pct.size} volume values")
    return dose_gy, volume_pct


def plot_dvh(
    dvhs: Mapping[str, Any],
    *,
    prescription_gy: float | None = None,
    title: str = "Cumulative dose-volume histograms",
    figsize: tuple[float, float] = (8.0, 5.0),
) -> PlotFigure:
    """Cumulative DVHs, one line per structure in its fixed colour.

    Parameters
    ----------
    dvhs
        ``{name: curve}``, a curve being a ``(dose_gy, volume_percent)`` pair of equal-length arrays, an object
        with a ``curve()`` method returning one, or a DataFrame whose first two columns are those.
    prescription_gy
        Draws a vertical line at the prescription dose.
    title, figsize
        Figure title and size (inches).

    Returns
    -------
    PlotFigure
        One axes, x "Dose (Gy)", y "Volume (%)", one line per structure labelled with its name.
    """
    # Fixed margins, as in plot_planes: constrained layout draws the whole figure once more to measure it.
    fig = PlotFigure(figsize=figsize)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.1, top=0.93)
    ax = fig.subplots()
    for name, value in dvhs.items():
        dose_gy, volume_pct = _curve(value, name)
        ax.plot(dose_gy, volume_pct, color=structure_color(name), lw=1.6, label=name)
    if prescription_gy:
        ax.axvline(prescription_gy, color="0.3", ls=":", lw=1.0, label=f"prescription {prescription_gy:g} Gy")
    ax.set_xlabel("Dose (Gy)")
    ax.set_ylabel("Volume (%)")
    ax.set_ylim(0, 105)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    _title(ax, title, fontsize=11)
    if dvhs:
        ax.legend(fontsize=8, loc="upper right")
    return fig


def plot_histograms(
    volume: xr.DataArray,
    structures: Mapping[str, xr.DataArray],
    *,
    bins: int = 100,
    value_range: tuple[float, float] = (-1100.0, 1500.0),
    density: bool = True,
    figsize: tuple[float, float] = (8.0, 4.5),
) -> PlotFigure:
    """Histogram of image values (HU) inside each structure.

    Parameters
    ----------
    volume
        The image.
    structures
        ``{name: bool mask}``; resampled onto the image grid (nearest neighbour) where needed. Empty ones are
        skipped.
    bins, value_range
        Histogram bins over ``value_range`` (HU).
    density
        Normalise each histogram to unit area (structures of very different size stay comparable).
    figsize
        Figure size in inches.

    Returns
    -------
    PlotFigure
        One axes, one step line per non-empty structure labelled ``"<name> (median <HU>)"``.
    """
    fig = PlotFigure(figsize=figsize, layout="constrained")
    ax = fig.subplots()
    values = np.asarray(volume.values)
    edges = np.linspace(value_range[0], value_range[1], bins + 1)
    for name, mask in structures.items():
        inside = np.asarray(_on_grid(mask, volume, order=0, what=f"structure {name!r}").values, dtype=bool)
        if not inside.any():
            continue
        hu = values[inside]
        counts, _ = np.histogram(hu, bins=edges, density=density)
        ax.stairs(counts, edges, color=structure_color(name), lw=1.4, label=f"{name} (median {np.median(hu):.0f})")
    ax.set_xlabel("Image value (HU)")
    ax.set_ylabel("Density" if density else "Voxels")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    ax.set_title("Values inside each structure", fontsize=11)
    return fig


def plot_comparison(
    prior_image: xr.DataArray,
    prior_structures: Mapping[str, xr.DataArray],
    image: xr.DataArray,
    structures: Mapping[str, xr.DataArray],
    *,
    target: str = "GTV",
    window: tuple[float, float] = (-1000.0, 400.0),
    figsize: tuple[float, float] = (10.0, 5.0),
) -> PlotFigure:
    """The prior and the current study side by side: axial planes through each study's target centroid.

    Parameters
    ----------
    prior_image, prior_structures
        The earlier study and its masks.
    image, structures
        The current study and its masks.
    target
        The structure whose centroid picks each study's plane (case-insensitive); the volume centre where absent
        or empty.
    window
        Grey window (HU).
    figsize
        Figure size in inches.

    Returns
    -------
    PlotFigure
        Two axes titled ``"Prior …"`` and ``"Current …"``, contours as in :func:`plot_planes`.
    """
    fig = PlotFigure(figsize=figsize)  # fixed margins, as in plot_planes (no second draw to measure the layout)
    fig.subplots_adjust(left=0.06, right=0.87, bottom=0.08, top=0.93, wspace=0.16)
    axes = fig.subplots(1, 2)
    for ax, label, img, masks in ((axes[0], "Prior", prior_image, prior_structures),
                                  (axes[1], "Current", image, structures)):
        masks = dict(masks or {})
        key = _find(masks, target)
        center = masks[key] if key is not None and bool(np.asarray(masks[key].values).any()) else None
        p = _prepare(img, masks, None, center)
        name, slicer, h, v, hlabel, vlabel, _ = _planes(p)[0]
        extent = _extent(h, v)
        lo, hi = window
        ax.imshow(p.image.data[slicer], cmap="gray", vmin=lo, vmax=hi, origin="lower", extent=extent,
                  interpolation="nearest", aspect="equal")
        _outline_structures(ax, h, v, {sname: mask[slicer] for sname, mask in p.structures.items()})
        ax.set_xlim(extent[0], extent[1])
        ax.set_ylim(extent[3], extent[2])
        date = img.attrs.get("study_date", "")
        _title(ax, f"{label} {date}  {name}".strip())
        ax.set_xlabel(hlabel, fontsize=8)
        ax.set_ylabel(vlabel, fontsize=8)
        ax.tick_params(labelsize=7)
    names = list(dict.fromkeys([*prior_structures, *structures]))
    if names:
        fig.legend(handles=[Line2D([], [], color=structure_color(n), lw=2, label=n) for n in names],
                   loc="center right", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    return fig


# ---------------------------------------------------------------------------------------------------------- view
def figure_png(fig: Figure, *, dpi: int = 90) -> bytes:
    """PNG bytes of a figure (rendered with the Agg canvas; no pyplot state is touched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    # zlib level 3 instead of 6: half the compression time for 5 % more bytes (lossless either way).
    fig.savefig(buffer, format="png", dpi=dpi, pil_kwargs={"compress_level": 3})
    return buffer.getvalue()


def to_nifti_bytes(volume: xr.DataArray, *, dtype: Any = None, compress: bool = True) -> bytes:
    """A pacsai volume as NIfTI-1 bytes in RAS, for viewers that read NIfTI (ipyniivue, 3D Slicer...).

    Parameters
    ----------
    volume
        Any pacsai volume (dims z, y, x; LPS affine).
    dtype
        Voxel type in the file (default: the volume's, booleans as uint8).
    compress
        gzip the bytes (level 1: several times smaller for CT and masks, fast).

    Returns
    -------
    bytes
        The NIfTI file: array indexed ``[i, j, k]`` and the affine with its first two rows negated (LPS → RAS),
        as both the qform and the sform, so that every voxel keeps its patient position.
    """
    import nibabel as nib

    values = np.asarray(volume.values)
    if dtype is None:
        dtype = np.uint8 if values.dtype == bool else values.dtype
    array = np.ascontiguousarray(values.transpose(2, 1, 0), dtype=dtype)
    affine_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_of(volume)
    image = nib.Nifti1Image(array, affine_ras)
    image.header.set_qform(affine_ras, code=1)  # scanner anatomical
    image.header.set_sform(affine_ras, code=1)
    image.header.set_xyzt_units("mm")
    raw = image.to_bytes()
    return gzip.compress(raw, compresslevel=1, mtime=0) if compress else raw


@dataclass
class Viewer:
    """What :func:`view` returns: display it (last expression of a cell, or ``display(viewer)``).

    Attributes
    ----------
    backend
        ``"niivue"``, ``"matplotlib"`` or ``"static"``: what was built.
    png
        The static picture (three planes with contours and isodose lines).
    widget
        The ipywidgets widget (None for ``"static"``).
    """

    backend: str
    png: bytes = field(repr=False)
    widget: Any = field(default=None, repr=False)
    legend: Any = field(default=None, repr=False)
    _shown: Any = field(default=None, repr=False)

    @property
    def displayed(self) -> Any:
        """The widget a frontend shows: the viewer with its legend below it (None for ``"static"``)."""
        if self.widget is None or self.legend is None:
            return self.widget
        if self._shown is None:
            import ipywidgets as widgets

            self._shown = widgets.VBox([self.widget, self.legend])
        return self._shown

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        # One output carries both: a widget frontend renders the widget view, while nbconvert's HTML export shows
        # the PNG (it skips widget views whose state was not stored; view() builds no widget for papermill runs).
        bundle: dict[str, Any] = {
            "image/png": base64.b64encode(self.png).decode("ascii"),
            "text/plain": f"<pacsai viewer ({self.backend}): three planes with structures and dose>",
        }
        if self.displayed is not None:
            widget_bundle = self.displayed._repr_mimebundle_()
            if isinstance(widget_bundle, tuple):
                widget_bundle = widget_bundle[0]
            view_mime = "application/vnd.jupyter.widget-view+json"
            if widget_bundle and view_mime in widget_bundle:
                bundle[view_mime] = widget_bundle[view_mime]
        return bundle

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self._repr_mimebundle_(), raw=True)


def _in_kernel() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython ships with ipykernel, a dependency
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def _interactive_frontend() -> bool:
    """True when the running cell was sent by a notebook frontend that renders widgets.

    JupyterLab, Notebook 7 and VS Code send the cell's id (``metadata.cellId``) with each execute request;
    papermill, ``nbconvert --execute`` and other nbclient runs do not. Those keep only the notebook file, where a
    widget would store its whole state (the volumes: megabytes) and an HTML export would show the widget, which
    needs JavaScript from a CDN, instead of the picture.
    """
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython ships with ipykernel, a dependency
        return False
    kernel = getattr(get_ipython(), "kernel", None)
    if kernel is None or not hasattr(kernel, "get_parent"):
        return False
    parent = kernel.get_parent("shell") or {}
    return bool((parent.get("metadata") or {}).get("cellId"))


def _choose_backend(backend: str) -> str:
    if backend not in ("auto", "niivue", "matplotlib", "static"):
        raise ValueError(f"backend must be auto, niivue, matplotlib or static, not {backend!r}")
    if backend != "auto":
        return backend
    forced = os.environ.get(_VIEWER_ENV, "").strip().lower()
    if forced in ("niivue", "matplotlib", "static"):
        return forced
    if not _in_kernel() or not _interactive_frontend():
        return "static"
    try:
        import ipyniivue  # noqa: F401
    except ImportError:
        logger.info("ipyniivue is not installed (pip install 'pacsai[viewer]'): using the matplotlib slice viewer")
        return "matplotlib"
    return "niivue"


def legend_html(structures: Sequence[str], dose_range_gy: tuple[float, float] | None = None) -> str:
    """The viewer's legend as HTML: a colour swatch per structure and the dose colour scale in Gy.

    Parameters
    ----------
    structures
        Structure names, in the colours of :func:`structure_color` (the viewer's label overlay uses them too).
    dose_range_gy
        ``(lowest, highest)`` dose of the colour overlay (``jet``); no scale without dose.
    """
    from html import escape

    from matplotlib import colormaps

    def css(rgb: Sequence[float]) -> str:
        return "rgb({},{},{})".format(*(round(float(c) * 255) for c in rgb[:3]))

    swatches = "".join(
        f'<span style="margin-right:12px;white-space:nowrap"><span style="display:inline-block;width:12px;'
        f'height:12px;vertical-align:middle;margin-right:4px;background:{css(structure_color(n))}"></span>'
        f"{escape(n)}</span>"
        for n in structures
    )
    parts = [f'<div class="pacsai-legend-structures">{swatches}</div>'] if swatches else []
    if dose_range_gy is not None:
        low, high = dose_range_gy
        stops = ", ".join(css(colormaps["jet"](t)) for t in np.linspace(0.0, 1.0, 9))
        parts.append(
            '<div class="pacsai-legend-dose" style="margin-top:4px">dose '
            f'<span style="white-space:nowrap">{low:.1f} Gy <span style="display:inline-block;width:180px;'
            f'height:10px;vertical-align:middle;background:linear-gradient(to right, {stops})"></span> '
            f"{high:.1f} Gy</span></div>"
        )
    return f'<div class="pacsai-legend" style="font-size:12px;line-height:1.6">{"".join(parts)}</div>'


def _label_volume(volume: xr.DataArray, structures: Mapping[str, xr.DataArray]) -> tuple[xr.DataArray, list[str]]:
    """All structures in one label volume; larger ones first so that small ones stay visible inside them."""
    on_grid = {n: np.asarray(_on_grid(m, volume, order=0, what=f"structure {n!r}").values, dtype=bool)
               for n, m in structures.items()}
    order = sorted(on_grid, key=lambda n: -int(on_grid[n].sum()))
    labels = np.zeros(volume.shape, dtype=np.uint8 if len(order) < 255 else np.uint16)
    for number, name in enumerate(order, start=1):
        labels[on_grid[name]] = number
    from pacsai.imaging.geometry import like

    return like(volume, labels, name="structures"), order


def _niivue_widget(
    volume: xr.DataArray,
    structures: Mapping[str, xr.DataArray],
    dose: xr.DataArray | None,
    *,
    window: tuple[float, float],
    height: int,
) -> Any:
    import ipyniivue

    values = np.asarray(volume.values)
    # Integer HU fit int16 exactly: half the bytes of float32 over the comm channel.
    integral = values.dtype.kind in "iu" or bool(np.all(np.mod(values, 1) == 0))
    dtype = np.int16 if integral and values.min() >= -32768 and values.max() <= 32767 else np.float32
    nv = ipyniivue.NiiVue(height=height, slice_type=ipyniivue.SliceType.MULTIPLANAR,
                          multiplanar_show_render=ipyniivue.ShowRender.ALWAYS, is_colorbar=False,
                          back_color=(0.0, 0.0, 0.0, 1.0),
                          # The same convention as plot_planes: the patient's right on the viewer's left.
                          is_radiological_convention=True)
    nv.overlay_outline_width = 1.0  # outlined, translucent labels: the anatomy under them stays visible
    layers = [ipyniivue.Volume(data=to_nifti_bytes(volume, dtype=dtype), name="image.nii.gz", colormap="gray",
                               cal_min=float(window[0]), cal_max=float(window[1]), opacity=1.0)]
    # The body outline would cover the whole image in a filled label overlay; the CT shows it anyway.
    inner = {n: m for n, m in structures.items() if _key(n) not in _OUTER}
    if inner:
        labels, order = _label_volume(volume, inner)
        label_layer = ipyniivue.Volume(data=to_nifti_bytes(labels), name="structures.nii.gz", opacity=0.45)
        colors = [(0.0, 0.0, 0.0), *(structure_color(n) for n in order)]
        alpha = [0, *(255 for _ in order)]
        label_layer.set_colormap_label({
            "R": [round(c[0] * 255) for c in colors], "G": [round(c[1] * 255) for c in colors],
            "B": [round(c[2] * 255) for c in colors], "A": alpha,
            "I": list(range(len(colors))), "labels": ["background", *order],
        })
        layers.append(label_layer)
    if dose is not None:
        low, top = _dose_overlay_range(dose)
        layers.append(ipyniivue.Volume(data=to_nifti_bytes(dose, dtype=np.float32), name="dose.nii.gz",
                                       colormap="jet", cal_min=low, cal_max=top, opacity=0.35))
    nv.load_volumes(layers)
    return nv


def _dose_overlay_range(dose: xr.DataArray) -> tuple[float, float]:
    """The dose overlay's colour range in Gy: 10 % of the maximum (below it, no colour) to the maximum."""
    top = float(np.nanmax(np.asarray(dose.values)))
    return 0.1 * top, top


def _matplotlib_widget(
    volume: xr.DataArray,
    structures: Mapping[str, xr.DataArray],
    dose: xr.DataArray | None,
    *,
    center: Any,
    window: tuple[float, float],
    prescription_gy: float | None,
) -> Any:
    import ipywidgets as widgets
    from IPython.display import display

    start = _center_index(volume, {n: _on_grid(m, volume, order=0, what=n) for n, m in structures.items()}, center)
    sliders = [
        widgets.IntSlider(value=round(float(start[a])), min=0, max=volume.shape[2 - a] - 1, description=label,
                          continuous_update=False)
        for a, label in ((0, "i (x)"), (1, "j (y)"), (2, "k (z)"))
    ]
    out = widgets.Output()

    def draw(i: int, j: int, k: int) -> None:
        point = affine_of(volume) @ np.array([i, j, k, 1.0])
        fig = plot_planes(volume, structures, dose, center=point[:3], window=window, prescription_gy=prescription_gy)
        out.clear_output(wait=True)
        with out:
            display({"image/png": base64.b64encode(figure_png(fig)).decode("ascii"), "text/plain": "planes"},
                    raw=True)

    def on_change(_: Any) -> None:
        draw(*(s.value for s in sliders))

    for slider in sliders:
        slider.observe(on_change, names="value")
    draw(*(s.value for s in sliders))
    return widgets.VBox([widgets.HBox(sliders), out])


def view(
    volume: xr.DataArray,
    *,
    structures: Mapping[str, xr.DataArray] | None = None,
    dose: xr.DataArray | None = None,
    backend: Backend = "auto",
    center: Any = None,
    window: tuple[float, float] = (-1000.0, 400.0),
    prescription_gy: float | None = None,
    height: int = 480,
) -> Viewer:
    """An interactive viewer of a volume with structures and dose that also works offline and in exports.

    Parameters
    ----------
    volume
        The image (pacsai volume).
    structures
        ``{name: bool mask}`` (shown as a label overlay in the structures' fixed colours).
    dose
        Dose in Gy on any grid of the image's frame of reference (shown as a colour overlay).
    backend
        ``"niivue"``: ipyniivue (WebGL; three planes + 3D; its JavaScript ships with the wheel, so it works
        without internet). ``"matplotlib"``: ipywidgets sliders over :func:`plot_planes` (no WebGL needed).
        ``"static"``: the PNG only. ``"auto"`` (default): ``$PACSAI_VIEWER`` where set, else niivue inside a
        notebook frontend that shows widgets (JupyterLab, Notebook 7, VS Code) when ipyniivue is installed,
        matplotlib when it is not, and static everywhere else: outside a kernel, and in papermill or
        ``nbconvert --execute`` runs, so that an executed notebook stores no widget state and its HTML export shows
        the picture offline.
    center, window, prescription_gy
        As in :func:`plot_planes` (initial plane position, grey window in HU, isodose reference).
    height
        Widget height in pixels.

    Returns
    -------
    Viewer
        Display it. Its output holds the widget view (with a legend of the structure colours and the dose scale)
        *and* a static PNG of the three planes (legend and dose colour bar in the picture): JupyterLab shows the
        widget, nbconvert HTML the PNG.
    """
    structures = dict(structures or {})
    chosen = _choose_backend(backend)
    fig = plot_planes(volume, structures, dose, center=center, window=window, prescription_gy=prescription_gy)
    png = figure_png(fig)
    widget = legend = None
    if chosen == "niivue":
        import ipywidgets as widgets

        widget = _niivue_widget(volume, structures, dose, window=window, height=height)
        shown = [n for n in structures if _key(n) not in _OUTER]  # the overlay leaves the body outline out
        legend = widgets.HTML(legend_html(shown, _dose_overlay_range(dose) if dose is not None else None))
    elif chosen == "matplotlib":
        widget = _matplotlib_widget(volume, structures, dose, center=center, window=window,
                                    prescription_gy=prescription_gy)
    logger.debug("viewer backend %s, static picture %d bytes", chosen, len(png))
    return Viewer(backend=chosen, png=png, widget=widget, legend=legend)
